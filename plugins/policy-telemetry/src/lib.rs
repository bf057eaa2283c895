//! Telemetry policies, as APIM names them: `emit-metric` adds to a custom counter, with
//! dimensions taken from the request, that every telemetry sink receives with the gateway's
//! own metrics (README.md describes every field).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use outpost_plugin_sdk::host::{self, MAX_LABELS};
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json::Value;
use outpost_plugin_sdk::template::Template;
use outpost_plugin_sdk::{export_plugin, level, Context, Flow, Head, Metric, Policy};

/// The label value standing for every label set past `max_series`.
pub const OTHER: &str = "(other)";

/// The counter of values folded into [`OTHER`], by metric.
pub const FOLDED_METRIC: &str = "emit_metric_folded_total";

/// Default for [`Config::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 1000;

fn default_max_series() -> usize {
    DEFAULT_MAX_SERIES
}

/// `emit-metric` configuration.
#[derive(Debug, Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// Metric name (Prometheus rules); `_total` is appended when it does not end so.
    pub name: String,
    /// A prefix for the name (`{namespace}_{name}`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// What to add: a number, or a template that renders one. Default 1.
    #[serde(default)]
    pub value: Option<Value>,
    /// Dimensions (labels), at most 8.
    #[serde(default)]
    pub dimensions: Vec<DimensionConfig>,
    /// Most label sets the metric keeps; values of later ones are added to `(other)`.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

/// One dimension.
#[derive(Debug, Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct DimensionConfig {
    /// Dimension name; the label is its lower-case form with `_` for other characters
    /// (`API ID` → `api_id`).
    pub name: String,
    /// A template; may be left out for APIM's default dimensions (`API ID`, …).
    #[serde(default)]
    pub value: Option<String>,
}

/// What one request adds.
#[derive(Debug)]
enum Amount {
    Constant(f64),
    Template(Template),
}

/// The label sets of one metric, shared by every step that emits it.
#[derive(Debug, Default)]
struct Series(RwLock<HashSet<Box<[String]>>>);

impl Series {
    /// The set for a metric name (one per process, as the gateway's metric is).
    fn of(name: &str) -> Arc<Series> {
        static ALL: OnceLock<Mutex<HashMap<String, Arc<Series>>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.entry(name.to_owned()).or_default().clone()
    }

    /// Whether these values have (or may now have) a series of their own.
    fn admit(&self, values: &[String], max: usize) -> bool {
        if self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(values)
        {
            return true;
        }
        let mut set = self.0.write().unwrap_or_else(|e| e.into_inner());
        if set.contains(values) {
            return true;
        }
        if set.len() >= max {
            return false;
        }
        set.insert(values.into());
        true
    }
}

/// `emit-metric`: adds a value to a counter per request, labelled with its dimensions.
#[derive(Debug)]
pub struct EmitMetric {
    name: String,
    metric: Metric,
    folded: Metric,
    amount: Amount,
    labels: Vec<String>,
    values: Vec<Template>,
    series: Arc<Series>,
    max_series: usize,
}

/// Whether `s` is a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The label a dimension name becomes: lower case, every run of other characters one `_`.
pub fn label_name(dimension: &str) -> Result<String, String> {
    let mut out = String::with_capacity(dimension.len());
    for c in dimension.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_end_matches('_');
    match out.chars().next() {
        None => Err(format!("'{dimension}' makes no label name")),
        Some(c) if c.is_ascii_digit() => Err(format!(
            "'{dimension}' makes label '{out}', which starts with a digit"
        )),
        _ => Ok(out.to_owned()),
    }
}

/// The template of an APIM default dimension, for a dimension given without a value.
fn default_value(dimension: &str) -> Result<String, String> {
    let t = match dimension.trim().to_ascii_lowercase().as_str() {
        "api id" => "{api.id}".to_owned(),
        "operation id" => "{operation.id}".to_owned(),
        "product id" => "{product.id}".to_owned(),
        "subscription id" => "{subscription.id}".to_owned(),
        "client ip" => "{client.ip}".to_owned(),
        "gateway id" => host::gateway_id().replace('{', "{{").replace('}', "}}"),
        _ => {
            return Err(format!(
                "'{dimension}' needs a value (defaults exist for API ID, Operation ID, Product ID, \
                 Subscription ID, Client IP and Gateway ID)"
            ))
        }
    };
    Ok(t)
}

fn amount(value: Option<&Value>) -> Result<Amount, String> {
    let bad = |v: &dyn std::fmt::Display| {
        format!("value: {v} is not a number of at least 0 or a template that renders one")
    };
    match value {
        None => Ok(Amount::Constant(1.0)),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() && v >= 0.0 => Ok(Amount::Constant(v)),
            _ => Err(bad(n)),
        },
        Some(Value::String(s)) => {
            let t = Template::parse(s).map_err(|e| format!("value: {e}"))?;
            if !t.is_constant() {
                return Ok(Amount::Template(t));
            }
            // A constant template is the text it renders: `"2"` or `"{{"`.
            let text = s.replace("{{", "{").replace("}}", "}");
            match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(Amount::Constant(v)),
                _ => Err(bad(&format!("'{s}'"))),
            }
        }
        Some(other) => Err(bad(other)),
    }
}

