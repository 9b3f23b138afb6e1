//! The operator's client of `tickshard.admin.v1.Admin` (contract §9): what
//! `tickshard admin status|rebalance` calls on a pod's peer port, with the
//! peer credentials of §8 (mutual TLS when the cluster uses it).

use std::{path::PathBuf, time::Duration};

use tickshard_proto::admin::{self as pb, admin_client::AdminClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ClientError;

/// The pod's peer credentials (`--peer-tls-cert/--peer-tls-key/--peer-tls-ca`).
#[derive(Clone, Debug)]
pub struct PeerCredentials {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The name the pod's certificate is checked against.
    pub server_name: String,
}

/// One symbol move left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveLeft {
    pub symbol: String,
    pub from: u32,
    pub to: u32,
}

/// What `admin status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub committed_shards: u32,
    /// The count a rebalance in progress moves to.
    pub target_shards: Option<u32>,
    pub moves_left: Vec<MoveLeft>,
    /// Shards that did not answer (their moves are not in the list).
    pub unreachable: Vec<u32>,
    /// Why the last rebalance step failed, if it did.
    pub error: Option<String>,
}

impl Status {
    fn from_pb(r: pb::StatusResponse) -> Status {
        Status {
            committed_shards: r.committed_shards,
            target_shards: (r.target_shards > 0).then_some(r.target_shards),
            moves_left: r
                .moves_left
                .into_iter()
                .map(|m| MoveLeft {
                    symbol: m.symbol,
                    from: m.from,
                    to: m.to,
                })
                .collect(),
            unreachable: r.unreachable,
            error: (!r.error.is_empty()).then_some(r.error),
        }
    }

    /// One JSON object, as the contract prints it.
    pub fn to_json(&self) -> String {
        let esc = |s: &str| {
            let mut o = String::with_capacity(s.len() + 2);
            o.push('"');
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        };
        let moves: Vec<String> = self
            .moves_left
            .iter()
            .map(|m| format!("{{\"symbol\":{},\"from\":{},\"to\":{}}}", esc(&m.symbol), m.from, m.to))
            .collect();
        let unreachable: Vec<String> = self.unreachable.iter().map(u32::to_string).collect();
        format!(
            "{{\"committed_shards\":{},\"target_shards\":{},\"moves_left\":[{}],\"unreachable\":[{}],\"error\":{}}}",
            self.committed_shards,
            self.target_shards.map_or("null".to_string(), |t| t.to_string()),
            moves.join(","),
            unreachable.join(","),
            self.error.as_deref().map_or("null".to_string(), esc),
        )
    }
}

/// The largest Status or Rebalance answer read (the peer links' bound).
pub const STATUS_BYTES: usize = tickshard_shard::cluster::PEER_REPLY_BYTES;

/// A connection to one pod's Admin service.
pub struct Admin {
    client: AdminClient<Channel>,
    addr: String,
}

impl Admin {
    /// Connects to `url` (`http://` or, with `creds`, `https://`).
    pub async fn connect(url: &str, creds: Option<&PeerCredentials>) -> Result<Admin, ClientError> {
        let bad = |m: String| ClientError::Connect {
            addr: url.to_owned(),
            message: m,
        };
        if creds.is_some() && !url.starts_with("https://") {
            // (tonic would dial it in plain text: an unclear transport error)
            return Err(ClientError::Input(format!(
                "{url}: peer TLS credentials are set, so the peer address must be https://"
            )));
        }
        let mut ep = Endpoint::from_shared(url.to_owned())
            .map_err(|_| ClientError::BadAddress(url.to_owned()))?
            .connect_timeout(Duration::from_secs(3))
            // (a rebalance asked of another pod than shard 0 is started
            // there, which may take up to 40 s)
            .timeout(Duration::from_secs(60));
        if let Some(c) = creds {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| ClientError::Input(format!("{}: {e}", p.display())));
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&c.ca)?))
                .identity(Identity::from_pem(read(&c.cert)?, read(&c.key)?))
                .domain_name(c.server_name.clone());
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let ch = tokio::time::timeout(Duration::from_secs(5), ep.connect())
            .await
            .map_err(|_| bad("no answer in time".into()))?
            .map_err(|e| bad(e.to_string()))?;
        Ok(Admin {
            // (a status lists every move left: 200k moves are ~6 MB, past
            // tonic's default of 4 MiB)
            client: AdminClient::new(ch).max_decoding_message_size(STATUS_BYTES),
            addr: url.to_owned(),
        })
    }

    fn err(&self, s: tonic::Status) -> ClientError {
        ClientError::Grpc(format!("{} ({}): {}", self.addr, s.code(), s.message()))
    }

    pub async fn status(&mut self) -> Result<Status, ClientError> {
        let r = self
            .client
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| self.err(s))?;
        Ok(Status::from_pb(r.into_inner()))
    }

    /// Starts a rebalance to `shards` (returns once every pod took the target).
    pub async fn rebalance(&mut self, shards: u32) -> Result<Status, ClientError> {
        let r = self
            .client
            .rebalance(pb::RebalanceRequest { shards })
            .await
            .map_err(|s| self.err(s))?;
        Ok(Status::from_pb(r.into_inner()))
    }
}
