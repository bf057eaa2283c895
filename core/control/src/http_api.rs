//! The plane's HTTP API: `/admin/v1/…` (admin bearer token) and `/gateway/v1/…` (gateway
//! tokens).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::db::{now_s, Refused, TokenCheck, KINDS};
use crate::{digest, hex, Plane};

type Resp = Response<Full<Bytes>>;

/// The largest request body the plane reads.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// The largest heartbeat body the plane keeps.
const MAX_HEARTBEAT: usize = 64 * 1024;

fn json_resp(status: u16, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, code: &str, message: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": code, "message": message.into() }))
}

fn refused(r: Refused) -> Resp {
    json_resp(
        r.status,
        &json!({ "error": r.code, "message": r.problems.first().cloned().unwrap_or_default(), "problems": r.problems }),
    )
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn body_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                400,
                "invalid_request",
                format!("the body could not be read: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(400, "invalid_request", format!("the body is not JSON: {e}")))
}

/// Serves one request.
pub(crate) async fn handle(plane: Arc<Plane>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => json_resp(200, &json!({ "status": "live" })),
        ["admin", "v1", rest @ ..] => {
            let authorised =
                bearer(&req).is_some_and(|t| digest(t.as_bytes()) == plane.admin_token_digest);
            if !authorised {
                return error(
                    401,
                    "unauthorized",
                    "admin endpoints need the admin bearer token",
                );
            }
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            admin(&plane, req, &rest).await
        }
        ["gateway", "v1", what] => {
            let what = (*what).to_owned();
            gateway(&plane, req, &what).await
        }
        _ => error(404, "not_found", format!("no endpoint {path}")),
    }
}

fn kind_of(name: &str) -> Option<&'static str> {
    KINDS
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(k, _)| *k)
        .or((name == "policies").then_some("policies"))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn masked(kind: &str, mut v: Value) -> Value {
    if kind == "named-values" && v["secret"] == true {
        v["value"] = json!("***");
    }
    v
}

fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system randomness");
    hex(&b)
}

fn new_key() -> String {
    random_hex(16)
}

fn issue_token(plane: &Plane, gateway: &str) -> Result<(String, u64), String> {
    let token = format!("opgw_{}", random_hex(32));
    let expires = now_s() + plane.ttl_s;
    plane
        .db
        .add_token(&hex(&digest(token.as_bytes())), gateway, expires)?;
    Ok((token, expires))
}

fn changed(plane: &Plane, version: u64) -> Resp {
    plane.version.send_replace(version);
    json_resp(200, &json!({ "version": version }))
}

async fn admin(plane: &Plane, req: Request<Incoming>, rest: &[String]) -> Resp {
    let method = req.method().clone();
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["openapi.json"]) => json_resp(200, &crate::openapi::document()),
        (Method::GET, ["version"]) => match plane.db.version() {
            Ok(v) => json_resp(
                200,
                &json!({ "version": v, "public_key": plane.public_key_hex }),
            ),
            Err(e) => error(500, "state_error", e),
        },
        (Method::GET, ["configuration"]) => match plane.db.document(None) {
            Ok(mut d) => {
                if let Some(list) = d.get_mut("named_values").and_then(Value::as_array_mut) {
                    for n in list.iter_mut() {
                        *n = masked("named-values", n.take());
                    }
                }
                json_resp(200, &d)
            }
            Err(r) => refused(r),
        },
        (Method::GET, ["gateways"]) => match plane.db.gateways() {
            Ok(g) => json_resp(200, &json!(g)),
            Err(e) => error(500, "state_error", e),
        },
        (Method::PUT, ["gateways", id]) if valid_id(id) => {
            let id = (*id).to_owned();
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            if !body.is_object() {
                return error(
                    400,
                    "invalid_request",
                    "a gateway is a JSON object: {\"apis\": [...]}",
                );
            }
            match plane.db.put_gateway(&id, &body) {
                Ok(v) => changed(plane, v),
                Err(r) => refused(r),
            }
        }
        (Method::PUT, ["gateways", id]) => error(
            400,
            "invalid_request",
            format!("'{id}' is not a valid id (letters, digits, '-', '_', '.')"),
        ),
        (Method::POST, ["gateways", id, "tokens"]) => match plane.db.gateway(id) {
            Ok(Some(_)) => match issue_token(plane, id) {
                Ok((token, expires)) => json_resp(
                    201,
                    &json!({ "token": token, "expires_at": expires, "public_key": plane.public_key_hex }),
                ),
                Err(e) => error(500, "state_error", e),
            },
            Ok(None) => error(404, "not_found", format!("no gateway '{id}'")),
            Err(e) => error(500, "state_error", e),
        },
        (Method::DELETE, ["gateways", id, "tokens"]) => match plane.db.revoke(id) {
            Ok(n) => json_resp(200, &json!({ "revoked": n })),
            Err(e) => error(500, "state_error", e),
        },
        (Method::POST, ["subscriptions", id, "regenerate"]) => {
            let which = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("key=")))
                .unwrap_or("primary")
                .to_owned();
            if which != "primary" && which != "secondary" {
                return error(400, "invalid_request", "key must be primary or secondary");
            }
            let mut sub = match plane.db.get("subscriptions", id) {
                Ok(Some(s)) => s,
                Ok(None) => return error(404, "not_found", format!("no subscription '{id}'")),
                Err(e) => return error(500, "state_error", e),
            };
            sub[format!("{which}_key")] = json!(new_key());
            match plane.db.change("subscriptions", id, Some(&sub)) {
                Ok(v) => {
                    plane.version.send_replace(v);
                    json_resp(200, &json!({ "version": v, "subscription": sub }))
                }
                Err(r) => refused(r),
            }
        }
        (Method::GET, [kind]) => match kind_of(kind) {
            Some(k) => match plane.db.list(k) {
                Ok(l) => json_resp(
                    200,
                    &json!(l.into_iter().map(|v| masked(k, v)).collect::<Vec<_>>()),
                ),
                Err(e) => error(500, "state_error", e),
            },
            None => error(404, "not_found", format!("no resource kind '{kind}'")),
        },
        (Method::GET, [kind, id]) => match kind_of(kind) {
            Some(k) => match plane.db.get(k, id) {
                Ok(Some(v)) => json_resp(200, &masked(k, v)),
                Ok(None) => error(404, "not_found", format!("no {k} '{id}'")),
                Err(e) => error(500, "state_error", e),
            },
            None => error(404, "not_found", format!("no resource kind '{kind}'")),
        },
        (Method::PUT, [kind, id]) => {
            let Some(k) = kind_of(kind) else {
                return error(404, "not_found", format!("no resource kind '{kind}'"));
            };
            if !valid_id(id) || (k == "policies" && *id != "global") {
                return error(
                    400,
                    "invalid_request",
                    if k == "policies" {
                        "the policy document at this level is 'global' (API, product and operation policies live in their resources)".to_string()
                    } else {
                        format!("'{id}' is not a valid id (letters, digits, '-', '_', '.')")
                    },
                );
            }
            let id = (*id).to_owned();
            let mut body = match body_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Some(obj) = body.as_object_mut() else {
                return error(400, "invalid_request", "the body must be a JSON object");
            };
            match obj.get("id") {
                Some(v) if v != &json!(id) => {
                    return error(
                        400,
                        "invalid_request",
                        "the body's id differs from the URL's",
                    )
                }
                _ => {
                    obj.insert("id".into(), json!(id));
                }
            }
            if k == "subscriptions" && !obj.contains_key("primary_key") {
                obj.insert("primary_key".into(), json!(new_key()));
            }
            match plane.db.change(k, &id, Some(&body)) {
                Ok(v) => changed(plane, v),
                Err(r) => refused(r),
            }
        }
        (Method::DELETE, [kind, id]) => {
            let Some(k) = kind_of(kind) else {
                return error(404, "not_found", format!("no resource kind '{kind}'"));
            };
            match plane.db.change(k, id, None) {
                Ok(v) => changed(plane, v),
                Err(r) => refused(r),
            }
        }
        _ => error(404, "not_found", "no such admin endpoint or method"),
    }
}

