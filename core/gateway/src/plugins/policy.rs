//! Policy instances and what they see: the request or response head ([`Msg`]), the request
//! context ([`HostContext`]) with the host work policies ask for, and the per-step outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RMut;
use abi_stable::std_types::{ROption, RSlice, RStr, Tuple2};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use outpost_config::FailMode;
use outpost_plugin_api::{
    self as api, level1, Flow, HostResult, HostStatus, HttpCallout, HttpHead_TO, PolicyBox,
    RequestContext_TO,
};

use super::Library;
use crate::metrics::gateway::PLUGIN_PANICS;

/// A policy instance of either level.
pub(super) enum Imp {
    Current(PolicyBox),
    Level1(level1::PolicyBox),
}

/// One policy step's instance.
pub struct PolicyInstance {
    /// Policy name.
    pub name: Arc<str>,
    library: Arc<Library>,
    imp: Imp,
    panics: AtomicU64,
}

impl std::fmt::Debug for PolicyInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyInstance")
            .field("name", &self.name)
            .field("library", &self.library.entry)
            .finish_non_exhaustive()
    }
}

/// How running one step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    /// Go on.
    Continue,
    /// Answer with the local response.
    Respond,
    /// The policy reported an error (in the context).
    Error,
    /// The policy panicked, or is disabled and fails closed.
    Failed,
    /// The policy asked for host work ([`HostContext::work`]); resume it when done.
    Paused,
}

/// Which hook to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `on_request`.
    Request,
    /// `on_response`.
    Response,
    /// `on_resume`.
    Resume,
}

impl PolicyInstance {
    pub(super) fn new(name: &str, library: Arc<Library>, imp: Imp) -> Self {
        Self {
            name: name.into(),
            library,
            imp,
            panics: AtomicU64::new(0),
        }
    }

    /// Whether repeated panics disabled this instance.
    fn disabled(&self) -> Option<FailMode> {
        let limit = self.library.disable_after?;
        (self.panics.load(Ordering::Relaxed) >= limit).then_some(self.library.when_disabled)
    }

    fn outcome(&self, flow: Flow, ctx: &mut HostContext<'_>) -> StepResult {
        match flow {
            Flow::CONTINUE => StepResult::Continue,
            Flow::RESPOND if ctx.response.is_some() => StepResult::Respond,
            Flow::RESPOND => {
                ctx.error = format!("policy '{}' asked to respond without a response", self.name);
                StepResult::Error
            }
            Flow::ERROR => {
                if ctx.error.is_empty() {
                    ctx.error = format!("policy '{}' failed", self.name);
                }
                StepResult::Error
            }
            Flow::PAUSE if matches!(self.imp, Imp::Current(_)) && !ctx.work.is_empty() => {
                StepResult::Paused
            }
            Flow::PAUSE if matches!(self.imp, Imp::Current(_)) => {
                ctx.error = format!(
                    "policy '{}' paused without asking the gateway for anything",
                    self.name
                );
                StepResult::Error
            }
            Flow::PANICKED => {
                let n = self.panics.fetch_add(1, Ordering::Relaxed) + 1;
                PLUGIN_PANICS.inc(&[&self.library.entry, &self.name]);
                tracing::error!(
                    plugin = %self.library.entry,
                    policy = %self.name,
                    panics = n,
                    request_id = ctx.request_id,
                    "Policy panicked; the request fails with 500."
                );
                if self.library.disable_after == Some(n) {
                    tracing::error!(plugin = %self.library.entry, policy = %self.name, mode = ?self.library.when_disabled, "Policy disabled after repeated panics.");
                }
                ctx.error = format!("policy '{}' panicked", self.name);
                StepResult::Failed
            }
            other => {
                ctx.error = format!(
                    "policy '{}' returned an unknown decision {}",
                    self.name, other.0
                );
                StepResult::Error
            }
        }
    }

    /// The last call of a step that asked for it: [`api::phase::END`], through `on_resume`,
    /// with its slot; any work it asks for is dropped.
    fn end(&self, msg: &mut Msg<'_>, ctx: &mut HostContext<'_>, slot: u64) {
        if self.disabled().is_some() {
            return;
        }
        ctx.slot = slot;
        let _ = self.call(Hook::Resume, msg, ctx);
        ctx.work.clear();
    }

