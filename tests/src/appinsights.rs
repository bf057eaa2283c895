//! A fake Application Insights ingestion endpoint on 127.0.0.1:0 that speaks the real
//! protocol (`reference/telemetry.md` §1.2–§1.6, §4.1): `POST /v2/track` and `/v2.1/track`,
//! gzip bodies, a JSON array (or one object) or NDJSON; every envelope validated against the
//! schema (required fields, JSON types, name pattern, iKey, time window, known tags, length
//! limits, duration format), invalid items refused per item with 206 (or the first item's
//! status when none is accepted), as the service does.
//!
//! Answers can be scripted per request ([`Reply`]): 200, 206 with chosen items failed with
//! chosen codes, any whole-request status with `Retry-After`, or no answer at all. [`Ingestion::stop`]
//! closes the listener and every connection (clients then get "connection refused") and
//! [`Ingestion::restart`] listens again on the same port.
//!
//! The fake runs on a runtime of its own, so tests may block (and wait with deadlines)
//! without stalling it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::task::AbortHandle;

/// How the fake answers one request (taken in order from the script; [`Reply::Ok`] when the
/// script is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Validate and accept every valid item (200, or 206/400 for invalid ones).
    Ok,
    /// Validate, then also fail these item positions with these status codes (206).
    Partial(Vec<(usize, u16)>),
    /// Answer this status for the whole request, accepting nothing.
    Status {
        /// The status.
        status: u16,
        /// A `Retry-After` value (seconds or an HTTP date).
        retry_after: Option<String>,
        /// Whether to send the per-item body (every item with `status`).
        body: bool,
    },
    /// Read the request and never answer.
    Hang,
    /// Wait this long, then answer as [`Reply::Ok`] (a distant or busy endpoint).
    Slow(Duration),
}

impl Reply {
    /// A whole-request status with no `Retry-After` and a per-item body.
    pub fn status(status: u16) -> Reply {
        Reply::Status {
            status,
            retry_after: None,
            body: true,
        }
    }

