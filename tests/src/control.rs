//! A real `outpost control` process for tests: its own directory (SQLite state, admin token,
//! signing key), a port from the OS (kept across restarts), stoppable to test outages.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The admin token every test plane uses.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A management plane process.
pub struct ControlPlane {
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// Its snapshot signing public key (hex).
    pub public_key: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    ttl_s: u64,
    /// The CA the plane's TLS certificate comes from (PEM), when it serves HTTPS.
    pub ca_pem: Option<String>,
}

impl ControlPlane {
    /// Starts a plane with gateway tokens valid for a day.
    pub fn start() -> ControlPlane {
        Self::start_with_ttl(86_400)
    }

    /// Starts a plane whose gateway tokens live `ttl_s` seconds.
    pub fn start_with_ttl(ttl_s: u64) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).expect("token");
        let mut p = ControlPlane {
            addr: "127.0.0.1:0".parse().expect("addr"),
            public_key: String::new(),
            dir,
            child: None,
            logs: Arc::default(),
            ttl_s,
            ca_pem: None,
        };
        p.restart();
        p
    }

    /// Starts a plane serving HTTPS with a certificate for 127.0.0.1 from a new CA.
    pub fn start_tls() -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).expect("token");
        let ca = crate::Ca::new("plane test CA");
        let leaf = ca.server(&["127.0.0.1"]);
        std::fs::write(dir.path().join("plane.crt"), &leaf.cert_pem).expect("cert");
        std::fs::write(dir.path().join("plane.key"), &leaf.key_pem).expect("key");
        let mut p = ControlPlane {
            addr: "127.0.0.1:0".parse().expect("addr"),
            public_key: String::new(),
            dir,
            child: None,
            logs: Arc::default(),
            ttl_s: 86_400,
            ca_pem: Some(ca.cert_pem.clone()),
        };
        p.restart();
        p
    }

    /// The plane's directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// `http://127.0.0.1:PORT` (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Kills the process (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again, on the same port once it had one.
    pub fn restart(&mut self) {
        self.stop();
        let manifest = self.dir.path().join("control.toml");
        std::fs::write(
            &manifest,
            format!(
                "[control]\nlisten = \"{}\"\ndatabase = \"state.db\"\nadmin_token_file = \"admin.token\"\nsigning_key_file = \"signing.key\"\ngateway_token_ttl_s = {}\nlong_poll_max_s = 30\n{}",
                self.addr,
                self.ttl_s,
                if self.ca_pem.is_some() {
                    "\n[control.tls]\ncert_file = \"plane.crt\"\nkey_file = \"plane.key\"\n"
                } else {
                    ""
                }
            ),
        )
        .expect("manifest");
        let mut child = Command::new(crate::gateway::binary())
            .args(["control", "--manifest"])
            .arg(&manifest)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("outpost control runs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "Listening." {
                        let _ = tx.send(v);
                    }
                }
                logs.lock().expect("logs").push(line);
            }
        });
        self.child = Some(child);
        let v = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "the plane did not start: {:?}",
                    self.logs.lock().expect("logs")
                )
            });
        self.addr = v["address"]
            .as_str()
            .expect("address")
            .parse()
            .expect("socket address");
        self.public_key = v["public_key"].as_str().expect("public key").to_owned();
    }

    /// An admin call: method, path under `/admin/v1`, optional JSON body → status and JSON.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        crate::init_crypto();
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(ca) = &self.ca_pem {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"));
        }
        let client = builder.build().expect("client");
        let url = format!("{}/admin/v1{path}", self.url());
        let mut req = client
            .request(method.parse().expect("method"), url)
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("the plane answers");
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        (status, v)
    }

    /// Waits until `f` holds for the admin answer at `path`.
    pub async fn wait_admin(&self, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = self.admin("GET", path, None).await;
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "never held for {path}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