async fn gateway(plane: &Plane, req: Request<Incoming>, what: &str) -> Resp {
    let Some(token) = bearer(&req) else {
        return error(
            401,
            "token_missing",
            "gateway endpoints need a gateway bearer token",
        );
    };
    let (gw, expires) = match plane.db.check_token(&hex(&digest(token.as_bytes()))) {
        Ok(TokenCheck::Valid(g, e)) => (g, e),
        Ok(TokenCheck::Invalid) => {
            return error(
                401,
                "token_invalid",
                "the gateway token is not known to this plane",
            )
        }
        Ok(TokenCheck::Revoked) => {
            return error(
                401,
                "token_revoked",
                "the gateway token was revoked; issue a new one",
            )
        }
        Ok(TokenCheck::Expired) => {
            return error(
                401,
                "token_expired",
                "the gateway token has expired; issue a new one",
            )
        }
        Err(e) => return error(500, "state_error", e),
    };
    match (req.method().clone(), what) {
        (Method::GET, "config") => config(plane, &req, &gw).await,
        (Method::POST, "heartbeat") => {
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            if body.to_string().len() > MAX_HEARTBEAT {
                return error(
                    413,
                    "too_large",
                    format!("a heartbeat is at most {MAX_HEARTBEAT} bytes"),
                );
            }
            match plane.db.heartbeat(&gw, &body) {
                Ok(()) => json_resp(200, &json!({ "gateway": gw, "token_expires_at": expires })),
                Err(e) => error(500, "state_error", e),
            }
        }
        (Method::POST, "token") => match issue_token(plane, &gw) {
            Ok((token, expires)) => {
                json_resp(201, &json!({ "token": token, "expires_at": expires }))
            }
            Err(e) => error(500, "state_error", e),
        },
        _ => error(404, "not_found", "no such gateway endpoint or method"),
    }
}

/// The gateway's snapshot: `{version, digest, config (the document as text), signature}`;
/// `If-None-Match` with the current digest answers 304, after waiting up to `?wait=` seconds
/// for a change.
async fn config(plane: &Plane, req: &Request<Incoming>, gw: &str) -> Resp {
    let wait = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("wait=")))
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(0)
        .min(plane.long_poll_max_s);
    let known = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_owned());
    let mut versions = plane.version.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        versions.borrow_and_update();
        let doc = match plane.db.document(Some(gw)) {
            Ok(d) => d,
            Err(r) => return refused(r),
        };
        let text = doc.to_string();
        let d = hex(&digest(text.as_bytes()));
        if known.as_deref() != Some(d.as_str()) {
            // Signed for this gateway only: "<gateway id>\n<document>".
            let mut signed = Vec::with_capacity(gw.len() + 1 + text.len());
            signed.extend_from_slice(gw.as_bytes());
            signed.push(b'\n');
            signed.extend_from_slice(text.as_bytes());
            let signature = hex(plane.key.sign(&signed).as_ref());
            let mut r = json_resp(
                200,
                &json!({ "version": doc["version"], "digest": d, "config": text, "signature": signature }),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("\"{d}\"")) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return r;
        }
        // Unchanged: wait for the next version (or the deadline).
        let changed = tokio::time::timeout_at(deadline, versions.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            if let Ok(v) = HeaderValue::from_str(&format!("\"{d}\"")) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return r;
        }
    }
}
