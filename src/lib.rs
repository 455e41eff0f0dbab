//! # xcp
//!
//! A Rust implementation of the XCP v0.2 protocol: binary frames with a Cap'n Proto header,
//! capability negotiation, ACK/NACK, chunking, and codecs for Ethers, tensors and tables.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// `with_*` methods for a `#[non_exhaustive]` config: each takes the value of one field and
/// returns the config, so users build one as `SessionConfig::default().with_…(…)`.
macro_rules! with_fields {
    ($ty:ty { $($(#[$doc:meta])* $method:ident => $field:ident: $fty:ty;)* }) => {
        impl $ty {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $method(mut self, value: $fty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

pub mod attach;
pub mod codec;
pub mod conn;
pub mod control;
pub mod error;
pub mod ether;
pub mod session;
pub mod transport;
pub mod wire;
pub use session::{AttachConfig, Server, Session, SessionConfig};

pub use error::{CloseReason, Deadline, Error, ErrorCode, Result};
pub use ether::{Attachment, Ether, SchemaKey};
