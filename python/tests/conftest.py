"""Fixtures: peers in processes of their own (a Python peer, the Rust ``xcp serve``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class Peer:
    """A peer process whose first stdout line was ``listening on URL``."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{argv}: expected 'listening on URL', got {line!r}")
        self.url = line.removeprefix("listening on ")

    def stop(self) -> None:
        """Closes its stdin (a Python peer exits), then terminates it if it still runs."""
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory under /tmp for Unix sockets (sun_path holds 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="xcp-py-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def url_for(sock_dir: Path) -> Callable[[str], str]:
    """``url_for("tcp")`` or ``url_for("unix")``: a URL to bind."""

    def make(transport: str) -> str:
        if transport == "tcp":
            return "tcp://127.0.0.1:0"
        return f"unix://{sock_dir}/x.sock"

    return make


@pytest.fixture
def python_peer() -> Iterator[Callable[[str, str], Peer]]:
    """``python_peer(mode, url)``: tests/peer.py in a process of its own (see its docs)."""
    peers: list[Peer] = []

    def start(mode: str, url: str) -> Peer:
        peer = Peer([sys.executable, str(HERE / "peer.py"), mode, url])
        peers.append(peer)
        return peer

    yield start
    for p in peers:
        p.stop()


@pytest.fixture(scope="session")
def xcp_bin() -> str:
    """The Rust ``xcp`` binary: ``$XCP_BIN``, else ``target/debug/xcp`` of the repository."""
    path = os.environ.get("XCP_BIN") or str(REPO / "target" / "debug" / "xcp")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no xcp binary at {path}: run `cargo build --bin xcp` or set XCP_BIN")
    return path


@pytest.fixture
def rust_serve(xcp_bin: str) -> Iterator[Callable[..., Peer]]:
    """``rust_serve(url, *args)``: ``xcp serve --listen URL ARGS`` in a process of its own."""
    peers: list[Peer] = []

    def start(url: str, *args: str) -> Peer:
        peer = Peer([xcp_bin, "serve", "--listen", url, *args])
        peers.append(peer)
        return peer

    yield start
    for p in peers:
        if p.proc.poll() is None:
            p.proc.terminate()
        p.stop()
