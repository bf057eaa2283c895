//! Backup stores: one conformance suite that the `fs`, `sqlite` and `redis` store plugins all
//! pass (real directories, a real SQLite file, a real `redis-server` started here), the
//! gateway's use of them (a backup per applied configuration, start from the newest backup
//! that verifies, damaged generations skipped and counted), and outages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_gateway::backup::Backup;
use outpost_gateway::plugins::PluginHost;
use outpost_gateway::snapshot::{ConfigOrigin, Snapshot};
use outpost_gateway::upstream::ClientCache;
use outpost_plugin_api::{ErrorKind, StoreBox};
use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec, RedisServer};
use serde_json::{json, Value};

use crate::client;

fn libraries() -> String {
    format!(
        "[[plugins]]\nname = \"fs\"\npath = \"{}\"\n\n[[plugins]]\nname = \"sqlite\"\npath = \"{}\"\n\n[[plugins]]\nname = \"redis\"\npath = \"{}\"\n",
        plugin_library("outpost_store_fs").display(),
        plugin_library("outpost_store_sqlite").display(),
        plugin_library("outpost_store_redis").display(),
    )
}

/// The plugin host and a manifest with this `[backup]` section, loaded in this process.
fn host(backup: &str) -> (PluginHost, outpost_config::Manifest) {
    let text = format!(
        "[gateway]\nid = \"gw-a\"\n\n{LISTENER_HTTP}\n{}\n{backup}\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
        libraries()
    );
    let manifest =
        outpost_config::Manifest::parse(&text, "outpost.toml", std::path::Path::new("/tmp"))
            .expect("manifest");
    (PluginHost::load(&manifest).expect("plugins load"), manifest)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn generations(s: &StoreBox, scope: &str) -> Vec<u64> {
    s.list(scope.into())
        .unwrap()
        .iter()
        .map(|g| g.generation)
        .collect()
}

/// What every store must do. `a` and `b` are two instances on the same storage, as two
/// gateways sharing a store.
fn conformance(name: &str, a: &StoreBox, b: &StoreBox) {
    let started = now_ms();
    assert!(
        generations(a, "gw-a").is_empty(),
        "{name}: a new scope is empty"
    );
    for g in 1..=4u64 {
        let data = format!("snapshot {g}");
        assert!(
            a.save("gw-a".into(), g, data.as_bytes().into()).is_ok(),
            "{name}: save {g}"
        );
    }
    let listed = a.list("gw-a".into()).unwrap();
    assert_eq!(
        listed.iter().map(|g| g.generation).collect::<Vec<_>>(),
        vec![4, 3, 2, 1],
        "{name}: newest first"
    );
    assert_eq!(listed[0].size, 10, "{name}: size");
    assert!(
        listed
            .iter()
            .all(|g| g.saved_unix_ms + 2000 >= started && g.saved_unix_ms <= now_ms() + 2000),
        "{name}: save times {listed:?}"
    );
    let newest = a
        .load("gw-a".into(), 4)
        .unwrap()
        .into_option()
        .expect("newest");
    assert_eq!(newest.as_slice(), b"snapshot 4", "{name}");
    assert!(
        a.load("gw-a".into(), 99).unwrap().into_option().is_none(),
        "{name}: absent generation"
    );

    // Shared: the other instance sees the same generations, and its own scope stays apart.
    assert_eq!(generations(b, "gw-a"), vec![4, 3, 2, 1], "{name}: shared");
    assert!(b
        .save("gw-b".into(), 7, b"other gateway".as_slice().into())
        .is_ok());
    assert_eq!(generations(a, "gw-b"), vec![7], "{name}");
    assert_eq!(
        generations(a, "gw-a"),
        vec![4, 3, 2, 1],
        "{name}: scopes apart"
    );

    // Saving a generation again replaces it whole; a large one round-trips.
    assert!(b
        .save("gw-a".into(), 4, b"snapshot 4 again".as_slice().into())
        .is_ok());
    let again = a.load("gw-a".into(), 4).unwrap().into_option().unwrap();
    assert_eq!(again.as_slice(), b"snapshot 4 again", "{name}");
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    assert!(a.save("gw-a".into(), 5, big.as_slice().into()).is_ok());
    assert_eq!(
        a.load("gw-a".into(), 5)
            .unwrap()
            .into_option()
            .unwrap()
            .as_slice(),
        big.as_slice(),
        "{name}"
    );

    // Prune keeps the newest.
    assert_eq!(a.prune("gw-a".into(), 2).unwrap(), 3, "{name}: pruned");
    assert_eq!(generations(b, "gw-a"), vec![5, 4], "{name}");
    assert_eq!(
        a.prune("gw-a".into(), 2).unwrap(),
        0,
        "{name}: nothing more to prune"
    );
    assert!(
        a.load("gw-a".into(), 1).unwrap().into_option().is_none(),
        "{name}: pruned data gone"
    );
    assert_eq!(
        generations(a, "gw-b"),
        vec![7],
        "{name}: other scope untouched"
    );
}

/// The gateway's view: backups of applied configurations; a damaged newest generation is
/// skipped (and counted), the previous one used.
fn newest_valid_wins(
    name: &str,
    backup_section: &str,
    plugins: &PluginHost,
    manifest: &outpost_config::Manifest,
) {
    let backup = Backup::from_manifest(manifest, plugins)
        .expect("store")
        .expect("configured");
    let clients = ClientCache::new(manifest.upstream.clone());
    let snapshot = |version: &str| {
        let raw = json!({ "version": version, "apis": [] }).to_string();
        let config = outpost_config::ApiConfig::parse(&raw, "test").unwrap();
        Snapshot::build(
            config,
            raw.as_bytes(),
            ConfigOrigin::File("test".into()),
            &clients,
            plugins,
        )
        .unwrap()
    };
    let g1 = backup.save(&snapshot("one")).expect("save");
    let g2 = backup.save(&snapshot("two")).expect("save");
    assert!(g2 > g1, "{name}: generations grow");
    assert_eq!(
        backup.load_newest().unwrap().envelope.version,
        "two",
        "{name}"
    );

    // Damage: a newer generation that is not an envelope, then one whose digest is wrong.
    let store = plugins
        .store(name, &manifest.backup.as_ref().unwrap().config)
        .unwrap();
    assert!(store
        .save("gw-a".into(), g2 + 1, b"\x00garbage".as_slice().into())
        .is_ok());
    let mut forged: Value = serde_json::from_slice(
        store
            .load("gw-a".into(), g2)
            .unwrap()
            .into_option()
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    forged["config"] = json!("{\"version\":\"evil\",\"apis\":[]}");
    assert!(store
        .save("gw-a".into(), g2 + 2, forged.to_string().as_bytes().into())
        .is_ok());
    let before = outpost_gateway::metrics::global()
        .value("outpost_backup_corrupt_total", &[name])
        .unwrap_or(0.0);
    let restored = backup.load_newest().expect("an older generation verifies");
    assert_eq!(restored.envelope.version, "two", "{name}: {backup_section}");
    assert_eq!(restored.generation, g2);
    let after = outpost_gateway::metrics::global()
        .value("outpost_backup_corrupt_total", &[name])
        .unwrap();
    assert_eq!(
        after - before,
        2.0,
        "{name}: both damaged generations counted"
    );
}

#[test]
fn the_fs_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let section = format!(
        "[backup]\nstore = \"fs\"\nconfig = {{ dir = \"{}\" }}\n",
        dir.path().join("b").display()
    );
    let (plugins, manifest) = host(&section);
    let cfg = json!({ "dir": dir.path().join("a").display().to_string() });
    let (a, b) = (
        plugins.store("fs", &cfg).unwrap(),
        plugins.store("fs", &cfg).unwrap(),
    );
    conformance("fs", &a, &b);
    // Scopes are directory names: nothing can escape the directory.
    let err = a
        .save("../up".into(), 1, b"x".as_slice().into())
        .into_result()
        .unwrap_err();
    assert!(
        err.message.contains("not usable as a directory name"),
        "{}",
        err.message
    );
    // The directory made unusable (a file where it was): an error the gateway reports, and
    // the store works again once it is back.
    let scope_dir = dir.path().join("a").join("gw-c");
    std::fs::write(&scope_dir, b"in the way").unwrap();
    let err = a
        .save("gw-c".into(), 1, b"x".as_slice().into())
        .into_result()
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{}", err.message);
    std::fs::remove_file(&scope_dir).unwrap();
    assert!(a.save("gw-c".into(), 1, b"x".as_slice().into()).is_ok());
    // Snapshots hold secrets: private directory and files.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&scope_dir), 0o700);
    assert_eq!(mode(&scope_dir.join(format!("{:020}.snapshot", 1))), 0o600);
    newest_valid_wins("fs", &section, &plugins, &manifest);
}

#[test]
fn the_sqlite_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let section = format!(
        "[backup]\nstore = \"sqlite\"\nconfig = {{ path = \"{}\" }}\n",
        dir.path().join("b.db").display()
    );
    let (plugins, manifest) = host(&section);
    let cfg = json!({ "path": dir.path().join("a.db").display().to_string() });
    let (a, b) = (
        plugins.store("sqlite", &cfg).unwrap(),
        plugins.store("sqlite", &cfg).unwrap(),
    );
    conformance("sqlite", &a, &b);
    // WAL mode, as documented.
    let wal = dir.path().join("a.db-wal");
    assert!(wal.exists(), "the database runs in WAL mode");
    newest_valid_wins("sqlite", &section, &plugins, &manifest);
}

