//! Fuzz target `wire_messages`: see `common::wire_messages` and docs/security.md.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::wire_messages(data));
