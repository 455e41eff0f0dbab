//! Generates the Protobuf types of `proto/control.proto` and `proto/ether.proto` with a
//! pure-Rust compiler (protox), so no system `protoc` is needed.

use std::error::Error;

const PROTOS: [&str; 2] = ["proto/control.proto", "proto/ether.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(PROTOS, ["proto"])?;
    let mut config = prost_build::Config::new();
    // `bytes` fields and map values as `bytes::Bytes`: decoding slices the input, no copy.
    config.bytes(["."]);
    // Deterministic field order in the generated maps.
    config.btree_map(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
