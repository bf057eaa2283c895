//! Limits, timeouts, malformed input and backend failures: each answered, none fatal.

use std::time::Duration;

use outpost_tests::gateway::LISTENER_HTTP;
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{assert_error, client, open_api};

fn spec_with(manifest_extra: &str, api: serde_json::Value) -> GatewaySpec {
    GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n{manifest_extra}"),
        api,
        files: Vec::new(),
        watch_ms: 100,
    }
}

/// Sends raw bytes and reads the answer until the server closes or `wait` passes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[limits]\nmax_header_bytes = 8192\n",
        open_api(&backend.url(false)),
    ));
    let c = client();
    // Over the limit but within what the parser buffers: answered with the JSON error.
    let r = c
        .get(gw.url("/svc/echo"))
        .header("x-big", "a".repeat(10_000))
        .send()
        .await
        .unwrap();
    assert_error(r, 431, "headers_too_large").await;
    // Far over: refused by the HTTP parser itself, still 431.
    let r = c
        .get(gw.url("/svc/echo"))
        .header("x-big", "a".repeat(200_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // Under the limit passes, and the gateway is still fine.
    let r = c
        .get(gw.url("/svc/echo"))
        .header("x-big", "a".repeat(4_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.requests(), 1);
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[limits]\nmax_body_bytes = 1000\n",
        open_api(&backend.url(false)),
    ));
    let c = client();
    // Declared by Content-Length: refused before the backend is called.
    let r = c
        .post(gw.url("/svc/upload"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "body_too_large").await;
    assert_eq!(backend.requests(), 0);
    // Chunked, no length: cut off once the limit passes.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b'y'; 600])).collect();
    let r = c
        .post(gw.url("/svc/upload"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "body_too_large").await;
    assert!(
        backend.received() <= 1200,
        "backend got {}",
        backend.received()
    );
    // Within the limit passes.
    let r = c
        .post(gw.url("/svc/upload"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["received"],
        1000
    );
}

#[tokio::test]
async fn slow_clients_are_cut_off_by_the_header_read_timeout() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[limits]\nheader_read_timeout_ms = 300\n",
        open_api(&backend.url(false)),
    ));
    let started = std::time::Instant::now();
    // Half a request head, then silence: the gateway must close the connection.
    let mut s = TcpStream::connect(gw.addr("http")).await.unwrap();
    s.write_all(b"GET /svc/echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10 s");
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(backend.requests(), 0);
    // Others are still served.
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_gateway_carries_on() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let addr = gw.addr("http");
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /svc/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET /svc/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
        b"GET /svc/e cho HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /svc/echo HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let answer = raw(addr, bad, Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} → {answer:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn backend_down_is_502_and_backend_slow_is_504() {
    let backend = Backend::start().await;
    let api = json!({
        "backends": [
            { "id": "up", "urls": [backend.url(false)] },
            { "id": "down", "urls": [format!("http://127.0.0.1:{}", closed_port())] }
        ],
        "apis": [
            { "id": "up", "path": "/up", "backend": "up", "subscription_required": false,
              "operations": [{ "id": "u", "method": "*", "url_template": "/*" }] },
            { "id": "down", "path": "/down", "backend": "down", "subscription_required": false,
              "operations": [{ "id": "d", "method": "*", "url_template": "/*" }] }
        ]
    });
    let gw = Gateway::start(spec_with(
        "[upstream]\nresponse_header_timeout_ms = 500\n",
        api,
    ));
    let c = client();
    let r = c.get(gw.url("/down/echo")).send().await.unwrap();
    let body = assert_error(r, 502, "backend_unreachable").await;
    assert!(body["message"].as_str().unwrap().contains("down"));
    let r = c.get(gw.url("/up/slow/3000")).send().await.unwrap();
    assert_error(r, 504, "backend_timeout").await;
    let r = c.get(gw.url("/up/slow/10")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Backend failures are logged with the request id.
    let logged = gw.wait_for_log("Backend failure.", 2);
    assert!(logged
        .iter()
        .all(|l| l["request_id"].as_str().is_some_and(|s| !s.is_empty())));
}
