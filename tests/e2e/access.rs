//! Access policies (`plugins/policy-access`) against the real gateway: `ip-filter` on IPv4 (and
//! IPv6 when the machine has `::1`), `validate-jwt` with keys from a real JWKS / OpenID server
//! the test runs (fetch counting, key rotation, refusals with `WWW-Authenticate`),
//! `authentication-basic` as the backend sees it, and `validate-client-certificate` on a TLS
//! listener with optional client authentication.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outpost_tests::certs::sha256_hex;
use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{Backend, Ca, Gateway, GatewaySpec, Leaf};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::client;

/// The access and transform libraries (transform's `set-header` shows `jwt.*` variables).
fn plugins() -> String {
    format!(
        "[[plugins]]\nname = \"access\"\npath = \"{}\"\n\n[[plugins]]\nname = \"transform\"\npath = \"{}\"\n",
        plugin_library("outpost_policy_access").display(),
        plugin_library("outpost_policy_transform").display(),
    )
}

/// One open API at `/svc`; each operation is `(id, template, inbound policies)`.
fn api(backend: &str, operations: &[(&str, &str, Value)]) -> Value {
    let ops: Vec<Value> = operations
        .iter()
        .map(|(id, template, inbound)| {
            json!({ "id": id, "method": "*", "url_template": template,
                    "policies": { "inbound": inbound } })
        })
        .collect();
    json!({
        "version": "a1",
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": ops }],
    })
}

/// Checks a policy's refusal: status, JSON code and reason; returns the body.
async fn refused(resp: reqwest::Response, status: u16, code: &str, reason: Option<&str>) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("json error body");
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["statusCode"], status, "{body}");
    if let Some(r) = reason {
        assert_eq!(body["reason"], r, "{body}");
    }
    body
}

