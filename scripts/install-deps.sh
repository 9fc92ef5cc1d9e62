#!/usr/bin/env bash
# Installs what raftpg needs on Debian 12 when it is missing: PostgreSQL server (15),
# protobuf compiler, RocksDB (linked from Debian's library instead of a 35-minute source build),
# libclang (bindgen), a C toolchain; for the jepsen fault injection: iptables (partitions
# between loopback addresses) and faketime (clock skew); sqlsmith (generated SQL for
# tests/tests/sqlsmith.rs, see docs/sqlsmith.md); psycopg 3 (a Python driver in tests/tests/wire.rs).
# Needs a Rust toolchain (cargo) already on the machine.
set -euo pipefail

need=()
for pkg in postgresql postgresql-contrib protobuf-compiler librocksdb-dev libclang-dev build-essential pkg-config iptables faketime sqlsmith python3-psycopg; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's postgresql package starts a default server on port 5432; raftpg does not use it
# (every node runs its own PostgreSQL on a private socket), so leave it as the user has it.

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
# scripts/test.sh checks the format and runs clippy.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  else
    echo "cargo fmt and cargo clippy are needed (rustup component add rustfmt clippy)" >&2
    exit 1
  fi
fi
