//! # xcp
//!
//! A Rust implementation of the XCP v0.2 protocol: binary frames with a Cap'n Proto header,
//! capability negotiation, ACK/NACK, chunking, and codecs for Ethers, tensors and tables.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

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

pub use error::{Error, ErrorCode, Result};
pub use ether::{Attachment, Ether, SchemaKey};