    /// A whole-request status with `Retry-After`.
    pub fn retry_after(status: u16, retry_after: &str) -> Reply {
        Reply::Status {
            status,
            retry_after: Some(retry_after.to_owned()),
            body: true,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When it arrived (its body read).
    pub at: Instant,
    /// Request path.
    pub path: String,
    /// `Content-Type`.
    pub content_type: String,
    /// Whether the body was gzip (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// The envelopes it carried, in order.
    pub items: Vec<Value>,
    /// The status answered (0: none).
    pub status: u16,
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    accepted: Mutex<Vec<Value>>,
    invalid: Mutex<Vec<(Value, String)>>,
    protocol_errors: Mutex<Vec<String>>,
    requests: Mutex<Vec<Recorded>>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Requests being handled now, and the most at any time.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Counts a request as in flight while it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The running fake; stops when dropped.
pub struct Ingestion {
    addr: SocketAddr,
    ikey: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Ingestion {
    fn drop(&mut self) {
        self.abort_all();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The instrumentation key tests use unless they need another.
pub const IKEY: &str = "11111111-2222-3333-4444-555555555555";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ingestion {
    /// The most requests it was handling at once (from their arrival to their answer).
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts the fake for [`IKEY`].
    pub fn start() -> Ingestion {
        Self::start_for(IKEY)
    }

    /// Starts the fake for an instrumentation key.
    pub fn start_for(ikey: &str) -> Ingestion {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-ingestion")
            .enable_all()
            .build()
            .expect("fake ingestion runtime");
        let listener = bind(0);
        let addr = listener.local_addr().expect("addr");
        let fake = Ingestion {
            addr,
            ikey: ikey.to_owned(),
            shared: Arc::new(Shared::default()),
            runtime: Some(runtime),
        };
        fake.serve(listener);
        fake
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("running")
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let rt = self.runtime();
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let shared = self.shared.clone();
        let ikey = self.ikey.clone();
        let accept = rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared2 = shared.clone();
                let ikey = ikey.clone();
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared2.clone();
                        let ikey = ikey.clone();
                        async move { Ok::<_, Infallible>(handle(req, &shared, &ikey).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut tasks = lock(&shared.tasks);
                tasks.retain(|t| !t.is_finished());
                tasks.push(conn.abort_handle());
            }
        });
        lock(&self.shared.tasks).push(accept.abort_handle());
    }

    fn abort_all(&self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A connection string pointing at the fake (with a trailing `;`, as the docs write it).
    pub fn connection_string(&self) -> String {
        format!(
            "InstrumentationKey={};IngestionEndpoint={}/;",
            self.ikey,
            self.endpoint()
        )
    }

    /// Queues answers for the next requests.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.shared.script).extend(replies);
    }

    /// Answers still queued.
    pub fn scripted(&self) -> usize {
        lock(&self.shared.script).len()
    }

    /// Closes the listener and every open connection: connecting is refused until
    /// [`Ingestion::restart`]. Returns once the port refuses connections.
    pub fn stop(&self) {
        self.abort_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
            assert!(Instant::now() < deadline, "the fake did not stop listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Listens again on the same port (after [`Ingestion::stop`]).
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match try_bind(self.addr.port()) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot listen again: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        self.serve(listener);
    }

    /// Every accepted item, in arrival order.
    pub fn accepted(&self) -> Vec<Value> {
        lock(&self.shared.accepted).clone()
    }

    /// Accepted items of a base type (`RequestData`, `RemoteDependencyData`, ...).
    pub fn accepted_of(&self, base_type: &str) -> Vec<Value> {
        self.accepted()
            .into_iter()
            .filter(|i| i["data"]["baseType"] == base_type)
            .collect()
    }

    /// Items refused as invalid, with the reason.
    pub fn invalid(&self) -> Vec<(Value, String)> {
        lock(&self.shared.invalid).clone()
    }

    /// Requests refused before their items were read (wrong path, encoding, content type,
    /// JSON), with the reason.
    pub fn protocol_errors(&self) -> Vec<String> {
        lock(&self.shared.protocol_errors).clone()
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Waits until `done` holds for the accepted items; panics with them at the deadline.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let items = self.accepted();
            if done(&items) {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "the fake ingestion never got what was expected; accepted {} items, {} requests, invalid {:?}, protocol errors {:?}",
                items.len(),
                self.requests().len(),
                self.invalid(),
                self.protocol_errors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `n` requests have arrived.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "the fake ingestion got {} requests, not {n}",
                r.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn try_bind(port: u16) -> std::io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn bind(port: u16) -> std::net::TcpListener {
    try_bind(port).expect("bind fake ingestion")
}

fn answer(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(shared: &Shared, status: u16, why: String) -> Response<Full<Bytes>> {
    lock(&shared.protocol_errors).push(why.clone());
    answer(
        status,
        json!({ "itemsReceived": 0, "itemsAccepted": 0, "errors": [{ "index": 0, "statusCode": status, "message": why }] }),
    )
}

/// Inflates a gzip body with the system's `gzip` (the test crate has no inflate library).
fn gunzip(data: &[u8]) -> Result<Vec<u8>, String> {
    if !data.starts_with(&[0x1f, 0x8b]) {
        return Err("Content-Encoding is gzip but the body has no gzip magic".into());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| format!("the gzip body does not inflate: {e}"))?;
    Ok(out)
}

async fn handle(req: Request<Incoming>, shared: &Shared, ikey: &str) -> Response<Full<Bytes>> {
    let _in_flight = InFlight::enter(shared);
    let path = req.uri().path().to_owned();
    if req.method() != http::Method::POST || (path != "/v2/track" && path != "/v2.1/track") {
        return refuse(
            shared,
            404,
            format!("{} {path} is not an ingestion route", req.method()),
        );
    }
    let header = |name: http::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let encoding = header(http::header::CONTENT_ENCODING);
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return refuse(shared, 400, "the body could not be read".into());
    };
    let gzip = encoding == "gzip";
    let text = if gzip {
        match tokio::task::spawn_blocking(move || gunzip(&body)).await {
            Ok(Ok(t)) => t,
            Ok(Err(why)) => return refuse(shared, 400, why),
            Err(e) => return refuse(shared, 500, e.to_string()),
        }
    } else if encoding.is_empty() || encoding == "identity" {
        body.to_vec()
    } else {
        return refuse(
            shared,
            400,
            format!("unsupported Content-Encoding '{encoding}'"),
        );
    };
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let items: Vec<Value> = match media.as_str() {
        "application/json" => match serde_json::from_slice::<Value>(&text) {
            Ok(Value::Array(a)) => a,
            Ok(o @ Value::Object(_)) => vec![o],
            Ok(_) => {
                return refuse(
                    shared,
                    400,
                    "the JSON body is neither an array nor an object".into(),
                )
            }
            Err(e) => return refuse(shared, 400, format!("the JSON body does not parse: {e}")),
        },
        "application/x-json-stream" | "x-json-stream" => {
            let mut items = Vec::new();
            for (n, line) in text.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) => items.push(v),
                    Err(e) => {
                        return refuse(
                            shared,
                            400,
                            format!("NDJSON line {} does not parse: {e}", n + 1),
                        )
                    }
                }
            }
            items
        }
        other => return refuse(shared, 400, format!("unsupported Content-Type '{other}'")),
    };
    let reply = lock(&shared.script).pop_front().unwrap_or(Reply::Ok);
    let mut recorded = Recorded {
        at: Instant::now(),
        path,
        content_type,
        gzip,
        items: items.clone(),
        status: 0,
    };
    let n = items.len();
    let reply = match reply {
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            Reply::Ok
        }
        other => other,
    };
    let (status, body, retry_after) = match reply {
        Reply::Hang => {
            lock(&shared.requests).push(recorded);
            std::future::pending::<()>().await;
            unreachable!("a pending future never completes");
        }
        Reply::Status {
            status,
            retry_after,
            body,
        } => {
            let body = if body {
                json!({
                    "itemsReceived": n, "itemsAccepted": 0,
                    "errors": (0..n).map(|i| json!({ "index": i, "statusCode": status, "message": "scripted" })).collect::<Vec<_>>(),
                })
            } else {
                Value::Null
            };
            (status, body, retry_after)
        }
        Reply::Ok | Reply::Partial(_) | Reply::Slow(_) => {
            let failed = match &reply {
                Reply::Partial(f) => f.clone(),
                _ => Vec::new(),
            };
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let mut errors: Vec<(usize, u16, String)> = Vec::new();
            let mut accepted = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                if let Err(why) = validate(&item, ikey, now_ms) {
                    lock(&shared.invalid).push((item, why.clone()));
                    errors.push((i, 400, why));
                } else if let Some((_, code)) = failed.iter().find(|(f, _)| *f == i) {
                    errors.push((i, *code, "scripted".into()));
                } else {
                    accepted.push(item);
                }
            }
            let n_accepted = accepted.len();
            lock(&shared.accepted).extend(accepted);
            let status = match (errors.first(), n_accepted) {
                (None, _) => 200,
                (Some((_, code, _)), 0) => *code,
                (Some(_), _) => 206,
            };
            let body = json!({
                "itemsReceived": n,
                "itemsAccepted": n_accepted,
                "errors": errors.iter().map(|(i, c, m)| json!({ "index": i, "statusCode": c, "message": m })).collect::<Vec<_>>(),
                "appId": null,
            });
            (status, body, None)
        }
    };
    recorded.status = status;
    lock(&shared.requests).push(recorded);
    let mut r = if body.is_null() {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    } else {
        answer(status, body)
    };
    if let Some(v) = retry_after.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}

/// Context tag keys the schema knows, with their length limits.
const TAGS: &[(&str, usize)] = &[
    ("ai.application.ver", 1024),
    ("ai.device.id", 1024),
    ("ai.device.locale", 64),
    ("ai.device.model", 256),
    ("ai.device.oemName", 256),
    ("ai.device.osVersion", 256),
    ("ai.device.type", 64),
    ("ai.location.ip", 45),
    ("ai.location.country", 256),
    ("ai.location.province", 256),
    ("ai.location.city", 256),
    ("ai.operation.id", 128),
    ("ai.operation.name", 1024),
    ("ai.operation.parentId", 128),
    ("ai.operation.syntheticSource", 1024),
    ("ai.operation.correlationVector", 64),
    ("ai.session.id", 64),
    ("ai.session.isFirst", 5),
    ("ai.user.accountId", 1024),
    ("ai.user.id", 128),
    ("ai.user.authUserId", 1024),
    ("ai.user.userAgent", 2048),
    ("ai.cloud.role", 256),
    ("ai.cloud.roleInstance", 256),
    ("ai.internal.sdkVersion", 64),
    ("ai.internal.agentVersion", 64),
    ("ai.internal.nodeName", 256),
];

/// Item types: envelope name suffix and base type.
const TYPES: &[(&str, &str)] = &[
    ("Request", "RequestData"),
    ("RemoteDependency", "RemoteDependencyData"),
    ("Exception", "ExceptionData"),
    ("Event", "EventData"),
    ("Message", "MessageData"),
    ("Metric", "MetricData"),
];

const MAX_ITEM_BYTES: usize = 64 * 1024;

fn missing(field: &str, ty: &str) -> String {
    format!("109: Field '{field}' on type '{ty}' is required but missing or empty. Expected: string, Actual: undefined")
}

struct Check<'a> {
    obj: &'a Map<String, Value>,
    ty: &'a str,
}

impl Check<'_> {
    fn string(&self, field: &str, required: bool, max: usize) -> Result<(), String> {
        match self.obj.get(field) {
            None | Some(Value::Null) if required => Err(missing(field, self.ty)),
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) if required && s.is_empty() => Err(missing(field, self.ty)),
            Some(Value::String(s)) if s.chars().count() > max => Err(format!(
                "Field '{field}' on type '{}' is too long: {} characters, the limit is {max}",
                self.ty,
                s.chars().count()
            )),
            Some(Value::String(_)) => Ok(()),
            Some(v) => Err(format!(
                "Field '{field}' on type '{}' has the wrong type. Expected: string, Actual: {v}",
                self.ty
            )),
        }
    }

    fn bool(&self, field: &str, required: bool) -> Result<(), String> {
        match self.obj.get(field) {
            None if required => Err(missing(field, self.ty)),
            None | Some(Value::Bool(_)) => Ok(()),
            Some(v) => Err(format!(
                "Field '{field}' on type '{}' has the wrong type. Expected: bool, Actual: {v}",
                self.ty
            )),
        }
    }

    fn number(&self, field: &str, required: bool) -> Result<(), String> {
        match self.obj.get(field) {
            None if required => Err(missing(field, self.ty)),
            None | Some(Value::Number(_)) => Ok(()),
            Some(v) => Err(format!(
                "Field '{field}' on type '{}' has the wrong type. Expected: number, Actual: {v}",
                self.ty
            )),
        }
    }

    fn int(&self, field: &str, range: std::ops::RangeInclusive<i64>) -> Result<(), String> {
        match self.obj.get(field) {
            None => Ok(()),
            Some(v) if v.as_i64().is_some_and(|i| range.contains(&i)) => Ok(()),
            Some(v) => Err(format!(
                "Field '{field}' on type '{}' must be an integer in {range:?}, not {v}",
                self.ty
            )),
        }
    }

    fn duration(&self, field: &str) -> Result<(), String> {
        self.string(field, true, 64)?;
        let d = self.obj[field].as_str().unwrap_or_default();
        if valid_duration(d) {
            Ok(())
        } else {
            Err(format!(
                "Field '{field}' on type '{}' is not a duration (d.hh:mm:ss.fffffff): '{d}'",
                self.ty
            ))
        }
    }

    fn properties(&self) -> Result<(), String> {
        match self.obj.get("properties") {
            None => Ok(()),
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if k.is_empty() || k.chars().count() > 150 {
                        return Err(format!(
                            "property key '{k}' on type '{}' is empty or longer than 150",
                            self.ty
                        ));
                    }
                    match v {
                        Value::String(s) if s.chars().count() <= 8192 => {}
                        _ => return Err(format!("property '{k}' on type '{}' is not a string of at most 8192 characters", self.ty)),
                    }
                }
                Ok(())
            }
            Some(v) => Err(format!(
                "properties on type '{}' is not an object: {v}",
                self.ty
            )),
        }
    }

    fn measurements(&self) -> Result<(), String> {
        match self.obj.get("measurements") {
            None => Ok(()),
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if k.is_empty() || k.chars().count() > 150 {
                        return Err(format!(
                            "measurement key '{k}' on type '{}' is empty or longer than 150",
                            self.ty
                        ));
                    }
                    if !v.is_number() {
                        return Err(format!(
                            "measurement '{k}' on type '{}' is not a number: {v}",
                            self.ty
                        ));
                    }
                }
                Ok(())
            }
            Some(v) => Err(format!(
                "measurements on type '{}' is not an object: {v}",
                self.ty
            )),
        }
    }
}

