"""Two Python processes talking XCP, over TCP and over a Unix socket."""

from __future__ import annotations

import pytest

import xcp


def client_url(peer_url: str, transport: str) -> str:
    """The URL a client uses: a ``ring`` client connects to a Unix socket's server."""
    if transport == "ring":
        return peer_url.replace("unix://", "ring://", 1)
    return peer_url


@pytest.mark.parametrize("transport", ["tcp", "unix", "ring"])
def test_request_send_recv_ping(python_peer, url_for, transport):
    peer = python_peer("echo", url_for(transport))
    bound = "unix" if transport == "ring" else transport
    assert peer.url.startswith(f"{bound}://")
    if transport == "tcp":
        assert not peer.url.endswith(":0"), "the server reports the port it bound"
    with xcp.connect(client_url(peer.url, transport)) as s:
        assert not s.closed
        assert "JSON" in s.negotiated["codecs"]
        # Frames go by the same-host ring only where the URL asked for it.
        assert s.negotiated["ring"] == (transport == "ring")

        sent = xcp.Ether("text", "hello", {"trace_id": "t-1"})
        reply = s.request(sent)
        assert reply.ether == sent
        assert reply.in_reply_to > 0
        assert reply.codec == "JSON"

        nested = xcp.Ether(
            "tokens",
            {"token_ids": [1, 2, 3], "mask": [True, False, True], "score": 0.5, "x": None},
            schema_version=2,
        )
        reply = s.request(nested, codec="protobuf")
        assert reply.codec == "PROTOBUF"
        assert reply.ether.kind == "tokens"
        assert reply.ether.schema_version == 2
        assert reply.ether.payload["token_ids"] == [1, 2, 3]
        assert reply.ether.payload["mask"] == [True, False, True]

        # A plain send: the echo comes back as a message that answers it.
        msg_id = s.send(xcp.Ether.text("one way"))
        echo = s.recv(timeout=5)
        assert echo.in_reply_to == msg_id
        assert echo.ether.payload == {"text": "one way"}

        rtt = s.ping()
        assert 0 < rtt < 5
    assert s.closed


@pytest.mark.parametrize("transport", ["tcp", "unix", "ring"])
def test_many_requests_from_threads(python_peer, url_for, transport):
    from concurrent.futures import ThreadPoolExecutor

    peer = python_peer("echo", url_for(transport))
    with xcp.connect(client_url(peer.url, transport)) as s:

        def one(i: int) -> int:
            return s.request(xcp.Ether("n", {"i": i})).ether.payload["i"]

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(one, range(200))) == list(range(200))


def test_python_server_in_this_process_accepts(url_for):
    # Server.bind/accept from Python, with a client in a second thread of the same process.
    import threading

    with xcp.Server.bind(url_for("tcp")) as server:
        got: list[xcp.Ether] = []

        def serve() -> None:
            with server.accept(timeout=10) as s:
                m = s.recv(timeout=10)
                got.append(m.ether)
                s.reply(m, xcp.Ether("ok"))

        t = threading.Thread(target=serve)
        t.start()
        with xcp.connect(server.url) as c:
            assert c.request(xcp.Ether("hi", {"a": 1})).ether.kind == "ok"
        t.join(10)
        assert got == [xcp.Ether("hi", {"a": 1})]
    assert server.closed


def test_close_stops_an_accept_waiting_in_another_thread():
    """A thread blocked in Server.accept() raises xcp.ClosedError (reason ServerStopped) as
    soon as another thread closes the server, not at its timeout."""
    import threading
    import time

    server = xcp.Server.bind("tcp://127.0.0.1:0")
    got: list[BaseException] = []

    def wait() -> None:
        try:
            server.accept(timeout=30)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    server.close()
    t.join(timeout=10)
    assert not t.is_alive(), "accept() still waits after close()"
    assert time.monotonic() - start < 5
    assert len(got) == 1 and isinstance(got[0], xcp.ClosedError), got
    assert got[0].reason == "ServerStopped"
    with pytest.raises(xcp.ClosedError):
        server.accept(timeout=1)
