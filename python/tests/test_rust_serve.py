"""The Python client against the Rust ``xcp serve`` binary."""

from __future__ import annotations

import os

import pytest

import xcp


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected 0x82F63B78), to check what the Rust server computed."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_send_request_ping(rust_serve, url_for, transport):
    server = rust_serve(url_for(transport))
    with xcp.connect(server.url) as s:
        e = xcp.Ether("text", "from python", {"trace_id": "py-1"})
        assert s.request(e).ether == e
        assert s.request(e, codec="protobuf").ether == e
        msg_id = s.send(xcp.Ether("embedding", {"values": [0.25, 0.5], "dim": 2}))
        echo = s.recv(timeout=5)
        assert echo.in_reply_to == msg_id
        assert echo.ether.payload == {"values": [0.25, 0.5], "dim": 2}
        assert s.ping() > 0


@pytest.mark.parametrize(
    "transport,path", [("tcp", "shm"), ("unix", "memfd")]
)
def test_region_by_handle_checked_by_rust(rust_serve, url_for, transport, path):
    server = rust_serve(url_for(transport))
    data = os.urandom(256 * 1024)
    with xcp.connect(server.url, require_handles=True) as s:
        assert path in s.negotiated["handles"]
        region = s.alloc(len(data))
        with memoryview(region) as m:
            m[:] = data
        reply = s.request(
            xcp.Ether("blob", {"reply": "crc32c"}), attachments={"data": region}
        )
        assert region.sent
        p = reply.ether.payload
        assert reply.ether.kind == "blob.checksum"
        assert p["path"] == path, p
        assert p["bytes"] == len(data)
        assert p["crc32c"] == crc32c(data)


def test_inline_when_handles_off(rust_serve, url_for):
    server = rust_serve(url_for("tcp"))
    data = os.urandom(100 * 1024)
    with xcp.connect(server.url, handles=False) as s:
        assert s.negotiated["handles"] == []
        reply = s.request(xcp.Ether("blob", {"reply": "crc32c"}), attachments={"data": data})
        p = reply.ether.payload
        assert p["path"] == "inline"
        assert p["crc32c"] == crc32c(data)
