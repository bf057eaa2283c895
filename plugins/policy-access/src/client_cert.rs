//! `validate-client-certificate`: checks the certificate the client presented on a TLS
//! listener with client authentication.
//!
//! The certificate comes from the `outpost.client-cert` host property (the leaf, DER, base64).
//! The listener has already verified its chain against the listener's `client_ca` (that is
//! APIM's `validate-trust`); this policy checks validity dates and identities.

use base64::Engine as _;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{host, Context, Flow, Head, Policy};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

use crate::{check_status, refuse};

/// The host property holding the client's certificate.
const CLIENT_CERT: &str = "outpost.client-cert";

/// Set (to the failure reason) when `ignore_error` lets a failing request through.
const ERROR_VARIABLE: &str = "client_certificate.error";

/// One identity: every field given must match; absent fields are not checked.
#[derive(Deserialize, Default)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct IdentityConfig {
    thumbprint: Option<String>,
    serial_number: Option<String>,
    common_name: Option<String>,
    subject: Option<String>,
    dns_name: Option<String>,
    issuer_subject: Option<String>,
    issuer_thumbprint: Option<String>,
    issuer_certificate_id: Option<String>,
}

/// `validate-client-certificate` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct ValidateClientCertificateConfig {
    #[serde(default)]
    validate_revocation: bool,
    #[serde(default = "yes")]
    validate_trust: bool,
    #[serde(default = "yes")]
    validate_not_before: bool,
    #[serde(default = "yes")]
    validate_not_after: bool,
    #[serde(default)]
    ignore_error: bool,
    #[serde(default)]
    identities: Vec<IdentityConfig>,
    #[serde(default = "default_code")]
    failed_validation_httpcode: u16,
    #[serde(default)]
    failed_validation_error_message: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_code() -> u16 {
    403
}

/// A thumbprint to compare, by digest.
#[derive(Debug, PartialEq, Eq)]
enum Thumbprint {
    Sha1(Vec<u8>),
    Sha256(Vec<u8>),
}

/// A distinguished name as sorted (upper-case type, lower-case value) pairs: order and case
/// do not matter (`CN=a, O=b` matches `o=B,cn=A`).
type Dn = Vec<(String, String)>;

struct Identity {
    thumbprint: Option<Thumbprint>,
    serial_number: Option<Vec<u8>>,
    common_name: Option<String>,
    subject: Option<Dn>,
    dns_name: Option<String>,
    issuer_subject: Option<Dn>,
}

/// Checks the client's certificate.
pub struct ValidateClientCertificate {
    not_before: bool,
    not_after: bool,
    ignore_error: bool,
    identities: Vec<Identity>,
    status: u16,
    message: Option<String>,
    sha1: bool,
    sha256: bool,
}

fn hex_bytes(field: &str, s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !matches!(b, b':' | b' ' | b'-'))
        .collect();
    if digits.is_empty() || digits.len() % 2 != 0 {
        return Err(format!("{field}: '{s}' is not hexadecimal bytes"));
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{field}: '{s}' is not hexadecimal"))
        })
        .collect()
}

/// Serial numbers compare without leading zero bytes (DER adds one to keep them positive).
fn trim_serial(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

fn attribute_type(t: &str) -> String {
    match t.trim().to_ascii_uppercase().as_str() {
        "E" | "EMAIL" | "EMAILADDRESS" => "E".into(),
        "S" | "ST" | "STATEORPROVINCENAME" => "ST".into(),
        "COMMONNAME" => "CN".into(),
        other => other.into(),
    }
}

/// Parses `CN=client, O=Acme` (commas inside values escaped as `\,`).
fn parse_dn(field: &str, s: &str) -> Result<Dn, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ',' | ';' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let mut dn = Vec::new();
    for p in parts.iter().filter(|p| !p.trim().is_empty()) {
        let (t, v) = p
            .split_once('=')
            .ok_or_else(|| format!("{field}: '{p}' in '{s}' is not TYPE=value"))?;
        dn.push((attribute_type(t), v.trim().to_lowercase()));
    }
    if dn.is_empty() {
        return Err(format!("{field}: '{s}' is not a distinguished name"));
    }
    dn.sort();
    Ok(dn)
}

