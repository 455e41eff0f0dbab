//! The hostile-peer suite: a real [`Server`] (an echo task, as in `tests/session.rs`) over real
//! sockets, and a raw peer that sends hand-built bytes. Each case asserts the exact NACK code
//! or the close, that the server serves a new client right after, and that memory stays
//! bounded: the process's VmRSS (server and peers share it) may not grow by more than
//! [`RSS_BOUND_KIB`] over the case, and the peak (VmHWM) is printed
//! (`cargo test --test hostile -- --nocapture`).
//!
//! Cases `tests/session.rs` already has (bad magic, version, reserved flags, a garbage header,
//! PLEN over the limit, CRC, codec not negotiated, undecodable JSON, DATA before HELLO, a
//! message over the limit, a stall mid-frame) are not repeated. Every await is bounded, so a
//! failure is a failure, not a hang.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};

use xcp::attach::segment::Segment;
use xcp::attach::Scheme;
use xcp::codec::dlpack::{DlData, DlDataType, DlpackDescriptor};
use xcp::codec::CodecId;
use xcp::conn::{Config, Connection, Event, Outgoing, Role};
use xcp::control::{Ack, Control, Hello, Nack, Ping};
use xcp::transport::{ReadHalf, Stream, WriteHalf};
use xcp::wire::chunk::{Message, Reassembler};
use xcp::wire::frame::{crc32c, encode_frame, FrameDecoder};
use xcp::wire::seal::{self, Direction, Sealer};
use xcp::wire::{Flags, FrameHeader, HeaderForm, Limits, MsgType, Tag, MAGIC_BYTES};
use xcp::{Attachment, Error, ErrorCode, Ether, Server, Session, SessionConfig};

#[path = "support/io_env.rs"]
mod io_env;

/// The longest any single step may take.
const STEP: Duration = Duration::from_secs(10);
/// How much VmRSS may grow over one case.
const RSS_BOUND_KIB: u64 = 200 * 1024;

