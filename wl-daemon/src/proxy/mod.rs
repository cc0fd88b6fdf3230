//! The proxy: listeners in, connections handled to completion out.
//!
//! For every accepted connection: take the kernel's record (original destination and
//! caller), resolve the agent's identity, connect to the original destination (the
//! daemon's own connects are exempt from redirection), relay bytes both ways unchanged, and
//! write one audit record when the connection ends. TLS termination builds on this path.

pub mod admission;
pub mod credential;
pub mod explicit;
pub mod http;
pub mod park;
pub mod splice;
pub mod upstream;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    audit::{AuditLog, AuditRecord, ConnectionRecord},
    config::Mode,
    config::TlsConfig,
    intercept::{identity::IdentityResolver, original_destination, relay::RelayedConnection, Interceptor},
    policy::{facts::ConnectFacts, EntityCache, PolicyStore},
    tls::{
        hello::{self, Peeked},
        leaf::LeafCache,
    },
};

/// How long connecting to an original destination may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a stream that is neither TLS nor HTTP is refused rather than spliced.
const HTTPS_PORT: u16 = 443;
/// Most bytes peeked for a ClientHello (the largest seen in practice are a few KiB).
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// Errors binding listeners.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another wl-daemon or program using it? change intercept.listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds every listener address; port 0 picks a free port.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, ProxyError> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let listener = TcpListener::bind(addr).await.map_err(|source| ProxyError::Bind { addr, source })?;
        out.push(listener);
    }
    Ok(out)
}

/// What every connection handler needs.
#[derive(Debug)]
pub struct Shared {
    /// The kernel side: connection records.
    pub interceptor: Interceptor,
    /// Identity enrichment.
    pub identities: IdentityResolver,
    /// The audit trail.
    pub audit: AuditLog,
    /// `[tls]`.
    pub tls: TlsConfig,
    /// Leaf certificates.
    pub leaves: Arc<LeafCache>,
    /// The agents' side of terminated TLS.
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Pooled upstream clients.
    pub upstreams: Arc<upstream::Upstreams>,
    /// `intercept.server_first_after`.
    pub server_first_after: Duration,
    /// Cedar policies and modes.
    pub policy: Arc<PolicyStore>,
    /// Policy entities by agent process and host.
    pub entities: EntityCache,
    /// `policy.body_limit`.
    pub body_limit: usize,
    /// `audit.durable`: in enforce, decisions are fsynced before requests are forwarded.
    pub audit_durable: bool,
    /// `[[credential]]` bindings and the broker (none configured: `None`).
    pub credentials: Option<credential::Credentials>,
    /// Handshake slots for new connections.
    pub admission: admission::Gate,
    /// Slots for parked connections that resume.
    pub resumptions: admission::Gate,
    next_id: AtomicU64,
}

impl Shared {
    /// Bundles the parts.
    pub fn new(
        interceptor: Interceptor,
        identities: IdentityResolver,
        audit: AuditLog,
        tls: TlsConfig,
        leaves: Arc<LeafCache>,
        server_tls: Arc<rustls::ServerConfig>,
        upstreams: Arc<upstream::Upstreams>,
    ) -> Self {
        Self {
            interceptor,
            identities,
            audit,
            tls,
            leaves,
            server_tls,
            upstreams,
            server_first_after: Duration::from_millis(300),
            policy: Arc::new(
                PolicyStore::load(None, crate::config::Mode::Observe, Default::default())
                    .expect("the built-in policies load"),
            ),
            body_limit: 64 * 1024,
            audit_durable: true,
            credentials: None,
            entities: EntityCache::default(),
            admission: admission::Gate::default(),
            resumptions: admission::Gate::resumptions(admission::RESUME_SLOTS),
            next_id: AtomicU64::new(1),
        }
    }