    /// Calls one hook. Skipped or failed when the instance is disabled; otherwise the plugin
    /// sees `msg` and `ctx` through trait objects built on the stack (no allocation).
    pub fn call(&self, hook: Hook, msg: &mut Msg<'_>, ctx: &mut HostContext<'_>) -> StepResult {
        match self.disabled() {
            Some(FailMode::FailOpen) => return StepResult::Continue,
            Some(FailMode::FailClosed) => {
                ctx.error = format!("policy '{}' is disabled after repeated panics", self.name);
                return StepResult::Failed;
            }
            None => {}
        }
        if hook != Hook::Resume {
            ctx.slot = 0;
        }
        let flow = match &self.imp {
            Imp::Current(p) => {
                let mut head = HttpHead_TO::from_ptr(RMut::new(&mut *msg), TD_Opaque);
                let mut c = RequestContext_TO::from_ptr(RMut::new(&mut *ctx), TD_Opaque);
                match hook {
                    Hook::Request => p.on_request(&mut head, &mut c),
                    Hook::Response => p.on_response(&mut head, &mut c),
                    Hook::Resume => p.on_resume(&mut head, &mut c),
                }
            }
            Imp::Level1(p) => {
                let mut head = level1::HttpHead_TO::from_ptr(RMut::new(&mut *msg), TD_Opaque);
                let mut c = level1::RequestContext_TO::from_ptr(RMut::new(&mut *ctx), TD_Opaque);
                match hook {
                    Hook::Request => p.on_request(&mut head, &mut c),
                    Hook::Response => p.on_response(&mut head, &mut c),
                    Hook::Resume => Flow::CONTINUE,
                }
            }
        };
        if flow != Flow::PAUSE {
            // Work asked for without pausing is dropped, never done for a later step.
            ctx.work.clear();
        }
        self.outcome(flow, ctx)
    }
}