/// Awaits `f`, or fails the test after [`STEP`].
async fn t<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ----- memory ------------------------------------------------------------------------------

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Cases of this binary run in parallel in one process, so VmRSS counts them all. Every case
/// holds this lock shared for its whole run ([`Mem::start`]); a case with a tight bound on its
/// own growth holds it alone ([`Mem::start_alone`]), so what it measures is its own.
static RSS_TURN: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[allow(dead_code)] // held for its drop
enum Turn {
    Shared(std::sync::RwLockReadGuard<'static, ()>),
    Alone(std::sync::RwLockWriteGuard<'static, ()>),
}

/// VmRSS at the start of a case.
struct Mem {
    start: u64,
    _turn: Turn,
}

impl Mem {
    fn start() -> Mem {
        let turn = Turn::Shared(RSS_TURN.read().unwrap_or_else(|p| p.into_inner()));
        Mem {
            start: status_kib("VmRSS"),
            _turn: turn,
        }
    }

    /// As [`Mem::start`], with no other case running meanwhile.
    fn start_alone() -> Mem {
        let turn = Turn::Alone(RSS_TURN.write().unwrap_or_else(|p| p.into_inner()));
        Mem {
            start: status_kib("VmRSS"),
            _turn: turn,
        }
    }

    /// Asserts the growth bound, and prints the figures.
    fn check(&self, case: &str) {
        let rss = status_kib("VmRSS");
        let peak = status_kib("VmHWM");
        eprintln!(
            "hostile::{case}: VmRSS {} -> {} MiB, process peak VmHWM {} MiB",
            self.start / 1024,
            rss / 1024,
            peak / 1024
        );
        assert!(
            rss.saturating_sub(self.start) < RSS_BOUND_KIB,
            "{case}: VmRSS grew from {} KiB to {rss} KiB",
            self.start
        );
    }
}

// ----- the server --------------------------------------------------------------------------

/// An echo server in the background (stops when dropped), and the configuration a client
/// needs to be served by it.
struct Srv {
    url: String,
    client: SessionConfig,
    task: JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replies to each message with the same codec and body; drops it (and its views, which
/// ACKs them) right after.
async fn echo_session(s: Session) {
    while let Ok(m) = s.recv().await {
        let mut out = Outgoing::data(m.header.body_codec, m.body.clone());
        out.schema_key = m.header.schema_key;
        let views = m.views.len();
        out.tags.push(Tag {
            key: "views".into(),
            val: views.to_string(),
        });
        if s.reply(&m, out).await.is_err() {
            return;
        }
    }
}

impl Srv {
    async fn tcp(cfg: SessionConfig) -> Srv {
        Srv::bind("tcp://127.0.0.1:0", cfg, None).await
    }

    async fn unix(cfg: SessionConfig) -> Srv {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("unix://{}/hostile.sock", dir.path().display());
        Srv::bind(&url, cfg, Some(dir)).await
    }

    async fn bind(url: &str, cfg: SessionConfig, dir: Option<tempfile::TempDir>) -> Srv {
        let mut client = io_env::config();
        client.conn.sealer = cfg.conn.sealer.clone();
        let server = t("bind", Server::bind(url, cfg)).await.expect("bind");
        let url = server.local_url();
        let task = tokio::spawn(async move {
            while let Ok(s) = server.accept().await {
                tokio::spawn(echo_session(s));
            }
        });
        Srv {
            url,
            client,
            task,
            _dir: dir,
        }
    }

    /// A new client connects and its request is answered.
    async fn assert_serves(&self) {
        let c = t("connect", Session::connect(&self.url, self.client.clone()))
            .await
            .expect("a new client is served");
        let r = t("request", c.request(ether_request("still alive")))
            .await
            .expect("reply");
        assert_eq!(r.ether().expect("ether"), Ether::text("still alive"));
        t("close", c.close()).await.expect("close");
    }
}

fn ether_request(text: &str) -> Outgoing {
    Outgoing::ether(&Ether::text(text), CodecId::JSON).expect("encode")
}

// ----- frames by hand ----------------------------------------------------------------------

fn hdr(msg_type: MsgType, codec: CodecId, msg_id: u64) -> FrameHeader {
    FrameHeader {
        msg_type,
        body_codec: codec,
        msg_id,
        ..FrameHeader::default()
    }
}

fn frame(h: &FrameHeader, flags: Flags, body: &[u8]) -> Vec<u8> {
    encode_frame(h, HeaderForm::Capnp, flags, &Bytes::copy_from_slice(body)).expect("frame")
}

fn control_frame(ctl: &Control, msg_id: u64) -> Vec<u8> {
    let body = ctl.encode(CodecId::JSON).expect("control body");
    frame(
        &hdr(ctl.msg_type(), CodecId::JSON, msg_id),
        Flags::NONE,
        &body,
    )
}

fn data_frame(msg_id: u64, body: &[u8]) -> Vec<u8> {
    frame(
        &hdr(MsgType::DATA, CodecId::JSON, msg_id),
        Flags::NONE,
        body,
    )
}

/// A JSON Ether body, padded with trailing whitespace to `len` bytes when `len` is larger.
fn text_body(text: &str, len: usize) -> Vec<u8> {
    let mut b = xcp::codec::encode_ether(&Ether::text(text), CodecId::JSON)
        .expect("body")
        .to_vec();
    if b.len() < len {
        b.resize(len, b' ');
    }
    b
}

/// A whole frame with a header given as raw bytes.
fn frame_with_raw_header(flags: u8, header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = MAGIC_BYTES.to_vec();
    v.push(0x02);
    v.push(flags);
    v.extend_from_slice(&u16::try_from(header.len()).expect("hlen").to_le_bytes());
    v.extend_from_slice(header);
    v.extend_from_slice(&u32::try_from(body.len()).expect("plen").to_le_bytes());
    v.extend_from_slice(body);
    v.extend_from_slice(&crc32c(body).to_le_bytes());
    v
}

/// A Cap'n Proto header (DATA, JSON, `msg_id`) whose `tags` list claims `n` elements of zero
/// words each: 64 bytes whatever `n` is.
fn zero_size_tags_header(n: u32, msg_id: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0u32.to_le_bytes()); // one segment
    v.extend_from_slice(&7u32.to_le_bytes()); // of 7 words
                                              // Root: a struct pointer to the next word, 3 data words, 2 pointers.
    v.extend_from_slice(&(3u64 << 32 | 2u64 << 48).to_le_bytes());
    // channelId 0, msgType DATA, bodyCodec JSON; msgId; inReplyTo 0.
    v.extend_from_slice(&(0x0100u64 << 32 | 1u64 << 48).to_le_bytes());
    v.extend_from_slice(&msg_id.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes()); // schemaKey: null
                                              // tags: a list pointer to the next word, inline composite, 0 words of elements.
    v.extend_from_slice(&(1u64 | 7u64 << 32).to_le_bytes());
    // The list's tag word: `n` elements of 0 data words and 0 pointers.
    v.extend_from_slice(&(u64::from(n) << 2).to_le_bytes());
    v
}

fn plain_hello() -> Hello {
    Hello {
        codecs: vec![CodecId::JSON, CodecId::PROTOBUF, CodecId::DLPACK],
        max_frame_bytes: 1 << 20,
        version: "0.2".into(),
        max_message_bytes: 256 << 20,
        ..Hello::default()
    }
}

/// A HELLO that negotiates handles of `scheme` with a server of this process.
fn handle_hello(scheme: &str, prefix: &str) -> Hello {
    Hello {
        shared_mem: true,
        attach: vec![scheme.to_string()],
        host_id: xcp::attach::host_id().to_string(),
        shm_prefix: prefix.to_string(),
        ..plain_hello()
    }
}

// ----- the raw peer ------------------------------------------------------------------------

/// A peer that writes hand-built bytes and reads the server's frames (reassembled).
struct Peer {
    rd: ReadHalf,
    wr: WriteHalf,
    dec: FrameDecoder,
    re: Reassembler,
    buf: BytesMut,
    next_id: u64,
}

impl Peer {
    async fn connect(url: &str) -> Peer {
        let s = t("raw connect", Stream::connect(url))
            .await
            .expect("raw connect");
        let (rd, wr) = s.into_split();
        Peer {
            rd,
            wr,
            dec: FrameDecoder::new(Limits::default()),
            re: Reassembler::new(256 << 20),
            buf: BytesMut::new(),
            next_id: 1,
        }
    }

    /// Connects, sends `hello`, and returns the CAPS.
    async fn handshake(url: &str, hello: Hello) -> (Peer, Hello) {
        let mut p = Peer::connect(url).await;
        let id = p.id();
        p.write(&control_frame(&Control::Hello(hello), id)).await;
        let caps = p.message().await.expect("CAPS");
        assert_eq!(caps.header.msg_type, MsgType::CAPS, "{caps:?}");
        assert_eq!(caps.header.in_reply_to, id);
        match Control::decode(MsgType::CAPS, caps.header.body_codec, &caps.body) {
            Ok(Control::Caps(c)) => (p, c),
            other => panic!("bad CAPS: {other:?}"),
        }
    }

    async fn plain(url: &str) -> Peer {
        Peer::handshake(url, plain_hello()).await.0
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    async fn write(&mut self, bytes: &[u8]) {
        t("raw write", self.wr.write_all(bytes))
            .await
            .expect("raw write");
    }

    /// The next whole message from the server, or `None` at the end of the stream.
    async fn message(&mut self) -> Option<Message> {
        loop {
            while let Some(f) = self
                .dec
                .decode(&mut self.buf)
                .expect("server frames decode")
            {
                if let Some(m) = self.re.push(f).expect("server messages reassemble") {
                    return Some(m);
                }
            }
            match t("raw read", self.rd.read_buf(&mut self.buf)).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next message that is not an ACK or a keep-alive PING.
    async fn reply(&mut self) -> Message {
        loop {
            let m = self.message().await.expect("a message, not end of stream");
            if m.header.msg_type != MsgType::ACK && m.header.msg_type != MsgType::PING {
                return m;
            }
        }
    }

    /// The next message is a NACK of `msg_id` with `code`.
    async fn expect_nack(&mut self, code: ErrorCode, msg_id: u64) -> Nack {
        let m = self.reply().await;
        assert_eq!(m.header.msg_type, MsgType::NACK, "expected a NACK: {m:?}");
        let n = match Control::decode(MsgType::NACK, m.header.body_codec, &m.body) {
            Ok(Control::Nack(n)) => n,
            other => panic!("bad NACK body: {other:?}"),
        };
        assert_eq!((n.error_code, n.msg_id), (code, msg_id), "NACK: {n:?}");
        n
    }

    /// The next message is the echo of `msg_id`; returns it.
    async fn expect_echo(&mut self, msg_id: u64) -> Message {
        let m = self.reply().await;
        assert_eq!(m.header.msg_type, MsgType::DATA, "expected an echo: {m:?}");
        assert_eq!(m.header.in_reply_to, msg_id);
        m
    }

    /// Reads until the server closes the stream.
    async fn expect_closed(&mut self) {
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match t("server closes", self.rd.read(&mut scratch)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Sends a PING; the very next answer is its PONG: the connection lives, and nothing
    /// sent before the PING was answered.
    async fn expect_alive(&mut self) {
        let id = self.id();
        self.write(&control_frame(&Control::Ping(Ping { nonce: id }), id))
            .await;
        let m = self.reply().await;
        assert_eq!(m.header.msg_type, MsgType::PONG, "expected the PONG: {m:?}");
        assert_eq!(m.header.in_reply_to, id);
    }
}

// ----- the cases ---------------------------------------------------------------------------

/// A peer trickles a frame one byte a second: the frame timeout closes it, and another client
/// is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_one_byte_a_second() {
    let mem = Mem::start();
    let mut cfg = io_env::config();
    cfg.conn.frame_timeout = Duration::from_millis(2500);
    let srv = Srv::tcp(cfg).await;
    let mut p = Peer::plain(&srv.url).await;
    let f = data_frame(p.id(), &text_body("slow", 0));
    let Peer { mut rd, mut wr, .. } = p;
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in f {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    srv.assert_serves().await;
    let mut scratch = [0u8; 1024];
    loop {
        match t("slowloris closed", rd.read(&mut scratch)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let waited = started.elapsed();
    trickle.abort();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "closed after {waited:?}"
    );
    srv.assert_serves().await;
    mem.check("slowloris_one_byte_a_second");
}

/// A HELLO trickled one byte a second: the handshake timeout closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hello_is_cut_by_the_handshake_timeout() {
    let mem = Mem::start();
    let mut cfg = io_env::config().with_connect_timeout(Duration::from_secs(2));
    cfg.conn.handshake_timeout = Duration::from_secs(2);
    let srv = Srv::tcp(cfg).await;
    let p = Peer::connect(&srv.url).await;
    let hello = control_frame(&Control::Hello(plain_hello()), 1);
    let Peer { mut rd, mut wr, .. } = p;
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in hello {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut scratch = [0u8; 1024];
    if let Ok(n @ 1..) = t("slow HELLO closed", rd.read(&mut scratch)).await {
        panic!("no CAPS for half a HELLO: {:?}", &scratch[..n]);
    }
    let waited = started.elapsed();
    trickle.abort();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    srv.assert_serves().await;
    mem.check("slow_hello_is_cut_by_the_handshake_timeout");
}

/// 2,000 connections that never send HELLO: a real client is still served promptly, and the
/// handshake timeout closes every one of them, each within `handshake_timeout` (and some
/// slack) of the server accepting it.
///
/// A client's `connect` returns once the kernel has finished the TCP handshake, not once the
/// server has accepted, and the server's handshake clock starts at its accept. Past the listen
/// backlog (128: std's and mio's) the kernel drops either the SYN (the client sends it again
/// 1, 3, 7 ... s later) or the handshake's last ACK: then the client is connected, but the
/// connection reaches the accept queue only when the client answers a SYN-ACK that the kernel
/// sends again 1, 3, 7 ... s later, or never (the kernel gives up after about a minute). So
/// connections are opened in batches smaller than the backlog, each batch waits until the
/// kernel holds none of its connections unaccepted, and each deadline counts from then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_without_hello() {
    const N: usize = 2000;
    /// Connections opened at once: fewer than the accept queue holds.
    const BATCH: usize = 100;
    const HANDSHAKE: Duration = Duration::from_secs(3);
    /// How long past its handshake deadline a connection may stay open.
    const SLACK: Duration = Duration::from_secs(5);
    let mem = Mem::start();
    let mut cfg = io_env::config().with_connect_timeout(HANDSHAKE);
    cfg.conn.handshake_timeout = HANDSHAKE;
    let srv = Srv::tcp(cfg).await;
    let addr = srv.url.trim_start_matches("tcp://").to_string();
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .expect("port");
    let opened = Instant::now();
    // One task per idle connection: whether it was closed by its deadline.
    let mut idle = JoinSet::new();
    for _ in 0..N / BATCH {
        let mut set = JoinSet::new();
        for _ in 0..BATCH {
            let addr = addr.clone();
            set.spawn(async move { tokio::net::TcpStream::connect(addr).await });
        }
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(r) = t("connect", set.join_next()).await {
            batch.push(r.expect("join").expect("connect"));
        }
        t("the server accepts the batch", all_accepted(port)).await;
        // The server accepted each connection of the batch before now.
        let deadline = tokio::time::Instant::now() + HANDSHAKE + SLACK;
        for mut s in batch {
            idle.spawn(async move {
                let mut b = [0u8; 64];
                matches!(
                    tokio::time::timeout_at(deadline, s.read(&mut b)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            });
        }
    }
    eprintln!(
        "{N} idle connections opened and accepted in {:?}",
        opened.elapsed()
    );
    let started = Instant::now();
    srv.assert_serves().await;
    let served = started.elapsed();
    assert!(served < Duration::from_secs(3), "served after {served:?}");
    // Every idle one is closed by the handshake timeout.
    let mut closed = 0;
    while let Some(r) = t("idle closed", idle.join_next()).await {
        closed += usize::from(r.expect("join"));
    }
    assert_eq!(
        closed,
        N,
        "idle connections closed by the handshake timeout within {:?} of their accept",
        HANDSHAKE + SLACK
    );
    srv.assert_serves().await;
    mem.check("two_thousand_connections_without_hello");
}

/// Waits until the kernel holds no connection to the TCP listener on local `port` that the
/// server has not accepted.
async fn all_accepted(port: u16) {
    loop {
        let pending = tokio::task::spawn_blocking(move || unaccepted(port))
            .await
            .expect("join");
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many connections to the listener on local `port` (IPv4) the kernel holds that the
/// server has not accepted, from `/proc/net/tcp`: those in its accept queue (a listener's
/// `rx_queue`) and those half-open (`SYN_RECV`, state 03, where a dropped last ACK leaves one).
fn unaccepted(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local_port = format!(":{port:04X}");
    let mut n = 0;
    for line in table.lines().skip(1) {
        // sl, local_address, rem_address, st, tx_queue:rx_queue, ...
        let mut f = line.split_ascii_whitespace();
        let (Some(local), Some(state), Some(queues)) = (f.nth(1), f.nth(1), f.next()) else {
            continue;
        };
        if !local.ends_with(&local_port) {
            continue;
        }
        match state {
            "0A" => {
                n += queues
                    .rsplit_once(':')
                    .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                    .expect("rx_queue in /proc/net/tcp")
            }
            "03" => n += 1,
            _ => {}
        }
    }
    n
}

fn small_limits(frame: u64, message: u64) -> SessionConfig {
    let mut cfg = io_env::config();
    cfg.conn.limits = Limits::new(frame, message);
    cfg
}

/// Chunks up to `max_message_bytes` exactly are one message; one byte more refuses it, its
/// later chunks (a flood of them) are dropped silently, and two half-messages that together
/// pass the bound on pending bytes are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_flood_up_to_and_past_max_message_bytes() {
    const FRAME: usize = 16 * 1024;
    const MESSAGE: usize = 64 * 1024;
    let mem = Mem::start();
    let srv = Srv::tcp(small_limits(FRAME as u64, MESSAGE as u64)).await;
    let mut p = Peer::plain(&srv.url).await;

    // Exactly max_message_bytes, in 4 chunks: accepted.
    let id = p.id();
    let body = text_body("exactly at the limit", MESSAGE);
    let h = hdr(MsgType::DATA, CodecId::JSON, id);
    for (i, c) in body.chunks(FRAME).enumerate() {
        let flags = if i < 3 { Flags::MORE } else { Flags::NONE };
        p.write(&frame(&h, flags, c)).await;
    }
    let m = p.expect_echo(id).await;
    assert_eq!(&m.body[..], &body[..]);

    // One byte more: refused at the fifth chunk; then 100 more chunks of it are dropped.
    let id = p.id();
    let h = hdr(MsgType::DATA, CodecId::JSON, id);
    for _ in 0..4 {
        p.write(&frame(&h, Flags::MORE, &[b' '; FRAME])).await;
    }
    p.write(&frame(&h, Flags::MORE, b" ")).await;
    p.expect_nack(ErrorCode::ERR_MESSAGE_TOO_LARGE, id).await;
    for _ in 0..100 {
        p.write(&frame(&h, Flags::MORE, &[b' '; FRAME])).await;
    }
    p.write(&frame(&h, Flags::NONE, b"}")).await;
    p.expect_alive().await;

    // Two half-messages, interleaved: the fifth chunk pending passes the bound on pending
    // bytes and refuses its message; the other is kept whole (all spaces: not an Ether).
    let (a, b) = (p.id(), p.id());
    let (ha, hb) = (
        hdr(MsgType::DATA, CodecId::JSON, a),
        hdr(MsgType::DATA, CodecId::JSON, b),
    );
    let chunk = [b' '; FRAME];
    for h in [&ha, &hb, &ha, &hb, &ha] {
        p.write(&frame(h, Flags::MORE, &chunk)).await;
    }
    p.expect_nack(ErrorCode::ERR_MESSAGE_TOO_LARGE, a).await;
    p.write(&frame(&ha, Flags::NONE, b"}")).await;
    p.write(&frame(&hb, Flags::MORE, &chunk)).await;
    p.write(&frame(&hb, Flags::NONE, b" ")).await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, b).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("chunk_flood_up_to_and_past_max_message_bytes");
}

/// Half-messages on 1,000 channels at once: past the bound on pending messages each new one is
/// `ERR_BUSY`; the held ones complete. With room for messages but not bytes, the bound on
/// pending bytes refuses the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_half_messages_on_1000_channels() {
    let mem = Mem::start();
    let mut cfg = small_limits(16 * 1024, 64 * 1024);
    cfg.conn.max_pending_messages = 500;
    let srv = Srv::tcp(cfg).await;
    let mut p = Peer::plain(&srv.url).await;
    let body = text_body("one of a thousand", 110);
    let first = |ch: u32| {
        let mut h = hdr(MsgType::DATA, CodecId::JSON, 1000 + u64::from(ch));
        h.channel_id = ch;
        frame(&h, Flags::MORE, &body[..100])
    };
    let last = |ch: u32| {
        let mut h = hdr(MsgType::DATA, CodecId::JSON, 1000 + u64::from(ch));
        h.channel_id = ch;
        frame(&h, Flags::NONE, &body[100..])
    };
    let mut wire = Vec::new();
    for ch in 1..=1000 {
        wire.extend(first(ch));
    }
    p.write(&wire).await;
    let mut busy = BTreeSet::new();
    for _ in 501..=1000 {
        let m = p.reply().await;
        let Ok(Control::Nack(n)) = Control::decode(MsgType::NACK, m.header.body_codec, &m.body)
        else {
            panic!("expected a NACK: {m:?}")
        };
        assert_eq!(n.error_code, ErrorCode::ERR_BUSY, "{n:?}");
        busy.insert(n.msg_id);
    }
    assert_eq!(busy, (1501..=2000).collect::<BTreeSet<u64>>());
    let mut wire = Vec::new();
    for ch in 1..=1000 {
        wire.extend(last(ch));
    }
    p.write(&wire).await;
    let mut echoed = BTreeSet::new();
    for _ in 1..=500 {
        let m = p.reply().await;
        assert_eq!(m.header.msg_type, MsgType::DATA, "{m:?}");
        assert_eq!(&m.body[..], &body[..]);
        echoed.insert(m.header.in_reply_to);
    }
    assert_eq!(echoed, (1001..=1500).collect::<BTreeSet<u64>>());
    p.expect_alive().await;
    drop(p);

    // Room for 4096 messages, 64 KiB: 655 first chunks of 100 bytes fit, the rest do not.
    let srv2 = Srv::tcp(small_limits(16 * 1024, 64 * 1024)).await;
    let mut p = Peer::plain(&srv2.url).await;
    let mut wire = Vec::new();
    for ch in 1..=1000 {
        wire.extend(first(ch));
    }
    p.write(&wire).await;
    let mut refused = BTreeSet::new();
    let mut code = None;
    for _ in 656..=1000 {
        let m = p.reply().await;
        let Ok(Control::Nack(n)) = Control::decode(MsgType::NACK, m.header.body_codec, &m.body)
        else {
            panic!("expected a NACK: {m:?}")
        };
        assert!(
            n.error_code == ErrorCode::ERR_MESSAGE_TOO_LARGE || n.error_code == ErrorCode::ERR_BUSY,
            "{n:?}"
        );
        assert_eq!(*code.get_or_insert(n.error_code), n.error_code);
        refused.insert(n.msg_id);
    }
    assert_eq!(refused, (1656..=2000).collect::<BTreeSet<u64>>());
    let mut wire = Vec::new();
    for ch in 1..=1000 {
        wire.extend(last(ch));
    }
    p.write(&wire).await;
    for _ in 1..=655 {
        let m = p.reply().await;
        assert_eq!(m.header.msg_type, MsgType::DATA, "{m:?}");
    }
    p.expect_alive().await;
    srv.assert_serves().await;
    srv2.assert_serves().await;
    mem.check("interleaved_half_messages_on_1000_channels");
}

/// A second HELLO on an established connection is `ERR_MALFORMED`; the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_hello() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let id = p.id();
    p.write(&control_frame(&Control::Hello(plain_hello()), id))
        .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    // A CAPS from the initiator is as unexpected.
    let id = p.id();
    p.write(&control_frame(&Control::Caps(plain_hello()), id))
        .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("second_hello");
}

/// Unknown msgTypes: a control one (0x0042, 0x00FF) is `ERR_MALFORMED`; one above DATA
/// (0x0200) with an unknown codec is `ERR_CODEC_UNSUPPORTED`, with JSON it reaches the
/// application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_msg_types() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    for t in [0x0042, 0x00FF] {
        let id = p.id();
        p.write(&frame(
            &hdr(MsgType(t), CodecId::JSON, id),
            Flags::NONE,
            b"{}",
        ))
        .await;
        p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    }
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType(0x0200), CodecId(0x0077), id),
        Flags::NONE,
        b"opaque",
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_CODEC_UNSUPPORTED, id).await;
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType(0x0200), CodecId::JSON, id),
        Flags::NONE,
        b"layered",
    ))
    .await;
    let m = p.expect_echo(id).await;
    assert_eq!(&m.body[..], b"layered");
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("unknown_msg_types");
}

/// ACKs and NACKs for msgIds the server never sent are ignored: no answer, the connection
/// lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_nacks_for_msg_ids_never_sent() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let mut wire = Vec::new();
    for msg_id in [0, 1, 424_242, u64::MAX] {
        let id = p.id();
        wire.extend(control_frame(&Control::Ack(Ack { msg_id }), id));
        let id = p.id();
        let nack = Nack {
            msg_id,
            error_code: ErrorCode(0xFFFF),
            retry_after_ms: u32::MAX,
            detail: Some("never sent".into()),
        };
        wire.extend(control_frame(&Control::Nack(nack), id));
    }
    for _ in 0..1000 {
        let id = p.id();
        wire.extend(control_frame(&Control::Ack(Ack { msg_id: id * 7 }), id));
    }
    p.write(&wire).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("acks_and_nacks_for_msg_ids_never_sent");
}