    /// A new connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Accepts on `listener` until `stop_accept` is cancelled; each connection runs on
/// `tracker` until it ends or `stop_conns` is cancelled.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop_accept: CancellationToken,
    stop_conns: CancellationToken,
) {
    // Formatted once: every connection's record shares it.
    let listener_addr: Arc<str> = listener.local_addr().map(|a| a.to_string()).unwrap_or_default().into();
    loop {
        let Some((stream, peer)) = accept(&listener, &stop_accept).await else { return };
        let shared = shared.clone();
        let stop = stop_conns.clone();
        let listener_addr = listener_addr.clone();
        tracker.spawn(async move { handle(stream, peer, listener_addr, shared, stop).await });
    }
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. Accept errors
/// (EMFILE and friends) are logged and retried after a pause rather than spun on.
pub async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            a = listener.accept() => match a {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn handle(
    agent: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let conn_id = shared.next_conn_id();
    let mut record = ConnectionRecord::new(conn_id, listener, peer);
    let Some(kernel) = shared.interceptor.take_record(peer) else {
        // Someone connected to the listener directly, or the record aged out.
        tracing::warn!(conn_id, %peer, "connection without an interception record: closed");
        record.error = Some("no interception record for this connection (not redirected by wl)".into());
        return finish(&shared, record, started);
    };
    let dst = original_destination(&kernel);
    let identity = shared.identities.resolve(&kernel);
    tracing::info!(
        conn_id, %dst, pid = identity.pid, uid = identity.uid, comm = %identity.comm,
        cgroup = identity.cgroup.as_deref().unwrap_or("?"), "intercepted connection"
    );
    record.dst = Some(dst);
    record.agent = Some(identity.clone());
    // The agent socket is in the kernel relay's map from its connect on (when the relay is
    // on); the connection's entries go when this does.
    let relayed = shared.interceptor.relay().map(|r| r.connection(kernel.cookie, peer));

    // Boxed: a connection waiting for its handshake slot keeps only this small future, not
    // the space of everything it will do once admitted.
    let admitted = Box::pin(async {
        let slot = shared.admission.enter().await;
        dispatch(agent, dst, identity, conn_id, &shared, &mut record, slot, relayed).await
    });
    let outcome = tokio::select! {
        outcome = admitted => outcome,
        _ = stop.cancelled() => Err("closed: wl-daemon shutting down".into()),
    };
    if let Err(e) = outcome {
        record.error = Some(e);
    }
    finish(&shared, record, started);
}

/// Decides what happens to an intercepted connection from its first bytes.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn dispatch(
    agent: TcpStream,
    dst: SocketAddr,
    identity: Arc<crate::intercept::identity::AgentIdentity>,
    conn_id: u64,
    shared: &Arc<Shared>,
    record: &mut ConnectionRecord,
    mut slot: admission::Slot,
    relayed: Option<RelayedConnection<'_>>,
) -> Result<(), String> {
    let peeked = slot
        .hold(hello::peek(&agent, MAX_CLIENT_HELLO, shared.server_first_after, shared.tls.handshake_timeout))
        .await;
    let peeked = match peeked {
        Ok(p) => p,
        // Another protocol on a port other than HTTPS's: wl cannot read it, so it passes
        // untouched, as it would without wl. On 443 a non-TLS stream is refused: nothing
        // legitimate speaks it there, and it must not become a way around governance.
        Err(hello::PeekError::Unknown(_)) if dst.port() != HTTPS_PORT => {
            drop(slot);
            return splice_to(agent, dst, record, relayed).await;
        }
        Err(e) => return Err(e.to_string()),
    };
    let (tls, sni) = match &peeked {
        Peeked::Tls { sni, .. } => (true, sni.clone()),
        _ => (false, None),
    };
    if let Err(denied) = decide_connect(shared, Some(&*identity), dst, tls, sni, record) {
        // Reset, not a clean close: the agent must not mistake it for an empty answer.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = nix::sys::socket::setsockopt(&agent, nix::sys::socket::sockopt::Linger, &linger);
        return Err(denied);
    }
    // The slot stays with a connection only through its TLS handshake: every other way on
    // (splice, plain HTTP) frees it first, since those can last as long as the connection.
    // Where wl serves the connection itself, dropping `relayed` takes the agent's socket out
    // of the kernel relay, back to the kernel's plain TCP code.
    match peeked {
        Peeked::Tls { sni: Some(sni), .. } if shared.tls.is_governed(&sni) => {
            drop(relayed);
            record.action = "terminate";
            record.host = Some(sni.clone());
            let _ = agent.set_nodelay(true);
            let ctx = Arc::new(http::ConnContext::new(
                conn_id,
                Some(identity),
                Some(sni.clone()),
                false,
                dst,
                http::Scheme::Https,
                shared.clone(),
            ));
            let result = terminate(agent, &sni, ShowLeaf::ForSni, ctx.clone(), shared, Some(slot)).await;
            record.requests = ctx.requests();
            result
        }
        Peeked::Tls { sni, .. } => {
            // Not governed: the agent talks to the real server, certificate and all.
            drop(slot);
            record.host = sni;
            splice_to(agent, dst, record, relayed).await
        }
        Peeked::Silent => {
            drop(slot);
            splice_to(agent, dst, record, relayed).await
        }
        Peeked::PlainHttp => {
            drop(slot);
            drop(relayed);
            record.action = "http";
            let _ = agent.set_nodelay(true);
            let ctx = Arc::new(http::ConnContext::new(
                conn_id,
                Some(identity),
                None,
                false,
                dst,
                http::Scheme::Http,
                shared.clone(),
            ));
            let result = http::serve(agent, ctx.clone(), http::Protocol::Detect).await;
            record.requests = ctx.requests();
            result
        }
    }
}

/// How the certificate shown to the agent is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShowLeaf {
    /// By the ClientHello's server name: the transparent path, where that name is what
    /// made the connection one to terminate.
    ForSni,
    /// The leaf for the name the listener chose (explicit listeners): a client that
    /// connects by IP address (`https://127.0.0.1:9443/v1`) sends no server name.
    Chosen,
}

