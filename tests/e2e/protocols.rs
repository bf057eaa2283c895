//! Streaming, HTTP/2 (h2c), gRPC trailers and WebSocket through the gateway.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outpost_tests::gateway::LISTENER_HTTP;
use outpost_tests::{Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{client, open_api};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn large_uploads_and_downloads_stream_in_bounded_memory() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let c = client();
    let baseline = gw.rss_kib();

    // 2 GiB down: counted as it arrives.
    let size = 2048 * MIB;
    let resp = c
        .get(gw.url(&format!("/svc/bytes/{size}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len() as u64;
    }
    assert_eq!(got, size);

    // 2 GiB up, produced as it is sent.
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let n = (size / chunk.len() as u64) as usize;
    let body =
        futures_util::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = c
        .post(gw.url("/svc/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["received"], size);

    let peak = gw.peak_rss_kib();
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS {peak} KiB after 4 GiB through (baseline {baseline} KiB): the body was buffered"
    );
}

#[tokio::test]
async fn server_sent_events_pass_through_unbuffered() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let resp = client().get(gw.url("/svc/gated")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    // The backend sends "first" and then waits for us: if the gateway buffered the answer,
    // this read would never complete.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first event not passed through while the stream is open")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first\n");
    backend.open_gate();
    let mut rest = Vec::new();
    while let Some(c) = stream.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert_eq!(rest, b"second\n");
}

#[tokio::test]
async fn uploads_reach_the_backend_while_still_being_sent() {
    let backend = Backend::start().await;
    // A response-header timeout shorter than the upload: it counts from the end of the body.
    let gw = Gateway::start(GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n[upstream]\nresponse_header_timeout_ms = 400\n"),
        api: open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let c = client();
    let url = gw.url("/svc/upload");
    let req = tokio::spawn(async move {
        c.post(url)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap()
    });
    for i in 1..=8u64 {
        tx.send(Ok(Bytes::from(vec![b'p'; 64 * 1024])))
            .await
            .unwrap();
        // The backend sees each piece before the next is produced.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while backend.received() < i * 64 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "upload is being buffered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(tx);
    let resp = req.await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "an upload longer than the response timeout still works"
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap()["received"],
        8 * 64 * 1024
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_downstream() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let r = c
        .get(gw.url("/svc/echo"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // Forwarded to an HTTP/1.1 backend, with the Host the backend expects and one Cookie.
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["cookie"], json!(["a=1; b=2"]));
    assert_eq!(v["headers"]["host"][0], backend.addr.to_string().as_str());
    assert!(v["headers"]["x-forwarded-host"][0].as_str().is_some());
}

#[tokio::test]
async fn grpc_over_h2_keeps_trailers() {
    let backend = Backend::start().await;
    let api = json!({
        "backends": [{ "id": "g", "urls": [backend.url(false)], "http2": true }],
        "apis": [{ "id": "grpc", "path": "/pkg.Service", "backend": "g",
                   "subscription_required": false,
                   "operations": [{ "id": "m", "method": "POST", "url_template": "/*" }] }]
    });
    let gw = Gateway::start(GatewaySpec::http(api));
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = http::Request::post(gw.url("/pkg.Service/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(&collected.to_bytes()[..], b"hello");
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let url = format!("ws://{}/svc/ws", gw.addr("http"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("ws handshake");
    assert_eq!(resp.status(), 101);
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed, Message::binary(vec![1u8, 2, 3]));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_backend_body_that_goes_quiet_is_cut_off() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n[upstream]\nbody_idle_timeout_ms = 300\n"),
        api: open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    // The backend sends "first" and then nothing (the gate is never opened).
    let resp = client().get(gw.url("/svc/gated")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"first\n");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stalled body was not cut off");
    assert!(
        matches!(end, Some(Err(_))),
        "the client must see an abnormal end, got {end:?}"
    );
    // The gateway itself is fine.
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
