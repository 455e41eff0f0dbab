//! The Ether, the DATA body of XCP (SPEC §5.1), its attachments, and the schema key of the
//! frame header (SPEC §2.1) with its FNV-1a 32 hashes.
//!
//! ```
//! use xcp::ether::{Ether, SchemaKey, fnv1a32};
//!
//! let e = Ether::text("hello");
//! assert_eq!(e.kind, "text");
//! assert_eq!(e.payload["text"], "hello");
//! assert_eq!(fnv1a32("text"), 0xBDE64E3E);
//! assert_eq!(SchemaKey::for_ether(&e).kind_id, 0xBDE64E3E);
//! ```
#![forbid(unsafe_code)]

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result, Violation};

/// FNV-1a 32 over the UTF-8 bytes (offset basis `0x811C9DC5`, prime `0x01000193`).
pub const fn fnv1a32(s: &str) -> u32 {
    let bytes = s.as_bytes();
    let mut h: u32 = 0x811C_9DC5;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// The schema key of a DATA frame header (SPEC §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SchemaKey {
    /// FNV-1a 32 of the namespace string.
    pub ns_hash: u32,
    /// FNV-1a 32 of the kind string.
    pub kind_id: u32,
    /// Schema major version.
    pub major: u16,
    /// Schema minor version.
    pub minor: u16,
    /// First 128 bits of SHA-256 of the canonical schema JSON (zero when unknown).
    pub hash128: [u8; 16],
}

impl SchemaKey {
    /// The key of a kind in a namespace at a version, with no schema hash.
    pub fn new(namespace: &str, kind: &str, major: u16, minor: u16) -> Self {
        SchemaKey {
            ns_hash: if namespace.is_empty() {
                0
            } else {
                fnv1a32(namespace)
            },
            kind_id: fnv1a32(kind),
            major,
            minor,
            hash128: [0; 16],
        }
    }

    /// The key that describes an Ether: its kind and `schema_version` as the major version,
    /// in the default (empty) namespace.
    pub fn for_ether(e: &Ether) -> Self {
        let major = u16::try_from(e.schema_version).unwrap_or(u16::MAX);
        Self::new("", &e.kind, major, 0)
    }
}

/// The standard kinds of v1 (SPEC §5.1).
pub mod kinds {
    /// `payload.text`.
    pub const TEXT: &str = "text";
    /// `payload.token_ids`, optional `payload.mask`.
    pub const TOKENS: &str = "tokens";
    /// `payload.values`, `payload.dim`.
    pub const EMBEDDING: &str = "embedding";
    /// `payload.height`, `width`, `channels`, `data`.
    pub const IMAGE: &str = "image";
}

/// An attachment: bytes that travel inline (base64 in JSON) or by handle (`uri`, SPEC §7).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Attachment {
    /// Identifier, unique within the Ether.
    pub id: String,
    /// Handle URI (`shm://…`, `memfd://…`, `cuda-ipc://…`), empty when inline.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uri: String,
    /// MIME type, such as `application/x-raw-tensor`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// Codec name of the bytes, such as `TENSOR_F32`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub codec: String,
    /// Tensor shape, if the bytes are a tensor.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shape: Vec<u32>,
    /// Element type name, such as `float32`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dtype: String,
    /// Size of the bytes.
    pub size_bytes: u64,
    /// The bytes themselves, when they travel inline.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "b64::ser",
        deserialize_with = "b64::de"
    )]
    pub inline_bytes: Option<Bytes>,
}

mod b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn ser<S: Serializer>(v: &Option<Bytes>, s: S) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn de<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Bytes>, D::Error> {
        let v: Option<String> = Option::deserialize(d)?;
        match v {
            None => Ok(None),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map(|v| Some(Bytes::from(v)))
                .map_err(|e| serde::de::Error::custom(format!("inline_bytes: bad base64: {e}"))),
        }
    }
}

/// The DATA body (SPEC §5.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ether {
    /// The kind, such as `text` or `embedding`.
    pub kind: String,
    /// Schema version of the kind, ≥ 1.
    pub schema_version: u32,
    /// The kind's fields.
    pub payload: Map<String, Value>,
    /// `trace_id`, `producer`, `created_at` (RFC 3339), `lineage`, and anything else.
    pub metadata: Map<String, Value>,
    /// Fields outside the kind's schema.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra_fields: Map<String, Value>,
    /// Bytes that travel beside the payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

