//! The Outpost data plane: listeners (HTTP/1.1, HTTP/2, TLS with SNI and client
//! certificates), routing by host and path prefix, subscription keys, streamed proxying to
//! pooled backends, health endpoints, configuration hot reload and graceful shutdown.
//!
//! [`Gateway::start`] binds everything a manifest names and returns once the gateway serves;
//! [`Gateway::shutdown`] drains it.

pub mod backup;
pub mod body;
pub mod error;
pub mod headers;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod plane;
pub mod plugins;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outpost_config::{ConfigSource, Manifest, Report};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::listener::{Bound, Drain};
use crate::proxy::Shared;
use crate::upstream::ClientCache;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's TLS material is unusable.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// The API configuration is invalid.
    #[error("{0}")]
    Config(Report),
    /// Plugins could not be loaded.
    #[error("{}", .0.join("\n"))]
    Plugins(Vec<String>),
    /// The configuration source is unusable and no backup could stand in for it.
    #[error("{source}\nNo backup to start from: {backup}")]
    NoConfig {
        /// Why the configuration source is unusable.
        source: Report,
        /// Why the backup could not be used.
        backup: String,
    },
    /// A listener could not bind.
    #[error("listener '{listener}' cannot bind {address}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address from the manifest.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks everything `start` would load, without binding: every listener's TLS material and
/// the API configuration. Returns every problem found.
pub fn check(manifest: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    for l in &manifest.listeners {
        if let Some(t) = &l.tls {
            if let Err(e) = tls::server_config(&l.name, t, l.http2) {
                problems.push(e.to_string());
            }
        }
    }
    let plugins = match plugins::PluginHost::load(manifest) {
        Ok(p) => p,
        Err(e) => {
            problems.extend(e);
            // Policy steps can only be checked against the plugins that did load.
            plugins::PluginHost::default()
        }
    };
    let clients = ClientCache::new(manifest.upstream.clone());
    if let Err(e) = backup::Backup::from_manifest(manifest, &plugins) {
        problems.push(e);
    }
    if let Err(e) = plugins::Services::new(manifest, &plugins, &clients) {
        problems.extend(e);
    }
    for (i, s) in manifest.telemetry.sinks.iter().enumerate() {
        if let Err(e) = plugins.sink(&s.provider, &s.config) {
            problems.push(format!("telemetry.sinks[{i}] '{}': {e}", s.name));
        }
    }
    match &manifest.config {
        ConfigSource::File(f) => {
            if let Err(r) = reload::load_file(&f.path, &clients, &plugins) {
                problems.push(r.to_string());
            }
        }
        ConfigSource::Plane(p) => {
            // The plane itself is not contacted here: a check runs anywhere.
            if let Err(e) = plane::PlaneClient::new(manifest, p, &clients) {
                problems.push(e);
            }
        }
    }
    problems
}

