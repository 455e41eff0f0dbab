//! GPU tensors by handle (feature `cuda`). Every test first loads CUDA; where there is no
//! driver, no device or no NVRTC it prints `skipped: <reason>` and passes, so the suite runs on
//! machines without a GPU. The tests without a GPU part (URI, caches, DLPack fields, kernel
//! algorithm) are unit tests in `src/attach/cuda.rs` and `src/attach/cuda/kernels.rs`.
//!
//! On a GPU machine the binary can be run alone (it needs no Rust toolchain):
//! `cuda-<hash> --test-threads=1 --nocapture`. The two-process test re-runs this binary as
//! the consumer.
#![cfg(feature = "cuda")]

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use half::f16;
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use xcp::attach::cuda::kernels::{pattern_word, Kernels};
use xcp::attach::cuda::{self, Cuda};
use xcp::attach::uri::{AttachmentUri, Target};
use xcp::codec::dlpack::{DlDataType, DlpackDescriptor, DEVICE_CUDA};
use xcp::codec::tensor::{encode_f16_from_f32, encode_qnt8, TensorView};
use xcp::ErrorCode;

/// The device, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Arc<Cuda>> {
    match Cuda::load(0) {
        Ok(c) => Some(c),
        Err(e) => {
            let why = cuda::unavailable(&e)
                .map(|u| u.to_string())
                .unwrap_or_else(|| e.to_string());
            println!("{test}: skipped: {why}");
            None
        }
    }
}

fn kernels(test: &str) -> Option<Kernels> {
    let c = gpu(test)?;
    match Kernels::load(&c) {
        Ok(k) => Some(k),
        Err(e) => {
            let why = cuda::unavailable(&e)
                .map(|u| u.to_string())
                .unwrap_or_else(|| e.to_string());
            println!("{test}: skipped: {why}");
            None
        }
    }
}

#[test]
fn load_reports_a_typed_reason_or_a_device() {
    match Cuda::load(0) {
        Ok(c) => {
            assert_eq!(c.ordinal(), 0);
            assert!(c.uuid_string().starts_with("GPU-"));
            assert!(cuda::visible_devices().unwrap().contains(&c.uuid()));
            println!("CUDA {:?} on {}", cuda::probe(), c.uuid_string());
        }
        Err(e) => {
            let why = cuda::unavailable(&e).expect("a missing CUDA is an Unavailable reason");
            println!("skipped: {why}");
            // Nothing to release, and no panic either.
            assert_eq!(cuda::release_producer(1), 0);
        }
    }
    // Far past the last device: an Unavailable reason too (NoDevice), never a panic.
    let e = Cuda::load(10_000).unwrap_err();
    assert!(cuda::unavailable(&e).is_some(), "{e}");
}

