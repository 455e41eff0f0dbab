"""xcp: XCP v0.2 from Python, a zero-copy data plane between processes.

The synchronous API (this release): :func:`connect` and :meth:`Server.bind` give
:class:`Session` objects whose ``send``, ``request``, ``recv``, ``reply``, ``ping`` and
``close`` release the GIL while they wait. Large buffers travel by handle: fill an
``session.alloc(n)`` :class:`Region` in place (it has the buffer protocol, so numpy writes
straight into the shared segment) and send it as an attachment; the receiver gets a read-only
:class:`View` over the same memory, and the sender its ACK when the view is released.

The asyncio API is :mod:`xcp.aio` (imported with the package): the same calls as
coroutines (``await xcp.aio.connect(url)``, ``await session.request(...)``, ``async for msg in
session``), on the same Rust runtime, with cancellation that leaves the session usable.

Tensors (DLPack, host memory): ``session.empty(shape, dtype)`` is a region shaped as a
tensor with ``__dlpack__`` (``numpy.from_dlpack(region)`` writes straight into the shared
segment); ``session.send_tensor(t)`` / ``request_tensor(t)`` send any object with
``__dlpack__`` (by handle with no copy when it lies in one of our regions, else copied
once); the receiver's ``msg.tensor()`` is a read-only view with ``__dlpack__``.

Across hosts, ``tls://`` and ``quic://`` URLs take ``cert=``, ``key=`` and ``ca=`` (PEM
paths; :class:`TlsError` when a file is missing or the handshake is refused).
``session.stats()`` counts messages and attachment bytes sent and received, by path
(``"memfd"``, ``"shm"``, ``"inline"``). ``python -m xcp.bench`` measures xcp against pyzmq,
``multiprocessing`` and the Rust client.

Not in this release (a later step of the package): CUDA tensors by ``cuda-ipc``.

Processes: the extension runs one tokio runtime per process. A child made by ``fork`` after
xcp was used cannot use it (``xcp.InvalidError`` says so); use multiprocessing's ``"spawn"``
start method, or subprocesses.
"""

from __future__ import annotations

from ._errors import (
    AttachmentError,
    ClosedError,
    InvalidError,
    NackError,
    ProtocolError,
    TimeoutError,
    TlsError,
    XcpError,
)
from ._xcp import Ether, Message, Region, Server, Session, View, connect

from . import aio  # the asyncio API, xcp.aio

__version__ = "0.1.0"

__all__ = [
    "aio",
    "connect",
    "Server",
    "Session",
    "Message",
    "Ether",
    "Region",
    "View",
    "XcpError",
    "NackError",
    "AttachmentError",
    "TimeoutError",
    "ClosedError",
    "ProtocolError",
    "InvalidError",
    "TlsError",
]
