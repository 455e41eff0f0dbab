//! Handle schemes as a trait (SPEC §7): how a region is named instead of sent, and how a
//! peer's name for bytes becomes a mapping here.
//!
//! [`HandleScheme`] is the contract every scheme keeps: a name, whether it can be offered on a
//! link ([`HandleScheme::negotiate`]), how a sender names a [`Region`]
//! ([`HandleScheme::export`]), how a receiver turns a peer's URI into a read-only
//! [`Mapping`] ([`HandleScheme::key`], [`HandleScheme::import`]) and what it lets go when the
//! peer does ([`HandleScheme::release`]). The implementations sit beside it:
//!
//! | scheme | type | offered |
//! |---|---|---|
//! | `shm` | [`ShmScheme`] | same host, any local transport |
//! | `memfd` | [`MemfdScheme`] | Unix sockets (descriptors travel with `SCM_RIGHTS`) |
//! | `cuda-ipc` | [`CudaIpcScheme`] | same host, where a CUDA device is usable (feature `cuda`) |
//! | `local` | [`LocalScheme`] | never: objects registered in this process, for tests |
//!
//! The receiver's [`Mapper`](super::Mapper) does what is common to every scheme (the
//! negotiated set, schemes refused after a fault, the mapping cache, the range check, the
//! lease), and asks the scheme for the rest, so no caller matches on scheme names. Every
//! refusal is `ERR_ATTACHMENT` naming the reason, and nothing is mapped then. Every mapping
//! of a peer's memory is watched by the SIGBUS [`guard`](super::guard).
//!
//! One conformance suite (`tests/scheme_conformance.rs`) runs every case (round trip, lease
//! and ACK, range checks, wrong prefix, foreign owner, descriptor mismatches, shrink before
//! map, shrink while mapped, the exporter gone while a view is held) for each scheme.
//!
//! A deliberate step from `ARCHITECTURE.md`, which names the trait `attach::Scheme`: that
//! name is the enum sessions negotiate ([`Scheme`]), used across the API, so the trait is
//! `HandleScheme` and [`Scheme::handler`] leads from one to the other.
//!
//! ```
//! use xcp::attach::scheme::Link;
//! use xcp::attach::Scheme;
//!
//! let unix = Link { unix: true, remote: false };
//! let tcp = Link { unix: false, remote: false };
//! assert!(Scheme::Memfd.handler().negotiate(unix));
//! assert!(!Scheme::Memfd.handler().negotiate(tcp), "descriptors need a Unix socket");
//! assert!(Scheme::Shm.handler().negotiate(tcp));
//! assert!(!Scheme::Shm.handler().negotiate(Link { unix: false, remote: true }));
//! assert!(!Scheme::Local.handler().negotiate(unix), "never offered to a peer");
//! ```

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::pool::Region;
use super::segment::{Mapping, Scheme};
use super::uri::{AttachmentUri, Target};
use crate::error::{Error, Result};

/// What decides which schemes a session can offer: the kind of stream it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// A Unix-domain socket (descriptors can travel with `SCM_RIGHTS`).
    pub unix: bool,
    /// Across hosts (TLS, QUIC): no handle can work.
    pub remote: bool,
}

/// What the receiver knows of the peer when it imports one of its handles.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// The peer's `shm_prefix` from its HELLO/CAPS (empty: none announced).
    pub shm_prefix: &'a str,
    /// The peer process's user, where the transport can tell (`SO_PEERCRED`, `/proc/net/tcp`).
    pub uid: Option<u32>,
    /// The descriptors that came with the message (`SCM_RIGHTS`), in order.
    pub fds: &'a [OwnedFd],
}

/// What a mapping is cached under: one entry per object of the peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImportKey {
    /// A named object (`shm://<name>`).
    Name(String),
    /// A file by device, inode and size (a passed descriptor: the same memfd again maps once;
    /// a different size maps anew).
    Inode {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
        /// `st_size` when it was looked up.
        size: u64,
    },
    /// An object registered with [`LocalScheme`].
    Local(u64),
}

/// One handle scheme: how a sender names a region and how a receiver maps what a peer named.
///
/// Implementations hold no per-connection state: the receiver's [`Mapper`](super::Mapper)
/// keeps the cache and passes what it knows of the peer in a [`Peer`].
pub trait HandleScheme: Send + Sync {
    /// Which scheme this is.
    fn id(&self) -> Scheme;

