//! Header work on the request path: hop-by-hop removal, `X-Forwarded-*` / `Forwarded`, the
//! request id and W3C trace context. Each function allocates only for the header value it
//! creates.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`: kept when the client sends a sane one, generated otherwise, returned to
/// the client and sent to the backend.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// The W3C trace context header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1). `Trailer` is
/// not one of them: it announces trailer fields end to end, and HTTP/1.1 needs it to send them.
fn fixed_hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// Whether a request asks for a WebSocket upgrade: `Connection: upgrade` and `Upgrade:
/// websocket`. Other upgrades (`h2c`, …) are not tunnelled: a raw tunnel would carry later
/// requests past routing and subscription checks. HTTP/1.1 only.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: the fixed list, whatever `Connection` names, and `TE` unless it
/// is exactly `trailers` (which gRPC needs end to end). With `keep_upgrade`, `Upgrade` and
/// `Connection: upgrade` survive so the backend sees the upgrade request.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Names listed in Connection are removed too; collecting them allocates only when a
    // client lists extension headers there, which is rare.
    let mut listed: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    let upgrade = if keep_upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for name in fixed_hop_by_hop() {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE) {
        if !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers") {
            headers.remove(header::TE);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What one client connection contributes to the forwarding headers, formatted once per
/// connection rather than per request.
#[derive(Debug)]
pub struct ForwardedFor {
    ip: HeaderValue,
    element: String,
    proto: HeaderValue,
}

impl ForwardedFor {
    /// For a client at `client` (IPv4-mapped IPv6 shown as IPv4) over TLS or not.
    pub fn new(client: IpAddr, tls: bool) -> Self {
        let client = client.to_canonical();
        let proto = if tls { "https" } else { "http" };
        let ip = client.to_string();
        let element = match client {
            IpAddr::V4(_) => format!("for={ip};proto={proto}"),
            IpAddr::V6(_) => format!("for=\"[{ip}]\";proto={proto}"),
        };
        Self {
            ip: HeaderValue::from_str(&ip).expect("an IP address is a valid header value"),
            element,
            proto: HeaderValue::from_static(proto),
        }
    }
}

/// Adds `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host` and an RFC 7239
/// `Forwarded` element (appended) describing this hop. A client's own `X-Forwarded-Host` and
/// `X-Forwarded-Proto` are replaced, never passed on.
pub fn add_forwarded(headers: &mut HeaderMap, conn: &ForwardedFor, host: Option<&str>) {
    match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let xff = format!("{prev}, {}", conn.element_ip());
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
                headers.insert(&X_FORWARDED_FOR, v);
            }
        }
        _ => {
            headers.insert(&X_FORWARDED_FOR, conn.ip.clone());
        }
    }
    headers.insert(&X_FORWARDED_PROTO, conn.proto.clone());
    headers.remove(&X_FORWARDED_HOST);
    let host = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic() && b != b'"'));
    let prev = headers
        .get(&FORWARDED)
        .and_then(|v| v.to_str().ok())
        .filter(|p| !p.trim().is_empty());
    let mut forwarded = String::with_capacity(
        prev.map_or(0, |p| p.len() + 2) + conn.element.len() + host.map_or(0, |h| h.len() + 8),
    );
    if let Some(prev) = prev {
        forwarded.push_str(prev);
        forwarded.push_str(", ");
    }
    forwarded.push_str(&conn.element);
    if let Some(host) = host {
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(&X_FORWARDED_HOST, v);
        }
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
    }
    // The string becomes the header's storage: no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
        headers.insert(&FORWARDED, v);
    }
}

impl ForwardedFor {
    /// The client's address as text.
    pub fn ip(&self) -> &str {
        self.element_ip()
    }

    /// The client's IP as a header value (shared, not copied).
    pub fn ip_value(&self) -> &HeaderValue {
        &self.ip
    }

    fn element_ip(&self) -> &str {
        self.ip.to_str().unwrap_or_default()
    }
}

/// The request id: the client's `x-request-id` when it is 1–128 visible ASCII characters,
/// a new UUID v4 otherwise.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    let mut raw = fastrand::u128(..).to_be_bytes();
    raw[6] = (raw[6] & 0x0f) | 0x40; // version 4
    raw[8] = (raw[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in raw.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        hex_byte(*byte, &mut out[o..o + 2]);
        o += 2;
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are valid header bytes")
}

/// This hop's trace context, for logs and telemetry: lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The trace id.
    pub trace_id: [u8; 32],
    /// The gateway's span id (the parent id it sends the backend).
    pub span_id: [u8; 16],
    /// The client's span id, when the gateway continues the client's trace.
    pub parent_id: Option<[u8; 16]>,
}

