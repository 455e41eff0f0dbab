//! `xcp bench --io-compare`: the same XCP workloads over epoll and over io_uring, in one run.
//!
//! For each I/O mode an `xcp serve --io MODE` echo server runs as a child process and the
//! client sessions of this process use the same mode (all client connections of a mode share
//! one ring). Rows:
//! - `rtt-64B`: one request at a time of 64 payload bytes on one connection: p50 / p99;
//! - `stream-16KiB`, `stream-1MiB`: 32 (16 KiB) or 8 (1 MiB) requests in flight on one
//!   connection, echoed back: MB/s of payload one way, and the CPU seconds of both processes
//!   per GB of payload moved (both directions counted);
//! - `conns-64`: 64 connections, 4 requests of 64 bytes in flight on each: messages per
//!   second, and CPU microseconds per message.
//!
//! CPU time is read from `/proc/PID/stat` (user + system, all threads) of both processes
//! before and after each timed phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::transport::{IoMode, TransportConfig};
use xcp::{Session, SessionConfig};

use super::client::{spawn_listening, ServerProc};

/// What the comparison measured for one mode.
#[derive(Debug, Default, Clone)]
struct ModeFigures {
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    stream16k_mb_s: f64,
    stream16k_cpu_s_per_gb: f64,
    stream1m_mb_s: f64,
    stream1m_cpu_s_per_gb: f64,
    conns64_msg_s: f64,
    conns64_cpu_us_per_msg: f64,
    /// The client ring's receives: bytes through provided buffers, bytes direct, buffers.
    receives: Option<(u64, u64, usize)>,
}

/// Runs the comparison for `phase` seconds per timed phase; prints a table, writes JSON to
/// `json` when given. Returns the exit code.
pub async fn run(phase: Duration, json: Option<&std::path::Path>) -> u8 {
    let uring_ok = xcp::transport::uring::probe();
    let mut modes = vec![IoMode::Epoll];
    match &uring_ok {
        Ok(()) => modes.push(IoMode::Uring),
        Err(why) => eprintln!("io_uring is not available here ({why}): epoll only"),
    }
    let mut results: Vec<(IoMode, ModeFigures)> = Vec::new();
    for &mode in &modes {
        eprintln!(
            "{}: measuring ({:.1} s per phase)...",
            mode.name(),
            phase.as_secs_f64()
        );
        match measure_mode(mode, phase).await {
            Ok(f) => results.push((mode, f)),
            Err(e) => {
                eprintln!("error: {}: {e}", mode.name());
                return crate::args::EXIT_FAILED;
            }
        }
    }
    print_table(&results);
    if let Some(path) = json {
        let doc = to_json(&results, phase);
        if let Err(e) = std::fs::write(path, doc) {
            eprintln!("error: {}: {e}", path.display());
            return crate::args::EXIT_FAILED;
        }
    }
    crate::args::EXIT_OK
}

