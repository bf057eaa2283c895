//! One ingestion request (`POST {endpoint}/v2.1/track`, gzip NDJSON) and what its answer means
//! for each item sent: accepted, to be resent, or dropped (and why).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json;

/// The path appended to the ingestion endpoint.
pub const TRACK_PATH: &str = "/v2.1/track";

/// The most response body read (answers are small JSON documents).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Per-item status codes worth sending again (timeout, throttling, server errors).
pub const RETRYABLE: [u16; 4] = [408, 429, 500, 503];

/// Whole-request status codes after which the whole batch is sent again.
const RETRY_ALL: [u16; 6] = [408, 429, 500, 502, 503, 504];

/// Why items were dropped (the `reason` label of `appinsights_items_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The endpoint refused them as invalid (400).
    Invalid,
    /// Quota or daily cap reached (402, 439).
    Quota,
    /// Any other refusal (401, 403, 404, …).
    Rejected,
    /// Deleted from a full spool to make room for newer batches (or not written to it).
    SpoolFull,
    /// In a spooled batch that could no longer be read.
    SpoolCorrupt,
    /// Pushed out of the full in-memory buffer.
    BufferFull,
    /// Left out by sampling.
    Sampling,
    /// Larger than the endpoint accepts.
    TooLarge,
    /// Still unsent when the gateway stopped, with no spool to keep them.
    Shutdown,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "invalid",
            Reason::Quota => "quota",
            Reason::Rejected => "rejected",
            Reason::SpoolFull => "spool_full",
            Reason::SpoolCorrupt => "spool_corrupt",
            Reason::BufferFull => "buffer_full",
            Reason::Sampling => "sampling",
            Reason::TooLarge => "too_large",
            Reason::Shutdown => "shutdown",
        }
    }

    fn of(status: u16) -> Reason {
        match status {
            400 => Reason::Invalid,
            402 | 439 => Reason::Quota,
            _ => Reason::Rejected,
        }
    }
}

/// The body the endpoint answers with (on 200, 206 and most errors).
#[derive(Debug, Deserialize, Default)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "camelCase")]
pub struct TrackResponse {
    /// Items the request carried.
    #[serde(default)]
    pub items_received: usize,
    /// Items kept.
    #[serde(default)]
    pub items_accepted: usize,
    /// The items not kept.
    #[serde(default)]
    pub errors: Vec<ItemError>,
}

/// One refused item.
#[derive(Debug, Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "camelCase")]
pub struct ItemError {
    /// Position in the request, from 0.
    pub index: usize,
    /// Its status.
    pub status_code: u16,
    /// Why.
    #[serde(default)]
    pub message: String,
}

/// How an exchange ended.
#[derive(Debug)]
pub enum Answer {
    /// The endpoint answered.
    Status {
        /// Status code.
        status: u16,
        /// `Retry-After`, as a delay from now.
        retry_after: Option<Duration>,
        /// `Location` (redirects).
        location: Option<String>,
        /// Body.
        body: Bytes,
    },
    /// No answer: connection refused or broken, or the deadline passed.
    Failed(String),
}

/// What to do with each item of a batch after an answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Items the endpoint kept.
    pub accepted: usize,
    /// Positions of the items to send again, in order.
    pub resend: Vec<usize>,
    /// Items dropped, by reason.
    pub dropped: Vec<(Reason, usize)>,
    /// A delay the endpoint asked for.
    pub retry_after: Option<Duration>,
    /// Where the endpoint redirected to (`scheme://authority`).
    pub redirect: Option<String>,
    /// A short description of the answer for logs.
    pub summary: String,
}

fn add(dropped: &mut Vec<(Reason, usize)>, reason: Reason, n: usize) {
    if n == 0 {
        return;
    }
    match dropped.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, c)) => *c += n,
        None => dropped.push((reason, n)),
    }
}

