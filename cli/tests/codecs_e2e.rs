//! Every body codec through a real `xcp serve` child process and back: JSON, PROTOBUF, the
//! three tensor codecs, MIXED_LATENT, ARROW_IPC and DLPACK. The echo server checks each body
//! with its codec on arrival and answers with the same bytes; the client (the library's
//! `Session::request`) asserts the reply is the request, byte for byte, and decodes it.
//!
//! Then the same with a static key on both sides and `--compress auto --max-frame-bytes 4096`
//! on the server: 1 MiB tensors travel chunked and sealed, compressed only when that pays; a
//! client without the key cannot connect (ERR_DECRYPT).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use xcp::codec::dlpack::{DlDataType, DlpackDescriptor};
use xcp::codec::tensor::{self, TensorView};
use xcp::codec::{arrow, latent, validate_body, CodecId};
use xcp::conn::Outgoing;
use xcp::wire::seal::{CompressPolicy, Sealer};
use xcp::wire::Flags;
use xcp::{ErrorCode, Ether, Session, SessionConfig};

/// How long the server may take to start, and any request to be answered.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running `xcp serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Server {
    /// Starts `xcp serve --listen tcp://127.0.0.1:0 EXTRA...` and reads the URL from its
    /// first stdout line, `listening on URL`.
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xcp"))
            .args(["serve", "--listen", "tcp://127.0.0.1:0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("XCP_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xcp serve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let sink = stderr.clone();
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep reading so the server never blocks on stdout.
            for _ in lines {}
        });
        let mut server = Server {
            child,
            url: String::new(),
            stderr,
        };
        let first = match rx.recv_timeout(DEADLINE) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "xcp serve printed no first line ({other:?}); stderr:\n{}",
                server.stderr()
            ),
        };
        server.url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        server
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config() -> SessionConfig {
    SessionConfig::default()
        .with_connect_timeout(DEADLINE)
        .with_request_timeout(DEADLINE)
}

/// Deterministic pseudo-random floats in [-1, 1), on a grid of 2^-23 (seeded `SmallRng`).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

/// One request body per codec, with what decoding the reply must give.
fn bodies() -> Vec<(CodecId, Bytes)> {
    let values = noise(4 * 8, 7);
    let f32_body = tensor::encode_f32(&[4, 8], &values, false).unwrap();
    let f16_body = tensor::encode_f16_from_f32(&[4, 8], &values, true).unwrap();
    let qnt8_body = tensor::encode_qnt8(&[4, 8], &values, true, false).unwrap();
    let latent_body = latent::encode(&[
        (CodecId::TENSOR_F32, f32_body.clone()),
        (CodecId::TENSOR_QNT8, qnt8_body.clone()),
        (CodecId::TENSOR_F16, f16_body.clone()),
    ])
    .unwrap();
    let ethers = vec![
        Ether::embedding(&[0.5, 1.0, 2.0]).with_trace_id("t-1"),
        Ether::embedding(&[-1.0, 0.0, 0.25]).with_trace_id("t-1"),
    ];
    let arrow_body = arrow::encode_ethers(&ethers).unwrap();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let dlpack_body = DlpackDescriptor::cpu(DlDataType::F32, vec![4, 8], Bytes::from(raw))
        .unwrap()
        .encode()
        .unwrap();
    let json = xcp::codec::encode_ether(&Ether::text("hello, codecs"), CodecId::JSON).unwrap();
    let protobuf = xcp::codec::encode_ether(&ethers[0].clone(), CodecId::PROTOBUF).unwrap();
    vec![
        (CodecId::JSON, json),
        (CodecId::PROTOBUF, protobuf),
        (CodecId::TENSOR_F32, f32_body),
        (CodecId::TENSOR_F16, f16_body),
        (CodecId::TENSOR_QNT8, qnt8_body),
        (CodecId::MIXED_LATENT, latent_body),
        (CodecId::ARROW_IPC, arrow_body),
        (CodecId::DLPACK, dlpack_body),
    ]
}

