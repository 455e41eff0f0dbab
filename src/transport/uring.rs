//! The io_uring transport: completion-based socket I/O under the same framing.
//!
//! Built on the raw `io-uring` crate behind this small driver of our own (tokio-uring has had
//! no maintainer since 2025). It is a byte-stream transport like the others: the session
//! driver, and so the peer, cannot tell it from epoll.
//!
//! # How it works
//! - A [`Ring`] is one `io_uring` instance shared by many connections (a server uses one for
//!   every connection it accepts). Its completion queue signals an `eventfd` registered with
//!   the ring; one small tokio task per ring (the *reaper*) waits on that eventfd through
//!   tokio's reactor, drains every completion of every connection in one pass and wakes the
//!   tasks whose operations finished. The operations themselves are submitted directly by the
//!   task that wants them (one `io_uring_enter`), with no hop through another thread, except
//!   right after the reaper woke several connections: their next operations are queued and
//!   the reaper submits them in one enter once they ran (batching across connections).
//! - **Receives** take one of two paths, chosen per read by how much the frame in progress
//!   still needs ([`UringRead::read_owned`]'s `want`):
//!   - *provided buffers* for small reads (under [`DIRECT_MIN`]): each ring registers a
//!     buffer ring (`IORING_REGISTER_PBUF_RING`) of 16 KiB buffers, grown in batches as
//!     receives need them up to a limit ([`Ring::with_provided_buffers`]), and each
//!     connection keeps one **multishot** `IORING_OP_RECV` armed on it: no submission per
//!     message, and an idle connection lends the kernel no buffer. The reader copies the
//!     bytes of each completion into its read buffer and hands the buffer straight back. A
//!     reader that falls 8 buffers (`QUEUE_CAP`) behind has its receive cancelled until it
//!     catches up, so a paused consumer does not keep taking buffers; the kernel may fill more
//!     before the cancel lands (one pass drains what the socket holds, as far as free buffers
//!     go), so the hard bound is the pool's limit, 16 MiB per ring by default. The pool grows
//!     when a receive runs out of buffers that other connections hold, not when one flooding
//!     connection took them all itself. When the pool runs dry, a read goes direct;
//!   - *direct* for the rest of a large frame, and on Unix sockets whose reads may carry
//!     descriptors: the receive owns the connection's `BytesMut` read buffer and fills its
//!     spare capacity in place (no copy; `IORING_OP_RECVMSG` with `SCM_RIGHTS` lands in the
//!     same buffer). The multishot receive is stopped first (its bytes read out in order)
//!     and re-armed after.
//!
//!   Sockets carry no registered (fixed) buffers: receives into them need the NIC-side
//!   zero-copy receive, which loopback and most hosts lack.
//! - A send owns clones of the frames' `Bytes` (prefix+header, payload, CRC) in one
//!   `IORING_OP_SENDMSG` with an iovec each, so payloads are never copied or concatenated.
//! - Rings are set up with `IORING_SETUP_COOP_TASKRUN` where the kernel has it (5.19): the
//!   kernel completes a socket receive in the context of the thread that armed it, and by
//!   default interrupts that thread with an IPI to do so; cooperatively, a running thread does
//!   the work at its next system call (a sleeping one is still woken at once). This measured
//!   fewer CPU cycles per message across many connections.
//! - Operations are cancel-safe in the sense the session driver needs: a future that is
//!   dropped leaves its operation in flight, and the next call on the same half returns that
//!   operation's result. A half dropped with an operation in flight submits a cancel; the
//!   buffers stay with the ring until the kernel gives them back.
//! - Sends use `MSG_WAITALL`, so a large frame is pushed by the kernel until it is all out
//!   instead of costing a round trip through user space per partial write.
//! - Connecting and accepting stay on tokio (they happen once per connection); the stream is
//!   then handed to the ring.
//! - Zero-copy sends (`IORING_OP_SENDMSG_ZC`) only toward TCP peers on other hosts and from
//!   [`ZC_MIN`] bytes up ([`ZeroCopy`]): on loopback the kernel copies anyway and they
//!   measured ~2x slower (ARCHITECTURE.md). Their buffers stay held until the kernel's
//!   notification completion.
//!
//! Dependencies beyond ARCHITECTURE.md's table: `libc`, because the `io-uring` crate's
//! operations take libc's `msghdr` and `iovec` (a dependency of every build since the SIGBUS
//! guard of `attach::guard` needs `sigaction`).
//!
//! # Selection
//! [`IoMode`](super::IoMode): `epoll`, `uring` or `auto`. [`probe`] builds a ring and runs a
//! NOP through it once per process; `auto` falls back to epoll with one log line where that
//! fails (old kernels, `kernel.io_uring_disabled`, seccomp profiles of containers), and an
//! explicit `uring` fails with the reason and how to proceed. (The library reads no
//! environment variable; the CLI simulates a refusing kernel with `XCP_URING_DISABLE=1`.)
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MAX_FDS_PER_READ;
use crate::error::{Error, Result};

/// Submission queue entries per ring.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries per ring: room for a few operations per connection of thousands.
const CQ_ENTRIES: u32 = 16384;
/// The most buffers in one send.
const MAX_IOVECS: usize = 64;
/// Read at least this much per receive.
const READ_CHUNK: usize = 64 * 1024;
/// Sends up to this many bytes mute the eventfd while they are submitted (they complete
/// inline in microseconds; a larger copy would hold other connections' wake-ups back).
const MUTE_MAX: usize = 64 * 1024;
/// The user data of cancel requests, whose completions are ignored.
const CANCEL_UD: u64 = u64::MAX;
/// Largest copy made by the `AsyncWrite` path (used outside the session driver's hot path).
const COPY_WRITE_MAX: usize = 256 * 1024;
/// The size of each provided receive buffer.
const PBUF_SIZE: usize = 16 * 1024;
/// Entries of the provided-buffer ring (a power of two): the most buffers a ring can have.
const PBUF_ENTRIES: u16 = 1024;
/// Provided buffers are added this many at a time, as receives need them.
const PBUF_BATCH: usize = 16;
/// The buffer group of the provided-buffer ring.
const PBUF_GROUP: u16 = 0;
/// The most provided buffers of a [`Ring::new`] ring (16 MiB of 16 KiB buffers).
pub const DEFAULT_PROVIDED_BUFFERS: usize = PBUF_ENTRIES as usize;
/// A connection whose reader has this many received buffers not yet taken stops its
/// multishot receive until it catches up (so one slow reader cannot hold the whole pool).
const QUEUE_CAP: usize = 8;
/// A read that still needs this many bytes for the frame in progress goes straight into the
/// connection's buffer (one receive, no copy) instead of through provided buffers.
pub const DIRECT_MIN: usize = 64 * 1024;

/// Why io_uring cannot be used here, or `Ok` when it can (probed once per process).
pub fn probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(run_probe).clone()
}

fn run_probe() -> std::result::Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (ENOSYS; it needs Linux 5.6 or later)".to_string(),
        Some(libc::EPERM) => "the kernel refused io_uring_setup (EPERM): the sysctl kernel.io_uring_disabled or a seccomp profile (common in containers) forbids it".to_string(),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe registration failed: {e}"))?;
    for (code, name) in [
        (opcode::Recv::CODE, "RECV"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "this kernel's io_uring lacks IORING_OP_{name} (it needs Linux 5.6 or later)"
            ));
        }
    }
    // A ring that can be set up may still be refused at enter (seccomp): run one NOP.
    let nop = opcode::Nop::new().build().user_data(7);
    let mut ring = ring;
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "io_uring queue full".to_string())?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let done = ring
        .completion()
        .next()
        .map(|c| (c.user_data(), c.result()));
    match done {
        Some((7, r)) if r >= 0 => Ok(()),
        Some((_, r)) => Err(format!("an io_uring NOP failed with {r}")),
        None => Err("an io_uring NOP did not complete".to_string()),
    }
}

