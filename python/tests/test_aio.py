"""The asyncio API ``xcp.aio``: between processes (a sync Python peer, the Rust ``xcp serve``
and ``xcp send``/``xcp ping``, sync clients) and between tasks of one loop over real sockets.

Every test runs its coroutine with ``run`` (``asyncio.run`` under an overall deadline), and
every await that could wait has a timeout of its own, so a failure never hangs the suite.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest
from test_rust_serve import crc32c

import xcp
import xcp.aio

#: The deadline of a whole test's coroutine, in seconds.
DEADLINE = 60


def run(coro: Coroutine[Any, Any, Any], deadline: float = DEADLINE) -> Any:
    """Runs ``coro`` in a fresh event loop, failing (not hanging) after ``deadline``."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, deadline)

    return asyncio.run(bounded())


async def echo_server(url: str, *, delay_kind: str = "slow", delay: float = 1.0):
    """An aio server in this loop that answers every request with its Ether (``delay``
    seconds late for Ethers of kind ``delay_kind``); returns the server and its task."""
    server = await xcp.aio.Server.bind(url)

    async def serve_one(s: xcp.aio.Session) -> None:
        async with s:
            async for msg in s:
                if msg.ether is not None and msg.ether.kind == delay_kind:
                    await asyncio.sleep(delay)
                await s.reply(msg, msg.ether)

    async def accept_loop() -> None:
        async with asyncio.TaskGroup() as tg:
            async for s in server:
                tg.create_task(serve_one(s))

    return server, asyncio.create_task(accept_loop())


# ---------------------------------------------------------------------------------------------
# Round trips against a sync Python peer in another process.


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_round_trip_with_sync_python_peer(python_peer, url_for, transport):
    peer = python_peer("echo", url_for(transport))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            assert not s.closed
            assert "JSON" in s.negotiated["codecs"]
            sent = xcp.Ether("text", "hello", {"trace_id": "t-1"})
            reply = await s.request(sent, timeout=10)
            assert isinstance(reply, xcp.Message)
            assert reply.ether == sent
            assert reply.codec == "JSON"

            reply = await s.request(xcp.Ether("ids", {"ids": [1, 2]}), codec="protobuf")
            assert reply.codec == "PROTOBUF"
            assert reply.ether.payload == {"ids": [1, 2]}

            msg_id = await s.send(xcp.Ether.text("one way"))
            assert isinstance(msg_id, int)
            echo = await s.recv(timeout=10)
            assert echo.in_reply_to == msg_id
            assert echo.ether.payload == {"text": "one way"}

            rtt = await s.ping()
            assert 0 < rtt < 5
        assert s.closed

    run(main())


@pytest.mark.parametrize("transport,path", [("tcp", "shm"), ("unix", "memfd")])
def test_region_by_handle(python_peer, url_for, transport, path):
    peer = python_peer("echo", url_for(transport))
    n = 256 * 1024

    async def main() -> None:
        async with await xcp.aio.connect(peer.url, require_handles=True) as s:
            region = await s.alloc(n * 4)
            assert isinstance(region, xcp.Region)
            arr = np.frombuffer(region, dtype=np.uint32)
            arr[:] = np.arange(n, dtype=np.uint32)
            del arr
            region.dtype = "uint32"
            reply = await s.request(xcp.Ether("kv.block"), attachments={"kv": region}, timeout=10)
            assert region.sent
            p = reply.ether.payload
            assert p["ok"] and p["path"] == path and p["nbytes"] == n * 4, p
            # A bytes-like attachment is copied once into a region (on the runtime).
            data = np.arange(1000, dtype=np.uint32)
            reply = await s.request(xcp.Ether("kv.block"), attachments={"kv": data}, timeout=10)
            assert reply.ether.payload["ok"]
            # The peer hands a region back by handle: a view over its memory.
            await s.send(xcp.Ether("give", {"nbytes": 64 * 1024}))
            gift = await s.recv(timeout=10)
            with gift.attachments["kv"] as view:
                assert view.path == path
                got = np.frombuffer(view, dtype=np.uint32)
                assert np.array_equal(got, np.arange(got.size, dtype=np.uint32))
                del got

    run(main())


