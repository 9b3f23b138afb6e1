//! Generated gRPC code for tickshard, quarantined here.
//!
//! Only this crate is generated; conversions between these wire types and the
//! domain types live in `tickshard_shard::wire`, so the domain never depends on
//! prost.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Package `tickshard.v1`: the public `Feed` service and the internal `Cluster`
/// service.
pub mod v1 {
    tonic::include_proto!("tickshard.v1");
}

/// Package `tickshard.admin.v1`: the operator's `Admin` service (peer port only).
pub mod admin {
    tonic::include_proto!("tickshard.admin.v1");
}

/// The encoded `FileDescriptorSet` of the public API (`feed.proto`), for gRPC
/// reflection on the public port.
pub const FEED_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickshard_feed_descriptor");
