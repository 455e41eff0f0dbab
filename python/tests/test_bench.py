"""``python -m xcp.bench --quick`` with tiny sizes: every row is in the JSON (no timing is
asserted: this machine's figures are not the test's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from xcp import bench


def test_bench_quick_json_has_every_row(tmp_path, xcp_bin):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "xcp.bench",
        "--quick",
        "--small-size",
        "64",
        "--large-size",
        "256KiB",
        "--iterations",
        "20",
        "--duration",
        "0.2",
        "--xcp-bin",
        xcp_bin,
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    rows = {(r["name"], r["workload"]): r for r in report["rows"]}
    for name in bench.PY_ROWS:
        for workload in ("request-reply", "hand-off"):
            r = rows[(name, workload)]
            assert r["status"] in ("ok", "skipped"), r
            if r["status"] == "skipped":
                assert r["reason"], r
            else:
                assert r["samples"] >= 3 and r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"]
    for name, (_, workloads) in bench.RUST_PATHS.items():
        for workload in workloads:
            assert rows[(name, workload)]["status"] == "ok", rows[(name, workload)]
    # The xcp rows went the way they say.
    assert rows[("xcp-memfd", "hand-off")]["path"] == "memfd"
    assert rows[("xcp-ring", "hand-off")]["path"] == "memfd"
    assert rows[("xcp-shm", "hand-off")]["path"] == "shm"
    assert rows[("xcp-inline", "hand-off")]["path"] == "inline"
    assert rows[("xcp-memfd", "hand-off")]["x_rust"] is not None
    assert {c["check"] for c in report["checks"]}
    # The table printed every row.
    for name in bench.PY_ROWS + bench.RUST_ROWS:
        assert f"| {name} |" in done.stdout


def test_missing_package_skips_with_a_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "zmq" else real(name, *a)
    )
    assert "pyzmq" in (bench.missing_package("pyzmq") or "")
    assert bench.missing_package("mp-pipe-pickle") is None
