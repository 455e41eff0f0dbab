"""An asyncio embedding service and its clients, on xcp.aio.

    python examples/aio_embedding.py            # over a Unix socket (memfd handles)
    python examples/aio_embedding.py --tcp      # over TCP on this host (POSIX shm handles)

This process starts the service as a second process, then runs CLIENTS client sessions at
once on one event loop, each sending REQUESTS "embed" messages with a batch of texts from as
many tasks, all in flight together, while another task receives the answers. The service
(one event loop, a task per session and per request) answers each with a float32 matrix of
one embedding per text, written with numpy straight into a region of its session's pool and
sent by handle: the client reads the matrix in place (a read-only view of the service's
memory), checks it against the embedding it computes itself, and releases the view, so the
region goes back to the service's pool.

The embedding is a stand-in for a model: hashed character trigrams, L2-normalised.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import zlib

import numpy as np

import xcp
import xcp.aio

DIM = 512
CLIENTS = 4
REQUESTS = 25
BATCH = 32  # 32 x 512 float32: 64 KiB, the size from which regions go by handle


def embed(texts: list[str], out: np.ndarray) -> None:
    """Writes one L2-normalised DIM-vector per text into ``out`` (shape (len(texts), DIM))."""
    out[:] = 0.0
    for row, text in enumerate(texts):
        padded = f"  {text}  "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i : i + 3].encode()) % DIM] += 1.0
        norm = float(np.linalg.norm(out[row]))
        if norm > 0:
            out[row] /= norm


async def serve_session(session: xcp.aio.Session) -> None:
    """Serves one client session: a task per request, until the client closes."""
    async with session, asyncio.TaskGroup() as tg:
        async for msg in session:
            if msg.ether is not None and msg.ether.kind == "embed":
                tg.create_task(answer(session, msg))
            else:
                await session.nack(msg, "ERR_KIND_MISMATCH", detail="this service embeds")


async def answer(session: xcp.aio.Session, msg: xcp.Message) -> None:
    """Answers one "embed" request: the matrix rides on the reply as attachment "emb"."""
    assert msg.ether is not None
    texts = [str(t) for t in msg.ether.payload["texts"]]
    region = await session.alloc(len(texts) * DIM * 4)
    matrix = np.frombuffer(region, dtype=np.float32).reshape(len(texts), DIM)
    embed(texts, matrix)
    del matrix
    region.dtype, region.shape = "float32", [len(texts), DIM]
    # `reply` takes no attachments (in the sync API neither): the answer is a message of its
    # own, naming the request it answers.
    answer = xcp.Ether("embeddings", {"rid": msg.ether.payload["rid"], "count": len(texts)})
    await session.send(answer, attachments={"emb": region})


async def service(url: str) -> None:
    """The service: bind, announce the URL on stdout, serve every session until stdin ends."""
    async with await xcp.aio.Server.bind(url) as server:
        print(f"listening on {server.url}", flush=True)

        async def accept_loop() -> None:
            async with asyncio.TaskGroup() as tg:
                async for session in server:
                    tg.create_task(serve_session(session))

        acceptor = asyncio.create_task(accept_loop())
        # Until our parent closes our stdin.
        await asyncio.to_thread(sys.stdin.read)
        server.close()
        await asyncio.wait_for(acceptor, 30)


async def client(url: str, c: int) -> tuple[int, str]:
    """One client session: REQUESTS requests sent from as many tasks at once, the answers
    received by another task; returns how many embeddings it checked and how they came."""
    checked, path = 0, ""
    batches = {
        r: [f"client {c} request {r} text {i}: the quick brown fox" for i in range(BATCH)]
        for r in range(REQUESTS)
    }
    async with await xcp.aio.connect(url) as session:

        async def one(r: int) -> None:
            await session.send(xcp.Ether("embed", {"rid": r, "texts": batches[r]}))

        async def receive() -> None:
            nonlocal checked, path
            for _ in range(REQUESTS):
                msg = await session.recv(timeout=30)
                assert msg.ether is not None and msg.ether.kind == "embeddings", msg
                texts = batches.pop(msg.ether.payload["rid"])
                with msg.attachments["emb"] as view:
                    got = np.frombuffer(view, dtype=np.float32).reshape(view.shape)
                    want = np.empty((len(texts), DIM), dtype=np.float32)
                    embed(texts, want)
                    if not np.allclose(got, want, atol=1e-6):
                        raise SystemExit(f"client {c}: wrong embeddings in {msg.msg_id}")
                    path = view.path
                    del got
                checked += len(texts)

        receiver = asyncio.create_task(receive())
        await asyncio.gather(*(one(r) for r in range(REQUESTS)))
        await asyncio.wait_for(receiver, 60)
        # A plain request/reply too: the service NACKs what it does not serve.
        try:
            await session.request(xcp.Ether("classify"), timeout=10)
        except xcp.NackError as e:
            assert e.name == "ERR_KIND_MISMATCH", e
    return checked, path


async def clients(url: str) -> int:
    """Runs CLIENTS sessions at once; prints what they saw."""
    start = time.perf_counter()
    results = await asyncio.gather(*(client(url, c) for c in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    total = sum(n for n, _ in results)
    paths = sorted({p for _, p in results})
    print(
        f"{CLIENTS} asyncio clients, {CLIENTS * REQUESTS} requests of {BATCH} texts: "
        f"{total} embeddings of dim {DIM} checked, attachments by {'/'.join(paths)}, "
        f"in {elapsed * 1e3:.1f} ms"
    )
    return 0 if total == CLIENTS * REQUESTS * BATCH else 1


def main() -> int:
    """Starts the service as a child process and runs the clients against it (or, with
    --service URL, is the service)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcp", action="store_true", help="TCP on this host (shm) instead of Unix")
    ap.add_argument("--service", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.service:
        asyncio.run(service(args.service))
        return 0
    url = (
        "tcp://127.0.0.1:0"
        if args.tcp
        else f"unix://{tempfile.mkdtemp(prefix='xcp-emb-', dir='/tmp')}/embed.sock"
    )
    import subprocess

    child = subprocess.Popen(
        [sys.executable, __file__, "--service", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline().strip()
        if not line.startswith("listening on "):
            print(f"the service did not start: {line!r}", file=sys.stderr)
            return 1
        return asyncio.run(asyncio.wait_for(clients(line.removeprefix("listening on ")), 120))
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
