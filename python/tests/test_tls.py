"""TLS and QUIC URLs: certificates made by the Rust binary (``xcp cert dev DIR``), a round
trip between two Python processes, and the failures raised as ``xcp.TlsError``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import xcp
import xcp.aio

from conftest import HERE, Peer


@pytest.fixture(scope="module")
def certs(xcp_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA, a server and a client certificate (``xcp cert dev DIR``)."""
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([xcp_bin, "cert", "dev", str(d)], check=True, timeout=60, capture_output=True)
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert (d / name).is_file(), name
    return d


@pytest.fixture
def tls_peer(certs: Path):
    """``tls_peer(url)``: tests/peer.py in echo mode, bound to ``url`` with the server's
    certificate."""
    peers: list[Peer] = []

    def start(url: str) -> Peer:
        peer = Peer([sys.executable, str(HERE / "peer.py"), "echo", url, str(certs)])
        peers.append(peer)
        return peer

    yield start
    for p in peers:
        p.stop()


def client_files(certs: Path) -> dict[str, Path]:
    return {"cert": certs / "client.pem", "key": certs / "client.key", "ca": certs / "ca.pem"}


@pytest.mark.parametrize("scheme", ["tls", "quic"])
def test_round_trip_between_processes(tls_peer, certs, scheme):
    peer = tls_peer(f"{scheme}://127.0.0.1:0")
    assert peer.url.startswith(f"{scheme}://127.0.0.1:")
    with xcp.connect(peer.url, **client_files(certs), connect_timeout=10) as s:
        # Across hosts no handle scheme is offered: attachments go inline.
        assert s.negotiated["handles"] == []
        reply = s.request(xcp.Ether("hello", {"n": 7}), timeout=10)
        assert reply.ether == xcp.Ether("hello", {"n": 7})
        import numpy as np

        n = 1 << 20
        kv = np.arange(n // 4, dtype=np.uint32)
        checked = s.request(xcp.Ether("kv"), attachments={"kv": kv}, timeout=30)
        got = checked.ether.payload
        assert got["ok"] and got["nbytes"] == n and got["path"] == "inline"
        assert s.ping() > 0
        stats = s.stats()
        assert stats["sent"]["by_path"]["inline"] == {"messages": 1, "bytes": n}
        assert "memfd" not in stats["sent"]["by_path"] and "shm" not in stats["sent"]["by_path"]


def test_server_name_checks_the_certificate(tls_peer, certs):
    peer = tls_peer("tls://127.0.0.1:0")
    # The dev server certificate is valid for localhost: the right name connects ...
    with xcp.connect(peer.url, **client_files(certs), server_name="localhost") as s:
        assert s.request(xcp.Ether("x"), timeout=10).ether.kind == "x"
    # ... a name it does not list is refused by the client.
    with pytest.raises(xcp.TlsError) as e:
        xcp.connect(peer.url, **client_files(certs), server_name="elsewhere.example")
    assert e.value.failure == "PeerCertificateWrongName", e.value


def test_missing_certificate_file(tmp_path, certs):
    missing = tmp_path / "nope.pem"
    with pytest.raises(xcp.TlsError) as e:
        xcp.connect("tls://127.0.0.1:1", cert=missing, key=certs / "client.key", ca=certs / "ca.pem")
    assert e.value.failure == "File"
    assert "nope.pem" in e.value.detail
    with pytest.raises(xcp.TlsError) as e:
        xcp.Server.bind("tls://127.0.0.1:0", cert=certs / "server.pem", key=missing, ca=certs / "ca.pem")
    assert e.value.failure == "File"
    # A cert without its key is a configuration error, said at once.
    with pytest.raises(xcp.TlsError) as e:
        xcp.connect("tls://127.0.0.1:1", cert=certs / "client.pem", ca=certs / "ca.pem")
    assert e.value.failure == "Config" and "key" in str(e.value)
    with pytest.raises(xcp.InvalidError):
        xcp.connect("tls://127.0.0.1:1", server_name="localhost")


def test_client_without_certificate_is_refused(tls_peer, certs):
    peer = tls_peer("tls://127.0.0.1:0")
    with pytest.raises(xcp.TlsError) as e:
        s = xcp.connect(peer.url, ca=certs / "ca.pem", connect_timeout=10)
        # Under TLS 1.3 the server checks the client's certificate after the client's side
        # of the handshake finished: the refusal may come with the first exchange.
        try:
            s.request(xcp.Ether("x"), timeout=10)
        finally:
            s.close()
    assert e.value.failure in ("PeerRefusedOurCertificate", "Handshake"), e.value
    # The server goes on serving clients that have one.
    with xcp.connect(peer.url, **client_files(certs)) as s:
        assert s.request(xcp.Ether("x"), timeout=10).ether.kind == "x"


def test_aio_tls(certs):
    async def main() -> None:
        server = await xcp.aio.Server.bind(
            "tls://127.0.0.1:0",
            cert=certs / "server.pem",
            key=certs / "server.key",
            ca=certs / "ca.pem",
        )
        async with server:

            async def echo() -> None:
                session = await server.accept(timeout=10)
                async with session:
                    msg = await session.recv(timeout=10)
                    await session.reply(msg, msg.ether)

            task = asyncio.create_task(echo())
            async with await xcp.aio.connect(server.url, **client_files(certs)) as s:
                reply = await s.request(xcp.Ether("aio", {"ok": True}), timeout=10)
                assert reply.ether.payload == {"ok": True}
                assert s.stats()["received"]["messages"] == 1
            await asyncio.wait_for(task, 10)
            with pytest.raises(xcp.TlsError) as e:
                await xcp.aio.connect(server.url, cert=certs / "absent.pem", key=certs / "client.key", ca=certs / "ca.pem")
            assert e.value.failure == "File"

    asyncio.run(main())
