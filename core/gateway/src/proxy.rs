//! The request path: health endpoints, limits, routing, subscription check, forwarding
//! (streamed, upgrades included) and mapping every failure to an answer.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderName, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outpost_config::{Limits, Upstream};

use crate::body::{Progress, RequestBody, RequestBodyError, ResponseBody};
use crate::error::ProxyError;
use crate::headers;
use crate::health;
use crate::router::match_operation;
use crate::snapshot::Snapshot;
use crate::tls::ClientCertificate;

/// State shared by every connection of the process.
#[derive(Debug)]
pub struct Shared {
    /// The configuration being served; `None` until the first one loads.
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Set when shutdown begins: readiness fails from then on.
    pub draining: AtomicBool,
    /// Request limits.
    pub limits: Limits,
    /// Backend timeouts.
    pub upstream: Upstream,
    /// Log one line per request.
    pub access_log: bool,
}

impl Shared {
    /// State for a process with these settings and no configuration yet.
    pub fn new(limits: Limits, upstream: Upstream, access_log: bool) -> Self {
        Self {
            snapshot: ArcSwapOption::empty(),
            draining: AtomicBool::new(false),
            limits,
            upstream,
            access_log,
        }
    }
}

/// What the gateway knows about one client connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// Listener name.
    pub listener: Arc<str>,
    /// The client's address.
    pub remote: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate, when the listener asks for one and the client sent it.
    pub client_cert: Option<ClientCertificate>,
    /// Header that carries the certificate thumbprint to backends.
    pub thumbprint_header: Option<HeaderName>,
}

/// Serves one request. Never fails: every error becomes an answer.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = tokio::time::Instant::now();
    let request_id = headers::request_id(req.headers());
    let method = req.method().clone();
    let version = req.version();
    let log_path = shared.access_log.then(|| req.uri().path().to_owned());
    let mut ids = RouteIds::default();

    let mut resp = match serve(&shared, &conn, req, &request_id, &mut ids).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.source() {
                crate::error::ErrorSource::Backend => tracing::warn!(
                    request_id = request_id.to_str().unwrap_or_default(),
                    api = ids.api.as_deref().unwrap_or_default(),
                    error = %e,
                    "Backend failure."
                ),
                _ => tracing::debug!(
                    request_id = request_id.to_str().unwrap_or_default(),
                    error = %e,
                    "Request refused."
                ),
            }
            e.to_response(&request_id)
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        *resp.version_mut() = version;
    }
    resp.headers_mut()
        .insert(&headers::X_REQUEST_ID, request_id.clone());
    if let Some(path) = log_path {
        tracing::info!(
            target: "outpost::access",
            listener = &*conn.listener,
            client = %conn.remote.ip(),
            method = %method,
            path = path,
            status = resp.status().as_u16(),
            duration_us = started.elapsed().as_micros() as u64,
            api = ids.api.as_deref().unwrap_or_default(),
            operation = ids.operation.as_deref().unwrap_or_default(),
            subscription = ids.subscription.as_deref().unwrap_or_default(),
            request_id = request_id.to_str().unwrap_or_default(),
            "Request."
        );
    }
    Ok(resp)
}

/// Ids of what a request matched, for logs.
#[derive(Default)]
struct RouteIds {
    api: Option<Arc<str>>,
    operation: Option<Arc<str>>,
    subscription: Option<Arc<str>>,
}