fn cert_dn(name: &X509Name<'_>) -> Dn {
    let registry = x509_parser::objects::oid_registry();
    let mut dn: Dn = name
        .iter_attributes()
        .map(|a| {
            let t = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                .map_or_else(|_| a.attr_type().to_id_string(), str::to_owned);
            let v = a.as_str().map_or_else(
                |_| String::from_utf8_lossy(a.as_slice()).into_owned(),
                str::to_owned,
            );
            (attribute_type(&t), v.trim().to_lowercase())
        })
        .collect();
    dn.sort();
    dn
}

impl Identity {
    fn new(i: usize, c: IdentityConfig) -> Result<Identity, String> {
        let at = |f: &str| format!("identities[{i}].{f}");
        if c.issuer_thumbprint.is_some() || c.issuer_certificate_id.is_some() {
            return Err(format!(
                "{}: not supported: the gateway sees only the client's leaf certificate, not its \
                 issuer's; match the issuer with issuer_subject (the listener's client_ca decides \
                 which issuers are trusted)",
                at(if c.issuer_thumbprint.is_some() {
                    "issuer_thumbprint"
                } else {
                    "issuer_certificate_id"
                })
            ));
        }
        let thumbprint = match &c.thumbprint {
            None => None,
            Some(t) => {
                let b = hex_bytes(&at("thumbprint"), t)?;
                Some(match b.len() {
                    20 => Thumbprint::Sha1(b),
                    32 => Thumbprint::Sha256(b),
                    n => {
                        return Err(format!(
                            "{}: {n} bytes; expected a SHA-1 (40 hex digits) or SHA-256 (64 hex \
                             digits) thumbprint",
                            at("thumbprint")
                        ))
                    }
                })
            }
        };
        let serial_number = match &c.serial_number {
            None => None,
            Some(s) => Some(trim_serial(&hex_bytes(&at("serial_number"), s)?)),
        };
        let subject = match &c.subject {
            None => None,
            Some(s) => Some(parse_dn(&at("subject"), s)?),
        };
        let issuer_subject = match &c.issuer_subject {
            None => None,
            Some(s) => Some(parse_dn(&at("issuer_subject"), s)?),
        };
        let id = Identity {
            thumbprint,
            serial_number,
            common_name: c.common_name.map(|s| s.trim().to_lowercase()),
            subject,
            dns_name: c.dns_name.map(|s| s.trim().to_ascii_lowercase()),
            issuer_subject,
        };
        if id.thumbprint.is_none()
            && id.serial_number.is_none()
            && id.common_name.is_none()
            && id.subject.is_none()
            && id.dns_name.is_none()
            && id.issuer_subject.is_none()
        {
            return Err(format!("identities[{i}] has no field to match"));
        }
        Ok(id)
    }
}

/// What is known about the presented certificate, computed once per request.
struct Presented<'c> {
    cert: &'c X509Certificate<'c>,
    sha1: Option<ring::digest::Digest>,
    sha256: Option<ring::digest::Digest>,
}

impl Identity {
    fn matches(&self, p: &Presented<'_>) -> bool {
        if let Some(t) = &self.thumbprint {
            let ok = match t {
                Thumbprint::Sha1(b) => p.sha1.as_ref().is_some_and(|d| d.as_ref() == b),
                Thumbprint::Sha256(b) => p.sha256.as_ref().is_some_and(|d| d.as_ref() == b),
            };
            if !ok {
                return false;
            }
        }
        if let Some(s) = &self.serial_number {
            if trim_serial(p.cert.raw_serial()) != *s {
                return false;
            }
        }
        if let Some(cn) = &self.common_name {
            let found = p
                .cert
                .subject()
                .iter_common_name()
                .any(|a| a.as_str().is_ok_and(|v| v.trim().to_lowercase() == *cn));
            if !found {
                return false;
            }
        }
        if let Some(dn) = &self.subject {
            if cert_dn(p.cert.subject()) != *dn {
                return false;
            }
        }
        if let Some(dn) = &self.issuer_subject {
            if cert_dn(p.cert.issuer()) != *dn {
                return false;
            }
        }
        if let Some(name) = &self.dns_name {
            let found = p
                .cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .is_some_and(|san| {
                    san.value.general_names.iter().any(|g| match g {
                        GeneralName::DNSName(d) => d.eq_ignore_ascii_case(name),
                        _ => false,
                    })
                });
            if !found {
                return false;
            }
        }
        true
    }
}

