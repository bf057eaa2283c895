//! Configuration backups: every configuration the gateway applies is saved to the manifest's
//! backup store (a plugin) as a new generation, off the request path and retried until it is
//! stored; at start, when the configuration source is unusable, the newest generation that
//! verifies is served instead.
//!
//! A generation is a JSON envelope: `format` (`outpost-backup/1`), `gateway`, `version`,
//! `digest` (SHA-256 of `config`), `saved_unix_ms`, and `config`, the document exactly as the
//! gateway received it. Loading checks the envelope and the digest; a generation that fails is
//! reported (log and `outpost_backup_corrupt_total`) and the next older one is tried.

use std::sync::Arc;
use std::time::Duration;

use abi_stable::std_types::RResult;
use outpost_config::Manifest;
use outpost_plugin_api::StoreBox;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::Counter;
use crate::plugins::PluginHost;
use crate::snapshot::{sha256_hex, Snapshot};

const FORMAT: &str = "outpost-backup/1";

/// The envelope of one generation.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// [`FORMAT`].
    pub format: String,
    /// The gateway that saved it.
    pub gateway: String,
    /// The configuration's version.
    pub version: String,
    /// SHA-256 (hex) of `config`.
    pub digest: String,
    /// When it was saved.
    pub saved_unix_ms: u64,
    /// The configuration document, exactly as applied.
    pub config: String,
    /// The plane's Ed25519 signature of `config` (hex), when it came signed.
    #[serde(default)]
    pub signature: Option<String>,
}

/// Why a generation could not be used.
enum Damage {
    /// Its content is wrong (counted in `outpost_backup_corrupt_total`).
    Corrupt(String),
    /// The store could not read it.
    Unreadable(String),
}

/// A generation that verified.
#[derive(Debug)]
pub struct Restored {
    /// Its number.
    pub generation: u64,
    /// Its envelope.
    pub envelope: Envelope,
}

/// The backup store of this gateway.
pub struct Backup {
    store: StoreBox,
    /// The store's provider name (for messages).
    pub name: String,
    /// The scope generations are kept under.
    pub scope: String,
    gateway: String,
    keep: u32,
    verify_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("store", &self.name)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

use crate::telemetry::unix_ms as now_ms;

fn corrupt_counter() -> Counter {
    Counter::define(
        "outpost_backup_corrupt_total",
        "Backup generations that failed verification when read.",
        &["store"],
    )
}

fn failed_counter() -> Counter {
    Counter::define(
        "outpost_backup_save_failures_total",
        "Attempts to save a backup generation that failed (each is retried).",
        &["store"],
    )
}

impl Backup {
    /// The manifest's `[backup]` store, created from the loaded plugins (`None` without one).
    pub fn from_manifest(
        manifest: &Manifest,
        plugins: &PluginHost,
    ) -> Result<Option<Backup>, String> {
        let Some(b) = &manifest.backup else {
            return Ok(None);
        };
        let _ = (corrupt_counter(), failed_counter());
        let store = plugins
            .store(&b.store, &b.config)
            .map_err(|e| format!("backup: {e}"))?;
        let scope = b
            .scope
            .clone()
            .unwrap_or_else(|| manifest.gateway.id.clone());
        // A scope the store cannot use is a configuration error, found now rather than at the
        // first save. (A store that is merely unreachable is not: the gateway starts anyway.)
        if let RResult::RErr(e) = store.list(scope.as_str().into()) {
            if e.kind == outpost_plugin_api::ErrorKind::CONFIG {
                return Err(format!("backup: scope '{scope}': {}", e.message));
            }
        }
        Ok(Some(Backup {
            store,
            name: b.store.clone(),
            scope,
            gateway: manifest.gateway.id.clone(),
            keep: b.generations,
            verify_key: crate::plane::public_key(manifest),
        }))
    }

    /// Saves a snapshot as a new generation and prunes old ones (blocking).
    pub fn save(&self, snapshot: &Snapshot) -> Result<u64, String> {
        let config = std::str::from_utf8(&snapshot.raw)
            .map_err(|_| "the configuration is not UTF-8".to_string())?
            .to_owned();
        let envelope = Envelope {
            format: FORMAT.into(),
            gateway: self.gateway.clone(),
            version: snapshot.version.clone(),
            digest: snapshot.digest.clone(),
            saved_unix_ms: now_ms(),
            config,
            signature: snapshot.signature.clone(),
        };
        let data = serde_json::to_vec(&envelope).map_err(|e| e.to_string())?;
        let newest = match self.store.list(self.scope.as_str().into()) {
            RResult::ROk(l) => l.first().map_or(0, |g| g.generation),
            RResult::RErr(e) => return Err(format!("listing generations: {}", e.message)),
        };
        // Generations are numbered by time, and always above the newest stored.
        let generation = now_ms().max(newest + 1);
        if let RResult::RErr(e) = self.store.save(
            self.scope.as_str().into(),
            generation,
            data.as_slice().into(),
        ) {
            return Err(e.message.into_string());
        }
        if let RResult::RErr(e) = self.store.prune(self.scope.as_str().into(), self.keep) {
            tracing::warn!(store = %self.name, error = %e.message, "Pruning old backup generations failed.");
        }
        Ok(generation)
    }

