//! The stable ABI between Outpost and its plugins.
//!
//! Only `abi_stable` types cross the boundary: no tokio, hyper or serde. The gateway loads a
//! plugin library with `abi_stable`'s checked loader (ABI header, version string, recursive
//! layout comparison of [`OutpostPlugin`] and everything reachable from it), then calls
//! [`OutpostPlugin::info`], [`OutpostPlugin::init`] and a factory per instance.
//!
//! # Evolution rules
//!
//! * Never remove, rename, reorder or retype a field of a `#[repr(C)]` type or a method of a
//!   `#[sabi_trait]`; field and method names are part of the layout.
//! * **Do not append either, within 1.x.** abi_stable 0.11's layout check refuses a library
//!   whose prefix types (the root module, trait vtables) have *fewer* fields than the host's
//!   (measured here; abi_stable issue #118). Appending a root-module field or a trait method
//!   would therefore stop every plugin built against the older layout from loading. The
//!   test `a_plugin_built_against_api_1_0_keeps_loading` loads a plugin built against a frozen
//!   copy of 1.0 (`tests/fixtures/api-1.0`) and fails on such a change.
//! * New capabilities come as a new root-module type for the new level (its own name), while
//!   frozen copies of the older levels' types stay in this crate; the host tries the newest
//!   level first and falls back, adapting older plugins. Bump [`API_LEVEL`] with each level.
//! * New decision or error values are new constants of the integer newtypes ([`Flow`],
//!   [`ErrorKind`]), never enum variants: a constant changes no layout.
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
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

pub use abi_stable;

/// The feature level of this API. Level 1: policies (request and response hooks, request
/// context with variables and local responses), host logging.
pub const API_LEVEL: u32 = 1;

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
}

/// The category of a plugin error.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorKind(pub u32);

impl ErrorKind {
    /// The instance's configuration was rejected.
    pub const CONFIG: ErrorKind = ErrorKind(1);
    /// The library does not provide what was asked (kind or policy name).
    pub const UNSUPPORTED: ErrorKind = ErrorKind(2);
    /// Anything else that went wrong inside the plugin.
    pub const INTERNAL: ErrorKind = ErrorKind(3);
    /// The plugin panicked (caught inside the plugin).
    pub const PANICKED: ErrorKind = ErrorKind(4);
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
}

/// A request or response head, implemented by the host over its own memory. Reading returns
/// views into that memory; nothing is copied until a policy changes something.
#[sabi_trait]
pub trait HttpHead {
    /// Request method (empty for a response).
    fn method(&self) -> RStr<'_>;
    /// Request path (empty for a response).
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
    #[sabi(last_prefix_field)]
    fn remove_header(&mut self, name: RStr<'_>) -> bool;
}

/// The request's context: what it matched, who sent it, variables shared between policies,
/// the local response and the last error.
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
    #[sabi(last_prefix_field)]
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool;
}

/// The host's view of a request head, as passed to policies.
pub type HeadMut<'a> = HttpHead_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;
/// The host's request context, as passed to policies.
pub type ContextMut<'a> = RequestContext_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A policy instance. Hooks run on the request path: synchronous, no allocation required.
#[sabi_trait]
pub trait Policy: Send + Sync {
    /// Inbound (and backend) sections: sees and may change the request head.
    fn on_request(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow;
    /// Outbound section: sees and may change the response head.
    #[sabi(last_prefix_field)]
    fn on_response(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow;
}

/// An owned policy instance.
pub type PolicyBox = Policy_TO<'static, RBox<()>>;

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
    #[sabi(last_prefix_field)]
    fn log_enabled(&self, level: u8) -> bool;
}

/// The host services object.
pub type HostBox = HostServices_TO<'static, RBox<()>>;

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = OutpostPlugin_Ref)))]
#[sabi(missing_field(option))]
pub struct OutpostPlugin {
    /// Name, version, api level, kinds, panic strategy, policy names.
    pub info: extern "C" fn() -> PluginInfo,
    /// Called once per library before any factory.
    pub init: extern "C" fn(host: HostBox) -> RResult<(), PluginError>,
    /// Creates a policy instance from its name and its configuration as JSON.
    #[sabi(last_prefix_field)]
    pub new_policy:
        extern "C" fn(name: RStr<'_>, config_json: RStr<'_>) -> RResult<PolicyBox, PluginError>,
}

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
