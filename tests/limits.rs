//! Limits as configuration: each one exceeded gives `ERR_BUSY` with `retry_after_ms` (or a
//! clean close), and the server keeps serving within its limits.

use std::time::Duration;

use bytes::Bytes;
use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::{Attachment, Error, ErrorCode, Ether, Server, Session, SessionConfig};

#[path = "support/io_env.rs"]
mod io_env;

const T: Duration = Duration::from_secs(20);

async fn t<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

/// An echo server that keeps every message it receives (and so every view) until told.
async fn hoarding_echo(cfg: SessionConfig) -> String {
    let server = Server::bind("tcp://127.0.0.1:0", cfg).await.unwrap();
    let url = server.local_url();
    tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                let mut kept = Vec::new();
                while let Ok(m) = s.recv().await {
                    let out = Outgoing::data(m.header.body_codec, m.body.clone());
                    let _ = s.reply(&m, out).await;
                    kept.push(m);
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn max_connections() {
    let cfg = io_env::config().with_max_connections(2);
    let url = hoarding_echo(cfg).await;
    let a = t("a", Session::connect(&url, io_env::config()))
        .await
        .unwrap();
    let b = t("b", Session::connect(&url, io_env::config()))
        .await
        .unwrap();
    let c = t("c", Session::connect(&url, io_env::config())).await;
    match c {
        Err(Error::Nack {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, ErrorCode::ERR_BUSY);
            assert!(retry_after_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    // A slot frees when a connection ends.
    t("close", a.close()).await.unwrap();
    let mut ok = None;
    for _ in 0..100 {
        if let Ok(s) = Session::connect(&url, io_env::config()).await {
            ok = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = ok.expect("served again once a slot freed");
    t("ping", c.ping()).await.unwrap();
    t("ping", b.ping()).await.unwrap();
}

#[tokio::test]
async fn server_wide_reassembly_budget() {
    let mut cfg = io_env::config().with_server_reassembly_bytes(64 << 10);
    cfg.conn.limits.max_frame_bytes = 16 << 10;
    let url = hoarding_echo(cfg).await;
    let c = t("connect", Session::connect(&url, io_env::config()))
        .await
        .unwrap();
    // Far below the per-connection max_message_bytes, but above the server's budget.
    let big = Outgoing::data(CodecId::TENSOR_F32, Bytes::from(vec![0u8; 200 << 10]));
    match t("request", c.request(big)).await {
        Err(Error::Nack {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, ErrorCode::ERR_BUSY);
            assert!(retry_after_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    // Within the budget, the same connection works.
    let ok = xcp::codec::tensor::encode_f32(&[1000], &[1.5; 1000], false).unwrap();
    let r = t(
        "request",
        c.request(Outgoing::data(CodecId::TENSOR_F32, ok.clone())),
    )
    .await
    .unwrap();
    assert_eq!(r.body, ok);
}

#[tokio::test]
async fn max_leases_per_peer() {
    let mut cfg = io_env::config().with_attach(
        AttachConfig::default()
            .with_schemes(vec![Scheme::Shm])
            .with_max_leases_per_peer(2),
    );
    cfg.request_timeout = Duration::from_secs(10);
    let url = hoarding_echo(cfg.clone()).await;
    let c = t("connect", Session::connect(&url, cfg)).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let r = c.alloc(1 << 20).await.unwrap();
        let att = Attachment {
            id: "a".into(),
            ..Default::default()
        };
        match t(
            "request",
            c.request_regions(Ether::text("x"), CodecId::JSON, vec![(att, r)]),
        )
        .await
        {
            Ok(_) => codes.push(ErrorCode::OK),
            Err(Error::Nack {
                code,
                retry_after_ms,
                ..
            }) => {
                assert!(retry_after_ms > 0);
                codes.push(code)
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        codes,
        vec![ErrorCode::OK, ErrorCode::OK, ErrorCode::ERR_BUSY]
    );
}
