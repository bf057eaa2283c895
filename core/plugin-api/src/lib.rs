//! The stable ABI between Outpost and its plugins.
//!
//! Only `abi_stable` types (and `async_ffi`'s FFI-safe futures) cross the boundary: no tokio,
//! hyper or serde. The gateway loads a plugin library with `abi_stable`'s checked loader (ABI
//! header, version string, recursive layout comparison of [`OutpostPlugin`] and everything
//! reachable from it), then calls [`OutpostPlugin::info`], [`OutpostPlugin::init`] and a
//! factory per instance.
//!
//! # Levels
//!
//! [`API_LEVEL`] is 2. Level 2 covers the four plugin kinds — policies ([`Policy`]), telemetry
//! sinks ([`TelemetrySink`]), caches ([`Cache`]) and backup stores ([`BackupStore`]) — and the
//! host services ([`HostServices`]: logging, metrics by id, clock, identity). Level 1 (policies
//! and logging only, as released in 1.0) lives on, frozen, in [`level1`]: the gateway loads a
//! level-1 library through those types and adapts it.
//!
//! # Evolution rules
//!
//! * Never remove, rename, reorder or retype a field of a `#[repr(C)]` type or a method of a
//!   `#[sabi_trait]`; field and method names are part of the layout.
//! * **Do not append either.** abi_stable 0.11's layout check accepts a library whose prefix
//!   types (root module, trait vtables) have *more* fields than the host's, but refuses one with
//!   *fewer* ("too many fields", `abi_checking.rs`: host count greater than library count is an
//!   error). An appended method would stop every plugin built against the previous layout from
//!   loading.
//! * A new capability is therefore a new level: freeze the current types into a `levelN`
//!   module (as [`level1`]), change the crate-root types, bump [`API_LEVEL`], and teach the
//!   gateway to adapt level-N libraries. The gateway picks the level from the number of fields
//!   of the library's root module and checks the whole layout against that level's types.
//! * New decision, error or status values are new constants of the integer newtypes ([`Flow`],
//!   [`ErrorKind`], [`HostStatus`]), never enum variants: a constant changes no layout.
//!
//! # Panics
//!
//! A panic must never unwind out of a plugin: abi_stable turns that into process exit. The SDK's
//! export macro catches panics inside the plugin and reports them as [`Flow::PANICKED`] or
//! [`ErrorKind::PANICKED`]. Plugins must be built with `panic = "unwind"`; the host refuses
//! libraries that report otherwise in [`PluginInfo::panic_unwind`].

// The abi_stable derive and trait macros generate unsafe glue; this crate writes none by hand.
#![allow(unsafe_code)]
// Names and impls the abi_stable macros generate (`OutpostPlugin_Ref`, trait-object glue).
#![allow(non_camel_case_types, non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

pub use abi_stable;
pub use async_ffi;
use async_ffi::FfiFuture;

pub mod level1;

/// The feature level of this API (see the crate docs).
pub const API_LEVEL: u32 = 2;

/// The symbol every plugin library exports its [`abi_stable::library::LibHeader`] under.
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Plugin kinds, as bits of [`PluginInfo::kinds`].
pub mod kinds {
    /// Request/response policies.
    pub const POLICY: u32 = 1;
    /// Telemetry sinks.
    pub const SINK: u32 = 2;
    /// External caches.
    pub const CACHE: u32 = 4;
    /// Configuration backup stores.
    pub const BACKUP: u32 = 8;
    /// Not a kind but a promise about the library's telemetry sinks, in the same bits: each
    /// returns from `export` and `export_metrics` at once. It does no I/O and waits for
    /// nothing (a lock it shares with threads of its own is held by them only briefly), and
    /// its work per record is small. The gateway then calls those sinks from its telemetry
    /// thread, a short run of records at a time while the records are in that thread's
    /// cache, instead of from a thread per sink; a sink that broke the promise would hold up
    /// every sink called that way. A constant changes no layout: gateways that do not know
    /// this bit ignore it and give each sink its own thread.
    pub const SINKS_NEVER_BLOCK: u32 = 16;
}