/// Starts from the newest backup that verifies, because the configuration source could not be
/// used (`report` says why).
async fn from_backup(
    backup: &Arc<backup::Backup>,
    report: Report,
    clients: &Arc<ClientCache>,
    plugins: &Arc<plugins::PluginHost>,
) -> Result<snapshot::Snapshot, StartError> {
    tracing::error!(report = %report, store = %backup.name, "The configuration source is unusable; trying the backup.");
    let b = backup.clone();
    let (c, p) = (clients.clone(), plugins.clone());
    let built = tokio::task::spawn_blocking(move || {
        let (_, snapshot) = b.restore(|restored| {
            let config = outpost_config::ApiConfig::parse(&restored.envelope.config, "backup")
                .map_err(|r| r.to_string())?;
            let origin = snapshot::ConfigOrigin::Backup {
                store: b.name.clone(),
                generation: restored.generation,
                saved_unix_ms: restored.envelope.saved_unix_ms,
            };
            let mut s = snapshot::Snapshot::build(
                config,
                restored.envelope.config.as_bytes(),
                origin,
                &c,
                &p,
            )
            .map_err(|r| r.to_string())?;
            s.signature = restored.envelope.signature.clone();
            Ok(s)
        })?;
        Ok(snapshot)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match built {
        Ok(s) => {
            if let snapshot::ConfigOrigin::Backup {
                generation,
                saved_unix_ms,
                ..
            } = &s.origin
            {
                let age_s = telemetry::unix_ms().saturating_sub(*saved_unix_ms) / 1000;
                tracing::warn!(
                    source = "backup",
                    store = %backup.name,
                    generation,
                    version = %s.version,
                    digest = %s.digest,
                    age_s,
                    "Serving the configuration from the backup store."
                );
            }
            Ok(s)
        }
        Err(why) => Err(StartError::NoConfig {
            source: report,
            backup: why,
        }),
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    done_tx: mpsc::Sender<()>,
    done_rx: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    addresses: Vec<(Arc<str>, SocketAddr)>,
    shutdown: outpost_config::Shutdown,
}

impl Gateway {
    /// Loads TLS and the API configuration, binds every listener and starts serving.
    pub async fn start(manifest: &Manifest) -> Result<Gateway, StartError> {
        let mut tls_configs = Vec::new();
        for l in &manifest.listeners {
            tls_configs.push(match &l.tls {
                Some(t) => Some(tls::server_config(&l.name, t, l.http2)?),
                None => None,
            });
        }
        let plugins = Arc::new(plugins::PluginHost::load(manifest).map_err(StartError::Plugins)?);
        let clients = Arc::new(ClientCache::new(manifest.upstream.clone()));
        let reserved_headers = manifest
            .listeners
            .iter()
            .filter_map(|l| {
                l.tls
                    .as_ref()?
                    .client_auth
                    .as_ref()?
                    .forward_thumbprint_header
                    .as_deref()
            })
            .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        let services =
            plugins::Services::new(manifest, &plugins, &clients).map_err(StartError::Plugins)?;
        let telemetry = telemetry::Telemetry::new(&manifest.telemetry, &plugins)
            .map_err(StartError::Plugins)?;
        let shared = Arc::new(Shared::new(
            manifest.limits.clone(),
            manifest.upstream.clone(),
            manifest.log.access_log,
            reserved_headers,
            services,
            telemetry,
        ));
        let backup = backup::Backup::from_manifest(manifest, &plugins)
            .map_err(|e| StartError::Plugins(vec![e]))?
            .map(Arc::new);
        let (loaded, file_stamp, plane) = match &manifest.config {
            ConfigSource::File(source) => {
                let stamp = reload::stamp(&source.path);
                (
                    reload::load_file(&source.path, &clients, &plugins),
                    stamp,
                    None,
                )
            }
            ConfigSource::Plane(p) => {
                let client = plane::PlaneClient::new(manifest, p, &clients)
                    .map_err(|e| StartError::Plugins(vec![e]))?;
                let client = Arc::new(client);
                (
                    plane::initial(&client, &clients, &plugins).await,
                    None,
                    Some(client),
                )
            }
        };
        let snapshot = match loaded {
            Ok(s) => {
                tracing::info!(
                    version = %s.version,
                    digest = %s.digest,
                    apis = s.apis.len(),
                    source = s.origin.kind(),
                    "Configuration loaded."
                );
                s
            }
            Err(report) => match &backup {
                None => {
                    return Err(StartError::NoConfig {
                        source: report,
                        backup: "none is configured; add a [backup] store to the manifest so that this gateway can start from the last configuration it applied".into(),
                    })
                }
                Some(b) => from_backup(b, report, &clients, &plugins).await?,
            },
        };
        shared.apply(Arc::new(snapshot));

        // Installed before "Listening." so an early SIGHUP reloads instead of killing.
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGHUP; reload on signal is off.");
                None
            }
        };
        let mut bound = Vec::new();
        for (l, tls) in manifest.listeners.iter().zip(tls_configs) {
            let b = Bound::bind(l, tls, &manifest.limits).map_err(|source| StartError::Bind {
                listener: l.name.clone(),
                address: l.address,
                source,
            })?;
            bound.push(b);
        }
        // The sinks start last, with the configuration applied and the listeners bound, so
        // that their first snapshot shows the gateway as it serves; none has started when
        // anything before fails.
        if let Some(t) = &shared.telemetry {
            t.start().map_err(StartError::Plugins)?;
        }

        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        let mut tasks = Vec::new();
        let mut addresses = Vec::new();
        for b in bound {
            tracing::info!(
                listener = &**b.name(),
                address = %b.local,
                tls = manifest.listeners.iter().any(|l| *l.name == **b.name() && l.tls.is_some()),
                "Listening."
            );
            addresses.push((b.name().clone(), b.local));
            let drain = Drain {
                signal: stop_rx.clone(),
                done: done_tx.clone(),
            };
            tasks.push(tokio::spawn(b.serve(shared.clone(), drain)));
        }
        if let Some(b) = backup {
            tasks.push(tokio::spawn(backup::saver(
                b,
                shared.applied.subscribe(),
                stop_rx.clone(),
            )));
        }
        match (&manifest.config, plane) {
            (ConfigSource::Plane(_), Some(client)) => {
                tasks.push(tokio::spawn(plane::heartbeat(
                    client.clone(),
                    shared.clone(),
                    manifest.gateway.id.clone(),
                    stop_rx.clone(),
                )));
                tasks.push(tokio::spawn(plane::sync(
                    client,
                    shared.clone(),
                    clients,
                    plugins,
                    stop_rx,
                )));
            }
            (ConfigSource::File(source), _) => {
                tasks.push(tokio::spawn(reload::watch_file(
                    shared.clone(),
                    clients,
                    plugins,
                    source.clone(),
                    hangup,
                    file_stamp,
                    stop_rx,
                )));
            }
            (ConfigSource::Plane(_), None) => unreachable!("a plane source has a client"),
        }
        Ok(Gateway {
            shared,
            stop,
            done_tx,
            done_rx,
            tasks,
            addresses,
            shutdown: manifest.shutdown.clone(),
        })
    }

    /// The bound address of each listener.
    pub fn addresses(&self) -> &[(Arc<str>, SocketAddr)] {
        &self.addresses
    }

    /// Drains: readiness fails at once, new connections are still taken for `delay_ms` (so
    /// load balancers notice), then accepting stops and in-flight requests get up to
    /// `drain_timeout_ms` to finish. Returns whether every connection finished in time.
    pub async fn shutdown(self) -> bool {
        self.shared.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            delay_ms = self.shutdown.delay_ms,
            drain_timeout_ms = self.shutdown.drain_timeout_ms,
            "Draining."
        );
        if self.shutdown.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.shutdown.delay_ms)).await;
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Every connection and tunnel holds a sender; the channel closes when the last ends.
        drop(self.done_tx);
        let mut done_rx = self.done_rx;
        let drained = tokio::time::timeout(
            Duration::from_millis(self.shutdown.drain_timeout_ms),
            done_rx.recv(),
        )
        .await
        .is_ok();
        if drained {
            tracing::info!("All connections finished.");
        } else {
            tracing::warn!("Drain timeout reached; closing the remaining connections.");
        }
        if self.shared.telemetry.is_some() {
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(t) = &shared.telemetry {
                    t.shutdown();
                }
            })
            .await;
        }
        drained
    }
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed by this call, so
/// call it before announcing readiness: a signal that arrives early is then not fatal.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received."),
            _ = int.recv() => tracing::info!("SIGINT received."),
        }
    })
}
