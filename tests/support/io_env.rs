//! The I/O mode of a test binary's sessions, from the environment: `XCP_IO` (`epoll`, `uring`
//! or `auto`) when set, else epoll. The library reads no environment variable; CI runs the
//! handle, hostile, limit, fault and seal suites a second time with `XCP_IO=uring`, and this is
//! how their sessions learn it.

use xcp::transport::IoMode;
use xcp::SessionConfig;

/// `XCP_IO` parsed (a bad value fails the test with the reason), else epoll.
pub fn io() -> IoMode {
    match std::env::var("XCP_IO") {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e| panic!("XCP_IO: {e}")),
        _ => IoMode::Epoll,
    }
}

/// The default session settings on the I/O mode of [`io`].
pub fn config() -> SessionConfig {
    SessionConfig::default().with_io(io())
}
