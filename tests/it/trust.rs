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

use crate::common::{
    Server, TestCa, TestCluster, WAIT, eventually, publish_all, recv, recv_subscribed, tick, with_token,
};

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
        state: None,
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

    let mut peer = srv.peer().await;
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
            state: None,
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

// ---- JWT authentication and entitlements ----------------------------------

/// A server with an HS256 key (and `extra` flags); its secret file.
fn auth_server(extra: &[&str]) -> (Server, tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, format!("{}\n", "k".repeat(40))).unwrap();
    let s = secret.display().to_string();
    let mut args = vec!["--no-sim", "--auth-hs256-secret-file", &s];
    args.extend_from_slice(extra);
    (Server::start(&args), tmp, secret)
}

/// A token signed with `secret`, `exp` `ttl` seconds from now (negative:
/// in the past), granting these patterns.
fn token(secret: &std::path::Path, sub: &str, subscribe: &[&str], publish: &[&str], ttl: i64) -> String {
    let claims = tickshard_feed::auth::MintClaims {
        sub: sub.into(),
        exp: tickshard_feed::auth::now_secs().saturating_add_signed(ttl),
        iss: None,
        aud: None,
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        publish: publish.iter().map(|s| s.to_string()).collect(),
    };
    tickshard_feed::auth::mint_hs256(&std::fs::read(secret).unwrap(), &claims).unwrap()
}

async fn feed(srv: &Server) -> FeedClient<tonic::transport::Channel> {
    FeedClient::new(channel(srv.grpc_url()).await)
}

async fn publisher(srv: &Server, id: &str, token: Option<String>) -> Publisher {
    let mut cfg = PublisherConfig::new(vec![srv.grpc_url()], id);
    cfg.token = token;
    Publisher::connect(cfg).await.unwrap()
}

