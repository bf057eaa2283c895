//! Write Outpost plugins in safe Rust.
//!
//! A plugin crate depends on this crate only, is built as a `cdylib` with `panic = "unwind"`,
//! implements a trait per thing it offers — [`Policy`], [`Sink`] (telemetry), [`Cache`] or
//! [`Store`] (configuration backups) — and exports them with [`export_plugin!`]:
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
//! configuration error. Policy hooks run on the request path: keep them free of blocking calls
//! (ask the host for waiting work instead: see [`Context`]). Sinks and stores are called from
//! the gateway's background threads and may block (a sink that says it never blocks,
//! [`Sink::NEVER_BLOCKS`], is called from the telemetry thread instead, and must not). [`testing`] runs any of them in a unit test
//! without a gateway; [`runtime`] (feature `runtime`) gives a cache its own tokio runtime.
//! [`host`] logs into the gateway, defines and bumps metrics, and reads the clock.

use std::panic::{catch_unwind, AssertUnwindSafe};

pub use outpost_plugin_api as api;
pub use outpost_plugin_api::{
    Flow, HostResult, HostStatus, MetricSample, RequestRecord, StoredGeneration, API_LEVEL,
};
pub use serde;
pub use serde_json;

use api::abi_stable::sabi_trait::TD_Opaque;
use api::abi_stable::std_types::{RResult, RString};
use api::{CacheBox, ErrorKind, PluginError, PolicyBox, SinkBox, StoreBox};

pub mod cache;
pub mod host;
mod policy;
#[cfg(feature = "runtime")]
pub mod runtime;
mod sink;
mod store;
pub mod template;
pub mod testing;

pub use cache::{Cache, Reply};
pub use host::{log, Metric};
pub use policy::{Callout, Context, Head, Policy, Token};
pub use sink::Sink;
pub use store::Store;

pub use api::level;
pub use api::phase;

/// An error from a sink, cache or store: a kind the gateway acts on, and a message for the
/// operator.
#[derive(Debug, Clone)]
pub struct Error {
    /// What kind of failure ([`ErrorKind`] constants).
    pub kind: ErrorKind,
    /// What happened.
    pub message: String,
}

impl Error {
    /// An error of a kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The service behind the plugin is unreachable or failed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNAVAILABLE, message)
    }

    /// The service did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TIMEOUT, message)
    }

    /// Stored data is damaged.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CORRUPT, message)
    }

    fn into_abi(self) -> PluginError {
        PluginError {
            kind: self.kind,
            message: RString::from(self.message),
        }
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(ErrorKind::INTERNAL, message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(ErrorKind::INTERNAL, message)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(ErrorKind::UNAVAILABLE, e.to_string())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Runs a blocking entry point, turning its error and any panic into the ABI's error.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into_abi()),
        Err(_) => RResult::RErr(Error::new(ErrorKind::PANICKED, "the plugin panicked").into_abi()),
    }
}

/// Parses an instance's configuration. An empty object also stands for "no configuration", so
/// a plugin whose `Config` is `()` accepts what the manifest gives when `config` is left out.
fn config<C: serde::de::DeserializeOwned>(json: &str) -> Result<C, PluginError> {
    // Errors name the field that is wrong (`calls: invalid type: string "ten", expected u64`).
    let parse = |json: &str| -> Result<C, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // An unknown top-level field already names itself.
            if matches!(path.as_str(), "" | ".") || inner.contains(&format!("`{path}`")) {
                inner
            } else {
                format!("{path}: {inner}")
            }
        })?;
        de.end().map_err(|e| e.to_string())?;
        Ok(value)
    };
    parse(json).or_else(|e| {
        let empty = serde_json::from_str::<serde_json::Value>(json)
            .is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()));
        match empty {
            true => parse("null").map_err(|_| e),
            false => Err(e),
        }
        .map_err(|e| Error::new(ErrorKind::CONFIG, e).into_abi())
    })
}

fn rejected(message: String) -> PluginError {
    Error::new(ErrorKind::CONFIG, message).into_abi()
}

/// Builds a policy from JSON config (used by [`export_plugin!`] and [`testing`]).
pub fn new_policy<P: Policy>(config_json: &str) -> Result<PolicyBox, PluginError> {
    let policy = P::new(config(config_json)?).map_err(rejected)?;
    Ok(api::Policy_TO::from_value(
        policy::Adapter(policy),
        TD_Opaque,
    ))
}

