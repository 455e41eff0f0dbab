//! Built without the `quic` feature: `quic://` URLs parse (so the error can name them) but
//! every connect and bind is refused with a message that says how to get QUIC. No type here
//! can be made: each holds [`Infallible`].
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io;

use crate::error::{Error, Result};

use super::TlsConfig;

const WHY: &str = "xcp was built without the `quic` feature";

/// Always the refusal: this build has no QUIC.
pub(super) fn refuse(url: &str) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{url}: {WHY}; rebuild with `--features quic`"),
    ))
}

/// Never reached: the caller refuses first.
pub(super) async fn connect(addr: &str, _tls: &TlsConfig) -> Result<QuicStream> {
    Err(refuse(&format!("quic://{addr}")))
}

/// A QUIC connection seen as one stream (none can exist in this build).
#[derive(Debug)]
pub struct QuicStream(Infallible);

impl QuicStream {
    /// Unreachable in this build.
    pub fn peer_label(&self) -> String {
        match self.0 {}
    }

    /// Unreachable in this build.
    pub fn into_split(self) -> (QuicRead, QuicWrite) {
        match self.0 {}
    }
}

/// The read half of a [`QuicStream`] (none can exist in this build).
#[derive(Debug)]
pub struct QuicRead(Infallible);

/// The write half of a [`QuicStream`] (none can exist in this build).
#[derive(Debug)]
pub struct QuicWrite(Infallible);

/// A QUIC listener (none can exist in this build).
#[derive(Debug)]
pub struct QuicListener(Infallible);

impl QuicListener {
    /// Refused in this build.
    pub async fn bind(addr: &str, _tls: &TlsConfig) -> Result<QuicListener> {
        Err(refuse(&format!("quic://{addr}")))
    }

    /// Unreachable in this build.
    pub fn local_url(&self) -> String {
        match self.0 {}
    }

    /// Unreachable in this build.
    pub async fn accept(&self) -> Result<(QuicStream, String)> {
        match self.0 {}
    }
}

never_io!(QuicStream, QuicRead, QuicWrite);
