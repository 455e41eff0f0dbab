#!/usr/bin/env bash
# Builds the GPU checks of feature `cuda` (tests/cuda.rs and examples/gpu_handoff.rs) in
# release mode, strips them, and puts them with scripts/gpu-check.sh in target/gpu-bundle/
# (a few MiB), to be copied to a machine with an NVIDIA GPU, CUDA and NVRTC but no Rust
# toolchain. There: `bash target/gpu-bundle/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out"
# The artifact of the test target `cuda` (the same build also makes the `xcp` binary).
test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
    grep '"kind":\["test"\],"crate_types":\["bin"\],"name":"cuda"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [ -z "$test_bin" ]; then
    echo "gpu-bundle: the test binary of tests/cuda.rs was not found" >&2
    exit 1
fi
cargo build --release --features cuda --example gpu_handoff
cp "$test_bin" "$out/cuda-tests"
cp target/release/examples/gpu_handoff "$out/gpu_handoff"
strip "$out/cuda-tests" "$out/gpu_handoff" 2>/dev/null || true
cp scripts/gpu-check.sh "$out/"
ls -la "$out"
