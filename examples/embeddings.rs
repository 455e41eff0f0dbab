//! One million 768-dim float32 embeddings (3.07 GB) from a producer process to a consumer
//! process that reads every value, as Arrow IPC record batches: by handle (POSIX shm, memfd)
//! versus inline over TCP and over a Unix socket; measured against one memcpy of the same
//! bytes; plus the round trip of one 64 MiB region by handle versus inline, next to a PING.
//!
//! ```text
//! cargo run --release --example embeddings                    # the full 3.07 GB
//! cargo run --release --example embeddings -- --count 100000  # a quick look
//! ```
//!
//! The producer re-executes itself as the consumer (`--consumer`), which listens on TCP and on
//! a Unix socket. Every clock starts with the embeddings in the producer's own memory and
//! stops when the producer holds the consumer's answer to a final `done` request, sent after
//! the last batch: the consumer has then decoded every batch and summed every value (the sum
//! is compared with the producer's own, bit for bit).
//!
//! - **shm / memfd**: for each batch of `--batch-rows` rows the producer loans a region
//!   (`Session::alloc`), writes the batch's Arrow IPC stream straight into it (the schema and
//!   batch header, laid out once per row count by arrow-ipc, then the values: the one copy),
//!   and sends it as an attachment by handle; the consumer maps it, decodes the stream in
//!   place (`View::arrow`, the column points into the segment) and sums it; dropping the view
//!   ACKs and the region returns to the pool, so the pool holds `--pool-batches` batches.
//! - **direct**: as shm, but the producer computes the values straight into the region (no
//!   copy at all; the clock then includes computing them, which is reported on its own).
//! - **inline**: the same Arrow stream (built with one copy into a recycled buffer) is the
//!   body of an ARROW_IPC message, chunked to `max_frame_bytes`.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch};
use arrow_buffer::{Buffer, MutableBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use clap::Parser;

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::{Attachment, Ether, Server, Session, SessionConfig};

/// The largest message either side accepts (one batch of 64 Ki rows is 192 MiB).
const MAX_MESSAGE: u64 = 1 << 30;
/// End-of-stream marker of the Arrow IPC stream format.
const EOS: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
const HANDLE_RT_BYTES: usize = 64 << 20;

#[derive(Parser, Debug, Clone)]
#[command(about = "Embeddings from a producer process to a consumer process: shm vs TCP")]
struct Opts {
    /// Number of embeddings.
    #[arg(long, default_value_t = 1_000_000)]
    count: usize,
    /// Dimensions of each embedding (float32).
    #[arg(long, default_value_t = 768)]
    dim: usize,
    /// Rows per Arrow record batch at most (one message each; the batches are made equal).
    #[arg(long, default_value_t = 64 << 10)]
    batch_rows: usize,
    /// Runs of each variant; the best is reported, and the first in brackets.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Batches the sender's pool of shared segments holds at most.
    #[arg(long, default_value_t = 4)]
    pool_batches: usize,
    /// Round trips measured per kind (median reported).
    #[arg(long, default_value_t = 20)]
    rt_reps: usize,
    /// max_frame_bytes of both sides (inline bodies are chunked to it).
    #[arg(long, default_value_t = 1 << 20)]
    max_frame_bytes: u64,
    /// Run as the consumer (internal: the producer starts it).
    #[arg(long, hide = true)]
    consumer: bool,
    #[arg(long, hide = true)]
    listen_tcp: Option<String>,
    #[arg(long, hide = true)]
    listen_unix: Option<String>,
}

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = if opts.consumer {
        rt.block_on(consumer(opts))
    } else {
        rt.block_on(producer(opts))
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------
// What both sides share: the values, their sum, the Arrow layout.

/// The value at flat index `i` (cheap, so computing values in place costs about a memset).
#[inline(always)]
fn value(i: usize) -> f32 {
    ((i as u32) & 1023) as f32 * (1.0 / 1024.0) - 0.5
}

fn fill_values(out: &mut [f32], first: usize) {
    for (j, v) in out.iter_mut().enumerate() {
        *v = value(first + j);
    }
}

/// Sums every value, 16 independent lanes (vectorised), reduced in a fixed order: the same
/// slice gives the same bits on both sides.
fn sum(values: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let mut s: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    for a in acc {
        s += f64::from(a);
    }
    s
}

fn schema(dim: usize) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    Arc::new(Schema::new(vec![Field::new(
        "embedding",
        DataType::FixedSizeList(item, dim as i32),
        false,
    )]))
}

fn batch_of(schema: &SchemaRef, dim: usize, values: Buffer) -> RecordBatch {
    let n = values.len() / 4;
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let values = Float32Array::new(ScalarBuffer::new(values, 0, n), None);
    let list = FixedSizeListArray::new(item, dim as i32, Arc::new(values), None);
    RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).expect("batch")
}

