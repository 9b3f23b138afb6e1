//! A StatefulSet in miniature: three containers of the real image, named and
//! hostnamed `tickshard-0..2`, with the env the manifests set, a volume each,
//! on a private Docker network, reached only through ports published on
//! 127.0.0.1. Then what `kubectl rollout restart` does (replace the highest
//! ordinal first, stop with the grace period, start on the same volume, wait
//! for /readyz), a canary of a new image tag on the highest ordinal only, and a
//! kill -9 of a container — each under load, checked by the same driver as the
//! process cluster tests.
//!
//! The set runs as the `prod` overlay does (contract §8): peers over mutual
//! TLS (a CA and a certificate for `tickshard-0..2` made in the test, mounted
//! read-only), tokens required (`--anonymous none`, an HS256 secret); the load
//! driver publishes and subscribes with a token.
//!
//! Needs a Docker engine and the image: `.ci/docker.sh` builds it and runs
//! `TICKSHARD_IMAGE=tickshard:ci cargo test --test it docker -- --ignored`.

use std::{process::Command, time::Duration};

use crate::{cluster::rollout_under_load, common::*};

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct DockerSet {
    id: String,
    image: String,
    n: usize,
    /// CA, peer certificate and key, HS256 secret: mounted at /etc/tickshard.
    secrets: tempfile::TempDir,
}

/// A token for the load driver: read and publish everything.
fn driver_token(secrets: &std::path::Path) -> String {
    let claims = tickshard_feed::auth::MintClaims {
        sub: "load-driver".into(),
        exp: tickshard_feed::auth::now_secs() + 3_600,
        iss: None,
        aud: None,
        subscribe: vec!["*".into()],
        publish: vec!["*".into()],
    };
    tickshard_feed::auth::mint_hs256(&std::fs::read(secrets.join("secret")).unwrap(), &claims).unwrap()
}

impl DockerSet {
    fn name(&self, i: usize) -> String {
        format!("ts-{}-{i}", self.id)
    }

    fn http(&self, i: usize) -> String {
        format!("127.0.0.1:{}", 28080 + i)
    }

    fn grpc(&self, i: usize) -> String {
        format!("127.0.0.1:{}", 28051 + i)
    }

    fn start(image: &str, n: usize) -> DockerSet {
        let secrets = tempfile::tempdir().unwrap();
        // (one more pod than the set: the scale test adds it)
        let names: Vec<String> = (0..=n).map(|i| format!("tickshard-{i}")).collect();
        TestCa::new("tickshard peers (docker test)").write(secrets.path(), "peer", &names);
        std::fs::write(secrets.path().join("secret"), "d".repeat(48)).unwrap();
        // readable by the image's non-root user
        use std::os::unix::fs::PermissionsExt as _;
        for e in std::fs::read_dir(secrets.path()).unwrap() {
            std::fs::set_permissions(e.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let set = DockerSet {
            id: format!("{:08x}", fastrand::u32(..)),
            image: image.to_string(),
            n,
            secrets,
        };
        docker(&["network", "create", &format!("ts-net-{}", set.id)]);
        for i in 0..n {
            docker(&["volume", "create", &set.name(i)]);
            set.run(i, image);
        }
        set
    }

    /// `kubectl exec tickshard-<i> -- tickshard <args>`: (success, stderr).
    fn exec(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new("docker")
            .args(["exec", &self.name(i), "tickshard"])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `docker run` pod `i` as the StatefulSet would: hostname = pod name, the
    /// manifests' env and security context, its own volume.
    fn run(&self, i: usize, image: &str) {
        let (name, host, shards) = (self.name(i), format!("tickshard-{i}"), self.n.to_string());
        let (http, grpc) = (format!("{}:8080", self.http(i)), format!("{}:50051", self.grpc(i)));
        let volume = format!("{name}:/data");
        let secrets = format!("{}:/etc/tickshard:ro", self.secrets.path().display());
        let net = format!("ts-net-{}", self.id);
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &host,
            "--network",
            &net,
            "--network-alias",
            &host,
            "-v",
            &volume,
            "-v",
            &secrets,
            "-p",
            &http,
            "-p",
            &grpc,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-e",
            &format!("POD_NAME={host}"),
            "-e",
            &format!("TICKSHARD_SHARDS={shards}"),
            "-e",
            "TICKSHARD_PEERS=https://tickshard-{}:50052",
            "-e",
            "TICKSHARD_PEER_TLS_CERT=/etc/tickshard/peer.crt",
            "-e",
            "TICKSHARD_PEER_TLS_KEY=/etc/tickshard/peer.key",
            "-e",
            "TICKSHARD_PEER_TLS_CA=/etc/tickshard/ca.pem",
            "-e",
            "TICKSHARD_AUTH_HS256_SECRET_FILE=/etc/tickshard/secret",
            "-e",
            "TICKSHARD_ANONYMOUS=none",
            "-e",
            "TICKSHARD_DATA_DIR=/data",
            "-e",
            "TICKSHARD_NO_SIM=true",
            "-e",
            "TICKSHARD_DRAIN_MS=5000",
            "-e",
            "TICKSHARD_LOG=info",
            "-e",
            "TOKIO_WORKER_THREADS=2",
            image,
        ]);
    }

    async fn ready(&self, i: usize) {
        let addr = self.http(i).parse().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while http_get_quiet(addr, "/readyz").await != Some(200) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready:\n{}",
                self.name(i),
                docker(&["logs", "--tail", "30", &self.name(i)])
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What `kubectl rollout restart` does to one pod: stop within the grace
    /// period (SIGTERM, then SIGKILL after 30 s), recreate on the same volume.
    async fn replace(&self, i: usize, image: &str) {
        docker(&["stop", "-t", "30", &self.name(i)]);
        let status = docker(&["inspect", "-f", "{{.State.ExitCode}}", &self.name(i)]);
        assert_eq!(status, "0", "{} must exit 0 after SIGTERM", self.name(i));
        docker(&["rm", &self.name(i)]);
        self.run(i, image);
        self.ready(i).await;
    }

    async fn kill9(&self, i: usize) {
        docker(&["kill", "-s", "KILL", &self.name(i)]);
        docker(&["start", &self.name(i)]);
        self.ready(i).await;
    }

    fn ws_urls(&self) -> Vec<String> {
        (0..self.n).map(|i| format!("ws://{}/ws", self.http(i))).collect()
    }

    fn grpc_urls(&self) -> Vec<String> {
        (0..self.n).map(|i| format!("http://{}", self.grpc(i))).collect()
    }
}

impl Drop for DockerSet {
    fn drop(&mut self) {
        for i in 0..=self.n {
            if std::thread::panicking() {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "40", &self.name(i)])
                    .output();
                if let Ok(l) = logs {
                    eprintln!("---- {} ----\n{}", self.name(i), String::from_utf8_lossy(&l.stderr));
                }
            }
            let _ = Command::new("docker").args(["rm", "-f", "-v", &self.name(i)]).output();
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", &self.name(i)])
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("ts-net-{}", self.id)])
            .output();
        let _ = Command::new("docker")
            .args(["image", "rm", &format!("{}-canary", self.image)])
            .output();
    }
}