/// PONGs never asked for are ignored; one with a body that is not a PING's is `ERR_MALFORMED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pong_never_asked_for() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let mut wire = Vec::new();
    for in_reply_to in [0, 999, u64::MAX] {
        let id = p.id();
        let mut h = hdr(MsgType::PONG, CodecId::JSON, id);
        h.in_reply_to = in_reply_to;
        wire.extend(frame(&h, Flags::NONE, b"{\"nonce\":5}"));
    }
    let id = p.id();
    wire.extend(frame(
        &hdr(MsgType::PONG, CodecId::JSON, id),
        Flags::NONE,
        b"",
    ));
    p.write(&wire).await;
    p.expect_alive().await;
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::PONG, CodecId::JSON, id),
        Flags::NONE,
        b"[1,2]",
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("pong_never_asked_for");
}

/// A zstd bomb: a COMP body whose content size is far above `max_message_bytes` is
/// `ERR_MESSAGE_TOO_LARGE`, without inflating it; a streamed zstd frame without a content size
/// and a COMP body that is not zstd are `ERR_MALFORMED`. A fair COMP message is echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bomb_and_streamed_frames() {
    let mem = Mem::start();
    let srv = Srv::tcp(small_limits(64 * 1024, 64 * 1024)).await;
    let mut p = Peer::plain(&srv.url).await;
    let comp =
        |id: u64, body: &[u8]| frame(&hdr(MsgType::DATA, CodecId::JSON, id), Flags::COMP, body);

    // A real bomb: one zstd frame recording 1 GiB, made of 8192 RLE blocks of 128 KiB
    // spaces, 32 KiB in all.
    let bomb = zstd_rle_bomb(1 << 30);
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&bomb),
        Ok(Some(n)) if n == 1 << 30
    ));
    let id = p.id();
    let before = status_kib("VmRSS");
    p.write(&comp(id, &bomb)).await;
    p.expect_nack(ErrorCode::ERR_MESSAGE_TOO_LARGE, id).await;
    assert!(
        status_kib("VmRSS") < before + 64 * 1024,
        "the bomb was not inflated"
    );

    // A streamed frame: no content size.
    let mut c = zstd::bulk::Compressor::new(3).expect("zstd");
    c.include_contentsize(false).expect("no content size");
    let streamed = c.compress(&text_body("streamed", 0)).expect("zstd");
    let id = p.id();
    p.write(&comp(id, &streamed)).await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;

    // Not zstd at all.
    let id = p.id();
    p.write(&comp(id, b"\x28\xb5\x2f\xfd garbage")).await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;

    // A fair one is inflated and echoed.
    let id = p.id();
    let fair = seal::compress(&text_body("fair", 4000), 3).expect("zstd");
    p.write(&comp(id, &fair)).await;
    let m = p.expect_echo(id).await;
    assert_eq!(&m.body[..], &text_body("fair", 4000)[..]);
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("zstd_bomb_and_streamed_frames");
}

