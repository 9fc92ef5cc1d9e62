#!/usr/bin/env bash
# README command 2: installs what is missing, builds, checks format and lints, runs every test (unit tests and the
# end-to-end tests that start real clusters and kill processes), then the jepsen battery
# (every workload against every nemesis family, and the self-test against deliberately broken
# nodes). `.ci/run` runs exactly this. RAFTPG_SKIP_JEPSEN=1 skips the battery.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu
start=$(date +%s)
# Build binaries and test binaries once, with the same feature set as the test run.
cargo build --workspace --bins --tests --locked
# Format and lints (after the build, so clippy reuses its dependencies' build scripts; before
# the tests, so a lint fails in seconds rather than after the end-to-end run). Clippy's
# warnings, rustc's warnings and missing docs of the node library are errors here; see
# [workspace.lints] in Cargo.toml.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked -- --test-threads=2
echo "tests passed in $(( $(date +%s) - start )) s"
if [ "${RAFTPG_SKIP_JEPSEN:-0}" != "1" ]; then
  jstart=$(date +%s)
  "${CARGO_TARGET_DIR:-target}/debug/raftpg-jepsen" --battery --dir /tmp/raftpg-jepsen-battery
  echo "jepsen battery passed in $(( $(date +%s) - jstart )) s"
fi
