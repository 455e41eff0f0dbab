//! Body codecs (SPEC §5): pure functions from bytes to typed values and back.
#![forbid(unsafe_code)]

use std::fmt;

pub mod json;
pub mod protobuf;

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
