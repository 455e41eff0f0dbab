//! Body codecs (SPEC §5): pure functions from bytes to typed values and back.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;

use crate::error::{Error, ErrorCode, Result, Violation};
use crate::ether::Ether;

pub mod arrow;
pub mod dlpack;
pub mod json;
pub mod latent;
pub mod protobuf;
pub mod tensor;

/// A `bodyCodec` ID (SPEC §5). Unknown values are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CodecId(pub u16);

macro_rules! codec_ids {
    ($($(#[$doc:meta])* $name:ident = $val:expr;)*) => {
        impl CodecId {
            $($(#[$doc])* pub const $name: CodecId = CodecId($val);)*

            /// The SPEC name, or `None` for a value the SPEC does not define.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            /// The codec with this SPEC name (case-insensitive), such as `json` or `TENSOR_F32`.
            pub fn from_name(name: &str) -> Option<CodecId> {
                $(if name.eq_ignore_ascii_case(stringify!($name)) { return Some(CodecId($val)); })*
                None
            }
        }
    };
}

codec_ids! {
    /// UTF-8 JSON of an Ether. Every peer supports it.
    JSON = 0x0001;
    /// Raw F32 tensor.
    TENSOR_F32 = 0x0002;
    /// Raw F16 tensor.
    TENSOR_F16 = 0x0003;
    /// Row-quantised INT8 tensor.
    TENSOR_QNT8 = 0x0004;
    /// `EtherProto` of `proto/ether.proto`.
    PROTOBUF = 0x0008;
    /// A set of tensors.
    MIXED_LATENT = 0x0010;
    /// An Arrow IPC stream.
    ARROW_IPC = 0x0020;
    /// A DLPack descriptor.
    DLPACK = 0x0021;
}

impl fmt::Debug for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "CodecId(0x{:04X})", self.0),
        }
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Encodes an Ether in the JSON or PROTOBUF form; any other codec is `ERR_CODEC_UNSUPPORTED`.
pub fn encode_ether(e: &Ether, codec: CodecId) -> Result<Bytes> {
    match codec {
        CodecId::JSON => json::encode(e),
        CodecId::PROTOBUF => protobuf::encode(e),
        other => Err(not_an_ether_codec(other)),
    }
}

/// Decodes an Ether from a JSON or PROTOBUF body and validates it; any other codec is
/// `ERR_CODEC_UNSUPPORTED`, a bad body `ERR_MALFORMED`.
pub fn decode_ether(codec: CodecId, body: &[u8]) -> Result<Ether> {
    match codec {
        CodecId::JSON => json::decode(body),
        CodecId::PROTOBUF => protobuf::decode(body),
        other => Err(not_an_ether_codec(other)),
    }
}

/// Checks a received body with the codec its frame names: JSON and PROTOBUF are decoded as an
/// Ether, the tensor codecs with [`tensor::TensorView::parse`], MIXED_LATENT with
/// [`latent::decode`], ARROW_IPC with [`arrow::decode_batches`] (any record batch, Ethers or
/// not), DLPACK with [`dlpack::DlpackDescriptor::decode`]. A bad body is `ERR_MALFORMED` (a bad
/// DLPACK attachment URI `ERR_ATTACHMENT`); a codec this function does not know is
/// `ERR_CODEC_UNSUPPORTED`. Nothing is copied for the tensor, latent, Arrow and DLPack codecs.
///
/// ```
/// use bytes::Bytes;
/// use xcp::codec::{tensor, validate_body, CodecId};
/// use xcp::ErrorCode;
///
/// let body = tensor::encode_f32(&[2], &[1.0, 2.0], false)?;
/// validate_body(CodecId::TENSOR_F32, &body)?;
/// let err = validate_body(CodecId::TENSOR_F16, &body).unwrap_err();
/// assert_eq!(err.code(), ErrorCode::ERR_MALFORMED);
/// let err = validate_body(CodecId(0x77), &Bytes::new()).unwrap_err();
/// assert_eq!(err.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
/// # Ok::<(), xcp::Error>(())
/// ```
pub fn validate_body(codec: CodecId, body: &Bytes) -> Result<()> {
    match codec {
        CodecId::JSON | CodecId::PROTOBUF => decode_ether(codec, body).map(|_| ()),
        CodecId::TENSOR_F32 | CodecId::TENSOR_F16 | CodecId::TENSOR_QNT8 => {
            tensor::TensorView::parse(body.clone(), Some(codec)).map(|_| ())
        }
        CodecId::MIXED_LATENT => latent::decode(body.clone()).map(|_| ()),
        CodecId::ARROW_IPC => arrow::decode_batches(body.clone()).map(|_| ()),
        CodecId::DLPACK => dlpack::DlpackDescriptor::decode(body.clone()).map(|_| ()),
        other => Err(Error::protocol(
            Violation::Body,
            ErrorCode::ERR_CODEC_UNSUPPORTED,
            format!("no decoder for bodyCodec {other}"),
        )),
    }
}

fn not_an_ether_codec(codec: CodecId) -> Error {
    Error::protocol(
        Violation::Body,
        ErrorCode::ERR_CODEC_UNSUPPORTED,
        format!("no Ether codec for bodyCodec {codec}"),
    )
}

/// The set of body codecs this side implements, keyed by [`CodecId`]: what a HELLO lists in
/// `codecs`. [`Registry::default`] holds every codec implemented so far (JSON, PROTOBUF, the
/// three tensor codecs, MIXED_LATENT, ARROW_IPC and DLPACK); a configuration may remove some. [`validate_body`]
/// checks a received body with the codec its frame names.
///
/// ```
/// use xcp::codec::{CodecId, Registry};
///
/// let mut r = Registry::default();
/// assert!(r.supports(CodecId::JSON));
/// assert!(r.supports(CodecId::TENSOR_F32));
/// r.remove(CodecId::PROTOBUF);
/// assert!(!r.supports(CodecId::PROTOBUF));
/// assert_eq!(r.intersection(&[CodecId::PROTOBUF, CodecId::JSON]), vec![CodecId::JSON]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    ids: BTreeSet<CodecId>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry::empty();
        r.insert(CodecId::JSON);
        r.insert(CodecId::PROTOBUF);
        r.insert(CodecId::TENSOR_F32);
        r.insert(CodecId::TENSOR_F16);
        r.insert(CodecId::TENSOR_QNT8);
        r.insert(CodecId::MIXED_LATENT);
        r.insert(CodecId::ARROW_IPC);
        r.insert(CodecId::DLPACK);
        r
    }
}

