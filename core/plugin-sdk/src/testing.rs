//! Run a policy in a unit test, without a gateway: build it from JSON config as the gateway
//! would, then call its hooks on a [`TestHead`] and a [`TestContext`].
//!
//! ```
//! use outpost_plugin_sdk::testing::{policy, TestContext, TestHead};
//! # use outpost_plugin_sdk::{Context, Flow, Head, Policy};
//! # pub struct Tag;
//! # impl Policy for Tag {
//! #     type Config = ();
//! #     fn new(_: ()) -> Result<Self, String> { Ok(Tag) }
//! #     fn on_request(&self, req: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
//! #         req.set_header("x-tag", b"1");
//! #         Flow::CONTINUE
//! #     }
//! # }
//! let p = policy::<Tag>("null").expect("config accepted");
//! let mut req = TestHead::request("GET", "/orders");
//! let mut ctx = TestContext::default();
//! assert_eq!(outpost_plugin_sdk::testing::on_request(&p, &mut req, &mut ctx), outpost_plugin_sdk::Flow::CONTINUE);
//! assert_eq!(req.header_str("x-tag"), Some("1"));
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};

use crate::api::abi_stable::sabi_trait::TD_Opaque;
use crate::api::abi_stable::sabi_types::RMut;
use crate::api::abi_stable::std_types::{ROption, RResult, RSlice, RStr, Tuple2};
use crate::api::{
    self, CacheBox, HostResult, HostStatus, HttpCallout, HttpHead_TO, PluginError, PolicyBox,
    RequestContext_TO, SinkBox, StoreBox,
};
use crate::{Cache, Flow, Policy, Sink, Store};

/// Builds a policy from its JSON configuration, exactly as the gateway does.
pub fn policy<P: Policy>(config_json: &str) -> Result<PolicyBox, PluginError> {
    crate::__private::factory(|| crate::new_policy::<P>(config_json)).into_result()
}

/// Builds a telemetry sink from its JSON configuration, as the gateway does; call
/// `export`, `export_metrics` and `flush` on the result.
pub fn sink<S: Sink>(config_json: &str) -> Result<SinkBox, PluginError> {
    crate::__private::factory(|| crate::new_sink::<S>(config_json)).into_result()
}

/// Builds a cache from its JSON configuration, as the gateway does; await its answers with
/// [`block_on`].
pub fn cache<C: Cache>(config_json: &str) -> Result<CacheBox, PluginError> {
    crate::__private::factory(|| crate::new_cache::<C>(config_json)).into_result()
}

/// Builds a backup store from its JSON configuration, as the gateway does.
pub fn store<S: Store>(config_json: &str) -> Result<StoreBox, PluginError> {
    crate::__private::factory(|| crate::new_store::<S>(config_json)).into_result()
}

/// Waits for a future on the current thread (for a cache's answers in tests).
pub fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A cache answer as a plain `Result`.
pub fn answer<T>(r: RResult<T, PluginError>) -> Result<T, String> {
    r.into_result().map_err(|e| e.message.into_string())
}

fn call(
    p: &PolicyBox,
    head: &mut TestHead,
    ctx: &mut TestContext,
    phase: u8,
    hook: fn(&PolicyBox, &mut api::HeadMut<'_>, &mut api::ContextMut<'_>) -> Flow,
) -> Flow {
    if phase != 0 {
        ctx.phase = phase;
    }
    let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
    let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
    hook(p, &mut h, &mut c)
}

/// Runs the request hook (phase inbound).
pub fn on_request(p: &PolicyBox, head: &mut TestHead, ctx: &mut TestContext) -> Flow {
    call(p, head, ctx, api::phase::INBOUND, |p, h, c| {
        p.on_request(h, c)
    })
}

/// Runs the response hook (phase outbound).
pub fn on_response(p: &PolicyBox, head: &mut TestHead, ctx: &mut TestContext) -> Flow {
    call(p, head, ctx, api::phase::OUTBOUND, |p, h, c| {
        p.on_response(h, c)
    })
}

