//! The plugin host: loads the libraries a manifest lists (with every check `abi_stable` and we
//! can make, each failure naming the entry and the file), gives them host services, and
//! creates policy, sink, cache and store instances from them. Libraries built against an
//! older API level load through that level's frozen types and are adapted.

mod level1;
mod policy;
mod services;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::library::{lib_header_from_path, LibHeader, LibraryError};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::RResult;
use outpost_config::{FailMode, Manifest, PluginEntry};
use outpost_plugin_api::{
    self as api, CacheBox, ErrorKind, HostServices_TO, OutpostPlugin_Ref, PluginError, SinkBox,
    StoreBox, API_LEVEL,
};

pub use policy::{
    BackendRewrite, Done, EndHooks, Hook, HostContext, LocalResponse, Msg, Pipeline,
    PolicyInstance, StepResult, Work,
};
pub use services::{instance_id, Services};

/// A library's root module, at the level it was built for.
#[derive(Clone, Copy)]
enum Module {
    /// The current level.
    Current(OutpostPlugin_Ref),
    /// Level 1 (policies only).
    Level1(api::level1::OutpostPlugin_Ref),
}

/// The plugin kinds, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Policies.
    Policy,
    /// Telemetry sinks.
    Sink,
    /// Caches.
    Cache,
    /// Backup stores.
    Store,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Policy => "policies",
            Kind::Sink => "sinks",
            Kind::Cache => "caches",
            Kind::Store => "backup stores",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::Sink => "sink",
            Kind::Cache => "cache",
            Kind::Store => "backup store",
        }
    }
}

/// One loaded library.
pub struct Library {
    /// The manifest entry's name.
    pub entry: String,
    /// The file it came from.
    pub path: PathBuf,
    /// What it says about itself (level-1 libraries: no sinks, caches or stores).
    pub info: api::PluginInfo,
    module: Module,
    disable_after: Option<u64>,
    when_disabled: FailMode,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("entry", &self.entry)
            .field("path", &self.path)
            .field("name", &self.info.name.as_str())
            .finish_non_exhaustive()
    }
}

/// Every loaded library, and which one provides each name of each kind.
#[derive(Debug, Default)]
pub struct PluginHost {
    /// The libraries, in manifest order.
    pub libraries: Vec<Arc<Library>>,
    provided: HashMap<(Kind, String), usize>,
}

