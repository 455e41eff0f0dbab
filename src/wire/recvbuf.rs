//! Receive buffers that are reused instead of fresh.
//!
//! A connection reads into one `BytesMut` and the [`FrameDecoder`](super::frame::FrameDecoder)
//! splits each whole frame off its front as `Bytes`, so a delivered message shares the
//! allocation it was read into. When the buffer must grow for a large frame while messages
//! read into it are still alive, `BytesMut::reserve` can only allocate anew, and fresh pages
//! cost two to three times a memcpy on the machines this project measures on (every page
//! faults, is zeroed and charged). [`RecvBuffers`] keeps the buffers it replaced as spares and
//! takes one back once every message read into it has been dropped (`BytesMut::try_reclaim`
//! says so without allocating), so a connection that moves large frames cycles through a few
//! warm allocations.
//!
//! Memory stays bounded: at most [`MAX_SPARES`] spares of [`MAX_SPARE_BYTES`] in all per
//! connection; a buffer that would go over is freed as before. Spares smaller than
//! [`MIN_SPARE_BYTES`] are not kept (their pages are few).
#![forbid(unsafe_code)]

use bytes::BytesMut;

/// The most spare buffers a connection keeps.
pub const MAX_SPARES: usize = 8;
/// The most bytes of spare buffers a connection keeps.
pub const MAX_SPARE_BYTES: usize = 8 << 20;
/// Buffers smaller than this are freed, not kept.
pub const MIN_SPARE_BYTES: usize = 64 << 10;

/// A buffer waiting for the messages read into it to go.
#[derive(Debug)]
struct Spare {
    /// Empty (cleared); its allocation may still be shared with delivered messages.
    buf: BytesMut,
    /// The size of its allocation.
    size: usize,
}

/// The spare receive buffers of one connection (see the module docs).
#[derive(Debug)]
pub struct RecvBuffers {
    spares: Vec<Spare>,
    spare_bytes: usize,
    /// The most spares, and the most bytes of spares, kept.
    max_spares: usize,
    max_spare_bytes: usize,
    /// The allocation size of the buffer in use, when this knows it (0: unknown).
    current: usize,
    /// Buffers taken back from the spares, and fresh ones allocated here (for tests and
    /// figures).
    reused: u64,
    fresh: u64,
}

impl Default for RecvBuffers {
    fn default() -> Self {
        Self::with_limits(MAX_SPARES, MAX_SPARE_BYTES)
    }
}

impl RecvBuffers {
    /// No spares yet; at most [`MAX_SPARES`] of [`MAX_SPARE_BYTES`] in all.
    pub fn new() -> Self {
        Self::default()
    }

    /// No spares yet; at most `max_spares` of `max_spare_bytes` in all.
    pub fn with_limits(max_spares: usize, max_spare_bytes: usize) -> Self {
        RecvBuffers {
            spares: Vec::new(),
            spare_bytes: 0,
            max_spares,
            max_spare_bytes,
            current: 0,
            reused: 0,
            fresh: 0,
        }
    }

    /// An empty buffer with room for at least `need` bytes: a spare whose messages are gone
    /// when there is one, else a fresh one of exactly `need` (so a peer's tiny chunks cost
    /// tiny buffers). Hand it back with [`RecvBuffers::give`].
    pub fn take(&mut self, need: usize) -> BytesMut {
        match self.reclaim(need) {
            Some((buf, _)) => buf,
            None => {
                self.fresh += 1;
                BytesMut::with_capacity(need)
            }
        }
    }

    /// Keeps `buf`, the rest of an allocation of `size` bytes whose front may still be in
    /// use (a message split off it), as a spare if the bounds allow.
    pub fn give(&mut self, mut buf: BytesMut, size: usize) {
        buf.clear();
        self.keep(buf, size);
    }

    /// A spare of at least `need` bytes whose messages are all gone, with its size.
    fn reclaim(&mut self, need: usize) -> Option<(BytesMut, usize)> {
        let i = self
            .spares
            .iter_mut()
            .position(|s| s.size >= need && s.buf.try_reclaim(need))?;
        let s = self.spares.swap_remove(i);
        self.spare_bytes -= s.size;
        self.reused += 1;
        Some((s.buf, s.size))
    }

    /// Makes room for `additional` more bytes after the `buf.len()` bytes of `buf`, keeping
    /// those bytes: in place when `buf` owns its allocation alone, else in a spare whose
    /// messages are gone, else in a fresh buffer (the old one becomes a spare).
    pub fn reserve(&mut self, buf: &mut BytesMut, additional: usize) {
        if buf.capacity() - buf.len() >= additional || buf.try_reclaim(additional) {
            return;
        }
        let need = buf.len().saturating_add(additional);
        let next = match self.reclaim(need) {
            Some(spare) => spare,
            None => {
                self.fresh += 1;
                let size = need.max(MIN_SPARE_BYTES);
                (BytesMut::with_capacity(size), size)
            }
        };
        let (mut fresh, size) = next;
        fresh.extend_from_slice(buf);
        let mut old = std::mem::replace(buf, fresh);
        let old_size = std::mem::replace(&mut self.current, size);
        old.clear();
        self.keep(old, old_size);
    }

