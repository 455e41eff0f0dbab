//! Kinds, schemas and adapters (SPEC §8): the registry of JSON Schemas of Ether payloads,
//! `hash128` over their RFC 8785 canonical form, payload validation (feature `schema`, the
//! `jsonschema` crate), and adapters between major versions routed through a costed graph.
//!
//! A connection enforces them when its [`conn::Config`](crate::conn::Config) says so:
//! `accepts` (the kinds and majors taken), `registry` (the schemas held: SchemaKey filled on
//! send, payloads validated on receipt) and `adapters` (conversions applied on either side).
//!
//! ```
//! use xcp::schema::{AdapterGraph, Registry};
//! use xcp::Ether;
//!
//! let reg = Registry::standard();
//! let text = reg.latest("", "text", 1).unwrap();
//! assert!(text.validate(&serde_json::json!({"text": "hi"})).is_ok());
//!
//! let mut e = Ether::embedding(&[1.0, 0.0]);
//! AdapterGraph::standard().convert_to(&mut e, 2).unwrap();
//! assert_eq!(e.schema_version, 2);
//! ```
#![forbid(unsafe_code)]

mod adapt;
pub mod canonical;
mod registry;

pub use adapt::{Adapter, AdapterGraph, EmbeddingV1ToV2, EmbeddingV2ToV1, Path, MAX_ADAPTERS};
pub use canonical::{canonicalize, hash128};
pub(crate) use registry::hex as registry_hex;
pub use registry::{PayloadError, Registry, Schema, SchemaId, MAX_SCHEMAS};