/// W3C trace context for this hop: a valid incoming `traceparent` keeps its trace id and
/// flags and gets a new parent id (the gateway's span); an absent or invalid one is replaced
/// by a new trace. `tracestate` passes through.
pub fn propagate_traceparent(headers: &mut HeaderMap) -> Hop {
    let mut trace_id = [0u8; 32];
    let mut flags = *b"01";
    let mut parent_id = None;
    match headers
        .get(&TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()))
    {
        Some((t, p, f)) => {
            trace_id = t;
            parent_id = Some(p);
            flags = f;
        }
        None => {
            let raw = loop {
                let r = fastrand::u128(..);
                if r != 0 {
                    break r;
                }
            };
            for (i, byte) in raw.to_be_bytes().iter().enumerate() {
                hex_byte(*byte, &mut trace_id[i * 2..i * 2 + 2]);
            }
        }
    }
    let span = loop {
        let s = fastrand::u64(..);
        if s != 0 {
            break s;
        }
    };
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(&trace_id);
    out[35] = b'-';
    for (i, byte) in span.to_be_bytes().iter().enumerate() {
        hex_byte(*byte, &mut out[36 + i * 2..38 + i * 2]);
    }
    out[52] = b'-';
    out[53..55].copy_from_slice(&flags);
    headers.insert(
        &TRACEPARENT,
        HeaderValue::from_bytes(&out).expect("hex and dashes are valid header bytes"),
    );
    let mut span_id = [0u8; 16];
    span_id.copy_from_slice(&out[36..52]);
    Hop {
        trace_id,
        span_id,
        parent_id,
    }
}

/// Parses `version-traceid-parentid-flags` into the trace id, the parent id and the flags;
/// `None` when invalid (W3C Trace Context §3.2).
fn parse_traceparent(v: &[u8]) -> Option<([u8; 32], [u8; 16], [u8; 2])> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let lower_hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    if !lower_hex(version)
        || version == b"ff"
        || !lower_hex(trace)
        || !lower_hex(parent)
        || !lower_hex(flags)
    {
        return None;
    }
    // Version 00 is exactly 55 bytes; later versions may append fields after a dash.
    if (version == b"00" && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if trace.iter().all(|b| *b == b'0') || parent.iter().all(|b| *b == b'0') {
        return None;
    }
    let (mut t, mut p) = ([0u8; 32], [0u8; 16]);
    t.copy_from_slice(trace);
    p.copy_from_slice(parent);
    Some((t, p, [flags[0], flags[1]]))
}

fn hex_byte(b: u8, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out[0] = HEX[usize::from(b >> 4)];
    out[1] = HEX[usize::from(b & 0xf)];
}

/// Total size of a request head as it would appear on the wire (name, value, ": " and CRLF per
/// header), to enforce `limits.max_header_bytes` the same way for HTTP/1 and HTTP/2.
pub fn head_size(headers: &HeaderMap, uri_len: usize) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + uri_len
        + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_connection_listed_ones_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_and_upgrades_survive() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
        ]);
        let conn = ForwardedFor::new("::1".parse().expect("ip"), true);
        add_forwarded(&mut h, &conn, Some("api.example.com:8443"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com:8443");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.1, for=\"[::1]\";proto=https;host=\"api.example.com:8443\""
        );
    }

    #[test]
    fn client_forwarding_claims_are_replaced() {
        // A host that cannot be represented drops the client's X-Forwarded-Host too; an
        // IPv4-mapped address is shown as IPv4.
        let mut h = map(&[
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let conn = ForwardedFor::new("::ffff:10.1.2.3".parse().expect("ip"), false);
        add_forwarded(&mut h, &conn, Some("bad host"));
        assert!(h.get("x-forwarded-host").is_none());
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=http");
    }

    #[test]
    fn only_websocket_upgrades_are_recognised() {
        let h = map(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        assert!(!is_upgrade(&h));
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_upgrade(&h));
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h), "abc-123");
        let id = request_id(&HeaderMap::new());
        let s = id.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_ne!(request_id(&HeaderMap::new()), id);
    }

    #[test]
    fn traceparent_is_continued_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = map(&[("traceparent", incoming)]);
        let Hop {
            trace_id: trace,
            span_id: span,
            parent_id,
        } = propagate_traceparent(&mut h);
        assert_eq!(&trace, b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent_id, Some(*b"00f067aa0ba902b7"));
        let out = h["traceparent"].to_str().expect("ascii");
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_eq!(&out.as_bytes()[36..52], &span);
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming);
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = map(&[("traceparent", bad)]);
            let hop = propagate_traceparent(&mut h);
            assert_eq!(hop.parent_id, None, "{bad}");
            let trace = hop.trace_id;
            let out = h["traceparent"].to_str().expect("ascii");
            assert_eq!(out.len(), 55);
            assert!(parse_traceparent(out.as_bytes()).is_some(), "{out}");
            assert_eq!(&out.as_bytes()[3..35], &trace);
            assert_ne!(&out[3..35], bad.get(3..35).unwrap_or(""));
        }
    }
}
