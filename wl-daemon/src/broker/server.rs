//! The broker process: its state behind one lock, the socket and its peers, and the
//! handling of each request (issue, redeem, store changes), each audit record written
//! before the answer it describes.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use nix::fcntl::Flock;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};
use zeroize::Zeroizing;

use super::{
    ledger::Ledger,
    now_ms, protocol,
    protocol::{BrokerRequest, Listing, Reply, Use},
    sct,
    sct::{Binding, Claims},
    store::{self, KeyRing, SecretStore, StoreRefusal},
    SKEW_MS,
};
use crate::{
    audit::{
        trail::{Pending, Trail},
        AuditRecord, SecretRecord,
    },
    config::Config,
    policy::PolicyEngine,
};

/// Everything the broker guards, behind one lock: requests are short, and redemption must
/// check and record a token atomically anyway.
struct Vault {
    store: SecretStore,
    keys: KeyRing,
    ledger: Ledger,
    /// Tokens issued and not yet redeemed, so that redeeming them skips re-verifying the
    /// signature just made (see [`sct::RecentlySigned`]).
    recent: sct::RecentlySigned,
    last_used: HashMap<String, i64>,
}

/// Issued tokens remembered until redeemed: far more than the requests a proxy has
/// between issue and redeem at once; beyond it, redemptions verify signatures.
const RECENT_TOKENS: usize = 4096;

struct Broker {
    vault: Mutex<Vault>,
    /// `UseSecret` decisions by everything they depend on (see [`Broker::decide`]).
    decisions: Mutex<HashMap<[u8; 32], crate::policy::Decision>>,
    policy: arc_swap::ArcSwap<PolicyEngine>,
    policy_dir: PathBuf,
    ttl_ms: i64,
    client_uids: Vec<u32>,
    admin_uids: Vec<u32>,
    /// Requests being answered right now, on all connections (see `protocol::Poller`).
    handling: std::sync::atomic::AtomicU64,
    /// The broker's own trail, written synchronously: its records are few, and each must
    /// be in the file before the answer it describes leaves.
    audit: Mutex<Trail>,
}

impl Broker {
    /// Writes `records` before the caller answers; an error means they are not written.
    fn record_written(&self, records: Vec<AuditRecord>) -> Result<(), String> {
        self.audit.lock().expect("broker trail poisoned").write_now(records)
    }
}

/// Takes the broker off the network: a new, empty network namespace (only a loopback
/// interface that is down) for the whole process. The broker needs none: its socket is a
/// path in the file system, which works across network namespaces. Needs CAP_SYS_ADMIN;
/// without it (an unprivileged service user) the unit's `PrivateNetwork=yes` and
/// `RestrictAddressFamilies=AF_UNIX` do the same, and the log says which applies. Call
/// before any thread is started: a namespace is per thread, and threads inherit it.
pub fn isolate_network() {
    match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        Ok(()) => tracing::info!("broker runs in its own empty network namespace: no network access"),
        Err(e) => tracing::info!(
            error = %e,
            "cannot create a network namespace; network isolation is left to the service unit (PrivateNetwork=yes)"
        ),
    }
}