impl EmitMetric {
    /// The metric's full name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The label names, in order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// What this request adds: fills `values` with the dimension values (in label order) and
    /// answers the amount, or `None` when the value template did not render a number of at
    /// least 0 (the request then adds nothing).
    pub fn measure(
        &self,
        head: &Head<'_, '_>,
        ctx: &Context<'_, '_>,
        values: &mut Vec<String>,
    ) -> Option<f64> {
        values.resize_with(self.values.len(), String::new);
        for (t, out) in self.values.iter().zip(values.iter_mut()) {
            out.clear();
            t.render(head, ctx, out);
        }
        match &self.amount {
            Amount::Constant(v) => Some(*v),
            Amount::Template(t) => {
                let mut text = String::new();
                t.render(head, ctx, &mut text);
                match text.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() && v >= 0.0 => Some(v),
                    _ => {
                        if host::log_enabled(level::DEBUG) {
                            host::log(
                                level::DEBUG,
                                &format!(
                                    "emit-metric {}: value '{}' rendered '{text}', not a number of at least 0; nothing added.",
                                    self.name,
                                    t.source()
                                ),
                            );
                        }
                        None
                    }
                }
            }
        }
    }

    /// The label values to add under: the measured ones, or all [`OTHER`] once the metric
    /// has `max_series` other label sets.
    pub fn admit(&self, values: &[String]) -> bool {
        values.is_empty() || self.series.admit(values, self.max_series)
    }

    fn emit(&self, head: &Head<'_, '_>, ctx: &Context<'_, '_>) -> Flow {
        thread_local! {
            static VALUES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
        }
        VALUES.with_borrow_mut(|values| {
            let Some(amount) = self.measure(head, ctx, values) else {
                return;
            };
            let mut refs = [OTHER; MAX_LABELS];
            let n = values.len();
            if self.admit(values) {
                for (r, value) in refs.iter_mut().zip(values.iter()) {
                    *r = value.as_str();
                }
            } else {
                self.folded.inc(&[&self.name]);
            }
            self.metric.add(&refs[..n], amount);
        });
        Flow::CONTINUE
    }
}

impl Policy for EmitMetric {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut name = match &c.namespace {
            Some(ns) => {
                if !is_metric_name(ns) {
                    problems.push(format!(
                        "namespace: '{ns}' is not a valid metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)"
                    ));
                }
                format!("{ns}_{}", c.name)
            }
            None => c.name.clone(),
        };
        if !is_metric_name(&c.name) {
            problems.push(format!(
                "name: '{}' is not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
                c.name
            ));
        }
        if !name.ends_with("_total") {
            name.push_str("_total");
        }
        if name.starts_with("outpost_") {
            problems.push(format!(
                "name: '{name}' starts with outpost_, which is reserved for the gateway's own metrics"
            ));
        }
        let amount = amount(c.value.as_ref()).map_err(|e| problems.push(e)).ok();
        if c.dimensions.len() > MAX_LABELS {
            problems.push(format!(
                "dimensions: {} given, at most {MAX_LABELS} are allowed",
                c.dimensions.len()
            ));
        }
        if c.max_series == 0 {
            problems.push("max_series: must be at least 1".into());
        }
        let mut labels: Vec<String> = Vec::new();
        let mut values = Vec::new();
        for (i, d) in c.dimensions.iter().enumerate() {
            match label_name(&d.name) {
                Ok(l) => match labels.iter().position(|x| *x == l) {
                    Some(j) => problems.push(format!(
                        "dimensions[{i}].name: '{}' makes label '{l}', as dimensions[{j}] does",
                        d.name
                    )),
                    None => labels.push(l),
                },
                Err(e) => problems.push(format!("dimensions[{i}].name: {e}")),
            }
            let source = match &d.value {
                Some(v) => Ok(v.clone()),
                None => default_value(&d.name),
            };
            match source.and_then(|s| Template::parse(&s)) {
                Ok(t) => values.push(t),
                Err(e) => problems.push(format!("dimensions[{i}].value: {e}")),
            }
        }
        let Some(amount) = amount.filter(|_| problems.is_empty()) else {
            return Err(problems.join("; "));
        };

        let label_refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let metric = Metric::counter(&name, "Counted by the emit-metric policy.", &label_refs);
        // Without a gateway (unit tests) every metric is inert; with one, a refusal means
        // the name is taken with another kind or other labels, for the life of the process.
        if !metric.is_defined() && !host::gateway_id().is_empty() {
            return Err(format!(
                "name: the gateway refused metric '{name}' with labels [{}]: another definition \
                 of that name has other labels (metric definitions last until the gateway restarts)",
                labels.join(", ")
            ));
        }
        let folded = Metric::counter(
            FOLDED_METRIC,
            "Values emit-metric added under (other) because the metric had reached max_series label sets.",
            &["metric"],
        );
        Ok(EmitMetric {
            series: Series::of(&name),
            name,
            metric,
            folded,
            amount,
            labels,
            values,
            max_series: c.max_series,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.emit(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.emit(resp, ctx)
    }
}

export_plugin! {
    name: "policy-telemetry",
    version: env!("CARGO_PKG_VERSION"),
    policies: ["emit-metric" => EmitMetric],
}

#[cfg(test)]
mod tests;
