//! Body types on both sides of the proxy. Enums rather than boxed trait objects so that
//! forwarding a streamed body costs no allocation per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

pin_project! {
    /// What the gateway answers a client with: a backend's streamed body, or a body of its own.
    #[project = ResponseBodyProj]
    #[allow(missing_docs)] // fields: see `ResponseBody::upstream` and `ResponseBody::full`
    pub enum ResponseBody {
        /// Streamed from the backend, frames (including trailers) passed through as they come.
        /// Cut off when the backend sends nothing for `idle`.
        Upstream {
            #[pin]
            inner: Incoming,
            idle: Duration,
            moved: bool,
            timer: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        /// Produced by the gateway (errors, health answers).
        Full { data: Option<Bytes> },
    }
}

/// A backend's response body went quiet for longer than `upstream.body_idle_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?}")]
pub struct BodyIdleTimeout(Duration);

impl ResponseBody {
    /// A backend's body, cut off after `idle` without data. The timer is only created once the
    /// body actually waits, so a response that arrives in one piece never touches it.
    pub fn upstream(inner: Incoming, idle: Duration) -> Self {
        Self::Upstream {
            inner,
            idle,
            moved: false,
            timer: None,
        }
    }

    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::Full { data: None }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ResponseBodyProj::Upstream {
                inner,
                idle,
                moved,
                timer,
            } => match inner.poll_frame(cx) {
                Poll::Ready(frame) => {
                    *moved = true;
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *idle;
                    let timer = match timer {
                        Some(t) => {
                            if std::mem::take(moved) {
                                t.as_mut().reset(deadline);
                            }
                            t
                        }
                        None => {
                            *moved = false;
                            timer.insert(Box::pin(tokio::time::sleep_until(deadline)))
                        }
                    };
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdleTimeout(*idle).into()))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
            ResponseBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { inner, .. } => inner.is_end_stream(),
            Self::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { inner, .. } => inner.size_hint(),
            Self::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// Reading from the client failed (it went away, or sent a malformed body).
    #[error("reading the request body failed: {0}")]
    Client(#[from] hyper::Error),
    /// The body passed `limits.max_body_bytes`.
    #[error("the request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

/// How far a request body got, shared by the body (which updates it) and the proxy (which
/// watches it): the response-header timeout runs from the end of an upload rather than its
/// start, and a failure is blamed on the right party even when the HTTP client hides the body
/// error. Only requests that carry a body allocate one.
#[derive(Debug)]
pub struct Progress {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
    state: AtomicU8,
}

/// Where a request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    /// Still arriving.
    Streaming,
    /// Completely read.
    Done,
    /// Cut off at the body limit.
    TooLarge,
    /// The client's side failed (aborted, malformed chunking).
    ClientFailed,
}

impl Progress {
    /// A tracker starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            state: AtomicU8::new(0),
        })
    }

    fn tick(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn set(&self, state: BodyState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// The instant the body last moved (or finished).
    pub fn last(&self) -> tokio::time::Instant {
        self.start + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Where the body stands.
    pub fn state(&self) -> BodyState {
        match self.state.load(Ordering::Relaxed) {
            1 => BodyState::Done,
            2 => BodyState::TooLarge,
            3 => BodyState::ClientFailed,
            _ => BodyState::Streaming,
        }
    }
}

pin_project! {
    /// A client's request body on its way to the backend, counted against the body limit.
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        limit: u64,
        seen: u64,
        progress: Option<Arc<Progress>>,
    }
}

impl RequestBody {
    /// Wraps `inner`; `limit` is `u64::MAX` when there is none.
    pub fn new(inner: Incoming, limit: Option<u64>, progress: Option<Arc<Progress>>) -> Self {
        Self {
            inner,
            limit: limit.unwrap_or(u64::MAX),
            seen: 0,
            progress,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let (out, state) = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => (Poll::Ready(None), Some(BodyState::Done)),
            Poll::Ready(Some(Err(e))) => (
                Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
                Some(BodyState::ClientFailed),
            ),
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                *this.seen += len;
                if *this.seen > *this.limit {
                    (
                        Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit: *this.limit }))),
                        Some(BodyState::TooLarge),
                    )
                } else {
                    let done = this.inner.is_end_stream();
                    (
                        Poll::Ready(Some(Ok(frame))),
                        done.then_some(BodyState::Done),
                    )
                }
            }
        };
        if let Some(p) = this.progress.as_ref() {
            p.tick();
            if let Some(state) = state {
                p.set(state);
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
