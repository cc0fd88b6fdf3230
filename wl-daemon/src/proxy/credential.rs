//! Credential injection: after policy allows a request to a host with a `[[credential]]`,
//! obtain the secret from the broker (an SCT issued and redeemed for this agent, host and
//! request), replace whatever the agent sent in that header (and the `strip` headers) with
//! the real value, and keep nothing of it once the request head is written.
//!
//! The header value's bytes are owned by a buffer that zeroes itself when hyper drops the
//! request head. To redact echoes of the secret in responses without keeping it, the proxy
//! keeps only fingerprints of its raw, base64 and URL-encoded forms ([`Redactor`]): length,
//! a Rabin-Karp hash under a per-process random base, and a lossy 20-bit keyed tag of the
//! first eight bytes that makes the scan one cheap pass.

use std::{collections::HashMap, sync::Arc};

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    broker::{
        client::{BrokerClient, CredentialError},
        protocol::Use,
        store::SecretValue,
    },
    config::CredentialConfig,
    intercept::identity::AgentIdentity,
};

/// What replaces a redacted header value or body span.
pub const REDACTED: &[u8] = b"[redacted by wl]";

/// The credential bindings and the broker they come from.
#[derive(Debug)]
pub struct Credentials {
    by_host: HashMap<String, CredentialConfig>,
    broker: BrokerClient,
}

/// A credential placed in a request.
#[derive(Debug)]
pub struct Injected {
    /// The secret's name.
    pub secret: String,
    /// The token it was obtained with.
    pub jti: String,
    /// Fingerprints for redacting it from the response.
    pub redactor: Redactor,
}

impl Credentials {
    /// Bindings from `[[credential]]`, obtained through `broker`.
    pub fn new(bindings: &[CredentialConfig], broker: BrokerClient) -> Self {
        Self { by_host: bindings.iter().map(|c| (c.host.clone(), c.clone())).collect(), broker }
    }

    /// The binding for `host`, if any.
    pub fn binding(&self, host: &str) -> Option<&CredentialConfig> {
        self.by_host.get(host)
    }

    /// Obtains the secret for this request and puts it in `headers`, removing the agent's
    /// own copies first. On error, `headers` is untouched.
    pub async fn inject(
        &self,
        binding: &CredentialConfig,
        headers: &mut HeaderMap,
        agent: Option<&Arc<AgentIdentity>>,
        method: &str,
        path: &str,
    ) -> Result<Injected, CredentialError> {
        let use_ = Use {
            agent: agent.cloned(),
            host: binding.host.clone(),
            secret: binding.secret.clone(),
            method: method.to_owned(),
            path: path.to_owned(),
        };
        let (value, jti) = self.broker.obtain(use_).await?;
        let redactor = Redactor::new(&value);
        let header_value = header_value(&binding.format, &value).ok_or_else(|| CredentialError::Refused {
            code: "unusable_secret".into(),
            message: format!(
                "secret `{}` cannot be sent in a header (it has control characters or non-ASCII bytes)",
                binding.secret
            ),
        })?;
        drop(value);
        for name in std::iter::once(&binding.header).chain(&binding.strip) {
            // INVARIANT: header names are validated with the configuration.
            headers.remove(HeaderName::from_bytes(name.as_bytes()).expect("validated header name"));
        }
        let name = HeaderName::from_bytes(binding.header.as_bytes()).expect("validated header name");
        headers.insert(name, header_value);
        Ok(Injected { secret: binding.secret.clone(), jti, redactor })
    }
}

/// Bytes that are zeroed when the last reference goes (the header value's storage).
struct ZeroOnDrop(Vec<u8>);

