"""DLPack for host memory between two Python processes: ``session.empty``, ``__dlpack__``
on regions and views, ``send_tensor`` / ``request_tensor`` (sync and ``xcp.aio``), zero copy
asserted, capsules used once, deleters run once, memory bounded over 1,000 sends."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import sys
import threading
import time

import numpy as np
import pytest

import xcp
import xcp.aio
from xcp import _xcp

MIB = 1 << 20

#: dtype name -> (numpy dtype or None where numpy has none, DLPack code, bits).
DTYPES = {
    "float32": (np.float32, 2, 32),
    "float16": (np.float16, 2, 16),
    "bfloat16": (None, 4, 16),
    "int8": (np.int8, 0, 8),
    "uint8": (np.uint8, 1, 8),
    "int32": (np.int32, 0, 32),
    "int64": (np.int64, 0, 64),
    "float64": (np.float64, 2, 64),
    "bool": (np.bool_, 6, 8),
}


def pattern(nbytes: int) -> np.ndarray:
    """The bytes ``0, 1, 2, ...`` mod 251, as tests/peer.py makes them."""
    return (np.arange(nbytes, dtype=np.int64) % 251).astype(np.uint8)


def sha(buf: object) -> str:
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()  # type: ignore[arg-type]


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Capsule:
    """An object whose ``__dlpack__`` returns the same capsule every time."""

    def __init__(self, capsule: object) -> None:
        self.capsule = capsule

    def __dlpack__(self, **_kwargs: object) -> object:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


def capsule_name(capsule: object) -> str:
    """A capsule's name (ctypes: PyCapsule_GetName)."""
    get = ctypes.pythonapi.PyCapsule_GetName
    get.restype = ctypes.c_char_p
    get.argtypes = [ctypes.py_object]
    name = get(capsule)
    assert name is not None
    return name.decode()


@pytest.fixture
def echo(python_peer, url_for):
    """A Python peer over a Unix socket (memfd) in a process of its own."""
    return python_peer("echo", url_for("unix"))


# ---------------------------------------------------------------------------------------------
# Producer side: session.empty and the region's __dlpack__.


def test_empty_is_a_tensor_over_the_region(echo):
    with xcp.connect(echo.url, require_handles=True) as s:
        region = s.empty((64, 1024), "float32")
        assert (region.dtype, region.shape, region.nbytes) == ("float32", [64, 1024], 256 * 1024)
        assert region.__dlpack_device__() == (1, 0)
        arr = np.from_dlpack(region)
        assert arr.dtype == np.float32 and arr.shape == (64, 1024) and arr.flags.writeable
        # The array is the region's memory: numpy writes straight into the shared segment.
        with memoryview(region) as m:
            assert np.shares_memory(arr, np.frombuffer(m, dtype=np.float32))
        arr[:] = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)
        want = sha(arr)
        # Sent while the array is alive: by handle, no copy; the array must not be written now.
        reply = s.request_tensor(arr, timeout=30)
        assert region.sent
        del arr
    got = reply.ether.payload
    assert got["sha256"] == want
    assert got["path"] == "memfd" and got["mapping"].startswith("/memfd:"), got
    assert (got["dtype"], got["shape"]) == ("float32", [64, 1024])
    assert got["np_dtype"] == "float32" and got["np_shape"] == [64, 1024]
    assert got["np_strides"] == [4096, 4]
    assert got["readonly"] and got["same_memory"]


