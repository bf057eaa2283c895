//! Policies: hooks on the request path.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use crate::api::abi_stable::std_types::{RSlice, RStr, Tuple2};
use crate::api::{self, ContextMut, HeadMut, HostResult, HostStatus, HttpCallout};
use crate::Flow;

/// A policy: created once per policy step of the configuration, then called for every request
/// that reaches the step.
///
/// Hooks are synchronous and run on the gateway's request threads: never block in them. Work
/// that waits (reading the body, a cache, a counter, an HTTP call) is asked of the host through
/// the [`Context`]; return [`Flow::PAUSE`] and the host calls [`Policy::on_resume`] when it is
/// done.
pub trait Policy: Send + Sync + Sized + 'static {
    /// The step's configuration (from the API configuration's `config`), parsed strictly.
    type Config: serde::de::DeserializeOwned;

    /// Builds the instance; an error rejects the configuration before it serves.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Inbound and backend sections.
    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let _ = (req, ctx);
        Flow::CONTINUE
    }

    /// Outbound section.
    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let _ = (resp, ctx);
        Flow::CONTINUE
    }

    /// After [`Flow::PAUSE`]: the host work is done ([`Context::result`], [`Context::body`]).
    /// `head` is the request or the response, as in the hook that paused
    /// ([`Context::phase`]). May pause again.
    fn on_resume(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let _ = (head, ctx);
        Flow::CONTINUE
    }
}

/// A request or response head, borrowed from the gateway.
pub struct Head<'h, 'a> {
    inner: &'h mut HeadMut<'a>,
}

impl<'h, 'a> Head<'h, 'a> {
    /// Wraps the host's view.
    pub fn new(inner: &'h mut HeadMut<'a>) -> Self {
        Self { inner }
    }

    /// Request method (empty for a response).
    pub fn method(&self) -> &str {
        self.inner.method().into()
    }

    /// Request path as the client sent it (empty for a response).
    pub fn path(&self) -> &str {
        self.inner.path().into()
    }

    /// Query string without `?`: the one a policy set, when an earlier step did.
    pub fn query(&self) -> &str {
        self.inner.query().into()
    }

    /// Response status (0 for a request).
    pub fn status(&self) -> u16 {
        self.inner.status()
    }

    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.inner
            .header(name.into())
            .into_option()
            .map(|s| s.as_slice())
    }

    /// Every value of a header, in order.
    pub fn header_values<'s>(
        &'s self,
        name: &'s str,
    ) -> impl Iterator<Item = &'s [u8]> + use<'s, 'h, 'a> {
        let n = self.inner.header_count(name.into());
        (0..n).filter_map(move |i| {
            self.inner
                .header_at(name.into(), i)
                .into_option()
                .map(|s| s.as_slice())
        })
    }

    /// Every header line as (lower-case name, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> + use<'_, 'h, 'a> {
        (0..self.inner.header_len()).filter_map(move |i| {
            self.inner
                .header_entry(i)
                .into_option()
                .map(|Tuple2(n, v)| (n.as_str(), v.as_slice()))
        })
    }

    /// Replaces a header; false when name or value is not valid HTTP.
    pub fn set_header(&mut self, name: &str, value: &[u8]) -> bool {
        self.inner.set_header(name.into(), value.into())
    }

    /// Adds a header value.
    pub fn append_header(&mut self, name: &str, value: &[u8]) -> bool {
        self.inner.append_header(name.into(), value.into())
    }

    /// Removes a header; false when it was absent.
    pub fn remove_header(&mut self, name: &str) -> bool {
        self.inner.remove_header(name.into())
    }

    /// Changes the request method.
    pub fn set_method(&mut self, method: &str) -> bool {
        self.inner.set_method(method.into())
    }

    /// Sets the path sent to the backend, after the backend's base path.
    pub fn set_path(&mut self, path: &str) -> bool {
        self.inner.set_path(path.into())
    }

    /// Replaces the query sent to the backend (empty removes it).
    pub fn set_query(&mut self, query: &str) -> bool {
        self.inner.set_query(query.into())
    }

    /// Changes the response status.
    pub fn set_status(&mut self, status: u16) -> bool {
        self.inner.set_status(status)
    }
}

