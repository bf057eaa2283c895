//! TLS: the listener side (certificates chosen by SNI, session resumption, optional client
//! certificates) and PEM helpers shared with the backend side. rustls with the `ring` provider.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use outpost_config::ListenerTls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// A TLS setting that cannot be used, with the file or field it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} '{path}': {reason}")]
    File {
        /// Which setting.
        what: String,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// PEM text held nothing usable.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the combination.
    #[error("{0}")]
    Config(String),
}

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates in PEM text; `what` names the setting for errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("{what}: not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{what}: no CERTIFICATE block found")));
    }
    Ok(certs)
}

/// The private key in PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsError::Pem(format!("{what}: no usable private key: {e}")))
}

/// A root store holding the CA certificates in PEM text.
pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        store
            .add(cert)
            .map_err(|e| TlsError::Pem(format!("{what}: unusable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what: what.to_string(),
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Picks the certificate by SNI: exact name, then the longest matching wildcard, then the
/// default (the first certificate listed).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        for (suffix, k) in &self.wildcard {
            if name.len() > suffix.len() && name.ends_with(suffix.as_str()) {
                // `*.example.com` matches exactly one label.
                if !name[..name.len() - suffix.len()].contains('.') {
                    return Some(k.clone());
                }
            }
        }
        Some(self.default.clone())
    }
}

/// Builds a listener's rustls config. `listener` names it in errors.
pub fn server_config(
    listener: &str,
    tls: &ListenerTls,
    http2: bool,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    for (i, c) in tls.certificates.iter().enumerate() {
        let what = format!("listener '{listener}' certificates[{i}]");
        let chain = certs_from_pem(
            &read(&c.cert, &format!("{what}.cert"))?,
            &format!("{what}.cert {}", c.cert.display()),
        )?;
        let key = key_from_pem(
            &read(&c.key, &format!("{what}.key"))?,
            &format!("{what}.key {}", c.key.display()),
        )?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Config(format!("{what}.key: {e}")))?;
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        ck.keys_match().map_err(|e| {
            TlsError::Config(format!(
                "{what}: the key does not belong to the certificate ({e})"
            ))
        })?;
        for h in &c.hostnames {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => wildcard.push((suffix.to_string(), ck.clone())),
                None => {
                    exact.insert(h, ck.clone());
                }
            }
        }
        default.get_or_insert(ck);
    }
    wildcard.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    let default = default
        .ok_or_else(|| TlsError::Config(format!("listener '{listener}': no certificate")))?;
    let resolver = Arc::new(SniResolver {
        exact,
        wildcard,
        default,
    });

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let what = format!("listener '{listener}' client_auth.ca {}", ca.ca.display());
            let roots = roots_from_pem(&read(&ca.ca, &what)?, &what)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let verifier = if ca.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(format!("{what}: {e}")))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    // Stateful resumption by session id (TLS 1.2) and, with tickets, stateless resumption.
    config.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    if tls.session_tickets {
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError::Config(format!("session tickets: {e}")))?;
    }
    Ok(config)
}

/// A verified client certificate, as policies see it.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// DER of the leaf certificate.
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, lower-case hex.
    pub thumbprint_sha256: String,
    /// The DER in standard base64, as the `outpost.client-cert` property gives it.
    pub der_base64: String,
}

impl ClientCertificate {
    /// From the chain rustls verified (leaf first).
    pub fn from_chain(chain: &[CertificateDer<'static>]) -> Option<Self> {
        let leaf = chain.first()?;
        let d = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
        Some(Self {
            der: leaf.clone(),
            thumbprint_sha256: d.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            der_base64: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                leaf.as_ref(),
            ),
        })
    }
}