/// Why a certificate was refused: a reason code and a message.
struct Failure(&'static str, String);

impl ValidateClientCertificate {
    fn check(&self, b64: Option<&str>) -> Result<(), Failure> {
        let Some(b64) = b64 else {
            return Err(Failure(
                "missing",
                "The client presented no certificate.".into(),
            ));
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| {
                Failure(
                    "malformed",
                    "The client certificate could not be read.".into(),
                )
            })?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| {
            Failure(
                "malformed",
                format!("The client certificate could not be parsed: {e}."),
            )
        })?;
        let now = i64::try_from(host::now_unix_ms() / 1000).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if self.not_before && now < validity.not_before.timestamp() {
            return Err(Failure(
                "not_yet_valid",
                format!(
                    "The client certificate is not valid before {}.",
                    validity.not_before
                ),
            ));
        }
        if self.not_after && now > validity.not_after.timestamp() {
            return Err(Failure(
                "expired",
                format!("The client certificate expired on {}.", validity.not_after),
            ));
        }
        if self.identities.is_empty() {
            return Ok(());
        }
        let presented = Presented {
            cert: &cert,
            sha1: self
                .sha1
                .then(|| ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der)),
            sha256: self
                .sha256
                .then(|| ring::digest::digest(&ring::digest::SHA256, &der)),
        };
        if self.identities.iter().any(|i| i.matches(&presented)) {
            Ok(())
        } else {
            Err(Failure(
                "identity_mismatch",
                "The client certificate matches none of the allowed identities.".into(),
            ))
        }
    }
}

impl Policy for ValidateClientCertificate {
    type Config = ValidateClientCertificateConfig;

    fn new(c: ValidateClientCertificateConfig) -> Result<Self, String> {
        check_status("failed_validation_httpcode", c.failed_validation_httpcode)?;
        if c.validate_revocation {
            return Err(
                "validate_revocation: revocation checking (CRL/OCSP) is not supported; set it to \
                 false (the default)"
                    .into(),
            );
        }
        // validate_trust: the listener verified the chain before the request existed; there
        // is nothing more to do here whichever value it has.
        let _ = c.validate_trust;
        let identities = c
            .identities
            .into_iter()
            .enumerate()
            .map(|(i, id)| Identity::new(i, id))
            .collect::<Result<Vec<_>, _>>()?;
        let sha1 = identities
            .iter()
            .any(|i| matches!(i.thumbprint, Some(Thumbprint::Sha1(_))));
        let sha256 = identities
            .iter()
            .any(|i| matches!(i.thumbprint, Some(Thumbprint::Sha256(_))));
        Ok(ValidateClientCertificate {
            not_before: c.validate_not_before,
            not_after: c.validate_not_after,
            ignore_error: c.ignore_error,
            identities,
            status: c.failed_validation_httpcode,
            message: c.failed_validation_error_message,
            sha1,
            sha256,
        })
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let Err(Failure(reason, message)) = self.check(ctx.variable(CLIENT_CERT)) else {
            return Flow::CONTINUE;
        };
        if self.ignore_error {
            ctx.set_variable(ERROR_VARIABLE, reason);
            return Flow::CONTINUE;
        }
        let message = self.message.as_deref().unwrap_or(&message);
        refuse(
            ctx,
            self.status,
            "client_certificate_invalid",
            message,
            &[("reason", reason)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::serde_json::{self, Value};
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    struct Made {
        der: Vec<u8>,
        issuer_der: Vec<u8>,
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02X}")).collect()
    }

    /// A CA-signed client certificate with the given validity (Unix seconds).
    fn make(cn: &str, not_before: i64, not_after: i64) -> Made {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "Test CA");
        ca.distinguished_name
            .push(DnType::OrganizationName, "Acme, Inc");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["client.example".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::DnsName("Alt.Example".try_into().unwrap()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name.push(DnType::OrganizationName, "Acme");
        p.distinguished_name.push(DnType::CountryName, "NL");
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x8f, 0x01, 0x02]));
        p.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(not_before);
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(not_after);
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        Made {
            der: cert.der().to_vec(),
            issuer_der: ca_cert.der().to_vec(),
        }
    }

