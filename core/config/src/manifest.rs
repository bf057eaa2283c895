//! The site manifest (TOML): what this gateway process is — listeners, TLS, limits, timeouts,
//! logging and where its API configuration comes from. Static for the life of the process.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{deserialize_into, join_path, Report};

/// A whole site manifest. See the README's manifest reference for every key.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Who this gateway is.
    pub gateway: GatewayIdentity,
    /// Async runtime settings.
    pub runtime: Runtime,
    /// Logging.
    pub log: Log,
    /// Listening sockets; at least one.
    pub listeners: Vec<Listener>,
    /// Limits and timeouts applied to clients.
    pub limits: Limits,
    /// Timeouts and pooling towards backends.
    pub upstream: Upstream,
    /// Graceful shutdown.
    pub shutdown: Shutdown,
    /// Plugin libraries to load, in order (`[[plugins]]`).
    pub plugins: Vec<PluginEntry>,
    /// Caches policies use (`[[caches]]`); the first is the default.
    pub caches: Vec<CacheEntry>,
    /// The telemetry queue and its sinks (`[telemetry]`, `[[telemetry.sinks]]`).
    pub telemetry: Telemetry,
    /// Where applied configurations are backed up (`[backup]`; none when absent).
    pub backup: Option<Backup>,
    /// Where the API configuration comes from.
    pub config: ConfigSource,
}

/// `[[plugins]]`: one plugin library.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// A name for logs and errors (unique).
    pub name: String,
    /// The library file. Relative paths are relative to the manifest.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Or: a library name looked up in `runtime.plugin_dir` (`lib<library>.so` on Linux).
    #[serde(default)]
    pub library: Option<String>,
    /// Refuse the file unless its SHA-256 (hex) is this.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Disable a policy instance of this library after this many panics (absent: never).
    #[serde(default)]
    pub disable_after_panics: Option<u64>,
    /// What a disabled instance does: `fail_closed` (answer 500 `policy_failed`, default) or `fail_open`
    /// (skip the step).
    #[serde(default)]
    pub when_disabled: FailMode,
}

impl PluginEntry {
    /// The library file this entry names (paths already resolved against the manifest).
    pub fn file(&self, plugin_dir: &Path) -> PathBuf {
        match (&self.path, &self.library) {
            (Some(p), _) => p.clone(),
            (None, Some(lib)) => plugin_dir.join(format!(
                "{}{}{}",
                std::env::consts::DLL_PREFIX,
                lib,
                std::env::consts::DLL_SUFFIX
            )),
            (None, None) => PathBuf::new(),
        }
    }
}

/// What a disabled plugin instance does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Requests that reach it fail with 500 `policy_failed`.
    #[default]
    FailClosed,
    /// It is skipped.
    FailOpen,
}

/// `[gateway]`: identity used in logs and reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayIdentity {
    /// Gateway id (as the management plane knows it). Default `outpost`.
    pub id: String,
    /// Free-form region or site name.
    pub region: Option<String>,
}

