//! Control message bodies (SPEC §4, §6): HELLO, CAPS, ACK, NACK, PING, PONG, CLARIFY_REQ and
//! CLARIFY_RES, in their JSON form and their PROTOBUF form (`proto/control.proto`).
//!
//! Encoding writes every field the SPEC names. Decoding is lenient, for interoperability with
//! the Python proof of concept: every field is optional with a zero default (`null` counts as
//! missing), unknown fields are ignored, HELLO/CAPS `codecs` entries may be codec names, and a
//! PING/PONG body may be empty. A value of the wrong type or out of range is `ERR_MALFORMED`
//! naming the field.
//!
//! ```
//! use xcp::codec::CodecId;
//! use xcp::control::{Control, Ping};
//! use xcp::wire::MsgType;
//!
//! let ping = Control::Ping(Ping { nonce: 42 });
//! let body = ping.encode(CodecId::JSON).unwrap();
//! assert_eq!(&body[..], br#"{"nonce":42}"#);
//! let back = Control::decode(MsgType::PING, CodecId::JSON, &body).unwrap();
//! assert_eq!(back, ping);
//! ```
#![forbid(unsafe_code)]

use bytes::Bytes;
use prost::Message as _;
use serde_json::{Map, Value};

use crate::codec::CodecId;
use crate::error::{Error, ErrorCode, Result, Violation};
use crate::ether::fnv1a32;
use crate::wire::MsgType;

/// The Protobuf types generated from `proto/control.proto` (package `xcp.control`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/xcp.control.rs"));
}

/// A range of minor versions of one major version of a kind (HELLO `accepts` / `emits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct KindRange {
    /// FNV-1a 32 of the kind string.
    pub kind_id: u32,
    /// The schema major version.
    pub major: u16,
    /// The lowest minor version accepted or emitted.
    pub min_minor: u16,
    /// The highest minor version accepted or emitted.
    pub max_minor: u16,
}

impl KindRange {
    /// Every minor version of `kind` at `major`.
    pub fn of(kind: &str, major: u16) -> KindRange {
        KindRange {
            kind_id: fnv1a32(kind),
            major,
            min_minor: 0,
            max_minor: u16::MAX,
        }
    }
}

/// An adapter a side applies to Ethers it receives (HELLO / CAPS `adapters`, SPEC §6, §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AdapterEdge {
    /// FNV-1a 32 of the kind string.
    pub kind_id: u32,
    /// The major version taken.
    pub from_major: u16,
    /// The major version produced.
    pub to_major: u16,
    /// What it costs (lower is cheaper).
    pub cost: u32,
}

/// The body of HELLO and of CAPS (SPEC §6). CAPS carries the negotiated result.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Hello {
    /// bodyCodec IDs this side decodes (in CAPS: the intersection).
    pub codecs: Vec<CodecId>,
    /// The largest frame payload it accepts (in CAPS: the minimum).
    pub max_frame_bytes: u64,
    /// Kinds it accepts; empty = any.
    pub accepts: Vec<KindRange>,
    /// Kinds it emits; empty = any.
    pub emits: Vec<KindRange>,
    /// It can take attachments by handle.
    pub shared_mem: bool,
    /// Extension: the protocol version, `"0.2"`.
    pub version: String,
    /// Extension: handle schemes it supports (`shm`, `memfd`, `cuda-ipc`).
    pub attach: Vec<String>,
    /// Extension: an identifier of the host, such as the kernel boot id.
    pub host_id: String,
    /// Extension: the name prefix of every POSIX shm object this side will announce.
    pub shm_prefix: String,
    /// Extension: it holds a static key and accepts CRYPT frames.
    pub crypt: bool,
    /// Extension: the largest reassembled message it accepts.
    pub max_message_bytes: u64,
    /// Extension: the adapters it applies to Ethers it receives (in CAPS: the responder's).
    pub adapters: Vec<AdapterEdge>,
    /// Extension: it can move frames through a same-host shared-memory ring (SPEC §9; in CAPS:
    /// both asked, and the ring's memfd comes with the CAPS frame).
    pub ring: bool,
}

/// The body of ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ack {
    /// The msgId acknowledged.
    pub msg_id: u64,
}

/// The body of NACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The msgId refused.
    pub msg_id: u64,
    /// Why (SPEC §4).
    pub error_code: ErrorCode,
    /// How long to wait before retrying; 0 = no advice.
    pub retry_after_ms: u32,
    /// A human-readable explanation.
    pub detail: Option<String>,
}

/// The body of PING, echoed by PONG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ping {
    /// Any number; the PONG carries the same.
    pub nonce: u64,
}

/// The body of CLARIFY_REQ: asks the peer to resend with these fields.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ClarifyReq {
    /// The fields wanted.
    pub fields: Vec<String>,
    /// Why they are wanted.
    pub reason: Option<String>,
}

/// The body of CLARIFY_RES.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClarifyRes {
    /// The values of the fields asked for.
    pub values: Map<String, Value>,
    /// A key that lets the peer detect a repeated answer.
    pub idempotency_key: Option<String>,
}

