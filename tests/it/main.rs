//! Integration tests: the real `tickshard` binary on loopback, real clients.
//! One test binary (one link) with a module per area.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::disallowed_methods)]

mod architecture;
mod bench_smoke;
mod client_lib;
mod cluster;
mod common;
mod docker;
mod durability;
mod elastic;
mod grpc_api;
mod hardening;
mod in_process;
mod slow_consumer;
mod soak;
mod trust;
mod ws_protocol;