/// io_uring cannot serve here: an I/O error of kind `Unsupported` with the reason.
fn unavailable(why: impl Into<String>) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::Unsupported, why.into()))
}

/// The ring to use for `mode`: `None` means epoll. An explicit `uring` that cannot work is an
/// error that says why and what to do; `auto` logs once and falls back to epoll.
pub fn resolve(mode: super::IoMode) -> Result<Option<Ring>> {
    match mode {
        super::IoMode::Epoll => Ok(None),
        super::IoMode::Uring => match probe() {
            Ok(()) => Ring::new().map(Some),
            Err(why) => Err(unavailable(format!(
                "io_uring is not available: {why}; use --io epoll (or auto), or allow io_uring \
                 (sysctl kernel.io_uring_disabled=0; a seccomp profile that permits \
                 io_uring_setup and io_uring_enter)"
            ))),
        },
        super::IoMode::Auto => match probe().map_err(unavailable).and_then(|()| Ring::new()) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| tracing::warn!("io_uring unavailable ({e}); using epoll"));
                Ok(None)
            }
        },
    }
}

/// One io_uring instance and its reaper task, shared by many connections. Cloning shares it.
/// The reaper ends (and the ring closes) once every handle is dropped and every operation has
/// come back from the kernel.
pub struct Ring {
    inner: Arc<RingInner>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("Ring")
            .field("in_flight", &st.in_flight)
            .field("handles", &self.inner.handles.load(Ordering::Relaxed))
            .finish()
    }
}

impl Clone for Ring {
    fn clone(&self) -> Ring {
        self.inner.handles.fetch_add(1, Ordering::AcqRel);
        Ring {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: let the reaper see it and end once the kernel is done.
            self.inner.kick();
        }
    }
}

struct RingInner {
    uring: IoUring,
    state: Mutex<State>,
    /// The eventfd the kernel signals on completions (the reaper owns the async side).
    efd: OwnedFd,
    handles: AtomicUsize,
    /// Whether the kernel has `IORING_OP_SENDMSG_ZC`.
    zc_supported: bool,
    /// [`ZeroCopy`] as a number (see [`Ring::set_zero_copy`]).
    zc_mode: std::sync::atomic::AtomicU8,
    /// Sends that went zero-copy so far.
    zc_sends: std::sync::atomic::AtomicU64,
    /// Bytes received through provided buffers, and straight into read buffers.
    pbuf_bytes: std::sync::atomic::AtomicU64,
    direct_bytes: std::sync::atomic::AtomicU64,
}

/// When sends use `IORING_OP_SENDMSG_ZC` (the kernel sends from our pages instead of copying
/// them; it pays toward other hosts, while on loopback the kernel copies anyway and it
/// measured ~2x slower). Only sends of at least [`ZC_MIN`] bytes, and only where the kernel
/// has the operation (Linux 6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Toward peers that are not on this host (TCP to an address that is neither loopback nor
    /// our own end's): the default.
    Remote,
    /// Every TCP and Unix peer (for tests and measurements).
    Always,
    /// Never.
    Never,
}

/// The smallest send that goes zero-copy.
pub const ZC_MIN: usize = 10 * 1024;

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Set by the reaper while the tasks it just woke run: their submissions are queued
    /// without an enter each, and the reaper submits them all in one (batching across
    /// connections).
    batching: bool,
    /// The provided receive buffers (`None` where the kernel cannot register them, or after a
    /// multishot receive was refused).
    pool: Option<Pool>,
    /// The kernel refused a multishot receive: receives go straight into read buffers.
    multi_refused: bool,
}

/// Provided receive buffers: a buffer ring registered with the kernel (group [`PBUF_GROUP`]),
/// from which multishot receives take a buffer per completion. The reader copies the bytes
/// into its connection's buffer and gives the buffer back at once, so buffers are only held
/// for bytes that arrived and were not yet read (bounded by [`QUEUE_CAP`] per connection and
/// [`PBUF_ENTRIES`] per ring). Buffers are added in batches as receives need them.
struct Pool {
    /// The ring of `io_uring_buf` entries (page-aligned, [`PBUF_ENTRIES`] of them).
    ring: std::ptr::NonNull<types::BufRingEntry>,
    /// Our shadow of the ring's tail (the kernel reads the published one).
    tail: u16,
    /// The buffers, [`PBUF_BATCH`] per allocation; their heap memory never moves or goes
    /// away while the ring lives (buffer `b` is `batches[b / PBUF_BATCH]` at
    /// `(b % PBUF_BATCH) * PBUF_SIZE`).
    batches: Vec<Box<[u8]>>,
    /// The most buffers it may grow to (a multiple of [`PBUF_BATCH`], at most
    /// [`PBUF_ENTRIES`]).
    max: usize,
}

// SAFETY: the ring pointer is to memory this `Pool` owns (allocated in `Pool::register`);
// nothing in it is thread-bound, and every access happens with the state lock held.
unsafe impl Send for Pool {}

impl Pool {
    fn layout() -> std::alloc::Layout {
        let bytes = usize::from(PBUF_ENTRIES) * std::mem::size_of::<types::BufRingEntry>();
        // Page alignment, as the kernel requires of a buffer ring.
        std::alloc::Layout::from_size_align(bytes, 4096).expect("a valid layout")
    }

    /// Allocates the buffer ring and registers it with `uring`, for up to `max` buffers;
    /// `None` for `max` 0 or where the kernel refuses (before Linux 5.19).
    fn register(uring: &IoUring, max: usize) -> Option<Pool> {
        if max == 0 {
            return None;
        }
        let layout = Pool::layout();
        // SAFETY: the layout has a non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        let ring = std::ptr::NonNull::new(mem.cast::<types::BufRingEntry>())?;
        // SAFETY: `ring` is page-aligned memory of PBUF_ENTRIES entries, zeroed (an empty
        // ring: tail 0), that stays allocated until this pool is dropped, which happens only
        // after the ring is unregistered or the io_uring is closed.
        let registered = unsafe {
            uring.submitter().register_buf_ring_with_flags(
                ring.as_ptr() as u64,
                PBUF_ENTRIES,
                PBUF_GROUP,
                0,
            )
        };
        if registered.is_err() {
            // SAFETY: allocated above with this layout and never shared with the kernel.
            unsafe { std::alloc::dealloc(mem, layout) };
            return None;
        }
        Some(Pool {
            ring,
            tail: 0,
            batches: Vec::new(),
            max: max.div_ceil(PBUF_BATCH) * PBUF_BATCH,
        })
    }

    /// Buffers added so far.
    fn count(&self) -> usize {
        self.batches.len() * PBUF_BATCH
    }

    /// Adds a batch of buffers, unless the ring is full; whether it did.
    fn grow(&mut self) -> bool {
        if self.count() + PBUF_BATCH > self.max.min(usize::from(PBUF_ENTRIES)) {
            return false;
        }
        let first = self.count();
        self.batches
            .push(vec![0u8; PBUF_BATCH * PBUF_SIZE].into_boxed_slice());
        for bid in first..first + PBUF_BATCH {
            self.put(bid as u16);
        }
        self.publish();
        true
    }

