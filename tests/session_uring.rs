//! The conformance suite of the transports (`tests/support/session_suite.rs`) over io_uring:
//! every case for TCP and for Unix sockets, servers and clients on io_uring (the raw-socket
//! clients of the adversarial cases stay on epoll, so those are interop cases too).
//!
//! Where the kernel refuses io_uring the binary prints why and runs nothing but that check.

const IO: xcp::transport::IoMode = xcp::transport::IoMode::Uring;

include!("support/session_suite.rs");

/// No certificates: this binary runs the suite over TCP and Unix sockets only.
fn suite_tls() -> Option<xcp::transport::TlsConfig> {
    None
}

for_each_case!(suite);
