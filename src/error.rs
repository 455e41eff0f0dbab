//! One error type for the whole crate, and the SPEC's numeric NACK codes.
//!
//! [`ErrorCode`] is the wire registry of SPEC §4: it keeps unknown values instead of failing to
//! parse, so a newer peer's code is reported precisely. [`Error`] says who is at fault (the
//! peer, an incompatible peer, the caller, the operating system) and maps to a code with
//! [`Error::code`].

use std::fmt;

/// A NACK error code (SPEC §4). Unknown values are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u32);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $val:expr;)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($val);)*

            /// The SPEC name of this code, or `None` for a value the SPEC does not define.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// No error.
    OK = 0x0000;
    /// Kind/namespace not accepted by the receiver.
    ERR_SCHEMA_UNKNOWN = 0x0001;
    /// bodyCodec not negotiated or not known.
    ERR_CODEC_UNSUPPORTED = 0x0002;
    /// Frame or message over the limits.
    ERR_MESSAGE_TOO_LARGE = 0x0003;
    /// Major version not accepted, no adapter.
    ERR_KIND_MISMATCH = 0x0004;
    /// CRC32C mismatch.
    ERR_CHECKSUM = 0x0005;
    /// AEAD failure or CRYPT without a key.
    ERR_DECRYPT = 0x0006;
    /// Frame major version too high.
    ERR_VERSION = 0x0007;
    /// Bad magic, reserved flag bits, undecodable header or body.
    ERR_MALFORMED = 0x0008;
    /// Attachment URI refused, missing, or out of bounds.
    ERR_ATTACHMENT = 0x0009;
    /// Receiver overloaded; honour `retry_after_ms`.
    ERR_BUSY = 0x000A;
    /// Handler failed.
    ERR_INTERNAL = 0x000B;
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}(0x{:04X})", self.0),
            None => write!(f, "UNKNOWN(0x{:04X})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Every error xcp returns.
///
/// The variants say who is at fault. [`Error::code`] gives the NACK code that describes it on
/// the wire.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer sent bytes that break the SPEC (bad frame, bad header, bad body, a codec that
    /// was not negotiated, ...). `violation` says which part it broke, `code` is the NACK code
    /// we answer with.
    #[error("peer error {code}: {detail}")]
    Protocol {
        /// Which part of the SPEC the peer broke.
        violation: Violation,
        /// The NACK code for this failure.
        code: ErrorCode,
        /// What exactly was wrong, naming the field.
        detail: String,
    },
    /// The peer refused one of our messages with a NACK.
    #[error("peer refused message {msg_id} with {code}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Nack {
        /// The msgId of our message that was refused.
        msg_id: u64,
        /// The peer's error code.
        code: ErrorCode,
        /// How long the peer asks us to wait before retrying (0: no advice).
        retry_after_ms: u32,
        /// The peer's explanation, if any.
        detail: String,
    },
    /// The peer is well-behaved but cannot talk to us (no common codec, newer major version).
    #[error("incompatible peer {code}: {detail}")]
    Incompatible {
        /// The NACK code that describes the incompatibility.
        code: ErrorCode,
        /// What did not match.
        detail: String,
    },
    /// The caller asked for something invalid (bad URL, value out of range, wrong state).
    #[error("invalid use: {0}")]
    Invalid(String),
    /// A deadline passed: `deadline` says which (connect, handshake, reply, idle, ...).
    #[error("timed out: {detail}")]
    Timeout {
        /// Which deadline passed.
        deadline: Deadline,
        /// What was waited for, naming the peer and the limit.
        detail: String,
    },
    /// The connection is closed: `reason` says why, `detail` in words.
    #[error("connection closed: {detail}")]
    Closed {
        /// Why the connection ended.
        reason: CloseReason,
        /// The same, in words (the error that ended it, when one did).
        detail: String,
    },
    /// TLS or QUIC security failed: a certificate, key or CA file that is missing, unreadable,
    /// expired or mismatched, or a peer whose certificate the handshake refused (or that
    /// refused ours). `failure` says which; `detail` names the file or the peer and what to do.
    #[error("TLS: {detail}")]
    Tls {
        /// What failed.
        failure: TlsFailure,
        /// The file or the peer, and what to do.
        detail: String,
    },
    /// An operating-system error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Which part of the SPEC a peer broke, in an [`Error::Protocol`].
