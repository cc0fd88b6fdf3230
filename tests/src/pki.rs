//! A test PKI standing in for the public one: a root that the daemon trusts through
//! `tls.upstream_extra_roots`, and server certificates for the fake APIs (valid, wrong
//! name, expired, self-signed).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use time::{Duration, OffsetDateTime};

/// The test root.
pub struct TestRoot {
    issuer: Issuer<'static, KeyPair>,
    /// The root certificate (PEM file).
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A server certificate and key on disk.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// Certificate chain PEM file.
    pub cert: PathBuf,
    /// Key PEM file.
    pub key: PathBuf,
}

impl TestRoot {
    /// A new root in `dir`.
    pub fn new(dir: &Path) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "wl e2e public root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join("test-root.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        Self { issuer: Issuer::new(params, key), cert: path, dir: dir.to_owned() }
    }

    /// A certificate for `names`, valid now unless `expired`.
    pub fn server_cert(&self, tag: &str, names: &[&str], expired: bool) -> ServerCert {
        let key = KeyPair::generate().unwrap();
        let params = server_params(names, expired);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        write(&self.dir, tag, &cert.pem(), &key.serialize_pem())
    }
}

/// A self-signed certificate for `names`.
pub fn self_signed(dir: &Path, tag: &str, names: &[&str]) -> ServerCert {
    let key = KeyPair::generate().unwrap();
    let cert = server_params(names, false).self_signed(&key).unwrap();
    write(dir, tag, &cert.pem(), &key.serialize_pem())
}

fn server_params(names: &[&str], expired: bool) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*n).to_owned().try_into().unwrap()),
        })
        .collect();
    let now = OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - Duration::days(10);
        params.not_after = now - Duration::days(1);
    } else {
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(2);
    }
    params
}

fn write(dir: &Path, tag: &str, cert: &str, key: &str) -> ServerCert {
    let (c, k) = (dir.join(format!("{tag}.crt")), dir.join(format!("{tag}.key")));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    ServerCert { cert: c, key: k }
}
