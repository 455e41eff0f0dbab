//! `tls://`: the transport conformance suite over TLS 1.3 with mutual authentication (see
//! tests/support/across.rs), the TLS-only bad inputs (a plaintext client on a TLS port, a TLS
//! client on a plaintext port), the certificate files' errors, and `xcp cert dev` end to end
//! with `xcp serve` and `xcp ping`.

#[path = "../../tests/support/across.rs"]
mod across;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use across::{assert_serves, config, echo_server, refused, t, Pki};
use xcp::transport::TlsConfig;
use xcp::{Session, SessionConfig, TlsFailure};

across_suite!("tls://127.0.0.1:0");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_on_a_tls_port() {
    let pki = Pki::new();
    let srv = echo_server("tls://127.0.0.1:0", config(pki.server_tls())).await;
    let plain = srv.url.replacen("tls://", "tcp://", 1);
    let e = t(
        "connect",
        Session::connect(&plain, SessionConfig::default()),
    )
    .await
    .expect_err("refused");
    assert!(e.to_string().contains("this port speaks TLS"), "{e}");
    assert_serves(&srv.url, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_on_a_plaintext_port() {
    let pki = Pki::new();
    let srv = echo_server("tcp://127.0.0.1:0", SessionConfig::default()).await;
    let tls_url = srv.url.replacen("tcp://", "tls://", 1);
    let (failure, e) = refused(&tls_url, pki.client_tls()).await;
    assert_eq!(failure, Some(TlsFailure::PeerNotXcpTls), "{e}");
    assert!(e.contains("tcp://"), "names the plaintext URL to use: {e}");
    // The plaintext server still serves plaintext clients.
    let c = t(
        "connect",
        Session::connect(&srv.url, SessionConfig::default()),
    )
    .await
    .expect("plain client");
    t("ping", c.ping()).await.expect("pong");
}

#[test]
fn certificate_file_errors_name_the_file() {
    let pki = Pki::new();
    let missing = pki.dir.path().join("nope.pem");
    let e = TlsConfig::from_files(&missing, &pki.client.key, &pki.ca).unwrap_err();
    assert_eq!(e.tls_failure(), Some(TlsFailure::File), "{e:?}");
    assert!(e.to_string().contains("nope.pem"), "{e}");
    assert!(e.to_string().contains("xcp cert dev"), "{e}");

    // Not PEM.
    let junk = pki.dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let e = TlsConfig::from_files(&junk, &pki.client.key, &pki.ca).unwrap_err();
    assert_eq!(e.tls_failure(), Some(TlsFailure::File), "{e:?}");
    assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
    let e = TlsConfig::from_files(&pki.client.cert, &junk, &pki.ca).unwrap_err();
    assert_eq!(e.tls_failure(), Some(TlsFailure::File), "{e:?}");
    assert!(e.to_string().contains("holds no PEM private key"), "{e}");

    // A key that belongs to another certificate.
    let e = TlsConfig::from_files(&pki.client.cert, &pki.server.key, &pki.ca).unwrap_err();
    assert_eq!(e.tls_failure(), Some(TlsFailure::KeyMismatch), "{e:?}");

    // An expired certificate is refused when loaded, with its dates.
    let e = TlsConfig::from_files(&pki.expired_client.cert, &pki.expired_client.key, &pki.ca)
        .unwrap_err();
    assert_eq!(
        e.tls_failure(),
        Some(TlsFailure::OwnCertificateDated),
        "{e:?}"
    );
    let s = e.to_string();
    assert!(
        s.contains("expired on") && s.contains("expired-client.pem"),
        "{s}"
    );

    // No certificates at all for a tls:// URL.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(Session::connect(
            "tls://127.0.0.1:9",
            SessionConfig::default(),
        ))
        .unwrap_err();
    assert_eq!(e.tls_failure(), Some(TlsFailure::Config), "{e:?}");
    assert!(e.to_string().contains("--cert, --key and --ca"), "{e}");
}