/// A zstd frame that inflates to `size` spaces (a multiple of 128 KiB): its header records
/// the content size, then one RLE block (3-byte header, 1 byte) per 128 KiB.
fn zstd_rle_bomb(size: u64) -> Vec<u8> {
    const BLOCK: u64 = 128 * 1024;
    let mut v = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header descriptor: an 8-byte content size, single segment.
    v.push(0b1110_0000);
    v.extend_from_slice(&size.to_le_bytes());
    let blocks = size / BLOCK;
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        // Last-block bit, block type 1 (RLE), the size it regenerates.
        let block_header = last | 1 << 1 | (BLOCK as u32) << 3;
        v.extend_from_slice(&block_header.to_le_bytes()[..3]);
        v.push(b' ');
    }
    v
}

fn keyed(key: [u8; 32]) -> SessionConfig {
    let mut cfg = io_env::config();
    cfg.conn.sealer = Some(Sealer::new(&key));
    cfg
}

/// A keyed server: a client without a key fails the handshake (a raw HELLO without `crypt`
/// gets `ERR_DECRYPT` and the close; a `Session` fails to connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_server_refuses_a_client_without_key() {
    let mem = Mem::start();
    let srv = Srv::tcp(keyed([1; 32])).await;
    let mut p = Peer::connect(&srv.url).await;
    p.write(&control_frame(&Control::Hello(plain_hello()), 1))
        .await;
    p.expect_nack(ErrorCode::ERR_DECRYPT, 1).await;
    p.expect_closed().await;
    let r = t("connect", Session::connect(&srv.url, io_env::config())).await;
    assert!(r.is_err(), "{r:?}");
    // A client with another key completes the handshake (keys are not compared there) but
    // every message it seals is refused.
    let other = t("connect", Session::connect(&srv.url, keyed([2; 32])))
        .await
        .expect("handshake");
    let r = t("request", other.request(ether_request("wrong key"))).await;
    assert!(
        matches!(&r, Err(Error::Nack { code, .. }) if *code == ErrorCode::ERR_DECRYPT),
        "{r:?}"
    );
    srv.assert_serves().await;
    mem.check("keyed_server_refuses_a_client_without_key");
}

