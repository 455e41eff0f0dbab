//! One conformance suite for every handle scheme (`xcp::attach::HandleScheme`): each case runs
//! for `shm`, `memfd`, `local` and `cuda-ipc` (whose host-side cases say why they skip where
//! no GPU is present, and which has no host view anyway). The receiver is the real
//! [`Mapper`] with the real SIGBUS guard; the exporter is this process, playing the peer,
//! hostile where the case says so.
//!
//! Cases: round trip through `export` and `resolve` (mapped once), lease and ACK (released
//! once, when the last view and `Bytes` go), range checks, names outside the peer's prefix or
//! unknown objects, a foreign owner, descriptor mismatches, shrink before map, shrink while
//! mapped (no crash: zeros, `faulted`, NACK-worthy release, the scheme refused afterwards),
//! the exporter gone while a view is held, and a scheme that was not negotiated.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use xcp::attach::map::Released;
use xcp::attach::scheme::{handler, LocalScheme};
use xcp::attach::segment::Segment;
use xcp::attach::uri::{AttachmentUri, Target};
use xcp::attach::{Lease, Mapper, Pool, PoolConfig, Scheme};
use xcp::ErrorCode;

const LEN: usize = 256 << 10;

/// The schemes under test; each case runs for all of them.
const SCHEMES: [Scheme; 4] = [Scheme::Shm, Scheme::Memfd, Scheme::Local, Scheme::CudaIpc];

