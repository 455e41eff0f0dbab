//! The same-host ring (SPEC §9) between real sessions, and against peers that abuse it: a
//! raw client that does the handshake by hand, maps the ring it was given and then writes
//! garbage, impossible indices, half a frame, or never drains. Each case checks that the
//! server drops only that connection, in bounded time, and goes on serving. (The conformance
//! suite runs over the ring in tests/session_ring.rs.)

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::{Incoming, Outgoing};
use xcp::control::{Control, Hello};
use xcp::transport::ring::{End, RingConfig, RingMemory};
use xcp::transport::{Io, ReadHalf, Stream, WriteHalf};
use xcp::wire::frame::{encode, FrameDecoder};
use xcp::wire::{Flags, FrameHeader, HeaderForm, Limits, MsgType};
use xcp::{AttachConfig, Attachment, Error, ErrorCode, Ether, Server, Session, SessionConfig};

const STEP: Duration = Duration::from_secs(10);

async fn t<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

struct Dir {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn socket_dir() -> Dir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("xcp.sock");
    Dir { _dir: dir, path }
}

/// An echo server on `ring://` (answers every message with its body); it lives as long as
/// the test's runtime.
async fn echo_server(dir: &Dir, config: SessionConfig) -> Arc<Server> {
    let server = t(
        "bind",
        Server::bind(&format!("ring://{}", dir.path.display()), config),
    )
    .await
    .expect("bind");
    let server = Arc::new(server);
    let s = server.clone();
    tokio::spawn(async move {
        while let Ok(session) = s.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = session.recv().await {
                    if m.header.msg_type != MsgType::DATA {
                        continue;
                    }
                    let reply = echo_of(&m);
                    if session.reply(&m, reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    server
}

fn echo_of(m: &Incoming) -> Outgoing {
    // A message by handle is answered with the CRC of what the view holds.
    if let Some(v) = m.view("blob") {
        let crc = xcp::wire::frame::crc32c(v.as_slice());
        return text(&format!("crc {crc}"));
    }
    Outgoing::data(m.header.body_codec, m.body.clone())
}

fn text(s: &str) -> Outgoing {
    Outgoing::ether(&Ether::text(s), CodecId::JSON).expect("encode")
}

/// A new ring client is served (the server survived whatever came before).
async fn assert_serves(url: &str) {
    let c = t("connect", Session::connect(url, SessionConfig::default()))
        .await
        .expect("a new ring client is served");
    assert_eq!(c.io(), Io::Ring);
    let r = t("request", c.request(text("still alive")))
        .await
        .expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("still alive"));
    t("close", c.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_through_the_ring_inline_and_by_memfd() {
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let c = t("connect", Session::connect(&url, SessionConfig::default()))
        .await
        .expect("connect");
    assert_eq!(c.io(), Io::Ring);
    assert!(c.negotiated().ring);

    // Inline: small and large bodies, larger than a frame and than the ring itself, so
    // frames wrap around and the writer waits for room.
    let mut seed = 7u64;
    // (A tensor body: the server checks each body with the codec its frame names.)
    for n in [1usize, 15, 1024, 25_000, 1 << 18, (1 << 18) + 9, 9 << 18] {
        let values: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f32::from_bits((seed >> 32) as u32)
            })
            .collect();
        let body = xcp::codec::tensor::encode_f32(&[n as u32], &values, false).expect("tensor");
        let len = body.len();
        let r = t(
            "request",
            c.request(Outgoing::data(CodecId::TENSOR_F32, body.clone())),
        )
        .await
        .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert_eq!(r.body.len(), len);
        assert!(r.body[..] == body[..], "{len} bytes came back changed");
    }

    // Many requests in flight at once.
    let mut waiting = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        waiting.push(tokio::spawn(async move {
            let r = c.request(text(&format!("n{i}"))).await.expect("reply");
            assert_eq!(r.ether().expect("ether"), Ether::text(format!("n{i}")));
        }));
    }
    for w in waiting {
        t("concurrent", w).await.expect("task");
    }

    // By handle: a memfd whose descriptor goes on the ring's socket, its frame in the ring.
    if c.negotiated().attach.contains(&Scheme::Memfd) {
        for round in 0..3u8 {
            let mut region = t("alloc", c.alloc(8 << 20)).await.expect("alloc");
            for (i, b) in region.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(round);
            }
            let want = xcp::wire::frame::crc32c(&region);
            let ether = Ether::text("by handle");
            let r = t(
                "request_regions",
                c.request_regions(ether, CodecId::JSON, vec![(blob(), region)]),
            )
            .await
            .expect("reply by handle");
            assert_eq!(
                r.ether().expect("ether"),
                Ether::text(format!("crc {want}"))
            );
        }
    } else {
        eprintln!("memfd not negotiated here: the by-handle part is skipped");
    }
    t("close", c.close()).await.expect("close");
    assert_serves(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_ring_is_an_error_and_unix_clients_keep_the_socket() {
    let dir = socket_dir();
    let config = SessionConfig::default().with_ring(RingConfig::default().with_offer(false));
    let _server = echo_server(&dir, config).await;
    let r = t(
        "connect",
        Session::connect(
            &format!("ring://{}", dir.path.display()),
            SessionConfig::default(),
        ),
    )
    .await;
    match r {
        Err(Error::Incompatible { code, detail }) => {
            assert_eq!(code, ErrorCode::ERR_ATTACHMENT);
            assert!(detail.contains("ring"), "{detail}");
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // A unix:// client of a ring-offering server stays on the socket.
    let dir = socket_dir();
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let c = t(
        "connect",
        Session::connect(
            &format!("unix://{}", dir.path.display()),
            SessionConfig::default(),
        ),
    )
    .await
    .expect("connect");
    assert_eq!(c.io(), Io::Epoll);
    assert!(!c.negotiated().ring);
    let r = t("request", c.request(text("socket")))
        .await
        .expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("socket"));
}

/// The name of the threads of `idle_ring_peers_sleep`'s runtime: their CPU is the peers'
/// (the other tests of this binary run at the same time, on runtimes of their own).
const IDLE_THREADS: &str = "idle-ring-peers";

#[test]
fn idle_ring_peers_sleep() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name(IDLE_THREADS)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(idle_ring_peers());
}

async fn idle_ring_peers() {
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let c = t("connect", Session::connect(&url, SessionConfig::default()))
        .await
        .expect("connect");
    t("request", c.request(text("warm"))).await.expect("reply");
    // After the spin both ends sleep on the socket: this process (client and server) uses
    // next to no CPU while the connection is idle. A spin that never ended would use a
    // whole core here (or more); the bound is loose so a busy machine cannot fail it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time() - before;
    eprintln!("CPU of two idle ring peers over 1 s: {used:?}");
    assert!(
        used < Duration::from_millis(200),
        "idle ring peers used {used:?} of CPU in 1 s"
    );
    // And they wake up.
    let r = t("request", c.request(text("awake"))).await.expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("awake"));
}

/// CPU time (user + system) so far of this process's threads named [`IDLE_THREADS`], from
/// `/proc/self/task/*/stat` (in USER_HZ ticks, 100 a second on every Linux architecture).
fn cpu_time() -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let Ok(stat) = std::fs::read_to_string(task.expect("task").path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (head, rest) = stat.rsplit_once(')').expect("comm");
        // The kernel keeps the first 15 bytes of a thread's name.
        let comm = head.split_once('(').expect("comm").1;
        if !IDLE_THREADS.starts_with(comm) {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    }
    Duration::from_millis(ticks * 10)
}

// ----- a raw ring client -------------------------------------------------------------------

/// A client that does the handshake by hand and then holds the ring's memory itself.
struct RawRing {
    rd: ReadHalf,
    wr: WriteHalf,
    mem: Arc<RingMemory>,
    /// The descriptor of the memory, for writing its header behind the producer's back.
    fd: OwnedFd,
}

fn frame(msg_type: MsgType, codec: CodecId, msg_id: u64, body: Bytes) -> Vec<u8> {
    let h = FrameHeader {
        msg_type,
        body_codec: codec,
        msg_id,
        ..Default::default()
    };
    encode(&h, HeaderForm::Capnp, Flags::NONE, body)
        .expect("encode")
        .to_vec()
}

impl RawRing {
    async fn connect(dir: &Dir) -> RawRing {
        let stream = t(
            "connect",
            Stream::connect(&format!("unix://{}", dir.path.display())),
        )
        .await
        .expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        let hello = Control::Hello(Hello {
            codecs: vec![CodecId::JSON],
            max_frame_bytes: 1 << 20,
            version: "0.2".into(),
            max_message_bytes: 256 << 20,
            ring: true,
            ..Default::default()
        });
        let body = hello.encode(CodecId::JSON).expect("hello");
        t(
            "hello",
            wr.write_all(&frame(MsgType::HELLO, CodecId::JSON, 1, body)),
        )
        .await
        .expect("write hello");
        let mut dec = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut fds = Vec::new();
        let mut scratch = vec![0u8; 65536];
        let caps = loop {
            if let Some(f) = dec.decode(&mut buf).expect("decode") {
                break f;
            }
            let n = t("caps", rd.read_with_fds(&mut scratch, &mut fds))
                .await
                .expect("read");
            assert!(n > 0, "the server closed before CAPS");
            buf.extend_from_slice(&scratch[..n]);
        };
        assert_eq!(caps.header.msg_type, MsgType::CAPS);
        match Control::decode(caps.header.msg_type, caps.header.body_codec, &caps.payload)
            .expect("caps body")
        {
            Control::Caps(c) => assert!(c.ring, "CAPS did not turn the ring on"),
            other => panic!("expected CAPS, got {other:?}"),
        }
        assert!(buf.is_empty(), "bytes after CAPS on the socket");
        assert_eq!(fds.len(), 1, "CAPS carries exactly the ring's memfd");
        let fd = fds.pop().unwrap();
        let keep = fd.as_fd().try_clone_to_owned().expect("dup");
        let mem = RingMemory::open(fd, 1 << 30).expect("the server's ring is valid");
        RawRing {
            rd,
            wr,
            mem,
            fd: keep,
        }
    }

    /// Writes `bytes` into our ring (initiator → responder) and wakes the server.
    async fn put(&mut self, bytes: &[u8]) {
        let mut p = self.mem.producer(End::Initiator);
        let mut off = 0;
        while off < bytes.len() {
            let n = p.write(&[&bytes[off..]]).expect("write");
            off += n;
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // Wake it whether it sleeps or not: a spurious wake-up is allowed.
        t("wake", self.wr.write_all(b"D")).await.expect("wake");
    }

    /// Writes raw bytes into the shared memory at `offset` (a hostile peer's view of it).
    fn poke(&self, offset: u64, bytes: &[u8]) {
        let n = rustix::io::pwrite(&self.fd, bytes, offset).expect("pwrite");
        assert_eq!(n, bytes.len());
    }

    /// Waits for the server to close the connection (end of stream on the socket).
    async fn closed_by_server(&mut self) {
        let mut sink = vec![0u8; 4096];
        loop {
            let n = t("the server closes", self.rd.read(&mut sink))
                .await
                .unwrap_or(0);
            if n == 0 {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_raw_client_is_served_through_the_ring() {
    // The raw client itself, speaking correctly, gets its PONG back through the ring: so the
    // hostile cases below fail for what they do, not for a broken raw client.
    let dir = socket_dir();
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let mut raw = RawRing::connect(&dir).await;
    let ping = Control::Ping(xcp::control::Ping { nonce: 42 })
        .encode(CodecId::JSON)
        .expect("ping");
    raw.put(&frame(MsgType::PING, CodecId::JSON, 2, ping)).await;
    let mut c = raw.mem.consumer(End::Initiator);
    let mut got = BytesMut::new();
    let mut dec = FrameDecoder::new(Limits::default());
    let pong = t("pong through the ring", async {
        loop {
            c.read(&mut got, 1 << 20).expect("read");
            if let Some(f) = dec.decode(&mut got).expect("decode") {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(pong.header.msg_type, MsgType::PONG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_in_the_ring_closes_that_connection_only() {
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let mut raw = RawRing::connect(&dir).await;
    raw.put(&[0xA5; 300]).await;
    raw.closed_by_server().await;
    assert_serves(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impossible_indices_close_that_connection_only() {
    // The control block of ring 1 (initiator → responder) starts at 2048; its tail first.
    for (what, offset, value) in [
        ("a tail far ahead of the head", 2048u64, u64::MAX / 2),
        ("a tail behind the head", 2048u64, u64::MAX),
    ] {
        let dir = socket_dir();
        let url = format!("ring://{}", dir.path.display());
        let _server = echo_server(&dir, SessionConfig::default()).await;
        let mut raw = RawRing::connect(&dir).await;
        raw.poke(offset, &value.to_le_bytes());
        t("wake", raw.wr.write_all(b"D")).await.expect("wake");
        eprintln!("{what}: the server must close");
        raw.closed_by_server().await;
        assert_serves(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_gone_mid_frame_ends_its_connection() {
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let c = t("connect", Session::connect(&url, SessionConfig::default()))
        .await
        .expect("connect");
    let mut raw = RawRing::connect(&dir).await;
    let body = Bytes::from(vec![7u8; 100_000]);
    let whole = frame(MsgType::DATA, CodecId::TENSOR_F32, 2, body);
    raw.put(&whole[..whole.len() / 2]).await;
    // The process holding the other end dies: the kernel closes its socket and unmaps the
    // memory. Dropping our ends does exactly that.
    drop(raw);
    // The other connection kept working meanwhile, and a new one is served.
    let r = t("request", c.request(text("other"))).await.expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("other"));
    assert_serves(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_never_drains_blocks_only_its_own_sends() {
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    // A server that pushes data to every client as fast as it can.
    let server = t("bind", Server::bind(&url, SessionConfig::default()))
        .await
        .expect("bind");
    let pushed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p = pushed.clone();
    let server = Arc::new(server);
    let s = server.clone();
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::channel::<xcp::Result<()>>(4);
    tokio::spawn(async move {
        while let Ok(session) = s.accept().await {
            let p = p.clone();
            let ended = ended_tx.clone();
            tokio::spawn(async move {
                let body = Bytes::from(vec![1u8; 256 << 10]);
                let r = loop {
                    tokio::select! {
                        r = session.send(Outgoing::data(CodecId::TENSOR_F32, body.clone())) => {
                            if let Err(e) = r { break Err(e); }
                            p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        m = session.recv() => match m {
                            Ok(m) if m.header.msg_type == MsgType::DATA => {
                                let _ = session.reply(&m, echo_of(&m)).await;
                            }
                            Ok(_) => {}
                            Err(e) => break Err(e),
                        }
                    }
                };
                let _ = ended.send(r).await;
            });
        }
    });
    let raw = RawRing::connect(&dir).await;
    // The server fills our ring (4 MiB) and its own queue, then its sends wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stuck_at = pushed.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = pushed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stuck_at, later,
        "sends to a peer that never reads did not stop"
    );
    assert!(
        stuck_at < 1000,
        "{stuck_at} messages of 256 KiB went to a peer that reads none"
    );
    // Another client is served meanwhile (its own session pushes to it, and it reads).
    let c = t("connect", Session::connect(&url, SessionConfig::default()))
        .await
        .expect("connect");
    let r = t("request", c.request(text("unblocked")))
        .await
        .expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("unblocked"));
    // When the stuck peer goes, the server's blocked send ends with an error.
    drop(raw);
    let ended = t("the stuck connection ends", ended_rx.recv())
        .await
        .expect("ended");
    assert!(ended.is_err(), "{ended:?}");
    drop(c);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memfd_handles_stay_bound_to_their_frames() {
    // Handles of three sizes in a row, some messages inline between them: every descriptor
    // must reach the message whose frame names it (they travel on the socket, the frames in
    // the ring).
    let dir = socket_dir();
    let url = format!("ring://{}", dir.path.display());
    let _server = echo_server(&dir, SessionConfig::default()).await;
    let config =
        SessionConfig::default().with_attach(AttachConfig::default().with_inline_threshold(0));
    let c = t("connect", Session::connect(&url, config))
        .await
        .expect("connect");
    if !c.negotiated().attach.contains(&Scheme::Memfd) {
        eprintln!("skipped: memfd not negotiated here");
        return;
    }
    let mut waiting = Vec::new();
    for i in 0..24usize {
        let c = c.clone();
        waiting.push(tokio::spawn(async move {
            if i % 3 == 2 {
                let r = c
                    .request(text(&format!("inline {i}")))
                    .await
                    .expect("reply");
                assert_eq!(
                    r.ether().expect("ether"),
                    Ether::text(format!("inline {i}"))
                );
                return;
            }
            let len = [4096usize, 1 << 20, 3 << 20][i % 3] + i;
            let mut region = c.alloc(len).await.expect("alloc");
            for (k, b) in region.iter_mut().enumerate() {
                *b = (k as u8) ^ (i as u8);
            }
            let want = xcp::wire::frame::crc32c(&region);
            let r = c
                .request_regions(Ether::text("h"), CodecId::JSON, vec![(blob(), region)])
                .await
                .expect("reply");
            assert_eq!(
                r.ether().expect("ether"),
                Ether::text(format!("crc {want}")),
                "message {i}"
            );
        }));
    }
    for w in waiting {
        t("requests", w).await.expect("task");
    }
}

fn blob() -> Attachment {
    Attachment {
        id: "blob".into(),
        media_type: "application/octet-stream".into(),
        ..Default::default()
    }
}
