//! Signing keys: from the configuration (JWK, PEM, base64 secret) or a fetched JWKS.

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json::{self, Value};

/// One configured key: exactly one of `jwk`, `pem`, `secret_base64`; `kid` names it (a JWK's
/// own `kid` is used when not given).
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct KeyConfig {
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    jwk: Option<Value>,
    #[serde(default)]
    pem: Option<String>,
    #[serde(default)]
    secret_base64: Option<String>,
}

/// Which algorithms a key can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Hmac,
    Rsa,
    /// ECDSA; the curve when known (a JWK's `crv`).
    Ec(Option<Algorithm>),
    Ed,
}

/// A verification key.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    family: Family,
    /// The JWK's `alg`, when it names one: the only algorithm the key is used with.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish()
    }
}

impl Key {
    /// Whether this key verifies tokens signed with `alg`.
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        use Algorithm::*;
        match (self.family, alg) {
            (Family::Hmac, HS256 | HS384 | HS512) => true,
            (Family::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => true,
            (Family::Ec(None), ES256 | ES384) => true,
            (Family::Ec(Some(curve)), a) => curve == a,
            (Family::Ed, EdDSA) => true,
            _ => false,
        }
    }

    /// Checks a signature (`message` is `header.payload`, `signature` the third part).
    pub(crate) fn verify(&self, alg: Algorithm, message: &str, signature: &str) -> bool {
        // `fits` first: the crate assumes the key's family matches the algorithm.
        self.fits(alg)
            && jsonwebtoken::crypto::verify(signature, message.as_bytes(), &self.key, alg)
                .unwrap_or(false)
    }

    /// A key from a JWK; `Ok(None)` for keys that are not for signatures (`use: enc`).
    pub(crate) fn from_jwk(value: &Value, kid: Option<String>) -> Result<Option<Key>, String> {
        let jwk: Jwk = serde_json::from_value(value.clone())
            .map_err(|e| format!("not a supported JWK ({e})"))?;
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Ok(None);
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(
                algorithm(a)
                    .ok_or_else(|| format!("the JWK's alg {a} is not a signature algorithm"))?,
            ),
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::OctetKey(_) => Family::Hmac,
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => Family::Ed,
                ref c => {
                    return Err(format!(
                        "OKP curve {} is not supported (Ed25519 is)",
                        curve_name(c)
                    ))
                }
            },
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Family::Ec(Some(Algorithm::ES256)),
                EllipticCurve::P384 => Family::Ec(Some(Algorithm::ES384)),
                ref c => {
                    return Err(format!(
                        "EC curve {} is not supported (P-256 and P-384 are)",
                        curve_name(c)
                    ))
                }
            },
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable JWK: {e}"))?;
        let key = Key {
            kid: kid.or(jwk.common.key_id),
            family,
            alg,
            key,
        };
        if let Some(a) = alg {
            if !key.fits(a) {
                return Err(format!("the JWK's alg {a:?} does not suit its key type"));
            }
        }
        Ok(Some(key))
    }

    /// A public key or certificate in PEM (RSA, EC or Ed25519).
    fn from_pem(pem: &str, kid: Option<String>) -> Result<Key, String> {
        let label = pem
            .trim_start()
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.split_once("-----"))
            .map(|(l, _)| l)
            .ok_or("not PEM (expected -----BEGIN PUBLIC KEY----- or CERTIFICATE)")?;
        if !matches!(label, "PUBLIC KEY" | "RSA PUBLIC KEY" | "CERTIFICATE") {
            return Err(format!(
                "PEM '{label}' is not a public key or certificate (never configure private keys)"
            ));
        }
        let b = pem.as_bytes();
        let (family, key) = if let Ok(k) = DecodingKey::from_rsa_pem(b) {
            (Family::Rsa, k)
        } else if let Ok(k) = DecodingKey::from_ec_pem(b) {
            (Family::Ec(None), k)
        } else if let Ok(k) = DecodingKey::from_ed_pem(b) {
            (Family::Ed, k)
        } else {
            return Err("PEM holds no RSA, EC or Ed25519 public key".into());
        };
        Ok(Key {
            kid,
            family,
            alg: None,
            key,
        })
    }

    /// An HMAC secret in base64 (standard or URL-safe alphabet).
    fn from_secret(b64: &str, kid: Option<String>) -> Result<Key, String> {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let t = b64.trim();
        let secret = STANDARD
            .decode(t)
            .or_else(|_| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')))
            .map_err(|_| "secret_base64 is not base64".to_string())?;
        if secret.is_empty() {
            return Err("secret_base64 is empty".into());
        }
        Ok(Key {
            kid,
            family: Family::Hmac,
            alg: None,
            key: DecodingKey::from_secret(&secret),
        })
    }

    /// A configured key.
    pub(crate) fn from_config(i: usize, c: KeyConfig) -> Result<Key, String> {
        let at = format!("issuer_signing_keys[{i}]");
        let given = [c.jwk.is_some(), c.pem.is_some(), c.secret_base64.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given != 1 {
            return Err(format!("{at}: give exactly one of jwk, pem, secret_base64"));
        }
        let r = if let Some(jwk) = &c.jwk {
            Key::from_jwk(jwk, c.kid)
                .and_then(|k| k.ok_or_else(|| "the JWK is an encryption key (use: enc)".into()))
        } else if let Some(pem) = &c.pem {
            Key::from_pem(pem, c.kid)
        } else {
            Key::from_secret(c.secret_base64.as_deref().unwrap_or_default(), c.kid)
        };
        r.map_err(|e| format!("{at}: {e}"))
    }
}

fn curve_name(c: &EllipticCurve) -> &'static str {
    match c {
        EllipticCurve::P256 => "P-256",
        EllipticCurve::P384 => "P-384",
        EllipticCurve::P521 => "P-521",
        EllipticCurve::Ed25519 => "Ed25519",
    }
}

