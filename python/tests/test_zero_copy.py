"""Attachments by handle between two Python processes: no copy, every byte checked."""

from __future__ import annotations

import numpy as np
import pytest

import xcp

MIB = 1 << 20


@pytest.mark.parametrize("transport,path", [("tcp", "shm"), ("unix", "memfd")])
def test_16mib_numpy_by_handle(python_peer, url_for, transport, path):
    peer = python_peer("echo", url_for(transport))
    n = 16 * MIB
    with xcp.connect(peer.url, require_handles=True) as s:
        assert path in s.negotiated["handles"]
        region = s.alloc(n)
        # numpy writes straight into the shared segment: the array's data is the region's.
        arr = np.frombuffer(region, dtype=np.uint32)
        assert arr.flags.writeable and arr.nbytes == n
        with memoryview(region) as m:
            assert np.shares_memory(arr, np.frombuffer(m, dtype=np.uint8))
        arr[:] = np.arange(n // 4, dtype=np.uint32)
        region.dtype, region.shape = "uint32", [n // 4]
        # Sending while the array is alive would give away memory it still points into.
        with pytest.raises(xcp.InvalidError, match="still alive"):
            s.send(xcp.Ether("kv"), attachments={"kv": region})
        del arr

        reply = s.request(xcp.Ether("kv"), attachments={"kv": region}, timeout=30)
        assert region.sent
        with pytest.raises(xcp.InvalidError, match="sent"):
            memoryview(region)
        with pytest.raises(xcp.InvalidError, match="already"):
            s.send(xcp.Ether("kv"), attachments={"kv": region})

    got = reply.ether.payload
    assert got["ok"], "every byte the consumer read matched"
    assert got["nbytes"] == n
    assert got["checksum"] == int(np.arange(n // 4, dtype=np.uint64).sum())
    assert got["path"] == path
    assert got["dtype"] == "uint32" and got["shape"] == [n // 4]
    # The consumer's numpy array is read-only and lies in the sender's segment, mapped into
    # the consumer: a memfd (Unix socket) or a POSIX shm object in /dev/shm (TCP), not the
    # consumer's heap.
    assert got["readonly"]
    if path == "memfd":
        assert got["mapping"].startswith("/memfd:"), got["mapping"]
    else:
        assert got["mapping"].startswith("/dev/shm/xcp-"), got["mapping"]


@pytest.mark.parametrize("transport,path", [("tcp", "shm"), ("unix", "memfd")])
def test_received_view_is_read_only_and_released(python_peer, url_for, transport, path):
    peer = python_peer("echo", url_for(transport))
    n = 4 * MIB
    with xcp.connect(peer.url) as s:
        ask = s.send(xcp.Ether("give", {"nbytes": n}))
        msg = s.recv(timeout=10)
        assert msg.ether.kind == "gift" and msg.ether.payload["for"] == ask
        view = msg.attachments["kv"]
        assert (view.path, view.nbytes, view.dtype) == (path, n, "uint32")
        assert len(view) == n

        arr = np.frombuffer(view, dtype=np.uint32)
        assert not arr.flags.writeable
        assert np.array_equal(arr, np.arange(n // 4, dtype=np.uint32))
        with pytest.raises(ValueError):
            arr[0] = 1
        # The buffer is read-only: a writable one is refused.
        with memoryview(view) as m:
            assert m.readonly and m.nbytes == n
        with pytest.raises(TypeError, match="not writable"):
            _writable(view)

        # Release with the array alive: new buffers are refused at once; the array keeps the
        # bytes until it goes.
        view.release()
        assert view.released
        assert arr[-1] == n // 4 - 1
        with pytest.raises(xcp.InvalidError, match="released"):
            memoryview(view)
        with pytest.raises(ValueError):
            view.tobytes()
        del arr
        assert s.ping() > 0


def _writable(view: xcp.View) -> None:
    """Asks for a writable buffer of ``view`` (ctypes checks the buffer's readonly flag)."""
    import ctypes

    (ctypes.c_char * len(view)).from_buffer(view)


def test_view_context_manager(python_peer, url_for):
    peer = python_peer("echo", url_for("unix"))
    with xcp.connect(peer.url) as s:
        s.send(xcp.Ether("give", {"nbytes": MIB}))
        msg = s.recv(timeout=10)
        with msg.attachments["kv"] as v:
            assert bytes(v)[:8] == np.arange(2, dtype=np.uint32).tobytes()
        assert v.released
        with pytest.raises(xcp.XcpError):
            bytes(v)


def test_bytes_like_attachment_is_copied_once_into_a_region(python_peer, url_for):
    peer = python_peer("echo", url_for("unix"))
    arr = np.arange(MIB // 4, dtype=np.uint32)
    with xcp.connect(peer.url) as s:
        reply = s.request(xcp.Ether("kv"), attachments={"kv": arr})
    assert reply.ether.payload["ok"]
    assert reply.ether.payload["path"] == "memfd"