/// What a library says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginInfo {
    /// The library's name (for logs and `outpost plugins`).
    pub name: RString,
    /// The library's own version.
    pub version: RString,
    /// The [`API_LEVEL`] it was built against.
    pub api_level: u32,
    /// The kinds it provides ([`kinds`] bits).
    pub kinds: u32,
    /// Whether it was built with `panic = "unwind"` (required).
    pub panic_unwind: bool,
    /// The names of the policies it provides.
    pub policies: RVec<RString>,
    /// The names of the telemetry sinks it provides.
    pub sinks: RVec<RString>,
    /// The names of the caches it provides.
    pub caches: RVec<RString>,
    /// The names of the backup stores it provides.
    pub stores: RVec<RString>,
}

/// The category of a plugin error.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorKind(pub u32);

impl ErrorKind {
    /// The instance's configuration was rejected.
    pub const CONFIG: ErrorKind = ErrorKind(1);
    /// The library does not provide what was asked (kind or name).
    pub const UNSUPPORTED: ErrorKind = ErrorKind(2);
    /// Anything else that went wrong inside the plugin.
    pub const INTERNAL: ErrorKind = ErrorKind(3);
    /// The plugin panicked (caught inside the plugin).
    pub const PANICKED: ErrorKind = ErrorKind(4);
    /// A service the plugin talks to did not answer in time.
    pub const TIMEOUT: ErrorKind = ErrorKind(5);
    /// A service the plugin talks to is unreachable or failed (I/O, connection, protocol).
    pub const UNAVAILABLE: ErrorKind = ErrorKind(6);
    /// Stored data is damaged (a backup that does not parse, a bad checksum).
    pub const CORRUPT: ErrorKind = ErrorKind(7);
}

/// An error a plugin returns.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A message for the operator.
    pub message: RString,
}

/// What a policy hook decides.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow(pub u8);

impl Flow {
    /// Go on with the next step.
    pub const CONTINUE: Flow = Flow(0);
    /// Stop and answer with the response set through [`RequestContext::respond`].
    pub const RESPOND: Flow = Flow(1);
    /// The policy failed: run the on-error section (the message is in the context's error).
    pub const ERROR: Flow = Flow(2);
    /// The policy panicked; the SDK caught it. The host fails the request with 500.
    pub const PANICKED: Flow = Flow(3);
    /// The policy asked the host for work (body, cache, counter, HTTP call) through the
    /// context: the host does it and then calls [`Policy::on_resume`] with the results.
    pub const PAUSE: Flow = Flow(4);
}

/// Which section a hook runs in ([`RequestContext::phase`]).
pub mod phase {
    /// Inbound section (request head).
    pub const INBOUND: u8 = 1;
    /// Backend section (request head, just before forwarding).
    pub const BACKEND: u8 = 2;
    /// Outbound section (response head).
    pub const OUTBOUND: u8 = 3;
    /// On-error section.
    pub const ON_ERROR: u8 = 4;
    /// The request has ended (its response head is ready, it failed, or the client went
    /// away): the last call of a step that asked for it with the `outpost.notify-end`
    /// property, through `on_resume`. No host work can be asked for; the head has no headers
    /// and the answered status (200 when there was none: read `outpost.status`, 0 then).
    pub const END: u8 = 5;
}

