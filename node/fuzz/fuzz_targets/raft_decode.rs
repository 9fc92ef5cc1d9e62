//! Fuzz target `raft_decode`: see `common::raft_decode` and docs/security.md.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::raft_decode(data));
