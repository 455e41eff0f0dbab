"""Type stubs of the extension module ``xcp._xcp`` (use it through the package ``xcp``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Protocol

from typing_extensions import Buffer, Self

_Codec = Literal["json", "protobuf", "JSON", "PROTOBUF"]
_Attachments = Mapping[str, "Region | Buffer"]
#: A dtype: a name such as "float32", "float16", "bfloat16", "int8", "uint8", "int32",
#: "int64", or a numpy dtype / scalar type, or a torch dtype.
_DType = Any
#: The arguments of ``__dlpack__`` (the array API standard).
_Capsule = Any

class _SupportsDLPack(Protocol):
    def __dlpack__(self, *, stream: Any = ..., max_version: Any = ...) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

def _dlpack_live() -> int:
    """Managed DLPack tensors exported by xcp whose deleter has not run (a test hook)."""

def connect(
    url: str,
    *,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    handles: bool = True,
    require_handles: bool = False,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    server_name: str | None = None,
) -> Session:
    """Connects to ``url`` (``tcp://host:port`` or ``unix:///path``; across hosts
    ``tls://host:port`` or ``quic://host:port`` with ``cert=``, ``key=`` and ``ca=``, PEM
    paths, or ``ca=`` alone for a client without a certificate; ``server_name=`` checks the
    server's certificate against that name instead of the URL's host) and returns the session
    once the handshake finished. ``handles=False`` sends every attachment inline;
    ``require_handles=True`` raises ``xcp.AttachmentError`` when no handle scheme was
    negotiated. A bad URL raises ``xcp.InvalidError``; no answer within ``connect_timeout``
    seconds ``xcp.TimeoutError``; a refused connection ``xcp.ClosedError``; a missing
    certificate file or a refused TLS handshake ``xcp.TlsError``."""

class Server:
    """A listening socket for XCP connections; ``with server:`` closes it."""

    @property
    def url(self) -> str:
        """The URL really bound (with the real port when bound to port 0)."""
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    @staticmethod
    def bind(
        url: str,
        *,
        handles: bool = True,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> Server:
        """Binds ``url`` (``tcp://127.0.0.1:0`` for any free port, ``unix:///path/x.sock``;
        ``tls://`` or ``quic://`` with ``cert=``, ``key=`` and ``ca=``, PEM paths; clients
        must present a certificate of that CA) and starts accepting. ``handles=False`` offers
        no handle schemes. A missing certificate file raises ``xcp.TlsError``."""
    def accept(self, timeout: float | None = None) -> Session:
        """The next connection whose handshake completed. ``xcp.TimeoutError`` after
        ``timeout`` seconds (None: no limit); ``xcp.ClosedError`` once closed (also for an
        ``accept()`` waiting in another thread when ``close()`` is called)."""
    def close(self) -> None:
        """Stops accepting (and removes a Unix socket file); a waiting ``accept()`` raises
        ``xcp.ClosedError`` (reason ``"ServerStopped"``). Accepted sessions live on."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