/// Decides per item after a per-item answer: those not listed were accepted, listed ones
/// with a retryable status are resent, the rest dropped by their status.
fn per_item(n: usize, errors: &[ItemError], verdict: &mut Verdict) {
    let mut failed = vec![None; n];
    for e in errors {
        if e.index < n {
            failed[e.index] = Some(e.status_code);
        }
    }
    for (i, f) in failed.iter().enumerate() {
        match f {
            None => verdict.accepted += 1,
            Some(code) if RETRYABLE.contains(code) => verdict.resend.push(i),
            Some(code) => add(&mut verdict.dropped, Reason::of(*code), 1),
        }
    }
}

/// What an answer means for a batch of `n` items.
pub fn judge(answer: &Answer, n: usize) -> Verdict {
    let mut v = Verdict::default();
    let (status, retry_after, location, body) = match answer {
        Answer::Failed(why) => {
            v.resend = (0..n).collect();
            v.summary = why.clone();
            return v;
        }
        Answer::Status {
            status,
            retry_after,
            location,
            body,
        } => (*status, *retry_after, location, body),
    };
    v.retry_after = retry_after;
    let parsed: Option<TrackResponse> = serde_json::from_slice(body).ok();
    v.summary = format!("HTTP {status}");
    if let Some(p) = &parsed {
        if let Some(first) = p.errors.first() {
            v.summary = format!(
                "HTTP {status} ({} of {} accepted; first error: item {} {} {})",
                p.items_accepted, p.items_received, first.index, first.status_code, first.message
            );
        }
    }
    match status {
        200..=299 => match parsed {
            // 206 (or a 200 listing errors): only the failed items matter.
            Some(p) if !p.errors.is_empty() => per_item(n, &p.errors, &mut v),
            Some(p) if status == 206 && p.items_accepted < p.items_received => {
                // Partial without a list of which: resend everything rather than lose items.
                v.resend = (0..n).collect();
            }
            _ => v.accepted = n,
        },
        307 | 308 => match location.as_deref().and_then(origin) {
            Some(o) => {
                v.redirect = Some(o);
                v.resend = (0..n).collect();
            }
            None => add(&mut v.dropped, Reason::Rejected, n),
        },
        s if RETRY_ALL.contains(&s) => v.resend = (0..n).collect(),
        // No item accepted: the status is the first item's, and the body says per item.
        _ => match parsed {
            Some(p) if !p.errors.is_empty() => per_item(n, &p.errors, &mut v),
            _ => add(&mut v.dropped, Reason::of(status), n),
        },
    }
    v
}

/// `scheme://authority` of an absolute URL.
fn origin(location: &str) -> Option<String> {
    let uri: http::Uri = location.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    Some(format!("{scheme}://{}", uri.authority()?))
}

/// Parses `Retry-After`: a number of seconds or an HTTP date (a date in the past is no delay).
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Gzip of the items as NDJSON.
pub fn body(items: &[Vec<u8>]) -> Vec<u8> {
    Gzip::new().body(items)
}

/// The gzip header flate2 writes at the fast level: no name or time, "fastest" flag, OS
/// unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

/// Gzip NDJSON bodies, built an item at a time (so that an item is compressed while it is
/// still in the cache of the thread that wrote it), keeping the deflate state (its window and
/// tables: hundreds of KB) and the output buffer from one body to the next.
pub struct Gzip {
    deflate: Compress,
    /// Where the body is deflated; all of it initialised (its length is its capacity), so that
    /// no backend zeroes it again.
    out: Vec<u8>,
    /// How much of `out` the body has used.
    written: usize,
    /// Items gathered for the next call into the compressor.
    staged: Vec<u8>,
    /// Checksum of what has been deflated.
    crc: Crc,
    /// Items in the body.
    items: usize,
    /// Deflating failed (it does not, in memory); the body comes out empty.
    failed: bool,
}

/// How many bytes of items are gathered before they are checksummed and deflated: each call
/// into the checksum and the compressor has a cost of its own, which per item (and again per
/// newline) came to more than copying the item (about 110 ns per request of 2.2 KB).
const STAGE: usize = 32 * 1024;