    /// Where buffer `bid` is (stable while the pool lives).
    fn addr(&self, bid: u16) -> Option<*const u8> {
        let bid = usize::from(bid);
        let batch = self.batches.get(bid / PBUF_BATCH)?;
        Some(batch[(bid % PBUF_BATCH) * PBUF_SIZE..].as_ptr())
    }

    /// Hands buffer `bid` back to the kernel (seen once [`Pool::publish`] runs).
    fn put(&mut self, bid: u16) {
        let Some(addr) = self.addr(bid) else {
            return;
        };
        let at = usize::from(self.tail & (PBUF_ENTRIES - 1));
        // SAFETY: `at` is within the ring's PBUF_ENTRIES entries; the kernel only reads entries
        // between its head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(at) };
        entry.set_addr(addr as u64);
        entry.set_len(PBUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the tail, after the entries written before it.
    fn publish(&self) {
        // SAFETY: the tail field lives in the ring's first entry (the kernel's layout), is
        // 2-byte aligned, and is only written here (under the state lock); the kernel reads it
        // concurrently, hence the atomic release store.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring.as_ptr()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `Pool::register` with this layout; the io_uring is closed or
        // the ring unregistered by now (see `RingInner`'s drop).
        unsafe { std::alloc::dealloc(self.ring.as_ptr().cast(), Pool::layout()) };
    }
}

/// The state of a multishot receive while it is armed.
struct Multi {
    /// Completions not yet taken by the reader: (result, flags).
    queue: VecDeque<(i32, u32)>,
    waker: Option<Waker>,
    /// The kernel posted its last completion (no `IORING_CQE_F_MORE`).
    ended: bool,
    /// A cancel was submitted (the reader fell behind, or wants to receive directly).
    stopping: bool,
}

struct Slot {
    generation: u32,
    phase: Phase,
    res: Res,
}

enum Phase {
    Free,
    Pending(Option<Waker>),
    Done(i32),
    /// A zero-copy send's result is in, but the kernel still reads its buffers until the
    /// notification completion (`IORING_CQE_F_NOTIF`) comes.
    DoneHeld(i32),
    /// The result was taken; the buffers wait for the notification.
    Held,
    /// Its owner went away; the buffers are freed when the kernel gives them back.
    Orphan,
    /// An armed multishot receive into provided buffers.
    Multi(Box<Multi>),
}

/// What an operation owns while the kernel has it. Every pointer the kernel holds points into
/// heap memory owned here, so moving a `Res` (or the slot table growing) moves no target.
enum Res {
    None,
    Recv {
        buf: BytesMut,
        start: usize,
    },
    RecvMsg {
        buf: BytesMut,
        start: usize,
        msg: Box<Msg>,
    },
    Send {
        _bufs: Vec<Bytes>,
        _msg: Box<Msg>,
        _fds: Vec<OwnedFd>,
    },
}

/// A `msghdr` with the iovecs and control buffer it points to.
struct Msg {
    hdr: libc::msghdr,
    iov: Vec<libc::iovec>,
    /// `u64` words keep the control buffer aligned for `cmsghdr`.
    control: Vec<u64>,
}

// SAFETY: the raw pointers in `Msg` point only into memory that the same `Res` owns (its
// iovecs, its control buffer, its `Bytes`/`BytesMut`); nothing in them is thread-bound.
unsafe impl Send for Msg {}

impl RingInner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the reaper (it re-checks whether it is still needed).
    fn kick(&self) {
        let _ = rustix::io::write(&self.efd, &1u64.to_ne_bytes());
    }

    /// Moves every completion to its slot; returns the wakers to call (after unlocking).
    /// Returns whether entries were queued that need an enter (cancels of multishot
    /// receives whose reader fell behind).
    fn reap_locked(&self, st: &mut State, wake: &mut Vec<Waker>) -> bool {
        let mut queued = false;
        let mut recycled = false;
        // SAFETY: the completion queue is only touched with the state lock held.
        let cq = unsafe { self.uring.completion_shared() };
        for cqe in cq {
            let ud = cqe.user_data();
            if ud == CANCEL_UD {
                continue;
            }
            let flags = cqe.flags();
            let bid = io_uring::cqueue::buffer_select(flags);
            let idx = (ud & 0xffff_ffff) as usize;
            let generation = (ud >> 32) as u32;
            let mut slot = st
                .slots
                .get_mut(idx)
                .filter(|slot| slot.generation == generation);
            let more = io_uring::cqueue::more(flags);
            // A multishot receive: queue the completion for its reader.
            if let Some(Phase::Multi(m)) = slot.as_deref_mut().map(|s| &mut s.phase) {
                m.queue.push_back((cqe.result(), flags));
                if !more {
                    m.ended = true;
                }
                if let Some(w) = m.waker.take() {
                    wake.push(w);
                }
                if !m.ended && !m.stopping && m.queue.len() >= QUEUE_CAP {
                    // The reader is behind: stop receiving for it until it catches up.
                    m.stopping = true;
                    let cancel = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
                    queued |= self.push(&cancel).is_ok();
                }
                continue;
            }
            // A buffer nobody will read (its receive was orphaned): straight back.
            if let (Some(b), Some(pool)) = (bid, st.pool.as_mut()) {
                pool.put(b);
                recycled = true;
            }
            let Some(slot) = slot else {
                continue;
            };
            // A zero-copy send completes twice: its result with F_MORE, then a notification
            // once the kernel is done with the buffers. Everything else completes once.
            let mut release = false;
            slot.phase = match std::mem::replace(&mut slot.phase, Phase::Free) {
                Phase::Pending(w) => {
                    if let Some(w) = w {
                        wake.push(w);
                    }
                    if more {
                        Phase::DoneHeld(cqe.result())
                    } else {
                        Phase::Done(cqe.result())
                    }
                }
                Phase::DoneHeld(r) if !more => Phase::Done(r),
                Phase::Held | Phase::Orphan if !more => {
                    release = true;
                    Phase::Free
                }
                other => other,
            };
            if release {
                slot.res = Res::None;
                st.free.push(idx as u32);
                st.in_flight -= 1;
            }
        }
        if recycled {
            if let Some(pool) = &st.pool {
                pool.publish();
            }
        }
        queued
    }

    /// Reaps and wakes; returns how many tasks it woke.
    fn reap(&self) -> usize {
        let mut wake = Vec::new();
        let flush = {
            let mut st = self.lock();
            self.reap_locked(&mut st, &mut wake);
            // SAFETY: the submission queue is only touched with the state lock held: dropping
            // the handle stores its cached tail, which must never race a push.
            let sq = unsafe { self.uring.submission_shared() };
            // Entries that did not go in (a busy kernel) go now; completions the kernel could
            // not post (a full completion queue) are flushed by an enter.
            !sq.is_empty() || sq.cq_overflow()
        };
        let woken = wake.len();
        for w in wake {
            w.wake();
        }
        if flush {
            let _ = self.uring.submitter().submit();
        }
        woken
    }

    /// Queues one operation and submits it. `entry` points into heap memory that `res` owns
    /// (so moving `res` into its slot moves nothing the kernel sees).
    ///
    /// With `mute`, the eventfd is muted for the enter (see below): only for operations that
    /// complete inline quickly (small sends), since completions of other connections posted
    /// meanwhile wait for this thread's reap.
    fn submit(&self, res: Res, entry: io_uring::squeue::Entry, mute: bool) -> io::Result<u64> {
        let ud;
        {
            let mut st = self.lock();
            let idx = match st.free.pop() {
                Some(i) => i as usize,
                None => {
                    st.slots.push(Slot {
                        generation: 0,
                        phase: Phase::Free,
                        res: Res::None,
                    });
                    st.slots.len() - 1
                }
            };
            let slot = &mut st.slots[idx];
            slot.generation = slot.generation.wrapping_add(1);
            slot.phase = Phase::Pending(None);
            // The buffers' heap addresses do not change when `res` moves into the slot.
            slot.res = res;
            ud = (u64::from(slot.generation) << 32) | idx as u64;
            let entry = entry.user_data(ud);
            st.in_flight += 1;
            if let Err(e) = self.push(&entry) {
                let slot = &mut st.slots[idx];
                slot.phase = Phase::Free;
                slot.res = Res::None;
                st.free.push(idx as u32);
                st.in_flight -= 1;
                return Err(e);
            }
            if st.batching {
                // The reaper submits it with the others of this round.
                return Ok(ud);
            }
            // Operations that complete inline, during the enter below, are reaped right after
            // it by this thread: they need no eventfd wake-up of the reaper (which would cost
            // a reactor wake and a task poll per send). Re-enabled under the lock after the
            // enter, followed by a reap, so nothing posted meanwhile is missed.
            if mute {
                // SAFETY: the completion queue is only touched with the state lock held.
                unsafe { self.uring.completion_shared() }.disable_eventfd();
            }
        }
        let entered = self.uring.submitter().submit();
        if mute {
            self.enable_and_reap();
        }
        match entered {
            Ok(_) => {}
            // The entry stays queued; the reaper submits it with the next completion.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
            Err(e) => {
                self.orphan(ud, true);
                return Err(e);
            }
        }
        Ok(ud)
    }

    /// Turns eventfd notifications back on, then hands out whatever completed meanwhile.
    fn enable_and_reap(&self) {
        let mut wake = Vec::new();
        let queued = {
            let mut st = self.lock();
            // SAFETY: the completion queue is only touched with the state lock held.
            unsafe { self.uring.completion_shared() }.enable_eventfd();
            self.reap_locked(&mut st, &mut wake)
        };
        for w in wake {
            w.wake();
        }
        if queued {
            let _ = self.uring.submitter().submit();
        }
    }

    /// Pushes an entry (the state lock is held by the caller).
    fn push(&self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: the submission queue is only touched with the state lock held, and the
            // entry points into memory its slot owns until the completion comes back.
            let pushed = unsafe { self.uring.submission_shared().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel, then try once more.
            self.uring.submitter().submit()?;
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the io_uring submission queue is full",
        ))
    }

