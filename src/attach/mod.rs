//! Attachments by handle (SPEC §7): bytes that do not travel on the socket.
//!
//! This layer owns every OS resource that outlives a frame:
//!
//! - [`segment`]: shared segments (POSIX shm objects, memfds), mapped read-write by their
//!   creator and read-only by the peer;
//! - [`pool`]: the sender's pool of segments and the writable [`Region`]s it loans;
//! - [`map`]: the receiver's mapping cache, the read-only [`View`]s it hands out, and the
//!   [`Lease`] that ACKs a message when its last view is dropped;
//! - [`scheme`]: the [`HandleScheme`] trait every handle scheme implements (shm, memfd,
//!   cuda-ipc, and an in-process `local` one for tests), so callers never match on names;
//! - [`guard`]: the SIGBUS guard over every mapping of a peer's memory (SPEC §7: a peer that
//!   shrinks a segment under us makes its pages read as zeros, not kill the process);
//! - [`uri`]: the attachment URIs that name handles (`shm://`, `memfd://`, `cuda-ipc://`);
//! - [`dlpack_ffi`]: the DLPack C ABI, which needs raw pointers and a foreign deleter;
//! - [`gc`]: removal of segments left behind by killed processes (`xcp shm gc`);
//! - [`guard`]: the SIGBUS guard that maps zeros over a peer's segment when the peer shrinks it;
//! - `cuda` (feature `cuda`): `cuda-ipc://` export and import of device memory, DLPack
//!   `kDLCUDA` views, and the device kernels of `kernels/`.
//!
//! Unlike `wire` and `codec`, this module may use `unsafe`; every block carries a `// SAFETY:`
//! comment.
//!
//! ```
//! use xcp::attach::uri::AttachmentUri;
//!
//! let uri = AttachmentUri::parse("shm://xcp-a.0#4096,1024")?;
//! assert_eq!((uri.offset(), uri.size(), uri.end()), (4096, 1024, 5120));
//! assert_eq!(uri.to_string(), "shm://xcp-a.0#4096,1024");
//! # Ok::<(), xcp::Error>(())
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dlpack_ffi;
pub mod gc;
pub mod guard;
pub mod map;
pub mod pool;
pub mod scheme;
pub mod segment;
pub mod uri;

use std::sync::OnceLock;

pub use map::{Lease, Mapper, View};
pub use pool::{Pool, PoolConfig, Region};
pub use scheme::HandleScheme;
pub use segment::Scheme;

/// The name prefix of every shm object this process creates: `xcp-<pid>-<random>-`.
pub fn process_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        format!(
            "{}{}-{:08x}-",
            gc::NAME_START,
            std::process::id(),
            rand::random::<u32>()
        )
    })
}

/// An identifier of this host: the kernel's boot id (different per boot and per machine, the
/// same for every process of one boot, containers included — which is why a refused handle
/// still falls back to inline bytes).
pub fn host_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}
