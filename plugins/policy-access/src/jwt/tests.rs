//! `validate-jwt` through the SDK's test harness: tokens made with `jsonwebtoken`, keys from
//! rcgen (EC, Ed25519) and a fixed RSA test key, JWKS and OpenID fetches answered by the test.

use std::cell::Cell;

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use outpost_plugin_sdk::api::PolicyBox;
use outpost_plugin_sdk::serde_json::{self, json, Value};
use outpost_plugin_sdk::testing::{
    on_request, on_resume, policy, TestAnswer, TestContext, TestHead, TestRequest,
};
use outpost_plugin_sdk::{Flow, Token as HostToken};

use super::ValidateJwt;

thread_local! {
    static CLOCK_OFFSET_NS: Cell<u64> = const { Cell::new(0) };
}

/// How far the tests moved the monotonic clock (per test thread).
pub(super) fn clock_offset_ns() -> u64 {
    CLOCK_OFFSET_NS.with(Cell::get)
}

fn advance(secs: u64) {
    CLOCK_OFFSET_NS.with(|c| c.set(c.get() + secs * 1_000_000_000));
}

const RSA_PRIVATE: &str = include_str!("testdata/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("testdata/rsa-public.pem");
/// The modulus and exponent of the test RSA key, base64url.
const RSA_N: &str = "z3SHBl7IxsqIq-9czLSel2CM9zTW4KLo8Tx8dRczVxKV6LE31pPdE0A6eowyHrQtnI_Zv2_MSkOxJxMm_YafpiXATdbeH8_A_asDsu8hVztoJQa5Jhn1lSHaFSv61SiklBGmX--K6o7fo5Y69hv64TnM2HN57AdlLgnXULmDwGVWtZHHRbo2skTo-G29d3DuTg7ajR1Hi2YEB9fUHmPjwV2hUQdIHrcGI9DSl55IkHLSWAhmQ6wwb_KaAkflYoudMtcJSg7fY47Lfy0PP0ajJpk-ao5RyWxjnW_lmYMxfhmd-QawP4O-RSFYJiXLScVq_wI_96YZbT0yb2rlGChb1w";
const RSA_E: &str = "AQAB";
const SECRET: &[u8] = b"a test secret that is long enough";

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> i64 {
    (outpost_plugin_sdk::host::now_unix_ms() / 1000) as i64
}

/// A signing key and its public JWK.
struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn rsa(alg: Algorithm, kid: &str) -> Signer {
        Signer {
            alg,
            key: EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "n": RSA_N, "e": RSA_E}),
        }
    }

    fn ec(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        Signer {
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])}),
        }
    }

    fn ed(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Signer {
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                        "x": b64url(kp.public_key_raw())}),
        }
    }

    fn hmac(alg: Algorithm) -> Signer {
        Signer {
            alg,
            key: EncodingKey::from_secret(SECRET),
            jwk: json!({"kty": "oct", "k": b64url(SECRET)}),
        }
    }

    fn kid(&self) -> Option<String> {
        self.jwk["kid"].as_str().map(str::to_owned)
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = self.kid();
        encode(&h, claims, &self.key).unwrap()
    }

    /// Signs, naming another key id.
    fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, &self.key).unwrap()
    }
}

fn claims() -> Value {
    json!({"sub": "alice", "exp": now() + 600, "iss": "https://idp.test/",
           "aud": ["api://orders", "other"], "scope": "read write",
           "roles": ["admin", "ops"], "n": 42, "flag": true, "nested": {"a": 1}})
}

fn build(config: Value) -> PolicyBox {
    policy::<ValidateJwt>(&config.to_string()).unwrap_or_else(|e| panic!("{config}: {}", e.message))
}

fn bearer(token: &str) -> TestHead {
    TestHead::request("GET", "/orders").with_header("Authorization", &format!("Bearer {token}"))
}

/// Runs a request; returns the flow and the context.
fn run(p: &PolicyBox, mut head: TestHead) -> (Flow, TestContext, TestHead) {
    let mut ctx = TestContext::default();
    let flow = on_request(p, &mut head, &mut ctx);
    (flow, ctx, head)
}

