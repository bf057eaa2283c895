//! Telemetry items ("envelopes") as the ingestion endpoint reads them: RequestData per request,
//! RemoteDependencyData per backend call, ExceptionData per failure, MetricData per metric
//! series. Field names, context tags and length limits follow the Application Insights schema
//! (EndpointSpecs Bond/Docs); strings longer than their limit are cut here rather than have
//! the endpoint refuse the item.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use outpost_plugin_sdk::serde_json::{json, Map, Value};
use outpost_plugin_sdk::{MetricSample, RequestRecord};

/// The largest serialised item the endpoint accepts.
pub const MAX_ITEM_BYTES: usize = 64 * 1024;

/// Schema length limits, in characters.
pub mod limit {
    /// `ai.operation.id`, `ai.operation.parentId`, ids.
    pub const ID: usize = 128;
    /// Names, `responseCode`, `resultCode`, `target`, `type`, `typeName`, `problemId`,
    /// `source`, `ai.operation.name`.
    pub const NAME: usize = 1024;
    /// `ai.cloud.role`, `ai.cloud.roleInstance`.
    pub const ROLE: usize = 256;
    /// `ai.location.ip`.
    pub const IP: usize = 45;
    /// `ai.user.userAgent`.
    pub const USER_AGENT: usize = 2048;
    /// `ai.internal.sdkVersion`.
    pub const SDK_VERSION: usize = 64;
    /// RequestData `url`.
    pub const URL: usize = 2048;
    /// RemoteDependencyData `data`, property values.
    pub const DATA: usize = 8192;
    /// Property and measurement keys.
    pub const KEY: usize = 150;
    /// Exception messages.
    pub const MESSAGE: usize = 32768;
}

/// Who sends: the same for every item of a sink.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The instrumentation key.
    pub ikey: String,
    /// `Microsoft.ApplicationInsights.<key without dashes>.`
    pub name_prefix: String,
    /// `ai.cloud.role`: the gateway id.
    pub role: String,
    /// `ai.cloud.roleInstance`: the gateway process's instance id.
    pub role_instance: String,
    /// The `Region` property.
    pub region: Option<String>,
}

impl Identity {
    /// The identity for a key, taking the role and instance from the gateway.
    pub fn new(ikey: &str, role: &str, role_instance: &str, region: Option<String>) -> Self {
        Self {
            ikey: ikey.to_owned(),
            name_prefix: format!("Microsoft.ApplicationInsights.{}.", ikey.replace('-', "")),
            role: role.to_owned(),
            role_instance: role_instance.to_owned(),
            region,
        }
    }
}

/// Which item types are on.
#[derive(Debug, Clone, Copy)]
pub struct Kinds {
    /// RemoteDependencyData per backend call.
    pub dependencies: bool,
    /// ExceptionData per failure.
    pub exceptions: bool,
}

/// `s` cut to at most `max` characters (never inside a character).
pub fn cut(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A duration as the schema wants it: `d.hh:mm:ss.fffffff` (100 ns ticks).
pub fn duration(us: u64) -> String {
    let ticks = (us % 1_000_000) * 10;
    let secs = us / 1_000_000;
    let (days, secs) = (secs / 86_400, secs % 86_400);
    format!(
        "{days}.{:02}:{:02}:{:02}.{ticks:07}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// ISO 8601 UTC with milliseconds and `Z`.
pub fn time(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Whether a request failed: always sent, whatever the sampling.
pub fn is_failure(r: &RequestRecord<'_>) -> bool {
    r.status >= 500 || !r.error_source.is_empty()
}

/// Whether an operation is in the sample: decided by its id alone, so every item of one
/// operation (and every gateway seeing the same trace) decides the same way.
pub fn sampled_in(operation_id: &str, percentage: f64) -> bool {
    if percentage >= 100.0 {
        return true;
    }
    if percentage <= 0.0 {
        return false;
    }
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in operation_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h % 100_000) as f64) / 1000.0 < percentage
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        let _ = write!(s, "{:02x}", fastrand::u8(..));
    }
    s
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The ids that tie one request's items together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationIds {
    /// `ai.operation.id`: the W3C trace id (a new one when the request had none).
    pub operation: String,
    /// RequestData `id`: the gateway's span id (the one it sent the backend).
    pub request: String,
}

/// The ids of a record.
pub fn operation_ids(r: &RequestRecord<'_>) -> OperationIds {
    let trace = r.trace_id.as_str();
    let span = r.span_id.as_str();
    OperationIds {
        operation: if is_hex(trace, 32) {
            trace.to_owned()
        } else {
            random_hex(16)
        },
        request: if is_hex(span, 16) {
            span.to_owned()
        } else {
            random_hex(8)
        },
    }
}

struct Props(Map<String, Value>);

impl Props {
    fn new() -> Self {
        Props(Map::new())
    }
    fn put(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.0.insert(
                cut(key, limit::KEY).to_owned(),
                Value::String(cut(value, limit::DATA).to_owned()),
            );
        }
    }
}

