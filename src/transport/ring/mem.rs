//! The ring memory: one sealed memfd holding two single-producer single-consumer byte rings,
//! one per direction (SPEC §9; `docs/ring.md` is the full description).
//!
//! # Layout
//!
//! All integers little endian (the rings never leave the host).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"XCPRING\0"` ([`MAGIC`]) |
//! | 8 | 4 | layout version, u32 = 1 ([`LAYOUT_VERSION`]) |
//! | 12 | 4 | header length, u32 = 4096 ([`HEADER_LEN`]) |
//! | 16 | 8 | capacity of each ring in bytes, u64 (a power of two) |
//! | 24 | 8 | total length, u64 = 4096 + 2 × capacity |
//! | 1024 + r·1024 + 0 | 8 | ring r: `tail`, bytes ever published by its producer |
//! | 1024 + r·1024 + 128 | 8 | ring r: `head`, bytes ever consumed by its consumer |
//! | 1024 + r·1024 + 256 | 4 | ring r: `consumer_sleeping` (1: asleep, waiting for data) |
//! | 1024 + r·1024 + 384 | 4 | ring r: `producer_sleeping` (1: asleep, waiting for room) |
//! | 4096 + r·capacity | capacity | ring r's data: stream byte p at `p & (capacity - 1)` |
//!
//! Ring 0 carries the responder's bytes to the initiator, ring 1 the initiator's to the
//! responder. Each control field has its own 128-byte line (no false sharing, and none
//! through the adjacent-line prefetcher either).
//!
//! # Wake-up protocol
//!
//! A consumer about to sleep on an empty ring stores `consumer_sleeping = 1`, then loads
//! `tail` again ([`Consumer::arm_sleep`]); a producer, after publishing `tail`, fences and
//! looks at `consumer_sleeping`, swapping it to 0 when it is 1 ([`Producer::must_wake`]).
//! Both store their own word and then load the other's, sequentially consistent, so at
//! least one sees the other: the consumer sees the data, or the producer sees the flag (and
//! only one swap takes the 1: one wake per sleep). The same holds the other way round for a
//! producer sleeping on a full ring. `model.rs` checks every interleaving of it.
//!
//! # A hostile peer
//!
//! The peer can write any byte of the memory at any time. Each side keeps its own index
//! privately and validates the peer's every time it loads it (`tail - head <= capacity`, in
//! wrapping arithmetic, against our private copy); every access is masked into the mapping;
//! data bytes are only ever copied out, never parsed in place. The memfd is sealed against
//! shrinking and growing, so the mapping cannot fault.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;
use std::ptr;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::SealFlags;

use crate::attach::segment::{Segment, MEMFD_SEALS};

/// The first 8 bytes of the ring memory.
pub const MAGIC: [u8; 8] = *b"XCPRING\0";
/// The layout this code reads and writes.
pub const LAYOUT_VERSION: u32 = 1;
/// The header page: identification and both rings' control blocks.
pub const HEADER_LEN: usize = 4096;
/// The default capacity of each ring (4 MiB).
pub const DEFAULT_CAPACITY: usize = 4 << 20;
/// The smallest capacity of a ring.
pub const MIN_CAPACITY: usize = 4096;
/// The largest capacity of a ring (1 GiB).
pub const MAX_CAPACITY: usize = 1 << 30;

/// Offsets in the header page.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_CAPACITY: usize = 16;
const OFF_TOTAL: usize = 24;
/// The bytes of the identification part that `open` reads.
const IDENT_LEN: usize = 32;
/// Ring r's control block starts at `CONTROL + r * CONTROL_STRIDE`.
const CONTROL: usize = 1024;
const CONTROL_STRIDE: usize = 1024;
/// A control field's line.
const LINE: usize = 128;
const FIELD_TAIL: usize = 0;
const FIELD_HEAD: usize = LINE;
const FIELD_CONSUMER_SLEEPING: usize = 2 * LINE;
const FIELD_PRODUCER_SLEEPING: usize = 3 * LINE;

const _: () = assert!(CONTROL + 2 * CONTROL_STRIDE <= HEADER_LEN);
const _: () = assert!(FIELD_PRODUCER_SLEEPING + LINE <= CONTROL_STRIDE);

/// Which end of the connection: the responder created the memory, produces into ring 0 and
/// consumes ring 1; the initiator the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The side that accepted the connection and created the memory.
    Responder,
    /// The side that connected and opened the memory it was passed.
    Initiator,
}

impl End {
    /// The ring this end produces into.
    fn produces(self) -> usize {
        match self {
            End::Responder => 0,
            End::Initiator => 1,
        }
    }

    /// The ring this end consumes.
    fn consumes(self) -> usize {
        1 - self.produces()
    }
}

/// What keeps the mapping alive.
enum Backing {
    /// Ours: the segment owns the memfd and its read-write mapping.
    Created(Segment),
    /// The peer's, mapped read-write shared.
    Opened(MmapRaw),
}

/// The mapped memory (Send + Sync; shared by `Arc` between a [`Producer`] and a
/// [`Consumer`]). Unmaps on drop.
pub struct RingMemory {
    backing: Backing,
    /// Checked once (at `create` or `open`) and kept here: the copy in the header is the
    /// peer's to overwrite.
    capacity: usize,
}

impl std::fmt::Debug for RingMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingMemory")
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn errno(what: &str, e: rustix::io::Errno) -> io::Error {
    let os = io::Error::from_raw_os_error(e.raw_os_error());
    io::Error::new(os.kind(), format!("ring memory: {what}: {e}"))
}