/// A keyed server: plaintext DATA, CRYPT with the wrong key, with the right key but the wrong
/// direction, and a truncated tag are each `ERR_DECRYPT`; the connection lives, and a message
/// sealed right is echoed sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_server_refuses_plaintext_and_wrong_keys() {
    let mem = Mem::start();
    let key = [1u8; 32];
    let srv = Srv::tcp(keyed(key)).await;
    let hello = Hello {
        crypt: true,
        ..plain_hello()
    };
    let (mut p, caps) = Peer::handshake(&srv.url, hello).await;
    assert!(caps.crypt);
    let body = text_body("secret", 0);
    let sealed = |sealer: &Sealer, dir: Direction, id: u64| {
        let ad = seal::aad(MsgType::DATA, CodecId::JSON, 0, id);
        sealer.seal(dir, id, 0, &ad, &body)
    };
    let id = p.id();
    p.write(&data_frame(id, &body)).await;
    p.expect_nack(ErrorCode::ERR_DECRYPT, id).await;
    for (sealer, dir) in [
        (Sealer::new(&[2; 32]), Direction::C2S),
        (Sealer::new(&key), Direction::S2C),
    ] {
        let id = p.id();
        let h = hdr(MsgType::DATA, CodecId::JSON, id);
        p.write(&frame(&h, Flags::CRYPT, &sealed(&sealer, dir, id)))
            .await;
        p.expect_nack(ErrorCode::ERR_DECRYPT, id).await;
    }
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::JSON, id),
        Flags::CRYPT,
        b"short",
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_DECRYPT, id).await;
    // Right key, right direction: echoed, sealed for us.
    let right = Sealer::new(&key);
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::JSON, id),
        Flags::CRYPT,
        &sealed(&right, Direction::C2S, id),
    ))
    .await;
    let m = p.expect_echo(id).await;
    assert!(m.flags.contains(Flags::CRYPT));
    let h = &m.header;
    let ad = seal::aad(h.msg_type, h.body_codec, h.channel_id, h.msg_id);
    let plain = right
        .open(Direction::S2C, h.msg_id, h.channel_id, &ad, &m.body)
        .expect("the echo opens");
    assert_eq!(&plain[..], &body[..]);
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("keyed_server_refuses_plaintext_and_wrong_keys");
}

/// An unkeyed server receiving CRYPT is `ERR_DECRYPT`; the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crypt_on_a_server_without_key() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let id = p.id();
    let ad = seal::aad(MsgType::DATA, CodecId::JSON, 0, id);
    let body = Sealer::new(&[3; 32]).seal(Direction::C2S, id, 0, &ad, &text_body("x", 0));
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::JSON, id),
        Flags::CRYPT,
        &body,
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_DECRYPT, id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("crypt_on_a_server_without_key");
}

fn handles_config(schemes: &[Scheme]) -> SessionConfig {
    let mut cfg = io_env::config();
    cfg.attach.schemes = schemes.to_vec();
    cfg.attach.inline_threshold = 0;
    cfg.attach.alloc_timeout = Duration::from_millis(300);
    cfg
}

