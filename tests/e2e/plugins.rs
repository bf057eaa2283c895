//! Plugins loaded from the manifest: policy pipelines with APIM scopes and `base`, loader
//! errors, and configuration that names unknown policies or carries bad policy config.

use outpost_tests::gateway::{plugin_library, run_cli, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{assert_error, client};

fn plugins_manifest() -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"basic\"\npath = \"{}\"\n\n[[plugins]]\nname = \"access\"\npath = \"{}\"\n",
        plugin_library("outpost_policy_transform").display(),
        plugin_library("outpost_policy_access").display()
    )
}

fn set(name: &str, value: &str) -> Value {
    json!({ "policy": "set-header", "config": { "name": name, "value": value, "exists_action": "append" } })
}

fn pipeline_config(backend: &str) -> Value {
    json!({
        "version": "p1",
        "backends": [{ "id": "b", "urls": [backend] }],
        "policies": {
            "inbound": [set("x-trail", "global")],
            "outbound": [{ "policy": "set-header", "config": { "name": "x-served-by", "value": "outpost" } }]
        },
        "apis": [{
            "id": "svc", "path": "/svc", "backend": "b",
            "policies": { "inbound": [{ "policy": "base" }, set("x-trail", "api")], "outbound": [{ "policy": "base" }] },
            "operations": [
                { "id": "echo", "method": "GET", "url_template": "/echo",
                  "policies": { "inbound": [{ "policy": "base" }, set("x-trail", "operation")] } },
                { "id": "guarded", "method": "GET", "url_template": "/guarded/echo",
                  "policies": { "inbound": [
                      { "policy": "check-header", "config": { "name": "x-client", "values": ["alpha"], "failed_check_httpcode": 403 } },
                      { "policy": "base" }
                  ] } },
                { "id": "canned", "method": "GET", "url_template": "/canned",
                  "policies": { "inbound": [
                      { "policy": "return-response", "config": { "status": 202, "body": "canned", "headers": { "x-canned": "yes" } } }
                  ] } },
                { "id": "plain", "method": "GET", "url_template": "/plain/echo",
                  "policies": { "inbound": [], "outbound": [] } }
            ]
        }],
        "products": [
            { "id": "gold", "apis": ["svc"], "policies": { "inbound": [{ "policy": "base" }, set("x-trail", "product")] } },
            { "id": "silver", "apis": ["svc"] }
        ],
        "subscriptions": [
            { "id": "g", "scope": { "type": "product", "id": "gold" }, "primary_key": "gold-key-1" },
            { "id": "s", "scope": { "type": "product", "id": "silver" }, "primary_key": "silver-key-1" },
            { "id": "a", "scope": { "type": "all" }, "primary_key": "all-key-12" }
        ]
    })
}

async fn get(c: &reqwest::Client, gw: &Gateway, path: &str, key: &str) -> reqwest::Response {
    c.get(gw.url(path))
        .header("Ocp-Apim-Subscription-Key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn policies_run_at_every_scope_with_base_inheritance() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: plugins_manifest(),
        api: pipeline_config(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();

    // global → API → operation, in that order, through `base`; outbound from global via base.
    let r = get(&c, &gw, "/svc/echo", "all-key-12").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "outpost");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-trail"],
        json!(["global", "api", "operation"])
    );

    // A product-scoped subscription adds its product's section where the API's `base` is.
    let r = get(&c, &gw, "/svc/echo", "gold-key-1").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-trail"],
        json!(["global", "product", "api", "operation"])
    );
    // A product without policies inherits the global scope unchanged.
    let r = get(&c, &gw, "/svc/echo", "silver-key-1").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-trail"],
        json!(["global", "api", "operation"])
    );

    // check-header before base: refused before anything else runs, backend not called.
    let before = backend.requests();
    let r = get(&c, &gw, "/svc/guarded/echo", "all-key-12").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("header_check_failed"));
    assert_eq!(backend.requests(), before);
    let r = c
        .get(gw.url("/svc/guarded/echo"))
        .header("Ocp-Apim-Subscription-Key", "all-key-12")
        .header("x-client", "alpha")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-trail"], json!(["global", "api"]));

    // return-response answers without the backend.
    let r = get(&c, &gw, "/svc/canned", "all-key-12").await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-canned"], "yes");
    assert_eq!(r.text().await.unwrap(), "canned");
    assert_eq!(backend.requests(), before + 1);

    // Empty sections without base: nothing inherited.
    let r = get(&c, &gw, "/svc/plain/echo", "all-key-12").await;
    assert!(r.headers().get("x-served-by").is_none());
    let v: Value = r.json().await.unwrap();
    assert!(v["headers"].get("x-trail").is_none(), "{v}");
}

