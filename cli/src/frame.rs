//! `xcp frame encode|decode`: frame bytes from a JSON description, and frame bytes back into
//! descriptions. The inspection tool to reach for when a peer misbehaves (think
//! `protoc --decode`).
//!
//! Both directions use one description of a logical message (one JSON object):
//!
//! ```text
//! {"header": {"channelId": 0, "msgType": 256, "bodyCodec": 2, "msgId": 1, "inReplyTo": 0,
//!             "schemaKey": {"nsHash": 0, "kindId": 0, "major": 0, "minor": 0,
//!                           "hash128": "<32 hex>"},
//!             "tags": [{"key": "k", "val": "v"}]},
//!  "header_form": "capnp", "comp": false, "crypt": false,
//!  "body": {"tensor": {"dtype": "f32", "shape": [2], "values": [1.0, 2.0], ...}}}
//! ```
//!
//! `decode` always prints every field, so `encode` of what `decode` printed gives the same
//! frames back, and `decode(encode(d)) == d` for every description `d` in that full form
//! (tensor values within the quantisation step for QNT8, the rounding of F16 for F16).
//!
//! The pipeline is the library's own: [`seal::compress`] then [`Sealer::seal`] then
//! [`split`] then [`encode`] one way; [`FrameDecoder`] then [`Reassembler`] then
//! [`Sealer::open`] then [`seal::decompress`] then the codec the other way. Nothing about the
//! wire is re-implemented here.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Number, Value};

use xcp::attach::uri::AttachmentUri;
use xcp::codec::dlpack::{self, DlData, DlDataType, DlpackDescriptor};
use xcp::codec::tensor::{self, DType, TensorHeader, TensorView};
use xcp::codec::{arrow, latent, CodecId};
use xcp::control::Control;
use xcp::wire::chunk::{split, Message, Reassembler};
use xcp::wire::frame::{encode, EncodedFrame, FrameDecoder, FrameError};
use xcp::wire::seal::{self, Direction};
use xcp::wire::{
    header, Flags, FrameHeader, HeaderForm, Limits, MsgType, SchemaKey, Tag,
    DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES, MAGIC_BYTES, PREFIX_LEN, TRAILER_LEN,
};
use xcp::{Error, ErrorCode, Ether, Violation};

