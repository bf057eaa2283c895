//! Level 1 of the plugin API, frozen: the types exactly as plugins built against
//! `outpost-plugin-api` 1.0 declare them. The gateway loads such libraries through these types
//! and adapts them; never change anything in this module (the test
//! `a_plugin_built_against_api_1_0_keeps_loading` loads a library built against the 1.0 crate).

pub use super::{ErrorKind, Flow, PluginError};

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

/// The level these types describe.
pub const API_LEVEL: u32 = 1;

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
    /// The kinds it provides ([`crate::kinds`] bits).
    pub kinds: u32,
    /// Whether it was built with `panic = "unwind"` (required).
    pub panic_unwind: bool,
    /// The names of the policies it provides.
    pub policies: RVec<RString>,
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