    /// The URI scheme and HELLO `attach` name.
    fn name(&self) -> &'static str {
        self.id().name()
    }

    /// Whether this scheme can be offered on `link` (in this build, on this machine).
    fn negotiate(&self, link: Link) -> bool;

    /// The URI naming `region` for the peer, adding to `fds` any descriptor that must travel
    /// with the frame; `Ok(None)` when this scheme cannot carry host regions (they go
    /// inline then).
    fn export(&self, region: &Region, fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>>;

    /// The cache key of the object `uri` names, after the checks that need no mapping (name
    /// and prefix, descriptor index, that the object is what the scheme expects). Refusals are
    /// `ERR_ATTACHMENT`.
    fn key(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<ImportKey>;

    /// Maps the object `uri` names, read-only and guarded against SIGBUS, after every check
    /// of the scheme (owner, seals). The caller checks the region against the mapping's
    /// length. Refusals are `ERR_ATTACHMENT`; nothing stays mapped then.
    fn import(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<Arc<Mapping>>;

    /// The peer whose imports were cached under `producer` is gone: release what the scheme
    /// holds for it beyond the mappings themselves (device mappings, for `cuda-ipc`).
    fn release(&self, producer: u64) {
        let _ = producer;
    }
}

/// The implementation of `scheme`.
pub fn handler(scheme: Scheme) -> &'static dyn HandleScheme {
    match scheme {
        Scheme::Shm => &ShmScheme,
        Scheme::Memfd => &MemfdScheme,
        Scheme::CudaIpc => &CudaIpcScheme,
        Scheme::Local => local(),
    }
}

/// The process's one [`LocalScheme`], the one `local://` URIs resolve in.
pub fn local() -> &'static LocalScheme {
    static LOCAL: std::sync::OnceLock<LocalScheme> = std::sync::OnceLock::new();
    LOCAL.get_or_init(LocalScheme::default)
}

fn wrong_target(scheme: &str, uri: &AttachmentUri) -> Error {
    Error::attachment(format!("{scheme}: not a {scheme} URI: {uri}"))
}

fn checked_region(scheme: Scheme, region: &Region) -> Result<()> {
    if region.segment().scheme() != scheme {
        return Err(Error::invalid(format!(
            "{}: a region of a {} segment",
            scheme.name(),
            region.segment().scheme().name()
        )));
    }
    Ok(())
}

/// `shm://<name>#<off>,<size>`: a named POSIX shm object on the same host (SPEC §7). The name
/// must start with the peer's `shm_prefix` and the object must belong to the peer's user.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShmScheme;

impl HandleScheme for ShmScheme {
    fn id(&self) -> Scheme {
        Scheme::Shm
    }

    fn negotiate(&self, link: Link) -> bool {
        !link.remote
    }

    fn export(&self, region: &Region, _fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>> {
        checked_region(Scheme::Shm, region)?;
        AttachmentUri::shm(region.segment().name(), 0, region.len() as u64).map(Some)
    }

    fn key(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<ImportKey> {
        let Target::Shm { name } = uri.target() else {
            return Err(wrong_target("shm", uri));
        };
        if peer.shm_prefix.is_empty() || !name.starts_with(peer.shm_prefix) {
            return Err(Error::attachment(format!(
                "shm: name {name:?} is outside the peer's prefix {:?}",
                peer.shm_prefix
            )));
        }
        Ok(ImportKey::Name(name.clone()))
    }

    fn import(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<Arc<Mapping>> {
        let ImportKey::Name(name) = self.key(uri, peer)? else {
            return Err(wrong_target("shm", uri));
        };
        let Some(uid) = peer.uid else {
            return Err(Error::attachment(
                "shm: the peer's user is unknown (not a local socket of this network \
                 namespace), so no shm object can be trusted as its own",
            ));
        };
        Mapping::open_shm_of(&name, uid).map(Arc::new)
    }
}

/// `memfd://<index>#<off>,<size>`: the index-th descriptor passed with the frame (SPEC §7),
/// sealed by its sender against shrinking; an unsealed one is refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemfdScheme;

fn inode_key(fd: impl AsFd, what: &str) -> Result<ImportKey> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::attachment(format!("{what}: fstat: {e}")))?;
    Ok(ImportKey::Inode {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size.max(0) as u64,
    })
}

impl MemfdScheme {
    /// The descriptor `uri` names among those passed, with its index.
    fn fd<'a>(&self, uri: &AttachmentUri, peer: &Peer<'a>) -> Result<(u32, &'a OwnedFd)> {
        let Target::Memfd { index } = uri.target() else {
            return Err(wrong_target("memfd", uri));
        };
        let fd = peer.fds.get(*index as usize).ok_or_else(|| {
            Error::attachment(format!(
                "memfd: index {index}, but {} descriptors came with the message",
                peer.fds.len()
            ))
        })?;
        Ok((*index, fd))
    }
}

impl HandleScheme for MemfdScheme {
    fn id(&self) -> Scheme {
        Scheme::Memfd
    }

    fn negotiate(&self, link: Link) -> bool {
        link.unix && !link.remote
    }

