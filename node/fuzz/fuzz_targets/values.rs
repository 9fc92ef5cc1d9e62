//! Fuzz target `values`: see `common::values` and docs/security.md.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::values(data));
