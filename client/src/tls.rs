//! The client side of TLS (contract §8): `wss://` and `https://` servers are
//! verified against the CA certificates of a PEM file (`--ca-cert`), with
//! rustls (ring). There is no built-in root store: a server with a public
//! certificate is reached with the system bundle
//! (`--ca-cert /etc/ssl/certs/ca-certificates.crt`).

use std::{path::Path, sync::Arc};

use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::ClientError;

/// The CA certificates a client trusts (read once from a PEM file).
#[derive(Clone, Debug)]
pub struct Trust {
    pem: Vec<u8>,
    config: Arc<ClientConfig>,
}

impl Trust {
    /// Reads every certificate of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<Trust, ClientError> {
        let bad = |what: String| ClientError::Input(format!("--ca-cert {}: {what}", path.display()));
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Trust {
            pem,
            config: Arc::new(config),
        })
    }

    /// TLS over a connected socket, verifying the server as `host`.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> Result<TlsStream<TcpStream>, ClientError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| ClientError::BadAddress(host.to_owned()))?;
        TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Connect {
                addr: host.to_owned(),
                message: format!("TLS: {e}"),
            })
    }
}

/// HTTP/2 pings on every gRPC connection, idle or not: a connection whose
/// server or path died without a FIN (a lost node, a partition) fails within
/// `KEEP_ALIVE + KEEP_ALIVE_TIMEOUT`, and the publisher reconnects, instead
/// of waiting for the kernel's retransmission timeout (minutes).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);
/// (as generous as the server's: on a starved machine a pong can wait)
pub const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The gRPC endpoint of a URL: `https://` needs `trust`.
pub fn endpoint(url: &str, trust: Option<&Trust>) -> Result<Endpoint, ClientError> {
    let ep = Endpoint::from_shared(url.to_owned())
        .map_err(|_| ClientError::BadAddress(url.to_owned()))?
        .http2_keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match (url.starts_with("https://"), trust) {
        (false, _) => Ok(ep),
        (true, None) => Err(ClientError::Input(format!(
            "{url} is TLS: pass --ca-cert with the CA that signed its certificate"
        ))),
        (true, Some(t)) => ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.pem)))
            .map_err(|e| ClientError::Connect {
                addr: url.to_owned(),
                message: e.to_string(),
            }),
    }
}

/// The host part of `host:port` (IPv6 brackets removed), for verification.
pub fn host_of(host_port: &str) -> &str {
    let h = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']')
}
