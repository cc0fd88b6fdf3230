//! The audit trail: one JSON object per line, appended to `audit.path`.
//!
//! In: [`AuditRecord`]s from the request path, through a bounded channel so that a slow
//! disk never stalls a connection. Out: lines in the file, written by one task that drains
//! the channel and flushes once per batch (group commit). Records that cannot be queued are
//! counted, never silently lost: the count is logged and written as a record of its own.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use serde::Serialize;
use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, oneshot},
};

use crate::{config::Mode, intercept::identity::AgentIdentity};

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

/// One intercepted connection, written when it ends.
#[derive(Debug, Serialize)]
pub struct ConnectionRecord {
    /// Daemon-local connection number.
    pub conn_id: u64,
    /// The listener that accepted it.
    pub listener: String,
    /// The agent's address as the daemon saw it.
    pub peer: String,
    /// Where the agent was connecting to.
    pub dst: Option<String>,
    /// The server name (TLS SNI, or the API host of an explicit listener), when known.
    pub host: Option<String>,
    /// Who was connecting.
    pub agent: Option<AgentIdentity>,
    /// What wl did: `splice` (bytes relayed unchanged), `terminate` (TLS terminated, HTTP
    /// served), `http` (plain HTTP served) or `refused`.
    pub action: &'static str,
    /// Bytes from the agent to the upstream.
    pub bytes_up: u64,
    /// Bytes from the upstream to the agent.
    pub bytes_down: u64,
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
    pub fn new(conn_id: u64, listener: String, peer: std::net::SocketAddr) -> Self {
        Self {
            conn_id,
            listener,
            peer: peer.to_string(),
            dst: None,
            host: None,
            agent: None,
            action: "refused",
            bytes_up: 0,
            bytes_down: 0,
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
    pub agent: Option<AgentIdentity>,
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
    pub proto_agent: String,
    /// HTTP version on the upstream side, when it was reached.
    pub proto_upstream: Option<String>,
    /// The `Request` decision.
    #[serde(flatten)]
    pub policy: PolicyOutcome,
    /// What went wrong, if anything.
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
    pub error: Option<String>,
}

/// A policy decision as recorded: flattened into connection and request records.
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
    pub agent: Option<AgentIdentity>,
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
    /// Records that could not be queued since the last such record.
    Dropped {
        /// How many.
        count: u64,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// Handle for submitting records; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditRecord>,
    dropped: Arc<AtomicU64>,
}

/// The writer task; [`AuditWriter::shutdown`] flushes everything queued.
#[derive(Debug)]
pub struct AuditWriter {
    done: oneshot::Receiver<()>,
}

impl AuditLog {
    /// Opens (creating) the file and starts the writer task.
    pub async fn open(path: &Path) -> Result<(AuditLog, AuditWriter), AuditError> {
        let err = |source| AuditError::Open { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(err)?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .await
            .map_err(err)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = oneshot::channel();
        tokio::spawn(write_loop(file, rx, dropped.clone(), path.to_owned(), done_tx));
        Ok((AuditLog { tx, dropped }, AuditWriter { done }))
    }

    /// Queues a record; never blocks. A full queue counts the record as dropped.
    pub fn record(&self, record: AuditRecord) {
        if self.tx.try_send(record).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped = n, "audit queue full: record dropped");
        }
    }
}

impl AuditWriter {
    /// Waits until every record queued before all [`AuditLog`] handles were dropped is
    /// written and flushed.
    pub async fn shutdown(self) {
        let _ = self.done.await;
    }
}

async fn write_loop(
    file: tokio::fs::File,
    mut rx: mpsc::Receiver<AuditRecord>,
    dropped: Arc<AtomicU64>,
    path: PathBuf,
    done: oneshot::Sender<()>,
) {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.push(AuditRecord::Dropped { count: lost });
        }
        let mut buf = Vec::with_capacity(batch.len() * 512);
        for record in batch.drain(..) {
            let line = Line { time: now_rfc3339(), record: &record };
            serde_json::to_writer(&mut buf, &line).expect("audit records always serialize");
            buf.push(b'\n');
        }
        if let Err(e) = async {
            out.write_all(&buf).await?;
            out.flush().await
        }
        .await
        {
            tracing::error!(path = %path.display(), error = %e, "audit write failed");
        }
    }
    let _ = out.flush().await;
    let _ = done.send(());
}

/// The current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
