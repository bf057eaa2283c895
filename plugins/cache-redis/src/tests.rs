//! Against a real `redis-server` started by each test on a free port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_plugin_sdk::api::{CacheBox, ErrorKind, PluginError};
use outpost_plugin_sdk::serde_json::{json, Value};
use outpost_plugin_sdk::testing::{block_on, cache};
use outpost_tests::{Ca, RedisServer};

use super::*;

fn open(config: Value) -> CacheBox {
    cache::<RedisCache>(&config.to_string()).expect("config accepted")
}

fn refused(config: Value) -> String {
    match cache::<RedisCache>(&config.to_string()) {
        Ok(_) => panic!("accepted {config}"),
        Err(e) => e.message.into_string(),
    }
}

fn get(c: &CacheBox, k: &str) -> Result<Option<Vec<u8>>, PluginError> {
    block_on(c.get(k.as_bytes().into()))
        .into_result()
        .map(|v| v.into_option().map(|v| v.into_vec()))
}

fn set(c: &CacheBox, k: &str, v: &[u8], ttl_ms: u64) -> Result<(), PluginError> {
    block_on(c.set(k.as_bytes().into(), v.into(), ttl_ms)).into_result()
}

fn del(c: &CacheBox, k: &str) -> Result<bool, PluginError> {
    block_on(c.delete(k.as_bytes().into())).into_result()
}

fn inc(c: &CacheBox, k: &str, delta: i64, ttl_ms: u64) -> Result<i64, PluginError> {
    block_on(c.increment(k.as_bytes().into(), delta, ttl_ms)).into_result()
}

/// PTTL of a raw key, as Redis reports it.
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let r = redis.command(&["PTTL", key]);
    r.trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("PTTL answered {r:?}"))
}

#[test]
fn values_are_stored_read_deleted_and_expire_under_the_prefix() {
    let redis = RedisServer::start();
    let c = open(json!({ "url": redis.url(), "key_prefix": "t1:" }));
    assert_eq!(get(&c, "k").unwrap(), None);
    // Binary-safe: CR/LF and non-UTF-8 bytes come back as they went in.
    let value = b"v\r\n\xff\x00end".to_vec();
    set(&c, "k", &value, 0).unwrap();
    assert_eq!(get(&c, "k").unwrap(), Some(value));
    assert!(redis.command(&["EXISTS", "t1:k"]).starts_with(":1"));
    assert!(redis.command(&["EXISTS", "k"]).starts_with(":0"));
    assert_eq!(pttl(&redis, "t1:k"), -1, "no TTL asked, none set");

    set(&c, "short", b"x", 300).unwrap();
    let left = pttl(&redis, "t1:short");
    assert!((1..=300).contains(&left), "PTTL {left}");
    assert_eq!(get(&c, "short").unwrap().as_deref(), Some(b"x".as_slice()));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(get(&c, "short").unwrap(), None, "expired");

    assert!(del(&c, "k").unwrap());
    assert!(!del(&c, "k").unwrap());
    assert_eq!(get(&c, "k").unwrap(), None);

    // The default prefix.
    let d = open(json!({ "url": redis.url() }));
    set(&d, "k", b"1", 0).unwrap();
    assert!(redis.command(&["GET", "outpost:k"]).contains("\r\n1\r\n"));
}

#[test]
fn counters_get_their_ttl_once_and_count_atomically() {
    let redis = RedisServer::start();
    let c = open(json!({ "url": redis.url(), "key_prefix": "t2:", "pool_size": 4 }));
    assert_eq!(inc(&c, "n", 1, 600).unwrap(), 1);
    let first = pttl(&redis, "t2:n");
    assert!((1..=600).contains(&first), "PTTL {first}");
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(inc(&c, "n", 2, 600).unwrap(), 3);
    let later = pttl(&redis, "t2:n");
    assert!(
        later <= first - 200,
        "the TTL was not renewed by the second increment (first {first}, later {later})"
    );
    assert_eq!(get(&c, "n").unwrap().as_deref(), Some(b"3".as_slice()));
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(
        inc(&c, "n", 5, 600).unwrap(),
        5,
        "a new window after expiry"
    );

    // Without a TTL: no expiry.
    assert_eq!(inc(&c, "forever", -2, 0).unwrap(), -2);
    assert_eq!(pttl(&redis, "t2:forever"), -1);

    // A key holding a value that is not a number is an error, not a counter.
    set(&c, "word", b"hello", 0).unwrap();
    let e = inc(&c, "word", 1, 1000).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UNAVAILABLE);
    assert!(e.message.contains("not an integer"), "{}", e.message);

    // Many threads over several connections: no increment is lost.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    inc(&c, "shared", 1, 60_000).unwrap();
                }
            });
        }
    });
    assert_eq!(
        get(&c, "shared").unwrap().as_deref(),
        Some(b"400".as_slice())
    );
}

