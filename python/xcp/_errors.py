"""The exceptions of xcp.

Every error the package raises is an :class:`XcpError`; the subclasses say what happened and
also derive from the builtin exception that means the same (``except TimeoutError`` and
``except ConnectionError`` catch xcp's too). The extension module raises them with the
fields of the library's error set as attributes.
"""

from __future__ import annotations

import builtins

__all__ = [
    "XcpError",
    "NackError",
    "AttachmentError",
    "TimeoutError",
    "ClosedError",
    "ProtocolError",
    "InvalidError",
    "TlsError",
]


class XcpError(Exception):
    """The base of every xcp error (OS errors other than a lost connection are raised as
    this)."""

    #: The OS error number, for errors that come from the operating system (else None).
    errno: int | None = None


class NackError(XcpError):
    """The peer refused our message with a NACK (SPEC §4).

    ``code`` is the numeric error code, ``name`` its SPEC name (such as ``"ERR_BUSY"``),
    ``detail`` the peer's explanation, ``retry_after_ms`` how long the peer asks us to wait
    before retrying (0: no advice), ``msg_id`` the msgId of the refused message.
    """

    code: int = 0
    name: str = ""
    detail: str = ""
    retry_after_ms: int = 0
    msg_id: int = 0


class AttachmentError(XcpError):
    """An attachment could not travel as asked: no handle scheme was negotiated where
    ``require_handles=True`` demands one, or a handle was refused (``ERR_ATTACHMENT``)."""

    code: int = 0x0009
    name: str = "ERR_ATTACHMENT"
    detail: str = ""


class TimeoutError(XcpError, builtins.TimeoutError):
    """A deadline passed: ``deadline`` says which (``"call"`` for a ``timeout=`` argument,
    ``"connect"``, ``"reply"``, ``"alloc"``, ...). After a ``timeout=`` of ``recv``,
    ``request`` or ``accept`` the session or server is still usable."""

    deadline: str = ""


class ClosedError(XcpError, ConnectionError):
    """The connection is over (the peer closed it, it was closed here, a server stopped), or
    could not be opened (refused). ``reason`` names why, such as ``"PeerClosed"``."""

    reason: str = ""


class ProtocolError(XcpError):
    """The peer broke the SPEC, or is a well-behaved peer we cannot talk to (no common codec,
    a newer major version). ``code``, ``name`` and ``detail`` as for :class:`NackError`;
    ``violation`` names the part of the SPEC the peer broke (``"Frame"``, ``"Header"``,
    ``"Transform"``, ``"Control"``, ``"Body"``, ``"Sequence"``, ``"Attachment"``,
    ``"Limit"``), or is None for an incompatible peer."""

    code: int = 0
    name: str = ""
    detail: str = ""
    violation: str | None = None


class TlsError(XcpError):
    """TLS or QUIC security failed. ``failure`` says what, such as ``"File"`` (a certificate,
    key or CA file missing or unusable), ``"KeyMismatch"``, ``"PeerCertificateUntrusted"``,
    ``"PeerRefusedOurCertificate"`` or ``"PeerNotXcpTls"``; ``detail`` names the file or the
    peer and what to do."""

    failure: str = ""
    detail: str = ""


class InvalidError(XcpError, ValueError):
    """The caller's mistake: a bad URL, a value out of range, an object of the wrong type, a
    released view or an already sent region."""
