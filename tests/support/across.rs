//! The conformance suite of the transports across hosts, run over `tls://` (tests/tls.rs) and
//! `quic://` (tests/quic.rs) on loopback: handshake, echo of every codec, chunked messages,
//! concurrent channels, attachments that go inline, CRYPT on top, graceful close, and the bad
//! inputs: no client certificate, a certificate from another CA, an expired one, the wrong
//! server name. After every refusal the server must still serve a good client.
//!
//! Certificates are made at test time with rcgen in a temporary directory. Every await is
//! bounded, so a bug fails a test instead of hanging it.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::task::JoinHandle;

use xcp::codec::dlpack::{DlDataType, DlpackDescriptor};
use xcp::codec::{arrow, latent, tensor, CodecId};
use xcp::conn::{Incoming, Outgoing};
use xcp::ether::Attachment;
use xcp::transport::tls::rustls;
use xcp::transport::{TlsConfig, TransportConfig};
use xcp::wire::Tag;
use xcp::{AttachConfig, Error, Ether, Server, Session, SessionConfig, TlsFailure};

pub const STEP: Duration = Duration::from_secs(20);

/// Awaits `f` or fails the test after [`STEP`].
pub async fn t<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// One certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test PKI in a temporary directory: a CA, a server and a client certificate signed by it,
/// an expired client certificate signed by it, and a client certificate from another CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server: Pair,
    pub client: Pair,
    pub expired_client: Pair,
    pub foreign_client: Pair,
    pub foreign_ca: PathBuf,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write PEM");
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

fn ca(dir: &Path, name: &str) -> (Ca, PathBuf) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA");
    let path = dir.join(format!("{name}.pem"));
    write(&path, &cert.pem());
    (Ca { params, key }, path)
}