/// A response set by a policy.
#[derive(Debug)]
pub struct LocalResponse {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Work a policy asked the host for.
#[derive(Debug)]
pub enum Work {
    /// Buffer the current message's body, up to `limit` bytes.
    Body {
        /// Token.
        token: u32,
        /// Limit.
        limit: u64,
    },
    /// Cache lookup.
    CacheGet {
        /// Token.
        token: u32,
        /// Cache name ("" = default).
        cache: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Cache store.
    CacheSet {
        /// Token.
        token: u32,
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Time to live (ms, 0 = none).
        ttl_ms: u64,
    },
    /// Cache removal.
    CacheDelete {
        /// Token.
        token: u32,
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Counter increment.
    CounterAdd {
        /// Token.
        token: u32,
        /// Cache name.
        cache: String,
        /// Key.
        key: Vec<u8>,
        /// Delta.
        delta: i64,
        /// Time to live (ms).
        ttl_ms: u64,
    },
    /// HTTP call.
    Http {
        /// Token.
        token: u32,
        /// Method.
        method: String,
        /// URL.
        url: String,
        /// Headers.
        headers: Vec<(String, Vec<u8>)>,
        /// Body.
        body: Vec<u8>,
        /// Deadline (ms, 0 = default).
        timeout_ms: u64,
    },
}

impl Work {
    /// The token the policy holds for this work.
    pub fn token(&self) -> u32 {
        match self {
            Work::Body { token, .. }
            | Work::CacheGet { token, .. }
            | Work::CacheSet { token, .. }
            | Work::CacheDelete { token, .. }
            | Work::CounterAdd { token, .. }
            | Work::Http { token, .. } => *token,
        }
    }
}

/// The answer to a piece of work.
#[derive(Debug)]
pub struct Done {
    /// Status.
    pub status: HostStatus,
    /// Counter value.
    pub number: i64,
    /// HTTP status.
    pub http_status: u16,
    /// Value or body.
    pub value: Bytes,
    /// HTTP response headers.
    pub headers: HeaderMap,
    /// Why it failed.
    pub error: String,
}

impl Default for Done {
    fn default() -> Self {
        Self {
            status: HostStatus::UNKNOWN,
            number: 0,
            http_status: 0,
            value: Bytes::new(),
            headers: HeaderMap::new(),
            error: String::new(),
        }
    }
}

impl Done {
    /// Success with a value.
    pub fn value(value: Bytes) -> Self {
        Self {
            status: HostStatus::OK,
            value,
            ..Self::default()
        }
    }

    /// A status with no value.
    pub fn status(status: HostStatus) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    /// A failure.
    pub fn failed(status: HostStatus, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            ..Self::default()
        }
    }
}

/// The request context policies see; lives on the request's stack.
#[derive(Debug, Default)]
pub struct HostContext<'r> {
    /// API id.
    pub api_id: &'r str,
    /// Operation id.
    pub operation_id: &'r str,
    /// Operation URL template.
    pub operation_template: &'r str,
    /// The API's backend id (for errors about the response).
    pub backend_id: &'r str,
    /// Product id ("" when none).
    pub product_id: &'r str,
    /// Subscription id ("" when none).
    pub subscription_id: &'r str,
    /// Client IP.
    pub client_ip: &'r str,
    /// Request id.
    pub request_id: &'r str,
    /// The section running ([`api::phase`]).
    pub phase: u8,
    /// The running step's slot.
    pub slot: u64,
    /// Variables set by policies (allocated only when one is set).
    pub variables: Vec<(String, String)>,
    /// The last error.
    pub error: String,
    /// The response a policy asked for.
    pub response: Option<LocalResponse>,
    /// The cache outcome policies recorded.
    pub cache_status: Option<String>,
    /// The current message's body, once buffered (or replaced).
    pub body: Option<Bytes>,
    /// Whether a policy replaced the body.
    pub body_replaced: bool,
    /// Work asked for and not yet done.
    pub work: Vec<Work>,
    /// Answers, by token − 1.
    pub results: Vec<Done>,
    /// The client certificate (base64 DER) for `outpost.client-cert`.
    pub client_cert: Option<&'r str>,
    /// What policies asked of the host through `outpost.` properties.
    pub props: HostProps,
}

/// What policies asked of the gateway through the `outpost.` properties
/// (docs/host-properties.md).
#[derive(Debug, Default)]
pub struct HostProps {
    /// `outpost.backend`: a backend id.
    pub backend: Option<String>,
    /// `outpost.backend-url`: an absolute URL.
    pub backend_url: Option<String>,
    /// `outpost.retry`: the retry rule (JSON).
    pub retry: Option<String>,
    /// `outpost.response-header.*` (replace: `true`) and `outpost.response-header-add.*`
    /// (append: `false`): headers for the client's response.
    pub response_headers: Vec<(HeaderName, HeaderValue, bool)>,
    /// The running step set `outpost.on-response`.
    pub wants_response: bool,
    /// The running step set `outpost.notify-end`.
    pub wants_end: bool,
    /// Inbound or backend steps to call with the backend's response.
    pub on_response: Vec<Arc<PolicyInstance>>,
    /// Steps to call once the request has ended.
    pub on_end: EndHooks,
}

/// The `outpost.` prefix of host properties.
const PROPERTY_PREFIX: &str = "outpost.";

impl HostProps {
    /// Takes a property a policy set; false when it is not a variable too (read-only,
    /// response headers, unknown names).
    fn set(&mut self, name: &str, value: &str) -> bool {
        match name {
            "backend" => self.backend = Some(value.to_owned()),
            "backend-url" => self.backend_url = Some(value.to_owned()),
            "retry" => self.retry = Some(value.to_owned()),
            "on-response" => self.wants_response = true,
            "notify-end" => self.wants_end = true,
            _ => {
                let header = name
                    .strip_prefix("response-header.")
                    .map(|h| (h, true))
                    .or_else(|| {
                        name.strip_prefix("response-header-add.")
                            .map(|h| (h, false))
                    });
                if let Some((h, replace)) = header {
                    match (
                        HeaderName::from_bytes(h.as_bytes()),
                        HeaderValue::from_str(value),
                    ) {
                        (Ok(n), Ok(v)) => {
                            if replace {
                                self.response_headers.retain(|(h, _, _)| *h != n);
                            }
                            self.response_headers.push((n, v, replace));
                        }
                        _ => tracing::debug!(
                            header = h,
                            "A policy set a response header that is not valid HTTP; ignored."
                        ),
                    }
                }
                return false;
            }
        }
        true
    }

