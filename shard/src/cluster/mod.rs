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
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub use crate::committer::MovePart;
pub use peer::{MirrorLease, PEER_REPLY_BYTES, Peer, PeerError};
use tickshard_proto::v1::{self as pb, cluster_client::ClusterClient};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{
    hub::Hub,
    placement::{ClusterState, Placement},
};

/// How a pod reaches the others.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub shard_id: u32,
    /// Peer URL of every shard, by id (this pod's own entry included), as
    /// listed in `--peers`.
    pub peers: Vec<String>,
    /// `--peers` as a template (`{}` for the id): any shard's URL, for
    /// rebalances beyond the listed ones.
    pub peer_template: Option<String>,
    /// Mutual TLS of peer links, else plaintext.
    pub peer_tls: Option<PeerTls>,
    /// Unsent bytes per follower stream before it is closed (the follower then
    /// re-follows and resumes; a peer is never conflated).
    pub peer_queue_bytes: usize,
    pub connect_timeout: Duration,
}

/// The cluster protocol version this build speaks (`TopologyResponse.protocol`).
/// 1: the first release (no field: reads as 0); 2: elastic shards (cluster
/// state in Topology, SetState/Moves/MoveIn/MoveStatus). A peer of another
/// version is synced with (Forward and Follow are unchanged since 1), and a
/// rebalance needs every pod at 2 or above.
pub const PROTOCOL: u32 = 2;

impl ClusterConfig {
    /// The peer URL of shard `id`, if `--peers` names one.
    pub fn peer_addr(&self, id: u32) -> Option<String> {
        match &self.peer_template {
            Some(t) => Some(t.replace("{}", &id.to_string())),
            None => self.peers.get(id as usize).cloned(),
        }
    }

    /// How many shards `--peers` can address.
    pub fn addressable(&self) -> u32 {
        match &self.peer_template {
            Some(_) => crate::placement::MAX_SHARDS,
            None => self.peers.len() as u32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "peer {addr} (shard {index} in --peers) reports shard {shard_id}; \
         refusing to start: fix --peers/--shard-id so every pod agrees"
    )]
    Mismatch { addr: String, index: u32, shard_id: u32 },
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

/// A running link and what stops it alone.
struct Link {
    peer: Arc<Peer>,
    stop: CancellationToken,
}

pub struct Cluster {
    cfg: ClusterConfig,
    /// Random per process start: a peer sees a restart as a new instance.
    instance: String,
    hub: Arc<Hub>,
    placement: Arc<Placement>,
    /// One link per other shard of the cluster's current span (committed
    /// count, or the target while a rebalance runs), by id.
    peers: RwLock<Vec<Option<Link>>>,
    started: AtomicBool,
    /// Where links run, once started: their tracker, the stop of them all,
    /// and the runtime that started the cluster (the main one: a link that
    /// a rebalance RPC creates runs there too, not on the gRPC runtime the
    /// RPC came in on).
    runner: Mutex<Option<Runner>>,
}

type Runner = (TaskTracker, CancellationToken, Option<tokio::runtime::Handle>);

impl Cluster {
    pub fn new(cfg: ClusterConfig, hub: Arc<Hub>, placement: Arc<Placement>) -> Arc<Cluster> {
        let instance = format!("{:016x}", fastrand::u64(..));
        let c = Arc::new(Cluster {
            cfg,
            instance,
            hub,
            placement,
            peers: RwLock::new(Vec::new()),
            started: AtomicBool::new(false),
            runner: Mutex::new(None),
        });
        c.resize(c.placement.state().span());
        c
    }

    /// Keeps one link per other shard below `span` (started if the cluster
    /// runs); links at or above it stop (their pods are scaled away).
    pub fn resize(&self, span: u32) {
        let span = span.min(self.cfg.addressable());
        let runner = self.runner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        while peers.len() > span as usize {
            if let Some(Some(l)) = peers.pop() {
                tracing::info!(
                    peer = l.peer.id,
                    "peer link stopped: the shard is beyond the cluster's span"
                );
                l.stop.cancel();
            }
        }
        while peers.len() < span as usize {
            let i = peers.len() as u32;
            let link = match self.cfg.peer_addr(i) {
                Some(addr) if i != self.cfg.shard_id => {
                    let peer = Arc::new(Peer::new(i, addr, &self.cfg, self.hub.clone(), self.placement.clone()));
                    let stop = CancellationToken::new();
                    if let Some(r) = &runner {
                        Self::run_link(r, &peer, &stop);
                    }
                    Some(Link { peer, stop })
                }
                _ => None,
            };
            peers.push(link);
        }
    }

    fn run_link((tracker, all, rt): &Runner, peer: &Arc<Peer>, own: &CancellationToken) {
        let p = peer.clone();
        let stop = CancellationToken::new();
        let (all, own, s) = (all.clone(), own.clone(), stop.clone());
        let tasks = tracker.clone();
        let watch = async move {
            tokio::select! {
                _ = all.cancelled() => {}
                _ = own.cancelled() => {}
            }
            s.cancel();
        };
        let run = async move { p.run(stop, tasks).await };
        crate::tasks::spawn_on(tracker, rt.as_ref(), watch);
        crate::tasks::spawn_on(tracker, rt.as_ref(), run);
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The link to shard `id` (`None` for this pod's own id, or beyond the span).
    pub fn peer(&self, id: u32) -> Option<Arc<Peer>> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        peers.get(id as usize).and_then(Option::as_ref).map(|l| l.peer.clone())
    }

    /// The shards this pod keeps links for (its own id included): the
    /// committed count, or while a rebalance runs every shard it involved.
    pub fn span(&self) -> u32 {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).len() as u32
    }