    /// The newest generation that verifies, skipping (and reporting) damaged ones (blocking).
    pub fn load_newest(&self) -> Result<Restored, String> {
        self.restore(|_| Ok(())).map(|(r, ())| r)
    }

    /// The newest generation that verifies and that `build` accepts, trying older ones after
    /// a damaged generation or one `build` refuses (blocking).
    pub fn restore<T>(
        &self,
        mut build: impl FnMut(&Restored) -> Result<T, String>,
    ) -> Result<(Restored, T), String> {
        let list = match self.store.list(self.scope.as_str().into()) {
            RResult::ROk(l) => l,
            RResult::RErr(e) => {
                return Err(format!(
                    "backup store '{}' cannot list generations: {}",
                    self.name, e.message
                ))
            }
        };
        if list.is_empty() {
            return Err(format!(
                "backup store '{}' has no generation for '{}'",
                self.name, self.scope
            ));
        }
        let mut problems = Vec::new();
        for g in list.iter() {
            match self.verify(g.generation) {
                Ok(envelope) => {
                    let restored = Restored {
                        generation: g.generation,
                        envelope,
                    };
                    match build(&restored) {
                        Ok(t) => return Ok((restored, t)),
                        Err(why) => {
                            tracing::error!(store = %self.name, generation = g.generation, error = %why, "Backup generation does not build with this gateway; trying an older one.");
                            problems.push(format!("generation {}: {why}", g.generation));
                        }
                    }
                }
                Err(Damage::Corrupt(why)) => {
                    corrupt_counter().inc(&[&self.name]);
                    tracing::error!(store = %self.name, scope = %self.scope, generation = g.generation, error = %why, "Backup generation is damaged; trying an older one.");
                    problems.push(format!("generation {}: {why}", g.generation));
                }
                Err(Damage::Unreadable(why)) => {
                    tracing::error!(store = %self.name, scope = %self.scope, generation = g.generation, error = %why, "Backup generation could not be read; trying an older one.");
                    problems.push(format!("generation {}: {why}", g.generation));
                }
            }
        }
        Err(format!(
            "backup store '{}' has no usable generation for '{}' ({})",
            self.name,
            self.scope,
            problems.join("; ")
        ))
    }

    fn verify(&self, generation: u64) -> Result<Envelope, Damage> {
        let data = match self.store.load(self.scope.as_str().into(), generation) {
            RResult::ROk(d) => d
                .into_option()
                .ok_or(Damage::Unreadable("it disappeared while reading".into()))?,
            RResult::RErr(e) if e.kind == outpost_plugin_api::ErrorKind::CORRUPT => {
                return Err(Damage::Corrupt(e.message.into_string()))
            }
            RResult::RErr(e) => return Err(Damage::Unreadable(e.message.into_string())),
        };
        let envelope: Envelope = serde_json::from_slice(&data)
            .map_err(|e| Damage::Corrupt(format!("not a backup envelope: {e}")))?;
        if envelope.format != FORMAT {
            return Err(Damage::Corrupt(format!(
                "unknown format '{}'",
                envelope.format
            )));
        }
        let digest = sha256_hex(envelope.config.as_bytes());
        if digest != envelope.digest {
            return Err(Damage::Corrupt(format!(
                "digest mismatch: the content hashes to {digest}, the envelope says {}",
                envelope.digest
            )));
        }
        if let Some(key) = &self.verify_key {
            let signed = crate::plane::signed_text(&self.gateway, envelope.config.as_bytes());
            crate::plane::verify_signature(key, &signed, envelope.signature.as_deref())
                .map_err(Damage::Corrupt)?;
        }
        Ok(envelope)
    }
}

/// Saves every configuration published on `latest`, retrying a failed save with backoff
/// (1 s doubling to 60 s) until it is stored or a newer configuration replaces it.
pub async fn saver(
    backup: Arc<Backup>,
    latest: watch::Receiver<Option<Arc<Snapshot>>>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = save_loop(backup, latest) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn save_loop(backup: Arc<Backup>, mut latest: watch::Receiver<Option<Arc<Snapshot>>>) {
    let mut saved_digest = String::new();
    loop {
        let snapshot = latest.borrow_and_update().clone();
        if let Some(s) = snapshot.filter(|s| s.digest != saved_digest && !s.origin.is_backup()) {
            let mut delay = Duration::from_secs(1);
            loop {
                let b = backup.clone();
                let s2 = s.clone();
                match tokio::task::spawn_blocking(move || b.save(&s2)).await {
                    Ok(Ok(generation)) => {
                        tracing::info!(store = %backup.name, generation, version = %s.version, "Configuration backed up.");
                        saved_digest = s.digest.clone();
                        break;
                    }
                    Ok(Err(e)) => {
                        failed_counter().inc(&[&backup.name]);
                        tracing::warn!(store = %backup.name, error = %e, retry_in = ?delay, "Backing up the configuration failed; will retry.");
                    }
                    Err(e) => {
                        failed_counter().inc(&[&backup.name]);
                        tracing::error!(error = %e, "The backup task failed.");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    changed = latest.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            continue;
        }
        if latest.changed().await.is_err() {
            return;
        }
    }
}
