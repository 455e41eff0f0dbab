#!/usr/bin/env bash
# Every test, Rust and Python: the README's test command (and what `.ci/run` runs).
#   1. cargo test --all-targets: the library, the CLI and the bench (unit, integration,
#      golden vectors, property tests, fuzz-corpus replay, real processes over real sockets);
#   2. scripts/python-tests.sh: the Python package (its own venv from PyPI, the extension
#      built into it, pytest, the example).
# The exit code is the verdict.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

printf '\n==> rust: cargo test --all-targets\n'
cargo test --all-targets

printf '\n==> python: bash scripts/python-tests.sh\n'
bash scripts/python-tests.sh