/// Runs the broker until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let dir = config.broker_state_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the broker's state_dir `{}`", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict `{}` to mode 0700", dir.display()))?;
    }
    let _lock = lock(&dir)?;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let (key, key_source) = store::load_key(&dir, credentials.as_deref())?;
    let store = SecretStore::open(&dir, &key)?;
    drop(key);
    let now = now_ms();
    let keys = store.keyring(now)?;
    let ledger_path = dir.join("sct-ledger");
    let ledger = Ledger::open(&ledger_path, now)
        .with_context(|| format!("cannot open the SCT ledger `{}`", ledger_path.display()))?;
    let policy = load_policy(&config.broker.policy_dir)?;
    let audit = Trail::open(&config.broker.audit, config.broker_trail_options()).with_context(|| {
        format!(
            "cannot open the broker's audit trail `{}` (check broker.audit)",
            config.broker.audit.display()
        )
    })?;
    let checkpoint_every = config.audit.checkpoint_interval;
    let listener = bind(&config.broker.socket)?;
    tracing::info!(
        socket = %config.broker.socket.display(),
        secrets = store.len(),
        kid = keys.current_kid(),
        store_key = %key_source.display(),
        policies = %policy.source,
        "wl-broker ready"
    );
    let last_used = read_usage(&dir);
    let broker = Arc::new(Broker {
        vault: Mutex::new(Vault {
            store,
            keys,
            ledger,
            recent: sct::RecentlySigned::new(RECENT_TOKENS),
            last_used,
        }),
        decisions: Mutex::new(HashMap::new()),
        policy: arc_swap::ArcSwap::from_pointee(policy),
        policy_dir: config.broker.policy_dir.clone(),
        ttl_ms: config.broker.token_ttl.as_millis() as i64,
        client_uids: with_users(&config.broker.client_uids, &config.broker.client_users, "client_users")?,
        admin_uids: with_users(&config.broker.admin_uids, &config.broker.admin_users, "admin_users")?,
        audit: Mutex::new(audit),
        handling: Default::default(),
    });
    let serving = tokio::spawn(serve(listener, broker.clone()));
    crate::service::ready();
    let watchdog = crate::service::watchdog();
    let mut flush = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut checkpoints = tokio::time::interval(checkpoint_every);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                crate::service::reloading();
                match load_policy(&broker.policy_dir) {
                    Ok(p) => {
                        tracing::info!(policies = p.count, source = %p.source, "broker policies reloaded");
                        broker.policy.store(Arc::new(p));
                    }
                    Err(e) => tracing::error!(error = %e, "broker policy reload refused; the previous policies stay in force"),
                }
                crate::service::ready();
            }
            _ = flush.tick() => write_usage(&dir, &broker.vault.lock().expect("vault poisoned").last_used),
            _ = checkpoints.tick() => broker.audit.lock().expect("broker trail poisoned").commit(Vec::new(), true),
        }
    }
    crate::service::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    serving.abort();
    let _ = std::fs::remove_file(&config.broker.socket);
    write_usage(&dir, &broker.vault.lock().expect("vault poisoned").last_used);
    broker.audit.lock().expect("broker trail poisoned").close();
    drop(broker);
    Ok(())
}

/// `uids` plus the uids of the users named in `broker.<key>`; an unknown name stops the
/// start (a typo must not silently lock the daemon out, or let nobody in).
fn with_users(uids: &[u32], users: &[String], key: &str) -> anyhow::Result<Vec<u32>> {
    let mut all = uids.to_vec();
    for name in users {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => all.push(user.uid.as_raw()),
            Ok(None) => anyhow::bail!("broker.{key}: there is no user named `{name}` on this host"),
            Err(e) => anyhow::bail!("broker.{key}: cannot look up user `{name}`: {e}"),
        }
    }
    Ok(all)
}

fn load_policy(dir: &Path) -> anyhow::Result<PolicyEngine> {
    if dir.is_dir() {
        Ok(PolicyEngine::load_dir(dir)?)
    } else {
        Ok(PolicyEngine::builtin_broker())
    }
}

/// One broker per state directory.
fn lock(dir: &Path) -> anyhow::Result<Flock<File>> {
    crate::daemon::lock_exclusive(&dir.join("wl-broker.lock"), || {
        format!("another wl-broker is already running with state_dir `{}`: stop it first", dir.display())
    })
}

/// Binds the socket. Mode 0666: who may do what is decided per connection from the peer's
/// uid (`client_uids`, `admin_uids`), which the kernel vouches for; the directory's
/// permissions may narrow it further.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| {
        format!("cannot listen on the broker socket `{}` (check broker.socket)", path.display())
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

fn read_usage(dir: &Path) -> HashMap<String, i64> {
    std::fs::read(dir.join("usage.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Last-use times are informational (`wlctl secret list`): written every few seconds and
/// at shutdown, not on the request path.
fn write_usage(dir: &Path, usage: &HashMap<String, i64>) {
    let bytes = serde_json::to_vec(usage).expect("a map of times serializes");
    if let Err(e) = store::write_atomic(&dir.join("usage.json"), &bytes, 0o600) {
        tracing::warn!(error = %e, "cannot save secrets' last-use times");
    }
}

async fn serve(listener: UnixListener, broker: Arc<Broker>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &broker).await {
                tracing::debug!(error = %e, "broker connection ended");
            }
        });
    }
}

/// What a peer may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Obtain secrets.
    Client,
    /// Manage secrets.
    Admin,
}

