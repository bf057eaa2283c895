//! Write Outpost plugins in safe Rust.
//!
//! A plugin crate depends on this crate only, is built as a `cdylib` with `panic = "unwind"`,
//! implements [`Policy`] for each policy it offers, and exports them with [`export_plugin!`]:
//!
//! ```
//! use outpost_plugin_sdk::{export_plugin, Context, Flow, Head, Policy};
//! use outpost_plugin_sdk::serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
//! pub struct Config {
//!     header: String,
//! }
//!
//! /// Refuses requests without a header.
//! pub struct Require(Config);
//!
//! impl Policy for Require {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Require(config))
//!     }
//!     fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
//!         if req.header(&self.0.header).is_some() {
//!             return Flow::CONTINUE;
//!         }
//!         ctx.respond(400, b"missing header");
//!         Flow::RESPOND
//!     }
//! }
//!
//! export_plugin! {
//!     name: "require-header",
//!     version: "0.1.0",
//!     policies: ["require-header" => Require],
//! }
//! # fn main() {}
//! ```
//!
//! Every entry point the macro exports catches panics inside the plugin: a panicking hook fails
//! only its request (the gateway answers 500 and counts it); a panicking factory is a
//! configuration error. Policy hooks run on the request path: keep them free of blocking calls.
//! [`testing`] runs a policy in a unit test without a gateway.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

pub use outpost_plugin_api as api;
pub use outpost_plugin_api::{Flow, API_LEVEL};
pub use serde;
pub use serde_json;

use api::abi_stable::sabi_trait::TD_Opaque;
use api::abi_stable::std_types::{RResult, RString, RVec};
use api::{ContextMut, ErrorKind, HeadMut, HostBox, PluginError, PluginInfo, PolicyBox};

pub mod testing;

/// A policy: created once per policy step of the configuration, then called for every request
/// that reaches the step.
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

    /// Request path (empty for a response).
    pub fn path(&self) -> &str {
        self.inner.path().into()
    }

    /// Query string without `?`.
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
}

/// Logs through the gateway's `tracing` (once the plugin is initialised; before, or in unit
/// tests without a host, the message is dropped).
pub fn log(level: u8, message: &str) {
    if let Some(host) = HOST.get() {
        if host.log_enabled(level) {
            host.log(level, message.into());
        }
    }
}

pub use api::level;

static HOST: OnceLock<HostBox> = OnceLock::new();

/// Adapts a [`Policy`] to the ABI, catching panics inside the plugin.
struct Adapter<P>(P);

impl<P: Policy> api::Policy for Adapter<P> {
    fn on_request(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow {
        catch_unwind(AssertUnwindSafe(|| {
            self.0
                .on_request(&mut Head::new(head), &mut Context::new(ctx))
        }))
        .unwrap_or(Flow::PANICKED)
    }

    fn on_response(&self, head: &mut HeadMut<'_>, ctx: &mut ContextMut<'_>) -> Flow {
        catch_unwind(AssertUnwindSafe(|| {
            self.0
                .on_response(&mut Head::new(head), &mut Context::new(ctx))
        }))
        .unwrap_or(Flow::PANICKED)
    }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> PluginError {
    PluginError {
        kind,
        message: RString::from(message.into()),
    }
}

/// Builds a policy from JSON config (used by [`export_plugin!`] and [`testing`]).
pub fn new_policy<P: Policy>(config_json: &str) -> Result<PolicyBox, PluginError> {
    let config: P::Config =
        serde_json::from_str(config_json).map_err(|e| error(ErrorKind::CONFIG, e.to_string()))?;
    let policy = P::new(config).map_err(|e| error(ErrorKind::CONFIG, e))?;
    Ok(api::Policy_TO::from_value(Adapter(policy), TD_Opaque))
}

#[doc(hidden)]
pub mod __private {
    use super::*;
    pub use api::abi_stable;

    pub fn info(name: &str, version: &str, policies: &[&str], panic_unwind: bool) -> PluginInfo {
        PluginInfo {
            name: name.into(),
            version: version.into(),
            api_level: API_LEVEL,
            kinds: if policies.is_empty() {
                0
            } else {
                api::kinds::POLICY
            },
            panic_unwind,
            policies: policies
                .iter()
                .map(|p| RString::from(*p))
                .collect::<RVec<_>>(),
        }
    }

    pub fn init(host: HostBox) -> RResult<(), PluginError> {
        let _ = HOST.set(host);
        RResult::ROk(())
    }

    pub fn guard_policy(
        f: impl FnOnce() -> Result<PolicyBox, PluginError>,
    ) -> RResult<PolicyBox, PluginError> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r.into(),
            Err(_) => RResult::RErr(error(ErrorKind::PANICKED, "the policy factory panicked")),
        }
    }

    pub fn unknown_policy(name: &str, known: &[&str]) -> Result<PolicyBox, PluginError> {
        Err(error(
            ErrorKind::UNSUPPORTED,
            format!(
                "no policy named '{name}' (this library has: {})",
                known.join(", ")
            ),
        ))
    }

    pub use super::new_policy;
    pub use api::abi_stable::std_types::{RResult as Res, RStr as Str};
}

/// Exports a plugin library: its name, version and policies (name → type implementing
/// [`Policy`]). Use it once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        version: $version:expr,
        policies: [$($pname:literal => $ptype:ty),* $(,)?] $(,)?
    ) => {
        #[doc(hidden)]
        pub mod __outpost_plugin_export {
            #[allow(unused_imports)]
            use super::*;
            use $crate::__private as __p;
            use $crate::__private::abi_stable as __abi;

            const POLICIES: &[&str] = &[$($pname),*];

            extern "C" fn info() -> $crate::api::PluginInfo {
                __p::info($name, $version, POLICIES, cfg!(panic = "unwind"))
            }

            extern "C" fn init(
                host: $crate::api::HostBox,
            ) -> __p::Res<(), $crate::api::PluginError> {
                __p::init(host)
            }

            extern "C" fn new_policy(
                name: __p::Str<'_>,
                config: __p::Str<'_>,
            ) -> __p::Res<$crate::api::PolicyBox, $crate::api::PluginError> {
                __p::guard_policy(|| match name.as_str() {
                    $($pname => __p::new_policy::<$ptype>(config.as_str()),)*
                    other => __p::unknown_policy(other, POLICIES),
                })
            }

            fn root() -> $crate::api::OutpostPlugin_Ref {
                __abi::prefix_type::PrefixTypeTrait::leak_into_prefix($crate::api::OutpostPlugin {
                    info,
                    init,
                    new_policy,
                })
            }

            /// The library header the gateway's loader looks for.
            #[allow(unsafe_code)]
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static OUTPOST_PLUGIN_HEADER: __abi::library::LibHeader = {
                extern "C" fn erased() -> __abi::library::RootModuleResult {
                    __abi::library::__call_root_module_loader(root)
                }
                // SAFETY: the constructor returns the root module type the header names.
                unsafe {
                    __abi::library::LibHeader::from_constructor::<$crate::api::OutpostPlugin_Ref>(
                        erased,
                        __abi::library::CheckTypeLayout::Yes,
                    )
                }
            };
        }
    };
}
