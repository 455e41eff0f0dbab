//! `xcp bench`: latency and throughput of XCP's paths against raw TCP, HTTP/2 and gRPC, each
//! server in its own process (the same binary, `xcp bench-server`).
//!
//! The bench package of the workspace (`xcp-bench`): the only place hyper, tonic and the
//! generated gRPC stubs are compiled, so the library's users never build them. The `xcp`
//! binary (`cli/`) runs [`run`] and [`server::run`] as its `bench` and `bench-server`
//! subcommands; [`args`] holds the connection options both packages share.

pub mod args;
pub mod client;
mod io;
mod load;
mod report;
pub mod server;
mod veth;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use client::{Client, Env, PathId, Payload};
use report::{Latency, Row, Throughput};

use crate::args::{parse_bytes, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
What is measured (every row, every path):
  The client process sends a request carrying SIZE payload bytes; the server process (a
  separate `xcp bench-server` child of this one) answers with a tiny reply (8 bytes for the
  baselines, a 48-byte XCP message). The payload goes one way, so every row moves the same
  bytes and the rows compare like with like.
  - latency: one request at a time on one connection; p50/p95/p99/max of the round trip.
  - throughput: W requests in flight on the same connection (W = 32, fewer for large sizes so
    at most ~128 MiB is in flight, at least 2), for a fixed time; MB/s counts payload bytes
    (10^6 bytes per MB), msg/s completed requests.
  - x raw: throughput relative to raw-tcp at the same size in the same run.
  `ring` rows go through the same-host shared-memory ring (ring:///path, SPEC §9): frames in
  shared memory, the Unix socket only for wake-ups and descriptors; compare with unix.
  Handle rows (shm, memfd, ring-memfd) send every size by handle (no inline threshold); `-touch` rows have
  the receiver read every byte (CRC32C of the view), the others answer from the descriptor
  alone. Payload bytes are pseudo-random (incompressible) and produced before timing; a handle
  row's client allocates a pooled region per request but does not write it while timed (a
  producer writes into the region instead of its own buffer).
  Across hosts (on loopback here): `tls` (XCP over TLS 1.3, mutual auth), `quic` (XCP over
  QUIC, a stream per channel) and the baseline users would pick there, `grpc-tls` (gRPC over
  TLS 1.3, mutual auth). They run only with --tls or when named in --paths (so --quick stays
  short); certificates are made for the run (`xcp cert dev`). Compare tls with tcp at 1 MiB.
  --io-compare runs other workloads: epoll against io_uring (see its help line).

Examples:
  xcp bench --quick
  xcp bench --paths tcp,raw-tcp,shm --sizes 64,16KiB,1MiB --json bench.json --svg bench.svg
  xcp bench --duration 5
  xcp bench --quick --tls
  xcp bench --paths raw-tcp,tcp,tls,quic,grpc,grpc-tls --sizes 64,1MiB
  xcp bench --load --clients 16 --messages 2000 --json load.json
  xcp bench --io-compare --duration 3 --json io.json";

/// Arguments of `xcp bench`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// The reduced matrix (64 B, 16 KiB, 1 MiB for every path; 16 MiB for raw-tcp, tcp, shm
    /// and memfd), with short phases: under a minute.
    #[arg(long)]
    pub quick: bool,

    /// Paths to run, comma-separated: raw-tcp, raw-unix, http2, grpc, grpc-tls, tcp, tls, quic, unix,
    /// ring, tcp-comp-crypt, shm, shm-touch, memfd, memfd-touch, ring-memfd (default: all but
    /// the across-hosts rows tls, quic and grpc-tls, which --tls adds).
    #[arg(long, value_name = "LIST")]
    pub paths: Option<String>,

    /// Add the across-hosts rows to the default paths: XCP over TLS and over QUIC, and gRPC
    /// over TLS (all with mutual authentication, certificates made for the run).
    #[arg(long)]
    pub tls: bool,

    /// Payload sizes, comma-separated, at least 33 bytes each (suffixes K, M; default
    /// 64,16KiB,1MiB,64MiB).
    #[arg(long, value_name = "LIST")]
    pub sizes: Option<String>,

    /// Seconds for each phase (latency, then throughput) of each path and size (default 2,
    /// 0.25 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,

    /// The most round trips of a latency phase (default 20000, 2000 with --quick).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,

    /// Write every figure, the settings and the machine description as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write a chart (p50 latency and throughput by size, one line per path) as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// The load test instead of the matrix: N client sessions × M requests of mixed sizes
    /// (64 B to 1 MiB, mostly small) and codecs (JSON, PROTOBUF, TENSOR_F32, ARROW_IPC)
    /// through one echo server, every reply checked byte for byte; exit 1 if any is lost or
    /// differs. Reports p50/p99/max latency, msg/s and MB/s (`--json` for the figures).
    #[arg(long)]
    pub load: bool,

    /// --load: concurrent client sessions.
    #[arg(long, value_name = "N", default_value_t = 16, requires = "load")]
    pub clients: usize,

    /// --load: requests per client.
    #[arg(long, value_name = "M", default_value_t = 2000, requires = "load")]
    pub messages: u64,

    /// --load: requests each client keeps in flight.
    #[arg(long, value_name = "W", default_value_t = 8, requires = "load")]
    pub window: usize,

    /// --load: an XCP echo server to use (`xcp serve`) instead of starting one.
    #[arg(long, value_name = "URL", requires = "load")]
    pub url: Option<String>,

    /// Instead of the matrix: the same workloads over epoll and over io_uring in one run
    /// (an `xcp serve --io MODE` child and client sessions of the same mode): 64-byte round
    /// trip p50/p99; streaming 16 KiB and 1 MiB echoes (MB/s, CPU seconds of both processes
    /// per GB moved); 64 connections x 4 requests in flight (msg/s, CPU us per message).
    /// Prints uring/epoll ratios. `--duration` sets each phase (default 2 s, 0.5 with
    /// --quick); `--json` writes the figures.
    #[arg(long, conflicts_with = "load")]
    pub io_compare: bool,

    /// The I/O interface of the matrix's XCP paths, client and server: epoll, uring or auto
    /// (the baselines always use tokio's epoll).
    #[arg(long, value_name = "epoll|uring|auto", default_value = "epoll")]
    pub io: xcp::transport::IoMode,

    /// The matrix across a real link instead of loopback: two network namespaces joined by a
    /// veth pair, the servers in one, this client in the other; the rows that can cross it
    /// (raw-tcp, tcp, tcp-comp-crypt; default sizes 64,1MiB,64MiB). Needs root and `ip`;
    /// skips with a reason where namespaces cannot be made.
    #[arg(long, conflicts_with_all = ["load", "io_compare"])]
    pub veth: bool,

    /// Internal (--veth): the network namespace the servers run in.
    #[arg(long, value_name = "NAME", hide = true, requires = "server_host")]
    pub server_netns: Option<String>,

    /// Internal (--veth): the address the servers listen on.
    #[arg(long, value_name = "IP", hide = true)]
    pub server_host: Option<String>,
}

