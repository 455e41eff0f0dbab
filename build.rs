//! Generates the Protobuf types of `proto/control.proto` and `proto/ether.proto` with a
//! pure-Rust compiler (protox), so no system `protoc` is needed; and the tonic stubs of the
//! gRPC echo that `xcp bench` measures as a baseline (`proto/bench.proto`).

use std::error::Error;

const PROTOS: [&str; 2] = ["proto/control.proto", "proto/ether.proto"];
/// The gRPC baseline of `xcp bench` (not part of XCP).
const BENCH_PROTO: &str = "proto/bench.proto";

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

    // The gRPC echo service of the `xcp bench` baseline (tonic client and server stubs), from
    // the same pure-Rust compiler. The CLI builds its own channel, so no transport helpers.
    println!("cargo:rerun-if-changed={BENCH_PROTO}");
    let fds = protox::compile([BENCH_PROTO], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
