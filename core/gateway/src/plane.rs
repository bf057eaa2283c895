//! The gateway's side of the management plane: fetch this gateway's snapshot (long-poll with
//! `If-None-Match`), verify it (digest, and the Ed25519 signature when a public key is
//! configured), build it and swap it in; on failure keep serving and retry with jittered
//! exponential backoff; report a heartbeat; renew the token before it expires.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use outpost_config::{ApiConfig, ConfigSource, Manifest, PlaneSource, Report};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::body::{RequestBody, Source};
use crate::plugins::PluginHost;
use crate::proxy::Shared;
use crate::snapshot::{sha256_hex, ConfigOrigin, Snapshot};
use crate::upstream::{ClientCache, UpstreamClient};

/// The public key a manifest configures for snapshot signatures.
pub fn public_key(manifest: &Manifest) -> Option<Vec<u8>> {
    let ConfigSource::Plane(p) = &manifest.config else {
        return None;
    };
    let hex = p.public_key.as_deref()?;
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What the plane signs for a gateway: its id, a newline, and the document. A snapshot signed
/// for one gateway does not verify for another.
pub fn signed_text(gateway: &str, config: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(gateway.len() + 1 + config.len());
    out.extend_from_slice(gateway.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(config);
    out
}

/// Checks an Ed25519 signature (hex) of `data`.
pub fn verify_signature(key: &[u8], data: &[u8], signature: Option<&str>) -> Result<(), String> {
    let Some(sig) = signature.filter(|s| !s.is_empty()) else {
        return Err(
            "the snapshot is not signed, and this gateway requires signed snapshots".into(),
        );
    };
    let bytes: Option<Vec<u8>> = (0..sig.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(sig.get(i..i + 2)?, 16).ok())
        .collect();
    let bytes = bytes.ok_or("the signature is not hex")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(data, &bytes)
        .map_err(|_| {
            "the snapshot's signature does not verify (tampered, or signed by another plane)"
                .to_string()
        })
}

/// What the gateway knows about its sync, for heartbeats.
#[derive(Debug, Default)]
pub struct SyncState {
    /// The last error (fetching, verifying or building), cleared by a successful apply.
    pub last_error: Mutex<Option<String>>,
}

/// A client of the plane.
pub struct PlaneClient {
    client: UpstreamClient,
    source: PlaneSource,
    gateway: String,
    token: ArcSwap<String>,
    key: Option<Vec<u8>>,
    /// Sync status.
    pub state: SyncState,
}

/// A verified snapshot.
pub struct Fetched {
    /// The document.
    pub config: String,
    /// Its signature.
    pub signature: Option<String>,
}

impl PlaneClient {
    /// A client for the manifest's plane source.
    pub fn new(
        manifest: &Manifest,
        source: &PlaneSource,
        clients: &ClientCache,
    ) -> Result<PlaneClient, String> {
        let token = match (&source.token, &source.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("config.token_file {}: {e}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err("config: token or token_file is required".into()),
        };
        let client = match &source.ca_file {
            Some(f) => {
                let pem = std::fs::read_to_string(f)
                    .map_err(|e| format!("config.ca_file {}: {e}", f.display()))?;
                clients.client_with_ca(pem)
            }
            None => clients.plain_client(),
        }
        .map_err(|e| e.to_string())?;
        Ok(PlaneClient {
            client,
            gateway: manifest.gateway.id.clone(),
            source: source.clone(),
            token: ArcSwap::from_pointee(token),
            key: public_key(manifest),
            state: SyncState::default(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.source.url.trim_end_matches('/'))
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
        etag: Option<&str>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::builder().method(method).uri(url).header(
            header::AUTHORIZATION,
            format!("Bearer {}", self.token.load()),
        );
        if let Some(e) = etag {
            if let Ok(v) = HeaderValue::from_str(&format!("\"{e}\"")) {
                req = req.header(header::IF_NONE_MATCH, v);
            }
        }
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        if !payload.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(RequestBody::new(Source::full(payload), None, None))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut m = format!("the plane at {} is unreachable: {e}", self.source.url);
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m = format!("{m}: {s}");
                    src = s.source();
                }
                m
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            format!(
                "the plane at {} did not answer within {timeout:?}",
                self.source.url
            )
        })?
    }

    /// Fetches the snapshot; `None` when it is still `etag` (after waiting up to `wait_s`).
    pub async fn fetch(&self, etag: Option<&str>, wait_s: u64) -> Result<Option<Fetched>, String> {
        let url = self.url(&format!("/gateway/v1/config?wait={wait_s}"));
        let (status, body) = self
            .call(
                Method::GET,
                &url,
                None,
                etag,
                Duration::from_secs(wait_s + 10),
            )
            .await?;
        match status {
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::OK => {
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|e| format!("the plane's answer is not JSON: {e}"))?;
                let config = v["config"]
                    .as_str()
                    .ok_or("the plane's answer has no config")?
                    .to_owned();
                let digest = sha256_hex(config.as_bytes());
                if v["digest"].as_str() != Some(digest.as_str()) {
                    return Err("the snapshot's digest does not match its content".into());
                }
                let signature = v["signature"].as_str().map(String::from);
                if let Some(key) = &self.key {
                    let signed = signed_text(&self.gateway, config.as_bytes());
                    verify_signature(key, &signed, signature.as_deref())?;
                }
                Ok(Some(Fetched { config, signature }))
            }
            s => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                Err(format!(
                    "the plane refused: {} {} ({})",
                    s.as_u16(),
                    v["error"].as_str().unwrap_or("error"),
                    v["message"].as_str().unwrap_or_default()
                ))
            }
        }
    }

    /// Builds a fetched snapshot (blocking work: call from a blocking thread).
    pub fn build(
        &self,
        f: &Fetched,
        clients: &ClientCache,
        plugins: &PluginHost,
    ) -> Result<Snapshot, Report> {
        build_fetched(&self.source.url, &self.gateway, f, clients, plugins)
    }

    /// After the plane refused the token: take a new one from `token_file` when it changed
    /// (an operator replaced it), so the gateway recovers without a restart.
    fn reread_token(&self) {
        let Some(f) = &self.source.token_file else {
            return;
        };
        if let Ok(t) = std::fs::read_to_string(f) {
            let t = t.trim();
            if !t.is_empty() && **self.token.load() != t {
                tracing::info!(path = %f.display(), "Using the new token from the token file.");
                self.token.store(Arc::new(t.to_owned()));
            }
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self
            .state
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
    }
}

fn build_fetched(
    url: &str,
    _gateway: &str,
    f: &Fetched,
    clients: &ClientCache,
    plugins: &PluginHost,
) -> Result<Snapshot, Report> {
    let origin = format!("plane {url}");
    let config = ApiConfig::parse(&f.config, &origin)?;
    let mut s = Snapshot::build(
        config,
        f.config.as_bytes(),
        ConfigOrigin::Plane(origin),
        clients,
        plugins,
    )?;
    s.signature = f.signature.clone();
    Ok(s)
}

/// At start: the plane's snapshot, trying until `start_wait_ms` has passed.
pub async fn initial(
    plane: &PlaneClient,
    clients: &Arc<ClientCache>,
    plugins: &Arc<PluginHost>,
) -> Result<Snapshot, Report> {
    let deadline = Instant::now() + Duration::from_millis(plane.source.start_wait_ms);
    let mut delay = Duration::from_millis(200);
    loop {
        let last = match plane.fetch(None, 0).await {
            Ok(Some(f)) => {
                let (url, c, p) = (plane.source.url.clone(), clients.clone(), plugins.clone());
                let gateway = plane.gateway.clone();
                return tokio::task::spawn_blocking(move || {
                    build_fetched(&url, &gateway, &f, &c, &p)
                })
                .await
                .unwrap_or_else(|e| {
                    let mut r = Report::new("plane");
                    r.push("", format!("building the configuration failed: {e}"));
                    Err(r)
                });
            }
            Ok(None) => "the plane answered 304 to an unconditional request".to_string(),
            Err(e) => e,
        };
        if Instant::now() + delay > deadline {
            let mut r = Report::new(format!("plane {}", plane.source.url));
            r.push("", last);
            return Err(r);
        }
        tracing::warn!(error = %last, "The management plane is not answering yet; retrying.");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Keeps the gateway's configuration in step with the plane.
pub async fn sync(
    plane: Arc<PlaneClient>,
    shared: Arc<Shared>,
    clients: Arc<ClientCache>,
    plugins: Arc<PluginHost>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut rejected: Option<String> = None;
    loop {
        // Serving a backup: ask for the plane's snapshot even when it is the same document, so
        // the gateway reports the live source again.
        let current = shared
            .snapshot
            .load()
            .as_ref()
            .filter(|s| matches!(s.origin, ConfigOrigin::Plane(_)))
            .map(|s| s.digest.clone());
        // After a rejected snapshot, wait for a newer one rather than fetching it again.
        let etag = rejected.clone().or(current);
        let wait = plane.source.long_poll_s;
        let fetched = tokio::select! {
            r = plane.fetch(etag.as_deref(), wait) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let pause = match fetched {
            Ok(None) => {
                failures = 0;
                if rejected.is_none() {
                    plane.set_error(None);
                }
                (wait == 0).then(|| Duration::from_millis(plane.source.poll_interval_ms))
            }
            Ok(Some(f)) => {
                failures = 0;
                let digest = sha256_hex(f.config.as_bytes());
                let (p, c, pl) = (plane.clone(), clients.clone(), plugins.clone());
                match tokio::task::spawn_blocking(move || p.build(&f, &c, &pl)).await {
                    Ok(Ok(s)) => {
                        tracing::info!(version = %s.version, digest = %s.digest, apis = s.apis.len(), "Configuration from the plane applied.");
                        rejected = None;
                        plane.set_error(None);
                        shared.apply(Arc::new(s));
                    }
                    Ok(Err(report)) => {
                        tracing::error!(report = %report, "Rejected the configuration from the plane; the previous one keeps serving.");
                        rejected = Some(digest);
                        crate::metrics::gateway::CONFIG_REJECTED.inc(&["plane"]);
                        plane.set_error(Some(format!("rejected snapshot: {report}")));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Building the configuration failed.");
                        rejected = Some(digest);
                        crate::metrics::gateway::CONFIG_REJECTED.inc(&["plane"]);
                        plane.set_error(Some(format!("building the configuration failed: {e}")));
                    }
                }
                (wait == 0).then(|| Duration::from_millis(plane.source.poll_interval_ms))
            }
            Err(e) => {
                failures += 1;
                if e.contains(" 401 ") {
                    plane.reread_token();
                }
                let backoff =
                    jitter(Duration::from_secs(1) * 2u32.saturating_pow(failures.min(7) - 1))
                        .min(Duration::from_secs(60));
                tracing::warn!(error = %e, retry_in = ?backoff, "Cannot sync with the management plane; the current configuration keeps serving.");
                plane.set_error(Some(e));
                crate::metrics::gateway::CONFIG_SYNC_ERRORS.inc(&[]);
                Some(backoff)
            }
        };
        if let Some(p) = pause {
            tokio::select! {
                _ = tokio::time::sleep(p) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reports to the plane every heartbeat interval, and renews the token once two thirds of its
/// life have passed.
pub async fn heartbeat(
    plane: Arc<PlaneClient>,
    shared: Arc<Shared>,
    gateway_id: String,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut token_since = now_s();
    let period = Duration::from_millis(plane.source.heartbeat_interval_ms);
    loop {
        let snapshot = shared.snapshot.load_full();
        let body = json!({
            "gateway_id": gateway_id,
            "instance_id": crate::plugins::instance_id(),
            "host": host,
            "outpost_version": env!("CARGO_PKG_VERSION"),
            "config_version": snapshot.as_ref().map(|s| s.version.clone()),
            "config_digest": snapshot.as_ref().map(|s| s.digest.clone()),
            "config_source": snapshot.as_ref().map(|s| s.origin.kind()),
            "last_error": plane.state.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "uptime_s": started.elapsed().as_secs(),
            "requests": shared.requests.load(Ordering::Relaxed),
        });
        let url = plane.url("/gateway/v1/heartbeat");
        let call = plane.call(
            Method::POST,
            &url,
            Some(body),
            None,
            Duration::from_secs(10),
        );
        let sent = tokio::select! {
            r = call => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match sent {
            Ok((StatusCode::OK, b)) => {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                if let Some(expires) = v["token_expires_at"].as_u64() {
                    let renew_at = token_since + (expires.saturating_sub(token_since)) * 2 / 3;
                    if now_s() >= renew_at {
                        match renew(&plane).await {
                            Ok(()) => token_since = now_s(),
                            Err(e) => {
                                tracing::warn!(error = %e, "Renewing the gateway token failed; will retry.")
                            }
                        }
                    }
                }
            }
            Ok((s, b)) => {
                tracing::warn!(status = s.as_u16(), answer = %String::from_utf8_lossy(&b), "The plane refused the heartbeat.")
            }
            Err(e) => tracing::debug!(error = %e, "Heartbeat not delivered."),
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Replaces the token file atomically: a private temporary file (mode 0600, unique name),
/// synced, renamed over the old one.
fn write_token(path: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!(
        "renewing-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let done = f
        .write_all(format!("{token}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

async fn renew(plane: &PlaneClient) -> Result<(), String> {
    let (status, body) = plane
        .call(
            Method::POST,
            &plane.url("/gateway/v1/token"),
            Some(json!({})),
            None,
            Duration::from_secs(10),
        )
        .await?;
    if status != StatusCode::CREATED {
        return Err(format!("the plane answered {}", status.as_u16()));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let token = v["token"]
        .as_str()
        .ok_or("no token in the answer")?
        .to_owned();
    if let Some(f) = plane.source.token_file.clone() {
        let t = token.clone();
        let written =
            tokio::task::spawn_blocking(move || write_token(&f, &t).map_err(|e| (f, e))).await;
        if let Ok(Err((f, e))) = written {
            tracing::warn!(path = %f.display(), error = %e, "The renewed token could not be written back; a restart will need a fresh one.");
        }
    }
    plane.token.store(Arc::new(token));
    tracing::info!(
        expires_at = v["expires_at"].as_u64(),
        "Gateway token renewed."
    );
    Ok(())
}
