//! A local peer that shrinks its segment cannot take `xcp serve` down (SPEC §7), over real
//! processes: the server is the `xcp` binary, the hostile peer is this test process.
//!
//! On a 256 MiB blob (`xcp send --random-bytes`'s kind: the server answers the CRC32C of the
//! bytes, read in place from the peer's segment), the peer truncates its shm object at several
//! moments between sending and the server's last read (before it maps, while it sums, after).
//! Each time the server stays up, the message gets either `ERR_ATTACHMENT` or the right CRC32C
//! (never a CRC of zeros), and a new client is served right after. A memfd sent unsealed is
//! refused before anything is mapped; a sealed one cannot be shrunk and is answered with the
//! right CRC32C, also when another process (`xcp send`) sends it.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::control::{Control, Hello};
use xcp::session::AttachConfig;
use xcp::transport::Stream;
use xcp::wire::chunk::{Message, Reassembler};
use xcp::wire::frame::{crc32c, encode_frame, FrameDecoder};
use xcp::wire::{Flags, FrameHeader, HeaderForm, Limits, MsgType};
use xcp::{Attachment, Error, ErrorCode, Ether, Session, SessionConfig};

#[path = "../../tests/support/io_env.rs"]
mod io_env;

const BLOB: usize = 256 << 20;
const STEP: Duration = Duration::from_secs(30);

async fn t<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[path = "../../tests/support/serve.rs"]
mod serve;