/// gRPC (contract §8): no token or a bad one (expired past the leeway,
/// another key, another issuer) is UNAUTHENTICATED; a symbol the token does
/// not grant is PERMISSION_DENIED for reads and a `forbidden` ack for a
/// publish, after which the stream goes on; failures are counted.
#[tokio::test]
async fn grpc_calls_need_a_valid_token_and_the_right_symbols() {
    let (srv, tmp, secret) = auth_server(&["--auth-issuer", "tickshard-test", "--auth-audience", "feed"]);
    let mut f = feed(&srv).await;
    let e = f.list_symbols(pb::ListSymbolsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "no token: {e}");

    let other = tmp.path().join("other");
    std::fs::write(&other, "o".repeat(40)).unwrap();
    let good = {
        let claims = tickshard_feed::auth::MintClaims {
            sub: "desk-7".into(),
            exp: tickshard_feed::auth::now_secs() + 600,
            iss: Some("tickshard-test".into()),
            aud: Some("feed".into()),
            subscribe: vec!["BTC-*".into()],
            publish: vec!["BTC-USD".into()],
        };
        tickshard_feed::auth::mint_hs256(&std::fs::read(&secret).unwrap(), &claims).unwrap()
    };
    let mint = |secret: &std::path::Path, iss: Option<&str>, aud: Option<&str>, ttl: i64| {
        let claims = tickshard_feed::auth::MintClaims {
            sub: "x".into(),
            exp: tickshard_feed::auth::now_secs().saturating_add_signed(ttl),
            iss: iss.map(Into::into),
            aud: aud.map(Into::into),
            subscribe: vec!["*".into()],
            publish: vec![],
        };
        tickshard_feed::auth::mint_hs256(&std::fs::read(secret).unwrap(), &claims).unwrap()
    };
    let (iss, aud) = (Some("tickshard-test"), Some("feed"));
    // a token without `exp`, signed with the right key
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "x", "iss": "tickshard-test", "aud": "feed", "tickshard": {"subscribe": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret("k".repeat(40).as_bytes()),
    )
    .unwrap();
    f.list_symbols(with_token(pb::ListSymbolsRequest {}, &mint(&secret, iss, aud, -20)))
        .await
        .expect("expired 20 s ago: within the 30 s leeway");
    for (what, bad) in [
        ("expired past the leeway", mint(&secret, iss, aud, -100)),
        ("another key", mint(&other, iss, aud, 600)),
        ("another issuer", mint(&secret, Some("someone-else"), aud, 600)),
        ("no issuer", mint(&secret, None, aud, 600)),
        ("another audience", mint(&secret, iss, Some("other"), 600)),
        ("no audience", mint(&secret, iss, None, 600)),
        ("no exp", no_exp),
        ("not a JWT", "abc.def".to_string()),
    ] {
        let e = f
            .list_symbols(with_token(pb::ListSymbolsRequest {}, &bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e}");
    }
    let e = match Publisher::connect(PublisherConfig::new(vec![srv.grpc_url()], "anon")).await {
        Ok(_) => panic!("an anonymous publish stream must be refused"),
        // (final: no retry without a token can fix it)
        Err(e @ tickshard_client::ClientError::Refused(_)) => e.to_string(),
        Err(e) => panic!("refused, not {e:?}"),
    };
    assert!(e.contains("a token is required to publish"), "{e}");

    // entitled: BTC-USD published, ETH-USD forbidden (the stream goes on)
    let mut p = publisher(&srv, "feed-1", Some(good.clone())).await;
    for t in [
        tick("BTC-USD", 1_700_000_000_000_001, "64000.5", "0.25"),
        tick("ETH-USD", 1_700_000_000_000_002, "3000.1", "1"),
        tick("BTC-USD", 1_700_000_000_000_003, "64001.5", "0.5"),
    ] {
        p.send(t).await.unwrap();
    }
    let mut acks = tokio::time::timeout(WAIT, p.flush()).await.unwrap().unwrap();
    acks.sort_by_key(|a| a.request_id);
    assert_eq!((acks[0].seq, acks[0].error.as_ref().map(|e| e.0.as_str())), (1, None));
    assert_eq!(
        acks[1].error.as_ref().map(|e| e.0.as_str()),
        Some("forbidden"),
        "{:?}",
        acks[1]
    );
    assert_eq!((acks[2].seq, acks[2].error.as_ref().map(|e| e.0.as_str())), (2, None));

    let snap = f
        .get_snapshot(with_token(
            pb::SnapshotRequest {
                symbols: vec!["BTC-USD".into()],
            },
            &good,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.snapshots[0].last.as_ref().unwrap().price, "64001.5");
    let e = f
        .get_snapshot(with_token(
            pb::SnapshotRequest {
                symbols: vec!["BTC-USD".into(), "ETH-USD".into()],
            },
            &good,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("ETH-USD"), "{e}");
    let e = f
        .subscribe(with_token(
            pb::SubscribeRequest {
                symbols: vec!["ETH-USD".into()],
                ..Default::default()
            },
            &good,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let listed = f
        .list_symbols(with_token(pb::ListSymbolsRequest {}, &good))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.symbols.iter().map(|s| s.symbol.as_str()).collect();
    assert_eq!(names, ["BTC-USD"], "only the symbols the caller may read");
    assert!(srv.metric("tickshard_auth_failures_total").await >= 5.0);
    assert!(srv.metric("tickshard_forbidden_total").await >= 3.0);
}

/// De-duplication is keyed by `(sub, publisher_id, symbol)` when
/// authenticated: two callers using the same `publisher_id` and seqs do not
/// shadow each other, and each one's retry is still a duplicate.
#[tokio::test]
async fn callers_do_not_shadow_each_others_publisher_ids() {
    let (srv, _tmp, secret) = auth_server(&[]);
    let a = token(&secret, "desk-a", &[], &["DD-*"], 600);
    let b = token(&secret, "desk-b", &[], &["DD-*"], 600);
    let mut f = feed(&srv).await;
    let one = |t: &str, price: &str| {
        let req = pb::PublishRequest {
            request_id: 1,
            publisher_id: "shared-id".into(),
            publisher_seq: 1,
            tick: Some(tick("DD-1", 1_700_000_000_000_001, price, "1")),
        };
        with_token(futures_util::stream::iter(vec![req]), t)
    };
    let ack = |r| {
        let mut f = f.clone();
        async move {
            let mut s = f.publish(r).await.unwrap().into_inner();
            s.message().await.unwrap().unwrap()
        }
    };
    let first = ack(one(&a, "1.5")).await;
    let second = ack(one(&b, "2.5")).await;
    let again = ack(one(&a, "1.5")).await;
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!(
        (second.seq, second.duplicate),
        (2, false),
        "another caller, same publisher_id: not a duplicate"
    );
    assert_eq!((again.seq, again.duplicate), (1, true), "the same caller's retry is");
    let _ = &mut f;
}

async fn recv_json(c: &mut WsConn) -> serde_json::Value {
    match crate::common::recv_any(c).await {
        tickshard_client::ws::Incoming::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A raw upgrade request; the HTTP status of the answer.
async fn upgrade_status(addr: std::net::SocketAddr, path: &str, headers: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn ws(srv: &Server, token: Option<&str>) -> WsConn {
    let opts = tickshard_client::ws::ConnectOpts {
        token: token.map(str::to_owned),
        ..Default::default()
    };
    WsConn::connect_with(&srv.ws_url(), WAIT, opts).await.unwrap()
}

/// WebSocket (contract §8): a bad token on the upgrade (header or query) is
/// HTTP 401; without one, only `auth` and `ping` are served; `auth` answers
/// `authed` or `unauthorized` (keeping what the connection had); a subscribe
/// naming a symbol not granted is `forbidden` whole; a refresh must grant
/// every subscribed symbol; `--allowed-origins` refuses others with 403.
#[tokio::test]
async fn websocket_tokens_auth_op_refresh_and_origins() {
    let (srv, _tmp, secret) = auth_server(&["--allowed-origins", "https://desk.example.com"]);
    let btc = token(&secret, "desk-7", &["BTC-*"], &[], 600);
    let eth_only = token(&secret, "desk-7", &["ETH-*"], &[], 600);
    let expired = token(&secret, "desk-7", &["*"], &[], -100);
    assert_eq!(
        upgrade_status(srv.http, "/ws", "Authorization: Bearer not-a-jwt\r\n").await,
        401
    );
    assert_eq!(upgrade_status(srv.http, &format!("/ws?token={expired}"), "").await, 401);
    assert_eq!(upgrade_status(srv.http, &format!("/ws?token={btc}"), "").await, 101);
    assert_eq!(
        upgrade_status(srv.http, "/ws", "Origin: https://evil.example\r\n").await,
        403
    );
    assert_eq!(
        upgrade_status(srv.http, "/ws", "Origin: https://desk.example.com\r\n").await,
        101
    );

    let mut c = ws(&srv, None).await;
    c.send_text(r#"{"op":"subscribe","id":1,"symbols":["BTC-USD"]}"#)
        .await
        .unwrap();
    let m = recv_json(&mut c).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_str(), m["id"].as_i64()),
        (Some("error"), Some("unauthorized"), Some(1))
    );
    c.send_text(r#"{"op":"ping","id":2}"#).await.unwrap();
    assert_eq!(recv_json(&mut c).await["type"], "pong");
    c.send_text(r#"{"op":"auth","id":3,"token":"nonsense"}"#).await.unwrap();
    assert_eq!(recv_json(&mut c).await["code"], "unauthorized");
    c.send_text(&format!(r#"{{"op":"auth","id":4,"token":"{btc}"}}"#))
        .await
        .unwrap();
    let m = recv_json(&mut c).await;
    assert_eq!(
        (m["type"].as_str(), m["id"].as_i64(), m["sub"].as_str()),
        (Some("authed"), Some(4), Some("desk-7"))
    );
    assert!(m["exp"].as_u64().unwrap() > tickshard_feed::auth::now_secs());
    c.send_text(r#"{"op":"subscribe","id":5,"symbols":["BTC-USD","ETH-USD"]}"#)
        .await
        .unwrap();
    let m = recv_json(&mut c).await;
    assert_eq!(m["code"], "forbidden", "{m}");
    assert!(m["message"].as_str().unwrap().contains("ETH-USD"), "{m}");
    c.send_text(r#"{"op":"subscribe","id":6,"symbols":["BTC-USD"]}"#)
        .await
        .unwrap();
    assert_eq!(recv_json(&mut c).await["type"], "subscribed");
    // a refresh that does not cover BTC-USD is refused; the old token stays
    c.send_text(&format!(r#"{{"op":"auth","id":7,"token":"{eth_only}"}}"#))
        .await
        .unwrap();
    let m = recv_json(&mut c).await;
    assert_eq!(m["code"], "forbidden", "{m}");
    assert!(m["message"].as_str().unwrap().contains("BTC-USD"), "{m}");
    // ... and so is an expired one (unauthorized: the connection stays)
    c.send_text(&format!(r#"{{"op":"auth","id":8,"token":"{expired}"}}"#))
        .await
        .unwrap();
    let m = recv_json(&mut c).await;
    assert_eq!(m["code"], "unauthorized", "{m}");
    assert!(m["message"].as_str().unwrap().contains("expired"), "{m}");
    // the connection still works with what it had
    let mut p = publisher(
        &srv,
        "p",
        Some(token(&secret, "pub", &[], &["BTC-USD", "ETH-USD"], 600)),
    )
    .await;
    publish_all(
        &mut p,
        [
            tick("ETH-USD", 1_700_000_000_000_001, "3000.5", "1"),
            tick("BTC-USD", 1_700_000_000_000_001, "64000.25", "1"),
        ],
    )
    .await;
    loop {
        let m = recv_json(&mut c).await;
        if m["type"] == "tick" {
            assert_eq!(
                (m["symbol"].as_str(), m["price"].as_str()),
                (Some("BTC-USD"), Some("64000.25"))
            );
            break;
        }
    }
    // `symbols` lists what the token may read
    c.send_text(r#"{"op":"symbols","id":9}"#).await.unwrap();
    loop {
        let m = recv_json(&mut c).await;
        if m["type"] == "symbols" {
            assert_eq!(m["symbols"], serde_json::json!(["BTC-USD"]), "{m}");
            break;
        }
    }
    // the candles API takes the same token (header or ?token=)
    let candles = |q: String| {
        let addr = srv.http;
        async move { crate::common::http_get(addr, &format!("/api/candles?{q}")).await.0 }
    };
    assert_eq!(candles("symbol=BTC-USD".into()).await, 401);
    assert_eq!(candles(format!("symbol=ETH-USD&token={btc}")).await, 403);
    assert_eq!(candles(format!("symbol=BTC-USD&token={btc}")).await, 200);
    assert_eq!(candles(format!("symbol=BTC-USD&token={expired}")).await, 401);
}

/// A connection that cannot read and sends no valid token for 10 s is
/// closed with 1008; one whose token lapses (exp + 30 s leeway) gets
/// `token_expired` and 1008; a gRPC stream whose token lapses ends with
/// UNAUTHENTICATED.
#[tokio::test]
async fn unauthenticated_and_expired_connections_are_closed() {
    let (srv, _tmp, secret) = auth_server(&[]);
    // valid for about 3 more seconds (exp 27 s ago, 30 s leeway)
    let short = token(&secret, "desk-7", &["*"], &[], -27);
    let long = token(&secret, "desk-7", &["*"], &["*"], 600);
    let mut silent = ws(&srv, None).await;
    let mut lapsing = ws(&srv, Some(&short)).await;
    // refreshed before it lapses: stays open
    let mut refreshed = ws(&srv, Some(&short)).await;
    refreshed
        .send_text(&format!(r#"{{"op":"auth","id":1,"token":"{long}"}}"#))
        .await
        .unwrap();
    assert_eq!(recv_json(&mut refreshed).await["type"], "authed");
    // a publish stream whose token lapses ends UNAUTHENTICATED
    let (_keep, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(1);
    let mut acks = feed(&srv)
        .await
        .publish(with_token(tokio_stream_from(rx), &short))
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let mut stream = feed(&srv)
        .await
        .subscribe(with_token(
            pb::SubscribeRequest {
                symbols: vec!["EXP-1".into()],
                ..Default::default()
            },
            &short,
        ))
        .await
        .unwrap()
        .into_inner();
    lapsing
        .send_text(r#"{"op":"subscribe","id":1,"symbols":["EXP-1"]}"#)
        .await
        .unwrap();
    assert_eq!(recv_json(&mut lapsing).await["type"], "subscribed");
    loop {
        let m = recv_json(&mut lapsing).await;
        if m["type"] == "error" {
            assert_eq!(m["code"], "token_expired", "{m}");
            break;
        }
    }
    assert_eq!(crate::common::recv_close(&mut lapsing).await, 1008);
    let end = loop {
        match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unauthenticated);
    let end = tokio::time::timeout(WAIT, acks.message()).await.unwrap();
    assert_eq!(
        end.unwrap_err().code(),
        tonic::Code::Unauthenticated,
        "the publish stream ends too"
    );
    refreshed.send_text(r#"{"op":"ping","id":2}"#).await.unwrap();
    assert_eq!(
        recv_json(&mut refreshed).await["type"],
        "pong",
        "the refreshed connection lives on"
    );
    let m = recv_json(&mut silent).await;
    assert_eq!(m["code"], "unauthorized", "{m}");
    assert_eq!(crate::common::recv_close(&mut silent).await, 1008);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(9),
        "not before 10 s"
    );
}

/// `--anonymous`: without a key anyone may read and publish; with a key and
/// `subscribe`, callers without a token read everything but may not publish.
#[tokio::test]
async fn anonymous_modes() {
    let open = Server::start(&["--no-sim"]);
    let mut p = publisher(&open, "anon", None).await;
    let acks = publish_all(&mut p, [tick("AN-1", 1_700_000_000_000_001, "1.25", "1")]).await;
    assert_eq!(acks[0].seq, 1);

    let (srv, _tmp, secret) = auth_server(&["--anonymous", "subscribe"]);
    let mut c = ws(&srv, None).await;
    c.send_text(r#"{"op":"subscribe","id":1,"symbols":["AN-1"]}"#)
        .await
        .unwrap();
    assert_eq!(recv_json(&mut c).await["type"], "subscribed");
    let e = Publisher::connect(PublisherConfig::new(vec![srv.grpc_url()], "anon")).await;
    assert!(e.is_err(), "publishing needs a token in subscribe mode");
    let mut p = publisher(&srv, "p", Some(token(&secret, "pub", &[], &["AN-*"], 600))).await;
    assert_eq!(
        publish_all(&mut p, [tick("AN-1", 1_700_000_000_000_002, "1.5", "1")]).await[0].seq,
        1
    );
}

/// The verification key is re-read when its file changes: after a
/// rotation, tokens of the new secret are accepted and the old ones refused.
#[tokio::test]
async fn a_rotated_key_file_is_used_without_a_restart() {
    let (srv, tmp, secret) = auth_server(&[]);
    let old = token(&secret, "a", &["*"], &[], 600);
    let mut f = feed(&srv).await;
    f.list_symbols(with_token(pb::ListSymbolsRequest {}, &old))
        .await
        .unwrap();
    let next = tmp.path().join("next");
    std::fs::write(&next, "n".repeat(48)).unwrap();
    let new = token(&next, "a", &["*"], &[], 600);
    std::fs::rename(&next, &secret).unwrap();
    eventually("the new key is used", || {
        let (mut f, new) = (f.clone(), new.clone());
        async move {
            f.list_symbols(with_token(pb::ListSymbolsRequest {}, &new))
                .await
                .is_ok()
        }
    })
    .await;
    let e = f
        .list_symbols(with_token(pb::ListSymbolsRequest {}, &old))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

/// base64url without padding (JWK members).
fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn jwt(alg: jsonwebtoken::Algorithm, kid: &str, key: &jsonwebtoken::EncodingKey, sub: &str) -> String {
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.into());
    let claims = serde_json::json!({
        "sub": sub,
        "exp": tickshard_feed::auth::now_secs() + 600,
        "tickshard": {"subscribe": ["*"]},
    });
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

/// `--auth-jwks`: ES256 and EdDSA public keys, chosen by `kid`, verify
/// tokens; a token signed by another key under a known `kid`, an unknown
/// `kid`, and an HS256 token made with the JWKS text as its secret (algorithm
/// confusion) are all UNAUTHENTICATED.
#[tokio::test]
async fn jwks_keys_verify_es256_and_eddsa_tokens_by_kid() {
    let tmp = tempfile::tempdir().unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let point = ec.public_key_raw(); // 0x04 || x || y
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
         "x": b64url(&point[1..33]), "y": b64url(&point[33..65])},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA", "use": "sig",
         "x": b64url(ed.public_key_raw())},
    ]})
    .to_string();
    let path = tmp.path().join("jwks.json");
    std::fs::write(&path, &jwks).unwrap();
    // an HS256 secret too: a token made with the (public) JWKS text as its
    // HMAC secret must not verify against any key
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "h".repeat(40)).unwrap();
    let srv = Server::start(&[
        "--no-sim",
        "--auth-jwks",
        &path.display().to_string(),
        "--auth-hs256-secret-file",
        &secret.display().to_string(),
    ]);
    let mut f = feed(&srv).await;
    let ask = |t: String| {
        let mut f = f.clone();
        async move {
            f.list_symbols(with_token(pb::ListSymbolsRequest {}, &t))
                .await
                .map(|_| ())
        }
    };
    use jsonwebtoken::{Algorithm, EncodingKey};
    let ec_key = EncodingKey::from_ec_der(&ec.serialize_der());
    let ed_key = EncodingKey::from_ed_der(&ed.serialize_der());
    ask(jwt(Algorithm::ES256, "ec-1", &ec_key, "a"))
        .await
        .expect("ES256 by kid");
    ask(jwt(Algorithm::EdDSA, "ed-1", &ed_key, "b"))
        .await
        .expect("EdDSA by kid");
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = jwt(
        Algorithm::ES256,
        "ec-1",
        &EncodingKey::from_ec_der(&stranger.serialize_der()),
        "c",
    );
    let unknown = jwt(Algorithm::ES256, "ec-9", &ec_key, "d");
    let confused = jwt(
        Algorithm::HS256,
        "ec-1",
        &EncodingKey::from_secret(jwks.as_bytes()),
        "e",
    );
    for (what, t) in [
        ("another key", forged),
        ("unknown kid", unknown),
        ("HS256 with the JWKS as secret", confused),
    ] {
        let e = ask(t).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e}");
    }
    let _ = f.list_symbols(pb::ListSymbolsRequest {}).await.expect_err("no token");
}

/// A receiver as a stream of requests (the stream stays open while the
/// sender lives).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Through a non-owner pod: a publish is checked where it enters (forbidden
/// ack for a symbol not granted) and forwarded to the owner with the caller's
/// scope, so two callers sharing a `publisher_id` do not shadow each other
/// there either, and a caller's retry is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlements_and_scoped_dedup_hold_across_a_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "c".repeat(40)).unwrap();
    let s = secret.display().to_string();
    let c = TestCluster::start(2, &["--auth-hs256-secret-file", &s]);
    c.wait_linked().await;
    let owned = crate::cluster::owned_by(1, 2, 2);
    let (sym, other) = (owned[0].clone(), owned[1].clone());
    let a = token(&secret, "desk-a", &[], &[&sym], 600);
    let b = token(&secret, "desk-b", &[], &[&sym], 600);
    let f = FeedClient::new(channel(c.pods[0].grpc_url()).await);
    let one = |t: String, sym: String, price: &'static str| {
        let req = pb::PublishRequest {
            request_id: 1,
            publisher_id: "shared-id".into(),
            publisher_seq: 1,
            tick: Some(tick(&sym, 1_700_000_000_000_001, price, "1")),
        };
        let mut f = f.clone();
        async move {
            let mut s = f
                .publish(with_token(futures_util::stream::iter(vec![req]), &t))
                .await
                .unwrap()
                .into_inner();
            s.message().await.unwrap().unwrap()
        }
    };
    let first = one(a.clone(), sym.clone(), "1.5").await;
    let second = one(b.clone(), sym.clone(), "2.5").await;
    let again = one(a.clone(), sym.clone(), "1.5").await;
    let refused = one(a, other, "3.5").await;
    assert_eq!((first.seq, first.duplicate, first.error), (1, false, None));
    assert_eq!((second.seq, second.duplicate), (2, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    assert_eq!(refused.error.map(|e| e.code), Some("forbidden".to_string()));
}

/// The sub-commands against a server with TLS and tokens: `publish` over
/// `https://` with `--ca-cert` and `--token` (refused without the CA), and
/// `tail` over `wss://` printing the tick, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_take_a_token_and_a_ca_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("clients");
    let [ca_pem, cert, key] = ca.write(tmp.path(), "server", &["127.0.0.1".to_string(), "localhost".into()]);
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "t".repeat(40)).unwrap();
    let s = secret.display().to_string();
    let srv = Server::start(&[
        "--no-sim",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-hs256-secret-file",
        &s,
    ]);
    let t = token(&secret, "ops", &["CLI-*"], &["CLI-*"], 600);
    let file = tmp.path().join("ticks.csv");
    std::fs::write(&file, "symbol,ts,price,size\nCLI-1,1700000000000001,12.3400,5\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_tickshard");
    let grpc = format!("https://{}", srv.grpc);
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(bin).args(&args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let f = file.display().to_string();
    let (ok, out) = run(vec![
        "publish".into(),
        f.clone(),
        "--grpc".into(),
        grpc.clone(),
        "--token".into(),
        t.clone(),
    ]);
    assert!(
        !ok && out.contains("--ca-cert"),
        "TLS without a CA is refused with a hint: {out}"
    );
    let (ok, out) = run(vec![
        "publish".into(),
        f,
        "--grpc".into(),
        grpc,
        "--token".into(),
        t.clone(),
        "--ca-cert".into(),
        ca_pem.clone(),
    ]);
    assert!(ok && out.contains("1 accepted"), "{out}");
    let wss = format!("wss://localhost:{}/ws", srv.http.port());
    let (ok, out) = run(vec![
        "tail".into(),
        "CLI-1".into(),
        "--url".into(),
        wss,
        "--token".into(),
        t,
        "--ca-cert".into(),
        ca_pem,
        "--count".into(),
        "1".into(),
        "--json".into(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("\"price\":\"12.3400\""), "{out}");
}
