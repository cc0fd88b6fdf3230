//! Secret Capability Tokens: what they claim, how they are signed, and every check a
//! redemption makes. Pure: keys, bytes and the clock in, a verdict out; the ledger of used
//! tokens lives in `ledger.rs`. The wire format is specified in `docs/sct.md`; the layout
//! below is that document in code.
//!
//! ```text
//! token  = "wlsct1." base64url(claims || signature)        (no padding)
//! claims = version:u8 (1) | kid:[8] | jti:[16] | agent:[32] | request:[32]
//!        | issued_ms:i64be | expires_ms:i64be | host_len:u8 | host | secret_len:u8 | secret
//! signature = Ed25519(key[kid], "wl-sct-v1\0" || claims)   (verified with verify_strict)
//! ```

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::intercept::identity::AgentIdentity;

/// Prefix of every token; the digit is the format version.
pub const PREFIX: &str = "wlsct1.";
/// Signed together with the claims so a signature can never be mistaken for another use of
/// the same key.
const DOMAIN: &[u8] = b"wl-sct-v1\0";
/// Format version in the claims.
const VERSION: u8 = 1;
/// Fixed-size part of the claims (up to and including `expires_ms`).
const FIXED: usize = 1 + 8 + 16 + 32 + 32 + 8 + 8;
/// The longest lifetime a token may have.
pub const MAX_TTL_MS: i64 = 60_000;

/// Why a token was refused. Each has a stable code (the `code` of the broker's error reply
/// and of the audit record), documented in `docs/sct.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Not a token: wrong prefix, bad base64, truncated, unknown version.
    Malformed,
    /// Signed by a key id the broker does not know (or no longer keeps).
    UnknownKey,
    /// The signature does not verify: the token was altered or forged.
    BadSignature,
    /// Past its expiry (beyond the allowed clock skew).
    Expired,
    /// Issued in the future (beyond the allowed clock skew), or living longer than allowed.
    NotYetValid,
    /// Already redeemed once.
    Replayed,
    /// Issued before the broker started on a host that has rebooted since: whether it was
    /// used cannot be known, so it is not accepted.
    Unverifiable,
    /// Issued for another agent.
    WrongAgent,
    /// Issued for another host.
    WrongHost,
    /// Issued for another secret.
    WrongSecret,
    /// Issued for another request (method and path).
    WrongRequest,
}