impl Default for GatewayIdentity {
    fn default() -> Self {
        Self {
            id: "outpost".into(),
            region: None,
        }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Worker threads. Absent: one per CPU. `1` runs a single-threaded runtime, the cheapest
    /// per request when the gateway is pinned to one core.
    pub worker_threads: Option<usize>,
    /// Where `[[plugins]] library = "…"` entries are looked up. Default: `plugins` next to the
    /// manifest.
    pub plugin_dir: Option<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outpost_gateway=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// Log one line per request at target `outpost::access`.
    pub access_log: bool,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            access_log: false,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[listeners]]`: one listening socket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Name used in logs; unique.
    pub name: String,
    /// `ip:port` to bind; port 0 picks a free port (logged at start).
    pub address: SocketAddr,
    /// Accept HTTP/2 (ALPN `h2` on TLS, prior knowledge on cleartext). Default true.
    #[serde(default = "yes")]
    pub http2: bool,
    /// Serve HTTPS with these certificates.
    pub tls: Option<ListenerTls>,
}

fn yes() -> bool {
    true
}

/// `[listeners.tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificates chosen by SNI. The first is also the default, served when the client sends
    /// no SNI or a name no certificate lists.
    pub certificates: Vec<Certificate>,
    /// Ask clients for a certificate.
    pub client_auth: Option<ClientAuth>,
    /// Issue TLS session tickets so returning clients resume without a full handshake.
    /// Default true. (Stateful resumption by session id is always on.)
    #[serde(default = "yes")]
    pub session_tickets: bool,
}

/// One certificate and key (PEM files), and the host names it serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Host names, exact (`api.example.com`) or one leading wildcard label (`*.example.com`).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[listeners.tls.client_auth]`: downstream client certificates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM file of the CA certificates client certificates must chain to.
    pub ca: PathBuf,
    /// Refuse the handshake without a valid client certificate. Default false: a certificate
    /// is verified when offered and exposed to policies, but not required.
    #[serde(default)]
    pub required: bool,
    /// When set, the SHA-256 thumbprint (hex) of the verified client certificate is sent to the
    /// backend in this header. The header is always removed from what clients send.
    pub forward_thumbprint_header: Option<String>,
}

/// `[limits]`: what a client may send and how long it may take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers) accepted; larger → 431. Default 32 KiB.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger → 413. Absent: unlimited (bodies are streamed).
    pub max_body_bytes: Option<u64>,
    /// Time a client has to send a complete request head (and, on a new connection, its first
    /// request); slower connections are closed. HTTP/1.1 keep-alive connections idle this long
    /// are closed too, so keep it above the idle timeout of any load balancer in front
    /// (default 65 s, above the common 60 s).
    pub header_read_timeout_ms: u64,
    /// Time a client has to complete the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Open client connections per listener. At the limit the listener stops accepting until
    /// one closes (new clients wait in the kernel's backlog instead of exhausting descriptors).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_body_bytes: None,
            header_read_timeout_ms: 65_000,
            tls_handshake_timeout_ms: 10_000,
            http2_max_concurrent_streams: 256,
            max_connections: 16_384,
        }
    }
}

/// `[upstream]`: connections to backends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// TCP connect timeout; exceeded → 504.
    pub connect_timeout_ms: u64,
    /// Time from sending the request to the backend's response head; exceeded → 504.
    pub response_header_timeout_ms: u64,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Idle pooled connections kept per backend host.
    pub max_idle_per_host: usize,
    /// An upgraded connection (WebSocket) with no traffic either way for this long is closed.
    pub tunnel_idle_timeout_ms: u64,
    /// A response body from a backend that sends nothing for this long is cut off (the client
    /// sees the response end abruptly). Raise it for event streams with rare heartbeats.
    pub body_idle_timeout_ms: u64,
    /// Default deadline of an HTTP call a policy makes through the gateway.
    pub callout_timeout_ms: u64,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 5_000,
            response_header_timeout_ms: 60_000,
            idle_timeout_ms: 90_000,
            max_idle_per_host: 256,
            tunnel_idle_timeout_ms: 300_000,
            body_idle_timeout_ms: 300_000,
            callout_timeout_ms: 10_000,
        }
    }
}