async fn serve(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    ids: &mut RouteIds,
) -> Result<Response<ResponseBody>, ProxyError> {
    if let Some(resp) = health::answer(shared, req.uri().path()) {
        return Ok(resp);
    }

    let limits = &shared.limits;
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if headers::head_size(req.headers(), uri_len) > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: limits.max_header_bytes,
        });
    }
    if let Some(limit) = limits.max_body_bytes {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }

    let snapshot = shared.snapshot.load_full().ok_or(ProxyError::NotReady)?;

    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    });
    let path = req.uri().path();
    let Some((api_idx, rest)) = snapshot.router.route(host, path) else {
        return Err(ProxyError::ApiNotFound {
            host: host.unwrap_or_default().to_owned(),
            path: path.to_owned(),
        });
    };
    let api = &snapshot.apis[api_idx];
    ids.api = Some(api.id.clone());
    let op_path = if rest.is_empty() { "/" } else { rest };
    let Some(op) = match_operation(&api.operations, req.method(), op_path) else {
        return Err(ProxyError::OperationNotFound {
            api: api.id.to_string(),
            method: req.method().to_string(),
            path: op_path.to_owned(),
        });
    };
    ids.operation = Some(op.id.clone());

    // Subscription: header first, then query parameter, as APIM.
    let mut strip_query_key = false;
    if api.subscription_required {
        let from_header = req
            .headers()
            .get(&api.key_header)
            .map(|v| v.to_str().map_err(|_| ProxyError::InvalidSubscriptionKey));
        let key = match from_header {
            Some(k) => Some(k?),
            None => {
                let k = req
                    .uri()
                    .query()
                    .and_then(|q| query_param(q, &api.key_query));
                strip_query_key = k.is_some();
                k
            }
        };
        let key = key.ok_or(ProxyError::MissingSubscriptionKey)?;
        let sub_idx = *snapshot
            .keys
            .get(key)
            .ok_or(ProxyError::InvalidSubscriptionKey)?;
        let sub = &snapshot.subscriptions[sub_idx];
        if sub.apis.as_ref().is_some_and(|a| !a.contains(&api_idx)) {
            return Err(ProxyError::InvalidSubscriptionKey);
        }
        if sub.suspended {
            return Err(ProxyError::SubscriptionSuspended);
        }
        ids.subscription = Some(sub.id.clone());
    }

    // The backend request.
    let backend = &api.backend;
    let target = backend.pick();
    let query = req.uri().query().map(|q| {
        if strip_query_key {
            without_param(q, &api.key_query)
        } else {
            q.to_owned()
        }
    });
    let mut pq = String::with_capacity(
        target.base_path.len() + rest.len() + 1 + query.as_ref().map_or(0, |q| q.len() + 1),
    );
    pq.push_str(&target.base_path);
    pq.push_str(rest);
    if pq.is_empty() {
        pq.push('/');
    }
    if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
        pq.push('?');
        pq.push_str(q);
    }
    let original_host = host.map(str::to_owned);
    let uri = Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(
            PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        )
        .build()
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;

    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    headers::remove_hop_by_hop(h, upgrade);
    if api.subscription_required {
        h.remove(&api.key_header);
    }
    if backend.preserve_host {
        if let Some(v) = original_host
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            h.insert(header::HOST, v);
        }
    } else {
        h.remove(header::HOST);
    }
    headers::add_forwarded(h, conn.remote.ip(), conn.tls, original_host.as_deref());
    h.insert(&headers::X_REQUEST_ID, request_id.clone());
    headers::propagate_traceparent(h);
    if let Some(name) = &conn.thumbprint_header {
        // Never trust a client-supplied thumbprint.
        h.remove(name);
        if let Some(cert) = &conn.client_cert {
            if let Ok(v) = HeaderValue::from_str(&cert.thumbprint_sha256) {
                h.insert(name.clone(), v);
            }
        }
    }

    let has_body = !http_body::Body::is_end_stream(&body);
    if has_body && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        // A body of unknown length (chunked, or HTTP/2 without a length). Say so explicitly:
        // on GET/HEAD the HTTP/1.1 client would otherwise assume there is none and drop it.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let progress = has_body.then(Progress::new);
    let body = RequestBody::new(body, shared.limits.max_body_bytes, progress.clone());
    let upstream_req = Request::from_parts(parts, body);

    let timeout = Duration::from_millis(shared.upstream.response_header_timeout_ms);
    let sent = backend.client.request(upstream_req);
    let result = match progress {
        None => tokio::time::timeout(timeout, sent).await.map_err(|_| ()),
        Some(progress) => {
            // The deadline moves while the upload moves.
            tokio::pin!(sent);
            loop {
                let deadline = progress.last() + timeout;
                tokio::select! {
                    r = &mut sent => break Ok(r),
                    _ = tokio::time::sleep_until(deadline) => {
                        if progress.last() + timeout <= tokio::time::Instant::now() {
                            break Err(());
                        }
                    }
                }
            }
        }
    };
    let mut resp = match result {
        Err(()) => {
            return Err(ProxyError::BackendTimeout {
                backend: backend.id.to_string(),
                phase: "response headers",
            })
        }
        Ok(Err(e)) => return Err(classify(&backend.id, &e)),
        Ok(Ok(resp)) => resp,
    };

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::remove_hop_by_hop(resp.headers_mut(), switching && upgrade);
    if switching {
        match client_upgrade {
            Some(client_upgrade) => {
                let backend_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_upgrade, backend_upgrade));
            }
            None => {
                return Err(ProxyError::BackendFailed {
                    backend: backend.id.to_string(),
                    reason: "switched protocols without an upgrade request".into(),
                })
            }
        }
    }
    Ok(resp.map(|inner| ResponseBody::Upstream { inner }))
}

/// Copies bytes both ways between an upgraded client and backend connection.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "Upgrade failed.");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(error = %e, "Upgraded connection ended with an error.");
    }
}

/// The raw value of query parameter `name` (first occurrence).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// `query` without any `name=…` pair.
fn without_param(query: &str, name: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split('&') {
        let k = pair.split_once('=').map_or(pair, |(k, _)| k);
        if k == name || pair.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(pair);
    }
    out
}

/// Maps a client error to the answer: body limit → 413, client went away → 400, connect
/// timeout → 504, connection refused → 502, anything else from the backend → 502.
fn classify(backend: &str, e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<RequestBodyError>() {
            return match b {
                RequestBodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                RequestBodyError::Client(e) => ProxyError::BadRequest(e.to_string()),
            };
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ProxyError::BackendTimeout {
                    backend: backend.to_owned(),
                    phase: "connect",
                };
            }
        }
        source = s.source();
    }
    let reason = error_chain(e);
    if e.is_connect() {
        ProxyError::BackendUnreachable {
            backend: backend.to_owned(),
            reason,
        }
    } else {
        ProxyError::BackendFailed {
            backend: backend.to_owned(),
            reason,
        }
    }
}

fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Whether the process is shutting down.
pub fn is_draining(shared: &Shared) -> bool {
    shared.draining.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_helpers() {
        assert_eq!(
            query_param("a=1&subscription-key=k&b", "subscription-key"),
            Some("k")
        );
        assert_eq!(query_param("a=1&b", "subscription-key"), None);
        assert_eq!(
            without_param("a=1&subscription-key=k&b", "subscription-key"),
            "a=1&b"
        );
        assert_eq!(without_param("subscription-key=k", "subscription-key"), "");
    }
}