/// 4096 + 2 × capacity; `None` where it does not fit a `usize`.
fn total_len(capacity: usize) -> Option<usize> {
    capacity.checked_mul(2)?.checked_add(HEADER_LEN)
}

impl RingMemory {
    /// Responder: a new sealed memfd holding both rings of `capacity` bytes each (a power of
    /// two in [`MIN_CAPACITY`, `MAX_CAPACITY`], else `InvalidInput`), header written,
    /// indices zero. Returns the memory and the descriptor to pass to the peer.
    pub fn create(capacity: usize) -> io::Result<(Arc<RingMemory>, OwnedFd)> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ring capacity {capacity}: not a power of two in \
                     [{MIN_CAPACITY}, {MAX_CAPACITY}]"
                ),
            ));
        }
        let total = total_len(capacity).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "ring capacity too large")
        })?;
        // Sealed against shrinking and growing by `create_memfd`; then against new seals,
        // so the peer cannot add a write seal under our writable mapping either.
        let seg = Segment::create_memfd("xcp-ring", total).map_err(|e| match e {
            crate::error::Error::Io(e) => e,
            other => io::Error::other(format!("ring memory: {other}")),
        })?;
        rustix::fs::fcntl_add_seals(seg.fd(), SealFlags::SEAL)
            .map_err(|e| errno("fcntl(F_ADD_SEALS)", e))?;
        let peer = seg.fd().try_clone()?;
        let mem = RingMemory {
            backing: Backing::Created(seg),
            capacity,
        };
        let mut ident = [0u8; IDENT_LEN];
        ident[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        ident[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        ident[OFF_HEADER_LEN..OFF_HEADER_LEN + 4]
            .copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        ident[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&(capacity as u64).to_le_bytes());
        ident[OFF_TOTAL..OFF_TOTAL + 8].copy_from_slice(&(total as u64).to_le_bytes());
        // SAFETY: the mapping is `total` >= HEADER_LEN > IDENT_LEN bytes long, read-write and
        // alive for `mem`'s life; nobody else has the descriptor yet, so nothing writes it
        // concurrently. The fresh memfd reads as zeros: indices and flags start at 0.
        unsafe { ptr::copy_nonoverlapping(ident.as_ptr(), mem.base(), IDENT_LEN) };
        Ok((Arc::new(mem), peer))
    }

    /// Initiator: checks and maps a descriptor the peer passed. It must be a memfd sealed
    /// against shrinking and growing (and not against writing), whose header has our magic
    /// and version, a power-of-two capacity in [`MIN_CAPACITY`, `max_capacity`] (and at most
    /// [`MAX_CAPACITY`]), and a total length that agrees with the capacity and with the
    /// descriptor's size; anything else is `InvalidData` saying what is wrong. `max_capacity`
    /// bounds what the peer may make us map.
    pub fn open(fd: OwnedFd, max_capacity: usize) -> io::Result<Arc<RingMemory>> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
            invalid(format!(
                "ring memory: the descriptor is not a memfd that can be sealed \
                 (F_GET_SEALS: {e})"
            ))
        })?;
        if !seals.contains(MEMFD_SEALS) {
            let missing: Vec<&str> = [
                (SealFlags::SHRINK, "F_SEAL_SHRINK"),
                (SealFlags::GROW, "F_SEAL_GROW"),
            ]
            .into_iter()
            .filter(|(s, _)| !seals.contains(*s))
            .map(|(_, name)| name)
            .collect();
            return Err(invalid(format!(
                "ring memory: the memfd lacks {} (it could change size under the mapping)",
                missing.join(" and ")
            )));
        }
        if seals.intersects(SealFlags::WRITE | SealFlags::FUTURE_WRITE) {
            return Err(invalid(
                "ring memory: the memfd is sealed against writing (a ring is written by both \
                 sides)"
                    .to_string(),
            ));
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| errno("fstat", e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(invalid(
                "ring memory: the descriptor is not a shared-memory object".to_string(),
            ));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "ring memory: {size} bytes, less than the {HEADER_LEN}-byte header"
            )));
        }
        let mut ident = [0u8; IDENT_LEN];
        let n = rustix::io::pread(&fd, &mut ident, 0).map_err(|e| errno("pread", e))?;
        if n != IDENT_LEN {
            return Err(invalid(format!(
                "ring memory: short read of the header ({n} of {IDENT_LEN} bytes)"
            )));
        }
        let u32_at = |off: usize| u32::from_le_bytes(ident[off..off + 4].try_into().unwrap());
        let u64_at = |off: usize| u64::from_le_bytes(ident[off..off + 8].try_into().unwrap());
        if ident[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err(invalid(format!(
                "ring memory: wrong magic {:02x?} (want {:02x?})",
                &ident[OFF_MAGIC..OFF_MAGIC + 8],
                MAGIC
            )));
        }
        let version = u32_at(OFF_VERSION);
        if version != LAYOUT_VERSION {
            return Err(invalid(format!(
                "ring memory: layout version {version}, this build reads {LAYOUT_VERSION}"
            )));
        }
        let header_len = u32_at(OFF_HEADER_LEN);
        if header_len as usize != HEADER_LEN {
            return Err(invalid(format!(
                "ring memory: header length {header_len}, want {HEADER_LEN}"
            )));
        }
        let capacity = u64_at(OFF_CAPACITY);
        let max = max_capacity.min(MAX_CAPACITY) as u64;
        if !capacity.is_power_of_two() {
            return Err(invalid(format!(
                "ring memory: capacity {capacity} is not a power of two"
            )));
        }
        if capacity < MIN_CAPACITY as u64 || capacity > max {
            return Err(invalid(format!(
                "ring memory: capacity {capacity} outside [{MIN_CAPACITY}, {max}]"
            )));
        }
        let capacity = capacity as usize;
        let total = total_len(capacity)
            .ok_or_else(|| invalid("ring memory: capacity too large to map".to_string()))?;
        let header_total = u64_at(OFF_TOTAL);
        if header_total != total as u64 {
            return Err(invalid(format!(
                "ring memory: total length {header_total} in the header, but capacity \
                 {capacity} makes {total}"
            )));
        }
        if size != total as u64 {
            return Err(invalid(format!(
                "ring memory: the memfd has {size} bytes, the header says {total}"
            )));
        }
        let map = MmapOptions::new()
            .len(total)
            .map_raw(&fd)
            .map_err(|e| io::Error::new(e.kind(), format!("ring memory: mmap: {e}")))?;
        Ok(Arc::new(RingMemory {
            backing: Backing::Opened(map),
            capacity,
        }))
    }

    /// The bytes of each ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The producer of `end`'s outgoing ring. One per ring and connection: two producers of
    /// one ring would corrupt it.
    pub fn producer(self: &Arc<Self>, end: End) -> Producer {
        let ring = end.produces();
        // Our private index starts where the ring stands now (0 for a new one).
        let tail = self.atomic64(ring, FIELD_TAIL).load(Ordering::Acquire);
        Producer {
            mem: self.clone(),
            ring,
            tail,
        }
    }

    /// The consumer of `end`'s incoming ring. One per ring and connection.
    pub fn consumer(self: &Arc<Self>, end: End) -> Consumer {
        let ring = end.consumes();
        let head = self.atomic64(ring, FIELD_HEAD).load(Ordering::Acquire);
        Consumer {
            mem: self.clone(),
            ring,
            head,
        }
    }

    fn base(&self) -> *mut u8 {
        match &self.backing {
            Backing::Created(seg) => seg.ptr(),
            Backing::Opened(map) => map.as_mut_ptr(),
        }
    }

    fn len(&self) -> usize {
        match &self.backing {
            Backing::Created(seg) => seg.len(),
            Backing::Opened(map) => map.len(),
        }
    }

    fn atomic64(&self, ring: usize, field: usize) -> &AtomicU64 {
        debug_assert!(ring < 2 && field + 8 <= CONTROL_STRIDE);
        let off = CONTROL + ring * CONTROL_STRIDE + field;
        // SAFETY: `off + 8 <= HEADER_LEN <= len`: inside the live mapping, which `&self`
        // keeps alive for the borrow; the base is page-aligned and `off` a multiple of 128,
        // so the pointer is aligned for u64. Shared memory is only ever accessed atomically
        // at this offset by us; the peer writing it any way it likes changes the value, not
        // the validity of an atomic load or store.
        unsafe { &*(self.base().add(off) as *const AtomicU64) }
    }

    fn atomic32(&self, ring: usize, field: usize) -> &AtomicU32 {
        debug_assert!(ring < 2 && field + 4 <= CONTROL_STRIDE);
        let off = CONTROL + ring * CONTROL_STRIDE + field;
        // SAFETY: as in `atomic64`: inside the mapping, aligned (multiple of 128 from a page).
        unsafe { &*(self.base().add(off) as *const AtomicU32) }
    }

    /// The first data byte of `ring`.
    fn data(&self, ring: usize) -> *mut u8 {
        debug_assert!(HEADER_LEN + (ring + 1) * self.capacity <= self.len());
        // SAFETY: `HEADER_LEN + ring * capacity` is within the mapping of
        // `HEADER_LEN + 2 * capacity` bytes (checked at create/open).
        unsafe { self.base().add(HEADER_LEN + ring * self.capacity) }
    }

    /// Checks a loaded pair: at most `capacity` bytes between head and tail.
    fn check(&self, tail: u64, head: u64, peers: &str) -> io::Result<u64> {
        let used = tail.wrapping_sub(head);
        if used > self.capacity as u64 {
            return Err(invalid(format!(
                "ring: the peer's {peers} index is impossible: tail {tail}, head {head}, \
                 capacity {}",
                self.capacity
            )));
        }
        Ok(used)
    }

    /// The waker's half of the protocol, after publishing (a tail or a head store): a SeqCst
    /// fence, then the sleeper's flag `field` of ring `ring`, swapped to 0 when it is 1. At
    /// most once true per sleep.
    fn must_wake(&self, ring: usize, field: usize) -> bool {
        fence(Ordering::SeqCst);
        let flag = self.atomic32(ring, field);
        flag.load(Ordering::Relaxed) == 1 && flag.swap(0, Ordering::SeqCst) == 1
    }

    /// The sleeper's half: sets flag `field` of ring `ring`, then re-checks with `stuck`
    /// (a SeqCst load of the peer's index: `Ok(true)` while there is still nothing to do).
    /// `Ok(true)`: sleep, the peer will wake us. `Ok(false)`: the ring changed meanwhile, the
    /// flag is cleared (a peer that saw it wakes us anyway: a spurious wake-up, which a
    /// sleeper tolerates). An impossible index clears the flag too.
    fn arm_sleep(
        &self,
        ring: usize,
        field: usize,
        stuck: impl FnOnce() -> io::Result<bool>,
    ) -> io::Result<bool> {
        let flag = self.atomic32(ring, field);
        flag.store(1, Ordering::SeqCst);
        let r = stuck();
        if !matches!(r, Ok(true)) {
            flag.store(0, Ordering::SeqCst);
        }
        r
    }

    /// Test only: overwrites a raw u64 of the header page, as a hostile peer can.
    #[cfg(test)]
    fn poke64(&self, off: usize, v: u64) {
        assert!(off.is_multiple_of(8) && off + 8 <= HEADER_LEN);
        // SAFETY: inside the mapping, aligned; written atomically as the peer might.
        unsafe { &*(self.base().add(off) as *const AtomicU64) }.store(v, Ordering::SeqCst);
    }
}