#[tokio::test]
async fn unknown_policies_and_bad_policy_config_are_rejected_before_serving() {
    let backend = Backend::start().await;
    let mut bad = pipeline_config(&backend.url(false));
    bad["apis"][0]["operations"][0]["policies"]["inbound"][1] =
        json!({ "policy": "no-such-policy" });
    bad["policies"]["inbound"][0] =
        json!({ "policy": "set-header", "config": { "name": "bad name", "value": "x" } });

    // At startup: the gateway refuses to start and says which steps.
    let spec = GatewaySpec {
        manifest: plugins_manifest(),
        api: bad.clone(),
        files: Vec::new(),
        watch_ms: 100,
    };
    let Err((status, logs)) = Gateway::try_start(spec) else {
        panic!("started with an invalid policy configuration");
    };
    assert!(status.is_some_and(|s| !s.success()));
    let logs = logs.join("\n");
    assert!(
        logs.contains("apis[0].operations[0].policies.inbound[1]"),
        "{logs}"
    );
    assert!(logs.contains("unknown policy 'no-such-policy'"), "{logs}");
    assert!(logs.contains("policies.inbound[0]"), "{logs}");
    assert!(logs.contains("not a valid header name"), "{logs}");

    // On reload: rejected whole, the previous configuration keeps serving.
    let gw = Gateway::start(GatewaySpec {
        manifest: plugins_manifest(),
        api: pipeline_config(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    gw.write_api(&bad);
    let rejected = gw.wait_for_log(
        "Rejected the changed configuration; the previous one keeps serving.",
        1,
    );
    assert_eq!(rejected[0]["problems"], 2);
    let r = get(&client(), &gw, "/svc/echo", "all-key-12").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "outpost");
}

#[tokio::test]
async fn loader_errors_name_the_entry_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let basic = plugin_library("outpost_policy_transform");
    std::fs::write(dir.path().join("not-a-library.so"), b"hello").unwrap();
    // A real shared library that is not an Outpost plugin.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let mut manifest = format!(
        r#"
[[listeners]]
name = "http"
address = "127.0.0.1:0"

[[plugins]]
name = "missing"
path = "nowhere.so"

[[plugins]]
name = "garbage"
path = "not-a-library.so"

[[plugins]]
name = "pinned"
path = "{basic}"
sha256 = "{zeros}"
"#,
        basic = basic.display(),
        zeros = "0".repeat(64)
    );
    if let Some(libm) = libm {
        manifest.push_str(&format!(
            "\n[[plugins]]\nname = \"foreign\"\npath = \"{libm}\"\n"
        ));
    }
    manifest.push_str("\n[config]\ntype = \"file\"\npath = \"api.json\"\n");
    std::fs::write(dir.path().join("outpost.toml"), manifest).unwrap();
    std::fs::write(dir.path().join("api.json"), r#"{"apis": []}"#).unwrap();
    let m = dir.path().join("outpost.toml");
    let (ok, _, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("plugins[0] 'missing'")
            && err.contains("nowhere.so")
            && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        err.contains("plugins[1] 'garbage'")
            && err.contains("cannot be loaded as a shared library"),
        "{err}"
    );
    assert!(
        err.contains("plugins[2] 'pinned'") && err.contains("sha256 mismatch"),
        "{err}"
    );
    if libm.is_some() {
        assert!(
            err.contains("plugins[3] 'foreign'") && err.contains("not an Outpost plugin"),
            "{err}"
        );
    }

    // `outpost plugins` lists what a good manifest loads; here the library is named and found
    // in the plugin directory.
    let good = format!(
        "[runtime]\nplugin_dir = \"{}\"\n\n[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[[plugins]]\nname = \"basic\"\nlibrary = \"outpost_policy_transform\"\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
        basic.parent().unwrap().display()
    );
    std::fs::write(&m, good).unwrap();
    let (ok, out, err) = run_cli(&["plugins", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("basic: policy-transform 0.1.0 (api level 2, kinds: policy)"),
        "{out}"
    );
    assert!(out.contains("set-header, return-response"), "{out}");
}

#[tokio::test]
async fn a_policy_error_response_uses_the_json_error_shape() {
    // A configuration whose policy refuses with the gateway's JSON error body shape.
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: plugins_manifest(),
        api: pipeline_config(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let r = get(&client(), &gw, "/svc/guarded/echo", "all-key-12").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "application/json");
    // Requests the gateway refuses itself are unaffected by policies.
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_error(r, 401, "subscription_key_missing").await;
}

fn containment_spec(backend: &str, disable: &str) -> GatewaySpec {
    let manifest = format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"basic\"\npath = \"{}\"\n\n[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n{disable}\n",
        plugin_library("outpost_policy_transform").display(),
        plugin_library("outpost_fixture_policies").display(),
    );
    let api = json!({
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{
            "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
            "policies": {
                "inbound": [
                    { "policy": "set-var", "config": { "name": "v", "value": "hello" } },
                    { "policy": "panic" },
                    { "policy": "fail" },
                    { "policy": "var-to-header", "config": { "name": "v", "header": "x-var" } }
                ],
                "outbound": [
                    { "policy": "var-to-header", "config": { "name": "v", "header": "x-var-out" } }
                ],
                "on_error": [{ "policy": "error-to-response", "config": { "status": 418 } }]
            },
            "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
        }]
    });
    GatewaySpec {
        manifest,
        api,
        files: Vec::new(),
        watch_ms: 100,
    }
}