/// Asserts a refusal and returns (status, www-authenticate, body).
fn refusal(flow: Flow, ctx: &TestContext) -> (u16, Option<String>, Value) {
    assert_eq!(
        flow,
        Flow::RESPOND,
        "expected a refusal, variables: {:?}",
        ctx.variables
    );
    let (status, headers, body) = ctx.response.clone().unwrap();
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "jwt_invalid");
    assert_eq!(body["statusCode"], status);
    (status, header("www-authenticate"), body)
}

fn reason(p: &PolicyBox, head: TestHead) -> String {
    let (flow, ctx, _) = run(p, head);
    let (status, www, body) = refusal(flow, &ctx);
    assert_eq!(status, 401);
    let www = www.expect("WWW-Authenticate on a 401");
    if body["reason"] != "missing_token" {
        assert!(
            www.starts_with("Bearer error=\"invalid_token\", error_description=\""),
            "{www}"
        );
    }
    body["reason"].as_str().unwrap().to_owned()
}

fn inline(signer: &Signer) -> Value {
    json!({"issuer_signing_keys": [{"jwk": signer.jwk}]})
}

#[test]
fn every_algorithm_verifies_with_inline_keys() {
    let mut signers = vec![
        Signer::hmac(Algorithm::HS256),
        Signer::hmac(Algorithm::HS384),
        Signer::hmac(Algorithm::HS512),
        Signer::ec("ec-1"),
        Signer::ed("ed-1"),
    ];
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        signers.push(Signer::rsa(alg, "rsa-1"));
    }
    for s in &signers {
        let p = build(inline(s));
        let (flow, ctx, _) = run(&p, bearer(&s.sign(&claims())));
        assert_eq!(flow, Flow::CONTINUE, "{:?}: {:?}", s.alg, ctx.response);
        // Another key of the same kind does not verify it.
        let other = match s.alg {
            Algorithm::ES256 => Signer::ec("ec-1"),
            Algorithm::EdDSA => Signer::ed("ed-1"),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Signer {
                alg: s.alg,
                key: EncodingKey::from_secret(b"another secret"),
                jwk: Value::Null,
            },
            _ => continue,
        };
        assert_eq!(
            reason(&p, bearer(&other.sign_as(s.kid().as_deref(), &claims()))),
            "bad_signature",
            "{:?}",
            s.alg
        );
    }
}

#[test]
fn pem_and_base64_secret_keys() {
    let rsa = Signer::rsa(Algorithm::RS256, "ignored");
    let p = build(json!({"issuer_signing_keys": [{"pem": RSA_PUBLIC}]}));
    assert_eq!(
        run(&p, bearer(&rsa.sign_as(None, &claims()))).0,
        Flow::CONTINUE
    );
    // A token naming a key id that no key has falls back to keys without an id.
    assert_eq!(run(&p, bearer(&rsa.sign(&claims()))).0, Flow::CONTINUE);

    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec = Signer {
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk: Value::Null,
    };
    let p = build(json!({"issuer_signing_keys": [{"kid": "k", "pem": kp.public_key_pem()}]}));
    assert_eq!(
        run(&p, bearer(&ec.sign_as(Some("k"), &claims()))).0,
        Flow::CONTINUE
    );
    // An RSA token is not checked with an EC key.
    assert_eq!(
        reason(&p, bearer(&rsa.sign_as(None, &claims()))),
        "unknown_key"
    );

    let hs = Signer::hmac(Algorithm::HS256);
    let std_b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    let p = build(json!({"issuer_signing_keys": [{"secret_base64": std_b64}]}));
    assert_eq!(run(&p, bearer(&hs.sign(&claims()))).0, Flow::CONTINUE);
    // The secret is a key for HMAC only: an RS256 token is not checked with it.
    assert_eq!(
        reason(&p, bearer(&rsa.sign_as(None, &claims()))),
        "unknown_key"
    );
}

