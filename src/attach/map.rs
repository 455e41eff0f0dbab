//! The receiver's side: a per-connection cache of the peer's segments, mapped read-only once
//! each, and the [`View`]s handed to the application, which ACK their message when the last
//! one is dropped.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;

use super::scheme::{ImportKey, Peer};
use super::segment::{Mapping, Scheme};
use super::uri::AttachmentUri;
use crate::error::{Error, Result};

/// How many of the peer's segments stay mapped at most (least recently used go first).
pub const DEFAULT_MAX_MAPPINGS: usize = 1024;

/// What a [`Lease`] reports when its last view is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// The message whose views are all gone.
    pub msg_id: u64,
    /// The scheme of a mapping that faulted while the message's views were held (the peer
    /// shrank the object under us; SPEC §7): the message is answered NACK `ERR_ATTACHMENT`
    /// rather than ACK, and that scheme's handles are refused from then on. `None`: ACK.
    pub faulted: Option<Scheme>,
}

/// Releases a message's handles when dropped: every [`View`] of the message holds it, and
/// when the last one goes the message is reported (the session then ACKs it, or NACKs it if
/// one of its mappings faulted).
pub struct Lease {
    msg_id: u64,
    armed: std::sync::atomic::AtomicBool,
    /// The mappings the message's views read, checked for faults when the lease goes.
    maps: std::sync::Mutex<Vec<(Scheme, Arc<Mapping>)>>,
    release: Box<dyn Fn(Released) + Send + Sync>,
}

impl Lease {
    /// A lease on message `msg_id` that calls `release` once, when dropped.
    pub fn new(msg_id: u64, release: impl Fn(Released) + Send + Sync + 'static) -> Arc<Lease> {
        Arc::new(Lease {
            msg_id,
            armed: std::sync::atomic::AtomicBool::new(true),
            maps: std::sync::Mutex::new(Vec::new()),
            release: Box::new(release),
        })
    }

    /// Makes the drop report nothing (the message was refused, not consumed).
    pub fn disarm(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The message it belongs to.
    pub fn msg_id(&self) -> u64 {
        self.msg_id
    }

    /// The scheme of a mapping of this message that faulted, if any did.
    pub fn faulted(&self) -> Option<Scheme> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter().find(|(_, m)| m.faulted()).map(|(s, _)| *s)
    }

    fn hold(&self, scheme: Scheme, map: &Arc<Mapping>) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if !maps.iter().any(|(_, m)| Arc::ptr_eq(m, map)) {
            maps.push((scheme, map.clone()));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            let faulted = self.faulted();
            (self.release)(Released {
                msg_id: self.msg_id,
                faulted,
            });
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("msg_id", &self.msg_id)
            .finish()
    }
}