#[test]
fn an_outage_is_a_prompt_error_and_the_cache_heals_after_a_restart() {
    let mut redis = RedisServer::start();
    let c = open(
        json!({ "url": redis.url(), "key_prefix": "t3:", "pool_size": 2, "command_timeout_ms": 300 }),
    );
    set(&c, "k", b"before", 0).unwrap();
    assert_eq!(inc(&c, "n", 1, 60_000).unwrap(), 1);

    redis.stop();
    for _ in 0..3 {
        for (what, r) in [
            ("get", get(&c, "k").map(|_| ())),
            ("set", set(&c, "k", b"x", 0)),
            ("delete", del(&c, "k").map(|_| ())),
            ("increment", inc(&c, "n", 1, 60_000).map(|_| ())),
        ] {
            let e = r.expect_err(what);
            assert!(
                e.kind == ErrorKind::UNAVAILABLE || e.kind == ErrorKind::TIMEOUT,
                "{what}: {e:?}"
            );
            assert!(!e.message.contains("127.0.0.1"), "{}", e.message);
        }
    }
    // Each call answers within its deadline (a refused connection answers at once).
    let t = Instant::now();
    assert!(get(&c, "k").is_err());
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // Back (empty: the test server keeps nothing on disk): the first call of each kind
    // succeeds on every connection of the pool (the refused connections are re-opened and the
    // call sent on the new one), counters included.
    redis.restart();
    assert_eq!(inc(&c, "n", 1, 60_000).unwrap(), 1);
    assert_eq!(inc(&c, "n", 1, 60_000).unwrap(), 2);
    for _ in 0..2 {
        assert_eq!(get(&c, "k").unwrap(), None);
    }
    set(&c, "k", b"after", 0).unwrap();
    assert_eq!(get(&c, "k").unwrap().as_deref(), Some(b"after".as_slice()));
    assert!(del(&c, "k").unwrap());
}

#[test]
fn a_cache_made_while_redis_is_down_connects_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let c = open(json!({ "url": redis.url(), "key_prefix": "t6:", "pool_size": 3 }));
    for _ in 0..4 {
        let t = Instant::now();
        assert_eq!(get(&c, "k").unwrap_err().kind, ErrorKind::UNAVAILABLE);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    redis.restart();
    // Every connection of the pool opens on its first call.
    for i in 1..=3 {
        assert_eq!(inc(&c, "n", 1, 0).unwrap(), i);
    }
    set(&c, "k", b"v", 0).unwrap();
    assert_eq!(get(&c, "k").unwrap().as_deref(), Some(b"v".as_slice()));
}

#[test]
fn a_server_that_never_answers_is_a_timeout_within_the_command_deadline() {
    // A listener that never accepts: connecting hangs.
    let (addr, _held, _sock) = outpost_tests::black_hole();
    let c = open(json!({
        "url": format!("redis://{addr}/0"),
        "connect_timeout_ms": 5000,
        "command_timeout_ms": 200,
    }));
    for _ in 0..2 {
        let t = Instant::now();
        let e = get(&c, "k").unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind, ErrorKind::TIMEOUT, "{e:?}");
        assert!(e.message.contains("200 ms"), "{}", e.message);
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
            "{took:?}"
        );
    }
}

