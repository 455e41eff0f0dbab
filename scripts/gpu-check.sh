#!/usr/bin/env bash
# Runs the GPU checks of feature `cuda` from the binaries that scripts/gpu-bundle.sh made
# (no Rust toolchain needed): the test suite of tests/cuda.rs, where every test must report a
# result rather than `skipped:`, then the two-process hand-off of a tensor (1 GiB by default)
# with its latency against a PING round trip and against D2H + socket + H2D, at several sizes,
# and the kernels against the CPU codecs and the device's copy bandwidth. The last line of
# gpu_handoff is a JSON summary; the exit code is 0 only when everything matched.
# Logs go to $OUT when it is set (the device tool's folder), else beside this script.
# Usage: gpu-check.sh [MiB] [reps]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
logs="${OUT:-$here}"
nvidia-smi -L || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cudarc (built for the CUDA 12.0 API) dlopens libnvrtc.so or libnvrtc.so.12; a CUDA 13
# machine has libnvrtc.so.13, often off the loader's path. Point a libnvrtc.so at the newest
# one found (its builtins library sits beside it).
if ! ldconfig -p | grep -q 'libnvrtc\.so '; then
    nv=$(ls /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda*/targets/*/lib/libnvrtc.so.* \
        /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib/libnvrtc.so.* \
        /usr/lib/x86_64-linux-gnu/libnvrtc.so.* 2>/dev/null | grep -v builtins | sort -V | tail -n 1)
    if [ -n "$nv" ]; then
        mkdir -p "$here/lib"
        ln -sf "$nv" "$here/lib/libnvrtc.so"
        export LD_LIBRARY_PATH="$here/lib:$(dirname "$nv")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "gpu-check: NVRTC is $nv"
    else
        echo "gpu-check: no libnvrtc.so found"
    fi
fi
status=0
timeout 240 "$here/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$logs/cuda-tests.log" || status=1
if grep -qE "skipped: CUDA( kernels)? unavailable" "$logs/cuda-tests.log"; then
    echo "gpu-check: some tests were skipped (see above): CUDA or NVRTC is not usable here"
    status=1
fi
timeout 240 "$here/gpu_handoff" --mib "${1:-1024}" --reps "${2:-20}" --kernel-elems $((1 << 28)) 2>&1 |
    tee "$logs/gpu_handoff.log" || status=1
echo "gpu-check: exit $status"
exit "$status"
