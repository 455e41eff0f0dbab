//! The conformance suite of the transports (`tests/support/session_suite.rs`) over epoll:
//! every case for TCP and for Unix sockets.

const IO: xcp::transport::IoMode = xcp::transport::IoMode::Epoll;

include!("support/session_suite.rs");

/// No certificates: this binary runs the suite over TCP and Unix sockets only.
fn suite_tls() -> Option<xcp::transport::TlsConfig> {
    None
}

for_each_case!(suite);
