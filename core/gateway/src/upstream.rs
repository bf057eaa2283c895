//! Connections to backends: pooled keep-alive clients (HTTP/1.1 and HTTP/2, rustls), and the
//! resolved targets of each backend, picked round-robin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use outpost_config::{Backend, BackendTls, Upstream};
use rustls::RootCertStore;

use crate::body::RequestBody;
use crate::pool::HostPool;
use crate::tls::{self, TlsError};

/// The HTTP client used for backends.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// One base URL of a backend, pre-parsed.
#[derive(Debug)]
pub struct Target {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// Base path without a trailing slash (empty for none).
    pub base_path: Box<str>,
    /// Its own keep-alive HTTP/1.1 connections (backends configured for HTTP/1.1); without
    /// one, requests go through the backend's generic client.
    pub pool: Option<Arc<HostPool>>,
}

impl Target {
    /// From an absolute `http` or `https` URL without query or fragment.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("'{url}': {e}"))?;
        let parts = uri.into_parts();
        let scheme = parts
            .scheme
            .filter(|s| *s == Scheme::HTTP || *s == Scheme::HTTPS)
            .ok_or_else(|| format!("'{url}' is not an http or https URL"))?;
        let authority = parts
            .authority
            .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
            .ok_or_else(|| format!("'{url}' has no host"))?;
        if parts
            .path_and_query
            .as_ref()
            .is_some_and(|p| p.query().is_some())
        {
            return Err(format!("'{url}' has a query"));
        }
        Ok(Target {
            scheme,
            authority,
            base_path: parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').into())
                .unwrap_or_default(),
            pool: None,
        })
    }
}

/// A backend ready to take requests.
pub struct BackendRoute {
    /// Backend id.
    pub id: Arc<str>,
    /// Keep the client's Host header.
    pub preserve_host: bool,
    /// Pooled client (shared between backends with the same TLS and protocol settings, and
    /// kept across configuration reloads).
    pub client: UpstreamClient,
    targets: Vec<Target>,
    next: AtomicUsize,
}

impl std::fmt::Debug for BackendRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRoute")
            .field("id", &self.id)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl BackendRoute {
    /// The next target, round-robin.
    pub fn pick(&self) -> &Target {
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.targets[i % self.targets.len()]
    }
}

/// Clients keyed by their settings, so a reload that keeps a backend's settings keeps its
/// warm connection pool.
pub struct ClientCache {
    settings: Upstream,
    clients: Mutex<HashMap<String, (UpstreamClient, Connector)>>,
    /// HTTP/1.1 targets' pools by settings and origin, while a snapshot uses them.
    pools: Mutex<HashMap<String, Weak<HostPool>>>,
}

type Connector = HttpsConnector<HttpConnector>;

impl ClientCache {
    /// An empty cache for clients with the manifest's upstream settings.
    pub fn new(settings: Upstream) -> Self {
        Self {
            settings,
            clients: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// Builds the runtime form of a backend (validated config assumed).
    pub fn backend(&self, b: &Backend) -> Result<BackendRoute, TlsError> {
        let tls = b.tls.clone().unwrap_or_default();
        let key = format!(
            "h2={}|ca={:?}|cert={:?}|key={}",
            b.http2,
            tls.ca_pem,
            tls.client_cert_pem,
            tls.client_key_pem
                .as_deref()
                .map(digest)
                .unwrap_or_default()
        );
        let (client, connector) = {
            let mut clients = self.clients.lock().expect("client cache lock");
            match clients.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let connector = self.build_connector(&tls, b.http2)?;
                    let c = (self.client(connector.clone(), b.http2), connector);
                    clients.insert(key.clone(), c.clone());
                    c
                }
            }
        };
        let targets = b
            .urls
            .iter()
            .map(|u| {
                let mut t = Target::parse(u).expect("validated URL");
                if !b.http2 {
                    t.pool = Some(self.pool(&key, &t, &connector));
                }
                t
            })
            .collect();
        Ok(BackendRoute {
            id: b.id.as_str().into(),
            preserve_host: b.preserve_host,
            client,
            targets,
            next: AtomicUsize::new(0),
        })
    }

    /// The pool of a target with these settings, shared with the snapshot being served so a
    /// reload keeps warm connections.
    fn pool(&self, key: &str, t: &Target, connector: &Connector) -> Arc<HostPool> {
        let mut pools = self.pools.lock().expect("pool cache lock");
        let key = format!("{key}|{}://{}", t.scheme, t.authority);
        if let Some(p) = pools.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        pools.retain(|_, p| p.strong_count() > 0);
        let p = Arc::new(HostPool::new(
            connector.clone(),
            &t.scheme,
            &t.authority,
            self.settings.max_idle_per_host,
            Duration::from_millis(self.settings.idle_timeout_ms),
        ));
        pools.insert(key, Arc::downgrade(&p));
        p
    }

    /// A client with the system's trust roots and HTTP/1.1 (for HTTP calls policies make).
    pub fn plain_client(&self) -> Result<UpstreamClient, TlsError> {
        self.build_client(&BackendTls::default(), false)
    }

    /// A client trusting only this CA (PEM), HTTP/1.1.
    pub fn client_with_ca(&self, ca_pem: String) -> Result<UpstreamClient, TlsError> {
        let tls = BackendTls {
            ca_pem: Some(ca_pem),
            ..BackendTls::default()
        };
        self.build_client(&tls, false)
    }

    fn build_client(&self, tls: &BackendTls, http2: bool) -> Result<UpstreamClient, TlsError> {
        Ok(self.client(self.build_connector(tls, http2)?, http2))
    }

    fn build_connector(&self, tls: &BackendTls, http2: bool) -> Result<Connector, TlsError> {
        let roots = match &tls.ca_pem {
            Some(pem) => tls::roots_from_pem(pem.as_bytes(), "backend tls.ca_pem")?,
            None => system_roots(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&tls.client_cert_pem, &tls.client_key_pem) {
            (Some(cert), Some(key)) => {
                let chain = tls::certs_from_pem(cert.as_bytes(), "backend tls.client_cert_pem")?;
                let key = tls::key_from_pem(key.as_bytes(), "backend tls.client_key_pem")?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config(format!("backend client certificate: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(
            self.settings.connect_timeout_ms,
        )));
        // HTTP/2 is offered (ALPN, or prior knowledge for http://) only to backends configured
        // for it: an HTTP/1.1 backend that happens to speak h2 would otherwise lose WebSocket
        // upgrades, which HTTP/2 cannot carry.
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http();
        Ok(if http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        })
    }

    fn client(&self, connector: Connector, http2: bool) -> UpstreamClient {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_millis(self.settings.idle_timeout_ms))
            .pool_max_idle_per_host(self.settings.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(http2);
        builder.build(connector)
    }
}

fn digest(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The system's trust roots, loaded once. A machine without any gets an empty store: HTTPS
/// backends then need `tls.ca_pem`, and connecting says why it failed.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "Could not load some system trust roots.");
            }
            let (added, _) = store.add_parsable_certificates(found.certs);
            tracing::debug!(roots = added, "Loaded system trust roots.");
            Arc::new(store)
        })
        .clone()
}
