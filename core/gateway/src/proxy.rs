//! The request path: health endpoints, limits, routing, subscription check, forwarding
//! (streamed, upgrades included) and mapping every failure to an answer.

use std::borrow::Cow;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderName, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outpost_config::{Limits, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::{
    buffer, BodyState, BufferError, Buffered, Progress, RequestBody, RequestBodyError,
    ResponseBody, Source,
};
use crate::error::ProxyError;
use crate::headers;
use crate::health;
use crate::listener::Drain;
use crate::plugins::{
    Done, EndHooks, Hook, HostContext, LocalResponse, Msg, Pipeline, PolicyInstance, Services,
    StepResult, Work,
};
use crate::router::match_operation;
use crate::snapshot::{ApiRoute, Snapshot};
use crate::telemetry::{Record, Telemetry, Text};
use crate::tls::ClientCertificate;
use crate::upstream::{BackendRoute, Target};
use outpost_plugin_api::{phase, HostStatus};

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
    /// Headers only the gateway may set (client-certificate thumbprints of any listener):
    /// removed from every request before forwarding.
    pub reserved_headers: Vec<HeaderName>,
    /// Caches and HTTP calls for policies.
    pub services: Services,
    /// Telemetry sinks (`None`: requests build no record).
    pub telemetry: Option<Telemetry>,
    /// Every configuration applied, for whoever follows them (the backup saver).
    pub applied: tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    /// Requests served since start (heartbeats report it).
    pub requests: std::sync::atomic::AtomicU64,
    /// Requests whose response head is not sent yet, and when the configuration served was
    /// made (Unix ms): read when metrics are taken, not on the request path.
    pub gauges: Arc<Gauges>,
}

/// Values the metric gauges are computed from when a snapshot is taken.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests in flight.
    pub in_flight: std::sync::atomic::AtomicI64,
    /// When the configuration served was applied, or saved for a backup (Unix ms; 0: none).
    pub config_since_ms: std::sync::atomic::AtomicU64,
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a Gauges);

impl<'a> InFlight<'a> {
    fn enter(g: &'a Gauges) -> Self {
        g.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// State for a process with these settings and no configuration yet.
    pub fn new(
        limits: Limits,
        upstream: Upstream,
        access_log: bool,
        reserved_headers: Vec<HeaderName>,
        services: Services,
        telemetry: Option<Telemetry>,
    ) -> Self {
        Self {
            snapshot: ArcSwapOption::empty(),
            draining: AtomicBool::new(false),
            limits,
            upstream,
            access_log,
            reserved_headers,
            services,
            telemetry,
            applied: tokio::sync::watch::Sender::new(None),
            requests: std::sync::atomic::AtomicU64::new(0),
            gauges: {
                let gauges = Arc::new(Gauges::default());
                let g = Arc::downgrade(&gauges);
                crate::metrics::global().observe(move |r| {
                    let Some(g) = g.upgrade() else { return };
                    use crate::metrics::gateway::{CONFIG_AGE, IN_FLIGHT};
                    r.set(*IN_FLIGHT, &[], g.in_flight.load(Ordering::Relaxed) as f64);
                    let since = g.config_since_ms.load(Ordering::Relaxed);
                    if since > 0 {
                        let now = crate::telemetry::unix_ms();
                        r.set(*CONFIG_AGE, &[], now.saturating_sub(since) as f64 / 1000.0);
                    }
                });
                gauges
            },
        }
    }

    /// Serves `snapshot` from now on, and tells the followers.
    pub fn apply(&self, snapshot: Arc<Snapshot>) {
        let from_backup = if snapshot.origin.is_backup() {
            1.0
        } else {
            0.0
        };
        let registry = crate::metrics::global();
        registry.set(
            *crate::metrics::gateway::CONFIG_FROM_BACKUP,
            &[],
            from_backup,
        );
        let info = *crate::metrics::gateway::CONFIG_INFO;
        registry.clear(info);
        registry.set(info, &[&snapshot.version, snapshot.origin.kind()], 1.0);
        let since = match &snapshot.origin {
            crate::snapshot::ConfigOrigin::Backup { saved_unix_ms, .. } => *saved_unix_ms,
            _ => crate::telemetry::unix_ms(),
        };
        self.gauges.config_since_ms.store(since, Ordering::Relaxed);
        self.snapshot.store(Some(snapshot.clone()));
        self.applied.send_replace(Some(snapshot));
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
    /// Header and value that carry the certificate thumbprint to backends.
    pub thumbprint: Option<(HeaderName, HeaderValue)>,
    /// The forwarding headers' share of this connection, formatted once.
    pub forwarded: headers::ForwardedFor,
    /// Set once the connection has sent a request.
    pub served: AtomicBool,
    /// The shutdown signal, for tunnels that outlive their request.
    pub drain: Drain,
}

impl ConnInfo {
    /// Describes a new connection.
    pub fn new(
        listener: Arc<str>,
        remote: SocketAddr,
        tls: bool,
        client_cert: Option<ClientCertificate>,
        thumbprint_header: Option<&HeaderName>,
        drain: Drain,
    ) -> Self {
        let thumbprint = match (thumbprint_header, &client_cert) {
            (Some(name), Some(cert)) => HeaderValue::from_str(&cert.thumbprint_sha256)
                .ok()
                .map(|v| (name.clone(), v)),
            _ => None,
        };
        Self {
            listener,
            remote,
            tls,
            client_cert,
            thumbprint,
            forwarded: headers::ForwardedFor::new(remote.ip(), tls),
            served: AtomicBool::new(false),
            drain,
        }
    }
}

/// Serves one request. Never fails: every error becomes an answer.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    conn.served.store(true, Ordering::Relaxed);
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&shared.gauges);
    let started = tokio::time::Instant::now();
    let request_id = headers::request_id(req.headers());
    let method = req.method().clone();
    let version = req.version();
    let log_path = shared.access_log.then(|| req.uri().path().to_owned());
    let mut ids = RouteIds::default();
    let mut record = shared
        .telemetry
        .as_ref()
        .map(|t| begin_record(t, &conn, &req, &request_id, started.into_std()));

