//! The PROTOBUF codec (`0x0008`, SPEC §5.1): `EtherProto` of `proto/ether.proto`.
//!
//! Each `payload`, `metadata` and `extra_fields` map value is the UTF-8 JSON text of that
//! value, so lists and objects survive. On decode, a value that is not valid JSON is taken as a
//! plain string (the Python proof of concept writes `str(value)`). Unknown fields are ignored.
//! An attachment's `inline_bytes` travels as a proto3 `bytes` field, so an empty value is
//! indistinguishable from none: both decode as `None`.
//!
//! ```
//! use xcp::{codec::protobuf, Ether};
//!
//! let e = Ether::embedding(&[1.0, 2.0]);
//! let body = protobuf::encode(&e).unwrap();
//! assert_eq!(protobuf::decode(&body).unwrap(), e);
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;
use serde_json::{Map, Value};

use crate::error::{Error, Result, Violation};
use crate::ether::{Attachment, Ether};

/// The Protobuf types generated from `proto/ether.proto` (package `xcp.ether`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/xcp.ether.rs"));
}

fn map_to_proto(m: &Map<String, Value>) -> BTreeMap<String, Bytes> {
    m.iter()
        .map(|(k, v)| (k.clone(), Bytes::from(v.to_string())))
        .collect()
}

fn map_from_proto(field: &str, m: BTreeMap<String, Bytes>) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for (k, v) in m {
        let value = match serde_json::from_slice::<Value>(&v) {
            Ok(value) => value,
            Err(_) => match std::str::from_utf8(&v) {
                Ok(s) => Value::String(s.to_owned()),
                Err(_) => {
                    return Err(Error::malformed(
                        Violation::Body,
                        format!("ether.{field}.{k}: neither JSON nor UTF-8 text"),
                    ))
                }
            },
        };
        out.insert(k, value);
    }
    Ok(out)
}

/// Encodes an Ether as `EtherProto`.
pub fn encode(e: &Ether) -> Result<Bytes> {
    let p = proto::EtherProto {
        kind: e.kind.clone(),
        schema_version: e.schema_version,
        payload: map_to_proto(&e.payload),
        metadata: map_to_proto(&e.metadata),
        extra_fields: map_to_proto(&e.extra_fields),
        attachments: e
            .attachments
            .iter()
            .map(|a| proto::Attachment {
                id: a.id.clone(),
                uri: a.uri.clone(),
                media_type: a.media_type.clone(),
                codec: a.codec.clone(),
                shape: a.shape.clone(),
                dtype: a.dtype.clone(),
                size_bytes: a.size_bytes,
                inline_bytes: a.inline_bytes.clone().unwrap_or_default(),
            })
            .collect(),
    };
    Ok(Bytes::from(p.encode_to_vec()))
}