    /// Polls operation `ud`: its result and resources once the kernel is done.
    fn poll_op(&self, ud: u64, cx: &mut Context<'_>) -> Poll<(i32, Res)> {
        let mut wake = Vec::new();
        let queued;
        let out = {
            let mut st = self.lock();
            queued = self.reap_locked(&mut st, &mut wake);
            let idx = (ud & 0xffff_ffff) as usize;
            let slot = &mut st.slots[idx];
            debug_assert_eq!(slot.generation, (ud >> 32) as u32);
            match &mut slot.phase {
                Phase::Done(r) => {
                    let r = *r;
                    slot.phase = Phase::Free;
                    let res = std::mem::replace(&mut slot.res, Res::None);
                    st.free.push(idx as u32);
                    st.in_flight -= 1;
                    Poll::Ready((r, res))
                }
                Phase::DoneHeld(r) => {
                    // The result goes out now; the buffers stay until the notification.
                    let r = *r;
                    slot.phase = Phase::Held;
                    Poll::Ready((r, Res::None))
                }
                Phase::Pending(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Phase::Free | Phase::Orphan | Phase::Held | Phase::Multi(_) => {
                    Poll::Ready((-libc::ECANCELED, Res::None))
                }
            }
        };
        for w in wake {
            w.wake();
        }
        if queued {
            let _ = self.uring.submitter().submit();
        }
        out
    }

    /// Gives up on operation `ud`: cancels it in the kernel (when `cancel`) and frees its
    /// buffers once it comes back.
    fn orphan(&self, ud: u64, cancel: bool) {
        let mut st = self.lock();
        let idx = (ud & 0xffff_ffff) as usize;
        let Some(slot) = st.slots.get_mut(idx) else {
            return;
        };
        if slot.generation != (ud >> 32) as u32 {
            return;
        }
        match slot.phase {
            Phase::Done(_) => {
                slot.phase = Phase::Free;
                slot.res = Res::None;
                st.free.push(idx as u32);
                st.in_flight -= 1;
            }
            Phase::Pending(_) => {
                slot.phase = Phase::Orphan;
                if cancel {
                    let entry = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
                    if self.push(&entry).is_ok() {
                        drop(st);
                        let _ = self.uring.submitter().submit();
                    }
                }
            }
            Phase::DoneHeld(_) | Phase::Held => slot.phase = Phase::Orphan,
            Phase::Multi(_) => {
                let Phase::Multi(m) = std::mem::replace(&mut slot.phase, Phase::Orphan) else {
                    return;
                };
                // Its unread buffers go back now.
                if let Some(pool) = st.pool.as_mut() {
                    for &(_, flags) in &m.queue {
                        if let Some(b) = io_uring::cqueue::buffer_select(flags) {
                            pool.put(b);
                        }
                    }
                    pool.publish();
                }
                if m.ended {
                    let slot = &mut st.slots[idx];
                    slot.phase = Phase::Free;
                    slot.res = Res::None;
                    st.free.push(idx as u32);
                    st.in_flight -= 1;
                } else if !m.stopping {
                    let entry = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
                    if self.push(&entry).is_ok() {
                        drop(st);
                        let _ = self.uring.submitter().submit();
                    }
                }
            }
            Phase::Free | Phase::Orphan => {}
        }
    }

    /// Arms a multishot receive on `fd` into provided buffers. `None` when there are none to
    /// use: the kernel has no buffer ring, or every buffer is taken (`starved`: the last one
    /// ended for lack of buffers) and the pool is at its size limit.
    fn arm_multi(&self, fd: RawFd, starved: bool) -> io::Result<Option<u64>> {
        let entry;
        let ud;
        {
            let mut st = self.lock();
            if st.multi_refused {
                return Ok(None);
            }
            let Some(pool) = st.pool.as_mut() else {
                return Ok(None);
            };
            if (pool.count() == 0 || starved) && !pool.grow() {
                return Ok(None);
            }
            let idx = match st.free.pop() {
                Some(i) => i as usize,
                None => {
                    st.slots.push(Slot {
                        generation: 0,
                        phase: Phase::Free,
                        res: Res::None,
                    });
                    st.slots.len() - 1
                }
            };
            let slot = &mut st.slots[idx];
            slot.generation = slot.generation.wrapping_add(1);
            slot.phase = Phase::Multi(Box::new(Multi {
                queue: VecDeque::new(),
                waker: None,
                ended: false,
                stopping: false,
            }));
            slot.res = Res::None;
            ud = (u64::from(slot.generation) << 32) | idx as u64;
            entry = opcode::RecvMulti::new(types::Fd(fd), PBUF_GROUP)
                .build()
                .user_data(ud);
            st.in_flight += 1;
            if let Err(e) = self.push(&entry) {
                let slot = &mut st.slots[idx];
                slot.phase = Phase::Free;
                st.free.push(idx as u32);
                st.in_flight -= 1;
                return Err(e);
            }
            if st.batching {
                return Ok(Some(ud));
            }
        }
        match self.uring.submitter().submit() {
            Ok(_) => Ok(Some(ud)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                Ok(Some(ud))
            }
            Err(e) => {
                self.orphan(ud, true);
                Err(e)
            }
        }
    }

    /// Takes the completions of multishot receive `ud` into `out` as (result, buffer address
    /// or 0, buffer id); registers `cx`'s waker when there are none. Returns whether the
    /// receive has ended (its last completion is among those taken, or was taken before).
    fn take_multi(
        &self,
        ud: u64,
        cx: &mut Context<'_>,
        out: &mut Vec<(i32, usize, Option<u16>)>,
    ) -> bool {
        let mut wake = Vec::new();
        let mut st = self.lock();
        // Completions already posted are handed out now, without waiting for the reaper.
        let queued = self.reap_locked(&mut st, &mut wake);
        let ended = self.take_multi_locked(&mut st, ud, cx, out);
        drop(st);
        for w in wake {
            w.wake();
        }
        if queued {
            let _ = self.uring.submitter().submit();
        }
        ended
    }

    fn take_multi_locked(
        &self,
        st: &mut State,
        ud: u64,
        cx: &mut Context<'_>,
        out: &mut Vec<(i32, usize, Option<u16>)>,
    ) -> bool {
        let idx = (ud & 0xffff_ffff) as usize;
        let Some(Slot {
            phase: Phase::Multi(m),
            ..
        }) = st.slots.get_mut(idx)
        else {
            return true;
        };
        for (res, flags) in m.queue.drain(..) {
            let bid = io_uring::cqueue::buffer_select(flags);
            let addr = bid
                .and_then(|b| st.pool.as_ref().and_then(|p| p.addr(b)))
                .map_or(0, |a| a as usize);
            out.push((res, addr, bid));
        }
        if out.is_empty() && !m.ended && !m.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            m.waker = Some(cx.waker().clone());
        }
        m.ended
    }

