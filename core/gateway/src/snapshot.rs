//! The runtime form of one API configuration: everything a request needs, pre-compiled, and
//! swapped as a whole (`ArcSwap`) so a request never sees half of a reload.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::{HeaderName, Method};
use outpost_config::template::UrlTemplate;
use outpost_config::{normalize_prefix, ApiConfig, Report, SubscriptionScope, SubscriptionState};

use crate::plugins::{Pipeline, PluginHost, PolicyInstance};
use crate::router::{OperationRoute, Router};
use crate::upstream::{BackendRoute, ClientCache};

/// Where the configuration being served came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// A local file (standalone mode).
    File(String),
    /// The management plane.
    Plane(String),
    /// A generation of the backup store, used because the live source could not be.
    Backup {
        /// The store's provider name.
        store: String,
        /// The generation.
        generation: u64,
        /// When it was saved (Unix ms).
        saved_unix_ms: u64,
    },
}

impl ConfigOrigin {
    /// Whether this configuration was restored from the backup store (rather than received
    /// from its source).
    pub fn is_backup(&self) -> bool {
        matches!(self, Self::Backup { .. })
    }

    /// Short name for health answers and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Plane(_) => "live",
            Self::Backup { .. } => "backup",
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
    /// The global and API inbound policies, which CORS preflight requests run before
    /// operation matching and subscription checks (`None` unless a `cors` step is among them).
    pub preflight: Option<Arc<crate::plugins::Pipeline>>,
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
    /// The product (index, id) for product-scoped subscriptions: its policies apply.
    pub product: Option<(usize, Arc<str>)>,
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
    /// Every backend by id (for policies that choose another backend).
    pub backends: HashMap<Box<str>, Arc<BackendRoute>>,
    /// The document exactly as received (what backups keep).
    pub raw: bytes::Bytes,
    /// The plane's signature of `raw` (hex), when it came signed.
    pub signature: Option<String>,
}

impl Snapshot {
    /// Compiles a validated configuration. Fails (with every problem) only where compiling
    /// finds what validation cannot: backend TLS material that does not parse.
    pub fn build(
        config: ApiConfig,
        raw: &[u8],
        origin: ConfigOrigin,
        clients: &ClientCache,
        plugins: &PluginHost,
    ) -> Result<Snapshot, Report> {
        let digest = sha256_hex(raw);
        let mut report = Report::new(match &origin {
            ConfigOrigin::File(p) | ConfigOrigin::Plane(p) => p.clone(),
            ConfigOrigin::Backup {
                store, generation, ..
            } => format!("backup store '{store}' generation {generation}"),
        });

        let mut backends = HashMap::new();
        for (i, b) in config.backends.iter().enumerate() {
            match clients.backend(b) {
                Ok(route) => {
                    backends.insert(Box::<str>::from(b.id.as_str()), Arc::new(route));
                }
                Err(e) => report.push(format!("backends[{i}].tls"), e.to_string()),
            }
        }

        // Policy documents of every scope, compiled once; steps are shared between pipelines.
        let global = compile_doc(config.policies.as_ref(), "policies", plugins, &mut report);
        let product_docs: Vec<Option<Sections>> = config
            .products
            .iter()
            .enumerate()
            .map(|(i, p)| {
                compile_doc(
                    p.policies.as_ref(),
                    &format!("products[{i}].policies"),
                    plugins,
                    &mut report,
                )
            })
            .collect();

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
            let api_doc = compile_doc(
                api.policies.as_ref(),
                &format!("apis[{i}].policies"),
                plugins,
                &mut report,
            );
            // Products whose policies can apply to this API.
            let api_products: Vec<usize> = config
                .products
                .iter()
                .enumerate()
                .filter(|(_, p)| p.apis.contains(&api.id))
                .map(|(j, _)| j)
                .collect();
            let mut operations: Vec<OperationRoute> = Vec::with_capacity(api.operations.len());
            for (k, op) in api.operations.iter().enumerate() {
                let op_doc = compile_doc(
                    op.policies.as_ref(),
                    &format!("apis[{i}].operations[{k}].policies"),
                    plugins,
                    &mut report,
                );
                let mut pipelines = Vec::new();
                let base = pipeline(&[global.as_ref(), None, api_doc.as_ref(), op_doc.as_ref()]);
                if !base.is_empty() {
                    pipelines.push((None, Arc::new(base)));
                }
                for &j in &api_products {
                    if product_docs[j].is_none() {
                        continue;
                    }
                    let chain = [
                        global.as_ref(),
                        product_docs[j].as_ref(),
                        api_doc.as_ref(),
                        op_doc.as_ref(),
                    ];
                    let p = pipeline(&chain);
                    if pipelines.is_empty() {
                        pipelines.push((None, Arc::new(Pipeline::default())));
                    }
                    pipelines.push((Some(j), Arc::new(p)));
                }
                operations.push(OperationRoute {
                    id: op.id.as_str().into(),
                    method: (op.method != "*").then(|| {
                        Method::from_bytes(op.method.as_bytes()).expect("validated method")
                    }),
                    template: UrlTemplate::parse(&op.url_template).expect("validated template"),
                    route: op.url_template.as_str().into(),
                    pipelines,
                });
            }
            // Most specific template first; a fixed method before "any method".
            operations.sort_by_cached_key(|op| (op.template.specificity(), op.method.is_none()));
            let key_header = match HeaderName::from_bytes(api.subscription_key.header.as_bytes()) {
                Ok(h) => h,
                Err(e) => {
                    report.push(format!("apis[{i}].subscription_key.header"), e.to_string());
                    continue;
                }
            };
            let preflight = pipeline(&[global.as_ref(), None, api_doc.as_ref(), None]);
            apis.push(ApiRoute {
                preflight: preflight
                    .inbound
                    .iter()
                    .any(|step| &*step.name == "cors")
                    .then(|| Arc::new(preflight)),
                id: api.id.as_str().into(),
                prefix: prefix.into(),
                backend,
                subscription_required: api.subscription_required,
                key_header,
                key_query: api.subscription_key.query.as_str().into(),
                operations,
            });
        }

