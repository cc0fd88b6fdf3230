//! `wlctl audit verify`: checks a trail offline, across its rotated files: every line
//! whole and in sequence, every `prev` the hash of the line before, every checkpoint's
//! signature by the trail's key, and the end of the trail against the anchor (the last
//! checkpoint the writer saw on disk). Reports the first record that is wrong and why.
//! A torn last line (a crash mid-write) is reported as such, not as tampering.

use std::path::{Path, PathBuf};

use base64::{engine::general_purpose::STANDARD, Engine};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::trail::{checkpoint_message, kid, unhex32};

/// Where the trail went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number in it.
    pub line: usize,
    /// The record's `seq`, when it has one.
    pub seq: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{} line {} (seq {seq}): {}", self.file.display(), self.line, self.what),
            None => write!(f, "{} line {}: {}", self.file.display(), self.line, self.what),
        }
    }
}

/// The outcome.
#[derive(Debug, Default)]
pub struct Report {
    /// Lines checked.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// `seq` of the first and last records.
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    pub last_seq: Option<u64>,
    /// A torn last line: the file and its length in bytes.
    pub torn_tail: Option<(PathBuf, usize)>,
    /// Torn tails cut off by a restart, as recorded by its checkpoint: (seq, bytes).
    pub recovered: Vec<(u64, u64)>,
    /// The first problem; `None` means the trail is intact.
    pub problem: Option<Problem>,
}

/// The anchor: the last checkpoint's `seq` and line hash.
pub fn read_anchor(path: &Path) -> Result<(u64, [u8; 32]), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the anchor `{}`: {e}", path.display()))?;
    let mut parts = text.split_whitespace();
    let seq = parts.next().and_then(|s| s.parse().ok());
    let hash = parts.next().and_then(unhex32);
    match (seq, hash) {
        (Some(s), Some(h)) => Ok((s, h)),
        _ => Err(format!("the anchor `{}` is malformed", path.display())),
    }
}

/// Reads a public key file (64 hex digits).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key `{}`: {e}", path.display()))?;
    unhex32(text.trim())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| format!("`{}` is not an Ed25519 public key in hex", path.display()))
}

#[derive(Deserialize)]
struct Head<'a> {
    seq: u64,
    prev: &'a str,
    kind: &'a str,
    #[serde(default)]
    sig: Option<&'a str>,
    #[serde(default)]
    kid: Option<&'a str>,
    #[serde(default)]
    torn_bytes: Option<u64>,
}

