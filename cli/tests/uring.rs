//! The io_uring transport beyond the conformance suite (`tests/session_uring.rs`): interop
//! with epoll peers in both directions over TCP and Unix sockets, memfd handles through a
//! ring, many connections on one ring, receives whose futures are dropped mid-flight, the
//! fallback of `auto` and the refusal of an explicit `uring` where io_uring is not available.
//!
//! Every test that needs io_uring prints why it skips and passes where the kernel refuses it.

use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use tokio::io::AsyncWriteExt;

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::transport::{uring, IoMode, Listener, ReadHalf, Stream, TransportConfig};
use xcp::{Attachment, Ether, Server, Session, SessionConfig};

const T: Duration = Duration::from_secs(20);

async fn t<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

fn skip() -> bool {
    match uring::probe() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped: io_uring is not available here: {why}");
            true
        }
    }
}

fn config(io: IoMode, ring: Option<uring::Ring>) -> SessionConfig {
    SessionConfig::default().with_transport(
        TransportConfig::default()
            .with_io(io)
            .with_ring(ring)
            .with_tls(None),
    )
}

/// Echoes every message (same codec, same body) until the peer goes.
async fn echo_server(url: &str, cfg: SessionConfig) -> (String, tokio::task::JoinHandle<()>) {
    let server = t("bind", Server::bind(url, cfg)).await.expect("bind");
    let url = server.local_url();
    let task = tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    let out = Outgoing::data(m.header.body_codec, m.body.clone());
                    if s.reply(&m, out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, task)
}

/// Requests of every body kind the echo keeps as it is, small and chunked, checked byte for
/// byte.
async fn exchange(c: &Session) {
    let text = Outgoing::ether(&Ether::text("over the ring"), CodecId::JSON).expect("json");
    let proto = Outgoing::ether(&Ether::text("protobuf"), CodecId::PROTOBUF).expect("proto");
    let values: Vec<f32> = (0..300_000).map(|i| i as f32 * 0.5).collect();
    let tensor =
        xcp::codec::tensor::encode_f32(&[values.len() as u32], &values, false).expect("tensor");
    let big = Outgoing::data(CodecId::TENSOR_F32, tensor.clone());
    for out in [text, proto, big] {
        let body = out.body.clone();
        let r = t("request", c.request(out)).await.expect("reply");
        assert_eq!(r.body, body, "echoed byte for byte");
    }
    // 1.2 MB at the default 1 MiB frame limit: chunked.
    let r = t("ping", c.ping()).await.expect("pong");
    assert!(r < T);
}

async fn interop(url: &str, server_io: IoMode, client_io: IoMode) {
    let (url, task) = echo_server(url, config(server_io, None)).await;
    let c = t("connect", Session::connect(&url, config(client_io, None)))
        .await
        .expect("connect");
    exchange(&c).await;
    t("close", c.close()).await.expect("close");
    task.abort();
}

fn unix_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("unix://{}/{name}.sock", dir.path().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_client_uring_server_and_reverse_tcp() {
    if skip() {
        return;
    }
    interop("tcp://127.0.0.1:0", IoMode::Uring, IoMode::Epoll).await;
    interop("tcp://127.0.0.1:0", IoMode::Epoll, IoMode::Uring).await;
    interop("tcp://127.0.0.1:0", IoMode::Uring, IoMode::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_client_uring_server_and_reverse_unix() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    interop(&unix_url(&dir, "a"), IoMode::Uring, IoMode::Epoll).await;
    interop(&unix_url(&dir, "b"), IoMode::Epoll, IoMode::Uring).await;
}

/// memfd descriptors travel with `IORING_OP_SENDMSG`/`RECVMSG` (`SCM_RIGHTS`), in both
/// mixes of transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memfd_handles_through_the_ring() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (sio, cio)) in [
        (IoMode::Uring, IoMode::Uring),
        (IoMode::Uring, IoMode::Epoll),
        (IoMode::Epoll, IoMode::Uring),
    ]
    .into_iter()
    .enumerate()
    {
        let memfd = |io| {
            config(io, None).with_attach(AttachConfig::default().with_schemes(vec![Scheme::Memfd]))
        };
        let url = unix_url(&dir, &format!("m{i}"));
        let server = t("bind", Server::bind(&url, memfd(sio)))
            .await
            .expect("bind");
        let c = t("connect", Session::connect(&url, memfd(cio)))
            .await
            .expect("connect");
        let s = t("accept", server.accept()).await.expect("accept");
        for round in 0..4u8 {
            let mut r = t("alloc", c.alloc(1 << 20)).await.expect("alloc");
            for (j, b) in r.iter_mut().enumerate() {
                *b = (j as u8).wrapping_mul(13).wrapping_add(round);
            }
            let want = xcp::wire::frame::crc32c(&r);
            let att = Attachment {
                id: "kv".into(),
                ..Default::default()
            };
            t(
                "send",
                c.send_regions(Ether::text("block"), CodecId::JSON, vec![(att, r)]),
            )
            .await
            .expect("send");
            let m = t("recv", s.recv()).await.expect("recv");
            assert!(
                m.view("kv").is_some(),
                "came by handle ({sio:?} <- {cio:?})"
            );
            let bytes = m.attachment_bytes("kv").expect("bytes");
            assert_eq!(bytes.len(), 1 << 20);
            assert_eq!(xcp::wire::frame::crc32c(&bytes), want);
        }
        t("close", c.close()).await.expect("close");
    }
}

