//! Attachments by handle (SPEC §7): bytes that do not travel on the socket.
//!
//! This layer owns every OS resource that outlives a frame. The handle schemes live here: the
//! attachment URIs that name them ([`uri`]: `shm://`, `memfd://`, `cuda-ipc://`), and the DLPack
//! C ABI ([`dlpack_ffi`]), which needs raw pointers and a foreign deleter. Unlike `wire` and
//! `codec`, this module may use `unsafe`; every block carries a `// SAFETY:` comment.
//!
//! ```
//! use xcp::attach::uri::AttachmentUri;
//!
//! let uri = AttachmentUri::parse("shm://xcp-a.0#4096,1024")?;
//! assert_eq!((uri.offset(), uri.size(), uri.end()), (4096, 1024, 5120));
//! assert_eq!(uri.to_string(), "shm://xcp-a.0#4096,1024");
//! # Ok::<(), xcp::Error>(())
//! ```

pub mod dlpack_ffi;
pub mod uri;