/// A read-only view of attachment bytes in the peer's shared segment. It derefs to `&[u8]`,
/// becomes a `Bytes` without copying ([`View::into_bytes`]), and keeps the segment mapped and
/// the message's lease held until dropped.
#[derive(Clone)]
pub struct View {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
    lease: Arc<Lease>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("msg_id", &self.lease.msg_id)
            .field("off", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

impl View {
    /// The bytes. If the peer shrinks the object while it is mapped, the pages past its new
    /// end read as zeros: check [`View::faulted`] after reading.
    pub fn as_slice(&self) -> &[u8] {
        self.map.slice(self.off, self.len)
    }

    /// Whether the peer shrank the segment under this view (SPEC §7): some of the bytes read
    /// so far, or to be read, are zeros that the peer never wrote. Whoever reads a view to the
    /// end checks this before trusting what it read; the session then answers the message
    /// NACK `ERR_ATTACHMENT` when its views are dropped.
    pub fn faulted(&self) -> bool {
        self.map.faulted()
    }

    /// The bytes as `Bytes`, without a copy; the mapping and the lease live as long as any
    /// clone of the result.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The msgId of the message it came with.
    pub fn msg_id(&self) -> u64 {
        self.lease.msg_id
    }

    /// The bytes as a tensor body (TENSOR_F32/F16/QNT8), viewed in place.
    pub fn tensor(&self, codec: crate::codec::CodecId) -> Result<crate::codec::tensor::TensorView> {
        crate::codec::tensor::TensorView::parse(self.clone().into_bytes(), Some(codec))
    }

    /// The bytes as an Arrow IPC stream: record batches whose buffers point into the segment.
    #[allow(clippy::type_complexity)]
    pub fn arrow(&self) -> Result<(arrow_schema::SchemaRef, Vec<arrow_array::RecordBatch>)> {
        crate::codec::arrow::decode_batches(self.clone().into_bytes())
    }
}

impl std::ops::Deref for View {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Resolves the peer's attachment URIs into views, mapping each segment once.
pub struct Mapper {
    /// Schemes negotiated with the peer.
    schemes: Vec<Scheme>,
    /// The peer's `shm_prefix`; shm names outside it are refused.
    peer_prefix: String,
    /// The peer process's user, where known: shm objects of another owner are refused.
    peer_uid: Option<u32>,
    /// Schemes refused for the rest of the connection, with the reason (a mapping of the
    /// peer's faulted: it shrank an object under us).
    refused: Vec<(Scheme, String)>,
    cache: HashMap<ImportKey, Arc<Mapping>>,
    order: VecDeque<(Scheme, ImportKey)>,
    max: usize,
    /// This peer's id as a producer of handles (unique in the process): schemes that cache
    /// imports beyond the mappings (`cuda-ipc`) keep them under it, released when the mapper
    /// goes ([`HandleScheme::release`](super::scheme::HandleScheme::release)).
    producer: u64,
}

/// Producer ids of sessions: from 2^63 up, so they never meet the ids an application picks
/// for its own `Cuda::import` calls (small counters).
fn next_producer() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 63);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Mapper {
    /// A mapper for a peer that negotiated `schemes` and announced `peer_prefix`.
    pub fn new(schemes: Vec<Scheme>, peer_prefix: &str) -> Mapper {
        Mapper {
            schemes,
            peer_prefix: peer_prefix.to_string(),
            peer_uid: Some(rustix::process::getuid().as_raw()),
            refused: Vec::new(),
            cache: HashMap::new(),
            order: VecDeque::new(),
            max: DEFAULT_MAX_MAPPINGS,
            producer: next_producer(),
        }
    }

    /// Sets the user id of the peer process (`None`: unknown). An `shm://` object is mapped
    /// only when its owner is that user, so a peer of another user cannot have us map
    /// objects it does not own (ours, or another process's); with an unknown peer user every
    /// `shm://` is refused (`memfd://` descriptors are the peer's own by construction). The
    /// default, for a mapper built with [`Mapper::new`], is this process's own user.
    pub fn with_peer_uid(mut self, uid: Option<u32>) -> Mapper {
        self.peer_uid = uid;
        self
    }

    /// Refuses every later handle of `scheme` from this peer with `ERR_ATTACHMENT` naming
    /// `why`, and forgets its cached mappings (views already handed out stay valid). The
    /// session calls this when a mapping of the scheme faulted (SPEC §7).
    pub fn refuse(&mut self, scheme: Scheme, why: impl Into<String>) {
        if !self.refused.iter().any(|(s, _)| *s == scheme) {
            self.refused.push((scheme, why.into()));
        }
        let cache = &mut self.cache;
        self.order.retain(|(s, k)| {
            if *s == scheme {
                cache.remove(k);
                false
            } else {
                true
            }
        });
    }

    /// Whether `scheme` is refused for the rest of the connection.
    pub fn is_refused(&self, scheme: Scheme) -> bool {
        self.refused.iter().any(|(s, _)| *s == scheme)
    }

    /// How many segments are mapped.
    pub fn mapped(&self) -> usize {
        self.cache.len()
    }

    /// Resolves one URI. `fds` are the descriptors passed with the message (for `memfd://`).
    /// Every refusal is `ERR_ATTACHMENT` naming the reason; nothing is mapped then.
    ///
    /// What is common to every scheme happens here (negotiated? refused after a fault? the
    /// cache, the range, the lease); the rest is the scheme's
    /// [`HandleScheme`](super::scheme::HandleScheme).
    pub fn resolve(
        &mut self,
        uri: &AttachmentUri,
        fds: &[OwnedFd],
        lease: &Arc<Lease>,
    ) -> Result<View> {
        let scheme = uri.scheme_id();
        if !self.schemes.contains(&scheme) {
            return Err(Error::attachment(format!(
                "{}: scheme not negotiated",
                scheme.name()
            )));
        }
        if let Some((_, why)) = self.refused.iter().find(|(s, _)| *s == scheme) {
            return Err(Error::attachment(format!(
                "{}: refused for the rest of this connection ({why})",
                scheme.name()
            )));
        }
        let handler = scheme.handler();
        let peer = Peer {
            shm_prefix: &self.peer_prefix,
            uid: self.peer_uid,
            fds,
        };
        let key = handler.key(uri, &peer)?;
        let map = match self.cache.get(&key) {
            // The same object again: its mapping is reused (a new descriptor just closes).
            Some(m) => m.clone(),
            None => handler.import(uri, &peer)?,
        };
        if map.faulted() {
            return Err(Error::attachment(format!(
                "{}: segment shrank while mapped",
                scheme.name()
            )));
        }
        let end = uri.end();
        if end > map.len() as u64 {
            return Err(Error::attachment(format!(
                "{}: bytes {}..{end} lie outside the object of {} bytes",
                uri.scheme(),
                uri.offset(),
                map.len()
            )));
        }
        self.remember(scheme, key, map.clone());
        lease.hold(scheme, &map);
        Ok(View {
            map,
            off: uri.offset() as usize,
            len: uri.size() as usize,
            lease: lease.clone(),
        })
    }

    fn remember(&mut self, scheme: Scheme, key: ImportKey, map: Arc<Mapping>) {
        if self.cache.insert(key.clone(), map).is_none() {
            self.order.push_back((scheme, key));
            while self.order.len() > self.max {
                if let Some((_, old)) = self.order.pop_front() {
                    // Views still hold their mapping; only the cache entry goes.
                    self.cache.remove(&old);
                }
            }
        }
    }

    /// Forgets every mapping (the peer disconnected). Views already handed out stay valid.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.order.clear();
        self.release_producer();
    }

    fn release_producer(&self) {
        for s in &self.schemes {
            s.handler().release(self.producer);
        }
    }

    /// Resolves a `cuda-ipc://` URI into a view of the peer's device memory (SPEC §7): the
    /// device is found by its UUID, the handle opened once per process and cached under this
    /// peer, and the device's stream ([`super::cuda::for_device`]) made to wait on the
    /// producer's event. The view holds `lease` until dropped. Refusals are `ERR_ATTACHMENT`
    /// naming the cause (scheme not negotiated, device not visible, handle that does not
    /// open: another PID/IPC namespace, a freed allocation).
    #[cfg(feature = "cuda")]
    pub fn resolve_device(
        &mut self,
        uri: &AttachmentUri,
        lease: &Arc<Lease>,
    ) -> Result<super::cuda::DeviceView> {
        let super::uri::Target::CudaIpc { device_uuid, .. } = uri.target() else {
            return Err(Error::attachment(format!("not a cuda-ipc URI: {uri}")));
        };
        if !self.schemes.contains(&Scheme::CudaIpc) {
            return Err(Error::attachment("cuda-ipc: scheme not negotiated"));
        }
        let cuda = super::cuda::for_device(device_uuid)?;
        let view = cuda.import(self.producer, uri)?;
        let lease = lease.clone();
        Ok(view.on_release(move || drop(lease)))
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        // The peer's session is over: its device mappings close once their last view goes.
        self.release_producer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::pool::{Pool, PoolConfig};
    use crate::ErrorCode;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn lease(counter: &Arc<AtomicUsize>) -> Arc<Lease> {
        let c = counter.clone();
        Lease::new(5, move |r: Released| {
            assert_eq!(r.faulted, None);
            c.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn shm_round_trip_and_release_once() {
        let pool = Pool::new(PoolConfig::new(Scheme::Shm, 1 << 20));
        let mut r = pool.try_alloc(5000).unwrap().unwrap();
        r.copy_from_slice(&[3u8; 5000]);
        let name = r.segment().name().to_string();
        let mut m = Mapper::new(vec![Scheme::Shm], &pool.config().prefix);
        let acks = Arc::new(AtomicUsize::new(0));
        let l = lease(&acks);
        let uri = AttachmentUri::shm(&name, 100, 4900).unwrap();
        let v = m.resolve(&uri, &[], &l).unwrap();
        let v2 = m.resolve(&uri, &[], &l).unwrap();
        assert_eq!(m.mapped(), 1, "mapped once");
        drop(l);
        assert_eq!(v.len(), 4900);
        assert!(v.iter().all(|&b| b == 3));
        let b = v2.into_bytes();
        drop(v);
        assert_eq!(
            acks.load(Ordering::SeqCst),
            0,
            "a Bytes still holds the lease"
        );
        assert_eq!(b.len(), 4900);
        drop(b);
        assert_eq!(acks.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn refusals() {
        let pool = Pool::new(PoolConfig::new(Scheme::Shm, 1 << 20));
        let r = pool.try_alloc(100).unwrap().unwrap();
        let name = r.segment().name().to_string();
        let acks = Arc::new(AtomicUsize::new(0));
        let l = lease(&acks);
        let code = |res: Result<View>| res.unwrap_err().code();
        let seg_len = r.segment().len() as u64;
        let mut m = Mapper::new(vec![Scheme::Shm], &pool.config().prefix);
        assert_eq!(
            code(m.resolve(&AttachmentUri::shm(&name, seg_len, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        assert_eq!(
            code(m.resolve(&AttachmentUri::shm("xcp-other-1", 0, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        let missing = format!("{}999999", pool.config().prefix);
        assert_eq!(
            code(m.resolve(&AttachmentUri::shm(&missing, 0, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        assert_eq!(
            code(m.resolve(&AttachmentUri::memfd(0, 0, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        let mut no_shm = Mapper::new(vec![Scheme::Memfd], &pool.config().prefix);
        assert_eq!(
            code(no_shm.resolve(&AttachmentUri::shm(&name, 0, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        let mut memfd = Mapper::new(vec![Scheme::Memfd], "");
        assert_eq!(
            code(memfd.resolve(&AttachmentUri::memfd(1, 0, 1).unwrap(), &[], &l)),
            ErrorCode::ERR_ATTACHMENT
        );
        assert_eq!(m.mapped(), 0, "nothing mapped on refusal");
    }

    #[test]
    fn memfd_by_descriptor() {
        let pool = Pool::new(PoolConfig::new(Scheme::Memfd, 1 << 20));
        let mut r = pool.try_alloc(10).unwrap().unwrap();
        r.copy_from_slice(b"0123456789");
        let fd = r.segment().fd().try_clone().unwrap();
        let fd2 = r.segment().fd().try_clone().unwrap();
        let acks = Arc::new(AtomicUsize::new(0));
        let l = lease(&acks);
        let mut m = Mapper::new(vec![Scheme::Memfd], "");
        let v = m
            .resolve(&AttachmentUri::memfd(0, 2, 3).unwrap(), &[fd], &l)
            .unwrap();
        assert_eq!(&v[..], b"234");
        let v = m
            .resolve(&AttachmentUri::memfd(0, 0, 1).unwrap(), &[fd2], &l)
            .unwrap();
        assert_eq!(&v[..], b"0");
        assert_eq!(m.mapped(), 1, "the same memfd maps once");
    }

    /// A peer may only name shm objects its own user owns: a peer of another user that
    /// announces our prefix cannot have us map our own segments; an unknown peer user maps
    /// no shm object at all.
    #[test]
    fn shm_objects_of_another_user_are_refused() {
        let pool = Pool::new(PoolConfig::new(Scheme::Shm, 1 << 20));
        let mut r = pool.try_alloc(64).unwrap().unwrap();
        r.copy_from_slice(&[5u8; 64]);
        let name = r.segment().name().to_string();
        let uri = AttachmentUri::shm(&name, 0, 64).unwrap();
        let acks = Arc::new(AtomicUsize::new(0));
        let l = lease(&acks);
        let me = rustix::process::getuid().as_raw();
        let other = me.wrapping_add(4242);
        let mut stranger =
            Mapper::new(vec![Scheme::Shm], &pool.config().prefix).with_peer_uid(Some(other));
        let e = stranger.resolve(&uri, &[], &l).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
        assert!(
            e.to_string().contains(&format!(
                "belongs to uid {me}, not to the peer (uid {other})"
            )),
            "{e}"
        );
        let mut unknown = Mapper::new(vec![Scheme::Shm], &pool.config().prefix).with_peer_uid(None);
        let e = unknown.resolve(&uri, &[], &l).unwrap_err();
        assert!(e.to_string().contains("user is unknown"), "{e}");
        assert_eq!(stranger.mapped() + unknown.mapped(), 0);
        let mut same =
            Mapper::new(vec![Scheme::Shm], &pool.config().prefix).with_peer_uid(Some(me));
        assert!(same.resolve(&uri, &[], &l).unwrap().iter().all(|&b| b == 5));
    }
}