///
/// The NACK code says what the wire is told; this says where to look.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// The frame itself (SPEC §1): magic, version, reserved flag bits, lengths, the CRC32C
    /// trailer.
    Frame,
    /// The FrameHeader (SPEC §2): it does not decode, or a field is out of range.
    Header,
    /// A body transform (SPEC §3): compression, encryption or chunking.
    Transform,
    /// A control body (SPEC §4, §6): HELLO, CAPS, ACK, NACK, PING, PONG.
    Control,
    /// A DATA body (SPEC §5): a codec that was not negotiated, an Ether or a codec's payload
    /// that does not decode.
    Body,
    /// A frame the connection's state does not allow: data before the handshake, a second
    /// HELLO, CAPS from the initiator.
    Sequence,
    /// An attachment by handle (SPEC §7): a refused URI, scheme, range, descriptor or segment.
    Attachment,
    /// A limit this side set: messages by handle held, bytes the peer leaves unread.
    Limit,
}

/// What failed in an [`Error::Tls`], in the spirit of rustls' own error kinds.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The options do not make a configuration: a missing `--cert`, `--key` or `--ca`, a bad
    /// server name, a build without the `tls` feature.
    Config,
    /// A certificate, key or CA file is missing, unreadable or unwritable, or holds no
    /// usable PEM block of the kind needed.
    File,
    /// The private key does not belong to the certificate.
    KeyMismatch,
    /// One of our own certificates has expired or is not valid yet.
    OwnCertificateDated,
    /// The peer sent no certificate (a client without `--cert` and `--key`).
    PeerSentNoCertificate,
    /// The peer's certificate is not signed by our CA, or its signature is bad.
    PeerCertificateUntrusted,
    /// The peer's certificate has expired or is not valid yet.
    PeerCertificateDated,
    /// The server's certificate is not valid for the name we connect to.
    PeerCertificateWrongName,
    /// The peer refused our certificate.
    PeerRefusedOurCertificate,
    /// The peer does not speak TLS 1.3 with XCP's ALPN (a plaintext server, another protocol).
    PeerNotXcpTls,
    /// The handshake failed otherwise: the peer closed the connection in it, or an error
    /// rustls or quinn reports without a kind of its own.
    Handshake,
}

/// Which deadline an [`Error::Timeout`] is about.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Deadline {
    /// Opening a connection: the socket connect and the handshake (`connect_timeout`).
    Connect,
    /// The handshake of the connection itself (`conn::Config::handshake_timeout`).
    Handshake,
    /// A frame that started arriving and did not complete (`frame_timeout`).
    Frame,
    /// Nothing received for `idle_timeout`.
    Idle,
    /// A request's reply or a PING's PONG (`request_timeout`).
    Reply,
    /// Room in the pool for [`Session::alloc`](crate::Session::alloc) (`alloc_timeout`).
    Alloc,
    /// Flushing the last frames, or the whole close, when a connection ends.
    Close,
    /// Another wait (a transport's own, a device's).
    Other,
}

/// Why a connection ended, in an [`Error::Closed`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The peer closed the stream between messages.
    PeerClosed,
    /// The peer closed the stream in the middle of a frame.
    PeerClosedMidFrame,
    /// The connection ended before its handshake finished.
    Handshake,
    /// This side closed it (`close`, or the last handle dropped).
    Local,
    /// A server stopped accepting connections.
    ServerStopped,
    /// A deadline passed (see [`Deadline`]).
    TimedOut(Deadline),
    /// The peer broke the SPEC; the code is what we answered with.
    PeerMisbehaved(ErrorCode),
    /// The peer cannot talk to us (no common codec, a newer version, no key).
    Incompatible(ErrorCode),
    /// The peer refused the connection with a NACK (`ERR_BUSY` from a full server, ...).
    Refused(ErrorCode),
    /// TLS or QUIC security failed, at the handshake or when the peer refused us after it.
    Tls(TlsFailure),
    /// An operating-system error on the stream.
    Io(std::io::ErrorKind),
}

