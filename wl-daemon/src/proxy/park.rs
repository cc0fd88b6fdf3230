//! HTTP/1.1 keep-alive connections that are parked while idle.
//!
//! hyper keeps a whole HTTP/1 connection's state for as long as the connection is open:
//! read and write buffers (8 KiB each, no smaller setting), the dispatcher and its
//! timers, about 25 KiB in all. Agents keep connections open between calls, often for a
//! minute, so a host with thousands of agent connections would spend most of wl's memory on
//! connections that are doing nothing. Here a connection that has been idle for
//! [`PARK_AFTER`] is handed back by hyper and parked: only its TLS session remains. When
//! the agent sends its next request, a new hyper connection takes the stream over with
//! the bytes already read, and the agent notices nothing: no byte is lost or added.
//!
//! How hyper is made to hand the connection back: every request is an exchange, open from
//! the moment the service is called until hyper drops the response body (it is fully
//! written, or the connection failed). When hyper asks for bytes, none are there and no
//! exchange is open, hyper is waiting for the next request head; if that lasts
//! [`PARK_AFTER`], a graceful shutdown makes hyper close its side as it does for an idle
//! keep-alive connection, except that the I/O's shutdown is swallowed ([`Parkable`]), so
//! the stream stays open, and `into_parts` returns it with anything hyper had read ahead.
//! Should hyper not be idle after all, graceful shutdown only ends keep-alive after the
//! current exchange, which costs the agent a reconnect and nothing more.
//!
//! A parked connection whose next request arrives waits for a resume slot
//! (`admission::Gate::resumptions`) before hyper takes it over, and gives the slot back as
//! soon as its request is answered (hyper waits for bytes with no exchange open) or the
//! slot's lease runs out (a long LLM call must not hold the gate). When thousands of
//! agents call at once, the requests over the limit wait in the kernel's socket buffers
//! rather than each in a live hyper connection.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::Service,
    Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::admission::{Gate, Slot};
use crate::metrics::METRICS;

/// How long a keep-alive connection waits for its next request inside hyper before it is
/// parked. Long enough that a busy connection never pays for parking, short enough that
/// most idle time is spent parked.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// How long a keep-alive connection may be idle (parked or not) before wl closes it, and
/// how long a request head may take to arrive.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);

/// What the connection's I/O and its exchanges tell the serving loop.
#[derive(Debug, Default)]
struct IdleWatch {
    /// Exchanges whose response hyper has not finished with.
    open_exchanges: AtomicUsize,
    /// hyper asked for bytes, none were there, and no exchange was open.
    idle: AtomicBool,
    /// Bumped whenever bytes arrive or an exchange starts: a park timer armed before a
    /// change is stale.
    activity: AtomicU64,
    /// A graceful shutdown was started to park: the I/O's shutdown is not passed on.
    parking: AtomicBool,
}

