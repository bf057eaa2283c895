//! Telemetry items ("envelopes") as the ingestion endpoint reads them: RequestData per request,
//! RemoteDependencyData per backend call, ExceptionData per failure, MetricData per metric
//! series. Field names, context tags and length limits follow the Application Insights schema
//! (EndpointSpecs Bond/Docs); strings longer than their limit are cut here rather than have
//! the endpoint refuse the item.
//!
//! Items are written straight from the borrowed record into their NDJSON line, with what is
//! the same for every item of a sink (names, key, cloud role tags, region) serialised once in
//! an [`Encoder`]: the sink's thread does this for every request, so it allocates one buffer
//! per item and nothing else.

use std::borrow::Cow;
use std::ops::Range;

use outpost_plugin_sdk::api::abi_stable::std_types::RStr;
use outpost_plugin_sdk::serde_json::ser::{CompactFormatter, Formatter as _};
use outpost_plugin_sdk::{MetricSample, RequestRecord};

#[cfg(test)]
use outpost_plugin_sdk::serde_json::{self, Value};

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
    // No more bytes than allowed characters: nothing to count.
    if s.len() <= max {
        return s;
    }
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A duration as the schema wants it: `d.hh:mm:ss.fffffff` (100 ns ticks).
pub fn duration(us: u64) -> String {
    let mut buf = Vec::with_capacity(24);
    push_duration(&mut buf, us);
    String::from_utf8(buf).unwrap_or_default()
}

/// ISO 8601 UTC with milliseconds and `Z`.
pub fn time(unix_ms: u64) -> String {
    let mut buf = Vec::with_capacity(24);
    push_time(&mut buf, unix_ms);
    String::from_utf8(buf).unwrap_or_default()
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
    (sampling_score(operation_id) as f64) / 1000.0 < percentage
}

/// An operation id's place in `0..100_000`, the same in every process, and fixed from
/// 2026-11-25 on (pinned by a test): seeded with the id's length, its bytes read 8 at a time
/// (little-endian), each word xored in, multiplied by 0x9e3779b97f4a7c15 and xor-shifted
/// right by 29; the bytes left over a byte at a time as FNV-1a; then `h ^= h >> 33;
/// h *= 0xff51afd7ed558ccd; h ^= h >> 33` (the first half of MurmurHash3's finalizer).
/// Before, the whole id went a byte at a time (FNV-1a): a 32-digit trace id cost a chain of
/// 32 dependent multiplies for every request, the many sampled out included.
pub fn sampling_score(operation_id: &str) -> u64 {
    let bytes = operation_id.as_bytes();
    let mut h = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut word = [0; 8];
        word.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h % 100_000
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `bytes` random bytes in lowercase hex.
fn push_random_hex(buf: &mut Vec<u8>, bytes: usize) {
    for _ in 0..bytes {
        let b = fastrand::u8(..);
        buf.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = Vec::with_capacity(bytes * 2);
    push_random_hex(&mut buf, bytes);
    String::from_utf8(buf).unwrap_or_default()
}

/// Whether `s` is `len` hex digits. Without a branch per character: random hex digits
/// are digits or letters at random, which costs a mispredicted branch every other character.
fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes().fold(true, |ok, b| {
            let lower = b | 0x20;
            ok & ((b.wrapping_sub(b'0') < 10) | (lower.wrapping_sub(b'a') < 6))
        })
}

/// The ids that tie one request's items together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationIds<'a> {
    /// `ai.operation.id`: the W3C trace id (a new one when the request had none).
    pub operation: Cow<'a, str>,
    /// RequestData `id`: the gateway's span id (the one it sent the backend).
    pub request: Cow<'a, str>,
}

/// The ids of a record (borrowed from it unless new ones are needed).
pub fn operation_ids<'a>(r: &RequestRecord<'a>) -> OperationIds<'a> {
    let trace = r.trace_id.as_str();
    let span = r.span_id.as_str();
    OperationIds {
        operation: if is_hex(trace, 32) {
            Cow::Borrowed(trace)
        } else {
            Cow::Owned(random_hex(16))
        },
        request: if is_hex(span, 16) {
            Cow::Borrowed(span)
        } else {
            Cow::Owned(random_hex(8))
        },
    }
}

/// `ai.internal.sdkVersion`.
pub const SDK_VERSION: &str = concat!("outpost-appinsights:", env!("CARGO_PKG_VERSION"));