/// The producer of one ring: copies bytes in and publishes them. `Send`, not shared.
pub struct Producer {
    mem: Arc<RingMemory>,
    ring: usize,
    /// Bytes ever published by us: the truth, whatever the shared copy says.
    tail: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("ring", &self.ring)
            .field("position", &self.tail)
            .finish()
    }
}

impl Producer {
    /// The peer's head, validated against our tail; returns the used bytes.
    fn used(&self, order: Ordering) -> io::Result<u64> {
        let head = self.mem.atomic64(self.ring, FIELD_HEAD).load(order);
        self.mem.check(self.tail, head, "head")
    }

    /// Copies as much of `bufs` (in order) as fits and publishes it (one Release store of
    /// tail). `Ok(0)` when the ring is full. `InvalidData` when the peer's head is impossible.
    pub fn write(&mut self, bufs: &[&[u8]]) -> io::Result<usize> {
        self.write_from(bufs)
    }

    /// [`Producer::write`] from any byte slices (`IoSlice`s included), with no list made.
    pub fn write_from<B: std::ops::Deref<Target = [u8]>>(
        &mut self,
        bufs: &[B],
    ) -> io::Result<usize> {
        let cap = self.mem.capacity;
        let mut room = cap - self.used(Ordering::Acquire)? as usize;
        let data = self.mem.data(self.ring);
        let mask = cap - 1;
        let mut pos = self.tail;
        for buf in bufs {
            if room == 0 {
                break;
            }
            let mut src = &buf[..buf.len().min(room)];
            room -= src.len();
            while !src.is_empty() {
                let at = pos as usize & mask;
                let n = src.len().min(cap - at);
                // SAFETY: `at + n <= cap`: inside ring `self.ring`'s data, within the
                // mapping; `src` is our own memory and cannot overlap the mapping's pages.
                // The consumer does not read these bytes before our Release store below;
                // a hostile peer writing them concurrently only spoils its own stream.
                unsafe { ptr::copy_nonoverlapping(src.as_ptr(), data.add(at), n) };
                src = &src[n..];
                pos = pos.wrapping_add(n as u64);
            }
        }
        let n = pos.wrapping_sub(self.tail) as usize;
        if n > 0 {
            self.tail = pos;
            self.mem
                .atomic64(self.ring, FIELD_TAIL)
                .store(pos, Ordering::Release);
        }
        Ok(n)
    }

