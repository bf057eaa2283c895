//! `cache-redis`: a cache in Redis, shared by every gateway that points at the same server.
//!
//! ```toml
//! [[caches]]
//! name = "shared"
//! provider = "cache-redis"
//! timeout_ms = 100
//! config = { url = "redis://redis.internal:6379/0", password = "…", key_prefix = "outpost:" }
//! ```
//!
//! * `get` is `GET`, `set` is `SET … PX <ttl>`, `delete` is `DEL`; every key is prefixed with
//!   `key_prefix`.
//! * `increment` is `INCRBY` in a `MULTI`/`EXEC` transaction after `SET <key> 0 NX PX <ttl>`:
//!   the TTL is set only when the counter is created (a fixed window, as rate limits need),
//!   and the whole is atomic, so replicas counting the same key never lose an increment.
//! * Commands go over `pool_size` multiplexed connections, picked round-robin. Each is a
//!   [`redis::aio::ConnectionManager`], opened on first use (a gateway starts while Redis is
//!   down) and re-opened after Redis restarts: a call on a dropped connection starts the
//!   reconnection and is sent once more on the new connection when that is safe (it was
//!   never sent, or it is `get`, `set` or `delete`).
//! * Each call is bounded by `command_timeout_ms` (connecting included); past it the answer is
//!   a timeout error. The gateway applies the manifest's `timeout_ms` on top, and counts
//!   every failure in `outpost_cache_errors_total{cache,reason}`; policies treat failures as
//!   misses (or fall back to local counting) unless told otherwise.
//! * Error messages never carry the URL or the password.
//!
//! I/O runs on the plugin's own runtime ([`outpost_plugin_sdk::runtime`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, runtime, Cache, Error, Reply};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult};

/// `cache-redis` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// `redis://host:port/db`, or `rediss://host:port/db` for TLS.
    pub url: String,
    /// AUTH user (Redis 6 ACLs); overrides the URL's.
    #[serde(default)]
    pub username: Option<String>,
    /// AUTH password; overrides the URL's.
    #[serde(default)]
    pub password: Option<String>,
    /// Prepended to every key.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Number of multiplexed connections, used round-robin.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Deadline for opening a connection (TCP, TLS, AUTH).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline for one call, waiting for a connection included.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// With `rediss://`: trust this CA (PEM file) instead of the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: present this client certificate (PEM file, with `tls_key_file`).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM file).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "outpost:".into()
}

fn default_pool_size() -> usize {
    4
}

fn default_connect_timeout_ms() -> u64 {
    1000
}

fn default_command_timeout_ms() -> u64 {
    500
}

/// The most connections `pool_size` may ask for.
pub const MAX_POOL_SIZE: usize = 64;

/// The cache.
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager_config: ConnectionManagerConfig,
    prefix: Box<[u8]>,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    command_timeout: Duration,
}

/// One multiplexed connection, opened on first use.
#[derive(Default)]
struct Slot {
    manager: arc_swap::ArcSwapOption<ConnectionManager>,
    /// Held while opening, so that one attempt at a time is made per slot.
    opening: tokio::sync::Mutex<()>,
}

/// What one call sends: a command or a transaction.
enum Query {
    Cmd(redis::Cmd),
    Pipe(redis::Pipeline),
}

impl Query {
    async fn run<T: FromRedisValue>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        match self {
            Query::Cmd(c) => c.query_async(conn).await,
            Query::Pipe(p) => p.query_async(conn).await,
        }
    }
}

fn error(e: &RedisError) -> Error {
    // RedisError's text is the server's answer or the I/O error: never the URL or password.
    if e.is_timeout() {
        Error::timeout(format!("redis: {e}"))
    } else {
        Error::unavailable(format!("redis: {e}"))
    }
}

impl Inner {
    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// The slot's connection, opening it when there is none.
    async fn manager(&self, slot: &Slot) -> RedisResult<ConnectionManager> {
        if let Some(m) = slot.manager.load().as_deref() {
            return Ok(m.clone());
        }
        let _opening = slot.opening.lock().await;
        if let Some(m) = slot.manager.load().as_deref() {
            return Ok(m.clone());
        }
        let m =
            ConnectionManager::new_with_config(self.client.clone(), self.manager_config.clone())
                .await?;
        slot.manager.store(Some(Arc::new(m.clone())));
        Ok(m)
    }

