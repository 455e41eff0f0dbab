//! cargo-fuzz target `header`: see [`common::header`].
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::header(data));