/// What one run covers.
struct Plan {
    io: xcp::transport::IoMode,
    cells: Vec<(PathId, Vec<usize>)>,
    phase: Duration,
    iterations: u64,
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| f(x.trim()))
        .collect()
}

fn plan(args: &BenchArgs) -> Result<Plan, String> {
    let paths = match &args.paths {
        Some(p) => parse_list(p, |n| {
            PathId::from_name(n).ok_or_else(|| {
                let all: Vec<&str> = PathId::ALL.iter().map(|p| p.name()).collect();
                format!("unknown path {n:?} (one of {})", all.join(", "))
            })
        })?,
        None => PathId::ALL
            .into_iter()
            .filter(|p| args.tls || !p.across_hosts())
            .collect(),
    };
    let explicit = match &args.sizes {
        Some(s) => Some(parse_list(s, |x| {
            let n = parse_bytes(x)?;
            if !(33..=(64 << 20)).contains(&n) {
                return Err(format!("size {x}: must be 33 bytes to 64 MiB"));
            }
            Ok(n as usize)
        })?),
        None => None,
    };
    let mut cells = Vec::new();
    for p in PathId::ALL {
        if !paths.contains(&p) {
            continue;
        }
        let sizes = match &explicit {
            Some(s) => s.clone(),
            None if args.quick => {
                let mut s = vec![64, 16 << 10, 1 << 20];
                if matches!(
                    p,
                    PathId::RawTcp | PathId::Tcp | PathId::Shm | PathId::Memfd
                ) {
                    s.push(16 << 20);
                }
                s
            }
            None => vec![64, 16 << 10, 1 << 20, 64 << 20],
        };
        cells.push((p, sizes));
    }
    if cells.is_empty() {
        return Err("no path selected".into());
    }
    let secs = args.duration.unwrap_or(if args.quick { 0.25 } else { 2.0 });
    if !(0.01..=600.0).contains(&secs) {
        return Err("--duration: 0.01 to 600 seconds".into());
    }
    Ok(Plan {
        io: args.io,
        cells,
        phase: Duration::from_secs_f64(secs),
        iterations: args
            .iterations
            .unwrap_or(if args.quick { 2000 } else { 20000 })
            .max(1),
    })
}

/// How many requests a throughput phase keeps in flight at `size`.
fn window(size: usize) -> usize {
    ((128 << 20) / size).clamp(2, 32)
}

