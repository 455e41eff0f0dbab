//! How long a short request waits behind a long message on another channel of the same
//! session: the short one's round trip alone, then sent right behind a long TENSOR_F32 message
//! (48 MiB by default) on another channel, against an echo server on the same machine. Both
//! ends interleave their channels' frames, so the short one should wait a few frames, not the
//! whole long message.
//!
//! ```text
//! cargo run --release --example channel_fairness                    # unix and tcp, 48 MiB
//! cargo run --release --example channel_fairness -- --mib 16 --rounds 5
//! ```

use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use xcp::codec::tensor::{DType, TensorHeader};
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::{Ether, Server, Session, SessionConfig};

#[derive(Parser, Debug)]
#[command(about = "A short request behind a long message on another channel")]
struct Opts {
    /// Size of the long message in MiB.
    #[arg(long, default_value_t = 48)]
    mib: u32,
    /// Rounds per transport (the median is printed).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn echo_server(url: &str) -> String {
    let server = Server::bind(url, SessionConfig::default())
        .await
        .expect("bind");
    let url = server.local_url();
    tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    let out = Outgoing::data(m.header.body_codec, m.body.clone());
                    if s.reply(&m, out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

fn short() -> Outgoing {
    Outgoing::ether(&Ether::text("short"), CodecId::JSON)
        .expect("encode")
        .on_channel(2)
}

#[tokio::main]
async fn main() {
    let opts = Opts::parse();
    let n = opts.mib << 18;
    let mut body = BytesMut::new();
    body.extend_from_slice(
        &TensorHeader::new(DType::F32, &[n])
            .expect("header")
            .to_bytes(),
    );
    body.resize(body.len() + n as usize * 4, 1);
    let body = body.freeze();
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = format!("unix://{}", dir.path().join("fair.sock").display());
    for url in [unix.as_str(), "tcp://127.0.0.1:0"] {
        let url = echo_server(url).await;
        let s = Session::connect(&url, SessionConfig::default())
            .await
            .expect("connect");
        let (mut alone, mut behind, mut long) = (vec![], vec![], vec![]);
        for _ in 0..opts.rounds {
            let t = Instant::now();
            s.request(short()).await.expect("short");
            alone.push(t.elapsed());
            let t = Instant::now();
            let big = s.clone();
            let body = body.clone();
            let big = tokio::spawn(async move {
                big.request(Outgoing::data(CodecId::TENSOR_F32, body).on_channel(1))
                    .await
                    .expect("long");
                t.elapsed()
            });
            // Give the long one a head start into the session.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let t2 = Instant::now();
            s.request(short()).await.expect("short");
            behind.push(t2.elapsed());
            long.push(big.await.expect("task"));
        }
        let (a, b, l) = (median(alone), median(behind), median(long));
        println!(
            "{:<5} short alone {:>8.1} us | behind {} MiB on another channel {:>8.1} us ({:.0}x) \
             | the long round trip {:>7.1} ms",
            url.split(':').next().unwrap_or(""),
            a.as_secs_f64() * 1e6,
            opts.mib,
            b.as_secs_f64() * 1e6,
            b.as_secs_f64() / a.as_secs_f64(),
            l.as_secs_f64() * 1e3
        );
    }
}