    fn time_secs(s: i64) -> std::time::Duration {
        std::time::Duration::from_secs(u64::try_from(s).unwrap())
    }

    fn now() -> i64 {
        (host::now_unix_ms() / 1000) as i64
    }

    fn valid(cn: &str) -> Made {
        make(cn, now() - 3600, now() + 3600)
    }

    fn run(config: &str, der: Option<&[u8]>) -> (Flow, TestContext) {
        let p = policy::<ValidateClientCertificate>(config)
            .unwrap_or_else(|e| panic!("{config}: {}", e.message));
        let mut ctx = TestContext::default();
        if let Some(der) = der {
            ctx.variables.insert(
                CLIENT_CERT.into(),
                base64::engine::general_purpose::STANDARD.encode(der),
            );
        }
        let flow = on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx);
        (flow, ctx)
    }

    fn refused(config: &str, der: Option<&[u8]>) -> (u16, Value) {
        let (flow, ctx) = run(config, der);
        assert_eq!(flow, Flow::RESPOND, "{config}");
        let (status, headers, body) = ctx.response.unwrap();
        assert_eq!(headers[0].1, b"application/json");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "client_certificate_invalid");
        assert_eq!(body["statusCode"], status);
        (status, body)
    }

    #[test]
    fn identities_match_by_every_field() {
        let c = valid("client-1");
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &c.der).as_ref());
        let sha1 =
            hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &c.der).as_ref());
        let colons: Vec<String> = sha256
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8(p.to_vec()).unwrap().to_lowercase())
            .collect();
        for identity in [
            format!(r#"{{"thumbprint":"{sha256}"}}"#),
            format!(r#"{{"thumbprint":"{}"}}"#, sha256.to_lowercase()),
            format!(r#"{{"thumbprint":"{}"}}"#, colons.join(":")),
            format!(r#"{{"thumbprint":"{sha1}"}}"#),
            r#"{"serial_number":"8F0102"}"#.into(),
            r#"{"serial_number":"00:8f:01:02"}"#.into(),
            r#"{"common_name":"CLIENT-1"}"#.into(),
            r#"{"subject":"C=NL, O=Acme, CN=client-1"}"#.into(),
            r#"{"subject":"cn=client-1,o=acme,c=nl"}"#.into(),
            r#"{"dns_name":"alt.example"}"#.into(),
            r#"{"issuer_subject":"CN=Test CA, O=Acme\\, Inc"}"#.into(),
            format!(
                r#"{{"thumbprint":"{sha256}","common_name":"client-1","dns_name":"client.example"}}"#
            ),
        ] {
            let cfg = format!(r#"{{"identities":[{identity}]}}"#);
            assert_eq!(run(&cfg, Some(&c.der)).0, Flow::CONTINUE, "{cfg}");
        }
        for identity in [
            format!(r#"{{"thumbprint":"{}"}}"#, "00".repeat(32)),
            format!(r#"{{"thumbprint":"{}"}}"#, "00".repeat(20)),
            r#"{"serial_number":"8F0103"}"#.into(),
            r#"{"common_name":"client-2"}"#.into(),
            r#"{"subject":"CN=client-1, O=Acme"}"#.into(),
            r#"{"dns_name":"other.example"}"#.into(),
            r#"{"issuer_subject":"CN=Other CA"}"#.into(),
            // Every field of one identity must match.
            format!(r#"{{"thumbprint":"{sha256}","common_name":"client-2"}}"#),
        ] {
            let cfg = format!(r#"{{"identities":[{identity}]}}"#);
            let (status, body) = refused(&cfg, Some(&c.der));
            assert_eq!(status, 403);
            assert_eq!(body["reason"], "identity_mismatch", "{cfg}");
        }
        // Any one identity is enough.
        let cfg = format!(
            r#"{{"identities":[{{"common_name":"someone"}},{{"thumbprint":"{sha256}"}}]}}"#
        );
        assert_eq!(run(&cfg, Some(&c.der)).0, Flow::CONTINUE);
        // Without identities any (chain-verified) certificate passes.
        assert_eq!(run("{}", Some(&c.issuer_der)).0, Flow::CONTINUE);
    }

    #[test]
    fn missing_malformed_and_out_of_date_certificates_are_refused() {
        let (status, body) = refused("{}", None);
        assert_eq!((status, body["reason"].as_str()), (403, Some("missing")));

        let (_, body) = refused("{}", Some(b"not a certificate"));
        assert_eq!(body["reason"], "malformed");
        let mut ctx = TestContext::default();
        ctx.variables.insert(CLIENT_CERT.into(), "%%%".into());
        let p = policy::<ValidateClientCertificate>("{}").unwrap();
        assert_eq!(
            on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx),
            Flow::RESPOND
        );

        let expired = make("old", now() - 7200, now() - 3600);
        let (_, body) = refused("{}", Some(&expired.der));
        assert_eq!(body["reason"], "expired");
        assert_eq!(
            run(r#"{"validate_not_after":false}"#, Some(&expired.der)).0,
            Flow::CONTINUE
        );
        let early = make("new", now() + 3600, now() + 7200);
        let (_, body) = refused("{}", Some(&early.der));
        assert_eq!(body["reason"], "not_yet_valid");
        assert_eq!(
            run(r#"{"validate_not_before":false}"#, Some(&early.der)).0,
            Flow::CONTINUE
        );

        // Custom status and message.
        let (status, body) = refused(
            r#"{"failed_validation_httpcode":401,"failed_validation_error_message":"Nope."}"#,
            None,
        );
        assert_eq!(status, 401);
        assert_eq!(body["message"], "Nope.");
        assert_eq!(body["reason"], "missing");
    }

    #[test]
    fn ignore_error_continues_and_records_the_reason() {
        let (flow, ctx) = run(
            r#"{"ignore_error":true,"identities":[{"common_name":"x"}]}"#,
            None,
        );
        assert_eq!(flow, Flow::CONTINUE);
        assert!(ctx.response.is_none());
        assert_eq!(ctx.variables[ERROR_VARIABLE], "missing");
        let c = valid("y");
        let (flow, ctx) = run(
            r#"{"ignore_error":true,"identities":[{"common_name":"x"}]}"#,
            Some(&c.der),
        );
        assert_eq!(flow, Flow::CONTINUE);
        assert_eq!(ctx.variables[ERROR_VARIABLE], "identity_mismatch");
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (cfg, needle) in [
            (r#"{"validate_revocation":true}"#, "validate_revocation"),
            (
                r#"{"failed_validation_httpcode":200}"#,
                "failed_validation_httpcode",
            ),
            (r#"{"identities":[{}]}"#, "identities[0] has no field"),
            (
                r#"{"identities":[{"thumbprint":"abc"}]}"#,
                "identities[0].thumbprint",
            ),
            (r#"{"identities":[{"thumbprint":"abcd"}]}"#, "SHA-1"),
            (r#"{"identities":[{"thumbprint":"zz"}]}"#, "hexadecimal"),
            (
                r#"{"identities":[{"serial_number":"xyz!"}]}"#,
                "identities[0].serial_number",
            ),
            (r#"{"identities":[{"subject":"client-1"}]}"#, "TYPE=value"),
            (
                r#"{"identities":[{"issuer_thumbprint":"ab"}]}"#,
                "issuer_thumbprint",
            ),
            (
                r#"{"identities":[{"issuer_certificate_id":"ca"}]}"#,
                "issuer_certificate_id",
            ),
            (r#"{"identities":[{"cn":"x"}]}"#, "cn"),
        ] {
            let e = policy::<ValidateClientCertificate>(cfg).err().expect(cfg);
            assert!(e.message.contains(needle), "{cfg}: {}", e.message);
        }
        // validate_trust is accepted either way (the listener verified the chain).
        assert!(policy::<ValidateClientCertificate>(r#"{"validate_trust":false}"#).is_ok());
    }
}
