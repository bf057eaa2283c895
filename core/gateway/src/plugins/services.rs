//! What the gateway gives plugins: host services (logging, metrics, clock, identity) and the
//! work policies ask for (caches, counters, HTTP calls).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abi_stable::std_types::{ROption, RResult, RSlice, RStr};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use outpost_config::Manifest;
use outpost_plugin_api::{self as api, CacheBox, HostStatus, PluginError};

use super::policy::{Done, Work};
use super::PluginHost;
use crate::body::{RequestBody, Source};
use crate::metrics::{self, gateway::CACHE_ERRORS};
use crate::upstream::{ClientCache, UpstreamClient};

/// The largest response body an HTTP call hands back to a policy.
pub(crate) const MAX_CALLOUT_BODY: u64 = 4 * 1024 * 1024;

struct Identity {
    gateway_id: Arc<str>,
    instance_id: Arc<str>,
    started: Instant,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();

impl Identity {
    /// The instance id is the host name and a random suffix: unique per start.
    fn new(gateway_id: &str) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "outpost".into());
        Identity {
            gateway_id: gateway_id.into(),
            instance_id: format!("{host}-{:08x}", fastrand::u32(..)).into(),
            started: Instant::now(),
        }
    }
}

fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| Identity::new("outpost"))
}

/// Sets the gateway id plugins see (once, before the first plugin loads).
pub(super) fn set_gateway_id(id: &str) {
    let _ = IDENTITY.set(Identity::new(id));
}

/// The process's instance id.
pub fn instance_id() -> &'static str {
    &identity().instance_id
}

/// Host services for one library.
pub(crate) struct Host {
    plugin: String,
}

impl Host {
    pub(crate) fn new(plugin: &str) -> Self {
        Self {
            plugin: plugin.into(),
        }
    }
}

fn labels<'a>(values: RSlice<'a, RStr<'a>>, buf: &mut [&'a str; metrics::MAX_LABELS]) -> usize {
    let n = values.len().min(metrics::MAX_LABELS);
    for (b, v) in buf.iter_mut().zip(values.iter()) {
        *b = v.as_str();
    }
    n
}

impl api::HostServices for Host {
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

    fn define_metric(
        &self,
        name: RStr<'_>,
        help: RStr<'_>,
        kind: u8,
        labels: RSlice<'_, RStr<'_>>,
    ) -> u32 {
        if name.as_str().starts_with("outpost_") {
            tracing::warn!(plugin = %self.plugin, metric = %name, "A plugin's metric definition was refused: the outpost_ prefix is the gateway's.");
            return 0;
        }
        let names: Vec<&str> = labels.iter().map(|l| l.as_str()).collect();
        match metrics::global().define(name.as_str(), help.as_str(), kind, &names) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(plugin = %self.plugin, error = %e, "A plugin's metric definition was refused.");
                0
            }
        }
    }

    fn metric_add(&self, id: u32, label_values: RSlice<'_, RStr<'_>>, value: f64) {
        let mut buf = [""; metrics::MAX_LABELS];
        let n = labels(label_values, &mut buf);
        metrics::global().add(id, &buf[..n], value);
    }

    fn metric_set(&self, id: u32, label_values: RSlice<'_, RStr<'_>>, value: f64) {
        let mut buf = [""; metrics::MAX_LABELS];
        let n = labels(label_values, &mut buf);
        metrics::global().set(id, &buf[..n], value);
    }

    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn monotonic_ns(&self) -> u64 {
        identity().started.elapsed().as_nanos() as u64
    }

    fn gateway_id(&self) -> RStr<'_> {
        identity().gateway_id.as_ref().into()
    }

    fn instance_id(&self) -> RStr<'_> {
        identity().instance_id.as_ref().into()
    }
}

/// A cache instance from the manifest.
pub(super) struct CacheHandle {
    /// Its name.
    pub name: String,
    cache: CacheBox,
    timeout: Duration,
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHandle")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The services behind policies' host work.
pub struct Services {
    caches: Vec<CacheHandle>,
    callout: UpstreamClient,
    callout_timeout: Duration,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("caches", &self.caches)
            .finish_non_exhaustive()
    }
}

