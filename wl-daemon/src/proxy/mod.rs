//! The proxy: listeners in, connections handled to completion out.
//!
//! For every accepted connection: take the kernel's record (original destination and
//! caller), resolve the agent's identity, connect to the original destination (the
//! daemon's own connects are exempt from redirection), relay bytes both ways unchanged, and
//! write one audit record when the connection ends. TLS termination builds on this path.

pub mod splice;

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
    intercept::{identity::IdentityResolver, original_destination, Interceptor},
};

/// How long connecting to an original destination may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })?;
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
    next_id: AtomicU64,
}

impl Shared {
    /// Bundles the parts.
    pub fn new(interceptor: Interceptor, identities: IdentityResolver, audit: AuditLog) -> Self {
        Self {
            interceptor,
            identities,
            audit,
            next_id: AtomicU64::new(1),
        }
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
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = stop_accept.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let stop = stop_conns.clone();
                let listener_addr = local.map(|a| a.to_string()).unwrap_or_default();
                tracker
                    .spawn(async move { handle(stream, peer, listener_addr, shared, stop).await });
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    agent: TcpStream,
    peer: SocketAddr,
    listener: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let conn_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut record = ConnectionRecord {
        conn_id,
        listener,
        peer: peer.to_string(),
        dst: None,
        agent: None,
        action: "refused",
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
        error: None,
    };
    let Some(kernel) = shared.interceptor.take_record(peer) else {
        // Someone connected to the listener directly, or the record aged out.
        tracing::warn!(conn_id, %peer, "connection without an interception record: closed");
        record.error =
            Some("no interception record for this connection (not redirected by wl)".into());
        shared
            .audit
            .record(AuditRecord::Connection(Box::new(record)));
        return;
    };
    let dst = original_destination(&kernel);
    let identity = shared.identities.resolve(&kernel);
    tracing::info!(
        conn_id, %dst, pid = identity.pid, uid = identity.uid, comm = %identity.comm,
        cgroup = identity.cgroup.as_deref().unwrap_or("?"), "intercepted connection"
    );
    record.dst = Some(dst.to_string());
    record.agent = Some(identity);

    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                record.error = Some(format!("connecting to {dst}: {e}"));
                return finish(&shared, record, started);
            }
            Err(_) => {
                record.error = Some(format!(
                    "connecting to {dst}: timed out after {UPSTREAM_CONNECT_TIMEOUT:?}"
                ));
                return finish(&shared, record, started);
            }
        };
    let _ = agent.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    record.action = "splice";
    let relay = splice::relay(&agent, &upstream);
    tokio::select! {
        result = relay => match result {
            Ok((up, down)) => {
                record.bytes_up = up;
                record.bytes_down = down;
            }
            Err(e) => record.error = Some(format!("relay: {e}")),
        },
        _ = stop.cancelled() => record.error = Some("closed: wl-daemon shutting down".into()),
    }
    finish(&shared, record, started);
}

fn finish(shared: &Shared, mut record: ConnectionRecord, started: Instant) {
    record.duration_ms = started.elapsed().as_millis() as u64;
    if let Some(e) = &record.error {
        tracing::debug!(conn_id = record.conn_id, error = %e, "connection ended with an error");
    }
    shared
        .audit
        .record(AuditRecord::Connection(Box::new(record)));
}