/// Builds a telemetry sink from JSON config.
pub fn new_sink<S: Sink>(config_json: &str) -> Result<SinkBox, PluginError> {
    let sink = S::new(config(config_json)?).map_err(rejected)?;
    Ok(api::TelemetrySink_TO::from_value(
        sink::Adapter(sink),
        TD_Opaque,
    ))
}

/// Builds a cache from JSON config.
pub fn new_cache<C: Cache>(config_json: &str) -> Result<CacheBox, PluginError> {
    let cache = C::new(config(config_json)?).map_err(rejected)?;
    Ok(api::Cache_TO::from_value(cache::Adapter(cache), TD_Opaque))
}

/// Builds a backup store from JSON config.
pub fn new_store<S: Store>(config_json: &str) -> Result<StoreBox, PluginError> {
    let store = S::new(config(config_json)?).map_err(rejected)?;
    Ok(api::BackupStore_TO::from_value(
        store::Adapter(store),
        TD_Opaque,
    ))
}

#[doc(hidden)]
pub mod __private {
    use super::*;
    pub use api::abi_stable;
    use api::abi_stable::std_types::RVec;
    pub use api::abi_stable::std_types::{RResult as Res, RStr as Str};
    pub use api::{CacheBox, PolicyBox, SinkBox, StoreBox};
    pub use api::{HostBox, OutpostPlugin, OutpostPlugin_Ref, PluginInfo};

    fn names(list: &[&str]) -> RVec<RString> {
        list.iter().map(|p| RString::from(*p)).collect()
    }

    pub fn info(
        name: &str,
        version: &str,
        [policies, sinks, caches, stores]: [&[&str]; 4],
        sinks_never_block: bool,
        panic_unwind: bool,
    ) -> PluginInfo {
        let mut kinds = 0;
        for (list, bit) in [
            (policies, api::kinds::POLICY),
            (sinks, api::kinds::SINK),
            (caches, api::kinds::CACHE),
            (stores, api::kinds::BACKUP),
        ] {
            if !list.is_empty() {
                kinds |= bit;
            }
        }
        if !sinks.is_empty() && sinks_never_block {
            kinds |= api::kinds::SINKS_NEVER_BLOCK;
        }
        PluginInfo {
            name: name.into(),
            version: version.into(),
            api_level: API_LEVEL,
            kinds,
            panic_unwind,
            policies: names(policies),
            sinks: names(sinks),
            caches: names(caches),
            stores: names(stores),
        }
    }

    pub fn init(
        host: HostBox,
        user: Option<fn() -> Result<(), String>>,
    ) -> RResult<(), PluginError> {
        host::install(host);
        let Some(user) = user else {
            return RResult::ROk(());
        };
        match catch_unwind(AssertUnwindSafe(user)) {
            Ok(Ok(())) => RResult::ROk(()),
            Ok(Err(e)) => RResult::RErr(Error::new(ErrorKind::INTERNAL, e).into_abi()),
            Err(_) => RResult::RErr(Error::new(ErrorKind::PANICKED, "init panicked").into_abi()),
        }
    }

    /// Runs a factory, turning a panic into an error.
    pub fn factory<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r.into(),
            Err(_) => {
                RResult::RErr(Error::new(ErrorKind::PANICKED, "the factory panicked").into_abi())
            }
        }
    }

    pub fn unknown<T>(kind: &str, name: &str, known: &[&str]) -> Result<T, PluginError> {
        Err(Error::new(
            ErrorKind::UNSUPPORTED,
            if known.is_empty() {
                format!("this library provides no {kind}s (asked for '{name}')")
            } else {
                format!(
                    "no {kind} named '{name}' (this library has: {})",
                    known.join(", ")
                )
            },
        )
        .into_abi())
    }

    pub use super::{new_cache, new_policy, new_sink, new_store};
}