/// A control message (SPEC §4, msgType `0x0000..=0x0007`).
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    /// `0x0000`: the initiator's capabilities.
    Hello(Hello),
    /// `0x0001`: the responder's capabilities / the negotiated result.
    Caps(Hello),
    /// `0x0002`.
    Ack(Ack),
    /// `0x0003`.
    Nack(Nack),
    /// `0x0004`.
    Ping(Ping),
    /// `0x0005`: the PING's body echoed.
    Pong(Ping),
    /// `0x0006`.
    ClarifyReq(ClarifyReq),
    /// `0x0007`.
    ClarifyRes(ClarifyRes),
}

fn unsupported(codec: CodecId) -> Error {
    Error::protocol(
        Violation::Control,
        ErrorCode::ERR_CODEC_UNSUPPORTED,
        format!("control bodies are JSON or PROTOBUF, not {codec}"),
    )
}

impl Control {
    /// The msgType of this message.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Control::Hello(_) => MsgType::HELLO,
            Control::Caps(_) => MsgType::CAPS,
            Control::Ack(_) => MsgType::ACK,
            Control::Nack(_) => MsgType::NACK,
            Control::Ping(_) => MsgType::PING,
            Control::Pong(_) => MsgType::PONG,
            Control::ClarifyReq(_) => MsgType::CLARIFY_REQ,
            Control::ClarifyRes(_) => MsgType::CLARIFY_RES,
        }
    }

    /// Body bytes in the JSON (`CodecId::JSON`) or Protobuf (`CodecId::PROTOBUF`) form; other
    /// codecs are `ERR_CODEC_UNSUPPORTED`.
    pub fn encode(&self, codec: CodecId) -> Result<Bytes> {
        match codec {
            CodecId::JSON => serde_json::to_vec(&self.to_json())
                .map(Bytes::from)
                .map_err(|e| Error::invalid(format!("control: JSON encoding failed: {e}"))),
            CodecId::PROTOBUF => Ok(Bytes::from(self.to_protobuf())),
            other => Err(unsupported(other)),
        }
    }

    /// Decodes the body of a control frame.
    ///
    /// An unknown control msgType is `ERR_MALFORMED`; a codec other than JSON/PROTOBUF is
    /// `ERR_CODEC_UNSUPPORTED`; a bad body is `ERR_MALFORMED` naming the field.
    pub fn decode(msg_type: MsgType, codec: CodecId, body: &[u8]) -> Result<Control> {
        let ctx = match msg_type {
            MsgType::HELLO => "hello",
            MsgType::CAPS => "caps",
            MsgType::ACK => "ack",
            MsgType::NACK => "nack",
            MsgType::PING => "ping",
            MsgType::PONG => "pong",
            MsgType::CLARIFY_REQ => "clarify_req",
            MsgType::CLARIFY_RES => "clarify_res",
            MsgType(other) => {
                return Err(Error::malformed(
                    Violation::Control,
                    format!("unknown control msgType 0x{other:04X}"),
                ))
            }
        };
        match codec {
            CodecId::JSON => Self::from_json(msg_type, ctx, body),
            CodecId::PROTOBUF => Self::from_protobuf(msg_type, ctx, body),
            other => Err(unsupported(other)),
        }
    }

    /// The JSON form of the body, as [`encode`](Self::encode) writes it with `CodecId::JSON`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        match self {
            Control::Hello(h) | Control::Caps(h) => hello_to_json(h, &mut m),
            Control::Ack(a) => {
                m.insert("msg_id".into(), a.msg_id.into());
            }
            Control::Nack(n) => {
                m.insert("msg_id".into(), n.msg_id.into());
                m.insert("error_code".into(), n.error_code.0.into());
                m.insert("retry_after_ms".into(), n.retry_after_ms.into());
                if let Some(d) = &n.detail {
                    m.insert("detail".into(), d.clone().into());
                }
            }
            Control::Ping(p) | Control::Pong(p) => {
                m.insert("nonce".into(), p.nonce.into());
            }
            Control::ClarifyReq(c) => {
                m.insert("fields".into(), c.fields.clone().into());
                if let Some(r) = &c.reason {
                    m.insert("reason".into(), r.clone().into());
                }
            }
            Control::ClarifyRes(c) => {
                m.insert("values".into(), Value::Object(c.values.clone()));
                if let Some(k) = &c.idempotency_key {
                    m.insert("idempotency_key".into(), k.clone().into());
                }
            }
        }
        Value::Object(m)
    }

    fn to_protobuf(&self) -> Vec<u8> {
        match self {
            Control::Hello(h) | Control::Caps(h) => hello_to_proto(h).encode_to_vec(),
            Control::Ack(a) => proto::Ack { msg_id: a.msg_id }.encode_to_vec(),
            Control::Nack(n) => proto::Nack {
                msg_id: n.msg_id,
                error_code: n.error_code.0,
                retry_after_ms: n.retry_after_ms,
                detail: n.detail.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
            Control::Ping(p) | Control::Pong(p) => proto::Ping { nonce: p.nonce }.encode_to_vec(),
            Control::ClarifyReq(c) => proto::ClarifyReq {
                fields: c.fields.clone(),
                reason: c.reason.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
            Control::ClarifyRes(c) => proto::ClarifyRes {
                values: c
                    .values
                    .iter()
                    .map(|(k, v)| (k.clone(), Bytes::from(v.to_string())))
                    .collect(),
                idempotency_key: c.idempotency_key.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
        }
    }

    fn from_json(msg_type: MsgType, ctx: &str, body: &[u8]) -> Result<Control> {
        let is_ping = matches!(msg_type, MsgType::PING | MsgType::PONG);
        if is_ping && body.iter().all(u8::is_ascii_whitespace) {
            let p = Ping { nonce: 0 };
            return Ok(if msg_type == MsgType::PING {
                Control::Ping(p)
            } else {
                Control::Pong(p)
            });
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            Error::malformed(Violation::Control, format!("{ctx}: bad JSON body: {e}"))
        })?;
        let Value::Object(map) = value else {
            return Err(Error::malformed(
                Violation::Control,
                format!("{ctx}: body must be a JSON object"),
            ));
        };
        let o = Obj { map: &map, ctx };
        Ok(match msg_type {
            MsgType::HELLO => Control::Hello(hello_from_json(&o)?),
            MsgType::CAPS => Control::Caps(hello_from_json(&o)?),
            MsgType::ACK => Control::Ack(Ack {
                msg_id: o.uint("msg_id")?,
            }),
            MsgType::NACK => Control::Nack(Nack {
                msg_id: o.uint("msg_id")?,
                error_code: ErrorCode(o.uint("error_code")?),
                retry_after_ms: o.uint("retry_after_ms")?,
                detail: o.opt_string("detail")?,
            }),
            MsgType::PING => Control::Ping(Ping {
                nonce: o.uint("nonce")?,
            }),
            MsgType::PONG => Control::Pong(Ping {
                nonce: o.uint("nonce")?,
            }),
            MsgType::CLARIFY_REQ => Control::ClarifyReq(ClarifyReq {
                fields: o.strings("fields")?,
                reason: o.opt_string("reason")?,
            }),
            _ => Control::ClarifyRes(ClarifyRes {
                values: match o.get("values") {
                    None => Map::new(),
                    Some(Value::Object(v)) => v.clone(),
                    Some(_) => return Err(o.err("values", "expected a JSON object")),
                },
                idempotency_key: o.opt_string("idempotency_key")?,
            }),
        })
    }

    fn from_protobuf(msg_type: MsgType, ctx: &str, body: &[u8]) -> Result<Control> {
        let bad = |e: prost::DecodeError| {
            Error::malformed(Violation::Control, format!("{ctx}: bad Protobuf body: {e}"))
        };
        Ok(match msg_type {
            MsgType::HELLO => Control::Hello(hello_from_proto(
                ctx,
                proto::Hello::decode(body).map_err(bad)?,
            )?),
            MsgType::CAPS => Control::Caps(hello_from_proto(
                ctx,
                proto::Hello::decode(body).map_err(bad)?,
            )?),
            MsgType::ACK => Control::Ack(Ack {
                msg_id: proto::Ack::decode(body).map_err(bad)?.msg_id,
            }),
            MsgType::NACK => {
                let n = proto::Nack::decode(body).map_err(bad)?;
                Control::Nack(Nack {
                    msg_id: n.msg_id,
                    error_code: ErrorCode(n.error_code),
                    retry_after_ms: n.retry_after_ms,
                    detail: non_empty(n.detail),
                })
            }
            MsgType::PING => Control::Ping(Ping {
                nonce: proto::Ping::decode(body).map_err(bad)?.nonce,
            }),
            MsgType::PONG => Control::Pong(Ping {
                nonce: proto::Ping::decode(body).map_err(bad)?.nonce,
            }),
            MsgType::CLARIFY_REQ => {
                let c = proto::ClarifyReq::decode(body).map_err(bad)?;
                Control::ClarifyReq(ClarifyReq {
                    fields: c.fields,
                    reason: non_empty(c.reason),
                })
            }
            _ => {
                let c = proto::ClarifyRes::decode(body).map_err(bad)?;
                let mut values = Map::new();
                for (k, v) in c.values {
                    let value = match serde_json::from_slice::<Value>(&v) {
                        Ok(value) => value,
                        // Not JSON: taken as a plain string, as for Ether maps (SPEC §5.1).
                        Err(_) => match std::str::from_utf8(&v) {
                            Ok(s) => Value::String(s.to_owned()),
                            Err(_) => {
                                return Err(Error::malformed(
                                    Violation::Control,
                                    format!("{ctx}.values.{k}: neither JSON nor UTF-8 text"),
                                ))
                            }
                        },
                    };
                    values.insert(k, value);
                }
                Control::ClarifyRes(ClarifyRes {
                    values,
                    idempotency_key: non_empty(c.idempotency_key),
                })
            }
        })
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

fn kind_range_to_json(r: &KindRange) -> Value {
    let mut m = Map::new();
    m.insert("kind_id".into(), r.kind_id.into());
    m.insert("major".into(), r.major.into());
    m.insert("min_minor".into(), r.min_minor.into());
    m.insert("max_minor".into(), r.max_minor.into());
    Value::Object(m)
}

fn hello_to_json(h: &Hello, m: &mut Map<String, Value>) {
    m.insert(
        "codecs".into(),
        h.codecs.iter().map(|c| Value::from(c.0)).collect(),
    );
    m.insert("max_frame_bytes".into(), h.max_frame_bytes.into());
    m.insert(
        "accepts".into(),
        h.accepts.iter().map(kind_range_to_json).collect(),
    );
    m.insert(
        "emits".into(),
        h.emits.iter().map(kind_range_to_json).collect(),
    );
    m.insert("shared_mem".into(), h.shared_mem.into());
    m.insert("version".into(), h.version.clone().into());
    m.insert("attach".into(), h.attach.clone().into());
    m.insert("host_id".into(), h.host_id.clone().into());
    m.insert("shm_prefix".into(), h.shm_prefix.clone().into());
    m.insert("crypt".into(), h.crypt.into());
    m.insert("max_message_bytes".into(), h.max_message_bytes.into());
    // Written only when set, so a HELLO without the ring is what it always was.
    if h.ring {
        m.insert("ring".into(), true.into());
    }
    // Written only when there are some, so a HELLO without adapters is what it always was.
    if !h.adapters.is_empty() {
        m.insert(
            "adapters".into(),
            h.adapters
                .iter()
                .map(|a| {
                    let mut o = Map::new();
                    o.insert("kind_id".into(), a.kind_id.into());
                    o.insert("from_major".into(), a.from_major.into());
                    o.insert("to_major".into(), a.to_major.into());
                    o.insert("cost".into(), a.cost.into());
                    Value::Object(o)
                })
                .collect(),
        );
    }
}

fn kind_range_to_proto(r: &KindRange) -> proto::KindRange {
    proto::KindRange {
        kind_id: r.kind_id,
        major: r.major.into(),
        min_minor: r.min_minor.into(),
        max_minor: r.max_minor.into(),
    }
}

fn hello_to_proto(h: &Hello) -> proto::Hello {
    proto::Hello {
        codecs: h.codecs.iter().map(|c| u32::from(c.0)).collect(),
        max_frame_bytes: h.max_frame_bytes,
        accepts: h.accepts.iter().map(kind_range_to_proto).collect(),
        emits: h.emits.iter().map(kind_range_to_proto).collect(),
        shared_mem: h.shared_mem,
        version: h.version.clone(),
        attach: h.attach.clone(),
        host_id: h.host_id.clone(),
        shm_prefix: h.shm_prefix.clone(),
        crypt: h.crypt,
        max_message_bytes: h.max_message_bytes,
        adapters: h
            .adapters
            .iter()
            .map(|a| proto::AdapterEdge {
                kind_id: a.kind_id,
                from_major: a.from_major.into(),
                to_major: a.to_major.into(),
                cost: a.cost,
            })
            .collect(),
        ring: h.ring,
    }
}

fn narrow<T: TryFrom<u32>>(v: u32, what: impl FnOnce() -> String) -> Result<T> {
    T::try_from(v).map_err(|_| {
        Error::malformed(
            Violation::Control,
            format!(
                "{}: {v} out of range for {}",
                what(),
                std::any::type_name::<T>()
            ),
        )
    })
}

fn kind_ranges_from_proto(
    ctx: &str,
    key: &str,
    v: Vec<proto::KindRange>,
) -> Result<Vec<KindRange>> {
    v.into_iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(KindRange {
                kind_id: r.kind_id,
                major: narrow(r.major, || format!("{ctx}.{key}[{i}].major"))?,
                min_minor: narrow(r.min_minor, || format!("{ctx}.{key}[{i}].min_minor"))?,
                max_minor: narrow(r.max_minor, || format!("{ctx}.{key}[{i}].max_minor"))?,
            })
        })
        .collect()
}

fn hello_from_proto(ctx: &str, h: proto::Hello) -> Result<Hello> {
    let codecs = h
        .codecs
        .iter()
        .enumerate()
        .map(|(i, c)| narrow::<u16>(*c, || format!("{ctx}.codecs[{i}]")).map(CodecId))
        .collect::<Result<Vec<_>>>()?;
    Ok(Hello {
        codecs,
        max_frame_bytes: h.max_frame_bytes,
        accepts: kind_ranges_from_proto(ctx, "accepts", h.accepts)?,
        emits: kind_ranges_from_proto(ctx, "emits", h.emits)?,
        shared_mem: h.shared_mem,
        version: h.version,
        attach: h.attach,
        host_id: h.host_id,
        shm_prefix: h.shm_prefix,
        crypt: h.crypt,
        max_message_bytes: h.max_message_bytes,
        adapters: h
            .adapters
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                Ok(AdapterEdge {
                    kind_id: a.kind_id,
                    from_major: narrow(a.from_major, || format!("{ctx}.adapters[{i}].from_major"))?,
                    to_major: narrow(a.to_major, || format!("{ctx}.adapters[{i}].to_major"))?,
                    cost: a.cost,
                })
            })
            .collect::<Result<Vec<_>>>()?,
        ring: h.ring,
    })
}