fn ether_with_uri(uri: &str, size: u64) -> Vec<u8> {
    let mut e = Ether::text("hostile");
    e.attachments.push(Attachment {
        id: "h".into(),
        uri: uri.to_string(),
        size_bytes: size,
        ..Attachment::default()
    });
    xcp::codec::encode_ether(&e, CodecId::JSON)
        .expect("ether")
        .to_vec()
}

/// Hostile shm URIs on a connection that negotiated `shm`: outside the announced prefix, `..`,
/// a path, a missing object, out of bounds, an offset that overflows, a scheme not negotiated
/// (`memfd` on TCP, `cuda-ipc`), an unknown scheme, and a DLPACK body naming another's object:
/// each is `ERR_ATTACHMENT`, and the connection lives. A fair URI is mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_attachment_uris() {
    let mem = Mem::start();
    let srv = Srv::tcp(handles_config(&[Scheme::Shm])).await;
    let prefix = format!("xcphostile-{}-", std::process::id());
    let (mut p, caps) = Peer::handshake(&srv.url, handle_hello("shm", &prefix)).await;
    assert_eq!(caps.attach, vec!["shm".to_string()]);
    let seg_name = format!("{prefix}seg");
    let seg = Segment::create_shm(&seg_name, 4096).expect("shm segment");
    let hex = "ab".repeat(64);
    let cases = [
        "shm://xcp-1-deadbeef-0#0,10".to_string(),
        format!("shm://{prefix}..#0,10"),
        "shm://../../dev/shm/x#0,1".to_string(),
        format!("shm://{prefix}missing#0,10"),
        format!("shm://{seg_name}#0,4097"),
        format!("shm://{seg_name}#4096,1"),
        format!("shm://{seg_name}#{},2", u64::MAX),
        "memfd://0#0,10".to_string(),
        format!("cuda-ipc://GPU-00000000-0000-0000-0000-000000000000/{hex}#0,1"),
        "ftp://x#0,1".to_string(),
        format!("shm://{}0#0,1", xcp::attach::process_prefix()),
    ];
    for uri in &cases {
        let id = p.id();
        p.write(&data_frame(id, &ether_with_uri(uri, 1))).await;
        let n = p.reply().await;
        let Ok(Control::Nack(n)) = Control::decode(MsgType::NACK, n.header.body_codec, &n.body)
        else {
            panic!("{uri}: expected a NACK: {n:?}")
        };
        assert_eq!(
            (n.error_code, n.msg_id),
            (ErrorCode::ERR_ATTACHMENT, id),
            "{uri}: {n:?}"
        );
    }
    // DLPACK naming an object outside the prefix.
    let mut d = DlpackDescriptor::cpu(DlDataType::F32, vec![4], Bytes::from_static(&[0; 16]))
        .expect("dlpack");
    d.data = DlData::Uri(
        xcp::attach::uri::AttachmentUri::parse("shm://xcp-1-other-0#0,16").expect("uri"),
    );
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::DLPACK, id),
        Flags::NONE,
        &d.encode().expect("dlpack"),
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_ATTACHMENT, id).await;
    p.expect_alive().await;
    // A fair one is mapped (one view), then ACKed when the server drops it.
    let id = p.id();
    p.write(&data_frame(
        id,
        &ether_with_uri(&format!("shm://{seg_name}#0,4096"), 4096),
    ))
    .await;
    let m = p.expect_echo(id).await;
    assert!(m
        .header
        .tags
        .iter()
        .any(|t| t.key == "views" && t.val == "1"));
    drop(seg);
    srv.assert_serves().await;
    mem.check("hostile_attachment_uris");
}

/// On a Unix socket that negotiated `memfd`: an index with no descriptor, an index past those
/// passed, and out-of-bounds on a real one are `ERR_ATTACHMENT`; a fair one is mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memfd_index_without_descriptor() {
    let mem = Mem::start();
    let srv = Srv::unix(handles_config(&[Scheme::Memfd])).await;
    let (mut p, caps) = Peer::handshake(&srv.url, handle_hello("memfd", "")).await;
    assert_eq!(caps.attach, vec!["memfd".to_string()]);
    let id = p.id();
    p.write(&data_frame(id, &ether_with_uri("memfd://0#0,10", 10)))
        .await;
    p.expect_nack(ErrorCode::ERR_ATTACHMENT, id).await;
    let seg = Segment::create_memfd("hostile-memfd", 4096).expect("memfd");
    for (uri, code) in [
        ("memfd://1#0,10", Some(ErrorCode::ERR_ATTACHMENT)),
        ("memfd://0#0,4097", Some(ErrorCode::ERR_ATTACHMENT)),
        ("memfd://0#0,4096", None),
    ] {
        let id = p.id();
        let f = data_frame(id, &ether_with_uri(uri, 10));
        let n = t(
            "write with fds",
            p.wr.write_with_fds(&[IoSlice::new(&f)], &[seg.fd().as_fd()]),
        )
        .await
        .expect("sendmsg");
        p.write(&f[n..]).await;
        match code {
            Some(code) => drop(p.expect_nack(code, id).await),
            None => drop(p.expect_echo(id).await),
        }
    }
    // Descriptors passed with a message that names none do not serve a later message that
    // names one but passed none: each message gets the descriptors of its own first frame.
    let id = p.id();
    let plain = data_frame(id, &ether_with_uri("", 0));
    let n = t(
        "write with fds",
        p.wr.write_with_fds(&[IoSlice::new(&plain)], &[seg.fd().as_fd()]),
    )
    .await
    .expect("sendmsg");
    p.write(&plain[n..]).await;
    drop(p.expect_echo(id).await);
    let id = p.id();
    p.write(&data_frame(id, &ether_with_uri("memfd://0#0,10", 10)))
        .await;
    p.expect_nack(ErrorCode::ERR_ATTACHMENT, id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("memfd_index_without_descriptor");
}

/// Counts this process's open descriptors of memfds named `name`.
fn open_memfds(name: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains(name))
        .count()
}

/// A peer passes descriptors (`SCM_RIGHTS`) on a Unix socket without negotiating `memfd`, to a
/// server that offers it and to one that does not: they are closed, not kept, however many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_passed_without_negotiating_memfd() {
    let mem = Mem::start();
    let name = format!("xcp-hostile-scm-{}", std::process::id());
    for schemes in [vec![Scheme::Memfd], vec![]] {
        let srv = Srv::unix(handles_config(&schemes)).await;
        let mut p = Peer::plain(&srv.url).await;
        for _ in 0..20 {
            let fds: Vec<_> = (0..8)
                .map(|_| {
                    rustix::fs::memfd_create(name.as_str(), rustix::fs::MemfdFlags::CLOEXEC)
                        .expect("memfd")
                })
                .collect();
            let id = p.id();
            let f = data_frame(id, &text_body("with descriptors", 0));
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let n = t(
                "write with fds",
                p.wr.write_with_fds(&[IoSlice::new(&f)], &borrowed),
            )
            .await
            .expect("sendmsg");
            drop(borrowed);
            drop(fds);
            p.write(&f[n..]).await;
            p.expect_echo(id).await;
        }
        p.expect_alive().await;
        assert_eq!(open_memfds(&name), 0, "descriptors kept: {schemes:?}");
        srv.assert_serves().await;
    }
    mem.check("descriptors_passed_without_negotiating_memfd");
}