class Session:
    """One XCP connection. Waiting methods release the GIL; ``with session:`` closes it."""

    @property
    def closed(self) -> bool:
        """Whether the connection is over."""
    @property
    def peer(self) -> str:
        """The peer's address."""
    @property
    def negotiated(self) -> dict[str, Any]:
        """``{"codecs": [...], "handles": [...], "max_frame_bytes": n, "ring": bool}``: what
        the handshake settled; ``handles`` is empty when attachments go inline; ``ring`` is
        true when frames go by the same-host ring (a ``ring://`` URL)."""
    def send(
        self, ether: Ether, *, attachments: _Attachments | None = None, codec: _Codec = "json"
    ) -> int:
        """Sends ``ether`` (with ``attachments``: regions by handle where negotiated, other
        buffers copied once into a region) and returns its msgId once queued."""
    def request(
        self,
        ether: Ether,
        *,
        attachments: _Attachments | None = None,
        codec: _Codec = "json",
        timeout: float | None = None,
    ) -> Message:
        """Sends ``ether`` and waits for the reply. ``xcp.NackError`` if refused,
        ``xcp.TimeoutError`` after ``timeout`` (at most ``request_timeout``),
        ``xcp.ClosedError`` when the connection ends."""
    def recv(self, timeout: float | None = None) -> Message:
        """The next message that is not a reply to our requests. ``xcp.TimeoutError`` after
        ``timeout`` seconds (the session stays usable); ``xcp.ClosedError`` once over."""
    def reply(self, msg: Message, ether: Ether, *, codec: _Codec = "json") -> int:
        """Sends ``ether`` as the reply to ``msg``; returns its msgId."""
    def nack(
        self, msg: Message, code: str | int, *, retry_after_ms: int = 0, detail: str = ""
    ) -> None:
        """Refuses ``msg`` with a NACK (``code`` such as ``"ERR_BUSY"``): the peer's request
        raises ``xcp.NackError``."""
    def ping(self) -> float:
        """Sends a PING; returns the round-trip time in seconds."""
    def stats(self) -> dict[str, dict[str, Any]]:
        """``{"sent": {...}, "received": {...}}``, each ``{"messages": n, "bytes": n,
        "by_path": {path: {"messages": n, "bytes": n}}}``: DATA messages, attachment bytes,
        and by path (``"memfd"``, ``"shm"``, ``"inline"``, ...) the messages with an attachment
        on it and those attachments' bytes."""
    def alloc(self, nbytes: int) -> Region:
        """A writable region of ``nbytes`` from the session's shared pool."""
    def empty(self, shape: int | tuple[int, ...] | list[int], dtype: _DType) -> Region:
        """A writable region of the pool shaped as a ``shape`` tensor of ``dtype`` (compact
        row-major); ``numpy.from_dlpack(region)`` is an array over the same memory."""
    def send_tensor(
        self,
        tensor: _SupportsDLPack,
        ether: Ether | None = None,
        *,
        id: str = "tensor",
        codec: _Codec = "json",
    ) -> int:
        """Sends a host tensor (any object with ``__dlpack__``) as attachment ``id`` of
        ``ether`` (default ``Ether("tensor")``): by handle with no copy when it starts at the
        first byte of one of our regions, else copied once into a region of the pool (or
        inline when no handle scheme was negotiated). ``xcp.InvalidError`` for device
        tensors, non-C-contiguous ones and unknown dtypes. Returns the msgId."""
    def request_tensor(
        self,
        tensor: _SupportsDLPack,
        ether: Ether | None = None,
        *,
        id: str = "tensor",
        codec: _Codec = "json",
        timeout: float | None = None,
    ) -> Message:
        """``send_tensor``, then waits for the reply and returns it."""
    def close(self) -> None:
        """Closes gracefully; closing a closed session is no error."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

class Message:
    """A received message."""

    @property
    def msg_id(self) -> int:
        """Its msgId."""
    @property
    def in_reply_to(self) -> int:
        """The msgId it answers (0: none)."""
    @property
    def channel(self) -> int:
        """The channel it came on."""
    @property
    def codec(self) -> str:
        """The body codec's name, such as ``"JSON"``."""
    @property
    def ether(self) -> Ether | None:
        """The decoded Ether, or None when the body is not an Ether."""
    @property
    def attachments(self) -> dict[str, View]:
        """Attachment id -> read-only zero-copy view."""
    @property
    def body(self) -> bytes:
        """The wire body (a copy)."""
    def tensor(self, id: str | None = None) -> View:
        """The tensor attachment ``id`` (default ``"tensor"``, or the only attachment): a
        read-only view with ``__dlpack__`` (``numpy.from_dlpack(msg.tensor())``, no copy).
        ``xcp.InvalidError`` when there is none."""

class Ether:
    """The body of a DATA message: ``kind``, ``schema_version``, ``payload``, ``metadata``.
    A str payload is short for ``{"text": payload}``."""

    kind: str
    schema_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any]
    def __init__(
        self,
        kind: str,
        payload: dict[str, Any] | str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        schema_version: int = 1,
    ) -> None: ...
    @staticmethod
    def text(text: str) -> Ether:
        """``Ether("text", {"text": text})``."""
    def __eq__(self, other: object) -> bool: ...

class Region:
    """A writable slot of the session's shared pool (buffer protocol, zero copy). Send it
    once, after every buffer over it is released."""

    dtype: str
    shape: list[int]
    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
    @property
    def sent(self) -> bool:
        """Whether it was sent or released (then it has no memory)."""
    def release(self) -> None:
        """Gives the slot back unsent; refused while buffers over it are exported."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> _Capsule:
        """A writable DLPack capsule over the region ("dltensor_versioned" when
        ``max_version`` >= (1, 0), else "dltensor"), shaped by ``dtype`` and ``shape``."""
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)``: the CPU."""

