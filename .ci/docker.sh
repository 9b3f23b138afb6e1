#!/usr/bin/env bash
# The container path, for real: install Debian's docker.io, start dockerd, build
# stand-in base images (nothing can be pulled), build the Dockerfile itself,
# then run the StatefulSet-in-miniature test (rollout restart, canary, kill -9)
# against that image. Cleans up what it made.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -q
  apt-get install -y -q docker.io debootstrap
fi
STARTED_DOCKERD=""
if ! docker info >/dev/null 2>&1; then
  dockerd > /tmp/tickshard-dockerd.log 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/tickshard-dockerd.log; exit 1; }
fi
IMAGE=tickshard:ci
cleanup() {
  docker image rm -f "$IMAGE" "$IMAGE-canary" >/dev/null 2>&1 || true
  [[ -n $STARTED_DOCKERD ]] && kill "$STARTED_DOCKERD" 2>/dev/null || true
}
trap cleanup EXIT

.ci/docker-images.sh

echo "docker build ."
start=$(date +%s)
# host networking for the build only: cargo fetches crates from the registry
docker build --network host -t "$IMAGE" \
  --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" . > /tmp/tickshard-docker-build.log 2>&1 \
  || { tail -40 /tmp/tickshard-docker-build.log; exit 1; }
echo "image built in $(( $(date +%s) - start )) s; size: $(docker image inspect -f '{{.Size}}' "$IMAGE") bytes"
docker run --rm "$IMAGE" --version

TICKSHARD_IMAGE=$IMAGE cargo test --locked --test it docker -- --ignored --nocapture
