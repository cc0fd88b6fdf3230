//! The trail on disk: hash-chained lines, signed checkpoints, group commit, rotation, and
//! what happens when the disk fails or a crash left half a line.
//!
//! Every line is one JSON object that starts with `time`, `seq` (1, 2, ... across rotated
//! files) and `prev` (hex SHA-256 of the previous line's bytes, without its newline; 64
//! zeros for the first). Every `checkpoint_every` records, every `checkpoint_interval`, at
//! start, before a rotation and at shutdown, a `checkpoint` line is added whose `sig` is an
//! Ed25519 signature, by the trail's own key, over its `seq` and `prev`; after it is on
//! disk (fsynced), the anchor file next to the key records its `seq` and its own hash, so
//! that cutting records off the end is visible too. `verify.rs` checks all of it.
//!
//! Writes are batched: one `write` (and, when a record in the batch must be durable, one
//! `fdatasync`) per batch. A failed write is undone (the file is cut back to its previous
//! length) and its records are kept in memory and retried with the next batch, so a full
//! disk loses nothing that was already written and resumes by itself.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{AuditRecord, Checkpoint, Line};
use crate::metrics::METRICS;
use std::sync::atomic::Ordering;

/// What a checkpoint signs: this prefix, then `seq` (u64, big-endian), then the previous
/// line's hash (32 bytes).
pub const CHECKPOINT_DOMAIN: &[u8] = b"wl-audit-checkpoint-v1\0";

/// Records kept in memory while the disk refuses them; beyond this they are counted as
/// dropped.
const RETAIN_MAX: usize = 65_536;

/// How the trail is written.
#[derive(Clone, Debug)]
pub struct TrailOptions {
    /// Where the checkpoint key and the anchor live (`<state_dir>/audit`).
    pub key_dir: PathBuf,
    /// Rotate the active file when it grows past this many bytes.
    pub rotate_bytes: u64,
    /// A checkpoint after this many records...
    pub checkpoint_every: u64,
    /// ...or this long after the last one, whichever comes first.
    pub checkpoint_interval: Duration,
}

/// The message a checkpoint signs.
pub fn checkpoint_message(seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 40);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(prev);
    m
}

/// Reads 64 hex digits.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The checkpoint key's files in `key_dir`.
pub fn key_paths(key_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (key_dir.join("checkpoint.key"), key_dir.join("checkpoint.pub"), key_dir.join("head"))
}

/// The key id of a checkpoint key: the first 8 bytes of SHA-256 of the public key, hex.
pub fn kid(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Loads the checkpoint signing key, creating it (seed mode 0600, public key 0644) when
/// absent. Its own key: not the CA's, not the broker's.
fn load_or_create_key(key_dir: &Path) -> std::io::Result<SigningKey> {
    let (secret, public, _) = key_paths(key_dir);
    std::fs::create_dir_all(key_dir)?;
    match std::fs::read(&secret) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} must hold 32 bytes", secret.display()),
                )
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = Zeroizing::new([0u8; 32]);
            getrandom::fill(seed.as_mut_slice()).map_err(|e| std::io::Error::other(e.to_string()))?;
            let key = SigningKey::from_bytes(&seed);
            crate::broker::store::write_atomic(&secret, seed.as_slice(), 0o600)?;
            crate::broker::store::write_atomic(
                &public,
                format!("{}\n", hex::encode(key.verifying_key().as_bytes())).as_bytes(),
                0o644,
            )?;
            tracing::info!(key = %public.display(), "created the audit checkpoint key");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// A record waiting to be written, and whoever waits for it to be durable.