/// `METHOD route` (the operation's template; the path when nothing matched), in parts.
fn name_parts<'a>(r: &RequestRecord<'a>) -> [&'a str; 3] {
    let what = if r.route.is_empty() {
        r.path.as_str()
    } else {
        r.route.as_str()
    };
    [r.method.as_str(), " ", what]
}

/// API Management's `Cache` property values.
fn cache_property(cache: &str) -> &str {
    match cache {
        "" => "None",
        "hit" => "Hit",
        "miss" => "Miss",
        other => other,
    }
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
pub fn target(url: &str) -> &str {
    let Some((scheme, authority, _)) = split_url(url) else {
        return "";
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default = match scheme {
        "http" => Some(":80"),
        "https" => Some(":443"),
        _ => None,
    };
    default
        .and_then(|d| authority.strip_suffix(d))
        .unwrap_or(authority)
}

// Writing JSON into a buffer. Keys are the schema's (ASCII, nothing to escape); every value
// goes through `push_str`, which escapes as serde_json does.

/// `s`'s characters as JSON string contents (without the quotes).
fn push_escaped(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Most values have nothing to escape: a check without branches, which the compiler
    // vectorises, and one copy.
    let plain = !bytes
        .iter()
        .fold(false, |e, &b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        buf.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escape);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// A JSON string.
fn push_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    push_escaped(buf, s);
    buf.push(b'"');
}

/// A JSON string of the parts joined, cut to `max` characters.
fn push_joined(buf: &mut Vec<u8>, parts: &[&str], max: usize) {
    buf.push(b'"');
    if parts.iter().map(|p| p.len()).sum::<usize>() <= max {
        for p in parts {
            push_escaped(buf, p);
        }
    } else {
        let mut left = max;
        for p in parts {
            let kept = cut(p, left);
            push_escaped(buf, kept);
            if kept.len() < p.len() {
                break;
            }
            left -= kept.chars().count();
        }
    }
    buf.push(b'"');
}

/// `"key":`.
fn push_key(buf: &mut Vec<u8>, key: &str) {
    buf.push(b'"');
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
}

/// `"key":"value",`, cut to `max` characters; nothing for an empty value (the schema's "not
/// applicable").
fn push_entry(buf: &mut Vec<u8>, key: &str, value: &str, max: usize) {
    if !value.is_empty() {
        push_key(buf, key);
        push_str(buf, cut(value, max));
        buf.push(b',');
    }
}

/// Closes an object whose members each end with a comma.
fn close(buf: &mut Vec<u8>) {
    match buf.last_mut() {
        Some(last) if *last == b',' => *last = b'}',
        _ => buf.push(b'}'),
    }
}

// Numbers as serde_json writes them (a Vec never fails a write).
fn push_u64(buf: &mut Vec<u8>, n: u64) {
    let _ = CompactFormatter.write_u64(buf, n);
}

fn push_f64(buf: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = CompactFormatter.write_f64(buf, v);
    } else {
        buf.extend_from_slice(b"null");
    }
}

fn push_bool(buf: &mut Vec<u8>, b: bool) {
    buf.extend_from_slice(if b { b"true" } else { b"false" });
}

/// `n` as exactly `width` decimal digits (`n` has no more).
fn push_digits(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let at = buf.len();
    buf.resize(at + width, b'0');
    for d in buf[at..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// See [`duration`].
fn push_duration(buf: &mut Vec<u8>, us: u64) {
    let ticks = (us % 1_000_000) * 10;
    let secs = us / 1_000_000;
    let (days, secs) = (secs / 86_400, secs % 86_400);
    push_u64(buf, days);
    buf.push(b'.');
    push_digits(buf, secs / 3600, 2);
    buf.push(b':');
    push_digits(buf, secs % 3600 / 60, 2);
    buf.push(b':');
    push_digits(buf, secs % 60, 2);
    buf.push(b'.');
    push_digits(buf, ticks, 7);
}

/// The last millisecond of the year 9999, the latest four year digits can say.
const MAX_TIME_MS: u64 = 253_402_300_800_000 - 1;

/// See [`time`].
fn push_time(buf: &mut Vec<u8>, unix_ms: u64) {
    let ms = unix_ms.min(MAX_TIME_MS);
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    // Days to a civil date (Howard Hinnant's `civil_from_days`), from 0000-03-01 so that
    // February, and its leap day, comes last in a "year".
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let m = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * m + 2) / 5 + 1;
    let month = if m < 10 { m + 3 } else { m - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    push_digits(buf, year, 4);
    buf.push(b'-');
    push_digits(buf, month, 2);
    buf.push(b'-');
    push_digits(buf, day, 2);
    buf.push(b'T');
    push_digits(buf, ms_of_day / 3_600_000, 2);
    buf.push(b':');
    push_digits(buf, ms_of_day / 60_000 % 60, 2);
    buf.push(b':');
    push_digits(buf, ms_of_day / 1000 % 60, 2);
    buf.push(b'.');
    push_digits(buf, ms_of_day % 1000, 3);
    buf.push(b'Z');
}

/// `,"sampleRate":<rate>`.
fn push_sample_rate(buf: &mut Vec<u8>, rate: f64) {
    buf.extend_from_slice(br#","sampleRate":"#);
    push_f64(buf, rate);
}

/// The item types, each with its envelope name and `baseType`.
#[derive(Debug, Clone, Copy)]
enum Type {
    Request,
    Dependency,
    Exception,
    Metric,
}

impl Type {
    const ALL: [Type; 4] = [
        Type::Request,
        Type::Dependency,
        Type::Exception,
        Type::Metric,
    ];

    /// The envelope name's last part.
    fn name(self) -> &'static str {
        match self {
            Type::Request => "Request",
            Type::Dependency => "RemoteDependency",
            Type::Exception => "Exception",
            Type::Metric => "Metric",
        }
    }

    /// Where the item's `data` opens, up to the first field of `baseData` after `ver`.
    fn data(self) -> &'static [u8] {
        match self {
            Type::Request => br#","data":{"baseType":"RequestData","baseData":{"ver":2,"#,
            Type::Dependency => {
                br#","data":{"baseType":"RemoteDependencyData","baseData":{"ver":2,"#
            }
            Type::Exception => br#","data":{"baseType":"ExceptionData","baseData":{"ver":2,"#,
            Type::Metric => br#","data":{"baseType":"MetricData","baseData":{"ver":2,"#,
        }
    }
}

/// How an item gets its operation tags: written from the record, or copied from the
/// request's first item.
#[derive(Clone, Copy)]
enum Tags<'a> {
    Write(&'a OperationIds<'a>, &'a RequestRecord<'a>),
    Copy(&'a [u8]),
}

/// What every item of one request carries alike, as its request item has it: the operation
/// tags and the custom properties (JSON members, each ending with a comma).
#[derive(Clone, Copy)]
struct Common<'b> {
    tags: &'b [u8],
    props: &'b [u8],
}

/// Where a request item holds its [`Common`] parts.
struct CommonAt {
    tags: Range<usize>,
    props: Range<usize>,
}

/// Where a sink writes the items of one request, kept from one request to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    request: Vec<u8>,
    dependency: Vec<u8>,
    exception: Vec<u8>,
}

