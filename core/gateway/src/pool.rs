//! Keep-alive HTTP/1.1 connections to one backend target.
//!
//! The generic pooled client (`hyper_util`'s) pays per exchange for things a gateway in front
//! of a few known targets does not need: a pool keyed by a hashed (scheme, authority), and a
//! task spawned per exchange only to hand the connection back. Here each target owns its idle
//! connections directly (no key, no hashing), a request takes the most recently used idle
//! connection (warm, and the least likely to have been closed by the backend's own idle
//! timeout), sends on it from the request's own task, and puts it back when the response is
//! in. A response that arrived whole (the common case) leaves the connection ready at once;
//! only while a longer body is still being read does a small task wait for the connection to
//! become ready before it goes back. One task per connection drives its I/O.
//!
//! HTTP/2 backends and URLs chosen at request time keep using the generic client.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::body::RequestBody;

/// Why a request could not be sent on a pooled connection.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be opened (TCP, TLS or the HTTP/1 handshake).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed on an open connection.
    Send(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(_) => f.write_str("cannot connect"),
            PoolError::Send(_) => f.write_str("the exchange failed"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Connect(e) => Some(&**e),
            PoolError::Send(e) => Some(e),
        }
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// The idle HTTP/1.1 connections to one target.
pub struct HostPool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector is called with.
    origin: Uri,
    /// The Host header a request gets when it has none (the port only when not the default).
    host: HeaderValue,
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    reaper: AtomicBool,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl HostPool {
    /// A pool for `scheme://authority` through this connector.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        scheme: &Scheme,
        authority: &Authority,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> HostPool {
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a URI");
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => authority.as_str(),
            _ => authority.host(),
        };
        HostPool {
            connector,
            origin,
            host: HeaderValue::from_str(host).expect("an authority is a valid header value"),
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
            reaper: AtomicBool::new(false),
        }
    }

    /// Sends the request (absolute or origin form) and returns the response head. A request
    /// that never left because a pooled connection had just closed goes on another one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        if req.uri().scheme().is_some() {
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = pq.map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(again) if pooled => req = again,
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection; closed and expired ones are dropped.
    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop_back() {
            if entry.since.elapsed() >= self.idle_timeout {
                // Everything before it has waited longer still.
                idle.clear();
                return None;
            }
            if entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// After a response head: the connection goes back once the whole response is read.
    fn checkin(self: &Arc<Self>, mut sender: SendRequest<RequestBody>) {
        if sender.is_ready() {
            self.put_idle(sender);
        } else if !sender.is_closed() {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    if let Some(pool) = pool.upgrade() {
                        pool.put_idle(sender);
                    }
                }
            });
        }
    }

    fn put_idle(self: &Arc<Self>, sender: SendRequest<RequestBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= self.max_idle {
            return;
        }
        idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
        drop(idle);
        if !self.reaper.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(PoolError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "Backend connection ended with an error.");
            }
        });
        Ok(sender)
    }
}

