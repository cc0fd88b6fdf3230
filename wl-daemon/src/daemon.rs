//! `wl-daemon run`: wires the parts together in request-path order and runs until SIGTERM
//! or SIGINT.
//!
//! Start-up order matters: everything that can fail on bad input (config, cgroups, lock,
//! listeners, audit file) is checked before any program is attached, so a refused start
//! leaves nothing behind; listeners are bound before attaching, so no redirected
//! connection is refused for want of a listener.

use std::{fs::File, path::Path, sync::Arc};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    audit::AuditLog,
    config::{Config, FailMode},
    intercept::{self, cgroup, identity::IdentityResolver, Interceptor},
    policy::{self, PolicyStore},
    proxy::{self, explicit, upstream::Upstreams},
    reload::Reloader,
    tls::{self, ca::BeaconCa, leaf::LeafCache},
};

/// How often the policy directory is checked for changes.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Server names whose leaves are kept; the least recently added go first beyond this.
const LEAF_CACHE_CAPACITY: usize = 10_000;

/// How long open connections get to finish after SIGTERM before they are cut.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the daemon.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything can report ready: a SIGTERM right after must still shut down cleanly.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    intercept::check_capabilities()?;
    let mount = cgroup::cgroup2_mount()?;
    for name in &config.intercept.cgroups {
        cgroup::cgroup_dir(&mount, name)?;
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    let listeners = proxy::bind(&config.intercept.listen).await?;
    let bound: Vec<_> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let reverse_addrs: Vec<_> = config.reverse.iter().map(|r| r.listen).collect();
    let reverse_listeners = proxy::bind(&reverse_addrs).await?;
    let connect_listener = match &config.connect {
        Some(c) => proxy::bind(&[c.listen]).await?.pop(),
        None => None,
    };

    // TLS: the beacon CA (created on first run), leaves, both sides' configurations.
    let constraints =
        if config.tls.ca_name_constraints { config.tls.governed_hosts.clone() } else { Vec::new() };
    let ca = BeaconCa::load_or_create(&config.state_dir, &constraints)?;
    tracing::info!(
        fingerprint = %ca.fingerprint(),
        cert = %tls::ca::cert_path(&config.state_dir).display(),
        "beacon CA"
    );
    let upstream_tls = tls::upstream_config(&config.tls.upstream_extra_roots, ca.cert_der())?;
    let leaves = Arc::new(LeafCache::new(ca, config.tls.leaf_validity, LEAF_CACHE_CAPACITY));
    let server_tls = tls::server_config(leaves.clone())?;
    let upstreams = Upstreams::new(upstream_tls);

    // Policies: the directory when it exists, else the built-in set.
    let policy_dir = config.policy.dir.is_dir().then_some(config.policy.dir.as_path());
    if policy_dir.is_none() {
        tracing::info!(dir = %config.policy.dir.display(), "no policy directory: using the built-in policies");
    }
    let host_modes = config.policy.host_modes.clone().into_iter().collect();
    let policy = Arc::new(PolicyStore::load(policy_dir, config.mode, host_modes)?);
    tracing::info!(source = %policy.current().source, policies = policy.current().count, "policies loaded");

    let admin_listener = admin::bind(&config.admin_socket)?;
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on metrics.listen `{addr}`"))?,
        ),
        None => None,
    };
    let (audit, audit_writer) = AuditLog::open(&config.audit.path, config.trail_options()).await?;
    crate::metrics::METRICS.watch_leaf_cache(leaves.clone());
    let interceptor = Interceptor::start(&config.intercept, &mount, &bound)?;
    let attached = interceptor.attached().to_vec();
    let kernel_relay = interceptor.relay().is_some();

    let mut shared = proxy::Shared::new(
        interceptor,
        IdentityResolver::new(cgroup::CgroupNames::new(mount)),
        audit,
        config.tls.clone(),
        leaves,
        server_tls,
        upstreams,
    );
    shared.server_first_after = config.intercept.server_first_after;
    shared.policy = policy.clone();
    shared.body_limit = config.policy.body_limit;
    shared.audit_durable = config.audit.durable;
    if !config.credential.is_empty() {
        // The broker may start after the daemon: it is reached per request, not now.
        let broker =
            crate::broker::client::BrokerClient::new(config.broker.socket.clone(), config.broker.timeout);
        shared.credentials = Some(proxy::credential::Credentials::new(&config.credential, broker));
        tracing::info!(
            hosts = ?config.credential.iter().map(|c| c.host.as_str()).collect::<Vec<_>>(),
            broker = %config.broker.socket.display(),
            "credentials are injected for these hosts"
        );
    }
    let shared = Arc::new(shared);
    let tracker = TaskTracker::new();
    let stop_accept = CancellationToken::new();
    let stop_conns = CancellationToken::new();
    let accept_loops = TaskTracker::new();
    for listener in listeners {
        accept_loops.spawn(proxy::serve(
            listener,
            shared.clone(),
            tracker.clone(),
            stop_accept.clone(),
            stop_conns.clone(),
        ));
    }
    for (listener, cfg) in reverse_listeners.into_iter().zip(config.reverse.iter().cloned()) {
        accept_loops.spawn(explicit::serve_reverse(
            listener,
            cfg,
            shared.clone(),
            tracker.clone(),
            stop_accept.clone(),
            stop_conns.clone(),
        ));
    }
    if let Some(listener) = connect_listener {
        accept_loops.spawn(explicit::serve_connect(
            listener,
            shared.clone(),
            tracker.clone(),
            stop_accept.clone(),
            stop_conns.clone(),
        ));
    }
    tracing::info!(
        listeners = ?bound, cgroups = ?attached, mode = ?config.mode, fail = ?config.intercept.fail,
        kernel_relay, "wl-daemon ready"
    );
    crate::service::ready();
    let watchdog = crate::service::watchdog();

    let watcher = tokio::spawn(policy::watch(policy.clone(), POLICY_POLL));
    let reloader = Arc::new(Reloader::new(policy.clone(), config.clone()));
    let metrics_task = metrics_listener.map(|l| tokio::spawn(crate::metrics::serve(l)));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(admin::AdminState {
            policy: policy.clone(),
            cgroups: attached.clone(),
            listeners: bound.iter().map(|a| a.to_string()).collect(),
            started: std::time::Instant::now(),
            reloader: reloader.clone(),
        }),
    ));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                crate::service::reloading();
                let _ = reloader.reload("SIGHUP");
                crate::service::ready();
            }
        }
    }
    crate::service::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    watcher.abort();
    admin_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.admin_socket);

    // Stop accepting, give open connections a moment, then cut them (each still writes
    // its audit record).
    stop_accept.cancel();
    accept_loops.close();
    accept_loops.wait().await;
    tracker.close();
    let drained = tokio::time::timeout(DRAIN, tracker.wait()).await.is_ok();
    stop_conns.cancel();
    tracker.wait().await;
    if !drained {
        tracing::info!("open connections were closed after {DRAIN:?}");
    }
    let shared = Arc::into_inner(shared).expect("all connection tasks have ended");
    let pinned = shared.interceptor.pinned_links();
    drop(shared); // detaches (fail = "open"); pinned links stay (fail = "closed")
    audit_writer.shutdown().await;
    match config.intercept.fail {
        FailMode::Open => tracing::info!("detached; agents now connect directly"),
        FailMode::Closed => tracing::info!(
            pinned,
            "links stay pinned: intercepted connects are refused until wl-daemon is back"
        ),
    }
    Ok(())
}

/// One daemon per state directory: a second one would fight over the same cgroups.
fn lock_state_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create state_dir `{}`", dir.display()))?;
    lock_exclusive(&dir.join("wl-daemon.lock"), || {
        format!(
            "another wl-daemon is already running with state_dir `{}`: stop it first or give this one its own state_dir",
            dir.display()
        )
    })
}

/// Takes an exclusive lock on `path` (created if missing) for the life of the returned
/// guard, or fails with `taken`'s message when another process holds it.
pub(crate) fn lock_exclusive(path: &Path, taken: impl FnOnce() -> String) -> anyhow::Result<Flock<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file `{}`", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| anyhow::anyhow!("{} ({errno})", taken()))
}
