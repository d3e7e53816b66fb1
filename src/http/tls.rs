//! TLS on the TCP listeners (`http.tls_cert_file`, `http.tls_key_file`): rustls with
//! the `ring` provider, the certificate chosen per handshake by `Current`, whose pair a
//! reload swaps. A connection keeps the pair it was handshaken with; new ones get the
//! new pair. Unix sockets stay plain (their file's permissions guard them).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read the certificates in {path:?}: {source}")]
    Certificates { path: PathBuf, source: pem::Error },
    #[error("{path:?} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read the private key in {path:?}: {source}")]
    Key { path: PathBuf, source: pem::Error },
    #[error("the private key in {path:?} is not usable: {source}")]
    UnusableKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the private key in {key:?} does not belong to the certificate in {cert:?}: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(#[source] rustls::Error),
}

/// Reads a PEM certificate chain (leaf first) and its PEM private key, and checks that
/// they belong together (so a reload with a mismatched pair is refused, not served).
pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::UnusableKey {
            path: key.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    Ok(Arc::new(certified))
}

/// The pair handed to each new handshake.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a whole pair (the swap is one assignment).
        let pair = match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Some(pair)
    }
}

/// The listener's TLS: the acceptor and the files its pair is re-read from.
pub(crate) struct Tls {
    current: Arc<Current>,
    acceptor: TlsAcceptor,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// TLS when both files are configured (the config's validation refuses one
    /// alone), `None` otherwise.
    pub(crate) fn from_config(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Tls>, TlsError> {
        let (Some(cert), Some(key)) = (cert, key) else {
            return Ok(None);
        };
        let current = Arc::new(Current(RwLock::new(load(cert, key)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
        // hyper serves HTTP/1.1 only: say so, so a client offering h2 does not pick it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Tls {
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the files (a reload); on any problem the running pair stays.
    pub(crate) fn reread(&self) -> Result<(), TlsError> {
        let pair = load(&self.cert, &self.key)?;
        match self.current.0.write() {
            Ok(mut guard) => *guard = pair,
            Err(poisoned) => *poisoned.into_inner() = pair,
        }
        Ok(())
    }
}
