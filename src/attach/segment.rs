//! Shared segments: a POSIX shm object (`/dev/shm/<name>`) or a memfd, mapped into this
//! process. The sender creates and maps them read-write; the receiver opens and maps them
//! read-only.

use std::os::fd::{AsFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::Mode;

use super::guard::Guarded;
use crate::error::{Error, Result};

/// A handle scheme (SPEC §7): how an attachment's bytes are named instead of sent. Each has
/// an implementation of [`HandleScheme`](super::scheme::HandleScheme), found with
/// [`Scheme::handler`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// A named POSIX shared-memory object (`shm://`).
    Shm,
    /// An anonymous memfd whose descriptor is passed over a Unix socket (`memfd://`).
    Memfd,
    /// Device memory by CUDA IPC handle (`cuda-ipc://`, feature `cuda`): never a host
    /// segment; offered only where a CUDA device is usable.
    CudaIpc,
    /// Objects registered in this process (`local://`): for tests of the scheme contract;
    /// never offered to a peer.
    Local,
}

impl Scheme {
    /// Every scheme.
    pub const ALL: [Scheme; 4] = [Scheme::Shm, Scheme::Memfd, Scheme::CudaIpc, Scheme::Local];

    /// The URI scheme / HELLO `attach` name.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Shm => "shm",
            Scheme::Memfd => "memfd",
            Scheme::CudaIpc => "cuda-ipc",
            Scheme::Local => "local",
        }
    }

    /// The scheme of a HELLO/CAPS `attach` name; `None` for a name this build does not know
    /// (a newer peer's scheme: ignored in negotiation).
    pub fn from_name(name: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its implementation.
    pub fn handler(self) -> &'static dyn super::scheme::HandleScheme {
        super::scheme::handler(self)
    }
}

/// A shared segment mapped read-write by its creator.
///
/// A shm segment's name is unlinked when the segment drops; a memfd simply closes.
pub struct Segment {
    /// Watches the mapping for SIGBUS (a peer of our user could truncate a shm object of
    /// ours); dropped before `map`. `None` for a (sealed) memfd, or when the guard's table
    /// was full.
    guard: Option<Guarded>,
    scheme: Scheme,
    /// The object name (shm) or a label (memfd).
    name: String,
    fd: OwnedFd,
    map: MmapRaw,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("scheme", &self.scheme)
            .field("name", &self.name)
            .field("len", &self.len())
            .finish()
    }
}

fn io_err(what: &str, e: rustix::io::Errno) -> Error {
    let os = std::io::Error::from_raw_os_error(e.raw_os_error());
    Error::Io(std::io::Error::new(os.kind(), format!("{what}: {e}")))
}

impl Segment {
    /// Creates a shm object `/<name>` of `len` bytes (mode 0600; fails if it exists) and maps it.
    pub fn create_shm(name: &str, len: usize) -> Result<Segment> {
        let fd = rustix::shm::open(
            format!("/{name}").as_str(),
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| io_err(&format!("shm_open /{name}"), e))?;
        let seg = Self::finish(Scheme::Shm, name.to_string(), fd, len);
        if seg.is_err() {
            let _ = rustix::shm::unlink(format!("/{name}").as_str());
        }
        seg
    }

    /// Creates a memfd of `len` bytes, seals it against shrinking and growing (SPEC §7: a
    /// receiver refuses a memfd without `F_SEAL_SHRINK`), and maps it. No write seal: the
    /// pool writes the region again after the peer ACKs.
    pub fn create_memfd(label: &str, len: usize) -> Result<Segment> {
        let fd = rustix::fs::memfd_create(
            label,
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| io_err("memfd_create", e))?;
        let seg = Self::finish(Scheme::Memfd, label.to_string(), fd, len)?;
        rustix::fs::fcntl_add_seals(&seg.fd, MEMFD_SEALS)
            .map_err(|e| io_err("fcntl(F_ADD_SEALS)", e))?;
        Ok(seg)
    }

