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

/// Connections being opened (TCP and TLS) at once per upstream (host, destination).
///
/// When many agent requests arrive together, each that finds no idle pooled connection
/// opens one (hyper-util's pool races a new connection against an idle one coming back),
/// so a burst from thousands of agents opened thousands of upstream TLS connections, most
/// closed again soon after, each holding tens of kilobytes meanwhile. With a bound on
/// connections being opened, the requests over it wait for whichever comes first: an
/// idle connection or a free slot. It bounds only the opening: long streams (SSE,
/// WebSockets) on open connections take no slot.
const MAX_CONNECTING_PER_UPSTREAM: usize = 32;

/// A connector that opens at most a fixed number of connections at once.
#[derive(Clone, Debug)]
pub struct Throttled<C> {
    inner: C,
    slots: Arc<tokio::sync::Semaphore>,
}

impl<C> tower_service::Service<Uri> for Throttled<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Response: Send,
    C::Error: Send,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let slots = self.slots.clone();
        // The clone that was made ready is the one to call (tower's contract).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // The semaphore is never closed.
            let _slot = slots.acquire_owned().await.expect("connect slots stay open");
            ready.call(uri).await
        })
    }
}

/// The body of a forwarded request: the agent's, counted.
pub type UpBody = super::http::Counted<super::http::UpstreamBody>;
/// A verified-TLS client for one destination.
pub type TlsClient = Client<Throttled<HttpsConnector<FixedDest>>, UpBody>;
/// A plain-HTTP client for one destination.
pub type PlainClient = Client<Throttled<FixedDest>, UpBody>;

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
        // One bound for the three clients: they open connections to the same place.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTING_PER_UPSTREAM));
        let https = |h2: bool| {
            let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(self.tls.clone()).https_only();
            let inner = if h2 {
                b.enable_http1().enable_http2().wrap_connector(connector.clone())
            } else {
                b.enable_http1().wrap_connector(connector.clone())
            };
            Throttled { inner, slots: slots.clone() }
        };
        let mut builder = Client::builder(TokioExecutor::new());
        // Idle connections kept per upstream: enough for bursts from many agents, so that a
        // burst does not open (TLS handshake) and then close connections by the thousand.
        builder.pool_idle_timeout(Duration::from_secs(90)).pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM);
        let pools = Pools {
            tls: builder.build(https(true)),
            tls_h1: builder.build(https(false)),
            plain: builder.build(Throttled { inner: connector.clone(), slots: slots.clone() }),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A connector that takes a while and counts how many of its calls run at once.
    #[derive(Clone)]
    struct Slow {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }

    impl tower_service::Service<Uri> for Slow {
        type Response = ();
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _uri: Uri) -> Self::Future {
            let (now, most) = (self.now.clone(), self.most.clone());
            Box::pin(async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_burst_opens_at_most_the_bound_at_once_and_every_one_completes() {
        use tower_service::Service as _;
        let slow = Slow { now: Default::default(), most: Default::default() };
        let throttled = Throttled { inner: slow.clone(), slots: Arc::new(tokio::sync::Semaphore::new(4)) };
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let mut t = throttled.clone();
                tokio::spawn(async move { t.call(Uri::from_static("https://api.openai.com/")).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 4, "never more than the bound, and the bound is used");
        assert_eq!(slow.now.load(Ordering::SeqCst), 0);
    }
}
