//! The `FrameHeader` in its two forms (SPEC §2).
//!
//! - **Cap'n Proto** (the default, SPEC §2.1): the standard serialization of
//!   `proto/frame.capnp` — segment table, then the message, unpacked. The encoder always writes
//!   a single segment, and leaves a pointer null where its target is all default: `schemaKey`
//!   when the whole key is zero, `schemaKey.hash128` when the hash is all zero, `tags` when there
//!   are none, and a tag's `key`/`val` when it is empty. Readers treat a null pointer as the
//!   default, so nothing is lost.
//! - **JSON** (the proof-of-concept compatibility form, SPEC §2.2): one compact object whose
//!   first byte is `{`. The encoder writes every field, in the order of the SPEC, with `hash128`
//!   as 32 lowercase hex characters (zeros when there is no hash), for example:
//!
//! ```text
//! {"channelId":0,"msgType":4,"bodyCodec":1,"schemaKey":{"nsHash":0,"kindId":0,"major":0,
//! "minor":0,"hash128":"00000000000000000000000000000000"},"msgId":1,"inReplyTo":0,"tags":[]}
//! ```
//!
//! (one line on the wire). The decoder accepts missing fields (and `null`) as the zero default
//! and ignores unknown fields.
//!
//! [`decode`] tells the forms apart by the first byte and checks everything it reads: any
//! failure is an `ERR_MALFORMED` [`Error`] naming the field, never a panic, and nothing is
//! allocated from a length it has not checked against the input.
//!
//! ```
//! use xcp::wire::{header, FrameHeader, HeaderForm, MsgType};
//!
//! let mut h = FrameHeader::default();
//! h.msg_type = MsgType::PING;
//! h.msg_id = 1;
//! for form in [HeaderForm::Capnp, HeaderForm::Json] {
//!     let bytes = header::encode(&h, form).unwrap();
//!     assert_eq!(header::decode(&bytes).unwrap(), (h.clone(), form));
//! }
//! ```

use bytes::{BufMut as _, BytesMut};
use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use serde_json::{Map, Value};

use super::{CodecId, FrameHeader, HeaderForm, MsgType, SchemaKey, Tag};
use crate::error::{Error, Result, Violation};

#[path = "frame_capnp.rs"]
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    unused,
    unused_qualifications,
    unreachable_pub,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    elided_lifetimes_in_paths,
    rust_2018_idioms
)]
#[rustfmt::skip]
mod frame_capnp;

/// The checked-in module against `proto/frame.capnp` (node ids, struct sizes, field slots).
#[cfg(test)]
#[path = "capnp_pin.rs"]
mod capnp_pin;

/// The largest encoded header: HLEN is a `u16`.
pub const MAX_HEADER_LEN: usize = u16::MAX as usize;

/// Bytes in a Cap'n Proto word.
const WORD: usize = 8;
/// Words of the root pointer plus the `FrameHeader` struct (3 data words, 2 pointers).
const FRAME_HEADER_WORDS: usize = 1 + 3 + 2;
/// Words of the `SchemaKey` struct (2 data words, 1 pointer).
const SCHEMA_KEY_WORDS: usize = 2 + 1;
/// Words of a 16-byte `hash128`.
const HASH128_WORDS: usize = 2;
/// Words of one `Tag` element (0 data words, 2 pointers).
const TAG_WORDS: usize = 2;

/// The traversal limit of the reader: more than a 64 KiB header can legitimately need, small
/// enough that a hostile header cannot make the reader do much work.
const TRAVERSAL_LIMIT_WORDS: usize = 64 * 1024;
/// The nesting limit of the reader: a header nests three deep (root, tags, tag).
const NESTING_LIMIT: i32 = 8;

/// Encodes `header` in `form`. Fails with [`Error::Invalid`] if the encoding would exceed
/// 65535 bytes (HLEN is a `u16`).
pub fn encode(header: &FrameHeader, form: HeaderForm) -> Result<Vec<u8>> {
    let mut out = BytesMut::new();
    encode_into(header, form, &mut out)?;
    Ok(out.into())
}

/// Appends the encoding of `header` in `form` to `out` (the same bytes as [`encode`]). On
/// error `out` is left as it was.
pub fn encode_into(header: &FrameHeader, form: HeaderForm, out: &mut BytesMut) -> Result<()> {
    match form {
        HeaderForm::Capnp => encode_capnp(header, out),
        HeaderForm::Json => encode_json(header, out),
    }
}