    /// Runs a query on the next connection within the command deadline. When the connection
    /// turned out to be dead the manager starts reconnecting, and the query is sent once more
    /// on the new connection if that is safe: always when it was never sent (the connection
    /// was refused), and for `idempotent` queries when the connection broke.
    async fn query<T: FromRedisValue>(&self, q: Query, idempotent: bool) -> Result<T, Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        let attempt = async {
            let mut conn = self.manager(slot).await?;
            match q.run(&mut conn).await {
                Err(e) if e.is_connection_refusal() || idempotent && e.is_unrecoverable_error() => {
                    q.run(&mut conn).await
                }
                r => r,
            }
        };
        match tokio::time::timeout(self.command_timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.kind() == redis::ErrorKind::AuthenticationFailed {
                    // A manager whose reconnection was refused stays refused: start afresh.
                    slot.manager.store(None);
                }
                Err(error(&e))
            }
            Err(_) => Err(Error::timeout(format!(
                "redis did not answer within {} ms",
                self.command_timeout.as_millis()
            ))),
        }
    }
}

impl RedisCache {
    fn spawn<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Reply<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, Error>> + Send + 'static,
    {
        runtime::spawn(f(self.inner.clone()))
    }
}

fn read(p: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{field}: cannot read {}: {e}", p.display()))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Cache for RedisCache {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        // Validate first: nothing here opens a connection.
        let tls = c.url.starts_with("rediss://");
        if !tls && !c.url.starts_with("redis://") {
            return Err("url: must start with redis:// or rediss://".into());
        }
        // The parser's message never repeats the URL (which may hold a password).
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
        if c.pool_size == 0 || c.pool_size > MAX_POOL_SIZE {
            return Err(format!("pool_size: must be between 1 and {MAX_POOL_SIZE}"));
        }
        if c.connect_timeout_ms == 0 {
            return Err("connect_timeout_ms: must be positive".into());
        }
        if c.command_timeout_ms == 0 {
            return Err("command_timeout_ms: must be positive".into());
        }
        let custom =
            c.tls_ca_file.is_some() || c.tls_cert_file.is_some() || c.tls_key_file.is_some();
        if custom && !tls {
            return Err("tls_ca_file, tls_cert_file, tls_key_file: need a rediss:// url".into());
        }
        let client = if custom {
            let client_tls = match (&c.tls_cert_file, &c.tls_key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert, "tls_cert_file")?,
                    client_key: read(key, "tls_key_file")?,
                }),
                (None, None) => None,
                _ => return Err("tls_cert_file and tls_key_file: give both or neither".into()),
            };
            let root_cert = c
                .tls_ca_file
                .as_deref()
                .map(|p| read(p, "tls_ca_file"))
                .transpose()?;
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(|e| format!("tls: {e}"))?
        } else {
            Client::open(info).map_err(|e| format!("url: {e}"))?
        };
        let connect_timeout = Duration::from_millis(c.connect_timeout_ms);
        let command_timeout = Duration::from_millis(c.command_timeout_ms);
        // One connection attempt per (re)connection, no backoff sleeps inside the manager:
        // the next call after a failed attempt starts another, so recovery after a Redis
        // restart takes one call, and every call is bounded by the command deadline anyway.
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(command_timeout);
        Ok(RedisCache {
            inner: Arc::new(Inner {
                client,
                manager_config,
                prefix: c.key_prefix.into_bytes().into_boxed_slice(),
                slots: (0..c.pool_size).map(|_| Slot::default()).collect(),
                next: AtomicUsize::new(0),
                command_timeout,
            }),
        })
    }

    fn get(&self, key: &[u8]) -> Reply<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.inner.key(key));
        self.spawn(|inner| async move { inner.query(Query::Cmd(cmd), true).await })
    }

    fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Reply<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.inner.key(key)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        self.spawn(|inner| async move { inner.query(Query::Cmd(cmd), true).await })
    }

    fn delete(&self, key: &[u8]) -> Reply<bool> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.inner.key(key));
        self.spawn(|inner| async move {
            let n: i64 = inner.query(Query::Cmd(cmd), true).await?;
            Ok(n > 0)
        })
    }

    fn increment(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> Reply<i64> {
        let key = self.inner.key(key);
        let query = match ttl {
            None => {
                let mut cmd = redis::cmd("INCRBY");
                cmd.arg(key).arg(delta);
                Query::Cmd(cmd)
            }
            Some(ttl) => {
                // Created at 0 with its TTL only when absent (NX), then counted; one
                // transaction, so no other client sees the counter without its TTL.
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("SET")
                    .arg(&key)
                    .arg(0)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .ignore()
                    .cmd("INCRBY")
                    .arg(key)
                    .arg(delta);
                Query::Pipe(pipe)
            }
        };
        // Not sent twice: an increment whose answer was lost may have been applied.
        self.spawn(|inner| async move {
            match query {
                Query::Cmd(_) => inner.query(query, false).await,
                Query::Pipe(_) => {
                    let (n,): (i64,) = inner.query(query, false).await?;
                    Ok(n)
                }
            }
        })
    }
}

export_plugin! {
    name: "cache-redis",
    version: env!("CARGO_PKG_VERSION"),
    caches: ["cache-redis" => RedisCache],
}

#[cfg(test)]
mod tests;
