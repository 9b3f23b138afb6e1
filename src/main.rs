//! The `tickshard` binary: the server (`tickshard_feed`), the client
//! sub-commands (`tickshard_client`) and the load generator
//! (`tickshard_loadgen`), dispatched from one command line.

mod args;
mod commands;

use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use tickshard_feed::telemetry;

use crate::args::{Cli, Command};

/// Writes a line to stderr (the binary's user-facing errors).
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say!("tickshard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None => tickshard_feed::cli::serve(&rt, cli.serve),
        Some(Command::Serve(a)) => tickshard_feed::cli::serve(&rt, a),
        Some(Command::Tail(a)) => {
            telemetry::init_tracing("warn");
            rt.block_on(commands::tail(a))
        }
        Some(Command::Publish(a)) => {
            telemetry::init_tracing("warn");
            rt.block_on(commands::publish(a, None))
        }
        Some(Command::Replay(a)) => {
            telemetry::init_tracing("warn");
            rt.block_on(commands::replay(a))
        }
        Some(Command::Token(a)) => commands::token(a),
        Some(Command::Admin(a)) => {
            telemetry::init_tracing("warn");
            rt.block_on(commands::admin(a))
        }
        Some(Command::Bench(a)) => {
            telemetry::init_tracing("warn");
            let json = a.json;
            match rt.block_on(tickshard_loadgen::run(a)) {
                Ok(r) => {
                    let text = if json { r.to_json() } else { r.to_table() };
                    let _ = writeln!(std::io::stdout().lock(), "{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
