//! The sender's pool of shared segments and the writable [`Region`]s it loans.
//!
//! A region is loaned (`Pool::alloc`), written in place by the application, sent (its bytes
//! stay where they are; the frame carries a handle), and returns to the pool when the peer ACKs
//! (the region is dropped then). Segments are reused; new ones are created on demand up to the
//! pool's cap, after which `alloc` waits for a region to come back, then fails with
//! `ERR_BUSY`.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::segment::{Scheme, Segment};
use crate::error::{Deadline, Error, Result};

/// Smallest segment created.
pub const MIN_SEGMENT: usize = 64 << 10;
/// Up to this size, segments come in powers of two; above, in multiples of 2 MiB.
const POW2_LIMIT: usize = 64 << 20;
const LARGE_STEP: usize = 2 << 20;

/// Settings of a [`Pool`].
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Shared memory kind of the segments.
    pub scheme: Scheme,
    /// Name prefix of this process's shm objects (announced as `shm_prefix` in HELLO).
    pub prefix: String,
    /// The most bytes of segments the pool may hold (in use and free).
    pub cap_bytes: u64,
}

impl PoolConfig {
    /// A pool of `scheme` segments named with this process's prefix, capped at `cap_bytes`.
    pub fn new(scheme: Scheme, cap_bytes: u64) -> Self {
        PoolConfig {
            scheme,
            prefix: super::process_prefix().to_string(),
            cap_bytes,
        }
    }
}

/// The size class of a request: the segment size that serves it.
fn class_of(len: usize) -> usize {
    let len = len.max(MIN_SEGMENT);
    if len <= POW2_LIMIT {
        len.next_power_of_two()
    } else {
        len.div_ceil(LARGE_STEP) * LARGE_STEP
    }
}

#[derive(Default)]
struct State {
    /// Free segments by size.
    free: BTreeMap<usize, Vec<Segment>>,
    /// Bytes of all segments, loaned or free.
    total: u64,
    /// Bytes of loaned segments.
    loaned: u64,
}

struct Inner {
    cfg: PoolConfig,
    state: Mutex<State>,
    returned: tokio::sync::Notify,
}

/// A pool of shared segments. Cloning gives another handle to the same pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (total, loaned) = self.usage();
        f.debug_struct("Pool")
            .field("scheme", &self.inner.cfg.scheme)
            .field("total", &total)
            .field("loaned", &loaned)
            .finish()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State::default()),
                returned: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// `(bytes held, bytes loaned)`.
    pub fn usage(&self) -> (u64, u64) {
        let s = self.inner.lock();
        (s.total, s.loaned)
    }

    /// Loans a region of `len` bytes if the pool has room now; `Ok(None)` when it is full.
    pub fn try_alloc(&self, len: usize) -> Result<Option<Region>> {
        if len == 0 {
            return Err(Error::invalid("alloc: a region needs at least one byte"));
        }
        let class = class_of(len);
        let cap = self.inner.cfg.cap_bytes;
        if class as u64 > cap {
            return Err(Error::invalid(format!(
                "alloc: {len} bytes exceeds the pool's cap of {cap} bytes"
            )));
        }
        let mut s = self.inner.lock();
        // A free segment of the right class or up to twice as large.
        let found = s
            .free
            .range_mut(class..=class.saturating_mul(2))
            .find_map(|(_, v)| v.pop());
        s.free.retain(|_, v| !v.is_empty());
        let seg = match found {
            Some(seg) => seg,
            None => {
                // Make room by dropping free segments of other sizes, but only when that is
                // enough: dropping them for nothing would cost their page faults again later.
                let free: u64 = s.free.iter().map(|(k, v)| *k as u64 * v.len() as u64).sum();
                if s.total - free + class as u64 > cap {
                    return Ok(None);
                }
                while s.total + class as u64 > cap {
                    let Some(mut e) = s.free.first_entry() else {
                        return Ok(None);
                    };
                    let seg = e.get_mut().pop();
                    if e.get().is_empty() {
                        e.remove();
                    }
                    if let Some(seg) = seg {
                        s.total -= seg.len() as u64;
                    }
                }
                let seg = self.create(class)?;
                s.total += seg.len() as u64;
                seg
            }
        };
        s.loaned += seg.len() as u64;
        Ok(Some(Region {
            seg: Some(seg),
            len,
            pool: Arc::downgrade(&self.inner),
        }))
    }

    /// Loans a region of `len` bytes, waiting up to `timeout` for room (back-pressure: regions
    /// come back when the peer ACKs). Fails after that with [`Error::Timeout`] of
    /// [`Deadline::Alloc`], whose code is `ERR_BUSY`.
    pub async fn alloc(&self, len: usize, timeout: Duration) -> Result<Region> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.returned.notified();
            if let Some(r) = self.try_alloc(len)? {
                return Ok(r);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let (total, loaned) = self.usage();
                return Err(Error::timeout(
                    Deadline::Alloc,
                    format!(
                        "alloc: no room for {len} bytes within {timeout:?} \
                         ({loaned} of {total} pooled bytes loaned, cap {})",
                        self.inner.cfg.cap_bytes
                    ),
                ));
            }
        }
    }

    fn create(&self, len: usize) -> Result<Segment> {
        // One counter for the whole process: pools share the process's name prefix.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{n}", self.inner.cfg.prefix);
        match self.inner.cfg.scheme {
            Scheme::Shm => Segment::create_shm(&name, len),
            // `local` hands out the descriptors of memfds inside this process.
            Scheme::Memfd | Scheme::Local => Segment::create_memfd(&name, len),
            Scheme::CudaIpc => Err(Error::invalid(
                "a pool holds host segments: cuda-ipc is device memory (see attach::cuda)",
            )),
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn give_back(&self, seg: Segment) {
        // A shm segment someone truncated (any process of our user can) is not reused: its
        // pages past the new end are gone, and the guard's zeros behind them are ours alone.
        let shrank = seg.scheme() == Scheme::Shm && seg.shrank();
        let mut s = self.lock();
        s.loaned -= seg.len() as u64;
        if shrank {
            s.total -= seg.len() as u64;
            drop(s);
            drop(seg);
            self.returned.notify_waiters();
            return;
        }
        s.free.entry(seg.len()).or_default().push(seg);
        drop(s);
        self.returned.notify_waiters();
    }
}

/// A writable region loaned from a [`Pool`]: derefs to `&mut [u8]` of exactly the requested
/// length. It returns to the pool when dropped; a session keeps it alive until the peer ACKs.
pub struct Region {
    seg: Option<Segment>,
    len: usize,
    pool: Weak<Inner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("segment", &self.segment().name())
            .field("len", &self.len)
            .finish()
    }
}

