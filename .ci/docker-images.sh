#!/usr/bin/env bash
# Stand-in base images for the Dockerfile's ARG defaults, built offline (no
# image can be pulled here): a Debian bookworm root from debootstrap plus this
# machine's Rust toolchain as `rust:1.95-slim-bookworm`, and a distroless-like
# root (glibc, libgcc, a nonroot user) as `gcr.io/distroless/cc-debian12:nonroot`.
set -euo pipefail
RUST_TAG=${RUST_TAG:-rust:1.95-slim-bookworm}
RUNTIME_TAG=${RUNTIME_TAG:-gcr.io/distroless/cc-debian12:nonroot}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-/var/tmp/tickshard-stand-ins}
TOOLCHAIN=$(rustc --print sysroot)

if docker image inspect "$RUST_TAG" >/dev/null 2>&1 && docker image inspect "$RUNTIME_TAG" >/dev/null 2>&1; then
  echo "stand-in images present"; exit 0
fi
rm -rf "$WORK" && mkdir -p "$WORK"
echo "debootstrap bookworm (minbase + gcc) …"
debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$WORK/root" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log"; exit 1; }

# this machine's trust store (its network may intercept TLS with its own CA):
# what cargo in the builder needs to reach the crate registry
cp /etc/ssl/certs/ca-certificates.crt "$WORK/root/etc/ssl/certs/ca-certificates.crt"

# builder: Debian + the toolchain (binaries and libraries, no docs)
mkdir -p "$WORK/root/usr/local/rust"
cp -a "$TOOLCHAIN/bin" "$TOOLCHAIN/lib" "$TOOLCHAIN/libexec" "$WORK/root/usr/local/rust/"
rm -rf "$WORK/root/var/cache/apt/archives"/*.deb "$WORK/root/usr/share/doc" "$WORK/root/usr/share/man"
tar -C "$WORK/root" -c . | docker import \
  --change 'ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV CARGO_HOME=/usr/local/cargo' \
  --change 'WORKDIR /' - "$RUST_TAG" > /dev/null

# runtime: what distroless/cc has that tickshard needs
R="$WORK/runtime"
mkdir -p "$R/lib/x86_64-linux-gnu" "$R/lib64" "$R/etc" "$R/tmp" "$R/usr/local/bin" "$R/etc/ssl/certs"
for lib in libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1; do
  cp -L "$WORK/root/lib/x86_64-linux-gnu/$lib" "$R/lib/x86_64-linux-gnu/"
done
cp -L "$WORK/root/lib64/ld-linux-x86-64.so.2" "$R/lib64/"
cp "$WORK/root/etc/ssl/certs/ca-certificates.crt" "$R/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$R/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$R/etc/group"
chmod 1777 "$R/tmp"
tar -C "$R" -c . | docker import --change 'USER 65532:65532' - "$RUNTIME_TAG" > /dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "rust|distroless"
