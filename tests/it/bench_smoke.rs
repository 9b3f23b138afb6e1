//! The load generator runs against a real server (seconds, not a timed
//! assertion): it must connect, publish, receive every tick without a gap and
//! report it, so it cannot rot between benchmark runs.

use std::process::Command;

use crate::common::*;

/// Runs `tickshard bench --json` against `srv` with `args` (20
/// subscribers); checks what every run must show (every subscriber
/// connected, deliveries made, no gap) and returns a lookup of the report's
/// numbers and the report.
fn bench(srv: &Server, args: &str) -> (impl Fn(&str) -> f64, String) {
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
        ])
        .args(args.split_whitespace())
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
    let report = json.clone();
    let num = move |key: &str| -> f64 {
        let at = json
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            + key.len()
            + 3;
        json[at..].split([',', '}']).next().unwrap().parse().unwrap()
    };
    assert_eq!(num("subscribers"), 20.0);
    assert!(num("deliveries") > 0.0, "{report}");
    assert_eq!(num("gaps"), 0.0, "{report}");
    (num, report)
}

#[test]
fn the_load_generator_runs_end_to_end() {
    let srv = Server::start(&["--no-sim"]);
    let (num, json) = bench(&srv, "--symbols 4 --rate 2000 --publishers 1 --source-ips 2");
    assert!(num("published") > 0.0, "{json}");
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
    let (num, json) = bench(
        &srv,
        "--symbols 200 --watchlist 5 --zipf 1.1 --seed 3 --rate 400 --publishers 3",
    );
    assert!(num("owed") > 0.0, "{json}");
}
