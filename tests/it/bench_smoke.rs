//! The load generator runs against a real server (seconds, not a timed
//! assertion): it must connect, publish, receive every tick without a gap and
//! report it, so it cannot rot between benchmark runs.

use std::process::Command;

use crate::common::*;

#[test]
fn the_load_generator_runs_end_to_end() {
    let srv = Server::start(&["--no-sim"]);
    let out = Command::new(env!("CARGO_BIN_EXE_tickshard"))
        .args([
            "bench",
            "--json",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--subscribers",
            "20",
            "--symbols",
            "4",
        ])
        .args(["--rate", "2000", "--publishers", "1", "--source-ips", "2"])
        .args([
            "--ws",
            &srv.ws_url(),
            "--grpc",
            &srv.grpc_url(),
            "--server-pid",
            &srv.pid().to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = String::from_utf8(out.stdout).unwrap();
    let num = |key: &str| -> f64 {
        let at = json
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            + key.len()
            + 3;
        json[at..].split([',', '}']).next().unwrap().parse().unwrap()
    };
    assert_eq!(num("subscribers"), 20.0);
    assert!(num("published") > 0.0, "{json}");
    assert!(num("deliveries") > 0.0, "{json}");
    assert_eq!(num("gaps"), 0.0, "{json}");
    assert!(
        json.contains("\"server_cpu_pct\":") && !json.contains("\"server_cpu_pct\":null"),
        "{json}"
    );
}

/// The dashboard workload's shape (W7): watchlists drawn by popularity, each
/// tick's symbol drawn the same way, several publish streams; every
/// subscriber's sequence is gapless and the owed deliveries are counted.
#[test]
fn the_load_generator_runs_the_watchlist_workload() {
    let srv = Server::start(&["--no-sim"]);
    let out = Command::new(env!("CARGO_BIN_EXE_tickshard"))
        .args(["bench", "--json", "--duration", "1", "--warmup", "0"])
        .args(["--subscribers", "20", "--symbols", "200", "--watchlist", "5"])
        .args(["--zipf", "1.1", "--seed", "3", "--rate", "400", "--publishers", "3"])
        .args(["--ws", &srv.ws_url(), "--grpc", &srv.grpc_url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = String::from_utf8(out.stdout).unwrap();
    let num = |key: &str| -> f64 {
        let at = json
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            + key.len()
            + 3;
        json[at..].split([',', '}']).next().unwrap().parse().unwrap()
    };
    assert_eq!(num("subscribers"), 20.0);
    assert!(num("owed") > 0.0, "{json}");
    assert!(num("deliveries") > 0.0, "{json}");
    assert_eq!(num("gaps"), 0.0, "{json}");
}