/// `[[caches]]`: a cache instance provided by a loaded plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheEntry {
    /// The name policies use (unique). The first cache listed is the default one.
    pub name: String,
    /// The cache type, as a loaded plugin names it (for example `cache-memory`).
    pub provider: String,
    /// Deadline for each operation; past it the policy gets a timeout answer.
    /// Default 100 ms.
    #[serde(default = "default_cache_timeout_ms")]
    pub timeout_ms: u64,
    /// The instance's configuration, passed to the plugin as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn default_cache_timeout_ms() -> u64 {
    100
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// `[telemetry]`: the per-request records and metric snapshots sent to sinks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Records queued per sink; when a sink falls this far behind, new records for it are
    /// dropped and counted (`outpost_telemetry_dropped_total`). Default 16384.
    pub queue_capacity: usize,
    /// Most records per `export` call. Default 4096.
    pub batch_max: usize,
    /// A batch of fewer than 256 records is exported after waiting this long. Default 1000 ms.
    pub flush_interval_ms: u64,
    /// Metric snapshots go to sinks this often. Default 15000 ms.
    pub metrics_interval_ms: u64,
    /// At shutdown, sinks get this long to deliver what they hold. Default 5000 ms.
    pub shutdown_flush_ms: u64,
    /// The sinks (`[[telemetry.sinks]]`).
    pub sinks: Vec<SinkEntry>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            queue_capacity: 16_384,
            batch_max: 4_096,
            flush_interval_ms: 1_000,
            metrics_interval_ms: 15_000,
            shutdown_flush_ms: 5_000,
            sinks: Vec::new(),
        }
    }
}

/// `[[telemetry.sinks]]`: a telemetry sink provided by a loaded plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkEntry {
    /// A name for logs and metrics (unique).
    pub name: String,
    /// The sink type, as a loaded plugin names it (for example `access-log`).
    pub provider: String,
    /// The instance's configuration, passed to the plugin as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Call the sink from a thread of its own even when its library says its sinks never
    /// block (they are then called from the telemetry thread).
    #[serde(default)]
    pub own_thread: bool,
}

/// `[backup]`: the store that keeps the configurations this gateway applied, so that it can
/// start from the newest one when its configuration source is unusable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// The store type, as a loaded plugin names it (`fs`, `sqlite`, `redis`).
    pub store: String,
    /// The store instance's configuration, passed to the plugin as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Generations kept (older ones are pruned after each save). Default 5.
    #[serde(default = "default_generations")]
    pub generations: u32,
    /// The key this gateway's generations are kept under; default: the gateway id.
    #[serde(default)]
    pub scope: Option<String>,
}

fn default_generations() -> u32 {
    5
}

/// `[shutdown]`: what SIGTERM / SIGINT do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// After the signal, keep accepting for this long while readiness fails, so load balancers
    /// stop sending traffic first. Default 0.
    pub delay_ms: u64,
    /// Then stop accepting and give in-flight requests this long to finish. Default 30 s.
    pub drain_timeout_ms: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            delay_ms: 0,
            drain_timeout_ms: 30_000,
        }
    }
}

/// `[config]`: where the API configuration comes from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConfigSource {
    /// A local JSON file, watched and reloaded when it changes (standalone mode).
    File(FileSource),
    /// The management plane (`outpost control`), polled (long-poll) for this gateway's
    /// snapshot.
    Plane(PlaneSource),
}

/// `type = "plane"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaneSource {
    /// The plane's base URL (`http://` or `https://`).
    pub url: String,
    /// A file holding this gateway's token (relative to the manifest). Renewed tokens are
    /// written back to it when it is writable.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Or the token itself.
    #[serde(default)]
    pub token: Option<String>,
    /// The plane's Ed25519 public key (64 hex digits). When set, snapshots that are unsigned or
    /// whose signature does not verify are rejected, from the plane and from backups alike.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Pause between polls when long-poll is off (`long_poll_s = 0`). Default 10000 ms.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// How long the plane may hold a poll open waiting for a change (0: no long-poll).
    /// Default 30 s.
    #[serde(default = "default_long_poll_s")]
    pub long_poll_s: u64,
    /// Heartbeat period. Default 60000 ms.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// At start, how long to keep trying the plane before falling back to the backup.
    /// Default 10000 ms.
    #[serde(default = "default_start_wait_ms")]
    pub start_wait_ms: u64,
    /// Trust this CA (PEM file, relative to the manifest) for an `https://` plane instead of
    /// the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_poll_ms() -> u64 {
    10_000
}