impl CloseReason {
    /// The reason a connection that failed with `e` is closed for.
    pub fn of(e: &Error) -> CloseReason {
        match e {
            Error::Closed { reason, .. } => *reason,
            Error::Timeout { deadline, .. } => CloseReason::TimedOut(*deadline),
            Error::Protocol { code, .. } => CloseReason::PeerMisbehaved(*code),
            Error::Incompatible { code, .. } => CloseReason::Incompatible(*code),
            Error::Nack { code, .. } => CloseReason::Refused(*code),
            Error::Tls { failure, .. } => CloseReason::Tls(*failure),
            Error::Io(e) => match Error::tls_in_io(e) {
                Some(f) => CloseReason::Tls(f),
                None => CloseReason::Io(e.kind()),
            },
            Error::Invalid(_) => CloseReason::Local,
        }
    }
}

impl Error {
    /// A timeout of `deadline`, saying what was waited for.
    pub fn timeout(deadline: Deadline, detail: impl Into<String>) -> Self {
        Error::Timeout {
            deadline,
            detail: detail.into(),
        }
    }

    /// A closed connection, for `reason`, in words.
    pub fn closed(reason: CloseReason, detail: impl Into<String>) -> Self {
        Error::Closed {
            reason,
            detail: detail.into(),
        }
    }

    /// Whether the peer is at fault: it broke the SPEC ([`Error::Protocol`]).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, Error::Protocol { .. })
    }

    /// The SPEC NACK code that describes this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Protocol { code, .. }
            | Error::Nack { code, .. }
            | Error::Incompatible { code, .. } => *code,
            // No room in the pool in time: this side is overloaded (SPEC §4 `ERR_BUSY`).
            Error::Timeout {
                deadline: Deadline::Alloc,
                ..
            } => ErrorCode::ERR_BUSY,
            Error::Invalid(_)
            | Error::Timeout { .. }
            | Error::Closed { .. }
            | Error::Tls { .. }
            | Error::Io(_) => ErrorCode::ERR_INTERNAL,
        }
    }

    /// A peer error: it broke `violation`, answered with `code`.
    pub fn protocol(violation: Violation, code: ErrorCode, detail: impl Into<String>) -> Self {
        Error::Protocol {
            violation,
            code,
            detail: detail.into(),
        }
    }

    /// A peer error `ERR_MALFORMED` naming what was malformed.
    pub fn malformed(violation: Violation, detail: impl Into<String>) -> Self {
        Self::protocol(violation, ErrorCode::ERR_MALFORMED, detail)
    }

    /// A refused attachment: `ERR_ATTACHMENT` (SPEC §7), naming the URI or the segment.
    pub fn attachment(detail: impl Into<String>) -> Self {
        Self::protocol(Violation::Attachment, ErrorCode::ERR_ATTACHMENT, detail)
    }

    /// A TLS/QUIC security error naming the file or the peer.
    pub fn tls(failure: TlsFailure, detail: impl Into<String>) -> Self {
        Error::Tls {
            failure,
            detail: detail.into(),
        }
    }

    /// The [`TlsFailure`] an I/O error of a TLS stream carries, if it is one.
    pub(crate) fn tls_in_io(e: &std::io::Error) -> Option<TlsFailure> {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<TlsIo>())
            .map(|t| t.failure)
    }

    /// The [`Violation`] of a peer error, `None` for any other error.
    pub fn violation(&self) -> Option<Violation> {
        match self {
            Error::Protocol { violation, .. } => Some(*violation),
            _ => None,
        }
    }

    /// The [`TlsFailure`] of a TLS error, or of a connection that TLS ended; `None` for any
    /// other error.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match CloseReason::of(self) {
            CloseReason::Tls(f) => Some(f),
            _ => None,
        }
    }

    /// An API misuse error.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Error::Invalid(detail.into())
    }
}

