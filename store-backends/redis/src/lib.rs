//! `redis`: configuration backups in Redis.
//!
//! ```toml
//! [backup]
//! store = "redis"
//! config = { url = "redis://redis.internal:6379/0", password = "…", key_prefix = "outpost:backup:" }
//! ```
//!
//! Keys, per scope (gateway id) under `key_prefix`:
//!
//! * `<prefix><scope>:g:<generation>` — the generation's bytes;
//! * `<prefix><scope>:index` — a sorted set of generation numbers (score = generation);
//! * `<prefix><scope>:meta` — a hash, generation → `"<saved unix ms> <size>"`.
//!
//! A save writes all three in one `MULTI`/`EXEC` transaction, and a prune removes them the same
//! way: other gateways never see a generation listed without its data. Connection settings:
//! `url` (`redis://`, or `rediss://` for TLS: the system's roots, or `tls_ca_file`; a client
//! certificate with `tls_cert_file` and `tls_key_file`), `username` and `password` (AUTH; or in
//! the URL), `connect_timeout_ms` and `io_timeout_ms` (default 2000 each). The connection is kept and
//! re-opened after an error, so a Redis restart costs the calls made while it is down (they
//! fail with an `unavailable` error the gateway reports and retries).

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Error, Store, StoredGeneration};
use redis::{Client, Commands, Connection, IntoConnectionInfo, RedisError};

/// `redis` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// `redis://host:port/db` or `rediss://…`.
    pub url: String,
    /// AUTH user (Redis 6 ACLs).
    #[serde(default)]
    pub username: Option<String>,
    /// AUTH password.
    #[serde(default)]
    pub password: Option<String>,
    /// Prepended to every key.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Connect deadline.
    #[serde(default = "default_timeout")]
    pub connect_timeout_ms: u64,
    /// Read and write deadline of each command.
    #[serde(default = "default_timeout")]
    pub io_timeout_ms: u64,
    /// With `rediss://`: trust this CA (PEM file) instead of the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// With `rediss://`: present this client certificate (PEM file, with `tls_key_file`).
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM file).
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
}

fn default_prefix() -> String {
    "outpost:backup:".into()
}

fn default_timeout() -> u64 {
    2000
}

/// The store.
pub struct RedisStore {
    client: Client,
    prefix: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    conn: Mutex<Option<Connection>>,
}

fn error(e: RedisError) -> Error {
    if e.is_timeout() {
        Error::timeout(format!("redis: {e}"))
    } else {
        Error::unavailable(format!("redis: {e}"))
    }
}

impl RedisStore {
    fn key(&self, scope: &str, what: &str) -> String {
        format!("{}{scope}:{what}", self.prefix)
    }

    /// Runs `f` on the kept connection, opening one when there is none. When a kept
    /// connection turns out to be dead (Redis restarted since), `f` runs once more on a new
    /// one: every command here can be repeated safely. A failure of the connection itself
    /// (I/O, timeout, refused) drops it so the next call reconnects; a command error (such as
    /// a refused AUTH) keeps it.
    fn with<T>(&self, f: impl Fn(&mut Connection) -> redis::RedisResult<T>) -> Result<T, Error> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let reused = slot.is_some();
        match self.run(&mut slot, &f) {
            Err(e) if reused && broken(&e) => self.run(&mut slot, &f).map_err(error),
            r => r.map_err(error),
        }
    }

    fn run<T>(
        &self,
        slot: &mut Option<Connection>,
        f: &impl Fn(&mut Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        if slot.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(self.connect_timeout)?;
            c.set_read_timeout(Some(self.io_timeout))?;
            c.set_write_timeout(Some(self.io_timeout))?;
            *slot = Some(c);
        }
        let r = f(slot.as_mut().expect("connected above"));
        if r.as_ref().is_err_and(broken) {
            *slot = None;
        }
        r
    }
}

fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