impl Services {
    /// Creates the manifest's caches from the loaded plugins. Reports every problem.
    pub fn new(
        manifest: &Manifest,
        plugins: &PluginHost,
        clients: &ClientCache,
    ) -> Result<Services, Vec<String>> {
        let mut problems = Vec::new();
        let mut caches = Vec::new();
        for (i, c) in manifest.caches.iter().enumerate() {
            match plugins.cache(&c.provider, &c.config) {
                Ok(cache) => caches.push(CacheHandle {
                    name: c.name.clone(),
                    cache,
                    timeout: Duration::from_millis(c.timeout_ms),
                }),
                Err(e) => problems.push(format!("caches[{i}] '{}': {e}", c.name)),
            }
        }
        let callout = clients
            .plain_client()
            .map_err(|e| vec![format!("HTTP calls from policies: {e}")])?;
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Services {
            caches,
            callout,
            callout_timeout: Duration::from_millis(manifest.upstream.callout_timeout_ms),
        })
    }

    /// The names of the caches, default first.
    pub fn cache_names(&self) -> impl Iterator<Item = &str> {
        self.caches.iter().map(|c| c.name.as_str())
    }

    fn cache(&self, name: &str) -> Option<&CacheHandle> {
        if name.is_empty() {
            self.caches.first()
        } else {
            self.caches.iter().find(|c| c.name == name)
        }
    }

    /// Does one piece of work (not body reads, which the proxy does). Never fails the request:
    /// failures are answers the policy reads.
    pub async fn perform(&self, work: Work) -> (u32, Done) {
        let token = work.token();
        let done = match work {
            Work::Body { .. } => Done::failed(HostStatus::ERROR, "not a service request"),
            Work::CacheGet { cache, key, .. } => {
                self.with_cache(
                    &cache,
                    "get",
                    |c| c.get(key.as_slice().into()),
                    |v| match v {
                        ROption::RSome(v) => Done::value(Bytes::from(v.into_vec())),
                        ROption::RNone => Done::status(HostStatus::MISS),
                    },
                )
                .await
            }
            Work::CacheSet {
                cache,
                key,
                value,
                ttl_ms,
                ..
            } => {
                self.with_cache(
                    &cache,
                    "set",
                    |c| c.set(key.as_slice().into(), value.as_slice().into(), ttl_ms),
                    |()| Done::status(HostStatus::OK),
                )
                .await
            }
            Work::CacheDelete { cache, key, .. } => {
                self.with_cache(
                    &cache,
                    "delete",
                    |c| c.delete(key.as_slice().into()),
                    |found| Done {
                        number: i64::from(found),
                        ..Done::status(HostStatus::OK)
                    },
                )
                .await
            }
            Work::CounterAdd {
                cache,
                key,
                delta,
                ttl_ms,
                ..
            } => {
                self.with_cache(
                    &cache,
                    "increment",
                    |c| c.increment(key.as_slice().into(), delta, ttl_ms),
                    |n| Done {
                        number: n,
                        ..Done::status(HostStatus::OK)
                    },
                )
                .await
            }
            Work::Http {
                method,
                url,
                headers,
                body,
                timeout_ms,
                ..
            } => {
                let deadline = if timeout_ms == 0 {
                    self.callout_timeout
                } else {
                    Duration::from_millis(timeout_ms)
                };
                match tokio::time::timeout(deadline, self.http(&method, &url, headers, body)).await
                {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => Done::failed(HostStatus::ERROR, e),
                    Err(_) => Done::failed(
                        HostStatus::TIMEOUT,
                        format!("no complete answer from {url} within {deadline:?}"),
                    ),
                }
            }
        };
        (token, done)
    }

    async fn with_cache<T, F>(
        &self,
        name: &str,
        op: &str,
        call: impl FnOnce(&CacheBox) -> F,
        ok: impl FnOnce(T) -> Done,
    ) -> Done
    where
        F: std::future::Future<Output = RResult<T, PluginError>>,
    {
        let Some(c) = self.cache(name) else {
            return Done::failed(
                HostStatus::NOT_CONFIGURED,
                if name.is_empty() {
                    "no cache is configured ([[caches]] in the manifest)".to_string()
                } else {
                    format!("no cache named '{name}'")
                },
            );
        };
        match tokio::time::timeout(c.timeout, call(&c.cache)).await {
            Ok(RResult::ROk(v)) => ok(v),
            Ok(RResult::RErr(e)) => {
                let (status, reason) = match e.kind {
                    api::ErrorKind::TIMEOUT => (HostStatus::TIMEOUT, "timeout"),
                    _ => (HostStatus::ERROR, "error"),
                };
                CACHE_ERRORS.inc(&[&c.name, reason]);
                tracing::debug!(cache = %c.name, op, error = %e.message, "Cache operation failed.");
                Done::failed(status, e.message.into_string())
            }
            Err(_) => {
                CACHE_ERRORS.inc(&[&c.name, "timeout"]);
                tracing::debug!(cache = %c.name, op, timeout = ?c.timeout, "Cache operation timed out.");
                Done::failed(
                    HostStatus::TIMEOUT,
                    format!("cache '{}' did not answer within {:?}", c.name, c.timeout),
                )
            }
        }
    }

    async fn http(
        &self,
        method: &str,
        url: &str,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    ) -> Result<Done, String> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("invalid method '{method}'"))?;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("invalid URL '{url}': {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!("'{url}' is not an absolute http(s) URL"));
        }
        let mut req = Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            let n = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("invalid header name '{n}'"))?;
            let v = HeaderValue::from_bytes(&v)
                .map_err(|_| format!("invalid value for header '{n}'"))?;
            req = req.header(n, v);
        }
        let req = req
            .body(RequestBody::new(
                Source::full(Bytes::from(body)),
                None,
                None,
            ))
            .map_err(|e| e.to_string())?;
        let resp = self.callout.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        })?;
        let (parts, body) = resp.into_parts();
        let limited = http_body_util::Limited::new(body, MAX_CALLOUT_BODY as usize);
        match limited.collect().await {
            Ok(c) => Ok(Done {
                http_status: parts.status.as_u16(),
                headers: parts.headers,
                ..Done::value(c.to_bytes())
            }),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(Done {
                http_status: parts.status.as_u16(),
                headers: parts.headers,
                error: format!("the response body is larger than {MAX_CALLOUT_BODY} bytes"),
                ..Done::status(HostStatus::TOO_LARGE)
            }),
            Err(e) => Err(format!("reading the response failed: {e}")),
        }
    }
}
