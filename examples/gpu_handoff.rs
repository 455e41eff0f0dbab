//! GPU tensor hand-off between two processes on one GPU host (feature `cuda`): a producer
//! fills a device buffer (1 GiB by default) and hands it to a consumer process by a
//! `cuda-ipc://` handle; the consumer imports it (one `cuIpcOpenMemHandle` per process, then
//! cached), waits on the producer's IPC event and checks every word on the device with a
//! kernel; only an 8-byte count comes back to the host. Then it measures:
//!
//! - **handle**: the hand-off round trip: export (cached handle, a fresh event record), the
//!   URI in an Ether over a Unix socket, import and stream-wait in the consumer, reply;
//! - **copy**: the same bytes the classic way: device → host copy in the producer, an inline
//!   TENSOR_F32 message over the same socket, host → device copy in the consumer, reply;
//! - **kernels**: F32→F16 and per-row QNT8 quantise/dequantise on the device against the CPU
//!   codecs (bit for bit), with GB/s.
//!
//! ```text
//! cargo build --release --features cuda --example gpu_handoff
//! target/release/examples/gpu_handoff                     # 1 GiB, 20 hand-offs
//! target/release/examples/gpu_handoff --mib 64 --reps 5   # a quick look
//! ```
//!
//! The URI travels in the Ether's payload (`payload.uri`), not as an attachment `uri`: the
//! session layer resolves attachment URIs itself and does not map `cuda-ipc` (yet), so this
//! example does the attach-layer import by hand. Without a GPU it prints why and exits 0.
//! The last line is a JSON summary.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use clap::Parser;
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
    let c = Cuda::load(device).map_err(why)?;
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
    while let Ok(m) = s.recv().await {
        let answer = if m.header.body_codec == CodecId::TENSOR_F32 {
            land(k, &landing, &m.body)
        } else {
            match m.ether() {
                Ok(e) if e.kind == "gpu.handoff" => handoff(k, producer, &e),
                Ok(e) => Err(format!("unexpected kind {:?}", e.kind)),
                Err(e) => Err(format!("unexpected message: {e}")),
            }
        };
        let mut e = Ether::new("gpu.done", Map::new());
        match answer {
            Ok(p) => e.payload = p,
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
fn handoff(k: &Kernels, producer: u64, e: &Ether) -> Result<Map<String, Value>, String> {
    let field = |n: &str| e.payload.get(n).ok_or(format!("payload.{n} missing"));
    cuda::check_peer_namespaces(field("ns")?.as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let uri = AttachmentUri::parse(field("uri")?.as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let view = k.cuda().import(producer, &uri).map_err(|e| e.to_string())?;
    let import_us = t.elapsed().as_secs_f64() * 1e6;
    let mut out = Map::new();
    out.insert("import_us".into(), import_us.into());
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
        k.cuda().synchronize().map_err(|e| e.to_string())?;
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

    let send = |verify: bool| {
        let ex = c.export(buf.ptr(), bytes, None).expect("export");
        let mut e = Ether::new("gpu.handoff", Map::new());
        e.payload.insert("uri".into(), ex.uri().to_string().into());
        e.payload.insert("ns".into(), ns.clone().into());
        e.payload.insert("verify".into(), verify.into());
        (ex, Outgoing::ether(&e, CodecId::JSON).expect("encode"))
    };
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

    let ok = mismatches == 0 && copy_ok && kern["all_equal"] == json!(true);
    println!(
        "{}",
        json!({
            "device": c.uuid_string(),
            "bytes": bytes,
            "mismatches": mismatches,
            "first_handoff_with_check_ms": cold.as_secs_f64() * 1e3,
            "cold_import_us": p["import_us"].as_f64().unwrap_or(0.0),
            "handoff_median_us": handle_med,
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
    let mut s = 7u64;
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as i32 - (1 << 23)) as f32 / 1e5
        })
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

    let gbs = |moved: u64, t: f64| moved as f64 / t / 1e9;
    let qbytes = rows * (4 + u64::from(row_len));
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
    json!({
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