use crate::{parse_bytes, KeyArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
The description (one JSON object per logical message; the same both ways):
  {\"header\": {\"channelId\": 0, \"msgType\": 256, \"bodyCodec\": 2, \"msgId\": 1, \"inReplyTo\": 0,
              \"schemaKey\": {\"nsHash\": 0, \"kindId\": 0, \"major\": 0, \"minor\": 0,
                            \"hash128\": \"<32 hex>\"},
              \"tags\": [{\"key\": \"k\", \"val\": \"v\"}]},
   \"header_form\": \"capnp\",          capnp (default) or json (SPEC §2.2)
   \"comp\": false,                   zstd-compress the body (COMP)
   \"crypt\": false,                  seal the body (CRYPT; needs --key-file and --direction)
   \"body\": {...}}

  Absent header fields are 0, except: msgType is 256 (DATA) for a body that is not
  `control`, and bodyCodec is the one the body implies (JSON for ether and control bodies).
  msgType and bodyCodec may also be given by name (\"PING\", \"TENSOR_F16\").

The body is one of:
  {\"ether\": {\"kind\": ..., \"schema_version\": 1, \"payload\": {...}, \"metadata\": {...}}}
                  bodyCodec 1 JSON or 8 PROTOBUF (SPEC §5.1)
  {\"control\": {\"nonce\": 1}}   the SPEC §4 fields of a control msgType (HELLO..CLARIFY_RES),
                  bodyCodec JSON or PROTOBUF
  {\"tensor\": {\"dtype\": \"f32\"|\"f16\"|\"qnt8\", \"shape\": [2, 3], \"values\": [...],
              \"row_qnt\": false, \"col_major\": false, \"scale\": 1.0}}
                  values are real numbers in storage order; encode quantises for qnt8 (with
                  \"scale\" when given, else max|x|/127), decode prints dequantised values
  {\"latent\": [tensor, ...]}     MIXED_LATENT, each entry as the inside of \"tensor\"
  {\"arrow\": {\"ethers\": [ether, ...]}}            a batch of Ethers of one kind
  {\"arrow\": {\"num_rows\": n, \"schema\": {...}, \"base64\": \"...\"}}
                  any other Arrow IPC stream; encode uses the base64 bytes as they are
  {\"dlpack\": {\"device_type\": 1, \"device_id\": 0, \"dtype\": {\"code\": 2, \"bits\": 32, \"lanes\": 1},
              \"shape\": [...], \"strides\": [...], \"byte_offset\": 0,
              \"data_base64\": \"...\" | \"uri\": \"shm://name#0,64\"}}
  {\"raw_base64\": \"...\"}       the body bytes as they are (decode prints this for a body it
                  cannot decode, next to the error, and for a codec it has no decoder for)

Keys: --key-file FILE (or XCP_KEY_FILE) holds the 32-byte static key; --direction says whose
frames these are: c2s (sent by the connection's initiator) or s2c (sent by the responder).
Each direction has its own key, so frames sealed as c2s only open as c2s. Make a key with
  head -c 32 /dev/urandom > key && chmod 600 key

Examples:
  echo '{\"header\":{\"msgType\":4},\"body\":{\"control\":{\"nonce\":1}}}' | xcp frame encode | xcp frame decode
  echo '{\"body\":{\"tensor\":{\"dtype\":\"f16\",\"shape\":[2],\"values\":[0.5,1.5]}}}' | xcp frame encode > t.bin
  xcp frame decode < capture.bin
  xcp frame encode --key-file key --direction c2s < msgs.jsonl | xcp frame decode --key-file key --direction c2s";

const ENCODE_AFTER_HELP: &str = "\
Reads one description, or several (JSON lines or simply one after the other), on stdin and
writes the frames to stdout: COMP first (\"comp\": true), then CRYPT (\"crypt\": true, sealed
once per logical message with the key of --direction), then chunks of at most
--max-frame-bytes payload bytes, MORE set on all but the last. See `xcp frame --help` for the
description.

Exit code: 0 when every description was encoded (then, and only then, the frames are
written); 2 for a bad description or bad arguments, with the reason on stderr.

Examples:
  echo '{\"header\":{\"msgType\":4,\"msgId\":1},\"body\":{\"control\":{\"nonce\":1}}}' | xcp frame encode | xcp frame decode
  echo '{\"comp\":true,\"crypt\":true,\"body\":{\"ether\":{\"kind\":\"text\",\"schema_version\":1,\"payload\":{\"text\":\"hi\"},\"metadata\":{}}}}' \\
    | xcp frame encode --key-file key --direction c2s --max-frame-bytes 64 > sealed.bin";

const DECODE_AFTER_HELP: &str = "\
Reads frames on stdin (any number, back to back), reassembles chunked messages, opens CRYPT
bodies (--key-file and --direction: the direction of the frames being decoded), inflates COMP
bodies (never past --max-message-bytes), decodes each body with its codec, and prints one JSON
line per logical message: the description of `xcp frame --help`.

A frame or message that fails a check is printed with an \"error\" field naming the SPEC error,
and the header when it is known:
  {\"header\": {...}, \"header_form\": \"capnp\", \"comp\": false, \"crypt\": false,
   \"body\": {\"raw_base64\": \"...\"},
   \"error\": {\"code\": 5, \"name\": \"ERR_CHECKSUM\", \"detail\": \"crc32c: ...\"}}
Decoding goes on after an error that concerns one frame or one message (a bad checksum,
header or body, a failed decryption, the rest of a broken chunked message is skipped); it
stops at an error after which the byte stream cannot be trusted (bad magic, a higher major
version, a payload over --max-frame-bytes). A CRYPT message without a key is ERR_DECRYPT.

Exit code: 0 when every message decoded; 1 when an error line was printed; 2 for bad
arguments or an unreadable stdin.

Examples:
  xcp frame decode < capture.bin
  xcp frame decode --key-file key --direction s2c < replies.bin";

/// Arguments of `xcp frame`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct FrameArgs {
    #[command(subcommand)]
    pub op: FrameOp,
}

impl FrameArgs {
    /// The key options of whichever operation was chosen.
    pub fn key_args(&mut self) -> &mut KeyArgs {
        match &mut self.op {
            FrameOp::Encode(a) => &mut a.seal.key,
            FrameOp::Decode(a) => &mut a.seal.key,
        }
    }
}

/// The two directions of `xcp frame`.
#[derive(Subcommand, Debug)]
pub enum FrameOp {
    /// Read JSON descriptions on stdin; write frame bytes to stdout.
    #[command(after_help = ENCODE_AFTER_HELP)]
    Encode(EncodeArgs),
    /// Read frame bytes on stdin; print one JSON description per logical message.
    #[command(after_help = DECODE_AFTER_HELP)]
    Decode(DecodeArgs),
}

/// Whose frames these are (SPEC §3: each direction has its own AEAD key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dir {
    /// Frames sent by the connection's initiator.
    C2s,
    /// Frames sent by the responder.
    S2c,
}

impl From<Dir> for Direction {
    fn from(d: Dir) -> Direction {
        match d {
            Dir::C2s => Direction::C2S,
            Dir::S2c => Direction::S2C,
        }
    }
}

/// The key and direction used to seal or open CRYPT bodies.
#[derive(Args, Debug)]
pub struct SealArgs {
    #[command(flatten)]
    pub key: KeyArgs,

    /// The direction of the frames: c2s (sent by the connection's initiator) or s2c (sent by
    /// the responder). Needed with --key-file to seal or open CRYPT bodies.
    #[arg(long, value_enum)]
    pub direction: Option<Dir>,
}

/// Arguments of `xcp frame encode`.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub seal: SealArgs,

    /// Chunk bodies longer than this many bytes into several frames (MORE set on all but the
    /// last); suffixes K, KiB, M, MiB, G, GiB.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// The zstd level for "comp": true.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=22))]
    pub zstd_level: i32,
}

/// Arguments of `xcp frame decode`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub seal: SealArgs,

    /// Refuse a frame whose payload is longer (ERR_MESSAGE_TOO_LARGE; decoding stops there,
    /// as a receiver closes the connection).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// Refuse a reassembled message, or a COMP body's inflated size, above this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_bytes)]
    pub max_message_bytes: u64,
}

/// Runs `xcp frame encode|decode`; returns the exit code.
pub fn run(args: FrameArgs) -> u8 {
    match args.op {
        FrameOp::Encode(a) => run_encode(&a),
        FrameOp::Decode(a) => run_decode(&a),
    }
}

// ---------------------------------------------------------------------------------------------
// encode
// ---------------------------------------------------------------------------------------------

fn run_encode(args: &EncodeArgs) -> u8 {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("error: cannot read the description from stdin: {e}");
        return EXIT_USAGE;
    }
    let mut frames: Vec<EncodedFrame> = Vec::new();
    let mut count = 0usize;
    for (i, item) in serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .enumerate()
    {
        count += 1;
        let result = item
            .map_err(|e| format!("bad JSON: {e}"))
            .and_then(|v| encode_description(&v, args));
        match result {
            Ok(f) => frames.extend(f),
            Err(msg) => {
                eprintln!("error: description {}: {msg}", i + 1);
                return EXIT_USAGE;
            }
        }
    }
    if count == 0 {
        eprintln!("error: no description on stdin (see `xcp frame --help`)");
        return EXIT_USAGE;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = frames.iter().try_for_each(|f| {
        out.write_all(&f.head)?;
        out.write_all(&f.payload)?;
        out.write_all(&f.trailer)
    });
    match written.and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: cannot write the frames to stdout: {e}");
            EXIT_USAGE
        }
    }
}

/// One description → its frames: body, then COMP, then CRYPT, then chunks (SPEC §3).
fn encode_description(v: &Value, args: &EncodeArgs) -> Result<Vec<EncodedFrame>, String> {
    let top = object(v, "description")?;
    allow_keys(
        top,
        &["header", "header_form", "comp", "crypt", "body", "error"],
        "description",
    )?;
    let (mut hdr, msg_type, codec) = parse_header(top.get("header"))?;
    let form = match top.get("header_form") {
        None | Some(Value::Null) => HeaderForm::Capnp,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("capnp") => HeaderForm::Capnp,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("json") => HeaderForm::Json,
        Some(other) => return Err(format!("header_form: {other} is not \"capnp\" or \"json\"")),
    };
    let comp = flag(top, "comp")?;
    let crypt = flag(top, "crypt")?;
    let body = top.get("body").ok_or(
        "body: missing (one of ether, control, tensor, latent, arrow, dlpack, raw_base64)",
    )?;
    let (t, c, mut body) = encode_body(body, msg_type, codec)?;
    hdr.msg_type = t;
    hdr.body_codec = c;

    let mut flags = Flags::NONE;
    if comp {
        body = seal::compress(&body, args.zstd_level).map_err(|e| format!("comp: {e}"))?;
        flags = flags | Flags::COMP;
    }
    if crypt {
        let sealer = args
            .seal
            .key
            .sealer
            .as_ref()
            .ok_or("\"crypt\": true needs the static key: --key-file FILE (or XCP_KEY_FILE)")?;
        let dir: Direction = args
            .seal
            .direction
            .ok_or("\"crypt\": true needs --direction c2s|s2c (whose frames these are)")?
            .into();
        let ad = seal::aad(hdr.msg_type, hdr.body_codec, hdr.channel_id, hdr.msg_id);
        body = sealer.seal(dir, hdr.msg_id, hdr.channel_id, &ad, &body);
        flags = flags | Flags::CRYPT;
    }
    split(body, flags, args.max_frame_bytes)
        .into_iter()
        .map(|(f, chunk)| encode(&hdr, form, f, chunk).map_err(|e| format!("header: {e}")))
        .collect()
}

/// The header, and the msgType / bodyCodec when they were given.
fn parse_header(
    v: Option<&Value>,
) -> Result<(FrameHeader, Option<MsgType>, Option<CodecId>), String> {
    let mut hdr = FrameHeader::default();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok((hdr, None, None));
    };
    let m = object(v, "header")?;
    allow_keys(
        m,
        &[
            "channelId",
            "msgType",
            "bodyCodec",
            "msgId",
            "inReplyTo",
            "schemaKey",
            "tags",
        ],
        "header",
    )?;
    hdr.channel_id = uint(m, "channelId", "header", u32::MAX.into())?.unwrap_or(0) as u32;
    hdr.msg_id = uint(m, "msgId", "header", u64::MAX)?.unwrap_or(0);
    hdr.in_reply_to = uint(m, "inReplyTo", "header", u64::MAX)?.unwrap_or(0);
    let msg_type = match m.get("msgType") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(msg_type_by_name(s).ok_or_else(|| {
            format!("header.msgType: {s:?} is not a SPEC name (HELLO .. CLARIFY_RES, DATA)")
        })?),
        Some(_) => uint(m, "msgType", "header", u16::MAX.into())?.map(|n| MsgType(n as u16)),
    };
    let codec = match m.get("bodyCodec") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(CodecId::from_name(s).ok_or_else(|| {
            format!("header.bodyCodec: {s:?} is not a SPEC codec name (JSON, TENSOR_F32, ...)")
        })?),
        Some(_) => uint(m, "bodyCodec", "header", u16::MAX.into())?.map(|n| CodecId(n as u16)),
    };
    if let Some(sk) = m.get("schemaKey").filter(|v| !v.is_null()) {
        hdr.schema_key = parse_schema_key(sk)?;
    }
    if let Some(tags) = m.get("tags").filter(|v| !v.is_null()) {
        let Value::Array(tags) = tags else {
            return Err("header.tags: expected a list of {\"key\", \"val\"}".into());
        };
        for (i, t) in tags.iter().enumerate() {
            let at = format!("header.tags[{i}]");
            let t = object(t, &at)?;
            allow_keys(t, &["key", "val"], &at)?;
            hdr.tags.push(Tag {
                key: string(t, "key", &at)?.unwrap_or_default(),
                val: string(t, "val", &at)?.unwrap_or_default(),
            });
        }
    }
    Ok((hdr, msg_type, codec))
}

fn msg_type_by_name(s: &str) -> Option<MsgType> {
    (0..=7u16)
        .chain([MsgType::DATA.0])
        .map(MsgType)
        .find(|t| t.name().is_some_and(|n| n.eq_ignore_ascii_case(s)))
}

fn parse_schema_key(v: &Value) -> Result<SchemaKey, String> {
    let at = "header.schemaKey";
    let m = object(v, at)?;
    allow_keys(m, &["nsHash", "kindId", "major", "minor", "hash128"], at)?;
    let mut k = SchemaKey {
        ns_hash: uint(m, "nsHash", at, u32::MAX.into())?.unwrap_or(0) as u32,
        kind_id: uint(m, "kindId", at, u32::MAX.into())?.unwrap_or(0) as u32,
        major: uint(m, "major", at, u16::MAX.into())?.unwrap_or(0) as u16,
        minor: uint(m, "minor", at, u16::MAX.into())?.unwrap_or(0) as u16,
        hash128: [0; 16],
    };
    if let Some(h) = string(m, "hash128", at)?.filter(|h| !h.is_empty()) {
        let bytes = from_hex(&h)
            .filter(|b| b.len() == 16)
            .ok_or_else(|| format!("{at}.hash128: {h:?} is not 32 hex digits"))?;
        k.hash128.copy_from_slice(&bytes);
    }
    Ok(k)
}

/// The body bytes, with the msgType and bodyCodec they go with.
fn encode_body(
    body: &Value,
    msg_type: Option<MsgType>,
    codec: Option<CodecId>,
) -> Result<(MsgType, CodecId, Bytes), String> {
    let m = object(body, "body")?;
    let mut keys = m.keys();
    let (Some(kind), None) = (keys.next(), keys.next()) else {
        return Err(
            "body: expected exactly one of ether, control, tensor, latent, arrow, dlpack, \
             raw_base64"
                .into(),
        );
    };
    let v = &m[kind.as_str()];
    let data = msg_type.unwrap_or(MsgType::DATA);
    // The codec a body kind implies; a given one must agree.
    let pick = |implied: CodecId, ok: &[CodecId]| -> Result<CodecId, String> {
        match codec {
            None => Ok(implied),
            Some(c) if ok.contains(&c) => Ok(c),
            Some(c) => Err(format!(
                "header.bodyCodec: {} ({c}) does not fit a {kind} body (use {})",
                c.0,
                ok.iter()
                    .map(|c| format!("{} {c}", c.0))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )),
        }
    };
    let ether_codecs = [CodecId::JSON, CodecId::PROTOBUF];
    match kind.as_str() {
        "ether" => {
            let c = pick(CodecId::JSON, &ether_codecs)?;
            let e: Ether =
                serde_json::from_value(v.clone()).map_err(|e| format!("body.ether: {e}"))?;
            let bytes = xcp::codec::encode_ether(&e, c).map_err(|e| format!("body.ether: {e}"))?;
            Ok((data, c, bytes))
        }
        "control" => {
            let t = msg_type.unwrap_or(MsgType::HELLO);
            if t.0 > MsgType::CLARIFY_RES.0 {
                return Err(format!(
                    "body.control: msgType {} is not a control message (0 HELLO .. 7 \
                     CLARIFY_RES)",
                    t.0
                ));
            }
            let c = pick(CodecId::JSON, &ether_codecs)?;
            let json = serde_json::to_vec(v).map_err(|e| format!("body.control: {e}"))?;
            let ctl = Control::decode(t, CodecId::JSON, &json)
                .map_err(|e| format!("body.control: {}", detail(&e)))?;
            let bytes = ctl
                .encode(c)
                .map_err(|e| format!("body.control: {}", detail(&e)))?;
            Ok((t, c, bytes))
        }
        "tensor" => {
            let (c, bytes) = encode_tensor(v, "body.tensor")?;
            let c = pick(c, &[c])?;
            Ok((data, c, bytes))
        }
        "latent" => {
            let c = pick(CodecId::MIXED_LATENT, &[CodecId::MIXED_LATENT])?;
            let Value::Array(items) = v else {
                return Err("body.latent: expected a list of tensors".into());
            };
            let tensors = items
                .iter()
                .enumerate()
                .map(|(i, t)| encode_tensor(t, &format!("body.latent[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let bytes = latent::encode(&tensors).map_err(|e| format!("body.latent: {e}"))?;
            Ok((data, c, bytes))
        }
        "arrow" => {
            let c = pick(CodecId::ARROW_IPC, &[CodecId::ARROW_IPC])?;
            Ok((data, c, encode_arrow(v)?))
        }
        "dlpack" => {
            let c = pick(CodecId::DLPACK, &[CodecId::DLPACK])?;
            Ok((data, c, encode_dlpack(v)?))
        }
        "raw_base64" => {
            let Value::String(s) = v else {
                return Err("body.raw_base64: expected a base64 string".into());
            };
            let bytes = B64
                .decode(s)
                .map_err(|e| format!("body.raw_base64: bad base64: {e}"))?;
            Ok((data, codec.unwrap_or(CodecId(0)), Bytes::from(bytes)))
        }
        other => Err(format!(
            "body: unknown kind {other:?} (ether, control, tensor, latent, arrow, dlpack, \
             raw_base64)"
        )),
    }
}

/// A tensor description → (its codec, the body).
fn encode_tensor(v: &Value, at: &str) -> Result<(CodecId, Bytes), String> {
    let m = object(v, at)?;
    allow_keys(
        m,
        &["dtype", "shape", "values", "row_qnt", "col_major", "scale"],
        at,
    )?;
    let dtype = match string(m, "dtype", at)?.as_deref() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("qnt8") => DType::Qnt8,
        Some(other) => return Err(format!("{at}.dtype: {other:?} is not f32, f16 or qnt8")),
        None => return Err(format!("{at}.dtype: missing (f32, f16 or qnt8)")),
    };
    let shape: Vec<u32> = list(m, "shape", at)?
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| format!("{at}.shape[{i}]: {d} is not a u32"))
        })
        .collect::<Result<_, _>>()?;
    let values: Vec<f32> = list(m, "values", at)?
        .iter()
        .enumerate()
        .map(|(i, x)| {
            value_to_f32(x).ok_or_else(|| format!("{at}.values[{i}]: {x} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let row_qnt = flag(m, "row_qnt")?;
    let col_major = flag(m, "col_major")?;
    let scale = match m.get("scale") {
        None | Some(Value::Null) => None,
        Some(x) => match value_to_f32(x) {
            Some(s) if s.is_finite() && s >= 0.0 => Some(s),
            _ => {
                return Err(format!(
                    "{at}.scale: {x} is not a finite, non-negative number"
                ))
            }
        },
    };
    if row_qnt && dtype != DType::Qnt8 {
        return Err(format!("{at}.row_qnt: only a qnt8 tensor has row scales"));
    }
    let err = |e: Error| format!("{at}: {}", detail(&e));
    let body = match dtype {
        DType::F32 => tensor::encode_f32(&shape, &values, col_major).map_err(err)?,
        DType::F16 => tensor::encode_f16_from_f32(&shape, &values, col_major).map_err(err)?,
        DType::Qnt8 if !row_qnt && scale.is_some() => {
            return quantise_with(&shape, &values, col_major, scale.unwrap_or(1.0), at)
                .map(|b| (CodecId::TENSOR_QNT8, b));
        }
        DType::Qnt8 => tensor::encode_qnt8(&shape, &values, row_qnt, col_major).map_err(err)?,
    };
    let body = match scale {
        // The header's scale as given (a default only with row_qnt; informational for F32/F16).
        Some(s) if f32::from_le_bytes(body[28..32].try_into().expect("4 bytes")) != s => {
            let mut b = body.to_vec();
            b[28..32].copy_from_slice(&s.to_le_bytes());
            Bytes::from(b)
        }
        _ => body,
    };
    Ok((dtype.codec(), body))
}

/// QNT8 with one given scale: `q = round(x / scale) + 128`, clamped to 0..=255.
fn quantise_with(
    shape: &[u32],
    values: &[f32],
    col_major: bool,
    scale: f32,
    at: &str,
) -> Result<Bytes, String> {
    let err = |e: Error| format!("{at}: {}", detail(&e));
    let mut h = TensorHeader::new(DType::Qnt8, shape).map_err(err)?;
    h.col_major = col_major;
    h.scale = scale;
    h.validate().map_err(err)?;
    let n = h.numel().map_err(err)?;
    if n != values.len() as u64 {
        return Err(format!(
            "{at}: shape {shape:?} holds {n} elements, but {} values were given",
            values.len()
        ));
    }
    let mut out = BytesMut::with_capacity(tensor::HEADER_LEN + values.len());
    h.write(&mut out);
    for (i, &x) in values.iter().enumerate() {
        if !x.is_finite() {
            return Err(format!("{at}.values[{i}]: {x} cannot be quantised"));
        }
        let q = if scale == 0.0 {
            128
        } else {
            ((f64::from(x) / f64::from(scale)).round_ties_even() + 128.0).clamp(0.0, 255.0) as u8
        };
        out.extend_from_slice(&[q]);
    }
    Ok(out.freeze())
}

fn encode_arrow(v: &Value) -> Result<Bytes, String> {
    let at = "body.arrow";
    let m = object(v, at)?;
    if let Some(ethers) = m.get("ethers") {
        allow_keys(m, &["ethers"], at)?;
        let ethers: Vec<Ether> =
            serde_json::from_value(ethers.clone()).map_err(|e| format!("{at}.ethers: {e}"))?;
        return arrow::encode_ethers(&ethers).map_err(|e| format!("{at}.ethers: {}", detail(&e)));
    }
    allow_keys(m, &["num_rows", "schema", "base64"], at)?;
    let b64 = string(m, "base64", at)?
        .ok_or_else(|| format!("{at}: expected \"ethers\" or \"base64\" (a whole IPC stream)"))?;
    let bytes = B64
        .decode(b64)
        .map_err(|e| format!("{at}.base64: bad base64: {e}"))?;
    Ok(Bytes::from(bytes))
}

fn encode_dlpack(v: &Value) -> Result<Bytes, String> {
    let at = "body.dlpack";
    let m = object(v, at)?;
    allow_keys(
        m,
        &[
            "device_type",
            "device_id",
            "dtype",
            "shape",
            "strides",
            "byte_offset",
            "data_base64",
            "uri",
        ],
        at,
    )?;
    let int = |key: &str| -> Result<Option<i64>, String> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{at}.{key}: {x} is not an integer")),
        }
    };
    let i32_of = |key: &str, default: i32| -> Result<i32, String> {
        int(key)?.map_or(Ok(default), |n| {
            i32::try_from(n).map_err(|_| format!("{at}.{key}: {n} is not an i32"))
        })
    };
    let dt = m
        .get("dtype")
        .ok_or_else(|| format!("{at}.dtype: missing ({{\"code\", \"bits\", \"lanes\"}})"))?;
    let dtm = object(dt, &format!("{at}.dtype"))?;
    allow_keys(dtm, &["code", "bits", "lanes"], &format!("{at}.dtype"))?;
    let dat = format!("{at}.dtype");
    let dtype = DlDataType::new(
        uint(dtm, "code", &dat, u8::MAX.into())?.unwrap_or(0) as u8,
        uint(dtm, "bits", &dat, u8::MAX.into())?.unwrap_or(0) as u8,
        uint(dtm, "lanes", &dat, u16::MAX.into())?.unwrap_or(1) as u16,
    );
    let ints = |key: &str| -> Result<Option<Vec<i64>>, String> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64()
                        .ok_or_else(|| format!("{at}.{key}[{i}]: {x} is not an integer"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(x) => Err(format!("{at}.{key}: {x} is not a list of integers")),
        }
    };
    let shape = ints("shape")?.ok_or_else(|| format!("{at}.shape: missing"))?;
    let strides = match ints("strides")? {
        Some(s) => s,
        None => dlpack::row_major_strides(&shape)
            .ok_or_else(|| format!("{at}.shape: the element count overflows i64"))?,
    };
    let byte_offset = uint(m, "byte_offset", at, u64::MAX)?.unwrap_or(0);
    let data = match (string(m, "data_base64", at)?, string(m, "uri", at)?) {
        (Some(b), None) => DlData::Inline(Bytes::from(
            B64.decode(b)
                .map_err(|e| format!("{at}.data_base64: bad base64: {e}"))?,
        )),
        (None, Some(u)) => {
            DlData::Uri(AttachmentUri::parse(&u).map_err(|e| format!("{at}.uri: {}", detail(&e)))?)
        }
        _ => return Err(format!("{at}: expected exactly one of data_base64 and uri")),
    };
    let d = DlpackDescriptor {
        device_type: i32_of("device_type", dlpack::DEVICE_CPU)?,
        device_id: i32_of("device_id", 0)?,
        dtype,
        shape,
        strides,
        byte_offset,
        data,
    };
    d.encode().map_err(|e| format!("{at}: {}", detail(&e)))
}

// ---------------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------------

/// One output line.
#[derive(Serialize, Default)]
struct Line {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<HeaderOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_form: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    crypt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeaderOut {
    channel_id: u32,
    msg_type: u16,
    body_codec: u16,
    msg_id: u64,
    in_reply_to: u64,
    schema_key: SchemaKeyOut,
    tags: Vec<TagOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SchemaKeyOut {
    ns_hash: u32,
    kind_id: u32,
    major: u16,
    minor: u16,
    hash128: String,
}

#[derive(Serialize)]
struct TagOut {
    key: String,
    val: String,
}

#[derive(Serialize)]
struct ErrorOut {
    code: u32,
    name: String,
    detail: String,
}

impl ErrorOut {
    fn new(code: ErrorCode, detail: impl Into<String>) -> ErrorOut {
        ErrorOut {
            code: code.0,
            name: code.name().unwrap_or("UNKNOWN").to_string(),
            detail: detail.into(),
        }
    }

    fn of(e: &Error) -> ErrorOut {
        Self::new(e.code(), detail(e))
    }
}

fn header_out(h: &FrameHeader) -> HeaderOut {
    HeaderOut {
        channel_id: h.channel_id,
        msg_type: h.msg_type.0,
        body_codec: h.body_codec.0,
        msg_id: h.msg_id,
        in_reply_to: h.in_reply_to,
        schema_key: SchemaKeyOut {
            ns_hash: h.schema_key.ns_hash,
            kind_id: h.schema_key.kind_id,
            major: h.schema_key.major,
            minor: h.schema_key.minor,
            hash128: h
                .schema_key
                .hash128
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        },
        tags: h
            .tags
            .iter()
            .map(|t| TagOut {
                key: t.key.clone(),
                val: t.val.clone(),
            })
            .collect(),
    }
}

fn form_name(f: HeaderForm) -> &'static str {
    match f {
        HeaderForm::Capnp => "capnp",
        HeaderForm::Json => "json",
    }
}

/// What is known of a message whose chunks are still arriving.
struct Pending {
    header: FrameHeader,
    form: HeaderForm,
    flags: Flags,
}

/// The decoder's state: the library's frame decoder and reassembler, plus what an inspector
/// needs on top (messages still incomplete at the end, broken messages to skip).
struct Decoding<'a> {
    args: &'a DecodeArgs,
    lines: Vec<Line>,
    pending: HashMap<(u32, u64), Pending>,
    /// Messages one of whose chunks failed: their later chunks are dropped.
    skipping: HashSet<(u32, u64)>,
    reassembler: Reassembler,
}

fn run_decode(args: &DecodeArgs) -> u8 {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("error: cannot read frames from stdin: {e}");
        return EXIT_USAGE;
    }
    let lines = decode_all(&input, args);
    let failed = lines.iter().any(|l| l.error.is_some());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in &lines {
        let text = serde_json::to_string(line).unwrap_or_else(|e| {
            format!("{{\"error\":{{\"code\":11,\"name\":\"ERR_INTERNAL\",\"detail\":\"cannot print: {e}\"}}}}")
        });
        if writeln!(out, "{text}").is_err() {
            // Nobody reads stdout any more (`| head`): stop quietly.
            return if failed { EXIT_FAILED } else { EXIT_OK };
        }
    }
    let _ = out.flush();
    if failed {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// Decodes every frame of `input` into description lines, in order.
fn decode_all(input: &[u8], args: &DecodeArgs) -> Vec<Line> {
    let mut d = Decoding {
        args,
        lines: Vec::new(),
        pending: HashMap::new(),
        skipping: HashSet::new(),
        reassembler: Reassembler::new(args.max_message_bytes),
    };
    let mut dec = FrameDecoder::new(Limits::new(args.max_frame_bytes, args.max_message_bytes));
    let total = input.len();
    let mut buf = BytesMut::from(input);
    loop {
        let start = total - buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(frame)) => d.on_frame(frame),
            Ok(None) => {
                if !buf.is_empty() {
                    let mut line = partial_line(&input[start..]);
                    line.error = Some(ErrorOut::new(
                        ErrorCode::ERR_MALFORMED,
                        format!("truncated: the input ends {} bytes into a frame", buf.len()),
                    ));
                    d.lines.push(line);
                }
                break;
            }
            Err(e) => {
                let end = total - buf.len();
                let fatal = e.fatal;
                d.on_frame_error(e, &input[start..end.max(start)], &input[start..]);
                if fatal {
                    return d.lines;
                }
            }
        }
    }
    d.finish()
}

impl Decoding<'_> {
    fn on_frame(&mut self, frame: xcp::wire::Frame) {
        let key = (frame.header.channel_id, frame.header.msg_id);
        let more = frame.flags.contains(Flags::MORE);
        if self.skipping.contains(&key) {
            if !more {
                self.skipping.remove(&key);
            }
            return;
        }
        let info = Pending {
            header: frame.header.clone(),
            form: frame.header_form,
            flags: frame.flags,
        };
        match self.reassembler.push(frame) {
            Ok(Some(msg)) => {
                self.pending.remove(&key);
                let line = self.on_message(msg);
                self.lines.push(line);
            }
            Ok(None) => {
                self.pending.entry(key).or_insert(info);
            }
            Err(e) => {
                self.pending.remove(&key);
                let mut line = known_line(&info.header, info.form, info.flags);
                line.error = Some(ErrorOut::new(e.code, e.detail));
                self.lines.push(line);
            }
        }
    }

    /// A frame the frame decoder refused. `whole` is the frame when the decoder consumed it
    /// (non-fatal errors), `rest` everything from its first byte.
    fn on_frame_error(&mut self, e: FrameError, whole: &[u8], rest: &[u8]) {
        let mut line = partial_line(if whole.is_empty() { rest } else { whole });
        if e.fatal {
            // The frame was not consumed: its payload is not known to be one.
            line.body = None;
        }
        let mut detail = e.detail.clone();
        if let Some(h) = parse_prefix(rest).and_then(|p| p.header) {
            let key = (h.channel_id, h.msg_id);
            let more = rest.get(5).is_some_and(|f| f & Flags::MORE.0 != 0);
            let had_chunks = self.pending.remove(&key).is_some();
            if !e.fatal && (more || had_chunks) {
                detail.push_str(&format!(
                    "; the rest of message {} on channel {} is skipped",
                    h.msg_id, h.channel_id
                ));
                if more {
                    self.skipping.insert(key);
                }
            }
        }
        if e.fatal {
            detail.push_str("; decoding stops here (the byte stream cannot be trusted)");
        }
        line.error = Some(ErrorOut::new(e.code, detail));
        self.lines.push(line);
    }

    /// Opens, inflates and decodes one whole message.
    fn on_message(&self, msg: Message) -> Line {
        let mut line = known_line(&msg.header, msg.header_form, msg.flags);
        let h = &msg.header;
        let mut body = msg.body;
        if msg.flags.contains(Flags::CRYPT) {
            let opened = match (&self.args.seal.key.sealer, self.args.seal.direction) {
                (None, _) => Err(Error::protocol(
                    Violation::Transform,
                    ErrorCode::ERR_DECRYPT,
                    "crypt: CRYPT is set but no key was given (--key-file FILE or XCP_KEY_FILE)",
                )),
                (Some(_), None) => Err(Error::protocol(
                    Violation::Transform,
                    ErrorCode::ERR_DECRYPT,
                    "crypt: CRYPT is set; give --direction c2s|s2c, the direction of these \
                     frames, to open it",
                )),
                (Some(sealer), Some(dir)) => {
                    let ad = seal::aad(h.msg_type, h.body_codec, h.channel_id, h.msg_id);
                    sealer.open(dir.into(), h.msg_id, h.channel_id, &ad, &body)
                }
            };
            match opened {
                Ok(plain) => body = plain,
                Err(e) => return with_raw(line, &body, &e),
            }
        }
        if msg.flags.contains(Flags::COMP) {
            match seal::decompress(&body, self.args.max_message_bytes) {
                Ok(plain) => body = plain,
                Err(e) => return with_raw(line, &body, &e),
            }
        }
        match describe_body(h, &body) {
            Ok(v) => {
                line.body = Some(v);
                line
            }
            Err(e) => with_raw(line, &body, &e),
        }
    }

    /// Reports the messages whose last chunk never came.
    fn finish(mut self) -> Vec<Line> {
        let mut left: Vec<_> = self.pending.drain().collect();
        left.sort_by_key(|(k, _)| *k);
        for (_, p) in left {
            let mut line = known_line(&p.header, p.form, p.flags);
            line.error = Some(ErrorOut::new(
                ErrorCode::ERR_MALFORMED,
                "chunk: the input ended before the message's last chunk (MORE was set on \
                 every frame of it)",
            ));
            self.lines.push(line);
        }
        self.lines
    }
}

fn known_line(h: &FrameHeader, form: HeaderForm, flags: Flags) -> Line {
    Line {
        header: Some(header_out(h)),
        header_form: Some(form_name(form)),
        comp: Some(flags.contains(Flags::COMP)),
        crypt: Some(flags.contains(Flags::CRYPT)),
        ..Line::default()
    }
}

fn with_raw(mut line: Line, body: &[u8], e: &Error) -> Line {
    line.body = Some(raw(body));
    line.error = Some(ErrorOut::of(e));
    line
}

fn raw(body: &[u8]) -> Value {
    let mut m = Map::new();
    m.insert("raw_base64".into(), Value::String(B64.encode(body)));
    Value::Object(m)
}

/// What can be read of a frame that was refused: its prefix, its header, its payload.
struct Prefix {
    flags: Flags,
    header: Option<FrameHeader>,
    form: Option<HeaderForm>,
    payload: Option<Vec<u8>>,
}

fn parse_prefix(b: &[u8]) -> Option<Prefix> {
    if b.len() < PREFIX_LEN || b[..4] != MAGIC_BYTES {
        return None;
    }
    let flags = Flags(b[5]);
    let hlen = usize::from(u16::from_le_bytes([b[6], b[7]]));
    let mut p = Prefix {
        flags,
        header: None,
        form: None,
        payload: None,
    };
    let Some(hb) = b.get(PREFIX_LEN..PREFIX_LEN + hlen) else {
        return Some(p);
    };
    if let Ok((h, form)) = header::decode(hb) {
        p.header = Some(h);
        p.form = Some(form);
    }
    let at = PREFIX_LEN + hlen;
    let plen = if flags.contains(Flags::LARGE) {
        b.get(at..at + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    } else {
        b.get(at..at + 4)
            .map(|s| u64::from(u32::from_le_bytes(s.try_into().expect("4 bytes"))))
    };
    let plen_len = if flags.contains(Flags::LARGE) { 8 } else { 4 };
    if let Some(plen) = plen.and_then(|p| usize::try_from(p).ok()) {
        let start = at + plen_len;
        // Only a whole frame (payload and trailer present) shows its payload.
        if start
            .checked_add(plen)
            .and_then(|e| e.checked_add(TRAILER_LEN))
            .is_some_and(|e| e <= b.len())
        {
            p.payload = Some(b[start..start + plen].to_vec());
        }
    }
    Some(p)
}

/// The line of a frame that failed before it became a message: whatever could be read.
fn partial_line(b: &[u8]) -> Line {
    let Some(p) = parse_prefix(b) else {
        return Line::default();
    };
    Line {
        header: p.header.as_ref().map(header_out),
        header_form: p.form.map(form_name),
        comp: Some(p.flags.contains(Flags::COMP)),
        crypt: Some(p.flags.contains(Flags::CRYPT)),
        body: p.payload.as_deref().map(raw),
        error: None,
    }
}

/// The body description of a plaintext body, by msgType and bodyCodec. A codec (or control
/// msgType) this tool has no decoder for gives `raw_base64` without an error.
fn describe_body(h: &FrameHeader, body: &Bytes) -> Result<Value, Error> {
    let wrap = |kind: &str, v: Value| {
        let mut m = Map::new();
        m.insert(kind.into(), v);
        Value::Object(m)
    };
    if h.msg_type.is_control() {
        if h.msg_type.0 > MsgType::CLARIFY_RES.0 {
            return Ok(raw(body));
        }
        let ctl = Control::decode(h.msg_type, h.body_codec, body)?;
        return Ok(wrap("control", ctl.to_json()));
    }
    Ok(match h.body_codec {
        CodecId::JSON | CodecId::PROTOBUF => {
            let e = xcp::codec::decode_ether(h.body_codec, body)?;
            wrap("ether", ether_json(&e)?)
        }
        CodecId::TENSOR_F32 | CodecId::TENSOR_F16 | CodecId::TENSOR_QNT8 => {
            let view = TensorView::parse(body.clone(), Some(h.body_codec))?;
            wrap("tensor", tensor_json(&view))
        }
        CodecId::MIXED_LATENT => {
            let views = latent::decode(body.clone())?;
            wrap("latent", views.iter().map(tensor_json).collect())
        }
        CodecId::ARROW_IPC => wrap("arrow", arrow_json(body)?),
        CodecId::DLPACK => wrap(
            "dlpack",
            dlpack_json(&DlpackDescriptor::decode(body.clone())?),
        ),
        _ => raw(body),
    })
}

fn ether_json(e: &Ether) -> Result<Value, Error> {
    serde_json::to_value(e)
        .map_err(|err| Error::protocol(Violation::Body, ErrorCode::ERR_INTERNAL, err.to_string()))
}

fn tensor_json(view: &TensorView) -> Value {
    let h = view.header();
    let mut m = Map::new();
    m.insert("dtype".into(), view.dtype().name().into());
    m.insert("shape".into(), view.shape().iter().copied().collect());
    m.insert(
        "values".into(),
        view.to_f32_vec().into_iter().map(f32_json).collect(),
    );
    m.insert("row_qnt".into(), h.row_qnt.into());
    m.insert("col_major".into(), h.col_major.into());
    m.insert("scale".into(), f32_json(h.scale));
    Value::Object(m)
}

/// An f32 as the shortest decimal that reads back as the same f32 (`0.1`, not
/// `0.10000000149011612`); `"NaN"`, `"Infinity"`, `"-Infinity"` for the values JSON lacks.
fn f32_json(x: f32) -> Value {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let shortest: f64 = x.to_string().parse().unwrap_or(f64::from(x));
    Number::from_f64(shortest).map_or(Value::Null, Value::Number)
}

fn value_to_f32(v: &Value) -> Option<f32> {
    match v {
        Value::Number(n) => n.as_f64().map(|f| f as f32),
        Value::Null => Some(f32::NAN),
        Value::String(s) => match s.as_str() {
            "NaN" | "nan" => Some(f32::NAN),
            "Infinity" | "inf" => Some(f32::INFINITY),
            "-Infinity" | "-inf" => Some(f32::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn arrow_json(body: &Bytes) -> Result<Value, Error> {
    let (schema, batches) = arrow::decode_batches(body.clone())?;
    let mut m = Map::new();
    if schema.metadata().contains_key(arrow::META_KIND) {
        let mut ethers = Vec::new();
        for b in &batches {
            for e in arrow::batch_to_ethers(&schema, b)? {
                ethers.push(ether_json(&e)?);
            }
        }
        m.insert("ethers".into(), Value::Array(ethers));
        return Ok(Value::Object(m));
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let fields: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut fm = Map::new();
            fm.insert("name".into(), f.name().clone().into());
            fm.insert("type".into(), f.data_type().to_string().into());
            fm.insert("nullable".into(), f.is_nullable().into());
            Value::Object(fm)
        })
        .collect();
    let mut sm = Map::new();
    sm.insert("fields".into(), Value::Array(fields));
    sm.insert(
        "metadata".into(),
        Value::Object(
            schema
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    m.insert("num_rows".into(), rows.into());
    m.insert("schema".into(), Value::Object(sm));
    m.insert("base64".into(), B64.encode(body).into());
    Ok(Value::Object(m))
}

fn dlpack_json(d: &DlpackDescriptor) -> Value {
    let mut dt = Map::new();
    dt.insert("code".into(), d.dtype.code.into());
    dt.insert("bits".into(), d.dtype.bits.into());
    dt.insert("lanes".into(), d.dtype.lanes.into());
    let mut m = Map::new();
    m.insert("device_type".into(), d.device_type.into());
    m.insert("device_id".into(), d.device_id.into());
    m.insert("dtype".into(), Value::Object(dt));
    m.insert("shape".into(), d.shape.iter().copied().collect());
    m.insert("strides".into(), d.strides.iter().copied().collect());
    m.insert("byte_offset".into(), d.byte_offset.into());
    match &d.data {
        DlData::Inline(b) => m.insert("data_base64".into(), B64.encode(b).into()),
        DlData::Uri(u) => m.insert("uri".into(), u.to_string().into()),
    };
    Value::Object(m)
}

// ---------------------------------------------------------------------------------------------
// JSON helpers whose errors name the field
// ---------------------------------------------------------------------------------------------

fn object<'v>(v: &'v Value, at: &str) -> Result<&'v Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{at}: expected a JSON object, got {v}"))
}

fn allow_keys(m: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), String> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{at}: unknown field {k:?} (expected {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

/// An unsigned integer field up to `max`; `None` when absent or null.
fn uint(m: &Map<String, Value>, key: &str, at: &str, max: u64) -> Result<Option<u64>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| format!("{at}.{key}: {v} is not an integer in 0..={max}")),
    }
}

fn string(m: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("{at}.{key}: {v} is not a string")),
    }
}

fn list<'v>(m: &'v Map<String, Value>, key: &str, at: &str) -> Result<&'v [Value], String> {
    match m.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(v) => Err(format!("{at}.{key}: {v} is not a list")),
        None => Err(format!("{at}.{key}: missing")),
    }
}

fn flag(m: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("{key}: {v} is not true or false")),
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The detail of an error without the `peer error CODE:` prefix of its `Display`.
fn detail(e: &Error) -> String {
    match e {
        Error::Protocol { detail, .. } | Error::Incompatible { detail, .. } => detail.clone(),
        Error::Invalid(msg) => msg.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_values_print_shortest() {
        assert_eq!(f32_json(0.1).to_string(), "0.1");
        assert_eq!(f32_json(1.0).to_string(), "1.0");
        assert_eq!(f32_json(f32::NAN), Value::from("NaN"));
        assert_eq!(value_to_f32(&f32_json(-2.5e-8)), Some(-2.5e-8));
        assert!(value_to_f32(&Value::from("Infinity")).is_some_and(f32::is_infinite));
    }

    #[test]
    fn names_and_hex() {
        assert_eq!(msg_type_by_name("ping"), Some(MsgType::PING));
        assert_eq!(msg_type_by_name("DATA"), Some(MsgType::DATA));
        assert_eq!(msg_type_by_name("nope"), None);
        assert_eq!(from_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