# ---------------------------------------------------------------------------------------------
# Concurrency.


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_many_concurrent_requests_from_tasks(python_peer, url_for, transport):
    peer = python_peer("echo", url_for(transport))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:

            async def worker(w: int) -> list[tuple[int, int]]:
                got = []
                for i in range(50):
                    r = await s.request(xcp.Ether("n", {"w": w, "i": i}), timeout=20)
                    got.append((r.ether.payload["w"], r.ether.payload["i"]))
                return got

            results = await asyncio.gather(*(worker(w) for w in range(10)))
            for w, got in enumerate(results):
                assert got == [(w, i) for i in range(50)], "a reply went to the wrong caller"

            # All at once: 500 requests in flight from 500 tasks.
            replies = await asyncio.gather(
                *(s.request(xcp.Ether("n", {"i": i}), timeout=20) for i in range(500))
            )
            assert [r.ether.payload["i"] for r in replies] == list(range(500))

    run(main())


def test_server_with_many_clients(url_for):
    async def main() -> None:
        server, task = await echo_server(url_for("unix"))
        try:

            async def client(c: int) -> None:
                async with await xcp.aio.connect(server.url) as s:
                    for i in range(20):
                        r = await s.request(xcp.Ether("n", {"c": c, "i": i}), timeout=10)
                        assert r.ether.payload == {"c": c, "i": i}

            await asyncio.gather(*(client(c) for c in range(8)))
        finally:
            server.close()
            await asyncio.wait_for(task, 10)

    run(main())


# ---------------------------------------------------------------------------------------------
# async for.


def test_async_for_ends_when_peer_closes(url_for):
    async def main() -> None:
        server = await xcp.aio.Server.bind(url_for("tcp"))
        got: list[int] = []

        async def serve() -> None:
            s = await server.accept(timeout=10)
            async for msg in s:
                got.append(msg.ether.payload["i"])

        task = asyncio.create_task(serve())
        async with await xcp.aio.connect(server.url) as c:
            for i in range(5):
                await c.send(xcp.Ether("n", {"i": i}))
        # The client closed: the server's loop ends by itself, having seen every message.
        await asyncio.wait_for(task, 10)
        assert got == list(range(5))
        server.close()

    run(main())


def test_async_for_over_a_peer_that_closes(python_peer, url_for):
    peer = python_peer("close", url_for("unix"))

    async def main() -> None:
        s = await xcp.aio.connect(peer.url)
        await s.send(xcp.Ether("bye"))
        seen = [m async for m in s]
        assert seen == []
        assert s.closed

    run(main())


# ---------------------------------------------------------------------------------------------
# Cancellation and timeouts.


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_cancelled_recv_loses_no_message(python_peer, url_for, transport):
    peer = python_peer("echo", url_for(transport))
    n = 300

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            # A recv cancelled while nothing comes leaves the session as it was.
            task = asyncio.create_task(s.recv())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            sent_id = await s.send(xcp.Ether("n", {"i": -1}))
            m = await s.recv(timeout=10)
            assert m.in_reply_to == sent_id
            assert (await s.request(xcp.Ether("still"), timeout=10)).ether.kind == "still"

            # Now cancel receives at every moment while messages stream in: each message
            # the peer echoes is still received exactly once, in order.
            rng = random.Random(21)

            async def produce() -> None:
                for i in range(n):
                    await s.send(xcp.Ether("n", {"i": i}))
                    if i % 10 == 0:
                        await asyncio.sleep(0.001)

            producer = asyncio.create_task(produce())
            got: list[int] = []
            cancels = 0
            while len(got) < n:
                try:
                    m = await asyncio.wait_for(s.recv(), rng.choice([0, 0.0001, 0.001, 0.005]))
                except TimeoutError:
                    cancels += 1
                    assert cancels < 100_000
                    continue
                got.append(m.ether.payload["i"])
            await asyncio.wait_for(producer, 10)
            assert got == list(range(n)), "a message was lost or reordered by a cancel"
            assert cancels > 0
            with pytest.raises(xcp.TimeoutError):
                await s.recv(timeout=0.3)

    run(main())


