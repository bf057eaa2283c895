//! The management plane and gateways configured from it: admin changes reaching gateways
//! (poll and long-poll), signed snapshots, rejected snapshots, heartbeats, tokens (revoked,
//! expired, renewed), and failing static while the plane is away.

use std::time::{Duration, Instant};

use outpost_tests::gateway::LISTENER_HTTP;
use outpost_tests::{Backend, ControlPlane, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::client;

/// Puts the open API `svc` (any method, any path) at `path`, through the admin API.
async fn move_api(plane: &ControlPlane, path: &str) {
    let api = json!({
        "path": path, "backend": "b", "subscription_required": false,
        "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
    });
    let (s, v) = plane.admin("PUT", "/apis/svc", Some(api)).await;
    assert_eq!(s, 200, "{v}");
}

/// Backend, an open API at `/svc`, and gateway `gw1` serving it; answers a token.
async fn seed(plane: &ControlPlane, backend: &Backend) -> String {
    let (s, v) = plane
        .admin(
            "PUT",
            "/backends/b",
            Some(json!({ "urls": [backend.url(false)] })),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    move_api(plane, "/svc").await;
    let (s, v) = plane
        .admin("PUT", "/gateways/gw1", Some(json!({ "apis": ["svc"] })))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = plane.admin("POST", "/gateways/gw1/tokens", None).await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

fn gateway_manifest(
    plane: &ControlPlane,
    token_file: &std::path::Path,
    extra: &str,
    long_poll_s: u64,
) -> String {
    format!(
        "[gateway]\nid = \"gw1\"\n\n{LISTENER_HTTP}\n{extra}\n[config]\ntype = \"plane\"\nurl = \"{}\"\ntoken_file = \"{}\"\npublic_key = \"{}\"\npoll_interval_ms = 200\nlong_poll_s = {long_poll_s}\nheartbeat_interval_ms = 200\nstart_wait_ms = 2000\n",
        plane.url(),
        token_file.display(),
        plane.public_key
    )
}

fn spec(manifest: String) -> GatewaySpec {
    GatewaySpec {
        manifest,
        api: json!({}),
        files: Vec::new(),
        watch_ms: 100,
    }
}

async fn status(gw: &Gateway) -> Value {
    client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until the gateway serves `path` with `code`; answers how long it took.
async fn until_status(gw: &Gateway, path: &str, code: u16) -> Duration {
    let start = Instant::now();
    loop {
        let r = client().get(gw.url(path)).send().await.unwrap();
        if r.status().as_u16() == code {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{path} never answered {code}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_changes_reach_gateways_by_long_poll_and_heartbeats_report_them() {
    let backend = Backend::start().await;
    let plane = ControlPlane::start();
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    let gw = Gateway::start(spec(gateway_manifest(&plane, &token_file, "", 30)));
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status(&gw).await["configSource"], "live");

    // A change waits in no queue: the long-poll answers it at once.
    move_api(&plane, "/v2").await;
    let took = until_status(&gw, "/v2/echo", 200).await;
    assert!(took < Duration::from_secs(5), "long-poll took {took:?}");
    // The plane really holds an unchanged poll open until the wait ends, then answers 304.
    let (_, v) = plane.admin("GET", "/version", None).await;
    assert!(v["version"].as_u64().is_some());
    let r = client()
        .get(format!("{}/gateway/v1/config", plane.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let asked = Instant::now();
    let r = client()
        .get(format!("{}/gateway/v1/config?wait=2", plane.url()))
        .bearer_auth(&token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(
        asked.elapsed() >= Duration::from_millis(1900),
        "answered after {:?}",
        asked.elapsed()
    );
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Heartbeats: the applied version, the source, the instance.
    let (_, v) = plane.admin("GET", "/version", None).await;
    let version = v["version"].as_u64().unwrap().to_string();
    let gws = plane
        .wait_admin("/gateways", |g| {
            g[0]["heartbeat"]["config_version"] == version.as_str()
        })
        .await;
    assert_eq!(gws[0]["id"], "gw1");
    assert_eq!(gws[0]["heartbeat"]["config_source"], "live");
    assert!(gws[0]["heartbeat"]["instance_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(gws[0]["heartbeat"]["last_error"].is_null());
    // A second instance of the same gateway shows up as its own instance.
    let second = Gateway::start(spec(gateway_manifest(&plane, &token_file, "", 30)));
    assert_eq!(
        client()
            .get(second.url("/v2/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let gws = plane
        .wait_admin("/gateways", |g| {
            g[0]["instances"].as_array().is_some_and(|i| i.len() == 2)
        })
        .await;
    let ids: Vec<&str> = gws[0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_ne!(ids[0], ids[1]);

    // Bad admin input: 400 with the problems, and nothing written.
    let (s, v) = plane
        .admin(
            "PUT",
            "/apis/bad",
            Some(json!({ "path": "/x", "backend": "nope" })),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["problems"].to_string().contains("nope"), "{v}");
    let (_, after) = plane.admin("GET", "/version", None).await;
    assert_eq!(after["version"], v_version(&version));
    let (s, _) = plane.admin("GET", "/apis/bad", None).await;
    assert_eq!(s, 404);
    // A change valid as a whole but invalid in a gateway's share once named values are
    // substituted is refused too, naming the gateway.
    let (s, _) = plane
        .admin(
            "PUT",
            "/named-values/short",
            Some(json!({ "value": "x y" })),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = plane
        .admin(
            "PUT",
            "/subscriptions/templated",
            Some(json!({
                "scope": { "type": "all" }, "primary_key": "{{short}}-suffix"
            })),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["problems"].to_string().contains("gateway 'gw1'"), "{v}");
    let (s, _) = plane.admin("GET", "/subscriptions/templated", None).await;
    assert_eq!(s, 404, "nothing written");
    // Secrets are never listed in clear; keys are generated.
    plane
        .admin(
            "PUT",
            "/named-values/pw",
            Some(json!({ "value": "hunter2", "secret": true })),
        )
        .await;
    let (_, nv) = plane.admin("GET", "/named-values", None).await;
    assert_eq!(nv[0]["value"], "***");
    let (s, sub) = plane
        .admin(
            "PUT",
            "/subscriptions/s1",
            Some(json!({ "scope": { "type": "all" } })),
        )
        .await;
    assert_eq!(s, 200, "{sub}");
    let (_, sub) = plane.admin("GET", "/subscriptions/s1", None).await;
    assert_eq!(sub["primary_key"].as_str().map(str::len), Some(32));
    let (s, api) = plane.admin("GET", "/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(api["paths"]["/gateway/v1/config"].is_object());
    // Without the admin token: 401.
    let r = client()
        .get(format!("{}/admin/v1/apis", plane.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

fn v_version(s: &str) -> Value {
    json!(s.parse::<u64>().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_signed_with_another_key_are_refused_while_running() {
    let backend = Backend::start().await;
    let mut plane = ControlPlane::start();
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    let gw = Gateway::start(spec(gateway_manifest(&plane, &token_file, "", 30)));
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The plane comes back with a different signing key (its key file lost): its snapshots no
    // longer verify against the key this gateway trusts.
    plane.stop();
    std::fs::remove_file(plane.dir().join("signing.key")).unwrap();
    plane.restart();
    move_api(&plane, "/other").await;
    let gws = plane
        .wait_admin("/gateways", |g| {
            g[0]["heartbeat"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("signature does not verify"))
        })
        .await;
    assert_eq!(gws[0]["heartbeat"]["config_source"], "live");
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "the old configuration serves"
    );
    assert_eq!(
        client()
            .get(gw.url("/other/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_long_poll_a_change_arrives_within_one_poll() {
    let backend = Backend::start().await;
    let plane = ControlPlane::start();
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    // On a single-threaded runtime, as with one CPU.
    let gw = Gateway::start(spec(gateway_manifest(
        &plane,
        &token_file,
        "[runtime]\nworker_threads = 1\n",
        0,
    )));
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (s, _) = plane
        .admin("PUT", "/gateways/gw1", Some(json!({ "apis": [] })))
        .await;
    assert_eq!(s, 200);
    let took = until_status(&gw, "/svc/echo", 404).await;
    assert!(
        took < Duration::from_secs(2),
        "one poll is 200 ms; took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_that_do_not_verify_or_build_are_refused_and_the_gateway_keeps_serving() {
    let backend = Backend::start().await;
    let plane = ControlPlane::start();
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();

    // Another plane's key: the snapshot's signature does not verify, nothing to fall back on.
    let other = ControlPlane::start();
    let wrong =
        gateway_manifest(&plane, &token_file, "", 30).replace(&plane.public_key, &other.public_key);
    let Err((status, logs)) = Gateway::try_start(spec(wrong)) else {
        panic!("started with a snapshot whose signature does not verify");
    };
    assert!(status.is_some_and(|s| !s.success()));
    let text = logs.join("\n");
    assert!(text.contains("signature does not verify"), "{logs:?}");
    assert!(
        text.contains("No backup to start from: none is configured; add a [backup] store"),
        "{logs:?}"
    );

    // Running: a snapshot the gateway cannot build (a policy no plugin provides) is refused;
    // the previous configuration keeps serving, the heartbeat carries the error, and the
    // metrics count it.
    let lines = dir.path().join("metrics.jsonl");
    let sink = format!(
        "[[plugins]]\nname = \"access\"\npath = \"{}\"\n\n[telemetry]\nmetrics_interval_ms = 100\n\n[[telemetry.sinks]]\nname = \"m\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = true }}\n",
        outpost_tests::gateway::plugin_library("outpost_sink_access_log").display(),
        lines.display()
    );
    let gw = Gateway::start(spec(gateway_manifest(&plane, &token_file, &sink, 30)));
    let (s, v) = plane
        .admin(
            "PUT",
            "/apis/svc",
            Some(json!({
                "path": "/svc", "backend": "b", "subscription_required": false,
                "policies": { "inbound": [{ "policy": "no-such-policy" }] },
                "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
            })),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    gw.wait_for_log(
        "Rejected the configuration from the plane; the previous one keeps serving.",
        1,
    );
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let gws = plane
        .wait_admin("/gateways", |g| {
            g[0]["heartbeat"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("no-such-policy"))
        })
        .await;
    assert!(gws[0]["heartbeat"]["last_error"]
        .as_str()
        .unwrap()
        .contains("rejected snapshot"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&lines).unwrap_or_default();
        let counted = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| {
                l["metric"] == "outpost_config_rejected_total"
                    && l["labels"]["source"] == "plane"
                    && l["value"] == 1.0
            });
        if counted {
            break;
        }
        assert!(Instant::now() < deadline, "no rejection metric: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_fails_static_on_the_fs_store() {
    let dir = tempfile::tempdir().unwrap();
    let backup_dir = dir.path().join("backup");
    let config = format!("{{ dir = \"{}\" }}", backup_dir.display());
    fails_static("fs", &config, Some(backup_dir.join("gw1"))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_fails_static_on_the_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{{ path = \"{}\" }}",
        dir.path().join("backup.db").display()
    );
    fails_static("sqlite", &config, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_fails_static_on_the_redis_store() {
    let redis = outpost_tests::RedisServer::start();
    fails_static("redis", &format!("{{ url = \"{}\" }}", redis.url()), None).await;
}

/// The plane killed under load, the gateway restarted from `store` while it is down, the
/// plane back with a change made meanwhile. With `forge_in` (an fs store's scope directory), a
/// newer generation whose content was changed without the plane's key is planted first: the
/// gateway must refuse it and start from the genuine one.
async fn fails_static(store: &str, store_config: &str, forge_in: Option<std::path::PathBuf>) {
    let backend = Backend::start().await;
    let mut plane = ControlPlane::start();
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    let backup = format!(
        "[[plugins]]\nname = \"store\"\npath = \"{}\"\n\n[backup]\nstore = \"{store}\"\nconfig = {store_config}\n",
        outpost_tests::gateway::plugin_library(&format!("outpost_store_{store}")).display(),
    );
    let manifest = gateway_manifest(&plane, &token_file, &backup, 30);
    let gw = Gateway::start(spec(manifest.clone()));
    gw.wait_for_log("Configuration backed up.", 1);

    // The plane goes away under steady traffic: every request is still served.
    let load = {
        let url = gw.url("/svc/echo");
        tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0, 0);
            let end = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < end {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    plane.stop();
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed while the plane was down");
    gw.wait_for_log(
        "Cannot sync with the management plane; the current configuration keeps serving.",
        1,
    );

    // Restarted while the plane is down: it serves from its backup.
    drop(gw);
    if let Some(scope) = &forge_in {
        let mut files: Vec<_> = std::fs::read_dir(scope)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let newest = files.last().unwrap();
        let mut envelope: Value = serde_json::from_slice(&std::fs::read(newest).unwrap()).unwrap();
        let forged = envelope["config"]
            .as_str()
            .unwrap()
            .replace("/svc", "/evil");
        envelope["digest"] = json!(outpost_tests::certs::sha256_hex(forged.as_bytes()));
        envelope["config"] = json!(forged);
        let generation: u64 = newest
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        std::fs::write(
            scope.join(format!("{:020}.snapshot", generation + 1)),
            envelope.to_string(),
        )
        .unwrap();
    }
    let gw = Gateway::start(spec(manifest.clone()));
    gw.wait_for_log("Serving the configuration from the backup store.", 1);
    assert_eq!(status(&gw).await["configSource"], "backup");
    if forge_in.is_some() {
        let damaged = gw.wait_for_log("Backup generation is damaged; trying an older one.", 1);
        assert!(
            damaged[0]["error"].as_str().unwrap().contains("signature"),
            "{damaged:?}"
        );
        assert_eq!(
            client()
                .get(gw.url("/evil/echo"))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The plane comes back with a change made meanwhile: the gateway catches up.
    plane.restart();
    move_api(&plane, "/back").await;
    until_status(&gw, "/back/echo", 200).await;
    assert_eq!(status(&gw).await["configSource"], "live");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_revoked_expired_and_renewed() {
    let backend = Backend::start().await;
    let plane = ControlPlane::start_with_ttl(8);
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    let gw = Gateway::start(spec(gateway_manifest(&plane, &token_file, "", 1)));

    // Renewed before it expires, and written back: after the first token's lifetime the
    // gateway still follows changes.
    gw.wait_for_log("Gateway token renewed.", 1);
    let renewed = std::fs::read_to_string(&token_file).unwrap();
    assert_ne!(renewed.trim(), token);
    tokio::time::sleep(Duration::from_millis(8500)).await;
    let (s, _) = plane
        .admin("PUT", "/gateways/gw1", Some(json!({ "apis": [] })))
        .await;
    assert_eq!(s, 200);
    until_status(&gw, "/svc/echo", 404).await;

    // The first token has expired: the plane says so.
    let r = client()
        .get(format!("{}/gateway/v1/config", plane.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "token_expired");

    // Revoked: the gateway keeps serving what it has and reports why it cannot sync.
    plane.admin("DELETE", "/gateways/gw1/tokens", None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.json_logs().iter().any(|l| {
        l["message"]
            == "Cannot sync with the management plane; the current configuration keeps serving."
            && l["error"]
                .as_str()
                .is_some_and(|e| e.contains("token_revoked"))
    }) {
        assert!(
            Instant::now() < deadline,
            "no token_revoked sync error:\n{}",
            gw.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&gw).await["status"], "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plane_serves_tls_and_gateways_trust_its_ca() {
    let backend = Backend::start().await;
    let plane = ControlPlane::start_tls();
    assert!(plane.url().starts_with("https://"));
    let token = seed(&plane, &backend).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gw.token");
    std::fs::write(&token_file, &token).unwrap();
    let ca_file = dir.path().join("plane-ca.pem");
    std::fs::write(&ca_file, plane.ca_pem.as_ref().unwrap()).unwrap();
    let manifest = gateway_manifest(&plane, &token_file, "", 30).replace(
        "start_wait_ms = 2000\n",
        &format!(
            "start_wait_ms = 2000\nca_file = \"{}\"\n",
            ca_file.display()
        ),
    );
    let gw = Gateway::start(spec(manifest.clone()));
    assert_eq!(
        client()
            .get(gw.url("/svc/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(status(&gw).await["configSource"], "live");

    // Without the CA the plane's certificate is not trusted: nothing to start from.
    let untrusted = manifest.replace(&format!("ca_file = \"{}\"\n", ca_file.display()), "");
    let Err((_, logs)) = Gateway::try_start(spec(untrusted)) else {
        panic!("trusted a certificate from an unknown CA");
    };
    assert!(
        logs.join("\n").to_lowercase().contains("certificate"),
        "{logs:?}"
    );
    // Plain HTTP to the TLS port gets no answer.
    let plain = plane.url().replace("https://", "http://");
    assert!(client()
        .get(format!("{plain}/healthz"))
        .send()
        .await
        .is_err());
}