async fn connection(stream: UnixStream, broker: &Broker) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let me = nix::unistd::geteuid().as_raw();
    let may_obtain = uid == me || broker.client_uids.contains(&uid);
    let may_manage = uid == 0 || uid == me || broker.admin_uids.contains(&uid);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    if !may_obtain && !may_manage {
        // Read the peer's request first (bounded), so that the refusal is not lost to a
        // reset: closing with unread data makes the kernel answer with RST.
        let mut ignored = Zeroizing::new(Vec::new());
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            (&mut rd).take(protocol::MAX_LINE).read_until(b'\n', &mut ignored),
        )
        .await;
        tracing::warn!(uid, "broker socket: refused a peer whose uid is not allowed");
        let refused = AuditRecord::Secret(Box::new(SecretRecord {
            event: "connect",
            peer_uid: uid,
            code: Some("uid_not_allowed"),
            ..Default::default()
        }));
        // Refused either way; the record is in the file before the answer leaves.
        let _ = broker.record_written(vec![refused]);
        let reply = Reply::error(
            "uid_not_allowed",
            format!("uid {uid} may not use the secrets broker (broker.client_uids / broker.admin_uids)"),
        );
        let line = serde_json::to_string(&reply).expect("replies serialize");
        return wr.write_all(format!("{line}\n").as_bytes()).await;
    }
    // After an `issue`, the proxy's `redeem` follows within microseconds: poll for it
    // rather than sleep, while that pays off (see `protocol::Poller`).
    let mut redeem_expected = false;
    let poller = protocol::Poller::default();
    loop {
        if redeem_expected {
            let others_busy = broker.handling.load(std::sync::atomic::Ordering::Relaxed) > 0;
            poller.wait(&rd, others_busy).await;
        }
        let mut line = Zeroizing::new(Vec::with_capacity(1024));
        (&mut rd).take(protocol::MAX_LINE).read_until(b'\n', &mut line).await?;
        if line.is_empty() {
            return Ok(());
        }
        let _handling = crate::metrics::InFlight::enter(&broker.handling);
        let reply = match serde_json::from_slice::<BrokerRequest>(&line) {
            // Only the position and the kind of error: serde's message can quote the
            // input, and the input may hold a secret.
            Err(e) => Reply::error(
                "bad_request",
                format!("cannot parse the request ({:?} error at column {})", e.classify(), e.column()),
            ),
            Ok(req) => {
                redeem_expected = matches!(req, BrokerRequest::Issue(_));
                let role = match req {
                    BrokerRequest::Issue(_) | BrokerRequest::Redeem { .. } | BrokerRequest::Status => {
                        Role::Client
                    }
                    _ => Role::Admin,
                };
                let allowed = match role {
                    Role::Client => may_obtain || may_manage,
                    Role::Admin => may_manage,
                };
                if allowed {
                    let mut records = Vec::new();
                    let reply = broker.handle(req, uid, &mut records);
                    // What was done is in the trail before anyone hears of it: a secret
                    // whose hand-out cannot be recorded is not handed out.
                    match broker.record_written(records) {
                        Ok(()) => reply,
                        Err(e) => {
                            tracing::error!(error = %e, "broker audit trail unavailable: request refused");
                            // Kept in memory and written once the disk takes it again.
                            broker.audit.lock().expect("broker trail poisoned").commit(
                                vec![Pending::Record(AuditRecord::Secret(Box::new(SecretRecord {
                                    event: "refused",
                                    peer_uid: uid,
                                    code: Some("audit_unavailable"),
                                    ..Default::default()
                                })))],
                                false,
                            );
                            Reply::error(
                                "audit_unavailable",
                                format!("the broker's audit trail cannot record this: {e}"),
                            )
                        }
                    }
                } else {
                    Reply::error(
                        "uid_not_allowed",
                        format!("uid {uid} may not manage secrets (broker.admin_uids)"),
                    )
                }
            }
        };
        drop(line);
        let mut out = Zeroizing::new(serde_json::to_vec(&reply).expect("replies serialize"));
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
}