pub enum Pending {
    /// Written with the next batch.
    Record(AuditRecord),
    /// Written and fsynced before `ack` is answered; not kept when the disk refuses it
    /// (whoever waits acts on the failure instead).
    Durable(AuditRecord, tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Like `Durable`, but answered once written (in the kernel's hands: it survives the
    /// process, not the machine), without an fsync.
    Written(AuditRecord, tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// The active file and the chain's head.
pub struct Trail {
    path: PathBuf,
    file: File,
    /// Bytes in the active file.
    len: u64,
    /// `seq` of the active file's first line (names it when rotated).
    first_seq: u64,
    /// The last line's `seq` and hash.
    seq: u64,
    head: [u8; 32],
    since_checkpoint: u64,
    key: SigningKey,
    kid: String,
    opts: TrailOptions,
    /// Records the disk refused, oldest first.
    retained: VecDeque<AuditRecord>,
    /// Records lost since the last `dropped` record.
    pub dropped: u64,
    /// Whether the last write failed (for logging transitions once).
    failing: bool,
    /// The lines of a batch, kept between batches: a new buffer per batch was page-faulted
    /// in again every time (the allocator returns freed memory to the kernel at once),
    /// about 1% of the daemon's CPU at full load.
    batch_buf: Vec<u8>,
}

/// The most of `batch_buf` kept between batches; a larger one (a burst) is let go.
const BATCH_BUF_KEEP: usize = 1 << 20;

impl std::fmt::Debug for Trail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trail").field("path", &self.path).field("seq", &self.seq).finish()
    }
}

/// The last complete line of `path` (and the length of a torn tail after it).
fn last_line(path: &Path) -> std::io::Result<(Option<Vec<u8>>, u64, u64)> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, 0, 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Lines are far shorter than this; read the end of the file.
    let window = len.min(4 << 20);
    f.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(window as usize);
    f.read_to_end(&mut tail)?;
    let Some(last_nl) = tail.iter().rposition(|&b| b == b'\n') else {
        // No complete line in the window: all of it is a torn tail (or the file is empty).
        return Ok((None, len - window, window));
    };
    let torn = (tail.len() - last_nl - 1) as u64;
    let start = tail[..last_nl].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok((Some(tail[start..last_nl].to_vec()), len - torn, torn))
}

/// `path`'s rotated siblings (`PATH.<first seq>`), oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_owned();
            let seq = n.strip_prefix(&prefix)?.parse::<u64>().ok()?;
            Some((seq, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

impl Trail {
    /// Opens the trail at `path`: continues the chain from its last line (or the last
    /// rotated file's), cuts off a torn last line (a crash mid-write), and writes a
    /// checkpoint that seals the start, recording any cut.
    pub fn open(path: &Path, opts: TrailOptions) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = load_or_create_key(&opts.key_dir)?;
        let (mut line, good_len, torn) = last_line(path)?;
        if torn > 0 {
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(good_len)?;
            f.sync_all()?;
            tracing::warn!(path = %path.display(), bytes = torn, "audit trail ended in a torn line (a crash while writing): cut off and recorded");
        }
        let mut first_seq = None;
        if line.is_none() {
            // An empty active file: the chain continues from the newest rotated file.
            if let Some(last) = rotated_files(path).pop() {
                line = last_line(&last)?.0;
            }
        } else {
            let mut f = File::open(path)?;
            let mut first = Vec::new();
            let mut byte = [0u8; 1];
            while f.read(&mut byte)? == 1 && byte[0] != b'\n' {
                first.push(byte[0]);
            }
            first_seq = serde_json::from_slice::<SeqOnly>(&first).ok().map(|s| s.seq);
        }
        let (seq, head) = match &line {
            Some(l) => {
                let seq = serde_json::from_slice::<SeqOnly>(l).map(|s| s.seq).unwrap_or_else(|_| {
                    tracing::error!(path = %path.display(), "the audit trail's last line has no seq: it continues after it, and wlctl audit verify will show the damage");
                    0
                });
                (seq, Sha256::digest(l).into())
            }
            None => (0, [0u8; 32]),
        };
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
        let len = file.metadata()?.len();
        let kid = kid(&key.verifying_key());
        let mut trail = Trail {
            path: path.to_owned(),
            file,
            len,
            first_seq: first_seq.unwrap_or(seq + 1),
            seq,
            head,
            since_checkpoint: 0,
            key,
            kid,
            opts,
            retained: VecDeque::new(),
            dropped: 0,
            failing: false,
            batch_buf: Vec::new(),
        };
        let reason = if torn > 0 { "recovered" } else { "start" };
        trail.write_checkpoint(reason, (torn > 0).then_some(torn))?;
        Ok(trail)
    }

    /// The chain's head: last `seq`.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends one serialized line for `record` to `buf`, advancing `seq` and `head`.
    fn push_line(&mut self, buf: &mut Vec<u8>, record: &AuditRecord) {
        let start = buf.len();
        let line =
            Line { time: super::now_rfc3339(), seq: self.seq + 1, prev: hex::encode(self.head), record };
        serde_json::to_writer(&mut *buf, &line).expect("audit records always serialize");
        self.head = Sha256::digest(&buf[start..]).into();
        self.seq += 1;
        buf.push(b'\n');
    }

    fn checkpoint_record(&self, reason: &'static str, torn_bytes: Option<u64>) -> AuditRecord {
        let signature = self.key.sign(&checkpoint_message(self.seq + 1, &self.head));
        AuditRecord::Checkpoint(Checkpoint {
            reason,
            count: self.seq + 1,
            kid: self.kid.clone(),
            sig: STANDARD.encode(signature.to_bytes()),
            torn_bytes,
        })
    }

    /// Writes `buf` at the end of the file (all or nothing), then fsyncs if `sync`.
    fn append(&mut self, buf: &[u8], sync: bool) -> std::io::Result<()> {
        let result =
            self.file.write_all(buf).and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Undo a partial write, so the file stays a sequence of whole lines.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Writes a checkpoint now, fsynced, then moves the anchor to it.
    fn write_checkpoint(&mut self, reason: &'static str, torn_bytes: Option<u64>) -> std::io::Result<()> {
        let (seq, head) = (self.seq, self.head);
        let record = self.checkpoint_record(reason, torn_bytes);
        let mut buf = Vec::with_capacity(512);
        self.push_line(&mut buf, &record);
        if let Err(e) = self.append(&buf, true) {
            self.seq = seq;
            self.head = head;
            return Err(e);
        }
        self.since_checkpoint = 0;
        self.write_anchor()
    }

    fn write_anchor(&self) -> std::io::Result<()> {
        let (_, _, anchor) = key_paths(&self.opts.key_dir);
        crate::broker::store::write_atomic(
            &anchor,
            format!("{} {}\n", self.seq, hex::encode(self.head)).as_bytes(),
            0o644,
        )
    }

    /// Writes a batch: records the disk refused before, the new ones, a checkpoint when
    /// one is due. Durable records are acknowledged after the fsync; on failure they are
    /// answered with the error and the others are kept for the next try.
    pub fn commit(&mut self, batch: Vec<Pending>, checkpoint_due: bool) {
        let mut records: Vec<AuditRecord> = self.retained.drain(..).collect();
        if self.dropped > 0 {
            records.push(AuditRecord::Dropped { count: self.dropped });
        }
        let mut acks = Vec::new();
        let mut durable_at = Vec::new();
        let mut sync = false;
        for p in batch {
            match p {
                Pending::Record(r) => records.push(r),
                Pending::Durable(r, ack) => {
                    sync = true;
                    durable_at.push(records.len());
                    records.push(r);
                    acks.push(ack);
                }
                Pending::Written(r, ack) => {
                    durable_at.push(records.len());
                    records.push(r);
                    acks.push(ack);
                }
            }
        }
        if records.is_empty() && !(checkpoint_due && self.since_checkpoint > 0) {
            return;
        }
        let (seq, head) = (self.seq, self.head);
        let mut buf = std::mem::take(&mut self.batch_buf);
        buf.clear();
        buf.reserve(records.len() * 600);
        for r in &records {
            self.push_line(&mut buf, r);
        }
        self.since_checkpoint += records.len() as u64;
        let checkpoint = checkpoint_due || self.since_checkpoint >= self.opts.checkpoint_every;
        if checkpoint {
            let cp = self.checkpoint_record("periodic", None);
            self.push_line(&mut buf, &cp);
        }
        let appended = self.append(&buf, sync || checkpoint);
        if buf.capacity() <= BATCH_BUF_KEEP {
            self.batch_buf = buf;
        }
        match appended {
            Ok(()) => {
                if self.failing {
                    tracing::info!(path = %self.path.display(), "audit trail writable again");
                    self.failing = false;
                }
                self.dropped = 0;
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
                if checkpoint {
                    self.since_checkpoint = 0;
                    if let Err(e) = self.write_anchor() {
                        tracing::error!(error = %e, "cannot move the audit anchor");
                    }
                }
                if self.len >= self.opts.rotate_bytes {
                    if let Err(e) = self.rotate() {
                        tracing::error!(path = %self.path.display(), error = %e, "audit rotation failed; the trail goes on in the same file");
                    }
                }
            }
            Err(e) => {
                METRICS.audit_write_errors.fetch_add(1, Ordering::Relaxed);
                self.seq = seq;
                self.head = head;
                self.since_checkpoint -= records.len() as u64;
                if !self.failing {
                    tracing::error!(path = %self.path.display(), error = %e, "audit write failed: records are kept in memory and retried; in enforce, requests are refused until it works");
                    self.failing = true;
                }
                let msg = format!("audit trail `{}` cannot be written: {e}", self.path.display());
                for ack in acks {
                    let _ = ack.send(Err(msg.clone()));
                }
                // Keep the rest (oldest first); a durable record's request was refused
                // instead, and its refusal is recorded on its own.
                let mut durable = durable_at.into_iter().peekable();
                for (i, r) in records.into_iter().enumerate() {
                    if durable.peek() == Some(&i) {
                        durable.next();
                        continue;
                    }
                    if matches!(r, AuditRecord::Dropped { .. }) {
                        continue; // recomputed from `dropped` next time
                    }
                    if self.retained.len() < RETAIN_MAX {
                        self.retained.push_back(r);
                    } else {
                        self.dropped += 1;
                        METRICS.audit_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        METRICS.audit_retained.store(self.retained.len() as u64, Ordering::Relaxed);
    }

    /// Writes `records` now, in order, after any kept from an earlier failure (no fsync:
    /// in the kernel's hands when it returns). An error means they are not written, and
    /// none of them is kept.
    pub fn write_now(&mut self, mut records: Vec<AuditRecord>) -> Result<(), String> {
        let Some(last) = records.pop() else { return Ok(()) };
        let (ack, mut done) = tokio::sync::oneshot::channel();
        let mut batch: Vec<Pending> = records.into_iter().map(Pending::Record).collect();
        batch.push(Pending::Written(last, ack));
        self.commit(batch, false);
        done.try_recv().unwrap_or_else(|_| Err("the record was not written".into()))
    }

    /// Seals the active file with a checkpoint, renames it `PATH.<first seq>`, and starts
    /// a new one; the chain goes on across the files.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.write_checkpoint("rotate", None)?;
        let rotated = PathBuf::from(format!("{}.{:012}", self.path.display(), self.first_seq));
        std::fs::rename(&self.path, &rotated)?;
        self.file = OpenOptions::new().create(true).append(true).mode(0o640).open(&self.path)?;
        self.len = 0;
        self.first_seq = self.seq + 1;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        tracing::info!(rotated = %rotated.display(), "audit trail rotated");
        Ok(())
    }

    /// Writes what is left and a final checkpoint.
    pub fn close(&mut self) {
        self.commit(Vec::new(), false);
        if let Err(e) = self.write_checkpoint("shutdown", None) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the final audit checkpoint");
        }
    }

    /// Whether records are waiting for the disk.
    pub fn has_retained(&self) -> bool {
        !self.retained.is_empty()
    }

    /// The public key checkpoints are signed with.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }
}