#[test]
fn same_process_handle_is_used_directly_and_dlpack_releases() {
    let Some(c) = gpu("same_process") else { return };
    let buf = c.alloc(1 << 20).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
    buf.write(&data).unwrap();
    let ex = c.export(buf.ptr() + 4096, 8192, None).unwrap();
    assert_eq!((ex.uri().offset(), ex.uri().size()), (4096, 8192));
    let Target::CudaIpc {
        device_uuid, event, ..
    } = ex.uri().target()
    else {
        panic!("not cuda-ipc")
    };
    assert_eq!(*device_uuid, c.uuid());
    // `write` waited for its copy: nothing is pending, so no event is needed.
    assert!(event.is_none() && !ex.has_event());
    // A second export of the same allocation reuses the handle.
    let ex2 = c.export(buf.ptr(), 16, None).unwrap();
    let handle = |u: &AttachmentUri| match u.target() {
        Target::CudaIpc { mem_handle, .. } => *mem_handle,
        _ => unreachable!(),
    };
    assert_eq!(handle(ex.uri()), handle(ex2.uri()));

    let uri = AttachmentUri::parse(&ex.uri().to_string()).unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let r = released.clone();
    let view = c.import(1, &uri).unwrap().on_release(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    assert!(view.is_local());
    assert_eq!(view.ptr(), buf.ptr() + 4096);
    let mut back = vec![0u8; 8192];
    // SAFETY: the view addresses 8192 bytes of the live buffer.
    unsafe { c.copy_dtoh(&mut back, view.ptr()) }.unwrap();
    assert_eq!(back, data[4096..4096 + 8192]);
    let t = view.into_dlpack(DlDataType::F32, vec![2048]).unwrap();
    // SAFETY: `t` is live until its deleter runs below.
    unsafe {
        assert_eq!((*t).dl_tensor.device.device_type, DEVICE_CUDA);
        assert_eq!((*t).dl_tensor.data as usize as u64, buf.ptr() + 4096);
        assert_eq!(released.load(Ordering::SeqCst), 0);
        ((*t).deleter.unwrap())(t);
    }
    assert_eq!(released.load(Ordering::SeqCst), 1, "the deleter ACKs");

    // The same through a SPEC §5.5 DLPACK body naming the bytes by cuda-ipc URI.
    let ex3 = c.export(buf.ptr(), 1024, None).unwrap();
    let desc = ex3
        .dlpack_descriptor(c.ordinal() as i32, DlDataType::U8, vec![4, 256])
        .unwrap();
    let desc = DlpackDescriptor::decode(desc.encode().unwrap()).unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let a = acked.clone();
    let t = c
        .import_dlpack(2, &desc, move || {
            a.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    // SAFETY: `t` is live until its deleter runs below.
    unsafe {
        assert_eq!((*t).dl_tensor.data as usize as u64, buf.ptr());
        assert_eq!((*t).dl_tensor.device.device_type, DEVICE_CUDA);
        ((*t).deleter.unwrap())(t);
    }
    assert_eq!(acked.load(Ordering::SeqCst), 1);
}

#[test]
fn refusals_are_explicit() {
    let Some(c) = gpu("refusals") else { return };
    // Another device set: a UUID no device here has.
    let other = AttachmentUri::cuda_ipc([0xee; 16], [1; 64], None, 0, 16).unwrap();
    let e = c.import(7, &other).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    assert!(e.to_string().contains("not visible"), "{e}");
    // An invalid handle on our device.
    let bad = AttachmentUri::cuda_ipc(c.uuid(), [0x5a; 64], None, 0, 16).unwrap();
    let e = c.import(7, &bad).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    assert!(e.to_string().contains("does not open"), "{e}");
    // Past the end of the allocation.
    let buf = c.alloc(4096).unwrap();
    let ex = c.export(buf.ptr(), 4096, None).unwrap();
    let Target::CudaIpc { mem_handle, .. } = ex.uri().target() else {
        unreachable!()
    };
    let past = AttachmentUri::cuda_ipc(c.uuid(), *mem_handle, None, 4096, 1).unwrap();
    let e = c.import(7, &past).unwrap_err();
    assert!(e.to_string().contains("outside the allocation"), "{e}");
    // Not a device pointer.
    let host = [0u8; 16];
    assert!(c.export(host.as_ptr() as u64, 16, None).is_err());
    // A freed allocation.
    let uri = ex.uri().clone();
    drop(ex);
    drop(buf);
    let e = c.import(7, &uri).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{e}");
    // Another namespace.
    assert!(cuda::check_peer_namespaces("pid:[0] ipc:[0]").is_err());
}

/// The consumer half of `two_process_handoff`: runs only when the parent set the URI.
#[test]
fn two_process_handoff_child() {
    let Ok(uri) = std::env::var("XCP_CUDA_CHILD_URI") else {
        return;
    };
    let words: u64 = std::env::var("XCP_CUDA_CHILD_WORDS")
        .unwrap()
        .parse()
        .unwrap();
    let k = kernels("child").expect("the child has the parent's GPU");
    let c = k.cuda().clone();
    let uri = AttachmentUri::parse(&uri).unwrap();
    let view = c.import(1, &uri).unwrap();
    assert!(!view.is_local());
    // SAFETY: the view addresses `words` u32 of the producer's live buffer.
    let bad = unsafe { k.count_mismatch(view.ptr(), words, 42) }.unwrap();
    // A second import of the same handle hits the cache (CUDA refuses a second open).
    let again = c.import(1, &uri).unwrap();
    assert_eq!(again.ptr(), view.ptr());
    drop((view, again));
    assert_eq!(cuda::release_producer(1), 1);
    println!("XCP_CHILD_MISMATCHES={bad}");
}

#[test]
fn two_process_handoff() {
    if std::env::var("XCP_CUDA_CHILD_URI").is_ok() {
        return;
    }
    let Some(k) = kernels("two_process") else {
        return;
    };
    let c = k.cuda().clone();
    let words: u64 = 64 << 18; // 64 MiB
    let buf = c.alloc(words as usize * 4).unwrap();
    // The producer's stream is held by a gate until the consumer has imported, so the fill
    // is still pending at export: the URI must carry the event, and the consumer's check can
    // only see the pattern if its stream really waits on it.
    let gate = Box::into_raw(Box::new(AtomicBool::new(false)));
    // SAFETY: the callback only reads the gate, which is freed after the stream is drained.
    check_cu(unsafe {
        cudarc::driver::sys::cuLaunchHostFunc(c.stream().cu_stream(), Some(hold), gate.cast())
    });
    // SAFETY: the buffer holds `words` u32.
    unsafe { k.fill_pattern(buf.ptr(), words, 42) }.unwrap();
    let ex = c.export(buf.ptr(), words * 4, None).unwrap();
    assert!(ex.has_event(), "work was pending: the URI needs the event");
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "two_process_handoff_child", "--nocapture"])
        .env("XCP_CUDA_CHILD_URI", ex.uri().to_string())
        .env("XCP_CUDA_CHILD_WORDS", words.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Long enough for the consumer to import and queue its check behind the event.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: the gate is alive until freed below.
    unsafe { (*gate).store(true, Ordering::SeqCst) };
    let out = child.wait_with_output().unwrap();
    c.synchronize().unwrap();
    // SAFETY: the stream ran the callback (synchronised above); nothing else holds the gate.
    drop(unsafe { Box::from_raw(gate) });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    assert!(text.contains("XCP_CHILD_MISMATCHES=0"), "{text}");
    // The producer's own check agrees.
    // SAFETY: as above.
    assert_eq!(
        unsafe { k.count_mismatch(buf.ptr(), words, 42) }.unwrap(),
        0
    );
    // SAFETY: as above; one word changed, one mismatch.
    unsafe { c.copy_htod(buf.ptr() + 8, &[0xff; 4]) }.unwrap();
    let expect = pattern_word(2, 42);
    // SAFETY: as above.
    let n = unsafe { k.count_mismatch(buf.ptr(), words, 42) }.unwrap();
    assert_eq!(n, u64::from(expect != u32::MAX));
}

/// A session offers `cuda-ipc` exactly where this process can use CUDA: never on a machine
/// without a driver or device (the peer then never gets a device handle), always with one.
#[test]
fn sessions_offer_cuda_ipc_only_where_cuda_works() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("unix://{}", dir.path().join("o.sock").display());
        let server = xcp::Server::bind(&url, xcp::SessionConfig::default())
            .await
            .unwrap();
        let accept = tokio::spawn(async move { server.accept().await.map(|_| ()) });
        let s = xcp::Session::connect(&url, xcp::SessionConfig::default())
            .await
            .unwrap();
        let attach = s.negotiated().attach.clone();
        assert!(attach.contains(&xcp::attach::Scheme::Memfd), "{attach:?}");
        assert_eq!(
            attach.contains(&xcp::attach::Scheme::CudaIpc),
            cuda::usable(),
            "{attach:?}, CUDA usable: {}",
            cuda::usable()
        );
        println!("negotiated {attach:?} (CUDA usable: {})", cuda::usable());
        accept.await.unwrap().unwrap();
    });
}

