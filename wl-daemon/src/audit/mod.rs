//! The audit trail: one JSON object per line, hash-chained, with signed checkpoints
//! (`trail.rs`), verifiable offline (`verify.rs`, `wlctl audit verify`).
//!
//! In: [`AuditRecord`]s from the request path, through a bounded channel so that a slow
//! disk never stalls a connection; or, for a decision that must be on disk before it is
//! acted on (`enforce`), with [`AuditLog::record_durable`], which waits for the fsync. Out:
//! lines in the file, written by one task that drains the channel and writes once per
//! batch (group commit). Records that cannot be queued, or that the disk refuses for too
//! long, are counted, never silently lost: the count is logged and written as a record of
//! its own.

pub mod trail;
pub mod verify;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use self::trail::{Pending, Trail, TrailOptions};
use crate::metrics::METRICS;

use crate::{config::Mode, intercept::identity::AgentIdentity};

/// How long records that nobody waits for may wait to be batched with others.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// How many records may wait for the writer before new ones are counted as dropped.
const QUEUE: usize = 65_536;

/// Errors opening the audit file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file or its directory could not be created or opened.
    #[error("cannot open audit log `{}`: {source} (check audit.path and its directory's permissions)", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The trail cannot take a record that must be durable (disk full or failing, or the
/// writer is gone). In `enforce` the request is refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuditUnavailable(pub String);

/// A request's decision, written before the request is forwarded; in `enforce` it is on
/// disk (fsynced) before anything goes upstream.
#[derive(Debug, Serialize)]
pub struct DecisionRecord {
    /// The connection.
    pub conn_id: u64,
    /// The request (`wl-<conn>-<n>`, as in its `request` record).
    pub request_id: String,
    /// Who is calling.
    pub agent: Option<Arc<AgentIdentity>>,
    /// The API host.
    pub host: String,
    /// HTTP method.
    pub method: String,
    /// Path (no query).
    pub path: String,
    /// The decision.
    #[serde(flatten)]
    pub policy: PolicyOutcome,
}

/// A signed checkpoint (see `trail.rs`).
#[derive(Debug, Serialize)]
pub struct Checkpoint {
    /// `start`, `recovered` (after a torn tail was cut off), `periodic`, `rotate`, `shutdown`.
    pub reason: &'static str,
    /// Records in the chain up to and including this one (equal to its `seq`).
    pub count: u64,
    /// The signing key's id.
    pub kid: String,
    /// Ed25519 signature (base64) over `wl-audit-checkpoint-v1\0`, `seq` and `prev`.
    pub sig: String,
    /// Bytes of a torn last line cut off at start (`recovered`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_bytes: Option<u64>,
}

/// One intercepted connection, written when it ends.
#[derive(Debug, Serialize)]
pub struct ConnectionRecord {
    /// Daemon-local connection number.
    pub conn_id: u64,
    /// The listener that accepted it (shared by the listener's connections).
    pub listener: Arc<str>,
    /// The agent's address as the daemon saw it.
    pub peer: std::net::SocketAddr,
    /// Where the agent was connecting to.
    pub dst: Option<std::net::SocketAddr>,
    /// The server name (TLS SNI, or the API host of an explicit listener), when known.
    pub host: Option<String>,
    /// Who was connecting.
    pub agent: Option<Arc<AgentIdentity>>,
    /// What wl did: `splice` (bytes relayed unchanged), `terminate` (TLS terminated, HTTP
    /// served), `http` (plain HTTP served) or `refused`.
    pub action: &'static str,
    /// Bytes from the agent to the upstream.
    pub bytes_up: u64,
    /// Bytes from the upstream to the agent.
    pub bytes_down: u64,
    /// Of `bytes_up`, those the kernel relay carried (spliced connections).
    pub bytes_up_kernel: u64,
    /// Milliseconds from accept to close.
    pub duration_ms: u64,
    /// HTTP requests served on it (terminated and plain HTTP connections).
    pub requests: u64,
    /// The `Connect` decision.
    #[serde(flatten)]
    pub policy: PolicyOutcome,
    /// Why the connection failed, if it did.
    pub error: Option<String>,
}