fn default_long_poll_s() -> u64 {
    30
}

fn default_heartbeat_ms() -> u64 {
    60_000
}

fn default_start_wait_ms() -> u64 {
    10_000
}

/// `type = "file"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// The API configuration file (JSON). Relative paths are relative to the manifest.
    pub path: PathBuf,
    /// How often the file is checked for changes. Default 1000 ms; 0 disables watching
    /// (SIGHUP still reloads).
    #[serde(default = "default_watch_ms")]
    pub watch_interval_ms: u64,
}

fn default_watch_ms() -> u64 {
    1000
}

const SECTIONS: &[&str] = &[
    "gateway",
    "runtime",
    "log",
    "listeners",
    "limits",
    "upstream",
    "shutdown",
    "plugins",
    "caches",
    "telemetry",
    "backup",
    "config",
];

impl Manifest {
    /// Reads and validates the manifest at `path`. Relative paths inside it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<Manifest, Report> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            let mut r = Report::new(&origin);
            r.push("", format!("cannot read the manifest: {e}"));
            r
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &origin, base)
    }

    /// Parses and validates a manifest's text. `base` is the directory relative paths are
    /// resolved against. Reports every problem at once.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Manifest, Report> {
        let mut report = Report::new(origin);
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                report.push("", format!("not valid TOML: {}", e.to_string().trim()));
                return Err(report);
            }
        };
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                report.push(
                    key.clone(),
                    format!("unknown section, expected one of {}", SECTIONS.join(", ")),
                );
            }
        }
        let gateway = section::<GatewayIdentity>(&table, "gateway", &mut report);
        let runtime = section::<Runtime>(&table, "runtime", &mut report);
        let log = section::<Log>(&table, "log", &mut report);
        let limits = section::<Limits>(&table, "limits", &mut report);
        let upstream = section::<Upstream>(&table, "upstream", &mut report);
        let shutdown = section::<Shutdown>(&table, "shutdown", &mut report);
        let telemetry = section::<Telemetry>(&table, "telemetry", &mut report);

        let mut listeners = Vec::new();
        match table.get("listeners") {
            None => report.push("listeners", "at least one [[listeners]] entry is required"),
            Some(toml::Value::Array(items)) => {
                if items.is_empty() {
                    report.push("listeners", "at least one [[listeners]] entry is required");
                }
                for (i, item) in items.iter().enumerate() {
                    let prefix = format!("listeners[{i}]");
                    if let Some(l) =
                        deserialize_into::<Listener, _>(item.clone(), &prefix, &mut report)
                    {
                        listeners.push((prefix, l));
                    }
                }
            }
            Some(_) => report.push("listeners", "must be an array of tables ([[listeners]])"),
        }

        let mut plugins = Vec::new();
        for (prefix, p) in
            named_entries::<PluginEntry>(&table, "plugins", "plugin", &mut report, |p| &p.name)
        {
            match (&p.path, &p.library) {
                (Some(_), Some(_)) => {
                    report.push(prefix.clone(), "give either `path` or `library`, not both")
                }
                (None, None) => report.push(prefix.clone(), "`path` or `library` is required"),
                (None, Some(l)) if l.is_empty() || l.contains('/') => {
                    report.push(join_path(&prefix, "library"), "must be a bare library name")
                }
                _ => {}
            }
            if let Some(h) = &p.sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    report.push(join_path(&prefix, "sha256"), "must be 64 hex digits");
                }
            }
            if p.disable_after_panics == Some(0) {
                report.push(
                    join_path(&prefix, "disable_after_panics"),
                    "must be positive (leave it out to never disable)",
                );
            }
            plugins.push(p);
        }

        let backup = match table.get("backup") {
            None => None,
            Some(v @ toml::Value::Table(_)) => {
                let b = deserialize_into::<Backup, _>(v.clone(), "backup", &mut report);
                if let Some(b) = &b {
                    if b.generations == 0 {
                        report.push("backup.generations", "must be at least 1");
                    }
                    if b.scope.as_deref().is_some_and(|s| s.trim().is_empty()) {
                        report.push("backup.scope", "must not be empty");
                    }
                }
                b
            }
            Some(_) => {
                report.push("backup", "must be a table ([backup])");
                None
            }
        };
        let mut caches = Vec::new();
        for (prefix, c) in
            named_entries::<CacheEntry>(&table, "caches", "cache", &mut report, |c| &c.name)
        {
            if c.timeout_ms == 0 {
                report.push(join_path(&prefix, "timeout_ms"), "must be positive");
            }
            caches.push(c);
        }
        if let Some(t) = &telemetry {
            if t.queue_capacity == 0 {
                report.push("telemetry.queue_capacity", "must be positive");
            }
            if t.batch_max == 0 {
                report.push("telemetry.batch_max", "must be positive");
            }
            if t.flush_interval_ms == 0 {
                report.push("telemetry.flush_interval_ms", "must be positive");
            }
            if t.metrics_interval_ms == 0 {
                report.push("telemetry.metrics_interval_ms", "must be positive");
            }
            let mut names = HashSet::new();
            for (i, s) in t.sinks.iter().enumerate() {
                if s.name.trim().is_empty() {
                    report.push(format!("telemetry.sinks[{i}].name"), "must not be empty");
                } else if !names.insert(s.name.as_str()) {
                    report.push(
                        format!("telemetry.sinks[{i}].name"),
                        format!("duplicate sink name '{}'", s.name),
                    );
                }
            }
        }

        let config = match table.get("config") {
            None => {
                report.push("config", "missing: say where the API configuration comes from, e.g. [config] type = \"file\" path = \"api.json\"");
                None
            }
            Some(v) => deserialize_into::<ConfigSource, _>(v.clone(), "config", &mut report),
        };

        // Semantic checks run on every section that parsed, so one pass reports everything.
        validate_listeners(&listeners, &mut report);
        validate_limits(
            limits.as_ref().unwrap_or(&Limits::default()),
            upstream.as_ref().unwrap_or(&Upstream::default()),
            runtime.as_ref().unwrap_or(&Runtime::default()),
            &mut report,
        );
        let (
            Some(gateway),
            Some(runtime),
            Some(log),
            Some(limits),
            Some(upstream),
            Some(shutdown),
            Some(telemetry),
        ) = (gateway, runtime, log, limits, upstream, shutdown, telemetry)
        else {
            return Err(report);
        };
        if gateway.id.trim().is_empty() {
            report.push("gateway.id", "must not be empty");
        }
        if let Err(e) = log.level.parse::<LevelCheck>() {
            report.push("log.level", e);
        }
        let Some(mut config) = config else {
            return Err(report);
        };
        if let ConfigSource::Plane(p) = &config {
            if !(p.url.starts_with("http://") || p.url.starts_with("https://"))
                || p.url.parse::<http::Uri>().is_err()
            {
                report.push("config.url", format!("'{}' is not an http(s) URL", p.url));
            }
            match (&p.token, &p.token_file) {
                (Some(_), Some(_)) => {
                    report.push("config", "give either token or token_file, not both")
                }
                (None, None) => report.push("config", "token or token_file is required"),
                _ => {}
            }
            if let Some(k) = &p.public_key {
                if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                    report.push(
                        "config.public_key",
                        "must be 64 hex digits (an Ed25519 public key)",
                    );
                }
            }
            for (key, v) in [
                ("config.poll_interval_ms", p.poll_interval_ms),
                ("config.heartbeat_interval_ms", p.heartbeat_interval_ms),
            ] {
                if v == 0 {
                    report.push(key, "must be positive");
                }
            }
        }
        let mut listeners: Vec<Listener> = listeners.into_iter().map(|(_, l)| l).collect();
        resolve_paths(base, &mut listeners, &mut config);
        let mut runtime = runtime;
        runtime.plugin_dir = Some(
            base.join(
                runtime
                    .plugin_dir
                    .as_deref()
                    .unwrap_or(Path::new("plugins")),
            ),
        );
        for p in &mut plugins {
            if let Some(path) = &mut p.path {
                *path = base.join(&*path);
            }
        }
        report.into_result(Manifest {
            gateway,
            runtime,
            log,
            listeners,
            limits,
            upstream,
            shutdown,
            plugins,
            caches,
            telemetry,
            backup,
            config,
        })
    }
}