    /// Waits until every publish forwarded on any link so far is answered
    /// (see `Node::adopt_state`).
    pub async fn forwards_answered(&self) {
        let mut wait = crate::backoff::Backoff::new(Duration::from_millis(1), Duration::from_millis(20));
        while self.peers().iter().any(|p| p.forwards_in_flight() > 0) {
            wait.wait().await;
        }
    }

    /// Cuts every link with forwards unanswered (see
    /// [`Peer::cut_if_forwarding`]); answers how many.
    pub fn cut_forwarding_links(&self) -> usize {
        self.peers().iter().filter(|p| p.cut_if_forwarding()).count()
    }

    /// Every link, by id.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        peers.iter().flatten().map(|l| l.peer.clone()).collect()
    }

    /// Before serving: asks every reachable peer of the span for its
    /// topology and refuses an inconsistent cluster (another id at that
    /// address, or our own id already served elsewhere). Unreachable peers
    /// are "known down". Answers the newest cluster state a peer reported.
    pub async fn check_topology(&self) -> Result<Option<ClusterState>, ClusterError> {
        let state = self.placement.state();
        let span = state.span().max(self.cfg.shard_id + 1).min(self.cfg.addressable());
        let addrs: Vec<(u32, String)> = (0..span).filter_map(|i| Some((i, self.cfg.peer_addr(i)?))).collect();
        let probes = addrs.iter().map(|(i, addr)| async move {
            let i = *i;
            let Some(t) = self.ask_topology(addr, true).await else {
                return Ok(None); // down (or, for our own id, not serving yet: good)
            };
            if i == self.cfg.shard_id {
                return Err(ClusterError::Duplicate {
                    shard_id: i,
                    addr: addr.clone(),
                    instance: t.instance,
                });
            }
            if t.shard_id != i {
                return Err(ClusterError::Mismatch {
                    addr: addr.clone(),
                    index: i,
                    shard_id: t.shard_id,
                });
            }
            Ok(t.state.as_ref().and_then(crate::wire::cluster_state_from_pb))
        });
        let mut newest: Option<ClusterState> = None;
        for r in futures_util::future::join_all(probes).await {
            if let Some(s) = r? {
                if newest.is_none_or(|n| s.version > n.version) {
                    newest = Some(s);
                }
            }
        }
        Ok(newest)
    }

    /// Asks the pod at `addr` for its topology on a connection of its own,
    /// bounded as a whole (a pod that is starting has bound its port but
    /// may not answer a TLS handshake yet): `None` if it does not answer.
    /// `announce`: with this pod's cluster state (a newer one is adopted
    /// there); without it, the call changes nothing at the callee.
    async fn ask_topology(&self, addr: &str, announce: bool) -> Option<pb::TopologyResponse> {
        let state = self.placement.state();
        let req = pb::TopologyRequest {
            caller_shard: self.cfg.shard_id,
            shards: state.committed,
            state: announce.then(|| crate::wire::cluster_state_to_pb(&state)),
        };
        let ep = endpoint(addr, self.cfg.peer_tls.as_ref())
            .await
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        let ch = tokio::time::timeout(Duration::from_secs(1), ep.connect())
            .await
            .ok()?
            .ok()?;
        Some(ClusterClient::new(ch).topology(req).await.ok()?.into_inner())
    }

    /// Before a rebalance to or from `span` shards: what keeps any other pod
    /// below `span` from taking part (it does not answer, another shard
    /// answers at its address, it is not ready, or its release predates
    /// elastic shards), one line per pod; empty when every one can.
    pub async fn unfit(&self, span: u32) -> Vec<String> {
        let probes = (0..span).filter(|i| *i != self.cfg.shard_id).map(|i| async move {
            let Some(addr) = self.cfg.peer_addr(i) else {
                return Some(format!("shard {i} has no address in --peers"));
            };
            // (no state sent: a pod of another cluster at a wrong address
            // must not adopt this one's before it is reported)
            match self.ask_topology(&addr, false).await {
                None => Some(format!("shard {i} ({addr}) does not answer")),
                Some(t) if t.shard_id != i => Some(format!("{addr} answers as shard {}, not {i}", t.shard_id)),
                Some(t) if !t.ready => Some(format!("shard {i} is not ready")),
                Some(t) if t.protocol < PROTOCOL => Some(format!(
                    "shard {i} runs {} (cluster protocol {}): every pod must run a release with elastic shards first",
                    t.version, t.protocol
                )),
                Some(_) => None,
            }
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Starts every peer link; they run until `stop`.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        let runner = (tracker.clone(), stop, tokio::runtime::Handle::try_current().ok());
        *self.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(runner.clone());
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        for l in peers.iter().flatten() {
            Self::run_link(&runner, &l.peer, &l.stop);
        }
    }
}