impl Broker {
    /// Answers one request; the audit records it produced are pushed on `records`, to be
    /// written before the answer leaves.
    fn handle(&self, req: BrokerRequest, peer_uid: u32, records: &mut Vec<AuditRecord>) -> Reply {
        let now = now_ms();
        let mut vault = self.vault.lock().expect("vault poisoned");
        match req {
            BrokerRequest::Issue(use_) => self.issue(&mut vault, use_, peer_uid, now, records),
            BrokerRequest::Redeem { sct, use_ } => {
                self.redeem(&mut vault, &sct, use_, peer_uid, now, records)
            }
            BrokerRequest::Put { name, hosts, value } => {
                let result = vault.store.put(&name, hosts, &value, now);
                self.changed("put", &name, peer_uid, result.map(Some), records)
            }
            BrokerRequest::Rotate { name, hosts, value } => {
                let result = vault.store.rotate(&name, Some(hosts), &value, now);
                self.changed("rotate", &name, peer_uid, result.map(Some), records)
            }
            BrokerRequest::Remove { name } => {
                let result = vault.store.remove(&name);
                if result.is_ok() {
                    vault.last_used.remove(&name);
                }
                self.changed("remove", &name, peer_uid, result.map(|()| None), records)
            }
            BrokerRequest::List => {
                let secrets = vault
                    .store
                    .list()
                    .into_iter()
                    .map(|meta| Listing { last_used_ms: vault.last_used.get(&meta.name).copied(), meta })
                    .collect();
                Reply { secrets: Some(secrets), ..Reply::ok() }
            }
            BrokerRequest::Verify { name, value } => match vault.store.value(&name) {
                Ok(stored) => {
                    Reply { matches: Some(constant_time_eq(stored.expose(), value.expose())), ..Reply::ok() }
                }
                Err(e) => refusal_reply(&e),
            },
            BrokerRequest::RotateKey => {
                let Vault { store, keys, .. } = &mut *vault;
                match keys.rotate(store, now) {
                    Ok(kid) => {
                        tracing::info!(kid, "SCT signing key rotated");
                        records.push(AuditRecord::Secret(Box::new(SecretRecord {
                            event: "rotate_key",
                            ok: true,
                            peer_uid,
                            kid: Some(kid.clone()),
                            ..Default::default()
                        })));
                        Reply { kid: Some(kid), ..Reply::ok() }
                    }
                    Err(e) => Reply::error("store_error", e.to_string()),
                }
            }
            BrokerRequest::Status => Reply {
                kid: Some(vault.keys.current_kid().to_owned()),
                counts: Some(serde_json::json!({
                    "secrets": vault.store.len(),
                    "ledger": vault.ledger.len(),
                })),
                ..Reply::ok()
            },
        }
    }

    fn issue(
        &self,
        vault: &mut Vault,
        use_: Use,
        peer_uid: u32,
        now: i64,
        records: &mut Vec<AuditRecord>,
    ) -> Reply {
        let mut record = SecretRecord::for_use("issue", &use_, peer_uid);
        let reply = (|| {
            let meta = vault.store.meta(&use_.secret).ok_or_else(|| {
                (
                    "no_such_secret",
                    format!("no secret named `{}` (wlctl secret put {0} --host {})", use_.secret, use_.host),
                )
            })?;
            if use_.host.len() > 255 || use_.secret.len() > 255 {
                return Err(("bad_request", "host or secret name too long".to_owned()));
            }
            let decision = self.decide(&use_, &meta.hosts);
            record.policies = decision.policies.clone();
            if !decision.allow {
                let why = if decision.errors.is_empty() {
                    format!(
                        "the broker's policy does not allow secret `{}` for host `{}` (stored for {:?})",
                        use_.secret, use_.host, meta.hosts
                    )
                } else {
                    format!("the broker's policy failed: {}", decision.errors.join("; "))
                };
                return Err(("policy_denied", why));
            }
            let mut jti = [0u8; 16];
            getrandom::fill(&mut jti).map_err(|e| ("internal", format!("no randomness: {e}")))?;
            let signer = vault.keys.signer();
            let claims = Claims {
                kid: sct::key_id(&signer.verifying_key()),
                jti,
                agent: sct::agent_digest(use_.agent.as_deref()),
                request: sct::request_digest(&use_.method, &use_.path),
                issued_ms: now,
                expires_ms: now + self.ttl_ms,
                host: use_.host.clone(),
                secret: use_.secret.clone(),
            };
            let token = sct::sign(signer, &claims);
            vault.recent.remember(&token, &claims, now);
            Ok((token, claims.jti_hex()))
        })();
        let reply = match reply {
            Ok((token, jti)) => {
                record.ok = true;
                record.jti = Some(jti.clone());
                Reply { sct: Some(token), jti: Some(jti), ..Reply::ok() }
            }
            Err((code, message)) => {
                record.code = Some(code);
                Reply::error(code, message)
            }
        };
        records.push(AuditRecord::Secret(Box::new(record)));
        reply
    }