fn tags(id: &Identity, ids: &OperationIds, parent: &str, r: Option<&RequestRecord<'_>>) -> Value {
    let mut t = Map::new();
    let mut put = |k: &str, v: &str, max: usize| {
        if !v.is_empty() {
            t.insert(k.to_owned(), Value::String(cut(v, max).to_owned()));
        }
    };
    put("ai.operation.id", &ids.operation, limit::ID);
    put("ai.operation.parentId", parent, limit::ID);
    if let Some(r) = r {
        put("ai.operation.name", &request_name(r), limit::NAME);
        put("ai.location.ip", r.client_ip.as_str(), limit::IP);
        put(
            "ai.user.userAgent",
            r.user_agent.as_str(),
            limit::USER_AGENT,
        );
    }
    put("ai.cloud.role", &id.role, limit::ROLE);
    put("ai.cloud.roleInstance", &id.role_instance, limit::ROLE);
    put("ai.internal.sdkVersion", SDK_VERSION, limit::SDK_VERSION);
    Value::Object(t)
}

/// `ai.internal.sdkVersion`.
pub const SDK_VERSION: &str = concat!("outpost-appinsights:", env!("CARGO_PKG_VERSION"));

fn envelope(
    id: &Identity,
    kind: &str,
    time: String,
    sample_rate: Option<f64>,
    tags: Value,
    base_type: &str,
    base: Value,
) -> Value {
    let mut e = json!({
        "ver": 1,
        "name": format!("{}{kind}", id.name_prefix),
        "time": time,
        "iKey": id.ikey,
        "tags": tags,
        "data": { "baseType": base_type, "baseData": base },
    });
    if let Some(rate) = sample_rate {
        e["sampleRate"] = json!(rate);
    }
    e
}

/// `METHOD route` (the operation's template; the path when nothing matched).
pub fn request_name(r: &RequestRecord<'_>) -> String {
    let what = if r.route.is_empty() {
        r.path.as_str()
    } else {
        r.route.as_str()
    };
    format!("{} {what}", r.method.as_str())
}

/// API Management's `Cache` property values.
fn cache_property(cache: &str) -> String {
    match cache {
        "" => "None".into(),
        "hit" => "Hit".into(),
        "miss" => "Miss".into(),
        other => other.to_owned(),
    }
}

/// The custom properties every item of a request carries, named as API Management names them.
fn request_properties(r: &RequestRecord<'_>, id: &Identity) -> Props {
    let mut p = Props::new();
    p.put("API Name", r.api_id.as_str());
    p.put("Operation Name", r.operation_id.as_str());
    p.put("Product Name", r.product_id.as_str());
    p.put("Subscription Name", r.subscription_id.as_str());
    p.put("Region", id.region.as_deref().unwrap_or_default());
    p.put("Cache", &cache_property(r.cache.as_str()));
    p.put("Request Id", r.request_id.as_str());
    p.put("HTTP Method", r.method.as_str());
    p.put("Error Source", r.error_source.as_str());
    p.put("Error Reason", r.error_reason.as_str());
    p
}

/// Scheme, host and port of a URL, and the rest.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Some((scheme, authority, path))
}

