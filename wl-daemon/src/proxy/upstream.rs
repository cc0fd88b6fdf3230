//! Upstream HTTP clients: pooled, one set per (host, port, destination address).
//!
//! A connection always goes to the address the agent was connecting to (the original
//! destination), and over TLS it is verified for the host name the agent asked for, against
//! public roots plus `tls.upstream_extra_roots`. Keying pools by destination too means an
//! agent that connects to an unusual address for a host never sends another agent's
//! requests there.
//!
//! HTTP/2 upstreams get more than one connection when one is full ([`Lanes`]): hyper-util's
//! pool multiplexes every request on a single HTTP/2 connection, and all the agents of a
//! host share it.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    Request, Response, Uri, Version,
};
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

/// HTTP/2 streams one upstream connection carries before the next request goes to
/// another connection.
///
/// hyper-util's pool keeps one HTTP/2 connection per upstream and sends every request on
/// it; once the server's limit on concurrent streams is reached, further requests wait in
/// the client until a stream ends. Every agent on the host shares that connection, so a
/// hundred agents streaming completions (SSE, minutes each) would make the next agent's
/// request wait minutes. 100 is the lowest limit RFC 9113 (section 5.1.2) recommends a
/// server to allow, so a compliant server does not make a lane's requests wait.
pub const STREAMS_PER_LANE: usize = 100;
/// HTTP/2 connections per upstream at most (1,600 concurrent streams). Past that, requests
/// go to the lane with the fewest streams and may wait there for one to end.
const MAX_LANES: usize = 16;

/// One HTTP/2-capable client (its own pool, so its own HTTP/2 connection) and the number of
/// requests on it whose response has not ended.
struct Lane {
    client: TlsClient,
    open: Arc<AtomicUsize>,
}

/// The verified-TLS clients of one upstream, used one after the other as they fill.
///
/// Requests go to the first lane with fewer than [`STREAMS_PER_LANE`] open streams; when
/// every lane is full and the upstream speaks HTTP/2, another lane (connection) opens.
/// First fit rather than least busy: traffic stays on the first lanes and a lane opened
/// for a burst goes idle and is closed by the pool's idle timeout. An HTTP/1.1 upstream
/// uses only the first lane, whose pool already opens one connection per request in
/// flight. Whether the upstream speaks HTTP/2 is learnt from its first response, so a burst
/// before any response has come back shares the first connection.
pub struct Lanes {
    lanes: [OnceLock<Lane>; MAX_LANES],
    /// Lanes in use: `lanes[..opened]` are set.
    opened: AtomicUsize,
    /// The upstream answered over HTTP/2.
    h2: AtomicBool,
    new_client: Box<dyn Fn() -> TlsClient + Send + Sync>,
}

impl Lanes {
    fn new(new_client: Box<dyn Fn() -> TlsClient + Send + Sync>) -> Self {
        let lanes: [OnceLock<Lane>; MAX_LANES] = Default::default();
        let _ = lanes[0].set(Lane { client: new_client(), open: Arc::default() });
        Self { lanes, opened: AtomicUsize::new(1), h2: AtomicBool::new(false), new_client }
    }

    /// Sends `req` on a lane with room; the returned body holds the lane's stream open
    /// until it ends or is dropped.
    pub async fn request(
        &self,
        req: Request<UpBody>,
    ) -> Result<Response<LaneBody>, hyper_util::client::legacy::Error> {
        let (lane, stream) = self.take_stream();
        let resp = lane.client.request(req).await?;
        if resp.version() == Version::HTTP_2 && !self.h2.load(Ordering::Relaxed) {
            self.h2.store(true, Ordering::Relaxed);
        }
        Ok(resp.map(|body| LaneBody { inner: body, stream: Some(stream) }))
    }

    /// Number of lanes opened so far.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Acquire)
    }

    /// Picks a lane and counts one more stream on it.
    fn take_stream(&self) -> (&Lane, OpenStream) {
        let lane = |i: usize| self.lanes[i].get().expect("lanes below `opened` are set");
        let opened = self.opened();
        if !self.h2.load(Ordering::Relaxed) {
            return (lane(0), OpenStream::new(&lane(0).open));
        }
        for i in 0..opened {
            let open = &lane(i).open;
            if open
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < STREAMS_PER_LANE).then_some(n + 1)
                })
                .is_ok()
            {
                return (lane(i), OpenStream::counted(open));
            }
        }
        if opened < MAX_LANES {
            // Whoever gets here first sets the lane; a racing request uses the same one.
            let new = self.lanes[opened].get_or_init(|| {
                crate::metrics::METRICS.upstream_lanes_added.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    lanes = opened + 1,
                    streams = opened * STREAMS_PER_LANE,
                    "every upstream HTTP/2 connection is full: opening another"
                );
                Lane { client: (self.new_client)(), open: Arc::default() }
            });
            let _ = self.opened.compare_exchange(opened, opened + 1, Ordering::AcqRel, Ordering::Acquire);
            return (new, OpenStream::new(&new.open));
        }
        let least =
            (0..opened).map(lane).min_by_key(|l| l.open.load(Ordering::Relaxed)).expect("one lane at least");
        (least, OpenStream::new(&least.open))
    }
}