    fn finish(scheme: Scheme, name: String, fd: OwnedFd, len: usize) -> Result<Segment> {
        if len == 0 {
            return Err(Error::invalid("a shared segment needs at least one byte"));
        }
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| io_err("ftruncate", e))?;
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        // A shm object of ours can be truncated by any process of our user; a memfd is
        // sealed (see `create_memfd`), so only shm segments take a slot of the guard.
        let guard = match scheme {
            Scheme::Shm => match Guarded::register(map.as_ptr(), len, true) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::debug!("segment {name} not guarded against SIGBUS: {e}");
                    None
                }
            },
            _ => None,
        };
        Ok(Segment {
            guard,
            scheme,
            name,
            fd,
            map,
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The shm object name (without `/`), or the memfd label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (passed with `SCM_RIGHTS` for memfd).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: segments have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The base of the read-write mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether the object shrank under its mapping since it was created (someone truncated
    /// it; the pages past the new end now read as zeros and writes to them are lost).
    pub fn faulted(&self) -> bool {
        self.guard.as_ref().is_some_and(Guarded::faulted)
    }

    /// Whether the object is no longer as long as its mapping: it [`faulted`](Self::faulted),
    /// or someone truncated it (its pages past the new end are gone even if nothing touched
    /// them yet). A sealed memfd never shrinks.
    pub fn shrank(&self) -> bool {
        self.faulted()
            || rustix::fs::fstat(&self.fd)
                .map(|st| st.st_size < self.len() as i64)
                .unwrap_or(true)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.scheme == Scheme::Shm {
            if let Err(e) = rustix::shm::unlink(format!("/{}", self.name).as_str()) {
                tracing::debug!("shm_unlink /{}: {e}", self.name);
            }
        }
    }
}

/// The seals a memfd carries before its first handle leaves (SPEC §7).
pub const MEMFD_SEALS: rustix::fs::SealFlags =
    rustix::fs::SealFlags::SHRINK.union(rustix::fs::SealFlags::GROW);

/// A segment of the peer, mapped read-only, and registered with the SIGBUS guard
/// ([`super::guard`]): if the peer shrinks the object while it is mapped, the pages past the
/// new end read as zeros and [`Mapping::faulted`] says so, instead of the process dying.
pub struct Mapping {
    /// Dropped before `map`: nothing reads the mapping once its owner goes.
    guard: Guarded,
    map: MmapRaw,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len()).finish()
    }
}

impl Mapping {
    /// Opens the shm object `/<name>` read-only and maps all of it.
    pub fn open_shm(name: &str) -> Result<Mapping> {
        let fd = rustix::shm::open(
            format!("/{name}").as_str(),
            rustix::shm::OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| Error::attachment(format!("shm object /{name}: {e}")))?;
        Self::map_fd(&fd, &format!("shm object /{name}"))
    }

    /// Maps the shm object `name` read-only if user `uid` owns it (the peer that named it).
    pub fn open_shm_of(name: &str, uid: u32) -> Result<Mapping> {
        let what = format!("shm object /{name}");
        let fd = rustix::shm::open(
            format!("/{name}").as_str(),
            rustix::shm::OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| Error::attachment(format!("{what}: {e}")))?;
        let st =
            rustix::fs::fstat(&fd).map_err(|e| Error::attachment(format!("{what}: fstat: {e}")))?;
        if st.st_uid != uid {
            return Err(Error::attachment(format!(
                "{what} belongs to uid {}, not to the peer (uid {uid})",
                st.st_uid
            )));
        }
        Self::map_fd(&fd, &what)
    }

    /// Maps a received `memfd://` descriptor read-only, after checking that it is sealed
    /// against shrinking (SPEC §7): an unsealed memfd, or a descriptor that cannot carry seals
    /// (not a memfd), is refused with `ERR_ATTACHMENT` and nothing is mapped.
    pub fn map_memfd(fd: impl AsFd, what: &str) -> Result<Mapping> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
            Error::attachment(format!(
                "{what}: not a memfd that can be sealed (F_GET_SEALS: {e})"
            ))
        })?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(Error::attachment(format!(
                "{what}: memfd not sealed against shrinking (F_SEAL_SHRINK missing)"
            )));
        }
        Self::map_fd(fd, what)
    }

    /// Maps all of a received descriptor read-only (no seal check: see
    /// [`Mapping::map_memfd`] for `memfd://`).
    pub fn map_fd(fd: impl AsFd, what: &str) -> Result<Mapping> {
        let st =
            rustix::fs::fstat(&fd).map_err(|e| Error::attachment(format!("{what}: fstat: {e}")))?;
        // Only regular files (shm objects and memfds are): not sockets, pipes or devices.
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(Error::attachment(format!(
                "{what}: not a shared-memory object"
            )));
        }
        let len = usize::try_from(st.st_size)
            .map_err(|_| Error::attachment(format!("{what}: size {} out of range", st.st_size)))?;
        if len == 0 {
            return Err(Error::attachment(format!("{what}: empty object")));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&fd.as_fd())
            .map_err(|e| Error::attachment(format!("{what}: mmap: {e}")))?;
        let guard = Guarded::register(map.as_ptr(), len, false)?;
        Ok(Mapping { guard, map })
    }

    /// Whether the peer shrank the object while it was mapped: a read touched a page past its
    /// new end, and the pages from there on read as zeros (SPEC §7). Whoever reads a view to
    /// the end checks this before trusting what it read.
    pub fn faulted(&self) -> bool {
        self.guard.faulted()
    }

    /// The object's size.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `len` bytes at `off`, which the caller has checked lie inside the mapping.
    pub(crate) fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len()));
        // SAFETY: the range lies inside a live read-only mapping owned by `self`, which
        // outlives the returned borrow. The peer keeps the bytes unchanged until we ACK
        // (SPEC §7 lease rule); a peer that breaks that rule can change what we read, but
        // not make us read outside the mapping.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), len) }
    }
}

/// Whether a file descriptor came from `memfd_create` or `shm_open` (a regular file on a
/// tmpfs); used to refuse other descriptors passed by a peer.
pub fn is_shared_memory(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd)
        .map(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        })
        .unwrap_or(false)
}
