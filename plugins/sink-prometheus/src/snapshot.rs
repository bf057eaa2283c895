//! The gateway's metric snapshots (its own `outpost_*` metrics and those plugins define, such
//! as `emit-metric`'s), turned into families as they arrive and rendered as they are.

use std::collections::HashMap;

use outpost_plugin_sdk::api::metric;
use outpost_plugin_sdk::MetricSample;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::guard::{SeriesGuard, OTHER};
use crate::requests;

/// Series of a re-exported metric folded or dropped in the latest snapshot.
pub const FOLDED_SERIES: &str = "outpost_prometheus_folded_series";

/// Whether a re-exported metric would clash with a family this sink renders itself.
pub fn reserved(name: &str) -> bool {
    name.starts_with("outpost_http_")
        || name.starts_with("outpost_prometheus_")
        || requests::NAMES.contains(&name)
}

/// One metric of a snapshot, while it is assembled.
struct Family {
    name: String,
    help: String,
    kind: u8,
    label_names: Vec<String>,
    series: Vec<(Vec<String>, f64)>,
    other: Option<f64>,
    folded: u64,
}

/// Turns snapshots into families, remembering which label sets each metric admitted.
pub struct Snapshots {
    max_series: usize,
    guards: HashMap<String, SeriesGuard>,
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn sample(kind: u8, label_names: &[String], values: &[&str], value: f64) -> Metric {
    let mut m = Metric::default();
    let mut labels: Vec<LabelPair> = label_names
        .iter()
        .zip(values)
        .map(|(n, v)| label(n, v))
        .collect();
    // The encoder writes labels in the order given; keep them sorted as the registry does.
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    m.set_label(labels);
    if kind == metric::GAUGE {
        let mut g = Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    } else {
        let mut c = Counter::default();
        c.set_value(value);
        m.set_counter(c);
    }
    m
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_owned());
    mf.set_help(help.to_owned());
    mf.set_field_type(kind);
    mf.set_metric(metrics);
    mf
}

impl Snapshots {
    /// Guards of `max_series` label sets per metric.
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series,
            guards: HashMap::new(),
        }
    }

    /// The families of one snapshot, in the order metrics first appear in it, then
    /// [`FOLDED_SERIES`] when the guard folded anything. Counters past the guard are summed
    /// into one `(other)` series (a sum of counters is still a counter); gauges past it are
    /// left out.
    pub fn build(&mut self, batch: &[MetricSample<'_>]) -> Vec<MetricFamily> {
        let mut order: Vec<Family> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for s in batch {
            let name = s.name.as_str();
            if reserved(name) || (s.kind != metric::COUNTER && s.kind != metric::GAUGE) {
                continue;
            }
            let i = *index.entry(name).or_insert_with(|| {
                order.push(Family {
                    name: name.to_owned(),
                    help: s.help.to_string(),
                    kind: s.kind,
                    label_names: s.labels.iter().map(|t| t.0.to_string()).collect(),
                    series: Vec::new(),
                    other: None,
                    folded: 0,
                });
                order.len() - 1
            });
            let f = &mut order[i];
            // A metric is defined once with one kind and one set of label names; a sample
            // that disagrees cannot be rendered in the same family.
            if s.kind != f.kind
                || s.labels.len() != f.label_names.len()
                || s.labels
                    .iter()
                    .zip(&f.label_names)
                    .any(|(t, n)| t.0.as_str() != n)
            {
                continue;
            }
            let values: Vec<&str> = s.labels.iter().map(|t| t.1.as_str()).collect();
            let max = self.max_series;
            let guard = self
                .guards
                .entry(f.name.clone())
                .or_insert_with(|| SeriesGuard::new(max));
            if values.is_empty() || guard.admit(&values) {
                f.series
                    .push((values.iter().map(|v| (*v).to_owned()).collect(), s.value));
            } else {
                f.folded += 1;
                if f.kind == metric::COUNTER {
                    *f.other.get_or_insert(0.0) += s.value;
                }
            }
        }

        let mut folded = Vec::new();
        let mut families = Vec::with_capacity(order.len() + 1);
        for f in order {
            if f.folded > 0 {
                let names = ["metric".to_owned()];
                folded.push(sample(metric::GAUGE, &names, &[&f.name], f.folded as f64));
            }
            let mut metrics: Vec<Metric> = f
                .series
                .iter()
                .map(|(values, v)| {
                    let values: Vec<&str> = values.iter().map(String::as_str).collect();
                    sample(f.kind, &f.label_names, &values, *v)
                })
                .collect();
            if let Some(v) = f.other {
                let values = vec![OTHER; f.label_names.len()];
                metrics.push(sample(f.kind, &f.label_names, &values, v));
            }
            if metrics.is_empty() {
                continue;
            }
            let kind = if f.kind == metric::GAUGE {
                MetricType::GAUGE
            } else {
                MetricType::COUNTER
            };
            families.push(family(&f.name, &f.help, kind, metrics));
        }
        if !folded.is_empty() {
            families.push(family(
                FOLDED_SERIES,
                "Series of a re-exported metric that were past max_series in the latest snapshot (counters summed into (other), gauges left out).",
                MetricType::GAUGE,
                folded,
            ));
        }
        families
    }
}
