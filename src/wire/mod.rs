//! The wire format (SPEC §1–§3), sans-IO.
//!
//! This layer turns bytes into [`Frame`]s and back. It never touches a socket, a clock or a
//! thread, so every transport drives the same code and tests can feed it byte by byte.
//!
//! - [`frame`]: the frame prefix, PLEN, CRC32C trailer; the encoder and the incremental
//!   [`FrameDecoder`](frame::FrameDecoder) that checks every limit before it allocates.
//! - [`header`]: the `FrameHeader` in its Cap'n Proto form (default) and JSON form (SPEC §2.2).
//! - [`chunk`]: splitting a message into MORE chunks and bounded reassembly.
//! - [`codec`]: the same decoder and encoder as `tokio_util::codec::{Decoder, Encoder}`.
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use xcp::wire::{frame::{FrameDecoder, encode_frame}, Flags, FrameHeader, HeaderForm, Limits, MsgType};
//!
//! let mut header = FrameHeader::default();
//! header.msg_type = MsgType::PING;
//! header.msg_id = 7;
//! let bytes = encode_frame(&header, HeaderForm::Capnp, Flags::NONE, &Bytes::from_static(b"{\"nonce\":1}")).unwrap();
//!
//! let mut dec = FrameDecoder::new(Limits::default());
//! let mut buf = BytesMut::from(&bytes[..]);
//! let frame = dec.decode(&mut buf).unwrap().unwrap();
//! assert_eq!(frame.header.msg_id, 7);
//! assert_eq!(&frame.payload[..], b"{\"nonce\":1}");
//! ```
#![forbid(unsafe_code)]

pub mod chunk;
pub mod codec;
pub mod frame;
pub mod header;
pub mod recvbuf;
pub mod seal;

use bytes::Bytes;
use std::fmt;

pub use crate::codec::CodecId;
pub use crate::ether::SchemaKey;

/// `0xA9A17A10`, written little-endian: bytes `10 7A A1 A9`.
pub const MAGIC: u32 = 0xA9A1_7A10;
/// The magic as it appears on the wire.
pub const MAGIC_BYTES: [u8; 4] = MAGIC.to_le_bytes();
/// Protocol version byte: high nibble major, low nibble minor. `0x02` = v0.2.
pub const VERSION: u8 = 0x02;
/// Our major version (the high nibble of [`VERSION`]).
pub const VERSION_MAJOR: u8 = VERSION >> 4;
/// Bytes before the header: MAGIC, VER, FLAGS, HLEN.
pub const PREFIX_LEN: usize = 8;
/// Length of the CRC32C trailer.
pub const TRAILER_LEN: usize = 4;
/// The default `max_frame_bytes` (SPEC §1): 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 1 << 20;
/// The smallest `max_frame_bytes` a peer may announce in HELLO or CAPS (0, "unstated", means
/// the default).
///
/// SPEC §6 takes the minimum of both sides' values as the chunk size, and sets no floor. A
/// peer announcing 1 would have every message cut into one frame per byte: a 256 MiB reply
/// would queue 2^28 frames, each with its own header, many GiB for one message. This is a
/// local policy, like the limits: a smaller value is refused at the handshake with
/// `ERR_MESSAGE_TOO_LARGE` (our smallest frames would be over the peer's limit) and the close.
/// At 256 bytes a frame's prefix, header and trailer stay a fraction of its payload.
pub const MIN_PEER_MAX_FRAME_BYTES: u64 = 256;
/// The default `max_message_bytes` (SPEC §1): 256 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 256 << 20;

/// The FLAGS byte (SPEC §1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// The body is zstd-compressed.
    pub const COMP: Flags = Flags(0x80);
    /// The body is sealed with ChaCha20-Poly1305.
    pub const CRYPT: Flags = Flags(0x40);
    /// More chunks of this message follow.
    pub const MORE: Flags = Flags(0x20);
    /// PLEN is 8 bytes.
    pub const LARGE: Flags = Flags(0x10);
    /// The low nibble, reserved: must be zero.
    pub const RESERVED_MASK: u8 = 0x0F;

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// `self` with the bits of `other` set or cleared.
    #[must_use]
    pub fn with(self, other: Flags, on: bool) -> Flags {
        if on {
            Flags(self.0 | other.0)
        } else {
            Flags(self.0 & !other.0)
        }
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (Flags::COMP, "COMP"),
            (Flags::CRYPT, "CRYPT"),
            (Flags::MORE, "MORE"),
            (Flags::LARGE, "LARGE"),
        ] {
            if self.contains(flag) {
                names.push(name);
            }
        }
        if self.0 & Flags::RESERVED_MASK != 0 {
            return write!(f, "Flags({:#04x}, reserved bits set)", self.0);
        }
        write!(f, "Flags({})", names.join("|"))
    }
}