/// `[[key]]` entries, each deserialized (problems reported under `key[i]`) and its name checked:
/// not empty, unique. Answers each entry with its report path.
fn named_entries<T: for<'de> Deserialize<'de>>(
    table: &toml::Table,
    key: &str,
    noun: &str,
    report: &mut Report,
    name: fn(&T) -> &str,
) -> Vec<(String, T)> {
    let mut out = Vec::new();
    match table.get(key) {
        None => {}
        Some(toml::Value::Array(items)) => {
            let mut names = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let prefix = format!("{key}[{i}]");
                let Some(e) = deserialize_into::<T, _>(item.clone(), &prefix, report) else {
                    continue;
                };
                let n = name(&e);
                if n.trim().is_empty() {
                    report.push(join_path(&prefix, "name"), "must not be empty");
                } else if !names.insert(n.to_owned()) {
                    report.push(
                        join_path(&prefix, "name"),
                        format!("duplicate {noun} name '{n}'"),
                    );
                }
                out.push((prefix, e));
            }
        }
        Some(_) => report.push(key, format!("must be an array of tables ([[{key}]])")),
    }
    out
}

fn section<T: for<'de> Deserialize<'de> + Default>(
    table: &toml::Table,
    key: &str,
    report: &mut Report,
) -> Option<T> {
    match table.get(key) {
        None => Some(T::default()),
        Some(v @ toml::Value::Table(_)) => deserialize_into(v.clone(), key, report),
        Some(_) => {
            report.push(key, format!("must be a table ([{key}])"));
            None
        }
    }
}

