//! GPU tensor hand-off between two processes on one GPU host (feature `cuda`): a producer
//! fills a device buffer (1 GiB by default) and hands it to a consumer process by a
//! `cuda-ipc://` handle; the consumer imports it (one `cuIpcOpenMemHandle` per process, then
//! cached), waits on the producer's IPC event where there is one and checks every word on the
//! device with a kernel; only an 8-byte count comes back to the host. Then it measures:
//!
//! - **handle**: the hand-off round trip, two ways: **through the session**
//!   (`Session::request_device`: the URI is an attachment's `uri`, the consumer's session maps
//!   it into a device view and ACKs when the view is dropped) and **by hand** (the URI in the
//!   Ether's payload, imported with `Cuda::import`), the latter broken down into export,
//!   import and the consumer's host wait, with the producer's stream idle or with a write
//!   still pending (then the URI carries an IPC event), and for 1 MiB, 64 MiB and the whole
//!   tensor; against a PING round trip on the same session;
//! - **copy**: the same bytes the classic way: device → host copy in the producer, an inline
//!   TENSOR_F32 message over the same socket, host → device copy in the consumer, reply;
//! - **kernels**: F32→F16 and per-row QNT8 quantise/dequantise on the device against the CPU
//!   codecs (bit for bit), with GB/s against a device-to-device copy of the same source.
//!
//! ```text
//! cargo build --release --features cuda --example gpu_handoff
//! target/release/examples/gpu_handoff                     # 1 GiB, 20 hand-offs
//! target/release/examples/gpu_handoff --mib 64 --reps 5   # a quick look
//! ```
//!
//! Without a GPU it prints why and exits 0. The last line is a JSON summary.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Map, Value};

use xcp::attach::cuda::kernels::Kernels;
use xcp::attach::cuda::{self, Cuda, DeviceBuffer};
use xcp::attach::uri::AttachmentUri;
use xcp::codec::tensor::{
    encode_f16_from_f32, encode_qnt8, DType, TensorHeader, TensorView, HEADER_LEN,
};
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::{Ether, Server, Session, SessionConfig};

const SEED: u32 = 42;

#[derive(Parser, Debug, Clone)]
#[command(about = "GPU tensor hand-off by CUDA IPC vs D2H + socket + H2D")]
struct Opts {
    /// Size of the tensor in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Hand-offs measured (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Copy round trips measured (each moves the whole tensor twice).
    #[arg(long, default_value_t = 5)]
    copy_reps: usize,
    /// Elements of the kernel benchmark (f32).
    #[arg(long, default_value_t = 1 << 26)]
    kernel_elems: u64,
    /// Row length of the QNT8 benchmark.
    #[arg(long, default_value_t = 4096)]
    row_len: u32,
    /// Device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Run as the consumer (internal: the producer starts it).
    #[arg(long, hide = true)]
    consumer: bool,
    #[arg(long, hide = true)]
    listen: Option<String>,
}

fn config(bytes: u64) -> SessionConfig {
    let mut c = SessionConfig::default();
    c.conn.limits.max_message_bytes = bytes + (1 << 20);
    // The copy path reassembles the whole tensor: room for it (the default is 1 GiB).
    c.server_reassembly_bytes = c.server_reassembly_bytes.max(2 * (bytes + (1 << 20)));
    c.request_timeout = Duration::from_secs(600);
    c
}

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let code = if opts.consumer {
        rt.block_on(consumer(opts))
    } else {
        rt.block_on(producer(opts))
    };
    std::process::exit(code);
}

fn load(device: usize) -> Result<Kernels, String> {
    let why = |e: xcp::Error| {
        cuda::unavailable(&e)
            .map(|u| u.to_string())
            .unwrap_or_else(|| e.to_string())
    };
    // The process's shared Cuda of this device: the one the session imports through, so the
    // consumer's checks run on the stream that waited on the producer's events.
    let uuid = *cuda::visible_devices()
        .map_err(why)?
        .get(device)
        .ok_or(format!("no device {device}"))?;
    let c = cuda::for_device(&uuid).map_err(why)?;
    Kernels::load(&c).map_err(why)
}

// ---------------------------------------------------------------------------------------
// The consumer.