/// Decodes a header, telling the form apart by the first byte (`{` = JSON).
///
/// Every failure is an `ERR_MALFORMED` protocol error whose detail starts with `header:`.
pub fn decode(bytes: &[u8]) -> Result<(FrameHeader, HeaderForm)> {
    if bytes.is_empty() {
        return Err(Error::malformed(Violation::Header, "header: empty"));
    }
    if bytes.len() > MAX_HEADER_LEN {
        return Err(Error::malformed(
            Violation::Header,
            format!("header: {} bytes, over the 65535-byte limit", bytes.len()),
        ));
    }
    if bytes[0] == b'{' {
        decode_json(bytes).map(|h| (h, HeaderForm::Json))
    } else {
        decode_capnp(bytes).map(|h| (h, HeaderForm::Capnp))
    }
}

fn too_long(len: usize) -> Error {
    Error::invalid(format!(
        "header: encodes to {len} bytes, over the 65535-byte limit of HLEN"
    ))
}

// ---------------------------------------------------------------------------------------------
// Cap'n Proto form
// ---------------------------------------------------------------------------------------------

/// Words taken by a Text of `len` bytes (plus its NUL), or 0 when it is left null (empty).
fn text_words(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.saturating_add(1).div_ceil(WORD)
    }
}

/// The number of words of the single segment that [`encode_capnp`] builds.
fn capnp_segment_words(header: &FrameHeader) -> usize {
    let mut words = FRAME_HEADER_WORDS;
    if header.schema_key != SchemaKey::default() {
        words += SCHEMA_KEY_WORDS;
        if header.schema_key.hash128 != [0; 16] {
            words += HASH128_WORDS;
        }
    }
    if !header.tags.is_empty() {
        // The list's tag word, then the elements, then each element's texts.
        words = words
            .saturating_add(1)
            .saturating_add(header.tags.len().saturating_mul(TAG_WORDS));
        for tag in &header.tags {
            words = words
                .saturating_add(text_words(tag.key.len()))
                .saturating_add(text_words(tag.val.len()));
        }
    }
    words
}

fn encode_capnp(header: &FrameHeader, out: &mut BytesMut) -> Result<()> {
    let words = capnp_segment_words(header);
    // A single-segment message: 8 bytes of segment table, then the segment.
    let len = words.saturating_mul(WORD).saturating_add(WORD);
    if len > MAX_HEADER_LEN {
        return Err(too_long(len));
    }
    // `words` < 8192 here, so the whole message fits the first segment exactly.
    let first_segment = u32::try_from(words).map_err(|_| too_long(len))?;
    let mut message = Builder::new(HeapAllocator::new().first_segment_words(first_segment));
    {
        let mut root = message.init_root::<frame_capnp::frame_header::Builder<'_>>();
        root.set_channel_id(header.channel_id);
        root.set_msg_type(header.msg_type.0);
        root.set_body_codec(header.body_codec.0);
        root.set_msg_id(header.msg_id);
        root.set_in_reply_to(header.in_reply_to);
        let key = &header.schema_key;
        if *key != SchemaKey::default() {
            let mut sk = root.reborrow().init_schema_key();
            sk.set_ns_hash(key.ns_hash);
            sk.set_kind_id(key.kind_id);
            sk.set_major(key.major);
            sk.set_minor(key.minor);
            if key.hash128 != [0; 16] {
                sk.set_hash128(&key.hash128[..]);
            }
        }
        if !header.tags.is_empty() {
            let count = u32::try_from(header.tags.len()).map_err(|_| too_long(len))?;
            let mut list = root.init_tags(count);
            for (i, tag) in (0..count).zip(&header.tags) {
                let mut t = list.reborrow().get(i);
                if !tag.key.is_empty() {
                    t.set_key(tag.key.as_str());
                }
                if !tag.val.is_empty() {
                    t.set_val(tag.val.as_str());
                }
            }
        }
    }
    debug_assert_eq!(message.get_segments_for_output().len(), 1);
    debug_assert_eq!(
        capnp::serialize::compute_serialized_size_in_words(&message) * WORD,
        len
    );
    out.reserve(len);
    let start = out.len();
    capnp::serialize::write_message((&mut *out).writer(), &message).map_err(|e| {
        out.truncate(start);
        Error::invalid(format!("header: Cap'n Proto encoding failed: {e}"))
    })?;
    Ok(())
}