/// A piece of host work asked for through the [`Context`]; its answer is
/// [`Context::result`] once the policy is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub u32);

/// An HTTP request for [`Context::http_call`].
#[derive(Debug, Clone, Copy)]
pub struct Callout<'c> {
    /// Method.
    pub method: &'c str,
    /// Absolute URL.
    pub url: &'c str,
    /// Headers.
    pub headers: &'c [(&'c str, &'c [u8])],
    /// Body.
    pub body: &'c [u8],
    /// Deadline (`None`: the host's default).
    pub timeout: Option<Duration>,
}

/// The request's context, borrowed from the gateway.
pub struct Context<'h, 'a> {
    inner: &'h mut ContextMut<'a>,
}

impl<'h, 'a> Context<'h, 'a> {
    /// Wraps the host's context.
    pub fn new(inner: &'h mut ContextMut<'a>) -> Self {
        Self { inner }
    }

    /// API id.
    pub fn api_id(&self) -> &str {
        self.inner.api_id().into()
    }

    /// Operation id.
    pub fn operation_id(&self) -> &str {
        self.inner.operation_id().into()
    }

    /// The operation's URL template.
    pub fn operation_template(&self) -> &str {
        self.inner.operation_template().into()
    }

    /// Product id (empty when none).
    pub fn product_id(&self) -> &str {
        self.inner.product_id().into()
    }

    /// Subscription id (empty for open APIs).
    pub fn subscription_id(&self) -> &str {
        self.inner.subscription_id().into()
    }

    /// Client IP address.
    pub fn client_ip(&self) -> &str {
        self.inner.client_ip().into()
    }

    /// Request id.
    pub fn request_id(&self) -> &str {
        self.inner.request_id().into()
    }

    /// The section running ([`crate::api::phase`]).
    pub fn phase(&self) -> u8 {
        self.inner.phase()
    }