/// A request or response head, implemented by the host over its own memory. Reading returns
/// views into that memory; nothing is copied until a policy changes something.
#[sabi_trait]
pub trait HttpHead {
    /// Request method (empty for a response).
    fn method(&self) -> RStr<'_>;
    /// Request path as the client sent it (empty for a response).
    fn path(&self) -> RStr<'_>;
    /// Request query without `?` (empty when there is none, and for a response).
    fn query(&self) -> RStr<'_>;
    /// Response status (0 for a request).
    fn status(&self) -> u16;
    /// The first value of a header (name case-insensitive).
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>>;
    /// Replaces a header. False when the name or value is not valid HTTP.
    fn set_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool;
    /// Adds a header value. False when the name or value is not valid HTTP.
    fn append_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool;
    /// Removes a header; false when it was absent.
    fn remove_header(&mut self, name: RStr<'_>) -> bool;
    /// How many values a header has.
    fn header_count(&self, name: RStr<'_>) -> usize;
    /// The `index`th value of a header.
    fn header_at(&self, name: RStr<'_>, index: usize) -> ROption<RSlice<'_, u8>>;
    /// How many header lines the head has (each value of a repeated header counts).
    fn header_len(&self) -> usize;
    /// The `index`th header line as (lower-case name, value); lines are grouped by name, each
    /// name's values in order.
    fn header_entry(&self, index: usize) -> ROption<Tuple2<RStr<'_>, RSlice<'_, u8>>>;
    /// Changes the request method. False for a response or an invalid method.
    fn set_method(&mut self, method: RStr<'_>) -> bool;
    /// Sets the path sent to the backend, after the backend's base path (replacing the part of
    /// the client's path after the API's prefix). False for a response or an invalid path.
    fn set_path(&mut self, path: RStr<'_>) -> bool;
    /// Replaces the query sent to the backend (without `?`; empty removes it).
    fn set_query(&mut self, query: RStr<'_>) -> bool;
    /// Changes the response status. False for a request or a status outside 100..=999.
    #[sabi(last_prefix_field)]
    fn set_status(&mut self, status: u16) -> bool;
}

/// The state of a piece of host work ([`HostResult::status`]).
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u8);

impl HostStatus {
    /// No such token, or not done yet.
    pub const UNKNOWN: HostStatus = HostStatus(0);
    /// Done: `value` / `number` / `http_status` hold the answer.
    pub const OK: HostStatus = HostStatus(1);
    /// A cache lookup found nothing.
    pub const MISS: HostStatus = HostStatus(2);
    /// Failed; `error` says why.
    pub const ERROR: HostStatus = HostStatus(3);
    /// Did not finish within its deadline.
    pub const TIMEOUT: HostStatus = HostStatus(4);
    /// The body was larger than the limit asked for.
    pub const TOO_LARGE: HostStatus = HostStatus(5);
    /// The cache asked for is not configured (no `[[caches]]` entry of that name, or none at
    /// all for the default cache). Host 0.1 with API 1.1.0 answered [`HostStatus::ERROR`].
    pub const NOT_CONFIGURED: HostStatus = HostStatus(6);
}

/// The answer to a piece of host work, borrowed from the host.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HostResult<'a> {
    /// How it went.
    pub status: HostStatus,
    /// Counter value (counter increments).
    pub number: i64,
    /// HTTP status (HTTP calls).
    pub http_status: u16,
    /// Value (cache gets) or response body (HTTP calls).
    pub value: RSlice<'a, u8>,
    /// Why it failed (empty otherwise).
    pub error: RStr<'a>,
}

/// An HTTP request a policy asks the host to make.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HttpCallout<'a> {
    /// Method.
    pub method: RStr<'a>,
    /// Absolute `http` or `https` URL.
    pub url: RStr<'a>,
    /// Headers.
    pub headers: RSlice<'a, Tuple2<RStr<'a>, RSlice<'a, u8>>>,
    /// Body (empty for none).
    pub body: RSlice<'a, u8>,
    /// Deadline for the whole exchange, in milliseconds (0: the host's default).
    pub timeout_ms: u64,
}

/// The request's context: what it matched, who sent it, variables shared between policies,
/// the local response, the last error, and the host work a policy can ask for.
///
/// Host work: a policy calls one or more of `want_body`, `cache_get`, `cache_set`,
/// `cache_delete`, `counter_add` and `http_call` (each returns a token), returns
/// [`Flow::PAUSE`], and is called again through [`Policy::on_resume`] once all of it is done;
/// [`RequestContext::result`] then gives each token's answer. Cache failures and timeouts are
/// answered as [`HostStatus::ERROR`] / [`HostStatus::TIMEOUT`], never fail the request by
/// themselves: the policy decides.
#[sabi_trait]
pub trait RequestContext {
    /// API id.
    fn api_id(&self) -> RStr<'_>;
    /// Operation id.
    fn operation_id(&self) -> RStr<'_>;
    /// Product id of the subscription (empty when none).
    fn product_id(&self) -> RStr<'_>;
    /// Subscription id (empty for open APIs).
    fn subscription_id(&self) -> RStr<'_>;
    /// The client's IP address.
    fn client_ip(&self) -> RStr<'_>;
    /// The request id.
    fn request_id(&self) -> RStr<'_>;
    /// A variable set by an earlier policy.
    fn variable(&self, name: RStr<'_>) -> ROption<RStr<'_>>;
    /// Sets a variable for later policies.
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>);
    /// The error that sent the request to on-error (empty otherwise).
    fn last_error(&self) -> RStr<'_>;
    /// Records an error message; return [`Flow::ERROR`] after it.
    fn set_error(&mut self, message: RStr<'_>);
    /// Sets the response to answer with; return [`Flow::RESPOND`] after it.
    fn respond(&mut self, status: u16, body: RSlice<'_, u8>);
    /// Adds a header to the response set with `respond`.
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool;
    /// The section running ([`phase`] constants).
    fn phase(&self) -> u8;
    /// The operation's URL template (for example `/orders/{id}`).
    fn operation_template(&self) -> RStr<'_>;
    /// This step's own number for this request (0 at first), kept across pause and resume.
    fn slot(&self) -> u64;
    /// Sets this step's number.
    fn set_slot(&mut self, value: u64);
    /// Asks for the current message's body (request in inbound and backend, response in
    /// outbound), buffered up to `limit` bytes. Returns a token.
    fn want_body(&mut self, limit: u64) -> u32;
    /// The buffered body of the current message, once it was asked for and read.
    fn body(&self) -> ROption<RSlice<'_, u8>>;
    /// Replaces the current message's body (the host fixes `Content-Length`).
    fn set_body(&mut self, body: RSlice<'_, u8>);
    /// Looks a key up in a cache (`cache` names a manifest cache; empty: the default one).
    fn cache_get(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32;
    /// Stores a value with a time to live.
    fn cache_set(
        &mut self,
        cache: RStr<'_>,
        key: RSlice<'_, u8>,
        value: RSlice<'_, u8>,
        ttl_ms: u64,
    ) -> u32;
    /// Removes a key.
    fn cache_delete(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>) -> u32;
    /// Adds `delta` to a counter (created at 0 with the time to live when absent) and answers
    /// the new value in [`HostResult::number`].
    fn counter_add(&mut self, cache: RStr<'_>, key: RSlice<'_, u8>, delta: i64, ttl_ms: u64)
        -> u32;
    /// Makes an HTTP call.
    fn http_call(&mut self, call: HttpCallout<'_>) -> u32;
    /// The answer for a token.
    fn result(&self, token: u32) -> HostResult<'_>;
    /// A header of an HTTP call's response.
    fn result_header(&self, token: u32, name: RStr<'_>) -> ROption<RSlice<'_, u8>>;
    /// Records the cache outcome for telemetry (`hit`, `miss`, ...).
    #[sabi(last_prefix_field)]
    fn set_cache_status(&mut self, status: RStr<'_>);
}

/// The host's view of a request or response head, as passed to policies.
pub type HeadMut<'a> = HttpHead_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;
/// The host's request context, as passed to policies.
pub type ContextMut<'a> = RequestContext_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A policy instance. Hooks run on the request path: synchronous, no allocation required.
#[sabi_trait]
pub trait Policy: Send + Sync {
    /// Inbound and backend sections: sees and may change the request head.
    fn on_request(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow;
    /// Outbound section: sees and may change the response head.
    fn on_response(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow;
    /// Called after [`Flow::PAUSE`] once the host work is done, on the same head.
    #[sabi(last_prefix_field)]
    fn on_resume(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow;
}

/// An owned policy instance.
pub type PolicyBox = Policy_TO<'static, RBox<()>>;

/// One request, as telemetry sinks see it. Strings borrow the host's batch; empty means
/// not applicable.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// When the request arrived (Unix milliseconds).
    pub time_unix_ms: u64,
    /// Request id.
    pub request_id: RStr<'a>,
    /// W3C trace id (32 hex digits).
    pub trace_id: RStr<'a>,
    /// The span id the gateway used towards the backend (16 hex digits).
    pub span_id: RStr<'a>,
    /// The client's span id from its `traceparent`, when the gateway continued the client's
    /// trace (empty when it sent none or an invalid one, or the request was not forwarded).
    pub parent_span_id: RStr<'a>,
    /// Listener name.
    pub listener: RStr<'a>,
    /// Client IP.
    pub client_ip: RStr<'a>,
    /// Method.
    pub method: RStr<'a>,
    /// Host the client asked for.
    pub host: RStr<'a>,
    /// Path as the client sent it.
    pub path: RStr<'a>,
    /// API id.
    pub api_id: RStr<'a>,
    /// Operation id.
    pub operation_id: RStr<'a>,
    /// Operation URL template (bounded cardinality; use it for metric labels).
    pub route: RStr<'a>,
    /// Product id.
    pub product_id: RStr<'a>,
    /// Subscription id.
    pub subscription_id: RStr<'a>,
    /// Backend id.
    pub backend_id: RStr<'a>,
    /// Backend URL called (scheme, authority and path).
    pub backend_url: RStr<'a>,
    /// Status sent to the client.
    pub status: u16,
    /// Status the backend answered (0: not called or no answer).
    pub backend_status: u16,
    /// Time from the request's arrival to the response head, in microseconds.
    pub total_us: u64,
    /// Time spent waiting for the backend's response head, in microseconds.
    pub backend_us: u64,
    /// The request body's declared length (`Content-Length`; 0 when not declared).
    pub bytes_in: u64,
    /// The response body's length when known as the head is sent (0 otherwise).
    pub bytes_out: u64,
    /// Cache outcome set by policies (`hit`, `miss`; empty: none).
    pub cache: RStr<'a>,
    /// Where an error came from (`client`, `gateway`, `backend`; empty: none). Policy
    /// failures are `gateway` errors with reason `policy_failed`.
    pub error_source: RStr<'a>,
    /// The error code (as in the JSON error body; empty: none).
    pub error_reason: RStr<'a>,
    /// The error message (empty: none).
    pub error_message: RStr<'a>,
    /// The client's User-Agent.
    pub user_agent: RStr<'a>,
}

/// Metric kinds ([`HostServices::define_metric`], [`MetricSample::kind`]).
pub mod metric {
    /// Monotonic counter.
    pub const COUNTER: u8 = 1;
    /// Value that goes up and down.
    pub const GAUGE: u8 = 2;
}

/// One metric series' value, as telemetry sinks see it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct MetricSample<'a> {
    /// Metric name (Prometheus conventions: `snake_case`, unit suffix, `_total` for counters).
    pub name: RStr<'a>,
    /// Help text.
    pub help: RStr<'a>,
    /// [`metric`] kind.
    pub kind: u8,
    /// Label names and values.
    pub labels: RSlice<'a, Tuple2<RStr<'a>, RStr<'a>>>,
    /// Current value.
    pub value: f64,
}

/// A telemetry sink. Called off the request path, from a dedicated thread: blocking is fine.
#[sabi_trait]
pub trait TelemetrySink: Send + Sync {
    /// A batch of request records, in the order their responses started.
    fn export(&self, batch: RSlice<'_, RequestRecord<'_>>) -> RResult<(), PluginError>;
    /// The current value of every metric series (host metrics and plugin metrics). The first
    /// call, as the gateway starts and before any `export`, starts the sink: an error then
    /// stops the gateway from starting (`outpost check` creates sinks and calls nothing).
    fn export_metrics(&self, batch: RSlice<'_, MetricSample<'_>>) -> RResult<(), PluginError>;
    /// Deliver what is buffered; return within `deadline_ms` (called at shutdown).
    #[sabi(last_prefix_field)]
    fn flush(&self, deadline_ms: u64) -> RResult<(), PluginError>;
}

/// An owned telemetry sink.
pub type SinkBox = TelemetrySink_TO<'static, RBox<()>>;

/// An FFI-safe future a cache answers with; the host polls it on its own threads and applies
/// its own deadline.
pub type CacheFuture<T> = FfiFuture<RResult<T, PluginError>>;

/// An external cache. Calls return at once with a future: a cache that does I/O runs it on its
/// own runtime (the SDK's `runtime` helper) and the future waits for the answer.
#[sabi_trait]
pub trait Cache: Send + Sync {
    /// The value stored under `key`, if any.
    fn get(&self, key: RSlice<'_, u8>) -> CacheFuture<ROption<RVec<u8>>>;
    /// Stores `value` under `key` for `ttl_ms` milliseconds (0: no expiry).
    fn set(&self, key: RSlice<'_, u8>, value: RSlice<'_, u8>, ttl_ms: u64) -> CacheFuture<()>;
    /// Removes `key`; answers whether it was there.
    fn delete(&self, key: RSlice<'_, u8>) -> CacheFuture<bool>;
    /// Adds `delta` to the counter under `key` (created at 0, expiring after `ttl_ms`, when
    /// absent) and answers the new value. Atomic across every user of the cache.
    #[sabi(last_prefix_field)]
    fn increment(&self, key: RSlice<'_, u8>, delta: i64, ttl_ms: u64) -> CacheFuture<i64>;
}

/// An owned cache.
pub type CacheBox = Cache_TO<'static, RBox<()>>;

/// One stored generation ([`BackupStore::list`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredGeneration {
    /// Generation number (higher is newer).
    pub generation: u64,
    /// When it was saved (Unix milliseconds).
    pub saved_unix_ms: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// A configuration backup store. Called off the request path: blocking is fine. `scope`
/// separates gateways sharing one store (the gateway id).
#[sabi_trait]
pub trait BackupStore: Send + Sync {
    /// Saves a generation atomically: after a crash either the whole of it or none is there.
    fn save(
        &self,
        scope: RStr<'_>,
        generation: u64,
        data: RSlice<'_, u8>,
    ) -> RResult<(), PluginError>;
    /// Reads a generation back (`None` when absent).
    fn load(&self, scope: RStr<'_>, generation: u64) -> RResult<ROption<RVec<u8>>, PluginError>;
    /// Lists the stored generations, newest first.
    fn list(&self, scope: RStr<'_>) -> RResult<RVec<StoredGeneration>, PluginError>;
    /// Keeps the newest `keep` generations, removes the rest; answers how many were removed.
    #[sabi(last_prefix_field)]
    fn prune(&self, scope: RStr<'_>, keep: u32) -> RResult<u32, PluginError>;
}

/// An owned backup store.
pub type StoreBox = BackupStore_TO<'static, RBox<()>>;

/// Log levels for [`HostServices::log`].
pub mod level {
    /// Errors.
    pub const ERROR: u8 = 1;
    /// Warnings.
    pub const WARN: u8 = 2;
    /// Information.
    pub const INFO: u8 = 3;
    /// Debugging.
    pub const DEBUG: u8 = 4;
    /// Tracing.
    pub const TRACE: u8 = 5;
}

/// What the host offers every plugin, handed over once at [`OutpostPlugin::init`].
#[sabi_trait]
pub trait HostServices: Send + Sync {
    /// Logs through the host's `tracing`, under the plugin's name.
    fn log(&self, level: u8, message: RStr<'_>);
    /// Whether a level is enabled (to skip formatting).
    fn log_enabled(&self, level: u8) -> bool;
    /// Defines a metric (call at init or instance creation, not per request) and answers its
    /// id. Defining the same name again answers the same id; a name that is not a valid
    /// Prometheus metric name, or a redefinition with another kind or labels, answers 0 (and
    /// bumping id 0 does nothing).
    fn define_metric(
        &self,
        name: RStr<'_>,
        help: RStr<'_>,
        kind: u8,
        labels: RSlice<'_, RStr<'_>>,
    ) -> u32;
    /// Adds to a metric (counters and gauges). `label_values` in the order of the definition.
    fn metric_add(&self, id: u32, label_values: RSlice<'_, RStr<'_>>, value: f64);
    /// Sets a gauge.
    fn metric_set(&self, id: u32, label_values: RSlice<'_, RStr<'_>>, value: f64);
    /// Wall-clock time, Unix milliseconds.
    fn now_unix_ms(&self) -> u64;
    /// A monotonic clock in nanoseconds (only differences mean something).
    fn monotonic_ns(&self) -> u64;
    /// The gateway's id (`[gateway] id` in the manifest; `outpost` by default).
    fn gateway_id(&self) -> RStr<'_>;
    /// This process's instance id (unique per start).
    #[sabi(last_prefix_field)]
    fn instance_id(&self) -> RStr<'_>;
}

/// The host services object.
pub type HostBox = HostServices_TO<'static, RBox<()>>;

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OutpostPlugin_Ref)))]
#[sabi(missing_field(option))]
pub struct OutpostPlugin {
    /// Name, version, api level, kinds, panic strategy, names per kind.
    pub info: extern "C" fn() -> PluginInfo,
    /// Called once per library before any factory.
    pub init: extern "C" fn(host: HostBox) -> RResult<(), PluginError>,
    /// Creates a policy instance from its name and its configuration as JSON.
    pub new_policy:
        extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<PolicyBox, PluginError>,
    /// Creates a telemetry sink.
    pub new_sink:
        extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<SinkBox, PluginError>,
    /// Creates a cache.
    pub new_cache:
        extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<CacheBox, PluginError>,
    /// Creates a backup store.
    #[sabi(last_prefix_field)]
    pub new_store:
        extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<StoreBox, PluginError>,
}

/// How many fields the root module has at each level (the loader picks the level by it).
pub const ROOT_FIELDS: [(u32, usize); 2] = [(1, 3), (2, 6)];

impl RootModule for OutpostPlugin_Ref {
    declare_root_module_statics! {OutpostPlugin_Ref}
    const BASE_NAME: &'static str = "outpost_plugin";
    const NAME: &'static str = "outpost_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_root_module_symbol_is_abi_stables() {
        assert_eq!(
            super::ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
