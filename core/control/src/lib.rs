//! The Outpost management plane (`outpost control`): an admin REST API over a SQLite state, and
//! the endpoints gateways call out to — their configuration snapshot (signed with Ed25519,
//! ETag / `If-None-Match`, long-poll), heartbeats and token renewal.
//!
//! Every admin change is validated as a whole configuration before it is written (one SQLite
//! transaction: nothing half-written) and bumps the configuration version; gateways waiting on
//! a long-poll are answered at once.

mod db;
mod http_api;
mod openapi;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Deserialize;

use db::Db;

/// `control.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The management plane.
    pub control: ControlSettings,
}

/// `[control]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The SQLite state file (relative to the manifest).
    pub database: PathBuf,
    /// A file holding the admin bearer token (relative to the manifest).
    pub admin_token_file: PathBuf,
    /// The Ed25519 signing key (PKCS#8 DER), created when missing (relative to the manifest).
    pub signing_key_file: PathBuf,
    /// Lifetime of gateway tokens. Default 86400 s.
    #[serde(default = "default_ttl")]
    pub gateway_token_ttl_s: u64,
    /// Longest long-poll a gateway may ask for. Default 30 s.
    #[serde(default = "default_long_poll")]
    pub long_poll_max_s: u64,
    /// Serve HTTPS (`[control.tls]`); plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// `[control.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain, PEM (relative to the manifest).
    pub cert_file: PathBuf,
    /// Private key, PEM (relative to the manifest).
    pub key_file: PathBuf,
}

fn tls_acceptor(base: &Path, t: &TlsSettings) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let read = |p: &Path| {
        let p = resolve(base, p);
        std::fs::read(&p).map_err(|e| Error::Settings(format!("tls {}: {e}", p.display())))
    };
    let certs = outpost_gateway::tls::certs_from_pem(&read(&t.cert_file)?, "control.tls.cert_file")
        .map_err(|e| Error::Settings(e.to_string()))?;
    let key = outpost_gateway::tls::key_from_pem(&read(&t.key_file)?, "control.tls.key_file")
        .map_err(|e| Error::Settings(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(outpost_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Settings(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Settings(format!("control.tls: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

fn default_ttl() -> u64 {
    86_400
}

fn default_long_poll() -> u64 {
    30
}

/// Why the plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest.
    #[error("{0}")]
    Settings(String),
    /// The state or key files.
    #[error("{0}")]
    State(String),
    /// The listener.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// What the request handlers share.
pub struct Plane {
    db: Db,
    admin_token_digest: [u8; 32],
    key: Ed25519KeyPair,
    /// The public key, hex (what gateways configure).
    pub public_key_hex: String,
    ttl_s: u64,
    long_poll_max_s: u64,
    version: tokio::sync::watch::Sender<u64>,
}

fn digest(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

impl Plane {
    /// Opens the state and keys a manifest names.
    pub fn open(manifest: &Path) -> Result<(Plane, ControlSettings), Error> {
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| Error::Settings(format!("{}: cannot read: {e}", manifest.display())))?;
        let s: Settings = toml::from_str(&text)
            .map_err(|e| Error::Settings(format!("{}: {e}", manifest.display())))?;
        let c = s.control;
        let base = manifest.parent().unwrap_or(Path::new("."));
        if c.gateway_token_ttl_s < 2 {
            return Err(Error::Settings(
                "gateway_token_ttl_s must be at least 2".into(),
            ));
        }
        let token_path = resolve(base, &c.admin_token_file);
        let token = std::fs::read_to_string(&token_path)
            .map_err(|e| Error::State(format!("admin_token_file {}: {e}", token_path.display())))?;
        let token = token.trim();
        if token.len() < 16 {
            return Err(Error::State(format!(
                "admin_token_file {}: the token must be at least 16 characters",
                token_path.display()
            )));
        }
        let key_path = resolve(base, &c.signing_key_file);
        let key = load_or_create_key(&key_path)?;
        let public_key_hex = hex(key.public_key().as_ref());
        let db = Db::open(&resolve(base, &c.database)).map_err(Error::State)?;
        let version = db.version().map_err(Error::State)?;
        Ok((
            Plane {
                db,
                admin_token_digest: digest(token.as_bytes()),
                key,
                public_key_hex,
                ttl_s: c.gateway_token_ttl_s,
                long_poll_max_s: c.long_poll_max_s.max(1),
                version: tokio::sync::watch::Sender::new(version),
            },
            c,
        ))
    }
}

fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair, Error> {
    let der = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| Error::State("cannot generate a signing key".into()))?;
            write_private(path, doc.as_ref())
                .map_err(|e| Error::State(format!("signing_key_file {}: {e}", path.display())))?;
            tracing::info!(path = %path.display(), "Created a new snapshot signing key.");
            doc.as_ref().to_vec()
        }
        Err(e) => {
            return Err(Error::State(format!(
                "signing_key_file {}: {e}",
                path.display()
            )))
        }
    };
    Ed25519KeyPair::from_pkcs8(&der).map_err(|e| {
        Error::State(format!(
            "signing_key_file {}: not an Ed25519 PKCS#8 key: {e}",
            path.display()
        ))
    })
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Runs the plane until `shutdown` resolves. Logs "Listening." with the bound address.
pub async fn run(
    manifest: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let (plane, settings) = Plane::open(manifest)?;
    let base = manifest.parent().unwrap_or(Path::new("."));
    let tls = settings
        .tls
        .as_ref()
        .map(|t| tls_acceptor(base, t))
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| Error::Bind(settings.listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Bind(settings.listen, e))?;
    tracing::info!(
        address = %local,
        tls = tls.is_some(),
        public_key = %plane.public_key_hex,
        version = *plane.version.borrow(),
        "Listening."
    );
    let plane = Arc::new(plane);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors, most likely: pause instead of spinning.
                        tracing::warn!(error = %e, "Accepting a connection failed.");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let plane = plane.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let plane = plane.clone();
                        async move { Ok::<_, std::convert::Infallible>(http_api::handle(plane, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await;
                            if let Ok(Ok(s)) = handshake {
                                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(s), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            _ = &mut shutdown => {
                tracing::info!("Stopping.");
                return Ok(());
            }
        }
    }
}