/// Closes connections idle for longer than the timeout, until the pool is gone.
async fn reap(pool: Weak<HostPool>, timeout: Duration) {
    let every = (timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|e| !e.sender.is_closed() && e.since.elapsed() < timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Source;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// How a raw test backend answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// Keep-alive, `ok`.
        KeepAlive,
        /// `ok`, then the backend closes the connection without saying so.
        ThenClose,
        /// `Connection: close`, `ok`.
        ConnectionClose,
        /// The head and half the body, then the rest after 300 ms.
        Slowly,
        /// `Slowly` for paths under `/slow`, `KeepAlive` for the others.
        SlowPaths,
    }

    struct Server {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        /// The request heads received, in order.
        heads: Arc<Mutex<Vec<String>>>,
        /// Connections the client closed (EOF seen while waiting for a request).
        closed_by_client: Arc<AtomicUsize>,
    }

    async fn server(answer: Answer) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let (a, h, c) = (accepted.clone(), heads.clone(), closed_by_client.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(stream, answer, h.clone(), c.clone()));
            }
        });
        Server {
            addr,
            accepted,
            heads,
            closed_by_client,
        }
    }

    async fn connection(
        mut s: TcpStream,
        answer: Answer,
        heads: Arc<Mutex<Vec<String>>>,
        closed: Arc<AtomicUsize>,
    ) {
        let mut buf = Vec::new();
        loop {
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head: Vec<u8> = buf.drain(..end).collect();
            heads
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let answer = match answer {
                Answer::SlowPaths if head.starts_with(b"GET /slow") => Answer::Slowly,
                Answer::SlowPaths => Answer::KeepAlive,
                a => a,
            };
            let reply: &[u8] = match answer {
                Answer::KeepAlive | Answer::ThenClose => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                }
                Answer::ConnectionClose => {
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
                }
                Answer::Slowly => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nsl",
                Answer::SlowPaths => unreachable!("resolved above"),
            };
            if s.write_all(reply).await.is_err() {
                return;
            }
            match answer {
                Answer::KeepAlive | Answer::SlowPaths => {}
                Answer::ThenClose | Answer::ConnectionClose => return,
                Answer::Slowly => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if s.write_all(b"ow").await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn pool(addr: std::net::SocketAddr, idle_timeout: Duration) -> Arc<HostPool> {
        pool_of(addr, idle_timeout, 8)
    }

    fn pool_of(
        addr: std::net::SocketAddr,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<HostPool> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let authority: Authority = addr.to_string().parse().unwrap();
        Arc::new(HostPool::new(
            connector,
            &Scheme::HTTP,
            &authority,
            max_idle,
            idle_timeout,
        ))
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::new(
            Source::full(bytes::Bytes::new()),
            None,
            None,
        ));
        *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
        req
    }

    async fn body(resp: Response<Incoming>) -> String {
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form_with_a_host() {
        let s = server(Answer::KeepAlive).await;
        let p = pool(s.addr, MINUTE);
        for i in 0..20 {
            let resp = p.send(get(s.addr, &format!("/x/{i}?q=1"))).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(body(resp).await, "ok");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
        let heads = s.heads.lock().unwrap();
        assert_eq!(heads.len(), 20);
        assert!(
            heads[3].starts_with("GET /x/3?q=1 HTTP/1.1\r\n"),
            "{}",
            heads[3]
        );
        let host = format!("host: {}\r\n", s.addr);
        assert!(
            heads[3].to_ascii_lowercase().contains(&host),
            "{}",
            heads[3]
        );
    }

    #[tokio::test]
    async fn the_host_header_leaves_out_a_default_port_and_a_set_one_is_kept() {
        let s = server(Answer::KeepAlive).await;
        let p = pool(s.addr, MINUTE);
        let mut req = get(s.addr, "/");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("client.example"));
        body(p.send(req).await.unwrap()).await;
        assert!(s.heads.lock().unwrap()[0].contains("host: client.example\r\n"));
        let default = HostPool::new(
            pool(s.addr, MINUTE).connector.clone(),
            &Scheme::HTTPS,
            &"api.example:443".parse().unwrap(),
            1,
            MINUTE,
        );
        assert_eq!(default.host, "api.example");
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_reused_and_nothing_fails() {
        let s = server(Answer::ThenClose).await;
        let p = pool(s.addr, MINUTE);
        for _ in 0..5 {
            let resp = p.send(get(s.addr, "/")).await.unwrap();
            assert_eq!(body(resp).await, "ok");
            // Time for the connection's task to see the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn connection_close_answers_are_not_reused() {
        let s = server(Answer::ConnectionClose).await;
        let p = pool(s.addr, MINUTE);
        for _ in 0..3 {
            let resp = p.send(get(s.addr, "/")).await.unwrap();
            assert_eq!(body(resp).await, "ok");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_still_reading_a_body_is_skipped_then_reused() {
        let s = server(Answer::Slowly).await;
        let p = pool(s.addr, MINUTE);
        let first = p.send(get(s.addr, "/first")).await.unwrap();
        // The first body is still arriving: the second request needs its own connection.
        let second = p.send(get(s.addr, "/second")).await.unwrap();
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(body(first).await, "slow");
        assert_eq!(body(second).await, "slow");
        // Both go back once their responses are read (a task waits for each).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.idle.lock().unwrap().len(), 2);
        // Both are idle again: no third connection.
        let third = p.send(get(s.addr, "/third")).await.unwrap();
        assert_eq!(body(third).await, "slow");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_still_streaming_do_not_take_the_idle_places() {
        let s = server(Answer::SlowPaths).await;
        let p = pool_of(s.addr, MINUTE, 1);
        let streaming = p.send(get(s.addr, "/slow")).await.unwrap();
        // The one idle place goes to the first connection that is free again, not to the
        // one still streaming: quick requests keep reusing it.
        for _ in 0..5 {
            assert_eq!(
                body(p.send(get(s.addr, "/quick")).await.unwrap()).await,
                "ok"
            );
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(body(streaming).await, "slow");
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_timeout() {
        let s = server(Answer::KeepAlive).await;
        let p = pool(s.addr, Duration::from_millis(200));
        body(p.send(get(s.addr, "/")).await.unwrap()).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.closed_by_client.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the idle connection stayed open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(p.idle.lock().unwrap().is_empty());
        // The next request opens a new one.
        body(p.send(get(s.addr, "/")).await.unwrap()).await;
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = pool(addr, MINUTE);
        match p.send(get(addr, "/")).await {
            Err(PoolError::Connect(e)) => assert!(!e.to_string().is_empty()),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
