//! TLS for the listeners (contract §8): rustls server configurations built from
//! PEM files and **re-read when the files change** (cert-manager rotation), with
//! no restart: a new handshake uses the new certificate, an established
//! connection keeps the one it started with. A file that does not parse is
//! logged and the previous configuration stays in force, so a half-written
//! rotation never takes a listener down.
//!
//! One type serves both uses: the public listeners (`--tls-cert`/`--tls-key`)
//! and the peer listener, which also requires a client certificate signed by
//! `--peer-tls-ca` (mutual TLS between pods).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::WebPkiClientVerifier,
    },
};

use crate::watch::{Reload, Watched};

/// The PEM files of one listener's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, a client must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path}: {what}")]
    ClientCa { path: PathBuf, what: String },
}

/// The crypto provider of every TLS configuration here: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })
}

/// A root store of every certificate in a PEM file.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certificates(path)? {
        roots.add(c).map_err(|e| TlsError::ClientCa {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn build(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    what: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A listener's TLS configuration, re-read when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    alpn: &'static [&'static [u8]],
    /// What the log and the metric call it (`tls`, `peer_tls`).
    what: &'static str,
    current: RwLock<Arc<ServerConfig>>,
    watched: Watched,
}

impl ReloadingTls {
    /// Reads the files once; a listener does not start with a bad one.
    pub fn load(files: TlsFiles, alpn: &'static [&'static [u8]], what: &'static str) -> Result<Arc<Self>, TlsError> {
        let paths = [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let watched = Watched::new(paths);
        let cfg = build(&files, alpn)?;
        Ok(Arc::new(ReloadingTls {
            files,
            alpn,
            what,
            current: RwLock::new(Arc::new(cfg)),
            watched,
        }))
    }

    /// The acceptor for the next connection (the configuration in force now).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl Reload for ReloadingTls {
    fn reload_if_changed(&self) -> Option<Result<(), String>> {
        self.watched.rebuild_if_changed(|| {
            build(&self.files, self.alpn)
                .map(|cfg| *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg))
                .map_err(|e| e.to_string())
        })
    }

    fn what(&self) -> &'static str {
        self.what
    }
}
