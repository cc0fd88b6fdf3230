//! The explicit paths, for hosts without eBPF (containers, other kernels): a reverse-proxy
//! listener per API (`OPENAI_BASE_URL=https://HOST:9443/v1`) and an HTTP CONNECT listener
//! (`HTTPS_PROXY=http://HOST:3128`). After the listener, requests take the same path as
//! intercepted ones ([`super::http`]).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    finish,
    http::{self, json_error, ConnContext, ProxyBody, Scheme},
    Shared,
};
use crate::{audit::ConnectionRecord, config::ReverseConfig, intercept::identity::AgentIdentity};

/// Identity look-ups running at once. Each reads `/proc` (the socket's owner by
/// `sock_diag`, then the fds of that owner's processes): milliseconds on a busy host, too
/// long to block one of the runtime's threads, which serve every other connection. They
/// run on tokio's blocking pool, and a few at a time, so that a burst of connections does
/// not start a thread per look-up.
const IDENTITY_LOOKUPS: usize = 4;
static LOOKUP_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(IDENTITY_LOOKUPS);

/// The identity behind a loopback client of an explicit listener (`peer`, accepted on
/// `local`), looked up off the runtime's threads.
async fn identify(shared: &Arc<Shared>, peer: SocketAddr, local: SocketAddr) -> Option<Arc<AgentIdentity>> {
    let _slot = LOOKUP_SLOTS.acquire().await.expect("the look-up semaphore is never closed");
    let shared = shared.clone();
    match tokio::task::spawn_blocking(move || shared.identities.resolve_tcp_peer(peer, local)).await {
        Ok(agent) => agent,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => None,
    }
}

/// Resolves `host:port` (the system resolver, /etc/hosts first).
async fn resolve(target: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("resolving {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolving {target}: no addresses"))
}

/// Serves one reverse-proxy listener until `stop_accept`.
pub async fn serve_reverse(
    listener: TcpListener,
    cfg: ReverseConfig,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop_accept: CancellationToken,
    stop_conns: CancellationToken,
) {
    let cfg = Arc::new(cfg);
    let listener_name: Arc<str> = cfg.listen.to_string().into();
    loop {
        let Some((stream, peer)) = super::accept(&listener, &stop_accept).await else { return };
        let (cfg, shared, stop) = (cfg.clone(), shared.clone(), stop_conns.clone());
        let listener_name = listener_name.clone();
        tracker.spawn(async move {
            let started = Instant::now();
            let conn_id = shared.next_conn_id();
            let mut record = ConnectionRecord::new(conn_id, listener_name, peer);
            record.action = "terminate";
            record.host = Some(cfg.host.clone());
            let local = stream.local_addr().unwrap_or(cfg.listen);
            let agent = identify(&shared, peer, local).await;
            record.agent = agent.clone();
            let outcome = tokio::select! {
                r = reverse_conn(stream, &cfg, agent, conn_id, &shared, &mut record) => r,
                _ = stop.cancelled() => Err("closed: wl-daemon shutting down".into()),
            };
            record.error = outcome.err();
            finish(&shared, record, started);
        });
    }
}