impl IdleWatch {
    fn busy(&self) {
        self.idle.store(false, Ordering::Relaxed);
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request and its response, open until hyper drops the response body.
#[derive(Debug)]
struct Exchange(Arc<IdleWatch>);

impl Exchange {
    fn begin(watch: &Arc<IdleWatch>) -> Self {
        watch.open_exchanges.fetch_add(1, Ordering::Relaxed);
        watch.busy();
        Self(watch.clone())
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.open_exchanges.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its exchange open while hyper holds it.
pub struct Tracked<B> {
    body: B,
    _exchange: Exchange,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The agent's stream as hyper sees it: first the bytes read before hyper took it over,
/// then the stream. Notes when hyper waits for bytes with no exchange open, and while
/// parking, does not pass hyper's shutdown on.
pub struct Parkable<IO> {
    io: IO,
    prefix: Bytes,
    watch: Arc<IdleWatch>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Parkable<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match &polled {
            Poll::Pending => {
                if this.watch.open_exchanges.load(Ordering::Relaxed) == 0 {
                    this.watch.idle.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.watch.busy(),
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Parkable<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.watch.parking.load(Ordering::Relaxed) {
            // hyper closes its side to hand the connection back; the stream stays open.
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// How one hyper connection on the stream ended.
enum Episode<IO> {
    /// The connection is over (closed by either side, upgraded, or failed).
    Done(Result<(), String>),
    /// Idle and handed back: the stream, with what hyper had read ahead.
    Parked(Parkable<IO>),
}

/// Serves HTTP/1.1 (with upgrades) on `io` until the agent is done, parking the
/// connection whenever it idles for [`PARK_AFTER`] and closing it after
/// [`KEEP_ALIVE_IDLE`] without a request. A parked connection resumes through
/// `resumptions`.
pub async fn serve_http1<IO, S, B>(io: IO, service: S, resumptions: &Gate) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let watch = Arc::new(IdleWatch::default());
    let mut io = Parkable { io, prefix: Bytes::new(), watch: watch.clone() };
    // A new connection's first request came through the handshake gate.
    let mut slot = None;
    loop {
        io = match serve_until_idle(io, &watch, service.clone(), slot.take()).await {
            Episode::Done(result) => return result,
            Episode::Parked(io) => io,
        };
        if io.prefix.is_empty() {
            let _parked = crate::metrics::InFlight::enter(&METRICS.connections_parked);
            // The first bytes of the next request; hyper reads the rest.
            let mut first = [0u8; 64];
            match tokio::time::timeout(KEEP_ALIVE_IDLE, io.io.read(&mut first)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => io.prefix = Bytes::copy_from_slice(&first[..n]),
                Ok(Err(e)) => return Err(format!("reading the next request: {e}")),
                Err(_) => {
                    // Idle for too long: close as hyper would (TLS close_notify, FIN).
                    let _ = io.io.shutdown().await;
                    return Ok(());
                }
            }
        }
        slot = Some(resumptions.enter().await);
    }
}

/// Runs one hyper connection on `io` until it ends or has been idle for [`PARK_AFTER`],
/// holding `slot` (if any) until hyper is idle or the slot's lease runs out.
async fn serve_until_idle<IO, S, B>(
    io: Parkable<IO>,
    watch: &Arc<IdleWatch>,
    service: S,
    mut slot: Option<Slot>,
) -> Episode<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + Unpin + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    watch.idle.store(false, Ordering::Relaxed);
    watch.parking.store(false, Ordering::Relaxed);
    let tracked = TrackExchanges { inner: service, watch: watch.clone() };
    // Boxed: while parked, none of hyper's state stays in the connection's task.
    let mut conn = Box::new(
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(KEEP_ALIVE_IDLE)
            .serve_connection(TokioIo::new(io), tracked)
            .with_upgrades(),
    );
    let mut park_timer: Option<(Pin<Box<tokio::time::Sleep>>, u64)> = None;
    let mut lease = slot.as_ref().map(|s| Box::pin(tokio::time::sleep_until(s.expires())));
    let result = std::future::poll_fn(|cx| loop {
        if let Poll::Ready(result) = Pin::new(&mut *conn).poll(cx) {
            return Poll::Ready(result);
        }
        if let Some(expiry) = lease.as_mut() {
            // The request is answered, or it has had the slot long enough.
            if watch.idle.load(Ordering::Relaxed) || expiry.as_mut().poll(cx).is_ready() {
                slot = None;
                lease = None;
            }
        }
        if watch.parking.load(Ordering::Relaxed) || !watch.idle.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        // Idle: park once nothing has happened for PARK_AFTER.
        let (timer, armed_at) = park_timer.get_or_insert_with(|| {
            (Box::pin(tokio::time::sleep(PARK_AFTER)), watch.activity.load(Ordering::Relaxed))
        });
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let activity = watch.activity.load(Ordering::Relaxed);
        if activity != *armed_at {
            // Requests came and went since it was armed: wait a whole period again.
            *armed_at = activity;
            timer.as_mut().reset(tokio::time::Instant::now() + PARK_AFTER);
            let _ = timer.as_mut().poll(cx);
            return Poll::Pending;
        }
        watch.parking.store(true, Ordering::Relaxed);
        Pin::new(&mut *conn).graceful_shutdown();
    })
    .await;
    let parking = watch.parking.load(Ordering::Relaxed);
    match (result, parking) {
        (Ok(()), true) => match conn.into_parts() {
            Some(parts) => {
                let mut io = parts.io.into_inner();
                // `read_buf` is a view of hyper's whole read buffer (8 KiB or more), empty
                // or not: keeping it would keep that buffer for as long as the connection
                // is parked. What hyper read ahead, if anything, is copied out.
                io.prefix = if parts.read_buf.is_empty() {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&parts.read_buf)
                };
                Episode::Parked(io)
            }
            // Upgraded meanwhile: the upgrade owns the stream now.
            None => Episode::Done(Ok(())),
        },
        (result, _) => Episode::Done(result.map_err(|e| e.to_string())),
    }
}

/// The service, with each call's response body keeping its exchange open.
#[derive(Clone)]
struct TrackExchanges<S> {
    inner: S,
    watch: Arc<IdleWatch>,
}

impl<S, B> Service<Request<Incoming>> for TrackExchanges<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<Tracked<B>>;
    type Error = Infallible;
    type Future = TrackedCall<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        TrackedCall { call: self.inner.call(req), exchange: Some(Exchange::begin(&self.watch)) }
    }
}

pin_project_lite::pin_project! {
    /// A service call whose exchange moves into the response body when it is ready.
    pub struct TrackedCall<F> {
        #[pin]
        call: F,
        exchange: Option<Exchange>,
    }
}

impl<F, B> Future for TrackedCall<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<Tracked<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.call.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return Poll::Pending,
        };
        let exchange = this.exchange.take().expect("polled after completion");
        Poll::Ready(Ok(response.map(|body| Tracked { body, _exchange: exchange })))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::proxy::admission::SLOT_LEASE;

    /// `/slow` answers after ten seconds, anything else at once.
    async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }

    /// A connection served with `gate`, parked once its first request is answered.
    async fn parked_connection(gate: &Gate) -> DuplexStream {
        let (agent, daemon) = tokio::io::duplex(64 * 1024);
        let gate = gate.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            serve_http1(daemon, service, &gate).await
        });
        let mut agent = agent;
        exchange(&mut agent, "/").await;
        tokio::time::sleep(PARK_AFTER * 2).await;
        agent
    }

