//! Caches: asynchronous, answered through FFI-safe futures.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::api::abi_stable::std_types::{ROption, RResult, RSlice, RVec};
use crate::api::async_ffi::FutureExt as _;
use crate::api::{self, CacheFuture, ErrorKind};
use crate::Error;

/// A cache the gateway's policies use (response caching, stored values, shared counters).
///
/// Calls come from the gateway's request threads and must not block: answer at once with
/// [`Reply::ready`] (an in-memory cache) or start the I/O on the plugin's own runtime and
/// answer with [`Reply::future`] (see [`crate::runtime`], feature `runtime`). The gateway
/// applies its own deadline; an error or a timeout is the policy's answer (it decides whether
/// that is a miss or a failure), never a failed request by itself.
pub trait Cache: Send + Sync + Sized + 'static {
    /// The cache's configuration (the manifest entry's `config`), parsed strictly.
    type Config: serde::de::DeserializeOwned;

    /// Builds the cache; an error stops the gateway from starting.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The value stored under `key`.
    fn get(&self, key: &[u8]) -> Reply<Option<Vec<u8>>>;

    /// Stores a value (`ttl` `None`: no expiry).
    fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Reply<()>;

    /// Removes a key; answers whether it was there.
    fn delete(&self, key: &[u8]) -> Reply<bool>;

    /// Adds `delta` to a counter (created at 0 with `ttl` when absent), atomically; answers
    /// the new value.
    fn increment(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> Reply<i64>;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// A cache's answer: ready now, or a future.
pub struct Reply<T>(ReplyInner<T>);

enum ReplyInner<T> {
    Ready(Result<T, Error>),
    Future(BoxFuture<T>),
}

impl<T: Send + 'static> Reply<T> {
    /// An answer known now.
    pub fn ready(result: Result<T, Error>) -> Self {
        Reply(ReplyInner::Ready(result))
    }

    /// An answer that comes later. The future is polled by the gateway's threads: it must only
    /// wait (on a channel or a task handle of the plugin's runtime), not drive I/O that needs
    /// the plugin's runtime to be current.
    pub fn future(f: impl Future<Output = Result<T, Error>> + Send + 'static) -> Self {
        Reply(ReplyInner::Future(Box::pin(f)))
    }

    /// The answer itself (for a cache's own tests, and for plugins that compose caches).
    pub async fn resolve(self) -> Result<T, Error> {
        match self.0 {
            ReplyInner::Ready(r) => r,
            ReplyInner::Future(f) => match CatchUnwind(f).await {
                Ok(r) => r,
                Err(()) => Err(Error::new(ErrorKind::PANICKED, "the cache panicked")),
            },
        }
    }

    pub(crate) fn into_ffi<U>(self, map: fn(T) -> U) -> CacheFuture<U>
    where
        U: api::abi_stable::StableAbi + Send + 'static,
    {
        match self.0 {
            ReplyInner::Ready(r) => {
                let r: RResult<U, api::PluginError> = r.map(map).map_err(Error::into_abi).into();
                async move { r }.into_ffi()
            }
            ReplyInner::Future(f) => async move {
                match (CatchUnwind(f)).await {
                    Ok(Ok(v)) => RResult::ROk(map(v)),
                    Ok(Err(e)) => RResult::RErr(e.into_abi()),
                    Err(()) => RResult::RErr(
                        Error::new(ErrorKind::PANICKED, "the cache panicked").into_abi(),
                    ),
                }
            }
            .into_ffi(),
        }
    }
}

/// Polls a future, turning a panic into `Err(())` so it never unwinds into the gateway.
struct CatchUnwind<T>(BoxFuture<T>);

impl<T> Future for CatchUnwind<T> {
    type Output = Result<Result<T, Error>, ()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let f = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

fn ttl(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn panicked<T: api::abi_stable::StableAbi + Send + 'static>() -> CacheFuture<T> {
    let e = Error::new(ErrorKind::PANICKED, "the cache panicked").into_abi();
    async move { RResult::RErr(e) }.into_ffi()
}

fn call<T, U>(f: impl FnOnce() -> Reply<T>, map: fn(T) -> U) -> CacheFuture<U>
where
    T: Send + 'static,
    U: api::abi_stable::StableAbi + Send + 'static,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(reply) => reply.into_ffi(map),
        Err(_) => panicked(),
    }
}

pub(crate) struct Adapter<C>(pub(crate) C);

impl<C: Cache> api::Cache for Adapter<C> {
    fn get(&self, key: RSlice<'_, u8>) -> CacheFuture<ROption<RVec<u8>>> {
        call(
            || self.0.get(key.as_slice()),
            |v: Option<Vec<u8>>| v.map(RVec::from).into(),
        )
    }

    fn set(&self, key: RSlice<'_, u8>, value: RSlice<'_, u8>, ttl_ms: u64) -> CacheFuture<()> {
        call(
            || self.0.set(key.as_slice(), value.as_slice(), ttl(ttl_ms)),
            |()| (),
        )
    }

    fn delete(&self, key: RSlice<'_, u8>) -> CacheFuture<bool> {
        call(|| self.0.delete(key.as_slice()), |b| b)
    }

    fn increment(&self, key: RSlice<'_, u8>, delta: i64, ttl_ms: u64) -> CacheFuture<i64> {
        call(
            || self.0.increment(key.as_slice(), delta, ttl(ttl_ms)),
            |n| n,
        )
    }
}