impl PluginHost {
    /// Loads every `[[plugins]]` entry. Returns every problem, each naming entry and file.
    pub fn load(manifest: &Manifest) -> Result<PluginHost, Vec<String>> {
        let plugin_dir = manifest
            .runtime
            .plugin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("plugins"));
        services::set_gateway_id(&manifest.gateway.id);
        // The gateway's own metrics exist before any plugin can define a name.
        crate::metrics::gateway::define_all();
        let mut host = PluginHost::default();
        let mut problems = Vec::new();
        // Sequentially: dlopen error reporting is not thread-safe everywhere.
        for (i, entry) in manifest.plugins.iter().enumerate() {
            let path = entry.file(&plugin_dir);
            match load_one(entry, &path) {
                Ok(lib) => {
                    let idx = host.libraries.len();
                    let i_ = &lib.info;
                    for (kind, names) in [
                        (Kind::Policy, &i_.policies),
                        (Kind::Sink, &i_.sinks),
                        (Kind::Cache, &i_.caches),
                        (Kind::Store, &i_.stores),
                    ] {
                        for p in names.iter() {
                            let key = (kind, p.to_string());
                            if let Some(&other) = host.provided.get(&key) {
                                problems.push(format!(
                                    "plugins[{i}] '{}' ({}): {} '{}' is also provided by plugin '{}'",
                                    entry.name,
                                    path.display(),
                                    kind.noun(),
                                    p,
                                    host.libraries[other].entry
                                ));
                            } else {
                                host.provided.insert(key, idx);
                            }
                        }
                    }
                    host.libraries.push(Arc::new(lib));
                }
                Err(why) => problems.push(format!(
                    "plugins[{i}] '{}' ({}): {why}",
                    entry.name,
                    path.display()
                )),
            }
        }
        if problems.is_empty() {
            Ok(host)
        } else {
            Err(problems)
        }
    }

    /// The library providing `name` of a kind, or why there is none.
    fn provider(&self, kind: Kind, name: &str) -> Result<&Arc<Library>, String> {
        if let Some(&idx) = self.provided.get(&(kind, name.to_owned())) {
            return Ok(&self.libraries[idx]);
        }
        let mut known: Vec<&str> = self
            .provided
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
            .collect();
        known.sort_unstable();
        let noun = kind.noun();
        Err(if known.is_empty() {
            format!(
                "unknown {noun} '{name}': no loaded plugin provides {}",
                kind.plural()
            )
        } else {
            format!("unknown {noun} '{name}' (loaded: {})", known.join(", "))
        })
    }

    /// Creates a policy instance for a policy step.
    pub fn policy(&self, name: &str, config: &serde_json::Value) -> Result<PolicyInstance, String> {
        let lib = self.provider(Kind::Policy, name)?;
        let json = config.to_string();
        let made = match lib.module {
            Module::Current(m) => {
                (m.new_policy())(name.into(), json.as_str().into()).map(policy::Imp::Current)
            }
            Module::Level1(m) => {
                (m.new_policy())(name.into(), json.as_str().into()).map(policy::Imp::Level1)
            }
        };
        made.into_result()
            .map(|imp| PolicyInstance::new(name, lib.clone(), imp))
            .map_err(|e| rejected(Kind::Policy, name, e))
    }

    /// Creates a telemetry sink.
    pub fn sink(&self, name: &str, config: &serde_json::Value) -> Result<SinkBox, String> {
        self.instance(Kind::Sink, name, config, |m| m.new_sink())
    }

    /// Whether the library providing sink `name` says its sinks never block
    /// ([`api::kinds::SINKS_NEVER_BLOCK`]).
    pub fn sink_never_blocks(&self, name: &str) -> bool {
        self.provider(Kind::Sink, name)
            .is_ok_and(|lib| lib.info.kinds & api::kinds::SINKS_NEVER_BLOCK != 0)
    }

    /// Creates a cache.
    pub fn cache(&self, name: &str, config: &serde_json::Value) -> Result<CacheBox, String> {
        self.instance(Kind::Cache, name, config, |m| m.new_cache())
    }

    /// Creates a backup store.
    pub fn store(&self, name: &str, config: &serde_json::Value) -> Result<StoreBox, String> {
        self.instance(Kind::Store, name, config, |m| m.new_store())
    }

    fn instance<T>(
        &self,
        kind: Kind,
        name: &str,
        config: &serde_json::Value,
        factory: impl FnOnce(
            OutpostPlugin_Ref,
        ) -> extern "C" fn(
            abi_stable::std_types::RStr<'_>,
            abi_stable::std_types::RStr<'_>,
        ) -> RResult<T, PluginError>,
    ) -> Result<T, String> {
        let lib = self.provider(kind, name)?;
        let Module::Current(m) = lib.module else {
            return Err(format!("unknown {} '{name}'", kind.noun()));
        };
        let json = config.to_string();
        (factory(m))(name.into(), json.as_str().into())
            .into_result()
            .map_err(|e| rejected(kind, name, e))
    }
}

/// A factory's refusal in words.
fn rejected(kind: Kind, name: &str, e: PluginError) -> String {
    let noun = kind.noun();
    match e.kind {
        ErrorKind::CONFIG => format!("{noun} '{name}' rejected its config: {}", e.message),
        ErrorKind::PANICKED => format!("{noun} '{name}' panicked while reading its config"),
        _ => format!("{noun} '{name}': {}", e.message),
    }
}

/// The API level a library's root module was built for, from its number of fields (the root
/// module only ever grows from one level to the next). The root module's layout is reached
/// from the header's `_Ref` pointer type through the layouts it refers to.
fn root_level(header: &LibHeader) -> Option<u32> {
    let mut todo = vec![header.layout()?];
    let mut seen = 0;
    while let Some(layout) = todo.pop() {
        seen += 1;
        if seen > 16 {
            return None;
        }
        if layout.is_prefix_kind() && layout.name() == "OutpostPlugin" {
            let n = layout.get_fields()?.len();
            return api::ROOT_FIELDS
                .iter()
                .find(|(_, fields)| *fields == n)
                .map(|(level, _)| *level);
        }
        todo.extend(layout.shared_vars().type_layouts().iter().map(|f| f()));
    }
    None
}

