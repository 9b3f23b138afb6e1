# tickshard container image: `docker build .` with the public base images, or
# --build-arg RUST_IMAGE=… / RUNTIME_IMAGE=… for mirrors and air-gapped builds.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- builder -----------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

# 1. Dependencies only (this layer is reused until Cargo.toml/Cargo.lock change):
#    the manifests, the protos and build script, and empty stand-in sources.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY proto/Cargo.toml proto/build.rs proto/feed.proto proto/cluster.proto proto/admin.proto proto/
COPY shard/Cargo.toml shard/
COPY feed/Cargo.toml feed/
COPY client/Cargo.toml client/
COPY loadgen/Cargo.toml loadgen/
#    The root manifest names its criterion benches; .dockerignore leaves benches/
#    out of the context, so empty stand-ins keep the manifest valid (both stages).
RUN mkdir -p src proto/src shard/src feed/src client/src loadgen/src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch proto/src/lib.rs shard/src/lib.rs feed/src/lib.rs client/src/lib.rs loadgen/src/lib.rs \
      benches/hot_path.rs benches/naive_ws.rs benches/floor.rs \
 && cargo build --release --locked --bin tickshard \
 && rm -rf src proto/src shard/src feed/src client/src loadgen/src \
      target/release/tickshard target/release/deps/tickshard* target/release/deps/libtickshard* \
      target/release/.fingerprint/tickshard*

# 2. The sources.
COPY src src
COPY proto/src proto/src
COPY shard/src shard/src
COPY feed/src feed/src
COPY client/src client/src
COPY loadgen/src loadgen/src
RUN cargo build --release --locked --bin tickshard \
 && cp target/release/tickshard /tickshard \
 && strip /tickshard \
 && mkdir -p /data-empty

# ---- runtime -----------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tickshard" \
      org.opencontainers.image.description="A sharded, durable real-time market-data feed (WebSocket + gRPC)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/tickshard/tickshard"
COPY --from=builder /tickshard /usr/local/bin/tickshard
# an empty /data owned by the runtime user: a fresh volume mounted there
# inherits it, so the shard can write without an init container
COPY --from=builder --chown=65532:65532 /data-empty /data
# distroless "nonroot" is uid/gid 65532; /data is the shard's volume
USER 65532:65532
ENV TICKSHARD_DATA_DIR=/data \
    TICKSHARD_HTTP_ADDR=0.0.0.0:8080 \
    TICKSHARD_GRPC_ADDR=0.0.0.0:50051 \
    TICKSHARD_PEER_ADDR=0.0.0.0:50052
VOLUME ["/data"]
EXPOSE 8080 50051 50052
ENTRYPOINT ["/usr/local/bin/tickshard"]
