//! `xcp bench --load`: N client sessions × M requests of mixed sizes and codecs through one
//! echo server (`xcp serve`, started as a child unless `--url` names one), every reply checked
//! byte for byte against its request. Reports lost and mismatched replies (any is a failure),
//! latency percentiles and the rates.

use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use serde_json::json;

use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::{Ether, Session, SessionConfig};

use crate::args::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// What one load run does.
pub struct LoadPlan {
    /// Concurrent client sessions.
    pub clients: usize,
    /// Requests per client.
    pub messages: u64,
    /// Requests each client keeps in flight.
    pub window: usize,
    /// The server to use; `None` starts `xcp serve` as a child.
    pub url: Option<String>,
}

/// The codecs of the mix, in the order they are reported.
const CODECS: [(CodecId, &str); 4] = [
    (CodecId::JSON, "json"),
    (CodecId::PROTOBUF, "protobuf"),
    (CodecId::TENSOR_F32, "tensor_f32"),
    (CodecId::ARROW_IPC, "arrow_ipc"),
];

/// The figures a run collects, shared by every client task.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    verified: AtomicU64,
    mismatched: AtomicU64,
    lost: AtomicU64,
    request_bytes: AtomicU64,
    by_codec: [AtomicU64; 4],
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 10 {
            v.push(e);
        }
    }
}

/// A size from 64 B to 1 MiB, weighted toward small: 60% under 1 KiB, 25% to 16 KiB, 10% to
/// 256 KiB, 5% to 1 MiB.
fn pick_size(r: &mut SmallRng) -> usize {
    let (lo, hi) = match r.random_range(0..100) {
        0..60 => (64, 1 << 10),
        60..85 => (1 << 10, 16 << 10),
        85..95 => (16 << 10, 256 << 10),
        _ => (256 << 10, 1 << 20),
    };
    r.random_range(lo..hi)
}

fn text_of(r: &mut SmallRng, prefix: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
    let mut s = String::with_capacity(len + prefix.len());
    s.push_str(prefix);
    while s.len() < len {
        s.push(char::from(ALPHABET[r.random_range(0..ALPHABET.len())]));
    }
    s
}

/// The request `index` of client `client`: its codec slot and the message (about `size` bytes
/// of body; an Arrow batch is kept small, at most 64 rows).
fn make_request(client: usize, index: u64) -> xcp::Result<(usize, Outgoing)> {
    // Deterministic per client and message: every run sends the same requests.
    let mut r = SmallRng::seed_from_u64(((client as u64) << 32) ^ index ^ 0xC0FFEE);
    let size = pick_size(&mut r);
    let slot = r.random_range(0..CODECS.len());
    let prefix = format!("c{client}-m{index} ");
    let out = match CODECS[slot].0 {
        CodecId::JSON | CodecId::PROTOBUF => {
            let e = Ether::text(text_of(&mut r, &prefix, size));
            Outgoing::ether(&e, CODECS[slot].0)?
        }
        CodecId::TENSOR_F32 => {
            let n = (size / 4).max(1);
            let values: Vec<f32> = (0..n).map(|_| (r.next_u64() >> 40) as f32 / 7.0).collect();
            let body = xcp::codec::tensor::encode_f32(&[n as u32], &values, false)?;
            Outgoing::data(CodecId::TENSOR_F32, body)
        }
        _ => {
            let rows = (size / 256).clamp(1, 64);
            let per_row = (size / rows).max(8);
            let ethers: Vec<Ether> = (0..rows)
                .map(|i| Ether::text(text_of(&mut r, &format!("{prefix}r{i} "), per_row)))
                .collect();
            let body = xcp::codec::arrow::encode_ethers(&ethers)?;
            Outgoing::data(CodecId::ARROW_IPC, body)
        }
    };
    Ok((slot, out))
}

