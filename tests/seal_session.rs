//! COMP and CRYPT through real sessions: concurrent, chunked, sealed sends never reuse a
//! msgId (so never a nonce), and everything arrives opened and inflated.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::wire::seal::{CompressPolicy, Sealer};
use xcp::wire::Flags;
use xcp::{Server, Session, SessionConfig};

#[path = "support/io_env.rs"]
mod io_env;

fn keyed() -> SessionConfig {
    let mut c = io_env::config();
    c.conn.sealer = Some(Sealer::new(&[42; 32]));
    c.conn.compress = CompressPolicy::Auto;
    c.conn.limits.max_frame_bytes = 4096;
    c
}

#[tokio::test]
async fn concurrent_chunked_sealed_sends_never_reuse_a_nonce() {
    // The bodies are opaque bytes, not tensors: do not check them as TENSOR_F32.
    let mut sc = keyed();
    sc.conn.decode_ethers = false;
    let server = Server::bind("tcp://127.0.0.1:0", sc).await.unwrap();
    let url = server.local_url();
    let client = Session::connect(&url, keyed()).await.unwrap();
    assert!(client.negotiated().peer.crypt);
    let s = server.accept().await.unwrap();

    let tasks: Vec<_> = (0..8u32)
        .map(|t| {
            let c = client.clone();
            tokio::spawn(async move {
                for i in 0..50u32 {
                    // Sizes from tiny to several chunks; every eighth compressible.
                    let n = ((t * 50 + i) as usize * 997) % 20_000;
                    let body: Vec<u8> = if i % 8 == 0 {
                        vec![b'z'; n]
                    } else {
                        let mut body = vec![0u8; n];
                        SmallRng::seed_from_u64(u64::from(t) << 32 | u64::from(i))
                            .fill_bytes(&mut body);
                        body
                    };
                    let o =
                        Outgoing::data(CodecId::TENSOR_F32, Bytes::from(body)).on_channel(t % 3);
                    c.send(o).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut ids = HashSet::new();
    let mut chunked = 0;
    let mut compressed = 0;
    for _ in 0..400 {
        let m = tokio::time::timeout(Duration::from_secs(20), s.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(m.flags.contains(Flags::CRYPT));
        if m.flags.contains(Flags::COMP) {
            compressed += 1;
        }
        if m.frames > 1 {
            chunked += 1;
        }
        assert!(
            ids.insert((m.header.msg_id, m.header.channel_id)),
            "msgId {} reused: its nonce would repeat",
            m.header.msg_id
        );
    }
    assert!(chunked > 50, "{chunked}");
    assert!(compressed > 10, "{compressed}");
}
