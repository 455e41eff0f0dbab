use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

#[test]
fn uri_from_an_export_record() {
    let rec = ExportRecord {
        device_uuid: [0x11; 16],
        mem_handle: [0xab; 64],
        base: 0x7f00_0000_0000,
        alloc_size: 1 << 20,
        ptr: 0x7f00_0000_1000,
        len: 4096,
    };
    let u = rec.uri(Some([0x0c; 64])).unwrap();
    assert_eq!((u.offset(), u.size()), (0x1000, 4096));
    let text = u.to_string();
    assert!(text.starts_with("cuda-ipc://GPU-11111111-1111-1111-1111-111111111111/abab"));
    assert!(text.ends_with(&format!("?event={}#4096,4096", "0c".repeat(64))));
    assert_eq!(AttachmentUri::parse(&text).unwrap(), u);
    // Outside the allocation: refused before any URI is made.
    let bad = ExportRecord {
        len: (1 << 20) - 0x1000 + 1,
        ..rec.clone()
    };
    assert!(bad.uri(None).is_err());
    let below = ExportRecord {
        ptr: rec.base - 1,
        ..rec
    };
    assert!(below.check().is_err());
}

#[test]
fn export_cache_is_keyed_by_base_and_buffer_id() {
    let mut c = ExportCache::default();
    c.insert(0x1000, 7, [1; 64]);
    assert_eq!(c.get(0x1000, 7), Some([1; 64]));
    // The same base after a free and a new allocation: another buffer id, no stale handle.
    assert_eq!(c.get(0x1000, 8), None);
    c.insert(0x1000, 8, [2; 64]);
    assert_eq!(c.get(0x1000, 8), Some([2; 64]));
    assert_eq!(c.len(), 1);
    c.remove_base(0x1000);
    assert!(c.is_empty());
}

struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn import_cache_opens_once_and_closes_after_the_last_producer() {
    let closed = Arc::new(AtomicUsize::new(0));
    let opens = AtomicUsize::new(0);
    let mut cache: ImportCache<Counted> = ImportCache::default();
    let open = || {
        opens.fetch_add(1, Ordering::SeqCst);
        Ok(Counted(closed.clone()))
    };
    let (u, h) = ([9u8; 16], [3u8; 64]);
    let a = cache.get_or_open(1, u, h, open).unwrap();
    let b = cache.get_or_open(2, u, h, open).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "a second producer reuses the one open");
    assert_eq!(opens.load(Ordering::SeqCst), 1);
    // Another handle or another device is another mapping.
    cache.get_or_open(1, u, [4; 64], open).unwrap();
    cache.get_or_open(1, [8; 16], h, open).unwrap();
    assert_eq!((opens.load(Ordering::SeqCst), cache.mappings()), (3, 3));
    // A failed open caches nothing.
    let err = cache.get_or_open(1, u, [5; 64], || Err(attach_err("no")));
    assert!(err.is_err());
    assert_eq!(cache.mappings(), 3);

    drop((a, b));
    assert_eq!(cache.release_producer(1), 2, "the two only producer 1 used");
    assert_eq!(closed.load(Ordering::SeqCst), 2);
    assert_eq!(cache.mappings(), 1);
    assert_eq!(cache.release_producer(2), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 3);
    assert_eq!(cache.release_producer(2), 0);

    // A view that outlives its producer keeps the mapping until it is dropped.
    let v = cache.get_or_open(3, u, h, open).unwrap();
    cache.release_producer(3);
    assert_eq!(closed.load(Ordering::SeqCst), 3);
    drop(v);
    assert_eq!(closed.load(Ordering::SeqCst), 4);
}

#[test]
fn import_cache_events_are_per_producer() {
    let mut cache: ImportCache<()> = ImportCache::default();
    let opens = AtomicUsize::new(0);
    let open = || {
        opens.fetch_add(1, Ordering::SeqCst);
        Ok(5u32)
    };
    let e1 = cache.event(1, [1; 64], open).unwrap();
    let e2 = cache.event(1, [1; 64], open).unwrap();
    assert!(Arc::ptr_eq(&e1, &e2));
    cache.event(2, [1; 64], open).unwrap();
    assert_eq!(opens.load(Ordering::SeqCst), 2);
    cache.release_producer(1);
    cache.event(1, [1; 64], open).unwrap();
    assert_eq!(opens.load(Ordering::SeqCst), 3);
}

