//! TLS: SNI with several certificates, ALPN h2, session resumption, downstream client
//! certificates, and backends over TLS with a custom CA and a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use outpost_tests::certs::sha256_hex;
use outpost_tests::{Backend, BackendOptions, Ca, Gateway, GatewaySpec};
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::open_api;

struct Pki {
    ca: Ca,
    client_ca: Ca,
    files: Vec<(String, String)>,
}

fn pki() -> Pki {
    let ca = Ca::new("listener CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test", "*.b.test"]);
    let client_ca = Ca::new("client CA");
    let files = vec![
        ("a.crt".into(), a.cert_pem),
        ("a.key".into(), a.key_pem),
        ("b.crt".into(), b.cert_pem),
        ("b.key".into(), b.key_pem),
        ("client-ca.pem".into(), client_ca.cert_pem.clone()),
    ];
    Pki {
        ca,
        client_ca,
        files,
    }
}

const TLS_LISTENERS: &str = r#"
[[listeners]]
name = "plain"
address = "127.0.0.1:0"

[[listeners]]
name = "https"
address = "127.0.0.1:0"

[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "a.crt"
key = "a.key"

[[listeners.tls.certificates]]
hostnames = ["b.test", "*.b.test"]
cert = "b.crt"
key = "b.key"

[[listeners]]
name = "mtls"
address = "127.0.0.1:0"

[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "a.crt"
key = "a.key"

[listeners.tls.client_auth]
ca = "client-ca.pem"
required = true
forward_thumbprint_header = "X-Client-Cert-Thumbprint"

[[listeners]]
name = "mtls-optional"
address = "127.0.0.1:0"

[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "a.crt"
key = "a.key"

[listeners.tls.client_auth]
ca = "client-ca.pem"
required = false
forward_thumbprint_header = "X-Client-Cert-Thumbprint"
"#;

fn https_client(
    ca: &Ca,
    addr: SocketAddr,
    identity: Option<&outpost_tests::Leaf>,
) -> reqwest::Client {
    outpost_tests::init_crypto();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .resolve("a.test", addr)
        .resolve("b.test", addr)
        .resolve("x.b.test", addr);
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn rustls_client(ca: &Ca) -> Arc<rustls::ClientConfig> {
    outpost_tests::init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One TLS connection: the certificate the server chose, how the handshake went, and the
/// answer to a `GET /healthz`.
async fn handshake(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> (Vec<u8>, Option<rustls::HandshakeKind>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut tls = connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    let kind = conn.handshake_kind();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    (leaf, kind, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn sni_picks_the_certificate_alpn_offers_h2_and_sessions_resume() {
    let backend = Backend::start().await;
    let pki = pki();
    let gw = Gateway::start(GatewaySpec {
        manifest: TLS_LISTENERS.into(),
        api: open_api(&backend.url(false)),
        files: pki.files.clone(),
        watch_ms: 100,
    });
    let addr = gw.addr("https");
    let a_der = &pki.files[0].1;
    let cfg = rustls_client(&pki.ca);

    let (leaf_a, _, answer) = handshake(cfg.clone(), addr, "a.test").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (leaf_b, _, _) = handshake(cfg.clone(), addr, "b.test").await;
    let (leaf_wild, _, _) = handshake(cfg.clone(), addr, "x.b.test").await;
    assert_ne!(leaf_a, leaf_b, "SNI selects a different certificate");
    assert_eq!(leaf_b, leaf_wild, "wildcard hostname");
    assert!(a_der.contains("BEGIN CERTIFICATE"));

    // Resumption: the same client config reconnecting resumes instead of a full handshake.
    let fresh = rustls_client(&pki.ca);
    let (_, first, _) = handshake(fresh.clone(), addr, "a.test").await;
    assert_eq!(first, Some(rustls::HandshakeKind::Full));
    let (_, second, _) = handshake(fresh.clone(), addr, "a.test").await;
    assert_eq!(second, Some(rustls::HandshakeKind::Resumed));

    // ALPN: HTTP/2 over TLS, proxied.
    let c = https_client(&pki.ca, addr, None);
    let r = c
        .get(format!("https://b.test:{}/svc/echo", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "https");
}

#[tokio::test]
async fn client_certificates_are_required_verified_and_forwarded() {
    let backend = Backend::start().await;
    let pki = pki();
    let gw = Gateway::start(GatewaySpec {
        manifest: TLS_LISTENERS.into(),
        api: open_api(&backend.url(false)),
        files: pki.files.clone(),
        watch_ms: 100,
    });
    let good = pki.client_ca.client("client-1");
    let stranger = Ca::new("other CA").client("intruder");

    let mtls = gw.addr("mtls");
    let url = format!("https://a.test:{}/svc/echo", mtls.port());
    // No certificate, or one from an unknown CA: refused.
    assert!(https_client(&pki.ca, mtls, None)
        .get(&url)
        .send()
        .await
        .is_err());
    assert!(https_client(&pki.ca, mtls, Some(&stranger))
        .get(&url)
        .send()
        .await
        .is_err());
    // A good certificate: the backend sees its thumbprint; a client-sent header is replaced.
    let r = https_client(&pki.ca, mtls, Some(&good))
        .get(&url)
        .header("X-Client-Cert-Thumbprint", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let seen = v["headers"]["x-client-cert-thumbprint"].as_array().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0], sha256_hex(&good.der).as_str());

    // Optional client auth: no certificate passes, and a forged thumbprint is dropped.
    let opt = gw.addr("mtls-optional");
    let r = https_client(&pki.ca, opt, None)
        .get(format!("https://a.test:{}/svc/echo", opt.port()))
        .header("X-Client-Cert-Thumbprint", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["headers"].get("x-client-cert-thumbprint").is_none(),
        "{v}"
    );
}

#[tokio::test]
async fn backends_over_tls_with_custom_ca_and_client_certificate() {
    let backend_ca = Ca::new("backend CA");
    let gateway_client_ca = Ca::new("gateway client CA");
    let backend = Backend::start_with(BackendOptions {
        tls: Some(backend_ca.server(&["127.0.0.1", "localhost"])),
        client_ca_pem: Some(gateway_client_ca.cert_pem.clone()),
    })
    .await;
    let id = gateway_client_ca.client("gateway");
    let other_ca = Ca::new("unrelated CA");
    let url = format!("https://localhost:{}", backend.addr.port());
    let api = json!({
        "backends": [
            { "id": "tls", "urls": [url],
              "tls": { "ca_pem": backend_ca.cert_pem, "client_cert_pem": id.cert_pem,
                       "client_key_pem": id.key_pem } },
            { "id": "tls-h2", "urls": [url], "http2": true,
              "tls": { "ca_pem": backend_ca.cert_pem, "client_cert_pem": id.cert_pem,
                       "client_key_pem": id.key_pem } },
            { "id": "untrusted", "urls": [url],
              "tls": { "ca_pem": other_ca.cert_pem, "client_cert_pem": id.cert_pem,
                       "client_key_pem": id.key_pem } },
            { "id": "no-cert", "urls": [url], "tls": { "ca_pem": backend_ca.cert_pem } }
        ],
        "apis": [
            { "id": "tls", "path": "/tls", "backend": "tls", "subscription_required": false,
              "operations": [{ "id": "a", "method": "*", "url_template": "/*" }] },
            { "id": "tls-h2", "path": "/tls-h2", "backend": "tls-h2", "subscription_required": false,
              "operations": [{ "id": "a", "method": "*", "url_template": "/*" }] },
            { "id": "untrusted", "path": "/untrusted", "backend": "untrusted",
              "subscription_required": false,
              "operations": [{ "id": "a", "method": "*", "url_template": "/*" }] },
            { "id": "no-cert", "path": "/no-cert", "backend": "no-cert",
              "subscription_required": false,
              "operations": [{ "id": "a", "method": "*", "url_template": "/*" }] }
        ]
    });
    let gw = Gateway::start(GatewaySpec::http(api));
    let c = crate::client();
    let r = c.get(gw.url("/tls/whoami")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["client_cert"], true);
    // HTTP/2 is negotiated only with backends configured for it.
    let r = c.get(gw.url("/tls/echo")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["version"], "HTTP/1.1");
    let r = c.get(gw.url("/tls-h2/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], "HTTP/2.0");
    let r = c.get(gw.url("/untrusted/whoami")).send().await.unwrap();
    crate::assert_error(r, 502, "backend_unreachable").await;
    let r = c.get(gw.url("/no-cert/whoami")).send().await.unwrap();
    assert_eq!(r.status(), 502);
}
