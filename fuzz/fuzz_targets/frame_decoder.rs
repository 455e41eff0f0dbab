//! cargo-fuzz target `frame_decoder`: see [`common::frame_decoder`].
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::frame_decoder(data));