impl AsRef<[u8]> for ZeroOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ZeroOnDrop {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// `format` with `{secret}` replaced, as a sensitive header value (never indexed by HPACK,
/// shown as `Sensitive` by `Debug`), or `None` when the secret is not a valid header value.
fn header_value(format: &str, value: &SecretValue) -> Option<HeaderValue> {
    let (before, after) = format.split_once("{secret}")?;
    let mut bytes = Vec::with_capacity(before.len() + value.expose().len() + after.len());
    bytes.extend_from_slice(before.as_bytes());
    bytes.extend_from_slice(value.expose());
    bytes.extend_from_slice(after.as_bytes());
    let valid = bytes.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    let owned = ZeroOnDrop(bytes);
    if !valid {
        return None;
    }
    let mut header = HeaderValue::from_maybe_shared(Bytes::from_owner(owned)).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// Mersenne prime 2^61 - 1: the Rabin-Karp modulus. Reducing modulo it takes a shift and
/// an add rather than a division (a 128-bit `%` cost 60 µs per kilobyte scanned).
const MODULUS: u64 = (1 << 61) - 1;

/// `x mod 2^61 - 1` for any `x < 2^122` (the product of two reduced values), reduced.
#[inline]
fn reduce(x: u128) -> u64 {
    // 2^61 ≡ 1: fold the high bits onto the low ones (twice brings any such x under 2^61 + 1).
    let x = (x as u64 & MODULUS) + (x >> 61) as u64;
    let x = (x & MODULUS) + (x >> 61);
    if x >= MODULUS {
        x - MODULUS
    } else {
        x
    }
}

#[inline]
fn mul_mod(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

/// `(a + b) mod 2^61 - 1` for reduced `a` and `b`.
#[inline]
fn add_mod(a: u64, b: u64) -> u64 {
    let x = a + b;
    if x >= MODULUS {
        x - MODULUS
    } else {
        x
    }
}

/// Per-process random keys: fingerprints mean nothing outside this process.
struct Keys {
    /// The Rabin-Karp base, in `[256, MODULUS - 256)`.
    base: u64,
    /// The odd multiplier of [`anchor_tag`].
    anchor: u64,
}

fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the kernel's randomness is available");
        let (base, anchor) = b.split_at(8);
        Keys {
            base: 256 + u64::from_le_bytes(base.try_into().expect("8 bytes")) % (MODULUS - 512),
            anchor: u64::from_le_bytes(anchor.try_into().expect("8 bytes")) | 1,
        }
    })
}

fn hash(bytes: &[u8]) -> u64 {
    let b = keys().base;
    bytes.iter().fold(0, |h, &x| add_mod(mul_mod(h, b), u64::from(x)))
}

/// Bits kept of a form's first eight bytes: enough that a position of ordinary text passes
/// the anchor check once in a million, few enough that the tag says little about the
/// secret.
const ANCHOR_BITS: u32 = 20;

/// A keyed, lossy tag of eight bytes (multiplicative hashing, top bits kept); `key` is
/// [`Keys::anchor`].
#[inline]
fn anchor_tag(eight: [u8; 8], key: u64) -> u32 {
    (u64::from_le_bytes(eight).wrapping_mul(key) >> (64 - ANCHOR_BITS)) as u32
}

/// One form of the secret, by fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Form {
    len: usize,
    /// [`anchor_tag`] of its first eight bytes: the cheap check at every position.
    anchor: u32,
    /// Rabin-Karp hash of the whole form: the check where the anchor matches.
    hash: u64,
}

/// Finds a secret's forms in response bytes from fingerprints alone.
#[derive(Clone)]
pub struct Redactor {
    forms: Vec<Form>,
    /// Bit `tag % 1024` set for each form's anchor: one test per position rules out
    /// almost every position before the forms are looked at.
    filter: [u64; 16],
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} forms)", self.forms.len())
    }
}

/// Forms shorter than this are not looked for (they would match by chance in real text).
/// It is also the anchor's width.
const MIN_FORM: usize = 8;

fn first_eight(bytes: &[u8]) -> [u8; 8] {
    bytes[..MIN_FORM].try_into().expect("at least eight bytes")
}

impl Redactor {
    /// Fingerprints of the raw, base64 (standard and URL-safe) and URL-encoded forms.
    pub fn new(value: &SecretValue) -> Self {
        let raw = value.expose();
        let forms: Vec<Zeroizing<Vec<u8>>> = vec![
            Zeroizing::new(raw.to_vec()),
            Zeroizing::new(STANDARD.encode(raw).into_bytes()),
            Zeroizing::new(URL_SAFE_NO_PAD.encode(raw).into_bytes()),
            Zeroizing::new(url_encode(raw)),
        ];
        let mut prints = Vec::new();
        for form in &forms {
            if form.len() < MIN_FORM {
                continue;
            }
            let mut eight = Zeroizing::new(first_eight(form));
            let print = Form { len: form.len(), anchor: anchor_tag(*eight, keys().anchor), hash: hash(form) };
            eight.zeroize();
            if !prints.contains(&print) {
                prints.push(print);
            }
        }
        let mut filter = [0u64; 16];
        for form in &prints {
            let bit = form.anchor as usize % 1024;
            filter[bit / 64] |= 1 << (bit % 64);
        }
        Self { forms: prints, filter }
    }

