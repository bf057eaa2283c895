//! Listeners: accept loops, TLS handshakes (with a deadline), HTTP/1.1 and HTTP/2 (ALPN or
//! h2c prior knowledge) served by hyper, each connection drained gracefully on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use outpost_config::{Limits, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::proxy::{self, ConnInfo, Shared};
use crate::tls::ClientCertificate;

/// One bound listener, ready to serve.
pub struct Bound {
    tcp: TcpListener,
    /// The bound address (the real port when the manifest said 0).
    pub local: SocketAddr,
    conf: Arc<ListenerConf>,
}

/// What every connection of a listener needs. The listening socket itself is not here, so
/// it closes as soon as accepting stops, while connections drain.
struct ListenerConf {
    name: Arc<str>,
    tls: Option<TlsAcceptor>,
    thumbprint_header: Option<HeaderName>,
    http: HttpServer,
    handshake_timeout: Duration,
    first_request_timeout: Duration,
    connections: Arc<tokio::sync::Semaphore>,
}

enum HttpServer {
    /// HTTP/1.1 and HTTP/2 (ALPN, or h2c by prior knowledge).
    Auto(auto::Builder<TokioExecutor>),
    /// HTTP/1.1 only (`http2 = false`).
    Http1(hyper::server::conn::http1::Builder),
}

/// Tells connections to drain, and learns when they all have.
#[derive(Debug)]
pub struct Drain {
    /// Turns true when shutdown begins.
    pub signal: watch::Receiver<bool>,
    /// Held by each connection (and tunnel); all dropped means all done.
    pub done: mpsc::Sender<()>,
}

impl Drain {
    /// Resolves once shutdown has begun.
    pub async fn started(&mut self) {
        let _ = self.signal.wait_for(|s| *s).await;
    }
}

impl Clone for Drain {
    fn clone(&self) -> Self {
        Self {
            signal: self.signal.clone(),
            done: self.done.clone(),
        }
    }
}

impl Bound {
    /// Binds a listener. `tls` is its prepared rustls config, if it is HTTPS.
    pub fn bind(
        cfg: &Listener,
        tls: Option<rustls::ServerConfig>,
        limits: &Limits,
    ) -> std::io::Result<Bound> {
        let std = std::net::TcpListener::bind(cfg.address)?;
        std.set_nonblocking(true)?;
        let tcp = TcpListener::from_std(std)?;
        let local = tcp.local_addr()?;
        let thumbprint_header = cfg
            .tls
            .as_ref()
            .and_then(|t| t.client_auth.as_ref())
            .and_then(|c| c.forward_thumbprint_header.as_deref())
            .map(|h| HeaderName::from_bytes(h.as_bytes()).expect("validated header name"));
        Ok(Bound {
            tcp,
            local,
            conf: Arc::new(ListenerConf {
                name: cfg.name.as_str().into(),
                tls: tls.map(|c| TlsAcceptor::from(Arc::new(c))),
                thumbprint_header,
                http: http_server(cfg, limits),
                handshake_timeout: Duration::from_millis(limits.tls_handshake_timeout_ms),
                first_request_timeout: Duration::from_millis(limits.header_read_timeout_ms),
                connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            }),
        })
    }

    /// The listener's name.
    pub fn name(&self) -> &Arc<str> {
        &self.conf.name
    }

    /// Accepts until the drain signal; connections then finish their current requests.
    pub async fn serve(self, shared: Arc<Shared>, drain: Drain) {
        let Bound { tcp, conf, .. } = self;
        let mut stop = drain.clone();
        loop {
            // A free connection slot first: at the limit, clients wait in the backlog.
            let permit = tokio::select! {
                p = conf.connections.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = stop.started() => break,
            };
            let accepted = tokio::select! {
                r = tcp.accept() => r,
                _ = stop.started() => break,
            };
            let (stream, remote) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = &*conf.name, error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // Dead peers (a client behind a NAT that dropped the mapping) are found by the
            // kernel instead of pinning the connection forever.
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(60))
                .with_interval(Duration::from_secs(10));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let conf = conf.clone();
            let shared = shared.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                conf.connection(stream, remote, shared, drain).await;
                drop(permit);
            });
        }
        drop(tcp);
        tracing::info!(listener = &*conf.name, "Stopped accepting.");
    }
}

impl ListenerConf {
    async fn connection(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        shared: Arc<Shared>,
        drain: Drain,
    ) {
        match &self.tls {
            None => {
                let info = ConnInfo::new(
                    self.name.clone(),
                    remote,
                    false,
                    None,
                    self.thumbprint_header.as_ref(),
                    drain,
                );
                self.http_conn(TokioIo::new(stream), info, shared).await;
            }
            Some(acceptor) => {
                let tls = match tokio::time::timeout(
                    self.handshake_timeout,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(listener = &*self.name, client = %remote, error = %e, "TLS handshake failed.");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = &*self.name, client = %remote, "TLS handshake timed out.");
                        return;
                    }
                };
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(ClientCertificate::from_chain);
                let info = ConnInfo::new(
                    self.name.clone(),
                    remote,
                    true,
                    client_cert,
                    self.thumbprint_header.as_ref(),
                    drain,
                );
                self.http_conn(TokioIo::new(tls), info, shared).await;
            }
        }
    }

    async fn http_conn<I>(&self, io: TokioIo<I>, info: ConnInfo, shared: Arc<Shared>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let drain = info.drain.clone();
        let info = Arc::new(info);
        let svc_info = info.clone();
        let service = service_fn(move |req| proxy::handle(shared.clone(), svc_info.clone(), req));
        match &self.http {
            HttpServer::Auto(b) => {
                let conn = b.serve_connection_with_upgrades(io, service);
                tokio::pin!(conn);
                self.drive(conn, |c| c.graceful_shutdown(), &info, drain)
                    .await;
            }
            HttpServer::Http1(b) => {
                let conn = b.serve_connection(io, service).with_upgrades();
                tokio::pin!(conn);
                self.drive(conn, |c| c.graceful_shutdown(), &info, drain)
                    .await;
            }
        }
    }

    /// Runs a connection to its end: closed if no first request arrives in time, asked to
    /// finish gracefully when the drain begins.
    async fn drive<C, E>(
        &self,
        mut conn: Pin<&mut C>,
        graceful: impl Fn(Pin<&mut C>),
        info: &ConnInfo,
        mut drain: Drain,
    ) where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let first = tokio::time::sleep(self.first_request_timeout);
        tokio::pin!(first);
        let mut waiting_first = true;
        let mut draining = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(listener = &*self.name, client = %info.remote, error = %e, "Connection ended with an error.");
                    }
                    break;
                }
                _ = &mut first, if waiting_first => {
                    waiting_first = false;
                    if !info.served.load(Ordering::Relaxed) {
                        tracing::debug!(listener = &*self.name, client = %info.remote, "No request in time; closing.");
                        break;
                    }
                }
                _ = drain.started(), if !draining => {
                    draining = true;
                    graceful(conn.as_mut());
                }
            }
        }
        drop(drain.done);
    }
}

fn http_server(cfg: &Listener, limits: &Limits) -> HttpServer {
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
    let max_buf = (limits.max_header_bytes + 4096).max(64 * 1024);
    if !cfg.http2 {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(max_buf);
        return HttpServer::Http1(b);
    }
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_buf);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    HttpServer::Auto(b)
}
