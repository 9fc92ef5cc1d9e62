#!/usr/bin/env bash
# README command 1: builds raftpg and starts a real 3-node local cluster (each node with its own
# PostgreSQL), runs a short demo through it, and keeps it running until Ctrl-C.
# Extra arguments go to `raftpg demo` (e.g. --exit to stop after the demo, --size 5).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu
cargo build --release -p raftpg-node -p raftpg-client --bins
# Cargo builds into $CARGO_TARGET_DIR when it is set (relative paths are taken from here, the
# workspace root); `raftpg demo` finds raftpg-node next to itself.
exec "${CARGO_TARGET_DIR:-target}/release/raftpg" demo "$@"
