"""xcp.aio: the asyncio API of xcp, the calls of the synchronous API as coroutines.

::

    import asyncio, xcp, xcp.aio

    async def main() -> None:
        async with await xcp.aio.connect("tcp://127.0.0.1:7000") as session:
            reply = await session.request(xcp.Ether("text", "hi"), timeout=5)
            async for msg in session:             # ends when the peer closes
                await session.reply(msg, msg.ether)

    asyncio.run(main())

The arguments, return types and exceptions are those of the sync API (:class:`xcp.Ether`,
:class:`xcp.Message`, :class:`xcp.Region`, :class:`xcp.View`, the classes of
:mod:`xcp._errors`), raised from the awaited call. Every call is a task on the same Rust
(tokio) runtime the sync API uses: no thread waits for it (one thread of the extension hands
every result to its event loop by ``loop.call_soon_threadsafe``), so thousands of calls can be
in flight on one loop, and the loop runs on meanwhile.

Cancellation (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``) aborts the Rust
task and leaves the session usable. A message that was taken off the session's queue just
as its ``recv()`` was cancelled is not lost: the next ``recv()`` returns it, in order (a
session accepted as its ``accept()`` was cancelled likewise goes to the next ``accept()``).
A cancelled ``request()`` abandons its reply (it is dropped when it comes, it never shows up
in ``recv()``). ``timeout=`` raises :class:`xcp.TimeoutError` and leaves the session usable.

Objects of this module belong to the event loop that made them: use them from that loop's
thread (from another thread, use ``asyncio.run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from . import _xcp
from ._errors import ClosedError
from ._xcp import Ether, Message, Region

if TYPE_CHECKING:
    from typing_extensions import Buffer

    _Attachments = Mapping[str, Region | Buffer]

__all__ = ["Server", "Session", "connect"]

_Codec = Literal["json", "protobuf", "JSON", "PROTOBUF"]

#: The ``ClosedError.reason`` of a connection that ended normally: ``async for`` stops there.
_CLEAN_ENDS = frozenset({"PeerClosed", "Local"})


async def _call(
    start: Callable[..., _xcp.AioOp],
    *args: Any,
    orphan: Callable[[Any], None] | None = None,
    settling: deque[asyncio.Future[None]] | None = None,
    track: dict[asyncio.Future[Any], _xcp.AioOp] | None = None,
    **kwargs: Any,
) -> Any:
    """Runs one operation of the bridge: ``start(loop, done, *args, **kwargs)`` spawns it on
    the runtime, and its task calls ``done(ok, value)`` on this loop's thread exactly once:
    ``(True, result)``, ``(False, exception)``, or ``(None, None)`` once an aborted task is
    gone. ``orphan`` gets a result that came for a call cancelled meanwhile (a received
    message is kept for the next call); a cancelled call whose task may still deliver such a
    result is put in ``settling`` until its ``done`` came (the next call waits for it, so
    results keep their order); ``track`` holds the futures and operations in flight (a
    server fails them when it closes)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    settled: asyncio.Future[None] = loop.create_future()

    def done(ok: bool | None, value: Any) -> None:
        if not settled.done():
            settled.set_result(None)
        if ok is None:
            return  # The task was aborted: nothing came.
        if fut.done():
            # Cancelled (or failed by a closing server) before the result came: keep it.
            if ok and orphan is not None:
                orphan(value)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    op = start(loop, done, *args, **kwargs)
    if track is not None:
        track[fut] = op
    try:
        return await fut
    except asyncio.CancelledError:
        op.cancel()
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            # The result came in the same turn as the cancel: not lost either.
            if orphan is not None:
                orphan(fut.result())
        elif settling is not None and not settled.done():
            settling.append(settled)
        raise
    finally:
        if track is not None:
            track.pop(fut, None)


async def _settle(settling: deque[asyncio.Future[None]]) -> None:
    """Waits until every cancelled call in ``settling`` delivered what it still had (at
    once, in practice: an aborted task says so at its next await point)."""
    while settling:
        await asyncio.shield(settling[0])
        if settling and settling[0].done():
            settling.popleft()


def _path(p: str | os.PathLike[str] | None) -> str | None:
    """A ``cert=``/``key=``/``ca=`` argument as the str the extension takes."""
    return None if p is None else os.fspath(p)