/// Terminates TLS for `name` on `io` with a leaf from the beacon CA and serves HTTP on it.
/// The handshake runs in the connection's admission `slot` (one is taken when the caller
/// has none), which is freed as soon as it is done.
pub async fn terminate<IO>(
    io: IO,
    name: &str,
    show: ShowLeaf,
    ctx: Arc<http::ConnContext>,
    shared: &Shared,
    slot: Option<admission::Slot>,
) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut slot = match slot {
        Some(slot) => slot,
        None => shared.admission.enter().await,
    };
    let leaf = slot.hold(shared.leaves.get(name)).await.map_err(|e| e.to_string())?;
    let config = match show {
        ShowLeaf::ForSni => shared.server_tls.clone(),
        ShowLeaf::Chosen => {
            // The shared configuration (session tickets and cache included) with this
            // connection's certificate: a few small allocations, explicit listeners only.
            let mut config = (*shared.server_tls).clone();
            config.cert_resolver = Arc::new(crate::tls::leaf::FixedResolver(leaf));
            Arc::new(config)
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = slot
        .hold(tokio::time::timeout(shared.tls.handshake_timeout, acceptor.accept(io)))
        .await
        .map_err(|_| format!("TLS handshake not finished within {:?}", shared.tls.handshake_timeout))?
        .map_err(|e| format!("TLS handshake with the agent failed: {e}"))?;
    drop(slot);
    let protocol = http::Protocol::from_alpn(tls.get_ref().1.alpn_protocol());
    http::serve(tls, ctx, protocol).await
}

/// Decides `Connect`; in enforce a denial ends the connection (the caller drops it).
pub fn decide_connect(
    shared: &Shared,
    agent: Option<&crate::intercept::identity::AgentIdentity>,
    dst: SocketAddr,
    tls: bool,
    sni: Option<String>,
    record: &mut ConnectionRecord,
) -> Result<(), String> {
    let host = sni.clone().unwrap_or_else(|| dst.ip().to_string());
    let entities = shared.entities.get(agent, &host);
    let facts = ConnectFacts { ip: dst.ip(), port: dst.port(), tls, sni };
    let decision = shared.policy.current().decide_connect(&entities, &facts);
    let mode = shared.policy.mode_for(&host);
    record.policy = crate::audit::PolicyOutcome::new(&decision, mode);
    if decision.allow {
        return Ok(());
    }
    tracing::info!(conn_id = record.conn_id, %dst, host, policies = ?decision.policies, ?mode, "policy denies connection");
    if mode == Mode::Enforce {
        return Err(format!("connection denied by policy {}", decision.policies.join(", ")));
    }
    Ok(())
}

/// Splices the agent's connection to `dst`, with the kernel relay taking over the
/// agent-to-upstream half when the connection is in it.
async fn splice_to(
    agent: TcpStream,
    dst: SocketAddr,
    record: &mut ConnectionRecord,
    mut relayed: Option<RelayedConnection<'_>>,
) -> Result<(), String> {
    let upstream = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connecting to {dst}: {e}")),
        Err(_) => return Err(format!("connecting to {dst}: timed out after {UPSTREAM_CONNECT_TIMEOUT:?}")),
    };
    let _ = agent.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    record.action = "splice";
    if let Some(r) = relayed.as_mut() {
        if !r.join(&upstream) {
            relayed = None;
        }
    }
    let caught_up = |forwarded| {
        if let Some(r) = &relayed {
            r.forwarded(forwarded);
        }
    };
    let result = splice::relay(&agent, &upstream, caught_up).await;
    // The relay's entries go before the sockets close, so that none outlives them.
    drop(relayed);
    let relayed = result.map_err(|e| format!("relay: {e}"))?;
    record.bytes_up = relayed.up;
    record.bytes_up_kernel = relayed.up_kernel;
    record.bytes_down = relayed.down;
    Ok(())
}

/// Writes the connection's audit record.
pub fn finish(shared: &Shared, mut record: ConnectionRecord, started: Instant) {
    record.duration_ms = started.elapsed().as_millis() as u64;
    crate::metrics::METRICS.connection(record.action);
    if let Some(e) = &record.error {
        tracing::debug!(conn_id = record.conn_id, error = %e, "connection ended with an error");
    }
    shared.audit.record(AuditRecord::Connection(Box::new(record)));
}