    /// Stops multishot receive `ud` (its remaining completions still arrive, then the last).
    fn stop_multi(&self, ud: u64) {
        let queued = {
            let mut st = self.lock();
            let idx = (ud & 0xffff_ffff) as usize;
            match st.slots.get_mut(idx) {
                Some(Slot {
                    phase: Phase::Multi(m),
                    generation,
                    ..
                }) if *generation == (ud >> 32) as u32 && !m.stopping && !m.ended => {
                    m.stopping = true;
                    let cancel = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
                    self.push(&cancel).is_ok()
                }
                _ => false,
            }
        };
        if queued {
            let _ = self.uring.submitter().submit();
        }
    }

    /// Frees the slot of multishot receive `ud` once it ended and everything was taken.
    fn finish_multi(&self, ud: u64) {
        let mut st = self.lock();
        let idx = (ud & 0xffff_ffff) as usize;
        if let Some(slot) = st.slots.get_mut(idx) {
            if slot.generation == (ud >> 32) as u32
                && matches!(&slot.phase, Phase::Multi(m) if m.ended && m.queue.is_empty())
            {
                slot.phase = Phase::Free;
                st.free.push(idx as u32);
                st.in_flight -= 1;
            }
        }
    }

    /// Gives provided buffers back to the kernel.
    fn recycle(&self, bids: impl Iterator<Item = u16>) {
        let mut st = self.lock();
        if let Some(pool) = st.pool.as_mut() {
            for b in bids {
                pool.put(b);
            }
            pool.publish();
        }
    }

    /// Stops arming multishot receives on this ring (the kernel refused one: Linux before
    /// 6.0 has buffer rings but no multishot receive). The pool's memory stays until the ring
    /// goes, as the kernel may hold some of its buffers.
    fn refuse_multi(&self) {
        self.lock().multi_refused = true;
    }
}

impl Drop for RingInner {
    fn drop(&mut self) {
        // Only reached with nothing in flight (the reaper holds the ring until then), except
        // when the runtime is torn down under it: then the buffers the kernel may still write
        // are leaked, never freed under it.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.in_flight > 0 {
            // Receives in flight may still write into provided buffers.
            if let Some(pool) = st.pool.take() {
                std::mem::forget(pool);
            }
            for slot in st.slots.drain(..) {
                if !matches!(slot.phase, Phase::Free | Phase::Done(_)) {
                    std::mem::forget(slot.res);
                }
            }
        }
    }
}

impl Ring {
    /// A new ring with its reaper task on the current tokio runtime, and up to
    /// [`DEFAULT_PROVIDED_BUFFERS`] provided receive buffers ([`Ring::with_provided_buffers`]
    /// with 0 gives a ring whose receives all go direct).
    pub fn new() -> Result<Ring> {
        Ring::with_provided_buffers(DEFAULT_PROVIDED_BUFFERS)
    }

    /// A new ring whose receives use up to `max` provided buffers of 16 KiB (rounded up to a
    /// multiple of 16, at most 1024; they are allocated as receives need them). With 0, every
    /// receive goes straight into the connection's read buffer.
    pub fn with_provided_buffers(max: usize) -> Result<Ring> {
        // Cooperative task running (Linux 5.19): the kernel does not interrupt a running
        // thread with an IPI to complete a receive it armed; the work runs at that thread's
        // next system call (sleeping threads are still woken at once). Older kernels refuse
        // the flag, and get a plain ring.
        let uring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_coop_taskrun()
            .build(SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })
            .map_err(|e| unavailable(format!("io_uring_setup: {e}")))?;
        let efd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::Io(io::Error::other(format!("eventfd: {e}"))))?;
        uring
            .submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| unavailable(format!("io_uring eventfd registration: {e}")))?;
        let efd2 = efd.try_clone().map_err(Error::Io)?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which keeps it open (and the same
        // descriptor) until it is dropped.
        let async_efd =
            unsafe { AsyncFd::register_with_interest(efd2, tokio::io::Interest::READABLE) }
                .map_err(|e| Error::Io(io::Error::other(format!("eventfd registration: {e}"))))?;
        let mut probe = io_uring::Probe::new();
        let zc_supported = uring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE);
        let pool = Pool::register(&uring, max.min(usize::from(PBUF_ENTRIES)));
        let inner = Arc::new(RingInner {
            uring,
            state: Mutex::new(State {
                pool,
                ..State::default()
            }),
            efd,
            handles: AtomicUsize::new(1),
            zc_supported,
            zc_mode: std::sync::atomic::AtomicU8::new(0),
            zc_sends: std::sync::atomic::AtomicU64::new(0),
            pbuf_bytes: std::sync::atomic::AtomicU64::new(0),
            direct_bytes: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(reaper(inner.clone(), async_efd));
        Ok(Ring { inner })
    }

    /// Operations the kernel has not given back yet.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Sets when the sends of streams handed to this ring from now on go zero-copy.
    pub fn set_zero_copy(&self, mode: ZeroCopy) {
        let v = match mode {
            ZeroCopy::Remote => 0,
            ZeroCopy::Always => 1,
            ZeroCopy::Never => 2,
        };
        self.inner.zc_mode.store(v, Ordering::Relaxed);
    }

    /// Whether this kernel has zero-copy sends (`IORING_OP_SENDMSG_ZC`).
    pub fn zero_copy_supported(&self) -> bool {
        self.inner.zc_supported
    }

    /// Bytes received so far through provided buffers (multishot receives), and straight
    /// into read buffers (direct receives).
    pub fn received_bytes(&self) -> (u64, u64) {
        (
            self.inner.pbuf_bytes.load(Ordering::Relaxed),
            self.inner.direct_bytes.load(Ordering::Relaxed),
        )
    }

    /// How many provided receive buffers this ring has (0 where it has none: the kernel
    /// cannot register buffer rings, or it was made with `with_provided_buffers(0)`), and
    /// their size.
    pub fn provided_buffers(&self) -> (usize, usize) {
        let st = self.inner.lock();
        match &st.pool {
            Some(p) if !st.multi_refused => (p.count(), PBUF_SIZE),
            _ => (0, PBUF_SIZE),
        }
    }

    /// How many sends went zero-copy so far.
    pub fn zero_copy_sends(&self) -> u64 {
        self.inner.zc_sends.load(Ordering::Relaxed)
    }

    fn zero_copy(&self) -> ZeroCopy {
        match self.inner.zc_mode.load(Ordering::Relaxed) {
            1 => ZeroCopy::Always,
            2 => ZeroCopy::Never,
            _ => ZeroCopy::Remote,
        }
    }
}