async fn with_header(gw: &Gateway, name: &str) -> reqwest::Response {
    client()
        .get(gw.url("/svc/echo"))
        .header(name, "1")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn variables_on_error_and_panics_are_contained() {
    let backend = Backend::start().await;
    let gw = Gateway::start(containment_spec(
        &backend.url(false),
        "disable_after_panics = 2\nwhen_disabled = \"fail_open\"",
    ));

    // Two libraries side by side; a variable set inbound is seen inbound and outbound.
    let r = with_header(&gw, "x-nothing").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-var-out"], "hello");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-var"][0], "hello");

    // An error runs on-error with the error visible.
    let r = with_header(&gw, "x-fail").await;
    assert_eq!(r.status(), 418);
    assert_eq!(
        r.text().await.unwrap(),
        "handled: the fail fixture was asked to fail"
    );

    // A panic fails only its request, with 500; the gateway carries on.
    for _ in 0..2 {
        let r = with_header(&gw, "x-panic").await;
        assert_error(r, 500, "policy_failed").await;
        let r = with_header(&gw, "x-nothing").await;
        assert_eq!(r.status(), 200);
    }
    let panics = gw.wait_for_log("Policy panicked; the request fails with 500.", 2);
    assert_eq!(panics[1]["panics"], 2);
    assert_eq!(panics[1]["plugin"], "fixtures");
    gw.wait_for_log("Policy disabled after repeated panics.", 1);
    // Disabled, fail open: the step is skipped.
    let r = with_header(&gw, "x-panic").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_disabled_policy_can_fail_closed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(containment_spec(
        &backend.url(false),
        "disable_after_panics = 1",
    ));
    let r = with_header(&gw, "x-panic").await;
    assert_error(r, 500, "policy_failed").await;
    let r = with_header(&gw, "x-nothing").await;
    let body = assert_error(r, 500, "policy_failed").await;
    assert!(
        body["message"].as_str().unwrap().contains("disabled"),
        "{body}"
    );
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn a_third_party_plugin_built_on_its_own_serves_requests() {
    let lib = outpost_tests::gateway::build_external(
        "examples/third-party-plugin",
        "acme_outpost_plugin",
    );
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: format!(
            "{LISTENER_HTTP}\n[[plugins]]\nname = \"acme\"\npath = \"{}\"\nsha256 = \"{}\"\n",
            lib.display(),
            outpost_tests::certs::sha256_hex(&std::fs::read(&lib).unwrap())
        ),
        api: json!({
            "backends": [{ "id": "b", "urls": [backend.url(false)] }],
            "apis": [{
                "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                "policies": { "inbound": [{ "policy": "acme-tag", "config": { "tag": "blue" } }],
                              "outbound": [{ "policy": "acme-tag", "config": { "tag": "blue" } }] },
                "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
            }]
        }),
        files: Vec::new(),
        watch_ms: 100,
    });
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-acme-seen"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-acme-tag"][0], "blue");
    let r = client()
        .get(gw.url("/svc/echo"))
        .header("x-acme-block", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The plugin's log line went through the gateway's tracing, under its name.
    let logged = gw.wait_for_log("acme-tag ready with tag 'blue'", 1);
    assert_eq!(logged[0]["plugin"], "acme");
}

