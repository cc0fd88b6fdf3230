//! The beacon CA: the certificate authority agents trust so that wl can terminate their TLS.
//!
//! In: `state_dir` (and optionally the governed host names, for name constraints). Out: a
//! [`BeaconCa`] that signs short-lived leaf certificates. The key is ECDSA P-256, written
//! once with mode 0600 (write, fsync, rename) and never printed or logged; the certificate
//! is public and exported by `wlctl ca export`.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::{pki_types::CertificateDer, sign::CertifiedKey};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Errors creating, loading or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("beacon CA file `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The stored certificate or key does not parse (never includes key material).
    #[error("beacon CA in `{}` is unreadable ({reason}): move the ca directory away and run `wlctl ca init` to make a new CA", dir.display())]
    Corrupt {
        /// The CA directory.
        dir: PathBuf,
        /// What failed to parse.
        reason: String,
    },
    /// The key file is readable by others.
    #[error("beacon CA key `{}` has mode {mode:o}; it must be 0600: chmod 600 it", path.display())]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// rcgen refused to build a certificate.
    #[error("cannot issue a certificate for `{name}`: {reason}")]
    Issue {
        /// The requested name.
        name: String,
        /// rcgen's message.
        reason: String,
    },
}

/// Where the CA lives under `state_dir`.
pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

/// The CA certificate's path (PEM).
pub fn cert_path(state_dir: &Path) -> PathBuf {
    ca_dir(state_dir).join("beacon-ca.pem")
}

fn key_path(state_dir: &Path) -> PathBuf {
    ca_dir(state_dir).join("beacon-ca.key")
}

/// The loaded CA.
pub struct BeaconCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// One key for all leaves of this process, generated at start and never stored: leaf
    /// minting then costs one signature, not a key generation.
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
}

impl std::fmt::Debug for BeaconCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("BeaconCa").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

impl BeaconCa {
    /// Loads the CA from `state_dir`, creating it first if there is none.
    pub fn load_or_create(state_dir: &Path, constraints: &[String]) -> Result<Self, CaError> {
        if !cert_path(state_dir).exists() {
            Self::create(state_dir, constraints)?;
        }
        Self::load(state_dir)
    }

    /// Loads an existing CA.
    pub fn load(state_dir: &Path) -> Result<Self, CaError> {
        let dir = ca_dir(state_dir);
        let (cert_p, key_p) = (cert_path(state_dir), key_path(state_dir));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let mode = std::fs::metadata(&key_p).map_err(io(&key_p))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode { path: key_p, mode });
        }
        let cert_pem = std::fs::read_to_string(&cert_p).map_err(io(&cert_p))?;
        let key_pem = zeroize::Zeroizing::new(std::fs::read_to_string(&key_p).map_err(io(&key_p))?);
        let corrupt = |reason: &str| CaError::Corrupt { dir: dir.clone(), reason: reason.to_owned() };
        let key = KeyPair::from_pem(&key_pem).map_err(|_| corrupt("key does not parse"))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|_| corrupt("certificate does not parse"))?;
        let cert_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| corrupt("certificate is not PEM"))?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Issue { name: "leaf key".into(), reason: e.to_string() })?;
        let leaf_der = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let leaf_signer = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)
            .map_err(|e| CaError::Issue { name: "leaf key".into(), reason: e.to_string() })?;
        Ok(Self { issuer, cert_der, cert_pem, leaf_key, leaf_signer })
    }

    /// Creates a new CA in `state_dir`, replacing nothing: fails if one exists.
    pub fn create(state_dir: &Path, constraints: &[String]) -> Result<(), CaError> {
        let dir = ca_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(|source| CaError::Io { path: dir.clone(), source })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Issue { name: "CA".into(), reason: e.to_string() })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
        dn.push(DnType::CommonName, format!("wl beacon CA {host}").trim().to_owned());
        dn.push(DnType::OrganizationName, "wl");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(5 * 365);
        params.serial_number = Some(random_serial());
        if !constraints.is_empty() {
            params.name_constraints = Some(NameConstraints {
                permitted_subtrees: constraints
                    .iter()
                    .map(|h| GeneralSubtree::DnsName(h.trim_start_matches("*.").to_owned()))
                    .collect(),
                excluded_subtrees: Vec::new(),
            });
        }
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Issue { name: "CA".into(), reason: e.to_string() })?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        write_atomic(&key_path(state_dir), key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path(state_dir), cert.pem().as_bytes(), 0o644)?;
        Ok(())
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the certificate, colon-separated hex (what `wlctl ca show` prints).
    pub fn fingerprint(&self) -> String {
        Sha256::digest(self.cert_der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// A leaf certificate for `name` valid for `validity`, ready for rustls.
    pub fn mint(&self, name: &str, validity: Duration) -> Result<CertifiedKey, CaError> {
        let err = |reason: String| CaError::Issue { name: name.to_owned(), reason };
        let mut params = CertificateParams::default();
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(name.to_owned().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?)
            }
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        // A little backdating absorbs clients whose clocks run behind.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::try_from(validity).map_err(|e| err(e.to_string()))?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&self.leaf_key, &self.issuer).map_err(|e| err(e.to_string()))?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], self.leaf_signer.clone()))
    }
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).expect("the system RNG works");
    bytes[0] &= 0x7f; // positive
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Writes `data` to `path` so that a crash leaves either the old file or the new one.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    #[test]
    fn creates_once_with_a_private_key_and_mints_verifiable_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let ca = BeaconCa::load_or_create(dir.path(), &[]).unwrap();
        let mode = std::fs::metadata(key_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Loading again gives the same CA.
        let again = BeaconCa::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        // A leaf verifies against the CA for its name, and only for its name.
        let leaf = ca.mint("api.openai.com", Duration::from_secs(3600)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let name = rustls::pki_types::ServerName::try_from("api.openai.com").unwrap();
        verifier.verify_server_cert(&leaf.cert[0], &[], &name, &[], now).expect("leaf verifies");
        let other = rustls::pki_types::ServerName::try_from("api.anthropic.com").unwrap();
        assert!(verifier.verify_server_cert(&leaf.cert[0], &[], &other, &[], now).is_err());
    }

    #[test]
    fn name_constraints_limit_the_ca_to_governed_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            BeaconCa::load_or_create(dir.path(), &["api.openai.com".into(), "*.openai.azure.com".into()])
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let check = |name: &str| {
            let leaf = ca.mint(name, Duration::from_secs(3600)).unwrap();
            let sn = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(&leaf.cert[0], &[], &sn, &[], now).is_ok()
        };
        assert!(check("api.openai.com"));
        assert!(check("x.openai.azure.com"));
        assert!(!check("www.example.com"), "a constrained CA must not vouch for other names");
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        BeaconCa::create(dir.path(), &[]).unwrap();
        std::fs::set_permissions(key_path(dir.path()), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = BeaconCa::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("must be 0600"), "{err}");
    }
}