/// Why a scheme's host-side cases cannot run here, if they cannot.
fn skip(scheme: Scheme) -> Option<String> {
    match scheme {
        Scheme::CudaIpc => Some(
            "cuda-ipc: device memory has no host mapping; its device cases are in tests/cuda.rs \
             and need a GPU (here only the host-side refusal is checked)"
                .to_string(),
        ),
        _ => None,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The local scheme the mapper resolves `local://` with (the process's one instance).
fn local() -> &'static LocalScheme {
    xcp::attach::scheme::local()
}

fn prefix() -> String {
    format!("xcpconf-{}-", std::process::id())
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// An object of the peer, made as its exporter makes it, and what names it.
struct Obj {
    /// The descriptor the peer keeps (to shrink the object with).
    fd: OwnedFd,
    uri: AttachmentUri,
    /// The descriptors that travel with the frame.
    fds: Vec<OwnedFd>,
    /// Keeps a shm object's name until the case drops it (the exporter going away).
    _seg: Option<Segment>,
    local_id: Option<u64>,
}

impl Drop for Obj {
    fn drop(&mut self) {
        if let Some(id) = self.local_id {
            local().unregister(id);
        }
    }
}

fn unsealed_memfd(len: usize, bytes: &[u8]) -> OwnedFd {
    let fd = rustix::fs::memfd_create("xcp-conf", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len as u64).unwrap();
    rustix::io::write(&fd, bytes).unwrap();
    fd
}

/// A `len`-byte object of `scheme` holding `bytes`, named by `[off, off + size)`.
fn object(scheme: Scheme, len: usize, bytes: &[u8], off: u64, size: u64) -> Obj {
    match scheme {
        Scheme::Shm => {
            let name = format!("{}{}", prefix(), unique());
            let seg = Segment::create_shm(&name, len).expect("shm segment");
            rustix::io::pwrite(seg.fd(), bytes, 0).unwrap();
            Obj {
                fd: seg.fd().try_clone().unwrap(),
                uri: AttachmentUri::shm(&name, off, size).unwrap(),
                fds: Vec::new(),
                _seg: Some(seg),
                local_id: None,
            }
        }
        Scheme::Memfd => {
            let seg = Segment::create_memfd("xcp-conf", len).expect("memfd segment");
            rustix::io::pwrite(seg.fd(), bytes, 0).unwrap();
            Obj {
                fd: seg.fd().try_clone().unwrap(),
                uri: AttachmentUri::memfd(0, off, size).unwrap(),
                fds: vec![seg.fd().try_clone().unwrap()],
                _seg: Some(seg),
                local_id: None,
            }
        }
        Scheme::Local => {
            let fd = unsealed_memfd(len, bytes);
            let id = local().register(fd.try_clone().unwrap());
            Obj {
                fd,
                uri: AttachmentUri::new(Target::Local { id }, off, size).unwrap(),
                fds: Vec::new(),
                _seg: None,
                local_id: Some(id),
            }
        }
        other => panic!("no host object for {other:?}"),
    }
}

fn mapper(scheme: Scheme) -> Mapper {
    Mapper::new(vec![scheme], &prefix())
}

/// A lease that records every release.
fn lease(id: u64) -> (Arc<Lease>, Arc<Mutex<Vec<Released>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    (Lease::new(id, move |r| g.lock().unwrap().push(r)), got)
}

fn refused(r: xcp::Result<xcp::attach::View>, needle: &str, scheme: Scheme) {
    match r {
        Ok(v) => panic!("{scheme:?}: expected a refusal naming {needle:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{scheme:?}: {e}");
            assert_eq!(
                e.violation(),
                Some(xcp::Violation::Attachment),
                "{scheme:?}: {e}"
            );
            assert!(
                e.to_string().contains(needle),
                "{scheme:?}: {e} does not name {needle:?}"
            );
        }
    }
}

/// Runs `case` for every scheme whose host-side cases can run, and says which skipped.
fn each(name: &str, case: impl Fn(Scheme)) {
    for s in SCHEMES {
        if let Some(why) = skip(s) {
            eprintln!("{name}: {s:?} skipped: {why}");
            if s == Scheme::CudaIpc {
                cuda_host_side_refuses(s);
            }
            continue;
        }
        case(s);
    }
}

/// What runs for `cuda-ipc` everywhere: its host side refuses, naming why, and exports no
/// host region.
fn cuda_host_side_refuses(s: Scheme) {
    let uri = AttachmentUri::parse(&format!(
        "cuda-ipc://GPU-00000000-0000-0000-0000-000000000000/{}#0,1",
        "ab".repeat(64)
    ))
    .unwrap();
    let (l, _) = lease(1);
    refused(mapper(s).resolve(&uri, &[], &l), "cuda-ipc", s);
    let pool = Pool::new(PoolConfig::new(Scheme::Memfd, 1 << 20));
    let region = pool.try_alloc(100).unwrap().unwrap();
    let mut fds = Vec::new();
    assert!(handler(s).export(&region, &mut fds).unwrap().is_none());
    assert!(fds.is_empty());
}

#[test]
fn round_trip_through_export_and_resolve() {
    each("round_trip", |s| {
        let pool_scheme = if s == Scheme::Local { Scheme::Memfd } else { s };
        let pool = Pool::new(PoolConfig::new(pool_scheme, 8 << 20));
        let mut region = pool.try_alloc(LEN).unwrap().unwrap();
        let want = pattern(LEN, 7);
        region.copy_from_slice(&want);
        let mut fds = Vec::new();
        let uri = handler(s)
            .export(&region, &mut fds)
            .unwrap()
            .expect("a host region is exported");
        assert_eq!(uri.scheme(), s.name());
        assert_eq!((uri.offset(), uri.size()), (0, LEN as u64));
        assert_eq!(fds.len(), usize::from(s == Scheme::Memfd), "{s:?}");
        let mut m = Mapper::new(vec![s], &pool.config().prefix);
        let (l, _) = lease(1);
        let v = m.resolve(&uri, &fds, &l).unwrap();
        assert_eq!(&v[..], &want[..], "{s:?}");
        assert!(!v.faulted());
        // Again (for memfd: a new descriptor of the same file): mapped once.
        let fds2: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let v2 = m.resolve(&uri, &fds2, &l).unwrap();
        assert_eq!(m.mapped(), 1, "{s:?}: mapped once");
        assert_eq!(v2.as_ptr(), v.as_ptr(), "{s:?}: the same mapping");
    });
}

#[test]
fn lease_releases_once_when_the_last_view_goes() {
    each("lease", |s| {
        let want = pattern(LEN, 3);
        let o = object(s, LEN, &want, 4096, 1000);
        let mut m = mapper(s);
        let (l, got) = lease(42);
        let a = m.resolve(&o.uri, &o.fds, &l).unwrap();
        let b = m.resolve(&o.uri, &o.fds, &l).unwrap().into_bytes();
        drop(l);
        assert_eq!(&a[..], &want[4096..5096]);
        drop(a);
        assert!(
            got.lock().unwrap().is_empty(),
            "{s:?}: a Bytes still holds it"
        );
        assert_eq!(&b[..], &want[4096..5096]);
        drop(b);
        assert_eq!(
            *got.lock().unwrap(),
            vec![Released {
                msg_id: 42,
                faulted: None
            }],
            "{s:?}"
        );
        // A disarmed lease (the message was refused) reports nothing.
        let (l, got) = lease(43);
        let v = m.resolve(&o.uri, &o.fds, &l).unwrap();
        l.disarm();
        drop((v, l));
        assert!(got.lock().unwrap().is_empty(), "{s:?}");
    });
}

#[test]
fn ranges_outside_the_object_are_refused() {
    each("ranges", |s| {
        let bytes = pattern(LEN, 1);
        for (off, size, ok) in [
            (0, LEN as u64, true),
            (LEN as u64 - 1, 1, true),
            (0, LEN as u64 + 1, false),
            (LEN as u64, 1, false),
            (u64::MAX - 1, 1, false),
        ] {
            let o = object(s, LEN, &bytes, off, size);
            let mut m = mapper(s);
            let (l, _) = lease(1);
            let r = m.resolve(&o.uri, &o.fds, &l);
            if ok {
                let v = r.unwrap();
                assert_eq!(&v[..], &bytes[off as usize..(off + size) as usize]);
            } else {
                refused(r, "lie outside the object", s);
                assert_eq!(m.mapped(), 0, "{s:?}: nothing mapped on refusal");
            }
        }
    });
}

#[test]
fn names_outside_the_peer_are_refused() {
    each("names", |s| {
        let (l, _) = lease(1);
        let mut m = mapper(s);
        let cases: Vec<(AttachmentUri, &str)> = match s {
            Scheme::Shm => vec![
                (
                    AttachmentUri::shm("xcp-1-deadbeef-0", 0, 1).unwrap(),
                    "outside the peer's prefix",
                ),
                (
                    AttachmentUri::shm(format!("{}missing", prefix()), 0, 1).unwrap(),
                    "shm object",
                ),
                // Our own objects: not under the peer's prefix.
                (
                    AttachmentUri::shm(format!("{}0", xcp::attach::process_prefix()), 0, 1)
                        .unwrap(),
                    "outside the peer's prefix",
                ),
            ],
            Scheme::Memfd => vec![(AttachmentUri::memfd(0, 0, 1).unwrap(), "descriptors came")],
            Scheme::Local => vec![(
                AttachmentUri::new(Target::Local { id: u64::MAX }, 0, 1).unwrap(),
                "no object",
            )],
            _ => unreachable!(),
        };
        for (uri, needle) in cases {
            refused(m.resolve(&uri, &[], &l), needle, s);
        }
        // A peer that announced no prefix can name no shm object at all.
        if s == Scheme::Shm {
            let o = object(s, 4096, &[1; 10], 0, 10);
            let mut m = Mapper::new(vec![s], "");
            refused(m.resolve(&o.uri, &[], &l), "outside the peer's prefix", s);
        }
        assert_eq!(m.mapped(), 0);
        // Text the URI parser refuses is ERR_ATTACHMENT as well.
        for bad in [
            "shm://../../etc/passwd#0,100",
            "memfd://x#0,1",
            "local://-1#0,1",
            "ftp://x#0,1",
        ] {
            let e = AttachmentUri::parse(bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{bad}: {e}");
        }
    });
}

#[test]
fn objects_of_a_foreign_owner_are_refused() {
    each("foreign owner", |s| {
        let bytes = pattern(4096, 2);
        let o = object(s, 4096, &bytes, 0, 4096);
        let (l, _) = lease(1);
        let me = rustix::process::getuid().as_raw();
        match s {
            // The object is ours (this process's user), not the peer's.
            Scheme::Shm => {
                let mut m = mapper(s).with_peer_uid(Some(me.wrapping_add(4242)));
                refused(m.resolve(&o.uri, &[], &l), "not to the peer", s);
                let mut m = mapper(s).with_peer_uid(None);
                refused(m.resolve(&o.uri, &[], &l), "user is unknown", s);
                assert_eq!(m.mapped(), 0);
            }
            // A descriptor is the peer's by construction (it passed it), and a local object
            // is this process's: the owner is not checked, and the bytes map.
            Scheme::Memfd | Scheme::Local => {
                let mut m = mapper(s).with_peer_uid(Some(me.wrapping_add(4242)));
                assert_eq!(&m.resolve(&o.uri, &o.fds, &l).unwrap()[..], &bytes[..]);
            }
            _ => unreachable!(),
        }
    });
}

#[test]
fn descriptor_mismatches_are_refused() {
    each("descriptors", |s| {
        let bytes = pattern(4096, 5);
        let (l, _) = lease(1);
        let mut m = mapper(s);
        match s {
            Scheme::Memfd => {
                let o = object(s, 4096, &bytes, 0, 10);
                // An index past those passed.
                let past = AttachmentUri::memfd(1, 0, 10).unwrap();
                refused(m.resolve(&past, &o.fds, &l), "1 descriptors came", s);
                // A descriptor that is not shared memory: a pipe.
                let (r, _w) = std::io::pipe().unwrap();
                let r = OwnedFd::from(r);
                refused(
                    m.resolve(&AttachmentUri::memfd(0, 0, 1).unwrap(), &[r], &l),
                    "memfd 0",
                    s,
                );
                // An unsealed memfd: refused before anything is mapped.
                let fd = unsealed_memfd(4096, &bytes);
                refused(
                    m.resolve(&AttachmentUri::memfd(0, 0, 10).unwrap(), &[fd], &l),
                    "not sealed against shrinking",
                    s,
                );
                // A shm object's descriptor passed as a memfd: it cannot carry seals.
                let shm = object(Scheme::Shm, 4096, &bytes, 0, 10);
                refused(
                    m.resolve(
                        &AttachmentUri::memfd(0, 0, 10).unwrap(),
                        &[shm.fd.try_clone().unwrap()],
                        &l,
                    ),
                    "memfd 0",
                    s,
                );
                assert_eq!(m.mapped(), 0);
                // The fair one maps.
                assert_eq!(&m.resolve(&o.uri, &o.fds, &l).unwrap()[..], &bytes[..10]);
            }
            // Names, not descriptors: descriptors passed along are not looked at.
            Scheme::Shm | Scheme::Local => {
                let o = object(s, 4096, &bytes, 0, 10);
                let extra = vec![unsealed_memfd(10, &[0; 10])];
                assert_eq!(&m.resolve(&o.uri, &extra, &l).unwrap()[..], &bytes[..10]);
            }
            _ => unreachable!(),
        }
    });
}

fn shrink(o: &Obj, to: u64) -> rustix::io::Result<()> {
    rustix::fs::ftruncate(&o.fd, to)
}

#[test]
fn shrink_before_map() {
    each("shrink before map", |s| {
        let bytes = pattern(LEN, 9);
        let o = object(s, LEN, &bytes, 0, LEN as u64);
        let r = shrink(&o, 4096);
        let mut m = mapper(s);
        let (l, _) = lease(1);
        match s {
            // Sealed by its exporter: it cannot shrink, and maps whole.
            Scheme::Memfd => {
                assert_eq!(r, Err(rustix::io::Errno::PERM), "{s:?}: sealed");
                assert_eq!(&m.resolve(&o.uri, &o.fds, &l).unwrap()[..], &bytes[..]);
            }
            // The object is now smaller than the region: refused, nothing mapped.
            _ => {
                r.unwrap();
                refused(m.resolve(&o.uri, &o.fds, &l), "lie outside the object", s);
                assert_eq!(m.mapped(), 0);
            }
        }
    });
}

#[test]
fn shrink_while_mapped_never_kills_the_receiver() {
    each("shrink while mapped", |s| {
        let bytes = pattern(LEN, 11);
        let o = object(s, LEN, &bytes, 0, LEN as u64);
        let mut m = mapper(s);
        let (l, got) = lease(7);
        let v = m.resolve(&o.uri, &o.fds, &l).unwrap();
        drop(l);
        // The receiver has read the first page: it is mapped in.
        assert_eq!(&v[..4096], &bytes[..4096]);
        let before = xcp::attach::guard::faults_absorbed();
        match shrink(&o, 8192) {
            Err(e) => {
                assert_eq!(s, Scheme::Memfd, "{s:?}: {e}");
                assert_eq!(e, rustix::io::Errno::PERM, "sealed");
                assert_eq!(&v[..], &bytes[..], "a sealed memfd keeps its bytes");
                assert!(!v.faulted());
                drop(v);
                assert_eq!(got.lock().unwrap()[0].faulted, None);
            }
            Ok(()) => {
                assert_ne!(s, Scheme::Memfd, "a memfd must be sealed");
                // Read to the end: no SIGBUS; what lies past the new end reads as zeros.
                let copy = v.to_vec();
                assert_eq!(&copy[..8192], &bytes[..8192], "{s:?}");
                assert!(copy[8192..].iter().all(|&b| b == 0), "{s:?}: zeros");
                assert!(v.faulted(), "{s:?}: the view knows it faulted");
                assert!(xcp::attach::guard::faults_absorbed() > before);
                // The same object again, before the lease goes: refused.
                let (l2, _) = lease(8);
                refused(m.resolve(&o.uri, &o.fds, &l2), "shrank while mapped", s);
                drop(v);
                assert_eq!(
                    *got.lock().unwrap(),
                    vec![Released {
                        msg_id: 7,
                        faulted: Some(s)
                    }],
                    "{s:?}: released as faulted (the session NACKs it)"
                );
                // What the session does then: the scheme is refused for the connection.
                m.refuse(s, "a segment shrank while mapped");
                let fresh = object(s, 4096, &bytes[..4096], 0, 4096);
                refused(
                    m.resolve(&fresh.uri, &fresh.fds, &l2),
                    "refused for the rest of this connection",
                    s,
                );
                assert_eq!(m.mapped(), 0);
            }
        }
    });
}

#[test]
fn the_exporter_gone_while_a_view_is_held() {
    each("exporter gone", |s| {
        let bytes = pattern(LEN, 13);
        let o = object(s, LEN, &bytes, 100, 5000);
        let mut m = mapper(s);
        let (l, got) = lease(9);
        let v = m.resolve(&o.uri, &o.fds, &l).unwrap();
        drop(l);
        // Unlinked (shm), closed (memfd), unregistered (local): the mapping stays.
        drop(o);
        assert_eq!(&v[..], &bytes[100..5100], "{s:?}");
        assert!(!v.faulted());
        drop(v);
        assert_eq!(got.lock().unwrap().len(), 1);
        m.clear();
        assert_eq!(m.mapped(), 0);
    });
}

#[test]
fn schemes_not_negotiated_are_refused() {
    each("not negotiated", |s| {
        let o = object(s, 4096, &[1; 4096], 0, 16);
        let others: Vec<Scheme> = SCHEMES.into_iter().filter(|x| *x != s).collect();
        let mut m = Mapper::new(others, &prefix());
        let (l, _) = lease(1);
        refused(m.resolve(&o.uri, &o.fds, &l), "scheme not negotiated", s);
        let mut none = Mapper::new(Vec::new(), &prefix());
        refused(none.resolve(&o.uri, &o.fds, &l), "scheme not negotiated", s);
    });
}

#[test]
fn negotiation_by_link() {
    use xcp::attach::scheme::Link;
    let links = [
        (
            Link {
                unix: true,
                remote: false,
            },
            "unix",
        ),
        (
            Link {
                unix: false,
                remote: false,
            },
            "tcp",
        ),
        (
            Link {
                unix: false,
                remote: true,
            },
            "remote",
        ),
    ];
    let counted = AtomicUsize::new(0);
    for (link, what) in links {
        for s in SCHEMES {
            let offered = handler(s).negotiate(link);
            let want = match s {
                Scheme::Shm => !link.remote,
                Scheme::Memfd => link.unix && !link.remote,
                Scheme::Local => false,
                Scheme::CudaIpc => !link.remote && xcp::attach::scheme::cuda_usable(),
                _ => unreachable!(),
            };
            assert_eq!(offered, want, "{s:?} on {what}");
            assert_eq!(handler(s).id(), s);
            assert_eq!(Scheme::from_name(handler(s).name()), Some(s));
            counted.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(counted.into_inner(), 12);
    assert_eq!(
        Scheme::from_name("cuda-vmm"),
        None,
        "unknown names are ignored"
    );
}