impl Refusal {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Malformed => "sct_malformed",
            Refusal::UnknownKey => "sct_unknown_key",
            Refusal::BadSignature => "sct_bad_signature",
            Refusal::Expired => "sct_expired",
            Refusal::NotYetValid => "sct_not_yet_valid",
            Refusal::Replayed => "sct_replayed",
            Refusal::Unverifiable => "sct_unverifiable",
            Refusal::WrongAgent => "sct_wrong_agent",
            Refusal::WrongHost => "sct_wrong_host",
            Refusal::WrongSecret => "sct_wrong_secret",
            Refusal::WrongRequest => "sct_wrong_request",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What a token grants: one use of `secret` for one request of one agent to `host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The signing key's id.
    pub kid: [u8; 8],
    /// Unique token id (128 random bits); the ledger's key.
    pub jti: [u8; 16],
    /// [`agent_digest`] of the agent the request is made for.
    pub agent: [u8; 32],
    /// [`request_digest`] of the request's method and path.
    pub request: [u8; 32],
    /// Unix time in milliseconds.
    pub issued_ms: i64,
    /// Unix time in milliseconds.
    pub expires_ms: i64,
    /// The API host the secret may be sent to.
    pub host: String,
    /// The secret's name.
    pub secret: String,
}

/// What the redeemer says the token is for; all of it must match the claims.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    /// The agent's digest.
    pub agent: &'a [u8; 32],
    /// The request's digest.
    pub request: &'a [u8; 32],
    /// The host.
    pub host: &'a str,
    /// The secret's name.
    pub secret: &'a str,
}

impl Claims {
    /// The claims' bytes, as signed.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + 2 + self.host.len() + self.secret.len());
        out.push(VERSION);
        out.extend_from_slice(&self.kid);
        out.extend_from_slice(&self.jti);
        out.extend_from_slice(&self.agent);
        out.extend_from_slice(&self.request);
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        for s in [&self.host, &self.secret] {
            // INVARIANT: host names and secret names are checked to be at most 255 bytes
            // before a token is issued (see `issue`).
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < FIXED + 2 || bytes[0] != VERSION {
            return None;
        }
        let take = |at: usize, n: usize| &bytes[at..at + n];
        let i64_at = |at: usize| i64::from_be_bytes(take(at, 8).try_into().expect("8 bytes"));
        let mut at = FIXED;
        let mut strings = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = *bytes.get(at)? as usize;
            let s = bytes.get(at + 1..at + 1 + len)?;
            strings.push(String::from_utf8(s.to_vec()).ok()?);
            at += 1 + len;
        }
        if at != bytes.len() {
            return None;
        }
        let secret = strings.pop()?;
        let host = strings.pop()?;
        Some(Claims {
            kid: take(1, 8).try_into().ok()?,
            jti: take(9, 16).try_into().ok()?,
            agent: take(25, 32).try_into().ok()?,
            request: take(57, 32).try_into().ok()?,
            issued_ms: i64_at(89),
            expires_ms: i64_at(97),
            host,
            secret,
        })
    }

    /// The jti as lower-case hex (how logs and the audit trail name a token).
    pub fn jti_hex(&self) -> String {
        hex::encode(self.jti)
    }
}

/// The key id of a public key: the first 8 bytes of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> [u8; 8] {
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].try_into().expect("8 bytes")
}

/// Signs `claims` (whose `kid` must be `key`'s id) into a token string.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    debug_assert_eq!(claims.kid, key_id(&key.verifying_key()));
    let mut body = claims.encode();
    let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(&body);
    let signature = key.sign(&msg);
    body.extend_from_slice(&signature.to_bytes());
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
}

/// Reads a token's claims without verifying anything (for logs and audit on the proxy
/// side, which never decides on them).
pub fn peek(token: &str) -> Option<Claims> {
    let raw = URL_SAFE_NO_PAD.decode(token.strip_prefix(PREFIX)?).ok()?;
    Claims::decode(raw.get(..raw.len().checked_sub(64)?)?)
}

/// Every check but single use: format, key, signature, validity window, binding. Returns
/// the claims; the caller then records the jti in the ledger (which refuses a replay).
pub fn verify(
    token: &str,
    key_for: impl Fn(&[u8; 8]) -> Option<VerifyingKey>,
    now_ms: i64,
    skew_ms: i64,
    binding: &Binding<'_>,
) -> Result<Claims, Refusal> {
    verify_inner(token, key_for, now_ms, skew_ms, binding, None)
}

/// [`verify`], except that a token `recent` holds byte for byte (one this process signed
/// and has not seen presented yet) needs no signature check: this process made that exact
/// signature, so checking it again can only succeed. Every other check is made all the
/// same, and any other token, including one with a remembered jti but other bytes, has its
/// signature verified.
pub fn verify_recent(
    token: &str,
    key_for: impl Fn(&[u8; 8]) -> Option<VerifyingKey>,
    now_ms: i64,
    skew_ms: i64,
    binding: &Binding<'_>,
    recent: &mut RecentlySigned,
) -> Result<Claims, Refusal> {
    verify_inner(token, key_for, now_ms, skew_ms, binding, Some(recent))
}

fn verify_inner(
    token: &str,
    key_for: impl Fn(&[u8; 8]) -> Option<VerifyingKey>,
    now_ms: i64,
    skew_ms: i64,
    binding: &Binding<'_>,
    recent: Option<&mut RecentlySigned>,
) -> Result<Claims, Refusal> {
    let encoded = token.strip_prefix(PREFIX).ok_or(Refusal::Malformed)?;
    let raw = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| Refusal::Malformed)?;
    let split = raw.len().checked_sub(64).ok_or(Refusal::Malformed)?;
    let (body, signature) = raw.split_at(split);
    let claims = Claims::decode(body).ok_or(Refusal::Malformed)?;
    // A retired key refuses its tokens, remembered or not.
    let key = key_for(&claims.kid).ok_or(Refusal::UnknownKey)?;
    let signed_here = recent.is_some_and(|r| r.take(&claims.jti, token));
    if !signed_here {
        let signature = Signature::from_slice(signature).map_err(|_| Refusal::Malformed)?;
        let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(body);
        key.verify_strict(&msg, &signature).map_err(|_| Refusal::BadSignature)?;
    }
    // Only now, with the claims authentic, do their values mean anything.
    if claims.issued_ms > now_ms + skew_ms || claims.expires_ms - claims.issued_ms > MAX_TTL_MS {
        return Err(Refusal::NotYetValid);
    }
    if now_ms > claims.expires_ms + skew_ms {
        return Err(Refusal::Expired);
    }
    if claims.agent != *binding.agent {
        return Err(Refusal::WrongAgent);
    }
    if claims.host != binding.host {
        return Err(Refusal::WrongHost);
    }
    if claims.secret != binding.secret {
        return Err(Refusal::WrongSecret);
    }
    if claims.request != *binding.request {
        return Err(Refusal::WrongRequest);
    }
    Ok(claims)
}

/// Tokens this process signed and has not yet seen presented, by jti: the SHA-256 of the
/// whole token and its expiry.
///
/// The proxy redeems a token within microseconds of its issue, at the same broker, so
/// the broker would otherwise verify, at twice the cost of signing (about 40 µs), the
/// signature it has just made. The signature still matters for every token this table
/// does not hold: after a restart, from another broker sharing the ledger, or altered.
/// Bounded: expired entries are dropped when it is full, and when it is still full a new
/// token is simply not remembered (its redemption verifies the signature).
#[derive(Debug)]
pub struct RecentlySigned {
    tokens: std::collections::HashMap<[u8; 16], ([u8; 32], i64)>,
    capacity: usize,
}

impl RecentlySigned {
    /// Holds at most `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        Self { tokens: std::collections::HashMap::new(), capacity }
    }

    /// Remembers `token`, just signed with `claims`.
    pub fn remember(&mut self, token: &str, claims: &Claims, now_ms: i64) {
        if self.tokens.len() >= self.capacity {
            // Past its expiry and the skew no token is accepted, remembered or not.
            self.tokens.retain(|_, (_, expires_ms)| *expires_ms + super::SKEW_MS >= now_ms);
            if self.tokens.len() >= self.capacity {
                return;
            }
        }
        self.tokens.insert(claims.jti, (token_digest(token), claims.expires_ms));
    }

    /// Whether `token` is, byte for byte, the one remembered under `jti`. The entry is
    /// forgotten either way: a token is presented once, and a forgotten one still verifies
    /// by its signature.
    fn take(&mut self, jti: &[u8; 16], token: &str) -> bool {
        match self.tokens.remove(jti) {
            Some((digest, _)) => {
                let presented = token_digest(token);
                // Constant time, out of habit: neither digest is secret.
                digest.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
            None => false,
        }
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wl-sct-recent-v1\0");
    h.update(token.as_bytes());
    h.finalize().into()
}

/// The digest that binds a token to one agent process: what does not change while the
/// process lives (pid, uid, gid, cgroup, executable, unit), each length-prefixed. The
/// thread id and the task name are left out: they differ between a process's connections.
pub fn agent_digest(agent: Option<&AgentIdentity>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wl-agent-v1\0");
    match agent {
        None => h.update(b"unknown"),
        Some(a) => {
            h.update(a.pid.to_be_bytes());
            h.update(a.uid.to_be_bytes());
            h.update(a.gid.to_be_bytes());
            h.update(a.cgroup_id.to_be_bytes());
            for s in [&a.cgroup, &a.exe, &a.unit] {
                let s = s.as_deref().unwrap_or("");
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
        }
    }
    h.finalize().into()
}

/// The digest that binds a token to one request: its method and path (no query).
pub fn request_digest(method: &str, path: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wl-request-v1\0");
    h.update((method.len() as u64).to_be_bytes());
    h.update(method.as_bytes());
    h.update(path.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(key: &SigningKey, now: i64) -> Claims {
        Claims {
            kid: key_id(&key.verifying_key()),
            jti: [7; 16],
            agent: [1; 32],
            request: request_digest("POST", "/v1/chat/completions"),
            issued_ms: now,
            expires_ms: now + 30_000,
            host: "api.openai.com".into(),
            secret: "openai".into(),
        }
    }

    fn check(token: &str, key: &SigningKey, now: i64, binding: &Binding<'_>) -> Result<Claims, Refusal> {
        let kid = key_id(&key.verifying_key());
        let public = key.verifying_key();
        verify(token, |k| (*k == kid).then_some(public), now, 5_000, binding)
    }

    const NOW: i64 = 1_800_000_000_000;

    fn binding(request: &[u8; 32]) -> Binding<'_> {
        Binding { agent: &[1; 32], request, host: "api.openai.com", secret: "openai" }
    }

    #[test]
    fn a_signed_token_verifies_and_peeks() {
        let k = key(1);
        let c = claims(&k, NOW);
        let token = sign(&k, &c);
        let req = request_digest("POST", "/v1/chat/completions");
        assert_eq!(check(&token, &k, NOW + 1_000, &binding(&req)).unwrap(), c);
        assert_eq!(peek(&token).unwrap(), c);
        assert_eq!(c.jti_hex(), "07".repeat(16));
    }

    #[test]
    fn every_refusal_has_its_code() {
        let k = key(1);
        let c = claims(&k, NOW);
        let token = sign(&k, &c);
        let req = request_digest("POST", "/v1/chat/completions");
        let b = binding(&req);

        // Tampering: any byte of claims or signature.
        let raw = URL_SAFE_NO_PAD.decode(token.strip_prefix(PREFIX).unwrap()).unwrap();
        for i in [0usize, 5, 20, 60, 90, 100, 106, raw.len() - 1] {
            let mut t = raw.clone();
            t[i] ^= 0x01;
            let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&t));
            let got = check(&forged, &k, NOW, &b).unwrap_err();
            assert!(
                matches!(got, Refusal::BadSignature | Refusal::Malformed | Refusal::UnknownKey),
                "byte {i}: {got:?}"
            );
        }
        // A changed host with a valid-looking layout: signature fails.
        let mut other = c.clone();
        other.host = "evil.example".into();
        let mut forged = other.encode();
        forged.extend_from_slice(&raw[raw.len() - 64..]);
        let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&forged));
        assert_eq!(check(&forged, &k, NOW, &b), Err(Refusal::BadSignature));

        assert_eq!(check("garbage", &k, NOW, &b), Err(Refusal::Malformed));
        assert_eq!(check(&format!("{PREFIX}!!"), &k, NOW, &b), Err(Refusal::Malformed));
        assert_eq!(check(&token[..token.len() - 10], &k, NOW, &b).unwrap_err(), Refusal::Malformed);
        assert_eq!(check(&sign(&key(2), &claims(&key(2), NOW)), &k, NOW, &b), Err(Refusal::UnknownKey));
        assert_eq!(check(&token, &k, NOW + 36_000, &b), Err(Refusal::Expired));
        assert!(check(&token, &k, NOW + 34_000, &b).is_ok(), "within the skew");
        assert_eq!(check(&token, &k, NOW - 6_000, &b), Err(Refusal::NotYetValid));
        let mut long = claims(&k, NOW);
        long.expires_ms = NOW + MAX_TTL_MS + 1;
        assert_eq!(check(&sign(&k, &long), &k, NOW, &b), Err(Refusal::NotYetValid));

        let other_agent = [2; 32];
        assert_eq!(check(&token, &k, NOW, &Binding { agent: &other_agent, ..b }), Err(Refusal::WrongAgent));
        assert_eq!(
            check(&token, &k, NOW, &Binding { host: "api.anthropic.com", ..b }),
            Err(Refusal::WrongHost)
        );
        assert_eq!(check(&token, &k, NOW, &Binding { secret: "anthropic", ..b }), Err(Refusal::WrongSecret));
        let get = request_digest("GET", "/v1/models");
        assert_eq!(check(&token, &k, NOW, &Binding { request: &get, ..b }), Err(Refusal::WrongRequest));
    }

    #[test]
    fn recently_signed_tokens_skip_only_the_signature_check() {
        let k = key(1);
        let c = claims(&k, NOW);
        let token = sign(&k, &c);
        let req = request_digest("POST", "/v1/chat/completions");
        let b = binding(&req);
        let kid = key_id(&k.verifying_key());
        let public = k.verifying_key();
        let keys = |k: &[u8; 8]| (*k == kid).then_some(public);

        let mut recent = RecentlySigned::new(8);
        recent.remember(&token, &c, NOW);
        assert_eq!(recent.len(), 1);
        // Every other check still holds for a remembered token, and presenting it forgets it.
        assert_eq!(
            verify_recent(&token, keys, NOW, 5_000, &Binding { host: "api.anthropic.com", ..b }, &mut recent),
            Err(Refusal::WrongHost)
        );
        assert!(recent.is_empty());
        recent.remember(&token, &c, NOW);
        assert_eq!(verify_recent(&token, keys, NOW + 36_000, 5_000, &b, &mut recent), Err(Refusal::Expired));
        recent.remember(&token, &c, NOW);
        assert_eq!(verify_recent(&token, |_| None, NOW, 5_000, &b, &mut recent), Err(Refusal::UnknownKey));
        recent.remember(&token, &c, NOW);
        assert_eq!(verify_recent(&token, keys, NOW, 5_000, &b, &mut recent).unwrap(), c);
        assert!(recent.is_empty());

        // Same jti, other bytes (a forged signature): the signature is checked and fails.
        recent.remember(&token, &c, NOW);
        let mut raw = URL_SAFE_NO_PAD.decode(token.strip_prefix(PREFIX).unwrap()).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x01;
        let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(verify_recent(&forged, keys, NOW, 5_000, &b, &mut recent), Err(Refusal::BadSignature));
        // The genuine token, no longer remembered, still verifies by its signature.
        assert_eq!(verify_recent(&token, keys, NOW, 5_000, &b, &mut recent).unwrap(), c);

        // Bounded: when full, expired entries go; when still full, new ones are not kept.
        let mut small = RecentlySigned::new(2);
        let with_jti = |jti: u8, now: i64| Claims { jti: [jti; 16], ..claims(&k, now) };
        small.remember("a", &with_jti(1, NOW), NOW);
        small.remember("b", &with_jti(2, NOW), NOW);
        small.remember("c", &with_jti(3, NOW), NOW + 1);
        assert_eq!(small.len(), 2);
        assert!(!small.take(&[3; 16], "c"), "not kept while the others are live");
        let later = NOW + 30_000 + 5_001;
        small.remember("d", &with_jti(4, later), later);
        assert_eq!(small.len(), 1, "the expired ones were dropped");
        assert!(small.take(&[4; 16], "d"));
    }

    #[test]
    fn digests_separate_what_they_bind() {
        assert_ne!(request_digest("GET", "/a"), request_digest("GE", "T/a"));
        let a = AgentIdentity {
            pid: 10,
            tid: 11,
            uid: 1000,
            gid: 1000,
            user: None,
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cgroup: Some("/agents.slice".into()),
            cgroup_id: 5,
            unit: None,
        };
        let same_process_other_thread = AgentIdentity { tid: 12, comm: "worker".into(), ..a.clone() };
        assert_eq!(agent_digest(Some(&a)), agent_digest(Some(&same_process_other_thread)));
        assert_ne!(agent_digest(Some(&a)), agent_digest(Some(&AgentIdentity { pid: 99, ..a.clone() })));
        assert_ne!(agent_digest(Some(&a)), agent_digest(None));
    }
}