/// A TLS failure carried inside an [`std::io::Error`]: what a TLS stream's reads and writes
/// return when the peer refuses us after the handshake, so that [`CloseReason::of`] still
/// knows it was TLS and which failure.
#[derive(Debug)]
pub(crate) struct TlsIo {
    pub(crate) failure: TlsFailure,
    detail: String,
}

impl TlsIo {
    /// An I/O error of `kind` carrying `failure`, in words `detail`.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn error(
        kind: std::io::ErrorKind,
        failure: TlsFailure,
        detail: impl Into<String>,
    ) -> std::io::Error {
        std::io::Error::new(
            kind,
            TlsIo {
                failure,
                detail: detail.into(),
            },
        )
    }
}

impl fmt::Display for TlsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for TlsIo {}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_spec_table() {
        assert_eq!(ErrorCode::ERR_CHECKSUM.0, 5);
        assert_eq!(ErrorCode::ERR_MALFORMED.0, 8);
        assert_eq!(ErrorCode::ERR_INTERNAL.0, 0x0B);
        assert_eq!(ErrorCode(0x0A).name(), Some("ERR_BUSY"));
        assert_eq!(ErrorCode(0x77).name(), None);
        assert_eq!(format!("{}", ErrorCode(0x77)), "UNKNOWN(0x0077)");
    }

    #[test]
    fn close_reasons_follow_the_error() {
        let t = Error::timeout(Deadline::Idle, "nothing received for 1s");
        assert_eq!(CloseReason::of(&t), CloseReason::TimedOut(Deadline::Idle));
        assert_eq!(t.to_string(), "timed out: nothing received for 1s");
        let m = Error::malformed(Violation::Frame, "bad magic");
        assert_eq!(
            CloseReason::of(&m),
            CloseReason::PeerMisbehaved(ErrorCode::ERR_MALFORMED)
        );
        assert!(m.is_peer_fault() && !t.is_peer_fault());
        assert_eq!(m.violation(), Some(Violation::Frame));
        assert_eq!(t.violation(), None);
        let tls = Error::tls(TlsFailure::KeyMismatch, "key.pem is not cert.pem's key");
        assert_eq!(
            CloseReason::of(&tls),
            CloseReason::Tls(TlsFailure::KeyMismatch)
        );
        // A TLS failure the stream reports as I/O (the peer refused us after the handshake)
        // keeps its kind.
        let io = Error::Io(TlsIo::error(
            std::io::ErrorKind::ConnectionAborted,
            TlsFailure::PeerRefusedOurCertificate,
            "tls://peer: TLS: the peer refused our certificate",
        ));
        let refused = CloseReason::Tls(TlsFailure::PeerRefusedOurCertificate);
        assert_eq!(CloseReason::of(&io), refused);
        assert_eq!(
            io.tls_failure(),
            Some(TlsFailure::PeerRefusedOurCertificate)
        );
        let closed = Error::closed(refused, "the peer refused our certificate");
        assert_eq!(
            closed.tls_failure(),
            Some(TlsFailure::PeerRefusedOurCertificate)
        );
        assert_eq!(tls.tls_failure(), Some(TlsFailure::KeyMismatch));
        assert_eq!(tls.to_string(), "TLS: key.pem is not cert.pem's key");
        let io = Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(
            CloseReason::of(&io),
            CloseReason::Io(std::io::ErrorKind::ConnectionReset)
        );
        let c = Error::closed(CloseReason::PeerClosed, "peer closed the stream");
        assert_eq!(CloseReason::of(&c), CloseReason::PeerClosed);
        assert_eq!(c.to_string(), "connection closed: peer closed the stream");
    }

    #[test]
    fn error_maps_to_code() {
        let e = Error::malformed(Violation::Header, "header: truncated");
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
        assert_eq!(
            Error::attachment("memfd://0: not sealed").code(),
            ErrorCode::ERR_ATTACHMENT
        );
        assert!(e.to_string().contains("header: truncated"));
    }
}
