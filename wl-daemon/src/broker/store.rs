//! The broker's state at rest: secrets and SCT signing keys, each sealed with
//! XChaCha20-Poly1305 under the store key, one file per item, replaced atomically.
//!
//! The store key comes from the systemd credential `wl-store-key` when the broker runs
//! with one (`LoadCredential=`/`LoadCredentialEncrypted=`, found in `$CREDENTIALS_DIRECTORY`),
//! otherwise from `store.key` (mode 0600) in the broker's state directory, created on first
//! start. Everything an item's file says about it (name, hosts, times, version) is
//! authenticated as the AEAD's associated data, so neither a value nor its host binding can
//! be swapped or edited on disk without decryption failing.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use chacha20poly1305::{
    aead::{Aead, Payload},
    KeyInit, XChaCha20Poly1305, XNonce,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::sct::{key_id, MAX_TTL_MS};

/// The name of the systemd credential holding the store key.
pub const CREDENTIAL_NAME: &str = "wl-store-key";

/// A secret's value. Never printed: `Debug` shows only its length; zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wraps bytes (taking ownership, so no copy is left behind).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue(<{} bytes, redacted>)", self.0.len())
    }
}

/// Errors of the store. None carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system trouble.
    #[error("{what} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A sealed file does not decrypt or parse: tampered with, or sealed under another key.
    #[error("`{}` cannot be opened with the store key (edited, corrupted, or sealed under another key): {why}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// The store key is unusable.
    #[error("store key `{}`: {why}", path.display())]
    Key {
        /// Where it came from.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content: write
/// a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the store key: the systemd credential if `credentials_dir` has it, else the key
/// file in `state_dir`, created (32 random bytes, mode 0600) when absent.
pub fn load_key(
    state_dir: &Path,
    credentials_dir: Option<&Path>,
) -> Result<(Zeroizing<[u8; 32]>, PathBuf), StoreError> {
    let from_bytes = |path: &Path, raw: Zeroizing<Vec<u8>>| -> Result<Zeroizing<[u8; 32]>, StoreError> {
        // 32 raw bytes, or 64 hex digits (what `systemd-creds` users tend to write).
        let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
        } else if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            for (i, b) in key.iter_mut().enumerate() {
                *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex digits");
            }
        } else {
            return Err(StoreError::Key {
                path: path.to_owned(),
                why: format!("must be 32 bytes or 64 hex digits, found {} bytes", raw.len()),
            });
        }
        Ok(key)
    };
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            let raw = Zeroizing::new(std::fs::read(&path).map_err(|source| StoreError::Io {
                what: "cannot read the store key credential",
                path: path.clone(),
                source,
            })?);
            return Ok((from_bytes(&path, raw)?, path));
        }
    }
    let path = state_dir.join("store.key");
    match std::fs::read(&path) {
        Ok(raw) => {
            let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o077).unwrap_or(0);
            if mode != 0 {
                return Err(StoreError::Key {
                    path,
                    why: format!("is readable by group or others (mode has {mode:03o}): chmod 600 it"),
                });
            }
            Ok((from_bytes(&path, Zeroizing::new(raw))?, path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = Zeroizing::new([0u8; 32]);
            getrandom::fill(key.as_mut_slice())
                .map_err(|e| StoreError::Key { path: path.clone(), why: format!("no randomness: {e}") })?;
            write_atomic(&path, key.as_slice(), 0o600).map_err(|source| StoreError::Io {
                what: "cannot create the store key",
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "created a new store key");
            Ok((key, path))
        }
        Err(source) => Err(StoreError::Io { what: "cannot read the store key", path, source }),
    }
}

/// One sealed file: the public description (authenticated) and the encrypted bytes.
#[derive(Serialize, Deserialize)]
struct SealedFile<M> {
    format: u32,
    #[serde(flatten)]
    meta: M,
    nonce: String,
    ciphertext: String,
}

/// Seals and opens items under the store key.
struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    fn seal<M: Serialize>(&self, domain: &str, meta: M, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).expect("the kernel's randomness is available");
        let aad = format!("{domain}\0{}", serde_json::to_string(&meta).expect("metadata serializes"));
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: aad.as_bytes() })
            .expect("encryption of a bounded buffer cannot fail");
        let file = SealedFile {
            format: 1,
            meta,
            nonce: STANDARD.encode(nonce),
            ciphertext: STANDARD.encode(ciphertext),
        };
        let mut out = serde_json::to_vec_pretty(&file).expect("sealed files serialize");
        out.push(b'\n');
        out
    }

    fn open<M: Serialize + for<'de> Deserialize<'de>>(
        &self,
        domain: &str,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(M, Zeroizing<Vec<u8>>), StoreError> {
        let (meta, sealed) = unpack(domain, path, bytes)?;
        Ok((meta, self.decrypt(&sealed, path)?))
    }

    /// The plaintext of an unpacked item; `path` names it in the error.
    fn decrypt(&self, sealed: &Sealed, path: &Path) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad: &sealed.aad })
            .map_err(|_| StoreError::Corrupt {
                path: path.to_owned(),
                why: "authentication failed".into(),
            })?;
        Ok(Zeroizing::new(plain))
    }
}