/// Status of a GET, or None if the server does not answer (yet).
async fn http_get_quiet(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf).split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the image; run by .ci/docker.sh"]
async fn a_statefulset_in_miniature_rolls_out_without_loss() {
    let image = std::env::var("TICKSHARD_IMAGE").expect("TICKSHARD_IMAGE names the image under test");
    let set = DockerSet::start(&image, 3);
    for i in 0..3 {
        set.ready(i).await;
    }
    // peer links up on every pod (metrics through the published ports)
    for i in 0..3 {
        let addr: std::net::SocketAddr = set.http(i).parse().unwrap();
        eventually("peer links up", || async {
            let (_, m) = http_get(addr, "/metrics").await;
            m.lines()
                .filter(|l| l.starts_with("tickshard_peer_up") && l.ends_with(" 1"))
                .count()
                == 2
        })
        .await;
    }
    let (ws, grpc) = (set.ws_urls(), set.grpc_urls());
    let token = Some(driver_token(set.secrets.path()));

    // 1. kubectl rollout restart: highest ordinal first
    let gap = rollout_under_load(
        ws.clone(),
        grpc.clone(),
        "ROLLOUT",
        30,
        &[2, 1, 0],
        token.clone(),
        async |i| set.replace(i, &image).await,
    )
    .await;
    eprintln!("docker rollout restart: max client-visible gap {} ms", gap.as_millis());

    // 2. canary: a new image tag, only on the highest ordinal
    let canary = format!("{image}-canary");
    docker(&["tag", &image, &canary]);
    let gap = rollout_under_load(ws.clone(), grpc.clone(), "CANARY", 30, &[2], token.clone(), async |i| {
        set.replace(i, &canary).await
    })
    .await;
    let running = docker(&["inspect", "-f", "{{.Config.Image}}", &set.name(2)]);
    assert_eq!(running, canary, "tickshard-2 runs the canary");
    assert_eq!(
        docker(&["inspect", "-f", "{{.Config.Image}}", &set.name(1)]),
        image,
        "the others do not"
    );
    eprintln!("docker canary: max client-visible gap {} ms", gap.as_millis());

    // 3. kill -9 of a container, restarted in place
    let gap = rollout_under_load(ws.clone(), grpc.clone(), "KILL", 30, &[1], token.clone(), async |i| {
        set.kill9(i).await
    })
    .await;
    eprintln!("docker kill -9: max client-visible gap {} ms", gap.as_millis());

    // 4. kubectl scale 3 -> 4 and the rebalance, then the rebalance back to 3
    // and kubectl scale 4 -> 3 (statefulset/README.md, "Scaling"), under load:
    // the new pod runs the manifests' env (TICKSHARD_SHARDS=3) and follows
    // the cluster; `tickshard admin` runs in a pod with its peer mTLS.
    let gap = rollout_under_load(ws, grpc, "SCALE", 40, &[0], token, async |_| {
        set.run(3, &image);
        set.ready(3).await;
        let (ok, err) = set.exec(0, &["admin", "rebalance", "--shards", "4", "--timeout", "120s"]);
        assert!(ok, "rebalance 3 -> 4: {err}");
        let (ok, err) = set.exec(3, &["admin", "rebalance", "--shards", "3", "--timeout", "120s"]);
        assert!(ok, "rebalance 4 -> 3: {err}");
        docker(&["stop", "-t", "30", &set.name(3)]);
        let status = docker(&["inspect", "-f", "{{.State.ExitCode}}", &set.name(3)]);
        assert_eq!(status, "0", "the removed pod exits 0");
    })
    .await;
    let (ok, out) = {
        let o = Command::new("docker")
            .args(["exec", &set.name(1), "tickshard", "admin", "status", "--json"])
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert!(
        ok && out.starts_with(r#"{"committed_shards":3,"target_shards":null"#),
        "{out}"
    );
    eprintln!(
        "docker scale 3 -> 4 -> 3: max client-visible gap {} ms",
        gap.as_millis()
    );
}
