//! A tokio runtime owned by the plugin, for caches (and sinks) that do asynchronous I/O.
//!
//! Each dynamic library carries its own copy of tokio, with its own thread-locals: the
//! gateway's runtime is not usable from a plugin, and a plugin's I/O must run on a runtime the
//! plugin created. [`spawn`] starts a future on this library's runtime (created on first use,
//! two worker threads named `outpost-plugin`) and answers a [`Reply`] that the gateway can
//! poll from its own threads: it only waits for the task's result.
//!
//! ```
//! use outpost_plugin_sdk::cache::Reply;
//! use outpost_plugin_sdk::runtime;
//!
//! fn lookup(key: Vec<u8>) -> Reply<Option<Vec<u8>>> {
//!     runtime::spawn(async move {
//!         // talk to the network here, on the plugin's runtime
//!         Ok(Some(key))
//!     })
//! }
//! # let r = lookup(b"k".to_vec());
//! ```

use std::future::Future;
use std::sync::OnceLock;

use crate::api::ErrorKind;
use crate::cache::Reply;
use crate::Error;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// This library's runtime (created on first use).
pub fn handle() -> &'static tokio::runtime::Handle {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("outpost-plugin")
                .enable_all()
                .build()
                .expect("the plugin runtime starts")
        })
        .handle()
}

/// Runs `f` on this library's runtime; the answer waits for it.
pub fn spawn<T, F>(f: F) -> Reply<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
{
    let task = handle().spawn(f);
    Reply::future(async move {
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                Err(Error::new(ErrorKind::PANICKED, "the cache task panicked"))
            }
            Err(e) => Err(Error::new(ErrorKind::INTERNAL, e.to_string())),
        }
    })
}