#[test]
fn the_redis_store_passes_the_conformance_suite_and_survives_an_outage() {
    let mut redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let section = format!(
        "[backup]\nstore = \"redis\"\nconfig = {{ url = \"{}\", password = \"s3cret\", key_prefix = \"t2:\" }}\n",
        redis.url()
    );
    let (plugins, manifest) = host(&section);
    let cfg = json!({ "url": redis.url(), "password": "s3cret", "key_prefix": "t1:" });
    let (a, b) = (
        plugins.store("redis", &cfg).unwrap(),
        plugins.store("redis", &cfg).unwrap(),
    );
    conformance("redis", &a, &b);
    // The server really requires the password the store was given.
    assert!(redis.command(&["AUTH", "s3cret"]).starts_with("+OK"));
    assert!(redis.command(&["GET", "x"]).starts_with("-NOAUTH"));

    // Wrong password: refused with Redis's reason.
    let wrong = plugins
        .store("redis", &json!({ "url": redis.url(), "password": "nope" }))
        .unwrap();
    let err = wrong.list("gw-a".into()).into_result().unwrap_err();
    assert!(err.message.contains("redis"), "{}", err.message);

    // Outage: calls fail (unavailable) instead of hanging; after the restart the kept
    // connection is replaced and saving works again.
    redis.stop();
    let err = a
        .save("gw-a".into(), 9, b"during".as_slice().into())
        .into_result()
        .unwrap_err();
    assert!(
        matches!(err.kind, ErrorKind::UNAVAILABLE | ErrorKind::TIMEOUT),
        "{err:?}"
    );
    assert!(a.list("gw-a".into()).into_result().is_err());
    redis.restart();
    assert!(a
        .save("gw-a".into(), 10, b"after".as_slice().into())
        .is_ok());
    assert_eq!(
        generations(&b, "gw-a"),
        vec![10],
        "a restarted Redis keeps nothing (no persistence)"
    );
    newest_valid_wins("redis", &section, &plugins, &manifest);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_backs_up_what_it_applies_and_starts_from_the_newest_valid_backup() {
    let backend = Backend::start().await;
    let store = tempfile::tempdir().unwrap();
    let manifest = format!(
        "{LISTENER_HTTP}\n{}\n[backup]\nstore = \"fs\"\ngenerations = 3\nconfig = {{ dir = \"{}\" }}\n",
        libraries(),
        store.path().display()
    );
    let api = |version: &str| {
        let mut a = crate::open_api(&backend.url(false));
        a["version"] = json!(version);
        a
    };
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest.clone(),
        api: api("v1"),
        files: Vec::new(),
        watch_ms: 50,
    });
    gw.wait_for_log("Configuration backed up.", 1);
    gw.write_api(&api("v2"));
    gw.wait_for_log("Configuration backed up.", 2);
    let scope = store.path().join("outpost");
    let files = || {
        let mut f: Vec<String> = std::fs::read_dir(&scope)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".snapshot"))
            .collect();
        f.sort();
        f
    };
    assert_eq!(files().len(), 2);
    // With a backup store the gateway still drains and exits cleanly.
    let mut gw = gw;
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    drop(gw);

    // The configuration source broken: the gateway starts from the newest backup, and says so.
    let broken = json!({ "version": "broken", "apis": "not a list" });
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest.clone(),
        api: broken.clone(),
        files: Vec::new(),
        watch_ms: 50,
    });
    let started = gw.wait_for_log("Serving the configuration from the backup store.", 1);
    assert_eq!(started[0]["version"], "v2");
    let status: Value = client()
        .get(gw.url("/status-0123456789abcdef"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["configSource"], "backup");
    assert_eq!(status["configVersion"], "v2");
    assert!(status["backupAgeSeconds"].as_u64().is_some());
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200, "it serves");
    // Once the source is fixed, it is applied and backed up again, even when it is the very
    // document the backup held.
    gw.write_api(&api("v2"));
    gw.wait_for_log("Configuration backed up.", 1);
    let status: Value = client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["configSource"], "file");
    assert_eq!(files().len(), 3);
    // generations = 3: one more configuration, still three, the oldest gone.
    let oldest = files()[0].clone();
    gw.write_api(&api("v4"));
    gw.wait_for_log("Configuration backed up.", 2);
    assert_eq!(files().len(), 3);
    assert!(
        !files().contains(&oldest),
        "the oldest generation was pruned"
    );
    drop(gw);

    // The newest generation damaged on disk: skipped, reported, the previous one served.
    let newest = scope.join(files().last().unwrap());
    std::fs::write(&newest, b"{\"format\":\"outpost-backup/1\",\"truncated").unwrap();
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest.clone(),
        api: broken.clone(),
        files: Vec::new(),
        watch_ms: 50,
    });
    gw.wait_for_log("Backup generation is damaged; trying an older one.", 1);
    let started = gw.wait_for_log("Serving the configuration from the backup store.", 1);
    assert_eq!(started[0]["version"], "v2");
    drop(gw);

    // Nothing usable at all: exit non-zero, saying why and what was tried.
    let empty = tempfile::tempdir().unwrap();
    let bare = format!(
        "{LISTENER_HTTP}\n{}\n[backup]\nstore = \"fs\"\nconfig = {{ dir = \"{}\" }}\n",
        libraries(),
        empty.path().display()
    );
    let Err((status, logs)) = Gateway::try_start(GatewaySpec {
        manifest: bare,
        api: broken,
        files: Vec::new(),
        watch_ms: 50,
    }) else {
        panic!("started without any configuration");
    };
    assert!(status.is_some_and(|s| !s.success()));
    let text = logs.join("\n");
    assert!(
        text.contains("No backup to start from: backup store 'fs' has no generation for 'outpost'"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_keeps_serving_and_retries_a_backup_while_redis_is_down() {
    let backend = Backend::start().await;
    let mut redis = RedisServer::start();
    let manifest = format!(
        "{LISTENER_HTTP}\n{}\n[backup]\nstore = \"redis\"\nconfig = {{ url = \"{}\", connect_timeout_ms = 200, io_timeout_ms = 200 }}\n",
        libraries(),
        redis.url()
    );
    let api = |version: &str| {
        let mut a = crate::open_api(&backend.url(false));
        a["version"] = json!(version);
        a
    };
    let gw = Gateway::start(GatewaySpec {
        manifest,
        api: api("r1"),
        files: Vec::new(),
        watch_ms: 50,
    });
    gw.wait_for_log("Configuration backed up.", 1);
    redis.stop();
    gw.write_api(&api("r2"));
    gw.wait_for_log("Configuration reloaded.", 1);
    gw.wait_for_log("Backing up the configuration failed; will retry.", 1);
    let status: Value = client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["configVersion"], "r2",
        "the new configuration serves meanwhile"
    );
    let r = client().get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    redis.restart();
    let saved = gw.wait_for_log("Configuration backed up.", 2);
    assert_eq!(saved[1]["version"], "r2");
    let index = redis.command(&["ZRANGE", "outpost:backup:outpost:index", "0", "-1"]);
    assert!(
        index.starts_with("*1"),
        "one generation after the restart: {index}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