    /// A variable set by an earlier policy.
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.inner
            .variable(name.into())
            .into_option()
            .map(Into::into)
    }

    /// Sets a variable for later policies.
    pub fn set_variable(&mut self, name: &str, value: &str) {
        self.inner.set_variable(name.into(), value.into());
    }

    /// The error that led to on-error (empty otherwise).
    pub fn last_error(&self) -> &str {
        self.inner.last_error().into()
    }

    /// Records an error; return [`Flow::ERROR`] after it.
    pub fn set_error(&mut self, message: &str) {
        self.inner.set_error(message.into());
    }

    /// Sets the response to answer with; return [`Flow::RESPOND`] after it.
    pub fn respond(&mut self, status: u16, body: &[u8]) {
        self.inner.respond(status, body.into());
    }

    /// Adds a header to the response set with [`Context::respond`].
    pub fn respond_header(&mut self, name: &str, value: &[u8]) -> bool {
        self.inner.respond_header(name.into(), value.into())
    }

    /// Answers in the gateway's own JSON error shape: `{"statusCode", "error", "message",
    /// "requestId"}` plus `extra` string fields, `application/json`. Return
    /// [`Flow::RESPOND`] after it.
    pub fn respond_error(
        &mut self,
        status: u16,
        code: &str,
        message: &str,
        extra: &[(&str, &str)],
    ) {
        let mut body = serde_json::Map::new();
        body.insert("statusCode".into(), status.into());
        body.insert("error".into(), code.into());
        body.insert("message".into(), message.into());
        body.insert("requestId".into(), self.request_id().into());
        for (k, v) in extra {
            body.insert((*k).into(), (*v).into());
        }
        let body = serde_json::to_vec(&serde_json::Value::Object(body)).unwrap_or_default();
        self.respond(status, &body);
        self.respond_header("content-type", b"application/json");
    }

    /// This step's own number for this request, kept across pause and resume (0 at first).
    pub fn slot(&self) -> u64 {
        self.inner.slot()
    }

    /// Sets this step's number.
    pub fn set_slot(&mut self, value: u64) {
        self.inner.set_slot(value);
    }

    /// Asks for the current message's body, up to `limit` bytes; pause, then read
    /// [`Context::body`] (and [`Context::result`] says [`HostStatus::TOO_LARGE`] when it was
    /// larger).
    pub fn want_body(&mut self, limit: u64) -> Token {
        Token(self.inner.want_body(limit))
    }

    /// The buffered body, once asked for and read.
    pub fn body(&self) -> Option<&[u8]> {
        self.inner.body().into_option().map(|b| b.as_slice())
    }

    /// Replaces the current message's body.
    pub fn set_body(&mut self, body: &[u8]) {
        self.inner.set_body(body.into());
    }

    /// Looks a key up in a cache (empty name: the default cache).
    pub fn cache_get(&mut self, cache: &str, key: &[u8]) -> Token {
        Token(self.inner.cache_get(cache.into(), key.into()))
    }

    /// Stores a value in a cache.
    pub fn cache_set(&mut self, cache: &str, key: &[u8], value: &[u8], ttl: Duration) -> Token {
        Token(
            self.inner
                .cache_set(cache.into(), key.into(), value.into(), millis(ttl)),
        )
    }

    /// Removes a key from a cache.
    pub fn cache_delete(&mut self, cache: &str, key: &[u8]) -> Token {
        Token(self.inner.cache_delete(cache.into(), key.into()))
    }

    /// Adds to a counter; the new value is [`HostResult::number`].
    pub fn counter_add(&mut self, cache: &str, key: &[u8], delta: i64, ttl: Duration) -> Token {
        Token(
            self.inner
                .counter_add(cache.into(), key.into(), delta, millis(ttl)),
        )
    }

    /// Makes an HTTP call; the answer's status, body and headers come through
    /// [`Context::result`] and [`Context::result_header`].
    pub fn http_call(&mut self, call: &Callout<'_>) -> Token {
        let headers: Vec<Tuple2<RStr<'_>, RSlice<'_, u8>>> = call
            .headers
            .iter()
            .map(|(n, v)| Tuple2((*n).into(), (*v).into()))
            .collect();
        Token(self.inner.http_call(HttpCallout {
            method: call.method.into(),
            url: call.url.into(),
            headers: headers.as_slice().into(),
            body: call.body.into(),
            timeout_ms: call.timeout.map_or(0, millis),
        }))
    }

    /// The answer for a token.
    pub fn result(&self, token: Token) -> HostResult<'_> {
        self.inner.result(token.0)
    }

    /// Whether a token's work succeeded.
    pub fn ok(&self, token: Token) -> bool {
        self.result(token).status == HostStatus::OK
    }

    /// A header of an HTTP call's response.
    pub fn result_header(&self, token: Token, name: &str) -> Option<&[u8]> {
        self.inner
            .result_header(token.0, name.into())
            .into_option()
            .map(|s| s.as_slice())
    }

    /// Records the cache outcome for telemetry (`hit`, `miss`).
    pub fn set_cache_status(&mut self, status: &str) {
        self.inner.set_cache_status(status.into());
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Adapts a [`Policy`] to the ABI, catching panics inside the plugin.
pub(crate) struct Adapter<P>(pub(crate) P);

fn guarded(f: impl FnOnce() -> Flow) -> Flow {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Flow::PANICKED)
}

impl<P: Policy> api::Policy for Adapter<P> {
    fn on_request(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow {
        guarded(|| {
            self.0
                .on_request(&mut Head::new(head), &mut Context::new(ctx))
        })
    }

    fn on_response(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow {
        guarded(|| {
            self.0
                .on_response(&mut Head::new(head), &mut Context::new(ctx))
        })
    }

    fn on_resume(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow {
        guarded(|| {
            self.0
                .on_resume(&mut Head::new(head), &mut Context::new(ctx))
        })
    }
}