/// `xcp cert dev DIR`, then `xcp serve --listen tls://...` and `xcp ping tls://...` with the
/// files it wrote; a ping without a client certificate is refused with the reason.
#[test]
fn cert_dev_then_serve_and_ping() {
    let xcp = env!("CARGO_BIN_EXE_xcp");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new(xcp)
        .args(["cert", "dev"])
        .arg(d)
        .output()
        .expect("run xcp cert dev");
    assert!(out.status.success(), "{out:?}");
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        assert!(d.join(f).exists(), "{f}");
    }
    let p = |f: &str| d.join(f).display().to_string();
    for scheme in ["tls", "quic"] {
        let mut server = Command::new(xcp)
            .args(["serve", "--listen", &format!("{scheme}://127.0.0.1:0")])
            .args(["--cert", &p("server.pem"), "--key", &p("server.key")])
            .args(["--ca", &p("ca.pem")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xcp serve");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("first line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .expect(&line)
            .to_string();
        assert!(url.starts_with(&format!("{scheme}://")), "{url}");
        let ping = Command::new(xcp)
            .args(["ping", &url, "--count", "2", "--interval", "0"])
            .args(["--cert", &p("client.pem"), "--key", &p("client.key")])
            .args(["--ca", &p("ca.pem")])
            .output()
            .expect("run xcp ping");
        let refused = Command::new(xcp)
            .args(["ping", &url, "--count", "1", "--ca", &p("ca.pem")])
            .output()
            .expect("run xcp ping");
        let _ = server.kill();
        let _ = server.wait();
        assert!(ping.status.success(), "{ping:?}");
        assert!(
            String::from_utf8_lossy(&ping.stdout).contains("2 received"),
            "{ping:?}"
        );
        assert_eq!(refused.status.code(), Some(2), "{refused:?}");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("client certificate"), "{err}");
    }
}

/// Clients that connect and never speak TLS, or send garbage, hold no one up: a good client
/// is served meanwhile, and the silent ones are dropped after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_garbage_clients_do_not_block_the_server() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let srv = echo_server("tls://127.0.0.1:0", config(pki.server_tls())).await;
    let addr = srv.url.trim_start_matches("tls://").to_string();
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            t("tcp connect", tokio::net::TcpStream::connect(&addr))
                .await
                .expect("tcp connect"),
        );
    }
    let mut garbage = t("tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .expect("tcp connect");
    t(
        "write",
        garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await
    .expect("write");
    assert_serves(&srv.url, &pki).await;
    drop(silent);
}

/// A TLS write can return once rustls has taken the bytes while the socket is still full; the
/// rest must go out even when nothing more is queued. A raw TLS server that reads slowly (a
/// sans-IO responder fed 64 KiB at a time, a 64 KiB receive buffer) must get every byte of
/// each of 40 messages of about 4 MiB, sent one at a time. Before the driver flushed TLS, the
/// last records of one message in ten or so stayed in rustls until the next write, and the
/// reader waited forever (this test failed in 5 runs of 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_end_of_every_message() {
    use bytes::{Bytes, BytesMut};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use xcp::codec::tensor::{DType, TensorHeader};
    use xcp::codec::CodecId;
    use xcp::conn::{Config, Connection, Event, Outgoing, Role};

    let pki = Pki::new();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(pki.server_tls().rustls_server().expect("server"));
    // A small receive window, so the client's socket fills and its writes stop part-way.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    sock.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = sock.listen(8).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("TLS accept");
        let mut conn = Connection::new(Role::Responder, Config::default(), Instant::now());
        let mut rbuf = BytesMut::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = tls.read(&mut chunk).await.expect("read");
            if n == 0 {
                return;
            }
            rbuf.extend_from_slice(&chunk[..n]);
            conn.handle_input(&mut rbuf, Instant::now());
            let mut wire = BytesMut::new();
            while let Some(f) = conn.poll_transmit() {
                f.write_to(&mut wire);
            }
            tls.write_all(&wire).await.expect("write");
            while let Some(ev) = conn.poll_event() {
                if let Event::Message(m) = ev {
                    let _ = got_tx.send(m.body.len());
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    let c = t(
        "connect",
        Session::connect(&format!("tls://127.0.0.1:{port}"), config(pki.client_tls())),
    )
    .await
    .expect("connect");
    for i in 0..40u32 {
        // About 4 MiB, more than the socket buffers hold; each ends somewhere else.
        let n: u32 = (1 << 20) + i * 3331;
        let mut body = BytesMut::new();
        body.extend_from_slice(
            &TensorHeader::new(DType::F32, &[n])
                .expect("header")
                .to_bytes(),
        );
        body.resize(body.len() + n as usize * 4, 0x5a);
        let len = body.len();
        t(
            "send",
            c.send(Outgoing::data(CodecId::TENSOR_F32, Bytes::from(body))),
        )
        .await
        .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("message {i} of {len} bytes never arrived whole"));
        assert_eq!(got, Some(len));
    }
}
