//! Logging never blocks the data plane: the real `xcp serve`, its stderr on a pipe, thousands
//! of hostile connections that make it log, then a real client.
//!
//! - [`a_stalled_stderr_does_not_stop_the_server`]: nobody reads the pipe while the hostile
//!   connections come (the server logs at debug, `-v`, so it fills the pipe for certain).
//!   A client must still complete its handshake and a request; once the pipe is read again,
//!   the server says how many lines it dropped.
//! - [`peer_caused_lines_are_rate_limited`]: at the default level, with the pipe read, the
//!   lines the hostile peers cause stay within the process-wide budget, with summaries of what
//!   was suppressed.
//!
//! - [`exit_does_not_wait_for_a_stalled_stderr`]: with the pipe still full, SIGTERM ends the
//!   server promptly (the exit flush gives up after a short wait).
//!
//! Loopback only, port 0; every wait is bounded and the server is killed at the end.

use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::control::{Control, Hello};
use xcp::wire::frame::encode_frame;
use xcp::wire::{Flags, FrameHeader, HeaderForm, MsgType};
use xcp::{Ether, Session, SessionConfig};

/// Hostile connections per test.
const HOSTILE: usize = 3000;
/// Connections open at once (then closed together): well within the accept backlog.
const BATCH: usize = 100;
/// Bad-CRC frames each hostile connection sends after its HELLO.
const BAD_FRAMES: usize = 10;
/// The hostile phase stops after this long, whatever it reached.
const HOSTILE_DEADLINE: Duration = Duration::from_secs(30);
/// The real client's handshake and request must complete within this.
const CLIENT_DEADLINE: Duration = Duration::from_secs(15);

#[path = "../../tests/support/serve.rs"]
mod serve;

/// The server, killed when dropped.
struct Server {
    child: Child,
    url: String,
    addr: SocketAddr,
    /// Kept open (and unread, until taken) so the pipe stays a pipe.
    stderr: Option<ChildStderr>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = serve::command("tcp://127.0.0.1:0")
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start xcp serve");
        let stderr = child.stderr.take();
        let url = serve::listening_url(&mut child);
        let addr = url
            .strip_prefix("tcp://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not a tcp URL: {url}"));
        Server {
            child,
            url,
            addr,
            stderr,
        }
    }

    fn assert_running(&mut self) {
        match self.child.try_wait() {
            Ok(None) => {}
            other => panic!("xcp serve is no longer running: {other:?}"),
        }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn stop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(status.success(), "xcp serve exited with {status}");
                    return;
                }
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => panic!("xcp serve did not exit within 15 s of SIGTERM"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a pipe to its end on a thread, keeping what it read.
struct Drain {
    text: Arc<Mutex<Vec<u8>>>,
    read: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

impl Drain {
    fn start(mut pipe: ChildStderr) -> Drain {
        let text = Arc::new(Mutex::new(Vec::new()));
        let read = Arc::new(AtomicUsize::new(0));
        let (t, r) = (text.clone(), read.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                t.lock().unwrap().extend_from_slice(&buf[..n]);
                r.fetch_add(n, Ordering::Relaxed);
            }
        });
        Drain { text, read, thread }
    }

    /// Waits until nothing new came for `quiet`, at most `max`.
    fn settle(&self, quiet: Duration, max: Duration) {
        let end = Instant::now() + max;
        let mut last = (self.read.load(Ordering::Relaxed), Instant::now());
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.read.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Everything, once the pipe closed (the server exited).
    fn finish(self) -> String {
        self.thread.join().expect("stderr reader");
        let bytes = self.text.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// What every hostile connection sends: a HELLO, frames whose CRC32C is wrong (each refused
/// with a NACK and a log line), then garbage (the connection fails, another line).
fn hostile_bytes() -> Vec<u8> {
    let hello = Control::Hello(Hello {
        codecs: vec![CodecId::JSON],
        max_frame_bytes: 1 << 20,
        version: "0.2".into(),
        max_message_bytes: 16 << 20,
        ..Hello::default()
    });
    let mut out = Vec::new();
    let header = |msg_type, msg_id| FrameHeader {
        msg_type,
        body_codec: CodecId::JSON,
        msg_id,
        ..FrameHeader::default()
    };
    let body = hello.encode(CodecId::JSON).expect("HELLO body");
    out.extend(
        encode_frame(
            &header(hello.msg_type(), 1),
            HeaderForm::Capnp,
            Flags::NONE,
            &body,
        )
        .expect("HELLO frame"),
    );
    let data = Bytes::from_static(br#"{"kind":"text","payload":{"text":"x"}}"#);
    for i in 0..BAD_FRAMES as u64 {
        let mut f = encode_frame(
            &header(MsgType::DATA, 2 + i),
            HeaderForm::Capnp,
            Flags::NONE,
            &data,
        )
        .expect("DATA frame");
        // The CRC32C trailer: flip it.
        let n = f.len();
        f[n - 1] ^= 0xff;
        out.extend(f);
    }
    out.extend_from_slice(b"this is not a frame at all, just garbage from a hostile peer\n");
    out
}

/// Makes up to [`HOSTILE`] hostile connections, [`BATCH`] at a time, within
/// [`HOSTILE_DEADLINE`]; returns how many it made.
fn hostile_flood(addr: SocketAddr) -> usize {
    hostile_connections(addr, HOSTILE)
}

/// [`hostile_flood`] with `count` connections.
fn hostile_connections(addr: SocketAddr, count: usize) -> usize {
    let bytes = hostile_bytes();
    let end = Instant::now() + HOSTILE_DEADLINE;
    let mut made = 0;
    'batches: while made < count && Instant::now() < end {
        let mut open = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min(count - made) {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    open.push(s);
                }
                // A server that stopped accepting (the bug): the backlog is full.
                Err(_) => break 'batches,
            }
        }
        for s in &mut open {
            if s.write_all(&bytes).is_ok() {
                made += 1;
            }
        }
        // Give the server a moment with them before they go.
        std::thread::sleep(Duration::from_millis(5));
        drop(open);
    }
    made
}

/// A real client: handshake and one request, within [`CLIENT_DEADLINE`].
fn real_client(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = SessionConfig::default()
            .with_connect_timeout(CLIENT_DEADLINE)
            .with_request_timeout(CLIENT_DEADLINE);
        let r = tokio::time::timeout(CLIENT_DEADLINE, async {
            let s = Session::connect(url, config).await?;
            let out = Outgoing::ether(&Ether::text("hello"), CodecId::JSON)?;
            let reply = s.request(out).await?;
            let _ = s.close().await;
            reply.ether()
        })
        .await;
        match r {
            Ok(Ok(e)) => assert_eq!(e, Ether::text("hello"), "the echo"),
            Ok(Err(e)) => panic!("the real client failed after the flood: {e}"),
            Err(_) => panic!(
                "the real client got no handshake and echo within {CLIENT_DEADLINE:?} after the \
                 flood: the server is stuck"
            ),
        }
    });
}

