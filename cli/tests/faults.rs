//! Faults: peers that die or fall behind at the worst moment.
//!
//! 1. A client killed mid-chunk: its half-reassembled message is released, and the server
//!    keeps serving (a large chunked request that needs the released budget succeeds).
//! 2. A sender killed (`kill -9`) while the receiver holds a view of its shm segment: the view
//!    stays readable, nothing crashes, and once the view is dropped `xcp shm gc` collects the
//!    segment.
//! 3. The server killed (`kill -9`) while requests wait for replies: every pending request
//!    fails promptly with `Closed` or `Io`, none hangs.
//! 4. A receiver slower than its sender: nothing is dropped, replies come in order, and the
//!    sender's memory stays bounded (back-pressure).
//!
//! Every child process is owned by a guard that kills it on drop, every wait has a deadline,
//! and the tests run one at a time (scenario 4 measures this process's RSS).

#![cfg(target_os = "linux")]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::{Incoming, Outgoing};
use xcp::control::{Control, Hello, Ping};
use xcp::session::AttachConfig;
use xcp::wire::frame::{crc32c, encode, FrameDecoder};
use xcp::wire::{Flags, Frame, FrameHeader, HeaderForm, Limits, MsgType};
use xcp::{Attachment, Error, ErrorCode, Ether, Server, Session, SessionConfig};

#[path = "../../tests/support/io_env.rs"]
mod io_env;

/// The bound of any one step.
const STEP: Duration = Duration::from_secs(20);

/// One test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Awaits `f` or fails the test after [`STEP`].
async fn t<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Guard(Child);

impl Guard {
    /// `kill -9`, and waits (bounded) for it to be gone.
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let start = Instant::now();
        while self.0.try_wait().expect("try_wait").is_none() {
            assert!(start.elapsed() < STEP, "the child survived SIGKILL");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xcp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcp"));
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

/// Runs `xcp ARGS` to completion (bounded); returns whether it succeeded and its output.
fn run_xcp(args: &[&str]) -> (bool, String) {
    let mut g = Guard(
        xcp()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xcp"),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(start.elapsed() < STEP, "xcp {args:?} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::new();
    if let Some(mut o) = g.0.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut text);
    }
    if let Some(mut e) = g.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
    }
    (status.success(), text)
}

/// Starts `xcp serve ARGS` on a free TCP port; returns it and its URL.
fn spawn_serve(extra: &[&str]) -> (Guard, String) {
    let mut g = Guard(
        xcp()
            .args(["serve", "--listen", "tcp://127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xcp serve"),
    );
    let stdout = g.0.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(STEP)
        .expect("xcp serve announces its address");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("xcp serve said {line:?}"))
        .to_string();
    (g, url)
}

/// An in-process server on a free TCP port (see [`spawn_echo`]).
async fn echo_server(config: SessionConfig) -> (Server, String) {
    let server = t("bind", Server::bind("tcp://127.0.0.1:0", config))
        .await
        .expect("bind");
    let url = server.local_url();
    (server, url)
}

