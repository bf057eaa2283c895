//! Access policies, as APIM names them (every field is described in the crate's README):
//!
//! * `check-header` — refuses requests whose header is missing or has another value.
//! * `ip-filter` — allows or forbids client addresses (single addresses, CIDR ranges,
//!   from–to ranges; IPv4 and IPv6).
//! * `validate-jwt` — validates a JSON Web Token (signature with inline keys or keys fetched
//!   from a JWKS or OpenID configuration through the host, expiry, issuer, audience, claims)
//!   and hands its claims to later policies as `jwt.<claim>` variables.
//! * `authentication-basic` — sends HTTP Basic credentials to the backend.
//! * `validate-client-certificate` — checks the client's TLS certificate (validity dates,
//!   identities: thumbprint, serial number, names).
//!
//! Refusals answer with the gateway's JSON error shape
//! (`{"statusCode": N, "error": "<code>", "message": "…"}`, `application/json`).

use outpost_plugin_sdk::{export_plugin, Context, Flow};

mod basic_auth;
mod check_header;
mod client_cert;
mod ip_filter;
mod jwt;

pub use basic_auth::{AuthenticationBasic, AuthenticationBasicConfig};
pub use check_header::{CheckHeader, CheckHeaderConfig};
pub use client_cert::{IdentityConfig, ValidateClientCertificate, ValidateClientCertificateConfig};
pub use ip_filter::{AddressRange, IpFilter, IpFilterAction, IpFilterConfig};
pub use jwt::{ClaimMatch, KeyConfig, RequiredClaim, ValidateJwt, ValidateJwtConfig};

/// Answers with the gateway's JSON error shape; `extra` fields are added to the body.
fn refuse(
    ctx: &mut Context<'_, '_>,
    status: u16,
    code: &str,
    message: &str,
    extra: &[(&str, &str)],
) -> Flow {
    ctx.respond_error(status, code, message, extra);
    Flow::RESPOND
}

/// Checks a configured refusal status.
fn check_status(field: &str, status: u16) -> Result<(), String> {
    if (400..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "{field} must be between 400 and 599 (got {status})"
        ))
    }
}

export_plugin! {
    name: "policy-access",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "check-header" => CheckHeader,
        "ip-filter" => IpFilter,
        "validate-jwt" => ValidateJwt,
        "authentication-basic" => AuthenticationBasic,
        "validate-client-certificate" => ValidateClientCertificate,
    ],
}

#[cfg(test)]
mod readme {
    //! Every ```json block of the README is one policy step this library builds.

    use outpost_plugin_sdk::serde_json::{self, Value};
    use outpost_plugin_sdk::testing::policy;

    #[test]
    fn readme_examples_build() {
        let readme = include_str!("../README.md");
        let mut seen = Vec::new();
        for block in readme.split("```json").skip(1) {
            let json = block.split("```").next().expect("closed block");
            let step: Value = serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("README block is not JSON ({e}):\n{json}"));
            let name = step["policy"].as_str().expect("policy name").to_owned();
            let config = serde_json::to_string(&step["config"]).expect("config");
            let built = match name.as_str() {
                "check-header" => policy::<super::CheckHeader>(&config).map(drop),
                "ip-filter" => policy::<super::IpFilter>(&config).map(drop),
                "validate-jwt" => policy::<super::ValidateJwt>(&config).map(drop),
                "authentication-basic" => policy::<super::AuthenticationBasic>(&config).map(drop),
                "validate-client-certificate" => {
                    policy::<super::ValidateClientCertificate>(&config).map(drop)
                }
                other => panic!("README shows an unknown policy '{other}'"),
            };
            if let Err(e) = built {
                panic!("README example for {name} is refused: {}", e.message);
            }
            seen.push(name);
        }
        for p in [
            "check-header",
            "ip-filter",
            "validate-jwt",
            "authentication-basic",
            "validate-client-certificate",
        ] {
            assert!(seen.iter().any(|s| s == p), "README has no example for {p}");
        }
    }
}