impl Store for RedisStore {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let mut info = c
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("url: {e}"))?;
        if let Some(u) = c.username {
            info.redis.username = Some(u);
        }
        if let Some(p) = c.password {
            info.redis.password = Some(p);
        }
        if c.connect_timeout_ms == 0 || c.io_timeout_ms == 0 {
            return Err("connect_timeout_ms and io_timeout_ms must be positive".into());
        }
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let tls = c.url.starts_with("rediss://");
        let custom =
            c.tls_ca_file.is_some() || c.tls_cert_file.is_some() || c.tls_key_file.is_some();
        if custom && !tls {
            return Err("tls_* settings need a rediss:// url".into());
        }
        let client = if custom {
            let client_tls = match (&c.tls_cert_file, &c.tls_key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                (None, None) => None,
                _ => return Err("tls_cert_file and tls_key_file go together".into()),
            };
            let root_cert = c.tls_ca_file.as_deref().map(read).transpose()?;
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| format!("url: {e}"))?;
        // No connection yet: a gateway whose Redis is down at start still starts (and reports
        // the failed saves); the first call connects.
        Ok(RedisStore {
            client,
            prefix: c.key_prefix,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            io_timeout: Duration::from_millis(c.io_timeout_ms),
            conn: Mutex::new(None),
        })
    }

    fn save(&self, scope: &str, generation: u64, data: &[u8]) -> Result<(), Error> {
        let saved = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (data_key, index, meta) = (
            self.key(scope, &format!("g:{generation}")),
            self.key(scope, "index"),
            self.key(scope, "meta"),
        );
        self.with(|c| {
            redis::pipe()
                .atomic()
                .set(&data_key, data)
                .ignore()
                .zadd(&index, generation, generation as f64)
                .ignore()
                .hset(&meta, generation, format!("{saved} {}", data.len()))
                .ignore()
                .query::<()>(c)
        })
    }

    fn load(&self, scope: &str, generation: u64) -> Result<Option<Vec<u8>>, Error> {
        let key = self.key(scope, &format!("g:{generation}"));
        self.with(|c| c.get::<_, Option<Vec<u8>>>(&key))
    }

    fn list(&self, scope: &str) -> Result<Vec<StoredGeneration>, Error> {
        let (index, meta) = (self.key(scope, "index"), self.key(scope, "meta"));
        let (generations, metas): (Vec<u64>, Vec<Option<String>>) = self.with(|c| {
            let generations: Vec<u64> = c.zrevrange(&index, 0, -1)?;
            if generations.is_empty() {
                return Ok((generations, Vec::new()));
            }
            let metas: Vec<Option<String>> =
                redis::cmd("HMGET").arg(&meta).arg(&generations).query(c)?;
            Ok((generations, metas))
        })?;
        Ok(generations
            .into_iter()
            .zip(metas.into_iter().chain(std::iter::repeat(None)))
            .map(|(generation, m)| {
                let mut parts = m.as_deref().unwrap_or_default().split(' ');
                let mut num = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                let saved_unix_ms = num();
                let size = num();
                StoredGeneration {
                    generation,
                    saved_unix_ms,
                    size,
                }
            })
            .collect())
    }

    fn prune(&self, scope: &str, keep: u32) -> Result<u32, Error> {
        let (index, meta) = (self.key(scope, "index"), self.key(scope, "meta"));
        let old: Vec<u64> = self.with(|c| c.zrevrange(&index, keep as isize, -1))?;
        if old.is_empty() {
            return Ok(0);
        }
        let data_keys: Vec<String> = old
            .iter()
            .map(|g| self.key(scope, &format!("g:{g}")))
            .collect();
        self.with(|c| {
            redis::pipe()
                .atomic()
                .del(&data_keys)
                .ignore()
                .zrem(&index, &old)
                .ignore()
                .hdel(&meta, &old)
                .ignore()
                .query::<()>(c)
        })?;
        Ok(old.len() as u32)
    }
}

export_plugin! {
    name: "store-redis",
    version: env!("CARGO_PKG_VERSION"),
    stores: ["redis" => RedisStore],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_refused() {
        use outpost_plugin_sdk::testing::store;
        assert!(store::<RedisStore>(r#"{"url": "http://x"}"#).is_err());
        assert!(store::<RedisStore>(r#"{"url": "redis://x", "io_timeout_ms": 0}"#).is_err());
        assert!(store::<RedisStore>(r#"{"host": "x"}"#).is_err());
        // Valid, and no connection is made until the first call.
        assert!(store::<RedisStore>(r#"{"url": "redis://127.0.0.1:1/0"}"#).is_ok());
    }
}