/// A sealed item decoded from its file but still encrypted: what the store keeps in
/// memory, so that handing a value out is one decryption, not a JSON parse (with a
/// flattened struct, slow in serde) and two base64 decodings first.
struct Sealed {
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
    /// The associated data the tag covers: the domain and the metadata as sealed.
    aad: Vec<u8>,
}

/// Decodes a sealed file's JSON, leaving the ciphertext encrypted.
fn unpack<M: Serialize + for<'de> Deserialize<'de>>(
    domain: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<(M, Sealed), StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { path: path.to_owned(), why };
    let file: SealedFile<M> = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.format != 1 {
        return Err(corrupt(format!("unknown format {}", file.format)));
    }
    let nonce: [u8; 24] = STANDARD
        .decode(&file.nonce)
        .map_err(|e| corrupt(format!("nonce: {e}")))?
        .try_into()
        .map_err(|_| corrupt("nonce must be 24 bytes".into()))?;
    let ciphertext = STANDARD.decode(&file.ciphertext).map_err(|e| corrupt(format!("ciphertext: {e}")))?;
    let aad =
        format!("{domain}\0{}", serde_json::to_string(&file.meta).expect("metadata serializes")).into_bytes();
    Ok((file.meta, Sealed { nonce, ciphertext, aad }))
}

/// What the store tells about a secret (never its value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// Its name.
    pub name: String,
    /// The hosts it may be sent to (the built-in broker policy checks this).
    pub hosts: Vec<String>,
    /// Unix ms when first stored.
    pub created_ms: i64,
    /// Unix ms of the last rotation, if any.
    pub rotated_ms: Option<i64>,
    /// 1, then +1 per rotation.
    pub version: u32,
}

const SECRET_DOMAIN: &str = "wl-secret-v1";
const KEY_DOMAIN: &str = "wl-sct-key-v1";

/// Checks a secret name: 1-64 of `A-Z a-z 0-9 _ . -`, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid secret name `{}`: use 1-64 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`",
            name.escape_debug()
        ))
    }
}

/// The secrets, sealed on disk and in memory; a value is decrypted only to be handed out.
pub struct SecretStore {
    dir: PathBuf,
    sealer: Sealer,
    items: HashMap<String, (SecretMeta, Sealed)>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore").field("dir", &self.dir).field("secrets", &self.items.len()).finish()
    }
}