/// Echoes every message with the same body and codec, after `delay` each (one message at a
/// time per session).
fn spawn_echo(server: Server, delay: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let echo = Outgoing::data(m.header.body_codec, m.body.clone());
                    if s.reply(&m, echo).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn inline_config() -> SessionConfig {
    io_env::config().with_attach(AttachConfig::inline_only())
}

/// A JSON text Ether of about `len` bytes whose reply must equal it.
fn big_text(len: usize, seed: u8) -> Outgoing {
    let text: String = (0..len)
        .map(|i| (b'a' + ((i + seed as usize) % 26) as u8) as char)
        .collect();
    Outgoing::ether(&Ether::text(text), CodecId::JSON).expect("encode")
}

// ----- 1. a client killed mid-chunk --------------------------------------------------------

fn raw_frame(msg_type: MsgType, msg_id: u64, flags: Flags, body: Bytes) -> Vec<u8> {
    let h = FrameHeader {
        msg_type,
        body_codec: CodecId::JSON,
        msg_id,
        ..Default::default()
    };
    encode(&h, HeaderForm::Capnp, flags, body)
        .expect("encode")
        .to_vec()
}

fn control_frame(ctl: &Control, msg_id: u64) -> Vec<u8> {
    let body = ctl.encode(CodecId::JSON).expect("control body");
    raw_frame(ctl.msg_type(), msg_id, Flags::NONE, body)
}

async fn read_frame(s: &mut TcpStream, dec: &mut FrameDecoder, buf: &mut BytesMut) -> Frame {
    loop {
        if let Some(f) = dec.decode(buf).expect("server frames decode") {
            return f;
        }
        let n = t("raw read", s.read_buf(buf)).await.expect("raw read");
        assert!(n > 0, "the server closed the raw connection");
    }
}

#[test]
fn client_killed_mid_chunk_releases_its_reassembly() {
    let _serial = serial();
    runtime().block_on(async {
        const CHUNK: usize = 60 << 10;
        let mut cfg = inline_config();
        cfg.conn.limits.max_frame_bytes = 64 << 10;
        // The server's whole reassembly budget: the dead client's 3 MiB leave too little
        // for a 2 MiB message until they are released.
        cfg.server_reassembly_bytes = 4 << 20;
        let (server, url) = echo_server(cfg).await;
        let _echo = spawn_echo(server, Duration::ZERO);
        let addr = url.strip_prefix("tcp://").expect("tcp url").to_string();

        // The doomed client: HELLO, then 3 MiB of a message's first chunks (MORE), no end.
        let mut raw = t("connect", TcpStream::connect(&addr))
            .await
            .expect("connect");
        let (mut dec, mut buf) = (FrameDecoder::new(Limits::default()), BytesMut::new());
        let hello = Control::Hello(Hello {
            codecs: vec![CodecId::JSON],
            max_frame_bytes: 1 << 20,
            version: "0.2".into(),
            max_message_bytes: 256 << 20,
            ..Default::default()
        });
        t("hello", raw.write_all(&control_frame(&hello, 1)))
            .await
            .expect("write HELLO");
        let caps = read_frame(&mut raw, &mut dec, &mut buf).await;
        assert_eq!(caps.header.msg_type, MsgType::CAPS);
        let chunk = Bytes::from(vec![b' '; CHUNK]);
        for _ in 0..52 {
            let f = raw_frame(MsgType::DATA, 2, Flags::MORE, chunk.clone());
            t("chunk", raw.write_all(&f)).await.expect("write chunk");
        }
        // A PING after the chunks: its PONG proves the server has taken them all in.
        let ping = control_frame(&Control::Ping(Ping { nonce: 9 }), 3);
        t("ping", raw.write_all(&ping)).await.expect("write PING");
        loop {
            let f = read_frame(&mut raw, &mut dec, &mut buf).await;
            if f.header.msg_type == MsgType::PONG {
                break;
            }
        }

        // While that half-message is held, a 2 MiB message does not fit the budget.
        let other = t("connect", Session::connect(&url, inline_config()))
            .await
            .expect("connect");
        match t("busy request", other.request(big_text(2 << 20, 1))).await {
            Err(Error::Nack { code, .. }) => assert_eq!(code, ErrorCode::ERR_BUSY),
            r => panic!("expected ERR_BUSY while 3 MiB are held: {r:?}"),
        }

        // Killed: the socket is reset (SO_LINGER 0), mid-message.
        socket2::SockRef::from(&raw)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(raw);

        // Its 3 MiB are released: a 3.5 MiB chunked request fits (retried while the server
        // has not yet seen the reset), and its echo is exact.
        let fresh = t("connect", Session::connect(&url, inline_config()))
            .await
            .expect("a new client after the kill");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = big_text(3584 << 10, 2);
            let body = out.body.clone();
            match t("big request", fresh.request(out)).await {
                Ok(r) => {
                    assert_eq!(r.body, body, "the echo differs");
                    assert!(r.frames > 1, "the reply came in {} frame(s)", r.frames);
                    break;
                }
                Err(Error::Nack { code, .. })
                    if code == ErrorCode::ERR_BUSY && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the reassembly of the killed client was not released: {e}"),
            }
        }
        let _ = fresh.close().await;
        let _ = other.close().await;
    });
}

// ----- 2. a sender killed while the receiver holds views of its shm -------------------------