/// Checks the segment table against the slice: a valid segment count, and segment lengths that
/// add up to exactly the bytes that follow the table.
fn check_segment_table(bytes: &[u8]) -> Result<()> {
    let le32 = |at: usize| -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(b)
    };
    if bytes.len() < WORD {
        return Err(Error::malformed(
            Violation::Header,
            format!(
                "header: Cap'n Proto segment table truncated ({} bytes)",
                bytes.len()
            ),
        ));
    }
    if !bytes.len().is_multiple_of(WORD) {
        return Err(Error::malformed(
            Violation::Header,
            format!(
                "header: Cap'n Proto message of {} bytes is not a whole number of words",
                bytes.len()
            ),
        ));
    }
    // The count is stored minus one; a table of `count` lengths is padded to a whole word.
    let count = u64::from(le32(0)) + 1;
    let table_bytes = (4 + 4 * count).div_ceil(WORD as u64) * WORD as u64;
    if table_bytes > bytes.len() as u64 {
        return Err(Error::malformed(
            Violation::Header,
            format!(
                "header: Cap'n Proto segment table of {count} segments does not fit in {} bytes",
                bytes.len()
            ),
        ));
    }
    // `count` is now small: the table fits in a slice of at most 65535 bytes.
    let count = count as usize;
    let mut words: u64 = 0;
    for i in 0..count {
        words += u64::from(le32(4 + 4 * i));
    }
    let body_words = (bytes.len() as u64 - table_bytes) / WORD as u64;
    if words != body_words {
        return Err(Error::malformed(
            Violation::Header,
            format!(
            "header: Cap'n Proto segment table claims {words} words, the header holds {body_words}"
        ),
        ));
    }
    Ok(())
}

fn decode_capnp(bytes: &[u8]) -> Result<FrameHeader> {
    check_segment_table(bytes)?;
    // The reader needs 8-byte aligned words; a header inside a receive buffer may not be.
    // Copy it (at most 64 KiB, already checked) into aligned memory when it is not.
    let aligned;
    let mut slice = if bytes.as_ptr().align_offset(WORD) == 0 {
        bytes
    } else {
        let mut words = capnp::Word::allocate_zeroed_vec(bytes.len() / WORD);
        capnp::Word::words_to_bytes_mut(&mut words).copy_from_slice(bytes);
        aligned = words;
        capnp::Word::words_to_bytes(&aligned)
    };
    let mut options = ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    let message = capnp::serialize::read_message_from_flat_slice_no_alloc(&mut slice, options)
        .map_err(|e| {
            Error::malformed(
                Violation::Header,
                format!("header: Cap'n Proto segment table: {e}"),
            )
        })?;
    if !slice.is_empty() {
        return Err(Error::malformed(
            Violation::Header,
            format!(
                "header: {} bytes after the Cap'n Proto message",
                slice.len()
            ),
        ));
    }
    let root = message
        .get_root::<frame_capnp::frame_header::Reader<'_>>()
        .map_err(|e| Error::malformed(Violation::Header, format!("header: root struct: {e}")))?;

    let mut header = FrameHeader {
        channel_id: root.get_channel_id(),
        msg_type: MsgType(root.get_msg_type()),
        body_codec: CodecId(root.get_body_codec()),
        msg_id: root.get_msg_id(),
        in_reply_to: root.get_in_reply_to(),
        ..FrameHeader::default()
    };

    let sk = root
        .get_schema_key()
        .map_err(|e| Error::malformed(Violation::Header, format!("header: schemaKey: {e}")))?;
    header.schema_key.ns_hash = sk.get_ns_hash();
    header.schema_key.kind_id = sk.get_kind_id();
    header.schema_key.major = sk.get_major();
    header.schema_key.minor = sk.get_minor();
    let hash = sk.get_hash128().map_err(|e| {
        Error::malformed(Violation::Header, format!("header: schemaKey.hash128: {e}"))
    })?;
    match hash.len() {
        0 => {}
        16 => header.schema_key.hash128.copy_from_slice(hash),
        n => {
            return Err(Error::malformed(
                Violation::Header,
                format!("header: schemaKey.hash128 is {n} bytes, not 0 or 16"),
            ))
        }
    }

    let tags = root
        .get_tags()
        .map_err(|e| Error::malformed(Violation::Header, format!("header: tags: {e}")))?;
    for (i, tag) in tags.iter().enumerate() {
        let text = |r: capnp::Result<capnp::text::Reader<'_>>, field: &str| -> Result<String> {
            let r = r.map_err(|e| {
                Error::malformed(Violation::Header, format!("header: tags[{i}].{field}: {e}"))
            })?;
            r.to_str().map(str::to_owned).map_err(|_| {
                Error::malformed(
                    Violation::Header,
                    format!("header: tags[{i}].{field} is not valid UTF-8"),
                )
            })
        };
        header.tags.push(Tag {
            key: text(tag.get_key(), "key")?,
            val: text(tag.get_val(), "val")?,
        });
    }
    Ok(header)
}

