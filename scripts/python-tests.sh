#!/usr/bin/env bash
# The Python package's checks (python/, issue 21), from a fresh clone with only the Rust
# toolchain and Python 3 (3.11 or later):
#   1. a virtual environment at target/py-venv, made if missing (python3 -m venv);
#   2. maturin, numpy, pytest and pyzmq (the bench's baseline) from PyPI into it (major
#      versions pinned);
#   3. the extension built into it (`maturin develop` in python/, target dir target/python);
#   4. the Rust `xcp` binary (`cargo build --bin xcp`), which the tests run as a peer;
#   5. `pytest -q python/tests` (with `python -m xcp.bench --quick` on tiny sizes, TLS and
#      QUIC with certificates from `xcp cert dev`, 1,000 hand-offs of 64 MiB: XCP_SKIP_SOAK=1
#      skips those), then the examples python/examples/kv_handoff.py (sync) and
#      python/examples/aio_embedding.py (asyncio), each over a Unix socket and over TCP.
# Every step is printed before it runs; the exit code is the verdict (non-zero on any failure).
#
# Environment: PYTHON (the interpreter that makes the venv, default python3), XCP_PY_VENV
# (default target/py-venv), XCP_PY_TARGET (the extension's cargo target dir, default
# target/python), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
VENV="${XCP_PY_VENV:-$ROOT/target/py-venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY_TARGET="${XCP_PY_TARGET:-$ROOT/target/python}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() {
    printf '\n==> %s\n' "$*"
}

run() {
    printf '+ %s\n' "$*"
    "$@"
}

step "python: $PYTHON"
run "$PYTHON" --version
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python-tests: the package needs Python >= 3.11 (abi3-py311: the buffer protocol)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    step "venv: $PYTHON -m venv $VENV"
    run "$PYTHON" -m venv "$VENV"
else
    step "venv: $VENV (exists)"
fi
VPY="$VENV/bin/python"

step "pip install maturin numpy pytest pyzmq"
run "$VPY" -m pip install --quiet --disable-pip-version-check \
    'maturin>=1.5,<2' 'numpy>=1.24,<3' 'pytest>=8,<10' 'pyzmq>=25,<28'

step "extension: maturin develop (python/ -> $VENV, cargo target $PY_TARGET)"
(
    cd python
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" CARGO_TARGET_DIR="$PY_TARGET"
    run "$VENV/bin/maturin" develop
)
run "$VPY" -c 'import xcp, xcp._xcp; print("xcp", xcp.__version__, "from", xcp._xcp.__file__)'

step "rust peer: cargo build --bin xcp"
run cargo build --quiet --bin xcp
XCP_BIN="${XCP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/xcp}"
export XCP_BIN
echo "XCP_BIN=$XCP_BIN"

step "tests: pytest -q python/tests"
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
run "$VPY" -m pytest -q -p no:cacheprovider python/tests ${PYTEST_ARGS:-}

step "example: python/examples/kv_handoff.py (Unix socket, then TCP)"
run "$VPY" python/examples/kv_handoff.py
run "$VPY" python/examples/kv_handoff.py --tcp

step "example: python/examples/aio_embedding.py (asyncio; Unix socket, then TCP)"
run "$VPY" python/examples/aio_embedding.py
run "$VPY" python/examples/aio_embedding.py --tcp

step "python: all passed"