impl ConnectionRecord {
    /// A record for a just-accepted connection; the handler fills in the rest.
    pub fn new(conn_id: u64, listener: Arc<str>, peer: std::net::SocketAddr) -> Self {
        Self {
            conn_id,
            listener,
            peer,
            dst: None,
            host: None,
            agent: None,
            action: "refused",
            bytes_up: 0,
            bytes_down: 0,
            bytes_up_kernel: 0,
            duration_ms: 0,
            requests: 0,
            policy: PolicyOutcome::default(),
            error: None,
        }
    }
}

/// One HTTP request on a terminated (or plain HTTP) connection, written when its response
/// ends.
#[derive(Debug, Serialize)]
pub struct RequestRecord {
    /// The connection it came on.
    pub conn_id: u64,
    /// `wl-<conn>-<n>`, also sent to the agent as `x-wl-request-id` on errors.
    pub request_id: String,
    /// Who sent it.
    pub agent: Option<Arc<AgentIdentity>>,
    /// HTTP method.
    pub method: String,
    /// The host it went to.
    pub host: String,
    /// Path without the query (queries may carry secrets).
    pub path: String,
    /// Response status (wl's own for errors it answers).
    pub status: u16,
    /// Request body bytes forwarded.
    pub bytes_up: u64,
    /// Response body bytes returned.
    pub bytes_down: u64,
    /// Milliseconds from request head to the end of the response.
    pub duration_ms: u64,
    /// HTTP version on the agent's side.
    pub proto_agent: &'static str,
    /// HTTP version on the upstream side, when it was reached.
    pub proto_upstream: Option<&'static str>,
    /// The `Request` decision.
    #[serde(flatten)]
    pub policy: PolicyOutcome,
    /// The secret bound to the host (`[[credential]]`), when there is one.
    pub secret: Option<String>,
    /// The SCT it was obtained with.
    pub jti: Option<String>,
    /// `injected`, or `missing` when it could not be obtained (see `credential_error`).
    pub credential: Option<&'static str>,
    /// Why the credential is missing: the broker's code (`broker_unavailable`,
    /// `policy_denied`, `no_such_secret`, ...).
    pub credential_error: Option<String>,
    /// How many echoes of the credential were redacted from the response.
    pub redactions: usize,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// One secrets-broker event (written by the broker to its own trail). Never a value.
#[derive(Debug, Default, Serialize)]
pub struct SecretRecord {
    /// `issue`, `redeem`, `put`, `rotate`, `remove`, `rotate_key`, or `connect` (a peer
    /// refused by uid).
    pub event: &'static str,
    /// Whether it succeeded.
    pub ok: bool,
    /// The refusal's code when it did not (`sct_replayed`, `policy_denied`, ...).
    pub code: Option<&'static str>,
    /// The secret's name.
    pub secret: Option<String>,
    /// The host it was for.
    pub host: Option<String>,
    /// The token's id.
    pub jti: Option<String>,
    /// The signing key's id (`rotate_key`).
    pub kid: Option<String>,
    /// The agent the request was made for.
    pub agent: Option<Arc<AgentIdentity>>,
    /// HTTP method and path of that request.
    pub method: Option<String>,
    /// See `method`.
    pub path: Option<String>,
    /// The broker policies that decided an `issue`.
    pub policies: Vec<String>,
    /// The uid of the process on the socket (the proxy, or wlctl's user).
    pub peer_uid: u32,
}

impl SecretRecord {
    /// A record about one use of a secret.
    pub fn for_use(event: &'static str, use_: &crate::broker::protocol::Use, peer_uid: u32) -> Self {
        Self {
            event,
            secret: Some(use_.secret.clone()),
            host: Some(use_.host.clone()),
            agent: use_.agent.clone(),
            method: Some(use_.method.clone()),
            path: Some(use_.path.clone()),
            peer_uid,
            ..Default::default()
        }
    }
}

/// A policy decision as recorded: flattened into connection and request records.
#[derive(Debug, Default, Serialize)]
pub struct PolicyOutcome {
    /// `allow` or `deny`.
    pub decision: Option<&'static str>,
    /// The mode the decision was taken in.
    pub mode: Option<Mode>,
    /// Policy denied it but the mode is `observe`, so it went on.
    pub would_deny: bool,
    /// The policies that determined the decision.
    pub policies: Vec<String>,
}

impl PolicyOutcome {
    /// The record of decision `d` taken in `mode`.
    pub fn new(d: &crate::policy::Decision, mode: Mode) -> Self {
        Self {
            decision: Some(if d.allow { "allow" } else { "deny" }),
            mode: Some(mode),
            would_deny: !d.allow && mode == Mode::Observe,
            policies: d.policies.clone(),
        }
    }
}

/// Everything that goes into the trail.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditRecord {
    /// See [`ConnectionRecord`].
    Connection(Box<ConnectionRecord>),
    /// See [`RequestRecord`].
    Request(Box<RequestRecord>),
    /// A secrets-broker event: a token issued or redeemed, a refusal, a store change.
    Secret(Box<SecretRecord>),
    /// A request's decision, before it is forwarded.
    Decision(Box<DecisionRecord>),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
    /// Records that could not be queued or written since the last such record.
    Dropped {
        /// How many.
        count: u64,
    },
}