fn hello_from_json(o: &Obj<'_>) -> Result<Hello> {
    let mut codecs = Vec::new();
    for (i, c) in o.array("codecs")?.iter().enumerate() {
        match c {
            Value::String(name) => {
                // Unknown names are skipped: the peer may know codecs we do not.
                if let Some(id) = CodecId::from_name(name) {
                    codecs.push(id);
                }
            }
            Value::Number(_) => {
                let id = c
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        o.err(
                            &format!("codecs[{i}]"),
                            &format!("{c} is not a codec ID (0..=65535)"),
                        )
                    })?;
                codecs.push(CodecId(id));
            }
            _ => {
                return Err(o.err(
                    &format!("codecs[{i}]"),
                    "expected a codec ID or a codec name",
                ))
            }
        }
    }
    Ok(Hello {
        codecs,
        max_frame_bytes: o.uint("max_frame_bytes")?,
        accepts: kind_ranges_from_json(o, "accepts")?,
        emits: kind_ranges_from_json(o, "emits")?,
        shared_mem: o.bool("shared_mem")?,
        version: o.string("version")?,
        attach: o.strings("attach")?,
        host_id: o.string("host_id")?,
        shm_prefix: o.string("shm_prefix")?,
        crypt: o.bool("crypt")?,
        max_message_bytes: o.uint("max_message_bytes")?,
        adapters: adapters_from_json(o)?,
        ring: o.bool("ring")?,
    })
}