/// Verifies `files` in order (oldest first) with `key` and, when given, the anchor.
pub fn verify(files: &[PathBuf], key: &VerifyingKey, anchor: Option<(u64, [u8; 32])>) -> Report {
    let mut report = Report::default();
    let key_id = kid(key);
    let mut prev: Option<(u64, [u8; 32])> = None;
    // The hash of the line with the anchor's seq, when seen.
    let mut anchored_line: Option<[u8; 32]> = None;
    let last_file = files.len().saturating_sub(1);
    for (fi, file) in files.iter().enumerate() {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                report.problem = Some(Problem {
                    file: file.clone(),
                    line: 0,
                    seq: None,
                    what: format!("cannot read: {e}"),
                });
                return report;
            }
        };
        let mut rest = &bytes[..];
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let problem =
                |seq: Option<u64>, what: String| Problem { file: file.clone(), line: line_no, seq, what };
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if fi == last_file {
                    report.torn_tail = Some((file.clone(), rest.len()));
                } else {
                    report.problem = Some(problem(None, "incomplete line inside the trail".into()));
                }
                break;
            };
            let line = &rest[..nl];
            rest = &rest[nl + 1..];
            let head: Head = match serde_json::from_slice(line) {
                Ok(h) => h,
                Err(e) => {
                    report.problem = Some(problem(None, format!("not an audit record ({e}): altered")));
                    return report;
                }
            };
            let hash: [u8; 32] = Sha256::digest(line).into();
            match prev {
                None => {
                    if head.seq != 1 && fi == 0 && line_no == 1 {
                        // Older files were not given (or were removed by retention).
                    }
                }
                Some((prev_seq, prev_hash)) => {
                    if head.seq != prev_seq + 1 {
                        report.problem = Some(problem(
                            Some(head.seq),
                            format!(
                                "seq {} follows seq {prev_seq}: records are missing, reordered or inserted",
                                head.seq
                            ),
                        ));
                        return report;
                    }
                    if head.prev != hex::encode(prev_hash) {
                        report.problem = Some(problem(
                            Some(head.seq),
                            format!(
                                "its prev does not match the hash of seq {prev_seq}: that record or this one was altered"
                            ),
                        ));
                        return report;
                    }
                }
            }
            if head.kind == "checkpoint" {
                let prev_bytes = unhex32(head.prev);
                let sig = head
                    .sig
                    .and_then(|s| STANDARD.decode(s).ok())
                    .and_then(|s| Signature::from_slice(&s).ok());
                match (prev_bytes, sig) {
                    (Some(p), Some(sig)) if head.kid == Some(key_id.as_str()) => {
                        if key.verify_strict(&checkpoint_message(head.seq, &p), &sig).is_err() {
                            report.problem = Some(problem(
                                Some(head.seq),
                                "checkpoint signature does not verify: altered".into(),
                            ));
                            return report;
                        }
                        report.checkpoints += 1;
                    }
                    (Some(_), Some(_)) => {
                        report.problem = Some(problem(
                            Some(head.seq),
                            format!("checkpoint signed by key {:?}, not by the given key {key_id}", head.kid),
                        ));
                        return report;
                    }
                    _ => {
                        report.problem =
                            Some(problem(Some(head.seq), "checkpoint without a valid signature".into()));
                        return report;
                    }
                }
                if let Some(n) = head.torn_bytes {
                    report.recovered.push((head.seq, n));
                }
            }
            if anchor.is_some_and(|(s, _)| s == head.seq) {
                anchored_line = Some(hash);
            }
            report.first_seq.get_or_insert(head.seq);
            report.last_seq = Some(head.seq);
            report.records += 1;
            prev = Some((head.seq, hash));
        }
    }
    if let Some((seq, hash)) = anchor {
        let last = report.last_seq.unwrap_or(0);
        let file = files.last().cloned().unwrap_or_default();
        if last < seq {
            report.problem = Some(Problem {
                file,
                line: 0,
                seq: Some(last),
                what: format!("the trail ends at seq {last}, but checkpoint seq {seq} was written: records were cut off"),
            });
        } else if anchored_line.is_some_and(|h| h != hash) {
            report.problem = Some(Problem {
                file,
                line: 0,
                seq: Some(seq),
                what: format!(
                    "checkpoint seq {seq} is not the one written (its hash differs from the anchor): altered"
                ),
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{
        trail::{key_paths, rotated_files, Pending, Trail, TrailOptions},
        AuditRecord,
    };

    fn options(dir: &Path, rotate_bytes: u64) -> TrailOptions {
        TrailOptions {
            key_dir: dir.join("keys"),
            rotate_bytes,
            checkpoint_every: 50,
            checkpoint_interval: Duration::from_secs(3600),
        }
    }

    /// A closed trail of `n` records (plus checkpoints) in `dir/audit.jsonl`.
    fn write(dir: &Path, n: u64, rotate_bytes: u64) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut t = Trail::open(&path, options(dir, rotate_bytes)).unwrap();
        for i in 0..n {
            t.commit(vec![Pending::Record(AuditRecord::Dropped { count: i })], false);
        }
        t.close();
        path
    }

    fn check(dir: &Path, files: &[PathBuf]) -> Report {
        let (_, public, anchor) = key_paths(&dir.join("keys"));
        verify(files, &read_public_key(&public).unwrap(), Some(read_anchor(&anchor).unwrap()))
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn an_untouched_trail_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 120, 1 << 30);
        let r = check(dir.path(), std::slice::from_ref(&path));
        assert_eq!(r.problem, None);
        // 120 records, start + 2 periodic + shutdown checkpoints.
        assert_eq!(r.records, 124);
        assert_eq!(r.checkpoints, 4);
        assert_eq!((r.first_seq, r.last_seq), (Some(1), Some(124)));
        // Reopened, the chain goes on.
        let r = {
            write(dir.path(), 10, 1 << 30);
            check(dir.path(), &[path])
        };
        assert_eq!(r.problem, None);
        assert_eq!(r.last_seq, Some(124 + 12));
    }

    #[test]
    fn every_kind_of_tampering_is_found_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 120, 1 << 30);
        let original = lines(&path);

        // A flipped byte, in a record in the middle and in the very last line.
        for (index, seq) in [(40usize, 41u64), (original.len() - 1, original.len() as u64)] {
            let mut l = original.clone();
            l[index] = l[index].replacen("\"count\":", "\"count\" :", 1).replacen("shutdown", "shutdowN", 1);
            assert_ne!(l[index], original[index]);
            rewrite(&path, &l);
            let p = check(dir.path(), std::slice::from_ref(&path)).problem.expect("a flipped byte is found");
            assert!(p.seq == Some(seq) || p.seq == Some(seq + 1), "{p}");
        }
        // One record deleted.
        let mut l = original.clone();
        l.remove(60);
        rewrite(&path, &l);
        let p = check(dir.path(), std::slice::from_ref(&path)).problem.unwrap();
        assert_eq!(p.seq, Some(62), "{p}");
        assert!(p.what.contains("missing"), "{p}");
        // Two records swapped.
        let mut l = original.clone();
        l.swap(70, 71);
        rewrite(&path, &l);
        let p = check(dir.path(), std::slice::from_ref(&path)).problem.unwrap();
        assert_eq!(p.line, 71, "{p}");
        // The tail cut off at a line boundary, and in the middle of a line.
        rewrite(&path, &original[..100]);
        let p = check(dir.path(), std::slice::from_ref(&path)).problem.unwrap();
        assert!(p.what.contains("cut off"), "{p}");
        let mut text = original.iter().map(|l| format!("{l}\n")).collect::<String>();
        text.truncate(text.len() - 30);
        std::fs::write(&path, &text).unwrap();
        let r = check(dir.path(), std::slice::from_ref(&path));
        assert!(r.torn_tail.is_some());
        assert!(r.problem.unwrap().what.contains("cut off"));
        // A forged checkpoint: the signature no longer matches.
        let mut l = original.clone();
        let cp = l.iter().position(|x| x.contains("\"periodic\"")).unwrap();
        let sig_at = l[cp].find("\"sig\":\"").unwrap() + 7;
        let mut bytes = l[cp].clone().into_bytes();
        bytes[sig_at + 3] = if bytes[sig_at + 3] == b'A' { b'B' } else { b'A' };
        l[cp] = String::from_utf8(bytes).unwrap();
        // Re-chain the rest, as a forger who rewrote hashes would.
        for i in cp..l.len() {
            let prev = hex::encode(Sha256::digest(l[i - 1].as_bytes()));
            let at = l[i].find("\"prev\":\"").unwrap() + 8;
            l[i].replace_range(at..at + 64, &prev);
        }
        rewrite(&path, &l);
        let p = check(dir.path(), std::slice::from_ref(&path)).problem.unwrap();
        assert!(p.what.contains("signature"), "{p}");
    }

    #[test]
    fn a_torn_tail_from_a_crash_is_reported_then_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut t = Trail::open(&path, options(dir.path(), 1 << 30)).unwrap();
        for i in 0..10 {
            t.commit(vec![Pending::Record(AuditRecord::Dropped { count: i })], false);
        }
        drop(t); // a crash: no final checkpoint
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"time\":\"2026").unwrap();
        let r = check(dir.path(), std::slice::from_ref(&path));
        assert_eq!(r.problem, None, "a torn tail is not tampering");
        assert_eq!(r.torn_tail.as_ref().map(|(_, n)| *n), Some(13));
        // The next start cuts it off and records that in a checkpoint.
        drop(Trail::open(&path, options(dir.path(), 1 << 30)).unwrap());
        let r = check(dir.path(), &[path]);
        assert_eq!(r.problem, None);
        assert_eq!(r.torn_tail, None);
        assert_eq!(r.recovered, vec![(12, 13)]);
    }

    #[test]
    fn a_crash_during_the_very_first_line_is_cut_off_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let torn = b"{\"time\":\"2026-11-25T";
        std::fs::write(&path, torn).unwrap();
        drop(Trail::open(&path, options(dir.path(), 1 << 30)).unwrap());
        let r = check(dir.path(), std::slice::from_ref(&path));
        assert_eq!(r.problem, None);
        assert_eq!(r.first_seq, Some(1), "the chain starts afresh after the cut");
        assert_eq!(r.recovered, vec![(1, torn.len() as u64)]);
    }

    #[test]
    fn the_chain_goes_on_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 300, 8 * 1024);
        let mut files = rotated_files(&path);
        assert!(files.len() >= 3, "{files:?}");
        files.push(path);
        let r = check(dir.path(), &files);
        assert_eq!(r.problem, None);
        assert_eq!(r.first_seq, Some(1));
        // A rotated file removed from the middle breaks the chain.
        let mut gap = files.clone();
        gap.remove(1);
        let p = check(dir.path(), &gap).problem.unwrap();
        assert!(p.what.contains("missing"), "{p}");
    }

    use std::io::Write;
}
