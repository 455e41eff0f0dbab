//! Built without the `uring` feature: io_uring is never used; `auto` means epoll and an
//! explicit `uring` is refused with a message that says how to get it.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{Error, Result};

const WHY: &str = "xcp was built without the `uring` feature";

/// Always the reason io_uring is not available in this build.
pub fn probe() -> std::result::Result<(), String> {
    Err(WHY.to_string())
}

/// `None` (epoll) for `epoll` and `auto`; an error for `uring`.
pub fn resolve(mode: super::IoMode) -> Result<Option<Ring>> {
    match mode {
        super::IoMode::Uring => Err(Error::Io(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring is not available: {WHY}; rebuild with `--features uring` or use --io epoll"),
        ))),
        _ => Ok(None),
    }
}

/// An io_uring instance (none can exist in this build).
#[derive(Clone, Debug)]
pub struct Ring(Infallible);

impl Ring {
    /// Always fails in this build.
    pub fn new() -> Result<Ring> {
        Err(Error::Io(io::Error::new(io::ErrorKind::Unsupported, WHY)))
    }
    /// Never called.
    pub fn in_flight(&self) -> usize {
        match self.0 {}
    }
    /// Never called.
    pub fn set_zero_copy(&self, _mode: ZeroCopy) {
        match self.0 {}
    }
    /// Never called.
    pub fn zero_copy_supported(&self) -> bool {
        match self.0 {}
    }
    /// Never called.
    pub fn zero_copy_sends(&self) -> u64 {
        match self.0 {}
    }
    /// Always fails in this build.
    pub fn with_provided_buffers(_max: usize) -> Result<Ring> {
        Ring::new()
    }
    /// Never called.
    pub fn received_bytes(&self) -> (u64, u64) {
        match self.0 {}
    }
    /// Never called.
    pub fn provided_buffers(&self) -> (usize, usize) {
        match self.0 {}
    }
}

/// As in the io_uring build: reads that need this much go straight into the read buffer.
pub const DIRECT_MIN: usize = 64 * 1024;
/// As in the io_uring build: the most provided buffers of a ring.
pub const DEFAULT_PROVIDED_BUFFERS: usize = 1024;

/// When sends go zero-copy (no effect in this build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Toward peers on other hosts.
    Remote,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// An io_uring stream (none can exist in this build).
#[derive(Debug)]
pub struct UringStream(Infallible);
/// Its read half.
#[derive(Debug)]
pub struct UringRead(Infallible);
/// Its write half.
#[derive(Debug)]
pub struct UringWrite(Infallible);

impl UringStream {
    pub(crate) fn new(_fd: OwnedFd, _unix: bool, _ring: Ring) -> io::Result<UringStream> {
        Err(io::Error::new(io::ErrorKind::Unsupported, WHY))
    }
    /// Never called.
    pub fn is_unix(&self) -> bool {
        match self.0 {}
    }
    /// Never called.
    pub fn into_split(self) -> (UringRead, UringWrite) {
        match self.0 {}
    }
    /// Never called.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self.0 {}
    }
}

impl UringRead {
    /// Never called.
    pub fn is_unix(&self) -> bool {
        match self.0 {}
    }
    /// Never called.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self.0 {}
    }
    /// Never called.
    pub fn busy(&self) -> bool {
        match self.0 {}
    }
    /// Never called.
    pub async fn read_owned(
        &mut self,
        _buf: &mut BytesMut,
        _fds: Option<&mut Vec<OwnedFd>>,
        _want: usize,
    ) -> io::Result<usize> {
        match self.0 {}
    }
    /// Never called.
    pub async fn read_copy_with_fds(
        &mut self,
        _scratch: &mut [u8],
        _fds: &mut Vec<OwnedFd>,
    ) -> io::Result<usize> {
        match self.0 {}
    }
}

impl UringWrite {
    /// Never called.
    pub fn is_unix(&self) -> bool {
        match self.0 {}
    }
    /// Never called.
    pub async fn send_owned(
        &mut self,
        _bufs: &[Bytes],
        _fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        match self.0 {}
    }
}

impl AsyncRead for UringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0 {}
    }
}
impl AsyncRead for UringRead {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0 {}
    }
}
macro_rules! never_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.0 {}
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.0 {}
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.0 {}
            }
        }
    };
}
never_write!(UringStream);
never_write!(UringWrite);
