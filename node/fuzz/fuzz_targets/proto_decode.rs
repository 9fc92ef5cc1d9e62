//! Fuzz target `proto_decode`: see `common::proto_decode` and docs/security.md.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::proto_decode(data));
