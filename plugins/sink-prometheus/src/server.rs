//! The `/metrics` listener: hyper (HTTP/1.1) on a single-threaded tokio runtime that runs on a
//! thread of its own, never on the gateway's runtime or its request threads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;

use outpost_plugin_sdk::{host, level};

/// The exact content type of the text format 0.0.4.
pub const CONTENT_TYPE_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the listener serves: renders the exposition on each scrape.
pub trait Render: Send + Sync + 'static {
    /// The body of a scrape, or why it could not be rendered.
    fn render(&self) -> Result<Vec<u8>, String>;
}

/// A running listener; dropping it stops it and frees the port.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `path` on an already bound listener.
    pub fn start(
        listener: std::net::TcpListener,
        path: String,
        render: Arc<dyn Render>,
    ) -> std::io::Result<Server> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let path: Arc<str> = path.into();
        let thread = std::thread::Builder::new()
            .name("outpost-prometheus".into())
            .spawn(move || runtime.block_on(serve(listener, path, render, stopped)))?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    path: Arc<str>,
    render: Arc<dyn Render>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            host::log(level::ERROR, &format!("Prometheus sink cannot serve: {e}."));
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    host::log(level::WARN, &format!("Prometheus sink: accept failed: {e}."));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (path, render) = (path.clone(), render.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (path, render) = (path.clone(), render.clone());
                async move { Ok::<_, Infallible>(answer(&req, &path, &*render)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One scrape: GET or HEAD on the path; 404 elsewhere, 405 for other methods.
fn answer(req: &Request<Incoming>, path: &str, render: &dyn Render) -> Response<Full<Bytes>> {
    if req.uri().path() != path {
        return text(StatusCode::NOT_FOUND, "Not found.\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Use GET or HEAD.\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match render.render() {
        Ok(body) => {
            // hyper sends the head only for HEAD, with this body's Content-Length.
            let mut r = Response::new(Full::new(Bytes::from(body)));
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_004));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            host::log(
                level::ERROR,
                &format!("Prometheus sink could not render the metrics: {e}."),
            );
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The metrics could not be rendered; see the gateway's log.\n",
            )
        }
    }
}
