//! TLS: the beacon CA ([`ca`]), leaf certificates per server name ([`leaf`]), the
//! ClientHello peek that decides between terminating and splicing ([`hello`]), and the
//! configurations of both sides: the server side agents see, and the upstream side that
//! verifies the real server against public roots (never the beacon CA).

pub mod ca;
pub mod hello;
pub mod leaf;

use std::{path::Path, sync::Arc};

use rustls::{pki_types::CertificateDer, ClientConfig, RootCertStore, ServerConfig};

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// An extra root file could not be used.
    #[error("tls.upstream_extra_roots: `{}`: {reason}", path.display())]
    ExtraRoot {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent-facing provider: ring's, with TLS 1.3's AES-128-GCM-SHA256 preferred.
///
/// Clients list AES-256-GCM-SHA384 first, and its SHA-384 key schedule (HKDF and HMAC on
/// every handshake) was 6% of the proxy's CPU per new connection: SHA-256 runs on the
/// CPU's SHA extensions, SHA-384 does not. AES-128-GCM is TLS 1.3's mandatory suite and
/// its records are cheaper too. The upstream side keeps rustls' defaults (the server picks).
fn agent_facing_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    provider.cipher_suites.sort_by_key(|s| s.suite() != preferred);
    Arc::new(provider)
}

/// The server side: certificates from the leaf cache, ALPN h2 and http/1.1, the server's
/// cipher-suite preference.
pub fn server_config(leaves: Arc<leaf::LeafCache>) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(agent_facing_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(leaf::CacheResolver(leaves)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// The upstream side: public roots (Mozilla's, compiled in) plus configured extra roots.
/// The system trust store is deliberately not used: it may contain the beacon CA.
pub fn upstream_config(
    extra_roots: &[impl AsRef<Path>],
    beacon: &CertificateDer<'_>,
) -> Result<ClientConfig, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra_roots {
        let path = path.as_ref();
        let err = |reason: String| TlsConfigError::ExtraRoot { path: path.to_owned(), reason };
        let certs: Vec<CertificateDer<'static>> = rustls::pki_types::pem::PemObject::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificates in the file".into()));
        }
        for cert in certs {
            // INVARIANT: the beacon CA never vouches for an upstream.
            if cert.as_ref() == beacon.as_ref() {
                return Err(err("this is the beacon CA; it can never be an upstream root".into()));
            }
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that lists AES-256-GCM-SHA384 first (as rustls, OpenSSL and most clients
    /// do) gets AES-128-GCM-SHA256 from wl's server side; one that offers only AES-256
    /// still gets it.
    #[tokio::test]
    async fn agents_get_the_servers_cipher_suite_preference() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca::BeaconCa::load_or_create(dir.path(), &[]).unwrap();
        let beacon = ca.cert_der().clone();
        let leaves = Arc::new(leaf::LeafCache::new(ca, std::time::Duration::from_secs(3600), 4));
        leaves.get("api.openai.com").await.unwrap();
        let server = server_config(leaves).unwrap();

        let negotiate = |suites: Vec<rustls::SupportedCipherSuite>| {
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = suites;
            let mut roots = RootCertStore::empty();
            roots.add(beacon.clone()).unwrap();
            let client = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let mut c = rustls::ClientConnection::new(Arc::new(client), "api.openai.com".try_into().unwrap())
                .unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            // In memory: pass the flights back and forth until both sides are done.
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
                if !c.is_handshaking() && !s.is_handshaking() {
                    break;
                }
            }
            assert!(!s.is_handshaking(), "the handshake did not finish");
            s.negotiated_cipher_suite().unwrap().suite()
        };
        use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
        assert_eq!(
            negotiate(vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256]),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(negotiate(vec![TLS13_AES_256_GCM_SHA384]), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    }
}