    /// The `UseSecret` decision, remembered: it depends only on the policy set (its
    /// generation), the agent, the secret and its hosts, and the request, all of which are
    /// in the key; a process's agents ask the same question request after request.
    fn decide(&self, use_: &Use, hosts: &[String]) -> crate::policy::Decision {
        use sha2::{Digest, Sha256};
        let engine = self.policy.load();
        let mut h = Sha256::new();
        h.update(engine.generation().to_be_bytes());
        h.update(serde_json::to_vec(&(use_, hosts)).expect("uses serialize"));
        let key: [u8; 32] = h.finalize().into();
        if let Some(d) = self.decisions.lock().expect("decision cache poisoned").get(&key) {
            return d.clone();
        }
        let d = engine.decide_use_secret(
            use_.agent.as_deref(),
            &use_.secret,
            hosts,
            &use_.host,
            &use_.method,
            &use_.path,
        );
        let mut cache = self.decisions.lock().expect("decision cache poisoned");
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(key, d.clone());
        d
    }

    fn redeem(
        &self,
        vault: &mut Vault,
        token: &str,
        use_: Use,
        peer_uid: u32,
        now: i64,
        records: &mut Vec<AuditRecord>,
    ) -> Reply {
        let mut record = SecretRecord::for_use("redeem", &use_, peer_uid);
        record.jti = sct::peek(token).map(|c| c.jti_hex());
        let agent = sct::agent_digest(use_.agent.as_deref());
        let request = sct::request_digest(&use_.method, &use_.path);
        let binding = Binding { agent: &agent, request: &request, host: &use_.host, secret: &use_.secret };
        let keys = &vault.keys;
        let result = sct::verify_recent(
            token,
            |kid| keys.verifier(kid, now),
            now,
            SKEW_MS,
            &binding,
            &mut vault.recent,
        )
        .map_err(|r| (r.code(), format!("token refused: {r}")))
        .and_then(|claims| {
            match vault.ledger.redeem(&claims.jti, claims.issued_ms, claims.expires_ms, now) {
                Ok(Ok(())) => Ok(claims),
                Ok(Err(r)) => Err((r.code(), format!("token refused: {r}"))),
                // Not recorded, so not handed out: single use must hold.
                Err(e) => Err(("ledger_error", format!("cannot record the token in the ledger: {e}"))),
            }
        })
        .and_then(|claims| match vault.store.value(&claims.secret) {
            Ok(v) => Ok((claims, v)),
            Err(e) => Err((refusal_code(&e), e.to_string())),
        });
        let reply = match result {
            Ok((claims, value)) => {
                record.ok = true;
                vault.last_used.insert(claims.secret.clone(), now);
                Reply { value: Some(value), jti: Some(claims.jti_hex()), ..Reply::ok() }
            }
            Err((code, message)) => {
                tracing::warn!(code, secret = %use_.secret, host = %use_.host, "SCT redemption refused");
                record.code = Some(code);
                Reply::error(code, message)
            }
        };
        records.push(AuditRecord::Secret(Box::new(record)));
        reply
    }

    fn changed(
        &self,
        event: &'static str,
        name: &str,
        peer_uid: u32,
        result: Result<Option<store::SecretMeta>, StoreRefusal>,
        records: &mut Vec<AuditRecord>,
    ) -> Reply {
        let mut record =
            SecretRecord { event, peer_uid, secret: Some(name.to_owned()), ..Default::default() };
        let reply = match result {
            Ok(meta) => {
                record.ok = true;
                tracing::info!(event, secret = name, peer_uid, "secret store changed");
                Reply { secret: meta, ..Reply::ok() }
            }
            Err(e) => {
                record.code = Some(refusal_code(&e));
                refusal_reply(&e)
            }
        };
        records.push(AuditRecord::Secret(Box::new(record)));
        reply
    }
}

fn refusal_code(e: &StoreRefusal) -> &'static str {
    match e {
        StoreRefusal::NoSuchSecret(_) => "no_such_secret",
        StoreRefusal::Exists(_) => "exists",
        StoreRefusal::Invalid(_) => "invalid",
        StoreRefusal::Store(_) => "store_error",
    }
}

fn refusal_reply(e: &StoreRefusal) -> Reply {
    Reply::error(refusal_code(e), e.to_string())
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