fn leaf(
    dir: &Path,
    ca: &Ca,
    name: &str,
    sans: &[&str],
    purpose: ExtendedKeyUsagePurpose,
    expired: bool,
) -> Pair {
    let key = KeyPair::generate().expect("key");
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![purpose];
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(2);
    }
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = p.signed_by(&key, &issuer).expect("sign");
    let pair = Pair {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    write(&pair.cert, &cert.pem());
    write(&pair.key, &key.serialize_pem());
    pair
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (good, ca_path) = ca(d, "ca");
        let (other, foreign_ca) = ca(d, "other-ca");
        let server = leaf(
            d,
            &good,
            "server",
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let client = leaf(
            d,
            &good,
            "client",
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        let expired_client = leaf(
            d,
            &good,
            "expired-client",
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        );
        let foreign_client = leaf(
            d,
            &other,
            "foreign-client",
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        Pki {
            dir,
            ca: ca_path,
            server,
            client,
            expired_client,
            foreign_client,
            foreign_ca,
        }
    }

    pub fn server_tls(&self) -> TlsConfig {
        TlsConfig::from_files(&self.server.cert, &self.server.key, &self.ca).expect("server TLS")
    }

    pub fn client_tls(&self) -> TlsConfig {
        TlsConfig::from_files(&self.client.cert, &self.client.key, &self.ca).expect("client TLS")
    }

    /// A client presenting the expired certificate: built with rustls directly, since
    /// [`TlsConfig::from_files`] refuses to load an expired certificate at all.
    pub fn expired_client_tls(&self) -> TlsConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(&self.expired_client.cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(&self.expired_client.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        TlsConfig::from_rustls(Arc::new(client), None)
    }
}

pub fn config(tls: TlsConfig) -> SessionConfig {
    SessionConfig::default()
        .with_transport(TransportConfig::default().with_tls(Some(tls)))
        .with_connect_timeout(STEP)
}

/// An echo server running in the background; stops when dropped.
pub struct TestServer {
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tag(m: &Incoming, key: &str) -> Option<String> {
    m.header
        .tags
        .iter()
        .find(|t| t.key == key)
        .map(|t| t.val.clone())
}

/// Replies to every message with the same codec and body, a `frames` tag with the number of
/// frames it came in, and an `inline` tag with the attachment bytes' CRC when it has any.
async fn echo_session(s: Session) {
    while let Ok(m) = s.recv().await {
        let mut out = Outgoing::data(m.header.body_codec, m.body.clone());
        out.schema_key = m.header.schema_key;
        out.tags.push(Tag {
            key: "frames".into(),
            val: m.frames.to_string(),
        });
        if let Some(bytes) = m.attachment_bytes("blob") {
            let uri = m
                .ether
                .as_ref()
                .and_then(|e| e.attachments.iter().find(|a| a.id == "blob"))
                .map(|a| a.uri.clone())
                .unwrap_or_default();
            out.tags.push(Tag {
                key: "blob".into(),
                val: format!("{}:{}:{uri}", bytes.len(), xcp::wire::frame::crc32c(&bytes)),
            });
        }
        if s.reply(&m, out).await.is_err() {
            return;
        }
    }
}

pub async fn echo_server(url: &str, config: SessionConfig) -> TestServer {
    let server = t("bind", Server::bind(url, config)).await.expect("bind");
    let url = server.local_url();
    let task = tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(echo_session(s));
        }
    });
    TestServer { url, task }
}

fn text_request(text: &str) -> Outgoing {
    Outgoing::ether(&Ether::text(text), CodecId::JSON).expect("encode")
}

/// A good client connects and is answered.
pub async fn assert_serves(url: &str, pki: &Pki) {
    let c = t("connect", Session::connect(url, config(pki.client_tls())))
        .await
        .expect("a good client is served");
    let r = t("request", c.request(text_request("still alive")))
        .await
        .expect("reply");
    assert_eq!(r.ether().expect("ether"), Ether::text("still alive"));
    t("close", c.close()).await.expect("close");
}

/// Connecting with `tls` fails; returns the error's text.
/// The error a client with `tls` gets from `url`, and the [`TlsFailure`] it carries (a TLS
/// error at the handshake, or a connection TLS closed at the first request).
pub async fn refused(url: &str, tls: TlsConfig) -> (Option<TlsFailure>, String) {
    let e = match t("connect", Session::connect(url, config(tls))).await {
        Ok(s) => {
            // Over TLS 1.3 the client may finish its handshake before the server checked its
            // certificate: then the refusal comes with the first read.
            match t("request", s.request(text_request("let me in"))).await {
                Ok(_) => panic!("a refused client was served"),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    (e.tls_failure(), e.to_string())
}

fn bodies() -> Vec<(CodecId, Bytes)> {
    let values: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 3.0).collect();
    let f32_body = tensor::encode_f32(&[4, 8], &values, false).unwrap();
    let f16_body = tensor::encode_f16_from_f32(&[4, 8], &values, true).unwrap();
    let qnt8_body = tensor::encode_qnt8(&[4, 8], &values, true, false).unwrap();
    let latent_body = latent::encode(&[
        (CodecId::TENSOR_F32, f32_body.clone()),
        (CodecId::TENSOR_QNT8, qnt8_body.clone()),
    ])
    .unwrap();
    let ethers = vec![Ether::embedding(&[0.5, 1.0, 2.0]).with_trace_id("t-1")];
    let arrow_body = arrow::encode_ethers(&ethers).unwrap();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let dlpack_body = DlpackDescriptor::cpu(DlDataType::F32, vec![4, 8], Bytes::from(raw))
        .unwrap()
        .encode()
        .unwrap();
    vec![
        (
            CodecId::JSON,
            xcp::codec::encode_ether(&Ether::text("hello"), CodecId::JSON).unwrap(),
        ),
        (
            CodecId::PROTOBUF,
            xcp::codec::encode_ether(&ethers[0], CodecId::PROTOBUF).unwrap(),
        ),
        (CodecId::TENSOR_F32, f32_body),
        (CodecId::TENSOR_F16, f16_body),
        (CodecId::TENSOR_QNT8, qnt8_body),
        (CodecId::MIXED_LATENT, latent_body),
        (CodecId::ARROW_IPC, arrow_body),
        (CodecId::DLPACK, dlpack_body),
    ]
}

/// The cases, each given the listen URL of its scheme (`tls://127.0.0.1:0` or
/// `quic://127.0.0.1:0`).
pub mod cases {
    use super::*;

    pub async fn handshake(listen: &str) {
        let pki = Pki::new();
        let scheme = listen.split("://").next().unwrap().to_string();
        let server = t("bind", Server::bind(listen, config(pki.server_tls())))
            .await
            .expect("bind");
        let url = server.local_url();
        assert!(url.starts_with(&format!("{scheme}://127.0.0.1:")), "{url}");
        assert!(!url.ends_with(":0"), "{url}");
        let c = t("connect", Session::connect(&url, config(pki.client_tls())))
            .await
            .expect("connect");
        let s = t("accept", server.accept()).await.expect("accept");
        assert!(
            c.peer().starts_with(&format!("{scheme}://")),
            "{}",
            c.peer()
        );
        assert!(
            s.peer().starts_with(&format!("{scheme}://")),
            "{}",
            s.peer()
        );
        // Across hosts no handle scheme is offered, whatever the configuration asks.
        assert!(c.negotiated().attach.is_empty(), "{:?}", c.negotiated());
        assert!(!c.negotiated().shared_mem);
        let rtt = t("ping", c.ping()).await.expect("pong");
        assert!(rtt < STEP);
        t("close", c.close()).await.expect("close");
    }

    pub async fn echo_every_codec(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let c = t(
            "connect",
            Session::connect(&srv.url, config(pki.client_tls())),
        )
        .await
        .expect("connect");
        for (codec, body) in bodies() {
            let r = t(
                "request",
                c.request(Outgoing::data(codec, body.clone()).on_channel(3)),
            )
            .await
            .unwrap_or_else(|e| panic!("{codec}: {e}"));
            assert_eq!(r.header.body_codec, codec);
            assert_eq!(r.header.channel_id, 3);
            assert_eq!(r.body, body, "{codec}");
            xcp::codec::validate_body(codec, &r.body).expect("valid body");
        }
        t("close", c.close()).await.expect("close");
    }

    pub async fn chunked_message(listen: &str) {
        let pki = Pki::new();
        let mut cfg = config(pki.server_tls());
        cfg.conn.limits.max_frame_bytes = 4096;
        let srv = echo_server(listen, cfg).await;
        let c = t(
            "connect",
            Session::connect(&srv.url, config(pki.client_tls())),
        )
        .await
        .expect("connect");
        assert_eq!(c.negotiated().max_frame_bytes, 4096);
        let text: String = (0..(1 << 20))
            .map(|i| (b'a' + (i % 23) as u8) as char)
            .collect();
        let e = Ether::text(text);
        let out = Outgoing::ether(&e, CodecId::JSON).expect("encode");
        let len = out.body.len();
        let r = t("big request", c.request(out)).await.expect("reply");
        assert_eq!(r.body.len(), len);
        assert!(r.frames > 1, "reply came in {} frames", r.frames);
        let server_frames: usize = tag(&r, "frames").expect("frames tag").parse().unwrap();
        assert_eq!(server_frames, len.div_ceil(4096));
        assert_eq!(r.ether().expect("ether"), e);
    }

    /// Many channels at once, each with its own ordered conversation; replies come back on
    /// the request's channel.
    pub async fn concurrent_channels(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let c = t(
            "connect",
            Session::connect(&srv.url, config(pki.client_tls())),
        )
        .await
        .expect("connect");
        let tasks: Vec<_> = (0..32u32)
            .map(|ch| {
                let c = c.clone();
                tokio::spawn(async move {
                    for j in 0..20 {
                        let text = format!("channel {ch} message {j}");
                        let r = c
                            .request(text_request(&text).on_channel(ch))
                            .await
                            .expect("reply");
                        assert_eq!(r.header.channel_id, ch);
                        assert_eq!(r.ether().expect("ether"), Ether::text(text));
                    }
                })
            })
            .collect();
        for task in tasks {
            t("channel task", task).await.expect("task");
        }
        // Plain sends on several channels keep their order per channel.
        let server = t("bind", Server::bind(listen, config(pki.server_tls())))
            .await
            .expect("bind");
        let c2 = t(
            "connect",
            Session::connect(&server.local_url(), config(pki.client_tls())),
        )
        .await
        .expect("connect");
        let s = t("accept", server.accept()).await.expect("accept");
        for i in 0..50u32 {
            for ch in [1u32, 2, 7] {
                t(
                    "send",
                    c2.send(text_request(&format!("{ch}/{i}")).on_channel(ch)),
                )
                .await
                .expect("send");
            }
        }
        let mut next = std::collections::HashMap::new();
        for _ in 0..150 {
            let m = t("recv", s.recv()).await.expect("recv");
            let ch = m.header.channel_id;
            let i = next.entry(ch).or_insert(0u32);
            assert_eq!(m.ether().expect("ether"), Ether::text(format!("{ch}/{i}")));
            *i += 1;
        }
        t("close", c2.close()).await.expect("close");
    }

    /// A region sent "by handle" goes inline across hosts, and arrives intact.
    pub async fn attachments_go_inline(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let mut cfg = config(pki.client_tls());
        cfg.attach = AttachConfig::default().with_inline_threshold(0);
        let c = t("connect", Session::connect(&srv.url, cfg))
            .await
            .expect("connect");
        let mut region = t("alloc", c.alloc(256 << 10)).await.expect("alloc");
        for (i, b) in region.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let crc = xcp::wire::frame::crc32c(&region);
        let att = Attachment {
            id: "blob".into(),
            media_type: "application/octet-stream".into(),
            ..Default::default()
        };
        let r = t(
            "request",
            c.request_regions(
                Ether::text("with a blob"),
                CodecId::JSON,
                vec![(att, region)],
            ),
        )
        .await
        .expect("reply");
        let blob = tag(&r, "blob").expect("the server saw the attachment");
        assert_eq!(blob, format!("{}:{crc}:", 256 << 10), "inline, no URI");
        t("close", c.close()).await.expect("close");
    }

    /// CRYPT on top of TLS/QUIC, for end-to-end protection through relays.
    pub async fn crypt_on_top(listen: &str) {
        let pki = Pki::new();
        let sealer = xcp::wire::seal::Sealer::new(&[7u8; 32]);
        let mut scfg = config(pki.server_tls());
        scfg.conn.sealer = Some(sealer.clone());
        let srv = echo_server(listen, scfg).await;
        let mut ccfg = config(pki.client_tls());
        ccfg.conn.sealer = Some(sealer);
        let c = t("connect", Session::connect(&srv.url, ccfg))
            .await
            .expect("connect");
        let r = t("request", c.request(text_request("sealed")))
            .await
            .expect("reply");
        assert!(r.flags.contains(xcp::wire::Flags::CRYPT), "{:?}", r.flags);
        assert_eq!(r.ether().expect("ether"), Ether::text("sealed"));
        // A client without the key is refused, over the same secure transport.
        let plain = t(
            "connect",
            Session::connect(&srv.url, config(pki.client_tls())),
        )
        .await;
        let refused = match plain {
            Err(e) => e,
            Ok(s) => t("request", s.request(text_request("x")))
                .await
                .expect_err("no key, no answer"),
        };
        assert_eq!(refused.code(), xcp::ErrorCode::ERR_DECRYPT, "{refused}");
        t("close", c.close()).await.expect("close");
    }

    /// Everything sent before close arrives, then the receiver sees Closed.
    pub async fn graceful_close(listen: &str) {
        let pki = Pki::new();
        let server = t("bind", Server::bind(listen, config(pki.server_tls())))
            .await
            .expect("bind");
        let c = t(
            "connect",
            Session::connect(&server.local_url(), config(pki.client_tls())),
        )
        .await
        .expect("connect");
        let s = t("accept", server.accept()).await.expect("accept");
        for i in 0..100u32 {
            t(
                "send",
                c.send(text_request(&format!("m{i}")).on_channel(i % 4)),
            )
            .await
            .expect("send");
        }
        t("close", c.close()).await.expect("close");
        let mut next = [0u32; 4];
        for _ in 0..100 {
            let m = t("recv", s.recv()).await.expect("message before close");
            let ch = m.header.channel_id as usize;
            assert_eq!(
                m.ether().expect("ether"),
                Ether::text(format!("m{}", next[ch] * 4 + ch as u32))
            );
            next[ch] += 1;
        }
        let end = t("recv end", s.recv()).await;
        assert!(matches!(end, Err(Error::Closed { .. })), "{end:?}");
    }

    pub async fn no_client_certificate(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let (failure, e) = refused(&srv.url, TlsConfig::trust_only(&pki.ca).unwrap()).await;
        assert_eq!(failure, Some(TlsFailure::PeerRefusedOurCertificate), "{e}");
        assert!(e.contains("client certificate"), "{e}");
        assert_serves(&srv.url, &pki).await;
    }

    pub async fn certificate_from_another_ca(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let foreign =
            TlsConfig::from_files(&pki.foreign_client.cert, &pki.foreign_client.key, &pki.ca)
                .unwrap();
        let (failure, e) = refused(&srv.url, foreign).await;
        assert_eq!(failure, Some(TlsFailure::PeerRefusedOurCertificate), "{e}");
        // And the other way: a client that trusts another CA refuses our server.
        let wrong_ca =
            TlsConfig::from_files(&pki.client.cert, &pki.client.key, &pki.foreign_ca).unwrap();
        let (failure, e) = refused(&srv.url, wrong_ca).await;
        assert_eq!(failure, Some(TlsFailure::PeerCertificateUntrusted), "{e}");
        assert!(e.contains("--ca"), "names the option to fix: {e}");
        assert_serves(&srv.url, &pki).await;
    }

    pub async fn expired_client_certificate(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let (failure, e) = refused(&srv.url, pki.expired_client_tls()).await;
        assert_eq!(failure, Some(TlsFailure::PeerRefusedOurCertificate), "{e}");
        assert!(e.contains("expired"), "{e}");
        assert_serves(&srv.url, &pki).await;
    }

    pub async fn wrong_server_name(listen: &str) {
        let pki = Pki::new();
        let srv = echo_server(listen, config(pki.server_tls())).await;
        let (failure, e) = refused(
            &srv.url,
            pki.client_tls().with_server_name("elsewhere.example"),
        )
        .await;
        assert_eq!(failure, Some(TlsFailure::PeerCertificateWrongName), "{e}");
        assert_serves(&srv.url, &pki).await;
    }

    pub async fn no_certificates_configured(listen: &str) {
        let e = Server::bind(listen, SessionConfig::default())
            .await
            .expect_err("no certificates");
        assert_eq!(e.tls_failure(), Some(TlsFailure::Config), "{e:?}");
        assert!(e.to_string().contains("--cert"), "{e}");
        let pki = Pki::new();
        let e = Server::bind(listen, config(TlsConfig::trust_only(&pki.ca).unwrap()))
            .await
            .expect_err("a server needs its own certificate");
        assert_eq!(e.tls_failure(), Some(TlsFailure::Config), "{e:?}");
        assert!(e.to_string().contains("--key"), "{e}");
    }
}

/// Instantiates every case for one listen URL.
#[macro_export]
macro_rules! across_suite {
    ($listen:expr) => {
        across_suite!(
            $listen;
            handshake,
            echo_every_codec,
            chunked_message,
            concurrent_channels,
            attachments_go_inline,
            crypt_on_top,
            graceful_close,
            no_client_certificate,
            certificate_from_another_ca,
            expired_client_certificate,
            wrong_server_name,
            no_certificates_configured,
        );
    };
    ($listen:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                across::cases::$name($listen).await;
            }
        )*
    };
}