@pytest.mark.parametrize("transport,path", [("tcp", "shm"), ("unix", "memfd")])
@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trip_of_each_dtype_from_a_region(python_peer, url_for, transport, path, name):
    peer = python_peer("echo", url_for(transport))
    np_dtype, _, bits = DTYPES[name]
    shape = (3, 65536 // (bits // 8))  # 192 KiB: above the inline threshold
    with xcp.connect(peer.url, require_handles=True) as s:
        region = s.empty(shape, name)
        np.frombuffer(region, dtype=np.uint8)[:] = pattern(region.nbytes)
        reply = s.request_tensor(region, xcp.Ether("tensor"), timeout=30)
    got = reply.ether.payload
    assert got["sha256"] == sha(pattern(region.nbytes))
    assert (got["path"], got["dtype"], got["shape"]) == (path, name, list(shape))
    if np_dtype is None:
        # numpy has no bfloat16: its from_dlpack refuses the dtype; the bytes are there.
        assert got["numpy"] != "ok"
    else:
        assert got["numpy"] == "ok", got["numpy"]
        assert got["np_dtype"] == np.dtype(np_dtype).name
        assert got["np_shape"] == list(shape)
        item = bits // 8
        assert got["np_strides"] == [shape[1] * item, item]
        assert got["readonly"] and got["same_memory"]


@pytest.mark.parametrize("name", [n for n, (d, _, _) in DTYPES.items() if d is not None])
def test_numpy_arrays_are_copied_once_into_a_region(echo, name):
    np_dtype = DTYPES[name][0]
    arr = np.frombuffer(pattern(96 * 1024).tobytes(), dtype=np_dtype).reshape(4, -1).copy()
    with xcp.connect(echo.url) as s:
        reply = s.request_tensor(arr, timeout=30)
    got = reply.ether.payload
    assert got["sha256"] == sha(arr)
    assert (got["path"], got["dtype"], got["shape"]) == ("memfd", name, list(arr.shape))
    assert got["np_strides"] == list(arr.strides)


def test_without_handles_the_tensor_goes_inline(python_peer, url_for):
    peer = python_peer("echo", url_for("tcp"))
    arr = np.arange(300_000, dtype=np.int32).reshape(3, 100_000)
    with xcp.connect(peer.url, handles=False) as s:
        assert s.negotiated["handles"] == []
        reply = s.request_tensor(arr, timeout=30)
        region = s.empty((1000,), "uint8")
        np.from_dlpack(region)[:] = 7
        reply2 = s.request_tensor(region, timeout=30)
    got = reply.ether.payload
    assert got["path"] == "inline" and got["sha256"] == sha(arr)
    assert got["np_shape"] == [3, 100_000] and got["same_memory"]
    assert reply2.ether.payload["sha256"] == sha(np.full(1000, 7, np.uint8))


def test_received_tensor_is_zero_copy_and_read_only(echo):
    with xcp.connect(echo.url, require_handles=True) as s:
        ask = s.send(xcp.Ether("give.tensor", {"shape": [256, 512], "dtype": "int32"}))
        msg = s.recv(timeout=10)
        assert msg.ether.kind == "gift" and msg.ether.payload["for"] == ask
        view = msg.tensor()
        assert view is msg.attachments["tensor"]
        assert view.__dlpack_device__() == (1, 0)
        assert (view.path, view.dtype, view.shape) == ("memfd", "int32", [256, 512])
        arr = np.from_dlpack(view)
        assert arr.dtype == np.int32 and arr.shape == (256, 512)
        assert arr.strides == (2048, 4)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0, 0] = 1
        # Zero copy: the array's data is the view's bytes where they arrived.
        raw = np.frombuffer(view, dtype=np.uint8)
        assert arr.ctypes.data == raw.ctypes.data and np.shares_memory(arr, raw)
        assert sha(arr) == sha(pattern(256 * 512 * 4))
        del raw
        # The array keeps the mapping after release() and after the message is gone.
        view.release()
        del msg, view
        assert sha(arr) == sha(pattern(256 * 512 * 4))
        # A copy on request, writable.
        del arr
        s.send(xcp.Ether("give.tensor", {"shape": [10], "dtype": "float32"}))
        v2 = s.recv(timeout=10).tensor()
        c = np.from_dlpack(v2, copy=True)
        assert c.flags.writeable and not np.shares_memory(c, np.frombuffer(v2, np.uint8))
        c[0] = 1.0


def test_message_tensor_errors(echo):
    with xcp.connect(echo.url) as s:
        reply = s.request(xcp.Ether("hello"), timeout=10)
        with pytest.raises(xcp.InvalidError, match="no tensor"):
            reply.tensor()


# ---------------------------------------------------------------------------------------------
# Capsules: named per max_version, used once, deleted once.


