//! Standalone mode: the API configuration comes from a local file, checked for changes every
//! `watch_interval_ms` and on SIGHUP. A change is parsed, validated and compiled off the request
//! path, then swapped in whole; an invalid file is logged with every problem and the previous
//! configuration keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_config::{ApiConfig, FileSource, Report};
use tokio::sync::watch;

use crate::plugins::PluginHost;
use crate::proxy::Shared;
use crate::snapshot::{sha256_hex, ConfigOrigin, Snapshot};
use crate::upstream::ClientCache;

/// Reads, validates and compiles the configuration file.
pub fn load_file(
    path: &Path,
    clients: &ClientCache,
    plugins: &PluginHost,
) -> Result<Snapshot, Report> {
    let origin = path.display().to_string();
    let raw = std::fs::read(path).map_err(|e| {
        let mut r = Report::new(origin.clone());
        r.push("", format!("cannot read the file: {e}"));
        r
    })?;
    build(&raw, path, clients, plugins)
}

fn build(
    raw: &[u8],
    path: &Path,
    clients: &ClientCache,
    plugins: &PluginHost,
) -> Result<Snapshot, Report> {
    let origin = path.display().to_string();
    let text = std::str::from_utf8(raw).map_err(|e| {
        let mut r = Report::new(origin.clone());
        r.push("", format!("the file is not UTF-8: {e}"));
        r
    })?;
    let config = ApiConfig::parse(text, &origin)?;
    Snapshot::build(config, raw, ConfigOrigin::File(origin), clients, plugins)
}

/// File identity cheap to check every tick: modification time, length, inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<SystemTime>, u64, u64);

/// The file's stamp now. Taken *before* the first load, so a change made while the gateway
/// starts is seen by the first tick.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Stamp(m.modified().ok(), m.len(), ino))
}

/// Watches the file until `stop` turns true.
pub async fn watch_file(
    shared: Arc<Shared>,
    clients: Arc<ClientCache>,
    plugins: Arc<PluginHost>,
    source: FileSource,
    mut hangup: Option<tokio::signal::unix::Signal>,
    initial: Option<Stamp>,
    mut stop: watch::Receiver<bool>,
) {
    let path: PathBuf = source.path.clone();
    let mut last_stamp = initial;
    // Digest of the last content looked at, valid or not, so a bad file is reported once.
    // Serving a backup: the file, once readable and valid, is applied even when it is the same
    // document (it is the live source again).
    let mut last_digest = shared
        .snapshot
        .load()
        .as_ref()
        .filter(|s| matches!(s.origin, crate::snapshot::ConfigOrigin::File(_)))
        .map(|s| s.digest.clone())
        .unwrap_or_default();
    let period =
        (source.watch_interval_ms > 0).then(|| Duration::from_millis(source.watch_interval_ms));
    let mut ticker = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let forced = tokio::select! {
            _ = ticker.tick(), if period.is_some() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        let now_stamp = stamp(&path);
        if !forced && now_stamp == last_stamp {
            continue;
        }
        last_stamp = now_stamp;
        let path2 = path.clone();
        let clients2 = clients.clone();
        let plugins2 = plugins.clone();
        let last = last_digest.clone();
        // Reading and compiling may block (disk, large documents): keep it off the workers.
        let outcome = tokio::task::spawn_blocking(move || {
            let raw = match std::fs::read(&path2) {
                Ok(raw) => raw,
                Err(e) => return Outcome::Unreadable(e.to_string()),
            };
            let digest = sha256_hex(&raw);
            if digest == last && !forced {
                return Outcome::Unchanged;
            }
            match build(&raw, &path2, &clients2, &plugins2) {
                Ok(s) => Outcome::Loaded(Box::new(s)),
                Err(report) => Outcome::Invalid(digest, report),
            }
        })
        .await;
        match outcome {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Unreadable(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot read the configuration file; keeping the current configuration.");
            }
            Ok(Outcome::Invalid(digest, report)) => {
                last_digest = digest;
                crate::metrics::gateway::CONFIG_REJECTED.inc(&["file"]);
                tracing::error!(path = %path.display(), problems = report.issues.len(), report = %report, "Rejected the changed configuration; the previous one keeps serving.");
            }
            Ok(Outcome::Loaded(s)) => {
                last_digest = s.digest.clone();
                tracing::info!(version = %s.version, digest = %s.digest, apis = s.apis.len(), "Configuration reloaded.");
                shared.apply(Arc::new(*s));
            }
            Err(e) => tracing::error!(error = %e, "Configuration reload task failed."),
        }
    }
}

enum Outcome {
    Unchanged,
    Unreadable(String),
    Invalid(String, Report),
    Loaded(Box<Snapshot>),
}