/// Waits for completions and hands them out, until the ring is unused and idle.
async fn reaper(inner: Arc<RingInner>, efd: AsyncFd<OwnedFd>) {
    loop {
        let r = efd.readable().await;
        let mut guard = match r {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("io_uring reaper: eventfd: {e}");
                return;
            }
        };
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(efd.get_ref(), &mut counter);
        guard.clear_ready();
        let woken = inner.reap();
        if woken >= 2 {
            // Several connections have work: let the tasks just woken run first (a yield
            // resumes after the runnable tasks and a reactor poll), queueing their next
            // operations, then submit them in one enter.
            inner.lock().batching = true;
            tokio::task::yield_now().await;
            let queued = {
                let mut st = inner.lock();
                st.batching = false;
                // SAFETY: the submission queue is only touched with the state lock held.
                !unsafe { inner.uring.submission_shared() }.is_empty()
            };
            if queued {
                let _ = inner.uring.submitter().submit();
                inner.reap();
            }
        }
        if inner.handles.load(Ordering::Acquire) == 0 && inner.lock().in_flight == 0 {
            return;
        }
    }
}

/// A connected socket driven by a [`Ring`].
#[derive(Debug)]
pub struct UringStream {
    read: UringRead,
    write: UringWrite,
}

#[derive(Debug)]
struct Sock {
    fd: OwnedFd,
    ring: Ring,
    unix: bool,
    /// Sends of at least [`ZC_MIN`] bytes go zero-copy.
    zero_copy: bool,
}

/// Whether the TCP peer of `fd` is on another host: not loopback, not our own address.
fn remote_peer(fd: &OwnedFd) -> bool {
    let addr = |a: Option<rustix::net::SocketAddrAny>| {
        a.and_then(|a| std::net::SocketAddr::try_from(a).ok())
            .map(|a| a.ip())
    };
    let peer = addr(rustix::net::getpeername(fd).ok().flatten());
    let local = addr(rustix::net::getsockname(fd).ok());
    match (peer, local) {
        (Some(p), Some(l)) => !p.is_loopback() && p != l,
        _ => false,
    }
}

impl UringStream {
    /// Takes over a connected TCP or Unix stream (blocking mode: the ring, not the socket,
    /// decides when to wait).
    pub(crate) fn new(fd: OwnedFd, unix: bool, ring: Ring) -> io::Result<UringStream> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags - rustix::fs::OFlags::NONBLOCK)?;
        let zero_copy = ring.inner.zc_supported
            && match ring.zero_copy() {
                ZeroCopy::Always => true,
                ZeroCopy::Never => false,
                ZeroCopy::Remote => !unix && remote_peer(&fd),
            };
        let sock = Arc::new(Sock {
            fd,
            ring,
            unix,
            zero_copy,
        });
        Ok(UringStream {
            read: UringRead {
                sock: sock.clone(),
                pending: None,
                multi: None,
                stopping: false,
                multi_bufs: 0,
                starved: false,
                deferred: None,
                taken: Vec::new(),
                leftover: BytesMut::new(),
            },
            write: UringWrite {
                sock,
                pending: None,
                shut: false,
            },
        })
    }

    /// Whether this is a Unix-domain socket (descriptors can be passed).
    pub fn is_unix(&self) -> bool {
        self.read.sock.unix
    }

    /// Splits into halves that can be used at once from one task.
    pub fn into_split(self) -> (UringRead, UringWrite) {
        (self.read, self.write)
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.sock.fd.as_fd()
    }
}

/// The read half of a [`UringStream`].
#[derive(Debug)]
pub struct UringRead {
    sock: Arc<Sock>,
    /// A direct receive in flight (its buffer is with the kernel).
    pending: Option<u64>,
    /// The armed multishot receive into provided buffers.
    multi: Option<u64>,
    /// A stop of `multi` was asked for (a large read comes next).
    stopping: bool,
    /// Buffers of bytes taken from `multi` since it was armed.
    multi_bufs: usize,
    /// The last multishot receive ended because every provided buffer was taken.
    starved: bool,
    /// An end of stream (0) or error (-errno) that came after bytes already returned.
    deferred: Option<i32>,
    /// Scratch list of taken multishot completions: (result, buffer address, buffer id).
    taken: Vec<(i32, usize, Option<u16>)>,
    /// Bytes received for the `AsyncRead` path but not yet read out.
    leftover: BytesMut,
}

/// The write half of a [`UringStream`]. Dropping it (or shutting it down) sends end-of-stream.
#[derive(Debug)]
pub struct UringWrite {
    sock: Arc<Sock>,
    pending: Option<u64>,
    shut: bool,
}