fn adapters_from_json(o: &Obj<'_>) -> Result<Vec<AdapterEdge>> {
    objects_from_json(o, "adapters", |ro| {
        Ok(AdapterEdge {
            kind_id: kind_id_from_json(ro)?,
            from_major: ro.uint("from_major")?,
            to_major: ro.uint("to_major")?,
            cost: ro.uint("cost")?,
        })
    })
}

fn kind_ranges_from_json(o: &Obj<'_>, key: &str) -> Result<Vec<KindRange>> {
    objects_from_json(o, key, |ro| {
        Ok(KindRange {
            kind_id: kind_id_from_json(ro)?,
            major: ro.uint("major")?,
            min_minor: ro.uint("min_minor")?,
            max_minor: ro.uint("max_minor")?,
        })
    })
}

/// Each element of the array `key` of `o`, an object, read by `f`; errors name
/// `key[i]`.
fn objects_from_json<T>(
    o: &Obj<'_>,
    key: &str,
    f: impl Fn(&Obj<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, r) in o.array(key)?.iter().enumerate() {
        let ctx = format!("{}.{key}[{i}]", o.ctx);
        let Value::Object(map) = r else {
            return Err(Error::malformed(
                Violation::Control,
                format!("{ctx}: expected a JSON object"),
            ));
        };
        out.push(f(&Obj { map, ctx: &ctx })?);
    }
    Ok(out)
}