impl Region {
    /// The segment it lies in (its start is the segment's start).
    pub fn segment(&self) -> &Segment {
        self.seg.as_ref().expect("present until drop")
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for Region {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the region covers the first `len` bytes of its segment's live read-write
        // mapping (len ≤ segment length by construction), and the region is the segment's only
        // user while loaned.
        unsafe { std::slice::from_raw_parts(self.segment().ptr(), self.len) }
    }
}

impl DerefMut for Region {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only borrow of the bytes in this
        // process. A receiver maps them read-only and reads them only after we send.
        unsafe { std::slice::from_raw_parts_mut(self.segment().ptr(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let (Some(seg), Some(pool)) = (self.seg.take(), self.pool.upgrade()) {
            pool.give_back(seg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn pool(scheme: Scheme, cap: u64) -> Pool {
        let mut cfg = PoolConfig::new(scheme, cap);
        cfg.prefix = format!("{}t{}-", cfg.prefix, rand::random::<u32>());
        Pool::new(cfg)
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(1), MIN_SEGMENT);
        assert_eq!(class_of(100_000), 128 << 10);
        assert_eq!(class_of(64 << 20), 64 << 20);
        assert_eq!(class_of((64 << 20) + 1), (64 << 20) + (2 << 20));
    }

    #[test]
    fn regions_are_reused_and_unlinked() {
        let p = pool(Scheme::Shm, 1 << 20);
        let mut r = p.try_alloc(1000).unwrap().unwrap();
        r.fill(7);
        let name = r.segment().name().to_string();
        assert!(std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        drop(r);
        let r2 = p.try_alloc(2000).unwrap().unwrap();
        assert_eq!(r2.segment().name(), name, "the segment is reused");
        assert_eq!(r2[0], 7);
        drop(r2);
        drop(p);
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
    }

    /// A shm segment truncated while loaned (by another process of our user) is not handed
    /// out again, and its bytes leave the pool's count; a memfd cannot be truncated at all.
    #[test]
    fn truncated_segments_are_not_reused() {
        let p = pool(Scheme::Shm, 1 << 20);
        let r = p.try_alloc(1000).unwrap().unwrap();
        let name = r.segment().name().to_string();
        rustix::fs::ftruncate(r.segment().fd(), 10).unwrap();
        assert!(r.segment().shrank());
        drop(r);
        assert_eq!(p.usage(), (0, 0), "dropped, not kept");
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        let r2 = p.try_alloc(1000).unwrap().unwrap();
        assert_ne!(r2.segment().name(), name);
        assert!(!r2.segment().shrank());

        let m = pool(Scheme::Memfd, 1 << 20);
        let r = m.try_alloc(1000).unwrap().unwrap();
        assert_eq!(
            rustix::fs::ftruncate(r.segment().fd(), 10),
            Err(rustix::io::Errno::PERM),
            "sealed"
        );
        assert!(!r.segment().shrank());
    }

    #[test]
    fn cap_is_enforced() {
        let p = pool(Scheme::Memfd, 256 << 10);
        let a = p.try_alloc(128 << 10).unwrap().unwrap();
        let _b = p.try_alloc(128 << 10).unwrap().unwrap();
        assert!(p.try_alloc(1).unwrap().is_none());
        drop(a);
        assert!(p.try_alloc(1).unwrap().is_some());
        assert!(p.try_alloc(1 << 20).is_err(), "larger than the cap");
    }

    #[test]
    fn free_segments_are_evicted_for_other_sizes() {
        let p = pool(Scheme::Memfd, 256 << 10);
        drop(p.try_alloc(64 << 10).unwrap().unwrap());
        drop(p.try_alloc(128 << 10).unwrap().unwrap());
        let big = p.try_alloc(256 << 10).unwrap();
        assert!(big.is_some());
        assert_eq!(p.usage(), (256 << 10, 256 << 10));
    }

    #[test]
    fn full_pool_keeps_its_free_segments() {
        let p = pool(Scheme::Memfd, 256 << 10);
        let _a = p.try_alloc(128 << 10).unwrap().unwrap();
        drop(p.try_alloc(64 << 10).unwrap().unwrap());
        // 128 KiB loaned + 64 KiB free: a 256 KiB request cannot fit even by evicting.
        assert!(p.try_alloc(200 << 10).unwrap().is_none());
        assert_eq!(
            p.usage(),
            (192 << 10, 128 << 10),
            "the free segment was kept"
        );
    }

    #[tokio::test]
    async fn alloc_waits_then_busy() {
        let p = pool(Scheme::Memfd, 64 << 10);
        let r = p.alloc(10, Duration::from_secs(1)).await.unwrap();
        let e = p.alloc(10, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_BUSY);
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.alloc(10, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(r);
        assert!(waiter.await.unwrap().is_ok());
    }
}
