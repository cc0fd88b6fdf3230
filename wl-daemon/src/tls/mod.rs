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

/// The server side: certificates from the leaf cache, ALPN h2 and http/1.1.
pub fn server_config(leaves: Arc<leaf::LeafCache>) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(leaf::CacheResolver(leaves)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
