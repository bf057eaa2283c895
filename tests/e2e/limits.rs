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

#[tokio::test]
async fn paths_that_could_escape_the_api_prefix_are_refused() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let addr = gw.addr("http");
    for path in [
        "/svc/../admin",
        "/svc/%2e%2e/admin",
        "/svc/.%2E/admin",
        "/svc/./echo",
        "/svc/a%2Fb/echo",
        "/svc/a%5cb/echo",
    ] {
        let answer = raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path} → {answer}");
        assert!(
            answer.contains("\"error\":\"bad_request\""),
            "{path} → {answer}"
        );
    }
    assert_eq!(backend.requests(), 0);
    // Dots inside names are fine.
    let r = client()
        .get(gw.url("/svc/v1.2/file.json/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn only_websocket_upgrades_are_tunnelled() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    // An h2c upgrade would open a raw tunnel past routing and keys: it is forwarded as a
    // plain request instead.
    let answer = raw(
        gw.addr("http"),
        b"GET /svc/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("\"upgrade\""),
        "{answer}"
    );
    assert!(!answer.contains("http2-settings"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stalls_its_upload_gets_408_not_a_backend_error() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[upstream]\nresponse_header_timeout_ms = 500\n",
        open_api(&backend.url(false)),
    ));
    let answer = raw(
        gw.addr("http"),
        b"POST /svc/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn connections_that_never_send_a_request_are_closed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[limits]\nheader_read_timeout_ms = 300\n",
        open_api(&backend.url(false)),
    ));
    // Nothing at all, and a few bytes of an HTTP/2 preface: both closed.
    for sent in [&b""[..], b"PRI *"] {
        let mut s = TcpStream::connect(gw.addr("http")).await.unwrap();
        s.write_all(sent).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "connection sending {sent:?} still open after 10 s"
        );
    }
}

#[tokio::test]
async fn http1_only_listeners_refuse_http2() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: "[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nhttp2 = false\n"
            .into(),
        api: open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    assert!(h2.get(gw.url("/svc/echo")).send().await.is_err());
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
}

#[tokio::test]
async fn at_the_connection_limit_new_clients_wait_until_a_slot_frees() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec_with(
        "[limits]\nmax_connections = 2\n",
        open_api(&backend.url(false)),
    ));
    let addr = gw.addr("http");
    // Two connections hold both slots (one idle, one after a served request).
    let idle = TcpStream::connect(addr).await.unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /svc/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    busy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // A third is not served while they are open...
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /svc/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(700), third.read_to_end(&mut out)).await;
    assert!(
        early.is_err() && out.is_empty(),
        "served past the limit: {out:?}"
    );
    // ...and is as soon as one closes.
    drop(idle);
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    drop(busy);
}

#[tokio::test]
async fn a_backend_that_never_answers_the_connect_is_a_504() {
    let (addr, _held, _sock) = outpost_tests::black_hole();
    let api = json!({
        "backends": [{ "id": "hole", "urls": [format!("http://{addr}")] }],
        "apis": [{ "id": "hole", "path": "/hole", "backend": "hole", "subscription_required": false,
                   "operations": [{ "id": "h", "method": "*", "url_template": "/*" }] }]
    });
    let gw = Gateway::start(spec_with("[upstream]\nconnect_timeout_ms = 300\n", api));
    let started = std::time::Instant::now();
    let r = client().get(gw.url("/hole/x")).send().await.unwrap();
    let body = assert_error(r, 504, "backend_timeout").await;
    assert!(
        body["message"].as_str().unwrap().contains("connect"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