async fn reverse_conn(
    stream: TcpStream,
    cfg: &ReverseConfig,
    agent: Option<Arc<AgentIdentity>>,
    conn_id: u64,
    shared: &Arc<Shared>,
    record: &mut ConnectionRecord,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let target = cfg.upstream.clone().unwrap_or_else(|| format!("{}:443", cfg.host));
    let dst = resolve(&target).await?;
    record.dst = Some(dst);
    super::decide_connect(shared, agent.as_deref(), dst, true, Some(cfg.host.clone()), record)?;
    // The listener's own names: the SNI the agent sends picks one; without SNI, the first.
    let peeked = crate::tls::hello::peek(
        &stream,
        super::MAX_CLIENT_HELLO,
        shared.tls.handshake_timeout,
        shared.tls.handshake_timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let name = match peeked {
        crate::tls::hello::Peeked::Tls { sni: Some(sni), .. } if cfg.server_names.contains(&sni) => sni,
        crate::tls::hello::Peeked::Tls { sni: None, .. } => cfg.server_names[0].clone(),
        crate::tls::hello::Peeked::Tls { sni: Some(sni), .. } => {
            return Err(format!("TLS for `{sni}`, which is not one of this listener's server_names"))
        }
        crate::tls::hello::Peeked::PlainHttp | crate::tls::hello::Peeked::Silent => {
            return Err("no TLS ClientHello on a TLS listener".into())
        }
    };
    let ctx = Arc::new(ConnContext::new(
        conn_id,
        agent,
        Some(cfg.host.clone()),
        true,
        dst,
        Scheme::Https,
        shared.clone(),
    ));
    let result = super::terminate(stream, &name, super::ShowLeaf::Chosen, ctx.clone(), shared, None).await;
    record.requests = ctx.requests();
    result
}

/// Serves the CONNECT listener until `stop_accept`.
pub async fn serve_connect(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop_accept: CancellationToken,
    stop_conns: CancellationToken,
) {
    let local: Arc<str> = listener.local_addr().map(|a| a.to_string()).unwrap_or_default().into();
    loop {
        let Some((stream, peer)) = super::accept(&listener, &stop_accept).await else { return };
        let (shared, stop, local) = (shared.clone(), stop_conns.clone(), local.clone());
        let tracker2 = tracker.clone();
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            let service = service_fn(move |req| {
                let (shared, stop, local, tracker) =
                    (shared.clone(), stop.clone(), local.clone(), tracker2.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        connect_request(req, peer, local, shared, tracker, stop).await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn connect_request(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    listener: Arc<str>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> Response<ProxyBody> {
    if req.method() != Method::CONNECT {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "wl_bad_request",
            "this listener only serves CONNECT (use it as HTTPS_PROXY)",
            "-",
        );
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return json_error(StatusCode::BAD_REQUEST, "wl_bad_request", "CONNECT needs host:port", "-");
    };
    let host = http::normalize_host(authority.as_str());
    let port = authority.port_u16().unwrap_or(443);
    let dst = match resolve(&format!("{}:{port}", authority.host())).await {
        Ok(d) => d,
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, "wl_upstream_error", &e, "-"),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tracker.spawn(async move {
        let started = Instant::now();
        let conn_id = shared.next_conn_id();
        let mut record = ConnectionRecord::new(conn_id, listener, peer);
        record.dst = Some(dst);
        record.host = Some(host.clone());
        // The listener's address is the accepted socket's (listeners are on loopback
        // addresses, never unspecified ones).
        let local = record.listener.parse().unwrap_or(peer);
        let agent = identify(&shared, peer, local).await;
        record.agent = agent.clone();
        let outcome = tokio::select! {
            r = tunnel(upgrade, host, dst, agent, conn_id, &shared, &mut record) => r,
            _ = stop.cancelled() => Err("closed: wl-daemon shutting down".into()),
        };
        record.error = outcome.err();
        finish(&shared, record, started);
    });
    Response::new(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
}

async fn tunnel(
    upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    dst: SocketAddr,
    agent: Option<Arc<AgentIdentity>>,
    conn_id: u64,
    shared: &Arc<Shared>,
    record: &mut ConnectionRecord,
) -> Result<(), String> {
    let upgraded = TokioIo::new(upgrade.await.map_err(|e| format!("CONNECT upgrade: {e}"))?);
    super::decide_connect(
        shared,
        agent.as_deref(),
        dst,
        shared.tls.is_governed(&host),
        Some(host.clone()),
        record,
    )?;
    if shared.tls.is_governed(&host) {
        record.action = "terminate";
        let ctx = Arc::new(ConnContext::new(
            conn_id,
            agent,
            Some(host.clone()),
            false,
            dst,
            Scheme::Https,
            shared.clone(),
        ));
        let result =
            super::terminate(upgraded, &host, super::ShowLeaf::Chosen, ctx.clone(), shared, None).await;
        record.requests = ctx.requests();
        result
    } else {
        record.action = "splice";
        let mut upgraded = upgraded;
        let mut upstream = TcpStream::connect(dst).await.map_err(|e| format!("connecting to {dst}: {e}"))?;
        let _ = upstream.set_nodelay(true);
        let (up, down) = tokio::io::copy_bidirectional(&mut upgraded, &mut upstream)
            .await
            .map_err(|e| format!("relay: {e}"))?;
        record.bytes_up = up;
        record.bytes_down = down;
        Ok(())
    }
}