def test_capsules_are_named_per_max_version_and_used_once(echo):
    base = _xcp._dlpack_live()
    with xcp.connect(echo.url) as s:
        region = s.empty((4, 4), "float32")
        legacy = region.__dlpack__()
        versioned = region.__dlpack__(max_version=(1, 0))
        assert capsule_name(legacy) == "dltensor"
        assert capsule_name(versioned) == "dltensor_versioned"
        assert _xcp._dlpack_live() == base + 2
        # Unconsumed capsules: their destructor runs the deleter (once).
        del legacy, versioned
        assert _xcp._dlpack_live() == base
        region.release()  # no export left

        region = s.empty((8,), "int64")
        cap = region.__dlpack__(max_version=(1, 0))
        holder = Capsule(cap)
        arr = np.from_dlpack(holder)
        assert capsule_name(cap) == "used_dltensor_versioned"
        np.from_dlpack(region)[:] = np.arange(8)
        assert list(arr) == list(range(8))
        # A used capsule cannot be consumed again.
        with pytest.raises(Exception):
            np.from_dlpack(holder)
        with pytest.raises(xcp.InvalidError, match="consumed"):
            s.send_tensor(holder)
        assert _xcp._dlpack_live() == base + 1
        # The capsule going does not delete the consumer's tensor ...
        del cap, holder
        assert _xcp._dlpack_live() == base + 1
        with pytest.raises(xcp.InvalidError, match="still alive"):
            region.release()
        # ... the consumer does, once, when its array goes.
        del arr
        assert _xcp._dlpack_live() == base
        region.release()
        with pytest.raises(xcp.InvalidError, match="released"):
            region.__dlpack__(max_version=(1, 0))


def test_exports_leave_no_references_behind(echo):
    """1,000 arrays over a region and over a view, each dropped: the objects' reference counts
    and the count of live managed tensors come back to where they were."""
    base = _xcp._dlpack_live()
    with xcp.connect(echo.url) as s:
        region = s.empty((1024,), "float32")
        s.send(xcp.Ether("give.tensor", {"shape": [1024], "dtype": "float32"}))
        view = s.recv(timeout=10).tensor()
        refs = (sys.getrefcount(region), sys.getrefcount(view))
        for _ in range(1000):
            a = np.from_dlpack(region)
            b = np.from_dlpack(view)
            c = region.__dlpack__(max_version=(1, 0))
            del a, b, c
        assert (sys.getrefcount(region), sys.getrefcount(view)) == refs
        assert _xcp._dlpack_live() == base
        region.release()
        view.release()


def test_dlpack_arguments(echo):
    with xcp.connect(echo.url) as s:
        region = s.empty((4,), "uint8")
        with pytest.raises(BufferError):
            region.__dlpack__(max_version=(1, 0), dl_device=(2, 0))
        with pytest.raises(BufferError):
            region.__dlpack__(max_version=(1, 0), stream=7)
        with pytest.raises(TypeError):
            region.__dlpack__(max_version="1.0")
        region.__dlpack__(max_version=(1, 0), dl_device=(1, 0), stream=None)
        copied = np.from_dlpack(region, copy=True)
        copied[:] = 9
        assert bytes(memoryview(region)) == b"\0\0\0\0"
        del copied
        # A received view is read-only: the legacy capsule, which cannot say so, is refused.
        s.send(xcp.Ether("give.tensor", {"shape": [4], "dtype": "uint8"}))
        view = s.recv(timeout=10).tensor()
        with pytest.raises(BufferError, match="read-only"):
            view.__dlpack__()
        assert capsule_name(view.__dlpack__(copy=True)) == "dltensor"
        assert capsule_name(view.__dlpack__(max_version=(1, 2))) == "dltensor_versioned"
        view.release()
        with pytest.raises(xcp.InvalidError, match="released"):
            view.__dlpack__(max_version=(1, 0))
    with pytest.raises(xcp.InvalidError, match="dtype"):
        xcp.connect(echo.url).empty((4,), "float8")
    for dtype in ("float32", np.float32, np.dtype("float32")):
        with xcp.connect(echo.url) as s:
            assert s.empty(3, dtype).dtype == "float32"


# ---------------------------------------------------------------------------------------------
# Errors.


class FakeCuda:
    """A device tensor, as far as DLPack says."""

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, **_kwargs: object) -> object:
        raise AssertionError("a device tensor's capsule must not be asked for")