// ---------------------------------------------------------------------------------------------
// JSON form
// ---------------------------------------------------------------------------------------------

fn encode_json(header: &FrameHeader, out: &mut BytesMut) -> Result<()> {
    let start = out.len();
    if let Err(e) = write_json(header, &mut (&mut *out).writer()) {
        out.truncate(start);
        return Err(Error::invalid(format!("header: JSON encoding failed: {e}")));
    }
    let len = out.len() - start;
    if len > MAX_HEADER_LEN {
        out.truncate(start);
        return Err(too_long(len));
    }
    Ok(())
}

fn write_json(h: &FrameHeader, w: &mut impl std::io::Write) -> std::io::Result<()> {
    let k = &h.schema_key;
    write!(
        w,
        "{{\"channelId\":{},\"msgType\":{},\"bodyCodec\":{},\"schemaKey\":{{\"nsHash\":{},\
         \"kindId\":{},\"major\":{},\"minor\":{},\"hash128\":\"",
        h.channel_id, h.msg_type.0, h.body_codec.0, k.ns_hash, k.kind_id, k.major, k.minor
    )?;
    for b in k.hash128 {
        write!(w, "{b:02x}")?;
    }
    write!(
        w,
        "\"}},\"msgId\":{},\"inReplyTo\":{},\"tags\":[",
        h.msg_id, h.in_reply_to
    )?;
    for (i, tag) in h.tags.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        w.write_all(b"{\"key\":")?;
        serde_json::to_writer(&mut *w, &tag.key)?;
        w.write_all(b",\"val\":")?;
        serde_json::to_writer(&mut *w, &tag.val)?;
        w.write_all(b"}")?;
    }
    w.write_all(b"]}")
}