/// A receiver that never ACKs (and ACKs msgIds it never got): the sender's pool stays within
/// its cap, `alloc` fails with `ERR_BUSY`, the connection lives, and closing returns every
/// region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_acks_leases() {
    let mem = Mem::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = received.clone();
    let hostile = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut cfg = Config::default();
        cfg.shared_mem = true;
        cfg.attach = vec![xcp::attach::Scheme::Shm];
        cfg.host_id = xcp::attach::host_id().to_string();
        let mut conn = Connection::new(Role::Responder, cfg, Instant::now());
        let mut buf = BytesMut::with_capacity(1 << 16);
        loop {
            while let Some(ev) = conn.poll_event() {
                if let Event::Message(m) = ev {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // ACK what was never sent; never what was.
                    let _ = conn.ack(m.msg_id() + 1000);
                    let _ = conn.nack(m.msg_id() + 2000, ErrorCode::ERR_BUSY, 1, "");
                }
            }
            let mut out = BytesMut::new();
            while let Some(f) = conn.poll_transmit() {
                f.write_to(&mut out);
            }
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => conn.handle_input(&mut buf, Instant::now()),
            }
        }
    });
    let mut cfg = handles_config(&[Scheme::Shm]);
    cfg.attach.pool_cap_bytes = 4 << 20;
    let c = t("connect", Session::connect(&format!("tcp://{addr}"), cfg))
        .await
        .expect("connect");
    assert_eq!(c.negotiated().attach, vec![xcp::attach::Scheme::Shm]);
    let mut sent = 0;
    let err = loop {
        match t("alloc", c.alloc(1 << 20)).await {
            Ok(r) => {
                let att = Attachment {
                    id: "a".into(),
                    ..Attachment::default()
                };
                t(
                    "send",
                    c.send_regions(Ether::text("x"), CodecId::JSON, vec![(att, r)]),
                )
                .await
                .expect("send");
                sent += 1;
                assert!(sent <= 4, "the pool's cap bounds what is loaned");
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            xcp::Error::Timeout {
                deadline: xcp::Deadline::Alloc,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::ERR_BUSY, "{err}");
    assert_eq!(sent, 4);
    t("ping", c.ping()).await.expect("the connection lives");
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(c.pool().usage().1, 4 << 20, "bogus ACKs returned nothing");
    t("close", c.close()).await.expect("close");
    assert_eq!(c.pool().usage().1, 0, "closing returns every region");
    hostile.abort();
    let srv = Srv::tcp(io_env::config()).await;
    srv.assert_serves().await;
    mem.check("a_receiver_that_never_acks_leases");
}

/// CLARIFY_REQ/RES with garbage bodies are `ERR_MALFORMED`; good ones reach the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clarify_with_garbage_bodies() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let nested = "[".repeat(100_000);
    let garbage: [(MsgType, CodecId, &[u8]); 7] = [
        (MsgType::CLARIFY_REQ, CodecId::JSON, b"not json"),
        (MsgType::CLARIFY_REQ, CodecId::JSON, b"{\"fields\": 5}"),
        (MsgType::CLARIFY_REQ, CodecId::JSON, b"[]"),
        (MsgType::CLARIFY_RES, CodecId::JSON, b"{\"values\": [1]}"),
        (MsgType::CLARIFY_RES, CodecId::JSON, nested.as_bytes()),
        (MsgType::CLARIFY_REQ, CodecId::PROTOBUF, b"\xff\xff\xff\xff"),
        (
            MsgType::CLARIFY_RES,
            CodecId::PROTOBUF,
            b"\x0a\x05\x0a\x01k\x12\x80",
        ),
    ];
    for (t, codec, body) in garbage {
        let id = p.id();
        p.write(&frame(&hdr(t, codec, id), Flags::NONE, body)).await;
        p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    }
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::CLARIFY_REQ, CodecId::JSON, id),
        Flags::NONE,
        b"{\"fields\":[\"a\"]}",
    ))
    .await;
    p.expect_echo(id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("clarify_with_garbage_bodies");
}

/// HELLO with `max_frame_bytes` 0 (unstated: the default) and u64::MAX (the server's own
/// limit wins); 256, the floor, which the server honours by chunking its reply in 256-byte
/// frames; and 1 and 255, under the floor, which would make the server cut every reply into
/// frames of a byte or so: NACK `ERR_MESSAGE_TOO_LARGE` and the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_absurd_max_frame_bytes() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    for (mfb, want) in [(0, 1 << 20), (u64::MAX, 1 << 20), (256, 256)] {
        let hello = Hello {
            max_frame_bytes: mfb,
            ..plain_hello()
        };
        let (mut p, caps) = Peer::handshake(&srv.url, hello).await;
        assert_eq!(caps.max_frame_bytes, want, "HELLO max_frame_bytes {mfb}");
        let id = p.id();
        let body = text_body("absurd", 1000);
        p.write(&data_frame(id, &body)).await;
        let m = p.expect_echo(id).await;
        assert_eq!(&m.body[..], &body[..]);
        if want == 256 {
            assert_eq!(m.frames as usize, body.len().div_ceil(256));
        }
        p.expect_alive().await;
    }
    for mfb in [1, 255] {
        let hello = Hello {
            max_frame_bytes: mfb,
            ..plain_hello()
        };
        let mut p = Peer::connect(&srv.url).await;
        let id = p.id();
        p.write(&control_frame(&Control::Hello(hello), id)).await;
        let n = p.expect_nack(ErrorCode::ERR_MESSAGE_TOO_LARGE, id).await;
        let detail = n.detail.unwrap_or_default();
        assert!(
            detail.contains(&format!("max_frame_bytes {mfb} ")),
            "{detail}"
        );
        p.expect_closed().await;
    }
    srv.assert_serves().await;
    mem.check("hello_with_absurd_max_frame_bytes");
}

/// HELLO listing 100,000 codecs (JSON and Protobuf bodies): parsed within bounds, CAPS lists
/// only what the server has; a codec id over 16 bits is `ERR_MALFORMED` and the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_100000_codecs() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let codecs: Vec<CodecId> = (0..100_000u32).map(|i| CodecId(i as u16)).collect();
    let hello = Control::Hello(Hello {
        codecs,
        ..plain_hello()
    });
    for codec in [CodecId::JSON, CodecId::PROTOBUF] {
        let body = hello.encode(codec).expect("hello");
        let mut p = Peer::connect(&srv.url).await;
        let started = Instant::now();
        p.write(&frame(&hdr(MsgType::HELLO, codec, 1), Flags::NONE, &body))
            .await;
        let caps = p.reply().await;
        assert_eq!(caps.header.msg_type, MsgType::CAPS);
        let Ok(Control::Caps(caps)) =
            Control::decode(MsgType::CAPS, caps.header.body_codec, &caps.body)
        else {
            panic!("bad CAPS")
        };
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(caps.codecs.len() <= 16 && caps.codecs.contains(&CodecId::JSON));
        p.expect_alive().await;
    }
    let mut p = Peer::connect(&srv.url).await;
    p.write(&frame(
        &hdr(MsgType::HELLO, CodecId::JSON, 1),
        Flags::NONE,
        b"{\"codecs\":[1, 65536],\"max_frame_bytes\":1024}",
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, 1).await;
    p.expect_closed().await;
    srv.assert_serves().await;
    mem.check("hello_with_100000_codecs");
}