/// One ring serves many client connections at once; when they are closed, every operation
/// has come back from the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_ring() {
    if skip() {
        return;
    }
    let (url, task) = echo_server("tcp://127.0.0.1:0", config(IoMode::Uring, None)).await;
    let ring = uring::Ring::new().expect("ring");
    let mut clients = Vec::new();
    for _ in 0..32 {
        let c = t(
            "connect",
            Session::connect(&url, config(IoMode::Uring, Some(ring.clone()))),
        )
        .await
        .expect("connect");
        clients.push(c);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        tasks.spawn(async move {
            for k in 0..20 {
                let text = format!("client {i} message {k}");
                let out = Outgoing::ether(&Ether::text(&text), CodecId::JSON).expect("json");
                let r = c.request(out).await.expect("reply");
                assert_eq!(r.ether().expect("ether"), Ether::text(&text));
            }
        });
    }
    while let Some(r) = t("clients", tasks.join_next()).await {
        r.expect("client task");
    }
    assert!(
        ring.in_flight() > 0,
        "every connection keeps a receive in flight"
    );
    for c in clients {
        t("close", c.close()).await.expect("close");
    }
    // Cancelled receives come back asynchronously.
    let deadline = tokio::time::Instant::now() + T;
    while ring.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} operations never came back",
            ring.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
}

/// A receive whose future is dropped again and again (as the session driver's `select!`
/// does) loses no byte and reorders none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_receive_futures_lose_nothing() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let url = unix_url(&dir, "d");
    let l = Listener::bind(&url).await.expect("bind");
    let connect = tokio::spawn({
        let url = url.clone();
        async move { Stream::connect(&url).await.expect("connect") }
    });
    let (s, _) = l.accept().await.expect("accept");
    let mut c = connect.await.expect("join");
    let s = s
        .with_ring(Some(uring::Ring::new().expect("ring")))
        .expect("to the ring");
    assert!(s.is_uring() && s.is_unix());
    let (rd, _wr) = s.into_split();
    let ReadHalf::Uring(mut rd) = rd else {
        panic!("not an io_uring half")
    };
    const TOTAL: usize = 24 << 20;
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let mut chunk = vec![0u8; 48 * 1024 + 7];
        while sent < TOTAL {
            let n = chunk.len().min(TOTAL - sent);
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = ((sent + i) % 251) as u8;
            }
            c.write_all(&chunk[..n]).await.expect("write");
            sent += n;
        }
        c
    });
    let mut got = 0usize;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut fds = Vec::new();
    let mut drops = 0u32;
    while got < TOTAL {
        let n = loop {
            tokio::select! {
                r = rd.read_owned(&mut buf, Some(&mut fds), 0) => break r.expect("read"),
                _ = tokio::time::sleep(Duration::from_micros(20)) => drops += 1,
            }
        };
        assert!(n > 0, "end of stream after {got} bytes");
        let bytes: Bytes = buf.split().freeze();
        assert_eq!(bytes.len(), n);
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(*b, ((got + i) % 251) as u8, "byte {}", got + i);
        }
        got += n;
    }
    assert!(fds.is_empty());
    eprintln!("{drops} receive futures dropped mid-flight");
    drop(t("writer", writer).await.expect("join"));
}

fn xcp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xcp"))
}

