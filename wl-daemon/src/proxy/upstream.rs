//! Upstream HTTP clients: pooled, one set per (host, port, destination address).
//!
//! A connection always goes to the address the agent was connecting to (the original
//! destination), and over TLS it is verified for the host name the agent asked for, against
//! public roots plus `tls.upstream_extra_roots`. Keying pools by destination too means an
//! agent that connects to an unusual address for a host never sends another agent's
//! requests there.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Distinct (host, destination) pairs kept; beyond that the oldest pool is dropped.
const MAX_POOLS: usize = 1024;

/// A connector that ignores the URI's host and connects to one fixed address.
#[derive(Clone, Debug)]
pub struct FixedDest(pub SocketAddr);

impl tower_service::Service<Uri> for FixedDest {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dst = self.0;
        Box::pin(async move {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await.map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {dst} timed out"),
                    )
                })??;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}

/// The body of a forwarded request: the agent's, counted.
pub type UpBody = super::http::Counted<super::http::UpstreamBody>;
/// A verified-TLS client for one destination.
pub type TlsClient = Client<HttpsConnector<FixedDest>, UpBody>;
/// A plain-HTTP client for one destination.
pub type PlainClient = Client<FixedDest, UpBody>;

/// The clients of one (host, port, destination).
#[derive(Clone)]
pub struct Pools {
    /// HTTP/2 or HTTP/1.1 as ALPN decides.
    pub tls: TlsClient,
    /// HTTP/1.1 only: upgrades (WebSocket) need it.
    pub tls_h1: TlsClient,
    /// Plain HTTP.
    pub plain: PlainClient,
}

/// Host, port and destination address.
type PoolKey = (String, u16, SocketAddr);

/// Idle connections kept per upstream (host, destination).
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// All upstream pools.
pub struct Upstreams {
    tls: rustls::ClientConfig,
    /// The pools, and their keys in creation order (for eviction).
    pools: Mutex<(HashMap<PoolKey, Pools>, Vec<PoolKey>)>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Pools that verify upstream TLS with `tls`.
    pub fn new(tls: rustls::ClientConfig) -> Arc<Self> {
        Arc::new(Self { tls, pools: Mutex::new((HashMap::new(), Vec::new())) })
    }

    /// The pools for `host:port` at `dst`, created on first use.
    pub fn pools(&self, host: &str, port: u16, dst: SocketAddr) -> Pools {
        let key = (host.to_owned(), port, dst);
        let mut guard = self.pools.lock().expect("upstream pools poisoned");
        if let Some(p) = guard.0.get(&key) {
            return p.clone();
        }
        let connector = FixedDest(dst);
        let https = |h2: bool| {
            let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(self.tls.clone()).https_only();
            if h2 {
                b.enable_http1().enable_http2().wrap_connector(connector.clone())
            } else {
                b.enable_http1().wrap_connector(connector.clone())
            }
        };
        let mut builder = Client::builder(TokioExecutor::new());
        // Idle connections kept per upstream: enough for bursts from many agents, so that a
        // burst does not open (TLS handshake) and then close connections by the thousand.
        builder.pool_idle_timeout(Duration::from_secs(90)).pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM);
        let pools = Pools {
            tls: builder.build(https(true)),
            tls_h1: builder.build(https(false)),
            plain: builder.build(connector.clone()),
        };
        if guard.0.len() >= MAX_POOLS && !guard.1.is_empty() {
            let oldest = guard.1.remove(0);
            guard.0.remove(&oldest);
        }
        guard.1.push(key.clone());
        guard.0.insert(key, pools.clone());
        pools
    }
}