    /// Byte ranges of `data` holding a form of the secret (sorted, merged).
    ///
    /// One pass: at each position, the tag of the next eight bytes is compared with each
    /// form's anchor; only where one matches is the form's full hash computed there. (A
    /// rolling hash per form cost about 8 ns per byte and form, 40 µs per kilobyte.)
    pub fn find(&self, data: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut found: Vec<std::ops::Range<usize>> = Vec::new();
        if self.forms.is_empty() || data.len() < MIN_FORM {
            return found;
        }
        let key = keys().anchor;
        for (i, window) in data.windows(MIN_FORM).enumerate() {
            let tag = anchor_tag(first_eight(window), key);
            let bit = tag as usize % 1024;
            if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
                continue;
            }
            for form in &self.forms {
                if tag == form.anchor
                    && i + form.len <= data.len()
                    && hash(&data[i..i + form.len]) == form.hash
                {
                    found.push(i..i + form.len);
                }
            }
        }
        // Positions ascend already; merge overlaps.
        let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
        for r in found {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }

    /// `data` with every form replaced by [`REDACTED`], or `None` when there is none.
    pub fn redact(&self, data: &[u8]) -> Option<(Vec<u8>, usize)> {
        let ranges = self.find(data);
        if ranges.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(data.len());
        let mut at = 0;
        for r in &ranges {
            out.extend_from_slice(&data[at..r.start]);
            out.extend_from_slice(REDACTED);
            at = r.end;
        }
        out.extend_from_slice(&data[at..]);
        Some((out, ranges.len()))
    }

    /// Replaces every response header value that holds a form; returns how many.
    pub fn redact_headers(&self, headers: &mut HeaderMap) -> usize {
        let mut n = 0;
        for value in headers.values_mut() {
            if !self.find(value.as_bytes()).is_empty() {
                *value = HeaderValue::from_static("[redacted by wl]");
                n += 1;
            }
        }
        n
    }
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
fn url_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() * 3);
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_found_and_redacted_without_the_secret() {
        let secret = SecretValue::new(b"sk-live/0123456789+abc==".to_vec());
        let r = Redactor::new(&secret);
        assert!(!format!("{r:?}").contains("sk-live"));
        let b64 = STANDARD.encode(secret.expose());
        let url = String::from_utf8(url_encode(secret.expose())).unwrap();
        let text = format!("a sk-live/0123456789+abc== b {b64} c {url} d");
        let (out, n) = r.redact(text.as_bytes()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a [redacted by wl] b [redacted by wl] c [redacted by wl] d"
        );
        assert!(r.redact(b"nothing to see here, sk-live/0123456789+abd==").is_none());
        // At the very start and end.
        let (out, _) = r.redact(secret.expose()).unwrap();
        assert_eq!(out, REDACTED);

        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_str(&format!("key={b64}")).unwrap());
        headers.insert("x-other", HeaderValue::from_static("fine"));
        assert_eq!(r.redact_headers(&mut headers), 1);
        assert_eq!(headers["x-echo"], "[redacted by wl]");
        assert_eq!(headers["x-other"], "fine");
    }

    #[test]
    fn fast_reduction_agrees_with_division() {
        let m = u128::from(MODULUS);
        let edges = [0, 1, MODULUS - 1, MODULUS, MODULUS + 1, (1 << 61), u64::MAX >> 2];
        for &a in &edges {
            for &b in &edges {
                let (a, b) = (a % MODULUS, b % MODULUS);
                assert_eq!(u128::from(mul_mod(a, b)), u128::from(a) * u128::from(b) % m, "{a} * {b}");
                assert_eq!(u128::from(add_mod(a, b)), (u128::from(a) + u128::from(b)) % m, "{a} + {b}");
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..100_000 {
            // xorshift: enough spread to reach every bit pattern's carries.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (a, b) = (x % MODULUS, x.rotate_left(29) % MODULUS);
            assert_eq!(u128::from(mul_mod(a, b)), u128::from(a) * u128::from(b) % m);
        }
        assert_eq!(reduce(m * m - 1), ((m * m - 1) % m) as u64);
    }

    #[test]
    fn header_values_are_sensitive_and_refuse_control_bytes() {
        let v = header_value("Bearer {secret}", &SecretValue::new(b"sk-abc".to_vec())).unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v, "Bearer sk-abc");
        assert!(!format!("{v:?}").contains("sk-abc"));
        assert!(header_value("{secret}", &SecretValue::new(b"a\r\nb".to_vec())).is_none());
    }
}