#[test]
fn a_stalled_stderr_does_not_stop_the_server() {
    let mut srv = Server::start(&["-v"]);
    let started = Instant::now();
    let made = hostile_flood(srv.addr);
    eprintln!(
        "log_pipe: {made} hostile connections in {:?}",
        started.elapsed()
    );
    srv.assert_running();
    let client = Instant::now();
    real_client(&srv.url);
    eprintln!("log_pipe: the real client took {:?}", client.elapsed());
    assert!(
        made >= HOSTILE / 2,
        "only {made} hostile connections got in"
    );
    srv.assert_running();

    // The consumer reads again: the queue drains, and the next line (the shutdown's) comes
    // after the count of what was dropped.
    let drain = Drain::start(srv.stderr.take().expect("stderr"));
    drain.settle(Duration::from_millis(300), Duration::from_secs(10));
    srv.stop();
    let text = drain.finish();
    eprintln!(
        "log_pipe: {} bytes, {} lines on stderr",
        text.len(),
        text.lines().count()
    );
    let dropped = text
        .lines()
        .find(|l| l.contains("log lines dropped (stderr was not being read)"))
        .unwrap_or_else(|| panic!("no drop count on stderr:\n{}", tail(&text)));
    eprintln!("log_pipe: {dropped}");
    // Bounded by the pipe, the queue and what came after: far below what was logged.
    assert!(text.len() < 4 << 20, "{} bytes on stderr", text.len());
    assert!(
        text.contains("suppressed"),
        "no suppression summary:\n{}",
        tail(&text)
    );
    assert!(text.contains("stopped"), "no clean stop:\n{}", tail(&text));
}

#[test]
fn exit_does_not_wait_for_a_stalled_stderr() {
    let mut srv = Server::start(&["-v"]);
    let made = hostile_connections(srv.addr, 500);
    real_client(&srv.url);
    assert!(made >= 250, "only {made} hostile connections got in");
    srv.assert_running();
    // Stderr is still not read: the writer thread is stuck in write(2), its queue full. The
    // exit flush waits a bounded time, then the process exits anyway.
    let stopping = Instant::now();
    srv.stop();
    let took = stopping.elapsed();
    eprintln!("log_pipe: exited {took:?} after SIGTERM with stderr stalled");
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    // What the pipe held is still there to read.
    let text = Drain::start(srv.stderr.take().expect("stderr")).finish();
    assert!(text.contains("listening on"), "{}", tail(&text));
}

#[test]
fn peer_caused_lines_are_rate_limited() {
    let mut srv = Server::start(&[]);
    let drain = Drain::start(srv.stderr.take().expect("stderr"));
    let started = Instant::now();
    let made = hostile_flood(srv.addr);
    real_client(&srv.url);
    let elapsed = started.elapsed();
    srv.assert_running();
    drain.settle(Duration::from_millis(300), Duration::from_secs(10));
    srv.stop();
    let text = drain.finish();
    let lines = text.lines().count();
    eprintln!(
        "log_pipe: {made} hostile connections in {elapsed:?}, {lines} lines on stderr ({} bytes)",
        text.len()
    );
    assert!(
        made >= HOSTILE / 2,
        "only {made} hostile connections got in"
    );
    // Unlimited, each connection would log a dozen lines. Limited: the peer-fault budget (100
    // at once, then 20 a second; each line with at most two summaries) and the connection
    // lines of `serve` (50 at once, then 10 a second; each with a summary, and the close of
    // each open logged), and a few lines of our own.
    let secs = elapsed.as_secs_f64() + 2.0;
    let bound = (3.0 * (100.0 + 20.0 * secs) + 3.0 * (50.0 + 10.0 * secs)) as usize + 20;
    assert!(
        lines <= bound,
        "{lines} lines for {made} hostile connections (bound {bound}):\n{}",
        tail(&text)
    );
    assert!(lines < made, "{lines} lines for {made} hostile connections");
    assert!(
        text.contains("more log lines about this peer suppressed"),
        "no per-peer summary:\n{}",
        tail(&text)
    );
    assert!(
        text.contains("log lines suppressed (peer faults"),
        "no process-wide summary:\n{}",
        tail(&text)
    );
    assert!(
        !text.contains(" ERROR "),
        "peers caused errors:\n{}",
        tail(&text)
    );
}

/// The last lines of `text`, for a failure message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