class View:
    """A received attachment: a read-only buffer over the bytes where they arrived."""

    @property
    def id(self) -> str:
        """The attachment id."""
    @property
    def path(self) -> Literal["memfd", "shm", "inline"]:
        """How the bytes came."""
    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
    @property
    def dtype(self) -> str:
        """The element type the sender named (``""``: none)."""
    @property
    def shape(self) -> list[int]:
        """The tensor shape the sender gave (empty: none)."""
    @property
    def media_type(self) -> str:
        """The MIME type the sender gave (``""``: none)."""
    @property
    def msg_id(self) -> int:
        """The msgId of its message."""
    @property
    def released(self) -> bool:
        """Whether ``release()`` was called."""
    @property
    def faulted(self) -> bool:
        """Whether the sender shrank its segment under the mapping (zeros were read)."""
    def tobytes(self) -> bytes:
        """A copy of the bytes."""
    def release(self) -> None:
        """Ends the view; the sender's ACK goes once exported buffers are released too."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> _Capsule:
        """A read-only DLPack capsule over the bytes where they arrived (no copy), shaped by
        the sender's ``dtype`` and ``shape``. Needs ``max_version`` >= (1, 0) (the legacy
        capsule cannot say read-only: BufferError) unless ``copy=True``. The mapping and the
        sender's ACK wait until the consumer's tensor is deleted."""
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)``: the CPU."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

# ---------------------------------------------------------------------------------------------
# The asyncio bridge under ``xcp.aio`` (use that module; these are its building blocks).
#
# Each ``_aio_*`` function checks its arguments (raising at once), spawns the operation on the
# runtime and returns an ``AioOp``. Its task later calls ``loop.call_soon_threadsafe(done, ok,
# value)`` exactly once: ``(True, result)``, ``(False, exception)``, or ``(None, None)`` when
# ``AioOp.cancel()`` aborted it before it had a result.

_Done = Callable[[bool | None, Any], object]

class AioOp:
    """A running operation of ``xcp.aio`` on the runtime."""

    @property
    def finished(self) -> bool:
        """Whether its task finished (completed or aborted)."""
    def cancel(self) -> None:
        """Aborts the task at its next await point (then ``done(None, None)`` comes); no
        effect on a task that already finished."""

def _aio_connect(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    url: str,
    *,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    handles: bool = True,
    require_handles: bool = False,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    server_name: str | None = None,
) -> AioOp:
    """``connect``; the result is a ``Session``."""

def _aio_bind(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    url: str,
    *,
    handles: bool = True,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
) -> AioOp:
    """``Server.bind``; the result is a ``Server``."""

def _aio_accept(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    server: Server,
    timeout: float | None = None,
) -> AioOp:
    """``server.accept``; the result is a ``Session``."""

def _aio_send(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    ether: Ether,
    *,
    attachments: _Attachments | None = None,
    codec: _Codec = "json",
) -> AioOp:
    """``session.send``; the result is the msgId."""

def _aio_request(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    ether: Ether,
    *,
    attachments: _Attachments | None = None,
    codec: _Codec = "json",
    timeout: float | None = None,
) -> AioOp:
    """``session.request``; the result is the reply ``Message``."""

def _aio_recv(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    timeout: float | None = None,
) -> AioOp:
    """``session.recv``; the result is a ``Message``."""

def _aio_reply(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    msg: Message,
    ether: Ether,
    *,
    codec: _Codec = "json",
) -> AioOp:
    """``session.reply``; the result is the msgId."""

def _aio_nack(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    msg: Message,
    code: str | int,
    *,
    retry_after_ms: int = 0,
    detail: str = "",
) -> AioOp:
    """``session.nack``; the result is None."""

def _aio_ping(event_loop: asyncio.AbstractEventLoop, done: _Done, session: Session) -> AioOp:
    """``session.ping``; the result is the round-trip time in seconds."""

def _aio_alloc(
    event_loop: asyncio.AbstractEventLoop, done: _Done, session: Session, nbytes: int
) -> AioOp:
    """``session.alloc``; the result is a ``Region``."""

def _aio_close(event_loop: asyncio.AbstractEventLoop, done: _Done, session: Session) -> AioOp:
    """``session.close``; the result is None."""
def _aio_empty(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    shape: int | tuple[int, ...] | list[int],
    dtype: _DType,
) -> AioOp: ...
def _aio_send_tensor(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    tensor: _SupportsDLPack,
    ether: Ether | None = None,
    *,
    id: str = "tensor",
    codec: _Codec = "json",
) -> AioOp: ...
def _aio_request_tensor(
    event_loop: asyncio.AbstractEventLoop,
    done: _Done,
    session: Session,
    tensor: _SupportsDLPack,
    ether: Ether | None = None,
    *,
    id: str = "tensor",
    codec: _Codec = "json",
    timeout: float | None = None,
) -> AioOp: ...