impl Ether {
    /// An Ether of `kind` at schema version 1 with the given payload and empty metadata.
    pub fn new(kind: impl Into<String>, payload: Map<String, Value>) -> Self {
        Ether {
            kind: kind.into(),
            schema_version: 1,
            payload,
            metadata: Map::new(),
            extra_fields: Map::new(),
            attachments: Vec::new(),
        }
    }

    /// A `text` Ether.
    pub fn text(text: impl Into<String>) -> Self {
        let mut p = Map::new();
        p.insert("text".into(), Value::String(text.into()));
        Self::new(kinds::TEXT, p)
    }

    /// An `embedding` Ether.
    pub fn embedding(values: &[f32]) -> Self {
        let mut p = Map::new();
        p.insert(
            "values".into(),
            Value::Array(values.iter().map(|v| Value::from(*v as f64)).collect()),
        );
        p.insert("dim".into(), Value::from(values.len()));
        Self::new(kinds::EMBEDDING, p)
    }

    /// Sets `metadata.trace_id`.
    #[must_use]
    pub fn with_trace_id(mut self, id: impl Into<String>) -> Self {
        self.metadata
            .insert("trace_id".into(), Value::String(id.into()));
        self
    }

    /// `metadata.trace_id`, if it is a string.
    pub fn trace_id(&self) -> Option<&str> {
        self.metadata.get("trace_id").and_then(Value::as_str)
    }

    /// Checks the rules of SPEC §5.1: a kind, `schema_version` ≥ 1, and the required payload
    /// fields of the standard kinds. Errors are `ERR_MALFORMED` naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.kind.is_empty() {
            return Err(Error::malformed(Violation::Body, "ether.kind: empty"));
        }
        if self.schema_version < 1 {
            return Err(Error::malformed(
                Violation::Body,
                "ether.schema_version: must be >= 1",
            ));
        }
        let need = |field: &str, ok: fn(&Value) -> bool| -> Result<()> {
            match self.payload.get(field) {
                Some(v) if ok(v) => Ok(()),
                Some(_) => Err(Error::malformed(
                    Violation::Body,
                    format!("ether.payload.{field}: wrong type for kind {:?}", self.kind),
                )),
                None => Err(Error::malformed(
                    Violation::Body,
                    format!("ether.payload.{field}: required by kind {:?}", self.kind),
                )),
            }
        };
        match self.kind.as_str() {
            kinds::TEXT => need("text", Value::is_string),
            kinds::TOKENS => need("token_ids", Value::is_array),
            kinds::EMBEDDING => need("values", Value::is_array),
            kinds::IMAGE => {
                need("height", Value::is_u64)?;
                need("width", Value::is_u64)?;
                need("channels", Value::is_u64)?;
                need("data", |_| true)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_check_values() {
        assert_eq!(fnv1a32("text"), 0xBDE6_4E3E);
        assert_eq!(fnv1a32("tokens"), 0xFCEB_C453);
        assert_eq!(fnv1a32("embedding"), 0xCDE5_B5F2);
        assert_eq!(fnv1a32("image"), 0xB351_35FA);
        assert_eq!(fnv1a32(""), 0x811C_9DC5);
    }

    #[test]
    fn ether_json_shape() {
        let mut e = Ether::text("hi").with_trace_id("t-1");
        e.attachments.push(Attachment {
            id: "a".into(),
            size_bytes: 3,
            inline_bytes: Some(Bytes::from_static(b"abc")),
            ..Default::default()
        });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["attachments"][0]["inline_bytes"], "YWJj");
        let back: Ether = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.trace_id(), Some("t-1"));
    }

    #[test]
    fn validate_names_field() {
        let mut e = Ether::text("x");
        e.payload.clear();
        let err = e.validate().unwrap_err().to_string();
        assert!(err.contains("payload.text"), "{err}");
        e.schema_version = 0;
        assert!(e.validate().is_err());
        assert!(Ether::embedding(&[1.0, 2.0]).validate().is_ok());
    }
}