async def connect(
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
    """Connects to ``url`` (``tcp://host:port``, ``unix:///path``, ``tls://host:port`` or
    ``quic://host:port``) and returns the :class:`Session` once the handshake finished; the
    arguments and errors are those of :func:`xcp.connect` (``xcp.InvalidError`` for a bad
    URL, ``xcp.TimeoutError`` after ``connect_timeout`` seconds, ``xcp.ClosedError`` when
    refused, ``xcp.AttachmentError`` with ``require_handles=True`` and no handle scheme,
    ``xcp.TlsError`` for a missing certificate file or a refused TLS handshake)."""
    inner = await _call(
        _xcp._aio_connect,
        url=url,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        handles=handles,
        require_handles=require_handles,
        cert=_path(cert),
        key=_path(key),
        ca=_path(ca),
        server_name=server_name,
    )
    return Session(inner)


class Session:
    """One XCP connection, from :func:`connect` or :meth:`Server.accept`: the methods of
    :class:`xcp.Session` as coroutines. ``async with session:`` closes it at the end of the
    block; ``async for msg in session:`` receives until the connection ends normally (the
    peer closed it, or it was closed here); an abnormal end raises ``xcp.ClosedError``.

    Many tasks may use one session at once: every ``request`` gets its own reply."""

    __slots__ = ("_inner", "_kept", "_settling")

    def __init__(self, inner: _xcp.Session) -> None:
        """Wraps a session of the extension (use :func:`connect` or
        :meth:`Server.accept`)."""
        self._inner = inner
        #: Messages received for a ``recv()`` that was cancelled meanwhile, oldest first.
        self._kept: deque[Message] = deque()
        #: Cancelled ``recv()`` calls whose task may still deliver a message.
        self._settling: deque[asyncio.Future[None]] = deque()

    @property
    def closed(self) -> bool:
        """Whether the connection is over."""
        return self._inner.closed

    @property
    def peer(self) -> str:
        """The peer's address."""
        return self._inner.peer

    @property
    def negotiated(self) -> dict[str, Any]:
        """What the handshake settled: ``{"codecs": [...], "handles": [...],
        "max_frame_bytes": n}`` (``handles`` empty when attachments go inline)."""
        return self._inner.negotiated

    def stats(self) -> dict[str, Any]:
        """Messages and attachment bytes sent and received, by path: see
        :meth:`xcp.Session.stats` (the same counters: ``self.sync`` is the same session)."""
        return self._inner.stats()

    async def send(
        self,
        ether: Ether,
        *,
        attachments: _Attachments | None = None,
        codec: _Codec = "json",
    ) -> int:
        """Sends ``ether`` as a DATA message and returns its msgId once queued.
        ``attachments`` maps ids to :class:`xcp.Region` objects (by handle where negotiated)
        or bytes-like objects (copied once into a region); ``codec`` is ``"json"`` or
        ``"protobuf"``."""
        result: int = await _call(
            _xcp._aio_send, self._inner, ether, attachments=attachments, codec=codec
        )
        return result

    async def request(
        self,
        ether: Ether,
        *,
        attachments: _Attachments | None = None,
        codec: _Codec = "json",
        timeout: float | None = None,
    ) -> Message:
        """Sends ``ether`` (with ``attachments``, as :meth:`send`) and returns the reply.
        ``xcp.NackError`` when the peer refuses it, ``xcp.TimeoutError`` after ``timeout``
        seconds (at most the session's ``request_timeout``), ``xcp.ClosedError`` when the
        connection ends. Cancelling it abandons the reply; the session stays usable."""
        result: Message = await _call(
            _xcp._aio_request,
            self._inner,
            ether,
            attachments=attachments,
            codec=codec,
            timeout=timeout,
        )
        return result

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message that is not a reply to one of our requests.
        ``xcp.TimeoutError`` after ``timeout`` seconds (None: as long as it takes),
        ``xcp.ClosedError`` once the connection ended and every message was delivered. After
        a timeout or a cancel the session is usable, and no message is lost."""
        await _settle(self._settling)
        if self._kept:
            return self._kept.popleft()
        result: Message = await _call(
            _xcp._aio_recv,
            self._inner,
            timeout=timeout,
            orphan=self._kept.append,
            settling=self._settling,
        )
        return result

    async def reply(self, msg: Message, ether: Ether, *, codec: _Codec = "json") -> int:
        """Sends ``ether`` as the reply to ``msg`` (its inReplyTo and channel); returns its
        msgId."""
        result: int = await _call(_xcp._aio_reply, self._inner, msg, ether, codec=codec)
        return result

    async def nack(
        self,
        msg: Message,
        code: str | int,
        *,
        retry_after_ms: int = 0,
        detail: str = "",
    ) -> None:
        """Refuses ``msg`` with a NACK (``code`` a SPEC name such as ``"ERR_BUSY"``, or a
        number): the peer's request raises ``xcp.NackError``."""
        await _call(
            _xcp._aio_nack,
            self._inner,
            msg,
            code,
            retry_after_ms=retry_after_ms,
            detail=detail,
        )

    async def ping(self) -> float:
        """Sends a PING; returns the round-trip time in seconds."""
        result: float = await _call(_xcp._aio_ping, self._inner)
        return result

    async def alloc(self, nbytes: int) -> Region:
        """A writable :class:`xcp.Region` of ``nbytes`` from the session's shared pool;
        waits (without blocking the loop) while the pool is full."""
        result: Region = await _call(_xcp._aio_alloc, self._inner, nbytes)
        return result

    async def empty(self, shape: int | tuple[int, ...] | list[int], dtype: Any) -> Region:
        """A writable :class:`xcp.Region` of the pool shaped as a ``shape`` tensor of
        ``dtype`` (see :meth:`xcp.Session.empty`); waits (without blocking the loop) while
        the pool is full."""
        result: Region = await _call(_xcp._aio_empty, self._inner, shape, dtype)
        return result

    async def send_tensor(
        self,
        tensor: Any,
        ether: Ether | None = None,
        *,
        id: str = "tensor",
        codec: _Codec = "json",
    ) -> int:
        """Sends a host tensor (any object with ``__dlpack__``) as attachment ``id`` of
        ``ether``, as :meth:`xcp.Session.send_tensor` does (by handle with no copy when it
        lies in one of our regions, else copied once); returns its msgId."""
        result: int = await _call(
            _xcp._aio_send_tensor, self._inner, tensor, ether, id=id, codec=codec
        )
        return result

    async def request_tensor(
        self,
        tensor: Any,
        ether: Ether | None = None,
        *,
        id: str = "tensor",
        codec: _Codec = "json",
        timeout: float | None = None,
    ) -> Message:
        """:meth:`send_tensor`, then returns the reply (as :meth:`request`)."""
        result: Message = await _call(
            _xcp._aio_request_tensor,
            self._inner,
            tensor,
            ether,
            id=id,
            codec=codec,
            timeout=timeout,
        )
        return result

    async def close(self) -> None:
        """Closes gracefully (what was sent is flushed); closing a closed session is no
        error."""
        await _call(_xcp._aio_close, self._inner)

    @property
    def sync(self) -> _xcp.Session:
        """The same connection as a synchronous :class:`xcp.Session` (for a thread that
        does not run this loop; messages kept by a cancelled ``recv()`` stay here)."""
        return self._inner

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ClosedError as e:
            if getattr(e, "reason", "") in _CLEAN_ENDS:
                raise StopAsyncIteration from None
            raise

    def __repr__(self) -> str:
        return f"aio.Session(peer={self.peer!r}, closed={self.closed})"


class Server:
    """A listening socket for XCP connections: ``await Server.bind(url)``, then
    ``await server.accept()`` (or ``async for session in server:``). ``async with server:``
    (or ``close()``) stops accepting; sessions accepted live on."""

    __slots__ = ("_inner", "_kept", "_pending", "_settling")

    def __init__(self, inner: _xcp.Server) -> None:
        """Wraps a server of the extension (use :meth:`bind`)."""
        self._inner = inner
        #: Sessions accepted for an ``accept()`` that was cancelled meanwhile.
        self._kept: deque[_xcp.Session] = deque()
        #: Cancelled ``accept()`` calls whose task may still deliver a session.
        self._settling: deque[asyncio.Future[None]] = deque()
        #: The ``accept()`` calls in flight, failed by ``close()``.
        self._pending: dict[asyncio.Future[Any], _xcp.AioOp] = {}

    @staticmethod
    async def bind(
        url: str,
        *,
        handles: bool = True,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> Server:
        """Binds ``url`` (``tcp://127.0.0.1:0`` for any free port, ``unix:///path/x.sock``,
        ``tls://`` or ``quic://`` with ``cert=``, ``key=`` and ``ca=``) and starts accepting;
        ``url`` then gives the address really bound. ``handles=False`` offers no handle
        schemes."""
        inner = await _call(
            _xcp._aio_bind,
            url=url,
            handles=handles,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            cert=_path(cert),
            key=_path(key),
            ca=_path(ca),
        )
        return Server(inner)

    @property
    def url(self) -> str:
        """The URL really bound (with the real port when bound to port 0)."""
        return self._inner.url

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._inner.closed

    async def accept(self, timeout: float | None = None) -> Session:
        """The next connection whose handshake completed. ``xcp.TimeoutError`` after
        ``timeout`` seconds (None: no limit), ``xcp.ClosedError`` once the server is closed
        (also for an ``accept()`` waiting when it closes)."""
        await _settle(self._settling)
        if self._kept:
            return Session(self._kept.popleft())
        inner = await _call(
            _xcp._aio_accept,
            self._inner,
            timeout=timeout,
            orphan=self._keep,
            settling=self._settling,
            track=self._pending,
        )
        return Session(inner)

    def _keep(self, inner: _xcp.Session) -> None:
        """Keeps a session accepted for a cancelled ``accept()`` for the next one (after
        ``close()`` it is dropped, which closes it)."""
        if not self.closed:
            self._kept.append(inner)

    def close(self) -> None:
        """Stops accepting (and removes a Unix socket file): a waiting ``accept()`` raises
        ``xcp.ClosedError``. Sessions accepted live on. Like ``asyncio.Server.close``, it
        does not wait."""
        self._inner.close()
        for fut, op in list(self._pending.items()):
            op.cancel()
            if not fut.done():
                err = ClosedError(f"server {self.url} is closed")
                err.reason = "ServerStopped"
                fut.set_exception(err)
        self._pending.clear()
        self._kept.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Session:
        try:
            return await self.accept()
        except ClosedError:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        return f"aio.Server(url={self.url!r}, closed={self.closed})"