    fn export(&self, region: &Region, fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>> {
        checked_region(Scheme::Memfd, region)?;
        let index = u32::try_from(fds.len())
            .map_err(|_| Error::invalid("memfd: too many descriptors in one message"))?;
        fds.push(region.segment().fd().try_clone()?);
        AttachmentUri::memfd(index, 0, region.len() as u64).map(Some)
    }

    fn key(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<ImportKey> {
        let (index, fd) = self.fd(uri, peer)?;
        inode_key(fd, &format!("memfd {index}"))
    }

    fn import(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<Arc<Mapping>> {
        let (index, fd) = self.fd(uri, peer)?;
        Mapping::map_memfd(fd, &format!("memfd {index}")).map(Arc::new)
    }
}

/// `cuda-ipc://…`: device memory (feature `cuda`). It has no host mapping: a session
/// resolves it into a device view ([`Mapper::resolve_device`](super::Mapper)), so the host
/// side of the contract refuses, and regions (host memory) are never exported by it.
#[derive(Clone, Copy, Debug, Default)]
pub struct CudaIpcScheme;

impl HandleScheme for CudaIpcScheme {
    fn id(&self) -> Scheme {
        Scheme::CudaIpc
    }

    fn negotiate(&self, link: Link) -> bool {
        !link.remote && cuda_usable()
    }

    fn export(&self, _region: &Region, _fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>> {
        Ok(None)
    }

    fn key(&self, uri: &AttachmentUri, _peer: &Peer<'_>) -> Result<ImportKey> {
        Err(Error::attachment(match uri.target() {
            Target::CudaIpc { .. } if cfg!(feature = "cuda") => {
                "cuda-ipc: device memory has no host view (it is resolved into a device view)"
                    .to_string()
            }
            Target::CudaIpc { .. } => {
                "cuda-ipc: not supported by this build (feature `cuda`)".to_string()
            }
            _ => format!("cuda-ipc: not a cuda-ipc URI: {uri}"),
        }))
    }

    fn import(&self, uri: &AttachmentUri, peer: &Peer<'_>) -> Result<Arc<Mapping>> {
        self.key(uri, peer)?;
        Err(Error::attachment(
            "cuda-ipc: device memory has no host view",
        ))
    }

    fn release(&self, producer: u64) {
        #[cfg(feature = "cuda")]
        super::cuda::release_producer(producer);
        let _ = producer;
    }
}

/// Whether this build and machine can take `cuda-ipc` handles (feature `cuda`, a driver and
/// a device): checked once per process.
pub fn cuda_usable() -> bool {
    #[cfg(feature = "cuda")]
    {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(super::cuda::usable)
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// How many objects [`LocalScheme`] keeps registered at most (the oldest go first).
pub const LOCAL_MAX_OBJECTS: usize = 4096;

/// `local://<id>#<off>,<size>`: objects registered in this process, by id. For tests of the
/// contract (the same mapper, guard, cache and lease paths as a peer's handles, with no
/// socket); never offered to a peer. An exported region's segment descriptor is kept, so the
/// import maps it as a peer's mapping would be (read-only, guarded).
#[derive(Debug, Default)]
pub struct LocalScheme {
    objects: Mutex<LocalObjects>,
}

#[derive(Debug, Default)]
struct LocalObjects {
    next: u64,
    by_id: HashMap<u64, OwnedFd>,
    order: VecDeque<u64>,
}

impl LocalScheme {
    /// Registers a descriptor (any shared-memory file: a memfd, sealed or not, or an shm
    /// object) and returns its id, for `local://<id>#…` URIs.
    pub fn register(&self, fd: OwnedFd) -> u64 {
        let mut o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        o.next += 1;
        let id = o.next;
        o.by_id.insert(id, fd);
        o.order.push_back(id);
        while o.order.len() > LOCAL_MAX_OBJECTS {
            if let Some(old) = o.order.pop_front() {
                o.by_id.remove(&old);
            }
        }
        id
    }

    /// Forgets object `id` (mappings already made stay valid).
    pub fn unregister(&self, id: u64) {
        let mut o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        o.by_id.remove(&id);
        o.order.retain(|&i| i != id);
    }

    fn with_fd<T>(&self, uri: &AttachmentUri, f: impl FnOnce(&OwnedFd) -> Result<T>) -> Result<T> {
        let Target::Local { id } = uri.target() else {
            return Err(wrong_target("local", uri));
        };
        let o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let fd = o
            .by_id
            .get(id)
            .ok_or_else(|| Error::attachment(format!("local: no object {id} in this process")))?;
        f(fd)
    }
}

impl HandleScheme for LocalScheme {
    fn id(&self) -> Scheme {
        Scheme::Local
    }

    fn negotiate(&self, _link: Link) -> bool {
        false
    }

    fn export(&self, region: &Region, _fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>> {
        let id = self.register(region.segment().fd().try_clone()?);
        AttachmentUri::new(Target::Local { id }, 0, region.len() as u64).map(Some)
    }

    fn key(&self, uri: &AttachmentUri, _peer: &Peer<'_>) -> Result<ImportKey> {
        // Registered? (Mapping waits for `import`.)
        self.with_fd(uri, |_| Ok(()))?;
        match uri.target() {
            Target::Local { id } => Ok(ImportKey::Local(*id)),
            _ => Err(wrong_target("local", uri)),
        }
    }

    fn import(&self, uri: &AttachmentUri, _peer: &Peer<'_>) -> Result<Arc<Mapping>> {
        self.with_fd(uri, |fd| Mapping::map_fd(fd, "local object").map(Arc::new))
    }
}
