//! Configuration hot reload, health endpoints, graceful shutdown and `outpost check`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_tests::gateway::{run_cli, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{client, open_api};

fn versioned(backend: &str, version: usize) -> Value {
    let mut apis = vec![json!({
        "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
        "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
    })];
    apis.push(json!({
        "id": format!("extra-{version}"), "path": format!("/extra-{version}"), "backend": "b",
        "subscription_required": false,
        "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
    }));
    json!({ "version": format!("v{version}"), "backends": [{ "id": "b", "urls": [backend] }], "apis": apis })
}

async fn ready_version(c: &reqwest::Client, gw: &Gateway) -> (u16, Value) {
    let r = c.get(gw.url("/readyz")).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

async fn wait_version(c: &reqwest::Client, gw: &Gateway, v: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = ready_version(c, gw).await;
        if body["configVersion"] == v {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "version {v} never applied: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn config_edited_repeatedly_under_load_drops_nothing_and_bad_edits_keep_the_old_one() {
    let backend = Backend::start().await;
    let url = backend.url(false);
    let gw = Gateway::start(GatewaySpec::http(versioned(&url, 0)));
    let c = client();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, stop, ok, target) = (c.clone(), stop.clone(), ok.clone(), gw.url("/svc/echo"));
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&target).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }

    for v in 1..=10 {
        gw.write_api(&versioned(&url, v));
        wait_version(&c, &gw, &format!("v{v}")).await;
        let r = c
            .get(gw.url(&format!("/extra-{v}/echo")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "new API routes after reload {v}");
        let r = c
            .get(gw.url(&format!("/extra-{}/echo", v - 1)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "removed API is gone after reload {v}");
    }

    // An invalid document (two problems) is rejected whole; v10 keeps serving.
    let mut bad = versioned(&url, 11);
    bad["apis"][0]["backend"] = json!("missing-backend");
    bad["apis"][1]["operations"][0]["url_template"] = json!("no-slash");
    gw.write_api(&bad);
    let rejected = gw.wait_for_log(
        "Rejected the changed configuration; the previous one keeps serving.",
        1,
    );
    let report = rejected[0]["report"].as_str().unwrap();
    assert!(report.contains("missing-backend"), "{report}");
    assert!(report.contains("url_template"), "{report}");
    assert_eq!(rejected[0]["problems"], 2);
    // Syntax errors too.
    gw.write_api_raw(b"{ \"apis\": [ ");
    gw.wait_for_log(
        "Rejected the changed configuration; the previous one keeps serving.",
        2,
    );
    let (status, body) = ready_version(&c, &gw).await;
    assert_eq!(status, 200);
    assert_eq!(body["configVersion"], "v10");

    stop.store(true, Ordering::Relaxed);
    for t in load {
        let failures = t.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during reloads: {failures:?}"
        );
    }
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "load ran: {}",
        ok.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn sighup_reloads_when_watching_is_off() {
    let backend = Backend::start().await;
    let url = backend.url(false);
    let mut spec = GatewaySpec::http(versioned(&url, 1));
    spec.watch_ms = 0;
    let gw = Gateway::start(spec);
    let c = client();
    wait_version(&c, &gw, "v1").await;
    gw.write_api(&versioned(&url, 2));
    gw.signal("HUP");
    wait_version(&c, &gw, "v2").await;
}

#[tokio::test]
async fn health_endpoints() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let c = client();
    for path in ["/status-0123456789abcdef", "/readyz"] {
        let r = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ready");
        assert_eq!(v["configVersion"], "v1");
        assert_eq!(v["configSource"], "file");
    }
    let r = c.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let backend = Backend::start().await;
    let mut gw = Gateway::start(GatewaySpec {
        manifest: format!(
            "{LISTENER_HTTP}\n[shutdown]\ndelay_ms = 600\ndrain_timeout_ms = 10000\n"
        ),
        api: open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/svc/slow/1500"));
        async move { c.get(url).send().await }
    });
    while backend.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.signal("TERM");
    // During the delay readiness fails while requests are still taken.
    gw.wait_for_log("Draining.", 1);
    let (status, body) = ready_version(&c, &gw).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "draining");

    // Once the delay is over the listening socket is closed: new connections are refused
    // while the in-flight request is still running.
    gw.wait_for_log("Stopped accepting.", 1);
    assert!(backend.requests() == 1 && !slow.is_finished());
    assert!(
        tokio::net::TcpStream::connect(gw.addr("http"))
            .await
            .is_err(),
        "new connections are refused while draining"
    );

    let resp = slow.await.unwrap().expect("in-flight request completed");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");
    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    gw.wait_for_log("All connections finished.", 1);
}