fn validate_listeners(listeners: &[(String, Listener)], report: &mut Report) {
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (path, l) in listeners {
        if l.name.trim().is_empty() {
            report.push(join_path(path, "name"), "must not be empty");
        } else if !names.insert(l.name.as_str()) {
            report.push(
                join_path(path, "name"),
                format!("duplicate listener name '{}'", l.name),
            );
        }
        if l.address.port() != 0 && !addrs.insert(l.address) {
            report.push(
                join_path(path, "address"),
                format!("{} is used by another listener", l.address),
            );
        }
        if let Some(tls) = &l.tls {
            if tls.certificates.is_empty() {
                report.push(
                    join_path(path, "tls.certificates"),
                    "at least one certificate is required",
                );
            }
            for (i, c) in tls.certificates.iter().enumerate() {
                for (j, h) in c.hostnames.iter().enumerate() {
                    if let Err(e) = check_hostname_pattern(h) {
                        report.push(format!("{path}.tls.certificates[{i}].hostnames[{j}]"), e);
                    }
                }
            }
            if let Some(ca) = &tls.client_auth {
                if let Some(h) = &ca.forward_thumbprint_header {
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        report.push(
                            join_path(path, "tls.client_auth.forward_thumbprint_header"),
                            format!("'{h}' is not a valid header name"),
                        );
                    }
                }
            }
        }
    }
}