/// Writes a sink's items as NDJSON lines, straight from the records; what is the same for
/// every item is serialised once, in [`Encoder::new`].
#[derive(Debug, Clone)]
pub struct Encoder {
    kinds: Kinds,
    /// Per [`Type`]: the envelope up to its time,
    /// `{"ver":1,"name":"Microsoft.ApplicationInsights.<key>.<Type>","iKey":"<key>","time":"`.
    heads: [Box<[u8]>; 4],
    /// `,"sampleRate":<percentage>` for the configured sampling percentage.
    sample_rate: (f64, Box<[u8]>),
    /// The `ai.cloud.role`, `ai.cloud.roleInstance` and `ai.internal.sdkVersion` tags, each
    /// ending with a comma.
    sink_tags: Box<[u8]>,
    /// `"Region":"<region>",` (nothing without a region).
    region: Box<[u8]>,
    /// Per [`Type`]: the bytes of an item besides the record's strings, to size its buffer.
    fixed_bytes: [usize; 4],
}

impl Encoder {
    /// An encoder for a sink's identity, item types and sampling percentage.
    pub fn new(id: &Identity, kinds: Kinds, sampling_percentage: f64) -> Encoder {
        let heads = Type::ALL.map(|t| {
            let mut b = br#"{"ver":1,"name":"#.to_vec();
            push_joined(&mut b, &[&id.name_prefix, t.name()], usize::MAX);
            b.extend_from_slice(br#","iKey":"#);
            push_str(&mut b, &id.ikey);
            b.extend_from_slice(br#","time":""#);
            b.into_boxed_slice()
        });
        let mut sink_tags = Vec::new();
        push_entry(&mut sink_tags, "ai.cloud.role", &id.role, limit::ROLE);
        push_entry(
            &mut sink_tags,
            "ai.cloud.roleInstance",
            &id.role_instance,
            limit::ROLE,
        );
        push_entry(
            &mut sink_tags,
            "ai.internal.sdkVersion",
            SDK_VERSION,
            limit::SDK_VERSION,
        );
        let mut region = Vec::new();
        push_entry(
            &mut region,
            "Region",
            id.region.as_deref().unwrap_or_default(),
            limit::DATA,
        );
        let mut rate = Vec::new();
        push_sample_rate(&mut rate, sampling_percentage);
        let mut encoder = Encoder {
            kinds,
            heads,
            sample_rate: (sampling_percentage, rate.into_boxed_slice()),
            sink_tags: sink_tags.into_boxed_slice(),
            region: region.into_boxed_slice(),
            fixed_bytes: [0; 4],
        };
        encoder.fixed_bytes = encoder.measure_fixed_bytes();
        encoder
    }

    /// The size of each item type for a record whose every string is empty (but the ids),
    /// with its largest numbers: the part of an item its strings do not change.
    fn measure_fixed_bytes(&self) -> [usize; 4] {
        let r = RequestRecord {
            time_unix_ms: 0,
            request_id: "".into(),
            trace_id: "".into(),
            span_id: "".into(),
            parent_span_id: "".into(),
            listener: "".into(),
            client_ip: "".into(),
            method: "".into(),
            host: "".into(),
            path: "".into(),
            api_id: "".into(),
            operation_id: "".into(),
            route: "".into(),
            product_id: "".into(),
            subscription_id: "".into(),
            backend_id: "".into(),
            backend_url: "".into(),
            status: 599,
            backend_status: 599,
            total_us: 10_000 * 86_400_000_000,
            backend_us: 10_000 * 86_400_000_000,
            bytes_in: 1 << 40,
            bytes_out: 1 << 40,
            cache: "".into(),
            error_source: "".into(),
            error_reason: "".into(),
            error_message: "".into(),
            user_agent: "".into(),
        };
        let ids = OperationIds {
            operation: Cow::Borrowed(""),
            request: Cow::Borrowed(""),
        };
        let mut request = Vec::new();
        let at = self.write_request(&mut request, &r, &ids, 100.0);
        let common = Common {
            tags: &request[at.tags],
            props: &request[at.props],
        };
        let mut buf = Vec::new();
        let mut size = |write: &dyn Fn(&mut Vec<u8>)| {
            buf.clear();
            write(&mut buf);
            buf.len()
        };
        [
            request.len(),
            size(&|b| self.write_dependency(b, &r, &ids, 100.0, common)),
            size(&|b| self.write_exception(b, &r, &ids, 100.0, common)),
            size(&|b| self.write_metric(b, "", &[], f64::MAX, 0)),
        ]
    }

    /// `buf` emptied, with room for an item of type `t` of `r`.
    fn prepare(&self, buf: &mut Vec<u8>, t: Type, r: &RequestRecord<'_>) {
        buf.clear();
        buf.reserve(self.room(t, r));
    }

    /// The room an item of type `t` of `r` needs: its fixed part and the record's strings it
    /// carries, with their keys.
    fn room(&self, t: Type, r: &RequestRecord<'_>) -> usize {
        // The average key of an entry left out when empty, with its quotes, colon and comma.
        const KEY: usize = 20;
        let len = |s: &[RStr<'_>]| -> usize {
            s.iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.len().min(limit::DATA) + KEY)
                .sum()
        };
        let common = len(&[
            r.request_id,
            r.trace_id,
            r.span_id,
            r.parent_span_id,
            r.client_ip,
            r.method,
            r.api_id,
            r.operation_id,
            r.product_id,
            r.subscription_id,
            r.cache,
            r.error_source,
            r.error_reason,
            r.user_agent,
        ]);
        // The name, in the tags and (but for exceptions) in `baseData`.
        let name = 2 * (r.method.len() + r.route.len().max(r.path.len()));
        let own = match t {
            Type::Request => name + len(&[r.host, r.path]),
            Type::Dependency => name + len(&[r.backend_id, r.backend_url, r.backend_url]),
            Type::Exception | Type::Metric => {
                name + len(&[r.error_message, r.error_reason, r.error_source])
            }
        };
        let size = self.fixed_bytes[t as usize] + common + own;
        size.min(MAX_ITEM_BYTES + 1)
    }

    /// `,"sampleRate":<rate>`, ready made for the configured percentage.
    fn push_rate(&self, buf: &mut Vec<u8>, rate: f64) {
        if rate == self.sample_rate.0 {
            buf.extend_from_slice(&self.sample_rate.1);
        } else {
            push_sample_rate(buf, rate);
        }
    }

    /// The envelope up to `baseData`'s first field: name, key, time, sample rate, tags (with
    /// a request's operation tags when `op` is given, then its parent id). Returns where the
    /// operation tags are in `buf`.
    fn open(
        &self,
        buf: &mut Vec<u8>,
        t: Type,
        unix_ms: u64,
        sample_rate: Option<f64>,
        op: Option<(Tags<'_>, &str)>,
    ) -> Range<usize> {
        buf.extend_from_slice(&self.heads[t as usize]);
        push_time(buf, unix_ms);
        buf.push(b'"');
        if let Some(rate) = sample_rate {
            self.push_rate(buf, rate);
        }
        buf.extend_from_slice(br#","tags":{"#);
        let start = buf.len();
        if let Some((tags, _)) = op {
            match tags {
                Tags::Write(ids, r) => {
                    push_entry(buf, "ai.operation.id", &ids.operation, limit::ID);
                    push_key(buf, "ai.operation.name");
                    push_joined(buf, &name_parts(r), limit::NAME);
                    buf.push(b',');
                    push_entry(buf, "ai.location.ip", r.client_ip.as_str(), limit::IP);
                    push_entry(
                        buf,
                        "ai.user.userAgent",
                        r.user_agent.as_str(),
                        limit::USER_AGENT,
                    );
                }
                Tags::Copy(written) => buf.extend_from_slice(written),
            }
        }
        let written = start..buf.len();
        if let Some((_, parent)) = op {
            push_entry(buf, "ai.operation.parentId", parent, limit::ID);
        }
        buf.extend_from_slice(&self.sink_tags);
        close(buf);
        buf.extend_from_slice(t.data());
        written
    }

    /// The custom properties every item of a request carries, named as API Management names
    /// them (written, or copied from the request's first item), the backend's id on backend
    /// calls, and then the closing of `baseData`, `data` and the envelope. Returns where the
    /// shared properties are in `buf`.
    fn properties_and_close(
        &self,
        buf: &mut Vec<u8>,
        r: &RequestRecord<'_>,
        written: Option<&[u8]>,
        backend: bool,
    ) -> Range<usize> {
        push_key(buf, "properties");
        buf.push(b'{');
        let start = buf.len();
        match written {
            Some(props) => {
                buf.extend_from_slice(props);
                buf.push(b',');
            }
            None => {
                push_entry(buf, "API Name", r.api_id.as_str(), limit::DATA);
                push_entry(buf, "Operation Name", r.operation_id.as_str(), limit::DATA);
                push_entry(buf, "Product Name", r.product_id.as_str(), limit::DATA);
                push_entry(
                    buf,
                    "Subscription Name",
                    r.subscription_id.as_str(),
                    limit::DATA,
                );
                buf.extend_from_slice(&self.region);
                push_entry(buf, "Cache", cache_property(r.cache.as_str()), limit::DATA);
                push_entry(buf, "Request Id", r.request_id.as_str(), limit::DATA);
                push_entry(buf, "HTTP Method", r.method.as_str(), limit::DATA);
                push_entry(buf, "Error Source", r.error_source.as_str(), limit::DATA);
                push_entry(buf, "Error Reason", r.error_reason.as_str(), limit::DATA);
            }
        }
        // Without the last member's comma, which closing the object replaces (there is
        // always one: `Cache` is never empty).
        let written = start..buf.len() - 1;
        if backend {
            push_entry(buf, "Backend ID", r.backend_id.as_str(), limit::DATA);
        }
        close(buf);
        buf.extend_from_slice(b"}}}");
        written
    }

    /// The items of one request: the request itself, its backend call and its failure (as
    /// configured), each handed to `item` as an NDJSON line (without the newline), written in
    /// `scratch` (no allocation once its buffers have grown to the items' size).
    /// `sample_rate` is what the request item stands for (100 for failures, which are always
    /// sent). What the items share (operation tags, custom properties) is written once, in
    /// the request item, and copied into the others.
    pub fn request_items(
        &self,
        r: &RequestRecord<'_>,
        ids: &OperationIds<'_>,
        sample_rate: f64,
        scratch: &mut Scratch,
        mut item: impl FnMut(&[u8]),
    ) {
        let Scratch {
            request,
            dependency,
            exception,
        } = scratch;
        self.prepare(request, Type::Request, r);
        let at = self.write_request(request, r, ids, sample_rate);
        let common = Common {
            tags: &request[at.tags],
            props: &request[at.props],
        };
        let backend_failed = r.error_source.as_str() == "backend";
        let with_dependency = self.kinds.dependencies && (r.backend_status != 0 || backend_failed);
        if with_dependency {
            self.prepare(dependency, Type::Dependency, r);
            self.write_dependency(dependency, r, ids, sample_rate, common);
        }
        let with_exception = self.kinds.exceptions && !r.error_source.is_empty();
        if with_exception {
            self.prepare(exception, Type::Exception, r);
            self.write_exception(exception, r, ids, sample_rate, common);
        }
        item(request);
        if with_dependency {
            item(dependency);
        }
        if with_exception {
            item(exception);
        }
    }

    /// A request item; returns where it holds what the request's other items share.
    fn write_request(
        &self,
        buf: &mut Vec<u8>,
        r: &RequestRecord<'_>,
        ids: &OperationIds<'_>,
        sample_rate: f64,
    ) -> CommonAt {
        let tags = self.open(
            buf,
            Type::Request,
            r.time_unix_ms,
            Some(sample_rate),
            Some((Tags::Write(ids, r), r.parent_span_id.as_str())),
        );
        push_key(buf, "id");
        push_str(buf, cut(&ids.request, limit::ID));
        buf.extend_from_slice(br#","name":"#);
        push_joined(buf, &name_parts(r), limit::NAME);
        buf.extend_from_slice(br#","duration":""#);
        push_duration(buf, r.total_us);
        buf.extend_from_slice(br#"","responseCode":""#);
        push_u64(buf, u64::from(r.status));
        buf.extend_from_slice(br#"","success":"#);
        push_bool(buf, r.status < 400 && r.error_source.is_empty());
        buf.push(b',');
        let (host, path) = (r.host.as_str(), r.path.as_str());
        if !host.is_empty() {
            push_key(buf, "url");
            push_joined(buf, &["http://", host, path], limit::URL);
            buf.push(b',');
        } else if !path.is_empty() {
            push_key(buf, "url");
            push_str(buf, cut(path, limit::URL));
            buf.push(b',');
        }
        buf.extend_from_slice(br#""measurements":{"Request Size":"#);
        push_f64(buf, r.bytes_in as f64);
        buf.extend_from_slice(br#","Response Size":"#);
        push_f64(buf, r.bytes_out as f64);
        buf.extend_from_slice(b"},");
        let props = self.properties_and_close(buf, r, None, false);
        CommonAt { tags, props }
    }

    /// Opens an item that hangs from the request's span (its backend call, its failure),
    /// with the operation tags the request item wrote.
    fn open_child(
        &self,
        buf: &mut Vec<u8>,
        t: Type,
        r: &RequestRecord<'_>,
        ids: &OperationIds<'_>,
        sample_rate: f64,
        common: Common<'_>,
    ) {
        self.open(
            buf,
            t,
            r.time_unix_ms,
            Some(sample_rate),
            Some((Tags::Copy(common.tags), &ids.request)),
        );
    }

    fn write_dependency(
        &self,
        buf: &mut Vec<u8>,
        r: &RequestRecord<'_>,
        ids: &OperationIds<'_>,
        sample_rate: f64,
        common: Common<'_>,
    ) {
        self.open_child(buf, Type::Dependency, r, ids, sample_rate, common);
        let backend_url = r.backend_url.as_str();
        let path = split_url(backend_url).map_or("", |(_, _, p)| p);
        let path = path.split('?').next().unwrap_or_default();
        push_key(buf, "name");
        if path.is_empty() {
            push_joined(buf, &name_parts(r), limit::NAME);
        } else {
            push_joined(buf, &[r.method.as_str(), " ", path], limit::NAME);
        }
        buf.extend_from_slice(br#","id":""#);
        push_random_hex(buf, 8);
        buf.extend_from_slice(br#"","resultCode":"#);
        match (r.backend_status, r.error_reason.as_str()) {
            (0, "") => buf.extend_from_slice(br#""0""#),
            (0, reason) => push_str(buf, cut(reason, limit::NAME)),
            (s, _) => {
                buf.push(b'"');
                push_u64(buf, u64::from(s));
                buf.push(b'"');
            }
        }
        buf.extend_from_slice(br#","duration":""#);
        push_duration(buf, r.backend_us);
        buf.extend_from_slice(br#"","success":"#);
        let backend_failed = r.error_source.as_str() == "backend";
        push_bool(buf, !backend_failed && (1..400).contains(&r.backend_status));
        if !backend_url.is_empty() {
            buf.extend_from_slice(br#","data":"#);
            push_str(buf, cut(backend_url, limit::DATA));
            buf.extend_from_slice(br#","target":"#);
            push_str(buf, cut(target(backend_url), limit::NAME));
        }
        buf.extend_from_slice(br#","type":"HTTP","#);
        self.properties_and_close(buf, r, Some(common.props), true);
    }

    fn write_exception(
        &self,
        buf: &mut Vec<u8>,
        r: &RequestRecord<'_>,
        ids: &OperationIds<'_>,
        sample_rate: f64,
        common: Common<'_>,
    ) {
        self.open_child(buf, Type::Exception, r, ids, sample_rate, common);
        let source = r.error_source.as_str();
        let reason = r.error_reason.as_str();
        // Failures are few: plain strings will do.
        let type_name = if reason.is_empty() {
            format!("{source}_error")
        } else {
            reason.to_owned()
        };
        let message = match r.error_message.as_str() {
            "" => Cow::Owned(format!("{type_name} (HTTP {})", r.status)),
            m => Cow::Borrowed(m),
        };
        buf.extend_from_slice(br#""exceptions":[{"typeName":"#);
        push_str(buf, cut(&type_name, limit::NAME));
        buf.extend_from_slice(br#","message":"#);
        push_str(buf, cut(&message, limit::MESSAGE));
        buf.extend_from_slice(br#","hasFullStack":false}],"severityLevel":"#);
        buf.push(if source == "client" { b'2' } else { b'3' });
        buf.extend_from_slice(br#","problemId":"#);
        push_joined(buf, &[source, ":", &type_name], limit::NAME);
        buf.push(b',');
        self.properties_and_close(buf, r, Some(common.props), false);
    }

    /// One metric series as MetricData: a single measurement named after the metric, its
    /// labels (and the region) as properties.
    pub fn metric_item(&self, s: &MetricSample<'_>, value: f64, unix_ms: u64) -> Vec<u8> {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|l| (l.0.as_str(), l.1.as_str()))
            .collect();
        let mut buf = Vec::with_capacity(self.fixed_bytes[Type::Metric as usize] + 256);
        self.write_metric(&mut buf, s.name.as_str(), &labels, value, unix_ms);
        buf
    }

    fn write_metric(
        &self,
        buf: &mut Vec<u8>,
        name: &str,
        labels: &[(&str, &str)],
        value: f64,
        unix_ms: u64,
    ) {
        let _ = self.open(buf, Type::Metric, unix_ms, None, None);
        buf.extend_from_slice(br#""metrics":[{"name":"#);
        push_str(buf, cut(name, limit::NAME));
        buf.extend_from_slice(br#","kind":0,"value":"#);
        push_f64(buf, value);
        buf.extend_from_slice(br#","count":1}],"properties":{"#);
        // Keys are unique: a later label of the same (cut) key, or the region, wins.
        let mut props: Vec<(&str, &str)> = Vec::with_capacity(labels.len());
        for &(k, v) in labels {
            if v.is_empty() {
                continue;
            }
            let k = cut(k, limit::KEY);
            match props.iter_mut().find(|(pk, _)| *pk == k) {
                Some(p) => p.1 = v,
                None => props.push((k, v)),
            }
        }
        let has_region = !self.region.is_empty();
        for (k, v) in props {
            if !(has_region && k == "Region") {
                push_str(buf, k);
                buf.push(b':');
                push_str(buf, cut(v, limit::DATA));
                buf.push(b',');
            }
        }
        buf.extend_from_slice(&self.region);
        close(buf);
        buf.extend_from_slice(b"}}}");
    }
}

/// The items of one request as JSON values (what the tests read).
#[cfg(test)]
pub fn request_items(
    r: &RequestRecord<'_>,
    id: &Identity,
    kinds: Kinds,
    ids: &OperationIds<'_>,
    sample_rate: f64,
) -> Vec<Value> {
    let mut items = Vec::new();
    let mut scratch = Scratch::default();
    Encoder::new(id, kinds, sample_rate).request_items(r, ids, sample_rate, &mut scratch, |line| {
        items.push(serde_json::from_slice(line).expect("an item is JSON"))
    });
    items
}

/// A metric item as a JSON value (what the tests read).
#[cfg(test)]
pub fn metric_item(s: &MetricSample<'_>, value: f64, id: &Identity, unix_ms: u64) -> Value {
    let kinds = Kinds {
        dependencies: false,
        exceptions: false,
    };
    let line = Encoder::new(id, kinds, 100.0).metric_item(s, value, unix_ms);
    serde_json::from_slice(&line).expect("an item is JSON")
}

/// An item as one NDJSON line (without the newline); `None` when it is larger than the
/// endpoint accepts.
#[cfg(test)]
pub fn encode(item: &Value) -> Option<Vec<u8>> {
    let bytes = serde_json::to_vec(item).ok()?;
    (bytes.len() <= MAX_ITEM_BYTES).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::api::abi_stable::std_types::Tuple2;
    use std::time::{Duration, UNIX_EPOCH};

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

    /// `sampling_score` of the W3C trace context example's trace id, and of an empty id
    /// (worked out apart from the code, by the same steps in Python).
    const SCORE_OF_W3C_EXAMPLE: u64 = 12_061;
    const SCORE_OF_EMPTY: u64 = 97_458;

    #[test]
    fn sampling_is_decided_per_operation() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("{i:032x}")).collect();
        let kept = ids.iter().filter(|i| sampled_in(i, 25.0)).count();
        assert!((2_300..2_700).contains(&kept), "{kept}");
        // Random trace ids, as clients and the gateway make them, spread as evenly.
        let random: Vec<String> = (0..10_000).map(|_| random_hex(16)).collect();
        let kept = random.iter().filter(|i| sampled_in(i, 10.0)).count();
        assert!((800..1_200).contains(&kept), "{kept}");
        // Stable: gateways of this and later versions sharing a trace decide alike.
        assert_eq!(
            sampling_score("4bf92f3577b34da6a3ce929d0e0e4736"),
            SCORE_OF_W3C_EXAMPLE
        );
        assert_eq!(sampling_score(""), SCORE_OF_EMPTY);
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
    fn hex_is_checked_exactly() {
        assert!(is_hex("0123456789abcdefABCDEF0123456789", 32));
        assert!(!is_hex("0123456789abcdefABCDEF012345678", 32), "too short");
        for bad in [b'g', b'G', b'/', b':', b'@', b'`', b' ', 0xc3] {
            let mut s = b"00f067aa0ba902b7".to_vec();
            s[7] = bad;
            let s = String::from_utf8_lossy(&s).into_owned();
            assert!(!is_hex(&s, s.len()), "{s:?}");
        }
    }

    #[test]
    fn targets_drop_default_ports_only() {
        assert_eq!(target("https://h.example:443/x"), "h.example");
        assert_eq!(target("https://h.example:8443/x"), "h.example:8443");
        assert_eq!(target("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(target("http://u:p@h:80/"), "h");
        assert_eq!(target("nonsense"), "");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0..0x80u8).map(char::from).collect();
        all.push_str("é😀\u{2028}");
        for s in [all.as_str(), "plain", "", "\"", "a\\b\nc"] {
            let mut buf = Vec::new();
            push_str(&mut buf, s);
            assert_eq!(buf, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn times_are_written_as_humantime_writes_them() {
        let formatted = |ms: u64| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        };
        let leap_days = [951_782_400_000, 951_868_799_999, 4_107_456_000_000];
        let edges = [0, 1, 999, 86_399_999, 86_400_000, MAX_TIME_MS];
        let random = (0..100_000).map(|_| fastrand::u64(..=MAX_TIME_MS));
        for ms in leap_days.into_iter().chain(edges).chain(random) {
            assert_eq!(time(ms), formatted(ms), "{ms}");
        }
        assert_eq!(
            time(u64::MAX),
            "9999-12-31T23:59:59.999Z",
            "the last it can say"
        );
    }

    #[test]
    fn item_buffers_are_sized_to_fit() {
        let mut r = record();
        let encoder = Encoder::new(&identity(), ALL, 100.0);
        let ids = operation_ids(&r);
        let check = |t: Type, r: &RequestRecord<'_>, item: &[u8]| {
            let room = encoder.room(t, r);
            assert!(
                (item.len()..item.len() + item.len() / 5).contains(&room),
                "{t:?}: {room} bytes for {}",
                item.len()
            );
        };
        let mut items = Vec::new();
        let mut scratch = Scratch::default();
        encoder.request_items(&r, &ids, 100.0, &mut scratch, |i| items.push(i.to_vec()));
        check(Type::Request, &r, &items[0]);
        check(Type::Dependency, &r, &items[1]);
        r.status = 502;
        r.error_source = "backend".into();
        r.error_reason = "backend_unavailable".into();
        r.error_message = "connection refused".into();
        items.clear();
        encoder.request_items(&r, &ids, 100.0, &mut scratch, |i| items.push(i.to_vec()));
        check(Type::Exception, &r, &items[2]);
    }
}