#[test]
fn abort_builds_and_changed_layouts_are_refused_with_the_reason() {
    let abort = outpost_tests::gateway::build_external(
        "tests/fixtures/abort-plugin",
        "outpost_fixture_abort",
    );
    let changed = outpost_tests::gateway::build_external(
        "tests/fixtures/layout-changed/plugin",
        "outpost_fixture_layout_changed",
    );
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(
        &m,
        format!(
            "[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[[plugins]]\nname = \"abort\"\npath = \"{}\"\n\n[[plugins]]\nname = \"changed\"\npath = \"{}\"\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
            abort.display(),
            changed.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("api.json"), r#"{"apis": []}"#).unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("plugins[0] 'abort'") && err.contains("panic = \"abort\""),
        "{err}"
    );
    assert!(
        err.contains("plugins[1] 'changed'") && err.contains("a shared type changed"),
        "{err}"
    );
    assert!(
        err.contains("PluginInfo"),
        "the message names the type: {err}"
    );
    // And `run` refuses to start the same way.
    let (ok, out, err) = run_cli(&["run", "--manifest", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        format!("{out}{err}").contains("panic = \"abort\""),
        "{out}{err}"
    );
}

#[tokio::test]
async fn a_plugin_built_against_api_1_0_keeps_loading() {
    let old = outpost_tests::gateway::build_external(
        "tests/fixtures/api-1.0-plugin",
        "outpost_fixture_api_1_0",
    );
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec {
        manifest: format!(
            "{LISTENER_HTTP}\n[[plugins]]\nname = \"old\"\npath = \"{}\"\n\n[[plugins]]\nname = \"basic\"\npath = \"{}\"\n",
            old.display(),
            plugin_library("outpost_policy_transform").display()
        ),
        api: json!({
            "backends": [{ "id": "b", "urls": [backend.url(false)] }],
            "apis": [{
                "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                "policies": { "inbound": [
                    { "policy": "old-stamp" },
                    { "policy": "set-header", "config": { "name": "x-new", "value": "1" } }
                ] },
                "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
            }]
        }),
        files: Vec::new(),
        watch_ms: 100,
    });
    // Loaded, initialised with today's host services, and serving next to a current plugin.
    // (A guard: any change to the live API that old plugins cannot load fails here.)
    let loaded = gw.wait_for_log("Plugin loaded.", 2);
    assert_eq!(loaded[0]["name"], "api-1.0-fixture");
    assert_eq!(loaded[0]["api_level"], 1);
    let logged = gw.wait_for_log("api 1.0 fixture initialised", 1);
    assert_eq!(logged[0]["plugin"], "api-1.0-fixture");
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-old-plugin"][0], "1");
    assert_eq!(v["headers"]["x-new"][0], "1");
}