    /// After a write of more than 0 bytes: whether the consumer sleeps and must be woken now
    /// (a SeqCst fence after the tail store, then the flag, swapped to 0 when it is 1). At
    /// most once true per consumer sleep.
    pub fn must_wake(&self) -> bool {
        self.mem.must_wake(self.ring, FIELD_CONSUMER_SLEEPING)
    }

    /// Free bytes now (validated).
    pub fn free(&self) -> io::Result<usize> {
        Ok(self.mem.capacity - self.used(Ordering::Acquire)? as usize)
    }

    /// Before sleeping on a full ring: sets `producer_sleeping`, re-reads head. `Ok(true)`:
    /// still full, sleep (the consumer will be told to wake us). `Ok(false)`: room appeared,
    /// flag cleared, write again.
    pub fn arm_sleep(&self) -> io::Result<bool> {
        let cap = self.mem.capacity as u64;
        self.mem.arm_sleep(self.ring, FIELD_PRODUCER_SLEEPING, || {
            Ok(self.used(Ordering::SeqCst)? == cap)
        })
    }

    /// Bytes ever written by us into this ring (our private tail): the stream position of
    /// the next byte.
    pub fn position(&self) -> u64 {
        self.tail
    }
}

/// The consumer of one ring: copies bytes out and releases them. `Send`, not shared.
pub struct Consumer {
    mem: Arc<RingMemory>,
    ring: usize,
    /// Bytes ever consumed by us: the truth, whatever the shared copy says.
    head: u64,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("ring", &self.ring)
            .field("position", &self.head)
            .finish()
    }
}

impl Consumer {
    /// The peer's tail, validated against our head; returns the available bytes.
    fn used(&self, order: Ordering) -> io::Result<u64> {
        let tail = self.mem.atomic64(self.ring, FIELD_TAIL).load(order);
        self.mem.check(tail, self.head, "tail")
    }

