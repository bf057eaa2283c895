//! Application Insights connection strings: `key=value` pairs separated by `;`, keys
//! case-insensitive, and the legacy form that is an instrumentation key alone.
//!
//! Unlike the Microsoft SDKs this parser skips empty segments (a trailing `;`, as in the
//! documentation's own examples), splits each pair on its first `=`, trims both sides, and
//! uses `IngestionEndpoint` exactly as given: `http://` is kept, so a loopback receiver works.

/// The global ingestion endpoint, used when the string names neither an endpoint nor a suffix.
pub const DEFAULT_ENDPOINT: &str = "https://dc.services.visualstudio.com";

/// The longest connection string accepted (the documented limit).
pub const MAX_LEN: usize = 4096;

/// What the sink needs from a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The instrumentation key (a GUID), as written.
    pub instrumentation_key: String,
    /// Where to send telemetry: scheme and authority (and any base path), without a trailing
    /// `/`. The track path is appended to it.
    pub ingestion_endpoint: String,
}

impl ConnectionString {
    /// The key as it may appear in logs: its first eight characters only.
    pub fn redacted_key(&self) -> String {
        redact(&self.instrumentation_key)
    }
}

/// The first eight characters of a key, then `…`.
pub fn redact(key: &str) -> String {
    let head: String = key.chars().take(8).collect();
    format!("{head}…")
}

/// Whether `s` is a GUID: 8-4-4-4-12 hexadecimal digits (either case).
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses a connection string. The error says what is wrong without repeating the key.
pub fn parse(s: &str) -> Result<ConnectionString, String> {
    if s.len() > MAX_LEN {
        return Err(format!(
            "it is {} characters long; the limit is {MAX_LEN}",
            s.len()
        ));
    }
    let s = s.trim();
    if s.is_empty() {
        return Err("it is empty".into());
    }
    // The legacy form: the instrumentation key alone.
    if !s.contains('=') && !s.contains(';') {
        if is_guid(s) {
            return Ok(ConnectionString {
                instrumentation_key: s.to_owned(),
                ingestion_endpoint: DEFAULT_ENDPOINT.into(),
            });
        }
        return Err(
            "it is neither `key=value;...` pairs nor an instrumentation key (a GUID)".into(),
        );
    }

    let mut ikey = None;
    let mut ingestion = None;
    let mut suffix = None;
    let mut location = None;
    let mut seen: Vec<String> = Vec::new();
    for segment in s.split(';') {
        if segment.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = segment.split_once('=') else {
            return Err(format!(
                "segment '{}' is not key=value",
                clip(segment.trim())
            ));
        };
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if key.is_empty() {
            return Err("a segment has an empty key".into());
        }
        if seen.contains(&key) {
            return Err(format!("key '{key}' appears more than once"));
        }
        seen.push(key.clone());
        match key.as_str() {
            "instrumentationkey" => ikey = Some(value),
            "ingestionendpoint" => ingestion = Some(value),
            "endpointsuffix" => suffix = Some(value),
            "location" => location = Some(value),
            "authorization" if !value.eq_ignore_ascii_case("ikey") => {
                return Err(format!(
                    "Authorization '{}' is not supported (only ikey)",
                    clip(value)
                ));
            }
            // Known keys this sink has no use for, and keys from newer formats: ignored, as
            // every SDK does.
            _ => {}
        }
    }
    let ikey = match ikey {
        None => return Err("InstrumentationKey is missing".into()),
        Some("") => return Err("InstrumentationKey is empty".into()),
        Some(k) if !is_guid(k) => {
            return Err("InstrumentationKey is not a GUID (8-4-4-4-12 hex digits)".into())
        }
        Some(k) => k.to_owned(),
    };
    let endpoint = match (ingestion, suffix) {
        (Some(e), _) => endpoint(e)?,
        (None, Some(suffix)) => {
            let suffix = suffix.trim_matches(|c| c == '.' || c == '/');
            if suffix.is_empty() {
                return Err("EndpointSuffix is empty".into());
            }
            let prefix = location
                .filter(|l| !l.is_empty())
                .map(|l| format!("{l}."))
                .unwrap_or_default();
            endpoint(&format!("https://{prefix}dc.{suffix}"))?
        }
        (None, None) => DEFAULT_ENDPOINT.into(),
    };
    Ok(ConnectionString {
        instrumentation_key: ikey,
        ingestion_endpoint: endpoint,
    })
}

/// Checks an endpoint URL and strips trailing slashes (`…azure.com/` + `/v2.1/track` must not
/// become `//v2.1/track`).
fn endpoint(e: &str) -> Result<String, String> {
    let e = e.trim();
    let (scheme, rest) = match (e.strip_prefix("https://"), e.strip_prefix("http://")) {
        (Some(rest), _) => ("https://", rest),
        (None, Some(rest)) => ("http://", rest),
        (None, None) => {
            return Err(format!(
                "IngestionEndpoint '{}' must start with http:// or https://",
                clip(e)
            ))
        }
    };
    let rest = rest.trim_end_matches('/');
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(format!("IngestionEndpoint '{}' has no host", clip(e)));
    }
    if rest.contains(['?', '#']) {
        return Err(format!(
            "IngestionEndpoint '{}' must not have a query or fragment",
            clip(e)
        ));
    }
    let e = format!("{scheme}{rest}");
    if e.parse::<http::Uri>().is_err() {
        return Err(format!(
            "IngestionEndpoint '{}' is not a valid URL",
            clip(&e)
        ));
    }
    Ok(e)
}

