//! Attachments by handle over real sockets: shm over TCP, memfd over Unix sockets, inline
//! fallback, refusals, leases and back-pressure.

use std::time::Duration;

use bytes::Bytes;
use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::{Attachment, ErrorCode, Ether, Server, Session, SessionConfig};

#[path = "support/io_env.rs"]
mod io_env;

const T: Duration = Duration::from_secs(20);

async fn t<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

fn config(schemes: &[Scheme]) -> SessionConfig {
    io_env::config().with_attach(
        AttachConfig::default()
            .with_schemes(schemes.to_vec())
            .with_alloc_timeout(Duration::from_millis(300)),
    )
}

/// A server that answers each message with the CRC32C of each attachment's bytes and how
/// they came (`handle` or `inline`), then drops its views (which ACKs the message).
async fn checksum_server(url: &str, cfg: SessionConfig) -> String {
    let server = Server::bind(url, cfg).await.expect("bind");
    let url = server.local_url();
    tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    let e = m.ether().expect("ether");
                    let mut sums = Vec::new();
                    for a in &e.attachments {
                        let bytes = m.attachment_bytes(&a.id).expect("attachment bytes");
                        let how = if m.view(&a.id).is_some() {
                            "handle"
                        } else {
                            "inline"
                        };
                        sums.push(serde_json::json!({"id": a.id, "how": how,
                            "len": bytes.len(), "crc": xcp::wire::frame::crc32c(&bytes)}));
                    }
                    let mut reply = Ether::text("sums");
                    reply
                        .payload
                        .insert("sums".into(), serde_json::Value::Array(sums));
                    drop(m.views.clone());
                    let out = Outgoing::ether(&reply, CodecId::JSON).expect("encode");
                    if s.reply(&m, out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    url
}

fn pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

async fn round_trip(client: &Session, len: usize) -> (String, u32, u32) {
    let mut region = t("alloc", client.alloc(len)).await.expect("alloc");
    pattern(&mut region, 7);
    let want = xcp::wire::frame::crc32c(&region);
    let att = Attachment {
        id: "blob".into(),
        media_type: "application/octet-stream".into(),
        ..Default::default()
    };
    let reply = t(
        "request_regions",
        client.request_regions(Ether::text("blob"), CodecId::PROTOBUF, vec![(att, region)]),
    )
    .await
    .expect("reply");
    let e = reply.ether().expect("reply ether");
    let s = &e.payload["sums"][0];
    (
        s["how"].as_str().unwrap().to_string(),
        s["crc"].as_u64().unwrap() as u32,
        want,
    )
}

async fn wait_returned(client: &Session) {
    for _ in 0..200 {
        if client.pool().usage().1 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("regions were not returned: {:?}", client.pool());
}

#[tokio::test]
async fn shm_over_tcp_64_mib() {
    let url = checksum_server("tcp://127.0.0.1:0", config(&[Scheme::Shm])).await;
    let c = t(
        "connect",
        Session::connect(&url, config(&[Scheme::Shm, Scheme::Memfd])),
    )
    .await
    .unwrap();
    assert_eq!(c.negotiated().attach, vec![Scheme::Shm]);
    let (how, got, want) = round_trip(&c, 64 << 20).await;
    assert_eq!((how.as_str(), got), ("handle", want));
    wait_returned(&c).await;
    // The segment is reused for the next one.
    let (how, got, want) = round_trip(&c, 64 << 20).await;
    assert_eq!((how.as_str(), got), ("handle", want));
    wait_returned(&c).await;
    assert_eq!(c.pool().usage().0, 64 << 20);
}

#[tokio::test]
async fn memfd_over_unix_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/s.sock", dir.path().display());
    let url = checksum_server(&url, config(&[Scheme::Memfd, Scheme::Shm])).await;
    let c = t("connect", Session::connect(&url, config(&[Scheme::Memfd])))
        .await
        .unwrap();
    assert_eq!(c.negotiated().attach, vec![Scheme::Memfd]);
    for _ in 0..3 {
        let (how, got, want) = round_trip(&c, 64 << 20).await;
        assert_eq!((how.as_str(), got), ("handle", want));
    }
    wait_returned(&c).await;
}

#[tokio::test]
async fn inline_when_not_negotiated_or_small() {
    let url = checksum_server("tcp://127.0.0.1:0", config(&[])).await;
    let c = t("connect", Session::connect(&url, config(&[Scheme::Shm])))
        .await
        .unwrap();
    assert!(!c.negotiated().shared_mem);
    let (how, got, want) = round_trip(&c, 3 << 20).await;
    assert_eq!((how.as_str(), got), ("inline", want));

    let url = checksum_server("tcp://127.0.0.1:0", config(&[Scheme::Shm])).await;
    let c = t("connect", Session::connect(&url, config(&[Scheme::Shm])))
        .await
        .unwrap();
    let (how, got, want) = round_trip(&c, 1000).await;
    assert_eq!(
        (how.as_str(), got),
        ("inline", want),
        "below the inline threshold"
    );
    wait_returned(&c).await;
}

#[tokio::test]
async fn refused_handle_falls_back_to_inline() {
    let url = checksum_server("tcp://127.0.0.1:0", config(&[Scheme::Shm])).await;
    let c = t("connect", Session::connect(&url, config(&[Scheme::Shm])))
        .await
        .unwrap();
    // As in a container with its own /dev/shm: the peer cannot open our object.
    let mut region = c.alloc(1 << 20).await.unwrap();
    pattern(&mut region, 3);
    let want = xcp::wire::frame::crc32c(&region);
    rustix::shm::unlink(format!("/{}", region.segment().name()).as_str()).unwrap();
    let reply = t(
        "request",
        c.request_regions(
            Ether::text("x"),
            CodecId::PROTOBUF,
            vec![(
                Attachment {
                    id: "a".into(),
                    ..Default::default()
                },
                region,
            )],
        ),
    )
    .await
    .expect("the same request succeeds inline");
    let e = reply.ether().unwrap();
    assert_eq!(e.payload["sums"][0]["how"], "inline");
    assert_eq!(e.payload["sums"][0]["crc"].as_u64().unwrap() as u32, want);
    // And from then on, inline directly.
    let (how, _, _) = round_trip(&c, 1 << 20).await;
    assert_eq!(how, "inline");
}

/// Sends an Ether whose attachment names `uri` as a request: the peer must refuse it with
/// NACK `ERR_ATTACHMENT` (SPEC §7: every refused URI, never `ERR_MALFORMED`).
async fn refused_as_attachment(c: &Session, uri: &str, on: &str) {
    let mut e = Ether::text("refused");
    e.attachments.push(Attachment {
        id: "h".into(),
        uri: uri.into(),
        size_bytes: 10,
        ..Default::default()
    });
    let r = t(
        "request",
        c.request(Outgoing::ether(&e, CodecId::JSON).unwrap()),
    )
    .await;
    match r {
        Err(xcp::Error::Nack { code, detail, .. }) => {
            assert_eq!(code, ErrorCode::ERR_ATTACHMENT, "{on} {uri}: {detail}")
        }
        other => panic!("{on} {uri}: {other:?}"),
    }
}

/// SPEC §7: every refused URI is `ERR_ATTACHMENT`, also on connections that negotiated no
/// handle scheme or not the one named (`shm://../../etc/passwd` on a memfd-only Unix socket
/// and on an inline-only TCP connection), and the connection lives.
#[tokio::test]
async fn refused_uris_are_err_attachment_whatever_was_negotiated() {
    let dir = tempfile::tempdir().unwrap();
    let unix = format!("unix://{}/refused.sock", dir.path().display());
    for (listen, schemes) in [
        (unix.as_str(), vec![Scheme::Memfd]),
        ("tcp://127.0.0.1:0", vec![]),
        ("tcp://127.0.0.1:0", vec![Scheme::Shm]),
    ] {
        let url = checksum_server(listen, config(&schemes)).await;
        let c = t("connect", Session::connect(&url, config(&schemes)))
            .await
            .unwrap();
        for uri in [
            "shm://../../etc/passwd#0,100",
            "shm://passwd#0,100",
            "memfd://0#0,10",
            "memfd://zero#0,10",
            "local://1#0,1",
            "cuda-ipc://nothing#0,1",
            "ftp://x#0,1",
            "no scheme at all",
        ] {
            refused_as_attachment(&c, uri, listen).await;
        }
        t("ping", c.ping()).await.expect("the connection lives");
    }
}

#[tokio::test]
async fn hostile_uris_are_refused_and_connection_lives() {
    let url = checksum_server("tcp://127.0.0.1:0", config(&[Scheme::Shm])).await;
    let c = t("connect", Session::connect(&url, config(&[Scheme::Shm])))
        .await
        .unwrap();
    let prefix = xcp::attach::process_prefix();
    let cases = [
        "shm://xcp-1-deadbeef-0#0,10".to_string(),
        format!("shm://{prefix}999999#0,10"),
        format!("shm://{prefix}..#0,10"),
        "memfd://0#0,10".to_string(),
        "cuda-ipc://GPU-00000000-0000-0000-0000-000000000000/".to_string()
            + &"0".repeat(128)
            + "#0,1",
        "shm://a/b#0,1".to_string(),
        "ftp://x#0,1".to_string(),
    ];
    for uri in &cases {
        refused_as_attachment(&c, uri, &url).await;
    }
    // Out of bounds on a real segment of ours.
    let region = c.alloc(100).await.unwrap();
    let mut e = Ether::text("oob");
    e.attachments.push(Attachment {
        id: "h".into(),
        uri: format!(
            "shm://{}#0,{}",
            region.segment().name(),
            region.segment().len() + 1
        ),
        ..Default::default()
    });
    let r = t(
        "request",
        c.request(Outgoing::ether(&e, CodecId::JSON).unwrap()),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(xcp::Error::Nack {
                code: ErrorCode::ERR_ATTACHMENT,
                ..
            })
        ),
        "{r:?}"
    );
    t("ping", c.ping()).await.expect("the connection lives");
}

