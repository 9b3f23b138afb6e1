//! The gRPC listeners: the public API (`tickshard.v1.Feed`, contract §5) with
//! the standard health service and server reflection on `--grpc-addr`, and the
//! shard-to-shard `Cluster` service alone on `--peer-addr` (contract §8: never
//! on the public port).

mod serve;
pub(crate) mod subscribe;

pub use serve::Handshake;
use subscribe::FeedRoutes;
pub use subscribe::encode_tick_events;

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tickshard_proto::v1::{
    self as pb,
    cluster_server::ClusterServer,
    feed_server::{Feed, FeedServer},
};
use tickshard_shard::{
    metrics as m,
    publish::Origin,
    rpc::{self, ClusterService, parse_symbols},
    wire,
};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, service::Routes};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::Instrument as _;

use crate::{config::GrpcLimits, shared::Shared, tls::ReloadingTls};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The running gRPC servers.
pub struct Servers {
    pub health: HealthReporter,
    /// The public listener's task and the peer listener's: each ends once
    /// `stop` is cancelled and its connections are closed.
    pub tasks: [tokio::task::JoinHandle<()>; 2],
}

/// Starts the public gRPC server on `public` and the `Cluster` service on
/// `peer`.
pub fn start(
    [public, peer]: [(TcpListener, Option<Arc<ReloadingTls>>); 2],
    shared: Arc<Shared>,
    limits: GrpcLimits,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<Servers, String> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tickshard_proto::FEED_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let cluster = ClusterServer::new(ClusterService::new(
        shared.node.clone(),
        shared.stopping().clone(),
        shared.publish_window,
        shared.ws.max_subscriptions,
    ));
    let feed = FeedRoutes::new(FeedService {
        shared,
        reads: ReadLimit::new(limits.max_reads),
    });
    let public_routes = Routes::new(health).add_service(reflection).add_service(feed).prepare();
    let peer_routes = Routes::new(cluster).prepare();
    let spawn = |(listener, tls), routes, what| {
        tickshard_shard::tasks::spawn(
            tasks,
            serve::serve(listener, routes, limits.clone(), tls, stop.clone())
                .instrument(tracing::info_span!("listener", listener = what)),
        )
    };
    Ok(Servers {
        health: reporter,
        tasks: [spawn(public, public_routes, "grpc"), spawn(peer, peer_routes, "peer")],
    })
}

/// Health of `""` and `tickshard.v1.Feed` (contract §5).
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(<FeedServer<FeedService> as tonic::server::NamedService>::NAME, status)
        .await;
}

pub struct FeedService {
    shared: Arc<Shared>,
    reads: ReadLimit,
}

/// At most `max` reads in flight; one more is shed at once (UNAVAILABLE,
/// retryable), so a burst of reads cannot pile up behind the store or a peer
/// and starve everything else of the blocking pool and memory.
pub struct ReadLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ReadLimit {
    pub fn new(max: usize) -> ReadLimit {
        ReadLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one read of `method`, held until the answer is built.
    pub fn admit(&self, method: &'static str) -> Result<OwnedSemaphorePermit, Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(m::GRPC_SHED, "method" => method).increment(1);
            Status::unavailable(format!(
                "overloaded: {} reads in flight (--grpc-max-reads); retry with back-off",
                self.max
            ))
        })
    }
}

#[tonic::async_trait]
impl Feed for FeedService {
    type PublishStream = BoxStream<pb::PublishAck>;
    type SubscribeStream = BoxStream<pb::Event>;

    async fn publish(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        Ok(Response::new(rpc::publish_stream(
            self.shared.node.clone(),
            req.into_inner(),
            self.shared.publish_window,
            self.shared.stopping().clone(),
            Origin::Client,
        )))
    }

    /// Never called: [`FeedRoutes`] serves `Subscribe` with pre-encoded
    /// events before the generated router would reach this.
    async fn subscribe(&self, _req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::internal("Subscribe is routed to the encode-once handler"))
    }

    async fn get_snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<pb::SnapshotResponse>, Status> {
        let syms = parse_symbols(&req.get_ref().symbols, self.shared.ws.max_subscriptions)?;
        let _slot = self.reads.admit("GetSnapshot")?;
        let snaps = self.shared.node.snapshots(&syms).await.map_err(wire::error_status)?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshots: snaps.iter().map(wire::last_tick_to_pb).collect(),
        }))
    }

    async fn get_history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let (symbol, q, limit) =
            wire::history_query(req.get_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let _slot = self.reads.admit("GetHistory")?;
        let h = self
            .shared
            .node
            .history(symbol, q, limit)
            .await
            .map_err(wire::error_status)?;
        Ok(Response::new(wire::history_to_pb(&h)))
    }

    async fn list_symbols(
        &self,
        _req: Request<pb::ListSymbolsRequest>,
    ) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        let _slot = self.reads.admit("ListSymbols")?;
        let symbols = self.shared.node.all_symbols().await;
        Ok(Response::new(pb::ListSymbolsResponse {
            symbols: symbols.iter().map(wire::symbol_info_to_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_limit_are_shed_until_one_ends() {
        let limit = ReadLimit::new(2);
        let a = limit.admit("GetHistory").expect("first");
        let _b = limit.admit("GetHistory").expect("second");
        let shed = limit.admit("GetSnapshot").expect_err("third is shed");
        assert_eq!(shed.code(), tonic::Code::Unavailable);
        assert!(shed.message().contains("--grpc-max-reads"), "{}", shed.message());
        drop(a);
        assert!(limit.admit("ListSymbols").is_ok(), "a finished read frees its slot");
    }
}
