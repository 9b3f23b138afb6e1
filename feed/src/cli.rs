//! `tickshard serve`: parses and validates the config, sets up logging and
//! metrics, binds the listeners, prints their addresses and hands over to
//! [`crate::server::run`]; SIGTERM/SIGINT start the drain.

use std::{io::Write as _, process::ExitCode};

use tokio_util::sync::CancellationToken;

use crate::{
    config::ServeArgs,
    server::{Listeners, run},
    telemetry,
};

/// Writes a line to stderr (the binary's user-facing errors).
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

pub fn serve(rt: &tokio::runtime::Runtime, args: ServeArgs) -> ExitCode {
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            say!("tickshard: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&args.log);
    let metrics = match telemetry::init_metrics() {
        Ok(m) => m,
        Err(e) => {
            say!("tickshard: cannot set up metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    // gRPC (publishes, acks, peer links) on a runtime of its own: see
    // `Listeners::grpc_runtime`.
    let grpc_rt = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("tickshard-grpc")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("tickshard: cannot start the gRPC runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        let backlog = args.listen_backlog;
        let bind = |addr: std::net::SocketAddr, flag: &'static str| async move {
            let sock = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            sock.and_then(|s| {
                s.set_reuseaddr(true)?;
                s.bind(addr)?;
                s.listen(backlog)
            })
            .map_err(|e| format!("cannot bind {flag} {addr}: {e}"))
        };
        let listeners = match (
            bind(args.http_addr, "--http-addr").await,
            bind(args.grpc_addr, "--grpc-addr").await,
            bind(args.peer_addr, "--peer-addr").await,
        ) {
            (Ok(http), Ok(grpc), Ok(peer)) => Listeners {
                http,
                grpc,
                peer,
                grpc_runtime: Some(grpc_rt.handle().clone()),
            },
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                say!("tickshard: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Tests and scripts read these lines to find port-0 listeners; they are
        // printed once the store is open and the listeners serve.
        let addrs = [
            ("http", listeners.http.local_addr()),
            ("grpc", listeners.grpc.local_addr()),
            ("peer", listeners.peer.local_addr()),
        ];
        let started = move || {
            let mut out = std::io::stdout().lock();
            for (name, a) in addrs {
                if let Ok(a) = a {
                    let _ = writeln!(out, "tickshard: {name} listening on {a}");
                }
            }
            let _ = out.flush();
        };
        let shutdown = CancellationToken::new();
        #[expect(
            clippy::disallowed_methods,
            reason = "the signal listener lives as long as the process"
        )]
        tokio::spawn(signals(shutdown.clone()));
        match run(cfg, listeners, metrics, shutdown, started).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "tickshard failed");
                say!("tickshard: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // What is left on it (nothing after a drain) is dropped, bounded.
    grpc_rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// SIGTERM or SIGINT starts the drain; a second one exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    say!("tickshard: second signal, exiting without draining");
    std::process::exit(130);
}