def test_cancelled_request_abandons_its_reply(url_for):
    async def main() -> None:
        server, task = await echo_server(url_for("tcp"), delay=0.5)
        try:
            async with await xcp.aio.connect(server.url) as s:
                slow = asyncio.create_task(s.request(xcp.Ether("slow")))
                await asyncio.sleep(0.1)
                slow.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await slow
                # The session works on, and replies go to the right callers.
                r = await s.request(xcp.Ether("fast", {"n": 1}), timeout=10)
                assert r.ether == xcp.Ether("fast", {"n": 1})
                # The abandoned reply comes and is dropped: it is no message for recv.
                await asyncio.sleep(0.7)
                with pytest.raises(xcp.TimeoutError):
                    await s.recv(timeout=0.3)
                # asyncio.timeout cancels the same way.
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await s.request(xcp.Ether("slow"))
                assert (await s.request(xcp.Ether("fast"), timeout=10)).ether.kind == "fast"
                assert await s.ping() > 0
        finally:
            server.close()
            await asyncio.wait_for(task, 10)

    run(main())


def test_cancelled_accept_keeps_the_server(url_for):
    async def main() -> None:
        async with await xcp.aio.Server.bind(url_for("unix")) as server:
            task = asyncio.create_task(server.accept())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            client = asyncio.create_task(xcp.aio.connect(server.url, connect_timeout=10))
            s = await server.accept(timeout=10)
            c = await asyncio.wait_for(client, 10)
            await c.send(xcp.Ether("hi"))
            assert (await s.recv(timeout=10)).ether.kind == "hi"
            await c.close()
            await s.close()
            with pytest.raises(xcp.TimeoutError) as e:
                await server.accept(timeout=0.2)
            assert e.value.deadline == "call"

    run(main())


def test_timeouts_leave_the_session_usable(python_peer, url_for):
    peer = python_peer("silent", url_for("tcp"))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            with pytest.raises(xcp.TimeoutError) as e:
                await s.recv(timeout=0.2)
            assert isinstance(e.value, TimeoutError) and e.value.deadline == "call"
            with pytest.raises(xcp.TimeoutError):
                await s.request(xcp.Ether("never answered"), timeout=0.2)
            # PING is answered by the library: the session is alive.
            assert await s.ping() > 0
            with pytest.raises(xcp.InvalidError):
                await s.recv(timeout=-1)

    run(main())


# ---------------------------------------------------------------------------------------------
# Exceptions from the awaited call.


def test_exceptions(python_peer, url_for):
    refuse = python_peer("refuse", url_for("tcp"))

    async def main() -> None:
        async with await xcp.aio.connect(refuse.url) as s:
            with pytest.raises(xcp.NackError) as e:
                await s.request(xcp.Ether("x"), timeout=10)
            assert e.value.name == "ERR_BUSY" and e.value.retry_after_ms == 250
            assert e.value.detail == "refusing"
            with pytest.raises(xcp.InvalidError):
                await s.send("not an ether")  # type: ignore[arg-type]
            with pytest.raises(xcp.InvalidError):
                await s.send(xcp.Ether("x"), codec="xml")  # type: ignore[arg-type]
            with pytest.raises(xcp.InvalidError):
                await s.alloc(0)
        # Closed: every call raises ClosedError.
        with pytest.raises(xcp.ClosedError):
            await s.request(xcp.Ether("x"), timeout=5)
        with pytest.raises(xcp.ClosedError):
            await s.recv(timeout=5)

        with pytest.raises(xcp.InvalidError):
            await xcp.aio.connect("nonsense://x")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Nothing listens there now: refused.
        with pytest.raises(xcp.ClosedError):
            await xcp.aio.connect(f"tcp://127.0.0.1:{port}", connect_timeout=5)
        with pytest.raises(xcp.InvalidError):
            await xcp.aio.connect(refuse.url, handles=False, require_handles=True)

        server = await xcp.aio.Server.bind(url_for("tcp"))
        with pytest.raises(xcp.AttachmentError):
            # An aio server that offers no handles: require_handles refuses the session.
            async with await xcp.aio.Server.bind(url_for("unix"), handles=False) as bare:
                await xcp.aio.connect(bare.url, require_handles=True)
        waiting = asyncio.create_task(server.accept())
        await asyncio.sleep(0.1)
        server.close()
        with pytest.raises(xcp.ClosedError) as ce:
            await asyncio.wait_for(waiting, 5)
        assert ce.value.reason == "ServerStopped"
        with pytest.raises(xcp.ClosedError):
            await server.accept()

    run(main())


