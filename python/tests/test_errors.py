"""Each exception class, raised by a real cause between real processes."""

from __future__ import annotations

import builtins
import socket
import threading
import time

import pytest

import xcp


def test_hierarchy():
    for cls in (
        xcp.NackError,
        xcp.AttachmentError,
        xcp.TimeoutError,
        xcp.ClosedError,
        xcp.ProtocolError,
        xcp.InvalidError,
    ):
        assert issubclass(cls, xcp.XcpError)
    assert issubclass(xcp.XcpError, Exception)
    assert issubclass(xcp.TimeoutError, builtins.TimeoutError)
    assert issubclass(xcp.ClosedError, ConnectionError)
    assert issubclass(xcp.InvalidError, ValueError)


def test_recv_timeout_leaves_the_session_usable(python_peer, url_for):
    peer = python_peer("echo", url_for("tcp"))
    with xcp.connect(peer.url) as s:
        start = time.monotonic()
        with pytest.raises(xcp.TimeoutError) as info:
            s.recv(timeout=0.3)
        assert 0.25 < time.monotonic() - start < 3
        assert isinstance(info.value, builtins.TimeoutError)
        assert info.value.deadline == "call"
        assert s.request(xcp.Ether.text("still here")).ether.payload["text"] == "still here"
        assert s.ping() > 0


def test_request_timeout_from_a_silent_peer(python_peer, url_for):
    peer = python_peer("silent", url_for("unix"))
    with xcp.connect(peer.url) as s:
        with pytest.raises(xcp.TimeoutError):
            s.request(xcp.Ether.text("anyone?"), timeout=0.3)
        # The session's own request_timeout gives the same class, with its deadline.
    with xcp.connect(peer.url, request_timeout=0.3) as s:
        with pytest.raises(xcp.TimeoutError) as info:
            s.request(xcp.Ether.text("anyone?"))
        assert info.value.deadline == "reply"
        assert s.ping() > 0


def test_accept_timeout(url_for):
    with xcp.Server.bind(url_for("tcp")) as server:
        with pytest.raises(xcp.TimeoutError):
            server.accept(timeout=0.2)
    with pytest.raises(xcp.ClosedError):
        server.accept(timeout=0.2)


def test_nack_from_a_server_that_refuses(python_peer, url_for):
    peer = python_peer("refuse", url_for("tcp"))
    with xcp.connect(peer.url) as s:
        with pytest.raises(xcp.NackError) as info:
            s.request(xcp.Ether.text("please"))
        e = info.value
        assert (e.code, e.name, e.retry_after_ms, e.detail) == (0x0A, "ERR_BUSY", 250, "refusing")
        assert e.msg_id > 0
        assert "ERR_BUSY" in str(e)


def test_closed_when_the_peer_closes(python_peer, url_for):
    peer = python_peer("close", url_for("unix"))
    s = xcp.connect(peer.url)
    s.send(xcp.Ether.text("bye"))
    with pytest.raises(xcp.ClosedError) as info:
        s.recv(timeout=10)
    assert isinstance(info.value, ConnectionError)
    assert info.value.reason == "PeerClosed"
    assert s.closed
    with pytest.raises(xcp.ClosedError):
        s.send(xcp.Ether.text("after"))


def test_closed_when_the_peer_process_dies(python_peer, url_for):
    peer = python_peer("silent", url_for("tcp"))
    s = xcp.connect(peer.url)
    assert s.ping() > 0
    peer.proc.kill()
    peer.proc.wait()
    with pytest.raises(xcp.ClosedError):
        s.recv(timeout=10)


def test_connection_refused_is_closed_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now.
    with pytest.raises(xcp.ClosedError):
        xcp.connect(f"tcp://127.0.0.1:{port}", connect_timeout=5)


@pytest.mark.parametrize(
    "url", ["bogus://x", "tcp://127.0.0.1", "unix://relative/path", "tcp://:99999"]
)
def test_bad_url_is_invalid_error(url):
    with pytest.raises(xcp.InvalidError) as info:
        xcp.connect(url)
    assert isinstance(info.value, ValueError)


def test_invalid_arguments():
    with pytest.raises(xcp.InvalidError):
        xcp.connect("tcp://127.0.0.1:1", connect_timeout=-1)
    with pytest.raises(xcp.InvalidError):
        xcp.Ether("")
    with pytest.raises(xcp.InvalidError):
        xcp.Ether("x", 5)


def test_unsendable_payload_is_invalid_error(python_peer, url_for):
    peer = python_peer("echo", url_for("tcp"))
    with xcp.connect(peer.url) as s:
        with pytest.raises(xcp.InvalidError, match="payload.obj"):
            s.send(xcp.Ether("x", {"obj": object()}))
        loop: dict = {}
        loop["self"] = loop
        with pytest.raises(xcp.InvalidError, match="deep"):
            s.send(xcp.Ether("x", loop))
        with pytest.raises(xcp.InvalidError, match="codec"):
            s.send(xcp.Ether("x"), codec="msgpack")
        assert s.ping() > 0


def test_attachment_error_when_handles_are_required(rust_serve, url_for):
    server = rust_serve(url_for("tcp"), "--attach", "inline")
    with pytest.raises(xcp.AttachmentError) as info:
        xcp.connect(server.url, require_handles=True)
    assert info.value.name == "ERR_ATTACHMENT"
    # Without the requirement the same server is fine: attachments go inline.
    with xcp.connect(server.url) as s:
        assert s.negotiated["handles"] == []


def test_protocol_error_from_a_peer_that_speaks_garbage():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
                time.sleep(1)

        t = threading.Thread(target=garbage)
        t.start()
        with pytest.raises(xcp.ProtocolError) as info:
            xcp.connect(f"tcp://127.0.0.1:{port}", connect_timeout=5)
        t.join()
    assert (info.value.code, info.value.name) == (0x08, "ERR_MALFORMED")
    assert "magic" in info.value.detail


def test_forked_child_is_told_to_spawn(url_for):
    import os

    with xcp.Server.bind(url_for("tcp")) as server:  # the runtime runs in this process now
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report which exception it got, never return into pytest
            code = 1
            try:
                xcp.connect(server.url, connect_timeout=1)
            except xcp.InvalidError as e:
                code = 0 if "spawn" in str(e) else 2
            except BaseException:  # noqa: BLE001
                code = 3
            os.write(w, bytes([code]))
            os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
    assert got == b"\x00", got