/// Runs the benchmark; returns the exit code.
pub async fn run(args: BenchArgs) -> u8 {
    if args.veth {
        return tokio::task::spawn_blocking(move || veth::run(&args))
            .await
            .unwrap_or(EXIT_FAILED);
    }
    if args.io_compare {
        let secs = args.duration.unwrap_or(if args.quick { 0.5 } else { 2.0 });
        if !(0.01..=600.0).contains(&secs) {
            eprintln!("error: --duration: 0.01 to 600 seconds");
            return EXIT_USAGE;
        }
        return io::run(Duration::from_secs_f64(secs), args.json.as_deref()).await;
    }
    if args.load {
        let plan = load::LoadPlan {
            clients: args.clients,
            messages: args.messages,
            window: args.window,
            url: args.url.clone(),
        };
        return load::run(plan, args.json.as_deref()).await;
    }
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let env = match Env::new() {
        Ok(mut e) => {
            e.io = args.io;
            e.server_netns = args.server_netns.clone();
            e.server_host = args.server_host.clone();
            e
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let total: usize = plan.cells.iter().map(|(_, s)| s.len()).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = Vec::new();
    let mut payloads: Vec<Payload> = Vec::new();
    for (path, sizes) in &plan.cells {
        bar.set_message(format!("{}: starting the server", path.name()));
        let server = match client::start_server(*path, &env) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: {e}", path.name()));
                bar.inc(sizes.len() as u64);
                continue;
            }
        };
        let c = match Client::connect(*path, &server.url, &env).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                failures.push(format!("{}: connect {}: {e}", path.name(), server.url));
                bar.inc(sizes.len() as u64);
                continue;
            }
        };
        for &size in sizes {
            bar.set_message(format!("{} {}", path.name(), report::size_label(size)));
            let p = match payloads.iter().position(|p| p.size == size) {
                Some(i) => &payloads[i],
                None => {
                    payloads.push(Payload::new(size));
                    payloads.last().expect("pushed")
                }
            };
            match measure(&c, p, &plan).await {
                Ok((latency, throughput)) => rows.push(Row {
                    path: path.name().to_string(),
                    size,
                    by_handle: path.by_handle(),
                    receiver_touched_bytes: path.touched(),
                    latency,
                    throughput,
                    ratio_vs_raw_tcp: None,
                }),
                Err(e) => failures.push(format!("{} {}: {e}", path.name(), size)),
            }
            bar.inc(1);
        }
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
        drop(server);
    }
    bar.finish_and_clear();
    report::fill_ratios(&mut rows);
    let elapsed = started.elapsed();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    report::print_table(&rows, &failures, elapsed, &plan_label(&plan));
    let machine = report::Machine::describe();
    let mut code = if failures.is_empty() && !rows.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    };
    if let Some(path) = &args.json {
        let doc = report::json(
            &rows,
            &failures,
            &machine,
            &command,
            &plan_label(&plan),
            elapsed,
        );
        if let Err(e) = std::fs::write(path, doc) {
            eprintln!("error: {}: {e}", path.display());
            code = EXIT_FAILED;
        }
    }
    if let Some(path) = &args.svg {
        if let Err(e) = std::fs::write(path, report::svg(&rows, &machine)) {
            eprintln!("error: {}: {e}", path.display());
            code = EXIT_FAILED;
        }
    }
    code
}

fn plan_label(plan: &Plan) -> String {
    format!(
        "XCP rows over {}; {:.2} s per phase, latency phase at most {} round trips",
        plan.io.name(),
        plan.phase.as_secs_f64(),
        plan.iterations
    )
}

/// Warms up (one verified call, then a few), then the latency and the throughput phases.
async fn measure(
    c: &Arc<Client>,
    p: &Payload,
    plan: &Plan,
) -> Result<(Latency, Throughput), String> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| e.to_string();
    c.call(p, true).await.map_err(err)?;
    for _ in 0..3 {
        c.call(p, false).await.map_err(err)?;
    }
    // Latency: one at a time.
    let mut h =
        Histogram::<u64>::new_with_bounds(100, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + plan.phase;
    let mut n = 0;
    while n < plan.iterations && (n < 5 || Instant::now() < deadline) {
        let t0 = Instant::now();
        c.call(p, false).await.map_err(err)?;
        h.saturating_record(t0.elapsed().as_nanos() as u64);
        n += 1;
    }
    let latency = Latency::from_histogram(&h);

    // Throughput: W in flight for the phase's time.
    let w = window(p.size);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Arc::new(Payload {
        size: p.size,
        raw: p.raw.clone(),
        tensor: p.tensor.clone(),
    });
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..w {
        let (c, done, stop, payload) = (c.clone(), done.clone(), stop.clone(), payload.clone());
        tasks.spawn(async move {
            // At least one request each, so the slowest sizes still complete W messages.
            loop {
                c.call(&payload, false).await.map_err(|e| e.to_string())?;
                done.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    return Ok::<(), String>(());
                }
            }
        });
    }
    tokio::time::sleep(plan.phase).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let messages = done.load(Ordering::Relaxed);
    let throughput = Throughput {
        window: w,
        messages,
        seconds: secs,
        mb_per_s: messages as f64 * p.size as f64 / secs / 1e6,
        msg_per_s: messages as f64 / secs,
    };
    Ok((latency, throughput))
}
