//! The wall clock windows are cut from: the gateway's, so that every replica agrees on the
//! window (replicas' clocks are assumed NTP-synchronised). Tests set it per thread.

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    #[cfg(test)]
    if let Some(t) = fixed::NOW.get() {
        return t;
    }
    outpost_plugin_sdk::host::now_unix_ms()
}

/// A clock the tests move by hand (per thread: each test runs on its own thread).
#[cfg(test)]
pub(crate) mod fixed {
    use std::cell::Cell;

    thread_local! {
        pub(crate) static NOW: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Sets this thread's clock.
    pub(crate) fn set(ms: u64) {
        NOW.set(Some(ms));
    }
}
