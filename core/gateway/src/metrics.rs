//! The process's metric registry: the gateway's own metrics and those plugins define through
//! host services, bumped by id. Telemetry sinks receive snapshots of every series.
//!
//! Bumping a metric without labels is one atomic operation on a lock-free snapshot of the
//! definitions; a labelled series takes its metric's lock (labelled metrics are for events
//! such as panics, cache failures and custom policy metrics, not for every request).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use arc_swap::ArcSwap;
use outpost_plugin_api::metric;

/// The most labels a metric may have (as the SDK's `MAX_LABELS`).
pub const MAX_LABELS: usize = 8;

/// One defined metric.
#[derive(Debug)]
pub struct Def {
    /// Name.
    pub name: String,
    /// Help text.
    pub help: String,
    /// [`metric`] kind.
    pub kind: u8,
    /// Label names.
    pub labels: Vec<String>,
    plain: AtomicU64,
    /// Series by the hash of their label values (collisions share a bucket).
    series: Mutex<HashMap<u64, Vec<Series>>>,
}

/// One series: its label values and value.
type Series = (Box<[String]>, f64);

/// The hash of a series' label values: found without allocating a key.
fn label_hash<'a>(values: impl Iterator<Item = &'a str>) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// Sets gauges whose value is computed when a snapshot is taken.
type Observer = Box<dyn Fn(&Registry) + Send + Sync>;

/// Every metric of the process.
#[derive(Default)]
pub struct Registry {
    defs: ArcSwap<Vec<Arc<Def>>>,
    define: Mutex<()>,
    observer: Mutex<Option<Observer>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("defs", &self.defs.load().len())
            .finish_non_exhaustive()
    }
}

/// One series' current value, owned (for snapshots).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric.
    pub def: Arc<Def>,
    /// Label values, in the definition's order.
    pub label_values: Box<[String]>,
    /// Value.
    pub value: f64,
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);
    &REGISTRY
}

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

impl PartialEq for Def {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Registry {
    /// Defines a metric and answers its id (from 1). The same definition again answers the
    /// same id; an invalid name or label, an unknown kind, or a clash with an existing
    /// definition of another shape answers an error.
    pub fn define(&self, name: &str, help: &str, kind: u8, labels: &[&str]) -> Result<u32, String> {
        if !valid_name(name, true) {
            return Err(format!("'{name}' is not a valid metric name"));
        }
        if kind != metric::COUNTER && kind != metric::GAUGE {
            return Err(format!("metric '{name}': unknown kind {kind}"));
        }
        if labels.len() > MAX_LABELS {
            return Err(format!("metric '{name}': more than {MAX_LABELS} labels"));
        }
        if let Some(l) = labels
            .iter()
            .find(|l| !valid_name(l, false) || l.starts_with("__"))
        {
            return Err(format!("metric '{name}': '{l}' is not a valid label name"));
        }
        let _guard = self.define.lock().unwrap_or_else(|e| e.into_inner());
        let defs = self.defs.load();
        if let Some(i) = defs.iter().position(|d| d.name == name) {
            let d = &defs[i];
            return if d.kind == kind
                && d.labels
                    .iter()
                    .map(String::as_str)
                    .eq(labels.iter().copied())
            {
                Ok(i as u32 + 1)
            } else {
                Err(format!(
                    "metric '{name}' is already defined with another kind or labels"
                ))
            };
        }
        let mut next: Vec<Arc<Def>> = defs.iter().cloned().collect();
        next.push(Arc::new(Def {
            name: name.into(),
            help: help.into(),
            kind,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            plain: AtomicU64::new(0f64.to_bits()),
            series: Mutex::new(HashMap::new()),
        }));
        let id = next.len() as u32;
        self.defs.store(Arc::new(next));
        Ok(id)
    }