impl Default for Gzip {
    fn default() -> Self {
        Self::new()
    }
}

impl Gzip {
    /// A compressor at the fast level, with no body begun.
    pub fn new() -> Gzip {
        Gzip {
            deflate: Compress::new(Compression::fast(), false),
            out: Vec::new(),
            written: 0,
            staged: Vec::with_capacity(STAGE),
            crc: Crc::new(),
            items: 0,
            failed: false,
        }
    }

    /// Items in the body being built.
    pub fn items(&self) -> usize {
        self.items
    }

    /// Adds an item (one NDJSON line, without its newline) to the body being built.
    pub fn push(&mut self, item: &[u8]) {
        if self.staged.len() + item.len() + 1 > STAGE && !self.staged.is_empty() {
            self.deflate_staged(FlushCompress::None);
        }
        self.staged.extend_from_slice(item);
        self.staged.push(b'\n');
        self.items += 1;
    }

    /// The body built so far as gzip bytes (empty if deflating failed, which it does not in
    /// memory); the next item begins a new body.
    pub fn finish(&mut self) -> Vec<u8> {
        self.deflate_staged(FlushCompress::Finish);
        let body = if self.failed {
            Vec::new()
        } else {
            let mut body = Vec::with_capacity(GZIP_HEADER.len() + self.written + 8);
            body.extend_from_slice(&GZIP_HEADER);
            body.extend_from_slice(&self.out[..self.written]);
            body.extend_from_slice(&self.crc.sum().to_le_bytes());
            body.extend_from_slice(&self.crc.amount().to_le_bytes());
            body
        };
        self.deflate.reset();
        self.crc = Crc::new();
        self.written = 0;
        self.items = 0;
        self.failed = false;
        body
    }

    /// Gzip of the items as NDJSON (a body of its own: none may be in progress).
    pub fn body(&mut self, items: &[Vec<u8>]) -> Vec<u8> {
        for item in items {
            self.push(item);
        }
        self.finish()
    }

    /// Checksums and deflates what is staged (with `Finish`, to the end of the stream).
    fn deflate_staged(&mut self, flush: FlushCompress) {
        let staged = std::mem::take(&mut self.staged);
        self.crc.update(&staged);
        let mut written = self.written;
        if !self.failed && self.deflate_all(&staged, &mut written, flush).is_err() {
            self.failed = true;
        }
        self.written = written;
        self.staged = staged;
        self.staged.clear();
    }

    /// Deflates all of `input` into `out` from `written` on, growing `out` as needed; with
    /// `Finish`, until the stream's end.
    fn deflate_all(
        &mut self,
        mut input: &[u8],
        written: &mut usize,
        flush: FlushCompress,
    ) -> Result<(), flate2::CompressError> {
        let finish = flush == FlushCompress::Finish;
        loop {
            if self.out.len() - *written < 64 {
                let size = (self.out.len() * 2).max(64 * 1024);
                self.out.resize(size, 0);
            }
            let (was_in, was_out) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self
                .deflate
                .compress(input, &mut self.out[*written..], flush)?;
            let consumed = (self.deflate.total_in() - was_in) as usize;
            let produced = (self.deflate.total_out() - was_out) as usize;
            input = &input[consumed..];
            *written += produced;
            if finish && status == Status::StreamEnd || !finish && input.is_empty() {
                return Ok(());
            }
            if consumed == 0 && produced == 0 {
                // No room to go on: make some.
                let size = self.out.len() * 2;
                self.out.resize(size, 0);
            }
        }
    }
}

