//! `quic://`: the transport conformance suite over QUIC with mutual authentication (see
//! tests/support/across.rs), and the QUIC-only bad input: a peer that opens more streams
//! (channels) than a connection allows is refused with the reason on both sides, and the
//! server keeps serving.

#[path = "support/across.rs"]
mod across;

use across::{assert_serves, config, echo_server, t, Pki};
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::transport::quic::MAX_PEER_STREAMS;
use xcp::{Ether, Session};

across_suite!("quic://127.0.0.1:0");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_streams_are_refused() {
    let pki = Pki::new();
    let srv = echo_server("quic://127.0.0.1:0", config(pki.server_tls())).await;
    let c = t(
        "connect",
        Session::connect(&srv.url, config(pki.client_tls())),
    )
    .await
    .expect("connect");
    let n = MAX_PEER_STREAMS as u32 + 50;
    let mut failure = None;
    for ch in 0..n {
        let msg = Outgoing::ether(&Ether::text("hi"), CodecId::JSON)
            .unwrap()
            .on_channel(ch);
        if let Err(e) = t("send", c.send(msg)).await {
            failure = Some(e);
            break;
        }
    }
    let e = match failure {
        Some(e) => e,
        // Every send was queued before the refusal came back: the replies to the streams the
        // server took arrive, then the end of the connection, with the reason.
        None => loop {
            if let Err(e) = t("recv until refused", c.recv()).await {
                break e;
            }
        },
    };
    assert!(e.to_string().contains("streams"), "{e}");
    assert_serves(&srv.url, &pki).await;
}
