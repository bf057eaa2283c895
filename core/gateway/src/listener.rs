//! Listeners: accept loops, TLS handshakes (with a deadline), HTTP/1.1 and HTTP/2 (ALPN or
//! h2c prior knowledge) served by hyper, each connection watched for graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use outpost_config::{Limits, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::proxy::{self, ConnInfo, Shared};
use crate::tls::ClientCertificate;

/// One bound listener, ready to serve.
pub struct Bound {
    /// Listener name.
    pub name: Arc<str>,
    /// The bound address (the real port when the manifest said 0).
    pub local: SocketAddr,
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    thumbprint_header: Option<HeaderName>,
    http: Arc<auto::Builder<TokioExecutor>>,
    handshake_timeout: Duration,
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
            name: cfg.name.as_str().into(),
            local,
            tcp,
            tls: tls.map(|c| TlsAcceptor::from(Arc::new(c))),
            thumbprint_header,
            http: Arc::new(http_builder(cfg, limits)),
            handshake_timeout: Duration::from_millis(limits.tls_handshake_timeout_ms),
        })
    }

    /// Accepts until `stop` turns true. Each connection is watched by `watcher`'s shutdown.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        mut stop: watch::Receiver<bool>,
        graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    ) {
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                r = this.tcp.accept() => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, remote) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = &*this.name, error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let watcher = graceful.watcher();
            let this = this.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                this.connection(stream, remote, shared, watcher).await;
            });
        }
        tracing::debug!(listener = &*this.name, "Stopped accepting.");
    }

    async fn connection(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        shared: Arc<Shared>,
        watcher: Watcher,
    ) {
        match &self.tls {
            None => {
                let info = Arc::new(ConnInfo {
                    listener: self.name.clone(),
                    remote,
                    tls: false,
                    client_cert: None,
                    thumbprint_header: self.thumbprint_header.clone(),
                });
                self.http_conn(TokioIo::new(stream), info, shared, watcher)
                    .await;
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
                let info = Arc::new(ConnInfo {
                    listener: self.name.clone(),
                    remote,
                    tls: true,
                    client_cert,
                    thumbprint_header: self.thumbprint_header.clone(),
                });
                self.http_conn(TokioIo::new(tls), info, shared, watcher)
                    .await;
            }
        }
    }

    async fn http_conn<I>(
        &self,
        io: TokioIo<I>,
        info: Arc<ConnInfo>,
        shared: Arc<Shared>,
        watcher: Watcher,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| proxy::handle(shared.clone(), info.clone(), req));
        let conn = self
            .http
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(listener = &*self.name, error = %e, "Connection ended with an error.");
        }
    }
}

fn http_builder(cfg: &Listener, limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size((limits.max_header_bytes + 4096).max(64 * 1024));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    if !cfg.http2 {
        b = b.http1_only();
    }
    b
}