    /// Appends up to `max` available bytes to `dst` (wrapping copies as needed) and releases
    /// them (one Release store of head). `Ok(0)` when empty. `InvalidData` when the peer's
    /// tail is impossible.
    pub fn read(&mut self, dst: &mut BytesMut, max: usize) -> io::Result<usize> {
        let cap = self.mem.capacity;
        let n = (self.used(Ordering::Acquire)? as usize).min(max);
        if n == 0 {
            return Ok(0);
        }
        dst.reserve(n);
        let data = self.mem.data(self.ring);
        let mask = cap - 1;
        let start = dst.len();
        let out = dst.spare_capacity_mut().as_mut_ptr() as *mut u8;
        let mut done = 0;
        let mut pos = self.head;
        while done < n {
            let at = pos as usize & mask;
            let k = (n - done).min(cap - at);
            // SAFETY: `at + k <= cap`: inside ring `self.ring`'s data, within the mapping;
            // `out` has `n - done >= k` bytes of spare capacity left after `done` (reserved
            // above), in our own heap memory, which cannot overlap the mapping. The bytes
            // are copied, never interpreted in place: a peer changing them concurrently
            // changes what we read, nothing else.
            unsafe { ptr::copy_nonoverlapping(data.add(at), out.add(done), k) };
            done += k;
            pos = pos.wrapping_add(k as u64);
        }
        // SAFETY: the `n` bytes after `start` were initialized by the copies above, and
        // `start + n` is within the capacity reserved.
        unsafe { dst.set_len(start + n) };
        self.head = pos;
        self.mem
            .atomic64(self.ring, FIELD_HEAD)
            .store(pos, Ordering::Release);
        Ok(n)
    }

    /// Bytes available now (validated).
    pub fn available(&self) -> io::Result<usize> {
        Ok(self.used(Ordering::Acquire)? as usize)
    }

    /// After a read of more than 0 bytes: whether the producer sleeps on a full ring and must
    /// be woken now. At most once true per producer sleep.
    pub fn must_wake(&self) -> bool {
        self.mem.must_wake(self.ring, FIELD_PRODUCER_SLEEPING)
    }

    /// Before sleeping on an empty ring: sets `consumer_sleeping`, re-reads tail. `Ok(true)`:
    /// still empty, sleep. `Ok(false)`: data appeared, flag cleared.
    pub fn arm_sleep(&self) -> io::Result<bool> {
        self.mem.arm_sleep(self.ring, FIELD_CONSUMER_SLEEPING, || {
            Ok(self.used(Ordering::SeqCst)? == 0)
        })
    }

    /// Bytes ever consumed by us (our private head).
    pub fn position(&self) -> u64 {
        self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use rand::rngs::SmallRng;
    use rand::{Rng, RngCore, SeedableRng};

    fn pair(capacity: usize) -> (Arc<RingMemory>, Arc<RingMemory>) {
        let (resp, fd) = RingMemory::create(capacity).unwrap();
        let init = RingMemory::open(fd, MAX_CAPACITY).unwrap();
        (resp, init)
    }

    fn read_all(c: &mut Consumer) -> Vec<u8> {
        let mut buf = BytesMut::new();
        c.read(&mut buf, usize::MAX).unwrap();
        buf.to_vec()
    }

    #[test]
    fn create_rejects_bad_capacity() {
        for cap in [0, 1, 2048, 4095, 4097, 3 << 20, MAX_CAPACITY * 2] {
            let e = RingMemory::create(cap).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "capacity {cap}");
        }
    }

    #[test]
    fn round_trip_both_directions() {
        let (resp, init) = pair(MIN_CAPACITY);
        assert_eq!(resp.capacity(), MIN_CAPACITY);
        assert_eq!(init.capacity(), MIN_CAPACITY);
        assert_eq!(format!("{init:?}"), "RingMemory { capacity: 4096 }");

        let mut rp = resp.producer(End::Responder);
        let mut ic = init.consumer(End::Initiator);
        assert_eq!(ic.available().unwrap(), 0);
        assert_eq!(rp.write(&[b"hello ", b"initiator"]).unwrap(), 15);
        assert_eq!(rp.position(), 15);
        assert_eq!(ic.available().unwrap(), 15);
        assert_eq!(read_all(&mut ic), b"hello initiator");
        assert_eq!(ic.position(), 15);
        assert_eq!(rp.free().unwrap(), MIN_CAPACITY);

        let mut ip = init.producer(End::Initiator);
        let mut rc = resp.consumer(End::Responder);
        assert_eq!(rc.available().unwrap(), 0, "ring 1 is separate from ring 0");
        assert_eq!(ip.write(&[b"hello responder"]).unwrap(), 15);
        let mut buf = BytesMut::from(&b"prefix:"[..]);
        assert_eq!(rc.read(&mut buf, 5).unwrap(), 5);
        assert_eq!(&buf[..], b"prefix:hello");
        assert_eq!(rc.read(&mut buf, 100).unwrap(), 10);
        assert_eq!(&buf[..], b"prefix:hello responder");
        assert_eq!(rc.read(&mut buf, 100).unwrap(), 0);
        // Ring 0 untouched by ring 1's traffic.
        assert_eq!(ic.available().unwrap(), 0);
    }

    #[test]
    fn wrap_around_many_laps() {
        let cap = MIN_CAPACITY;
        let (resp, init) = pair(cap);
        let mut p = resp.producer(End::Responder);
        let mut c = init.consumer(End::Initiator);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut sent = Vec::new();
        let mut got = BytesMut::new();
        let mut next = 0u8;
        while sent.len() < 40 * cap {
            // Odd sizes, in up to three pieces.
            let pieces: Vec<Vec<u8>> = (0..rng.random_range(1..=3))
                .map(|_| {
                    (0..rng.random_range(0..=1500) | 1)
                        .map(|_| {
                            next = next.wrapping_mul(31).wrapping_add(17);
                            next
                        })
                        .collect()
                })
                .collect();
            let bufs: Vec<&[u8]> = pieces.iter().map(|v| &v[..]).collect();
            let want: usize = bufs.iter().map(|b| b.len()).sum();
            let free = p.free().unwrap();
            let n = p.write(&bufs).unwrap();
            assert_eq!(n, want.min(free));
            let flat: Vec<u8> = pieces.concat();
            sent.extend_from_slice(&flat[..n]);
            // Rewind the generator's state for what did not fit: simply drop it from the
            // stream (it was never sent).
            let max = rng.random_range(1..=2 * cap);
            c.read(&mut got, max).unwrap();
        }
        while c.read(&mut got, usize::MAX).unwrap() > 0 {}
        assert_eq!(got.len(), sent.len());
        assert!(got[..] == sent[..], "the byte stream changed");
        assert_eq!(p.position(), sent.len() as u64);
        assert_eq!(c.position(), sent.len() as u64);
    }