/// The consumer half of `session_handoff`: a server whose sessions take `cuda-ipc://`
/// attachments, check them on the device and reply with the count of wrong words.
#[test]
fn session_handoff_child() {
    let Ok(url) = std::env::var("XCP_CUDA_SESSION_URL") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        // The device the session imports through: its stream is the one that waited on the
        // producer's event, so the check runs on it.
        let uuid = cuda::visible_devices().unwrap()[0];
        let k = Kernels::load(&cuda::for_device(&uuid).unwrap()).unwrap();
        let server = xcp::Server::bind(&url, xcp::SessionConfig::default())
            .await
            .unwrap();
        println!("XCP_CHILD_LISTENING");
        let s = server.accept().await.unwrap();
        let mut handled = 0;
        while let Ok(m) = s.recv().await {
            let mut reply = xcp::Ether::new("checked", Default::default());
            match m.device_view("kv") {
                Some(v) => {
                    // SAFETY: the view addresses `len` bytes of the producer's live buffer.
                    let bad = unsafe { k.count_mismatch(v.ptr(), v.len() / 4, 42) }.unwrap();
                    reply.payload.insert("mismatches".into(), bad.into());
                    reply.payload.insert("len".into(), v.len().into());
                }
                None => {
                    reply
                        .payload
                        .insert("error".into(), "no device view".into());
                }
            }
            let out = xcp::conn::Outgoing::ether(&reply, xcp::codec::CodecId::JSON).unwrap();
            s.reply(&m, out).await.unwrap();
            // Dropping the message drops its device view: the session ACKs it.
            drop(m);
            handled += 1;
        }
        println!("XCP_CHILD_HANDLED={handled}");
    });
}

