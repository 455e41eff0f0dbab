//! cargo-fuzz target `connection`: see [`common::connection`].
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::connection(data));
