//! Shard-to-shard sync over the `Cluster` gRPC service (`proto/cluster.proto`).
//!
//! Every pod owns `jump_consistent_hash(xxh3(symbol), N)`'s share of symbols and
//! keeps one [`Peer`] link per other shard. Over it:
//! - **Forward**: publishes for symbols the pod does not own go to the owner on
//!   one long-lived stream; the ack comes back only once the owner made the tick
//!   durable. A down owner means an immediate UNAVAILABLE ack, never a drop.
//! - **Follow**: one multiplexed stream per peer carries every foreign symbol
//!   that has local subscribers. A *mirror* `SymbolHub` per symbol is fed from it
//!   and fans out to local clients exactly like an owned symbol. After any break
//!   the link re-follows from the mirror's `{seq, epoch}`, so local clients see
//!   the owner's sequence with no gap and no duplicate.
//! - **Reads** of foreign symbols go to the owner (`Local*` RPCs).
//!
//! Each (re)connect re-resolves DNS (StatefulSet pod IPs change), checks the
//! peer's topology (same N, expected shard id, ready), and backs off with jitter
//! on failure.

mod peer;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub use peer::{MirrorLease, Peer, PeerError};
use tickshard_proto::v1::{self as pb, cluster_client::ClusterClient};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::hub::Hub;

/// How a pod reaches the others.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub shard_id: u32,
    pub shards: u32,
    /// Peer URL of every shard, by id (this pod's own entry included).
    pub peers: Vec<String>,
    /// Mutual TLS of peer links, else plaintext.
    pub peer_tls: Option<PeerTls>,
    /// Unsent bytes per follower stream before it is closed (the follower then
    /// re-follows and resumes; a peer is never conflated).
    pub peer_queue_bytes: usize,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "peer {addr} (shard {index} in --peers) reports shard {shard_id} of {shards}, but this pod expects shard {index} of {expected_shards}; \
         refusing to start: fix --shards/--peers/--shard-id so every pod agrees"
    )]
    Mismatch {
        addr: String,
        index: u32,
        shard_id: u32,
        shards: u32,
        expected_shards: u32,
    },
    #[error(
        "shard id {shard_id} is already served by another process at {addr} (instance {instance}); \
         refusing to start a duplicate shard (check --shard-id and the hostname)"
    )]
    Duplicate {
        shard_id: u32,
        addr: String,
        instance: String,
    },
}

/// Mutual TLS between pods (contract §8): this pod's certificate and key (its
/// client identity when it dials a peer) and the CA that signs every pod's.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl PeerTls {
    /// The dialing side, read anew for every connection, so a rotated
    /// certificate is used from the next reconnect on.
    async fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let read = |p: &PathBuf| {
            let p = p.clone();
            async move { tokio::fs::read(&p).await.map_err(|e| format!("{}: {e}", p.display())) }
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca).await?))
            .identity(Identity::from_pem(read(&self.cert).await?, read(&self.key).await?)))
    }
}

/// The endpoint of a peer URL, with mutual TLS when configured.
pub(crate) async fn endpoint(addr: &str, tls: Option<&PeerTls>) -> Result<Endpoint, String> {
    let ep = Endpoint::from_shared(addr.to_owned()).map_err(|e| format!("bad peer address {addr}: {e}"))?;
    match tls {
        None => Ok(ep),
        Some(t) => ep
            .tls_config(t.client_config().await?)
            .map_err(|e| format!("peer TLS for {addr}: {e}")),
    }
}

pub struct Cluster {
    cfg: ClusterConfig,
    /// Random per process start: a peer sees a restart as a new instance.
    instance: String,
    peers: Vec<Option<Arc<Peer>>>,
    started: AtomicBool,
}

impl Cluster {
    pub fn new(cfg: ClusterConfig, hub: Arc<Hub>) -> Arc<Cluster> {
        let instance = format!("{:016x}", fastrand::u64(..));
        let peers = (0..cfg.shards)
            .map(|i| {
                (i != cfg.shard_id).then(|| Arc::new(Peer::new(i, cfg.peers[i as usize].clone(), &cfg, hub.clone())))
            })
            .collect();
        Arc::new(Cluster {
            cfg,
            instance,
            peers,
            started: AtomicBool::new(false),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The link to shard `id` (`None` for this pod's own id).
    pub fn peer(&self, id: u32) -> Option<&Arc<Peer>> {
        self.peers.get(id as usize).and_then(Option::as_ref)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.peers.iter().flatten()
    }

    /// Before serving: asks every reachable peer for its topology and refuses
    /// an inconsistent cluster (another N, another id at that address, or our
    /// own id already served elsewhere). Unreachable peers are "known down".
    pub async fn check_topology(&self) -> Result<(), ClusterError> {
        let probes = self.cfg.peers.iter().enumerate().map(|(i, addr)| async move {
            let i = i as u32;
            let req = pb::TopologyRequest {
                caller_shard: self.cfg.shard_id,
                shards: self.cfg.shards,
            };
            let Ok(ep) = endpoint(addr, self.cfg.peer_tls.as_ref()).await else {
                return Ok(());
            };
            let ep = ep
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(1));
            // (bounded as a whole: a peer that is starting has bound its port
            // but not yet answered a TLS handshake)
            let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(1), ep.connect()).await else {
                return Ok(()); // down (or, for our own id, not serving yet: good)
            };
            let Ok(resp) = ClusterClient::new(ch).topology(req).await else {
                return Ok(());
            };
            let t = resp.into_inner();
            if i == self.cfg.shard_id {
                return Err(ClusterError::Duplicate {
                    shard_id: i,
                    addr: addr.clone(),
                    instance: t.instance,
                });
            }
            if t.shard_id != i || t.shards != self.cfg.shards {
                return Err(ClusterError::Mismatch {
                    addr: addr.clone(),
                    index: i,
                    shard_id: t.shard_id,
                    shards: t.shards,
                    expected_shards: self.cfg.shards,
                });
            }
            Ok(())
        });
        for r in futures_util::future::join_all(probes).await {
            r?;
        }
        Ok(())
    }

    /// Starts every peer link; they run until `stop`.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        for p in self.peers() {
            let p = p.clone();
            let stop = stop.clone();
            let tasks = tracker.clone();
            crate::tasks::spawn(tracker, async move { p.run(stop, tasks).await });
        }
    }
}