fn validate_limits(limits: &Limits, upstream: &Upstream, runtime: &Runtime, report: &mut Report) {
    if limits.max_header_bytes < 1024 {
        report.push("limits.max_header_bytes", "must be at least 1024");
    }
    if limits.max_body_bytes == Some(0) {
        report.push(
            "limits.max_body_bytes",
            "must be positive (leave it out for no limit)",
        );
    }
    let positive = [
        (
            "limits.header_read_timeout_ms",
            limits.header_read_timeout_ms,
        ),
        (
            "limits.tls_handshake_timeout_ms",
            limits.tls_handshake_timeout_ms,
        ),
        (
            "limits.http2_max_concurrent_streams",
            u64::from(limits.http2_max_concurrent_streams),
        ),
        ("limits.max_connections", limits.max_connections as u64),
        ("upstream.connect_timeout_ms", upstream.connect_timeout_ms),
        (
            "upstream.response_header_timeout_ms",
            upstream.response_header_timeout_ms,
        ),
        ("upstream.idle_timeout_ms", upstream.idle_timeout_ms),
        (
            "upstream.tunnel_idle_timeout_ms",
            upstream.tunnel_idle_timeout_ms,
        ),
        (
            "upstream.body_idle_timeout_ms",
            upstream.body_idle_timeout_ms,
        ),
        ("upstream.callout_timeout_ms", upstream.callout_timeout_ms),
    ];
    for (key, v) in positive {
        if v == 0 {
            report.push(key, "must be positive");
        }
    }
    if runtime.worker_threads == Some(0) {
        report.push("runtime.worker_threads", "must be positive");
    }
}

/// Checks a host name pattern: exact DNS name or `*.` followed by one.
pub fn check_hostname_pattern(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{h}' is not a host name (expected e.g. api.example.com or *.example.com)"
        ))
    }
}

/// A `tracing` filter directive list, checked for shape only (the subscriber parses it).
struct LevelCheck;

impl std::str::FromStr for LevelCheck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
        for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let level = directive.rsplit('=').next().unwrap_or(directive);
            if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "'{directive}' does not end in a level ({})",
                    LEVELS.join(", ")
                ));
            }
        }
        Ok(LevelCheck)
    }
}

