//! Health endpoints, answered before routing: `/status-0123456789abcdef` (as APIM) and
//! `/readyz` report whether a configuration is loaded and the gateway is not draining;
//! `/healthz` reports that the process serves at all.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;
use crate::proxy::{is_draining, Shared};

/// The APIM-compatible status path.
pub const STATUS_PATH: &str = "/status-0123456789abcdef";
/// Liveness.
pub const LIVE_PATH: &str = "/healthz";
/// Readiness.
pub const READY_PATH: &str = "/readyz";

/// The answer for a health path, or `None` for any other path.
pub fn answer(shared: &Shared, path: &str) -> Option<Response<ResponseBody>> {
    let body = match path {
        LIVE_PATH => (StatusCode::OK, serde_json::json!({ "status": "live" })),
        STATUS_PATH | READY_PATH => {
            let snapshot = shared.snapshot.load();
            let draining = is_draining(shared);
            match (&*snapshot, draining) {
                (_, true) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "draining" }),
                ),
                (None, false) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "no configuration" }),
                ),
                (Some(s), false) => {
                    let mut json = serde_json::json!({
                        "status": "ready",
                        "configVersion": s.version,
                        "configDigest": s.digest,
                        "configSource": s.origin.kind(),
                    });
                    if let crate::snapshot::ConfigOrigin::Backup {
                        generation,
                        saved_unix_ms,
                        ..
                    } = &s.origin
                    {
                        let now = crate::telemetry::unix_ms();
                        json["backupGeneration"] = (*generation).into();
                        json["backupAgeSeconds"] =
                            (now.saturating_sub(*saved_unix_ms) / 1000).into();
                    }
                    (StatusCode::OK, json)
                }
            }
        }
        _ => return None,
    };
    let (status, json) = body;
    let mut resp = Response::new(ResponseBody::full(Bytes::from(json.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(resp)
}