#[test]
fn dlpack_cuda_tensor_fields_and_deleter() {
    let drops = Arc::new(AtomicUsize::new(0));
    let dev = DLDevice {
        device_type: DEVICE_CUDA,
        device_id: 3,
    };
    let ptr = 0x7f12_3400_0000u64;
    let t = device_tensor(
        ptr,
        24,
        dev,
        DlDataType::F32,
        vec![2, 3],
        Counted(drops.clone()),
    )
    .unwrap();
    // SAFETY: `t` was just made and is owned by this test until its deleter runs.
    unsafe {
        let m = &*t;
        assert_eq!(m.version, DLPackVersion { major: 1, minor: 0 });
        assert_eq!(m.flags, DLPACK_FLAG_BITMASK_READ_ONLY);
        assert_eq!(m.dl_tensor.data as usize as u64, ptr);
        assert_eq!(m.dl_tensor.device, dev);
        assert_eq!((m.dl_tensor.ndim, m.dl_tensor.byte_offset), (2, 0));
        assert_eq!(
            (
                m.dl_tensor.dtype.code,
                m.dl_tensor.dtype.bits,
                m.dl_tensor.dtype.lanes
            ),
            (2, 32, 1)
        );
        assert_eq!(std::slice::from_raw_parts(m.dl_tensor.shape, 2), &[2, 3]);
        assert_eq!(std::slice::from_raw_parts(m.dl_tensor.strides, 2), &[3, 1]);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        (m.deleter.unwrap())(t);
    }
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "the owner went with the tensor"
    );
    // Too many bytes for the view, and a bad dtype, are refused (and drop the owner).
    let e = device_tensor(ptr, 23, dev, DlDataType::F32, vec![2, 3], ()).unwrap_err();
    assert!(e.to_string().contains("addresses 24 bytes"), "{e}");
    assert!(device_tensor(ptr, 8, dev, DlDataType::new(99, 8, 1), vec![1], ()).is_err());
}

#[test]
fn dlpack_descriptor_of_a_device_tensor_by_handle() {
    let rec = ExportRecord {
        device_uuid: [0x22; 16],
        mem_handle: [0x33; 64],
        base: 0x1000,
        alloc_size: 4096,
        ptr: 0x1100,
        len: 64,
    };
    let uri = rec.uri(Some([0x44; 64])).unwrap();
    let d = cuda_descriptor(uri.clone(), 1, DlDataType::F16, vec![4, 8]).unwrap();
    assert_eq!((d.device_type, d.device_id), (DEVICE_CUDA, 1));
    assert_eq!(d.strides, vec![8, 1]);
    // The SPEC §5.5 body round-trips, the URI with it.
    let back = DlpackDescriptor::decode(d.encode().unwrap()).unwrap();
    assert_eq!(back, d);
    assert_eq!(back.data, DlData::Uri(uri.clone()));
    // 4 x 9 f16 = 72 bytes > 64: refused; so is a host scheme.
    assert!(cuda_descriptor(uri, 1, DlDataType::F16, vec![4, 9]).is_err());
    let shm = AttachmentUri::shm("xcp-x", 0, 64).unwrap();
    assert!(cuda_descriptor(shm, 0, DlDataType::U8, vec![64]).is_err());
}