/// The Arrow IPC stream of a batch of `rows` rows: `prefix` (the schema message and the
/// batch's header, as arrow-ipc writes them), then the values, then the end-of-stream marker.
struct Layout {
    prefix: Vec<u8>,
    values_len: usize,
}

impl Layout {
    /// Lays out a batch of `rows` rows once, with arrow-ipc's own writer on zeroed values,
    /// and checks that the values come last, 64-byte aligned.
    fn new(schema: &SchemaRef, dim: usize, rows: usize) -> Layout {
        let values_len = rows * dim * 4;
        let zeros: Buffer = MutableBuffer::from_len_zeroed(values_len).into();
        let batch = batch_of(schema, dim, zeros);
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), schema).expect("writer");
        w.write(&batch).expect("write");
        let stream = w.into_inner().expect("finish");
        let n = stream.len();
        assert_eq!(&stream[n - 8..], &EOS, "the stream ends with its marker");
        let start = n - 8 - values_len;
        assert_eq!(start % 64, 0, "values 64-byte aligned");
        assert!(stream[start..n - 8].iter().all(|&b| b == 0), "values last");
        Layout {
            prefix: stream[..start].to_vec(),
            values_len,
        }
    }

    fn stream_len(&self) -> usize {
        self.prefix.len() + self.values_len + EOS.len()
    }

    /// Writes the stream into `out` (exactly `stream_len` bytes); `values` fills the values.
    fn write(&self, out: &mut [u8], values: impl FnOnce(&mut [f32])) {
        let p = self.prefix.len();
        out[..p].copy_from_slice(&self.prefix);
        values(bytemuck::cast_slice_mut(&mut out[p..p + self.values_len]));
        out[p + self.values_len..].copy_from_slice(&EOS);
    }
}

/// Rows of batch `b`: `(first row, rows)`.
///
/// The batches are as equal as can be (62 500 rows each for a million in batches of at most
/// 64 Ki), so every region has the same size class and the pool reuses its segments instead
/// of evicting one for a smaller last batch.
fn batches(opts: &Opts) -> Vec<(usize, usize)> {
    let n = opts.count.div_ceil(opts.batch_rows);
    let (base, extra) = (opts.count / n, opts.count % n);
    let mut first = 0;
    (0..n)
        .map(|b| {
            let rows = base + usize::from(b < extra);
            first += rows;
            (first - rows, rows)
        })
        .collect()
}

/// The size of the pool segment that holds `len` bytes (as `xcp::attach::pool` sizes them:
/// powers of two up to 64 MiB, then multiples of 2 MiB).
fn segment_class(len: usize) -> usize {
    let len = len.max(64 << 10);
    if len <= 64 << 20 {
        len.next_power_of_two()
    } else {
        len.div_ceil(2 << 20) * (2 << 20)
    }
}

// ---------------------------------------------------------------------------------------
// The consumer.

fn session_config(opts: &Opts, schemes: Vec<Scheme>, pool_cap: u64) -> SessionConfig {
    let mut c = SessionConfig::default();
    c.conn.limits.max_frame_bytes = opts.max_frame_bytes;
    c.conn.limits.max_message_bytes = MAX_MESSAGE;
    c.request_timeout = Duration::from_secs(600);
    // Few messages queued: back-pressure instead of gigabytes waiting in memory.
    c.max_in_flight = 2;
    c.attach = AttachConfig::default()
        .with_schemes(schemes)
        .with_pool_cap_bytes(pool_cap)
        .with_alloc_timeout(Duration::from_secs(120));
    c
}