#[test]
fn claims_become_variables() {
    let s = Signer::hmac(Algorithm::HS256);
    let p = build(inline(&s));
    let (flow, ctx, _) = run(&p, bearer(&s.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    let v = &ctx.variables;
    assert_eq!(v["jwt.sub"], "alice");
    assert_eq!(v["jwt.scope"], "read write");
    assert_eq!(v["jwt.roles"], "admin,ops");
    assert_eq!(v["jwt.aud"], "api://orders,other");
    assert_eq!(v["jwt.n"], "42");
    assert_eq!(v["jwt.flag"], "true");
    assert!(!v.contains_key("jwt.nested"));

    // At most 32 claims; none with output_claims off.
    let mut many = serde_json::Map::new();
    many.insert("exp".into(), json!(now() + 60));
    for i in 0..50 {
        many.insert(format!("c{i:02}"), json!(i));
    }
    // `sub` sorts after the c00…c49 claims, yet is kept: identity claims come first.
    many.insert("sub".into(), json!("zed"));
    let (flow, ctx, _) = run(&p, bearer(&s.sign(&Value::Object(many.clone()))));
    assert_eq!(flow, Flow::CONTINUE);
    assert_eq!(ctx.variables.len(), 32);
    assert_eq!(ctx.variables["jwt.sub"], "zed");
    let mut cfg = inline(&s);
    cfg["output_claims"] = json!(false);
    let (flow, ctx, _) = run(&build(cfg), bearer(&s.sign(&Value::Object(many))));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.variables.is_empty());
}

#[test]
fn time_claims() {
    let s = Signer::hmac(Algorithm::HS256);
    let p = build(inline(&s));
    let mut c = claims();
    c["exp"] = json!(now() - 10);
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "expired");
    let mut skewed = inline(&s);
    skewed["clock_skew_s"] = json!(60);
    let skewed = build(skewed);
    assert_eq!(run(&skewed, bearer(&s.sign(&c))).0, Flow::CONTINUE);

    let mut c = claims();
    c["nbf"] = json!(now() + 30);
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "not_yet_valid");
    assert_eq!(run(&skewed, bearer(&s.sign(&c))).0, Flow::CONTINUE);

    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "missing_claim");
    let mut lenient = inline(&s);
    lenient["require_expiration_time"] = json!(false);
    assert_eq!(run(&build(lenient), bearer(&s.sign(&c))).0, Flow::CONTINUE);

    let mut c = claims();
    c["exp"] = json!("tomorrow");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "malformed");
}

#[test]
fn issuer_audience_and_required_claims() {
    let s = Signer::hmac(Algorithm::HS256);
    let mut cfg = inline(&s);
    cfg["issuers"] = json!(["https://other/", "https://idp.test/"]);
    cfg["audiences"] = json!(["api://orders"]);
    cfg["required_claims"] = json!([
        {"name": "scope", "values": ["write", "admin"], "match": "any", "separator": " "},
        {"name": "roles", "values": ["admin", "ops"]},
        {"name": "sub"}
    ]);
    let p = build(cfg);
    assert_eq!(run(&p, bearer(&s.sign(&claims()))).0, Flow::CONTINUE);

    let mut c = claims();
    c["aud"] = json!("api://orders");
    assert_eq!(run(&p, bearer(&s.sign(&c))).0, Flow::CONTINUE);
    c["aud"] = json!("api://billing");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "wrong_audience");
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "wrong_audience");

    let mut c = claims();
    c["iss"] = json!("https://evil/");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "wrong_issuer");

    let mut c = claims();
    c["scope"] = json!("read");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "missing_claim");
    let mut c = claims();
    c["roles"] = json!(["admin"]);
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "missing_claim");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(reason(&p, bearer(&s.sign(&c))), "missing_claim");
}