/// The field `name` of `obj`, or `None` when it is absent or `null`.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// An unsigned integer field that must fit in `T`; absent → 0.
fn json_uint<T: TryFrom<u64> + Default>(
    obj: &Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<T> {
    let Some(v) = field(obj, name) else {
        return Ok(T::default());
    };
    let n = v.as_u64().ok_or_else(|| {
        Error::malformed(
            Violation::Header,
            format!("header: {path} is not an unsigned integer: {v}"),
        )
    })?;
    T::try_from(n).map_err(|_| {
        Error::malformed(
            Violation::Header,
            format!(
                "header: {path} = {n} is out of range for {}",
                std::any::type_name::<T>()
            ),
        )
    })
}

/// A text field; absent → empty.
fn json_text(obj: &Map<String, Value>, name: &str, path: &str) -> Result<String> {
    match field(obj, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::malformed(
            Violation::Header,
            format!("header: {path} is not a string"),
        )),
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn json_hash128(obj: &Map<String, Value>) -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    let s = match field(obj, "hash128") {
        None => return Ok(out),
        Some(Value::String(s)) => s.as_bytes(),
        Some(_) => {
            return Err(Error::malformed(
                Violation::Header,
                "header: schemaKey.hash128 is not a string",
            ))
        }
    };
    match s.len() {
        0 => Ok(out),
        32 => {
            for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
                match (hex_digit(pair[0]), hex_digit(pair[1])) {
                    (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
                    _ => {
                        return Err(Error::malformed(
                            Violation::Header,
                            "header: schemaKey.hash128 is not hexadecimal",
                        ))
                    }
                }
            }
            Ok(out)
        }
        n => Err(Error::malformed(
            Violation::Header,
            format!("header: schemaKey.hash128 is {n} characters, not 0 or 32 hex digits"),
        )),
    }
}

fn decode_json(bytes: &[u8]) -> Result<FrameHeader> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::malformed(Violation::Header, format!("header: invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Error::malformed(
            Violation::Header,
            "header: JSON header is not an object",
        ));
    };
    let mut header = FrameHeader {
        channel_id: json_uint(&obj, "channelId", "channelId")?,
        msg_type: MsgType(json_uint(&obj, "msgType", "msgType")?),
        body_codec: CodecId(json_uint(&obj, "bodyCodec", "bodyCodec")?),
        msg_id: json_uint(&obj, "msgId", "msgId")?,
        in_reply_to: json_uint(&obj, "inReplyTo", "inReplyTo")?,
        ..FrameHeader::default()
    };
    match field(&obj, "schemaKey") {
        None => {}
        Some(Value::Object(sk)) => {
            header.schema_key = SchemaKey {
                ns_hash: json_uint(sk, "nsHash", "schemaKey.nsHash")?,
                kind_id: json_uint(sk, "kindId", "schemaKey.kindId")?,
                major: json_uint(sk, "major", "schemaKey.major")?,
                minor: json_uint(sk, "minor", "schemaKey.minor")?,
                hash128: json_hash128(sk)?,
            }
        }
        Some(_) => {
            return Err(Error::malformed(
                Violation::Header,
                "header: schemaKey is not an object",
            ))
        }
    }
    match field(&obj, "tags") {
        None => {}
        Some(Value::Array(tags)) => {
            header.tags.reserve(tags.len());
            for (i, tag) in tags.iter().enumerate() {
                let Value::Object(t) = tag else {
                    return Err(Error::malformed(
                        Violation::Header,
                        format!("header: tags[{i}] is not an object"),
                    ));
                };
                header.tags.push(Tag {
                    key: json_text(t, "key", &format!("tags[{i}].key"))?,
                    val: json_text(t, "val", &format!("tags[{i}].val"))?,
                });
            }
        }
        Some(_) => {
            return Err(Error::malformed(
                Violation::Header,
                "header: tags is not an array",
            ))
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            channel_id: 0xDEAD_BEEF,
            msg_type: MsgType::DATA,
            body_codec: CodecId::TENSOR_F32,
            schema_key: SchemaKey {
                ns_hash: 0x1234_5678,
                kind_id: 0xBDE6_4E3E,
                major: 3,
                minor: 0xFFFF,
                hash128: *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\xaa\xbb\xcc\xdd\xee\xff",
            },
            msg_id: u64::MAX,
            in_reply_to: 0x8000_0000_0000_0001,
            tags: vec![
                Tag {
                    key: "k".into(),
                    val: "v".into(),
                },
                Tag {
                    key: String::new(),
                    val: "\"quoted\\\" é 🦀 \u{1}".into(),
                },
                Tag {
                    key: "exactly7".into(),
                    val: String::new(),
                },
            ],
        }
    }

    fn ping() -> FrameHeader {
        FrameHeader {
            msg_type: MsgType::PING,
            body_codec: CodecId::JSON,
            msg_id: 1,
            ..FrameHeader::default()
        }
    }

    #[track_caller]
    fn assert_malformed(bytes: &[u8], needle: &str) {
        match decode(bytes) {
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}");
                assert_eq!(e.violation(), Some(Violation::Header), "{e}");
                let s = e.to_string();
                assert!(s.contains("header:"), "{s}");
                assert!(s.contains(needle), "{s:?} should mention {needle:?}");
            }
            Ok(h) => panic!("decoded {h:?} from {bytes:02x?}"),
        }
    }

    /// Parses a vector file: hex digits, whitespace, and `#` comments to the end of the line.
    fn parse_hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.bytes().filter(|b| !b.is_ascii_whitespace()))
            .collect();
        assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
        digits
            .chunks_exact(2)
            .map(|p| hex_digit(p[0]).unwrap() << 4 | hex_digit(p[1]).unwrap())
            .collect()
    }

    #[test]
    fn round_trip_both_forms() {
        for h in [FrameHeader::default(), ping(), sample()] {
            for form in [HeaderForm::Capnp, HeaderForm::Json] {
                let bytes = encode(&h, form).unwrap();
                assert_eq!(decode(&bytes).unwrap(), (h.clone(), form), "{form:?}");
                let mut out = BytesMut::from(&b"prefix"[..]);
                encode_into(&h, form, &mut out).unwrap();
                assert_eq!(&out[..6], b"prefix");
                assert_eq!(&out[6..], &bytes[..]);
            }
        }
    }

    #[test]
    fn capnp_first_byte_is_never_a_brace() {
        let bytes = encode(&sample(), HeaderForm::Capnp).unwrap();
        assert_ne!(bytes[0], b'{');
        assert_eq!(bytes.len() % 8, 0);
    }

    #[test]
    fn capnp_decodes_from_a_misaligned_slice() {
        let bytes = encode(&sample(), HeaderForm::Capnp).unwrap();
        for shift in 1..8 {
            let mut buf = vec![0u8; shift];
            buf.extend_from_slice(&bytes);
            assert_eq!(decode(&buf[shift..]).unwrap().0, sample());
        }
    }

    #[test]
    fn json_form_is_compact_and_in_spec_order() {
        let text = String::from_utf8(encode(&sample(), HeaderForm::Json).unwrap()).unwrap();
        assert_eq!(
            text,
            "{\"channelId\":3735928559,\"msgType\":256,\"bodyCodec\":2,\"schemaKey\":\
             {\"nsHash\":305419896,\"kindId\":3185987134,\"major\":3,\"minor\":65535,\
             \"hash128\":\"00010203040506070809aabbccddeeff\"},\"msgId\":18446744073709551615,\
             \"inReplyTo\":9223372036854775809,\"tags\":[{\"key\":\"k\",\"val\":\"v\"},\
             {\"key\":\"\",\"val\":\"\\\"quoted\\\\\\\" é 🦀 \\u0001\"},\
             {\"key\":\"exactly7\",\"val\":\"\"}]}"
        );
    }

    #[test]
    fn json_missing_fields_take_defaults() {
        assert_eq!(
            decode(b"{}").unwrap(),
            (FrameHeader::default(), HeaderForm::Json)
        );
        let (h, _) = decode(
            br#"{"msgType":4,"unknown":[1,{"x":null}],"schemaKey":{"kindId":7,"hash128":""},
                "tags":[{"key":"a"},{}],"inReplyTo":null}"#,
        )
        .unwrap();
        let want = FrameHeader {
            msg_type: MsgType::PING,
            schema_key: SchemaKey {
                kind_id: 7,
                ..SchemaKey::default()
            },
            tags: vec![
                Tag {
                    key: "a".into(),
                    val: String::new(),
                },
                Tag::default(),
            ],
            ..FrameHeader::default()
        };
        assert_eq!(h, want);
        // Upper-case hex is accepted too.
        let (h, _) =
            decode(br#"{"schemaKey":{"hash128":"00010203040506070809AABBCCDDEEFF"}}"#).unwrap();
        assert_eq!(h.schema_key.hash128, sample().schema_key.hash128);
    }

    #[test]
    fn json_bad_input_is_malformed() {
        assert_malformed(b"{", "invalid JSON");
        assert_malformed(b"{\"msgId\":1} x", "invalid JSON");
        assert_malformed(b"{\"msgId\":\"1\"}", "msgId");
        assert_malformed(b"{\"msgId\":-1}", "msgId");
        assert_malformed(b"{\"msgId\":1.5}", "msgId");
        assert_malformed(b"{\"msgId\":18446744073709551616}", "msgId");
        assert_malformed(b"{\"channelId\":4294967296}", "channelId");
        assert_malformed(b"{\"msgType\":65536}", "msgType");
        assert_malformed(b"{\"bodyCodec\":true}", "bodyCodec");
        assert_malformed(b"{\"schemaKey\":[]}", "schemaKey");
        assert_malformed(b"{\"schemaKey\":{\"major\":70000}}", "schemaKey.major");
        assert_malformed(
            b"{\"schemaKey\":{\"hash128\":\"abcd\"}}",
            "schemaKey.hash128",
        );
        assert_malformed(
            b"{\"schemaKey\":{\"hash128\":\"zz0102030405060708090a0b0c0d0e0f\"}}",
            "schemaKey.hash128",
        );
        assert_malformed(b"{\"schemaKey\":{\"hash128\":16}}", "schemaKey.hash128");
        assert_malformed(b"{\"tags\":{}}", "tags");
        assert_malformed(b"{\"tags\":[1]}", "tags[0]");
        assert_malformed(b"{\"tags\":[{\"key\":\"a\",\"val\":2}]}", "tags[0].val");
        assert_malformed(b"{\"tags\":[{\"key\":\"\\ud800\"}]}", "invalid JSON");
        assert_malformed(b"{\"tags\":[{\"key\":\"\xff\"}]}", "invalid JSON");
    }

    #[test]
    fn capnp_bad_input_is_malformed() {
        let good = encode(&sample(), HeaderForm::Capnp).unwrap();
        assert_malformed(b"", "empty");
        assert_malformed(&[0; 4], "truncated");
        assert_malformed(&[0; 12], "whole number of words");
        // Truncated anywhere (by whole words too): the table no longer matches the slice.
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert_malformed(&good[..good.len() - 8], "segment table claims");
        // A table claiming more words than present, or fewer (trailing bytes).
        let mut more = good.clone();
        more[4] = more[4].wrapping_add(1);
        assert_malformed(&more, "segment table claims");
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert_malformed(&trailing, "segment table claims");
        // A huge segment count, and a huge segment length.
        assert_malformed(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], "segment table");
        assert_malformed(
            &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            "segment table claims",
        );
        // Garbage with a consistent table: a root pointer that points outside the segment.
        let mut garbage = vec![0, 0, 0, 0, 2, 0, 0, 0];
        garbage.extend_from_slice(&[0x7c, 0x7f, 0x7f, 0x7f, 3, 0, 2, 0]);
        garbage.extend_from_slice(&[0; 8]);
        assert_malformed(&garbage, "root");
        // An over-long header.
        assert_malformed(&vec![0u8; 65536], "65535");
    }

    #[test]
    fn capnp_bad_hash128_length_is_malformed() {
        // Root FrameHeader (3 data, 2 ptrs) → SchemaKey (2 data, 1 ptr) → Data of 3 bytes.
        let words: [[u8; 8]; 12] = [
            [0, 0, 0, 0, 11, 0, 0, 0],            // segment table: 1 segment, 11 words
            [0, 0, 0, 0, 3, 0, 2, 0],             // root: struct, offset 0, 3 data, 2 ptrs
            [0; 8],                               // channelId, msgType, bodyCodec
            [0; 8],                               // msgId
            [0; 8],                               // inReplyTo
            [0x08, 0, 0, 0, 2, 0, 1, 0],          // schemaKey: struct, offset +2, 2 data, 1 ptr
            [0; 8],                               // tags: null
            [0; 8],                               // skipped
            [0; 8],                               // schemaKey data 0
            [0; 8],                               // schemaKey data 1
            [0x01, 0, 0, 0, 3 << 3 | 2, 0, 0, 0], // hash128: list, offset 0, bytes, 3 elements
            [0xaa, 0xbb, 0xcc, 0, 0, 0, 0, 0],    // the 3 bytes
        ];
        let bytes: Vec<u8> = words.concat();
        assert_malformed(&bytes, "schemaKey.hash128 is 3 bytes");
        // The same message with 16 bytes decodes.
        let mut ok = bytes.clone();
        ok[4] = 12;
        ok[80 + 4] = 16 << 3 | 2;
        ok.extend_from_slice(&[0; 8]);
        ok[88..104].copy_from_slice(&[7; 16]);
        let (h, form) = decode(&ok).unwrap();
        assert_eq!(form, HeaderForm::Capnp);
        assert_eq!(h.schema_key.hash128, [7; 16]);
    }

    #[test]
    fn capnp_tag_text_must_be_utf8() {
        let mut h = FrameHeader::default();
        h.tags.push(Tag {
            key: "ab".into(),
            val: String::new(),
        });
        let mut bytes = encode(&h, HeaderForm::Capnp).unwrap();
        let at = bytes.windows(3).position(|w| w == b"ab\0").unwrap();
        bytes[at] = 0xff;
        assert_malformed(&bytes, "tags[0].key is not valid UTF-8");
    }

    #[test]
    fn too_long_is_invalid() {
        let mut h = FrameHeader::default();
        h.tags.push(Tag {
            key: "k".into(),
            val: "x".repeat(70_000),
        });
        for form in [HeaderForm::Capnp, HeaderForm::Json] {
            let mut out = BytesMut::from(&b"keep"[..]);
            let e = encode_into(&h, form, &mut out).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert_eq!(&out[..], b"keep");
        }
        // Right at the limit: a single-segment capnp header of 65528 bytes is fine.
        h.tags[0].val = "x".repeat(65528 - 8 - 8 * (6 + 1 + 2 + 1) - 1);
        assert_eq!(encode(&h, HeaderForm::Capnp).unwrap().len(), 65528);
        h.tags[0].val.push('x');
        assert!(encode(&h, HeaderForm::Capnp).is_err());
    }

    /// Checks the header portion of a golden frame: prefix, HLEN, and the header bytes against
    /// both `encode` and `decode`.
    fn check_vector(text: &str, form: HeaderForm) {
        let frame = parse_hex(text);
        assert_eq!(&frame[..4], &super::super::MAGIC_BYTES);
        assert_eq!(frame[4], super::super::VERSION);
        assert_eq!(frame[5], 0);
        let hlen = usize::from(u16::from_le_bytes([frame[6], frame[7]]));
        let header_bytes = &frame[8..8 + hlen];
        assert_eq!(decode(header_bytes).unwrap(), (ping(), form));
        assert_eq!(encode(&ping(), form).unwrap(), header_bytes);
        let plen = u32::from_le_bytes(frame[8 + hlen..12 + hlen].try_into().unwrap()) as usize;
        assert_eq!(&frame[12 + hlen..12 + hlen + plen], b"{\"nonce\":1}");
        assert_eq!(frame.len(), 12 + hlen + plen + 4);
    }

    #[test]
    fn golden_ping_capnp_header() {
        check_vector(
            include_str!("../../tests/vectors/ping_capnp.hex"),
            HeaderForm::Capnp,
        );
    }

    #[test]
    fn golden_ping_json_header() {
        check_vector(
            include_str!("../../tests/vectors/ping_json.hex"),
            HeaderForm::Json,
        );
    }

    fn any_header() -> impl Strategy<Value = FrameHeader> {
        let key = (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 16]>(),
        )
            .prop_map(|(ns_hash, kind_id, major, minor, hash128)| SchemaKey {
                ns_hash,
                kind_id,
                major,
                minor,
                hash128,
            });
        let key = prop_oneof![Just(SchemaKey::default()), key];
        let tag = (".{0,12}", "\\PC{0,40}").prop_map(|(key, val)| Tag { key, val });
        (
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            key,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(tag, 0..6),
        )
            .prop_map(
                |(channel_id, msg_type, codec, schema_key, msg_id, in_reply_to, tags)| {
                    FrameHeader {
                        channel_id,
                        msg_type: MsgType(msg_type),
                        body_codec: CodecId(codec),
                        schema_key,
                        msg_id,
                        in_reply_to,
                        tags,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn prop_round_trip(h in any_header()) {
            for form in [HeaderForm::Capnp, HeaderForm::Json] {
                let bytes = encode(&h, form).unwrap();
                prop_assert_eq!(decode(&bytes).unwrap(), (h.clone(), form));
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Err(e) = decode(&bytes) {
                prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
            }
        }

        #[test]
        fn prop_capnp_body_never_panics(words in proptest::collection::vec(any::<u64>(), 0..64)) {
            // A consistent single-segment table, so the garbage reaches the pointer reader.
            let mut bytes = vec![0, 0, 0, 0];
            bytes.extend_from_slice(&(words.len() as u32).to_le_bytes());
            for w in &words {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            if let Err(e) = decode(&bytes) {
                prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
            }
        }

        #[test]
        fn prop_mutated_header_never_panics(
            h in any_header(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            for form in [HeaderForm::Capnp, HeaderForm::Json] {
                let mut bytes = encode(&h, form).unwrap();
                for &(at, x) in &flips {
                    let n = bytes.len();
                    bytes[at % n] ^= x;
                }
                if let Err(e) = decode(&bytes) {
                    prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
                }
            }
        }
    }
}