fn load_one(entry: &PluginEntry, path: &Path) -> Result<Library, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the file does not exist".to_string(),
        _ => format!("cannot read the file: {e}"),
    })?;
    if let Some(want) = &entry.sha256 {
        let got = crate::snapshot::sha256_hex(&bytes);
        if !got.eq_ignore_ascii_case(want) {
            return Err(format!(
                "sha256 mismatch: the file is {got}, the manifest pins {want}"
            ));
        }
    }
    drop(bytes);
    let header = lib_header_from_path(path).map_err(describe)?;
    let module = match root_level(header) {
        Some(1) => Module::Level1(
            header
                .init_root_module::<api::level1::OutpostPlugin_Ref>()
                .map_err(describe)?,
        ),
        _ => Module::Current(
            header
                .init_root_module::<OutpostPlugin_Ref>()
                .map_err(describe)?,
        ),
    };
    let info = match module {
        Module::Current(m) => (m.info())(),
        Module::Level1(m) => level1::info((m.info())()),
    };
    if info.api_level > API_LEVEL {
        return Err(format!(
            "plugin '{}' needs plugin api level {}, this gateway provides {}",
            info.name, info.api_level, API_LEVEL
        ));
    }
    if !info.panic_unwind {
        return Err(format!(
            "plugin '{}' was built with panic = \"abort\": a panic would take the gateway down; rebuild it with panic = \"unwind\"",
            info.name
        ));
    }
    let host = services::Host::new(info.name.as_str());
    let init = match module {
        Module::Current(m) => (m.init())(HostServices_TO::from_value(host, TD_Opaque)),
        Module::Level1(m) => (m.init())(api::level1::HostServices_TO::from_value(host, TD_Opaque)),
    };
    if let RResult::RErr(e) = init {
        return Err(match e.kind {
            ErrorKind::PANICKED => "initialisation panicked".to_string(),
            _ => format!("initialisation failed: {}", e.message),
        });
    }
    tracing::info!(
        plugin = %entry.name,
        name = %info.name,
        version = %info.version,
        api_level = info.api_level,
        path = %path.display(),
        "Plugin loaded."
    );
    Ok(Library {
        entry: entry.name.clone(),
        path: path.to_owned(),
        info,
        module,
        disable_after: entry.disable_after_panics,
        when_disabled: entry.when_disabled,
    })
}

/// A load error in words an operator can act on.
fn describe(e: LibraryError) -> String {
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("cannot be loaded as a shared library: {err}")
        }
        LibraryError::GetSymbolError { .. } => {
            "not an Outpost plugin: it exports no plugin root module (was it built with outpost-plugin-sdk's export_plugin!?)".into()
        }
        LibraryError::InvalidAbiHeader(h) => format!(
            "built with an incompatible abi_stable (ABI {}.{}); rebuild it against this gateway's outpost-plugin-sdk",
            h.abi_major, h.abi_minor
        ),
        LibraryError::IncompatibleVersionNumber {
            library_name,
            expected_version,
            actual_version,
        } => format!(
            "built against {library_name} {actual_version}, this gateway provides {expected_version}"
        ),
        LibraryError::AbiInstability(e) => {
            let text = e.to_string();
            tracing::debug!(diff = %text, "Plugin layout mismatch.");
            format!(
                "its types do not match this gateway's plugin API (a shared type changed): {}",
                summarize_layout_diff(&text)
            )
        }
        LibraryError::RootModule { err, .. } => format!("the plugin failed while loading: {err}"),
        other => other.to_string(),
    }
}

/// The essence of abi_stable's layout diff: where the mismatch is (type › field › …) and what
/// differs. The whole diff is logged at debug level.
pub(crate) fn summarize_layout_diff(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if !l.contains("error(s)inside:") || l.starts_with("0 ") {
            i += 1;
            continue;
        }
        let mut path = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("Layout of expected type") {
            if let Some(f) = lines[i].strip_prefix("field_name:") {
                if f != "0" && f != "__returns" {
                    path.push(f);
                }
            } else if let Some(t) = lines[i].strip_prefix("type:") {
                if t != "AFunctionPointer" {
                    path.push(t);
                }
            }
            i += 1;
        }
        let mut what = Vec::new();
        while i < lines.len() && !lines[i].contains("error(s)") {
            if let Some(e) = lines[i].strip_prefix("Error:") {
                let expected = lines.get(i + 2).copied().unwrap_or("?");
                let got = lines.get(i + 4).copied().unwrap_or("?");
                what.push(format!("{e} (expected {expected}, found {got})"));
            }
            i += 1;
        }
        found.push(format!("at {}: {}", path.join(" › "), what.join("; ")));
    }
    if found.is_empty() {
        lines
            .iter()
            .take(8)
            .copied()
            .collect::<Vec<_>>()
            .join(" | ")
    } else {
        found.join("; ")
    }
}