/// `kind_id`, leniently: a kind name stands for its FNV-1a 32 hash.
fn kind_id_from_json(ro: &Obj<'_>) -> Result<u32> {
    match ro.get("kind_id") {
        Some(Value::String(kind)) => Ok(fnv1a32(kind)),
        _ => ro.uint("kind_id"),
    }
}

/// A JSON object being read leniently, with the name of where it sits for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    ctx: &'a str,
}

impl<'a> Obj<'a> {
    /// The value of `key`; `None` when missing or `null`.
    fn get(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn err(&self, key: &str, what: &str) -> Error {
        Error::malformed(Violation::Control, format!("{}.{key}: {what}", self.ctx))
    }

    /// An unsigned integer that fits `T`; 0 when missing.
    fn uint<T: TryFrom<u64> + Default>(&self, key: &str) -> Result<T> {
        let Some(v) = self.get(key) else {
            return Ok(T::default());
        };
        let n = v
            .as_u64()
            .ok_or_else(|| self.err(key, &format!("expected an unsigned integer, got {v}")))?;
        T::try_from(n).map_err(|_| {
            self.err(
                key,
                &format!("{n} out of range for {}", std::any::type_name::<T>()),
            )
        })
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, &format!("expected true or false, got {v}"))),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, &format!("expected a string, got {v}"))),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        Ok(self.opt_string(key)?.unwrap_or_default())
    }

    /// An array; empty when missing.
    fn array(&self, key: &str) -> Result<&'a [Value]> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.err(key, "expected an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.err(&format!("{key}[{i}]"), "expected a string")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const TYPES: [MsgType; 8] = [
        MsgType::HELLO,
        MsgType::CAPS,
        MsgType::ACK,
        MsgType::NACK,
        MsgType::PING,
        MsgType::PONG,
        MsgType::CLARIFY_REQ,
        MsgType::CLARIFY_RES,
    ];

    fn sample_hello() -> Hello {
        Hello {
            codecs: vec![CodecId::JSON, CodecId::PROTOBUF, CodecId::TENSOR_F32],
            max_frame_bytes: 1 << 20,
            accepts: vec![KindRange {
                kind_id: fnv1a32("text"),
                major: 1,
                min_minor: 0,
                max_minor: 3,
            }],
            emits: vec![
                KindRange {
                    kind_id: fnv1a32("embedding"),
                    major: 65535,
                    min_minor: 1,
                    max_minor: 65535,
                },
                KindRange::default(),
            ],
            shared_mem: true,
            version: "0.2".into(),
            attach: vec!["shm".into(), "memfd".into()],
            host_id: "boot-1234".into(),
            shm_prefix: "xcp-42-".into(),
            crypt: true,
            max_message_bytes: 256 << 20,
            ring: true,
            adapters: vec![AdapterEdge {
                kind_id: fnv1a32("embedding"),
                from_major: 1,
                to_major: 2,
                cost: 7,
            }],
        }
    }

    fn samples() -> Vec<Control> {
        let mut values = Map::new();
        values.insert("lang".into(), json!("en"));
        values.insert("dims".into(), json!([1, [2, 3], {"a": null}]));
        values.insert("n".into(), json!(7));
        vec![
            Control::Hello(sample_hello()),
            Control::Caps(sample_hello()),
            Control::Hello(Hello::default()),
            Control::Ack(Ack { msg_id: u64::MAX }),
            Control::Nack(Nack {
                msg_id: 9,
                error_code: ErrorCode::ERR_BUSY,
                retry_after_ms: 250,
                detail: Some("try later".into()),
            }),
            Control::Nack(Nack {
                msg_id: 10,
                error_code: ErrorCode(0x1234),
                retry_after_ms: 0,
                detail: None,
            }),
            Control::Ping(Ping { nonce: 0xDEAD_BEEF }),
            Control::Pong(Ping { nonce: 0 }),
            Control::ClarifyReq(ClarifyReq {
                fields: vec!["payload.text".into(), "metadata.trace_id".into()],
                reason: Some("missing".into()),
            }),
            Control::ClarifyReq(ClarifyReq::default()),
            Control::ClarifyRes(ClarifyRes {
                values,
                idempotency_key: Some("k-1".into()),
            }),
            Control::ClarifyRes(ClarifyRes::default()),
        ]
    }

    #[test]
    fn round_trip_both_codecs() {
        for codec in [CodecId::JSON, CodecId::PROTOBUF] {
            for c in samples() {
                let body = c.encode(codec).unwrap();
                let back = Control::decode(c.msg_type(), codec, &body)
                    .unwrap_or_else(|e| panic!("{codec} {c:?}: {e}"));
                assert_eq!(back, c, "{codec}");
            }
        }
    }

    #[test]
    fn json_forms_match_spec() {
        let nack = Control::Nack(Nack {
            msg_id: 3,
            error_code: ErrorCode::ERR_CHECKSUM,
            retry_after_ms: 5,
            detail: None,
        });
        let v: Value = serde_json::from_slice(&nack.encode(CodecId::JSON).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"msg_id": 3, "error_code": 5, "retry_after_ms": 5})
        );

        let ack = Control::Ack(Ack { msg_id: 11 })
            .encode(CodecId::JSON)
            .unwrap();
        assert_eq!(&ack[..], br#"{"msg_id":11}"#);

        let v = Control::Hello(sample_hello()).to_json();
        for key in [
            "codecs",
            "max_frame_bytes",
            "accepts",
            "emits",
            "shared_mem",
            "version",
            "attach",
            "host_id",
            "shm_prefix",
            "crypt",
            "max_message_bytes",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["codecs"], json!([1, 8, 2]));
        assert_eq!(
            v["accepts"][0],
            json!({"kind_id": 0xBDE6_4E3Eu32, "major": 1, "min_minor": 0, "max_minor": 3})
        );

        let req = Control::ClarifyReq(ClarifyReq {
            fields: vec!["a".into()],
            reason: None,
        });
        assert_eq!(req.to_json(), json!({"fields": ["a"]}));
    }

    #[test]
    fn msg_types() {
        let got: Vec<MsgType> = samples().iter().map(Control::msg_type).collect();
        assert_eq!(got[0], MsgType::HELLO);
        assert_eq!(got[1], MsgType::CAPS);
        assert_eq!(got[3], MsgType::ACK);
        assert_eq!(got[7], MsgType::PONG);
        assert_eq!(got[10], MsgType::CLARIFY_RES);
    }

    #[test]
    fn lenient_hello() {
        let body = br#"{"codecs": ["JSON", "json", 8, "TENSOR_F32", "NO_SUCH_CODEC"],
                        "shared_mem": null, "who": "python", "nested": {"x": [1]},
                        "accepts": [{"kind_id": "text", "major": 1}, {}]}"#;
        let Control::Hello(h) = Control::decode(MsgType::HELLO, CodecId::JSON, body).unwrap()
        else {
            panic!("not a hello")
        };
        assert_eq!(
            h.codecs,
            vec![
                CodecId::JSON,
                CodecId::JSON,
                CodecId::PROTOBUF,
                CodecId::TENSOR_F32
            ]
        );
        assert_eq!(h.max_frame_bytes, 0);
        assert!(!h.shared_mem);
        assert_eq!(h.version, "");
        assert_eq!(
            h.accepts,
            vec![
                KindRange {
                    kind_id: fnv1a32("text"),
                    major: 1,
                    min_minor: 0,
                    max_minor: 0
                },
                KindRange::default()
            ]
        );
        assert!(h.emits.is_empty());

        let caps = Control::decode(MsgType::CAPS, CodecId::JSON, b"{}").unwrap();
        assert_eq!(caps, Control::Caps(Hello::default()));
    }

    #[test]
    fn lenient_ping() {
        for body in [&b""[..], b"  \n", b"{}", br#"{"ts": 1.5}"#] {
            assert_eq!(
                Control::decode(MsgType::PING, CodecId::JSON, body).unwrap(),
                Control::Ping(Ping { nonce: 0 })
            );
        }
        assert_eq!(
            Control::decode(
                MsgType::PONG,
                CodecId::JSON,
                br#"{"nonce": 18446744073709551615}"#
            )
            .unwrap(),
            Control::Pong(Ping { nonce: u64::MAX })
        );
        assert_eq!(
            Control::decode(MsgType::PING, CodecId::PROTOBUF, b"").unwrap(),
            Control::Ping(Ping { nonce: 0 })
        );
    }

    fn malformed(t: MsgType, codec: CodecId, body: &[u8]) -> String {
        let e = Control::decode(t, codec, body).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}");
        assert_eq!(e.violation(), Some(Violation::Control), "{e}");
        e.to_string()
    }

    #[test]
    fn bad_bodies_are_malformed_naming_the_field() {
        let j = CodecId::JSON;
        let cases: &[(MsgType, &[u8], &str)] = &[
            (MsgType::ACK, br#"{"msg_id": -1}"#, "ack.msg_id"),
            (MsgType::ACK, br#"{"msg_id": "7"}"#, "ack.msg_id"),
            (
                MsgType::NACK,
                br#"{"error_code": 4294967296}"#,
                "nack.error_code",
            ),
            (
                MsgType::NACK,
                br#"{"retry_after_ms": 1.5}"#,
                "nack.retry_after_ms",
            ),
            (MsgType::NACK, br#"{"detail": 3}"#, "nack.detail"),
            (MsgType::PING, br#"{"nonce": -3}"#, "ping.nonce"),
            (MsgType::PING, br#"{"nonce": 1e30}"#, "ping.nonce"),
            (
                MsgType::HELLO,
                br#"{"accepts": [{"major": 65536}]}"#,
                "hello.accepts[0].major",
            ),
            (MsgType::CAPS, br#"{"emits": [1]}"#, "caps.emits[0]"),
            (MsgType::HELLO, br#"{"codecs": [70000]}"#, "hello.codecs[0]"),
            (MsgType::HELLO, br#"{"codecs": [true]}"#, "hello.codecs[0]"),
            (MsgType::HELLO, br#"{"codecs": "JSON"}"#, "hello.codecs"),
            (MsgType::HELLO, br#"{"shared_mem": 1}"#, "hello.shared_mem"),
            (
                MsgType::HELLO,
                br#"{"attach": ["shm", 2]}"#,
                "hello.attach[1]",
            ),
            (
                MsgType::CLARIFY_REQ,
                br#"{"fields": "x"}"#,
                "clarify_req.fields",
            ),
            (
                MsgType::CLARIFY_RES,
                br#"{"values": []}"#,
                "clarify_res.values",
            ),
            (MsgType::ACK, b"[1]", "ack"),
            (MsgType::ACK, b"", "ack"),
            (MsgType::HELLO, b"{\"codecs\":", "hello"),
        ];
        for (t, body, field) in cases {
            let msg = malformed(*t, j, body);
            assert!(msg.contains(field), "{msg} should name {field}");
        }

        // Protobuf: truncated, wrong wire type, out-of-range narrowing.
        let p = CodecId::PROTOBUF;
        assert!(malformed(MsgType::ACK, p, &[0x08]).contains("ack"));
        assert!(malformed(MsgType::PING, p, &[0x0A, 0x05, 1]).contains("ping"));
        let h = proto::Hello {
            codecs: vec![1, 0x1_0000],
            ..Default::default()
        };
        assert!(malformed(MsgType::HELLO, p, &h.encode_to_vec()).contains("hello.codecs[1]"));
        let h = proto::Hello {
            accepts: vec![proto::KindRange {
                max_minor: 70000,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            malformed(MsgType::CAPS, p, &h.encode_to_vec()).contains("caps.accepts[0].max_minor")
        );
        let mut values = std::collections::BTreeMap::new();
        values.insert("bin".to_string(), Bytes::from_static(&[0xFF, 0xFE]));
        let r = proto::ClarifyRes {
            values,
            ..Default::default()
        };
        assert!(malformed(MsgType::CLARIFY_RES, p, &r.encode_to_vec())
            .contains("clarify_res.values.bin"));
    }

    #[test]
    fn protobuf_clarify_value_not_json_is_string() {
        let mut values = std::collections::BTreeMap::new();
        values.insert("a".to_string(), Bytes::from_static(b"hello world"));
        values.insert("b".to_string(), Bytes::from_static(b"[1, 2]"));
        let body = proto::ClarifyRes {
            values,
            idempotency_key: String::new(),
        }
        .encode_to_vec();
        let Control::ClarifyRes(r) =
            Control::decode(MsgType::CLARIFY_RES, CodecId::PROTOBUF, &body).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.values["a"], json!("hello world"));
        assert_eq!(r.values["b"], json!([1, 2]));
        assert_eq!(r.idempotency_key, None);
    }

    #[test]
    fn unknown_type_and_codec() {
        let e = Control::decode(MsgType(0x0042), CodecId::JSON, b"{}").unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
        assert!(
            e.to_string().contains("unknown control msgType 0x0042"),
            "{e}"
        );
        let e = Control::decode(MsgType::DATA, CodecId::JSON, b"{}").unwrap_err();
        assert!(e.to_string().contains("0x0100"), "{e}");

        let e = Control::decode(MsgType::PING, CodecId::TENSOR_F32, b"{}").unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
        let e = Control::Ping(Ping { nonce: 1 })
            .encode(CodecId::ARROW_IPC)
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
    }

    fn arb_kind_range() -> impl Strategy<Value = KindRange> {
        (any::<u32>(), any::<u16>(), any::<u16>(), any::<u16>()).prop_map(|(k, a, b, c)| {
            KindRange {
                kind_id: k,
                major: a,
                min_minor: b,
                max_minor: c,
            }
        })
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            prop::collection::vec(any::<u16>().prop_map(CodecId), 0..6),
            any::<u64>(),
            prop::collection::vec(arb_kind_range(), 0..3),
            prop::collection::vec(arb_kind_range(), 0..3),
            any::<bool>(),
            ".{0,8}",
            prop::collection::vec("[a-z-]{0,8}", 0..3),
            (
                ".{0,8}",
                ".{0,8}",
                any::<bool>(),
                any::<u64>(),
                any::<bool>(),
            ),
            prop::collection::vec(
                (any::<u32>(), any::<u16>(), any::<u16>(), any::<u32>()),
                0..3,
            ),
        )
            .prop_map(
                |(codecs, mfb, accepts, emits, shared_mem, version, attach, rest, adapters)| {
                    Hello {
                        codecs,
                        max_frame_bytes: mfb,
                        accepts,
                        emits,
                        shared_mem,
                        version,
                        attach,
                        host_id: rest.0,
                        shm_prefix: rest.1,
                        crypt: rest.2,
                        max_message_bytes: rest.3,
                        ring: rest.4,
                        adapters: adapters
                            .into_iter()
                            .map(|(kind_id, from_major, to_major, cost)| AdapterEdge {
                                kind_id,
                                from_major,
                                to_major,
                                cost,
                            })
                            .collect(),
                    }
                },
            )
    }

    #[test]
    fn adapters_json_form() {
        // Without adapters the JSON HELLO is what it was before the extension.
        let plain = Control::Hello(Hello::default()).to_json();
        assert!(plain.get("adapters").is_none());
        let body = br#"{"codecs":[1],"adapters":[{"kind_id":"embedding","from_major":1,"to_major":2,"cost":3}]}"#;
        let Control::Hello(h) = Control::decode(MsgType::HELLO, CodecId::JSON, body).unwrap()
        else {
            panic!("not a HELLO")
        };
        assert_eq!(
            h.adapters,
            vec![AdapterEdge {
                kind_id: fnv1a32("embedding"),
                from_major: 1,
                to_major: 2,
                cost: 3
            }]
        );
        let bad = br#"{"codecs":[1],"adapters":[{"kind_id":1,"from_major":70000}]}"#;
        let e = Control::decode(MsgType::CAPS, CodecId::JSON, bad).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
        assert!(e.to_string().contains("caps.adapters[0].from_major"), "{e}");
        let bad = proto::Hello {
            adapters: vec![proto::AdapterEdge {
                kind_id: 1,
                from_major: 1,
                to_major: 1 << 20,
                cost: 0,
            }],
            ..Default::default()
        };
        let e =
            Control::decode(MsgType::HELLO, CodecId::PROTOBUF, &bad.encode_to_vec()).unwrap_err();
        assert!(e.to_string().contains("hello.adapters[0].to_major"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256),
                                       extra in any::<u16>()) {
            for codec in [CodecId::JSON, CodecId::PROTOBUF] {
                for t in TYPES.iter().copied().chain([MsgType(extra)]) {
                    let _ = Control::decode(t, codec, &body);
                }
            }
        }

        #[test]
        fn arbitrary_json_never_panics(s in r#"\{("[a-z_]{1,16}": ?(-?[0-9]{1,25}|"[A-Za-z_]*"|\[[0-9, "a-z{}]*\]|true|null|\{\}),? ?){0,6}\}"#) {
            for codec in [CodecId::JSON, CodecId::PROTOBUF] {
                for t in TYPES {
                    let _ = Control::decode(t, codec, s.as_bytes());
                }
            }
        }

        #[test]
        fn hello_round_trips(h in arb_hello()) {
            for codec in [CodecId::JSON, CodecId::PROTOBUF] {
                let c = Control::Caps(h.clone());
                let body = c.encode(codec).unwrap();
                prop_assert_eq!(Control::decode(MsgType::CAPS, codec, &body).unwrap(), c);
            }
        }
    }
}