/// Resumes a policy that paused, after the test answered its requests
/// ([`TestContext::answer`], [`TestContext::body`]).
pub fn on_resume(p: &PolicyBox, head: &mut TestHead, ctx: &mut TestContext) -> Flow {
    call(p, head, ctx, 0, |p, h, c| p.on_resume(h, c))
}

/// A request or response head for tests. Header names are kept lower-case.
#[derive(Debug, Default, Clone)]
pub struct TestHead {
    /// Method (requests).
    pub method: String,
    /// Path (requests).
    pub path: String,
    /// Query without `?`.
    pub query: String,
    /// Status (responses).
    pub status: u16,
    /// The backend path a policy set with `set_path`.
    pub backend_path: Option<String>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestHead {
    /// A request head.
    pub fn request(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            ..Self::default()
        }
    }

    /// A response head.
    pub fn response(status: u16) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// First value of a header as text.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

impl api::HttpHead for TestHead {
    fn method(&self) -> RStr<'_> {
        self.method.as_str().into()
    }
    fn path(&self) -> RStr<'_> {
        self.path.as_str().into()
    }
    fn query(&self) -> RStr<'_> {
        self.query.as_str().into()
    }
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .map(|(_, v)| RSlice::from_slice(v))
            .into()
    }
    fn set_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        let valid = TestHead::default().append_header(name, value);
        if valid {
            self.remove_header(name);
            self.append_header(name, value);
        }
        valid
    }
    fn append_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        // As strict as the gateway: a token name, a value without control characters.
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        let value_ok = value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
        if !name_ok || !value_ok {
            return false;
        }
        self.headers
            .push((name.as_str().to_ascii_lowercase(), value.to_vec()));
        true
    }
    fn remove_header(&mut self, name: RStr<'_>) -> bool {
        let before = self.headers.len();
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_str()));
        before != self.headers.len()
    }
    fn header_count(&self, name: RStr<'_>) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .count()
    }
    fn header_at(&self, name: RStr<'_>, index: usize) -> ROption<RSlice<'_, u8>> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .nth(index)
            .map(|(_, v)| RSlice::from_slice(v))
            .into()
    }
    fn header_len(&self) -> usize {
        self.headers.len()
    }
    fn header_entry(&self, index: usize) -> ROption<Tuple2<RStr<'_>, RSlice<'_, u8>>> {
        self.headers
            .get(index)
            .map(|(n, v)| Tuple2(RStr::from(n.as_str()), RSlice::from_slice(v)))
            .into()
    }
    fn set_method(&mut self, method: RStr<'_>) -> bool {
        if self.status != 0 || method.is_empty() {
            return false;
        }
        self.method = method.into();
        true
    }
    fn set_path(&mut self, path: RStr<'_>) -> bool {
        if self.status != 0 || !path.starts_with('/') {
            return false;
        }
        self.backend_path = Some(path.into());
        true
    }
    fn set_query(&mut self, query: RStr<'_>) -> bool {
        if self.status != 0 {
            return false;
        }
        self.query = query.into();
        true
    }
    fn set_status(&mut self, status: u16) -> bool {
        if self.status == 0 || !(100..=999).contains(&status) {
            return false;
        }
        self.status = status;
        true
    }
}

/// Headers as name (lower-case) and value.
pub type Headers = Vec<(String, Vec<u8>)>;

/// A response a policy set: status, headers, body.
pub type LocalResponse = (u16, Headers, Vec<u8>);