#[test]
fn where_the_token_is_and_malformed_tokens() {
    let s = Signer::hmac(Algorithm::HS256);
    let p = build(inline(&s));
    let token = s.sign(&claims());

    // No token: 401 with a bare Bearer challenge (RFC 6750 §3).
    let (flow, ctx, _) = run(&p, TestHead::request("GET", "/"));
    let (status, www, body) = refusal(flow, &ctx);
    assert_eq!((status, www.as_deref()), (401, Some("Bearer")));
    assert_eq!(body["reason"], "missing_token");
    let basic = TestHead::request("GET", "/").with_header("authorization", "Basic YTpi");
    assert_eq!(reason(&p, basic), "missing_token");
    let lower =
        TestHead::request("GET", "/").with_header("authorization", &format!("bearer {token}"));
    assert_eq!(run(&p, lower).0, Flow::CONTINUE);

    for bad in [
        "abc",
        "a.b",
        "!!.??.xx",
        &format!("{token}.x.y"),
        "e30.e30.",
    ] {
        assert_eq!(reason(&p, bearer(bad)), "malformed", "{bad}");
    }

    // A header without a scheme, and a query parameter.
    let mut cfg = inline(&s);
    cfg["header_name"] = json!("x-token");
    cfg["require_scheme"] = Value::Null;
    let p = build(cfg);
    let head = TestHead::request("GET", "/").with_header("x-token", &token);
    assert_eq!(run(&p, head).0, Flow::CONTINUE);
    let mut cfg = inline(&s);
    cfg["query_parameter_name"] = json!("access_token");
    let p = build(cfg);
    let mut head = TestHead::request("GET", "/");
    head.query = format!("a=1&access_token={token}&b=2");
    assert_eq!(run(&p, head).0, Flow::CONTINUE);
    let mut head = TestHead::request("GET", "/");
    head.query = "a=1".into();
    assert_eq!(reason(&p, head), "missing_token");
}