/// Where io_uring is refused (simulated with `XCP_URING_DISABLE`), `--io uring` fails with
/// the reason and what to do, and `--io auto` serves over epoll with one log line.
#[test]
fn explicit_uring_fails_clearly_and_auto_falls_back() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (url, _task) = rt.block_on(echo_server(
        "tcp://127.0.0.1:0",
        config(IoMode::Epoll, None),
    ));
    let out = xcp()
        .args(["ping", &url, "--count", "1", "--io", "uring"])
        .env("XCP_URING_DISABLE", "1")
        .output()
        .expect("run xcp");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("io_uring is not available"), "{err}");
    assert!(err.contains("XCP_URING_DISABLE"), "{err}");
    assert!(err.contains("--io epoll"), "{err}");

    let out = xcp()
        .args(["ping", &url, "--count", "1", "--io", "auto"])
        .env("XCP_URING_DISABLE", "1")
        .output()
        .expect("run xcp");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("using epoll").count(), 1, "one log line: {err}");
    rt.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn io_modes_parse() {
    assert_eq!("epoll".parse::<IoMode>().unwrap(), IoMode::Epoll);
    assert_eq!("URING".parse::<IoMode>().unwrap(), IoMode::Uring);
    assert_eq!("auto".parse::<IoMode>().unwrap(), IoMode::Auto);
    let e = "kqueue".parse::<IoMode>().unwrap_err().to_string();
    assert!(e.contains("epoll, uring or auto"), "{e}");
}

/// Zero-copy sends (`IORING_OP_SENDMSG_ZC`, forced on loopback here): two completions per
/// send, the buffers held until the second; every byte echoed intact, and every operation
/// back from the kernel after the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_sends_round_trip() {
    if skip() {
        return;
    }
    let ring = uring::Ring::new().expect("ring");
    if !ring.zero_copy_supported() {
        eprintln!("skipped: this kernel has no IORING_OP_SENDMSG_ZC (Linux 6.1)");
        return;
    }
    ring.set_zero_copy(uring::ZeroCopy::Always);
    let (url, task) = echo_server(
        "tcp://127.0.0.1:0",
        config(IoMode::Uring, Some(ring.clone())),
    )
    .await;
    let c = t(
        "connect",
        Session::connect(&url, config(IoMode::Uring, Some(ring.clone()))),
    )
    .await
    .expect("connect");
    exchange(&c).await;
    for i in 0..40u32 {
        let values: Vec<f32> = (0..(4096 + i * 997)).map(|v| (v ^ i) as f32).collect();
        let body =
            xcp::codec::tensor::encode_f32(&[values.len() as u32], &values, false).expect("tensor");
        let r = t(
            "request",
            c.request(Outgoing::data(CodecId::TENSOR_F32, body.clone())),
        )
        .await
        .expect("reply");
        assert_eq!(r.body, body, "request {i}");
    }
    assert!(
        ring.zero_copy_sends() > 40,
        "{} zero-copy sends",
        ring.zero_copy_sends()
    );
    t("close", c.close()).await.expect("close");
    task.abort();
    let deadline = tokio::time::Instant::now() + T;
    while ring.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} operations never came back",
            ring.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether this kernel gives rings provided receive buffers (Linux 6.0); prints why not.
fn pbuf_skip(ring: &uring::Ring) -> bool {
    if ring.provided_buffers().0 == 0 {
        eprintln!("skipped: this kernel registers no provided-buffer ring (it needs Linux 6.0)");
        return true;
    }
    false
}

/// A TENSOR_F32 body of `elems` elements whose bytes depend on `k`.
fn tensor(elems: usize, k: usize) -> Bytes {
    use xcp::codec::tensor::{DType, TensorHeader};
    let h = TensorHeader::new(DType::F32, &[elems as u32]).expect("header");
    let mut b = BytesMut::new();
    h.write(&mut b);
    b.extend((0..elems * 4).map(|i| (i % 253) as u8 ^ k as u8));
    b.freeze()
}

/// Small replies come through the ring's provided buffers (multishot receives), large frames
/// straight into the read buffer; every byte of both is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_reads_use_provided_buffers_and_large_frames_go_direct() {
    if skip() {
        return;
    }
    let (url, task) = echo_server("tcp://127.0.0.1:0", config(IoMode::Uring, None)).await;
    let ring = uring::Ring::new().expect("ring");
    let c = t(
        "connect",
        Session::connect(&url, config(IoMode::Uring, Some(ring.clone()))),
    )
    .await
    .expect("connect");
    // Prime the pool (the first read arms the first multishot receive).
    for k in 0..200usize {
        let body = tensor(16 + (k * 37) % 1000, k);
        let r = t(
            "small",
            c.request(Outgoing::data(CodecId::TENSOR_F32, body.clone())),
        )
        .await
        .expect("reply");
        assert_eq!(r.body, body, "small message {k}");
    }
    if pbuf_skip(&ring) {
        task.abort();
        return;
    }
    let (pooled, direct_before) = ring.received_bytes();
    assert!(
        pooled > 200 * 80,
        "small replies came through provided buffers ({pooled} B)"
    );
    for k in 0..4usize {
        let body = tensor((512 << 10) + k * 4099, k);
        let r = t(
            "large",
            c.request(Outgoing::data(CodecId::TENSOR_F32, body.clone())),
        )
        .await
        .expect("reply");
        assert!(r.body == body, "large message {k} differs");
    }
    let (pooled_after, direct) = ring.received_bytes();
    assert!(
        direct - direct_before > 4 * (1 << 20),
        "most of the large replies went straight into the read buffer ({} B direct, {} B \
         through provided buffers)",
        direct - direct_before,
        pooled_after - pooled
    );
    let (bufs, size) = ring.provided_buffers();
    assert!(bufs > 0 && bufs <= uring::DEFAULT_PROVIDED_BUFFERS && size == 16 * 1024);
    t("close", c.close()).await.expect("close");
    task.abort();
}

