"""A Python XCP peer for the tests, run as its own process: ``python peer.py MODE URL [DIR]``.

It binds ``URL`` (``tcp://127.0.0.1:0`` or ``unix:///...``), prints ``listening on URL``
(the address really bound) on its first stdout line, and serves every connection in a thread
of its own until its stdin closes. MODE is what it does with each message:

- ``echo``: replies with the same Ether. A message with an attachment ``kv`` is answered
  with what the consumer saw of it: every byte checked against the producer's pattern
  (``numpy.arange`` of uint32), how it came (``view.path``), whether numpy's array over it
  is read-only, and which mapping of this process the array's data lies in (read from
  ``/proc/self/maps``: a memfd or a ``/dev/shm`` object means no copy was made). A ``give``
  Ether is answered by a new message (not a reply) with ``payload.nbytes`` bytes attached
  by handle, filled with the same pattern.
  Tensors (``send_tensor``): a ``tensor`` Ether is answered with what the consumer saw of
  ``msg.tensor()`` (see :func:`check_tensor`); ``tensor.ack`` is answered at once (for loops);
  ``tensor.hold`` keeps ``numpy.from_dlpack`` of it (dropping the message and the view) and
  ``tensor.drop`` lets those arrays go (the sender's ACK goes then); ``give.tensor`` is
  answered by a new message whose tensor (``payload.shape`` of ``payload.dtype``, bytes
  ``0, 1, 2, ...`` mod 251) is sent with ``send_tensor`` from a region of ``empty``.
- ``refuse``: NACKs every message with ERR_BUSY, retry_after_ms 250.
- ``silent``: receives and never answers.
- ``close``: closes each session when its first message arrives.

With DIR (for ``tls://`` and ``quic://`` URLs) it binds with the certificates ``xcp cert dev
DIR`` wrote: ``DIR/server.pem``, ``DIR/server.key`` and ``DIR/ca.pem``.
"""

from __future__ import annotations

import hashlib
import sys
import threading

import numpy as np

import xcp


def mapping_of(address: int) -> str:
    """The path column of the line of /proc/self/maps whose range holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else "[anonymous]"
    return "[not mapped]"


def check_kv(msg: xcp.Message) -> xcp.Ether:
    """What the consumer saw of attachment ``kv``."""
    view = msg.attachments["kv"]
    arr = np.frombuffer(view, dtype=np.uint32)
    expected = np.arange(arr.size, dtype=np.uint32)
    result = {
        "ok": bool(np.array_equal(arr, expected)),
        "nbytes": view.nbytes,
        "path": view.path,
        "dtype": view.dtype,
        "shape": list(view.shape),
        "readonly": not arr.flags.writeable,
        "mapping": mapping_of(arr.ctypes.data),
        "checksum": int(arr.sum(dtype=np.uint64)),
    }
    del arr
    view.release()
    return xcp.Ether("kv.checked", result)


def check_tensor(msg: xcp.Message) -> xcp.Ether:
    """What the consumer saw of ``msg.tensor()``: the bytes' sha256, how they came, the
    sender's dtype and shape, and what ``numpy.from_dlpack`` made of them (dtype, shape,
    strides, read-only, whether it lies on the view's bytes and in which mapping)."""
    view = msg.tensor()
    raw = np.frombuffer(view, dtype=np.uint8)
    result: dict[str, object] = {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "path": view.path,
        "dtype": view.dtype,
        "shape": list(view.shape),
        "nbytes": view.nbytes,
        "mapping": mapping_of(raw.ctypes.data),
    }
    try:
        arr = np.from_dlpack(view)
    except Exception as e:  # numpy has no bfloat16
        result["numpy"] = f"{type(e).__name__}: {e}"
    else:
        result["numpy"] = "ok"
        result["np_dtype"] = str(arr.dtype)
        result["np_shape"] = list(arr.shape)
        result["np_strides"] = list(arr.strides)
        result["readonly"] = not arr.flags.writeable
        result["same_memory"] = arr.ctypes.data == raw.ctypes.data
        del arr
    del raw
    view.release()
    return xcp.Ether("tensor.checked", result)


def pattern(nbytes: int) -> np.ndarray:
    """The bytes ``0, 1, 2, ...`` mod 251 (a prime: no period of a power of two)."""
    return (np.arange(nbytes, dtype=np.int64) % 251).astype(np.uint8)


#: Arrays kept by ``tensor.hold`` (per process; the tests use one session at a time).
HELD: list[np.ndarray] = []


def serve(mode: str, session: xcp.Session) -> None:
    """Answers one session's messages as ``mode`` says, until it closes."""
    with session:
        while True:
            try:
                msg = session.recv()
            except xcp.ClosedError:
                return
            ether = msg.ether
            if mode == "refuse":
                session.nack(msg, "ERR_BUSY", retry_after_ms=250, detail="refusing")
            elif mode == "silent":
                continue
            elif mode == "close":
                session.close()
                return
            elif ether is not None and ether.kind == "tensor":
                session.reply(msg, check_tensor(msg), codec=msg.codec.lower())
            elif ether is not None and ether.kind == "tensor.ack":
                msg.tensor().release()
                session.reply(msg, xcp.Ether("ok"))
            elif ether is not None and ether.kind == "tensor.hold":
                HELD.append(np.from_dlpack(msg.tensor()))
                session.reply(msg, xcp.Ether("held"))
            elif ether is not None and ether.kind == "tensor.drop":
                HELD.clear()
                session.reply(msg, xcp.Ether("dropped"))
            elif ether is not None and ether.kind == "give.tensor":
                region = session.empty(tuple(ether.payload["shape"]), ether.payload["dtype"])
                np.frombuffer(region, dtype=np.uint8)[:] = pattern(region.nbytes)
                session.send_tensor(region, xcp.Ether("gift", {"for": msg.msg_id}))
            elif ether is not None and "kv" in msg.attachments:
                session.reply(msg, check_kv(msg), codec=msg.codec.lower())
            elif ether is not None and ether.kind == "give":
                n = int(ether.payload["nbytes"])
                region = session.alloc(n)
                np.frombuffer(region, dtype=np.uint32)[:] = np.arange(n // 4, dtype=np.uint32)
                region.dtype = "uint32"
                session.send(xcp.Ether("gift", {"for": msg.msg_id}), attachments={"kv": region})
            elif ether is not None:
                session.reply(msg, ether, codec=msg.codec.lower())


def main() -> None:
    """Binds, announces the URL, and serves until stdin closes."""
    mode, url = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        d = sys.argv[3]
        server = xcp.Server.bind(
            url, cert=f"{d}/server.pem", key=f"{d}/server.key", ca=f"{d}/ca.pem"
        )
    else:
        server = xcp.Server.bind(url)
    print(f"listening on {server.url}", flush=True)

    def accept_loop() -> None:
        while True:
            try:
                session = server.accept()
            except xcp.ClosedError:
                return
            threading.Thread(target=serve, args=(mode, session), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    sys.stdin.read()
    server.close()


if __name__ == "__main__":
    main()
