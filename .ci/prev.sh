#!/usr/bin/env bash
# Builds the previous release of tickshard — the commit tagged v0.1.0, the last
# one before elastic shards (cluster protocol 1) — for the mixed-version
# rolling upgrade test, and prints the path of its binary. Cached by commit in
# ${XDG_CACHE_HOME:-~/.cache}/tickshard, so only a fresh machine builds it
# (in its own target directory: the working tree's binary is never touched).
# Needs the git history (a full clone).
set -euo pipefail
cd "$(dirname "$0")/.."
PREV_COMMIT=d4103118b5fa0a4a6ef38617aab812321db182e8 # v0.1.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tickshard"
bin="$cache/prev-$PREV_COMMIT/tickshard"
if [ ! -x "$bin" ]; then
  src="$cache/src-$PREV_COMMIT"
  rm -rf "$src"
  mkdir -p "$cache"
  git archive --format=tar "$PREV_COMMIT" | (mkdir -p "$src" && tar -x -C "$src")
  (cd "$src" && CARGO_TARGET_DIR="$cache/target" cargo build --locked --bin tickshard >&2)
  mkdir -p "$(dirname "$bin")"
  cp "$cache/target/debug/tickshard" "$bin"
  rm -rf "$src"
fi
echo "$bin"