impl Registry {
    /// A registry with no codec at all.
    pub fn empty() -> Self {
        Registry {
            ids: BTreeSet::new(),
        }
    }

    /// Adds a codec; returns whether it was new.
    pub fn insert(&mut self, id: CodecId) -> bool {
        self.ids.insert(id)
    }

    /// Removes a codec; returns whether it was present.
    pub fn remove(&mut self, id: CodecId) -> bool {
        self.ids.remove(&id)
    }

    /// The codecs, in ascending ID order.
    pub fn ids(&self) -> Vec<CodecId> {
        self.ids.iter().copied().collect()
    }

    /// Whether this codec is in the registry.
    pub fn supports(&self, id: CodecId) -> bool {
        self.ids.contains(&id)
    }

    /// The codecs of `peer` that this registry supports, in ascending ID order, without
    /// duplicates (the negotiated `codecs` of SPEC §6).
    pub fn intersection(&self, peer: &[CodecId]) -> Vec<CodecId> {
        let peer: BTreeSet<CodecId> = peer.iter().copied().collect();
        self.ids.intersection(&peer).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dispatch() {
        let e = Ether::text("hi");
        for codec in [CodecId::JSON, CodecId::PROTOBUF] {
            let body = encode_ether(&e, codec).unwrap();
            assert_eq!(decode_ether(codec, &body).unwrap(), e);
        }
        for codec in [CodecId::TENSOR_F32, CodecId::ARROW_IPC, CodecId(0x77)] {
            let err = encode_ether(&e, codec).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
            let err = decode_ether(codec, b"{}").unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
        }
    }

    #[test]
    fn registry() {
        let mut r = Registry::default();
        assert_eq!(
            r.ids(),
            vec![
                CodecId::JSON,
                CodecId::TENSOR_F32,
                CodecId::TENSOR_F16,
                CodecId::TENSOR_QNT8,
                CodecId::PROTOBUF,
                CodecId::MIXED_LATENT,
                CodecId::ARROW_IPC,
                CodecId::DLPACK
            ]
        );
        assert!(r.supports(CodecId::PROTOBUF));
        assert!(r.remove(CodecId::DLPACK));
        assert!(!r.supports(CodecId::DLPACK));
        assert!(r.insert(CodecId::DLPACK));
        assert!(!r.insert(CodecId::DLPACK));
        assert_eq!(
            r.intersection(&[CodecId::DLPACK, CodecId(0x99), CodecId::JSON, CodecId::JSON]),
            vec![CodecId::JSON, CodecId::DLPACK]
        );
        assert!(Registry::empty().ids().is_empty());
    }

    #[test]
    fn validate_dispatch() {
        let json = encode_ether(&Ether::text("hi"), CodecId::JSON).unwrap();
        validate_body(CodecId::JSON, &json).unwrap();
        let t = tensor::encode_qnt8(&[2], &[1.0, -1.0], false, false).unwrap();
        validate_body(CodecId::TENSOR_QNT8, &t).unwrap();
        let l = latent::encode(&[(CodecId::TENSOR_QNT8, t.clone())]).unwrap();
        validate_body(CodecId::MIXED_LATENT, &l).unwrap();
        let a = arrow::encode_ethers(&[Ether::text("hi")]).unwrap();
        validate_body(CodecId::ARROW_IPC, &a).unwrap();
        let d = dlpack::DlpackDescriptor::cpu(dlpack::DlDataType::U8, vec![2], t.slice(..2))
            .unwrap()
            .encode()
            .unwrap();
        validate_body(CodecId::DLPACK, &d).unwrap();
        for (codec, body) in [
            (CodecId::JSON, &t),
            (CodecId::TENSOR_F32, &t),
            (CodecId::MIXED_LATENT, &t),
            (CodecId::ARROW_IPC, &t),
            (CodecId::DLPACK, &a),
        ] {
            let err = validate_body(codec, body).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_MALFORMED, "{codec}");
        }
        let err = validate_body(CodecId(0x77), &t).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
    }

    proptest! {
        #[test]
        fn decode_ether_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            for codec in [CodecId::JSON, CodecId::PROTOBUF] {
                if let Err(e) = decode_ether(codec, &body) {
                    prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
                }
            }
        }
    }
}