/// Why a store operation was refused (the broker turns these into error codes).
#[derive(Debug, thiserror::Error)]
pub enum StoreRefusal {
    /// No secret of that name.
    #[error("no secret named `{0}` (wlctl secret list shows the names)")]
    NoSuchSecret(String),
    /// `put` of a name that exists.
    #[error("a secret named `{0}` exists: use wlctl secret rotate to replace its value")]
    Exists(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The disk.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SecretStore {
    /// Opens the store in `dir/secrets` with `key`. A file that does not open is an error:
    /// the broker must not start with a store it cannot vouch for.
    pub fn open(dir: &Path, key: &[u8; 32]) -> Result<Self, StoreError> {
        let dir = dir.join("secrets");
        std::fs::create_dir_all(&dir).map_err(io_error("cannot create the secret store", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("cannot restrict the secret store", &dir))?;
        let sealer = Sealer { cipher: XChaCha20Poly1305::new(key.into()) };
        let mut items = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error("cannot list the secret store", &dir))? {
            let path = entry.map_err(io_error("cannot list the secret store", &dir))?.path();
            let Some(name) =
                path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sealed"))
            else {
                continue; // temporary files of an interrupted write, and anything else
            };
            let bytes = std::fs::read(&path).map_err(io_error("cannot read", &path))?;
            let (meta, sealed): (SecretMeta, _) = unpack(SECRET_DOMAIN, &path, &bytes)?;
            // Opened once here, so that a file that does not open stops the start.
            sealer.decrypt(&sealed, &path)?;
            if meta.name != name {
                return Err(StoreError::Corrupt { path, why: format!("holds the secret `{}`", meta.name) });
            }
            items.insert(meta.name.clone(), (meta, sealed));
        }
        Ok(Self { dir, sealer, items })
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sealed"))
    }

    fn write(&mut self, meta: SecretMeta, value: &SecretValue) -> Result<(), StoreError> {
        let path = self.path_of(&meta.name);
        let bytes = self.sealer.seal(SECRET_DOMAIN, &meta, value.expose());
        write_atomic(&path, &bytes, 0o600).map_err(|source| StoreError::Io {
            what: "cannot write the secret",
            path: path.clone(),
            source,
        })?;
        let (_, sealed): (SecretMeta, _) = unpack(SECRET_DOMAIN, &path, &bytes)?;
        self.items.insert(meta.name.clone(), (meta, sealed));
        Ok(())
    }

    /// Stores a new secret. Durable when it returns.
    pub fn put(
        &mut self,
        name: &str,
        hosts: Vec<String>,
        value: &SecretValue,
        now_ms: i64,
    ) -> Result<SecretMeta, StoreRefusal> {
        check_name(name).map_err(StoreRefusal::Invalid)?;
        if hosts.is_empty() {
            return Err(StoreRefusal::Invalid(format!(
                "secret `{name}` needs at least one --host it may be sent to"
            )));
        }
        if value.expose().is_empty() {
            return Err(StoreRefusal::Invalid("the secret's value is empty".into()));
        }
        if self.items.contains_key(name) {
            return Err(StoreRefusal::Exists(name.to_owned()));
        }
        let meta =
            SecretMeta { name: name.to_owned(), hosts, created_ms: now_ms, rotated_ms: None, version: 1 };
        self.write(meta.clone(), value)?;
        Ok(meta)
    }

    /// Replaces a secret's value (and its hosts, when given). Durable when it returns.
    pub fn rotate(
        &mut self,
        name: &str,
        hosts: Option<Vec<String>>,
        value: &SecretValue,
        now_ms: i64,
    ) -> Result<SecretMeta, StoreRefusal> {
        if value.expose().is_empty() {
            return Err(StoreRefusal::Invalid("the secret's value is empty".into()));
        }
        let (old, _) = self.items.get(name).ok_or_else(|| StoreRefusal::NoSuchSecret(name.to_owned()))?;
        let meta = SecretMeta {
            hosts: hosts.filter(|h| !h.is_empty()).unwrap_or_else(|| old.hosts.clone()),
            rotated_ms: Some(now_ms),
            version: old.version + 1,
            ..old.clone()
        };
        self.write(meta.clone(), value)?;
        Ok(meta)
    }

    /// Removes a secret.
    pub fn remove(&mut self, name: &str) -> Result<(), StoreRefusal> {
        if !self.items.contains_key(name) {
            return Err(StoreRefusal::NoSuchSecret(name.to_owned()));
        }
        let path = self.path_of(name);
        std::fs::remove_file(&path)
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(|source| StoreError::Io { what: "cannot remove the secret", path, source })?;
        self.items.remove(name);
        Ok(())
    }

    /// A secret's description.
    pub fn meta(&self, name: &str) -> Option<&SecretMeta> {
        self.items.get(name).map(|(m, _)| m)
    }

    /// Every secret's description, by name.
    pub fn list(&self) -> Vec<SecretMeta> {
        let mut all: Vec<SecretMeta> = self.items.values().map(|(m, _)| m.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Decrypts a secret's value.
    pub fn value(&self, name: &str) -> Result<SecretValue, StoreRefusal> {
        let (_, sealed) = self.items.get(name).ok_or_else(|| StoreRefusal::NoSuchSecret(name.to_owned()))?;
        let mut plain = self.sealer.decrypt(sealed, &self.path_of(name))?;
        // Moved, not copied: no second plaintext to zero.
        Ok(SecretValue::new(std::mem::take(&mut *plain)))
    }

    /// How many secrets.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The SCT signing keys, sealed in `keys/` beside the secrets.
    pub fn keyring(&self, now_ms: i64) -> Result<KeyRing, StoreError> {
        KeyRing::open(self.dir.parent().unwrap_or(&self.dir), &self.sealer, now_ms)
    }
}

/// A signing key's description.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeyMeta {
    kid: String,
    created_ms: i64,
    retired_ms: Option<i64>,
}

/// The SCT signing keys: the current one signs; retired ones still verify until every
/// token they signed has expired.
pub struct KeyRing {
    dir: PathBuf,
    current: (SigningKey, KeyMeta),
    verifiers: HashMap<[u8; 8], (VerifyingKey, KeyMeta)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current.1.kid)
            .field("keys", &self.verifiers.len())
            .finish()
    }
}

impl KeyRing {
    fn open(state_dir: &Path, sealer: &Sealer, now_ms: i64) -> Result<Self, StoreError> {
        let dir = state_dir.join("keys");
        std::fs::create_dir_all(&dir).map_err(io_error("cannot create the key directory", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("cannot restrict the key directory", &dir))?;
        let mut current: Option<(SigningKey, KeyMeta)> = None;
        let mut verifiers = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error("cannot list the keys", &dir))? {
            let path = entry.map_err(io_error("cannot list the keys", &dir))?.path();
            if path.extension().is_none_or(|e| e != "sealed") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io_error("cannot read", &path))?;
            let (meta, seed): (KeyMeta, _) = sealer.open(KEY_DOMAIN, &path, &bytes)?;
            let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                path: path.clone(),
                why: "a signing key is 32 bytes".into(),
            })?;
            let key = SigningKey::from_bytes(&seed);
            match meta.retired_ms {
                // Every token it signed has expired (and the skew allowance is far shorter).
                Some(retired) if retired + 2 * MAX_TTL_MS < now_ms => {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                Some(_) => {}
                None => {
                    if current.as_ref().is_none_or(|(_, m)| m.created_ms < meta.created_ms) {
                        current = Some((key.clone(), meta.clone()));
                    }
                }
            }
            verifiers.insert(key_id(&key.verifying_key()), (key.verifying_key(), meta));
        }
        let mut ring = match current {
            Some(current) => KeyRing { dir, current, verifiers },
            None => {
                let (key, meta) = Self::generate(&dir, sealer, now_ms)?;
                verifiers.insert(key_id(&key.verifying_key()), (key.verifying_key(), meta.clone()));
                KeyRing { dir, current: (key, meta), verifiers }
            }
        };
        ring.verifiers.retain(|_, (_, m)| m.retired_ms.is_none_or(|r| r + 2 * MAX_TTL_MS >= now_ms));
        Ok(ring)
    }

    fn generate(dir: &Path, sealer: &Sealer, now_ms: i64) -> Result<(SigningKey, KeyMeta), StoreError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).expect("the kernel's randomness is available");
        let key = SigningKey::from_bytes(&seed);
        let meta =
            KeyMeta { kid: hex::encode(key_id(&key.verifying_key())), created_ms: now_ms, retired_ms: None };
        Self::write(dir, sealer, &meta, seed.as_slice())?;
        Ok((key, meta))
    }

    fn write(dir: &Path, sealer: &Sealer, meta: &KeyMeta, seed: &[u8]) -> Result<(), StoreError> {
        let path = dir.join(format!("{}.sealed", meta.kid));
        let bytes = sealer.seal(KEY_DOMAIN, meta, seed);
        write_atomic(&path, &bytes, 0o600).map_err(|source| StoreError::Io {
            what: "cannot write the signing key",
            path,
            source,
        })
    }

    /// The key that signs new tokens.
    pub fn signer(&self) -> &SigningKey {
        &self.current.0
    }

    /// The current key's id (hex).
    pub fn current_kid(&self) -> &str {
        &self.current.1.kid
    }

    /// A key that may verify tokens now.
    pub fn verifier(&self, kid: &[u8; 8], now_ms: i64) -> Option<VerifyingKey> {
        self.verifiers
            .get(kid)
            .filter(|(_, m)| m.retired_ms.is_none_or(|r| r + MAX_TTL_MS + super::SKEW_MS >= now_ms))
            .map(|(k, _)| *k)
    }

    /// Makes a new current key; the old one verifies until its tokens have expired.
    pub fn rotate(&mut self, store: &SecretStore, now_ms: i64) -> Result<String, StoreError> {
        let (old_key, mut old_meta) = self.current.clone();
        old_meta.retired_ms = Some(now_ms);
        let (key, meta) = Self::generate(&self.dir, &store.sealer, now_ms)?;
        Self::write(&self.dir, &store.sealer, &old_meta, old_key.as_bytes())?;
        self.verifiers.insert(key_id(&old_key.verifying_key()), (old_key.verifying_key(), old_meta));
        self.verifiers.insert(key_id(&key.verifying_key()), (key.verifying_key(), meta.clone()));
        self.current = (key, meta);
        Ok(self.current.1.kid.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_resist_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_key(dir.path(), None).unwrap();
        let mode = std::fs::metadata(dir.path().join("store.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut store = SecretStore::open(dir.path(), &key).unwrap();
        let value = SecretValue::new(b"sk-live-0123456789".to_vec());
        store.put("openai", vec!["api.openai.com".into()], &value, 1).unwrap();
        assert!(matches!(store.put("openai", vec!["x".into()], &value, 2), Err(StoreRefusal::Exists(_))));
        assert!(matches!(store.put("../x", vec!["x".into()], &value, 2), Err(StoreRefusal::Invalid(_))));
        assert!(format!("{value:?}").contains("redacted"));

        // Nothing of the value on disk in clear.
        let file = std::fs::read(dir.path().join("secrets/openai.sealed")).unwrap();
        assert!(!file.windows(value.expose().len()).any(|w| w == value.expose()));

        let store = SecretStore::open(dir.path(), &key).unwrap();
        assert_eq!(store.value("openai").unwrap(), value);
        assert_eq!(store.meta("openai").unwrap().hosts, vec!["api.openai.com".to_string()]);

        // Rebinding the secret to another host on disk breaks it.
        let text = String::from_utf8(file).unwrap().replace("api.openai.com", "evil.example");
        std::fs::write(dir.path().join("secrets/openai.sealed"), text).unwrap();
        let err = SecretStore::open(dir.path(), &key).unwrap_err();
        assert!(err.to_string().contains("authentication failed"), "{err}");
    }

    #[test]
    fn rotation_keeps_old_keys_verifying_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_key(dir.path(), None).unwrap();
        let store = SecretStore::open(dir.path(), &key).unwrap();
        let mut ring = store.keyring(1_000).unwrap();
        let old = key_id(&ring.signer().verifying_key());
        ring.rotate(&store, 2_000).unwrap();
        let new = key_id(&ring.signer().verifying_key());
        assert_ne!(old, new);
        assert!(ring.verifier(&old, 2_000 + MAX_TTL_MS).is_some());
        assert!(ring.verifier(&old, 2_000 + MAX_TTL_MS + super::super::SKEW_MS + 1).is_none());
        // Reopened: the new key signs, the old one still verifies.
        let ring = store.keyring(3_000).unwrap();
        assert_eq!(key_id(&ring.signer().verifying_key()), new);
        assert!(ring.verifier(&old, 3_000).is_some());
        // Long after: the old key's file is gone.
        let ring = store.keyring(10 * MAX_TTL_MS).unwrap();
        assert!(ring.verifier(&old, 10 * MAX_TTL_MS).is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("keys")).unwrap().count(), 1);
    }
}
