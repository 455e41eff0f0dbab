//! `xcp demo`: the main job in about 20 seconds, on one machine, with nothing to set up.
//!
//! Starts two server processes (this binary's `bench-server`: one on TCP offering shm
//! handles, one on a Unix socket offering memfd handles), then sends text, a batch of 1,000
//! embeddings as Arrow IPC, a 64 MiB F32 tensor inline, and the same tensor by shm handle and
//! by memfd handle. Every reply is checked; each step prints one line, then a table.

use std::time::{Duration, Instant};

use clap::Args;

use xcp::attach::Scheme;
use xcp::codec::{arrow, tensor, CodecId};
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::wire::frame::crc32c;
use xcp::{Attachment, Ether, Session, SessionConfig};

use crate::bench::client::{spawn_server, Env, ServerProc};
use crate::bench::server::Summary;
use crate::{EXIT_FAILED, EXIT_OK};

const AFTER_HELP: &str = "\
What it does:
  1. starts two server processes (`xcp bench-server`): TCP with shm handles, and a Unix
     socket with memfd handles; each reads every byte it receives and answers with a CRC32C
  2. text: an Ether round trip (Protobuf), echoed and compared
  3. Arrow: 1,000 embeddings of dimension 384 as one ARROW_IPC record batch, echoed, decoded
     and compared value by value
  4. a 64 MiB F32 tensor (TENSOR_F32 body) inline over TCP: chunked into 1 MiB frames
  5. the same tensor as an attachment by shm handle over TCP, then by memfd handle over the
     Unix socket: only a URI crosses the socket; the server maps the segment
  6. the same-host ring (ring://, SPEC §9): small round trips through shared memory against
     the Unix socket, and the tensor inline through the ring
  Tensor steps run several times; the table shows the median. Exit 1 if any check fails.";

/// Arguments of `xcp demo`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct DemoArgs {
    /// Round trips of each tensor step (the median is shown).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,

    /// Tensor size in MiB (more than 4: smaller bodies are echoed, not summarised).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(5..=1024))]
    pub tensor_mib: u16,
}

struct Step {
    name: &'static str,
    bytes: usize,
    time: Duration,
}