    fn apply(&self, id: u32, label_values: &[&str], f: impl Fn(f64) -> f64) {
        let defs = self.defs.load();
        let Some(d) = id.checked_sub(1).and_then(|i| defs.get(i as usize)) else {
            return;
        };
        if d.labels.len() != label_values.len() {
            return;
        }
        if d.labels.is_empty() {
            let _ = d
                .plain
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    Some(f(f64::from_bits(bits)).to_bits())
                });
            return;
        }
        let hash = label_hash(label_values.iter().copied());
        let mut series = d.series.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = series.entry(hash).or_default();
        match bucket.iter_mut().find(|(k, _)| {
            k.iter()
                .map(String::as_str)
                .eq(label_values.iter().copied())
        }) {
            Some((_, v)) => *v = f(*v),
            None => {
                let key: Box<[String]> = label_values.iter().map(|v| (*v).to_owned()).collect();
                bucket.push((key, f(0.0)));
            }
        }
    }

    /// Adds to a series (ignored for unknown ids or a wrong number of label values; counters
    /// never go down).
    pub fn add(&self, id: u32, label_values: &[&str], value: f64) {
        if !value.is_finite() {
            return;
        }
        let counter = self
            .defs
            .load()
            .get(id.wrapping_sub(1) as usize)
            .is_some_and(|d| d.kind == metric::COUNTER);
        if counter && value < 0.0 {
            return;
        }
        self.apply(id, label_values, |v| v + value);
    }

    /// Sets a gauge's series.
    pub fn set(&self, id: u32, label_values: &[&str], value: f64) {
        let gauge = self
            .defs
            .load()
            .get(id.wrapping_sub(1) as usize)
            .is_some_and(|d| d.kind == metric::GAUGE);
        if gauge && value.is_finite() {
            self.apply(id, label_values, |_| value);
        }
    }

    /// Removes every series of a labelled metric (an info metric whose labels changed).
    pub fn clear(&self, id: u32) {
        if let Some(d) = self.defs.load().get(id.wrapping_sub(1) as usize) {
            d.series.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Sets the function that refreshes computed gauges before every snapshot (replacing
    /// the previous one).
    pub fn observe(&self, f: impl Fn(&Registry) + Send + Sync + 'static) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Every series' current value (metrics without labels always have one series).
    pub fn snapshot(&self) -> Vec<Sample> {
        if let Some(f) = self
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f(self);
        }
        let mut out = Vec::new();
        for d in self.defs.load().iter() {
            if d.labels.is_empty() {
                out.push(Sample {
                    def: d.clone(),
                    label_values: Box::new([]),
                    value: f64::from_bits(d.plain.load(Ordering::Relaxed)),
                });
            } else {
                let series = d.series.lock().unwrap_or_else(|e| e.into_inner());
                let mut rows: Vec<_> = series.values().flatten().collect();
                rows.sort_by(|a, b| a.0.cmp(&b.0));
                for (k, v) in rows {
                    out.push(Sample {
                        def: d.clone(),
                        label_values: k.clone(),
                        value: *v,
                    });
                }
            }
        }
        out
    }

    /// The current value of a series (tests and diagnostics).
    pub fn value(&self, name: &str, label_values: &[&str]) -> Option<f64> {
        self.snapshot()
            .into_iter()
            .find(|s| {
                s.def.name == name
                    && s.label_values
                        .iter()
                        .map(String::as_str)
                        .eq(label_values.iter().copied())
            })
            .map(|s| s.value)
    }
}

/// A gateway metric defined once, bumped by id.
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    /// Defines (or finds) a counter in the global registry.
    pub fn define(name: &str, help: &str, labels: &[&str]) -> Counter {
        Counter(
            global()
                .define(name, help, metric::COUNTER, labels)
                .expect("the gateway's own metric definitions are valid"),
        )
    }

    /// Adds one.
    pub fn inc(self, label_values: &[&str]) {
        global().add(self.0, label_values, 1.0);
    }

    /// Adds `n`.
    pub fn add(self, label_values: &[&str], n: f64) {
        global().add(self.0, label_values, n);
    }
}

/// The gateway's own metrics.
pub mod gateway {
    use super::Counter;
    use std::sync::LazyLock;

    /// Defines every gateway metric now (before plugins load, so no plugin can take a name).
    pub fn define_all() {
        let _ = (
            *PLUGIN_PANICS,
            *TELEMETRY_DROPPED,
            *TELEMETRY_EXPORT_ERRORS,
            *CACHE_ERRORS,
            *CONFIG_REJECTED,
            *CONFIG_SYNC_ERRORS,
            *CONFIG_FROM_BACKUP,
            *CONFIG_INFO,
            *CONFIG_AGE,
            *IN_FLIGHT,
        );
    }

    fn gauge(name: &str, help: &str, labels: &[&str]) -> u32 {
        super::global()
            .define(name, help, outpost_plugin_api::metric::GAUGE, labels)
            .expect("the gateway's own metric definitions are valid")
    }

    /// 1 for the configuration being served, labelled with its version and source.
    pub static CONFIG_INFO: LazyLock<u32> = LazyLock::new(|| {
        gauge(
            "outpost_config_info",
            "The configuration being served: always 1, labelled with its version and source (file, live, backup).",
            &["version", "source"],
        )
    });
    /// Age of the configuration being served.
    pub static CONFIG_AGE: LazyLock<u32> = LazyLock::new(|| {
        gauge(
            "outpost_config_age_seconds",
            "Seconds since the configuration being served was applied (for a backup, since it was saved).",
            &[],
        )
    });
    /// Requests being handled.
    pub static IN_FLIGHT: LazyLock<u32> = LazyLock::new(|| {
        gauge(
            "outpost_requests_in_flight",
            "Requests received whose response head has not been sent yet.",
            &[],
        )
    });

    /// Configurations refused (invalid, not building, not verifying), by source.
    pub static CONFIG_REJECTED: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_config_rejected_total",
            "Configurations refused (invalid, not building, or not verifying); the previous one kept serving.",
            &["source"],
        )
    });
    /// Failed exchanges with the management plane.
    pub static CONFIG_SYNC_ERRORS: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_config_sync_errors_total",
            "Failed attempts to fetch the configuration from the management plane.",
            &[],
        )
    });
    /// 1 while the configuration served came from the backup store.
    pub static CONFIG_FROM_BACKUP: LazyLock<u32> = LazyLock::new(|| {
        super::global()
            .define(
                "outpost_config_from_backup",
                "1 while the configuration being served came from the backup store, else 0.",
                outpost_plugin_api::metric::GAUGE,
                &[],
            )
            .expect("valid")
    });

    /// Policy panics, by plugin entry and policy.
    pub static PLUGIN_PANICS: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_plugin_panics_total",
            "Panics caught in plugin policies.",
            &["plugin", "policy"],
        )
    });
    /// Records a sink never got: its queue or a worker thread's slot had no room, or the
    /// gateway was stopping.
    pub static TELEMETRY_DROPPED: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_telemetry_dropped_total",
            "Telemetry records dropped: the sink's queue or a worker thread's slot was full, or the gateway was stopping.",
            &["sink"],
        )
    });
    /// Failed sink exports.
    pub static TELEMETRY_EXPORT_ERRORS: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_telemetry_export_errors_total",
            "Batches a telemetry sink failed to export.",
            &["sink"],
        )
    });
    /// Cache operations that failed or timed out.
    pub static CACHE_ERRORS: LazyLock<Counter> = LazyLock::new(|| {
        Counter::define(
            "outpost_cache_errors_total",
            "Cache operations that failed or timed out (the policy gets an error or timeout answer).",
            &["cache", "reason"],
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_gauges_are_refreshed_at_snapshot_and_info_series_replaced() {
        let r = Registry::default();
        let g = r.define("g", "G.", metric::GAUGE, &[]).expect("valid");
        let info = r
            .define("i", "I.", metric::GAUGE, &["version"])
            .expect("valid");
        let source = Arc::new(AtomicU64::new(7));
        let s = source.clone();
        r.observe(move |r| r.set(g, &[], s.load(Ordering::Relaxed) as f64));
        assert_eq!(r.value("g", &[]), Some(7.0));
        source.store(9, Ordering::Relaxed);
        assert_eq!(r.value("g", &[]), Some(9.0));

        r.set(info, &["v1"], 1.0);
        r.clear(info);
        r.set(info, &["v2"], 1.0);
        let series: Vec<_> = r
            .snapshot()
            .into_iter()
            .filter(|s| s.def.name == "i")
            .map(|s| s.label_values.to_vec())
            .collect();
        assert_eq!(series, vec![vec!["v2".to_string()]]);
    }

    #[test]
    fn definitions_are_checked_and_idempotent() {
        let r = Registry::default();
        let a = r
            .define("a_total", "A.", metric::COUNTER, &[])
            .expect("valid");
        assert_eq!(r.define("a_total", "A.", metric::COUNTER, &[]), Ok(a));
        assert!(r.define("a_total", "A.", metric::GAUGE, &[]).is_err());
        assert!(r.define("a_total", "A.", metric::COUNTER, &["x"]).is_err());
        assert!(r.define("1bad", "", metric::COUNTER, &[]).is_err());
        assert!(r.define("ok", "", metric::COUNTER, &["bad-label"]).is_err());
        assert!(r
            .define("ok", "", metric::COUNTER, &["__reserved"])
            .is_err());
        assert!(r.define("ok", "", 9, &[]).is_err());
    }

    #[test]
    fn series_add_up_and_counters_never_go_down() {
        let r = Registry::default();
        let c = r
            .define("c_total", "", metric::COUNTER, &["k"])
            .expect("valid");
        let g = r.define("g", "", metric::GAUGE, &[]).expect("valid");
        r.add(c, &["x"], 2.0);
        r.add(c, &["x"], 1.0);
        r.add(c, &["y"], 1.0);
        r.add(c, &["x"], -5.0);
        r.add(c, &[], 1.0); // wrong label count: ignored
        r.add(99, &[], 1.0); // unknown id: ignored
        r.set(g, &[], 7.5);
        r.set(c, &["x"], 100.0); // not a gauge: ignored
        assert_eq!(r.value("c_total", &["x"]), Some(3.0));
        assert_eq!(r.value("c_total", &["y"]), Some(1.0));
        assert_eq!(r.value("g", &[]), Some(7.5));
        assert_eq!(r.snapshot().len(), 3);
    }
}