#[tokio::test]
async fn a_peer_that_never_acks_cannot_make_us_allocate_without_bound() {
    // A receiver that keeps every view forever.
    let server = Server::bind("tcp://127.0.0.1:0", config(&[Scheme::Shm]))
        .await
        .unwrap();
    let url = server.local_url();
    tokio::spawn(async move {
        let s = server.accept().await.unwrap();
        let mut hoard = Vec::new();
        while let Ok(m) = s.recv().await {
            hoard.push(m);
        }
    });
    let mut cfg = config(&[Scheme::Shm]);
    cfg.attach.pool_cap_bytes = 4 << 20;
    let c = t("connect", Session::connect(&url, cfg)).await.unwrap();
    let mut sent = 0;
    let err = loop {
        match c.alloc(1 << 20).await {
            Ok(r) => {
                let att = Attachment {
                    id: "a".into(),
                    ..Default::default()
                };
                c.send_regions(Ether::text("x"), CodecId::JSON, vec![(att, r)])
                    .await
                    .unwrap();
                sent += 1;
                assert!(sent <= 4, "the pool's cap bounds what is loaned");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), ErrorCode::ERR_BUSY);
    assert_eq!(sent, 4);
    // Closing releases every lease.
    c.close().await.unwrap();
    assert_eq!(c.pool().usage().1, 0);
}

#[tokio::test]
async fn views_become_bytes_without_copy() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/v.sock", dir.path().display());
    let server = Server::bind(&url, config(&[Scheme::Memfd])).await.unwrap();
    let c = Session::connect(&url, config(&[Scheme::Memfd]))
        .await
        .unwrap();
    let s = server.accept().await.unwrap();
    let mut r = c.alloc(1 << 20).await.unwrap();
    r.fill(9);
    let id = c
        .send_regions(
            Ether::text("v"),
            CodecId::JSON,
            vec![(
                Attachment {
                    id: "a".into(),
                    ..Default::default()
                },
                r,
            )],
        )
        .await
        .unwrap();
    let m = t("recv", s.recv()).await.unwrap();
    assert_eq!(m.msg_id(), id);
    let view = m.view("a").unwrap().clone();
    let b: Bytes = view.clone().into_bytes();
    assert_eq!(b.as_ptr(), view.as_ptr(), "the same memory, no copy");
    assert!(b.iter().all(|&x| x == 9));
    drop((m, view));
    // Still loaned: a Bytes holds the lease.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.pool().usage().1, 1 << 20);
    drop(b);
    wait_returned(&c).await;
}

