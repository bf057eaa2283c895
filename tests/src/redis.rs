//! A real `redis-server` for tests: started on a port the OS just handed out, with its own
//! temporary directory and no persistence, and stoppable (to test outages) and restartable on
//! the same port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) `redis-server`.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    /// Its working directory.
    pub dir: PathBuf,
}

impl RedisServer {
    /// Starts a plain server (no password, no TLS).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra arguments (`--requirepass x`, TLS settings, …). The port
    /// given is `--port`, unless the arguments use it for `--tls-port` (then pass `{port}` in
    /// them and `--port 0` is added).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::closed_port();
        let tls = extra.iter().any(|a| a.contains("{port}"));
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        if tls {
            args.extend(["--port".into(), "0".into()]);
        } else {
            args.extend(["--port".into(), port.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.replace("{port}", &port.to_string())));
        let mut s = RedisServer {
            port,
            args,
            child: None,
            dir: dir.path().to_owned(),
            _dir: dir,
        };
        s.restart();
        s
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (an outage). Data is gone: it keeps nothing on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again on the same port, and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Ours, and answering: the process is alive and a PING gets a Redis answer.
            let alive = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none());
            assert!(alive, "redis-server exited (port {} taken?)", self.port);
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let pong = self.command(&["PING"]);
                if pong.starts_with("+PONG") || pong.starts_with("-NOAUTH") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command with `redis-cli`-free RESP and returns the raw reply (for checks).
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("write");
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