/// A frame whose header is 65535 bytes of garbage (binary, and JSON-looking) is
/// `ERR_MALFORMED`; the frame is skipped and the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hlen_65535_of_garbage() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    for first in [0xAB, b'{'] {
        let mut garbage = vec![0xABu8; 65535];
        garbage[0] = first;
        p.write(&frame_with_raw_header(0, &garbage, b"payload"))
            .await;
        p.expect_nack(ErrorCode::ERR_MALFORMED, 0).await;
        p.expect_alive().await;
    }
    srv.assert_serves().await;
    mem.check("hlen_65535_of_garbage");
}

/// PLEN = `max_frame_bytes` exactly is accepted; one more is `ERR_MESSAGE_TOO_LARGE` and the
/// close, before the payload is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plen_at_and_over_max_frame_bytes() {
    const MAX: usize = 64 * 1024;
    let mem = Mem::start();
    let srv = Srv::tcp(small_limits(MAX as u64, 1 << 20)).await;
    let mut p = Peer::plain(&srv.url).await;
    let id = p.id();
    let body = text_body("exactly max_frame_bytes", MAX);
    p.write(&data_frame(id, &body)).await;
    let m = p.expect_echo(id).await;
    assert_eq!(m.body.len(), MAX);
    let id = p.id();
    let over = data_frame(id, &text_body("one more", MAX + 1));
    let hlen = u16::from_le_bytes([over[6], over[7]]) as usize;
    p.write(&over[..8 + hlen + 4]).await;
    p.expect_nack(ErrorCode::ERR_MESSAGE_TOO_LARGE, id).await;
    p.expect_closed().await;
    srv.assert_serves().await;
    mem.check("plen_at_and_over_max_frame_bytes");
}

/// The LARGE flag with a small 8-byte PLEN is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_flag_with_small_plen() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let id = p.id();
    let body = text_body("large flag", 0);
    let f = data_frame(id, &body);
    let hlen = u16::from_le_bytes([f[6], f[7]]) as usize;
    let mut large = f[..8 + hlen].to_vec();
    large[5] |= Flags::LARGE.0;
    large.extend_from_slice(&(body.len() as u64).to_le_bytes());
    large.extend_from_slice(&f[8 + hlen + 4..]);
    p.write(&large).await;
    let m = p.expect_echo(id).await;
    assert_eq!(&m.body[..], &body[..]);
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("large_flag_with_small_plen");
}

/// Deeply nested JSON, where a recursive parser would overflow its stack: a JSON-form header
/// of 65,000 `[`, and a DATA body of 100,000 `[` (and of `{"a":` 50,000 deep) are
/// `ERR_MALFORMED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let header = format!(
        "{{\"msgType\":256,\"msgId\":77,\"tags\":{}",
        "[".repeat(65_000)
    );
    p.write(&frame_with_raw_header(0, header.as_bytes(), b"{}"))
        .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, 0).await;
    for body in ["[".repeat(100_000), "{\"a\":".repeat(50_000)] {
        let id = p.id();
        p.write(&data_frame(id, body.as_bytes())).await;
        p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    }
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("deeply_nested_json");
}

/// A Cap'n Proto header of 64 bytes whose tags list claims 60,000 zero-sized tags is within
/// the reader's traversal limit and accepted; 70,000 are over it and `ERR_MALFORMED`. A JSON
/// header of 20,000 tags (within 64 KiB) is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_thousand_tiny_tags() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let body = text_body("tagged", 0);
    let id = p.id();
    p.write(&frame_with_raw_header(
        0,
        &zero_size_tags_header(60_000, id),
        &body,
    ))
    .await;
    p.expect_echo(id).await;
    let id = p.id();
    p.write(&frame_with_raw_header(
        0,
        &zero_size_tags_header(70_000, id),
        &body,
    ))
    .await;
    // The header cannot be read, so neither can its msgId.
    p.expect_nack(ErrorCode::ERR_MALFORMED, 0).await;
    let id = p.id();
    let tags = vec!["{}"; 20_000].join(",");
    let header = format!("{{\"msgType\":256,\"bodyCodec\":1,\"msgId\":{id},\"tags\":[{tags}]}}");
    assert!(header.len() <= 65535);
    p.write(&frame_with_raw_header(0, header.as_bytes(), &body))
        .await;
    p.expect_echo(id).await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("sixty_thousand_tiny_tags");
}

/// Peers that close half-way through chunked messages (on several channels, 50 times): the
/// server keeps serving and holds nothing for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_closes_mid_chunked_message() {
    let mem = Mem::start();
    let srv = Srv::tcp(small_limits(16 * 1024, 1 << 20)).await;
    for round in 0..50u64 {
        let mut p = Peer::plain(&srv.url).await;
        let mut wire = Vec::new();
        for ch in 0..4 {
            let mut h = hdr(MsgType::DATA, CodecId::JSON, 100 + ch);
            h.channel_id = ch as u32;
            for _ in 0..3 {
                wire.extend(frame(&h, Flags::MORE, &[b' '; 16 * 1024]));
            }
        }
        // Half of them also stop mid-frame.
        if round % 2 == 1 {
            let f = frame(
                &hdr(MsgType::DATA, CodecId::JSON, 200),
                Flags::MORE,
                &[b' '; 9000],
            );
            wire.extend_from_slice(&f[..f.len() / 2]);
        }
        p.write(&wire).await;
        drop(p);
    }
    srv.assert_serves().await;
    mem.check("peer_closes_mid_chunked_message");
}

/// A later chunk whose msgType or codec differs from its message's first chunk is
/// `ERR_MALFORMED`; the rest of that message is dropped, the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_that_changes_its_header() {
    let mem = Mem::start();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let body = text_body("changing", 0);
    let id = p.id();
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::JSON, id),
        Flags::MORE,
        &body[..10],
    ))
    .await;
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::PROTOBUF, id),
        Flags::MORE,
        &body[10..20],
    ))
    .await;
    p.expect_nack(ErrorCode::ERR_MALFORMED, id).await;
    p.write(&frame(
        &hdr(MsgType::DATA, CodecId::JSON, id),
        Flags::NONE,
        &body[20..],
    ))
    .await;
    p.expect_alive().await;
    srv.assert_serves().await;
    mem.check("chunk_that_changes_its_header");
}

/// A peer that sends PINGs and never reads: the server stops reading it once a few MiB of its
/// own replies (PONGs) wait unread, so the peer's writes block instead of the server's memory
/// growing with what the peer sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_peer_that_never_reads() {
    // Its bound (32 MiB) is tight: measured with no other case of the binary running.
    let mem = Mem::start_alone();
    let srv = Srv::tcp(io_env::config()).await;
    let mut p = Peer::plain(&srv.url).await;
    let mut batch = Vec::new();
    for i in 0..10_000u64 {
        batch.extend(control_frame(&Control::Ping(Ping { nonce: i }), 100 + i));
    }
    let before = status_kib("VmRSS");
    let mut sent = 0usize;
    // 80 MB of PINGs, or until the server stops reading (back-pressure: what we want).
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_secs(2), p.wr.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grew = status_kib("VmRSS").saturating_sub(before);
    eprintln!(
        "sent {} MiB of PINGs unread; VmRSS +{} MiB",
        sent >> 20,
        grew / 1024
    );
    assert!(grew < 32 * 1024, "VmRSS grew by {grew} KiB");
    srv.assert_serves().await;
    mem.check("ping_flood_from_a_peer_that_never_reads");
}
