//! Every policy library's README documents each of its policies with a JSON example; each
//! example is loaded into a configuration and validated by `outpost check` with the real
//! plugin, and every policy a library exports has at least one example.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use outpost_tests::gateway::{plugin_library, run_cli};
use serde_json::{json, Value};

/// The policy libraries in `plugins/`: crate directory and library file stem.
const LIBRARIES: [(&str, &str); 5] = [
    ("policy-access", "outpost_policy_access"),
    ("policy-limits", "outpost_policy_limits"),
    ("policy-transform", "outpost_policy_transform"),
    ("policy-caching", "outpost_policy_caching"),
    ("policy-telemetry", "outpost_policy_telemetry"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```json blocks of a Markdown file.
fn json_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == "```json" => current = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    blocks
}

fn manifest() -> String {
    let mut m = String::from("[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n");
    for (_, lib) in LIBRARIES {
        m.push_str(&format!(
            "[[plugins]]\nname = \"{lib}\"\npath = \"{}\"\n\n",
            plugin_library(lib).display()
        ));
    }
    m.push_str(&format!(
        "[[plugins]]\nname = \"memory\"\npath = \"{}\"\n\n[[caches]]\nname = \"local\"\nprovider = \"cache-memory\"\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
        plugin_library("outpost_cache_memory").display()
    ));
    m
}

/// The policy names `outpost plugins` lists for one library.
fn exported(listing: &str, lib: &str) -> BTreeSet<String> {
    let line = listing
        .lines()
        .find(|l| l.starts_with(&format!("{lib}:")))
        .unwrap_or_else(|| panic!("{lib} not listed:\n{listing}"));
    let names = line
        .split("policies: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no policies in: {line}"));
    let names = names.split(" [").next().unwrap_or(names);
    names
        .split(", ")
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

#[test]
fn every_policy_example_in_the_readmes_validates() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(&m, manifest()).unwrap();
    std::fs::write(dir.path().join("api.json"), r#"{"version":"v","apis":[]}"#).unwrap();
    let (ok, listing, err) = run_cli(&["plugins", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "{err}");

    for (krate, lib) in LIBRARIES {
        let readme = repo().join("plugins").join(krate).join("README.md");
        let text = std::fs::read_to_string(&readme)
            .unwrap_or_else(|e| panic!("{}: {e}", readme.display()));
        let mut documented = BTreeSet::new();
        let mut steps = Vec::new();
        for (i, block) in json_blocks(&text).iter().enumerate() {
            let step: Value = serde_json::from_str(block)
                .unwrap_or_else(|e| panic!("{krate} README block {i}: {e}\n{block}"));
            let name = step["policy"]
                .as_str()
                .unwrap_or_else(|| panic!("{krate} README block {i} has no policy: {step}"));
            documented.insert(name.to_owned());
            steps.push(step);
        }
        let wanted = exported(&listing, lib);
        let missing: Vec<_> = wanted.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "{krate}: no README example for {missing:?}"
        );
        let unknown: Vec<_> = documented.difference(&wanted).collect();
        assert!(
            unknown.is_empty(),
            "{krate}: README examples of unknown policies {unknown:?}"
        );

        // Each example on its own operation, so a failure names it.
        let operations: Vec<Value> = steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                json!({ "id": format!("op{i}"), "method": "GET", "url_template": format!("/op{i}/{{id}}"),
                        "policies": { "inbound": [step] } })
            })
            .collect();
        let api = json!({
            "version": "docs",
            "backends": [{ "id": "b", "urls": ["http://127.0.0.1:9"] }, { "id": "other", "urls": ["http://127.0.0.1:9"] }],
            "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                       "operations": operations }],
        });
        std::fs::write(dir.path().join("api.json"), api.to_string()).unwrap();
        let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
        assert!(ok, "{krate} README examples do not validate:\n{out}\n{err}");
    }
}

#[test]
fn a_bad_policy_config_is_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(&m, manifest()).unwrap();
    let api = json!({
        "version": "bad",
        "backends": [{ "id": "b", "urls": ["http://127.0.0.1:9"] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": [{ "id": "op", "method": "GET", "url_template": "/x",
                     "policies": { "inbound": [
                         { "policy": "rate-limit-by-key", "config": { "calls": 0, "renewal_period": 60, "counter_key": "{client.ip}" } },
                         { "policy": "ip-filter", "config": { "action": "allow", "addresses": ["not-an-ip"] } },
                         { "policy": "set-header", "config": { "name": "bad name", "value": "x" } },
                         { "policy": "cache-lookup", "config": { "duration": "soon" } }
                     ] } }] }],
    });
    std::fs::write(dir.path().join("api.json"), api.to_string()).unwrap();
    let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok, "{out}");
    // Every one of the four steps is reported, by position.
    for i in 0..4 {
        let at = format!("apis[0].operations[0].policies.inbound[{i}]");
        assert!(err.contains(&at), "{at} not reported:\n{err}");
    }
    assert!(err.contains("not-an-ip"), "{err}");
    assert!(err.contains("not a valid header name"), "{err}");
}