def test_nack_from_an_aio_server(url_for):
    async def main() -> None:
        async with await xcp.aio.Server.bind(url_for("unix")) as server:

            async def refuse() -> None:
                async with await server.accept(timeout=10) as s:
                    async for msg in s:
                        await s.nack(msg, "ERR_BUSY", retry_after_ms=40, detail="full")

            task = asyncio.create_task(refuse())
            async with await xcp.aio.connect(server.url) as c:
                for codec in ("json", "protobuf"):
                    with pytest.raises(xcp.NackError) as e:
                        await c.request(xcp.Ether("work"), codec=codec, timeout=10)
                    assert (e.value.name, e.value.code) == ("ERR_BUSY", 0x0A)
                    assert (e.value.retry_after_ms, e.value.detail) == (40, "full")
            await asyncio.wait_for(task, 10)

    run(main())


# ---------------------------------------------------------------------------------------------
# Interop: the Rust binary, and sync clients in other processes.


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_against_rust_serve(rust_serve, url_for, transport):
    server = rust_serve(url_for(transport))
    data = os.urandom(128 * 1024)

    async def main() -> None:
        async with await xcp.aio.connect(server.url) as s:
            e = xcp.Ether("text", "from asyncio", {"trace_id": "aio-1"})
            assert (await s.request(e, timeout=10)).ether == e
            msg_id = await s.send(xcp.Ether("embedding", {"values": [0.5], "dim": 1}))
            echo = await s.recv(timeout=10)
            assert echo.in_reply_to == msg_id
            region = await s.alloc(len(data))
            with memoryview(region) as m:
                m[:] = data
            reply = await s.request(
                xcp.Ether("blob", {"reply": "crc32c"}), attachments={"data": region}, timeout=10
            )
            assert reply.ether.payload["crc32c"] == crc32c(data)
            assert await s.ping() > 0

    run(main())


def test_rust_client_against_aio_server(xcp_bin, url_for):
    async def main() -> None:
        server, task = await echo_server(url_for("unix"))
        try:
            send = await asyncio.create_subprocess_exec(
                xcp_bin, "send", server.url, "--text", "hello from rust",
                stdout=subprocess.PIPE,
            )
            ping = await asyncio.create_subprocess_exec(
                xcp_bin, "ping", server.url, "-c", "3", "-i", "10",
                stdout=subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(send.communicate(), 30)
            assert send.returncode == 0
            assert "hello from rust" in out.decode()
            await asyncio.wait_for(ping.communicate(), 30)
            assert ping.returncode == 0
        finally:
            server.close()
            await asyncio.wait_for(task, 10)

    run(main())


SYNC_CLIENT = textwrap.dedent(
    """
    import sys, xcp
    with xcp.connect(sys.argv[1]) as s:
        for i in range(50):
            r = s.request(xcp.Ether("n", {"c": int(sys.argv[2]), "i": i}), timeout=10)
            assert r.ether.payload == {"c": int(sys.argv[2]), "i": i}, r.ether
    print("ok")
    """
)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_sync_clients_in_processes_against_aio_server(url_for, transport):
    async def main() -> None:
        server, task = await echo_server(url_for(transport))
        try:
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", SYNC_CLIENT, server.url, str(c),
                    stdout=subprocess.PIPE,
                )
                for c in range(4)
            ]
            for p in procs:
                out, _ = await asyncio.wait_for(p.communicate(), 30)
                assert p.returncode == 0 and out.decode().strip() == "ok"
        finally:
            server.close()
            await asyncio.wait_for(task, 10)

    run(main())


