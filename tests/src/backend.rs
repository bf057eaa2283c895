//! A real backend for the gateway to proxy to, on 127.0.0.1:0: HTTP/1.1 and h2c (or TLS with
//! ALPN, optionally requiring client certificates), with routes that echo, stream, stall,
//! upgrade to WebSocket and answer with gRPC trailers.
//!
//! Routes (by path suffix, so any API prefix or base path works):
//! * `…/echo…`           JSON: method, uri, version, headers, body length
//! * `…/status/{code}`   an empty answer with that status
//! * `…/flaky/{n}`       503 for the backend's first `n` flaky requests, then JSON with
//!   `attempt` and the body received
//! * `…/slow/{ms}`       waits, then answers `slow`
//! * `…/bytes/{n}`       streams `n` bytes in 64 KiB chunks
//! * `…/upload`          counts the body (visible live through [`Backend::received`])
//! * `…/gated`           sends `first\n`, waits for [`Backend::open_gate`], sends `second\n`
//! * `…/ws`              WebSocket echo
//! * `…/grpc`            `hello` then trailers `grpc-status: 0`, `grpc-message: ok`
//! * `…/whoami`          JSON: whether the connection carried a client certificate

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::certs::Leaf;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How the backend listens.
#[derive(Default)]
pub struct BackendOptions {
    /// Serve TLS with this certificate.
    pub tls: Option<Leaf>,
    /// Require client certificates signed by this CA (PEM).
    pub client_ca_pem: Option<String>,
}

struct State {
    connections: AtomicUsize,
    requests: AtomicUsize,
    received: AtomicU64,
    flaky: AtomicUsize,
    gate: Notify,
}

/// A running backend; stops when dropped.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Plain HTTP/1.1 + h2c.
    pub async fn start() -> Backend {
        Self::start_with(BackendOptions::default()).await
    }

    /// With options.
    pub async fn start_with(opts: BackendOptions) -> Backend {
        crate::init_crypto();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            flaky: AtomicUsize::new(0),
            gate: Notify::new(),
        });
        let acceptor = opts.tls.map(|leaf| {
            let chain = rustls_pemfile_certs(&leaf.cert_pem);
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
                .expect("key");
            let builder = rustls::ServerConfig::builder();
            let builder = match &opts.client_ca_pem {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in rustls_pemfile_certs(ca) {
                        roots.add(c).expect("client CA");
                    }
                    builder.with_client_cert_verifier(
                        rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                            .build()
                            .expect("verifier"),
                    )
                }
                None => builder.with_no_client_auth(),
            };
            let mut cfg = builder.with_single_cert(chain, key).expect("server cert");
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            TlsAcceptor::from(Arc::new(cfg))
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(TokioIo::new(stream), st, false).await,
                        Some(a) => {
                            let Ok(tls) = a.accept(stream).await else {
                                return;
                            };
                            let has_cert = tls.get_ref().1.peer_certificates().is_some();
                            serve(TokioIo::new(tls), st, has_cert).await
                        }
                    }
                });
            }
        });
        Backend { addr, state, task }
    }

    /// `http://127.0.0.1:port` (or `https://`).
    pub fn url(&self, tls: bool) -> String {
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Requests to `…/flaky/{n}` so far.
    pub fn flaky_attempts(&self) -> usize {
        self.state.flaky.load(Ordering::SeqCst)
    }

    /// Requests started so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Body bytes received by `/upload` so far.
    pub fn received(&self) -> u64 {
        self.state.received.load(Ordering::SeqCst)
    }

    /// Lets a waiting `/gated` answer finish.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificates")
}

async fn serve<I>(io: TokioIo<I>, state: Arc<State>, client_cert: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, state, client_cert).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await;
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn json(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn headers_json(h: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in h.keys() {
        let vals: Vec<serde_json::Value> = h
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        map.insert(name.as_str().to_owned(), vals.into());
    }
    map.into()
}

async fn route(mut req: Request<Incoming>, state: Arc<State>, client_cert: bool) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let last = |key: &str| -> Option<String> {
        let i = path.rfind(key)?;
        Some(path[i + key.len()..].to_owned())
    };
    if path.contains("/echo") {
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let version = format!("{:?}", req.version());
        let headers = headers_json(req.headers());
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST),
        };
        let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
        return json(serde_json::json!({
            "method": method, "uri": uri, "version": version, "headers": headers,
            "body_len": body.len(), "body": text,
        }));
    }
    if let Some(n) = last("/flaky/") {
        let attempt = state.flaky.fetch_add(1, Ordering::SeqCst) + 1;
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        if attempt <= n.parse().unwrap_or(0) {
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        return json(serde_json::json!({
            "attempt": attempt,
            "body": String::from_utf8_lossy(&body.unwrap_or_default()),
        }));
    }
    if let Some(code) = last("/status/") {
        return status(StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap_or(StatusCode::OK));
    }
    if let Some(ms) = last("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
        return Response::new(full("slow"));
    }
    if let Some(n) = last("/bytes/") {
        let total: u64 = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= total {
                    return None;
                }
                let n = (total - sent).min(chunk.len() as u64);
                Some((Ok(Frame::data(chunk.slice(..n as usize))), sent + n))
            }
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut()
            .insert("content-length", HeaderValue::from(total));
        return r;
    }
    if path.ends_with("/upload") {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        n += d.len() as u64;
                        state.received.fetch_add(d.len() as u64, Ordering::SeqCst);
                    }
                }
                Err(_) => return status(StatusCode::BAD_REQUEST),
            }
        }
        return json(serde_json::json!({ "received": n }));
    }
    if path.ends_with("/gated") {
        let st = state.clone();
        let stream = futures_util::stream::unfold(0u8, move |step| {
            let st = st.clone();
            async move {
                match step {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"first\n"))), 1)),
                    1 => {
                        st.gate.notified().await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second\n"))), 2))
                    }
                    _ => None,
                }
            }
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    if path.ends_with("/ws") {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return status(StatusCode::BAD_REQUEST);
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-accept",
            HeaderValue::from_str(&accept).expect("accept"),
        );
        return r;
    }
    if path.ends_with("/grpc") {
        let _ = req.into_body().collect().await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut r =
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return r;
    }
    if path.ends_with("/whoami") {
        return json(serde_json::json!({ "client_cert": client_cert }));
    }
    status(StatusCode::NOT_FOUND)
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = code;
    r
}
