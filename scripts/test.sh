#!/usr/bin/env bash
# README command 2: installs what is missing, builds, and runs every test (unit tests and the
# end-to-end tests that start real clusters and kill processes). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu
start=$(date +%s)
# Build binaries and test binaries once, with the same feature set as the test run.
cargo build --workspace --bins --tests --locked
cargo test --workspace --locked -- --test-threads=2
echo "tests passed in $(( $(date +%s) - start )) s"