#[tokio::test]
async fn plugins_of_every_kind_built_against_api_1_1_keep_loading() {
    let v2 = outpost_tests::gateway::build_external(
        "tests/fixtures/api-1.1-plugin",
        "outpost_fixture_api_1_1",
    );
    let backend = Backend::start().await;
    let out = tempfile::tempdir().unwrap();
    let lines = out.path().join("lines.txt");
    let mut gw = Gateway::start(GatewaySpec {
        manifest: format!(
            "{LISTENER_HTTP}\n[[plugins]]\nname = \"v2\"\npath = \"{}\"\n\n\
             [[caches]]\nname = \"map\"\nprovider = \"v2-map\"\n\n\
             [telemetry]\nflush_interval_ms = 20\nmetrics_interval_ms = 60000\n\n\
             [[telemetry.sinks]]\nname = \"lines\"\nprovider = \"v2-lines\"\nconfig = {{ path = \"{}\" }}\n",
            v2.display(),
            lines.display()
        ),
        api: json!({
            "backends": [{ "id": "b", "urls": [backend.url(false)] }],
            "apis": [{
                "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                "policies": { "inbound": [{ "policy": "v2-count" }] },
                "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
            }]
        }),
        files: Vec::new(),
        watch_ms: 100,
    });
    // (A guard: any change to the level-2 types that plugins built against them cannot load
    // fails here; such a change needs a new level.)
    let loaded = gw.wait_for_log("Plugin loaded.", 1);
    assert_eq!(loaded[0]["name"], "api-1.1-fixture");
    assert_eq!(loaded[0]["api_level"], 2);
    let c = client();
    for n in 1..=2 {
        let r = c
            .get(gw.url("/svc/echo"))
            .header("x-client", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        // The policy paused for a counter in the fixture's own cache and was resumed.
        assert_eq!(v["headers"]["x-v2-count"][0], n.to_string());
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(std::time::Duration::from_secs(10)).success());
    let written = std::fs::read_to_string(&lines).unwrap();
    assert_eq!(written.matches("200 /svc/echo").count(), 2, "{written}");
    assert!(
        written.contains("metric fixture_v2_requests_total 2"),
        "{written}"
    );
}

#[test]
fn backup_stores_save_list_load_and_prune_through_the_abi() {
    // In this process: the store plugins of the fixture library and of the api 1.1 fixture,
    // loaded side by side through the gateway's loader.
    let v2 = outpost_tests::gateway::build_external(
        "tests/fixtures/api-1.1-plugin",
        "outpost_fixture_api_1_1",
    );
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n\n[[plugins]]\nname = \"v2\"\npath = \"{}\"\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
        plugin_library("outpost_fixture_policies").display(),
        v2.display()
    );
    let manifest = outpost_config::Manifest::parse(&text, "outpost.toml", dir.path()).unwrap();
    let host = outpost_gateway::plugins::PluginHost::load(&manifest).unwrap();
    for name in ["store-memory", "v2-store"] {
        let store = host.store(name, &json!({})).unwrap();
        for g in 1..=4u64 {
            let data = format!("snapshot {g}");
            assert!(store.save("gw-a".into(), g, data.as_bytes().into()).is_ok());
        }
        assert!(store
            .save("gw-b".into(), 1, b"other".as_slice().into())
            .is_ok());
        let listed: Vec<u64> = store
            .list("gw-a".into())
            .unwrap()
            .iter()
            .map(|g| g.generation)
            .collect();
        assert_eq!(listed, vec![4, 3, 2, 1], "{name}: newest first");
        let newest = store.load("gw-a".into(), 4).unwrap().into_option().unwrap();
        assert_eq!(newest.as_slice(), b"snapshot 4");
        assert_eq!(store.prune("gw-a".into(), 2).unwrap(), 2);
        let listed: Vec<u64> = store
            .list("gw-a".into())
            .unwrap()
            .iter()
            .map(|g| g.generation)
            .collect();
        assert_eq!(listed, vec![4, 3], "{name}");
        assert!(store
            .load("gw-a".into(), 1)
            .unwrap()
            .into_option()
            .is_none());
        assert_eq!(
            store.list("gw-b".into()).unwrap().len(),
            1,
            "{name}: scopes are separate"
        );
    }
    let err = host.store("store-s3", &json!({})).err().unwrap();
    assert!(
        err.contains("unknown backup store 'store-s3' (loaded: store-memory, v2-store)"),
        "{err}"
    );
}
