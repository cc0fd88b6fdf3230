//! The ledger of redeemed tokens: what makes an SCT single-use, across broker restarts.
//!
//! A file of lines `JTI_HEX EXPIRES_MS`, appended before a secret is handed out. Appends are
//! written to the kernel (not fsynced: a redemption must stay well under a millisecond), so
//! they survive a crash or `kill -9` of the broker, which is what restarts are. What they
//! might not survive is the host itself going down; the first line of the file names the
//! boot it was written in (`boot BOOT_ID`), and a broker that finds a different boot id
//! accepts no token issued before it started, because it cannot know whether those were
//! used. Entries are pruned once their token has expired: the file is rewritten (write,
//! fsync, rename) when more than half of it is dead.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use super::sct::Refusal;

/// The single-use ledger.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    /// Redeemed, not yet expired: jti -> expiry (ms).
    used: HashMap<[u8; 16], i64>,
    /// Lines in the file (live and dead).
    lines: usize,
    /// Tokens issued before this time are refused (a reboot lost the ledger's tail).
    accept_issued_after_ms: i64,
    boot_id: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn parse_jti(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, keeping entries still live at `now_ms`.
    pub fn open(path: &Path, now_ms: i64) -> std::io::Result<Self> {
        let boot = boot_id();
        let mut used = HashMap::new();
        let mut accept_issued_after_ms = i64::MIN;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut lines = text.lines();
                let same_boot = lines.next().and_then(|l| l.strip_prefix("boot ")) == Some(boot.as_str());
                if !same_boot {
                    accept_issued_after_ms = now_ms;
                    tracing::warn!(
                        path = %path.display(),
                        "SCT ledger was written before the last reboot: tokens issued before now are refused"
                    );
                }
                for line in lines {
                    // A torn last line (crash mid-append) is an entry that was never
                    // acknowledged: its secret was not handed out.
                    let mut parts = line.split(' ');
                    let (Some(jti), Some(exp)) = (parts.next().and_then(parse_jti), parts.next()) else {
                        continue;
                    };
                    if let Ok(exp) = exp.parse::<i64>() {
                        if exp >= now_ms - 60_000 {
                            used.insert(jti, exp);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut ledger = Ledger {
            path: path.to_owned(),
            file: File::open("/dev/null")?,
            used,
            lines: 0,
            accept_issued_after_ms,
            boot_id: boot,
        };
        ledger.rewrite()?;
        Ok(ledger)
    }

    /// Rewrites the file with only the live entries (write, fsync, rename, fsync dir).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let mut text = format!("boot {}\n", self.boot_id);
        for (jti, exp) in &self.used {
            text.push_str(&format!("{} {exp}\n", hex::encode(jti)));
        }
        super::store::write_atomic(&self.path, text.as_bytes(), 0o600)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = self.used.len();
        Ok(())
    }

    /// Records `jti` as used, or refuses it if it was used before (or cannot be known).
    /// `Ok` means the entry is in the file: only then may the secret be handed out.
    pub fn redeem(
        &mut self,
        jti: &[u8; 16],
        issued_ms: i64,
        expires_ms: i64,
        now_ms: i64,
    ) -> Result<Result<(), Refusal>, std::io::Error> {
        if issued_ms < self.accept_issued_after_ms {
            return Ok(Err(Refusal::Unverifiable));
        }
        if self.used.contains_key(jti) {
            return Ok(Err(Refusal::Replayed));
        }
        self.file.write_all(format!("{} {expires_ms}\n", hex::encode(jti)).as_bytes())?;
        self.used.insert(*jti, expires_ms);
        self.lines += 1;
        // Counting the live entries walks them all: only every 1,024 appends.
        if self.lines > 1024 && self.lines.is_multiple_of(1024) && self.lines > 2 * self.live(now_ms) {
            self.prune(now_ms)?;
        }
        Ok(Ok(()))
    }

    fn live(&self, now_ms: i64) -> usize {
        self.used.values().filter(|exp| **exp >= now_ms - 60_000).count()
    }

    /// Forgets tokens that expired more than a minute ago (they would be refused as expired
    /// anyway: the skew allowance is far below that) and compacts the file.
    pub fn prune(&mut self, now_ms: i64) -> std::io::Result<()> {
        self.used.retain(|_, exp| *exp >= now_ms - 60_000);
        self.rewrite()
    }

    /// How many tokens are remembered.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_survives_reopen_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let now = 1_800_000_000_000;
        let mut l = Ledger::open(&path, now).unwrap();
        assert_eq!(l.redeem(&[1; 16], now, now + 30_000, now).unwrap(), Ok(()));
        assert_eq!(l.redeem(&[1; 16], now, now + 30_000, now).unwrap(), Err(Refusal::Replayed));
        assert_eq!(l.redeem(&[2; 16], now - 200_000, now - 170_000, now).unwrap(), Ok(()));
        drop(l);
        // A torn line at the end is ignored.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"0303").unwrap();
        let mut l = Ledger::open(&path, now + 1_000).unwrap();
        assert_eq!(l.redeem(&[1; 16], now, now + 30_000, now).unwrap(), Err(Refusal::Replayed));
        assert_eq!(l.len(), 1, "the long-expired entry was pruned on open");
        // Another boot: nothing issued before the start is accepted.
        let text = std::fs::read_to_string(&path).unwrap();
        let rest = text.split_once('\n').unwrap().1;
        std::fs::write(&path, format!("boot another-boot\n{rest}")).unwrap();
        let mut l = Ledger::open(&path, now + 2_000).unwrap();
        assert_eq!(
            l.redeem(&[9; 16], now + 1_500, now + 30_000, now + 2_000).unwrap(),
            Err(Refusal::Unverifiable)
        );
        assert_eq!(l.redeem(&[9; 16], now + 2_000, now + 30_000, now + 2_000).unwrap(), Ok(()));
    }
}