#[test]
fn check_reports_every_problem_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("outpost.toml");
    std::fs::write(
        &manifest,
        r#"
[runtime]
worker_threads = 0

[log]
colour = "blue"

[[listeners]]
name = "web"
address = "not-an-address"

[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "missing.crt"
key = "missing.key"

[config]
type = "file"
path = "api.json"
"#,
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", manifest.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("outpost.toml"), "{err}");
    for key in [
        "runtime.worker_threads",
        "log.colour",
        "listeners[0].address",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }

    // A valid manifest whose files are wrong: TLS and API configuration reported together.
    std::fs::write(
        &manifest,
        r#"
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[[listeners.tls.certificates]]
hostnames = ["a.test"]
cert = "missing.crt"
key = "missing.key"

[config]
type = "file"
path = "api.json"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("api.json"),
        r#"{ "apis": [ { "id": "x", "path": "/x", "backend": "nowhere", "operations": [] } ] }"#,
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", manifest.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("missing.crt"), "{err}");
    assert!(err.contains("apis[0].backend"), "{err}");

    // And `run` refuses to start on the same files, saying why.
    let (ok, out, err) = run_cli(&["run", "--manifest", manifest.to_str().unwrap()]);
    assert!(!ok);
    assert!(format!("{out}{err}").contains("missing.crt"), "{out}{err}");

    let (ok, out, _) = run_cli(&["--version"]);
    assert!(ok);
    assert!(out.starts_with("outpost "), "{out}");
}

#[test]
fn the_quickstart_manifest_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("examples/docker/outpost.toml");
    let (ok, out, err) = run_cli(&["check", "--manifest", path.to_str().unwrap()]);
    assert!(ok, "docker: {out}{err}");

    // The quickstart loads its store plugin from the release build (scripts/quickstart.sh
    // builds it) and backs up under target/: checked here against this test build's plugins
    // and a temporary backup directory, everything else as shipped.
    let text = std::fs::read_to_string(root.join("examples/quickstart/outpost.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plugins = outpost_tests::gateway::plugin_library("outpost_store_fs")
        .parent()
        .unwrap()
        .to_owned();
    let backup = dir.path().join("backup");
    let patched = text
        .replace(
            "plugin_dir = \"../../target/release\"",
            &format!("plugin_dir = \"{}\"", plugins.display()),
        )
        .replace(
            "dir = \"target/quickstart-backup\"",
            &format!("dir = \"{}\"", backup.display()),
        );
    assert_eq!(
        patched.matches(&*plugins.display().to_string()).count(),
        1,
        "{text}"
    );
    assert_eq!(
        patched.matches(&*backup.display().to_string()).count(),
        1,
        "{text}"
    );
    std::fs::write(dir.path().join("outpost.toml"), patched).unwrap();
    std::fs::copy(
        root.join("examples/quickstart/api.json"),
        dir.path().join("api.json"),
    )
    .unwrap();
    let m = dir.path().join("outpost.toml");
    let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "quickstart: {out}{err}");
    assert!(backup.is_dir(), "the fs store was created");
}

#[test]
fn the_example_site_manifests_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sites = root.join("examples/sites");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&sites).expect("examples/sites") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(report) = outpost_config::Manifest::load(&path) {
                panic!("{}: {report}", path.display());
            }
            seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "cluster-redis.toml",
            "edge-sqlite.toml",
            "standalone-fs.toml"
        ]
    );
    let control = std::fs::read_to_string(root.join("examples/control/control.toml")).unwrap();
    toml::from_str::<outpost_control::Settings>(&control).expect("a valid control manifest");
}