/// `^(\d+\.)?\d{2}:\d{2}:\d{2}(\.\d{1,7})?$`
pub fn valid_duration(d: &str) -> bool {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let (days, rest) = match d.split_once('.') {
        Some((days, rest)) if !days.contains(':') => (Some(days), rest),
        _ => (None, d),
    };
    if days.is_some_and(|days| days.is_empty() || !days.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let (clock, fraction) = match rest.split_once('.') {
        Some((c, f)) => (c, Some(f)),
        None => (rest, None),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    parts.len() == 3
        && parts.iter().all(|p| digits(p, 2))
        && fraction
            .is_none_or(|f| (1..=7).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Unix milliseconds of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || *b.last()? != b'Z' {
        return None;
    }
    for (i, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        if b[i] != c {
            return None;
        }
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let p = s.get(r)?;
        p.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| p.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut ms = 0;
    match &s[19..s.len() - 1] {
        "" => {}
        f => {
            let digits = f.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            ms = format!("{digits:0<3}")[..3].parse().ok()?;
        }
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// Validates one envelope as the ingestion service would (the message says why not).
pub fn validate(item: &Value, ikey: &str, now_ms: i64) -> Result<(), String> {
    let Some(obj) = item.as_object() else {
        return Err("an item is not a JSON object".into());
    };
    let size = item.to_string().len();
    if size > MAX_ITEM_BYTES {
        return Err(format!(
            "the item is {size} bytes; the limit is {MAX_ITEM_BYTES}"
        ));
    }
    let env = Check {
        obj,
        ty: "Envelope",
    };
    env.string("name", true, 1024)?;
    env.string("time", true, 64)?;
    env.int("ver", 1..=i64::from(u16::MAX))?;
    env.string("seq", false, 64)?;
    // The key: `iKey` (SDKs) or `ikey` (the support scripts).
    let key = obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("ikey"))
        .map(|(_, v)| v);
    match key {
        Some(Value::String(k)) if k.eq_ignore_ascii_case(ikey) => {}
        Some(Value::String(_)) => return Err("Invalid instrumentation key".into()),
        _ => return Err(missing("iKey", "Envelope")),
    }
    if let Some(rate) = obj.get("sampleRate") {
        match rate.as_f64() {
            Some(r) if r > 0.0 && r <= 100.0 => {}
            _ => return Err(format!("sampleRate {rate} is not in (0, 100]")),
        }
    }
    let name = obj["name"].as_str().unwrap_or_default();
    let Some(rest) = name.strip_prefix("Microsoft.ApplicationInsights.") else {
        return Err(format!(
            "envelope name '{name}' is not Microsoft.ApplicationInsights.*"
        ));
    };
    let kind = match rest.split_once('.') {
        Some((key, kind)) => {
            if !key.eq_ignore_ascii_case(&ikey.replace('-', "")) {
                return Err(format!(
                    "envelope name '{name}' carries another instrumentation key"
                ));
            }
            kind
        }
        None => rest,
    };
    let Some((_, base_type)) = TYPES.iter().find(|(k, _)| *k == kind) else {
        return Err(format!("envelope name '{name}' names no known type"));
    };
    let time = obj["time"].as_str().unwrap_or_default();
    let Some(t) = parse_time_ms(time) else {
        return Err(format!(
            "Field 'time' on type 'Envelope' is not an ISO 8601 UTC time: '{time}'"
        ));
    };
    if t < now_ms - 172_800_000 {
        return Err(format!(
            "103: Field 'time' on type 'Envelope' is older than the allowed min date. Expected: now - 172800000ms, Actual: now - {}ms",
            now_ms - t
        ));
    }
    if t > now_ms + 7_200_000 {
        return Err(format!(
            "Field 'time' on type 'Envelope' is newer than the allowed max date: now + {}ms",
            t - now_ms
        ));
    }
    match obj.get("tags") {
        None => {}
        Some(Value::Object(tags)) => {
            for (k, v) in tags {
                let Some((_, max)) = TAGS.iter().find(|(name, _)| *name == k.as_str()) else {
                    return Err(format!("unknown context tag '{k}'"));
                };
                match v.as_str() {
                    Some(s) if s.chars().count() <= *max => {}
                    Some(_) => return Err(format!("context tag '{k}' is longer than {max}")),
                    None => return Err(format!("context tag '{k}' is not a string: {v}")),
                }
            }
        }
        Some(v) => return Err(format!("tags is not an object: {v}")),
    }
    let Some(data) = obj.get("data").and_then(Value::as_object) else {
        return Err(missing("data", "Envelope"));
    };
    let bt = data
        .get("baseType")
        .and_then(Value::as_str)
        .unwrap_or("undefined");
    if !TYPES.iter().any(|(_, b)| *b == bt) {
        return Err(format!("Unknown domain type '{bt}'"));
    }
    if bt != *base_type {
        return Err(format!(
            "baseType '{bt}' does not match the envelope name '{name}'"
        ));
    }
    let Some(base) = data.get("baseData").and_then(Value::as_object) else {
        return Err(missing("baseData", "Data"));
    };
    let c = Check { obj: base, ty: bt };
    c.int("ver", 1..=i64::from(u16::MAX))?;
    c.properties()?;
    match bt {
        "RequestData" => {
            c.string("id", true, 128)?;
            c.string("name", false, 1024)?;
            c.duration("duration")?;
            c.string("responseCode", true, 1024)?;
            c.bool("success", true)?;
            c.string("source", false, 1024)?;
            c.string("url", false, 2048)?;
            c.measurements()?;
        }
        "RemoteDependencyData" => {
            c.string("name", true, 1024)?;
            c.string("id", false, 128)?;
            c.string("resultCode", false, 1024)?;
            c.duration("duration")?;
            c.bool("success", false)?;
            c.string("data", false, 8192)?;
            c.string("type", false, 1024)?;
            c.string("target", false, 1024)?;
            c.measurements()?;
        }
        "ExceptionData" => {
            c.int("severityLevel", 0..=4)?;
            c.string("problemId", false, 1024)?;
            c.measurements()?;
            let list = match base.get("exceptions") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                _ => return Err(missing("exceptions", bt)),
            };
            for e in list {
                let Some(e) = e.as_object() else {
                    return Err("an exception is not an object".into());
                };
                let d = Check {
                    obj: e,
                    ty: "ExceptionDetails",
                };
                d.string("typeName", true, 1024)?;
                d.string("message", true, 32768)?;
                d.bool("hasFullStack", false)?;
                d.string("stack", false, 32768)?;
                d.int("id", i64::MIN..=i64::MAX)?;
                d.int("outerId", i64::MIN..=i64::MAX)?;
            }
        }
        "MetricData" => {
            let list = match base.get("metrics") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                _ => return Err(missing("metrics", bt)),
            };
            for m in list {
                let Some(m) = m.as_object() else {
                    return Err("a data point is not an object".into());
                };
                let d = Check {
                    obj: m,
                    ty: "DataPoint",
                };
                d.string("name", true, 1024)?;
                d.number("value", true)?;
                d.int("kind", 0..=1)?;
                for f in ["count", "min", "max", "stdDev"] {
                    d.number(f, false)?;
                }
            }
        }
        "EventData" => {
            c.string("name", true, 512)?;
            c.measurements()?;
        }
        "MessageData" => {
            c.string("message", true, 32768)?;
            c.int("severityLevel", 0..=4)?;
        }
        _ => unreachable!("checked above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn request_item(time: &str) -> Value {
        json!({
            "ver": 1,
            "name": format!("Microsoft.ApplicationInsights.{}.Request", IKEY.replace('-', "")),
            "time": time,
            "iKey": IKEY,
            "tags": { "ai.operation.id": "4bf92f3577b34da6a3ce929d0e0e4736" },
            "data": { "baseType": "RequestData", "baseData": {
                "ver": 2, "id": "00f067aa0ba902b7", "name": "GET /x", "duration": "0.00:00:01.5000000",
                "responseCode": "200", "success": true, "properties": { "API Name": "a" },
                "measurements": { "Response Size": 10.0 } } },
        })
    }

    fn now() -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let secs = ms / 1000;
        // Back to a civil date (inverse of the algorithm above) for a valid "now".
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            ms % 1000
        )
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_time_ms("2026-11-24T00:00:00.123Z"),
            Some(1_795_478_400_123)
        );
        assert_eq!(
            parse_time_ms("2000-02-29T00:00:00.1234567Z"),
            Some(951_782_400_123)
        );
        assert_eq!(parse_time_ms("2026-11-24T00:00:00+01:00"), None);
        assert_eq!(parse_time_ms("2026-11-24 00:00:00Z"), None);
        for ok in [
            "0.00:00:01.5000000",
            "00:00:01.0000000",
            "00.00:00:10",
            "12:00:00",
            "1.02:03:04.5",
        ] {
            assert!(valid_duration(ok), "{ok}");
        }
        for bad in [
            "1.5",
            "0.0:00:01",
            "00:00:01.12345678",
            "x.00:00:00",
            "00:00",
            "",
        ] {
            assert!(!valid_duration(bad), "{bad}");
        }
    }

    #[test]
    fn the_validator_refuses_what_the_service_refuses() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let good = request_item(&now());
        assert_eq!(validate(&good, IKEY, now_ms), Ok(()));
        let mut short_name = good.clone();
        short_name["name"] = json!("Microsoft.ApplicationInsights.Request");
        assert_eq!(validate(&short_name, IKEY, now_ms), Ok(()));
        type Breaks = fn(&mut Value);
        let broken: Vec<(Breaks, &str)> = vec![
            (
                |v: &mut Value| v["time"] = json!("2001-01-01T00:00:00Z"),
                "older than the allowed min date",
            ),
            (
                |v: &mut Value| v["iKey"] = json!("99999999-2222-3333-4444-555555555555"),
                "Invalid instrumentation key",
            ),
            (
                |v: &mut Value| v["name"] = json!("Microsoft.ApplicationInsights.Request2"),
                "no known type",
            ),
            (
                |v: &mut Value| v["name"] = json!("Microsoft.ApplicationInsights.abc.Request"),
                "another instrumentation key",
            ),
            (
                |v: &mut Value| v["data"]["baseType"] = json!("MetricData"),
                "does not match",
            ),
            (
                |v: &mut Value| v["data"]["baseType"] = json!("Nope"),
                "Unknown domain type 'Nope'",
            ),
            (
                |v: &mut Value| v["data"]["baseData"]["responseCode"] = json!(200),
                "wrong type",
            ),
            (
                |v: &mut Value| {
                    v["data"]["baseData"]
                        .as_object_mut()
                        .unwrap()
                        .remove("success");
                },
                "109: Field 'success'",
            ),
            (
                |v: &mut Value| v["data"]["baseData"]["duration"] = json!("1.5"),
                "not a duration",
            ),
            (
                |v: &mut Value| v["data"]["baseData"]["id"] = json!("x".repeat(129)),
                "too long",
            ),
            (
                |v: &mut Value| v["tags"]["ai.madeup"] = json!("x"),
                "unknown context tag",
            ),
            (
                |v: &mut Value| v["tags"]["ai.location.ip"] = json!("x".repeat(46)),
                "longer than 45",
            ),
            (
                |v: &mut Value| v["data"]["baseData"]["measurements"]["m"] = json!("1"),
                "not a number",
            ),
            (
                |v: &mut Value| v["sampleRate"] = json!(0),
                "not in (0, 100]",
            ),
        ];
        for (breaks, why) in broken {
            let mut item = good.clone();
            breaks(&mut item);
            let err = validate(&item, IKEY, now_ms).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fake_speaks_the_protocol() {
        let fake = Ingestion::start();
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("{}/v2.1/track", fake.endpoint());
        let good = request_item(&now());
        let mut bad = good.clone();
        bad["data"]["baseData"]["responseCode"] = json!(200);

        // A JSON array with one invalid item: 206, the error names its index.
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(json!([good, bad]).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["itemsReceived"], 2);
        assert_eq!(v["itemsAccepted"], 1);
        assert_eq!(v["errors"][0]["index"], 1);
        assert_eq!(v["errors"][0]["statusCode"], 400);

        // NDJSON, nothing valid: the first item's status.
        let r = c
            .post(&url)
            .header("content-type", "application/x-json-stream")
            .body(format!("{bad}\n\n{bad}\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);

        // Scripted answers.
        fake.script([Reply::retry_after(429, "2"), Reply::Partial(vec![(0, 503)])]);
        let send = || {
            c.post(&url)
                .header("content-type", "application/x-json-stream")
                .body(format!("{good}\n{good}"))
                .send()
        };
        let r = send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        let r = send().await.unwrap();
        assert_eq!(r.status(), 206);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["statusCode"], 503);
        assert_eq!(
            fake.accepted().len(),
            2,
            "one from the array, one from the 206"
        );

        // Not gzip although it says so; an unknown content type; a wrong route.
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body("[]")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = c
            .post(&url)
            .header("content-type", "text/plain")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = c
            .post(format!("{}/v2/other", fake.endpoint()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(fake.protocol_errors().len(), 3);

        // Gzip inflates.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(format!("{good}\n").as_bytes()).unwrap();
        let body = gz.finish().unwrap();
        let r = c
            .post(&url)
            .header("content-type", "application/x-json-stream")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(fake.requests().last().unwrap().gzip);

        // Stopped: refused; restarted on the same port: answers.
        fake.stop();
        assert!(c.post(&url).body("x").send().await.is_err());
        fake.restart();
        let r = c
            .post(format!("{}/v2/other", fake.endpoint()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
}
