"""1,000 hand-offs of 64 MiB by handle between two Python processes, with both processes'
resident memory bounded (no region, mapping or message leaks). Set ``XCP_SKIP_SOAK=1`` to
skip it (it takes a few seconds here)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import xcp

MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("XCP_SKIP_SOAK")), reason="XCP_SKIP_SOAK is set"
)


def rss_mib(pid: int | str = "self") -> float:
    """The resident set of a process (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def mappings(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_1000_handoffs_of_64mib_rss_bounded(python_peer, url_for, transport):
    peer = python_peer("echo", url_for(transport))
    n = 64 * MIB
    with xcp.connect(peer.url, require_handles=True) as s:
        # The producer's data, written once; then each hand-off sends a fresh region of the
        # pool (the same slot again, once the previous one's ACK came back).
        first = s.alloc(n)
        np.frombuffer(first, dtype=np.uint8)[:] = 7
        s.request(xcp.Ether("tensor.ack"), attachments={"tensor": first}, timeout=30)
        for _ in range(10):
            s.request(xcp.Ether("tensor.ack"), attachments={"tensor": s.alloc(n)}, timeout=30)
        ours, theirs = rss_mib(), rss_mib(peer.proc.pid)
        maps_ours, maps_theirs = mappings(), mappings(peer.proc.pid)
        t0 = time.monotonic()
        for i in range(1000):
            r = s.request(xcp.Ether("tensor.ack"), attachments={"tensor": s.alloc(n)}, timeout=30)
            assert r.ether.kind == "ok", (i, r)
        elapsed = time.monotonic() - t0
        grew_ours = rss_mib() - ours
        grew_theirs = rss_mib(peer.proc.pid) - theirs
        path = s.stats()["sent"]["by_path"]
    assert path[{"unix": "memfd", "tcp": "shm"}[transport]]["messages"] == 1011
    # 1,000 x 64 MiB = 62.5 GiB handed over; neither side may keep more than a little of it.
    assert grew_ours < 64, f"this process's RSS grew {grew_ours:.0f} MiB ({elapsed:.1f} s)"
    assert grew_theirs < 64, f"the peer's RSS grew {grew_theirs:.0f} MiB ({elapsed:.1f} s)"
    assert mappings() - maps_ours < 16
    assert mappings(peer.proc.pid) - maps_theirs < 16