/// Decodes `body` with its codec and checks it says what `sent` says.
fn check_decodes(codec: CodecId, body: &Bytes, sent: &Bytes) {
    validate_body(codec, body).unwrap_or_else(|e| panic!("{codec}: {e}"));
    match codec {
        CodecId::JSON | CodecId::PROTOBUF => assert_eq!(
            xcp::codec::decode_ether(codec, body).unwrap(),
            xcp::codec::decode_ether(codec, sent).unwrap()
        ),
        CodecId::TENSOR_F32 | CodecId::TENSOR_F16 | CodecId::TENSOR_QNT8 => {
            let got = TensorView::parse(body.clone(), Some(codec)).unwrap();
            let want = TensorView::parse(sent.clone(), Some(codec)).unwrap();
            assert_eq!(got.shape(), want.shape());
            // Bit patterns: the incompressible tensor below holds NaNs too.
            let bits = |v: &TensorView| -> Vec<u32> {
                v.to_f32_vec().into_iter().map(f32::to_bits).collect()
            };
            assert_eq!(bits(&got), bits(&want));
        }
        CodecId::MIXED_LATENT => {
            let got = latent::decode(body.clone()).unwrap();
            assert_eq!(got.len(), 3);
            assert_eq!(got, latent::decode(sent.clone()).unwrap());
        }
        CodecId::ARROW_IPC => {
            let got = arrow::decode_ethers(body.clone(), Some("embedding")).unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got, arrow::decode_ethers(sent.clone(), None).unwrap());
        }
        CodecId::DLPACK => assert_eq!(
            DlpackDescriptor::decode(body.clone()).unwrap(),
            DlpackDescriptor::decode(sent.clone()).unwrap()
        ),
        other => panic!("no check for {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_round_trips_through_xcp_serve() {
    let server = Server::start(&[]);
    let session = Session::connect(&server.url, config())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", server.stderr()));
    let offered = &session.negotiated().codecs;
    for (codec, body) in bodies() {
        assert!(offered.contains(&codec), "{codec} negotiated: {offered:?}");
        let reply = session
            .request(Outgoing::data(codec, body.clone()))
            .await
            .unwrap_or_else(|e| panic!("{codec}: {e}\n{}", server.stderr()));
        assert_eq!(reply.header.body_codec, codec);
        assert_eq!(
            reply.body, body,
            "{codec}: the reply is the request, byte for byte"
        );
        assert_eq!(
            reply.flags,
            Flags::NONE,
            "{codec}: no COMP/CRYPT without flags"
        );
        check_decodes(codec, &reply.body, &body);
    }
    session.close().await.unwrap();
}

/// A key file with mode 0600 in `dir`.
fn key_file(dir: &Path, key: &[u8; 32]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("xcp.key");
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_compressed_chunked_through_xcp_serve() {
    let key = [0x5Au8; 32];
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), &key);
    let server = Server::start(&[
        "--key-file",
        &path,
        "--compress",
        "auto",
        "--max-frame-bytes",
        "4096",
    ]);

    let mut cfg = config();
    cfg.conn.sealer = Some(Sealer::new(&key));
    cfg.conn.compress = CompressPolicy::Auto;
    let session = Session::connect(&server.url, cfg)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", server.stderr()));
    assert_eq!(session.negotiated().max_frame_bytes, 4096);
    assert!(
        session.negotiated().peer.crypt,
        "the server advertises crypt"
    );

    // 1 MiB of random bit patterns (zstd cannot shrink them: auto sends them as they are;
    // real-world floats often do shrink a little, their sign and exponent bytes repeat) and
    // 1 MiB of a repeating pattern (auto compresses it).
    let mut rng = SmallRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    let random: Vec<f32> = (0..512 * 512)
        .map(|_| f32::from_bits(rng.next_u32()))
        .collect();
    let pattern: Vec<f32> = (0..512 * 512).map(|i| (i % 16) as f32 * 0.5).collect();
    for (name, values, compressed) in [("random", random, false), ("pattern", pattern, true)] {
        let body = tensor::encode_f32(&[512, 512], &values, false).unwrap();
        assert_eq!(body.len(), 32 + (1 << 20));
        let reply = session
            .request(Outgoing::data(CodecId::TENSOR_F32, body.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", server.stderr()));
        assert!(reply.flags.contains(Flags::CRYPT), "{name}: sealed");
        assert_eq!(
            reply.flags.contains(Flags::COMP),
            compressed,
            "{name}: compressed only when it pays ({:?})",
            reply.flags
        );
        if !compressed {
            assert!(
                reply.frames > 256,
                "{name}: 1 MiB in 4 KiB chunks, got {} frames",
                reply.frames
            );
        }
        assert!(
            reply.body == body,
            "{name}: the reply is the request, byte for byte"
        );
        check_decodes(CodecId::TENSOR_F32, &reply.body, &body);
    }
    // The small codecs too, sealed.
    for (codec, body) in bodies() {
        let reply = session
            .request(Outgoing::data(codec, body.clone()))
            .await
            .unwrap_or_else(|e| panic!("{codec}: {e}\n{}", server.stderr()));
        assert!(reply.flags.contains(Flags::CRYPT), "{codec}: sealed");
        assert_eq!(reply.body, body, "{codec}");
    }
    session.close().await.unwrap();

    // A client without the key cannot connect.
    let err = Session::connect(&server.url, config())
        .await
        .expect_err("a client without the key must not connect");
    assert_eq!(err.code(), ErrorCode::ERR_DECRYPT, "{err}");
    // Nor one with another key... it connects (both advertise crypt), but nothing it sends
    // opens on the server: the request is NACKed ERR_DECRYPT.
    let mut wrong = config();
    wrong.conn.sealer = Some(Sealer::new(&[0xA5u8; 32]));
    let session = Session::connect(&server.url, wrong).await.unwrap();
    let (codec, body) = bodies().remove(0);
    let err = session
        .request(Outgoing::data(codec, body))
        .await
        .expect_err("a message sealed with another key must be refused");
    assert_eq!(err.code(), ErrorCode::ERR_DECRYPT, "{err}");
}