/// A device tensor through the session layer, between two processes: the producer's
/// `request_device` sends a `cuda-ipc://` attachment, the consumer's session maps it into a
/// device view (checked on the device there), its drop ACKs, and the ACK frees the export.
/// A session that did not negotiate `cuda-ipc` refuses with `ERR_ATTACHMENT`.
#[test]
fn session_handoff() {
    if std::env::var("XCP_CUDA_SESSION_URL").is_ok() {
        return;
    }
    let Some(k) = kernels("session_handoff") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("s.sock").display());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "session_handoff_child", "--nocapture"])
        .env("XCP_CUDA_SESSION_URL", &url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    assert!(
        lines.any(|l| l.unwrap().contains("XCP_CHILD_LISTENING")),
        "the consumer did not start"
    );
    let c = k.cuda().clone();
    let words: u64 = 16 << 18; // 16 MiB
    let buf = c.alloc(words as usize * 4).unwrap();
    // SAFETY: the buffer holds `words` u32.
    unsafe { k.fill_pattern(buf.ptr(), words, 42) }.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = xcp::Session::connect(&url, xcp::SessionConfig::default())
            .await
            .unwrap();
        assert!(
            s.negotiated()
                .attach
                .contains(&xcp::attach::Scheme::CudaIpc),
            "{:?}",
            s.negotiated().attach
        );
        for round in 0..3 {
            // The whole buffer, then a slice of it at an offset (the cached handle again).
            let (off, len) = if round == 0 {
                (0, words * 4)
            } else {
                (4096, (words - 2048) * 4)
            };
            let ex = c.export(buf.ptr() + off, len, None).unwrap();
            let att = xcp::ether::Attachment {
                id: "kv".into(),
                dtype: "uint32".into(),
                ..Default::default()
            };
            let reply = s
                .request_device(
                    xcp::Ether::new("kv", Default::default()),
                    xcp::codec::CodecId::JSON,
                    vec![(att, ex)],
                )
                .await
                .unwrap();
            let p = reply.ether().unwrap().payload;
            assert_eq!(p.get("error"), None, "{p:?}");
            assert_eq!(p["len"].as_u64(), Some(len), "{p:?}");
            // A slice 4096 bytes in sees the pattern from word 1024 on: all of it differs
            // from the pattern counted from 0, so the check is not vacuous.
            let want = if off == 0 { 0 } else { len / 4 };
            let bad = p["mismatches"].as_u64().unwrap();
            assert!(
                if off == 0 {
                    bad == want
                } else {
                    bad > want / 2
                },
                "round {round}: {bad} wrong words of {}",
                len / 4
            );
        }
        // The consumer ACKs as it drops each view; every ACK frees its export's IPC event.
        let t = std::time::Instant::now();
        while c.exports_in_flight() > 0 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "no ACK came back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        // A session without cuda-ipc: a clear refusal, nothing sent.
        let mut cfg = xcp::SessionConfig::default();
        cfg.attach.schemes = vec![xcp::attach::Scheme::Shm];
        let plain = xcp::Session::connect(&url, cfg).await;
        // The consumer serves one session; this one may be refused or never served, but
        // `request_device` must fail before sending whatever the server does.
        if let Ok(plain) = plain {
            let ex = c.export(buf.ptr(), 4096, None).unwrap();
            let e = plain
                .request_device(
                    xcp::Ether::new("kv", Default::default()),
                    xcp::codec::CodecId::JSON,
                    vec![(Default::default(), ex)],
                )
                .await
                .unwrap_err();
            assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{e}");
            assert!(e.to_string().contains("cuda-ipc was not negotiated"), "{e}");
        }
        s.close().await.unwrap();
    });
    let out = child.wait_with_output().unwrap();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    assert!(out.status.success(), "consumer failed: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("XCP_CHILD_HANDLED=3")),
        "{rest:?}"
    );
}