impl UringRead {
    /// Receives bytes and appends them to `buf`; returns how many (0 at end of stream).
    ///
    /// `want` is how many bytes the caller still needs for what it is reading (the frame in
    /// progress; 0 when it does not know):
    /// - below [`DIRECT_MIN`], bytes come through the ring's provided buffers: one multishot
    ///   receive stays armed per connection, each completion fills a pooled buffer, and its
    ///   bytes are copied into `buf` (a small copy; an idle connection lends the kernel no
    ///   buffer, and no receive is re-submitted per message);
    /// - from [`DIRECT_MIN`] up, and whenever descriptors may come (`fds`), the receive goes
    ///   straight into the spare capacity of `buf` without copying (reserving 64 KiB
    ///   when it has none). With `fds`, descriptors passed with the bytes (`SCM_RIGHTS`,
    ///   close-on-exec) are appended to it.
    ///
    /// Where the kernel has no buffer rings (before Linux 6.0), or on a ring made with
    /// `with_provided_buffers(0)`, every receive is direct.
    ///
    /// Cancel-safe: while a direct receive is in flight the kernel owns the buffer and `buf`
    /// is left empty; if this future is dropped, the next call waits for the same receive and
    /// puts the buffer back into its (empty) `buf`. Bytes of provided buffers are only taken
    /// by a call that returns them.
    pub async fn read_owned(
        &mut self,
        buf: &mut BytesMut,
        mut fds: Option<&mut Vec<OwnedFd>>,
        want: usize,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_owned(cx, buf, fds.as_deref_mut(), want)).await
    }

    /// Whether a receive is in flight (its buffer is with the kernel).
    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether this is a Unix-domain socket (descriptors can be passed).
    pub fn is_unix(&self) -> bool {
        self.sock.unix
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd.as_fd()
    }

    /// Receives into `scratch` (a copy), with descriptors appended to `fds`. The session
    /// driver uses [`UringRead::read_owned`] instead, which copies nothing. Cancel-safe.
    pub async fn read_copy_with_fds(
        &mut self,
        scratch: &mut [u8],
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<usize> {
        if self.leftover.is_empty() {
            let mut b = std::mem::take(&mut self.leftover);
            b.clear();
            let pass = if self.sock.unix {
                Some(&mut *fds)
            } else {
                None
            };
            let mut pass = pass;
            std::future::poll_fn(|cx| self.poll_read_owned(cx, &mut b, pass.as_deref_mut(), 0))
                .await?;
            self.leftover = b;
        }
        let n = self.leftover.len().min(scratch.len());
        scratch[..n].copy_from_slice(&self.leftover.split_to(n));
        Ok(n)
    }

    /// Reads through the armed multishot receive (arming one when needed); `None` when this
    /// read should be a direct receive instead.
    fn poll_multi(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        let ring = &self.sock.ring.inner;
        loop {
            let Some(ud) = self.multi else {
                if let Some(status) = self.deferred.take() {
                    return Some(Poll::Ready(status_result(status)));
                }
                if want >= DIRECT_MIN {
                    return None;
                }
                match ring.arm_multi(self.sock.fd.as_raw_fd(), self.starved) {
                    Ok(Some(ud)) => {
                        self.multi = Some(ud);
                        self.multi_bufs = 0;
                        self.starved = false;
                        continue;
                    }
                    Ok(None) => return None,
                    Err(e) => return Some(Poll::Ready(Err(e))),
                }
            };
            if want >= DIRECT_MIN && !self.stopping {
                // The rest of a large frame goes straight into `buf` once this receive ends
                // (what it already holds is read out first, in order).
                self.stopping = true;
                ring.stop_multi(ud);
            }
            let mut taken = std::mem::take(&mut self.taken);
            let ended = ring.take_multi(ud, cx, &mut taken);
            let mut n = 0usize;
            let mut status = None;
            let mut refused = false;
            for &(res, addr, _) in &taken {
                match res {
                    r if r > 0 && addr != 0 && status.is_none() => {
                        let len = (r as usize).min(PBUF_SIZE);
                        // SAFETY: the kernel wrote `len` bytes into this provided buffer and
                        // gave it to us with this completion; it is not handed back (so not
                        // written again) until the recycle below, and the pool's memory lives
                        // as long as the ring, which `self.sock` keeps.
                        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                        buf.extend_from_slice(data);
                        n += len;
                        self.multi_bufs += 1;
                    }
                    // Bytes without a buffer, or after the end: never posted by a kernel that
                    // keeps its documented order; refused rather than dropped in silence.
                    r if r > 0 => {
                        status.get_or_insert(-libc::EIO);
                    }
                    0 => {
                        status.get_or_insert(0);
                    }
                    // Out of buffers: the pool may grow for the next receive, unless this
                    // connection itself took them (a flood; the reader gave them back by now).
                    r if r == -libc::ENOBUFS => self.starved = self.multi_bufs < QUEUE_CAP,
                    // Our own stop (the reader fell behind, or a direct read comes next).
                    r if r == -libc::ECANCELED => {}
                    // Buffer rings without multishot receives (Linux 5.19).
                    r if r == -libc::EINVAL && n == 0 => refused = true,
                    r if r < 0 => {
                        status.get_or_insert(r);
                    }
                    _ => {}
                }
            }
            let took = !taken.is_empty();
            ring.recycle(taken.iter().filter_map(|t| t.2));
            taken.clear();
            self.taken = taken;
            if ended {
                ring.finish_multi(ud);
                self.multi = None;
                self.stopping = false;
            }
            if refused {
                ring.refuse_multi();
                return None;
            }
            if n > 0 {
                ring.pbuf_bytes.fetch_add(n as u64, Ordering::Relaxed);
                self.deferred = status;
                return Some(Poll::Ready(Ok(n)));
            }
            if let Some(status) = status {
                return Some(Poll::Ready(status_result(status)));
            }
            if self.multi.is_none() || took {
                // Ended (re-arm or go direct), or only non-data completions were taken: look
                // again (the waker is registered by a take that finds nothing).
                continue;
            }
            return Some(Poll::Pending);
        }
    }

    fn poll_read_owned(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        fds: Option<&mut Vec<OwnedFd>>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_none() && (fds.is_none() || self.multi.is_some()) {
            if let Some(done) = self.poll_multi(cx, buf, want) {
                return done;
            }
        }
        let ring = &self.sock.ring.inner;
        let ud = match self.pending {
            Some(ud) => ud,
            None => {
                let mut b = std::mem::take(buf);
                if b.capacity() - b.len() < READ_CHUNK / 4 {
                    b.reserve(READ_CHUNK);
                }
                let ud = if fds.is_some() {
                    submit_recvmsg(ring, self.sock.fd.as_raw_fd(), b)
                } else {
                    submit_recv(ring, self.sock.fd.as_raw_fd(), b)
                };
                match ud {
                    Ok(ud) => ud,
                    Err((e, b)) => {
                        *buf = b;
                        return Poll::Ready(Err(e));
                    }
                }
            }
        };
        self.pending = Some(ud);
        let (r, res) = match ring.poll_op(ud, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(x) => x,
        };
        self.pending = None;
        debug_assert!(buf.is_empty(), "the read buffer is with the kernel");
        let (mut b, start, msg) = match res {
            Res::Recv { buf, start } => (buf, start, None),
            Res::RecvMsg { buf, start, msg } => (buf, start, Some(msg)),
            _ => return Poll::Ready(Err(io::Error::other("io_uring receive lost"))),
        };
        if r < 0 {
            *buf = b;
            return Poll::Ready(Err(io::Error::from_raw_os_error(-r)));
        }
        let n = r as usize;
        debug_assert!(start + n <= b.capacity());
        // SAFETY: the kernel wrote `n` bytes into the spare capacity that began at `start`.
        unsafe { b.set_len(start + n) };
        *buf = b;
        ring.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
        // Provided buffers may be free again by the next read.
        self.starved = false;
        if let Some(msg) = msg {
            let got = take_fds(&msg);
            match fds {
                Some(out) => out.extend(got),
                None => drop(got),
            }
        }
        Poll::Ready(Ok(n))
    }
}

/// A multishot receive's end of stream (0) or error (-errno) as a read result.
fn status_result(status: i32) -> io::Result<usize> {
    if status == 0 {
        Ok(0)
    } else {
        Err(io::Error::from_raw_os_error(-status))
    }
}

fn submit_recv(
    ring: &RingInner,
    fd: RawFd,
    mut buf: BytesMut,
) -> std::result::Result<u64, (io::Error, BytesMut)> {
    let start = buf.len();
    let spare = buf.spare_capacity_mut();
    let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
    // The buffer's heap storage does not move when the `BytesMut` moves into its slot.
    let entry = opcode::Recv::new(types::Fd(fd), spare.as_mut_ptr().cast::<u8>(), len).build();
    ring.submit(Res::Recv { buf, start }, entry, false)
        .map_err(|e| (e, BytesMut::new()))
}

fn submit_recvmsg(
    ring: &RingInner,
    fd: RawFd,
    mut buf: BytesMut,
) -> std::result::Result<u64, (io::Error, BytesMut)> {
    let start = buf.len();
    let words = cmsg_space(MAX_FDS_PER_READ * 4).div_ceil(8);
    let mut msg = Box::new(Msg {
        // SAFETY: an all-zero msghdr is a valid empty one.
        hdr: unsafe { std::mem::zeroed() },
        iov: Vec::with_capacity(1),
        control: vec![0u64; words],
    });
    let spare = buf.spare_capacity_mut();
    msg.iov.push(libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    });
    msg.hdr.msg_iov = msg.iov.as_mut_ptr();
    msg.hdr.msg_iovlen = 1;
    msg.hdr.msg_control = msg.control.as_mut_ptr().cast();
    msg.hdr.msg_controllen = words * 8;
    let hdr: *mut libc::msghdr = &mut msg.hdr;
    let entry = opcode::RecvMsg::new(types::Fd(fd), hdr)
        .flags(libc::MSG_CMSG_CLOEXEC as u32)
        .build();
    ring.submit(Res::RecvMsg { buf, start, msg }, entry, false)
        .map_err(|e| (e, BytesMut::new()))
}

