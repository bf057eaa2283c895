//! The runtime form of one API configuration: everything a request needs, pre-compiled, and
//! swapped as a whole (`ArcSwap`) so a request never sees half of a reload.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::{HeaderName, Method};
use outpost_config::template::UrlTemplate;
use outpost_config::{normalize_prefix, ApiConfig, Report, SubscriptionScope, SubscriptionState};

use crate::router::{OperationRoute, Router};
use crate::upstream::{BackendRoute, ClientCache};

/// Where the configuration being served came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// A local file (standalone mode).
    File(String),
}

impl ConfigOrigin {
    /// Short name for health answers and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
        }
    }
}

/// One API, compiled.
#[derive(Debug)]
pub struct ApiRoute {
    /// API id.
    pub id: Arc<str>,
    /// The API's path prefix, normalised (no trailing slash, root empty).
    pub prefix: Box<str>,
    /// Where requests go.
    pub backend: Arc<BackendRoute>,
    /// Whether a subscription key is needed.
    pub subscription_required: bool,
    /// Header carrying the key.
    pub key_header: HeaderName,
    /// Query parameter carrying the key.
    pub key_query: Box<str>,
    /// Operations, most specific first.
    pub operations: Vec<OperationRoute>,
}

/// One subscription, compiled.
#[derive(Debug)]
pub struct SubscriptionEntry {
    /// Subscription id.
    pub id: Arc<str>,
    /// API indexes it covers; `None` for all APIs.
    pub apis: Option<HashSet<usize>>,
    /// Keys are refused with 403.
    pub suspended: bool,
}

/// A configuration ready to serve.
#[derive(Debug)]
pub struct Snapshot {
    /// The configuration's version (from the document, or its digest).
    pub version: String,
    /// SHA-256 of the document, lower-case hex.
    pub digest: String,
    /// Where it came from.
    pub origin: ConfigOrigin,
    /// The validated document (policies and named values are read from here by the pipeline).
    pub config: ApiConfig,
    /// Host + prefix → API index.
    pub router: Router,
    /// The APIs, indexed by the router.
    pub apis: Vec<ApiRoute>,
    /// Key → subscription index.
    pub keys: HashMap<Box<str>, usize>,
    /// The subscriptions.
    pub subscriptions: Vec<SubscriptionEntry>,
}

impl Snapshot {
    /// Compiles a validated configuration. Fails (with every problem) only where compiling
    /// finds what validation cannot: backend TLS material that does not parse.
    pub fn build(
        config: ApiConfig,
        raw: &[u8],
        origin: ConfigOrigin,
        clients: &ClientCache,
    ) -> Result<Snapshot, Report> {
        let digest = sha256_hex(raw);
        let mut report = Report::new(match &origin {
            ConfigOrigin::File(p) => p.clone(),
        });

        let mut backends = HashMap::new();
        for (i, b) in config.backends.iter().enumerate() {
            match clients.backend(b) {
                Ok(route) => {
                    backends.insert(b.id.as_str(), Arc::new(route));
                }
                Err(e) => report.push(format!("backends[{i}].tls"), e.to_string()),
            }
        }

        let mut router = Router::default();
        let mut apis = Vec::with_capacity(config.apis.len());
        let mut api_index = HashMap::new();
        for (i, api) in config.apis.iter().enumerate() {
            let Some(backend) = backends.get(api.backend.as_str()).cloned() else {
                // Either reported above (bad TLS) or impossible after validation.
                continue;
            };
            let prefix = normalize_prefix(&api.path);
            router.add(&api.hostnames, prefix, apis.len());
            api_index.insert(api.id.as_str(), apis.len());
            let mut operations: Vec<OperationRoute> = api
                .operations
                .iter()
                .map(|op| OperationRoute {
                    id: op.id.as_str().into(),
                    method: (op.method != "*").then(|| {
                        Method::from_bytes(op.method.as_bytes()).expect("validated method")
                    }),
                    template: UrlTemplate::parse(&op.url_template).expect("validated template"),
                })
                .collect();
            // Most specific template first; a fixed method before "any method".
            operations.sort_by_cached_key(|op| (op.template.specificity(), op.method.is_none()));
            let key_header = match HeaderName::from_bytes(api.subscription_key.header.as_bytes()) {
                Ok(h) => h,
                Err(e) => {
                    report.push(format!("apis[{i}].subscription_key.header"), e.to_string());
                    continue;
                }
            };
            apis.push(ApiRoute {
                id: api.id.as_str().into(),
                prefix: prefix.into(),
                backend,
                subscription_required: api.subscription_required,
                key_header,
                key_query: api.subscription_key.query.as_str().into(),
                operations,
            });
        }

        let products: HashMap<&str, Vec<usize>> = config
            .products
            .iter()
            .map(|p| {
                let apis = p
                    .apis
                    .iter()
                    .filter_map(|a| api_index.get(a.as_str()).copied())
                    .collect();
                (p.id.as_str(), apis)
            })
            .collect();
        let mut keys = HashMap::new();
        let mut subscriptions = Vec::with_capacity(config.subscriptions.len());
        for s in &config.subscriptions {
            let apis = match &s.scope {
                SubscriptionScope::All => None,
                SubscriptionScope::Api { id } => {
                    Some(api_index.get(id.as_str()).copied().into_iter().collect())
                }
                SubscriptionScope::Product { id } => Some(
                    products
                        .get(id.as_str())
                        .map(|v| v.iter().copied().collect())
                        .unwrap_or_default(),
                ),
            };
            let idx = subscriptions.len();
            keys.insert(s.primary_key.as_str().into(), idx);
            if let Some(k) = &s.secondary_key {
                keys.insert(k.as_str().into(), idx);
            }
            subscriptions.push(SubscriptionEntry {
                id: s.id.as_str().into(),
                apis,
                suspended: s.state == SubscriptionState::Suspended,
            });
        }

        let version = config
            .version
            .clone()
            .unwrap_or_else(|| digest[..12].to_string());
        report.into_result(Snapshot {
            version,
            digest,
            origin,
            config,
            router,
            apis,
            keys,
            subscriptions,
        })
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}
