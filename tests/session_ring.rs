//! The conformance suite of the transports (`tests/support/session_suite.rs`) over the
//! same-host ring (SPEC §9): every case on `ring:///path`, so every session of it moves its
//! frames through shared memory after CAPS. The raw-socket clients of the adversarial cases
//! do not ask for the ring: their bytes reach the same server on its socket, which shows a
//! ring-offering server still speaks plain Unix sockets. tests/ring.rs has the ring's own
//! hostile peers.

const IO: xcp::transport::IoMode = xcp::transport::IoMode::Epoll;

include!("support/session_suite.rs");

/// No certificates: this binary runs the suite over the ring only.
fn suite_tls() -> Option<xcp::transport::TlsConfig> {
    None
}

macro_rules! ring_suite {
    ($($name:ident),* $(,)?) => {
        mod ring {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    cases::$name(Addr::ring()).await
                }
            )*
        }
    };
}

for_each_case!(ring_suite);
