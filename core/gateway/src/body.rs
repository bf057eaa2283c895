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
    /// A body as it comes from the other side: still streaming, read into memory by a policy
    /// (and possibly replaced), or partly read (a policy's limit was reached) with the rest
    /// still streaming.
    #[project = SourceProj]
    #[allow(missing_docs)] // variants: see the constructors
    pub enum Source {
        Stream {
            #[pin]
            inner: Incoming,
        },
        Full {
            data: Option<Bytes>,
        },
        Prefixed {
            prefix: Option<Bytes>,
            #[pin]
            rest: Incoming,
        },
    }
}

impl From<Incoming> for Source {
    fn from(inner: Incoming) -> Self {
        Source::Stream { inner }
    }
}

impl Source {
    /// The whole body, when it can be sent again: known in full, or empty.
    pub fn replayable(&self) -> Option<Bytes> {
        match self {
            Source::Full { data } => Some(data.clone().unwrap_or_default()),
            Source::Stream { inner } if Body::is_end_stream(inner) => Some(Bytes::new()),
            _ => None,
        }
    }

    /// A complete body.
    pub fn full(data: Bytes) -> Self {
        Source::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl Body for Source {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            SourceProj::Stream { inner } => inner.poll_frame(cx),
            SourceProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            SourceProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => rest.poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Stream { inner } => inner.is_end_stream(),
            Source::Full { data } => data.is_none(),
            Source::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Stream { inner } => inner.size_hint(),
            Source::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Source::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}

pin_project! {
    /// What the gateway answers a client with: a backend's streamed body, or a body of its own.
    #[project = ResponseBodyProj]
    #[allow(missing_docs)] // fields: see `ResponseBody::upstream` and `ResponseBody::full`
    pub enum ResponseBody {
        /// Streamed from the backend, frames (including trailers) passed through as they come.
        /// Cut off when the backend sends nothing for `idle`.
        Upstream {
            #[pin]
            inner: Source,
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
    pub fn upstream(inner: impl Into<Source>, idle: Duration) -> Self {
        Self::Upstream {
            inner: inner.into(),
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
        inner: Source,
        limit: u64,
        seen: u64,
        progress: Option<Arc<Progress>>,
    }
}

impl RequestBody {
    /// Wraps `inner`; `limit` is `u64::MAX` when there is none.
    pub fn new(
        inner: impl Into<Source>,
        limit: Option<u64>,
        progress: Option<Arc<Progress>>,
    ) -> Self {
        Self {
            inner: inner.into(),
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

/// What reading a body into memory gave.
#[derive(Debug)]
pub enum Buffered {
    /// The whole body (the source now holds a copy of it).
    Complete(Bytes),
    /// More than the limit: the source now holds what was read followed by the rest.
    TooLarge,
}

/// Why a body could not be read into memory.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The other side failed while sending it.
    #[error("reading the body failed: {0}")]
    Failed(#[from] hyper::Error),
    /// The other side sent nothing for too long.
    #[error("the body stalled for {0:?}")]
    Idle(Duration),
}

/// Reads a body into memory, up to `limit` bytes, waiting at most `idle` for each piece.
/// Trailers of a buffered body are dropped.
pub async fn buffer(
    source: &mut Source,
    limit: u64,
    idle: Duration,
) -> Result<Buffered, BufferError> {
    use http_body_util::BodyExt;

    let (mut collected, rest) = match std::mem::replace(source, Source::Full { data: None }) {
        Source::Full { data } => {
            let data = data.unwrap_or_default();
            let fits = data.len() as u64 <= limit;
            *source = Source::full(data.clone());
            return Ok(if fits {
                Buffered::Complete(data)
            } else {
                Buffered::TooLarge
            });
        }
        Source::Stream { inner } => (bytes::BytesMut::new(), inner),
        Source::Prefixed { prefix, rest } => (
            bytes::BytesMut::from(prefix.unwrap_or_default().as_ref()),
            rest,
        ),
    };
    let mut rest = rest;
    loop {
        if collected.len() as u64 > limit {
            *source = Source::Prefixed {
                prefix: Some(collected.freeze()),
                rest,
            };
            return Ok(Buffered::TooLarge);
        }
        if rest.is_end_stream() {
            break;
        }
        match tokio::time::timeout(idle, rest.frame()).await {
            Err(_) => return Err(BufferError::Idle(idle)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BufferError::Failed(e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    collected.extend_from_slice(&data);
                }
            }
        }
    }
    let data = collected.freeze();
    *source = Source::full(data.clone());
    Ok(Buffered::Complete(data))
}
