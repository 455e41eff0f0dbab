//! The JSON codec (`0x0001`, SPEC §5.1): the UTF-8 JSON of an Ether, `inline_bytes` in base64.
//!
//! ```
//! use xcp::{codec::json, Ether};
//!
//! let e = Ether::text("hello");
//! let body = json::encode(&e).unwrap();
//! assert_eq!(json::decode(&body).unwrap(), e);
//! ```
#![forbid(unsafe_code)]

use bytes::Bytes;

use crate::error::{Error, Result, Violation};
use crate::ether::Ether;

/// Encodes an Ether as UTF-8 JSON.
pub fn encode(e: &Ether) -> Result<Bytes> {
    serde_json::to_vec(e)
        .map(Bytes::from)
        .map_err(|err| Error::invalid(format!("ether: JSON encoding failed: {err}")))
}

/// Decodes a JSON body and checks it with [`Ether::validate`]. Errors are `ERR_MALFORMED`,
/// with serde's message naming the field or the position.
pub fn decode(body: &[u8]) -> Result<Ether> {
    let e: Ether = serde_json::from_slice(body)
        .map_err(|err| Error::malformed(Violation::Body, format!("ether: bad JSON body: {err}")))?;
    e.validate()?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::ether::Attachment;
    use serde_json::json;

    fn standard_ethers() -> Vec<Ether> {
        let mut tokens = Ether::new(
            "tokens",
            json!({"token_ids": [1, 2, 50256], "mask": [1, 1, 0]})
                .as_object()
                .unwrap()
                .clone(),
        );
        tokens.metadata.insert("lineage".into(), json!(["a", "b"]));
        let mut image = Ether::new(
            "image",
            json!({"height": 2, "width": 2, "channels": 1, "data": "AAEC"})
                .as_object()
                .unwrap()
                .clone(),
        );
        image.attachments.push(Attachment {
            id: "img-0".into(),
            media_type: "application/octet-stream".into(),
            shape: vec![2, 2, 1],
            dtype: "uint8".into(),
            size_bytes: 4,
            inline_bytes: Some(Bytes::from_static(&[0, 1, 2, 255])),
            ..Default::default()
        });
        let mut emb = Ether::embedding(&[0.5, -1.25, 3.0]).with_trace_id("t-9");
        emb.extra_fields.insert(
            "nested".into(),
            json!([[1, 2], [3, [4, 5]], {"k": [true, null]}]),
        );
        emb.attachments.push(Attachment {
            id: "vec-0".into(),
            uri: "shm://xcp-1#0,12".into(),
            media_type: "application/x-raw-tensor".into(),
            codec: "TENSOR_F32".into(),
            shape: vec![3],
            dtype: "float32".into(),
            size_bytes: 12,
            inline_bytes: None,
        });
        let mut text = Ether::text("héllo \u{1F600}");
        text.schema_version = 7;
        text.metadata.insert("producer".into(), json!("unit"));
        text.metadata
            .insert("created_at".into(), json!("2025-07-29T00:00:00Z"));
        vec![text, tokens, emb, image]
    }

    #[test]
    fn round_trip_standard_kinds() {
        for e in standard_ethers() {
            let body = encode(&e).unwrap();
            assert_eq!(decode(&body).unwrap(), e);
        }
    }

    #[test]
    fn inline_bytes_are_base64() {
        let e = &standard_ethers()[3];
        let v: serde_json::Value = serde_json::from_slice(&encode(e).unwrap()).unwrap();
        assert_eq!(v["attachments"][0]["inline_bytes"], "AAEC/w==");
    }

    #[test]
    fn bad_bodies_are_malformed() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "EOF"),
            (b"[]", "ether"),
            (br#"{"schema_version":1,"payload":{},"metadata":{}}"#, "kind"),
            (br#"{"kind":"x","schema_version":-1,"payload":{},"metadata":{}}"#, "ether"),
            (br#"{"kind":"x","schema_version":0,"payload":{},"metadata":{}}"#, "schema_version"),
            (br#"{"kind":"text","schema_version":1,"payload":{},"metadata":{}}"#, "payload.text"),
            (
                br#"{"kind":"x","schema_version":1,"payload":{},"metadata":{},"attachments":[{"inline_bytes":"!!"}]}"#,
                "inline_bytes",
            ),
        ];
        for (body, needle) in cases {
            let err = decode(body).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_MALFORMED);
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn unknown_fields_ignored() {
        let body =
            br#"{"kind":"custom","schema_version":2,"payload":{"a":1},"metadata":{},"future":[1]}"#;
        let e = decode(body).unwrap();
        assert_eq!(e.kind, "custom");
        assert_eq!(e.payload["a"], 1);
    }
}