/// Decodes an `EtherProto` body and checks it with [`Ether::validate`]. Errors are
/// `ERR_MALFORMED` naming the field.
pub fn decode(body: &[u8]) -> Result<Ether> {
    let p = proto::EtherProto::decode(body).map_err(|err| {
        Error::malformed(Violation::Body, format!("ether: bad Protobuf body: {err}"))
    })?;
    let e = Ether {
        kind: p.kind,
        schema_version: p.schema_version,
        payload: map_from_proto("payload", p.payload)?,
        metadata: map_from_proto("metadata", p.metadata)?,
        extra_fields: map_from_proto("extra_fields", p.extra_fields)?,
        attachments: p
            .attachments
            .into_iter()
            .map(|a| Attachment {
                id: a.id,
                uri: a.uri,
                media_type: a.media_type,
                codec: a.codec,
                shape: a.shape,
                dtype: a.dtype,
                size_bytes: a.size_bytes,
                inline_bytes: if a.inline_bytes.is_empty() {
                    None
                } else {
                    Some(a.inline_bytes)
                },
            })
            .collect(),
    };
    e.validate()?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn ethers() -> Vec<Ether> {
        // The same set as the JSON codec's tests, rebuilt here to keep the modules independent.
        let body = br#"[
          {"kind":"text","schema_version":7,"payload":{"text":"h\u00e9llo"},
           "metadata":{"producer":"unit","created_at":"2025-07-29T00:00:00Z","lineage":[]}},
          {"kind":"tokens","schema_version":1,"payload":{"token_ids":[1,2,50256],"mask":[1,1,0]},
           "metadata":{"lineage":["a","b"]}},
          {"kind":"embedding","schema_version":1,"payload":{"values":[0.5,-1.25,3.0],"dim":3},
           "metadata":{"trace_id":"t-9"},
           "extra_fields":{"nested":[[1,2],[3,[4,5]],{"k":[true,null]}],"s":"str","n":null},
           "attachments":[{"id":"vec-0","uri":"shm://xcp-1#0,12","media_type":"application/x-raw-tensor",
                           "codec":"TENSOR_F32","shape":[3],"dtype":"float32","size_bytes":12}]},
          {"kind":"image","schema_version":1,"payload":{"height":2,"width":2,"channels":1,"data":"AAEC"},
           "metadata":{},
           "attachments":[{"id":"img-0","shape":[2,2,1],"dtype":"uint8","size_bytes":4,
                           "inline_bytes":"AAEC/w=="}]}
        ]"#;
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn round_trip_standard_kinds() {
        for e in ethers() {
            let body = encode(&e).unwrap();
            assert_eq!(decode(&body).unwrap(), e);
        }
    }

    #[test]
    fn map_values_are_json_text() {
        let e = &ethers()[2];
        let p = proto::EtherProto::decode(&encode(e).unwrap()[..]).unwrap();
        assert_eq!(&p.extra_fields["s"][..], br#""str""#);
        assert_eq!(&p.payload["dim"][..], b"3");
        assert_eq!(
            &p.extra_fields["nested"][..],
            br#"[[1,2],[3,[4,5]],{"k":[true,null]}]"#
        );
        assert_eq!(p.attachments[0].shape, vec![3]);
    }

    #[test]
    fn non_json_value_is_a_string() {
        // What the Python proof of concept writes: `str(value)`.
        let mut payload = BTreeMap::new();
        payload.insert("text".to_string(), Bytes::from_static(b"hello world"));
        let mut metadata = BTreeMap::new();
        metadata.insert("lineage".to_string(), Bytes::from_static(b"['a', 'b']"));
        metadata.insert("empty".to_string(), Bytes::new());
        metadata.insert("n".to_string(), Bytes::from_static(b"42"));
        let body = proto::EtherProto {
            kind: "text".into(),
            schema_version: 1,
            payload,
            metadata,
            ..Default::default()
        }
        .encode_to_vec();
        let e = decode(&body).unwrap();
        assert_eq!(e.payload["text"], json!("hello world"));
        assert_eq!(e.metadata["lineage"], json!("['a', 'b']"));
        assert_eq!(e.metadata["empty"], json!(""));
        assert_eq!(e.metadata["n"], json!(42));
    }

    #[test]
    fn unknown_fields_ignored() {
        let mut body = encode(&Ether::text("x")).unwrap().to_vec();
        // Field 99, varint 5; field 100, length-delimited "abc".
        body.extend_from_slice(&[0x98, 0x06, 0x05, 0xA2, 0x06, 0x03, b'a', b'b', b'c']);
        assert_eq!(decode(&body).unwrap(), Ether::text("x"));
    }

    #[test]
    fn bad_bodies_are_malformed() {
        let mut payload = BTreeMap::new();
        payload.insert("text".to_string(), Bytes::from_static(&[0xC3, 0x28]));
        let not_utf8 = proto::EtherProto {
            kind: "text".into(),
            schema_version: 1,
            payload,
            ..Default::default()
        }
        .encode_to_vec();
        let no_version = proto::EtherProto {
            kind: "x".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x0A, 0x10, b'a'], "ether"),
            (vec![0x0F], "ether"),
            (Vec::new(), "ether.kind"),
            (not_utf8, "ether.payload.text"),
            (no_version, "schema_version"),
        ];
        for (body, needle) in cases {
            let err = decode(&body).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_MALFORMED);
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }
}
