"""``python -m xcp.bench``: xcp from Python against the usual ways of moving data between two
Python processes on one host, in one run, side by side.

Two workloads, each between this process (the client, which times) and a server process of
its own per transport (started with multiprocessing's ``"spawn"`` method):

- **request/reply**: the client sends ``--small-size`` bytes (default 64) and waits for a
  tiny reply; the server reads every byte first. One request at a time.
- **hand-off**: the client hands over a ``--large-size`` array (default 64 MiB) and waits
  for the server's reply, which comes after the server has read every byte (a uint64 sum
  over the received buffer, the same touch on every row). One at a time; MB/s is the size
  over the median round trip.

The transports (rows):

- ``xcp-memfd``: xcp over a Unix socket, the array in a region of the session's pool (memfd),
  passed by handle; the receiver reads the sender's memory (no copy).
- ``xcp-ring``: as ``xcp-memfd``, the client asking for the same-host ring (``ring://``):
  every frame goes through shared memory, the Unix socket carries only the memfd
  descriptors and wake-ups.
- ``xcp-shm``: xcp over TCP on 127.0.0.1, by POSIX shm handle.
- ``xcp-inline``: xcp over TCP with ``handles=False``: the bytes travel in the messages.
- ``pyzmq``: a REQ/REP pair over TCP, pyzmq's defaults (``send(array)``, ``recv()``: the
  receiver gets a copy in a ``bytes``). Skipped with a reason when pyzmq is not installed.
- ``mp-pipe-pickle``: ``multiprocessing.Pipe``, ``conn.send(array)`` (pickled) and
  ``conn.recv()``.
- ``mp-shared-memory``: the array lives in one ``multiprocessing.shared_memory`` block made
  before the loop (the receiver attaches once); each hand-off is a small message on a
  ``multiprocessing.Pipe`` and the reply on it.
- ``xcp-unix-to-rust``, ``xcp-tcp-to-rust``: request/reply only, the Python xcp client
  against the Rust echo server (``xcp serve``): the Python client's own cost, next to the
  Rust client's (the rows above pay Python on both ends).
- ``rust-*``: the Rust client's own figures for the same kind of session, from one run of the
  ``xcp`` binary's ``xcp bench`` (paths ``unix``, ``ring``, ``tcp``, ``memfd-touch``,
  ``shm-touch``; the latency phase, one request at a time): ``rust-unix`` is the 64 B figure
  of the memfd row's session kind and ``rust-memfd-touch`` its hand-off (and the ring row's),
  ``rust-ring`` the ring row's 64 B figure, ``rust-tcp`` both figures of the inline row and
  the 64 B figure of the shm row, ``rust-shm-touch`` the shm row's hand-off.

The table gives p50 and p99 round trips, MB/s for the hand-off, and ratios: ``x pickle``,
``x zmq``, ``x shm`` (how many times faster than that baseline: its p50 over this row's) and
``/rust`` (this row's p50 over the Rust client's for the same kind of session). ``--json
FILE`` writes every figure, the settings and the machine.

Options: ``--quick`` (short phases), ``--iterations N`` and ``--duration S`` (each phase
stops at whichever comes first), ``--small-size``, ``--large-size``, ``--rows LIST``,
``--xcp-bin PATH`` (default: ``$XCP_BIN``, else ``target/release/xcp`` or
``target/debug/xcp`` of the repository this package sits in, else ``xcp`` on PATH),
``--no-rust``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]

#: The rows in the order they run and print.
PY_ROWS = [
    "xcp-memfd",
    "xcp-ring",
    "xcp-shm",
    "xcp-inline",
    "pyzmq",
    "mp-pipe-pickle",
    "mp-shared-memory",
    "xcp-unix-to-rust",
    "xcp-tcp-to-rust",
]
#: The rows whose server is the Rust binary's echo server (``xcp serve``): the Python
#: client alone against the Rust client, request/reply only.
TO_RUST = {"xcp-unix-to-rust": "unix", "xcp-tcp-to-rust": "tcp"}
RUST_ROWS = ["rust-unix", "rust-ring", "rust-tcp", "rust-memfd-touch", "rust-shm-touch"]

#: What each row is, for the table's legend and the JSON.
DESCRIPTIONS = {
    "xcp-memfd": "xcp, Unix socket, memfd handle (receiver reads the sender's memory)",
    "xcp-ring": "xcp, same-host ring (ring://: frames in shared memory), memfd handle",
    "xcp-shm": "xcp, TCP 127.0.0.1, POSIX shm handle",
    "xcp-inline": "xcp, TCP 127.0.0.1, handles=False: bytes inline in the messages",
    "pyzmq": "pyzmq REQ/REP over TCP 127.0.0.1 (defaults: the receiver gets a bytes copy)",
    "mp-pipe-pickle": "multiprocessing.Pipe, conn.send(array) pickled, conn.recv()",
    "mp-shared-memory": "multiprocessing.shared_memory block made once; signal and reply on a Pipe",
    "xcp-unix-to-rust": "xcp client in Python, Unix socket, to the Rust echo server (xcp serve)",
    "xcp-tcp-to-rust": "xcp client in Python, TCP 127.0.0.1, to the Rust echo server (xcp serve)",
    "rust-unix": "the Rust client (xcp bench, path unix): XCP over a Unix socket, bytes inline",
    "rust-ring": "the Rust client (xcp bench, path ring): XCP through the same-host ring, bytes inline",
    "rust-tcp": "the Rust client (xcp bench, path tcp): XCP over TCP, bytes inline",
    "rust-memfd-touch": "the Rust client (xcp bench, memfd-touch): by memfd handle, receiver reads every byte",
    "rust-shm-touch": "the Rust client (xcp bench, shm-touch): by shm handle, receiver reads every byte",
}

#: The Rust row that is the same kind of session as an xcp row, per workload.
RUST_TWIN = {
    ("xcp-memfd", "request-reply"): "rust-unix",
    ("xcp-memfd", "hand-off"): "rust-memfd-touch",
    ("xcp-ring", "request-reply"): "rust-ring",
    ("xcp-ring", "hand-off"): "rust-memfd-touch",
    ("xcp-shm", "request-reply"): "rust-tcp",
    ("xcp-shm", "hand-off"): "rust-shm-touch",
    ("xcp-inline", "request-reply"): "rust-tcp",
    ("xcp-inline", "hand-off"): "rust-tcp",
    ("xcp-unix-to-rust", "request-reply"): "rust-unix",
    ("xcp-tcp-to-rust", "request-reply"): "rust-tcp",
}

#: The Rust bench rows each Rust row is read from, per workload (request-reply at the
#: small size, hand-off at the large size).
RUST_PATHS = {
    "rust-unix": ("unix", ("request-reply",)),
    "rust-ring": ("ring", ("request-reply",)),
    "rust-tcp": ("tcp", ("request-reply", "hand-off")),
    "rust-memfd-touch": ("memfd-touch", ("hand-off",)),
    "rust-shm-touch": ("shm-touch", ("hand-off",)),
}

#: How long a server or client waits for any one answer before it gives up (seconds).
ANSWER_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------
# The touch: every byte read, the same way on every row.


def touch(buf: Any, nbytes: int) -> int:
    """A checksum over the first ``nbytes`` of ``buf`` (anything with the buffer protocol):
    a uint64 sum over its 8-byte words plus the trailing bytes, so every byte is read."""
    import numpy as np

    words = nbytes // 8
    total = 0
    if words:
        total = int(np.frombuffer(buf, dtype=np.uint64, count=words).sum(dtype=np.uint64))
    rest = nbytes - words * 8
    if rest:
        tail = np.frombuffer(buf, dtype=np.uint8, count=nbytes)[words * 8 :]
        total += int(tail.sum(dtype=np.uint64))
    return total & 0xFFFF_FFFF_FFFF_FFFF


def pattern(nbytes: int) -> Any:
    """A uint8 array of ``nbytes`` whose checksum is not zero."""
    import numpy as np

    return (np.arange(nbytes, dtype=np.uint64) % 251).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Servers: each runs in a spawned process, gets its settings and a control connection, and
# sends ("ready", address) on it once it listens (or ("error", text)).


def _serve_xcp(ctl: multiprocessing.connection.Connection, row: str, sock_dir: str) -> None:
    import xcp

    if row in ("xcp-memfd", "xcp-ring"):
        url = f"unix://{sock_dir}/bench.sock"
    else:
        url = "tcp://127.0.0.1:0"
    handles = row != "xcp-inline"
    ok = xcp.Ether("ok")
    with xcp.Server.bind(url, handles=handles) as server:
        ctl.send(("ready", server.url))
        with server.accept(timeout=ANSWER_TIMEOUT) as session:
            while True:
                try:
                    msg = session.recv(timeout=ANSWER_TIMEOUT)
                except xcp.ClosedError:
                    return
                ether = msg.ether
                kind = ether.kind if ether is not None else ""
                if kind == "bye":
                    session.reply(msg, ok)
                    return
                view = msg.attachments["d"]
                total = touch(view, view.nbytes)
                path = view.path
                view.release()
                if kind == "rr":
                    session.reply(msg, ok, codec="protobuf")
                else:
                    answer = xcp.Ether("sum", {"sum": str(total), "path": path})
                    session.reply(msg, answer, codec="protobuf")


def _serve_zmq(ctl: multiprocessing.connection.Connection) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.RCVTIMEO, int(ANSWER_TIMEOUT * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(ANSWER_TIMEOUT * 1000))
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ctl.send(("ready", f"tcp://127.0.0.1:{port}"))
    try:
        while True:
            data = sock.recv()
            if data == b"bye":
                sock.send(b"ok")
                return
            total = touch(data, len(data))
            sock.send(total.to_bytes(8, "little"))
    finally:
        sock.close(0)
        ctx.term()


def _serve_pipe(
    ctl: multiprocessing.connection.Connection, data: multiprocessing.connection.Connection
) -> None:
    ctl.send(("ready", "pipe"))
    while True:
        if not data.poll(ANSWER_TIMEOUT):
            return
        obj = data.recv()
        if isinstance(obj, str) and obj == "bye":
            data.send("ok")
            return
        data.send(touch(obj, obj.nbytes))


def _serve_shm(
    ctl: multiprocessing.connection.Connection, data: multiprocessing.connection.Connection
) -> None:
    from multiprocessing import shared_memory

    ctl.send(("ready", "pipe"))
    attached: dict[str, shared_memory.SharedMemory] = {}
    try:
        while True:
            if not data.poll(ANSWER_TIMEOUT):
                return
            raw = data.recv_bytes()
            if raw == b"bye":
                data.send_bytes(b"ok")
                return
            name, _, size = raw.decode().partition(" ")
            block = attached.get(name)
            if block is None:
                # Attached once (Python < 3.13 registers it with the resource tracker, which
                # a spawned child shares with its parent, the block's creator and unlinker).
                block = shared_memory.SharedMemory(name=name)
                attached[name] = block
            total = touch(block.buf, int(size))
            data.send_bytes(total.to_bytes(8, "little"))
    finally:
        for block in attached.values():
            block.close()


def _server_main(
    row: str,
    ctl: multiprocessing.connection.Connection,
    data: multiprocessing.connection.Connection | None,
    sock_dir: str,
) -> None:
    """The entry of a server process (spawned)."""
    try:
        if row.startswith("xcp-"):
            _serve_xcp(ctl, row, sock_dir)
        elif row == "pyzmq":
            _serve_zmq(ctl)
        elif row == "mp-pipe-pickle":
            assert data is not None
            _serve_pipe(ctl, data)
        elif row == "mp-shared-memory":
            assert data is not None
            _serve_shm(ctl, data)
    except BaseException as e:  # reported to the client, which fails the row
        try:
            ctl.send(("error", f"{type(e).__name__}: {e}"))
        except Exception:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# Clients: each gives a function doing one round trip of a workload, and one to end.


class Client:
    """One transport's client side: ``rr()`` one request/reply of the small payload,
    ``handoff()`` one hand-off of the large array (returns the receiver's checksum and how
    the bytes came), ``close()``."""

    def rr(self) -> None:
        raise NotImplementedError

    def handoff(self) -> tuple[int, str]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class XcpClient(Client):
    def __init__(self, row: str, url: str, small: int, large: int) -> None:
        import numpy as np

        import xcp

        self.xcp = xcp
        if row == "xcp-ring":
            # The server is the Unix socket's; the client asks for the ring.
            url = url.replace("unix://", "ring://", 1)
        self.session = xcp.connect(url, handles=row != "xcp-inline", request_timeout=ANSWER_TIMEOUT)
        if row == "xcp-ring" and not self.session.negotiated["ring"]:
            raise RuntimeError("the server did not agree to the ring")
        self.small_payload = bytes(pattern(small))
        self.large = large
        self.rr_ether = xcp.Ether("rr")
        self.big_ether = xcp.Ether("big")
        self.np = np
        self.data = pattern(large)
        #: The pool slots written so far (by address): the producer's data is written once
        #: into each slot of the pool, as into the shared_memory block of that row once;
        #: each hand-off sends a fresh region of the pool (after an ACK the pool hands the
        #: same slots out again).
        self.filled: set[int] = set()

    def rr(self) -> None:
        # PROTOBUF: bytes as bytes (JSON carries inline attachment bytes in base64).
        self.session.request(
            self.rr_ether,
            attachments={"d": self.small_payload},
            codec="protobuf",
            timeout=ANSWER_TIMEOUT,
        )

    def handoff(self) -> tuple[int, str]:
        region = self.session.alloc(self.large)
        arr = self.np.frombuffer(region, dtype=self.np.uint8)
        address = arr.ctypes.data
        if address not in self.filled:
            arr[:] = self.data
            self.filled.add(address)
        del arr
        reply = self.session.request(
            self.big_ether, attachments={"d": region}, codec="protobuf", timeout=ANSWER_TIMEOUT
        )
        assert reply.ether is not None
        p = reply.ether.payload
        return int(p["sum"]), str(p["path"])

    def close(self) -> None:
        try:
            self.session.request(self.xcp.Ether("bye"), timeout=10)
        finally:
            self.session.close()


class ZmqClient(Client):
    def __init__(self, url: str, small: int, large: int) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.RCVTIMEO, int(ANSWER_TIMEOUT * 1000))
        self.sock.setsockopt(zmq.SNDTIMEO, int(ANSWER_TIMEOUT * 1000))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.small_payload = bytes(pattern(small))
        self.array = pattern(large)

    def rr(self) -> None:
        self.sock.send(self.small_payload)
        self.sock.recv()

    def handoff(self) -> tuple[int, str]:
        self.sock.send(self.array)
        return int.from_bytes(self.sock.recv(), "little"), "tcp copy"

    def close(self) -> None:
        try:
            self.sock.send(b"bye")
            self.sock.recv()
        finally:
            self.sock.close(0)
            self.ctx.term()


def _answer(conn: multiprocessing.connection.Connection) -> None:
    if not conn.poll(ANSWER_TIMEOUT):
        raise TimeoutError(f"no answer from the server within {ANSWER_TIMEOUT} s")


class PipeClient(Client):
    def __init__(self, conn: multiprocessing.connection.Connection, small: int, large: int) -> None:
        self.conn = conn
        self.small_array = pattern(small)
        self.array = pattern(large)

    def rr(self) -> None:
        self.conn.send(self.small_array)
        _answer(self.conn)
        self.conn.recv()

    def handoff(self) -> tuple[int, str]:
        self.conn.send(self.array)
        _answer(self.conn)
        return int(self.conn.recv()), "pickle"

    def close(self) -> None:
        self.conn.send("bye")
        _answer(self.conn)
        self.conn.recv()


class ShmClient(Client):
    def __init__(self, conn: multiprocessing.connection.Connection, small: int, large: int) -> None:
        import numpy as np
        from multiprocessing import shared_memory

        self.conn = conn
        self.blocks = []
        self.signals = []
        for n in (small, large):
            block = shared_memory.SharedMemory(create=True, size=n)
            arr = np.frombuffer(block.buf, dtype=np.uint8, count=n)
            arr[:] = pattern(n)
            del arr
            self.blocks.append(block)
            self.signals.append(f"{block.name} {n}".encode())

    def _one(self, signal: bytes) -> int:
        self.conn.send_bytes(signal)
        _answer(self.conn)
        return int.from_bytes(self.conn.recv_bytes(), "little")

    def rr(self) -> None:
        self._one(self.signals[0])

    def handoff(self) -> tuple[int, str]:
        return self._one(self.signals[1]), "shared_memory"

    def close(self) -> None:
        try:
            self.conn.send_bytes(b"bye")
            _answer(self.conn)
            self.conn.recv_bytes()
        finally:
            for block in self.blocks:
                block.close()
                block.unlink()


# ---------------------------------------------------------------------------------------------
# Timing.


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values."""
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def timed(one: Callable[[], Any], iterations: int, duration: float, warmup: int) -> list[float]:
    """Round-trip times (seconds) of ``one()``, after ``warmup`` untimed calls: ``iterations``
    of them, or as many as fit in ``duration`` seconds (at least 3)."""
    for _ in range(warmup):
        one()
    out: list[float] = []
    clock = time.perf_counter
    end = clock() + duration
    while len(out) < iterations:
        t0 = clock()
        one()
        t1 = clock()
        out.append(t1 - t0)
        if t1 > end and len(out) >= 3:
            break
    return out


