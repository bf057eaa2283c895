//! The end-to-end test harness: the real `outpost` binary started on a temporary manifest with
//! listeners on port 0, a real backend (HTTP/1.1, h2c, TLS, WebSocket, gRPC trailers) on port 0,
//! and certificates made for each test.

pub mod backend;
pub mod certs;
pub mod gateway;

pub use backend::{Backend, BackendOptions};
pub use certs::{Ca, Leaf};
pub use gateway::{Gateway, GatewaySpec};

/// A port that was free a moment ago and now has nothing listening: for "backend down".
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Installs the rustls crypto provider used by test clients (once).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
