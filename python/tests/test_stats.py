"""``session.stats()``: messages and attachment bytes sent and received, by path."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import xcp
import xcp.aio

MIB = 1 << 20

EMPTY = {"messages": 0, "bytes": 0, "by_path": {}}


@pytest.mark.parametrize("transport,path", [("unix", "memfd"), ("tcp", "shm")])
def test_sync_stats_by_path(python_peer, url_for, transport, path):
    peer = python_peer("echo", url_for(transport))
    with xcp.connect(peer.url, require_handles=True) as s:
        assert s.stats() == {"sent": EMPTY, "received": EMPTY}
        # A request without attachments: one message each way, no bytes.
        s.request(xcp.Ether("hello"), timeout=10)
        st = s.stats()
        assert st["sent"] == {"messages": 1, "bytes": 0, "by_path": {}}
        assert st["received"] == {"messages": 1, "bytes": 0, "by_path": {}}

        # 1 MiB by handle, and 100 bytes that go inline (under the 64 KiB threshold).
        region = s.alloc(MIB)
        np.frombuffer(region, dtype=np.uint32)[:] = np.arange(MIB // 4, dtype=np.uint32)
        reply = s.request(xcp.Ether("kv"), attachments={"kv": region}, timeout=30)
        assert reply.ether.payload["path"] == path
        s.request(xcp.Ether("small"), attachments={"b": b"x" * 100}, timeout=10)
        st = s.stats()
        assert st["sent"]["messages"] == 3
        assert st["sent"]["bytes"] == MIB + 100
        assert st["sent"]["by_path"] == {
            path: {"messages": 1, "bytes": MIB},
            "inline": {"messages": 1, "bytes": 100},
        }

        # Received by handle: the peer's "give" sends 2 MiB; a tensor copied once.
        s.send(xcp.Ether("give", {"nbytes": 2 * MIB}))
        gift = s.recv(timeout=10)
        assert gift.attachments["kv"].path == path
        gift.attachments["kv"].release()
        s.request_tensor(np.ones(32 * 1024, dtype=np.float32), xcp.Ether("tensor"), timeout=10)
        st = s.stats()
        assert st["received"]["by_path"] == {path: {"messages": 1, "bytes": 2 * MIB}}
        assert st["received"]["messages"] == 5
        assert st["sent"]["by_path"][path] == {"messages": 2, "bytes": MIB + 128 * 1024}
        assert st["sent"]["messages"] == 5


def test_inline_session_counts_inline(python_peer, url_for):
    peer = python_peer("echo", url_for("tcp"))
    with xcp.connect(peer.url, handles=False) as s:
        kv = np.arange(MIB // 4, dtype=np.uint32)
        got = s.request(xcp.Ether("kv"), attachments={"kv": kv}, timeout=30)
        assert got.ether.payload["path"] == "inline"
        s.send_tensor(np.zeros(1000, dtype=np.int64))
        st = s.stats()
        assert st["sent"]["by_path"] == {"inline": {"messages": 2, "bytes": MIB + 8000}}
        assert "shm" not in st["sent"]["by_path"]


def test_aio_stats_are_the_sessions(python_peer, url_for):
    peer = python_peer("echo", url_for("unix"))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            region = await s.alloc(MIB)
            np.frombuffer(region, dtype=np.uint32)[:] = np.arange(MIB // 4, dtype=np.uint32)
            await s.request(xcp.Ether("kv"), attachments={"kv": region}, timeout=30)
            await s.send(xcp.Ether("give", {"nbytes": MIB}))
            gift = await s.recv(timeout=10)
            gift.attachments["kv"].release()
            await s.send_tensor(np.ones(100, dtype=np.float64))
            st = s.stats()
            assert st == s.sync.stats()
            assert st["sent"]["messages"] == 3
            assert st["sent"]["by_path"] == {
                "memfd": {"messages": 1, "bytes": MIB},
                "inline": {"messages": 1, "bytes": 800},
            }
            assert st["received"]["messages"] == 2
            assert st["received"]["by_path"] == {"memfd": {"messages": 1, "bytes": MIB}}

    asyncio.run(main())