    /// Sends a GET for `path` and reads the response to its end.
    async fn exchange(agent: &mut DuplexStream, path: &str) -> String {
        agent.write_all(format!("GET {path} HTTP/1.1\r\nhost: wl.test\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = agent.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_connection_holds_its_slot_until_answered_or_for_the_lease() {
        let gate = Gate::resumptions(1);
        let mut a = parked_connection(&gate).await;
        let mut b = parked_connection(&gate).await;

        // A quick request gives the slot back when it is answered: the next one does not
        // wait for the lease.
        let started = tokio::time::Instant::now();
        assert!(exchange(&mut a, "/").await.starts_with("HTTP/1.1 200"));
        assert!(exchange(&mut b, "/").await.starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() < PARK_AFTER / 2, "{:?}", started.elapsed());
        tokio::time::sleep(PARK_AFTER * 2).await;

        // A slow one holds the only slot for the lease, then lets the next through long
        // before it is answered itself.
        let slow = tokio::spawn(async move { exchange(&mut a, "/slow").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        assert!(exchange(&mut b, "/").await.starts_with("HTTP/1.1 200"));
        let waited = started.elapsed();
        assert!(waited >= SLOT_LEASE - Duration::from_millis(20), "waited {waited:?}");
        assert!(waited < Duration::from_secs(1), "waited {waited:?}");
        assert!(!slow.is_finished());
        assert!(slow.await.unwrap().starts_with("HTTP/1.1 200"));
    }
}