/// A message type (SPEC §4). `0x0000..=0x00FF` are control messages, `0x0100` is DATA, higher
/// values are free for protocols layered on XCP. Unknown values are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MsgType(pub u16);

impl MsgType {
    /// Capability offer, the initiator's first frame.
    pub const HELLO: MsgType = MsgType(0x0000);
    /// The responder's capabilities / the negotiated result.
    pub const CAPS: MsgType = MsgType(0x0001);
    /// Positive acknowledgement of a msgId.
    pub const ACK: MsgType = MsgType(0x0002);
    /// Negative acknowledgement with an error code.
    pub const NACK: MsgType = MsgType(0x0003);
    /// Liveness probe.
    pub const PING: MsgType = MsgType(0x0004);
    /// Answer to PING.
    pub const PONG: MsgType = MsgType(0x0005);
    /// Asks the peer to resend with some fields.
    pub const CLARIFY_REQ: MsgType = MsgType(0x0006);
    /// Answer to CLARIFY_REQ.
    pub const CLARIFY_RES: MsgType = MsgType(0x0007);
    /// An encoded Ether or other body (§5).
    pub const DATA: MsgType = MsgType(0x0100);

    /// Whether this is a control message type (`0x0000..=0x00FF`).
    pub fn is_control(self) -> bool {
        self.0 <= 0x00FF
    }

    /// The SPEC name, or `None` for a value the SPEC does not define.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            MsgType::HELLO => "HELLO",
            MsgType::CAPS => "CAPS",
            MsgType::ACK => "ACK",
            MsgType::NACK => "NACK",
            MsgType::PING => "PING",
            MsgType::PONG => "PONG",
            MsgType::CLARIFY_REQ => "CLARIFY_REQ",
            MsgType::CLARIFY_RES => "CLARIFY_RES",
            MsgType::DATA => "DATA",
            _ => return None,
        })
    }
}

impl fmt::Debug for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "MsgType(0x{:04X})", self.0),
        }
    }
}

/// A free-form key/value tag of the header.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tag {
    /// The key.
    pub key: String,
    /// The value.
    pub val: String,
}

/// The frame header (SPEC §2), independent of its encoding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FrameHeader {
    /// Logical stream; frames of one channel stay ordered.
    pub channel_id: u32,
    /// §4.
    pub msg_type: MsgType,
    /// §5.
    pub body_codec: CodecId,
    /// The Ether schema of a DATA body.
    pub schema_key: SchemaKey,
    /// Unique per sender per connection, never reused; chunks share it.
    pub msg_id: u64,
    /// Correlation id, 0 if none.
    pub in_reply_to: u64,
    /// Free-form key/value.
    pub tags: Vec<Tag>,
}

/// How the header is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HeaderForm {
    /// Standard Cap'n Proto serialization (the default).
    #[default]
    Capnp,
    /// The JSON compatibility form of the Python proof of concept (SPEC §2.2). Frames in this
    /// form carry a big-endian CRC trailer.
    Json,
}

/// Receiver limits (SPEC §1), checked before anything is allocated.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame payload (PLEN) accepted.
    pub max_frame_bytes: u64,
    /// The largest reassembled message accepted, and the bound on bytes pending reassembly
    /// per connection.
    pub max_message_bytes: u64,
}

impl Limits {
    /// Frames of at most `max_frame_bytes` payload, messages of at most `max_message_bytes`.
    pub const fn new(max_frame_bytes: u64, max_message_bytes: u64) -> Limits {
        Limits {
            max_frame_bytes,
            max_message_bytes,
        }
    }
}

with_fields!(Limits {
    /// Frames of at most this many payload bytes.
    with_max_frame_bytes => max_frame_bytes: u64;
    /// Messages of at most this many bytes.
    with_max_message_bytes => max_message_bytes: u64;
});

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// One decoded frame: a header and its payload, exactly as on the wire (still compressed or
/// sealed when COMP/CRYPT are set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The VER byte as received (or to send).
    pub version: u8,
    /// The FLAGS byte.
    pub flags: Flags,
    /// The decoded header.
    pub header: FrameHeader,
    /// Which form the header came in.
    pub header_form: HeaderForm,
    /// The payload; a ref-counted slice of the receive buffer, never copied.
    pub payload: Bytes,
}