/// The shm objects in /dev/shm owned by process `pid`.
fn shm_objects_of(pid: u32) -> Vec<String> {
    let prefix = format!("xcp-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sender_killed_while_views_are_held() {
    let _serial = serial();
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    runtime().block_on(async {
        let cfg =
            io_env::config().with_attach(AttachConfig::default().with_schemes(vec![Scheme::Shm]));
        let (server, url) = echo_server(cfg).await;
        let mut sender = Guard(
            xcp()
                .args(["send", &url, "--random-bytes", "8M", "--attach", "shm"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn xcp send"),
        );
        let pid = sender.0.id();
        let session = t("accept", server.accept()).await.expect("accept");
        let msg: Incoming = t("the blob", session.recv()).await.expect("the blob");
        assert!(
            msg.view("data").is_some(),
            "the blob did not come by handle: {:?}",
            msg.ether
        );
        let before = crc32c(&msg.attachment_bytes("data").expect("bytes"));
        assert_eq!(msg.attachment_bytes("data").map(|b| b.len()), Some(8 << 20));
        assert!(
            !shm_objects_of(pid).is_empty(),
            "the sender's segment is not in /dev/shm"
        );

        // kill -9 while the view is held (the sender waits for its reply).
        sender.kill9();
        let bytes = msg.attachment_bytes("data").expect("bytes after the kill");
        assert_eq!(crc32c(&bytes), before, "the view changed after the kill");
        // The session notices the end; the held message is unaffected.
        let end = t("the end of the session", session.recv()).await;
        assert!(end.is_err(), "expected the end of the session: {end:?}");
        assert_eq!(crc32c(&bytes), before);

        // Dropping the views (which would ACK on a dead connection) crashes nothing, and
        // the dead sender's segment is collected.
        drop(bytes);
        drop(msg);
        drop(session);
        let (ok, out) = run_xcp(&["shm", "gc"]);
        assert!(ok, "xcp shm gc failed: {out}");
        assert_eq!(
            shm_objects_of(pid),
            Vec::<String>::new(),
            "segments of the killed sender left: {out}"
        );

        // The receiver still serves.
        let _echo = spawn_echo(server, Duration::ZERO);
        let c = t("connect", Session::connect(&url, inline_config()))
            .await
            .expect("connect after the kill");
        let r = t("request", c.request(big_text(100, 0)))
            .await
            .expect("echo");
        assert_eq!(
            r.ether().expect("ether"),
            Ether::text(big_text_string(100, 0))
        );
        let _ = c.close().await;
    });
}

fn big_text_string(len: usize, seed: u8) -> String {
    (0..len)
        .map(|i| (b'a' + ((i + seed as usize) % 26) as u8) as char)
        .collect()
}

// ----- 3. the server killed while clients wait ---------------------------------------------

/// A blob request as `xcp send --random-bytes` makes it, with the bytes inline: `xcp serve`
/// answers it with a checksum, after `--hold-ms`.
fn blob_request(len: usize) -> Outgoing {
    let mut e = Ether::new("blob", serde_json::Map::new());
    e.payload.insert("reply".into(), "crc32c".into());
    e.attachments.push(Attachment {
        id: "data".into(),
        size_bytes: len as u64,
        inline_bytes: Some(Bytes::from(vec![7u8; len])),
        ..Attachment::default()
    });
    Outgoing::ether(&e, CodecId::PROTOBUF).expect("encode")
}

#[test]
fn server_killed_while_requests_wait() {
    let _serial = serial();
    runtime().block_on(async {
        // The server holds every blob 30 s before answering: the requests are surely pending
        // when it dies.
        let (mut serve, url) = spawn_serve(&["--attach", "inline", "--hold-ms", "30000"]);
        let cfg = inline_config().with_request_timeout(Duration::from_secs(120));
        let c = t("connect", Session::connect(&url, cfg))
            .await
            .expect("connect");
        // Sanity: the server answers blobs (after the hold) — not awaited here; and plain
        // echoes come back at once.
        let r = t("echo", c.request(big_text(1000, 3))).await.expect("echo");
        assert_eq!(r.body.len(), big_text(1000, 3).body.len());

        let mut pending = tokio::task::JoinSet::new();
        for i in 0..4 {
            let c = c.clone();
            pending.spawn(async move {
                (
                    format!("blob {i}"),
                    c.request(blob_request(256 << 10)).await,
                )
            });
        }
        for i in 0..4 {
            let c = c.clone();
            pending
                .spawn(async move { (format!("echo {i}"), c.request(big_text(4 << 20, i)).await) });
        }
        // Let the blobs reach the server (they are then held), then kill it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        serve.kill9();
        let killed = Instant::now();

        let mut failed = 0;
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(r) = pending.join_next().await {
                let (what, r) = r.expect("request task");
                match r {
                    // A large echo may have finished before the kill.
                    Ok(m) if what.starts_with("echo") => assert!(m.body.len() > 4 << 20),
                    Ok(m) => panic!("{what}: a reply from a dead server: {m:?}"),
                    Err(Error::Closed { .. }) | Err(Error::Io(_)) => failed += 1,
                    Err(e) => panic!("{what}: expected Closed or Io, got {e}"),
                }
            }
        })
        .await;
        assert!(
            all.is_ok(),
            "requests still pending 5 s after the server was killed"
        );
        assert!(failed >= 4, "only {failed} requests failed");
        eprintln!(
            "server killed: {failed} pending requests failed within {:?}",
            killed.elapsed()
        );
        // New requests fail at once too.
        let late = t("late request", c.request(big_text(10, 0))).await;
        assert!(
            matches!(late, Err(Error::Closed { .. }) | Err(Error::Io(_))),
            "{late:?}"
        );
    });
}

// ----- 4. a receiver slower than its sender -------------------------------------------------

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[test]
fn slow_receiver_applies_back_pressure() {
    let _serial = serial();
    const MESSAGES: u64 = 5000;
    const SIZE: usize = 32 << 10;
    // What the sender produces in all: 160 MiB. Without back-pressure most of it would be
    // queued in this process at once.
    const RSS_BOUND: u64 = 64 << 20;
    runtime().block_on(async {
        let window = 64;
        let cfg = inline_config().with_max_in_flight(window);
        let (server, url) = echo_server(cfg.clone()).await;
        let _echo = spawn_echo(server, Duration::from_millis(1));
        let c = t("connect", Session::connect(&url, cfg))
            .await
            .expect("connect");

        let base = rss();
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(base));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };

        // The receiving side: replies arrive through recv (they answer sends, not requests),
        // each must be the next one, with its exact body.
        let reader = {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    let m = match tokio::time::timeout(STEP, c.recv()).await {
                        Ok(Ok(m)) => m,
                        Ok(Err(e)) => return Err(format!("reply {i}: {e}")),
                        Err(_) => return Err(format!("reply {i}: none within {STEP:?}")),
                    };
                    if m.body != body_of(i) {
                        return Err(format!(
                            "reply {i}: body differs (its seq {:?})",
                            m.body
                                .len()
                                .checked_sub(8)
                                .map(|at| u64::from_le_bytes(m.body[at..].try_into().unwrap()))
                        ));
                    }
                }
                Ok(())
            })
        };
        let started = Instant::now();
        for i in 0..MESSAGES {
            // A fresh allocation each time: queued messages would show in the RSS.
            t("send", c.send(Outgoing::data(CodecId::TENSOR_F32, body_of(i))))
                .await
                .expect("send");
        }
        let sent_in = started.elapsed();
        let r = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .expect("all replies within 120 s")
            .expect("reader task");
        r.unwrap_or_else(|e| panic!("{e}"));
        sampler.abort();
        let growth = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(base);
        eprintln!(
            "slow receiver: {MESSAGES} x {} KiB sent in {:.2?}, all echoed in {:.2?}; RSS growth {} MiB (bound {} MiB)",
            SIZE >> 10,
            sent_in,
            started.elapsed(),
            growth >> 20,
            RSS_BOUND >> 20
        );
        // The sender was held back by the slow receiver (1 ms a message): it could not queue
        // everything at once, only a bounded lead (the windows and the socket buffers).
        assert!(
            sent_in >= Duration::from_millis(MESSAGES / 2),
            "the sender was not held back: {sent_in:?}"
        );
        assert!(
            growth < RSS_BOUND,
            "RSS grew by {} MiB (bound {} MiB)",
            growth >> 20,
            RSS_BOUND >> 20
        );
        let _ = c.close().await;
    });
}

/// Message `i` of scenario 4: a TENSOR_F32 of 32 KiB whose first element carries `i`.
fn body_of(i: u64) -> Bytes {
    let n = (32 << 10) / 4 - 8;
    let mut v = vec![0f32; n];
    v[0] = i as f32;
    v[1] = (i % 7) as f32;
    let mut b = BytesMut::from(
        &xcp::codec::tensor::encode_f32(&[n as u32], &v, false).expect("tensor")[..],
    );
    // The sequence number also at the end (exact in any precision).
    let len = b.len();
    b[len - 8..].copy_from_slice(&i.to_le_bytes());
    b.freeze()
}
