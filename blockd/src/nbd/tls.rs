//! TLS for NBD (STARTTLS): the server's certificates, the client-certificate policy, and
//! reloading them on SIGHUP.
//!
//! The handshake itself runs on the async runtime (tokio-rustls) inside the option loop; the
//! established `rustls::ServerConnection` then moves to the connection's threads
//! ([`super::socket`]). A reload swaps the configuration new handshakes use; sessions that
//! are already up keep the keys they negotiated.
//!
//! Versions: TLS 1.3 and 1.2 (the NBD spec asks for 1.2 or later). Crypto: rustls with
//! *ring*, which builds with a C compiler alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Whether clients must upgrade (the NBD spec's FORCEDTLS) or may stay in plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Every option but STARTTLS and ABORT is refused before the upgrade.
    Require,
    /// Plain clients are served too; STARTTLS is offered.
    Allow,
}

/// Where the server's credentials live; re-read on every reload.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose signature a client certificate must carry; `None`: no client certificate.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS settings of the server, shared by every listener.
#[derive(Debug)]
pub struct TlsContext {
    mode: TlsMode,
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsContext {
    /// Loads the credentials; any problem is an error naming the file.
    pub fn load(files: TlsFiles, mode: TlsMode) -> Result<TlsContext, TlsError> {
        let config = build(&files)?;
        Ok(TlsContext {
            mode,
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Re-reads the files. On error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()));
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        path: files.key.clone(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    path: ca.clone(),
                    why: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Invalid {
                    path: ca.clone(),
                    why: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            path: files.key.clone(),
            why: format!("does not match {}: {e}", files.cert.display()),
        })?;
    // Session tickets would let a client resume without presenting its certificate again to
    // a reloaded CA; every connection does a full handshake instead (NBD sessions are long).
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}