    #[test]
    fn partial_write_when_full() {
        let cap = MIN_CAPACITY;
        let (resp, init) = pair(cap);
        let mut p = init.producer(End::Initiator);
        let mut c = resp.consumer(End::Responder);
        let big = vec![0xabu8; cap - 10];
        assert_eq!(p.write(&[&big]).unwrap(), cap - 10);
        assert_eq!(p.free().unwrap(), 10);
        assert_eq!(p.write(&[b"0123", b"456789abcdef"]).unwrap(), 10);
        assert_eq!(p.free().unwrap(), 0);
        assert_eq!(p.write(&[b"x"]).unwrap(), 0);
        assert_eq!(p.write(&[]).unwrap(), 0);
        let mut buf = BytesMut::new();
        assert_eq!(c.read(&mut buf, 3).unwrap(), 3);
        assert_eq!(p.free().unwrap(), 3);
        assert_eq!(p.write(&[b"", b"XYZW"]).unwrap(), 3);
        buf.clear();
        assert_eq!(c.read(&mut buf, usize::MAX).unwrap(), cap);
        assert_eq!(&buf[cap - 13..], b"0123456789XYZ");
        assert_eq!(c.read(&mut buf, usize::MAX).unwrap(), 0);
    }

    #[test]
    fn wake_flags_single_threaded() {
        let (resp, init) = pair(MIN_CAPACITY);
        let mut p = resp.producer(End::Responder);
        let mut c = init.consumer(End::Initiator);

        // Nobody sleeps: no wake.
        assert_eq!(p.write(&[b"a"]).unwrap(), 1);
        assert!(!p.must_wake());
        // Data present: arming does not sleep and leaves the flag clear.
        assert!(!c.arm_sleep().unwrap());
        assert_eq!(p.write(&[b"b"]).unwrap(), 1);
        assert!(!p.must_wake(), "the flag was cleared by the failed arm");
        let mut buf = BytesMut::new();
        assert_eq!(c.read(&mut buf, 10).unwrap(), 2);

        // Empty: arm says sleep; the next write must wake, exactly once.
        assert!(c.arm_sleep().unwrap());
        assert_eq!(p.write(&[b"c"]).unwrap(), 1);
        assert!(p.must_wake());
        assert!(!p.must_wake());
        assert_eq!(p.write(&[b"d"]).unwrap(), 1);
        assert!(!p.must_wake());

        // The other way: a producer on a full ring.
        assert!(!p.arm_sleep().unwrap(), "room left: no sleep");
        assert!(!c.must_wake());
        let fill = vec![1u8; p.free().unwrap()];
        assert_eq!(p.write(&[&fill]).unwrap(), fill.len());
        assert_eq!(p.write(&[b"e"]).unwrap(), 0);
        assert!(p.arm_sleep().unwrap());
        buf.clear();
        assert_eq!(c.read(&mut buf, 1).unwrap(), 1);
        assert!(c.must_wake());
        assert!(!c.must_wake());
        assert_eq!(c.read(&mut buf, 1).unwrap(), 1);
        assert!(!c.must_wake());
        // A stray value is not "sleeping" (a hostile peer's 7 wakes no one).
        resp.atomic32(0, FIELD_CONSUMER_SLEEPING)
            .store(7, Ordering::SeqCst);
        assert_eq!(p.write(&[b"f"]).unwrap(), 1);
        assert!(!p.must_wake());
    }

    /// The socket byte: a count of pending wake-ups per side.
    #[derive(Default)]
    struct Bell {
        pending: Mutex<u32>,
        cv: Condvar,
    }

    impl Bell {
        fn ring(&self) {
            *self.pending.lock().unwrap() += 1;
            self.cv.notify_one();
        }

        /// Sleeps until rung (draining every pending ring, as a socket drain would); a
        /// wake-up that never comes is a lost one.
        fn sleep(&self) {
            let guard = self.pending.lock().unwrap();
            let (mut guard, to) = self
                .cv
                .wait_timeout_while(guard, Duration::from_secs(10), |n| *n == 0)
                .unwrap();
            assert!(!to.timed_out(), "lost wake-up: slept 10 s on a ring");
            *guard = 0;
        }
    }