/// A request context for tests; after a hook, `response` holds what the policy answered.
#[derive(Debug, Default, Clone)]
pub struct TestContext {
    /// API id.
    pub api_id: String,
    /// Operation id.
    pub operation_id: String,
    /// Product id.
    pub product_id: String,
    /// Subscription id.
    pub subscription_id: String,
    /// Client IP.
    pub client_ip: String,
    /// Request id.
    pub request_id: String,
    /// Variables.
    pub variables: HashMap<String, String>,
    /// The last error.
    pub error: String,
    /// The local response: status, headers, body.
    pub response: Option<LocalResponse>,
    /// The section running (set by [`on_request`] / [`on_response`]).
    pub phase: u8,
    /// The operation's URL template.
    pub operation_template: String,
    /// The step's slot.
    pub slot: u64,
    /// The body: set it before [`on_resume`] to answer `want_body`; `set_body` replaces it.
    pub body: Option<Vec<u8>>,
    /// Host work the policy asked for, by token (token = index + 1).
    pub requests: Vec<TestRequest>,
    /// Answers for tokens (see [`TestContext::answer`]).
    pub answers: HashMap<u32, TestAnswer>,
    /// What `set_cache_status` recorded.
    pub cache_status: String,
}

/// Host work a policy asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestRequest {
    /// `want_body(limit)`.
    Body {
        /// Limit.
        limit: u64,
    },
    /// `cache_get`.
    CacheGet {
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
    },
    /// `cache_set`.
    CacheSet {
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Time to live.
        ttl_ms: u64,
    },
    /// `cache_delete`.
    CacheDelete {
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
    },
    /// `counter_add`.
    CounterAdd {
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
        /// Delta.
        delta: i64,
        /// Time to live.
        ttl_ms: u64,
    },
    /// `http_call`.
    Http {
        /// Method.
        method: String,
        /// URL.
        url: String,
        /// Headers.
        headers: Headers,
        /// Body.
        body: Vec<u8>,
    },
}

/// The answer a test gives to a piece of host work.
#[derive(Debug, Clone, Default)]
pub struct TestAnswer {
    /// Status ([`HostStatus`]).
    pub status: u8,
    /// Counter value.
    pub number: i64,
    /// HTTP status.
    pub http_status: u16,
    /// Value or response body.
    pub value: Vec<u8>,
    /// Response headers (HTTP calls).
    pub headers: Headers,
    /// Error message.
    pub error: String,
}

impl TestAnswer {
    /// A successful answer with a value.
    pub fn value(value: &[u8]) -> Self {
        Self {
            status: HostStatus::OK.0,
            value: value.to_vec(),
            ..Self::default()
        }
    }

    /// A successful counter answer.
    pub fn number(n: i64) -> Self {
        Self {
            status: HostStatus::OK.0,
            number: n,
            ..Self::default()
        }
    }

    /// A cache miss.
    pub fn miss() -> Self {
        Self {
            status: HostStatus::MISS.0,
            ..Self::default()
        }
    }

    /// A failure.
    pub fn error(message: &str) -> Self {
        Self {
            status: HostStatus::ERROR.0,
            error: message.into(),
            ..Self::default()
        }
    }

    /// An HTTP answer.
    pub fn http(status: u16, body: &[u8]) -> Self {
        Self {
            status: HostStatus::OK.0,
            http_status: status,
            value: body.to_vec(),
            ..Self::default()
        }
    }
}

impl TestContext {
    /// Answers the host work behind a token.
    pub fn answer(&mut self, token: crate::Token, answer: TestAnswer) {
        self.answers.insert(token.0, answer);
    }

    fn push(&mut self, r: TestRequest) -> u32 {
        self.requests.push(r);
        self.requests.len() as u32
    }
}

