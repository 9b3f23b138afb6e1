//! The gRPC listeners: the public API (`tickshard.v1.Feed`, contract §5) with
//! the standard health service and server reflection on `--grpc-addr`, and the
//! shard-to-shard `Cluster` service alone on `--peer-addr` (contract §8: never
//! on the public port).

mod serve;
pub(crate) mod subscribe;

pub use serve::Handshake;
use subscribe::FeedRoutes;
pub use subscribe::{SentCount, encode_tick_events};

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tickshard_proto::v1::{
    self as pb,
    cluster_server::ClusterServer,
    feed_server::{Feed, FeedServer},
};
use tickshard_shard::{
    publish::Origin,
    rpc::{self, ClusterService, parse_symbols},
    wire,
};
use tokio::{net::TcpListener, sync::OwnedSemaphorePermit};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, service::Routes};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::Instrument as _;

use crate::{
    auth::{AuthError, Denied, Principal},
    config::GrpcLimits,
    shared::{ReadLimit, Shared},
    tls::ReloadingTls,
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Connections the peer listener serves at once (each other pod keeps one,
/// plus start-up probes).
pub const PEER_CONNECTIONS: usize = 256;
/// Time a peer connection gets for its TLS and HTTP/2 handshakes.
pub const PEER_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(3);

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
    runtime: Option<&tokio::runtime::Handle>,
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
    let admin = tickshard_proto::admin::admin_server::AdminServer::new(rpc::AdminService::new(shared.node.clone()));
    let feed = FeedRoutes::new(FeedService { shared });
    let public_routes = Routes::new(health).add_service(reflection).add_service(feed).prepare();
    let peer_routes = Routes::new(cluster).add_service(admin).prepare();
    // The peer port serves a few pods: a small connection budget and a short
    // handshake, so a stranger that reaches it cannot crowd the pods out.
    let peer_limits = GrpcLimits {
        max_connections: PEER_CONNECTIONS,
        handshake_timeout: limits.handshake_timeout.min(PEER_HANDSHAKE),
        request_timeout: None,
        ..limits.clone()
    };
    // Both listeners move to the gRPC runtime's reactor (where their
    // connections are accepted and served) before either serves: a failure
    // is the caller's error, not a listener that quietly never accepts.
    let rehome = |listener: TcpListener, what: &str| -> Result<TcpListener, String> {
        let Some(rt) = runtime else { return Ok(listener) };
        let std = listener.into_std().map_err(|e| format!("{what} listener: {e}"))?;
        let _in = rt.enter();
        TcpListener::from_std(std).map_err(|e| format!("{what} listener: {e}"))
    };
    let (public, peer) = ((rehome(public.0, "grpc")?, public.1), (rehome(peer.0, "peer")?, peer.1));
    let spawn = |(listener, tls), routes, limits: GrpcLimits, what| {
        let fut = serve::serve(listener, routes, limits, tls, stop.clone())
            .instrument(tracing::info_span!("listener", listener = what));
        tickshard_shard::tasks::spawn_on(tasks, runtime, fut)
    };
    Ok(Servers {
        health: reporter,
        tasks: [
            spawn(public, public_routes, limits.clone(), "grpc"),
            spawn(peer, peer_routes, peer_limits, "peer"),
        ],
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

/// Bytes a request may take per symbol it names (see
/// [`FeedService::max_request_bytes`]).
const REQUEST_BYTES_PER_SYMBOL: usize = 192;

/// The contract's bound on a request message (§5: over 4 MiB is
/// OUT_OF_RANGE), whatever the flags make of the one above.
const MAX_REQUEST_BYTES: usize = 4 << 20;

pub struct FeedService {
    shared: Arc<Shared>,
}

impl FeedService {
    /// The largest request message of the public API: a Subscribe naming
    /// `--max-subscriptions` symbols, each with a resume position (at most
    /// ~110 bytes a symbol), or `--max-message-bytes` if more, and never over
    /// [`MAX_REQUEST_BYTES`]. tonic reads a
    /// message whole before its handler runs, so this bounds what a call
    /// holds before it is looked at (tonic's default is 4 MiB).
    pub(crate) fn max_request_bytes(&self) -> usize {
        let ws = &self.shared.ws;
        ws.max_subscriptions
            .saturating_mul(REQUEST_BYTES_PER_SYMBOL)
            .max(ws.max_message_bytes)
            .min(MAX_REQUEST_BYTES)
    }

    /// The caller of a request (contract §8): its `authorization: Bearer`
    /// token, or the anonymous grant; a bad token is UNAUTHENTICATED.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        self.shared
            .auth
            .from_bearer(header)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    /// May the caller read these symbols? UNAUTHENTICATED or PERMISSION_DENIED.
    pub(crate) fn check_read<'a>(p: &Principal, symbols: impl IntoIterator<Item = &'a str>) -> Result<(), Status> {
        p.check_read(symbols).map_err(|d| match d.counted("grpc") {
            Denied::Unauthorized => Status::unauthenticated("a token is required to read"),
            Denied::Forbidden(why) => Status::permission_denied(why),
        })
    }
}

/// A slot for one read of `method` under the shared read limit, or
/// UNAVAILABLE (retryable) at once.
fn admit(reads: &ReadLimit, method: &'static str) -> Result<OwnedSemaphorePermit, Status> {
    reads
        .admit(method)
        .ok_or_else(|| Status::unavailable(reads.overloaded()))
}

#[tonic::async_trait]
impl Feed for FeedService {
    type PublishStream = BoxStream<pb::PublishAck>;
    type SubscribeStream = BoxStream<pb::Event>;

    async fn publish(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let caller = self.caller(&req)?;
        if !caller.is_authenticated() && caller.publish.is_empty() {
            AuthError::Missing.counted();
            return Err(Status::unauthenticated("a token is required to publish"));
        }
        let close_connection = req
            .extensions()
            .get::<serve::CloseConnection>()
            .map(|c| c.0.clone())
            .unwrap_or_default();
        Ok(Response::new(rpc::publish_stream(
            self.shared.node.clone(),
            req.into_inner(),
            tickshard_shard::publish::Window {
                stream: self.shared.publish_window,
                pod: Some(tickshard_shard::publish::PodBudget {
                    permits: self.shared.publish_budget.clone(),
                    slow_reader: self.shared.ws.slow_client,
                    close_connection,
                }),
            },
            self.shared.stopping().clone(),
            Origin::Client(caller.publisher()),
        )))
    }

    /// Never called: [`FeedRoutes`] serves `Subscribe` with pre-encoded
    /// events before the generated router would reach this.
    async fn subscribe(&self, _req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::internal("Subscribe is routed to the encode-once handler"))
    }

    async fn get_snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<pb::SnapshotResponse>, Status> {
        let caller = self.caller(&req)?;
        let syms = parse_symbols(&req.get_ref().symbols, self.shared.ws.max_subscriptions)?;
        Self::check_read(&caller, syms.iter().map(|s| s.as_str()))?;
        let _slot = admit(&self.shared.reads, "GetSnapshot")?;
        let snaps = self.shared.node.snapshots(&syms).await.map_err(wire::error_status)?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshots: snaps.iter().map(wire::last_tick_to_pb).collect(),
        }))
    }

    async fn get_history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let caller = self.caller(&req)?;
        let (symbol, q, limit) =
            wire::history_query(req.get_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Self::check_read(&caller, [symbol.as_str()])?;
        let _slot = admit(&self.shared.reads, "GetHistory")?;
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
        req: Request<pb::ListSymbolsRequest>,
    ) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        let caller = self.caller(&req)?;
        Self::check_read(&caller, [])?;
        let _slot = admit(&self.shared.reads, "ListSymbols")?;
        let symbols = self.shared.node.all_symbols().await;
        // only the symbols the caller may read
        Ok(Response::new(pb::ListSymbolsResponse {
            symbols: symbols
                .iter()
                .filter(|s| caller.subscribe.allows(s.symbol.as_str()))
                .map(wire::symbol_info_to_pb)
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_limit_are_shed_until_one_ends() {
        let limit = ReadLimit::new(2);
        let a = admit(&limit, "GetHistory").expect("first");
        let _b = admit(&limit, "/api/candles").expect("second");
        let shed = admit(&limit, "GetSnapshot").expect_err("third is shed");
        assert_eq!(shed.code(), tonic::Code::Unavailable);
        assert!(shed.message().contains("--grpc-max-reads"), "{}", shed.message());
        drop(a);
        assert!(admit(&limit, "ListSymbols").is_ok(), "a finished read frees its slot");
    }
}