    /// `spin`: how many empty (or full) polls, each a yield, before arming the sleep flag.
    fn stress(capacity: usize, total: usize, seed: u64, spin: u32) {
        // The stream: byte p is pattern[p % len], len prime-ish so laps of the ring and of
        // the pattern never line up.
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut pattern = vec![0u8; 1_000_003];
        rng.fill_bytes(&mut pattern);
        let pattern = Arc::new(pattern);
        let (resp, init) = pair(capacity);
        let data_bell = Arc::new(Bell::default());
        let space_bell = Arc::new(Bell::default());
        let sleeps = Arc::new(AtomicU64::new(0));

        let producer = {
            let (pattern, data_bell, space_bell, sleeps) = (
                pattern.clone(),
                data_bell.clone(),
                space_bell.clone(),
                sleeps.clone(),
            );
            let mut p = resp.producer(End::Responder);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ 1);
                let len = pattern.len();
                let mut spins = 0u32;
                while (p.position() as usize) < total {
                    let pos = p.position() as usize;
                    let want = rng.random_range(1..=3 * capacity).min(total - pos);
                    let at = pos % len;
                    let first = &pattern[at..(at + want).min(len)];
                    let second = &pattern[..want - first.len()];
                    let n = p.write(&[first, second]).unwrap();
                    if n > 0 {
                        spins = 0;
                        if p.must_wake() {
                            data_bell.ring();
                        }
                        continue;
                    }
                    spins += 1;
                    if spins < spin {
                        std::thread::yield_now();
                        continue;
                    }
                    if p.arm_sleep().unwrap() {
                        sleeps.fetch_add(1, Ordering::Relaxed);
                        space_bell.sleep();
                    }
                    spins = 0;
                }
            })
        };

        let mut c = init.consumer(End::Initiator);
        let mut buf = BytesMut::new();
        let mut spins = 0u32;
        let len = pattern.len();
        while (c.position() as usize) < total {
            let pos = c.position() as usize;
            buf.clear();
            let n = c
                .read(&mut buf, rng.random_range(1..=2 * capacity))
                .unwrap();
            if n > 0 {
                spins = 0;
                if c.must_wake() {
                    space_bell.ring();
                }
                let at = pos % len;
                let first = (len - at).min(n);
                assert!(
                    buf[..first] == pattern[at..at + first],
                    "bad bytes at {pos}"
                );
                assert!(buf[first..] == pattern[..n - first], "bad bytes at {pos}");
                continue;
            }
            spins += 1;
            if spins < spin {
                std::thread::yield_now();
                continue;
            }
            if c.arm_sleep().unwrap() {
                sleeps.fetch_add(1, Ordering::Relaxed);
                data_bell.sleep();
            }
            spins = 0;
        }
        producer.join().unwrap();
        assert_eq!(c.position(), total as u64);
        assert_eq!(c.available().unwrap(), 0);
        eprintln!(
            "stress: {total} bytes through a {capacity}-byte ring, {} sleeps",
            sleeps.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn stress_two_threads_small_ring() {
        let t = Instant::now();
        stress(MIN_CAPACITY, 16 << 20, 1, 0);
        eprintln!("in {:?}", t.elapsed());
    }

    #[test]
    fn stress_two_threads_64k_ring() {
        let t = Instant::now();
        stress(64 << 10, 64 << 20, 2, 2);
        eprintln!("in {:?}", t.elapsed());
    }

    const TAIL0: usize = CONTROL + FIELD_TAIL;
    const HEAD0: usize = CONTROL + FIELD_HEAD;

    #[test]
    fn hostile_tail() {
        let cap = MIN_CAPACITY;
        let (resp, init) = pair(cap);
        let mut p = resp.producer(End::Responder);
        let mut c = init.consumer(End::Initiator);
        assert_eq!(p.write(&[&[5u8; 100]]).unwrap(), 100);
        let mut buf = BytesMut::new();
        assert_eq!(c.read(&mut buf, 40).unwrap(), 40);
        let bad = [
            40 + cap as u64 + 1, // more than a ring ahead of our head
            39,                  // behind our head
            u64::MAX,
            1 << 63,
        ];
        for tail in bad {
            resp.poke64(TAIL0, tail);
            buf.clear();
            let e = c.read(&mut buf, usize::MAX).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "tail {tail}");
            assert!(buf.is_empty());
            assert_eq!(
                c.available().unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
            assert_eq!(
                c.arm_sleep().unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
            assert_eq!(c.position(), 40, "our head stays ours");
        }
        // Exactly a full ring ahead is possible (the bytes are garbage, but in bounds).
        resp.poke64(TAIL0, 40 + cap as u64);
        buf.clear();
        assert_eq!(c.read(&mut buf, usize::MAX).unwrap(), cap);
        // Our own head is private: the peer overwriting it changes nothing for us.
        resp.poke64(HEAD0, 12345);
        assert_eq!(c.position(), 40 + cap as u64);
    }

    #[test]
    fn hostile_head() {
        let cap = MIN_CAPACITY;
        let (resp, init) = pair(cap);
        let mut p = resp.producer(End::Responder);
        assert_eq!(p.write(&[&[1u8; 1000]]).unwrap(), 1000);
        for head in [
            1001,
            u64::MAX - 5000,
            1000u64.wrapping_sub(cap as u64 + 1),
            1 << 40,
        ] {
            init.poke64(HEAD0, head);
            let e = p.write(&[b"x"]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "head {head}");
            assert_eq!(p.free().unwrap_err().kind(), io::ErrorKind::InvalidData);
            assert_eq!(
                p.arm_sleep().unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
            assert_eq!(p.position(), 1000);
        }
        init.poke64(HEAD0, 1000);
        assert_eq!(p.free().unwrap(), cap);
        // The peer rewinding our tail does not move our position.
        init.poke64(TAIL0, 3);
        assert_eq!(p.write(&[b"y"]).unwrap(), 1);
        assert_eq!(p.position(), 1001);
    }

    /// A memfd written by hand: `ident` at offset 0, `size` bytes, then `seals`.
    fn handmade(ident: &[u8], size: u64, allow_sealing: bool, seals: SealFlags) -> OwnedFd {
        let flags = if allow_sealing {
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING
        } else {
            rustix::fs::MemfdFlags::CLOEXEC
        };
        let fd = rustix::fs::memfd_create("xcp-ring-test", flags).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        assert_eq!(rustix::io::pwrite(&fd, ident, 0).unwrap(), ident.len());
        if !seals.is_empty() {
            rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        }
        fd
    }

    fn ident(magic: &[u8; 8], version: u32, header: u32, cap: u64, total: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(magic);
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&header.to_le_bytes());
        v.extend_from_slice(&cap.to_le_bytes());
        v.extend_from_slice(&total.to_le_bytes());
        v
    }

    fn refused(fd: OwnedFd, max: usize, what: &str) -> String {
        let e = RingMemory::open(fd, max).expect_err(what);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
        e.to_string()
    }

    #[test]
    fn open_refuses_bad_descriptors() {
        let cap = MIN_CAPACITY as u64;
        let total = HEADER_LEN as u64 + 2 * cap;
        let good = ident(&MAGIC, 1, 4096, cap, total);
        let all = MEMFD_SEALS | SealFlags::SEAL;

        // The hand-made good one opens (so the refusals below are for their one fault).
        let mem = RingMemory::open(handmade(&good, total, true, all), MAX_CAPACITY).unwrap();
        assert_eq!(mem.capacity(), MIN_CAPACITY);

        let msg = refused(
            handmade(&good, total, false, SealFlags::empty()),
            MAX_CAPACITY,
            "unsealable",
        );
        assert!(msg.contains("F_SEAL_SHRINK"), "{msg}");
        refused(
            handmade(&good, total, true, SealFlags::empty()),
            MAX_CAPACITY,
            "no seals",
        );
        let msg = refused(
            handmade(&good, total, true, SealFlags::SHRINK),
            MAX_CAPACITY,
            "no GROW",
        );
        assert!(
            msg.contains("F_SEAL_GROW") && !msg.contains("SHRINK"),
            "{msg}"
        );
        refused(
            handmade(&good, total, true, SealFlags::GROW),
            MAX_CAPACITY,
            "no SHRINK",
        );
        refused(
            handmade(&good, total, true, all | SealFlags::WRITE),
            MAX_CAPACITY,
            "write seal",
        );

        let cases: Vec<(Vec<u8>, u64, usize, &str)> = vec![
            (
                ident(b"XCPRINGX", 1, 4096, cap, total),
                total,
                MAX_CAPACITY,
                "magic",
            ),
            (
                ident(&MAGIC, 2, 4096, cap, total),
                total,
                MAX_CAPACITY,
                "version",
            ),
            (
                ident(&MAGIC, 1, 8192, cap, total),
                total,
                MAX_CAPACITY,
                "header length",
            ),
            (
                ident(&MAGIC, 1, 4096, 6000, 4096 + 12000),
                4096 + 12000,
                MAX_CAPACITY,
                "power of two",
            ),
            (
                ident(&MAGIC, 1, 4096, 2048, 4096 + 4096),
                4096 + 4096,
                MAX_CAPACITY,
                "outside",
            ),
            (
                ident(&MAGIC, 1, 4096, 2 * cap, 4096 + 4 * cap),
                4096 + 4 * cap,
                MIN_CAPACITY,
                "outside",
            ),
            (
                ident(&MAGIC, 1, 4096, 1 << 31, 4096 + (1 << 32)),
                total,
                MAX_CAPACITY,
                "outside",
            ),
            (
                ident(&MAGIC, 1, 4096, cap, total + 4096),
                total + 4096,
                MAX_CAPACITY,
                "total length",
            ),
            (
                ident(&MAGIC, 1, 4096, cap, total),
                total + 4096,
                MAX_CAPACITY,
                "memfd has",
            ),
            (
                ident(&MAGIC, 1, 4096, cap, total),
                total - 1,
                MAX_CAPACITY,
                "memfd has",
            ),
            (
                ident(&MAGIC, 1, 4096, cap, total),
                100,
                MAX_CAPACITY,
                "header",
            ),
        ];
        for (id, size, max, what) in cases {
            let msg = refused(handmade(&id, size, true, all), max, what);
            assert!(msg.contains(what), "{what}: {msg}");
        }

        let (r, w) = std::io::pipe().unwrap();
        refused(OwnedFd::from(r), MAX_CAPACITY, "pipe");
        drop(w);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        refused(OwnedFd::from(a), MAX_CAPACITY, "socket");
        drop(b);
        let file = tempfile::tempfile().unwrap();
        refused(
            file.as_fd().try_clone_to_owned().unwrap(),
            MAX_CAPACITY,
            "regular file",
        );
    }

    #[test]
    fn created_memory_is_sealed_for_good() {
        let (_mem, fd) = RingMemory::create(MIN_CAPACITY).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(MEMFD_SEALS | SealFlags::SEAL), "{seals:?}");
        assert!(!seals.contains(SealFlags::WRITE));
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(st.st_size as usize, HEADER_LEN + 2 * MIN_CAPACITY);
        // A peer cannot shrink it under the mapping.
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        let mut id = [0u8; IDENT_LEN];
        rustix::io::pread(&fd, &mut id, 0).unwrap();
        assert_eq!(
            id.to_vec(),
            ident(
                &MAGIC,
                1,
                4096,
                MIN_CAPACITY as u64,
                (HEADER_LEN + 2 * MIN_CAPACITY) as u64
            )
        );
    }
}