impl api::RequestContext for TestContext {
    fn api_id(&self) -> RStr<'_> {
        self.api_id.as_str().into()
    }
    fn operation_id(&self) -> RStr<'_> {
        self.operation_id.as_str().into()
    }
    fn product_id(&self) -> RStr<'_> {
        self.product_id.as_str().into()
    }
    fn subscription_id(&self) -> RStr<'_> {
        self.subscription_id.as_str().into()
    }
    fn client_ip(&self) -> RStr<'_> {
        self.client_ip.as_str().into()
    }
    fn request_id(&self) -> RStr<'_> {
        self.request_id.as_str().into()
    }
    fn variable(&self, name: RStr<'_>) -> ROption<RStr<'_>> {
        self.variables
            .get(name.as_str())
            .map(|v| RStr::from(v.as_str()))
            .into()
    }
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>) {
        self.variables.insert(name.into(), value.into());
    }
    fn last_error(&self) -> RStr<'_> {
        self.error.as_str().into()
    }
    fn set_error(&mut self, message: RStr<'_>) {
        self.error = message.into();
    }
    fn respond(&mut self, status: u16, body: RSlice<'_, u8>) {
        self.response = Some((status, Vec::new(), body.to_vec()));
    }
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        match &mut self.response {
            Some((_, headers, _)) => {
                headers.push((name.as_str().to_ascii_lowercase(), value.to_vec()));
                true
            }
            None => false,
        }
    }
    fn phase(&self) -> u8 {
        self.phase
    }
    fn operation_template(&self) -> RStr<'_> {
        self.operation_template.as_str().into()
    }
    fn slot(&self) -> u64 {
        self.slot
    }
    fn set_slot(&mut self, value: u64) {
        self.slot = value;
    }
    fn want_body(&mut self, limit: u64) -> u32 {
        self.push(TestRequest::Body { limit })
    }
    fn body(&self) -> ROption<RSlice<'_, u8>> {
        self.body.as_deref().map(RSlice::from_slice).into()
    }
    fn set_body(&mut self, body: RSlice<'_, u8>) {
        self.body = Some(body.to_vec());
    }
    fn cache_get(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32 {
        self.push(TestRequest::CacheGet {
            cache: cache.into(),
            key: key.to_vec(),
        })
    }
    fn cache_set(
        &mut self,
        cache: RStr<'_>,
        key: RSlice<'_, u8>,
        value: RSlice<'_, u8>,
        ttl_ms: u64,
    ) -> u32 {
        self.push(TestRequest::CacheSet {
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            ttl_ms,
        })
    }
    fn cache_delete(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32 {
        self.push(TestRequest::CacheDelete {
            cache: cache.into(),
            key: key.to_vec(),
        })
    }
    fn counter_add(
        &mut self,
        cache: RStr<'_>,
        key: RSlice<'_, u8>,
        delta: i64,
        ttl_ms: u64,
    ) -> u32 {
        self.push(TestRequest::CounterAdd {
            cache: cache.into(),
            key: key.to_vec(),
            delta,
            ttl_ms,
        })
    }
    fn http_call(&mut self, call: HttpCallout<'_>) -> u32 {
        self.push(TestRequest::Http {
            method: call.method.into(),
            url: call.url.into(),
            headers: call
                .headers
                .iter()
                .map(|Tuple2(n, v)| (n.as_str().to_ascii_lowercase(), v.to_vec()))
                .collect(),
            body: call.body.to_vec(),
        })
    }
    fn result(&self, token: u32) -> HostResult<'_> {
        match self.answers.get(&token) {
            Some(a) => HostResult {
                status: HostStatus(a.status),
                number: a.number,
                http_status: a.http_status,
                value: RSlice::from_slice(&a.value),
                error: a.error.as_str().into(),
            },
            None => HostResult {
                status: HostStatus::UNKNOWN,
                number: 0,
                http_status: 0,
                value: RSlice::from_slice(&[]),
                error: RStr::from(""),
            },
        }
    }
    fn result_header(&self, token: u32, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        self.answers
            .get(&token)
            .and_then(|a| {
                a.headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            })
            .map(|(_, v)| RSlice::from_slice(v))
            .into()
    }
    fn set_cache_status(&mut self, status: RStr<'_>) {
        self.cache_status = status.into();
    }
}