/// `CMSG_SPACE(len)` on Linux: header and data, each rounded up to 8 bytes.
fn cmsg_space(len: usize) -> usize {
    CMSG_HDR + len.div_ceil(8) * 8
}

/// `sizeof(struct cmsghdr)` on 64-bit Linux.
const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();

/// The descriptors of the `SCM_RIGHTS` messages in a completed `recvmsg`.
fn take_fds(msg: &Msg) -> Vec<OwnedFd> {
    let len = msg.hdr.msg_controllen.min(msg.control.len() * 8);
    if len == 0 {
        // Most receives carry no descriptors: nothing to parse, nothing to allocate.
        return Vec::new();
    }
    let bytes: Vec<u8> = msg.control.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let bytes = &bytes[..len];
    let mut out = Vec::new();
    let mut off = 0;
    while off + CMSG_HDR <= bytes.len() {
        let word = |at: usize| usize::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let int = |at: usize| i32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let clen = word(off);
        if clen < CMSG_HDR || off + clen > bytes.len() {
            break;
        }
        let (level, kind) = (int(off + 8), int(off + 12));
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            let mut at = off + CMSG_HDR;
            while at + 4 <= off + clen {
                let raw = int(at);
                if raw >= 0 {
                    // SAFETY: the kernel just installed this descriptor in our table for us;
                    // nothing else owns it.
                    out.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
                at += 4;
            }
        }
        off += clen.div_ceil(8) * 8;
    }
    out
}

impl UringWrite {
    /// Sends `bufs` (up to 64 of them, in one `sendmsg`), with `fds` attached to the first
    /// byte when there are any. Returns the bytes sent; the buffers are cloned (`Bytes`
    /// reference counts), never copied.
    ///
    /// Cancel-safe in the driver's sense: if this future is dropped, the send stays in flight
    /// and the next call returns its result instead of sending what it is given, so callers
    /// must pass the same leading bytes again (the session's write queue does: it only
    /// advances on a result).
    pub async fn send_owned(
        &mut self,
        bufs: &[Bytes],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_send_owned(cx, bufs, fds)).await
    }

    fn poll_send_owned(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[Bytes],
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        let ring = &self.sock.ring.inner;
        let ud = match self.pending {
            Some(ud) => ud,
            None => {
                let ud = submit_send(
                    ring,
                    self.sock.fd.as_raw_fd(),
                    bufs,
                    fds,
                    self.sock.zero_copy,
                )?;
                self.pending = Some(ud);
                ud
            }
        };
        let (r, _res) = match ring.poll_op(ud, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(x) => x,
        };
        self.pending = None;
        if r < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-r)));
        }
        Poll::Ready(Ok(r as usize))
    }

    /// Whether this is a Unix-domain socket (descriptors can be passed).
    pub fn is_unix(&self) -> bool {
        self.sock.unix
    }

    fn shutdown_now(&mut self) -> io::Result<()> {
        if self.shut {
            return Ok(());
        }
        self.shut = true;
        match rustix::net::shutdown(&self.sock.fd, rustix::net::Shutdown::Write) {
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn submit_send(
    ring: &RingInner,
    fd: RawFd,
    bufs: &[Bytes],
    fds: &[BorrowedFd<'_>],
    zero_copy: bool,
) -> io::Result<u64> {
    let owned: Vec<Bytes> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .take(MAX_IOVECS)
        .cloned()
        .collect();
    let dup: Vec<OwnedFd> = fds
        .iter()
        .map(|f| f.try_clone_to_owned())
        .collect::<io::Result<_>>()?;
    let words = if dup.is_empty() {
        0
    } else {
        cmsg_space(dup.len() * 4).div_ceil(8)
    };
    let mut msg = Box::new(Msg {
        // SAFETY: an all-zero msghdr is a valid empty one.
        hdr: unsafe { std::mem::zeroed() },
        iov: owned
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect(),
        control: vec![0u64; words],
    });
    msg.hdr.msg_iov = msg.iov.as_mut_ptr();
    msg.hdr.msg_iovlen = msg.iov.len();
    if !dup.is_empty() {
        let clen = CMSG_HDR + dup.len() * 4;
        let mut bytes = vec![0u8; words * 8];
        bytes[..8].copy_from_slice(&clen.to_ne_bytes());
        bytes[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        bytes[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        for (i, f) in dup.iter().enumerate() {
            let at = CMSG_HDR + i * 4;
            bytes[at..at + 4].copy_from_slice(&f.as_raw_fd().to_ne_bytes());
        }
        for (w, chunk) in msg.control.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
        }
        msg.hdr.msg_control = msg.control.as_mut_ptr().cast();
        msg.hdr.msg_controllen = words * 8;
    }
    let hdr: *const libc::msghdr = &msg.hdr;
    let total: usize = owned.iter().map(|b| b.len()).sum();
    let flags = (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32;
    let entry = if zero_copy && total >= ZC_MIN && dup.is_empty() {
        ring.zc_sends.fetch_add(1, Ordering::Relaxed);
        opcode::SendMsgZc::new(types::Fd(fd), hdr)
            .flags(flags)
            .build()
    } else {
        opcode::SendMsg::new(types::Fd(fd), hdr)
            .flags(flags)
            .build()
    };
    ring.submit(
        Res::Send {
            _bufs: owned,
            _msg: msg,
            _fds: dup,
        },
        entry,
        total <= MUTE_MAX,
    )
}

impl Drop for UringRead {
    fn drop(&mut self) {
        if let Some(ud) = self.pending.take() {
            self.sock.ring.inner.orphan(ud, true);
        }
        if let Some(ud) = self.multi.take() {
            self.sock.ring.inner.orphan(ud, true);
        }
    }
}

impl Drop for UringWrite {
    fn drop(&mut self) {
        if let Some(ud) = self.pending.take() {
            self.sock.ring.inner.orphan(ud, true);
        }
        let _ = self.shutdown_now();
    }
}

impl AsyncRead for UringRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.leftover.is_empty() {
            let mut b = std::mem::take(&mut this.leftover);
            b.clear();
            match this.poll_read_owned(cx, &mut b, None, 0) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(_)) => this.leftover = b,
            }
        }
        let n = this.leftover.len().min(out.remaining());
        out.put_slice(&this.leftover.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for UringWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A copy: this path serves small control exchanges, not the session's frames. While
        // a send is in flight its result is collected; `buf` is not copied again.
        let this = self.get_mut();
        if this.pending.is_some() {
            return this.poll_send_owned(cx, &[], &[]);
        }
        let chunk = Bytes::copy_from_slice(&buf[..buf.len().min(COPY_WRITE_MAX)]);
        this.poll_send_owned(cx, &[chunk], &[])
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every send completes only once the kernel took its bytes.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(ud) = this.pending {
            // Let the last send finish first.
            match this.sock.ring.inner.poll_op(ud, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => this.pending = None,
            }
        }
        Poll::Ready(this.shutdown_now())
    }
}

impl AsyncRead for UringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, out)
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}
