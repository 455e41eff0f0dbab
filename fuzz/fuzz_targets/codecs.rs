//! cargo-fuzz target `codecs`: see [`common::codecs`].
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::codecs(data));
