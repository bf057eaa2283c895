//! `limit-concurrency`: at most `max_count` requests with the same key in flight in this
//! gateway process.
//!
//! The count is local on purpose. A permit must be given back when the request ends however
//! it ends — answered, failed, or the client gone — and that happens in the gateway's clean-up
//! (`phase::END`), where no host work (no cache call) can be made. A permit held in a shared
//! cache would also outlive a gateway that crashed while holding it, blocking the key for
//! every replica. Each replica therefore enforces `max_count` on its own.

use outpost_plugin_sdk::{phase, Context, Flow, Head, Policy};

use crate::config::{self, LimitConcurrencyConfig};
use crate::limit::answer;
use crate::local;

/// The host property that asks for the `phase::END` call.
const NOTIFY_END: &str = "outpost.notify-end";

/// Limits how many requests with the same key are in flight at once.
pub struct LimitConcurrency {
    key: outpost_plugin_sdk::template::Template,
    max_count: u64,
}

impl Policy for LimitConcurrency {
    type Config = LimitConcurrencyConfig;

    fn new(c: Self::Config) -> Result<Self, String> {
        if c.max_count == 0 {
            return Err("max_count must be at least 1".into());
        }
        Ok(LimitConcurrency {
            key: config::template("key", &c.key)?,
            max_count: c.max_count,
        })
    }

    /// Takes a permit (and asks to be called when the request ends), or answers 429.
    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let permit = KEY.with_borrow_mut(|key| {
            key.clear();
            self.key.render(req, ctx, key);
            local::permits().acquire(key, self.max_count)
        });
        match permit {
            Some(p) => {
                ctx.set_slot(p);
                ctx.set_variable(NOTIFY_END, "1");
                Flow::CONTINUE
            }
            None => {
                answer(
                    ctx,
                    429,
                    "concurrency_limit_exceeded",
                    &format!(
                        "Too many concurrent requests: at most {} at a time.",
                        self.max_count
                    ),
                );
                Flow::RESPOND
            }
        }
    }

    /// The request ended: give the permit back.
    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if ctx.phase() == phase::END && ctx.slot() != 0 {
            local::permits().release(ctx.slot());
            ctx.set_slot(0);
        }
        Flow::CONTINUE
    }
}

std::thread_local! {
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}