fn start_server(mode: IoMode) -> Result<ServerProc, String> {
    let args: Vec<String> = [
        "serve",
        "--listen",
        "tcp://127.0.0.1:0",
        "--attach",
        "inline",
        "--io",
        mode.name(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    spawn_listening(&args, None, Some("warn"))
}

/// CPU seconds (user + system, every thread) of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    // USER_HZ, the unit of /proc/PID/stat, is 100 on every Linux architecture xcp builds for.
    const USER_HZ: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3; utime, stime are 14, 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / USER_HZ
}

struct Cpu {
    me: u32,
    server: u32,
    at: f64,
}

impl Cpu {
    fn start(server: u32) -> Cpu {
        let me = std::process::id();
        Cpu {
            me,
            server,
            at: cpu_seconds(me) + cpu_seconds(server),
        }
    }
    fn used(&self) -> f64 {
        cpu_seconds(self.me) + cpu_seconds(self.server) - self.at
    }
}

fn config(mode: IoMode, ring: Option<xcp::transport::uring::Ring>) -> SessionConfig {
    SessionConfig::default()
        .with_attach(xcp::AttachConfig::inline_only())
        .with_transport(TransportConfig::default().with_io(mode).with_ring(ring))
        .with_request_timeout(Duration::from_secs(60))
}

/// A TENSOR_QNT8 body of `size` bytes in all, pseudo-random (as the matrix's XCP rows).
fn body(size: usize) -> Bytes {
    super::client::Payload::new(size).tensor
}

fn request(body: &Bytes) -> Outgoing {
    Outgoing::data(CodecId::TENSOR_QNT8, body.clone())
}

async fn measure_mode(mode: IoMode, phase: Duration) -> Result<ModeFigures, String> {
    let server = start_server(mode)?;
    let pid = server.pid();
    let ring = match mode {
        IoMode::Epoll => None,
        _ => xcp::transport::uring::resolve(mode).map_err(|e| e.to_string())?,
    };
    let mut f = ModeFigures::default();
    let one = Session::connect(&server.url, config(mode, ring.clone()))
        .await
        .map_err(|e| format!("connect {}: {e}", server.url))?;

    // Round trips of 64 bytes.
    let b64 = body(64);
    for _ in 0..200 {
        check(
            &one.request(request(&b64))
                .await
                .map_err(|e| e.to_string())?,
            &b64,
        )?;
    }
    let mut h =
        Histogram::<u64>::new_with_bounds(100, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let end = Instant::now() + phase;
    while Instant::now() < end {
        let t0 = Instant::now();
        one.request(request(&b64))
            .await
            .map_err(|e| e.to_string())?;
        h.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    f.rtt_p50_us = h.value_at_quantile(0.5) as f64 / 1e3;
    f.rtt_p99_us = h.value_at_quantile(0.99) as f64 / 1e3;

    // Streaming on one connection.
    for (size, window) in [(16usize << 10, 32usize), (1 << 20, 8)] {
        let b = body(size);
        check(
            &one.request(request(&b)).await.map_err(|e| e.to_string())?,
            &b,
        )?;
        let cpu = Cpu::start(pid);
        let (n, secs) = pump(std::slice::from_ref(&one), window, &b, phase).await?;
        let used = cpu.used();
        let mb_s = n as f64 * size as f64 / secs / 1e6;
        let gb_moved = 2.0 * n as f64 * size as f64 / 1e9;
        let cpu_per_gb = if gb_moved > 0.0 { used / gb_moved } else { 0.0 };
        if size == 16 << 10 {
            f.stream16k_mb_s = mb_s;
            f.stream16k_cpu_s_per_gb = cpu_per_gb;
        } else {
            f.stream1m_mb_s = mb_s;
            f.stream1m_cpu_s_per_gb = cpu_per_gb;
        }
    }
    one.close().await.map_err(|e| e.to_string())?;

    // 64 connections.
    let mut sessions = Vec::new();
    for _ in 0..64 {
        let s = Session::connect(&server.url, config(mode, ring.clone()))
            .await
            .map_err(|e| format!("connect {}: {e}", server.url))?;
        sessions.push(s);
    }
    for s in &sessions {
        check(
            &s.request(request(&b64)).await.map_err(|e| e.to_string())?,
            &b64,
        )?;
    }
    let cpu = Cpu::start(pid);
    let (n, secs) = pump(&sessions, 4, &b64, phase).await?;
    let used = cpu.used();
    f.conns64_msg_s = n as f64 / secs;
    f.conns64_cpu_us_per_msg = if n > 0 { used * 1e6 / n as f64 } else { 0.0 };
    for s in sessions {
        let _ = s.close().await;
    }
    drop(server);
    f.receives = ring.as_ref().map(|r| {
        let (pooled, direct) = r.received_bytes();
        (pooled, direct, r.provided_buffers().0)
    });
    Ok(f)
}

fn check(reply: &xcp::conn::Incoming, sent: &Bytes) -> Result<(), String> {
    if reply.body != *sent {
        return Err(format!(
            "the echo of {} bytes came back as {} different bytes",
            sent.len(),
            reply.body.len()
        ));
    }
    Ok(())
}

/// `window` requests in flight on each session for `phase`; returns (requests completed,
/// seconds).
async fn pump(
    sessions: &[Session],
    window: usize,
    body: &Bytes,
    phase: Duration,
) -> Result<(u64, f64), String> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in sessions {
        for _ in 0..window {
            let (s, done, stop, body) = (s.clone(), done.clone(), stop.clone(), body.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = s.request(request(&body)).await.map_err(|e| e.to_string())?;
                    if r.body.len() != body.len() {
                        return Err(format!("short echo: {} of {}", r.body.len(), body.len()));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            });
        }
    }
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok((done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64()))
}

/// (row, unit, value of a mode, whether higher is better)
type Metric = (&'static str, &'static str, fn(&ModeFigures) -> f64, bool);

const METRICS: [Metric; 8] = [
    ("rtt-64B p50", "us", |f| f.rtt_p50_us, false),
    ("rtt-64B p99", "us", |f| f.rtt_p99_us, false),
    ("stream-16KiB", "MB/s", |f| f.stream16k_mb_s, true),
    (
        "stream-16KiB cpu",
        "s/GB",
        |f| f.stream16k_cpu_s_per_gb,
        false,
    ),
    ("stream-1MiB", "MB/s", |f| f.stream1m_mb_s, true),
    (
        "stream-1MiB cpu",
        "s/GB",
        |f| f.stream1m_cpu_s_per_gb,
        false,
    ),
    ("conns-64", "msg/s", |f| f.conns64_msg_s, true),
    (
        "conns-64 cpu",
        "us/msg",
        |f| f.conns64_cpu_us_per_msg,
        false,
    ),
];

fn print_table(results: &[(IoMode, ModeFigures)]) {
    println!(
        "{:<18} {:>8} {:>12} {:>12} {:>14}",
        "row", "unit", "epoll", "uring", "uring/epoll"
    );
    let get = |m: IoMode| results.iter().find(|(x, _)| *x == m).map(|(_, f)| f);
    for (name, unit, val, higher) in METRICS {
        let e = get(IoMode::Epoll).map(val);
        let u = get(IoMode::Uring).map(val);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = match (e, u) {
            (Some(e), Some(u)) if e > 0.0 => {
                let r = u / e;
                let better = if higher { r >= 1.0 } else { r <= 1.0 };
                format!("{r:.2}x {}", if better { "ok" } else { "worse" })
            }
            _ => "-".to_string(),
        };
        println!(
            "{name:<18} {unit:>8} {:>12} {:>12} {ratio:>14}",
            fmt(e),
            fmt(u)
        );
    }
    println!("ratios are uring over epoll in this run; for latency and cpu rows lower is better");
    if let Some((pooled, direct, bufs)) = get(IoMode::Uring).and_then(|f| f.receives) {
        println!(
            "uring client receives: {:.1} MB through provided buffers (multishot; {bufs} buffers \
             of 16 KiB at the end), {:.1} MB straight into read buffers (large frames)",
            pooled as f64 / 1e6,
            direct as f64 / 1e6
        );
    }
}

fn to_json(results: &[(IoMode, ModeFigures)], phase: Duration) -> String {
    let mut modes = serde_json::Map::new();
    for (m, f) in results {
        let mut o = serde_json::Map::new();
        for (name, unit, val, _) in METRICS {
            o.insert(format!("{name} ({unit})"), serde_json::json!(val(f)));
        }
        if let Some((pooled, direct, bufs)) = f.receives {
            o.insert(
                "client receives".to_string(),
                serde_json::json!({
                    "provided_buffer_bytes": pooled,
                    "direct_bytes": direct,
                    "provided_buffers": bufs,
                }),
            );
        }
        modes.insert(m.name().to_string(), serde_json::Value::Object(o));
    }
    let doc = serde_json::json!({
        "bench": "io-compare",
        "phase_seconds": phase.as_secs_f64(),
        "modes": modes,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
