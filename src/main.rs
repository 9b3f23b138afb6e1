//! The `tickshard` binary: everything is in `tickshard_feed::cli`.

fn main() -> std::process::ExitCode {
    tickshard_feed::cli::main()
}
