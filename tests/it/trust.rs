//! Contract §8, Trust: who may do what. Every test runs the real binary on
//! loopback and talks to it with real clients.

use std::sync::Arc;
use tickshard_client::{
    publisher::{Publisher, PublisherConfig},
    ws::{ServerMsg, WsConn},
};
use tickshard_proto::v1::{self as pb, cluster_client::ClusterClient, feed_client::FeedClient};

use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::pem::PemObject as _};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::common::{Server, TestCa, TestCluster, WAIT, eventually, publish_all, recv, recv_subscribed, tick};

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

fn tls(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca_pem).unwrap()))
}

/// Connects and asks one question; the error if either fails.
async fn topology_via(ep: Endpoint) -> Result<pb::TopologyResponse, String> {
    let ch = ep.connect().await.map_err(|e| format!("connect: {e}"))?;
    ClusterClient::new(ch)
        .topology(pb::TopologyRequest {
            caller_shard: 0,
            shards: 2,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("call: {e}"))
}

/// With `--peer-tls-*`, pods link over mutual TLS (publishes forwarded to the
/// owner and ticks followed from it arrive, exact), and the peer port refuses
/// whoever has no certificate from the pods' CA: a TLS client without one,
/// one with a certificate from another CA, a plaintext client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_links_use_mutual_tls_and_refuse_a_client_without_a_pod_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let addrs = TestCluster::addrs(2);
    let names: Vec<String> = addrs.iter().map(|p| p.peer.ip().to_string()).collect();
    let ca = TestCa::new("tickshard peers");
    let [ca_pem, cert, key] = ca.write(tmp.path(), "peer", &names);
    let c = TestCluster::start_on(
        addrs.clone(),
        &[
            "--peer-tls-cert",
            &cert,
            "--peer-tls-key",
            &key,
            "--peer-tls-ca",
            &ca_pem,
        ],
    );
    c.wait_linked().await;

    // across the mTLS link: subscribe on pod 0 to a symbol of pod 1, publish on pod 0
    let symbol = crate::cluster::owned_by(1, 2, 1).remove(0);
    let mut ws = WsConn::connect(&c.pods[0].ws_url(), WAIT).await.unwrap();
    ws.send_text(&format!(r#"{{"op":"subscribe","id":1,"symbols":["{symbol}"]}}"#))
        .await
        .unwrap();
    recv_subscribed(&mut ws).await;
    let mut p = Publisher::connect(PublisherConfig::new(vec![c.pods[0].grpc_url()], "mtls"))
        .await
        .unwrap();
    let acks = publish_all(&mut p, [tick(&symbol, 1_700_000_000_000_001, "101.125", "0.5")]).await;
    assert_eq!(acks[0].seq, 1, "forwarded to the owner over mTLS and acked");
    let ServerMsg::Tick(t) = recv(&mut ws).await else {
        panic!("a tick")
    };
    assert_eq!((t.seq, t.price.as_str(), t.size.as_str()), (1, "101.125", "0.5"));

    // the peer port refuses everyone else
    let url = format!("https://{}", addrs[1].peer);
    let ep = || Endpoint::from_shared(url.clone()).unwrap();
    let pod_identity = || Identity::from_pem(std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let ok = topology_via(ep().tls_config(tls(&ca_pem).identity(pod_identity())).unwrap()).await;
    assert_eq!(ok.map(|t| t.shard_id), Ok(1), "a pod's certificate is accepted");
    let no_cert = topology_via(ep().tls_config(tls(&ca_pem)).unwrap()).await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    let other = TestCa::new("someone else");
    let (other_cert, other_key) = other.leaf(&names);
    let foreign = topology_via(
        ep().tls_config(tls(&ca_pem).identity(Identity::from_pem(other_cert, other_key)))
            .unwrap(),
    )
    .await;
    assert!(foreign.is_err(), "a certificate of another CA: {foreign:?}");
    let plain = topology_via(Endpoint::from_shared(format!("http://{}", addrs[1].peer)).unwrap()).await;
    assert!(plain.is_err(), "plaintext: {plain:?}");
}

/// `--tls-cert`/`--tls-key`: the public gRPC port speaks TLS only, and a
/// certificate rewritten in place (cert-manager rotation) is served to new
/// connections without a restart, while a connection made before goes on.
#[tokio::test]
async fn public_grpc_is_tls_and_a_rotated_certificate_is_used_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["127.0.0.1".to_string(), "localhost".into()];
    let first = TestCa::new("first");
    let [ca1, cert, key] = first.write(tmp.path(), "server", &names);
    let srv = Server::start(&["--no-sim", "--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("https://{}", srv.grpc);
    let list = |ch: tonic::transport::Channel| async move {
        FeedClient::new(ch)
            .list_symbols(pb::ListSymbolsRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let connect = |ca: String| {
        let url = url.clone();
        async move {
            Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls(&ca))
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())
        }
    };
    let before = connect(ca1.clone()).await.expect("TLS with the first CA");
    list(before.clone()).await.expect("a call over TLS");
    let plain = match Endpoint::from_shared(srv.grpc_url()).unwrap().connect().await {
        Ok(ch) => list(ch).await,
        Err(e) => Err(e.to_string()),
    };
    assert!(plain.is_err(), "plaintext on a TLS port: {plain:?}");

    // rotate: another CA's certificate written over the same files
    let second = TestCa::new("second");
    let (cert2, key2) = second.leaf(&names);
    let ca2 = tmp.path().join("ca2.pem").display().to_string();
    std::fs::write(&ca2, second.pem()).unwrap();
    std::fs::write(&key, key2).unwrap();
    std::fs::write(&cert, cert2).unwrap();
    eventually("the rotated certificate is served", || {
        let ca2 = ca2.clone();
        let connect = &connect;
        async move {
            match connect(ca2).await {
                Ok(ch) => list(ch).await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(
        connect(ca1).await.is_err(),
        "a new connection trusting only the old CA is refused"
    );
    list(before)
        .await
        .expect("the connection made before the rotation goes on");
}

/// A rustls client configuration trusting only `ca_pem`'s certificates.
fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&std::fs::read(ca_pem).unwrap()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// With `--tls-cert`, the HTTP listener is HTTPS and WebSockets are `wss://`:
/// a client trusting the CA gets `/healthz` and live ticks over TLS (the
/// simulated market's), and a plaintext request gets nothing.
#[tokio::test]
async fn https_and_wss_on_the_http_listener() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("clients");
    let [ca_pem, cert, key] = ca.write(tmp.path(), "server", &["localhost".to_string()]);
    let srv = Server::start(&["--tls-cert", &cert, "--tls-key", &key, "--sim-rate", "500"]);
    let connector = tokio_rustls::TlsConnector::from(client_tls(&ca_pem));
    let tls = || async {
        let tcp = tokio::net::TcpStream::connect(srv.http).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap()
    };

    let mut s = tls().await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let (status, _) = crate::common::http_get(srv.http, "/healthz").await;
    assert_eq!(status, 0, "no answer in plaintext on a TLS listener");

    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls().await)
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"op":"subscribe","id":1,"symbols":["BTC-USD"]}"#,
    ))
    .await
    .unwrap();
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k: &String| k == "tick") {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] == "tick" {
            assert_eq!(v["symbol"], "BTC-USD");
        }
        kinds.push(v["type"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds[0], "subscribed", "{kinds:?}");
}