fn resolve_paths(base: &Path, listeners: &mut [Listener], config: &mut ConfigSource) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    for l in listeners {
        if let Some(tls) = &mut l.tls {
            for c in &mut tls.certificates {
                fix(&mut c.cert);
                fix(&mut c.key);
            }
            if let Some(ca) = &mut tls.client_auth {
                fix(&mut ca.ca);
            }
        }
    }
    match config {
        ConfigSource::File(f) => fix(&mut f.path),
        ConfigSource::Plane(p) => {
            if let Some(t) = &mut p.token_file {
                fix(t);
            }
            if let Some(c) = &mut p.ca_file {
                fix(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, Report> {
        Manifest::parse(text, "site.toml", Path::new("/etc/outpost"))
    }

    const MINIMAL: &str = r#"
        [[listeners]]
        name = "http"
        address = "127.0.0.1:8080"

        [config]
        type = "file"
        path = "api.json"
    "#;

    #[test]
    fn minimal_manifest_gets_defaults_and_resolved_paths() {
        let m = parse(MINIMAL).expect("valid");
        assert_eq!(m.listeners.len(), 1);
        assert!(m.listeners[0].http2);
        assert_eq!(m.limits.max_header_bytes, 32 * 1024);
        assert_eq!(m.log.format, LogFormat::Text);
        let ConfigSource::File(f) = &m.config else {
            panic!("a file source");
        };
        assert_eq!(f.path, Path::new("/etc/outpost/api.json"));
        assert_eq!(f.watch_interval_ms, 1000);
    }

    #[test]
    fn cache_sink_and_callout_settings_are_checked() {
        let text = r#"
            [upstream]
            callout_timeout_ms = 0
            [telemetry]
            queue_capacity = 0
            batch_max = 0
            [[telemetry.sinks]]
            name = "s"
            provider = "access-log"
            [[telemetry.sinks]]
            name = "s"
            provider = "access-log"
            [[listeners]]
            name = "a"
            address = "127.0.0.1:0"
            [[caches]]
            name = "c"
            provider = "cache-memory"
            timeout_ms = 0
            [[caches]]
            name = "c"
            provider = "cache-memory"
            config = { max_bytes = 1 }
            [[caches]]
            provider = "cache-memory"
            [config]
            type = "file"
            path = "api.json"
        "#;
        let report = parse(text).expect_err("invalid");
        let paths: Vec<&str> = report.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "upstream.callout_timeout_ms",
            "telemetry.queue_capacity",
            "telemetry.batch_max",
            "telemetry.sinks[1].name",
            "caches[0].timeout_ms",
            "caches[1].name",
            "caches[2]",
        ] {
            assert!(
                paths.iter().any(|p| p.starts_with(want)),
                "missing {want} in {report}"
            );
        }
        let ok = parse(
            r#"
            [[listeners]]
            name = "a"
            address = "127.0.0.1:0"
            [[caches]]
            name = "c"
            provider = "cache-memory"
            config = { max_bytes = 1048576 }
            [config]
            type = "file"
            path = "api.json"
        "#,
        )
        .expect("valid");
        assert_eq!(ok.caches[0].timeout_ms, 100);
        assert_eq!(ok.caches[0].config["max_bytes"], 1_048_576);
        assert_eq!(ok.telemetry.queue_capacity, 16_384);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let text = r#"
            [runtime]
            worker_threads = 0
            [log]
            format = "xml"
            [limits]
            max_header_bytes = 10
            colour = "blue"
            [[listeners]]
            name = "a"
            address = "not-an-address"
            [[listeners]]
            name = "b"
            address = "127.0.0.1:1"
            [listeners.tls]
            certificates = []
            [[listeners]]
            name = "b"
            address = "127.0.0.1:1"
            [bogus]
            x = 1
        "#;
        let report = parse(text).expect_err("invalid");
        let paths: Vec<&str> = report.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "bogus",
            "log.format",
            "limits.colour",
            "listeners[0].address",
            "listeners[1].tls.certificates",
            "listeners[2].name",
            "listeners[2].address",
            "config",
        ] {
            assert!(paths.contains(&want), "missing {want} in {report}");
        }
        assert!(report.to_string().starts_with("site.toml: "));
    }

    #[test]
    fn semantic_limits_are_checked() {
        let text = format!("{MINIMAL}\n[limits]\nmax_header_bytes = 10\nmax_body_bytes = 0\n[runtime]\nworker_threads = 0\n[upstream]\nconnect_timeout_ms = 0\n");
        let report = parse(&text).expect_err("invalid");
        let paths: Vec<&str> = report.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "limits.max_header_bytes",
                "limits.max_body_bytes",
                "upstream.connect_timeout_ms",
                "runtime.worker_threads"
            ]
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        let report = parse("[[listeners]\nname=").expect_err("invalid");
        assert_eq!(report.issues.len(), 1);
        assert!(report.issues[0].message.contains("not valid TOML"));
    }

    #[test]
    fn unknown_config_source_type_is_named() {
        let text = MINIMAL.replace("type = \"file\"", "type = \"ftp\"");
        let report = parse(&text).expect_err("invalid");
        assert_eq!(report.issues[0].path, "config.type");
        assert!(report.issues[0].message.contains("ftp"), "{report}");
    }

    #[test]
    fn hostname_patterns() {
        assert!(check_hostname_pattern("api.example.com").is_ok());
        assert!(check_hostname_pattern("*.example.com").is_ok());
        assert!(check_hostname_pattern("a.*.com").is_err());
        assert!(check_hostname_pattern("").is_err());
        assert!(check_hostname_pattern("bad_name.com").is_err());
    }

    #[test]
    fn log_levels_are_checked() {
        assert!("info".parse::<LevelCheck>().is_ok());
        assert!("outpost=debug,warn".parse::<LevelCheck>().is_ok());
        assert!("loud".parse::<LevelCheck>().is_err());
    }
}
