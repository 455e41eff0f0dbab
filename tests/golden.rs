//! Golden vectors: whole reference frames whose bytes were worked out by hand from SPEC §1–§2
//! and the Cap'n Proto encoding rules (see `tests/vectors/README.md`). The encoder must produce
//! them byte for byte, and the decoder must read them back.

use bytes::{Bytes, BytesMut};
use xcp::wire::frame::{encode_frame, FrameDecoder};
use xcp::wire::{CodecId, Flags, FrameHeader, HeaderForm, Limits, MsgType, VERSION};

#[path = "support/hex.rs"]
mod hex;
use hex::parse_hex;

/// The reference PING: channel 0, msgId 1, JSON body codec, zero schema key, no tags.
fn ping_header() -> FrameHeader {
    FrameHeader {
        channel_id: 0,
        msg_type: MsgType::PING,
        body_codec: CodecId::JSON,
        msg_id: 1,
        in_reply_to: 0,
        ..FrameHeader::default()
    }
}

const PAYLOAD: &[u8] = b"{\"nonce\":1}";

fn check(vector: &str, form: HeaderForm) {
    let expected = parse_hex(vector);
    let payload = Bytes::from_static(PAYLOAD);

    let encoded = encode_frame(&ping_header(), form, Flags::NONE, &payload).unwrap();
    assert_eq!(
        encoded, expected,
        "{form:?}: encoder output differs from the golden vector"
    );

    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(&expected[..]);
    let frame = dec
        .decode(&mut buf)
        .unwrap()
        .expect("a whole frame is buffered");
    assert!(buf.is_empty(), "the decoder consumed the whole frame");
    assert_eq!(frame.version, VERSION);
    assert_eq!(frame.flags, Flags::NONE);
    assert_eq!(frame.header, ping_header());
    assert_eq!(frame.header_form, form);
    assert_eq!(&frame.payload[..], PAYLOAD);

    // Byte by byte, the decoder waits, then yields the same frame.
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut got = None;
    for (i, &b) in expected.iter().enumerate() {
        assert!(got.is_none(), "frame yielded before its last byte ({i})");
        buf.extend_from_slice(&[b]);
        got = dec.decode(&mut buf).unwrap();
    }
    assert_eq!(got.expect("frame after the last byte"), frame);
}

#[test]
fn ping_capnp() {
    check(include_str!("vectors/ping_capnp.hex"), HeaderForm::Capnp);
}

#[test]
fn ping_json() {
    check(include_str!("vectors/ping_json.hex"), HeaderForm::Json);
}

#[test]
fn crc_trailer_byte_order() {
    // CRC32C("{\"nonce\":1}") = 0x99D3DB63: little-endian in the Cap'n Proto form,
    // big-endian in the JSON form (SPEC §2.2).
    let capnp = parse_hex(include_str!("vectors/ping_capnp.hex"));
    let json = parse_hex(include_str!("vectors/ping_json.hex"));
    assert_eq!(&capnp[capnp.len() - 4..], &[0x63, 0xDB, 0xD3, 0x99]);
    assert_eq!(&json[json.len() - 4..], &[0x99, 0xD3, 0xDB, 0x63]);
    assert_eq!(xcp::wire::frame::crc32c(PAYLOAD), 0x99D3_DB63);
}

#[test]
fn json_vector_accepts_little_endian_crc() {
    // A receiver of a JSON-form frame accepts either CRC byte order (SPEC §2.2).
    let mut bytes = parse_hex(include_str!("vectors/ping_json.hex"));
    let n = bytes.len();
    bytes[n - 4..].reverse();
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(&bytes[..]);
    let frame = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame.header, ping_header());
}