/// `host[:port]` of a URL, its scheme's default port left out.
pub fn target(url: &str) -> String {
    let Some((scheme, authority, _)) = split_url(url) else {
        return String::new();
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default = match scheme {
        "http" => Some(":80"),
        "https" => Some(":443"),
        _ => None,
    };
    match default.and_then(|d| authority.strip_suffix(d)) {
        Some(host) => host.to_owned(),
        None => authority.to_owned(),
    }
}

/// The items of one request: the request itself, its backend call and its failure (as
/// configured). `sample_rate` is what the request item stands for (100 for failures, which
/// are always sent).
pub fn request_items(
    r: &RequestRecord<'_>,
    id: &Identity,
    kinds: Kinds,
    ids: &OperationIds,
    sample_rate: f64,
) -> Vec<Value> {
    let mut items = Vec::with_capacity(3);
    let name = request_name(r);
    let at = time(r.time_unix_ms);
    let props = request_properties(r, id).0;
    let url = if r.host.is_empty() {
        r.path.as_str().to_owned()
    } else {
        format!("http://{}{}", r.host.as_str(), r.path.as_str())
    };
    let mut request = json!({
        "ver": 2,
        "id": cut(&ids.request, limit::ID),
        "name": cut(&name, limit::NAME),
        "duration": duration(r.total_us),
        "responseCode": r.status.to_string(),
        "success": r.status < 400 && r.error_source.is_empty(),
        "url": cut(&url, limit::URL),
        "properties": props,
        "measurements": {
            "Request Size": r.bytes_in as f64,
            "Response Size": r.bytes_out as f64,
        },
    });
    if let (true, Some(o)) = (url.is_empty(), request.as_object_mut()) {
        o.remove("url");
    }
    items.push(envelope(
        id,
        "Request",
        at.clone(),
        Some(sample_rate),
        tags(id, ids, r.parent_span_id.as_str(), Some(r)),
        "RequestData",
        request,
    ));

    let backend_failed = r.error_source.as_str() == "backend";
    if kinds.dependencies && (r.backend_status != 0 || backend_failed) {
        let backend_url = r.backend_url.as_str();
        let path = split_url(backend_url).map_or("", |(_, _, p)| p);
        let path = path.split('?').next().unwrap_or_default();
        let dep_name = if path.is_empty() {
            name.clone()
        } else {
            format!("{} {path}", r.method.as_str())
        };
        let result_code = match (r.backend_status, r.error_reason.as_str()) {
            (0, "") => "0".to_owned(),
            (0, reason) => reason.to_owned(),
            (s, _) => s.to_string(),
        };
        let mut dep = Map::new();
        dep.insert("ver".into(), json!(2));
        dep.insert("name".into(), json!(cut(&dep_name, limit::NAME)));
        dep.insert("id".into(), json!(random_hex(8)));
        dep.insert("resultCode".into(), json!(cut(&result_code, limit::NAME)));
        dep.insert("duration".into(), json!(duration(r.backend_us)));
        dep.insert(
            "success".into(),
            json!(!backend_failed && (1..400).contains(&r.backend_status)),
        );
        if !backend_url.is_empty() {
            dep.insert("data".into(), json!(cut(backend_url, limit::DATA)));
            dep.insert(
                "target".into(),
                json!(cut(&target(backend_url), limit::NAME)),
            );
        }
        dep.insert("type".into(), json!("HTTP"));
        let mut p = request_properties(r, id);
        p.put("Backend ID", r.backend_id.as_str());
        dep.insert("properties".into(), Value::Object(p.0));
        items.push(envelope(
            id,
            "RemoteDependency",
            at.clone(),
            Some(sample_rate),
            tags(id, ids, &ids.request, Some(r)),
            "RemoteDependencyData",
            Value::Object(dep),
        ));
    }

    let source = r.error_source.as_str();
    if kinds.exceptions && !source.is_empty() {
        let reason = r.error_reason.as_str();
        let type_name = if reason.is_empty() {
            format!("{source}_error")
        } else {
            reason.to_owned()
        };
        let message = match r.error_message.as_str() {
            "" => format!("{type_name} (HTTP {})", r.status),
            m => m.to_owned(),
        };
        let exception = json!({
            "ver": 2,
            "exceptions": [{
                "typeName": cut(&type_name, limit::NAME),
                "message": cut(&message, limit::MESSAGE),
                "hasFullStack": false,
            }],
            "severityLevel": if source == "client" { 2 } else { 3 },
            "problemId": cut(&format!("{source}:{type_name}"), limit::NAME),
            "properties": request_properties(r, id).0,
        });
        items.push(envelope(
            id,
            "Exception",
            at,
            Some(sample_rate),
            tags(id, ids, &ids.request, Some(r)),
            "ExceptionData",
            exception,
        ));
    }
    items
}

/// One metric series as MetricData: a single measurement named after the metric, its labels
/// (and the region) as properties.
pub fn metric_item(s: &MetricSample<'_>, value: f64, id: &Identity, unix_ms: u64) -> Value {
    let mut p = Props::new();
    for l in s.labels.iter() {
        p.put(l.0.as_str(), l.1.as_str());
    }
    p.put("Region", id.region.as_deref().unwrap_or_default());
    let ids = OperationIds {
        operation: String::new(),
        request: String::new(),
    };
    envelope(
        id,
        "Metric",
        time(unix_ms),
        None,
        tags(id, &ids, "", None),
        "MetricData",
        json!({
            "ver": 2,
            "metrics": [{ "name": cut(s.name.as_str(), limit::NAME), "kind": 0, "value": value, "count": 1 }],
            "properties": p.0,
        }),
    )
}

/// An item as one NDJSON line (without the newline); `None` when it is larger than the
/// endpoint accepts.
pub fn encode(item: &Value) -> Option<Vec<u8>> {
    let bytes = outpost_plugin_sdk::serde_json::to_vec(item).ok()?;
    (bytes.len() <= MAX_ITEM_BYTES).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::api::abi_stable::std_types::Tuple2;

    pub(crate) fn record<'a>() -> RequestRecord<'a> {
        RequestRecord {
            time_unix_ms: 1_795_478_400_123,
            request_id: "req-1".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: "b7ad6b7169203331".into(),
            listener: "http".into(),
            client_ip: "10.1.2.3".into(),
            method: "GET".into(),
            host: "api.example:8080".into(),
            path: "/orders/42".into(),
            api_id: "orders".into(),
            operation_id: "get-order".into(),
            route: "/orders/{id}".into(),
            product_id: "gold".into(),
            subscription_id: "sub-1".into(),
            backend_id: "b".into(),
            backend_url: "http://backend.internal:80/v1/orders/42?x=1".into(),
            status: 200,
            backend_status: 200,
            total_us: 1_500_000,
            backend_us: 1_234_567,
            bytes_in: 10,
            bytes_out: 2048,
            cache: "".into(),
            error_source: "".into(),
            error_reason: "".into(),
            error_message: "".into(),
            user_agent: "curl/8".into(),
        }
    }

    fn identity() -> Identity {
        Identity::new(
            "00000000-1111-2222-3333-444455556666",
            "edge-1",
            "i-42",
            Some("West Europe".into()),
        )
    }

    const ALL: Kinds = Kinds {
        dependencies: true,
        exceptions: true,
    };

    #[test]
    fn durations_have_days_and_seven_fraction_digits() {
        assert_eq!(duration(0), "0.00:00:00.0000000");
        assert_eq!(duration(1_500_000), "0.00:00:01.5000000");
        assert_eq!(duration(1), "0.00:00:00.0000010");
        assert_eq!(duration(3_723_000_042), "0.01:02:03.0000420");
        assert_eq!(duration(90_061_000_000), "1.01:01:01.0000000");
        assert_eq!(time(1_795_478_400_123), "2026-11-24T00:00:00.123Z");
    }

    #[test]
    fn a_request_becomes_request_data_with_the_schema_field_names() {
        let r = record();
        let ids = operation_ids(&r);
        let items = request_items(&r, &identity(), ALL, &ids, 25.0);
        assert_eq!(items.len(), 2, "request and dependency, no failure");
        let req = &items[0];
        assert_eq!(
            req["name"],
            "Microsoft.ApplicationInsights.00000000111122223333444455556666.Request"
        );
        assert_eq!(req["iKey"], "00000000-1111-2222-3333-444455556666");
        assert_eq!(req["time"], "2026-11-24T00:00:00.123Z");
        assert_eq!(req["sampleRate"], 25.0);
        assert_eq!(req["data"]["baseType"], "RequestData");
        let tags = &req["tags"];
        assert_eq!(tags["ai.operation.id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tags["ai.operation.parentId"], "b7ad6b7169203331");
        assert_eq!(tags["ai.operation.name"], "GET /orders/{id}");
        assert_eq!(tags["ai.cloud.role"], "edge-1");
        assert_eq!(tags["ai.cloud.roleInstance"], "i-42");
        assert_eq!(tags["ai.location.ip"], "10.1.2.3");
        let b = &req["data"]["baseData"];
        assert_eq!(b["ver"], 2);
        assert_eq!(b["id"], "00f067aa0ba902b7");
        assert_eq!(b["name"], "GET /orders/{id}");
        assert_eq!(b["duration"], "0.00:00:01.5000000");
        assert_eq!(b["responseCode"], "200");
        assert_eq!(b["success"], true);
        assert_eq!(b["url"], "http://api.example:8080/orders/42");
        let p = &b["properties"];
        assert_eq!(p["API Name"], "orders");
        assert_eq!(p["Operation Name"], "get-order");
        assert_eq!(p["Product Name"], "gold");
        assert_eq!(p["Subscription Name"], "sub-1");
        assert_eq!(p["Region"], "West Europe");
        assert_eq!(p["Cache"], "None");
        assert_eq!(p["Request Id"], "req-1");
        assert_eq!(b["measurements"]["Request Size"], 10.0);
        assert_eq!(b["measurements"]["Response Size"], 2048.0);

        let dep = &items[1];
        assert_eq!(dep["data"]["baseType"], "RemoteDependencyData");
        assert_eq!(
            dep["name"],
            "Microsoft.ApplicationInsights.00000000111122223333444455556666.RemoteDependency"
        );
        let d = &dep["data"]["baseData"];
        assert_eq!(d["type"], "HTTP");
        assert_eq!(d["name"], "GET /v1/orders/42");
        assert_eq!(d["target"], "backend.internal", "default port dropped");
        assert_eq!(d["data"], "http://backend.internal:80/v1/orders/42?x=1");
        assert_eq!(d["resultCode"], "200");
        assert_eq!(d["duration"], "0.00:00:01.2345670");
        assert_eq!(d["success"], true);
        assert_eq!(d["id"].as_str().map(str::len), Some(16));
        assert_ne!(d["id"], b["id"]);
        assert_eq!(dep["tags"]["ai.operation.parentId"], "00f067aa0ba902b7");
        assert_eq!(dep["tags"]["ai.operation.id"], tags["ai.operation.id"]);
    }

    #[test]
    fn a_backend_failure_is_a_failed_dependency_and_an_exception() {
        let mut r = record();
        r.status = 502;
        r.backend_status = 0;
        r.error_source = "backend".into();
        r.error_reason = "backend_unavailable".into();
        r.error_message = "connection refused".into();
        let items = request_items(&r, &identity(), ALL, &operation_ids(&r), 100.0);
        let types: Vec<&str> = items
            .iter()
            .map(|i| i["data"]["baseType"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["RequestData", "RemoteDependencyData", "ExceptionData"]
        );
        assert_eq!(items[0]["data"]["baseData"]["success"], false);
        assert_eq!(items[0]["data"]["baseData"]["responseCode"], "502");
        let d = &items[1]["data"]["baseData"];
        assert_eq!(d["success"], false);
        assert_eq!(d["resultCode"], "backend_unavailable");
        let e = &items[2]["data"]["baseData"];
        assert_eq!(e["exceptions"][0]["typeName"], "backend_unavailable");
        assert_eq!(e["exceptions"][0]["message"], "connection refused");
        assert_eq!(e["severityLevel"], 3);
        assert_eq!(
            items[2]["tags"]["ai.operation.parentId"],
            "00f067aa0ba902b7"
        );

        // Kinds switched off.
        let off = Kinds {
            dependencies: false,
            exceptions: false,
        };
        assert_eq!(
            request_items(&r, &identity(), off, &operation_ids(&r), 100.0).len(),
            1
        );
        // No backend call, no dependency; a refused request without trace ids gets new ones.
        let mut r = record();
        r.backend_status = 0;
        r.backend_url = "".into();
        r.trace_id = "".into();
        r.span_id = "".into();
        r.parent_span_id = "".into();
        r.status = 401;
        r.error_source = "client".into();
        let items = request_items(&r, &identity(), ALL, &operation_ids(&r), 100.0);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1]["data"]["baseType"], "ExceptionData");
        assert_eq!(
            items[1]["data"]["baseData"]["exceptions"][0]["message"], "client_error (HTTP 401)",
            "never an empty message"
        );
        let op = items[0]["tags"]["ai.operation.id"].as_str().unwrap();
        assert!(is_hex(op, 32), "{op}");
        assert!(items[0]["tags"].get("ai.operation.parentId").is_none());
        assert_eq!(items[1]["tags"]["ai.operation.id"], op);
    }

    #[test]
    fn long_fields_are_cut_to_their_limits() {
        let long = "é".repeat(10_000);
        let path = format!("/{}", "p".repeat(5000));
        let mut r = record();
        r.route = "".into();
        r.path = path.as_str().into();
        r.api_id = long.as_str().into();
        r.user_agent = long.as_str().into();
        r.client_ip = long.as_str().into();
        r.status = 500;
        r.error_source = "gateway".into();
        let msg = "m".repeat(40_000);
        r.error_message = msg.as_str().into();
        let items = request_items(&r, &identity(), ALL, &operation_ids(&r), 100.0);
        let b = &items[0]["data"]["baseData"];
        let chars = |v: &Value| v.as_str().unwrap().chars().count();
        assert_eq!(chars(&b["name"]), limit::NAME);
        assert_eq!(chars(&b["url"]), limit::URL);
        assert_eq!(chars(&b["properties"]["API Name"]), limit::DATA);
        assert_eq!(
            chars(&items[0]["tags"]["ai.user.userAgent"]),
            limit::USER_AGENT
        );
        assert_eq!(chars(&items[0]["tags"]["ai.location.ip"]), limit::IP);
        assert_eq!(chars(&items[0]["tags"]["ai.operation.name"]), limit::NAME);
        let e = &items[2]["data"]["baseData"]["exceptions"][0];
        assert_eq!(chars(&e["message"]), limit::MESSAGE);
        for item in &items {
            assert!(encode(item).is_some(), "every item stays under 64 KiB");
        }
        assert_eq!(cut("aé", 1), "a");
        assert_eq!(cut("aé", 5), "aé");
    }

    #[test]
    fn sampling_is_decided_per_operation() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("{i:032x}")).collect();
        let kept = ids.iter().filter(|i| sampled_in(i, 25.0)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
        assert!(ids.iter().all(|i| sampled_in(i, 100.0)));
        assert!(!ids.iter().any(|i| sampled_in(i, 0.0)));
        assert_eq!(sampled_in(&ids[7], 50.0), sampled_in(&ids[7], 50.0));
        let mut r = record();
        assert!(!is_failure(&r));
        r.status = 503;
        assert!(is_failure(&r));
        r.status = 404;
        r.error_source = "client".into();
        assert!(is_failure(&r));
    }

    #[test]
    fn metric_samples_become_metric_data() {
        let labels = [Tuple2("reason".into(), "quota".into())];
        let s = MetricSample {
            name: "appinsights_items_dropped_total".into(),
            help: "".into(),
            kind: 1,
            labels: labels.as_slice().into(),
            value: 7.0,
        };
        let m = metric_item(&s, 3.0, &identity(), 1_795_478_400_000);
        assert_eq!(m["data"]["baseType"], "MetricData");
        let b = &m["data"]["baseData"];
        assert_eq!(b["metrics"][0]["name"], "appinsights_items_dropped_total");
        assert_eq!(b["metrics"][0]["value"], 3.0);
        assert_eq!(b["metrics"][0]["kind"], 0);
        assert_eq!(b["properties"]["reason"], "quota");
        assert_eq!(b["properties"]["Region"], "West Europe");
        assert!(m.get("sampleRate").is_none());
        assert_eq!(m["tags"]["ai.cloud.role"], "edge-1");
    }

    #[test]
    fn targets_drop_default_ports_only() {
        assert_eq!(target("https://h.example:443/x"), "h.example");
        assert_eq!(target("https://h.example:8443/x"), "h.example:8443");
        assert_eq!(target("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(target("http://u:p@h:80/"), "h");
        assert_eq!(target("nonsense"), "");
    }
}
