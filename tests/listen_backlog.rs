//! A listener's accept queue holds a burst of connects (`transport::LISTEN_BACKLOG`), TCP and
//! Unix: with tokio's default of 128, a burst of hundreds overflows it and the kernel drops
//! SYNs (a 1 s resend each) or handshakes' last ACKs (connections queued seconds late, which is
//! what once made `hostile::two_thousand_connections_without_hello` flaky).
//!
//! Nothing accepts while the burst connects; every connect must complete before the first SYN
//! resend (1 s) could have happened, so none was dropped; then every one is accepted.

use std::time::Duration;

use tokio::task::JoinSet;
use xcp::transport::{Listener, Stream, LISTEN_BACKLOG};

// The burst below assumes a queue of at least 1024.
const _: () = assert!(LISTEN_BACKLOG >= 1024);

/// How many connects the burst makes: well past 128, within the queue and the kernel's cap.
fn burst() -> Option<usize> {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let n = somaxconn.min(1024) * 3 / 4;
    (n > 200).then_some(n)
}

async fn burst_is_queued(url: &str, listener: Listener, n: usize) {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let url = url.to_string();
        set.spawn(async move {
            tokio::time::timeout(Duration::from_millis(800), Stream::connect(&url)).await
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut late = 0;
    while let Some(r) = set.join_next().await {
        match r.expect("join") {
            Ok(s) => held.push(s.expect("connect")),
            Err(_) => late += 1,
        }
    }
    assert_eq!(
        late, 0,
        "{url}: {late} of {n} connects waited for a SYN resend"
    );
    for i in 0..n {
        tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("{url}: only {i} of {n} queued"))
            .expect("accept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_fits_the_accept_queue() {
    let Some(n) = burst() else {
        eprintln!("skipped: net.core.somaxconn is too small here for a meaningful burst");
        return;
    };
    let tcp = Listener::bind("tcp://127.0.0.1:0").await.expect("bind tcp");
    let url = tcp.local_url();
    burst_is_queued(&url, tcp, n).await;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/backlog.sock", dir.path().display());
    let unix = Listener::bind(&url).await.expect("bind unix");
    burst_is_queued(&url, unix, n).await;
}