/// One stream counted on a lane until dropped.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    /// Counts one more stream on `open`.
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(open.clone())
    }

    /// A stream already counted on `open`.
    fn counted(open: &Arc<AtomicUsize>) -> Self {
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream response body; one sent through [`Lanes`] keeps its lane's stream counted
/// until it ends or is dropped.
pub struct LaneBody {
    inner: Incoming,
    stream: Option<OpenStream>,
}

impl From<Incoming> for LaneBody {
    fn from(inner: Incoming) -> Self {
        Self { inner, stream: None }
    }
}

impl Body for LaneBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = poll {
            // The stream has ended: the lane has room again even if the body lives on.
            self.stream = None;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The clients of one (host, port, destination).
#[derive(Clone)]
pub struct Pools {
    /// HTTP/2 or HTTP/1.1 as ALPN decides.
    pub tls: Arc<Lanes>,
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
        let lane_builder = builder.clone();
        let lane_connector = https(true);
        let pools = Pools {
            tls: Arc::new(Lanes::new(Box::new(move || lane_builder.build(lane_connector.clone())))),
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

    /// Lanes whose clients never connect (nothing is sent in these tests).
    fn lanes() -> Lanes {
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
        Lanes::new(Box::new(move || {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(FixedDest(dst));
            let slots = Arc::new(tokio::sync::Semaphore::new(1));
            Client::builder(TokioExecutor::new()).build(Throttled { inner: connector, slots })
        }))
    }

    /// The lane a stream was put on.
    fn lane_of(lanes: &Lanes, stream: &OpenStream) -> usize {
        (0..lanes.opened()).find(|&i| Arc::ptr_eq(&lanes.lanes[i].get().unwrap().open, &stream.0)).unwrap()
    }

    #[test]
    fn http2_lanes_fill_in_order_and_open_only_when_every_one_is_full() {
        let lanes = lanes();
        lanes.h2.store(true, Ordering::Relaxed);
        let mut first: Vec<OpenStream> = (0..STREAMS_PER_LANE).map(|_| lanes.take_stream().1).collect();
        assert!(first.iter().all(|s| lane_of(&lanes, s) == 0));
        assert_eq!(lanes.opened(), 1);
        let over = lanes.take_stream().1;
        assert_eq!((lanes.opened(), lane_of(&lanes, &over)), (2, 1));
        // A stream that ends makes room on the first lane again: it is filled first.
        drop(first.pop());
        let again = lanes.take_stream().1;
        assert_eq!(lane_of(&lanes, &again), 0);
        assert_eq!(lanes.lanes[0].get().unwrap().open.load(Ordering::Relaxed), STREAMS_PER_LANE);
        drop(over);
        assert_eq!(lanes.lanes[1].get().unwrap().open.load(Ordering::Relaxed), 0, "counted until dropped");
    }

    #[test]
    fn past_the_last_lane_requests_go_to_the_least_busy() {
        let lanes = lanes();
        lanes.h2.store(true, Ordering::Relaxed);
        let mut held: Vec<OpenStream> =
            (0..MAX_LANES * STREAMS_PER_LANE).map(|_| lanes.take_stream().1).collect();
        assert_eq!(lanes.opened(), MAX_LANES);
        // Free three streams on lane 5: the next three go there, then lanes share the excess.
        held.retain({
            let mut freed = 0;
            let lanes = &lanes;
            move |s| {
                let free = lane_of(lanes, s) == 5 && freed < 3;
                freed += usize::from(free);
                !free
            }
        });
        let next: Vec<usize> = (0..3)
            .map(|_| lanes.take_stream())
            .map(|(_, s)| {
                let l = lane_of(&lanes, &s);
                held.push(s);
                l
            })
            .collect();
        assert_eq!(next, [5, 5, 5]);
        let excess = lanes.take_stream().1;
        assert_eq!(lanes.opened(), MAX_LANES, "no lane past the last");
        assert!(lane_of(&lanes, &excess) < MAX_LANES);
    }

    #[test]
    fn an_http1_upstream_uses_one_lane_whatever_the_load() {
        let lanes = lanes();
        let streams: Vec<OpenStream> = (0..3 * STREAMS_PER_LANE).map(|_| lanes.take_stream().1).collect();
        assert_eq!(lanes.opened(), 1);
        assert_eq!(lanes.lanes[0].get().unwrap().open.load(Ordering::Relaxed), streams.len());
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