/// The signature algorithm a JWK's `alg` names.
fn algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    use Algorithm as A;
    use KeyAlgorithm as K;
    Some(match a {
        K::HS256 => A::HS256,
        K::HS384 => A::HS384,
        K::HS512 => A::HS512,
        K::ES256 => A::ES256,
        K::ES384 => A::ES384,
        K::RS256 => A::RS256,
        K::RS384 => A::RS384,
        K::RS512 => A::RS512,
        K::PS256 => A::PS256,
        K::PS384 => A::PS384,
        K::PS512 => A::PS512,
        K::EdDSA => A::EdDSA,
        K::RSA1_5 | K::RSA_OAEP | K::RSA_OAEP_256 => return None,
    })
}

/// The usable signature keys of a JWKS document (`{"keys": [...]}`); keys this policy cannot
/// use (encryption keys, other curves, malformed entries) are skipped, with their count.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<(Vec<Key>, usize), String> {
    #[derive(Deserialize)]
    #[serde(crate = "outpost_plugin_sdk::serde")]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body)
        .map_err(|e| format!("the JWKS is not a JSON key set ({e})"))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    let mut skipped = 0;
    for v in &set.keys {
        match Key::from_jwk(v, None) {
            // A published key set is public: a symmetric key in it would let anyone sign.
            Ok(Some(k)) if k.family == Family::Hmac => skipped += 1,
            Ok(Some(k)) => keys.push(k),
            Ok(None) | Err(_) => skipped += 1,
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS has no usable signature key ({} key(s) skipped)",
            skipped
        ));
    }
    Ok((keys, skipped))
}

/// The `jwks_uri` of an OpenID Provider configuration document.
pub(crate) fn parse_openid_configuration(body: &[u8]) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the OpenID configuration is not JSON ({e})"))?;
    let uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("the OpenID configuration has no jwks_uri")?;
    super::check_url("jwks_uri of the OpenID configuration", uri)?;
    Ok(uri.to_owned())
}

/// Decodes base64url with or without padding.
pub(crate) fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}
