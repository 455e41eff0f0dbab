//! Built without the `tls` feature: `tls://` URLs parse (so the error can name them) but
//! every connect and bind is refused with a message that says how to get TLS. No type here
//! can be made: each holds [`Infallible`].
#![forbid(unsafe_code)]

use std::convert::Infallible;

use crate::error::{Error, Result, TlsFailure};

const WHY: &str = "xcp was built without the `tls` feature";

/// Certificates for `tls://` and `quic://` (none can exist in this build).
#[derive(Clone, Debug)]
pub struct TlsConfig(Infallible);

/// Always the refusal: this build has no TLS.
pub(crate) fn require(_tls: Option<&TlsConfig>, url: &str) -> Result<TlsConfig> {
    Err(Error::tls(
        TlsFailure::Config,
        format!("{url}: {WHY}; rebuild with `--features tls` (`quic` for quic://)"),
    ))
}

/// Checks the `host:port` of a `tls://` URL (the same rules as `tcp://`).
pub(super) fn parse_authority(url: &str, rest: &str) -> Result<String> {
    super::tcp::parse_authority(url, rest)
}

/// Never reached: [`require`] refuses first.
pub(super) async fn connect(_addr: &str, tls: &TlsConfig) -> Result<TlsStream> {
    match tls.0 {}
}

/// A TLS stream (none can exist in this build).
#[derive(Debug)]
pub struct TlsStream(Infallible);

impl TlsStream {
    /// Unreachable in this build.
    pub fn peer_label(&self) -> String {
        match self.0 {}
    }

    /// Unreachable in this build.
    pub fn into_split(self) -> (TlsRead, TlsWrite) {
        match self.0 {}
    }
}

/// The read half of a [`TlsStream`] (none can exist in this build).
#[derive(Debug)]
pub struct TlsRead(Infallible);

/// The write half of a [`TlsStream`] (none can exist in this build).
#[derive(Debug)]
pub struct TlsWrite(Infallible);

/// A TLS listener (none can exist in this build).
#[derive(Debug)]
pub struct TlsListener(Infallible);

impl TlsListener {
    /// Never reached: [`require`] refuses first.
    pub async fn bind(_addr: &str, tls: &TlsConfig) -> Result<TlsListener> {
        match tls.0 {}
    }

    /// Unreachable in this build.
    pub fn local_url(&self) -> String {
        match self.0 {}
    }

    /// Unreachable in this build.
    pub async fn accept(&self) -> Result<(TlsStream, String)> {
        match self.0 {}
    }
}

never_io!(TlsStream, TlsRead, TlsWrite);