#[test]
fn dlpack_strided_device_tensor_checks_offset_and_strides() {
    let dev = DLDevice {
        device_type: DEVICE_CUDA,
        device_id: 0,
    };
    // A 2 x 2 f32 column of a 2 x 4 matrix, 8 bytes in: strides (4, 1), extent
    // 8 + (1·4 + 1·1 + 1)·4 = 32 bytes.
    let t = device_tensor_strided(
        0x9000,
        32,
        dev,
        DlDataType::F32,
        vec![2, 2],
        Some(vec![4, 1]),
        8,
        (),
    )
    .unwrap();
    // SAFETY: `t` was just made; its deleter runs once below.
    unsafe {
        assert_eq!((*t).dl_tensor.byte_offset, 8);
        assert_eq!(
            std::slice::from_raw_parts((*t).dl_tensor.strides, 2),
            &[4, 1]
        );
        ((*t).deleter.unwrap())(t);
    }
    let e = device_tensor_strided(
        0x9000,
        31,
        dev,
        DlDataType::F32,
        vec![2, 2],
        Some(vec![4, 1]),
        8,
        (),
    )
    .unwrap_err();
    assert!(e.to_string().contains("addresses 32 bytes"), "{e}");
}

#[test]
fn unavailable_is_typed_inside_the_error() {
    let e: Error = Unavailable::LibraryNotFound.into();
    assert_eq!(unavailable(&e), Some(&Unavailable::LibraryNotFound));
    assert!(e.to_string().contains("libcuda.so"), "{e}");
    assert_eq!(unavailable(&Error::invalid("x")), None);
}

#[test]
fn load_never_panics_and_says_why() {
    match Cuda::load(0) {
        Ok(c) => println!("CUDA present: {c:?}"),
        Err(e) => {
            let why = unavailable(&e).expect("a typed reason");
            println!("skipped: {why}");
        }
    }
    // A second call gives the same outcome (the probe runs once).
    assert_eq!(probe().is_ok(), Cuda::load(0).is_ok() || probe().is_ok());
}

#[test]
fn vmm_sizes_round_up_to_the_granularity() {
    assert_eq!(round_to_granularity(1, 2 << 20), Some(2 << 20));
    assert_eq!(round_to_granularity(2 << 20, 2 << 20), Some(2 << 20));
    assert_eq!(round_to_granularity((2 << 20) + 1, 2 << 20), Some(4 << 20));
    assert_eq!(round_to_granularity(0, 0), Some(1));
    assert_eq!(round_to_granularity(u64::MAX, 1 << 21), None);
}

#[test]
fn namespaces_of_this_process_match() {
    let ns = namespaces();
    check_peer_namespaces(&ns).unwrap();
    let e = check_peer_namespaces("pid:[1] ipc:[2]").unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    assert_eq!(
        format_uuid(&[0xab; 16]),
        "GPU-abababab-abab-abab-abab-abababababab"
    );
}

/// The session's resolver of `cuda-ipc://` attachments refuses, with `ERR_ATTACHMENT`
/// naming the cause, a URI whose scheme was not negotiated and one naming a device this
/// process does not see (on a machine without CUDA: CUDA not usable); the lease of a
/// refused message is never released by it.
#[test]
fn session_resolver_refusals() {
    use crate::attach::{Lease, Mapper, Scheme};
    let uri = AttachmentUri::parse(&format!(
        "cuda-ipc://GPU-00000000-0000-0000-0000-0000000000ff/{}#0,16",
        "ab".repeat(64)
    ))
    .unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let r = released.clone();
    let lease = Lease::new(9, move |_| {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let mut no_cuda = Mapper::new(vec![Scheme::Shm], "xcp-x-");
    let e = no_cuda.resolve_device(&uri, &lease).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    assert!(e.to_string().contains("not negotiated"), "{e}");
    let mut cuda = Mapper::new(vec![Scheme::CudaIpc], "");
    let e = cuda.resolve_device(&uri, &lease).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    let why = e.to_string();
    assert!(
        why.contains("not usable in this process") || why.contains("is not visible"),
        "{why}"
    );
    // A host URI is not a device one.
    let shm = AttachmentUri::parse("shm://xcp-x-1#0,1").unwrap();
    assert!(cuda.resolve_device(&shm, &lease).is_err());
    // And the host resolver does not take device URIs.
    let e = cuda.resolve(&uri, &[], &lease).unwrap_err();
    assert!(e.to_string().contains("no host view"), "{e}");
    drop(lease);
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the lease itself still works"
    );
}