/// A value quoted in an error message, cut to a readable length.
fn clip(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00000000-1111-2222-3333-444455556666";

    fn ok(s: &str) -> ConnectionString {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn every_form_resolves_its_endpoint() {
        // Explicit endpoint, used as given (http kept, trailing slash dropped).
        let c = ok(&format!(
            "InstrumentationKey={KEY};IngestionEndpoint=http://127.0.0.1:4318/"
        ));
        assert_eq!(c.instrumentation_key, KEY);
        assert_eq!(c.ingestion_endpoint, "http://127.0.0.1:4318");
        // A regional endpoint with the other keys a portal string carries.
        let c = ok(&format!(
            "InstrumentationKey={KEY};IngestionEndpoint=https://westus-0.in.applicationinsights.azure.com/;LiveEndpoint=https://westus.livediagnostics.monitor.azure.com/;ApplicationId=abc"
        ));
        assert_eq!(
            c.ingestion_endpoint,
            "https://westus-0.in.applicationinsights.azure.com"
        );
        // Suffix, with and without a location.
        let c = ok(&format!(
            "InstrumentationKey={KEY};EndpointSuffix=ai.contoso.com"
        ));
        assert_eq!(c.ingestion_endpoint, "https://dc.ai.contoso.com");
        let c = ok(&format!(
            "InstrumentationKey={KEY};EndpointSuffix=ai.contoso.com;Location=westus2"
        ));
        assert_eq!(c.ingestion_endpoint, "https://westus2.dc.ai.contoso.com");
        // The endpoint wins over the suffix.
        let c = ok(&format!(
            "EndpointSuffix=x.com;IngestionEndpoint=https://in.example;InstrumentationKey={KEY}"
        ));
        assert_eq!(c.ingestion_endpoint, "https://in.example");
        // Key only: the global endpoint.
        let c = ok(&format!("InstrumentationKey={KEY}"));
        assert_eq!(c.ingestion_endpoint, DEFAULT_ENDPOINT);
        // The legacy bare key.
        let c = ok(KEY);
        assert_eq!(c.instrumentation_key, KEY);
        assert_eq!(c.ingestion_endpoint, DEFAULT_ENDPOINT);
    }

    #[test]
    fn trailing_separators_case_and_spaces_are_tolerated() {
        let c = ok(&format!(
            " instrumentationkey = {KEY} ; INGESTIONENDPOINT=http://localhost:9/base/ ;; "
        ));
        assert_eq!(c.instrumentation_key, KEY);
        assert_eq!(c.ingestion_endpoint, "http://localhost:9/base");
        let c = ok(&format!("InstrumentationKey={KEY};"));
        assert_eq!(c.ingestion_endpoint, DEFAULT_ENDPOINT);
        // Upper-case hex and Authorization=ikey in any case.
        ok(&format!(
            "InstrumentationKey={};Authorization=IKEY",
            KEY.to_uppercase().replace('0', "A")
        ));
        // A value holding `=` is split on the first one only.
        let c = ok(&format!(
            "InstrumentationKey={KEY};IngestionEndpoint=http://h:1/p=q"
        ));
        assert_eq!(c.ingestion_endpoint, "http://h:1/p=q");
    }

    #[test]
    fn malformed_strings_say_why() {
        let cases = [
            ("", "is empty"),
            ("   ", "is empty"),
            ("not-a-guid", "neither"),
            (
                "IngestionEndpoint=http://h",
                "InstrumentationKey is missing",
            ),
            ("InstrumentationKey=", "InstrumentationKey is empty"),
            ("InstrumentationKey=abc", "not a GUID"),
            (
                "InstrumentationKey=00000000-1111-2222-3333-44445555666",
                "not a GUID",
            ),
            ("InstrumentationKey", "neither"),
            (
                &format!("InstrumentationKey={KEY};garbage"),
                "not key=value",
            ),
            (&format!("InstrumentationKey={KEY};=x"), "empty key"),
            (
                &format!("InstrumentationKey={KEY};instrumentationkey={KEY}"),
                "more than once",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=ftp://h"),
                "must start with http:// or https://",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=h.example"),
                "must start with",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=https://"),
                "has no host",
            ),
            (
                &format!("InstrumentationKey={KEY};IngestionEndpoint=http://h/?a=b"),
                "query",
            ),
            (
                &format!("InstrumentationKey={KEY};Authorization=aad"),
                "only ikey",
            ),
            (
                &format!("InstrumentationKey={KEY};EndpointSuffix=."),
                "EndpointSuffix is empty",
            ),
            (&"x".repeat(MAX_LEN + 1), "limit is 4096"),
        ];
        for (input, why) in cases {
            let err = parse(input).expect_err(input);
            assert!(err.contains(why), "{input}: {err}");
        }
    }

    #[test]
    fn errors_and_logs_never_carry_the_whole_key() {
        let err = parse(&format!("InstrumentationKey={KEY};Authorization=aad")).unwrap_err();
        assert!(!err.contains(KEY), "{err}");
        assert_eq!(ok(KEY).redacted_key(), "00000000…");
    }
}