/// One line as written: time, position in the chain, the record.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    seq: u64,
    prev: String,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// Handle for submitting records; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    dropped: Arc<AtomicU64>,
}

/// The writer task; [`AuditWriter::shutdown`] writes everything queued and a final
/// checkpoint.
#[derive(Debug)]
pub struct AuditWriter {
    done: oneshot::Receiver<()>,
}

impl AuditLog {
    /// Opens the trail at `path` (creating it, continuing its chain, sealing a torn tail)
    /// and starts the writer task.
    pub async fn open(path: &Path, opts: TrailOptions) -> Result<(AuditLog, AuditWriter), AuditError> {
        let interval = opts.checkpoint_interval;
        let trail = TrailThread::open(path, opts)
            .await
            .map_err(|source| AuditError::Open { path: path.to_owned(), source })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = oneshot::channel();
        tokio::spawn(write_loop(trail, rx, dropped.clone(), interval, done_tx));
        Ok((AuditLog { tx, dropped }, AuditWriter { done }))
    }

    /// Queues a record; never waits. A full queue counts it as dropped.
    pub fn record(&self, record: AuditRecord) {
        METRICS.audit_records.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(Pending::Record(record)).is_ok() {
            METRICS.audit_queued.fetch_add(1, Ordering::Relaxed);
        } else {
            METRICS.audit_dropped.fetch_add(1, Ordering::Relaxed);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped = n, "audit queue full: record dropped");
        }
    }

    /// Queues a record and waits until it is on disk (written and fsynced with its
    /// batch). An error means it is not, and the caller must not act on it.
    pub async fn record_durable(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        METRICS.audit_records.fetch_add(1, Ordering::Relaxed);
        self.tx
            .try_send(Pending::Durable(record, ack))
            .map_err(|_| AuditUnavailable("the audit queue is full".into()))?;
        METRICS.audit_queued.fetch_add(1, Ordering::Relaxed);
        match done.await {
            Ok(result) => result.map_err(AuditUnavailable),
            Err(_) => Err(AuditUnavailable("the audit writer has stopped".into())),
        }
    }
}

impl AuditWriter {
    /// Waits until the writer has written everything and the final checkpoint (call after
    /// every [`AuditLog`] clone is dropped).
    pub async fn shutdown(self) {
        let _ = self.done.await;
    }
}