#[test]
fn unsigned_tokens_and_algorithm_lists() {
    let s = Signer::hmac(Algorithm::HS256);
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims().to_string().as_bytes())
    );
    let p = build(inline(&s));
    assert_eq!(reason(&p, bearer(&unsigned)), "unsigned");
    let mut cfg = inline(&s);
    cfg["require_signed_tokens"] = json!(false);
    let p = build(cfg);
    assert_eq!(run(&p, bearer(&unsigned)).0, Flow::CONTINUE);
    // Signed tokens are still verified.
    assert_eq!(run(&p, bearer(&s.sign(&claims()))).0, Flow::CONTINUE);
    let forged = format!("{}.AAAA", s.sign(&claims()).rsplit_once('.').unwrap().0);
    assert_eq!(reason(&p, bearer(&forged)), "bad_signature");

    let mut cfg = inline(&s);
    cfg["algorithms"] = json!(["RS256"]);
    let p = build(cfg);
    assert_eq!(
        reason(&p, bearer(&s.sign(&claims()))),
        "algorithm_not_allowed"
    );
    let es512 = format!("{}.{}.AAAA", b64url(br#"{"alg":"ES512"}"#), b64url(b"{}"));
    assert_eq!(reason(&p, bearer(&es512)), "algorithm_not_allowed");
}

#[test]
fn custom_status_and_message() {
    let s = Signer::hmac(Algorithm::HS256);
    let mut cfg = inline(&s);
    cfg["failed_validation_httpcode"] = json!(403);
    cfg["failed_validation_error_message"] = json!("Access denied.");
    let p = build(cfg);
    let mut c = claims();
    c["exp"] = json!(now() - 100);
    let (flow, ctx, _) = run(&p, bearer(&s.sign(&c)));
    let (status, www, body) = refusal(flow, &ctx);
    assert_eq!(status, 403);
    assert_eq!(www, None, "WWW-Authenticate only on 401");
    assert_eq!(body["message"], "Access denied.");
    assert_eq!(body["reason"], "expired");
}

#[test]
fn bad_configs_are_refused_with_the_field() {
    let hs = json!([{"secret_base64": "c2VjcmV0"}]);
    for (cfg, needle) in [
        (json!({}), "no signing keys"),
        (
            json!({"issuer_signing_keys": hs, "failed_validation_httpcode": 200}),
            "failed_validation_httpcode",
        ),
        (
            json!({"issuer_signing_keys": hs, "header_name": "a", "query_parameter_name": "b"}),
            "not both",
        ),
        (
            json!({"issuer_signing_keys": hs, "query_parameter_name": ""}),
            "query_parameter_name",
        ),
        (
            json!({"jwks_uri": "https://a/keys", "openid_config_url": "https://a/.well-known/openid-configuration"}),
            "not both",
        ),
        (json!({"jwks_uri": "ftp://a/keys"}), "jwks_uri"),
        (
            json!({"openid_config_url": "/relative"}),
            "openid_config_url",
        ),
        (
            json!({"issuer_signing_keys": hs, "algorithms": ["ES512"]}),
            "algorithms",
        ),
        (
            json!({"issuer_signing_keys": hs, "refresh_interval_s": 0}),
            "refresh_interval_s",
        ),
        (
            json!({"issuer_signing_keys": hs, "required_claims": [{"name": ""}]}),
            "required_claims[0]",
        ),
        (
            json!({"issuer_signing_keys": hs, "required_claims": [{"name": "a", "match": "some"}]}),
            "some",
        ),
        (
            json!({"issuer_signing_keys": [{}]}),
            "issuer_signing_keys[0]: give exactly one",
        ),
        (
            json!({"issuer_signing_keys": [{"pem": RSA_PUBLIC, "secret_base64": "c2VjcmV0"}]}),
            "exactly one",
        ),
        (
            json!({"issuer_signing_keys": [{"pem": RSA_PRIVATE}]}),
            "private",
        ),
        (
            json!({"issuer_signing_keys": [{"pem": "hello"}]}),
            "not PEM",
        ),
        (
            json!({"issuer_signing_keys": [{"secret_base64": "***"}]}),
            "not base64",
        ),
        (
            json!({"issuer_signing_keys": [{"jwk": {"kty": "RSA"}}]}),
            "issuer_signing_keys[0]: not a supported JWK",
        ),
        (
            json!({"issuer_signing_keys": [{"jwk": {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}}]}),
            "P-521",
        ),
        (
            json!({"issuer_signing_keys": [{"jwk": {"kty": "RSA", "n": RSA_N, "e": RSA_E, "alg": "ES256"}}]}),
            "does not suit",
        ),
        (
            json!({"issuer_signing_keys": [{"jwk": {"kty": "RSA", "n": RSA_N, "e": RSA_E, "use": "enc"}}]}),
            "encryption",
        ),
        (
            json!({"issuer_signing_keys": hs, "clock_skew": 5}),
            "clock_skew",
        ),
    ] {
        let e = policy::<ValidateJwt>(&cfg.to_string())
            .err()
            .unwrap_or_else(|| panic!("accepted: {cfg}"));
        assert!(e.message.contains(needle), "{cfg}: {}", e.message);
    }
    // The APIM-style alias for require_scheme.
    assert!(policy::<ValidateJwt>(
        &json!({"issuer_signing_keys": hs, "scheme": "Token"}).to_string()
    )
    .is_ok());
}

// --- Keys fetched through the host -------------------------------------------------------

fn jwks(signers: &[&Signer]) -> Vec<u8> {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
}

/// The URL of the HTTP call a paused request made (its token is the last request's index).
fn last_call(ctx: &TestContext) -> (HostToken, String) {
    match ctx.requests.last() {
        Some(TestRequest::Http {
            method,
            url,
            headers,
            ..
        }) => {
            assert_eq!(method, "GET");
            assert!(headers
                .iter()
                .any(|(n, v)| n == "accept" && v == b"application/json"));
            (HostToken(ctx.requests.len() as u32), url.clone())
        }
        other => panic!("expected an HTTP call, got {other:?}"),
    }
}

/// Runs a request that fetches: pause, answer the call, resume. Returns the final flow.
fn fetched(p: &PolicyBox, head: TestHead, url: &str, answer: TestAnswer) -> (Flow, TestContext) {
    let (flow, mut ctx, mut head) = run(p, head);
    assert_eq!(flow, Flow::PAUSE, "expected a fetch: {:?}", ctx.response);
    let (t, called) = last_call(&ctx);
    assert_eq!(called, url);
    ctx.answer(t, answer);
    let flow = on_resume(p, &mut head, &mut ctx);
    (flow, ctx)
}

const JWKS_URL: &str = "https://idp.test/keys";

#[test]
fn jwks_is_fetched_once_and_refetched_for_a_new_kid_at_most_every_min_interval() {
    let k1 = Signer::rsa(Algorithm::RS256, "k1");
    let k2 = Signer::ec("k2");
    let k3 = Signer::ed("k3");
    let p = build(
        json!({"jwks_uri": JWKS_URL, "min_refresh_interval_s": 30, "refresh_interval_s": 3600}),
    );

    // First request fetches; the next ones use the cached keys.
    let (flow, ctx) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1])),
    );
    assert_eq!(flow, Flow::CONTINUE, "{:?}", ctx.response);
    assert_eq!(ctx.variables["jwt.sub"], "alice");
    for _ in 0..3 {
        let (flow, ctx, _) = run(&p, bearer(&k1.sign(&claims())));
        assert_eq!(flow, Flow::CONTINUE);
        assert!(ctx.requests.is_empty());
    }

    // A token from a new key: one refetch, which brings the key.
    advance(31);
    let (flow, _) = fetched(
        &p,
        bearer(&k2.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1, &k2])),
    );
    assert_eq!(flow, Flow::CONTINUE);
    let (flow, ctx, _) = run(&p, bearer(&k2.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.requests.is_empty());

    // Unknown key ids right after a fetch do not fetch again: refused without a call.
    for kid in ["made-up-1", "made-up-2"] {
        let (flow, ctx, _) = run(&p, bearer(&k1.sign_as(Some(kid), &claims())));
        assert!(ctx.requests.is_empty(), "{kid} fetched");
        let (_, _, body) = refusal(flow, &ctx);
        assert_eq!(body["reason"], "unknown_key");
    }
    // Once the interval has passed, an unknown kid may fetch again.
    advance(31);
    let (flow, ctx) = fetched(
        &p,
        bearer(&k3.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1])),
    );
    let (_, _, body) = refusal(flow, &ctx);
    assert_eq!(body["reason"], "unknown_key");
    // ...and the key set was replaced: k2 is gone (no fetch: too soon).
    let (flow, ctx, _) = run(&p, bearer(&k2.sign(&claims())));
    assert!(ctx.requests.is_empty());
    assert_eq!(refusal(flow, &ctx).2["reason"], "unknown_key");
}

