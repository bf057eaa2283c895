//! The plugin host: loads the libraries a manifest lists (with every check `abi_stable` and we
//! can make, each failure naming the entry and the file), gives them host services, creates
//! policy instances from policy steps, and runs them on borrowed views of the request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RMut;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use outpost_config::{FailMode, Manifest, PluginEntry};
use outpost_plugin_api::{
    self as api, ErrorKind, Flow, HostServices_TO, HttpHead_TO, OutpostPlugin_Ref, PolicyBox,
    RequestContext_TO, API_LEVEL,
};

/// One loaded library.
pub struct Library {
    /// The manifest entry's name.
    pub entry: String,
    /// The file it came from.
    pub path: PathBuf,
    /// What it says about itself.
    pub info: api::PluginInfo,
    module: OutpostPlugin_Ref,
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

/// Every loaded library, and which one provides each policy name.
#[derive(Debug, Default)]
pub struct PluginHost {
    /// The libraries, in manifest order.
    pub libraries: Vec<Arc<Library>>,
    policies: HashMap<String, usize>,
}

impl PluginHost {
    /// Loads every `[[plugins]]` entry. Returns every problem, each naming entry and file.
    pub fn load(manifest: &Manifest) -> Result<PluginHost, Vec<String>> {
        let plugin_dir = manifest
            .runtime
            .plugin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("plugins"));
        let mut host = PluginHost::default();
        let mut problems = Vec::new();
        // Sequentially: dlopen error reporting is not thread-safe everywhere.
        for (i, entry) in manifest.plugins.iter().enumerate() {
            let path = entry.file(&plugin_dir);
            match load_one(entry, &path) {
                Ok(lib) => {
                    let idx = host.libraries.len();
                    for p in lib.info.policies.iter() {
                        if let Some(&other) = host.policies.get(p.as_str()) {
                            problems.push(format!(
                                "plugins[{i}] '{}' ({}): policy '{}' is also provided by plugin '{}'",
                                entry.name,
                                path.display(),
                                p,
                                host.libraries[other].entry
                            ));
                        } else {
                            host.policies.insert(p.to_string(), idx);
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

    /// Creates a policy instance for a policy step.
    pub fn policy(&self, name: &str, config: &serde_json::Value) -> Result<PolicyInstance, String> {
        let Some(&idx) = self.policies.get(name) else {
            let mut known: Vec<&str> = self.policies.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(if known.is_empty() {
                format!("unknown policy '{name}': no plugin providing policies is loaded")
            } else {
                format!("unknown policy '{name}' (loaded: {})", known.join(", "))
            });
        };
        let lib = &self.libraries[idx];
        let json = config.to_string();
        match (lib.module.new_policy())(name.into(), json.as_str().into()) {
            RResult::ROk(policy) => Ok(PolicyInstance {
                name: name.into(),
                library: lib.clone(),
                policy,
                panics: AtomicU64::new(0),
            }),
            RResult::RErr(e) => Err(match e.kind {
                ErrorKind::CONFIG => format!("policy '{name}' rejected its config: {}", e.message),
                ErrorKind::PANICKED => format!("policy '{name}' panicked while reading its config"),
                _ => format!("policy '{name}': {}", e.message),
            }),
        }
    }
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
    let module = header
        .init_root_module::<OutpostPlugin_Ref>()
        .map_err(describe)?;
    let info = (module.info())();
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
    let host = HostServices_TO::from_value(
        HostLog {
            plugin: info.name.to_string(),
        },
        TD_Opaque,
    );
    if let RResult::RErr(e) = (module.init())(host) {
        return Err(format!("initialisation failed: {}", e.message));
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
fn summarize_layout_diff(text: &str) -> String {
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

/// Logging into the host's `tracing`, under the plugin's name.
struct HostLog {
    plugin: String,
}

impl api::HostServices for HostLog {
    fn log(&self, level: u8, message: RStr<'_>) {
        let plugin = self.plugin.as_str();
        let message = message.as_str();
        match level {
            api::level::ERROR => tracing::error!(target: "outpost::plugin", plugin, "{message}"),
            api::level::WARN => tracing::warn!(target: "outpost::plugin", plugin, "{message}"),
            api::level::INFO => tracing::info!(target: "outpost::plugin", plugin, "{message}"),
            api::level::DEBUG => tracing::debug!(target: "outpost::plugin", plugin, "{message}"),
            _ => tracing::trace!(target: "outpost::plugin", plugin, "{message}"),
        }
    }

    fn log_enabled(&self, level: u8) -> bool {
        match level {
            api::level::ERROR => {
                tracing::enabled!(target: "outpost::plugin", tracing::Level::ERROR)
            }
            api::level::WARN => tracing::enabled!(target: "outpost::plugin", tracing::Level::WARN),
            api::level::INFO => tracing::enabled!(target: "outpost::plugin", tracing::Level::INFO),
            api::level::DEBUG => {
                tracing::enabled!(target: "outpost::plugin", tracing::Level::DEBUG)
            }
            _ => tracing::enabled!(target: "outpost::plugin", tracing::Level::TRACE),
        }
    }
}

/// One policy step's instance.
pub struct PolicyInstance {
    /// Policy name.
    pub name: Arc<str>,
    library: Arc<Library>,
    policy: PolicyBox,
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
}

impl PolicyInstance {
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
            Flow::PANICKED => {
                let n = self.panics.fetch_add(1, Ordering::Relaxed) + 1;
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

    /// Runs the request hook on the request head.
    pub fn on_request(
        &self,
        parts: &mut http::request::Parts,
        ctx: &mut HostContext<'_>,
    ) -> StepResult {
        self.run(&mut HeadView::request(parts), ctx, |p, head, c| {
            p.on_request(head, c)
        })
    }

    /// Runs the response hook on the response head.
    pub fn on_response(
        &self,
        parts: &mut http::response::Parts,
        ctx: &mut HostContext<'_>,
    ) -> StepResult {
        self.run(&mut HeadView::response(parts), ctx, |p, head, c| {
            p.on_response(head, c)
        })
    }

    /// One hook call: skipped or failed when the instance is disabled, otherwise the plugin
    /// sees `view` and `ctx` through trait objects built on the stack.
    fn run<V: api::HttpHead>(
        &self,
        view: &mut V,
        ctx: &mut HostContext<'_>,
        hook: impl FnOnce(&PolicyBox, &mut api::HeadMut<'_>, &mut api::ContextMut<'_>) -> Flow,
    ) -> StepResult {
        match self.disabled() {
            Some(FailMode::FailOpen) => return StepResult::Continue,
            Some(FailMode::FailClosed) => {
                ctx.error = format!("policy '{}' is disabled after repeated panics", self.name);
                return StepResult::Failed;
            }
            None => {}
        }
        let flow = {
            let mut head = HttpHead_TO::from_ptr(RMut::new(view), TD_Opaque);
            let mut c = RequestContext_TO::from_ptr(RMut::new(&mut *ctx), TD_Opaque);
            hook(&self.policy, &mut head, &mut c)
        };
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
    pub body: bytes::Bytes,
}

/// The request context policies see; lives on the request's stack.
#[derive(Debug)]
pub struct HostContext<'r> {
    /// API id.
    pub api_id: &'r str,
    /// Operation id.
    pub operation_id: &'r str,
    /// Product id ("" when none).
    pub product_id: &'r str,
    /// Subscription id ("" when none).
    pub subscription_id: &'r str,
    /// Client IP.
    pub client_ip: &'r str,
    /// Request id.
    pub request_id: &'r str,
    /// Variables set by policies (allocated only when one is set).
    pub variables: Vec<(String, String)>,
    /// The last error.
    pub error: String,
    /// The response a policy asked for.
    pub response: Option<LocalResponse>,
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
        self.variables
            .iter()
            .find(|(k, _)| k == name.as_str())
            .map(|(_, v)| RStr::from(v.as_str()))
            .into()
    }
    fn set_variable(&mut self, name: RStr<'_>, value: RStr<'_>) {
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
            body: bytes::Bytes::copy_from_slice(body.as_slice()),
        });
    }
    fn respond_header(&mut self, name: RStr<'_>, value: RSlice<'_, u8>) -> bool {
        let (Some(r), Ok(n), Ok(v)) = (
            self.response.as_mut(),
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_slice()),
        ) else {
            return false;
        };
        r.headers.append(n, v);
        true
    }
}

/// A request or response head as policies see it: the header map borrowed mutably, the rest
/// borrowed read-only (empty strings and status 0 where a field does not apply).
struct HeadView<'p> {
    headers: &'p mut HeaderMap,
    method: &'p str,
    path: &'p str,
    query: &'p str,
    status: u16,
}

impl<'p> HeadView<'p> {
    fn request(parts: &'p mut http::request::Parts) -> Self {
        Self {
            headers: &mut parts.headers,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or_default(),
            status: 0,
        }
    }

    fn response(parts: &'p mut http::response::Parts) -> Self {
        Self {
            headers: &mut parts.headers,
            method: "",
            path: "",
            query: "",
            status: parts.status.as_u16(),
        }
    }

    fn put(&mut self, name: RStr<'_>, value: RSlice<'_, u8>, append: bool) -> bool {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_slice()),
        ) else {
            return false;
        };
        if append {
            self.headers.append(n, v);
        } else {
            self.headers.insert(n, v);
        }
        true
    }
}

impl api::HttpHead for HeadView<'_> {
    fn method(&self) -> RStr<'_> {
        self.method.into()
    }
    fn path(&self) -> RStr<'_> {
        self.path.into()
    }
    fn query(&self) -> RStr<'_> {
        self.query.into()
    }
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: RStr<'_>) -> ROption<RSlice<'_, u8>> {
        self.headers
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
        self.headers.remove(name.as_str()).is_some()
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