/// `xcp serve` (this same executable) as a child, offering no handles; killed when dropped.
fn start_serve() -> Result<super::client::ServerProc, String> {
    let args: Vec<String> = [
        "serve",
        "--listen",
        "tcp://127.0.0.1:0",
        "--attach",
        "inline",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    super::client::spawn_listening(&args, None, Some("warn"))
}

/// One client: a session, `window` tasks taking message numbers from a shared counter.
async fn run_client(
    client: usize,
    url: String,
    plan: Arc<LoadPlan>,
    tally: Arc<Tally>,
    done: Arc<AtomicU64>,
) -> Result<Histogram<u64>, String> {
    let config = SessionConfig::default()
        .with_attach(AttachConfig::inline_only())
        .with_request_timeout(Duration::from_secs(60));
    let session = Session::connect(&url, config)
        .await
        .map_err(|e| format!("client {client}: connect {url}: {e}"))?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.window.max(1) {
        let (session, next, plan, tally, done) = (
            session.clone(),
            next.clone(),
            plan.clone(),
            tally.clone(),
            done.clone(),
        );
        tasks.spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1_000, 600_000_000_000, 3)
                .map_err(|e| e.to_string())?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.messages {
                    return Ok::<_, String>(h);
                }
                let (slot, out) = make_request(client, i).map_err(|e| e.to_string())?;
                let (body, codec) = (out.body.clone(), out.codec);
                tally.sent.fetch_add(1, Ordering::Relaxed);
                tally.by_codec[slot].fetch_add(1, Ordering::Relaxed);
                tally
                    .request_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                let t0 = Instant::now();
                let reply = session.request(out).await;
                let took = t0.elapsed();
                match reply {
                    Ok(m) if m.body == body && m.header.body_codec == codec => {
                        h.saturating_record(took.as_nanos() as u64);
                        tally.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(m) => {
                        tally.mismatched.fetch_add(1, Ordering::Relaxed);
                        tally.error(format!(
                            "client {client} message {i}: reply differs ({} bytes {:?}, sent {} bytes {:?})",
                            m.body.len(),
                            m.header.body_codec,
                            body.len(),
                            codec
                        ));
                    }
                    Err(e) => {
                        tally.lost.fetch_add(1, Ordering::Relaxed);
                        tally.error(format!("client {client} message {i}: {e}"));
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1_000, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(h)) => {
                let _ = hist.add(&h);
            }
            Ok(Err(e)) => failure = Some(format!("client {client}: {e}")),
            Err(e) => failure = Some(format!("client {client}: task failed: {e}")),
        }
    }
    let _ = session.close().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(hist),
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Runs the load test; returns the exit code.
pub async fn run(plan: LoadPlan, json_path: Option<&Path>) -> u8 {
    if plan.clients == 0 || plan.messages == 0 {
        eprintln!("error: --clients and --messages must be at least 1");
        return EXIT_USAGE;
    }
    let (_server, url) = match &plan.url {
        Some(u) => (None, u.clone()),
        None => match start_serve() {
            Ok(s) => {
                let u = s.url.clone();
                (Some(s), u)
            }
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_USAGE;
            }
        },
    };
    let plan = Arc::new(plan);
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicU64::new(0));
    let total = plan.clients as u64 * plan.messages;

    // The progress line: rewritten in place on a terminal, a line every 5 s otherwise.
    let progress = {
        let (done, tally) = (done.clone(), tally.clone());
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let every = Duration::from_millis(if tty { 500 } else { 5000 });
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let n = done.load(Ordering::Relaxed);
                let bad =
                    tally.lost.load(Ordering::Relaxed) + tally.mismatched.load(Ordering::Relaxed);
                let line = format!(
                    "load: {n}/{total} replies, {bad} lost or mismatched, {:.0} msg/s",
                    n as f64 / t0.elapsed().as_secs_f64()
                );
                if tty {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
            }
        })
    };

    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..plan.clients {
        clients.spawn(run_client(
            c,
            url.clone(),
            plan.clone(),
            tally.clone(),
            done.clone(),
        ));
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1_000, 600_000_000_000, 3).expect("histogram bounds");
    let mut failures = Vec::new();
    while let Some(r) = clients.join_next().await {
        match r {
            Ok(Ok(h)) => {
                let _ = hist.add(&h);
            }
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("client task failed: {e}")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }

    let sent = tally.sent.load(Ordering::Relaxed);
    let verified = tally.verified.load(Ordering::Relaxed);
    let mismatched = tally.mismatched.load(Ordering::Relaxed);
    // Requests never sent (a client that could not connect) count as lost too.
    let lost = total - verified - mismatched;
    let bytes = tally.request_bytes.load(Ordering::Relaxed);
    let msg_per_s = verified as f64 / secs;
    let mb_per_s = bytes as f64 / secs / 1e6;
    let (p50, p99, max) = if hist.is_empty() {
        (0, 0, 0)
    } else {
        (
            hist.value_at_quantile(0.50),
            hist.value_at_quantile(0.99),
            hist.max(),
        )
    };
    let errors = tally
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();

    println!(
        "xcp bench --load: {} clients x {} messages, {} in flight per client, server {}",
        plan.clients,
        plan.messages,
        plan.window,
        if plan.url.is_some() {
            url.clone()
        } else {
            format!("{url} (xcp serve child)")
        }
    );
    let mix: Vec<String> = CODECS
        .iter()
        .zip(&tally.by_codec)
        .map(|((_, name), n)| format!("{name} {}", n.load(Ordering::Relaxed)))
        .collect();
    println!("  mix       {} (sizes 64 B .. 1 MiB)", mix.join(", "));
    println!(
        "  replies   {total} expected, {sent} sent, {verified} verified byte for byte, {lost} lost, {mismatched} mismatched"
    );
    println!(
        "  latency   p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
    println!(
        "  rate      {msg_per_s:.0} msg/s, {mb_per_s:.1} MB/s of request bodies (each echoed back), {secs:.2} s"
    );
    for e in errors.iter().chain(&failures) {
        println!("  error     {e}");
    }

    let mut code = if lost == 0 && mismatched == 0 && failures.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    };
    if let Some(path) = json_path {
        let by_codec: serde_json::Map<String, serde_json::Value> = CODECS
            .iter()
            .zip(&tally.by_codec)
            .map(|((_, name), n)| (name.to_string(), n.load(Ordering::Relaxed).into()))
            .collect();
        let doc = json!({
            "mode": "load",
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "url": url,
            "clients": plan.clients,
            "messages_per_client": plan.messages,
            "window": plan.window,
            "expected": total,
            "sent": sent,
            "verified": verified,
            "lost": lost,
            "mismatched": mismatched,
            "by_codec": by_codec,
            "latency_ms": {"p50": ms(p50), "p99": ms(p99), "max": ms(max)},
            "msg_per_s": msg_per_s,
            "mb_per_s": mb_per_s,
            "request_bytes": bytes,
            "seconds": secs,
            "errors": errors.iter().chain(&failures).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("error: {}: {e}", path.display());
            code = EXIT_FAILED;
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_deterministic_and_mixed() {
        let mut seen = [0u32; 4];
        for i in 0..400 {
            let (slot, a) = make_request(3, i).expect("request");
            let (_, b) = make_request(3, i).expect("request");
            assert_eq!(a.body, b.body);
            assert!(a.body.len() >= 32 && a.body.len() <= (1 << 20) + 4096);
            seen[slot] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        let (_, other) = make_request(4, 0).expect("request");
        let (_, mine) = make_request(3, 0).expect("request");
        assert_ne!(other.body, mine.body);
        let _: bytes::Bytes = mine.body;
    }
}
