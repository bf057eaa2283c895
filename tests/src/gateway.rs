//! Runs the real `outpost` binary on a manifest written to a temporary directory and learns
//! the ports its listeners bound (the manifest says port 0) from its JSON log lines.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to start: the manifest body (listeners, limits, …; `[log]` and `[config]` are added)
/// and the API configuration.
pub struct GatewaySpec {
    /// Manifest TOML without `[log]` and `[config]`.
    pub manifest: String,
    /// The API configuration document.
    pub api: serde_json::Value,
    /// Files to write into the gateway's directory first (certificates, …).
    pub files: Vec<(String, String)>,
    /// `[config] watch_interval_ms` (0: reload on SIGHUP only).
    pub watch_ms: u64,
}

impl GatewaySpec {
    /// One plain HTTP listener named `http` and the given API configuration.
    pub fn http(api: serde_json::Value) -> GatewaySpec {
        GatewaySpec {
            manifest: LISTENER_HTTP.to_owned(),
            api,
            files: Vec::new(),
            watch_ms: 100,
        }
    }
}

/// `[[listeners]]` named `http` on 127.0.0.1:0.
pub const LISTENER_HTTP: &str = "[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n";

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Option<Child>,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
    addrs: HashMap<String, SocketAddr>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The binary under test: `OUTPOST_BIN`, or the one cargo built beside the test.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/outpost
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("outpost")
}

impl Gateway {
    /// Writes the files and starts the gateway; returns once every listener is bound.
    pub fn start(spec: GatewaySpec) -> Gateway {
        Self::try_start(spec).unwrap_or_else(|(status, logs)| {
            panic!("gateway did not start ({status:?}):\n{}", logs.join("\n"))
        })
    }

    /// Like [`Gateway::start`], but returns the exit status and logs if it exits instead.
    pub fn try_start(spec: GatewaySpec) -> Result<Gateway, (Option<ExitStatus>, Vec<String>)> {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in &spec.files {
            std::fs::write(dir.path().join(name), content).expect("write file");
        }
        std::fs::write(
            dir.path().join("api.json"),
            serde_json::to_vec_pretty(&spec.api).expect("json"),
        )
        .expect("write api.json");
        // A manifest with its own [config] (a plane source) keeps it; otherwise the file.
        let config = if spec.manifest.contains("[config]") {
            String::new()
        } else {
            format!(
                "\n[config]\ntype = \"file\"\npath = \"api.json\"\nwatch_interval_ms = {}\n",
                spec.watch_ms
            )
        };
        let manifest = format!(
            "{}\n[log]\nformat = \"json\"\nlevel = \"info\"\naccess_log = true\n{config}",
            spec.manifest
        );
        std::fs::write(dir.path().join("outpost.toml"), &manifest).expect("write manifest");
        let expected = manifest.matches("[[listeners]]").count();

        let mut child = Command::new(binary())
            .arg("run")
            .arg("--manifest")
            .arg(dir.path().join("outpost.toml"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost (build it first: cargo build -p outpost)");
        let logs = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        let mut gw = Gateway {
            child: Some(child),
            dir,
            logs,
            addrs: HashMap::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            gw.addrs = gw
                .json_logs()
                .iter()
                .filter(|l| l["message"] == "Listening.")
                .filter_map(|l| {
                    Some((
                        l["listener"].as_str()?.to_owned(),
                        l["address"].as_str()?.parse().ok()?,
                    ))
                })
                .collect();
            if gw.addrs.len() == expected {
                return Ok(gw);
            }
            if let Some(status) = gw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                std::thread::sleep(Duration::from_millis(100)); // let the log threads finish
                return Err((Some(status), gw.logs()));
            }
            if Instant::now() > deadline {
                return Err((None, gw.logs()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The bound address of a listener.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// `http://addr` of the `http` listener plus `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr("http"), path)
    }

    /// The gateway's directory (manifest, api.json, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }

    /// Log lines that are JSON objects.
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a log line with this message appears `count` times.
    pub fn wait_for_log(&self, message: &str, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<_> = self
                .json_logs()
                .into_iter()
                .filter(|l| l["message"] == message)
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no log '{message}' x{count}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the API configuration atomically (write + rename), as an editor or a
    /// deployment tool would.
    pub fn write_api(&self, api: &serde_json::Value) {
        self.write_api_raw(&serde_json::to_vec_pretty(api).expect("json"));
    }

    /// Replaces the API configuration file with raw bytes (atomically).
    pub fn write_api_raw(&self, raw: &[u8]) {
        let tmp = self.dir.path().join("api.json.tmp");
        std::fs::write(&tmp, raw).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("api.json")).expect("rename");
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Current resident memory (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("status field")
}

/// Runs `outpost` with arguments and returns (exit success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    run_cli_env(args, &[])
}

/// Runs the `outpost` binary with extra environment variables.
pub fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run outpost");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plugin library built by the workspace build (`cargo build --workspace`), next to the
/// binary: `plugin_library("outpost_policy_transform")`.
pub fn plugin_library(crate_name: &str) -> PathBuf {
    let bin = binary();
    let dir = bin.parent().expect("target dir");
    let path = dir.join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Builds a Cargo project that is not part of the workspace (a third-party plugin, a fixture
/// with its own profile or API copy) with cargo, into `target/external`, and returns its
/// cdylib. Concurrent callers are serialised by cargo's own lock.
pub fn build_external(project: &str, lib_name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_owned();
    let target = root.join("target").join("external");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--locked", "--manifest-path"])
        .arg(root.join(project).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building {project} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target.join("debug").join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        lib_name,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(path.exists(), "{} was not built", path.display());
    path
}