#[test]
fn stale_keys_are_refreshed_and_kept_when_the_refresh_fails() {
    let k1 = Signer::ec("k1");
    let p = build(json!({"jwks_uri": JWKS_URL, "refresh_interval_s": 600}));
    let (flow, _) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1])),
    );
    assert_eq!(flow, Flow::CONTINUE);

    // Older than refresh_interval_s: the next request refreshes; the IdP fails; the known
    // keys still verify.
    advance(601);
    let (flow, ctx) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(503, b"down"),
    );
    assert_eq!(flow, Flow::CONTINUE, "{:?}", ctx.response);
    // The failed attempt is not repeated by every request.
    let (flow, ctx, _) = run(&p, bearer(&k1.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.requests.is_empty());
    // Later, the refresh is retried; a transport error keeps the keys as well.
    advance(31);
    let (flow, _) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::error("connection refused"),
    );
    assert_eq!(flow, Flow::CONTINUE);
    advance(31);
    let (flow, _) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, b"{\"keys\":[]}"),
    );
    assert_eq!(flow, Flow::CONTINUE);
    // A successful refresh counts from now.
    advance(31);
    let (flow, _) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1])),
    );
    assert_eq!(flow, Flow::CONTINUE);
    advance(500);
    let (flow, ctx, _) = run(&p, bearer(&k1.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.requests.is_empty());
}

#[test]
fn without_any_keys_a_failed_fetch_answers_401_and_backs_off() {
    let k1 = Signer::rsa(Algorithm::PS256, "k1");
    let p = build(json!({"jwks_uri": JWKS_URL}));
    let (flow, ctx) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(404, b"nope"),
    );
    let (status, www, body) = refusal(flow, &ctx);
    assert_eq!(status, 401);
    assert!(www.unwrap().contains("invalid_token"));
    assert_eq!(body["reason"], "keys_unavailable");
    assert!(
        !body["message"].as_str().unwrap().contains("idp.test"),
        "no URL for clients: {body}"
    );
    // No new fetch for min_refresh_interval_s.
    let (flow, ctx, _) = run(&p, bearer(&k1.sign(&claims())));
    assert!(ctx.requests.is_empty());
    assert_eq!(refusal(flow, &ctx).2["reason"], "keys_unavailable");
    advance(30);
    let (flow, _) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&k1])),
    );
    assert_eq!(flow, Flow::CONTINUE);
    // A key set that is not JSON is a failed fetch too.
    let p = build(json!({"jwks_uri": JWKS_URL}));
    let (flow, ctx) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, b"<html>"),
    );
    assert_eq!(refusal(flow, &ctx).2["reason"], "keys_unavailable");
    // A missing token is refused without fetching.
    let p = build(json!({"jwks_uri": JWKS_URL}));
    let (flow, ctx, _) = run(&p, TestHead::request("GET", "/"));
    assert!(ctx.requests.is_empty());
    assert_eq!(refusal(flow, &ctx).2["reason"], "missing_token");
}

