//! Contract §8, Trust: who may do what. Every test runs the real binary on
//! loopback and talks to it with real clients.

use tickshard_proto::v1::{self as pb, cluster_client::ClusterClient, feed_client::FeedClient};

use crate::common::Server;

async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The shard-to-shard `Cluster` service is served on `--peer-addr` only: on
/// the public gRPC port it does not exist (UNIMPLEMENTED: `Forward` cannot
/// write as the owner, `Ensure` cannot create symbols), and the peer port
/// serves nothing but it.
#[tokio::test]
async fn the_cluster_service_is_served_only_on_the_peer_port() {
    let srv = Server::start(&["--no-sim"]);
    let topology = pb::TopologyRequest {
        caller_shard: 0,
        shards: 1,
    };
    let mut public = ClusterClient::new(channel(srv.grpc_url()).await);
    let e = public
        .topology(topology)
        .await
        .expect_err("no Cluster on the public port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    let e = public
        .ensure(pb::EnsureRequest {
            symbols: vec!["INJECTED".into()],
        })
        .await
        .expect_err("no Ensure on the public port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");

    let mut peer = ClusterClient::new(channel(srv.peer_url()).await);
    let t = peer
        .topology(topology)
        .await
        .expect("Cluster on the peer port")
        .into_inner();
    assert_eq!((t.shard_id, t.shards), (0, 1));
    let mut feed_on_peer = FeedClient::new(channel(srv.peer_url()).await);
    let e = feed_on_peer
        .list_symbols(pb::ListSymbolsRequest {})
        .await
        .expect_err("the public API is not on the peer port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
}