type R<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Runs the demo; returns the exit code.
pub async fn run(args: DemoArgs) -> u8 {
    let t0 = Instant::now();
    match steps(&args).await {
        Ok(steps) => {
            table(&steps);
            println!(
                "demo: all checks passed in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            EXIT_OK
        }
        Err(e) => {
            println!("demo: FAILED: {e}");
            EXIT_FAILED
        }
    }
}

fn config(scheme: Option<Scheme>) -> SessionConfig {
    SessionConfig::default()
        .with_request_timeout(Duration::from_secs(60))
        .with_attach(match scheme {
            Some(s) => AttachConfig::default().with_schemes(vec![s]),
            None => AttachConfig::inline_only(),
        })
}

fn server(listen: String, attach: &str) -> R<ServerProc> {
    let socket = listen.strip_prefix("unix://").map(std::path::PathBuf::from);
    let args: Vec<String> = [
        "--mode",
        "xcp",
        "--listen",
        &listen,
        "--attach",
        attach,
        "--touch",
        "--echo-max",
        "4MiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spawn_server(&args, socket)
}

async fn steps(args: &DemoArgs) -> R<Vec<Step>> {
    let env = Env::new()?;
    let tcp = server("tcp://127.0.0.1:0".into(), "shm")?;
    let unix_url = format!("unix://{}", env.dir.join("demo.sock").display());
    let unix = server(unix_url, "memfd")?;
    println!(
        "[1/7] servers: {} (shm handles) and {} (memfd handles), separate processes",
        tcp.url, unix.url
    );
    let inline = Session::connect(&tcp.url, config(None))
        .await
        .map_err(err("connect"))?;
    let mut out = Vec::new();

    // Text.
    let hello = Ether::text("hello from xcp demo");
    let t = Instant::now();
    let reply = inline
        .request(Outgoing::ether(&hello, CodecId::PROTOBUF).map_err(err("encode"))?)
        .await
        .map_err(err("text request"))?;
    let time = t.elapsed();
    let back = reply.ether().map_err(err("text reply"))?;
    if back != hello {
        return Err(format!("text: the echo differs: {back:?}"));
    }
    println!(
        "[2/7] text: sent {:?} (Protobuf Ether), echoed back identical in {:.0} µs",
        "hello from xcp demo",
        time.as_secs_f64() * 1e6
    );
    out.push(Step {
        name: "text (Protobuf Ether)",
        bytes: reply.body.len(),
        time,
    });

    // Arrow: 1,000 embeddings of dim 384.
    let ethers: Vec<Ether> = (0..1000)
        .map(|i| {
            let v: Vec<f32> = (0..384)
                .map(|j| ((i * 384 + j) as f32 * 0.001).sin())
                .collect();
            Ether::embedding(&v)
        })
        .collect();
    let body = arrow::encode_ethers(&ethers).map_err(err("arrow encode"))?;
    let t = Instant::now();
    let reply = inline
        .request(Outgoing::data(CodecId::ARROW_IPC, body.clone()))
        .await
        .map_err(err("arrow request"))?;
    let time = t.elapsed();
    let back =
        arrow::decode_ethers(reply.body.clone(), Some("embedding")).map_err(err("arrow reply"))?;
    if back.len() != ethers.len()
        || back
            .iter()
            .zip(&ethers)
            .any(|(a, b)| a.payload != b.payload)
    {
        return Err("arrow: the decoded embeddings differ".into());
    }
    println!(
        "[3/7] arrow: 1,000 embeddings x 384 as one ARROW_IPC batch ({:.2} MB), echoed, decoded, all {} values equal, {:.1} ms",
        body.len() as f64 / 1e6,
        1000 * 384,
        time.as_secs_f64() * 1e3
    );
    out.push(Step {
        name: "arrow 1000x384 (echo)",
        bytes: body.len() * 2,
        time,
    });

    // The tensor, inline.
    let elems = usize::from(args.tensor_mib) << 18;
    let shape = [(elems / 1024) as u32, 1024];
    let values: Vec<f32> = (0..elems).map(|i| (i % 9973) as f32 * 0.5).collect();
    let body = tensor::encode_f32(&shape, &values, false).map_err(err("tensor encode"))?;
    let data = body.slice(tensor::HEADER_LEN..);
    let want = crc32c(&data);
    let want_body = crc32c(&body);
    let mut times = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let t = Instant::now();
        let reply = inline
            .request(Outgoing::data(CodecId::TENSOR_F32, body.clone()))
            .await
            .map_err(err("inline tensor"))?;
        times.push(t.elapsed());
        let s = Summary::decode(&reply.body).ok_or("inline tensor: bad reply")?;
        if s.crc != want_body || s.bytes != body.len() as u64 || s.handles != 0 {
            return Err(format!("inline tensor: the server saw {s:?}"));
        }
    }
    let inline_time = median(&mut times);
    println!(
        "[4/7] tensor inline: {} F32 [{} x {}] over TCP in {} frames of 1 MiB, server CRC32C matches, median {:.1} ms ({:.0} MB/s)",
        label(body.len()),
        shape[0],
        shape[1],
        body.len().div_ceil(1 << 20),
        inline_time.as_secs_f64() * 1e3,
        body.len() as f64 / inline_time.as_secs_f64() / 1e6
    );
    out.push(Step {
        name: "tensor inline (TCP)",
        bytes: body.len(),
        time: inline_time,
    });
    let _ = inline.close().await;

    // The tensor by handle: shm over TCP, memfd over the Unix socket.
    for (n, (srv, scheme, name)) in [
        (&tcp, Scheme::Shm, "tensor by shm handle (TCP)"),
        (&unix, Scheme::Memfd, "tensor by memfd handle (Unix)"),
    ]
    .into_iter()
    .enumerate()
    {
        let s = Session::connect(&srv.url, config(Some(scheme)))
            .await
            .map_err(err("connect"))?;
        if s.negotiated().attach != [scheme] {
            return Err(format!("{name}: {} not negotiated", scheme.name()));
        }
        let mut times = Vec::new();
        let mut uri = String::new();
        for _ in 0..args.repeat.max(1) {
            let mut region = s.alloc(data.len()).await.map_err(err("alloc"))?;
            // A producer writes its tensor straight into the region; done before timing.
            region.copy_from_slice(&data);
            let att = Attachment {
                id: "tensor".into(),
                media_type: "application/x-raw-tensor".into(),
                codec: "TENSOR_F32".into(),
                shape: shape.to_vec(),
                dtype: "float32".into(),
                ..Default::default()
            };
            let t = Instant::now();
            let reply = s
                .request_regions(
                    Ether::text("tensor"),
                    CodecId::PROTOBUF,
                    vec![(att, region)],
                )
                .await
                .map_err(err("handle tensor"))?;
            times.push(t.elapsed());
            let sum = Summary::decode(&reply.body).ok_or("handle tensor: bad reply")?;
            if sum.crc != want || sum.bytes != data.len() as u64 || sum.handles != 1 {
                return Err(format!("{name}: the server saw {sum:?}"));
            }
            if uri.is_empty() {
                uri = format!("{}://…", scheme.name());
            }
        }
        let time = median(&mut times);
        println!(
            "[{}/7] {name}: {} by {uri} (only the URI crossed the socket), server mapped it, read every byte, CRC32C matches, median {:.2} ms ({:.0} MB/s, {:.1}x inline)",
            5 + n,
            label(data.len()),
            time.as_secs_f64() * 1e3,
            data.len() as f64 / time.as_secs_f64() / 1e6,
            inline_time.as_secs_f64() / time.as_secs_f64()
        );
        out.push(Step {
            name,
            bytes: data.len(),
            time,
        });
        let _ = s.close().await;
    }
    // The same-host ring: the Unix server again, its client asking for the ring (SPEC §9).
    let ring_url = unix.url.replacen("unix://", "ring://", 1);
    let small = Outgoing::ether(&Ether::text("a small message"), CodecId::PROTOBUF)
        .map_err(err("encode"))?;
    let mut p50 = Vec::new();
    for url in [&unix.url, &ring_url] {
        let s = Session::connect(url, config(None))
            .await
            .map_err(err("connect"))?;
        let mut times = Vec::with_capacity(ROUND_TRIPS);
        for _ in 0..ROUND_TRIPS {
            let t = Instant::now();
            let reply = s
                .request(small.clone())
                .await
                .map_err(err("small request"))?;
            times.push(t.elapsed());
            if reply.body != small.body {
                return Err(format!("small message over {url}: the echo differs"));
            }
        }
        p50.push((median(&mut times), s.io()));
        if url == &ring_url {
            // And the tensor inline, through shared memory instead of the socket.
            let mut times = Vec::new();
            for _ in 0..args.repeat.max(1) {
                let t = Instant::now();
                let reply = s
                    .request(Outgoing::data(CodecId::TENSOR_F32, body.clone()))
                    .await
                    .map_err(err("ring tensor"))?;
                times.push(t.elapsed());
                let sum = Summary::decode(&reply.body).ok_or("ring tensor: bad reply")?;
                if sum.crc != want_body || sum.bytes != body.len() as u64 {
                    return Err(format!("ring tensor: the server saw {sum:?}"));
                }
            }
            let time = median(&mut times);
            out.push(Step {
                name: "tensor inline (ring)",
                bytes: body.len(),
                time,
            });
            out.push(Step {
                name: "small round trip (ring)",
                bytes: 2 * small.body.len(),
                time: p50[1].0,
            });
            println!(
                "[7/7] ring ({}): small-message round trip p50 {:.1} µs against {:.1} µs on the Unix socket ({:.2}x); {} inline through the ring, server CRC32C matches, median {:.1} ms ({:.0} MB/s)",
                p50[1].1,
                p50[1].0.as_secs_f64() * 1e6,
                p50[0].0.as_secs_f64() * 1e6,
                p50[1].0.as_secs_f64() / p50[0].0.as_secs_f64(),
                label(body.len()),
                time.as_secs_f64() * 1e3,
                body.len() as f64 / time.as_secs_f64() / 1e6
            );
        }
        let _ = s.close().await;
    }
    drop((tcp, unix));
    Ok(out)
}

/// The small round trips of the ring step, on each transport.
const ROUND_TRIPS: usize = 2000;

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn label(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.0} MiB", n as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

fn table(steps: &[Step]) {
    let inline = steps
        .iter()
        .find(|s| s.name.starts_with("tensor inline"))
        .map(|s| s.time);
    println!();
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>14}",
        "step", "bytes", "time", "MB/s", "vs inline"
    );
    for s in steps {
        let ratio = match (inline, s.name.contains("handle")) {
            (Some(i), true) => format!("{:.1}x faster", i.as_secs_f64() / s.time.as_secs_f64()),
            _ => "-".into(),
        };
        println!(
            "{:<32} {:>10} {:>8.2} ms {:>10.0} {:>14}",
            s.name,
            s.bytes,
            s.time.as_secs_f64() * 1e3,
            s.bytes as f64 / s.time.as_secs_f64() / 1e6,
            ratio
        );
    }
    println!("(tensor rows: median of the round trips; handle rows: the server read every byte)");
}