#[test]
fn openid_configuration_leads_to_the_jwks() {
    const OIDC: &str = "https://idp.test/.well-known/openid-configuration";
    let k1 = Signer::ec("k1");
    let unusable = json!({"kty": "RSA", "use": "enc", "kid": "enc", "n": RSA_N, "e": RSA_E});
    let set =
        json!({"keys": [unusable, {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}, k1.jwk]});
    let p = build(json!({"openid_config_url": OIDC, "issuers": ["https://idp.test/"]}));
    let (flow, mut ctx, mut head) = run(&p, bearer(&k1.sign(&claims())));
    assert_eq!(flow, Flow::PAUSE);
    let (t, url) = last_call(&ctx);
    assert_eq!(url, OIDC);
    ctx.answer(
        t,
        TestAnswer::http(
            200,
            br#"{"issuer":"https://idp.test/","jwks_uri":"https://idp.test/discovered/keys"}"#,
        ),
    );
    assert_eq!(on_resume(&p, &mut head, &mut ctx), Flow::PAUSE);
    let (t, url) = last_call(&ctx);
    assert_eq!(url, "https://idp.test/discovered/keys");
    ctx.answer(t, TestAnswer::http(200, set.to_string().as_bytes()));
    assert_eq!(
        on_resume(&p, &mut head, &mut ctx),
        Flow::CONTINUE,
        "{:?}",
        ctx.response
    );
    assert_eq!(ctx.variables["jwt.iss"], "https://idp.test/");
    let (flow, ctx, _) = run(&p, bearer(&k1.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.requests.is_empty());

    // A configuration without jwks_uri is a failed fetch.
    let p = build(json!({"openid_config_url": OIDC}));
    let (flow, ctx) = fetched(
        &p,
        bearer(&k1.sign(&claims())),
        OIDC,
        TestAnswer::http(200, b"{}"),
    );
    let (_, _, body) = refusal(flow, &ctx);
    assert_eq!(body["reason"], "keys_unavailable");
}

#[test]
fn inline_keys_work_beside_fetched_ones() {
    let inline_key = Signer::hmac(Algorithm::HS256);
    let remote = Signer::ec("remote");
    let p = build(json!({"jwks_uri": JWKS_URL, "issuer_signing_keys": [{"jwk": inline_key.jwk}]}));
    // The first request fetches (nothing fetched yet) even for an inline key's token.
    let (flow, _) = fetched(
        &p,
        bearer(&inline_key.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(500, b""),
    );
    assert_eq!(flow, Flow::CONTINUE);
    advance(30);
    let (flow, _) = fetched(
        &p,
        bearer(&remote.sign(&claims())),
        JWKS_URL,
        TestAnswer::http(200, &jwks(&[&remote])),
    );
    assert_eq!(flow, Flow::CONTINUE);
    let (flow, ctx, _) = run(&p, bearer(&inline_key.sign(&claims())));
    assert_eq!(flow, Flow::CONTINUE);
    assert!(ctx.requests.is_empty());
}

#[test]
fn a_second_authorization_header_is_refused() {
    let s = Signer::hmac(Algorithm::HS256);
    let p = build(inline(&s));
    let token = s.sign(&claims());
    let head = bearer(&token).with_header("Authorization", "Bearer forged");
    let (flow, ctx, _) = run(&p, head);
    let (status, _, body) = refusal(flow, &ctx);
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("more than one"),
        "{body}"
    );
}

#[test]
fn symmetric_keys_in_a_fetched_key_set_are_skipped() {
    let hmac = Signer::hmac(Algorithm::HS256);
    let ec = Signer::ec("ec-1");
    let (keys, skipped) = super::keys::parse_jwks(&jwks(&[&hmac, &ec])).unwrap();
    assert_eq!((keys.len(), skipped), (1, 1));
    assert!(super::keys::parse_jwks(&jwks(&[&hmac])).is_err());
}