async fn consumer(opts: Opts) -> i32 {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let k = match load(opts.device) {
        Ok(k) => Arc::new(k),
        Err(why) => {
            println!("error {why}");
            return 1;
        }
    };
    let bytes = opts.mib << 20;
    let server = Server::bind(opts.listen.as_deref().unwrap(), config(bytes))
        .await
        .expect("bind");
    println!("listening on {}", server.local_url());
    static PRODUCERS: AtomicU64 = AtomicU64::new(1);
    while let Ok(s) = server.accept().await {
        let producer = PRODUCERS.fetch_add(1, Ordering::Relaxed);
        let k = k.clone();
        tokio::spawn(async move {
            consume(&s, producer, &k, bytes).await;
            // The producer's session ended: unmap everything it handed us.
            cuda::release_producer(producer);
        });
    }
    0
}

async fn consume(s: &Session, producer: u64, k: &Kernels, bytes: u64) {
    let c = k.cuda().clone();
    // The landing buffer of the copy path (allocated once, as a real consumer would).
    let landing = c.alloc(bytes as usize).expect("landing buffer");
    let mut ns_checked = false;
    while let Ok(m) = s.recv().await {
        let answer = if m.header.body_codec == CodecId::TENSOR_F32 {
            land(k, &landing, &m.body)
        } else if let Some(v) = m.device_view("t") {
            // Through the session: it imported the handle and made the stream wait already.
            let mut out = Map::new();
            if m.ether()
                .is_ok_and(|e| e.payload.get("verify") == Some(&Value::Bool(true)))
            {
                // SAFETY: the view addresses `len` bytes of the producer's live buffer.
                match unsafe { k.count_mismatch(v.ptr(), v.len() / 4, SEED) } {
                    Ok(bad) => {
                        out.insert("mismatches".into(), bad.into());
                    }
                    Err(e) => {
                        out.insert("error".into(), e.to_string().into());
                    }
                }
            }
            Ok(out)
        } else {
            match m.ether() {
                Ok(e) if e.kind == "gpu.handoff" => handoff(k, producer, &e, &mut ns_checked),
                Ok(e) if e.kind == "gpu.noop" => Ok(Map::new()),
                Ok(e) => Err(format!("unexpected kind {:?}", e.kind)),
                Err(e) => Err(format!("unexpected message: {e}")),
            }
        };
        let mut e = Ether::new("gpu.done", Map::new());
        match answer {
            Ok(mut p) => {
                p.insert("event_waits".into(), cuda::event_waits().into());
                e.payload = p;
            }
            Err(why) => {
                e.payload.insert("error".into(), why.into());
            }
        }
        if s.reply(&m, Outgoing::ether(&e, CodecId::JSON).expect("encode"))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Imports the URI, waits on its event, and (when asked) counts wrong words on the device.
fn handoff(
    k: &Kernels,
    producer: u64,
    e: &Ether,
    ns_checked: &mut bool,
) -> Result<Map<String, Value>, String> {
    let field = |n: &str| e.payload.get(n).ok_or(format!("payload.{n} missing"));
    if !*ns_checked {
        // Once per producer session: its namespaces do not change.
        cuda::check_peer_namespaces(field("ns")?.as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        *ns_checked = true;
    }
    let uri = AttachmentUri::parse(field("uri")?.as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let view = k.cuda().import(producer, &uri).map_err(|e| e.to_string())?;
    let import_us = t.elapsed().as_secs_f64() * 1e6;
    let mut out = Map::new();
    out.insert("import_us".into(), import_us.into());
    for key in ["export_us", "has_event"] {
        if let Some(x) = e.payload.get(key) {
            out.insert(key.into(), x.clone());
        }
    }
    if field("sync")?.as_bool() == Some(false) {
        // The stream waits on the event already: work queued on it now is ordered after the
        // producer's writes, so the hand-off is done without the host waiting for anything.
        return Ok(out);
    }
    if field("verify")?.as_bool() == Some(true) {
        let t = Instant::now();
        // SAFETY: the view addresses `len` bytes of the producer's live buffer, which it keeps
        // until our reply.
        let bad = unsafe { k.count_mismatch(view.ptr(), view.len() / 4, SEED) }
            .map_err(|e| e.to_string())?;
        out.insert("mismatches".into(), bad.into());
        out.insert("verify_s".into(), t.elapsed().as_secs_f64().into());
    } else {
        // The stream waits on the producer's event; a real consumer would launch here.
        let t = Instant::now();
        k.cuda().synchronize().map_err(|e| e.to_string())?;
        out.insert("sync_us".into(), (t.elapsed().as_secs_f64() * 1e6).into());
    }
    Ok(out)
}

/// The copy path's consumer half: host → device into the landing buffer.
fn land(k: &Kernels, landing: &DeviceBuffer, body: &[u8]) -> Result<Map<String, Value>, String> {
    let data = body
        .get(HEADER_LEN..)
        .ok_or("a tensor body without header")?;
    landing.write(data).map_err(|e| e.to_string())?;
    let mut out = Map::new();
    // Every round checks the landed words on the device (a few ms per GiB).
    // SAFETY: the landing buffer holds at least `data.len()` bytes.
    let bad = unsafe { k.count_mismatch(landing.ptr(), data.len() as u64 / 4, SEED) }
        .map_err(|e| e.to_string())?;
    out.insert("mismatches".into(), bad.into());
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The producer.

/// The consumer process: its stdin is closed (it exits then) and it is waited for on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn producer(opts: Opts) -> i32 {
    let k = match load(opts.device) {
        Ok(k) => k,
        Err(why) => {
            println!("skipped: {why}");
            println!("{}", json!({"skipped": why}));
            return 0;
        }
    };
    let c = k.cuda().clone();
    let bytes = opts.mib << 20;
    let words = bytes / 4;
    println!(
        "device {} ({}), {} MiB",
        c.ordinal(),
        c.uuid_string(),
        opts.mib
    );

    let buf = c.alloc(bytes as usize).expect("alloc");
    // SAFETY: the buffer holds `words` u32.
    unsafe { k.fill_pattern(buf.ptr(), words, SEED) }.expect("fill");
    c.synchronize().expect("sync");

    // The consumer process.
    let socket = std::env::temp_dir().join(format!("xcp-gpu-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut child = Reap(
        Command::new(std::env::current_exe().expect("current_exe"))
            .args(["--consumer", "--listen"])
            .arg(format!("unix://{}", socket.display()))
            .args(["--mib", &opts.mib.to_string()])
            .args(["--device", &opts.device.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the consumer"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the consumer's first line");
    let Some(url) = line.trim().strip_prefix("listening on ") else {
        println!("consumer failed: {}", line.trim());
        return 1;
    };
    let s = Session::connect(url, config(bytes)).await.expect("connect");
    let ns = cuda::namespaces();

    // How a hand-off is made: `pending` queues a write (16 MiB elsewhere) on the producer's
    // stream just before the export, so the export carries an IPC event that the consumer's
    // stream waits on (an idle stream needs none); `sync` has the consumer wait on the host
    // for its stream before replying.
    let scratch = c.alloc(16 << 20).expect("alloc");
    let send_with = |ptr: u64, len: u64, verify: bool, pending: bool, sync: bool| {
        if pending {
            // SAFETY: the scratch buffer holds 4 Mi u32.
            unsafe { k.fill_pattern(scratch.ptr(), 4 << 20, SEED) }.expect("fill");
        }
        let t = Instant::now();
        let ex = c.export(ptr, len, None).expect("export");
        let export_us = t.elapsed().as_secs_f64() * 1e6;
        let uri = ex.uri().to_string();
        let mut e = Ether::new("gpu.handoff", Map::new());
        e.payload.insert("has_event".into(), ex.has_event().into());
        e.payload.insert("uri".into(), uri.into());
        e.payload.insert("sync".into(), sync.into());
        e.payload.insert("export_us".into(), export_us.into());
        e.payload.insert("ns".into(), ns.clone().into());
        e.payload.insert("verify".into(), verify.into());
        (ex, Outgoing::ether(&e, CodecId::JSON).expect("encode"))
    };
    let send_of = |ptr: u64, len: u64, verify: bool| send_with(ptr, len, verify, false, true);
    let send = |verify: bool| send_of(buf.ptr(), bytes, verify);
    let ask = |out: Outgoing| {
        let s = s.clone();
        async move {
            let r = s.request(out).await.expect("request");
            r.ether().expect("an Ether answer").payload
        }
    };

    // 1. The verified hand-off (also the cold one: the consumer opens the handle here).
    let t = Instant::now();
    let (ex, out) = send(true);
    let p = ask(out).await;
    let cold = t.elapsed();
    drop(ex);
    if let Some(err) = p.get("error") {
        println!("hand-off refused: {err}");
        return 1;
    }
    let mismatches = p
        .get("mismatches")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    println!(
        "verified on device: {mismatches} wrong words of {words} (check {:.1} ms); first \
         hand-off with the check {:.1} ms (cold import, cuIpcOpenMemHandle: {:.0} us)",
        p["verify_s"].as_f64().unwrap_or(0.0) * 1e3,
        cold.as_secs_f64() * 1e3,
        p["import_us"].as_f64().unwrap_or(0.0)
    );

    // 2. Hand-off latency, warm.
    let mut handle_us = Vec::new();
    for _ in 0..opts.reps {
        let t = Instant::now();
        let (ex, out) = send(false);
        let p = ask(out).await;
        handle_us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(ex);
        assert!(p.get("error").is_none(), "{p:?}");
    }
    let handle_med = median(handle_us);
    println!(
        "hand-off by handle: median {handle_med:.1} us over {} runs",
        opts.reps
    );

    // 2a. Where the time goes: with a write still pending at export (an IPC event in the
    // URI), with and without the consumer's host wait, against the idle stream of step 2.
    let mut breakdown = Map::new();
    for (name, event, sync) in [
        ("idle_stream", false, true),
        ("pending_write_sync", true, true),
        ("pending_write_nosync", true, false),
    ] {
        let (mut total, mut exp, mut imp, mut syn) = (vec![], vec![], vec![], vec![]);
        let (mut w0, mut w1) = (None, 0);
        let mut with_event = 0;
        for _ in 0..opts.reps {
            let t = Instant::now();
            let (ex, out) = send_with(buf.ptr(), bytes, false, event, sync);
            let p = ask(out).await;
            total.push(t.elapsed().as_secs_f64() * 1e6);
            drop(ex);
            assert!(p.get("error").is_none(), "{p:?}");
            let f = |k: &str| p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let w = p.get("event_waits").and_then(Value::as_u64).unwrap_or(0);
            w0.get_or_insert(w);
            w1 = w;
            if p.get("has_event") == Some(&Value::Bool(true)) {
                with_event += 1;
            }
            imp.push(f("import_us"));
            syn.push(f("sync_us"));
            exp.push(f("export_us"));
        }
        let row = json!({
            "total_us": median(total), "export_us": median(exp),
            "import_us": median(imp), "sync_us": median(syn),
            "event_waits_after_first": w1 - w0.unwrap_or(0),
            "exports_with_event": with_event,
        });
        println!("  {name}: {row}");
        breakdown.insert(name.into(), row);
    }

    // 2a'. The same hand-off through the session layer: `request_device` puts the export's
    // URI in an attachment and keeps the export until the ACK; the consumer's session maps it
    // into a device view (its stream waits on the event where it has not completed) and ACKs
    // when the view is dropped, after the reply.
    let session_send = |verify: bool| {
        let ex = c.export(buf.ptr(), bytes, None).expect("export");
        let mut e = Ether::new("gpu.session", Map::new());
        e.payload.insert("verify".into(), verify.into());
        let att = xcp::ether::Attachment {
            id: "t".into(),
            dtype: "uint32".into(),
            shape: vec![words as u32],
            ..Default::default()
        };
        let s = s.clone();
        async move {
            let r = s
                .request_device(e, CodecId::JSON, vec![(att, ex)])
                .await
                .expect("request_device");
            r.ether().expect("an Ether answer").payload
        }
    };
    let sp = session_send(true).await;
    let session_bad = sp.get("mismatches").and_then(Value::as_u64);
    let mut session_us = Vec::new();
    for _ in 0..opts.reps {
        let t = Instant::now();
        let p = session_send(false).await;
        session_us.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(p.get("error").is_none(), "{p:?}");
    }
    let session_med = median(session_us);
    println!(
        "hand-off through the session (request_device): median {session_med:.1} us, verified: \
         {} wrong words",
        session_bad.map_or("?".to_string(), |b| b.to_string())
    );

    // 2b. A PING round trip on the same session: the yardstick of the hand-off's latency.
    let mut ping_us = Vec::new();
    for _ in 0..opts.reps.max(5) {
        let rtt = s.ping().await.expect("ping");
        ping_us.push(rtt.as_secs_f64() * 1e6);
    }
    let ping_med = median(ping_us);
    // And a plain request of the same shape without a handle (the consumer's application
    // answers it, as it answers a hand-off; a PING is answered by its session alone).
    let mut plain_us = Vec::new();
    for _ in 0..opts.reps.max(5) {
        let t = Instant::now();
        let e = Ether::new("gpu.noop", Map::new());
        let p = ask(Outgoing::ether(&e, CodecId::JSON).expect("encode")).await;
        plain_us.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(p.get("error").is_none(), "{p:?}");
    }
    let plain_med = median(plain_us);
    println!(
        "plain request without a handle: median {plain_med:.1} us; session hand-off - plain \
         request = {:.1} us",
        session_med - plain_med
    );
    println!(
        "PING round trip: median {ping_med:.1} us; hand-off / PING = {:.2} (by hand, with the \
         consumer's host wait), {:.2} (through the session)",
        handle_med / ping_med,
        session_med / ping_med
    );

    // 2c. Hand-off latency against size: separate, smaller allocations, each verified once
    // (its cold import), then timed warm.
    let mut by_size = Map::new();
    for mib in [1u64, 64].into_iter().filter(|m| *m < opts.mib) {
        let len = mib << 20;
        let small = c.alloc(len as usize).expect("alloc");
        // SAFETY: the buffer holds `len / 4` u32.
        unsafe { k.fill_pattern(small.ptr(), len / 4, SEED) }.expect("fill");
        let (ex, out) = send_of(small.ptr(), len, true);
        let p = ask(out).await;
        drop(ex);
        let bad = p.get("mismatches").and_then(Value::as_u64);
        let waits0 = p.get("event_waits").and_then(Value::as_u64).unwrap_or(0);
        let (mut us, mut syn, mut nosync) = (vec![], vec![], vec![]);
        let mut waits = waits0;
        for _ in 0..opts.reps {
            let t = Instant::now();
            let (ex, out) = send_of(small.ptr(), len, false);
            let p = ask(out).await;
            us.push(t.elapsed().as_secs_f64() * 1e6);
            drop(ex);
            assert!(p.get("error").is_none(), "{p:?}");
            syn.push(p.get("sync_us").and_then(Value::as_f64).unwrap_or(f64::NAN));
            waits = p
                .get("event_waits")
                .and_then(Value::as_u64)
                .unwrap_or(waits);
        }
        for _ in 0..opts.reps {
            let t = Instant::now();
            let (ex, out) = send_with(small.ptr(), len, false, false, false);
            let p = ask(out).await;
            nosync.push(t.elapsed().as_secs_f64() * 1e6);
            drop(ex);
            assert!(p.get("error").is_none(), "{p:?}");
        }
        let med = median(us);
        let row = json!({
            "median_us": med, "sync_us": median(syn), "nosync_median_us": median(nosync),
            "event_waits": waits - waits0, "mismatches": bad,
        });
        println!(
            "hand-off of a {mib} MiB allocation: median {med:.1} us (verified: {} wrong words) \
             {row}",
            bad.map_or("?".to_string(), |b| b.to_string())
        );
        by_size.insert(format!("{mib}MiB"), row);
    }
    by_size.insert(
        format!("{}MiB", opts.mib),
        json!({"median_us": handle_med, "mismatches": mismatches}),
    );
    let sizes_ok = by_size
        .values()
        .all(|v| v["mismatches"].as_u64() == Some(0));

    // 3. D2H + inline send + H2D.
    let mut copy_ms = Vec::new();
    let mut copy_ok = true;
    let header = TensorHeader::new(DType::F32, &[words as u32]).expect("header");
    for _ in 0..opts.copy_reps {
        // The host buffer is made before the clock starts (a real sender would reuse one).
        let mut body = BytesMut::with_capacity(HEADER_LEN + bytes as usize);
        body.put_slice(&header.to_bytes());
        body.put_bytes(0, bytes as usize);
        let t = Instant::now();
        // SAFETY: the buffer holds `bytes` bytes; the destination is as long.
        unsafe { c.copy_dtoh(&mut body[HEADER_LEN..], buf.ptr()) }.expect("d2h");
        let p = ask(Outgoing::data(CodecId::TENSOR_F32, body.freeze())).await;
        copy_ms.push(t.elapsed().as_secs_f64() * 1e3);
        copy_ok &= p.get("mismatches").and_then(Value::as_u64) == Some(0);
    }
    let copy_med = median(copy_ms);
    println!(
        "D2H + socket + H2D: median {copy_med:.1} ms over {} runs ({:.2} GB/s end to end), \
         data {}",
        opts.copy_reps,
        bytes as f64 / copy_med / 1e6,
        if copy_ok { "verified" } else { "WRONG" }
    );
    println!(
        "speed-up of the handle: {:.0}x",
        copy_med * 1e3 / handle_med
    );
    drop(s);
    drop(child);
    let _ = std::fs::remove_file(&socket);

    // 4. Kernels against the CPU codecs.
    let kern = kernel_bench(&k, &opts);

    let ok = mismatches == 0
        && session_bad == Some(0)
        && sizes_ok
        && copy_ok
        && kern["all_equal"] == json!(true);
    println!(
        "{}",
        json!({
            "device": c.uuid_string(),
            "bytes": bytes,
            "mismatches": mismatches,
            "first_handoff_with_check_ms": cold.as_secs_f64() * 1e3,
            "cold_import_us": p["import_us"].as_f64().unwrap_or(0.0),
            "handoff_median_us": handle_med,
            "session_handoff_median_us": session_med,
            "session_handoff_mismatches": session_bad,
            "session_over_ping": session_med / ping_med,
            "ping_median_us": ping_med,
            "plain_request_median_us": plain_med,
            "session_over_plain_request": session_med / plain_med,
            "handoff_breakdown": breakdown,
            "handoff_over_ping": handle_med / ping_med,
            "handoff_by_size": by_size,
            "copy_median_ms": copy_med,
            "copy_verified": copy_ok,
            "kernels": kern,
            "ok": ok,
        })
    );
    if ok {
        0
    } else {
        1
    }
}

/// Times `f` (which queues work on the device's stream) after a warm-up: the best of 5, in
/// seconds.
fn time(c: &Cuda, mut f: impl FnMut()) -> f64 {
    f();
    c.synchronize().expect("sync");
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            c.synchronize().expect("sync");
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn kernel_bench(k: &Kernels, opts: &Opts) -> Value {
    let c = k.cuda().clone();
    let row_len = opts.row_len;
    let rows = (opts.kernel_elems / u64::from(row_len)).max(1);
    let n = rows * u64::from(row_len);
    // Seeded values of either sign, up to about 84 in magnitude.
    let mut rng = SmallRng::seed_from_u64(7);
    let vals: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-(1i32 << 23)..1 << 23) as f32 / 1e5)
        .collect();
    let src = c.alloc(n as usize * 4).expect("alloc");
    src.write(
        &vals
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .expect("upload");
    let shape = [rows as u32, row_len];

    // F32 -> F16.
    let f16 = c.alloc(n as usize * 2).expect("alloc");
    // SAFETY: both buffers hold `n` elements.
    let t_cast = time(&c, || {
        unsafe { k.f32_to_f16(src.ptr(), f16.ptr(), n) }.expect("cast")
    });
    // SAFETY: `src` holds the tensor.
    let body = unsafe { k.encode_f16_body(&shape, src.ptr()) }.expect("f16 body");
    let cast_equal = body.read().expect("read")
        == encode_f16_from_f32(&shape, &vals, false).expect("cpu f16")[..];

    // QNT8 rows.
    let q = c
        .alloc(HEADER_LEN + (rows * (4 + u64::from(row_len))) as usize)
        .expect("alloc");
    let t_q = time(&c, || {
        // SAFETY: `q` holds the header and the rows.
        unsafe { k.qnt8_rows(src.ptr(), q.ptr() + HEADER_LEN as u64, rows, row_len) }.expect("qnt8")
    });
    // SAFETY: `src` holds the tensor.
    let qbody = unsafe { k.encode_qnt8_body(&shape, src.ptr()) }.expect("qnt8 body");
    let t0 = Instant::now();
    let cpu = encode_qnt8(&shape, &vals, true, false).expect("cpu qnt8");
    let t_q_cpu = t0.elapsed().as_secs_f64();
    let q_equal = qbody.read().expect("read") == cpu[..];

    // Dequantise.
    let deq = c.alloc(n as usize * 4).expect("alloc");
    let t_dq = time(&c, || {
        // SAFETY: `qbody` holds the rows after its header, `deq` `n` f32.
        unsafe { k.qnt8_rows_to_f32(qbody.ptr() + HEADER_LEN as u64, deq.ptr(), rows, row_len) }
            .expect("dequantise")
    });
    let got = deq.read().expect("read");
    let want = TensorView::parse(cpu, None).expect("parse").to_f32_vec();
    let dq_equal = got
        .chunks_exact(4)
        .zip(&want)
        .all(|(g, w)| u32::from_le_bytes([g[0], g[1], g[2], g[3]]) == w.to_bits());

    // The yardstick: a device-to-device copy of the source (bytes read + written).
    let copy_dst = c.alloc(n as usize * 4).expect("alloc");
    let t_copy = time(&c, || {
        // SAFETY: both buffers hold `n` f32.
        unsafe { c.copy_dtod(copy_dst.ptr(), src.ptr(), n as usize * 4) }.expect("dtod")
    });
    drop(copy_dst);

    let gbs = |moved: u64, t: f64| moved as f64 / t / 1e9;
    let qbytes = rows * (4 + u64::from(row_len));
    let copy_gbs = gbs(n * 8, t_copy);
    println!(
        "device-to-device copy of {} MiB: {copy_gbs:.1} GB/s (read + written)",
        (n * 4) >> 20
    );
    println!(
        "kernels on {n} f32: f32->f16 {:.1} GB/s ({}), qnt8 rows {:.1} GB/s ({}, CPU {:.2} \
         GB/s), dequantise {:.1} GB/s ({})",
        gbs(n * 6, t_cast),
        if cast_equal { "= CPU" } else { "DIFFERS" },
        gbs(n * 4 + qbytes, t_q),
        if q_equal { "= CPU" } else { "DIFFERS" },
        gbs(n * 4 + qbytes, t_q_cpu),
        gbs(n * 4 + qbytes, t_dq),
        if dq_equal { "= CPU" } else { "DIFFERS" },
    );
    println!(
        "kernels against the copy: f32->f16 {:.2}x, qnt8 rows {:.2}x, dequantise {:.2}x",
        gbs(n * 6, t_cast) / copy_gbs,
        gbs(n * 4 + qbytes, t_q) / copy_gbs,
        gbs(n * 4 + qbytes, t_dq) / copy_gbs,
    );
    json!({
        "dtod_copy_gbs": copy_gbs,
        "f32_to_f16_over_copy": gbs(n * 6, t_cast) / copy_gbs,
        "qnt8_rows_over_copy": gbs(n * 4 + qbytes, t_q) / copy_gbs,
        "dequantise_over_copy": gbs(n * 4 + qbytes, t_dq) / copy_gbs,
        "elements": n,
        "row_len": row_len,
        "f32_to_f16_gbs": gbs(n * 6, t_cast),
        "qnt8_rows_gbs": gbs(n * 4 + qbytes, t_q),
        "qnt8_rows_cpu_gbs": gbs(n * 4 + qbytes, t_q_cpu),
        "dequantise_gbs": gbs(n * 4 + qbytes, t_dq),
        "f16_equal": cast_equal,
        "qnt8_equal": q_equal,
        "dequantise_equal": dq_equal,
        "all_equal": cast_equal && q_equal && dq_equal,
    })
}