    // The record is built where the sinks will read it and filled in place.
    let mut resp = match serve(
        &shared,
        &conn,
        req,
        &request_id,
        &mut ids,
        record.as_deref_mut(),
    )
    .await
    {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(r) = record.as_deref_mut() {
                r.error_source = e.source().as_str();
                r.error_reason = e.code();
                r.set(Text::ErrorMessage, &e.to_string());
            }
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
    // Replacements first (each removes what the backend sent), then additions.
    for (name, _, _) in ids.response_headers.iter().filter(|h| h.2) {
        resp.headers_mut().remove(name);
    }
    for (name, value, _) in ids.response_headers.drain(..) {
        resp.headers_mut().append(name, value);
    }
    if !ids.end.steps.is_empty() {
        ids.end.status = resp.status().as_u16();
        ids.end.bytes = http_body::Body::size_hint(resp.body()).exact();
    }
    resp.headers_mut()
        .insert(&headers::X_REQUEST_ID, request_id.clone());
    if let (Some(t), Some(mut r)) = (shared.telemetry.as_ref(), record) {
        r.status = resp.status().as_u16();
        r.total_us = started.elapsed().as_micros() as u64;
        r.bytes_out = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        t.offer(r);
    }
    if let Some(path) = log_path {
        tracing::info!(
            target: "outpost::access",
            listener = &*conn.listener,
            client = %conn.remote.ip().to_canonical(),
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

/// A request's telemetry record, with what is known when it arrives.
fn begin_record(
    telemetry: &Telemetry,
    conn: &ConnInfo,
    req: &Request<Incoming>,
    request_id: &HeaderValue,
    at: std::time::Instant,
) -> Box<Record> {
    // One pass over the headers (a request has few) instead of a hashed lookup for each.
    let (mut user_agent, mut host) = (None, None);
    for (name, value) in req.headers() {
        if name == header::USER_AGENT {
            user_agent.get_or_insert(value);
        } else if name == header::HOST {
            host.get_or_insert(value);
        }
    }
    telemetry.record(crate::telemetry::Arrival {
        at,
        request_id,
        client_ip: conn.forwarded.ip_value(),
        host: match req.uri().authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => host.map(HeaderValue::as_bytes),
        },
        path: req.uri().path(),
        user_agent,
        listener: &conn.listener,
        method: req.method(),
        // hyper has parsed `content-length` already (and refused a malformed one).
        bytes_in: http_body::Body::size_hint(req.body()).exact().unwrap_or(0),
    })
}

/// Ids of what a request matched, for logs.
#[derive(Default)]
struct RouteIds {
    api: Option<Arc<str>>,
    operation: Option<Arc<str>>,
    subscription: Option<Arc<str>>,
    /// Headers policies set for the client's response (`outpost.response-header.*`
    /// replaces, `outpost.response-header-add.*` appends).
    response_headers: Vec<(HeaderName, HeaderValue, bool)>,
    /// Steps to call when the request has ended (`outpost.notify-end`).
    end: EndHooks,
}

async fn serve(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    ids: &mut RouteIds,
    mut record: Option<&mut Record>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if let Some(resp) = health::answer(shared, req.uri().path()) {
        return Ok(resp);
    }
    if req.method() == Method::CONNECT || !req.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest(
            "CONNECT and asterisk-form requests are not proxied".into(),
        ));
    }
    if let Some(why) = unsafe_path(req.uri().path()) {
        return Err(ProxyError::BadRequest(why.into()));
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

    // The Host as a header value: for HTTP/1.1 a cheap reference-counted copy of what the
    // client sent, reused for routing, forwarding headers and `preserve_host`.
    let host_value = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    };
    let host = host_value.as_ref().and_then(|v| v.to_str().ok());
    let path = req.uri().path();
    let Some((api_idx, rest)) = snapshot.router.route(host, path) else {
        return Err(ProxyError::ApiNotFound {
            host: host.unwrap_or_default().to_owned(),
            path: path.to_owned(),
        });
    };
    // The part of the path after the API's prefix (a suffix of the path).
    let rest_start = path.len() - rest.len();
    let api = &snapshot.apis[api_idx];
    ids.api = Some(api.id.clone());
    // What the request matched goes into its record as soon as it is known, while the record
    // is in this core's cache: by the time the backend has answered, the requests served
    // meanwhile (and their bodies) have usually pushed it out.
    if let Some(r) = record.as_deref_mut() {
        r.set(Text::ApiId, &api.id);
    }
    // A CORS preflight runs the global and API inbound policies first, without operation or
    // subscription key (browsers send neither); a policy that answers it ends the request.
    if let Some(pre) = api.preflight.as_deref() {
        if is_preflight(&req) {
            // On a copy of the head: when no step answers, the request goes on as it came,
            // without what the preflight run changed.
            let (mut copy, ()) = Request::new(()).into_parts();
            copy.method = req.method().clone();
            copy.uri = req.uri().clone();
            copy.version = req.version();
            copy.headers = req.headers().clone();
            if let Some(resp) =
                preflight(shared, conn, pre, api, &mut copy, request_id, ids).await?
            {
                return Ok(resp);
            }
        }
    }
    let path = req.uri().path();
    let rest = &path[rest_start..];
    let op_path = if rest.is_empty() { "/" } else { rest };
    let Some(op) = match_operation(&api.operations, req.method(), op_path) else {
        return Err(ProxyError::OperationNotFound {
            api: api.id.to_string(),
            method: req.method().to_string(),
            path: op_path.to_owned(),
        });
    };
    ids.operation = Some(op.id.clone());
    if let Some(r) = record.as_deref_mut() {
        r.set(Text::OperationId, &op.id);
        r.set(Text::Route, &op.route);
    }

    // Subscription: header first, then query parameter, as APIM. Either way the key is
    // removed from what the backend sees.
    let query_key = api.subscription_required
        && req
            .uri()
            .query()
            .is_some_and(|q| query_param(q, &api.key_query).is_some());
    let mut product: Option<&(usize, Arc<str>)> = None;
    if api.subscription_required {
        let key = match req.headers().get(&api.key_header) {
            Some(v) => Some(v.to_str().map_err(|_| ProxyError::InvalidSubscriptionKey)?),
            None => req
                .uri()
                .query()
                .and_then(|q| query_param(q, &api.key_query)),
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
        if let Some(r) = record.as_deref_mut() {
            r.set(Text::SubscriptionId, &sub.id);
        }
        product = sub.product.as_ref();
    }
    let pipeline = op.pipeline(product.map(|(i, _)| *i));
    if let Some(r) = record.as_deref_mut() {
        if let Some((_, id)) = product {
            r.set(Text::ProductId, id);
        }
        r.set(Text::BackendId, &api.backend.id);
    }

    // The backend request.
    let query: Option<Cow<'_, str>> = req.uri().query().map(|q| {
        if query_key {
            Cow::Owned(without_param(q, &api.key_query))
        } else {
            Cow::Borrowed(q)
        }
    });
    let query = query.map(Cow::into_owned);
    let downstream_version = req.version();
    let upgrade = downstream_version == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let mut source = Source::from(body);

