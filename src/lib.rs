//! # xcp
//!
//! A Rust implementation of the XCP v0.2 protocol: binary frames with a Cap'n Proto header,
//! capability negotiation, ACK/NACK, chunking, and codecs for Ethers, tensors and tables.
//!
//! The library carries no tool: the `xcp` command line is the `xcp-cli` package and the bench
//! with its HTTP/2 and gRPC baselines the `xcp-bench` package of the same workspace. Features:
//! `uring` (default: the io_uring transport), `schema` (default: JSON Schema validation of
//! Ether payloads against a [`schema::Registry`], SPEC §8), `tls` (`tls://`, rustls), `quic`
//! (`quic://`, quinn; implies `tls`), `cuda` (`cuda-ipc://` attachments, the driver loaded at
//! run time).
//! Nothing here reads the environment or keeps a process-wide default: a session does what
//! its [`SessionConfig`] says.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> xcp::Result<()> {
//! use xcp::codec::CodecId;
//! use xcp::{Ether, Server, Session, SessionConfig};
//! let server = Server::bind("tcp://127.0.0.1:0", SessionConfig::default()).await?;
//! let url = server.local_url();
//! let echo = tokio::spawn(async move {
//!     let s = server.accept().await?;
//!     let m = s.recv().await?;
//!     s.reply(&m, xcp::conn::Outgoing::data(m.header.body_codec, m.body.clone())).await?;
//!     Ok::<(), xcp::Error>(())
//! });
//! let client = Session::connect(&url, SessionConfig::default()).await?;
//! let reply = client.request(xcp::conn::Outgoing::ether(&Ether::text("hi"), CodecId::JSON)?).await?;
//! assert_eq!(reply.ether()?, Ether::text("hi"));
//! echo.await.expect("echo task")?;
//! # Ok(()) }
//! ```
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
pub mod schema;
pub mod session;
pub mod transport;
pub mod wire;
pub use session::{AttachConfig, Server, Session, SessionConfig};

pub use error::{CloseReason, Deadline, Error, ErrorCode, Result, TlsFailure, Violation};
pub use ether::{Attachment, Ether, SchemaKey};