#[test]
fn passwords_are_used_and_never_shown() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let good = open(json!({ "url": redis.url(), "password": "s3cret-pw" }));
    set(&good, "k", b"v", 0).unwrap();
    assert_eq!(get(&good, "k").unwrap().as_deref(), Some(b"v".as_slice()));
    // In the URL, and the password field overriding a wrong one in the URL.
    let port = redis.port;
    let in_url = open(json!({ "url": format!("redis://:s3cret-pw@127.0.0.1:{port}/0") }));
    assert_eq!(get(&in_url, "k").unwrap().as_deref(), Some(b"v".as_slice()));
    let overridden = open(json!({
        "url": format!("redis://:wrong-pw@127.0.0.1:{port}/0"),
        "password": "s3cret-pw",
    }));
    assert_eq!(
        get(&overridden, "k").unwrap().as_deref(),
        Some(b"v".as_slice())
    );

    for bad in [
        json!({ "url": redis.url(), "password": "wrong-pw" }),
        json!({ "url": format!("redis://:wrong-pw@127.0.0.1:{port}/0") }),
        json!({ "url": redis.url() }),
    ] {
        let c = open(bad.clone());
        for _ in 0..2 {
            let e = get(&c, "k").unwrap_err();
            assert_eq!(e.kind, ErrorKind::UNAVAILABLE, "{bad}: {e:?}");
            assert!(e.message.starts_with("redis: "), "{}", e.message);
            assert!(
                !e.message.contains("wrong-pw") && !e.message.contains(&port.to_string()),
                "{}",
                e.message
            );
        }
    }
    // A refused connection is not kept: the good cache still works after the bad ones.
    assert_eq!(get(&good, "k").unwrap().as_deref(), Some(b"v".as_slice()));
}

/// A TLS-only `redis-server` (the harness's server speaks plain RESP for its own checks).
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_redis(ca: &Ca) -> TlsRedis {
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.server(&["localhost", "127.0.0.1"]);
    let file = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (cert, key, ca_file) = (
        file("server.pem", &leaf.cert_pem),
        file("server.key", &leaf.key_pem),
        file("ca.pem", &ca.cert_pem),
    );
    let port = outpost_tests::closed_port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &dir.path().display().to_string()])
        .args(["--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
        .args(["--tls-ca-cert-file", &ca_file, "--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsRedis {
        child,
        port,
        _dir: dir,
    }
}

#[test]
fn rediss_verifies_the_server_against_the_configured_ca() {
    let ca = Ca::new("redis test CA");
    let server = tls_redis(&ca);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let c = open(json!({
        "url": format!("rediss://localhost:{}/0", server.port),
        "tls_ca_file": ca_file,
    }));
    set(&c, "k", b"over tls", 0).unwrap();
    assert_eq!(
        get(&c, "k").unwrap().as_deref(),
        Some(b"over tls".as_slice())
    );

    // Another CA's server is refused.
    let other = Ca::new("someone else");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, &other.cert_pem).unwrap();
    let c = open(json!({
        "url": format!("rediss://localhost:{}/0", server.port),
        "tls_ca_file": other_file,
    }));
    assert_eq!(get(&c, "k").unwrap_err().kind, ErrorKind::UNAVAILABLE);
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    for (config, field) in [
        (json!({ "url": "http://x" }), "url"),
        (json!({ "url": "redis://" }), "url"),
        (json!({ "url": "redis://x", "pool_size": 0 }), "pool_size"),
        (json!({ "url": "redis://x", "pool_size": 65 }), "pool_size"),
        (
            json!({ "url": "redis://x", "connect_timeout_ms": 0 }),
            "connect_timeout_ms",
        ),
        (
            json!({ "url": "redis://x", "command_timeout_ms": 0 }),
            "command_timeout_ms",
        ),
        (
            json!({ "url": "redis://x", "tls_ca_file": "/ca.pem" }),
            "rediss://",
        ),
        (
            json!({ "url": "rediss://x", "tls_cert_file": "/c.pem" }),
            "tls_key_file",
        ),
        (
            json!({ "url": "rediss://x", "tls_ca_file": "/nonexistent/ca.pem" }),
            "tls_ca_file",
        ),
        (json!({ "url": "redis://x", "host": "x" }), "host"),
        (json!({}), "url"),
    ] {
        let e = refused(config.clone());
        assert!(e.contains(field), "{config}: {e}");
    }
    // A URL with a password is never repeated back.
    let e = refused(json!({ "url": "redis://:hunter2@/0" }));
    assert!(!e.contains("hunter2"), "{e}");
    // Valid, and no connection is made until the first call.
    open(json!({ "url": "redis://127.0.0.1:1/0" }));
}