def test_sync_view_of_an_aio_session(url_for):
    async def main() -> None:
        server, task = await echo_server(url_for("tcp"))
        try:
            s = await xcp.aio.connect(server.url)
            assert isinstance(s.sync, xcp.Session)
            # A sync call in a worker thread on the same connection, while the loop runs.
            reply = await asyncio.to_thread(s.sync.request, xcp.Ether("sync"), timeout=10)
            assert reply.ether.kind == "sync"
            assert (await s.request(xcp.Ether("aio"), timeout=10)).ether.kind == "aio"
            await s.close()
        finally:
            server.close()
            await asyncio.wait_for(task, 10)

    run(main())


# ---------------------------------------------------------------------------------------------
# The bridge: no thread per call, and the loop runs while calls wait.


def os_threads() -> int:
    """The number of OS threads of this process."""
    return len(os.listdir("/proc/self/task"))


def test_no_thread_per_call_and_the_loop_runs(python_peer, url_for):
    peer = python_peer("silent", url_for("unix"))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            assert await s.ping() > 0  # the runtime's threads are all started by now
            before = os_threads()
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            waiting = [
                asyncio.create_task(s.request(xcp.Ether("n", {"i": i}), timeout=10))
                for i in range(300)
            ]
            waiting.append(asyncio.create_task(s.recv(timeout=10)))
            await asyncio.sleep(0.5)
            during = os_threads()
            assert ticks >= 10, "the event loop was blocked while calls waited"
            assert not any(t.done() for t in waiting)
            assert during <= before + 2, (before, during)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            ticker.cancel()
            # 301 cancelled calls later the session still works.
            assert await s.ping() > 0
            with pytest.raises(xcp.TimeoutError):
                await s.recv(timeout=0.1)

    run(main())


def test_concurrent_receivers_share_the_messages(python_peer, url_for):
    peer = python_peer("echo", url_for("tcp"))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            got: list[int] = []

            async def receiver() -> None:
                while True:
                    try:
                        m = await s.recv(timeout=1)
                    except xcp.TimeoutError:
                        return
                    got.append(m.ether.payload["i"])

            receivers = [asyncio.create_task(receiver()) for _ in range(4)]
            for i in range(200):
                await s.send(xcp.Ether("n", {"i": i}))
            await asyncio.wait_for(asyncio.gather(*receivers), 30)
            assert sorted(got) == list(range(200)), "each message goes to exactly one recv"

    run(main())


def test_cancel_aborts_the_rust_task(python_peer, url_for):
    # The bridge itself: a cancelled operation's task is aborted on the runtime, and says so
    # with done(None, None); the coroutine-level behaviour is tested above.
    peer = python_peer("silent", url_for("tcp"))

    async def main() -> None:
        async with await xcp.aio.connect(peer.url) as s:
            loop = asyncio.get_running_loop()
            calls: asyncio.Queue[tuple[object, object]] = asyncio.Queue()

            def done(ok: object, value: object) -> None:
                calls.put_nowait((ok, value))

            for start in (
                lambda: xcp._xcp._aio_recv(loop, done, s.sync),
                lambda: xcp._xcp._aio_request(loop, done, s.sync, xcp.Ether("x")),
            ):
                op = start()
                await asyncio.sleep(0.1)
                assert not op.finished
                op.cancel()
                assert await asyncio.wait_for(calls.get(), 5) == (None, None)
                assert op.finished
                await asyncio.sleep(0.05)
                assert calls.empty(), "done is called exactly once"
            assert await s.ping() > 0

    run(main())