/// The one thread that owns the trail and does its blocking work (writes, fsyncs,
/// rotation), a batch at a time.
///
/// One thread of its own rather than a hand-off of each batch to tokio's blocking pool:
/// the pool runs a task on whichever of its idle threads wakes first, and with many idle
/// threads (a burst of DNS look-ups on the CONNECT listener leaves dozens for ten
/// seconds) each of them came to hold allocator pages of the batches it had written,
/// about 10 MiB more resident memory under load (docs/profile.md).
struct TrailThread {
    jobs: std::sync::mpsc::Sender<TrailJob>,
}

enum TrailJob {
    /// Commit a batch (`timer`: the checkpoint timer fired), counting `dropped` records.
    Commit { batch: Vec<Pending>, timer: bool, dropped: u64, done: oneshot::Sender<()> },
    /// Write what is left (and a count of `dropped` records) and the final checkpoint.
    Close { dropped: u64, done: oneshot::Sender<()> },
}

impl TrailThread {
    /// Starts the thread, which opens the trail at `path` first.
    async fn open(path: &Path, opts: TrailOptions) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel();
        let (opened_tx, opened) = oneshot::channel();
        let path = path.to_owned();
        std::thread::Builder::new().name("wl-audit".into()).spawn(move || {
            let mut trail = match Trail::open(&path, opts) {
                Ok(trail) => trail,
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            let _ = opened_tx.send(Ok(()));
            for job in queue {
                match job {
                    TrailJob::Commit { batch, timer, dropped, done } => {
                        let started = std::time::Instant::now();
                        trail.dropped += dropped;
                        trail.commit(batch, timer);
                        METRICS.audit_batch_seconds.observe(started.elapsed());
                        let _ = done.send(());
                    }
                    TrailJob::Close { dropped, done } => {
                        trail.dropped += dropped;
                        trail.close();
                        let _ = done.send(());
                        return;
                    }
                }
            }
        })?;
        opened.await.expect("the audit thread reports whether the trail opened")?;
        Ok(Self { jobs })
    }

    /// Runs `job` (built around its completion signal) on the thread and waits for it.
    async fn run(&self, job: impl FnOnce(oneshot::Sender<()>) -> TrailJob) {
        let (done, finished) = oneshot::channel();
        self.jobs.send(job(done)).expect("the audit thread runs until closed");
        finished.await.expect("writing the audit trail does not panic");
    }
}

/// Drains the channel batch by batch into the trail (on its own thread: writes and
/// fsyncs block), with a checkpoint at least every `interval` while records flow, and a
/// retry of refused records at the same pace while the disk refuses them.
async fn write_loop(
    trail: TrailThread,
    mut rx: mpsc::Receiver<Pending>,
    dropped: Arc<AtomicU64>,
    interval: std::time::Duration,
    done: oneshot::Sender<()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let mut batch = Vec::with_capacity(256);
        let timer = tokio::select! {
            n = rx.recv_many(&mut batch, 4096) => {
                if n == 0 {
                    break;
                }
                METRICS.audit_queued.fetch_sub(n as u64, Ordering::Relaxed);
                false
            }
            _ = tick.tick() => true,
        };
        // Records nobody waits for linger a moment, so that a trickle of them is written
        // in a few batches rather than one hand-off to the trail's thread each.
        if !timer
            && batch.len() < 1024
            && !batch.iter().any(|p| matches!(p, Pending::Durable(..) | Pending::Written(..)))
        {
            tokio::time::sleep(LINGER).await;
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(p) => {
                        METRICS.audit_queued.fetch_sub(1, Ordering::Relaxed);
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        trail.run(|done| TrailJob::Commit { batch, timer, dropped: lost, done }).await;
    }
    let lost = dropped.swap(0, Ordering::Relaxed);
    trail.run(|done| TrailJob::Close { dropped: lost, done }).await;
    let _ = done.send(());
}

/// The current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