def figures(samples: list[float], size: int) -> dict[str, Any]:
    """p50/p99/mean in microseconds, and MB/s of ``size`` bytes per median round trip."""
    s = sorted(samples)
    p50 = quantile(s, 0.50)
    return {
        "samples": len(s),
        "p50_us": p50 * 1e6,
        "p99_us": quantile(s, 0.99) * 1e6,
        "mean_us": sum(s) / len(s) * 1e6,
        "max_us": s[-1] * 1e6,
        "mb_per_s": size / p50 / 1e6 if p50 > 0 else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# The run.


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.small: int = args.small_size
        self.large: int = args.large_size
        self.rr_iterations: int = args.iterations or (300 if self.quick else 5000)
        self.handoff_iterations: int = args.iterations or (10 if self.quick else 100)
        self.duration: float = args.duration or (0.3 if self.quick else 3.0)
        self.rows: list[str] = args.rows
        self.xcp_bin: str | None = args.xcp_bin
        self.rust: bool = not args.no_rust

    def as_dict(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "small_size": self.small,
            "large_size": self.large,
            "request_reply_iterations": self.rr_iterations,
            "handoff_iterations": self.handoff_iterations,
            "duration_s": self.duration,
            "rows": self.rows,
            "xcp_bin": self.xcp_bin,
        }


def missing_package(row: str) -> str | None:
    """Why ``row`` cannot run here (a package it needs is not installed), or None."""
    import importlib.util

    need = ["numpy"]
    if row == "pyzmq":
        need.append("zmq")
    for name in need:
        if importlib.util.find_spec(name) is None:
            package = {"zmq": "pyzmq"}.get(name, name)
            return f"{package} is not installed (pip install {package})"
    return None


def run_python_row(row: str, st: Settings, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Both workloads of one transport: one server process, one client here."""
    workloads = [("request-reply", st.small), ("hand-off", st.large)]
    base = [{"name": row, "workload": w, "size": n, "description": DESCRIPTIONS[row]} for w, n in workloads]
    reason = missing_package(row)
    if reason is not None:
        for r in base:
            r.update(status="skipped", reason=reason)
            progress(f"{row:<17} {r['workload']:<13} skipped: {reason}")
        return base
    # The server's entry by its module's name (not __main__, under `python -m xcp.bench`).
    from xcp import bench as this

    ctx = multiprocessing.get_context("spawn")
    ctl_here, ctl_there = ctx.Pipe()
    data_here = data_there = None
    if row in ("mp-pipe-pickle", "mp-shared-memory"):
        data_here, data_there = ctx.Pipe()
    sock_dir = tempfile.mkdtemp(prefix="xcp-bench-", dir="/tmp")
    proc = ctx.Process(
        target=this._server_main, args=(row, ctl_there, data_there, sock_dir), daemon=True
    )
    client: Client | None = None
    try:
        proc.start()
        if not ctl_here.poll(60):
            raise TimeoutError("the server process did not start within 60 s")
        status, address = ctl_here.recv()
        if status != "ready":
            raise RuntimeError(f"server: {address}")
        if row.startswith("xcp-"):
            client = XcpClient(row, address, st.small, st.large)
        elif row == "pyzmq":
            client = ZmqClient(address, st.small, st.large)
        elif row == "mp-pipe-pickle":
            assert data_here is not None
            client = PipeClient(data_here, st.small, st.large)
        else:
            assert data_here is not None
            client = ShmClient(data_here, st.small, st.large)
        expected = touch(pattern(st.large), st.large)
        # request/reply
        samples = timed(client.rr, st.rr_iterations, st.duration, warmup=min(100, st.rr_iterations))
        base[0].update(status="ok", **figures(samples, st.small))
        progress(_progress_line(base[0]))
        # hand-off: the receiver's checksum is checked on the warm-up round and the last.
        total, path = client.handoff()
        if total != expected:
            raise RuntimeError(f"hand-off: the receiver's checksum {total} != {expected}")
        samples = timed(client.handoff, st.handoff_iterations, st.duration, warmup=3)
        total, path = client.handoff()
        if total != expected:
            raise RuntimeError(f"hand-off: the receiver's checksum {total} != {expected}")
        base[1].update(status="ok", path=path, **figures(samples, st.large))
        progress(_progress_line(base[1]))
        client.close()
        client = None
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if ctl_here.poll(0):
            try:
                _, server_text = ctl_here.recv()
                text += f" (server: {server_text})"
            except Exception:
                pass
        for r in base:
            if r.get("status") != "ok":
                r.update(status="failed", reason=text)
                progress(f"{row:<17} {r['workload']:<13} FAILED: {text}")
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        shutil.rmtree(sock_dir, ignore_errors=True)
    return base


def run_to_rust_row(row: str, st: Settings, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """The Python client's request/reply against the Rust echo server (``xcp serve``), which
    sends each request's body back (with its 64 B inline attachment): the client's cost
    alone, next to the Rust client's on the same kind of session."""
    import select

    import xcp

    out = [
        {"name": row, "workload": w, "size": n, "description": DESCRIPTIONS[row]}
        for w, n in (("request-reply", st.small), ("hand-off", st.large))
    ]
    out[1].update(status="skipped", reason="the Rust echo server does not read attachments")
    exe = find_xcp_bin(st.xcp_bin)
    if exe is None or not os.access(exe, os.X_OK):
        out[0].update(status="skipped", reason="no xcp binary (--xcp-bin)")
        progress(f"{row:<17} request-reply skipped: no xcp binary")
        return out
    sock_dir = tempfile.mkdtemp(prefix="xcp-bench-", dir="/tmp")
    url = f"unix://{sock_dir}/serve.sock" if TO_RUST[row] == "unix" else "tcp://127.0.0.1:0"
    proc = subprocess.Popen(
        [exe, "serve", "--listen", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().strip() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"xcp serve: expected 'listening on URL', got {line!r}")
        with xcp.connect(line.removeprefix("listening on "), request_timeout=ANSWER_TIMEOUT) as s:
            ether = xcp.Ether("rr")
            payload = bytes(pattern(st.small))

            def one() -> None:
                s.request(ether, attachments={"d": payload}, codec="protobuf", timeout=ANSWER_TIMEOUT)

            samples = timed(one, st.rr_iterations, st.duration, warmup=min(100, st.rr_iterations))
        out[0].update(status="ok", **figures(samples, st.small))
        progress(_progress_line(out[0]))
    except Exception as e:
        out[0].update(status="failed", reason=f"{type(e).__name__}: {e}")
        progress(f"{row:<17} request-reply FAILED: {out[0]['reason']}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return out


def _progress_line(r: dict[str, Any]) -> str:
    line = (
        f"{r['name']:<17} {r['workload']:<13} {size_label(r['size']):>8}  p50 {us_label(r['p50_us'])}"
        f"  p99 {us_label(r['p99_us'])}  ({r['samples']} round trips)"
    )
    if r["workload"] == "hand-off":
        line += f"  {r['mb_per_s']:.0f} MB/s"
    return line


def find_xcp_bin(given: str | None) -> str | None:
    """The ``xcp`` binary: ``given``, ``$XCP_BIN``, the repository's target/release or
    target/debug (this package's source tree), or ``xcp`` on PATH."""
    if given:
        return given
    env = os.environ.get("XCP_BIN")
    if env:
        return env
    here = Path(__file__).resolve()
    for repo in here.parents:
        if (repo / "Cargo.toml").is_file() and (repo / "python").is_dir():
            for kind in ("release", "debug"):
                p = repo / "target" / kind / "xcp"
                if os.access(p, os.X_OK):
                    return str(p)
            break
    return shutil.which("xcp")


def run_rust_rows(st: Settings, progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The Rust client's figures: one ``xcp bench`` run over the paths the xcp rows match."""
    rows: list[dict[str, Any]] = []
    for name in RUST_ROWS:
        for w in RUST_PATHS[name][1]:
            size = st.small if w == "request-reply" else st.large
            rows.append({"name": name, "workload": w, "size": size, "description": DESCRIPTIONS[name]})
    info: dict[str, Any] = {}
    if not st.rust:
        for r in rows:
            r.update(status="skipped", reason="--no-rust")
        return rows, info
    exe = find_xcp_bin(st.xcp_bin)
    if exe is None or not os.access(exe, os.X_OK):
        reason = f"no xcp binary ({exe or 'none found'}): build it (cargo build --release --bin xcp) or pass --xcp-bin"
        for r in rows:
            r.update(status="skipped", reason=reason)
            progress(f"{r['name']:<17} {r['workload']:<13} skipped: {reason}")
        return rows, info
    sizes = sorted({max(33, st.small), max(33, st.large)})
    with tempfile.TemporaryDirectory(prefix="xcp-bench-rust-") as tmp:
        out = Path(tmp) / "rust.json"
        phase = max(0.05, st.duration / 3) if st.quick else max(0.5, st.duration / 2)
        cmd = [
            exe,
            "bench",
            "--paths",
            ",".join(RUST_PATHS[n][0] for n in RUST_ROWS),
            "--sizes",
            ",".join(str(s) for s in sizes),
            "--duration",
            f"{phase:g}",
            "--iterations",
            str(max(st.rr_iterations, 100)),
            "--json",
            str(out),
        ]
        info["command"] = " ".join(cmd)
        progress(f"rust: {' '.join(cmd)}")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0 or not out.is_file():
                raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
            report = json.loads(out.read_text())
        except Exception as e:
            reason = f"xcp bench failed: {type(e).__name__}: {e}"
            for r in rows:
                r.update(status="failed", reason=reason)
                progress(f"{r['name']:<17} {r['workload']:<13} FAILED: {reason}")
            return rows, info
    info["machine"] = report.get("machine")
    info["settings"] = report.get("settings")
    by = {(r["path"], r["size"]): r for r in report.get("rows", [])}
    for r in rows:
        path = RUST_PATHS[r["name"]][0]
        got = by.get((path, max(33, r["size"])))
        if got is None or not got.get("latency"):
            r.update(status="failed", reason=f"xcp bench gave no row {path} at {r['size']} B")
            continue
        lat = got["latency"]
        r.update(
            status="ok",
            samples=lat.get("samples"),
            p50_us=lat["p50_us"],
            p99_us=lat["p99_us"],
            mean_us=lat.get("mean_us"),
            max_us=lat.get("max_us"),
            mb_per_s=r["size"] / (lat["p50_us"] * 1e-6) / 1e6 if lat["p50_us"] else math.nan,
            rust_throughput_mb_per_s=(got.get("throughput") or {}).get("mb_per_s"),
        )
        progress(_progress_line(r))
    return rows, info


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """The ratio columns: x pickle / x zmq / x shm (baseline p50 over this row's) and /rust
    (this row's p50 over the Rust client's of the same kind of session)."""
    by = {(r["name"], r["workload"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for key, base in (
            ("x_pickle", "mp-pipe-pickle"),
            ("x_zmq", "pyzmq"),
            ("x_shm", "mp-shared-memory"),
        ):
            b = by.get((base, r["workload"]))
            r[key] = b["p50_us"] / r["p50_us"] if b and r["p50_us"] else None
        twin = RUST_TWIN.get((r["name"], r["workload"]))
        t = by.get((twin, r["workload"])) if twin else None
        r["rust_twin"] = twin
        r["x_rust"] = r["p50_us"] / t["p50_us"] if t and t["p50_us"] else None


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it compares and whether it holds."""
    by = {(r["name"], r["workload"]): r for r in rows if r.get("status") == "ok"}
    out: list[dict[str, Any]] = []

    def add(what: str, row: str, workload: str, key: str, ok: Callable[[float], bool]) -> None:
        r = by.get((row, workload))
        v = r.get(key) if r else None
        out.append({"check": what, "value": v, "holds": None if v is None else bool(ok(v))})

    for row in ("xcp-memfd", "xcp-ring", "xcp-shm"):
        add(f"{row} hand-off >= 100x faster than Pipe+pickle", row, "hand-off", "x_pickle", lambda v: v >= 100)
        add(f"{row} hand-off >= 50x faster than pyzmq", row, "hand-off", "x_zmq", lambda v: v >= 50)
        add(f"{row} hand-off within 1.5x of shared_memory", row, "hand-off", "x_shm", lambda v: v >= 1 / 1.5)
    for row in ("xcp-memfd", "xcp-ring", "xcp-shm", "xcp-inline", "xcp-unix-to-rust", "xcp-tcp-to-rust"):
        add(f"{row} request/reply <= 1.3x the Rust client", row, "request-reply", "x_rust", lambda v: v <= 1.3)
        add(f"{row} request/reply no slower than pyzmq", row, "request-reply", "x_zmq", lambda v: v >= 1.0)
    return out


def size_label(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def us_label(us: float | None) -> str:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "-"
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us"


def ratio_label(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}x"
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, one section per workload."""
    lines: list[str] = []
    head = "| row | size | p50 | p99 | MB/s | x pickle | x zmq | x shm | /rust | note |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for workload, title in (("request-reply", "request/reply"), ("hand-off", "hand-off, receiver reads every byte")):
        lines.append(f"**{title}**")
        lines.append("")
        lines.append(head)
        lines.append(rule)
        for r in rows:
            if r["workload"] != workload:
                continue
            if r.get("status") != "ok":
                lines.append(
                    f"| {r['name']} | {size_label(r['size'])} | - | - | - | - | - | - | - | "
                    f"{r.get('status')}: {r.get('reason', '')} |"
                )
                continue
            mbs = f"{r['mb_per_s']:.0f}" if workload == "hand-off" else "-"
            note = []
            if r.get("path"):
                note.append(f"path {r['path']}")
            if r.get("rust_twin"):
                note.append(f"/rust vs {r['rust_twin']}")
            lines.append(
                f"| {r['name']} | {size_label(r['size'])} | {us_label(r['p50_us'])} | {us_label(r['p99_us'])} | {mbs} | "
                f"{ratio_label(r.get('x_pickle'))} | {ratio_label(r.get('x_zmq'))} | {ratio_label(r.get('x_shm'))} | "
                f"{ratio_label(r.get('x_rust'))} | {'; '.join(note)} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("numpy", "zmq"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import xcp

        info["xcp"] = xcp.__version__
        info["xcp_extension"] = xcp._xcp.__file__
    except Exception:
        pass
    return info


def run(st: Settings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the bench; returns the report (what ``--json`` writes)."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for row in PY_ROWS:
        if row in st.rows:
            if row in TO_RUST:
                rows.extend(run_to_rust_row(row, st, say))
            else:
                rows.extend(run_python_row(row, st, say))
    rust_rows, rust_info = run_rust_rows(st, say)
    rows.extend(rust_rows)
    add_ratios(rows)
    return {
        "machine": machine(),
        "settings": st.as_dict(),
        "method": (
            "Each server is a separate Python process (multiprocessing spawn); this process "
            "times one round trip at a time. request-reply: small_size bytes to the server, "
            "which reads them, and a tiny reply. hand-off: a large_size array to the server, "
            "which reads every byte (uint64 sum) before it replies; mb_per_s = size / p50. "
            "x_pickle, x_zmq, x_shm: that baseline's p50 / this row's p50 (times faster). "
            "x_rust: this row's p50 / the Rust client's p50 on the same kind of session "
            "(xcp bench latency phase)."
        ),
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "rust": rust_info,
        "checks": checks(rows),
    }


def parse_size(text: str) -> int:
    """``64``, ``16KiB``, ``64MiB``, ``1M``, ``2G``: a byte count."""
    t = text.strip().lower().replace(" ", "")
    for suffix, k in (("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10), ("b", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * k)
    return int(t)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m xcp.bench",
        description="xcp from Python against pyzmq, multiprocessing.Pipe + pickle and "
        "multiprocessing.shared_memory, and the Rust client, in one run.",
    )
    p.add_argument("--quick", action="store_true", help="short phases (a few seconds in all)")
    p.add_argument("--iterations", type=int, help="the most round trips of each phase")
    p.add_argument("--duration", type=float, help="the most seconds of each phase")
    p.add_argument("--small-size", type=parse_size, default=64, help="request/reply bytes (default 64)")
    p.add_argument("--large-size", type=parse_size, default=64 << 20, help="hand-off bytes (default 64MiB)")
    p.add_argument(
        "--rows",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(PY_ROWS),
        help=f"the Python rows to run (default all: {','.join(PY_ROWS)})",
    )
    p.add_argument("--xcp-bin", help="the xcp binary for the Rust rows")
    p.add_argument("--no-rust", action="store_true", help="skip the Rust client's rows")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in PY_ROWS]
    if unknown:
        p.error(f"unknown rows {unknown} (of {PY_ROWS})")
    if args.small_size < 1 or args.large_size < 1:
        p.error("sizes must be at least 1 byte")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    st = Settings(args)
    report = run(st)
    m = report["machine"]
    print(
        f"\nxcp.bench, {m['date']}, {m.get('cpu_model', '?')}, {m['cores']} cores, Python {m['python']}, "
        f"numpy {m['numpy']}, pyzmq {m['zmq'] or 'not installed'}; one run\n"
    )
    print(table(report["rows"]))
    for c in report["checks"]:
        verdict = {True: "yes", False: "NO", None: "-"}[c["holds"]]
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        print(f"  {verdict:<3} {c['check']} ({value})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    failed = [r for r in report["rows"] if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