async fn consumer(opts: Opts) -> i32 {
    // The producer holds our stdin: when it goes, so do we.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let cfg = session_config(&opts, AttachConfig::default().schemes, 1 << 20);
    let tcp = Server::bind(opts.listen_tcp.as_deref().unwrap(), cfg.clone())
        .await
        .expect("bind tcp");
    let unix = Server::bind(opts.listen_unix.as_deref().unwrap(), cfg)
        .await
        .expect("bind unix");
    println!("listening on {} {}", tcp.local_url(), unix.local_url());
    for server in [tcp, unix] {
        tokio::spawn(async move {
            while let Ok(s) = server.accept().await {
                tokio::spawn(consume(s));
            }
        });
    }
    std::future::pending::<()>().await;
    0
}

/// What one session received since the last `done`.
#[derive(Default)]
struct Tally {
    rows: u64,
    sum: f64,
    batches: u64,
    /// Batches that came by handle but whose values were not read in place.
    copied: u64,
    /// Time spent decoding and summing.
    busy: Duration,
}

async fn consume(s: Session) {
    let mut tally = Tally::default();
    while let Ok(m) = s.recv().await {
        let kind = m.ether.as_ref().map(|e| e.kind.clone()).unwrap_or_default();
        match kind.as_str() {
            "emb.batch" => {
                let Some(bytes) = m.attachment_bytes("batch") else {
                    eprintln!("consumer: a batch without bytes");
                    continue;
                };
                let by_handle = m.view("batch").map(|v| v.as_ptr_range());
                tokio::task::block_in_place(|| read_stream(bytes, by_handle, &mut tally));
                // Dropping the message drops its views: the producer's region is ACKed.
                drop(m);
            }
            "emb.done" => {
                let mut e = Ether::new("emb.sum", serde_json::Map::new());
                e.payload.insert("rows".into(), tally.rows.into());
                e.payload.insert("sum".into(), tally.sum.into());
                e.payload.insert("batches".into(), tally.batches.into());
                e.payload.insert("copied".into(), tally.copied.into());
                e.payload
                    .insert("busy_s".into(), tally.busy.as_secs_f64().into());
                tally = Tally::default();
                let out = Outgoing::ether(&e, CodecId::JSON).expect("encode");
                if s.reply(&m, out).await.is_err() {
                    break;
                }
            }
            "emb.rt" => {
                // The bytes are here (mapped, or received whole): answer at once.
                let out = Outgoing::ether(&Ether::text("ok"), CodecId::JSON).expect("encode");
                if s.reply(&m, out).await.is_err() {
                    break;
                }
            }
            _ if m.header.body_codec == CodecId::ARROW_IPC => {
                let body = m.body.clone();
                tokio::task::block_in_place(|| read_stream(body, None, &mut tally));
            }
            other => eprintln!("consumer: unexpected message {other:?}"),
        }
    }
}

/// Decodes an Arrow IPC stream (in place) and sums every value of every batch.
fn read_stream(bytes: Bytes, mapped: Option<std::ops::Range<*const u8>>, tally: &mut Tally) {
    let t = Instant::now();
    let (_, batches) = xcp::codec::arrow::decode_batches(bytes).expect("an Arrow IPC stream");
    for b in batches {
        let list = b
            .column(0)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .expect("FixedSizeList");
        let values = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .expect("Float32");
        let v: &[f32] = values.values();
        if let Some(range) = &mapped {
            if !range.contains(&(v.as_ptr() as *const u8)) {
                tally.copied += 1;
            }
        }
        tally.sum += sum(v);
        tally.rows += b.num_rows() as u64;
        tally.batches += 1;
    }
    tally.busy += t.elapsed();
}

// ---------------------------------------------------------------------------------------
// The producer.