    /// Keeps `buf` (an allocation of `size` bytes, 0 when unknown) as a spare if there is room.
    fn keep(&mut self, buf: BytesMut, size: usize) {
        // An allocation of unknown size (the first buffer, made by the caller) is known once
        // it can be reclaimed; until then its remaining capacity is a lower bound.
        let size = if size == 0 { buf.capacity() } else { size };
        if size < MIN_SPARE_BYTES {
            return;
        }
        if size > self.max_spare_bytes {
            return;
        }
        if self.spares.len() >= self.max_spares || self.spare_bytes + size > self.max_spare_bytes {
            // Make room by freeing a spare that is still shared (it would free itself when
            // its messages go anyway) in favour of the newer one; else drop the newcomer.
            match self.spares.iter().position(|s| s.size <= size) {
                Some(i) => {
                    let s = self.spares.swap_remove(i);
                    self.spare_bytes -= s.size;
                }
                None => return,
            }
            if self.spare_bytes + size > self.max_spare_bytes {
                return;
            }
        }
        self.spare_bytes += size;
        self.spares.push(Spare { buf, size });
    }

    /// How many buffers came back from the spares, and how many were allocated fresh.
    pub fn counts(&self) -> (u64, u64) {
        (self.reused, self.fresh)
    }

    /// The bytes held in spare buffers.
    pub fn spare_bytes(&self) -> usize {
        self.spare_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: usize = 1 << 20;

    /// Reads `n` bytes "from the socket" into `buf` and splits them off as a message.
    fn message(bufs: &mut RecvBuffers, buf: &mut BytesMut, n: usize) -> bytes::Bytes {
        bufs.reserve(buf, n);
        let base = buf.as_ptr() as usize;
        buf.extend_from_slice(&vec![7u8; n]);
        let m = buf.split_to(n).freeze();
        assert_eq!(m.as_ptr() as usize, base, "read where it reserved");
        m
    }

    #[test]
    fn a_buffer_whose_messages_are_gone_is_reused() {
        let mut bufs = RecvBuffers::new();
        let mut buf = BytesMut::with_capacity(4096);
        // Messages kept alive while the next ones arrive: each needs a new buffer.
        let held: Vec<_> = (0..3)
            .map(|_| message(&mut bufs, &mut buf, FRAME))
            .collect();
        assert_eq!(bufs.counts(), (0, 3));
        let addrs: Vec<usize> = held.iter().map(|m| m.as_ptr() as usize).collect();
        drop(held);
        // Now their buffers are free. Each message stays alive while the next one is read
        // (so the buffer in use cannot be reclaimed in place): the next lands in a spare.
        let mut prev = None;
        for _ in 0..10 {
            let m = message(&mut bufs, &mut buf, FRAME);
            assert!(addrs.contains(&(m.as_ptr() as usize)), "a known buffer");
            prev = Some(m);
        }
        drop(prev);
        // The first lands in place (the buffer in use is alone again), the nine others in
        // spares.
        assert_eq!(
            bufs.counts(),
            (9, 3),
            "no fresh buffer once spares are free"
        );
    }

    #[test]
    fn bytes_not_yet_consumed_move_with_the_buffer() {
        let mut bufs = RecvBuffers::new();
        let mut buf = BytesMut::with_capacity(64);
        let held = message(&mut bufs, &mut buf, 32);
        buf.extend_from_slice(b"partial frame");
        bufs.reserve(&mut buf, FRAME);
        assert_eq!(&buf[..], b"partial frame");
        assert!(buf.capacity() - buf.len() >= FRAME);
        assert_eq!(&held[..], &[7u8; 32][..]);
    }

    #[test]
    fn spares_stay_within_their_bounds() {
        let mut bufs = RecvBuffers::new();
        let mut buf = BytesMut::new();
        // Every message held: every reserve allocates, and the old buffers pile up as spares.
        let held: Vec<_> = (0..40)
            .map(|_| message(&mut bufs, &mut buf, FRAME))
            .collect();
        assert!(bufs.spare_bytes() <= MAX_SPARE_BYTES);
        assert!(bufs.spares.len() <= MAX_SPARES);
        drop(held);
        // Small buffers are never kept.
        let mut small = RecvBuffers::new();
        let mut b = BytesMut::new();
        let _h: Vec<_> = (0..10).map(|_| message(&mut small, &mut b, 100)).collect();
        assert_eq!(small.spare_bytes(), 0);
    }
}