        let product_index: HashMap<&str, usize> = config
            .products
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();
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
            let product = match &s.scope {
                SubscriptionScope::Product { id } => product_index
                    .get(id.as_str())
                    .map(|&i| (i, Arc::<str>::from(id.as_str()))),
                _ => None,
            };
            subscriptions.push(SubscriptionEntry {
                id: s.id.as_str().into(),
                apis,
                suspended: s.state == SubscriptionState::Suspended,
                product,
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
            backends,
            raw: bytes::Bytes::copy_from_slice(raw),
            signature: None,
        })
    }
}

/// One compiled step of a section.
#[derive(Clone)]
enum Step {
    /// Splice the parent scope's same section here.
    Base,
    /// Run this policy.
    Policy(Arc<PolicyInstance>),
}

/// The four sections of one scope's document.
type Sections = [Vec<Step>; 4];

fn compile_doc(
    doc: Option<&outpost_config::PolicyDocument>,
    at: &str,
    plugins: &PluginHost,
    report: &mut Report,
) -> Option<Sections> {
    let doc = doc?;
    let mut out: Sections = Default::default();
    for (slot, (name, steps)) in [
        ("inbound", &doc.inbound),
        ("backend", &doc.backend),
        ("outbound", &doc.outbound),
        ("on_error", &doc.on_error),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(steps) = steps else {
            // Left out: inherit the parent's section.
            out[slot].push(Step::Base);
            continue;
        };
        for (i, step) in steps.iter().enumerate() {
            if step.policy == "base" {
                out[slot].push(Step::Base);
                continue;
            }
            match plugins.policy(&step.policy, &step.config) {
                Ok(p) => out[slot].push(Step::Policy(Arc::new(p))),
                Err(e) => report.push(format!("{at}.{name}[{i}]"), e),
            }
        }
    }
    Some(out)
}

/// Resolves `base` through the chain of scopes (outermost first): a scope without a document
/// inherits its parent's section whole; a document's section replaces the parent's unless it
/// contains a `base` step, which splices the parent's in place.
fn pipeline(chain: &[Option<&Sections>]) -> Pipeline {
    fn expand(chain: &[Option<&Sections>], slot: usize, out: &mut Vec<Arc<PolicyInstance>>) {
        let Some((last, parents)) = chain.split_last() else {
            return;
        };
        match last {
            None => expand(parents, slot, out),
            Some(sections) => {
                for step in &sections[slot] {
                    match step {
                        Step::Base => expand(parents, slot, out),
                        Step::Policy(p) => out.push(p.clone()),
                    }
                }
            }
        }
    }
    let section = |slot| {
        let mut v = Vec::new();
        expand(chain, slot, &mut v);
        v
    };
    Pipeline {
        inbound: section(0),
        backend: section(1),
        outbound: section(2),
        on_error: section(3),
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
