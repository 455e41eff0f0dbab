"""A prefill process hands a KV-cache block to a decode process by handle.

    python examples/kv_handoff.py            # over a Unix socket (memfd handles)
    python examples/kv_handoff.py --tcp      # over TCP on this host (POSIX shm handles)

The producer (this process) starts the consumer as a second process, allocates a region of
the session's shared pool, writes a float32 KV block into it with numpy (no copy: the array is
the shared memory), and sends it as attachment "kv". Only a handle crosses the socket; the
consumer maps the same memory read-only, sums it, and replies with the checksum, which the
producer compares with its own. The consumer's view is released before it replies, so the
producer's region goes back to its pool.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np

import xcp

LAYERS, HEADS, TOKENS, HEAD_DIM = 4, 8, 1024, 128  # 16 MiB of float32


def consumer(url: str) -> None:
    """The decode side: serve one session, answer each KV block with its checksum."""
    with xcp.Server.bind(url) as server:
        print(f"listening on {server.url}", flush=True)
        with server.accept(timeout=30) as session:
            while True:
                try:
                    msg = session.recv()
                except xcp.ClosedError:
                    return
                view = msg.attachments["kv"]
                kv = np.frombuffer(view, dtype=view.dtype).reshape(view.shape)
                checksum = float(kv.sum(dtype=np.float64))
                answer = {"checksum": checksum, "path": view.path, "shape": list(kv.shape)}
                del kv
                view.release()
                session.reply(msg, xcp.Ether("kv.checksum", answer))


def producer(tcp: bool) -> int:
    """The prefill side: start the consumer, hand it a block, check the answer."""
    if tcp:
        url = "tcp://127.0.0.1:0"
    else:
        url = f"unix://{tempfile.mkdtemp(prefix='xcp-kv-', dir='/tmp')}/decode.sock"
    child = subprocess.Popen(
        [sys.executable, __file__, "--consumer", url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        url = line.removeprefix("listening on ")
        with xcp.connect(url) as session:
            shape = (LAYERS, HEADS, TOKENS, HEAD_DIM)
            region = session.alloc(int(np.prod(shape)) * 4)
            kv = np.frombuffer(region, dtype=np.float32).reshape(shape)
            kv[:] = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
            expected = float(kv.sum(dtype=np.float64))
            del kv  # the region is sent once no array points into it
            region.dtype, region.shape = "float32", list(shape)

            start = time.perf_counter()
            reply = session.request(xcp.Ether("kv.block", {"layer_range": [0, LAYERS]}),
                                    attachments={"kv": region})
            elapsed = time.perf_counter() - start
            got = reply.ether.payload
            ok = abs(got["checksum"] - expected) <= 1e-6 * max(1.0, abs(expected))
            print(
                f"{region.nbytes >> 20} MiB KV block by {got['path']} handle: "
                f"round trip {elapsed * 1e3:.2f} ms, checksum {got['checksum']:.4f} "
                f"(expected {expected:.4f}): {'ok' if ok else 'MISMATCH'}"
            )
            return 0 if ok else 1
    finally:
        child.wait(timeout=10)


def main() -> int:
    """Runs the producer, or (with --consumer URL) the consumer."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcp", action="store_true", help="TCP on this host (shm) instead of Unix")
    ap.add_argument("--consumer", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consumer:
        consumer(args.consumer)
        return 0
    return producer(args.tcp)


if __name__ == "__main__":
    sys.exit(main())