    // Policies: inbound and backend sections see the client's request and may change it or
    // answer it; the context (variables, last error) carries on to outbound and on-error.
    // Only requests that run policies pay for the context.
    let sub_id = pipeline.and(ids.subscription.clone());
    let mut ctx = pipeline.map(|_| HostContext {
        api_id: &api.id,
        operation_id: &op.id,
        operation_template: &op.route,
        backend_id: &api.backend.id,
        product_id: product.map_or("", |(_, id)| &**id),
        subscription_id: sub_id.as_deref().unwrap_or_default(),
        client_ip: conn.forwarded.ip(),
        request_id: request_id.to_str().unwrap_or_default(),
        client_cert: conn.client_cert.as_ref().map(|c| c.der_base64.as_str()),
        ..HostContext::default()
    });
    let result = async {
        if let (Some(p), Some(ctx)) = (pipeline, ctx.as_mut()) {
            let mut msg = Msg::Request(&mut parts);
            for (section, steps) in [(phase::INBOUND, &p.inbound), (phase::BACKEND, &p.backend)] {
                ctx.phase = section;
                let run = run_section(shared, steps, p, Hook::Request, &mut msg, ctx, &mut source);
                let answered = run.await;
                if let (Some(r), Some(c)) = (record.as_deref_mut(), &ctx.cache_status) {
                    r.set(Text::Cache, c);
                }
                if let Some(resp) = answered? {
                    return Ok(resp);
                }
            }
            if ctx.body_replaced {
                source = Source::full(ctx.body.take().unwrap_or_default());
            }
            if ctx.body.is_some() || ctx.body_replaced {
                fix_length(&mut parts.headers, &source);
            }
        }
        // Where the request goes: the API's backend, or the one a policy chose.
        let mut backend = &api.backend;
        let mut chosen: Option<Target> = None;
        if let Some(c) = ctx.as_ref() {
            if let Some(url) = &c.props.backend_url {
                chosen =
                    Some(Target::parse(url).map_err(|e| {
                        ProxyError::PolicyFailed(format!("outpost.backend-url: {e}"))
                    })?);
            } else if let Some(id) = &c.props.backend {
                backend = snapshot.backends.get(id.as_str()).ok_or_else(|| {
                    ProxyError::PolicyFailed(format!("outpost.backend: no backend '{id}'"))
                })?;
                if let Some(r) = record.as_deref_mut() {
                    r.set(Text::BackendId, &backend.id);
                }
            }
        }
        let target = chosen.as_ref().unwrap_or_else(|| backend.pick());
        let retry = match ctx.as_ref().and_then(|c| c.props.retry.as_deref()) {
            Some(rule) => Some(
                serde_json::from_str::<RetryRule>(rule)
                    .map_err(|e| ProxyError::PolicyFailed(format!("outpost.retry: {e}")))?,
            ),
            None => None,
        };
        let mut rewrite = parts.extensions.remove::<crate::plugins::BackendRewrite>();
        // A policy's query never carries the subscription key on to the backend either.
        if let Some(q) = rewrite.as_mut().and_then(|rw| rw.query.as_mut()) {
            if api.subscription_required && query_param(q, &api.key_query).is_some() {
                *q = without_param(q, &api.key_query);
            }
        }
        let rest = &parts.uri.path()[rest_start..];
        let (rest, query) = match &rewrite {
            Some(rw) => (
                rw.path.as_deref().unwrap_or(rest),
                rw.query.as_deref().or(query.as_deref()),
            ),
            None => (rest, query.as_deref()),
        };
        let mut pq = String::with_capacity(
            target.base_path.len() + rest.len() + 1 + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&target.base_path);
        pq.push_str(rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        // A target's own pool sends the origin form as it is; the generic client wants the
        // absolute form, to find its connection.
        let uri = match target.pool {
            Some(_) => Uri::from(pq),
            None => Uri::builder()
                .scheme(target.scheme.clone())
                .authority(target.authority.clone())
                .path_and_query(pq)
                .build()
                .map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        };
        if let Some(r) = record.as_deref_mut() {
            r.set_backend_url(
                target.scheme.as_str(),
                target.authority.as_str(),
                uri.path(),
            );
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let h = &mut parts.headers;
        headers::remove_hop_by_hop(h, upgrade);
        if api.subscription_required {
            h.remove(&api.key_header);
        }
        if backend.preserve_host {
            if let Some(v) = &host_value {
                h.insert(header::HOST, v.clone());
            }
        } else {
            h.remove(header::HOST);
        }
        if downstream_version == Version::HTTP_2 {
            join_cookies(h);
        }
        headers::add_forwarded(h, &conn.forwarded, host);
        h.insert(&headers::X_REQUEST_ID, request_id.clone());
        let hop = headers::propagate_traceparent(h);
        if let Some(r) = record.as_deref_mut() {
            r.trace_id = Some(hop.trace_id);
            r.span_id = Some(hop.span_id);
            // The client's span is the parent only when the gateway continues its trace.
            r.parent_span_id = hop.parent_id;
        }
        // Never trust a client-supplied thumbprint, whichever listener it came through.
        for name in &shared.reserved_headers {
            h.remove(name);
        }
        if let Some((name, value)) = &conn.thumbprint {
            h.insert(name.clone(), value.clone());
        }

        let has_body = !http_body::Body::is_end_stream(&source);
        if has_body && !h.contains_key(header::CONTENT_LENGTH) {
            // A body of unknown length (chunked, or HTTP/2 without a length). Say so explicitly:
            // on GET/HEAD the HTTP/1.1 client would otherwise assume there is none and drop it.
            h.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let head_request = parts.method == Method::HEAD;
        let backend_started = record.is_some().then(tokio::time::Instant::now);
        let resp = match retry.and_then(|rule| Some((rule, source.replayable()?))) {
            Some((rule, body)) => {
                send_with_retries(shared, backend, target, parts, body, &rule).await?
            }
            None => {
                let progress = has_body.then(Progress::new);
                let body = RequestBody::new(source, shared.limits.max_body_bytes, progress.clone());
                send(
                    shared,
                    backend,
                    target,
                    Request::from_parts(parts, body),
                    progress.as_deref(),
                )
                .await?
            }
        };
        if let (Some(r), Some(t)) = (record.as_deref_mut(), backend_started) {
            r.backend_us = t.elapsed().as_micros() as u64;
            r.backend_status = resp.status().as_u16();
        }

        let idle = Duration::from_millis(shared.upstream.body_idle_timeout_ms);
        let mut resp = resp.map(Source::from);
        if let (Some(p), Some(ctx)) = (pipeline, ctx.as_mut()) {
            if !p.outbound.is_empty() || !ctx.props.on_response.is_empty() {
                let (mut rparts, mut source) = resp.into_parts();
                ctx.phase = phase::OUTBOUND;
                ctx.body = None;
                ctx.body_replaced = false;
                let mut msg = Msg::Response(&mut rparts);
                // Inbound steps that asked for the response, then the outbound section.
                let early = std::mem::take(&mut ctx.props.on_response);
                let mut answered = Ok(None);
                for steps in [&early, &p.outbound] {
                    answered =
                        run_section(shared, steps, p, Hook::Response, &mut msg, ctx, &mut source)
                            .await;
                    if !matches!(answered, Ok(None)) {
                        break;
                    }
                }
                if let (Some(r), Some(c)) = (record, &ctx.cache_status) {
                    r.set(Text::Cache, c);
                }
                if let Some(local) = answered? {
                    return Ok(local);
                }
                if ctx.body_replaced {
                    source = Source::full(ctx.body.take().unwrap_or_default());
                }
                let bodyless =
                    head_request || matches!(rparts.status.as_u16(), 100..=199 | 204 | 304);
                if (ctx.body.is_some() || ctx.body_replaced) && !bodyless {
                    fix_length(&mut rparts.headers, &source);
                }
                resp = Response::from_parts(rparts, source);
            }
        }
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if resp.headers().contains_key(header::TRANSFER_ENCODING) {
            // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; never pass on both.
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(resp.headers_mut(), switching && upgrade);
        if switching {
            match client_upgrade {
                Some(client_upgrade) => {
                    let backend_upgrade = hyper::upgrade::on(&mut resp);
                    let idle = Duration::from_millis(shared.upstream.tunnel_idle_timeout_ms);
                    tokio::spawn(tunnel(
                        client_upgrade,
                        backend_upgrade,
                        idle,
                        conn.drain.clone(),
                    ));
                }
                None => {
                    return Err(ProxyError::BackendFailed {
                        backend: backend.id.to_string(),
                        reason: "switched protocols without an upgrade request".into(),
                    })
                }
            }
        }
        Ok(resp.map(|inner| ResponseBody::upstream(inner, idle)))
    }
    .await;
    if let Some(c) = ctx.as_mut() {
        ids.response_headers = std::mem::take(&mut c.props.response_headers);
        ids.end = std::mem::take(&mut c.props.on_end);
    }
    result
}

/// Sends the backend request once, within the response-header deadline (which moves while a
/// streamed upload moves).
async fn send(
    shared: &Shared,
    backend: &BackendRoute,
    target: &Target,
    req: Request<RequestBody>,
    progress: Option<&Progress>,
) -> Result<Response<Incoming>, ProxyError> {
    let timeout = Duration::from_millis(shared.upstream.response_header_timeout_ms);
    let sent = async {
        match &target.pool {
            Some(pool) => pool.send(req).await.map_err(SendError::Pool),
            None => backend.client.request(req).await.map_err(SendError::Client),
        }
    };
    let result = match progress {
        None => tokio::time::timeout(timeout, sent).await.map_err(|_| ()),
        Some(progress) => {
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
    // What happened to the request body decides who is to blame, whatever the client says.
    let body_state = progress.map(|p| p.state());
    match result {
        Err(()) if body_state == Some(BodyState::Streaming) => Err(ProxyError::RequestTimeout),
        Err(()) => Err(ProxyError::BackendTimeout {
            backend: backend.id.to_string(),
            phase: "response headers",
        }),
        Ok(Err(e)) => Err(match (body_state, shared.limits.max_body_bytes) {
            (Some(BodyState::TooLarge), Some(limit)) => ProxyError::BodyTooLarge { limit },
            (Some(BodyState::ClientFailed), _) => {
                ProxyError::BadRequest("the request body could not be read".into())
            }
            _ => classify(&backend.id, &e),
        }),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// The `outpost.retry` property: when the gateway sends a backend request again.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRule {
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    interval_ms: u64,
    #[serde(default = "thirty_seconds")]
    max_interval_ms: u64,
    #[serde(default)]
    exponential: bool,
    #[serde(default)]
    jitter: bool,
    /// Inclusive status ranges.
    #[serde(default)]
    statuses: Vec<(u16, u16)>,
    #[serde(default = "yes")]
    on_connect_failure: bool,
    /// The first retry goes at once; later ones wait as above (APIM's `first-fast-retry`).
    #[serde(default)]
    first_fast_retry: bool,
}

fn one() -> u32 {
    1
}
fn thirty_seconds() -> u64 {
    30_000
}
fn yes() -> bool {
    true
}

impl RetryRule {
    /// Whether to send again after this answer. A failure after the request may have reached
    /// the backend (reset, no answer in time) is retried only for idempotent methods: a POST
    /// is sent again only when it never left (refused, or no connection in time).
    fn again(&self, method: &Method, answer: &Result<Response<Incoming>, ProxyError>) -> bool {
        match answer {
            Ok(r) => {
                let s = r.status().as_u16();
                self.statuses.iter().any(|&(lo, hi)| (lo..=hi).contains(&s))
            }
            Err(e) => {
                let idempotent = matches!(
                    *method,
                    Method::GET
                        | Method::HEAD
                        | Method::OPTIONS
                        | Method::TRACE
                        | Method::PUT
                        | Method::DELETE
                );
                self.on_connect_failure
                    && match e {
                        ProxyError::BackendUnreachable { .. }
                        | ProxyError::BackendTimeout {
                            phase: "connect", ..
                        } => true,
                        ProxyError::BackendTimeout { .. } | ProxyError::BackendFailed { .. } => {
                            idempotent
                        }
                        _ => false,
                    }
            }
        }
    }
}

/// Sends a request whose body is known whole, again while the retry rule says so.
async fn send_with_retries(
    shared: &Shared,
    backend: &BackendRoute,
    target: &Target,
    parts: http::request::Parts,
    body: bytes::Bytes,
    rule: &RetryRule,
) -> Result<Response<Incoming>, ProxyError> {
    let mut wait = rule.interval_ms.min(rule.max_interval_ms);
    let mut attempt = 0;
    loop {
        let mut req = Request::new(RequestBody::new(
            Source::full(body.clone()),
            shared.limits.max_body_bytes,
            None,
        ));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let answer = send(shared, backend, target, req, None).await;
        if attempt >= rule.count || !rule.again(&parts.method, &answer) {
            return answer;
        }
        attempt += 1;
        drop(answer);
        if attempt == 1 && rule.first_fast_retry {
            continue;
        }
        let pause = if rule.jitter {
            fastrand::u64(wait / 2..=wait)
        } else {
            wait
        };
        tracing::debug!(backend = %backend.id, attempt, wait_ms = pause, "Retrying the backend request.");
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if rule.exponential {
            wait = wait.saturating_mul(2).min(rule.max_interval_ms).max(1);
        }
    }
}

/// A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`.
fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Runs the API's preflight policies; their answer, if one answered.
async fn preflight(
    shared: &Shared,
    conn: &ConnInfo,
    pipeline: &Pipeline,
    api: &ApiRoute,
    parts: &mut http::request::Parts,
    request_id: &HeaderValue,
    ids: &mut RouteIds,
) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    let mut ctx = HostContext {
        api_id: &api.id,
        backend_id: &api.backend.id,
        client_ip: conn.forwarded.ip(),
        request_id: request_id.to_str().unwrap_or_default(),
        client_cert: conn.client_cert.as_ref().map(|c| c.der_base64.as_str()),
        phase: phase::INBOUND,
        ..HostContext::default()
    };
    let mut source = Source::full(bytes::Bytes::new());
    let mut msg = Msg::Request(parts);
    let answered = run_section(
        shared,
        &pipeline.inbound,
        pipeline,
        Hook::Request,
        &mut msg,
        &mut ctx,
        &mut source,
    )
    .await?;
    if answered.is_some() {
        ids.response_headers = std::mem::take(&mut ctx.props.response_headers);
        ids.end = std::mem::take(&mut ctx.props.on_end);
    }
    Ok(answered)
}

/// How many times one step may pause before it is failed (a policy that never stops asking).
const MAX_PAUSES: usize = 16;

/// Runs a section's steps in order; on an error, the on-error section on the same head.
/// Returns the response a policy answered with, if any.
async fn run_section(
    shared: &Shared,
    steps: &[Arc<PolicyInstance>],
    pipeline: &Pipeline,
    hook: Hook,
    msg: &mut Msg<'_>,
    ctx: &mut HostContext<'_>,
    source: &mut Source,
) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    for step in steps {
        match run_step(shared, step, hook, msg, ctx, source).await? {
            StepResult::Continue => {}
            StepResult::Respond => return Ok(ctx.response.take().map(local_response)),
            StepResult::Failed => return Err(ProxyError::PolicyFailed(ctx.error.clone())),
            StepResult::Error | StepResult::Paused => {
                ctx.phase = phase::ON_ERROR;
                for handler in &pipeline.on_error {
                    if run_step(shared, handler, hook, msg, ctx, source).await?
                        != StepResult::Continue
                    {
                        break;
                    }
                }
                return match ctx.response.take() {
                    Some(r) => Ok(Some(local_response(r))),
                    None => Err(ProxyError::PolicyFailed(ctx.error.clone())),
                };
            }
        }
    }
    Ok(None)
}

/// Runs one step: the hook, then as long as it pauses, the work it asked for and its resume
/// hook.
async fn run_step(
    shared: &Shared,
    step: &Arc<PolicyInstance>,
    hook: Hook,
    msg: &mut Msg<'_>,
    ctx: &mut HostContext<'_>,
    source: &mut Source,
) -> Result<StepResult, ProxyError> {
    let mut result = step.call(hook, msg, ctx);
    ctx.props.register(step, ctx.slot);
    let mut pauses = 0;
    while result == StepResult::Paused {
        pauses += 1;
        if pauses > MAX_PAUSES {
            ctx.work.clear();
            ctx.error = format!("policy '{}' paused more than {MAX_PAUSES} times", step.name);
            return Ok(StepResult::Error);
        }
        for work in std::mem::take(&mut ctx.work) {
            let (token, done) = match work {
                Work::Body { token, limit } => {
                    let request = matches!(msg, Msg::Request(_));
                    (token, read_body(shared, source, limit, request, ctx).await?)
                }
                other => shared.services.perform(other).await,
            };
            ctx.answer(token, done);
        }
        result = step.call(Hook::Resume, msg, ctx);
        ctx.props.register(step, ctx.slot);
    }
    Ok(result)
}

/// Buffers the current message's body for a policy, up to its limit (and never past the
/// gateway's own body limit for requests).
async fn read_body(
    shared: &Shared,
    source: &mut Source,
    limit: u64,
    request: bool,
    ctx: &mut HostContext<'_>,
) -> Result<Done, ProxyError> {
    let gateway_limit = if request {
        shared.limits.max_body_bytes.unwrap_or(u64::MAX)
    } else {
        u64::MAX
    };
    // Already read (or replaced) by an earlier step: that is the body, never the source again.
    if let Some(body) = &ctx.body {
        return Ok(if body.len() as u64 > limit {
            Done::failed(
                HostStatus::TOO_LARGE,
                format!("the body is larger than {limit} bytes"),
            )
        } else {
            Done::status(HostStatus::OK)
        });
    }
    let idle = Duration::from_millis(shared.upstream.body_idle_timeout_ms);
    match buffer(source, limit.min(gateway_limit), idle).await {
        Ok(Buffered::Complete(data)) => {
            ctx.body = Some(data);
            Ok(Done::status(HostStatus::OK))
        }
        Ok(Buffered::TooLarge) if limit > gateway_limit => Err(ProxyError::BodyTooLarge {
            limit: gateway_limit,
        }),
        Ok(Buffered::TooLarge) => Ok(Done::failed(
            HostStatus::TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )),
        Err(BufferError::Idle(_)) if request => Err(ProxyError::RequestTimeout),
        Err(e) if request => Err(ProxyError::BadRequest(format!(
            "the request body could not be read: {e}"
        ))),
        Err(e) => Err(ProxyError::BackendFailed {
            backend: ctx.backend_id.to_owned(),
            reason: format!("the response body could not be read: {e}"),
        }),
    }
}

/// After a policy read or replaced a body: say its exact length.
fn fix_length(h: &mut http::HeaderMap, source: &Source) {
    if let Some(n) = http_body::Body::size_hint(source).exact() {
        h.remove(header::TRANSFER_ENCODING);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// A policy's response as an HTTP response.
fn local_response(r: LocalResponse) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(r.body));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *resp.headers_mut() = r.headers;
    resp
}

/// Why a request path is refused, if it is: dot segments (plain or percent-encoded) and
/// encoded slashes or backslashes could take the backend outside the API's prefix after the
/// gateway routed and authorised the request on the raw path.
pub(crate) fn unsafe_path(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return None;
    }
    if bytes.contains(&b'\\') {
        return Some("backslashes are not allowed in the path");
    }
    for segment in path.split('/') {
        let mut dots = 0;
        let mut rest = segment.as_bytes();
        let mut only_dots = true;
        while !rest.is_empty() {
            if rest[0] == b'.' {
                dots += 1;
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && matches!(rest[2], b'e' | b'E')
            {
                dots += 1;
                rest = &rest[3..];
            } else {
                only_dots = false;
                break;
            }
        }
        if only_dots && (dots == 1 || dots == 2) {
            return Some("dot segments are not allowed in the path");
        }
        let lower = segment.as_bytes().windows(3).any(|w| {
            w[0] == b'%'
                && (w[1] == b'2' && matches!(w[2], b'f' | b'F')
                    || w[1] == b'5' && matches!(w[2], b'c' | b'C'))
        });
        if lower {
            return Some("encoded slashes are not allowed in the path");
        }
    }
    None
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1 backend must get one
/// (RFC 9113 §8.2.3).
fn join_cookies(h: &mut http::HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        h.insert(header::COOKIE, v);
    }
}

/// Copies bytes both ways between an upgraded client and backend connection, closing both
/// when neither side has sent anything for `idle`, or when the gateway drains.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    idle: Duration,
    mut drain: Drain,
) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "Upgrade failed.");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    let (mut cr, mut cw) = tokio::io::split(&mut client);
    let (mut br, mut bw) = tokio::io::split(&mut backend);
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    let (mut up_open, mut down_open) = (true, true);
    while up_open || down_open {
        tokio::select! {
            r = cr.read(&mut up), if up_open => match r {
                Ok(0) | Err(_) => { up_open = false; let _ = bw.shutdown().await; }
                Ok(n) => if bw.write_all(&up[..n]).await.is_err() { break },
            },
            r = br.read(&mut down), if down_open => match r {
                Ok(0) | Err(_) => { down_open = false; let _ = cw.shutdown().await; }
                Ok(n) => if cw.write_all(&down[..n]).await.is_err() { break },
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(idle_ms = idle.as_millis() as u64, "Closing an idle upgraded connection.");
                break;
            }
            _ = drain.started() => break,
        }
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

/// A failed exchange, from a target's own pool or from the generic client.
#[derive(Debug)]
enum SendError {
    Pool(crate::pool::PoolError),
    Client(hyper_util::client::legacy::Error),
}

impl SendError {
    fn is_connect(&self) -> bool {
        match self {
            SendError::Pool(e) => matches!(e, crate::pool::PoolError::Connect(_)),
            SendError::Client(e) => e.is_connect(),
        }
    }

    fn error(&self) -> &(dyn StdError + 'static) {
        match self {
            SendError::Pool(e) => e,
            SendError::Client(e) => e,
        }
    }
}

/// Maps a client error to the answer: body limit → 413, client went away → 400, connect
/// timeout → 504, connection refused → 502, anything else from the backend → 502.
fn classify(backend: &str, e: &SendError) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e.error());
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<RequestBodyError>() {
            return match b {
                RequestBodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                RequestBodyError::Client(e) => ProxyError::BadRequest(e.to_string()),
            };
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if e.is_connect() && io.kind() == std::io::ErrorKind::TimedOut {
                return ProxyError::BackendTimeout {
                    backend: backend.to_owned(),
                    phase: "connect",
                };
            }
        }
        source = s.source();
    }
    let reason = error_chain(e.error());
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
    fn paths_that_could_escape_the_prefix_are_refused() {
        for bad in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E./admin",
            "/public/./x",
            "/public/..",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
        ] {
            assert!(unsafe_path(bad).is_some(), "{bad}");
        }
        for good in [
            "/",
            "/a/b.json",
            "/a/...",
            "/v1.2/x",
            "/a%20b",
            "/.well-known/x",
            "/a/..b",
        ] {
            assert_eq!(unsafe_path(good), None, "{good}");
        }
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = http::HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

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