    /// After a step's hook: remembers the step for the calls it asked for.
    pub fn register(&mut self, step: &Arc<PolicyInstance>, slot: u64) {
        if std::mem::take(&mut self.wants_response)
            && !self.on_response.iter().any(|s| Arc::ptr_eq(s, step))
        {
            self.on_response.push(step.clone());
        }
        if std::mem::take(&mut self.wants_end) {
            match self
                .on_end
                .steps
                .iter_mut()
                .find(|(s, _)| Arc::ptr_eq(s, step))
            {
                Some((_, s)) => *s = slot,
                None => self.on_end.steps.push((step.clone(), slot)),
            }
        }
    }
}

/// Steps to call in [`api::phase::END`] when the request ends: on drop, so a client that
/// goes away still releases what a step holds.
#[derive(Debug, Default)]
pub struct EndHooks {
    /// Step and its last slot.
    pub steps: Vec<(Arc<PolicyInstance>, u64)>,
    /// The status answered (0: none).
    pub status: u16,
    /// The response body's exact length, when known.
    pub bytes: Option<u64>,
}

impl Drop for EndHooks {
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let status = self.status.to_string();
        let bytes = self.bytes.map(|b| b.to_string());
        let mut head = http::Response::new(()).into_parts().0;
        if let Ok(s) = StatusCode::from_u16(self.status) {
            head.status = s;
        }
        for (step, slot) in std::mem::take(&mut self.steps) {
            let mut variables = vec![("outpost.status".to_owned(), status.clone())];
            if let Some(b) = &bytes {
                variables.push(("outpost.response-bytes".to_owned(), b.clone()));
            }
            let mut ctx = HostContext {
                phase: api::phase::END,
                variables,
                ..HostContext::default()
            };
            let mut msg = Msg::Response(&mut head);
            step.end(&mut msg, &mut ctx, slot);
        }
    }
}

impl HostContext<'_> {
    fn ask(&mut self, make: impl FnOnce(u32) -> Work) -> u32 {
        self.results.push(Done::default());
        let token = self.results.len() as u32;
        self.work.push(make(token));
        token
    }

    /// Stores the answer for a token.
    pub fn answer(&mut self, token: u32, done: Done) {
        if let Some(slot) = token
            .checked_sub(1)
            .and_then(|i| self.results.get_mut(i as usize))
        {
            *slot = done;
        }
    }
}

fn header(name: RStr<'_>, value: RSlice<'_, u8>) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name.as_str().as_bytes()).ok()?,
        HeaderValue::from_bytes(value.as_slice()).ok()?,
    ))
}