/// The items of a gzip NDJSON body.
pub fn items(gz: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    use std::io::Read as _;
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(gz).read_to_end(&mut text)?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// An HTTP client for the ingestion endpoint, on a runtime of its own (the sink's sending
/// thread blocks on it).
pub struct Transport {
    runtime: tokio::runtime::Runtime,
    client: Client<Https, Full<Bytes>>,
}

impl Transport {
    /// A client trusting the system's roots (plain `http://` needs none).
    pub fn new() -> std::io::Result<Transport> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Transport { runtime, client })
    }

    /// Sends gzip bodies to `{endpoint}/v2.1/track` at once, each in its own request (on its
    /// own connection while the others are in flight), and returns their answers in the same
    /// order. Each has `timeout`; `hurry` (checked every 25 ms) gives up on those still
    /// waiting.
    pub fn send_all(
        &self,
        endpoint: &str,
        bodies: Vec<Bytes>,
        timeout: Duration,
        hurry: &dyn Fn() -> bool,
    ) -> Vec<Answer> {
        let url = format!("{endpoint}{TRACK_PATH}");
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(bodies.len());
        let mut tasks = Vec::with_capacity(bodies.len());
        for gz in bodies {
            match http::Request::post(&url)
                .header(http::header::CONTENT_TYPE, "application/x-json-stream")
                .header(http::header::CONTENT_ENCODING, "gzip")
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::USER_AGENT, crate::envelope::SDK_VERSION)
                .body(Full::new(gz))
            {
                Ok(request) => {
                    let client = self.client.clone();
                    tasks.push((
                        answers.len(),
                        self.runtime.spawn(exchange(client, request, timeout)),
                    ));
                    answers.push(None);
                }
                Err(e) => answers.push(Some(Answer::Failed(format!(
                    "cannot build a request to {url}: {e}"
                )))),
            }
        }
        self.runtime.block_on(async {
            for (i, task) in &mut tasks {
                loop {
                    tokio::select! {
                        done = &mut *task => {
                            answers[*i] = Some(done.unwrap_or_else(|e| Answer::Failed(format!("the request failed: {e}"))));
                            break;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(25)) => {
                            if hurry() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        for (_, task) in &tasks {
            task.abort();
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Answer::Failed("given up: the sink is stopping".into())))
            .collect()
    }
}

/// One exchange: the request, then the answer's status, `Retry-After`, `Location` and body,
/// within `timeout`.
async fn exchange(
    client: Client<Https, Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
    timeout: Duration,
) -> Answer {
    let exchange = async {
        let resp = client.request(request).await.map_err(|e| error_chain(&e))?;
        let status = resp.status().as_u16();
        let header = |name: http::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after =
            header(http::header::RETRY_AFTER).and_then(|v| retry_after(&v, SystemTime::now()));
        let location = header(http::header::LOCATION);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>(Answer::Status {
            status,
            retry_after,
            location,
            body,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Answer::Failed(e),
        Err(_) => Answer::Failed(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// An error and its causes, for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer::Status {
            status,
            retry_after: None,
            location: None,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn partial_success_resends_only_retryable_items() {
        // The RustAI `retry_partial_content` sequence: 10 items, then the 3 resent, then 1.
        let a = answer(
            206,
            r#"{"itemsReceived":10,"itemsAccepted":6,"errors":[
                {"index":1,"statusCode":400,"message":"bad"},
                {"index":7,"statusCode":408,"message":"t"},
                {"index":8,"statusCode":408,"message":"t"},
                {"index":9,"statusCode":408,"message":"t"}]}"#,
        );
        let v = judge(&a, 10);
        assert_eq!(v.accepted, 6);
        assert_eq!(v.resend, [7, 8, 9]);
        assert_eq!(v.dropped, [(Reason::Invalid, 1)]);
        let v = judge(
            &answer(
                206,
                r#"{"itemsReceived":3,"itemsAccepted":2,"errors":[{"index":2,"statusCode":429,"message":"slow down"}]}"#,
            ),
            3,
        );
        assert_eq!((v.accepted, v.resend.as_slice()), (2, [2].as_slice()));
        // Every retryable code, and quota codes dropped.
        let v = judge(
            &answer(
                206,
                r#"{"itemsReceived":7,"itemsAccepted":1,"errors":[
                    {"index":0,"statusCode":500},{"index":1,"statusCode":503},
                    {"index":2,"statusCode":439},{"index":3,"statusCode":402},
                    {"index":4,"statusCode":404},{"index":6,"statusCode":408}]}"#,
            ),
            7,
        );
        assert_eq!(v.accepted, 1);
        assert_eq!(v.resend, [0, 1, 6]);
        assert_eq!(v.dropped, [(Reason::Quota, 2), (Reason::Rejected, 1)]);
        // Indexes outside the batch are ignored.
        let v = judge(
            &answer(
                206,
                r#"{"itemsReceived":1,"itemsAccepted":0,"errors":[{"index":5,"statusCode":500}]}"#,
            ),
            1,
        );
        assert_eq!(v.accepted, 1);
        // A 206 that does not say which failed: everything again.
        assert_eq!(judge(&answer(206, "garbage"), 2).accepted, 2);
        assert_eq!(
            judge(
                &answer(206, r#"{"itemsReceived":2,"itemsAccepted":1,"errors":[]}"#),
                2
            )
            .resend,
            [0, 1]
        );
    }

    #[test]
    fn whole_batch_answers() {
        let ok = judge(
            &answer(200, r#"{"itemsReceived":4,"itemsAccepted":4,"errors":[]}"#),
            4,
        );
        assert_eq!((ok.accepted, ok.resend.len(), ok.dropped.len()), (4, 0, 0));
        assert_eq!(judge(&answer(200, ""), 4).accepted, 4);
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(judge(&answer(s, ""), 3).resend, [0, 1, 2], "{s}");
        }
        assert_eq!(judge(&answer(400, ""), 3).dropped, [(Reason::Invalid, 3)]);
        assert_eq!(judge(&answer(402, ""), 3).dropped, [(Reason::Quota, 3)]);
        assert_eq!(judge(&answer(439, ""), 3).dropped, [(Reason::Quota, 3)]);
        assert_eq!(judge(&answer(403, ""), 3).dropped, [(Reason::Rejected, 3)]);
        // "No item accepted": the first item's status, the body per item.
        let v = judge(
            &answer(
                400,
                r#"{"itemsReceived":2,"itemsAccepted":0,"errors":[{"index":0,"statusCode":400},{"index":1,"statusCode":503}]}"#,
            ),
            2,
        );
        assert_eq!(
            (v.resend.as_slice(), v.dropped.as_slice()),
            ([1].as_slice(), [(Reason::Invalid, 1)].as_slice())
        );
        assert_eq!(
            judge(&Answer::Failed("connection refused".into()), 2).resend,
            [0, 1]
        );
        let v = judge(
            &Answer::Status {
                status: 307,
                retry_after: None,
                location: Some("http://127.0.0.1:9/elsewhere".into()),
                body: Bytes::new(),
            },
            1,
        );
        assert_eq!(v.redirect.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(v.resend, [0]);
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_461_369_599 - 30);
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        // The protocol document's own example: 30 s after `now`.
        assert_eq!(
            retry_after("Fri, 22 Apr 2016 23:59:59 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(
                "Fri, 22 Apr 2016 23:59:59 GMT",
                now + Duration::from_secs(60)
            ),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-1", now), None);
    }

    #[test]
    fn bodies_are_gzip_ndjson() {
        let gz = body(&[b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert_eq!(
            items(&gz).unwrap(),
            [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert!(items(b"not gzip").is_err());
    }

    #[test]
    fn one_gzip_makes_body_after_body() {
        let mut gzip = Gzip::new();
        // Text that compresses, then noise larger than the output buffer starts at.
        let text: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("{{\"item\":{i},\"name\":\"GET /orders\"}}").into_bytes())
            .collect();
        let noise: Vec<Vec<u8>> = (0..40)
            .map(|_| (0..4096).map(|_| fastrand::u8(b'!'..=b'~')).collect())
            .collect();
        for batch in [&text, &noise, &text[..1].to_vec(), &Vec::new(), &text] {
            let gz = gzip.body(batch);
            assert_eq!(&items(&gz).unwrap(), batch);
            assert_eq!(gz, body(batch), "the same bytes as a new compressor's");
        }
    }
}