/// Exports a plugin library: its name, version, optionally an `init` function
/// (`fn() -> Result<(), String>`, run once when the gateway loads the library, after host
/// services are available; an error or a panic refuses the library), and what it provides, by
/// kind (each list is optional, in this order): `policies`, `sinks`, `caches`, `stores`, each a
/// list of `"name" => Type`. Use it once, at the crate root of a `cdylib`.
///
/// ```ignore
/// export_plugin! {
///     name: "acme",
///     version: env!("CARGO_PKG_VERSION"),
///     init: start,
///     policies: ["acme-check" => Check, "acme-tag" => Tag],
///     caches: ["acme-cache" => AcmeCache],
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        version: $version:expr
        $(, init: $init:expr)?
        $(, policies: [$($pname:literal => $ptype:ty),* $(,)?])?
        $(, sinks: [$($sname:literal => $stype:ty),* $(,)?])?
        $(, caches: [$($cname:literal => $ctype:ty),* $(,)?])?
        $(, stores: [$($bname:literal => $btype:ty),* $(,)?])?
        $(,)?
    ) => {
        #[doc(hidden)]
        pub mod __outpost_plugin_export {
            #[allow(unused_imports)]
            use super::*;
            use $crate::__private as __p;
            use $crate::__private::abi_stable as __abi;

            const POLICIES: &[&str] = &[$($($pname),*)?];
            const SINKS: &[&str] = &[$($($sname),*)?];
            const CACHES: &[&str] = &[$($($cname),*)?];
            const STORES: &[&str] = &[$($($bname),*)?];
            /// Every sink of the library never blocks.
            const SINKS_NEVER_BLOCK: bool = true $($(&& <$stype as $crate::Sink>::NEVER_BLOCKS)*)?;

            extern "C" fn __outpost_info() -> __p::PluginInfo {
                __p::info(
                    $name,
                    $version,
                    [POLICIES, SINKS, CACHES, STORES],
                    SINKS_NEVER_BLOCK,
                    cfg!(panic = "unwind"),
                )
            }

            extern "C" fn __outpost_init(host: __p::HostBox) -> __p::Res<(), $crate::api::PluginError> {
                #[allow(unused_mut, unused_assignments)]
                let mut user: Option<fn() -> Result<(), String>> = None;
                $(user = Some($init);)?
                __p::init(host, user)
            }

            extern "C" fn __outpost_new_policy(
                name: __p::Str<'_>,
                config: __p::Str<'_>,
            ) -> __p::Res<__p::PolicyBox, $crate::api::PluginError> {
                __p::factory(|| match name.as_str() {
                    $($($pname => __p::new_policy::<$ptype>(config.as_str()),)*)?
                    other => __p::unknown("policy", other, POLICIES),
                })
            }

            extern "C" fn __outpost_new_sink(
                name: __p::Str<'_>,
                config: __p::Str<'_>,
            ) -> __p::Res<__p::SinkBox, $crate::api::PluginError> {
                __p::factory(|| match name.as_str() {
                    $($($sname => __p::new_sink::<$stype>(config.as_str()),)*)?
                    other => __p::unknown("sink", other, SINKS),
                })
            }

            extern "C" fn __outpost_new_cache(
                name: __p::Str<'_>,
                config: __p::Str<'_>,
            ) -> __p::Res<__p::CacheBox, $crate::api::PluginError> {
                __p::factory(|| match name.as_str() {
                    $($($cname => __p::new_cache::<$ctype>(config.as_str()),)*)?
                    other => __p::unknown("cache", other, CACHES),
                })
            }

            extern "C" fn __outpost_new_store(
                name: __p::Str<'_>,
                config: __p::Str<'_>,
            ) -> __p::Res<__p::StoreBox, $crate::api::PluginError> {
                __p::factory(|| match name.as_str() {
                    $($($bname => __p::new_store::<$btype>(config.as_str()),)*)?
                    other => __p::unknown("store", other, STORES),
                })
            }

            fn __outpost_root() -> __p::OutpostPlugin_Ref {
                __abi::prefix_type::PrefixTypeTrait::leak_into_prefix(__p::OutpostPlugin {
                    info: __outpost_info,
                    init: __outpost_init,
                    new_policy: __outpost_new_policy,
                    new_sink: __outpost_new_sink,
                    new_cache: __outpost_new_cache,
                    new_store: __outpost_new_store,
                })
            }

            /// The library header the gateway's loader looks for.
            #[allow(unsafe_code)]
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static OUTPOST_PLUGIN_HEADER: __abi::library::LibHeader = {
                extern "C" fn erased() -> __abi::library::RootModuleResult {
                    __abi::library::__call_root_module_loader(__outpost_root)
                }
                // SAFETY: the constructor returns the root module type the header names.
                unsafe {
                    __abi::library::LibHeader::from_constructor::<__p::OutpostPlugin_Ref>(
                        erased,
                        __abi::library::CheckTypeLayout::Yes,
                    )
                }
            };
        }
    };
}