def test_device_and_non_contiguous_tensors_are_refused(echo):
    with xcp.connect(echo.url) as s:
        with pytest.raises(xcp.InvalidError, match=r"device \(2, 0\) \(CUDA\)"):
            s.send_tensor(FakeCuda())
        a = np.arange(64, dtype=np.float32).reshape(8, 8)
        with pytest.raises(xcp.InvalidError, match="not C-contiguous"):
            s.send_tensor(a.T)
        with pytest.raises(xcp.InvalidError, match="not C-contiguous"):
            s.send_tensor(a[:, ::2])
        with pytest.raises(xcp.InvalidError, match="not C-contiguous"):
            s.send_tensor(a[::-1])
        with pytest.raises(xcp.InvalidError, match="no __dlpack__"):
            s.send_tensor(b"bytes")
        # Contiguous slices are fine (copied: they do not start a region).
        reply = s.request_tensor(np.ascontiguousarray(a.T), timeout=10)
        assert reply.ether.payload["sha256"] == sha(np.ascontiguousarray(a.T))
        reply = s.request_tensor(a[2:5], timeout=10)
        assert reply.ether.payload["np_shape"] == [3, 8]
        region = s.empty((16,), "int8")
        s.send_tensor(region, xcp.Ether("tensor.ack"))
        with pytest.raises(xcp.InvalidError, match="sent already"):
            s.send_tensor(region)
        with pytest.raises(xcp.InvalidError):
            s.send_tensor(np.zeros(4), xcp.Ether("x"), codec="yaml")


