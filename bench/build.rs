//! The tonic stubs of the gRPC echo that `xcp bench` measures as a baseline (`bench.proto`,
//! not part of XCP), compiled by protox so no system `protoc` is needed.

use std::error::Error;

const BENCH_PROTO: &str = "bench.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={BENCH_PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile([BENCH_PROTO], ["."])?;
    let mut config = prost_build::Config::new();
    // `bytes` fields as `bytes::Bytes`: the echo slices its input, no copy.
    config.bytes(["."]);
    // The bench builds its own channel, so no transport helpers.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