#[tokio::test]
async fn ip_filter_allows_and_forbids_client_addresses() {
    let backend = Backend::start().await;
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let mut manifest = format!("{LISTENER_HTTP}\n{}", plugins());
    if v6 {
        manifest.push_str("\n[[listeners]]\nname = \"v6\"\naddress = \"[::1]:0\"\n");
    }
    let ops = [
        (
            "allow",
            "/allow/echo",
            json!([{ "policy": "ip-filter", "config": { "action": "allow", "addresses": ["127.0.0.1"] } }]),
        ),
        (
            "forbid",
            "/forbid/echo",
            json!([{ "policy": "ip-filter", "config": { "action": "forbid", "ranges": ["127.0.0.0/8"] } }]),
        ),
        (
            "others",
            "/others/echo",
            json!([{ "policy": "ip-filter", "config": { "action": "allow", "ranges": ["10.0.0.0/8"],
                      "address_ranges": [{ "from": "192.0.2.1", "to": "192.0.2.9" }] } }]),
        ),
        (
            "v6",
            "/v6/echo",
            json!([{ "policy": "ip-filter", "config": { "action": "allow", "addresses": ["::1"] } }]),
        ),
    ];
    let gw = Gateway::start(GatewaySpec {
        manifest,
        api: api(&backend.url(false), &ops),
        files: Vec::new(),
        watch_ms: 0,
    });
    let c = client();

    let r = c.get(gw.url("/svc/allow/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let before = backend.requests();
    for path in ["/svc/forbid/echo", "/svc/others/echo", "/svc/v6/echo"] {
        let r = c.get(gw.url(path)).send().await.unwrap();
        let body = refused(r, 403, "ip_forbidden", None).await;
        assert!(
            body["message"].as_str().unwrap().contains("127.0.0.1"),
            "{body}"
        );
    }
    assert_eq!(backend.requests(), before, "refused before the backend");

    if v6 {
        let base = format!("http://{}", gw.addr("v6"));
        let r = c.get(format!("{base}/svc/v6/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200, "::1 is allowed on /v6");
        let r = c
            .get(format!("{base}/svc/allow/echo"))
            .send()
            .await
            .unwrap();
        refused(r, 403, "ip_forbidden", None).await;
        // ::1 is not in 127.0.0.0/8.
        let r = c
            .get(format!("{base}/svc/forbid/echo"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    } else {
        eprintln!("no ::1 on this machine: the IPv6 part is skipped");
    }
}

/// A tiny identity provider on 127.0.0.1:0: `/keys` (the JWKS, replaceable) and
/// `/.well-known/openid-configuration`, counting fetches of each.
struct Idp {
    addr: SocketAddr,
    jwks: Arc<Mutex<String>>,
    jwks_hits: Arc<AtomicUsize>,
    oidc_hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    async fn start(jwks: String) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let jwks = Arc::new(Mutex::new(jwks));
        let jwks_hits = Arc::new(AtomicUsize::new(0));
        let oidc_hits = Arc::new(AtomicUsize::new(0));
        let (j, jh, oh) = (jwks.clone(), jwks_hits.clone(), oidc_hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (j, jh, oh) = (j.clone(), jh.clone(), oh.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (j, jh, oh) = (j.clone(), jh.clone(), oh.clone());
                        async move {
                            let (status, body) = match req.uri().path() {
                                "/keys" => {
                                    jh.fetch_add(1, Ordering::SeqCst);
                                    (StatusCode::OK, j.lock().unwrap().clone())
                                }
                                "/.well-known/openid-configuration" => {
                                    oh.fetch_add(1, Ordering::SeqCst);
                                    let doc = json!({
                                        "issuer": "https://idp.test/",
                                        "jwks_uri": format!("http://{addr}/keys"),
                                    });
                                    (StatusCode::OK, doc.to_string())
                                }
                                _ => (StatusCode::NOT_FOUND, String::new()),
                            };
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            *r.status_mut() = status;
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Idp {
            addr,
            jwks,
            jwks_hits,
            oidc_hits,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn jwks_hits(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }
}

/// base64url without padding (JWS encoding).
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len() * 4 / 3 + 3);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// An ES256 signing key and its public JWK. The key is a fresh P-256 key the harness makes for
/// a client certificate; rustls' ring provider signs with it.
struct Es256 {
    kid: String,
    key: Arc<dyn rustls::sign::SigningKey>,
    jwk: Value,
}

/// A DER ECDSA signature (`SEQUENCE { r INTEGER, s INTEGER }`) as JWS wants it: r and s as
/// 32-byte big-endian numbers.
fn fixed_p256_signature(der: &[u8]) -> Vec<u8> {
    // 0x30 len 0x02 len r 0x02 len s (lengths < 128 for P-256).
    assert_eq!(der[0], 0x30, "DER sequence");
    let mut out = Vec::with_capacity(64);
    let mut i = 2;
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "DER integer");
        let len = der[i + 1] as usize;
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

impl Es256 {
    fn new(kid: &str) -> Es256 {
        use rustls_pki_types::pem::PemObject;
        let pem = Ca::new("jwt keys").client(kid).key_pem;
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("pkcs8");
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&der).expect("P-256 key");
        let spki = key.public_key().expect("public key");
        // A P-256 SubjectPublicKeyInfo ends with the uncompressed point 04 || x || y.
        let point = &spki.as_ref()[spki.as_ref().len() - 65..];
        assert_eq!(point[0], 4);
        let jwk = json!({ "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                          "x": b64url(&point[1..33]), "y": b64url(&point[33..65]) });
        Es256 {
            kid: kid.to_owned(),
            key,
            jwk,
        }
    }

    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": kid });
        let message = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signer = self
            .key
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
            .expect("ES256 signer");
        let der = signer.sign(message.as_bytes()).expect("sign");
        format!("{message}.{}", b64url(&fixed_p256_signature(&der)))
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

fn jwks(keys: &[&Es256]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({ "sub": "alice", "iss": "https://idp.test/", "aud": "api://orders",
            "exp": now() + 600, "scope": "orders.read" })
}

/// The seconds between key-id-driven refetches in the JWT test.
const MIN_REFRESH_S: u64 = 4;

#[tokio::test]
async fn validate_jwt_fetches_keys_once_follows_rotation_and_refuses_with_a_challenge() {
    let backend = Backend::start().await;
    let k1 = Es256::new("k1");
    let k2 = Es256::new("k2");
    let idp = Idp::start(jwks(&[&k1])).await;
    let validate = |source: Value| {
        let mut config = json!({ "issuers": ["https://idp.test/"], "audiences": ["api://orders"],
                                 "min_refresh_interval_s": MIN_REFRESH_S });
        for (k, v) in source.as_object().unwrap() {
            config[k] = v.clone();
        }
        json!([
            { "policy": "validate-jwt", "config": config },
            { "policy": "set-header", "config": { "name": "x-jwt-sub", "value": "{jwt.sub}" } }
        ])
    };
    let ops = [
        (
            "jwks",
            "/jwks/echo",
            validate(json!({ "jwks_uri": idp.url("/keys") })),
        ),
        (
            "oidc",
            "/oidc/echo",
            validate(json!({ "openid_config_url": idp.url("/.well-known/openid-configuration") })),
        ),
    ];
    let gw = Gateway::start(GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n{}", plugins()),
        api: api(&backend.url(false), &ops),
        files: Vec::new(),
        watch_ms: 0,
    });
    let c = client();
    let url = gw.url("/svc/jwks/echo");
    let call = |token: String| c.get(&url).bearer_auth(token).send();

    // No token: a bare challenge, and nothing fetched.
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    refused(r, 401, "jwt_invalid", Some("missing_token")).await;
    assert_eq!(idp.jwks_hits(), 0);

    // The first token fetches the JWKS; many more use the cached keys.
    let r = call(k1.sign(&claims())).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-jwt-sub"], json!(["alice"]), "{v}");
    let many: Vec<_> = (0..8).map(|_| call(k1.sign(&claims()))).collect();
    for r in futures_util::future::join_all(many).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(idp.jwks_hits(), 1, "one fetch for many requests");

    // Refusals carry the reason and a Bearer challenge, and never reach the backend.
    let before = backend.requests();
    let mut expired = claims();
    expired["exp"] = json!(now() - 60);
    let mut elsewhere = claims();
    elsewhere["aud"] = json!("api://billing");
    for (claims, reason) in [(expired, "expired"), (elsewhere, "wrong_audience")] {
        let r = call(k1.sign(&claims)).await.unwrap();
        let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(
            www.starts_with("Bearer error=\"invalid_token\", error_description=\""),
            "{www}"
        );
        refused(r, 401, "jwt_invalid", Some(reason)).await;
    }
    let forged = format!("{}x", k1.sign(&claims()));
    let r = call(forged).await.unwrap();
    refused(r, 401, "jwt_invalid", Some("bad_signature")).await;
    assert_eq!(backend.requests(), before);
    assert_eq!(idp.jwks_hits(), 1);

    // Key rotation: the IdP publishes k2; a token signed by it makes one refetch and passes.
    *idp.jwks.lock().unwrap() = jwks(&[&k1, &k2]);
    tokio::time::sleep(Duration::from_millis(MIN_REFRESH_S * 1000 + 100)).await;
    let r = call(k2.sign(&claims())).await.unwrap();
    let refetched = Instant::now();
    assert_eq!(r.status(), 200);
    assert_eq!(idp.jwks_hits(), 2);
    assert_eq!(call(k2.sign(&claims())).await.unwrap().status(), 200);
    assert_eq!(call(k1.sign(&claims())).await.unwrap().status(), 200);
    // A flood of made-up key ids right after does not reach the IdP.
    for i in 0..5 {
        let r = call(k2.sign_as(&format!("made-up-{i}"), &claims()))
            .await
            .unwrap();
        refused(r, 401, "jwt_invalid", Some("unknown_key")).await;
    }
    if refetched.elapsed() < Duration::from_secs(MIN_REFRESH_S) {
        assert_eq!(
            idp.jwks_hits(),
            2,
            "unknown key ids must not refetch within the interval"
        );
    } else {
        // A very slow machine: the interval passed during the flood; at most one more fetch.
        assert!(idp.jwks_hits() <= 3, "{}", idp.jwks_hits());
    }

    // OpenID configuration → its jwks_uri → keys.
    let jwks_before = idp.jwks_hits();
    let r = c
        .get(gw.url("/svc/oidc/echo"))
        .bearer_auth(k2.sign(&claims()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-jwt-sub"], json!(["alice"]), "{v}");
    assert_eq!(idp.oidc_hits.load(Ordering::SeqCst), 1);
    assert_eq!(idp.jwks_hits(), jwks_before + 1);
    let r = c
        .get(gw.url("/svc/oidc/echo"))
        .bearer_auth(k1.sign(&claims()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(idp.oidc_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn authentication_basic_replaces_the_clients_credentials() {
    let backend = Backend::start().await;
    let ops = [(
        "basic",
        "/basic/echo",
        json!([{ "policy": "authentication-basic",
                 "config": { "username": "gateway", "password": "s3cret" } }]),
    )];
    let gw = Gateway::start(GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n{}", plugins()),
        api: api(&backend.url(false), &ops),
        files: Vec::new(),
        watch_ms: 0,
    });
    let r = client()
        .get(gw.url("/svc/basic/echo"))
        .header("authorization", "Bearer the-clients-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // base64("gateway:s3cret")
    assert_eq!(
        v["headers"]["authorization"],
        json!(["Basic Z2F0ZXdheTpzM2NyZXQ="]),
        "{v}"
    );
}

const MTLS_LISTENER: &str = r#"
[[listeners]]
name = "mtls"
address = "127.0.0.1:0"

[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "a.crt"
key = "a.key"

[listeners.tls.client_auth]
ca = "client-ca.pem"
required = false
"#;

fn https_client(ca: &Ca, addr: SocketAddr, identity: Option<&Leaf>) -> reqwest::Client {
    outpost_tests::init_crypto();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .resolve("a.test", addr);
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn validate_client_certificate_matches_the_thumbprint() {
    let backend = Backend::start().await;
    let server_ca = Ca::new("listener CA");
    let server = server_ca.server(&["a.test"]);
    let client_ca = Ca::new("client CA");
    let good = client_ca.client("billing");
    let other = client_ca.client("billing");
    let ops = [(
        "cert",
        "/cert/echo",
        json!([{ "policy": "validate-client-certificate",
                 "config": { "identities": [{ "thumbprint": sha256_hex(&good.der) }] } }]),
    )];
    let gw = Gateway::start(GatewaySpec {
        manifest: format!("{LISTENER_HTTP}\n{MTLS_LISTENER}\n{}", plugins()),
        api: api(&backend.url(false), &ops),
        files: vec![
            ("a.crt".into(), server.cert_pem),
            ("a.key".into(), server.key_pem),
            ("client-ca.pem".into(), client_ca.cert_pem.clone()),
        ],
        watch_ms: 0,
    });
    let addr = gw.addr("mtls");
    let url = format!("https://a.test:{}/svc/cert/echo", addr.port());

    let r = https_client(&server_ca, addr, Some(&good))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the certificate with the configured thumbprint passes (needs the gateway's \
         outpost.client-cert property)"
    );

    let before = backend.requests();
    let r = https_client(&server_ca, addr, Some(&other))
        .get(&url)
        .send()
        .await
        .unwrap();
    refused(
        r,
        403,
        "client_certificate_invalid",
        Some("identity_mismatch"),
    )
    .await;
    let r = https_client(&server_ca, addr, None)
        .get(&url)
        .send()
        .await
        .unwrap();
    refused(r, 403, "client_certificate_invalid", Some("missing")).await;
    // Plain HTTP has no client certificate either.
    let r = client().get(gw.url("/svc/cert/echo")).send().await.unwrap();
    refused(r, 403, "client_certificate_invalid", Some("missing")).await;
    assert_eq!(backend.requests(), before);
}