/// The consumer process, killed when dropped.
struct Consumer {
    child: Child,
    tcp: String,
    unix: String,
    socket: std::path::PathBuf,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start_consumer(opts: &Opts) -> Consumer {
    let socket = std::env::temp_dir().join(format!("xcp-emb-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--consumer",
            "--listen-tcp",
            "tcp://127.0.0.1:0",
            "--listen-unix",
        ])
        .arg(format!("unix://{}", socket.display()))
        .args(["--max-frame-bytes", &opts.max_frame_bytes.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the consumer");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the consumer's first line");
    let mut urls = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening on ...")
        .split(' ');
    let (tcp, unix) = (
        urls.next().unwrap().to_string(),
        urls.next().unwrap().to_string(),
    );
    Consumer {
        child,
        tcp,
        unix,
        socket,
    }
}

/// How the batches travel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Copied into a loaned region, sent by handle.
    Copy,
    /// Computed straight into a loaned region, sent by handle.
    Direct,
    /// Copied into a message body, sent inline.
    Inline,
}

struct Run {
    name: String,
    best: Pass,
    first: Pass,
}

/// A buffer that goes back to its free list when the last `Bytes` of it is dropped, so the
/// inline path does not page-fault fresh memory for every batch.
struct Recycled {
    buf: Vec<u8>,
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.free.lock().unwrap().push(buf);
    }
}

struct Source {
    opts: Opts,
    values: Buffer,
    layouts: HashMap<usize, Layout>,
    expected: f64,
}

impl Source {
    /// Sends every batch the `way` says, then `done`; returns the time from the first byte
    /// touched to the consumer's answer, after checking the answer.
    async fn send_all(&self, s: &Session, way: Way, free: &Arc<Mutex<Vec<Vec<u8>>>>) -> Pass {
        let dim = self.opts.dim;
        let all: &[f32] = bytemuck::cast_slice(self.values.as_slice());
        let start = Instant::now();
        let mut writing = Duration::ZERO;
        let mut waiting = Duration::ZERO;
        for (first, rows) in batches(&self.opts) {
            let layout = &self.layouts[&rows];
            let src = &all[first * dim..(first + rows) * dim];
            match way {
                Way::Copy | Way::Direct => {
                    let t = Instant::now();
                    let mut region = s.alloc(layout.stream_len()).await.expect("alloc");
                    waiting += t.elapsed();
                    let t = Instant::now();
                    tokio::task::block_in_place(|| match way {
                        Way::Copy => layout.write(&mut region, |v| v.copy_from_slice(src)),
                        _ => layout.write(&mut region, |v| fill_values(v, first * dim)),
                    });
                    writing += t.elapsed();
                    let mut e = Ether::new("emb.batch", serde_json::Map::new());
                    e.payload.insert("rows".into(), rows.into());
                    let att = Attachment {
                        id: "batch".into(),
                        media_type: "application/vnd.apache.arrow.stream".into(),
                        codec: "ARROW_IPC".into(),
                        ..Attachment::default()
                    };
                    s.send_regions(e, CodecId::PROTOBUF, vec![(att, region)])
                        .await
                        .expect("send_regions");
                }
                Way::Inline => {
                    let mut buf = free.lock().unwrap().pop().unwrap_or_default();
                    buf.resize(layout.stream_len(), 0);
                    let t = Instant::now();
                    tokio::task::block_in_place(|| {
                        layout.write(&mut buf, |v| v.copy_from_slice(src))
                    });
                    writing += t.elapsed();
                    let body = Bytes::from_owner(Recycled {
                        buf,
                        free: free.clone(),
                    });
                    let t = Instant::now();
                    s.send(Outgoing::data(CodecId::ARROW_IPC, body))
                        .await
                        .expect("send");
                    waiting += t.elapsed();
                }
            }
        }
        let done = Outgoing::ether(
            &Ether::new("emb.done", serde_json::Map::new()),
            CodecId::JSON,
        )
        .expect("encode");
        let reply = s.request(done).await.expect("done");
        let took = start.elapsed();
        let e = reply.ether().expect("answer");
        let rows = e.payload["rows"].as_u64().unwrap_or(0);
        let got = e.payload["sum"].as_f64().unwrap_or(f64::NAN);
        assert_eq!(rows, self.opts.count as u64, "the consumer read every row");
        assert!(
            got.to_bits() == self.expected.to_bits(),
            "the consumer's sum {got} differs from ours {}",
            self.expected
        );
        assert_eq!(
            e.payload["copied"], 0,
            "batches by handle were read in place"
        );
        Pass {
            took,
            writing,
            waiting,
            reading: Duration::from_secs_f64(e.payload["busy_s"].as_f64().unwrap_or(0.0)),
        }
    }
}

