//! cargo-fuzz target `attach_uri`: see [`common::attach_uri`].
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::attach_uri(data));
