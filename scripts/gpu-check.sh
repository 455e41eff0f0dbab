#!/usr/bin/env bash
# Runs the GPU checks of feature `cuda` from the binaries that scripts/gpu-bundle.sh made
# (no Rust toolchain needed): the test suite of tests/cuda.rs, where every test must report a
# result rather than `skipped:`, then the two-process hand-off of a tensor (1 GiB by default)
# with its latency against D2H + socket + H2D and the kernels against the CPU codecs. The last
# line of gpu_handoff is a JSON summary; its exit code is 0 only when everything matched.
# Usage: gpu-check.sh [MiB] [reps]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvidia-smi -L || true
status=0
"$here/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$here/cuda-tests.log" || status=1
if grep -qE "skipped: CUDA( kernels)? unavailable" "$here/cuda-tests.log"; then
    echo "gpu-check: some tests were skipped (see above): CUDA or NVRTC is not usable here"
    status=1
fi
"$here/gpu_handoff" --mib "${1:-1024}" --reps "${2:-20}" || status=1
exit "$status"