/// One pass of every batch.
#[derive(Clone, Copy)]
struct Pass {
    /// From the first byte touched to the consumer's answer.
    took: Duration,
    /// Producer: writing the streams (the copy, or computing the values).
    writing: Duration,
    /// Producer: waiting for a region (alloc) or for room to send.
    waiting: Duration,
    /// Consumer: decoding the streams and summing the values.
    reading: Duration,
}

async fn bulk(
    src: &Source,
    url: &str,
    name: &str,
    schemes: Vec<Scheme>,
    way: Way,
    pool_cap: u64,
) -> Run {
    let s = Session::connect(url, session_config(&src.opts, schemes, pool_cap))
        .await
        .expect("connect");
    let free = Arc::new(Mutex::new(Vec::new()));
    let mut passes = Vec::new();
    for _ in 0..src.opts.repeat.max(1) {
        passes.push(src.send_all(&s, way, &free).await);
    }
    let _ = s.close().await;
    Run {
        name: name.to_string(),
        best: *passes.iter().min_by_key(|p| p.took).unwrap(),
        first: passes[0],
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Round trip times (medians) of one session.
struct RoundTrips {
    /// PING/PONG, answered inside the peer's driver.
    ping: Duration,
    /// A request without attachment, answered by the consumer application.
    small: Duration,
    /// A request with a 64 MiB attachment (by handle where the session negotiated one, else
    /// inline), answered by the consumer application as soon as it holds the bytes.
    big: Duration,
}

async fn round_trips(opts: &Opts, url: &str, schemes: Vec<Scheme>) -> RoundTrips {
    let s = Session::connect(
        url,
        session_config(opts, schemes, 4 * HANDLE_RT_BYTES as u64),
    )
    .await
    .expect("connect");
    let reps = opts.rt_reps.max(1);
    let mut pings = Vec::new();
    for i in 0..reps + 3 {
        let rtt = s.ping().await.expect("ping");
        if i >= 3 {
            pings.push(rtt);
        }
    }
    let att = || Attachment {
        id: "blob".into(),
        media_type: "application/octet-stream".into(),
        ..Attachment::default()
    };
    let rt = Ether::new("emb.rt", serde_json::Map::new());
    let mut smalls = Vec::new();
    for i in 0..reps + 3 {
        let t = Instant::now();
        s.request(Outgoing::ether(&rt, CodecId::PROTOBUF).expect("encode"))
            .await
            .expect("small round trip");
        if i >= 3 {
            smalls.push(t.elapsed());
        }
    }
    let mut times = Vec::new();
    if s.negotiated().attach.is_empty() {
        // Inline: the same bytes as one PROTOBUF Ether body, encoded once beforehand.
        let mut e = rt.clone();
        let mut a = att();
        a.size_bytes = HANDLE_RT_BYTES as u64;
        a.inline_bytes = Some(Bytes::from(vec![7u8; HANDLE_RT_BYTES]));
        e.attachments.push(a);
        let body = Outgoing::ether(&e, CodecId::PROTOBUF).expect("encode").body;
        for i in 0..reps.min(10) + 1 {
            let t = Instant::now();
            s.request(Outgoing::data(CodecId::PROTOBUF, body.clone()))
                .await
                .expect("inline round trip");
            if i > 0 {
                times.push(t.elapsed());
            }
        }
    } else {
        for i in 0..reps + 1 {
            let mut region = s.alloc(HANDLE_RT_BYTES).await.expect("alloc");
            region[0] = i as u8;
            let t = Instant::now();
            s.request_regions(rt.clone(), CodecId::PROTOBUF, vec![(att(), region)])
                .await
                .expect("handle round trip");
            if i > 0 {
                times.push(t.elapsed());
            }
        }
    }
    let _ = s.close().await;
    RoundTrips {
        ping: median(pings),
        small: median(smalls),
        big: median(times),
    }
}

fn gb(bytes: usize) -> f64 {
    bytes as f64 / 1e9
}

fn best_of<F: FnMut() -> Duration>(n: usize, mut f: F) -> (Duration, Duration) {
    let times: Vec<Duration> = (0..n.max(1)).map(|_| f()).collect();
    (*times.iter().min().unwrap(), times[0])
}

async fn producer(opts: Opts) -> i32 {
    assert!(opts.count > 0 && opts.dim > 0 && opts.batch_rows > 0);
    let total = opts.count * opts.dim * 4;
    let batch_list = batches(&opts);
    println!(
        "embeddings: {} x {} float32 = {:.2} GB, {} Arrow IPC batches of up to {} rows ({:.0} MiB)",
        opts.count,
        opts.dim,
        gb(total),
        batch_list.len(),
        opts.batch_rows,
        (opts.batch_rows * opts.dim * 4) as f64 / (1 << 20) as f64
    );

    // The embeddings, in the producer's own memory.
    let mut own = vec![0f32; opts.count * opts.dim];
    fill_values(&mut own, 0);
    let values = Buffer::from_vec(own);
    let schema = schema(opts.dim);
    let all: &[f32] = bytemuck::cast_slice(values.as_slice());
    let mut expected = 0f64;
    let mut layouts = HashMap::new();
    for &(first, rows) in &batch_list {
        expected += sum(&all[first * opts.dim..(first + rows) * opts.dim]);
        layouts
            .entry(rows)
            .or_insert_with(|| Layout::new(&schema, opts.dim, rows));
    }
    self_check(&schema, opts.dim);

    // References: one memcpy of the same bytes into memory already touched, and computing
    // the values into it.
    let (memcpy, memcpy_fresh, memcpy_batches, compute) = {
        let src: &[u8] = values.as_slice();
        let fresh = Instant::now();
        let mut dst: Vec<u8> = Vec::with_capacity(total);
        dst.extend_from_slice(src);
        let fresh = fresh.elapsed();
        std::hint::black_box(&dst);
        let (memcpy, _) = best_of(opts.repeat, || {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(src));
            std::hint::black_box(&dst);
            t.elapsed()
        });
        // The same bytes batch by batch into one buffer of a batch, as into a pool region.
        let batch_bytes = opts.batch_rows.min(opts.count) * opts.dim * 4;
        let (by_batch, _) = best_of(opts.repeat, || {
            let t = Instant::now();
            for (first, rows) in &batch_list {
                let (a, b) = (first * opts.dim * 4, (first + rows) * opts.dim * 4);
                dst[..b - a].copy_from_slice(std::hint::black_box(&src[a..b]));
                std::hint::black_box(&dst[..batch_bytes]);
            }
            t.elapsed()
        });
        let (compute, _) = best_of(opts.repeat, || {
            let t = Instant::now();
            fill_values(bytemuck::cast_slice_mut(&mut dst), 0);
            std::hint::black_box(&dst);
            t.elapsed()
        });
        (memcpy, fresh, by_batch, compute)
    };

    let consumer = start_consumer(&opts);
    // Room for `pool_batches` batches in flight, and no more.
    let batch_seg = layouts
        .values()
        .map(|l| segment_class(l.stream_len()))
        .max()
        .unwrap_or(0);
    let pool_cap = (opts.pool_batches.max(1) * batch_seg) as u64;
    let src = Source {
        opts: opts.clone(),
        values,
        layouts,
        expected,
    };
    let runs = vec![
        bulk(
            &src,
            &consumer.tcp,
            "shm (TCP control), copy into the region",
            vec![Scheme::Shm],
            Way::Copy,
            pool_cap,
        )
        .await,
        bulk(
            &src,
            &consumer.unix,
            "memfd (Unix socket), copy into the region",
            vec![Scheme::Memfd],
            Way::Copy,
            pool_cap,
        )
        .await,
        bulk(
            &src,
            &consumer.tcp,
            "shm, values computed in the region (no copy)",
            vec![Scheme::Shm],
            Way::Direct,
            pool_cap,
        )
        .await,
        bulk(
            &src,
            &consumer.tcp,
            "inline over TCP (Arrow body, chunked)",
            vec![],
            Way::Inline,
            pool_cap,
        )
        .await,
        bulk(
            &src,
            &consumer.unix,
            "inline over a Unix socket",
            vec![],
            Way::Inline,
            pool_cap,
        )
        .await,
    ];

    let shm_rt = round_trips(&opts, &consumer.tcp, vec![Scheme::Shm]).await;
    let memfd_rt = round_trips(&opts, &consumer.unix, vec![Scheme::Memfd]).await;
    let tcp_rt = round_trips(&opts, &consumer.tcp, vec![]).await;
    let unix_rt = round_trips(&opts, &consumer.unix, vec![]).await;
    drop(consumer);

    let tcp = runs[3].best.took.as_secs_f64();
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "one memcpy of {:.2} GB (into touched memory, best of {}): {:.3} s = {:.1} GB/s; \
         into fresh memory: {:.3} s",
        gb(total),
        opts.repeat.max(1),
        secs(memcpy),
        gb(total) / secs(memcpy),
        secs(memcpy_fresh)
    );
    println!(
        "the same bytes batch by batch into one touched buffer of a batch: {:.3} s = {:.1} GB/s",
        secs(memcpy_batches),
        gb(total) / secs(memcpy_batches)
    );
    println!(
        "computing the values into touched memory: {:.3} s",
        secs(compute)
    );
    println!();
    println!(
        "{:<48} {:>7} {:>8} {:>6} {:>8} {:>6}   {:>6} {:>6} {:>6}",
        "producer -> consumer, every value read",
        "best s",
        "(first)",
        "GB/s",
        "x memcpy",
        "x TCP",
        "write",
        "wait",
        "read"
    );
    for r in &runs {
        let b = &r.best;
        println!(
            "{:<48} {:>7.3} {:>8.3} {:>6.2} {:>8.2} {:>6.2}   {:>6.3} {:>6.3} {:>6.3}",
            r.name,
            secs(b.took),
            secs(r.first.took),
            gb(total) / secs(b.took),
            secs(b.took) / secs(memcpy),
            secs(b.took) / tcp,
            secs(b.writing),
            secs(b.waiting),
            secs(b.reading),
        );
    }
    println!(
        "(write: producer writing the streams; wait: producer waiting for a region or for \
         room to send; read: consumer decoding and summing; all in seconds, best pass)"
    );
    println!();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{:<48} {:>12} {:>9} {:>11}",
        "round trip (median)", "us", "x PING", "x request"
    );
    let (ping_tcp, ping_unix) = (shm_rt.ping, memfd_rt.ping);
    let (small_tcp, small_unix) = (shm_rt.small, memfd_rt.small);
    let rows = [
        ("PING, 64 bytes, TCP", ping_tcp, ping_tcp, small_tcp),
        (
            "PING, 64 bytes, Unix socket",
            ping_unix,
            ping_unix,
            small_unix,
        ),
        (
            "request, no attachment, TCP",
            small_tcp,
            ping_tcp,
            small_tcp,
        ),
        (
            "request, no attachment, Unix socket",
            small_unix,
            ping_unix,
            small_unix,
        ),
        (
            "64 MiB region by handle, shm over TCP",
            shm_rt.big,
            ping_tcp,
            small_tcp,
        ),
        (
            "64 MiB region by handle, memfd over Unix",
            memfd_rt.big,
            ping_unix,
            small_unix,
        ),
        ("64 MiB inline over TCP", tcp_rt.big, ping_tcp, small_tcp),
        (
            "64 MiB inline over a Unix socket",
            unix_rt.big,
            ping_unix,
            small_unix,
        ),
    ];
    for (name, d, ping, small) in rows {
        println!(
            "{:<48} {:>12.1} {:>9.1} {:>11.1}",
            name,
            us(d),
            us(d) / us(ping),
            us(d) / us(small)
        );
    }
    0
}

/// Writes a small batch the way the producer does and decodes it the way the consumer does.
fn self_check(schema: &SchemaRef, dim: usize) {
    let rows = 3;
    let layout = Layout::new(schema, dim, rows);
    let mut out = vec![0u8; layout.stream_len() + 64];
    // Decode from a 64-byte aligned start, as in a segment.
    let off = out.as_ptr().align_offset(64);
    let buf = &mut out[off..off + layout.stream_len()];
    layout.write(buf, |v| fill_values(v, 5));
    let (_, batches) =
        xcp::codec::arrow::decode_batches(Bytes::copy_from_slice(buf)).expect("decodes");
    let list = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .expect("list");
    assert_eq!(list.len(), rows);
    let v = list
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .expect("f32");
    let want: Vec<f32> = (5..5 + rows * dim).map(value).collect();
    assert_eq!(
        v.values().as_ref(),
        want.as_slice(),
        "the layout round-trips"
    );
}