/// Readers on one ring with a small pool (32 buffers for 6 connections): reads switch between
/// provided buffers and direct receives at random, futures are dropped mid-flight, readers
/// stall while their peers keep sending (so multishot receives stop for a reader that falls
/// behind, and run out of buffers). No byte is lost or reordered, nothing hangs, and every
/// operation comes back once the streams are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provided_buffer_reads_survive_switching_stalls_and_drops() {
    if skip() {
        return;
    }
    let ring = uring::Ring::with_provided_buffers(32).expect("ring");
    let l = Listener::bind("tcp://127.0.0.1:0").await.expect("bind");
    let url = l.local_url();
    const TOTAL: usize = 6 << 20;
    let mut readers = tokio::task::JoinSet::new();
    for conn in 0..6usize {
        let connect = tokio::spawn({
            let url = url.clone();
            async move { Stream::connect(&url).await.expect("connect") }
        });
        let (s, _) = l.accept().await.expect("accept");
        let mut c = connect.await.expect("join");
        let s = s.with_ring(Some(ring.clone())).expect("to the ring");
        let (rd, wr) = s.into_split();
        let ReadHalf::Uring(mut rd) = rd else {
            panic!("not an io_uring half")
        };
        let writer = tokio::spawn(async move {
            let mut sent = 0usize;
            let mut chunk = vec![0u8; 3000 + conn * 997];
            while sent < TOTAL {
                let n = chunk.len().min(TOTAL - sent);
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = ((sent + i) % 241) as u8 ^ conn as u8;
                }
                c.write_all(&chunk[..n]).await.expect("write");
                sent += n;
            }
            c
        });
        readers.spawn(async move {
            let _wr = wr;
            let mut got = 0usize;
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut rng = SmallRng::seed_from_u64(0x9e37_79b9 ^ conn as u64);
            let (mut drops, mut stalls) = (0u32, 0u32);
            while got < TOTAL {
                let r = rng.next_u32();
                let want = match r % 4 {
                    0 => 0,
                    1 => 100,
                    2 => uring::DIRECT_MIN,
                    _ => 1 << 20,
                };
                if r % 29 == 0 {
                    // Stall: the peer keeps sending meanwhile.
                    stalls += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
                let n = loop {
                    tokio::select! {
                        r = rd.read_owned(&mut buf, None, want) => break r.expect("read"),
                        _ = tokio::time::sleep(Duration::from_micros(20)) => drops += 1,
                    }
                };
                assert!(n > 0, "connection {conn}: end of stream after {got} bytes");
                let bytes: Bytes = buf.split().freeze();
                assert_eq!(bytes.len(), n);
                for (i, b) in bytes.iter().enumerate() {
                    assert_eq!(
                        *b,
                        ((got + i) % 241) as u8 ^ conn as u8,
                        "connection {conn}: byte {}",
                        got + i
                    );
                }
                got += n;
            }
            let c = writer.await.expect("writer");
            (drops, stalls, rd, c)
        });
    }
    let mut keep = Vec::new();
    while let Some(r) = t("readers", readers.join_next()).await {
        let (drops, stalls, rd, c) = r.expect("reader");
        eprintln!("{drops} receive futures dropped, {stalls} stalls");
        keep.push((rd, c));
    }
    let (pooled, direct) = ring.received_bytes();
    eprintln!(
        "{pooled} B through provided buffers, {direct} B direct, {} buffers",
        ring.provided_buffers().0
    );
    if ring.provided_buffers().0 > 0 {
        assert!(pooled > 0 && direct > 0, "both kinds of receive were used");
        assert!(
            ring.provided_buffers().0 <= 32,
            "the pool stayed within its limit"
        );
    }
    drop(keep);
    let deadline = tokio::time::Instant::now() + T;
    while ring.in_flight() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} operations never came back",
            ring.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