/// A host callback on a stream that holds it until `gate` (an `AtomicBool`) is set.
unsafe extern "C" fn hold(gate: *mut std::ffi::c_void) {
    // SAFETY: the caller passes a live AtomicBool that outlives the callback.
    let gate = unsafe { &*(gate as *const AtomicBool) };
    while !gate.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn check_cu(r: cudarc::driver::sys::CUresult) {
    assert_eq!(r, cudarc::driver::sys::CUresult::CUDA_SUCCESS);
}

/// The consumer half of `vmm_fd_handoff`: maps the inherited descriptor.
#[test]
fn vmm_fd_handoff_child() {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    let Ok(fd) = std::env::var("XCP_CUDA_VMM_FD") else {
        return;
    };
    let size: u64 = std::env::var("XCP_CUDA_VMM_SIZE").unwrap().parse().unwrap();
    let k = kernels("vmm child").expect("the child has the parent's GPU");
    // SAFETY: the parent passed this descriptor to us (inherited, close-on-exec cleared) and
    // nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd.parse().unwrap()) };
    let view = k.cuda().import_vmm_fd(fd.as_fd(), size, 0, size).unwrap();
    drop(fd);
    // SAFETY: the view addresses `size` bytes of the mapped allocation.
    let bad = unsafe { k.count_mismatch(view.ptr(), size / 4, 7) }.unwrap();
    println!("XCP_VMM_MISMATCHES={bad}");
}

#[test]
fn vmm_fd_handoff() {
    use std::os::fd::AsFd;
    if std::env::var("XCP_CUDA_VMM_FD").is_ok() {
        return;
    }
    let Some(k) = kernels("vmm") else { return };
    let c = k.cuda().clone();
    let buf = match c.alloc_vmm(3 << 20) {
        Ok(b) => b,
        Err(e) => {
            println!("vmm: skipped: this device or driver has no VMM POSIX-fd allocations: {e}");
            return;
        }
    };
    let size = buf.alloc_size();
    assert!(size >= 3 << 20);
    // SAFETY: the buffer is mapped for `size` bytes.
    unsafe { k.fill_pattern(buf.ptr(), size / 4, 7) }.unwrap();
    let fd = buf.export_fd().unwrap();

    // In this process: a second mapping of the same memory.
    let view = c.import_vmm_fd(fd.as_fd(), size, 4096, 4096).unwrap();
    assert_ne!(view.ptr(), buf.ptr() + 4096);
    let mut back = vec![0u8; 4096];
    // SAFETY: the view addresses 4096 mapped bytes.
    unsafe { c.copy_dtoh(&mut back, view.ptr()) }.unwrap();
    let want: Vec<u8> = (1024..2048u64)
        .flat_map(|i| pattern_word(i, 7).to_le_bytes())
        .collect();
    assert_eq!(back, want);
    let e = c.import_vmm_fd(fd.as_fd(), size, size, 1).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
    drop(view);

    // In another process: the descriptor is inherited.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty()).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "vmm_fd_handoff_child", "--nocapture"])
        .env(
            "XCP_CUDA_VMM_FD",
            std::os::fd::AsRawFd::as_raw_fd(&fd).to_string(),
        )
        .env("XCP_CUDA_VMM_SIZE", size.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    assert!(text.contains("XCP_VMM_MISMATCHES=0"), "{text}");
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `rows` rows of `len` values with row `zero` all zeros.
fn zero_row(rows: usize, len: usize, zero: usize) -> Vec<f32> {
    let mut v = values(rows * len, 18);
    v[zero * len..(zero + 1) * len].fill(0.0);
    v
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let b = rng.next_u32();
            match i % 5 {
                // Any finite value.
                0 => f32::from_bits(if b & 0x7f80_0000 == 0x7f80_0000 {
                    b ^ 0x4000_0000
                } else {
                    b
                }),
                _ => (b as i32 as f32) / 1e7,
            }
        })
        .collect()
}

#[test]
fn kernels_match_the_cpu_codecs() {
    let Some(k) = kernels("kernels") else { return };
    // Row lengths for both paths of the QNT8 kernels: not a multiple of 4 (general), and
    // groups of 4, 32, 256 threads per row and rows longer than the registers hold (fast).
    for (rows, row_len) in [
        (333u32, 1027u32),
        (50, 12),
        (1000, 128),
        (257, 4096),
        (7, 8192),
    ] {
        kernels_match_on(&k, rows, row_len);
    }
}

fn kernels_match_on(k: &Kernels, rows: u32, row_len: u32) {
    let c = k.cuda().clone();
    let vals = values((rows * row_len) as usize, 9 + u64::from(row_len));
    let src = c.alloc(vals.len() * 4).unwrap();
    src.write(bytemuck::cast_slice(&vals)).unwrap();
    let shape = [rows, row_len];

    // F32 -> F16: the TENSOR_F16 body of the CPU encoder, byte for byte.
    // SAFETY: `src` holds the tensor's f32.
    let body = unsafe { k.encode_f16_body(&shape, src.ptr()) }.unwrap();
    assert_eq!(
        body.read().unwrap(),
        &encode_f16_from_f32(&shape, &vals, false).unwrap()[..],
        "f16 body {rows}x{row_len}"
    );
    // The one-value-at-a-time path: a source 4 bytes off 16-byte alignment.
    let n = vals.len() as u64 - 1;
    let h = c.alloc(n as usize * 2).unwrap();
    // SAFETY: `src` holds n + 1 f32, `h` n halves.
    unsafe { k.f32_to_f16(src.ptr() + 4, h.ptr(), n) }.unwrap();
    let want: Vec<u16> = vals[1..]
        .iter()
        .map(|&v| f16::from_f32(v).to_bits())
        .collect();
    assert_eq!(h.read().unwrap(), bytemuck::cast_slice::<u16, u8>(&want));

    // F16 -> F32 exact.
    let halves: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    let hbuf = c.alloc(halves.len() * 2).unwrap();
    hbuf.write(bytemuck::cast_slice(&halves)).unwrap();
    let fbuf = c.alloc(halves.len() * 4).unwrap();
    // SAFETY: sizes as allocated.
    unsafe { k.f16_to_f32(hbuf.ptr(), fbuf.ptr(), halves.len() as u64) }.unwrap();
    let back: Vec<f32> = f32s(&fbuf.read().unwrap());
    for (h, f) in halves.iter().zip(&back) {
        assert_eq!(h.to_f32().to_bits(), f.to_bits());
    }

    // QNT8 rows: the TENSOR_QNT8 (row_qnt) body of the CPU encoder, byte for byte.
    // SAFETY: `src` holds the tensor's f32.
    let q = unsafe { k.encode_qnt8_body(&shape, src.ptr()) }.unwrap();
    let cpu = encode_qnt8(&shape, &vals, true, false).unwrap();
    assert!(q.read().unwrap() == cpu[..], "qnt8 body {rows}x{row_len}");

    // Dequantise on the device: TensorView::to_f32_vec of the same body, bit for bit.
    let out = c.alloc(vals.len() * 4).unwrap();
    // SAFETY: the body's data start after the 32-byte header.
    unsafe { k.qnt8_rows_to_f32(q.ptr() + 32, out.ptr(), u64::from(rows), row_len) }.unwrap();
    let deq: Vec<f32> = f32s(&out.read().unwrap());
    let want = TensorView::parse(cpu, None).unwrap().to_f32_vec();
    assert!(
        deq.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "dequantised {rows}x{row_len}"
    );

    // A NaN is refused, naming its row.
    let mut bad = vals.clone();
    bad[(5 * row_len + 3) as usize] = f32::NAN;
    src.write(bytemuck::cast_slice(&bad)).unwrap();
    // SAFETY: as above.
    let e = unsafe { k.encode_qnt8_body(&shape, src.ptr()) }.unwrap_err();
    assert!(e.to_string().contains("row 5"), "{e}");
    println!("kernels {rows}x{row_len}: equal to the CPU codecs");
}

/// The harness that runs the kernel sources on the host (see the file's header).
const HOST_EMU: &str = include_str!("support/cuda_host_emu.cpp");

/// Builds the host emulator of the kernels, or says why it cannot (no C++20 compiler).
fn host_emulator(dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    use xcp::attach::cuda::kernels::{CHECK_CU, QNT8_CU};
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-w"];
    // A probe first: a missing compiler or C++20 library is a skip, a kernel that does not
    // compile is a failure.
    std::fs::write(dir.join("probe.cpp"), "#include <barrier>\nint main() {}\n").unwrap();
    let probe = Command::new(&cxx)
        .args(flags)
        .arg(dir.join("probe.cpp"))
        .arg("-o")
        .arg(dir.join("probe"))
        .output()
        .map_err(|e| format!("no C++ compiler ({cxx}: {e})"))?;
    if !probe.status.success() {
        return Err(format!("{cxx} cannot build C++20 with <barrier>"));
    }
    std::fs::write(dir.join("qnt8.cu"), QNT8_CU).unwrap();
    std::fs::write(dir.join("check.cu"), CHECK_CU).unwrap();
    std::fs::write(dir.join("emu.cpp"), HOST_EMU).unwrap();
    let exe = dir.join("emu");
    let out = Command::new(&cxx)
        .args(flags)
        .arg("-I")
        .arg(dir)
        .arg(dir.join("emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the kernel sources do not compile on the host:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(exe)
}

/// Runs `kernels/qnt8.cu` and `kernels/check.cu` on the host (threads for a block, a barrier
/// for `__syncthreads`) and compares with the CPU codecs bit for bit: the QNT8 kernels'
/// reduction, the three scale paths, the byte layout, grid striding and the NaN report, and
/// the pattern kernels, without a GPU.
#[test]
fn kernel_sources_match_the_cpu_codecs_on_a_host_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let exe = match host_emulator(dir.path()) {
        Ok(e) => e,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let special: Vec<f32> = [
        [0.0, -0.0, 0.0, 0.0, 0.0, 0.0],
        [127.0, 0.5, 1.5, -0.5, -2.5, -127.0],
        [f32::MAX, -f32::MAX, 1.0, 3.0, -7.5, 0.0],
        [
            f32::from_bits(1),
            -f32::from_bits(300),
            1e-40,
            0.0,
            2e-45,
            -1e-39,
        ],
        [1e-36, -3e-37, 5e-38, 1e-37, 0.0, 0.0],
    ]
    .concat();
    let mut subnormal = values(9 * 256, 3);
    for v in &mut subnormal {
        *v = f32::from_bits(v.to_bits() & 0x807f_ffff);
    }
    let cases: Vec<(u32, u32, u32, Vec<f32>)> = vec![
        (5, 6, 2, special),
        (64, 1027, 5, values(64 * 1027, 11)),
        (9, 256, 9, subnormal),
        (7, 257, 3, values(7 * 257, 12)),
        (4, 1, 4, values(4, 13)),
        // The fast path (row_len a multiple of 4): groups of 2, 64 (a zero row among them),
        // 128 and 256 threads per row, and rows longer than the registers hold.
        (33, 8, 3, values(33 * 8, 14)),
        (6, 256, 2, zero_row(6, 256, 4)),
        (6, 512, 4, values(6 * 512, 15)),
        (3, 4096, 2, values(3 * 4096, 16)),
        (3, 8192, 2, values(3 * 8192, 17)),
    ];
    let p = |n: &str| dir.path().join(n);
    for (rows, len, grid, vals) in cases {
        let input: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(p("in.f32"), input).unwrap();
        let out = Command::new(&exe)
            .arg(rows.to_string())
            .arg(len.to_string())
            .arg(grid.to_string())
            .args([p("in.f32"), p("out.q"), p("out.f32")])
            .args(["1000", "42"])
            .arg(p("out.pattern"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}");
        assert!(text.contains("bad=0\n"), "{text}");
        let cpu = encode_qnt8(&[rows, len], &vals, true, false).unwrap();
        let q = std::fs::read(p("out.q")).unwrap();
        assert!(
            q == cpu[32..],
            "QNT8 rows {rows}x{len} differ from the CPU codec"
        );
        let want = TensorView::parse(cpu, None).unwrap().to_f32_vec();
        let got = f32s(&std::fs::read(p("out.f32")).unwrap());
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "dequantised {rows}x{len} differ"
        );
        let pattern = std::fs::read(p("out.pattern")).unwrap();
        for (i, w) in pattern.chunks_exact(4).enumerate() {
            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            assert_eq!(w, pattern_word(i as u64, 42), "pattern word {i}");
        }
        assert!(text.contains("mismatch=0 mismatch_after_flip=1"), "{text}");
    }
    // A NaN in row 2 and an infinity in row 3: the first bad row is reported.
    let mut v = [1.0f32; 16];
    v[9] = f32::NAN;
    v[12] = f32::INFINITY;
    let input: Vec<u8> = v.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(p("in.f32"), input).unwrap();
    let out = Command::new(&exe)
        .args(["4", "4", "2"])
        .args([p("in.f32"), p("out.q"), p("out.f32")])
        .args(["0", "1"])
        .arg(p("out.pattern"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bad=3\n"), "row 2 (+1): {text}");
}