impl api::RequestContext for HostContext<'_> {
    fn api_id(&self) -> RStr<'_> {
        self.api_id.into()
    }
    fn operation_id(&self) -> RStr<'_> {
        self.operation_id.into()
    }
    fn product_id(&self) -> RStr<'_> {
        self.product_id.into()
    }
    fn subscription_id(&self) -> RStr<'_> {
        self.subscription_id.into()
    }
    fn client_ip(&self) -> RStr<'_> {
        self.client_ip.into()
    }
    fn request_id(&self) -> RStr<'_> {
        self.request_id.into()
    }
    fn variable(&self, name: RStr<'_>) -> ROption<RStr<'_>> {
        if name.as_str() == "outpost.client-cert" {
            return self.client_cert.map(RStr::from).into();
        }
        self.variables
            .iter()
            .find(|(k, _)| k == name.as_str())
            .map(|(_, v)| RStr::from(v.as_str()))
            .into()
    }
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>) {
        if let Some(prop) = name.as_str().strip_prefix(PROPERTY_PREFIX) {
            if self.phase == api::phase::END || !self.props.set(prop, value.as_str()) {
                return;
            }
        }
        match self.variables.iter_mut().find(|(k, _)| k == name.as_str()) {
            Some((_, v)) => *v = value.to_string(),
            None => self.variables.push((name.to_string(), value.to_string())),
        }
    }
    fn last_error(&self) -> RStr<'_> {
        self.error.as_str().into()
    }
    fn set_error(&mut self, message: RStr<'_>) {
        self.error = message.to_string();
    }
    fn respond(&mut self, status: u16, body: RSlice<'_, u8>) {
        self.response = Some(LocalResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::copy_from_slice(body.as_slice()),
        });
    }
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        match (self.response.as_mut(), header(name, value)) {
            (Some(r), Some((n, v))) => {
                r.headers.append(n, v);
                true
            }
            _ => false,
        }
    }
    fn phase(&self) -> u8 {
        self.phase
    }
    fn operation_template(&self) -> RStr<'_> {
        self.operation_template.into()
    }
    fn slot(&self) -> u64 {
        self.slot
    }
    fn set_slot(&mut self, value: u64) {
        self.slot = value;
    }
    fn want_body(&mut self, limit: u64) -> u32 {
        self.ask(|token| Work::Body { token, limit })
    }
    fn body(&self) -> ROption<RSlice<'_, u8>> {
        self.body.as_deref().map(RSlice::from_slice).into()
    }
    fn set_body(&mut self, body: RSlice<'_, u8>) {
        self.body = Some(Bytes::copy_from_slice(body.as_slice()));
        self.body_replaced = true;
    }
    fn cache_get(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32 {
        self.ask(|token| Work::CacheGet {
            token,
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
        self.ask(|token| Work::CacheSet {
            token,
            cache: cache.into(),
            key: key.to_vec(),
            value: value.to_vec(),
            ttl_ms,
        })
    }
    fn cache_delete(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32 {
        self.ask(|token| Work::CacheDelete {
            token,
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
        self.ask(|token| Work::CounterAdd {
            token,
            cache: cache.into(),
            key: key.to_vec(),
            delta,
            ttl_ms,
        })
    }
    fn http_call(&mut self, call: HttpCallout<'_>) -> u32 {
        self.ask(|token| Work::Http {
            token,
            method: call.method.into(),
            url: call.url.into(),
            headers: call
                .headers
                .iter()
                .map(|Tuple2(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            body: call.body.to_vec(),
            timeout_ms: call.timeout_ms,
        })
    }
    fn result(&self, token: u32) -> HostResult<'_> {
        match token
            .checked_sub(1)
            .and_then(|i| self.results.get(i as usize))
        {
            Some(d) => HostResult {
                status: d.status,
                number: d.number,
                http_status: d.http_status,
                value: RSlice::from_slice(&d.value),
                error: d.error.as_str().into(),
            },
            None => HostResult {
                status: HostStatus::UNKNOWN,
                number: 0,
                http_status: 0,
                value: RSlice::from_slice(&[]),
                error: "no such token".into(),
            },
        }
    }
    fn result_header(&self, token: u32, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        token
            .checked_sub(1)
            .and_then(|i| self.results.get(i as usize))
            .and_then(|d| d.headers.get(name.as_str()))
            .map(|v| RSlice::from_slice(v.as_bytes()))
            .into()
    }
    fn set_cache_status(&mut self, status: RStr<'_>) {
        self.cache_status = Some(status.to_string());
    }
}

/// Where a policy sent the request: the path after the backend's base path and the query,
/// kept in the request's extensions (allocated only when a policy rewrites).
#[derive(Debug, Clone, Default)]
pub struct BackendRewrite {
    /// The path after the backend's base path.
    pub path: Option<String>,
    /// The query (empty: none).
    pub query: Option<String>,
}

/// The head a policy sees: the request (inbound, backend) or the response (outbound).
#[derive(Debug)]
pub enum Msg<'p> {
    /// The client's request.
    Request(&'p mut http::request::Parts),
    /// The backend's (or a policy's) response.
    Response(&'p mut http::response::Parts),
}

impl Msg<'_> {
    fn headers(&self) -> &HeaderMap {
        match self {
            Msg::Request(p) => &p.headers,
            Msg::Response(p) => &p.headers,
        }
    }

    fn headers_mut(&mut self) -> &mut HeaderMap {
        match self {
            Msg::Request(p) => &mut p.headers,
            Msg::Response(p) => &mut p.headers,
        }
    }

    fn put(&mut self, name: RStr<'_>, value: RSlice<'_, u8>, append: bool) -> bool {
        let Some((n, v)) = header(name, value) else {
            return false;
        };
        if append {
            self.headers_mut().append(n, v);
        } else {
            self.headers_mut().insert(n, v);
        }
        true
    }

    fn rewrite(&mut self) -> Option<&mut BackendRewrite> {
        match self {
            Msg::Request(p) => {
                if p.extensions.get::<BackendRewrite>().is_none() {
                    p.extensions.insert(BackendRewrite::default());
                }
                p.extensions.get_mut::<BackendRewrite>()
            }
            Msg::Response(_) => None,
        }
    }
}

impl api::HttpHead for Msg<'_> {
    fn method(&self) -> RStr<'_> {
        match self {
            Msg::Request(p) => p.method.as_str().into(),
            Msg::Response(_) => "".into(),
        }
    }
    fn path(&self) -> RStr<'_> {
        match self {
            Msg::Request(p) => p.uri.path().into(),
            Msg::Response(_) => "".into(),
        }
    }
    fn query(&self) -> RStr<'_> {
        match self {
            // The query a policy set, so steps in a row build on each other.
            Msg::Request(p) => match p
                .extensions
                .get::<BackendRewrite>()
                .and_then(|r| r.query.as_deref())
            {
                Some(q) => q.into(),
                None => p.uri.query().unwrap_or_default().into(),
            },
            Msg::Response(_) => "".into(),
        }
    }
    fn status(&self) -> u16 {
        match self {
            Msg::Request(_) => 0,
            Msg::Response(p) => p.status.as_u16(),
        }
    }
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        self.headers()
            .get(name.as_str())
            .map(|v| RSlice::from_slice(v.as_bytes()))
            .into()
    }
    fn set_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        self.put(name, value, false)
    }
    fn append_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        self.put(name, value, true)
    }
    fn remove_header(&mut self, name: RStr<'_>) -> bool {
        self.headers_mut().remove(name.as_str()).is_some()
    }
    fn header_count(&self, name: RStr<'_>) -> usize {
        self.headers().get_all(name.as_str()).iter().count()
    }
    fn header_at(&self, name: RStr<'_>, index: usize) -> ROption<RSlice<'_, u8>> {
        self.headers()
            .get_all(name.as_str())
            .iter()
            .nth(index)
            .map(|v| RSlice::from_slice(v.as_bytes()))
            .into()
    }
    fn header_len(&self) -> usize {
        self.headers().len()
    }
    fn header_entry(&self, index: usize) -> ROption<Tuple2<RStr<'_>, RSlice<'_, u8>>> {
        self.headers()
            .iter()
            .nth(index)
            .map(|(n, v)| Tuple2(RStr::from(n.as_str()), RSlice::from_slice(v.as_bytes())))
            .into()
    }
    fn set_method(&mut self, method: RStr<'_>) -> bool {
        match (self, Method::from_bytes(method.as_str().as_bytes())) {
            (Msg::Request(p), Ok(m)) => {
                p.method = m;
                true
            }
            _ => false,
        }
    }
    fn set_path(&mut self, path: RStr<'_>) -> bool {
        let valid = path.starts_with('/')
            && http::uri::PathAndQuery::try_from(path.as_str()).is_ok()
            && !path.contains('?')
            && crate::proxy::unsafe_path(path.as_str()).is_none();
        match self.rewrite() {
            Some(r) if valid => {
                r.path = Some(path.to_string());
                true
            }
            _ => false,
        }
    }
    fn set_query(&mut self, query: RStr<'_>) -> bool {
        let valid =
            !query.contains('#') && http::uri::PathAndQuery::try_from(format!("/?{query}")).is_ok();
        match self.rewrite() {
            Some(r) if valid => {
                r.query = Some(query.to_string());
                true
            }
            _ => false,
        }
    }
    fn set_status(&mut self, status: u16) -> bool {
        match (self, StatusCode::from_u16(status)) {
            (Msg::Response(p), Ok(s)) => {
                p.status = s;
                true
            }
            _ => false,
        }
    }
}

/// The steps that run for one (API, operation, product): each section with `base` resolved.
#[derive(Debug, Default)]
pub struct Pipeline {
    /// Inbound section.
    pub inbound: Vec<Arc<PolicyInstance>>,
    /// Backend section (runs after inbound, before forwarding).
    pub backend: Vec<Arc<PolicyInstance>>,
    /// Outbound section.
    pub outbound: Vec<Arc<PolicyInstance>>,
    /// On-error section.
    pub on_error: Vec<Arc<PolicyInstance>>,
}

impl Pipeline {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.inbound.is_empty()
            && self.backend.is_empty()
            && self.outbound.is_empty()
            && self.on_error.is_empty()
    }
}
