//! The end-to-end test harness: the real `outpost` binary started on a temporary manifest with
//! listeners on port 0, a real backend (HTTP/1.1, h2c, TLS, WebSocket, gRPC trailers) on port 0,
//! and certificates made for each test.

pub mod appinsights;
pub mod backend;
pub mod certs;
pub mod control;
pub mod gateway;
pub mod redis;

pub use appinsights::{Ingestion, Reply};
pub use backend::{Backend, BackendOptions};
pub use certs::{Ca, Leaf};
pub use control::ControlPlane;
pub use gateway::{Gateway, GatewaySpec};
pub use redis::RedisServer;

/// A port that was free a moment ago and now has nothing listening: for "backend down".
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Installs the rustls crypto provider used by test clients (once).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A listening socket that never accepts, its backlog filled: connecting to it hangs (the
/// kernel drops further SYNs), as with a black-holed backend. Keep the returned values alive.
pub fn black_hole() -> (
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    socket2::Socket,
) {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    sock.bind(&addr.into()).expect("bind");
    sock.listen(0).expect("listen");
    let addr = sock.local_addr().expect("addr").as_socket().expect("inet");
    // Fill the accept queue; stop when a connect no longer completes.
    let mut held = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    (addr, held, sock)
}
