//! Fuzz target `sql_gate`: see `common::sql_gate` and docs/security.md.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::sql_gate(data));