#[tokio::test]
async fn dlpack_tensor_by_handle() {
    use xcp::codec::dlpack::{DlData, DlDataType, DlpackDescriptor};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/d.sock", dir.path().display());
    let server = Server::bind(&url, config(&[Scheme::Memfd])).await.unwrap();
    let c = Session::connect(&url, config(&[Scheme::Memfd]))
        .await
        .unwrap();
    let s = server.accept().await.unwrap();
    let (rows, cols) = (512i64, 256i64);
    let mut r = c.alloc((rows * cols * 4) as usize).await.unwrap();
    for (i, x) in r.chunks_exact_mut(4).enumerate() {
        x.copy_from_slice(&(i as f32).to_le_bytes());
    }
    let desc = DlpackDescriptor {
        device_type: xcp::codec::dlpack::DEVICE_CPU,
        device_id: 0,
        dtype: DlDataType::F32,
        shape: vec![rows, cols],
        strides: vec![cols, 1],
        byte_offset: 0,
        data: DlData::Inline(Bytes::new()), // replaced by the region's handle
    };
    c.send_dlpack(desc, r).await.unwrap();
    let m = t("recv", s.recv()).await.unwrap();
    assert!(
        m.view(xcp::session::DLPACK_VIEW).is_some(),
        "came by handle"
    );
    let d = m.dlpack().unwrap();
    assert_eq!(d.shape, vec![rows, cols]);
    let DlData::Inline(bytes) = &d.data else {
        panic!("inline view expected")
    };
    assert_eq!(bytes.len(), (rows * cols * 4) as usize);
    let last = f32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap());
    assert_eq!(last, (rows * cols - 1) as f32);
    // Through the DLPack C ABI, still without a copy.
    let managed = xcp::attach::dlpack_ffi::export(&d).unwrap();
    // SAFETY: `managed` was just returned by `export` and is released exactly once here.
    let back = unsafe { xcp::attach::dlpack_ffi::import(managed) }.unwrap();
    assert_eq!(back.shape, d.shape);
    drop((m, d, back));
    wait_returned(&c).await;
}