def test_torch_cpu_tensors(echo):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    with xcp.connect(echo.url) as s:
        t = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000)
        reply = s.request_tensor(t, timeout=30)
        assert reply.ether.payload["sha256"] == sha(t.numpy())
        region = s.empty((100, 1000), torch.bfloat16)
        tt = torch.from_dlpack(region)
        tt.fill_(1.5)
        reply = s.request_tensor(tt, timeout=30)
        assert reply.ether.payload["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Lifetimes: the ACK waits for the last consumer; nothing leaks over 1,000 sends.


def test_ack_waits_for_the_consumers_array(echo):
    """The receiver holds ``np.from_dlpack`` of our tensor with its message and view gone:
    our region comes back to the pool (the same memory is loaned again) only once that
    array is dropped."""
    with xcp.connect(echo.url, require_handles=True) as s:
        region = s.empty((MIB,), "uint8")
        first = np.from_dlpack(region).ctypes.data
        assert s.request_tensor(region, xcp.Ether("tensor.hold"), timeout=10).ether.kind == "held"
        time.sleep(0.2)
        other = s.empty((MIB,), "uint8")  # kept: not given back meanwhile
        assert np.from_dlpack(other).ctypes.data != first, "not ACKed yet"
        assert s.request(xcp.Ether("tensor.drop"), timeout=10).ether.kind == "dropped"
        deadline = time.monotonic() + 10
        while True:
            probe = s.empty((MIB,), "uint8")
            if np.from_dlpack(probe).ctypes.data == first:
                break
            probe.release()
            assert time.monotonic() < deadline, "the region never came back"
            time.sleep(0.05)
        del other


@pytest.mark.parametrize("how", ["copy", "region"])
def test_1000_sends_of_1mib_do_not_grow_rss(echo, how):
    base = _xcp._dlpack_live()
    arr = np.frombuffer(pattern(MIB).tobytes(), dtype=np.uint8).copy()

    def once(s: xcp.Session, i: int) -> None:
        if how == "copy":
            s.request_tensor(arr, xcp.Ether("tensor.ack"), timeout=30)
        else:
            region = s.empty((MIB // 4,), "float32")
            np.from_dlpack(region)[:] = i
            s.request_tensor(region, xcp.Ether("tensor.ack"), timeout=30)

    with xcp.connect(echo.url, require_handles=True) as s:
        for i in range(50):  # warm up: the pool's segments, the allocator
            once(s, i)
        before = rss_bytes()
        for i in range(1000):
            once(s, i)
        grew = rss_bytes() - before
    assert grew < 64 * MIB, f"RSS grew by {grew / MIB:.1f} MiB over 1000 sends"
    assert _xcp._dlpack_live() == base


def test_1000_received_tensors_do_not_grow_rss(echo):
    with xcp.connect(echo.url, require_handles=True) as s:

        def once() -> None:
            s.send(xcp.Ether("give.tensor", {"shape": [MIB], "dtype": "uint8"}))
            arr = np.from_dlpack(s.recv(timeout=10).tensor())
            assert arr[1000] == 1000 % 251

        for _ in range(50):
            once()
        before = rss_bytes()
        for _ in range(1000):
            once()
        grew = rss_bytes() - before
    assert grew < 64 * MIB, f"RSS grew by {grew / MIB:.1f} MiB over 1000 receives"


# ---------------------------------------------------------------------------------------------
# xcp.aio.


def test_aio_tensors(echo):
    async def main() -> None:
        async with await xcp.aio.connect(echo.url, require_handles=True) as s:
            region = await s.empty((128, 256), "int64")
            np.from_dlpack(region)[:] = np.arange(128 * 256).reshape(128, 256)
            reply = await s.request_tensor(region, timeout=10)
            got = reply.ether.payload
            assert got["sha256"] == sha(np.arange(128 * 256, dtype=np.int64))
            assert got["path"] == "memfd" and got["np_shape"] == [128, 256]

            arr = np.linspace(0, 1, 100_000, dtype=np.float16)
            replies = await asyncio.gather(
                *(s.request_tensor(arr, timeout=10) for _ in range(8))
            )
            assert all(r.ether.payload["sha256"] == sha(arr) for r in replies)

            await s.send(xcp.Ether("give.tensor", {"shape": [64, 64], "dtype": "uint8"}))
            view = (await s.recv(timeout=10)).tensor()
            a = np.from_dlpack(view)
            assert not a.flags.writeable
            assert a.ctypes.data == np.frombuffer(view, np.uint8).ctypes.data
            assert sha(a) == sha(pattern(64 * 64))

            with pytest.raises(xcp.InvalidError, match="CUDA"):
                await s.send_tensor(FakeCuda())
            with pytest.raises(xcp.InvalidError, match="not C-contiguous"):
                await s.send_tensor(np.zeros((4, 4)).T)
            assert await s.send_tensor(np.zeros(3), xcp.Ether("tensor.ack")) > 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_aio_sends_do_not_leak(echo):
    base = _xcp._dlpack_live()
    arr = np.frombuffer(pattern(MIB).tobytes(), dtype=np.uint8).copy()

    async def main() -> int:
        async with await xcp.aio.connect(echo.url, require_handles=True) as s:
            for _ in range(50):
                await s.request_tensor(arr, xcp.Ether("tensor.ack"), timeout=30)
            before = rss_bytes()
            for i in range(500):
                region = await s.empty((MIB,), "uint8")
                np.from_dlpack(region)[:] = i % 256
                await s.request_tensor(region, xcp.Ether("tensor.ack"), timeout=30)
                await s.request_tensor(arr, xcp.Ether("tensor.ack"), timeout=30)
            return rss_bytes() - before

    grew = asyncio.run(asyncio.wait_for(main(), 120))
    assert grew < 64 * MIB, f"RSS grew by {grew / MIB:.1f} MiB"
    assert _xcp._dlpack_live() == base


def test_send_tensor_releases_the_gil(echo):
    """send_tensor releases the GIL while it waits, like every other call."""
    with xcp.connect(echo.url) as s:
        ticks = []
        stop = threading.Event()

        def tick() -> None:
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        t = threading.Thread(target=tick)
        t.start()
        try:
            for _ in range(20):
                s.request_tensor(np.zeros(MIB, np.uint8), xcp.Ether("tensor.ack"), timeout=10)
        finally:
            stop.set()
            t.join(timeout=5)
        assert ticks


def test_a_stale_array_does_not_take_a_new_region(echo):
    """An array over a region handed over before, whose slot the pool loaned again, is
    copied when sent again: the new region stays its owner's."""
    with xcp.connect(echo.url, require_handles=True) as s:
        first = s.empty((MIB,), "uint8")
        a = np.from_dlpack(first)
        a[:] = 3
        s.request_tensor(a, xcp.Ether("tensor.ack"), timeout=10)
        assert first.sent
        time.sleep(0.2)  # the ACK: the slot goes back to the pool
        second = s.empty((MIB,), "uint8")
        s.request_tensor(a, xcp.Ether("tensor.ack"), timeout=10)
        assert not second.sent
        second.release()
        del a