/// An `xcp serve` process; killed when dropped.
struct Serve {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(listen: &str) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let listen = listen.replace("DIR", &dir.path().display().to_string());
        let mut child = serve::command(&listen)
            .stderr(Stdio::null())
            .spawn()
            .expect("xcp serve starts");
        let url = serve::listening_url(&mut child);
        Serve {
            child,
            url,
            _dir: dir,
        }
    }

    /// The process is still running (no signal killed it).
    fn assert_up(&mut self, case: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{case}: xcp serve died: {status:?}");
        }
    }

    /// A new client connects and its request is answered.
    async fn assert_serves(&mut self, case: &str) {
        self.assert_up(case);
        let c = t("connect", Session::connect(&self.url, config(&[])))
            .await
            .unwrap_or_else(|e| panic!("{case}: a new client is not served: {e}"));
        let out = xcp::conn::Outgoing::ether(&Ether::text("still up"), CodecId::JSON).unwrap();
        let r = t("request", c.request(out)).await.unwrap();
        assert_eq!(r.ether().unwrap(), Ether::text("still up"), "{case}");
        let _ = c.close().await;
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(schemes: &[Scheme]) -> SessionConfig {
    io_env::config()
        .with_attach(AttachConfig::default().with_schemes(schemes.to_vec()))
        .with_request_timeout(STEP)
}

fn blob_ether() -> Ether {
    let mut e = Ether::new("blob", serde_json::Map::new());
    e.payload.insert("bytes".into(), BLOB.into());
    e.payload.insert("reply".into(), "crc32c".into());
    e
}

fn blob_attachment() -> Attachment {
    Attachment {
        id: "data".into(),
        media_type: "application/octet-stream".into(),
        ..Attachment::default()
    }
}

/// Fills `buf` with a pseudo-random MiB repeated (memcpy speed even in a debug build).
fn fill(buf: &mut [u8], seed: u64) {
    let block = buf.len().min(1 << 20);
    SmallRng::seed_from_u64(seed).fill_bytes(&mut buf[..block]);
    let mut done = block;
    while done < buf.len() {
        let n = done.min(buf.len() - done);
        buf.copy_within(..n, done);
        done += n;
    }
}

/// The CRC32C of what [`fill`] writes (computed only when a CRC has to be checked).
fn filled_crc(len: usize, seed: u64) -> u32 {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    crc32c(&v)
}

/// What the server answered to one blob.
#[derive(Debug)]
enum Answer {
    Crc(u32, String),
    Refused(String),
}

/// Sends a 256 MiB blob by `scheme` handle and truncates the segment to `to` bytes `after`
/// the request left (`None`: never).
async fn blob_shrunk(
    url: &str,
    scheme: Scheme,
    after: Option<Duration>,
    to: u64,
) -> (Answer, u64, rustix::io::Result<()>) {
    let c = t("connect", Session::connect(url, config(&[scheme])))
        .await
        .unwrap();
    let mut region = c.alloc(BLOB).await.unwrap();
    assert_eq!(region.segment().scheme(), scheme);
    let seed = 0x5eed ^ to;
    fill(&mut region, seed);
    let fd = region.segment().fd().try_clone().unwrap();
    let req = c.request_regions(
        blob_ether(),
        CodecId::PROTOBUF,
        vec![(blob_attachment(), region)],
    );
    let shrink = async {
        match after {
            Some(d) => {
                tokio::time::sleep(d).await;
                rustix::fs::ftruncate(&fd, to)
            }
            None => Ok(()),
        }
    };
    let (reply, shrunk) = t("blob", async { tokio::join!(req, shrink) }).await;
    let answer = match reply {
        Ok(m) => {
            let e = m.ether().unwrap();
            assert_eq!(e.kind, "blob.checksum", "{e:?}");
            let crc = e.payload["crc32c"].as_u64().expect("crc32c") as u32;
            Answer::Crc(crc, e.payload["path"].as_str().unwrap_or("").to_string())
        }
        Err(Error::Nack { code, detail, .. }) => {
            assert_eq!(code, ErrorCode::ERR_ATTACHMENT, "{detail}");
            Answer::Refused(detail)
        }
        Err(e) => panic!("{scheme:?} after {after:?}: {e}"),
    };
    let _ = c.close().await;
    (answer, seed, shrunk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_shrinking_its_shm_object_cannot_take_the_server_down() {
    for listen in ["tcp://127.0.0.1:0", "unix://DIR/s.sock"] {
        let mut srv = Serve::start(listen);
        let mut outcomes = Vec::new();
        for (after, to) in [
            (Some(Duration::ZERO), 0),
            (Some(Duration::from_millis(1)), 4096),
            (Some(Duration::from_millis(5)), 64 << 20),
            (Some(Duration::from_millis(20)), 128 << 20),
            (Some(Duration::from_millis(60)), 1),
            (Some(Duration::from_millis(250)), 0),
        ] {
            let case = format!("{listen} shm shrunk to {to} after {after:?}");
            let started = Instant::now();
            let (answer, seed, shrunk) = blob_shrunk(&srv.url, Scheme::Shm, after, to).await;
            shrunk.unwrap_or_else(|e| panic!("{case}: ftruncate: {e}"));
            match &answer {
                Answer::Crc(crc, path) => {
                    let want = filled_crc(BLOB, seed);
                    assert_eq!(*crc, want, "{case}: a CRC32C, so it must be the right one");
                    assert_eq!(path, "shm", "{case}");
                }
                // Shrunk while mapped, or before the server mapped it (smaller than the
                // region, or empty): each is a refusal naming why.
                Answer::Refused(detail) => assert!(
                    ["shrank while mapped", "outside the object", "empty object"]
                        .iter()
                        .any(|why| detail.contains(why)),
                    "{case}: {detail}"
                ),
            }
            eprintln!("{case}: {answer:?} in {:?}", started.elapsed());
            outcomes.push(answer);
            srv.assert_serves(&case).await;
        }
        // The point of the test: some shrink happened while the server was mapped in (else
        // the moments above missed every window on this machine).
        assert!(
            outcomes.iter().any(|a| matches!(a, Answer::Refused(_))),
            "{listen}: no shrink was ever seen: {outcomes:?}"
        );
        srv.assert_serves(listen).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_memfd_cannot_be_shrunk_and_is_answered() {
    let mut srv = Serve::start("unix://DIR/s.sock");
    for after in [
        Duration::ZERO,
        Duration::from_millis(5),
        Duration::from_millis(50),
    ] {
        let case = format!("sealed memfd shrunk after {after:?}");
        let (answer, seed, shrunk) = blob_shrunk(&srv.url, Scheme::Memfd, Some(after), 0).await;
        let want = filled_crc(BLOB, seed);
        assert_eq!(
            shrunk,
            Err(rustix::io::Errno::PERM),
            "{case}: the memfd is sealed"
        );
        match answer {
            Answer::Crc(crc, path) => {
                assert_eq!((crc, path.as_str()), (want, "memfd"), "{case}")
            }
            other => panic!("{case}: {other:?}"),
        }
        srv.assert_serves(&case).await;
    }
    // Another process sends a sealed memfd blob: `xcp send` checks the CRC32C itself.
    let out = Command::new(env!("CARGO_BIN_EXE_xcp"))
        .args(["send", &srv.url, "--random-bytes", "256M"])
        .output()
        .expect("xcp send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xcp send: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("memfd"), "{stdout}");
    srv.assert_serves("after xcp send").await;
}

// ----- an unsealed memfd, by hand (the library always seals) -------------------------------

fn frame_bytes(h: &FrameHeader, body: &[u8]) -> Vec<u8> {
    encode_frame(
        h,
        HeaderForm::Capnp,
        Flags::NONE,
        &Bytes::copy_from_slice(body),
    )
    .unwrap()
}

async fn next_message(
    rd: &mut xcp::transport::ReadHalf,
    dec: &mut FrameDecoder,
    re: &mut Reassembler,
    buf: &mut BytesMut,
) -> Message {
    loop {
        while let Some(f) = dec.decode(buf).expect("server frames decode") {
            if let Some(m) = re.push(f).expect("reassemble") {
                if m.header.msg_type != MsgType::ACK && m.header.msg_type != MsgType::PING {
                    return m;
                }
            }
        }
        let n = t("read", rd.read_buf(buf)).await.expect("read");
        assert!(n > 0, "the server closed the stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsealed_memfd_is_refused_before_it_is_mapped() {
    let mut srv = Serve::start("unix://DIR/s.sock");
    let (mut rd, mut wr) = t("connect", Stream::connect(&srv.url))
        .await
        .unwrap()
        .into_split();
    let (mut dec, mut re, mut buf) = (
        FrameDecoder::new(Limits::default()),
        Reassembler::new(1 << 20),
        BytesMut::new(),
    );
    let hello = Hello {
        codecs: vec![CodecId::JSON],
        max_frame_bytes: 1 << 20,
        version: "0.2".into(),
        shared_mem: true,
        attach: vec!["memfd".into()],
        host_id: xcp::attach::host_id().to_string(),
        ..Hello::default()
    };
    let h = FrameHeader {
        msg_type: MsgType::HELLO,
        body_codec: CodecId::JSON,
        msg_id: 1,
        ..FrameHeader::default()
    };
    let body = Control::Hello(hello).encode(CodecId::JSON).unwrap();
    t("hello", wr.write_all(&frame_bytes(&h, &body)))
        .await
        .unwrap();
    let caps = next_message(&mut rd, &mut dec, &mut re, &mut buf).await;
    assert_eq!(caps.header.msg_type, MsgType::CAPS);

    // An unsealed memfd of 16 MiB, shrunk right after sending: never mapped, so never read.
    let fd = rustix::fs::memfd_create("xcp-unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 16 << 20).unwrap();
    let mut e = blob_ether();
    e.attachments.push(Attachment {
        uri: format!("memfd://0#0,{}", 16 << 20),
        ..blob_attachment()
    });
    let body = xcp::codec::encode_ether(&e, CodecId::JSON).unwrap();
    let h = FrameHeader {
        msg_type: MsgType::DATA,
        body_codec: CodecId::JSON,
        msg_id: 2,
        ..FrameHeader::default()
    };
    let f = frame_bytes(&h, &body);
    let n = t(
        "write with fds",
        wr.write_with_fds(&[IoSlice::new(&f)], &[fd.as_fd()]),
    )
    .await
    .unwrap();
    t("rest", wr.write_all(&f[n..])).await.unwrap();
    rustix::fs::ftruncate(&fd, 0).unwrap();
    let m = next_message(&mut rd, &mut dec, &mut re, &mut buf).await;
    assert_eq!(m.header.msg_type, MsgType::NACK, "{m:?}");
    let Ok(Control::Nack(n)) = Control::decode(MsgType::NACK, m.header.body_codec, &m.body) else {
        panic!("bad NACK: {m:?}")
    };
    assert_eq!((n.error_code, n.msg_id), (ErrorCode::ERR_ATTACHMENT, 2));
    assert!(
        n.detail
            .as_deref()
            .unwrap_or("")
            .contains("not sealed against shrinking"),
        "{n:?}"
    );
    srv.assert_serves("unsealed memfd").await;
}
