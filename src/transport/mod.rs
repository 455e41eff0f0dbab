//! Byte-stream transports: TCP and Unix-domain sockets, addressed by URL.
//!
//! | URL | transport |
//! |---|---|
//! | `tcp://host:port` | TCP, `TCP_NODELAY` on, buffers left to the kernel's autotuning |
//! | `unix:///absolute/path` | a Unix stream socket with 4 MiB send and receive buffers |
//! | `tls://host:port` | TCP inside TLS 1.3 with mutual authentication ([`tls`]) |
//! | `quic://host:port` | QUIC with mutual authentication, one stream per XCP channel ([`quic`]) |
//!
//! `tls://` and `quic://` need certificates: [`TransportConfig::tls`] (see [`TlsConfig`]).
//!
//! [`Stream`] is either kind behind one type that implements `AsyncRead` and `AsyncWrite`;
//! [`Stream::into_split`] gives owned halves so one task can read and write at once.
//! [`Listener`] binds a URL and accepts streams; [`Listener::local_url`] reports the address
//! really bound (`tcp://127.0.0.1:0` becomes the port the kernel chose).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> xcp::Result<()> {
//! use xcp::transport::{Listener, Stream};
//! let listener = Listener::bind("tcp://127.0.0.1:0").await?;
//! let client = Stream::connect(&listener.local_url()).await?;
//! let (server_side, peer) = listener.accept().await?;
//! # drop((client, server_side, peer)); Ok(()) }
//! ```
#![deny(unsafe_code)]

/// `AsyncRead` and `AsyncWrite` for the uninhabited stream types of a build without `tls` or
/// `quic` (`tls_off.rs`, `quic_off.rs`).
#[cfg(not(all(feature = "tls", feature = "quic")))]
macro_rules! never_io {
    ($($ty:ty),*) => {$(
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.0 {}
            }
        }
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.0 {}
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.0 {}
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.0 {}
            }
        }
    )*};
}

pub mod peer;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(not(feature = "quic"))]
#[path = "quic_off.rs"]
pub mod quic;
pub mod ring;
mod tcp;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(not(feature = "tls"))]
#[path = "tls_off.rs"]
pub mod tls;
mod unix;
#[cfg(feature = "uring")]
pub mod uring;
#[cfg(not(feature = "uring"))]
#[path = "uring_off.rs"]
pub mod uring;

use std::fmt;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp as tokio_tcp, unix as tokio_unix, TcpStream, UnixStream};

use crate::error::{Error, Result};

pub use tls::TlsConfig;
pub use unix::SocketFile;

/// The socket buffer size set on Unix-domain sockets (`SO_SNDBUF` and `SO_RCVBUF`).
pub const UNIX_SOCKET_BUFFER: usize = 4 << 20;

/// The accept queue a listener asks for (TCP and Unix; the kernel caps it at
/// `net.core.somaxconn`). tokio and std ask for 128: a burst of more connects than that
/// overflows the queue, and the kernel then drops SYNs (each costs the client a 1 s resend)
/// or, worse, a handshake's last ACK, so a connection its client thinks open enters the queue
/// only seconds later. 1024 absorbs a burst of a thousand clients.
pub const LISTEN_BACKLOG: u32 = 1024;

const SUPPORTED: &str = "supported are tcp://host:port, unix:///absolute/path, \
     ring:///absolute/path (a Unix socket with the same-host ring), tls://host:port and \
     quic://host:port";

/// A parsed transport address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `tcp://host:port`: `host:port` as given (a name, an IPv4 address or a bracketed IPv6
    /// address).
    Tcp(String),
    /// `unix:///absolute/path`.
    Unix(PathBuf),
    /// `ring:///absolute/path`: a Unix socket that asks for the same-host shared-memory ring
    /// (SPEC §9). A server binds it as `unix://`, and agrees to the ring when asked.
    Ring(PathBuf),
    /// `tls://host:port`: TCP inside TLS 1.3, mutual authentication.
    Tls(String),
    /// `quic://host:port`: QUIC (UDP), mutual authentication.
    Quic(String),
}

impl Url {
    /// Parses `tcp://host:port` or `unix:///absolute/path`; anything else is
    /// [`Error::Invalid`] naming what is wrong and the supported forms.
    pub fn parse(url: &str) -> Result<Url> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::invalid(format!(
                "URL {url:?} has no scheme; {SUPPORTED}"
            )));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "tcp" => tcp::parse_authority(url, rest).map(Url::Tcp),
            "unix" => unix::parse_path(url, rest).map(Url::Unix),
            "ring" => unix::parse_path(url, rest).map(Url::Ring),
            "tls" => tls::parse_authority(url, rest).map(Url::Tls),
            "quic" => tls::parse_authority(url, rest).map(Url::Quic),
            other => Err(Error::invalid(format!(
                "URL {url:?}: unsupported scheme {other:?}; {SUPPORTED}"
            ))),
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Url::Tcp(addr) => write!(f, "tcp://{addr}"),
            Url::Unix(path) => write!(f, "unix://{}", path.display()),
            Url::Ring(path) => write!(f, "ring://{}", path.display()),
            Url::Tls(addr) => write!(f, "tls://{addr}"),
            Url::Quic(addr) => write!(f, "quic://{addr}"),
        }
    }
}

impl std::str::FromStr for Url {
    type Err = Error;
    fn from_str(s: &str) -> Result<Url> {
        Url::parse(s)
    }
}

/// Which kernel interface moves a stream's bytes.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// Readiness-based I/O through tokio's reactor (epoll): the default.
    #[default]
    Epoll,
    /// Completion-based I/O through io_uring; fails with a clear error where the kernel
    /// refuses it.
    Uring,
    /// io_uring where a probe at start-up shows it works, else epoll with one log line.
    Auto,
}

impl IoMode {
    /// The name used on the command line: `epoll`, `uring` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Epoll => "epoll",
            IoMode::Uring => "uring",
            IoMode::Auto => "auto",
        }
    }
}

impl std::str::FromStr for IoMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<IoMode> {
        match s.to_ascii_lowercase().as_str() {
            "epoll" => Ok(IoMode::Epoll),
            "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
            "auto" => Ok(IoMode::Auto),
            other => Err(Error::invalid(format!(
                "unknown I/O mode {other:?}: use epoll, uring or auto"
            ))),
        }
    }
}

/// The kernel interface that moves an open stream's bytes: what [`IoMode`] settled on.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Io {
    /// Readiness through tokio's reactor (epoll); TLS and QUIC streams too.
    Epoll,
    /// Completions through io_uring.
    Uring,
    /// The same-host shared-memory ring (SPEC §9): no system call per message.
    Ring,
}

impl Io {
    /// `"epoll"`, `"io_uring"` or `"ring"`.
    pub fn name(self) -> &'static str {
        match self {
            Io::Epoll => "epoll",
            Io::Uring => "io_uring",
            Io::Ring => "ring",
        }
    }
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How streams are opened: the I/O interface (and, across hosts, the TLS settings).
///
/// `Default` is epoll with no ring and no certificates; nothing here is read from the
/// environment or from process-wide state (the CLI maps `XCP_IO` and `--io` onto [`io`]).
///
/// [`io`]: TransportConfig::io
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct TransportConfig {
    /// epoll, io_uring, or io_uring where available.
    pub io: IoMode,
    /// With io_uring: the ring a client's connections share (a new one per connection when
    /// unset; a server always shares one among the connections it accepts).
    pub ring: Option<uring::Ring>,
    /// Certificates for `tls://` and `quic://` (required there, unused elsewhere).
    pub tls: Option<TlsConfig>,
}

impl TransportConfig {
    /// This configuration with I/O mode `io`.
    pub fn with_io(mut self, io: IoMode) -> Self {
        self.io = io;
        self
    }

    /// This configuration with `ring` shared by the connections it opens (io_uring only).
    pub fn with_ring(mut self, ring: Option<uring::Ring>) -> Self {
        self.ring = ring;
        self
    }

    /// This configuration with certificates for `tls://` and `quic://`.
    pub fn with_tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// The io_uring ring its `io` mode calls for: none for epoll (or where `auto` falls
    /// back), the configured shared ring, else a new one (see [`uring::resolve`]).
    pub fn ring_for_io(&self) -> Result<Option<uring::Ring>> {
        match (&self.ring, self.io) {
            (_, IoMode::Epoll) => Ok(None),
            (Some(r), _) => Ok(Some(r.clone())),
            (None, mode) => uring::resolve(mode),
        }
    }
}

/// A connected byte stream: TCP or a Unix-domain socket, through epoll or io_uring.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain stream socket.
    Unix(UnixStream),
    /// A TCP or Unix stream driven by io_uring.
    Uring(uring::UringStream, String),
    /// TLS over TCP.
    Tls(Box<tls::TlsStream>),
    /// QUIC: XCP channels on QUIC streams, seen as one byte stream of whole frames.
    Quic(Box<quic::QuicStream>),
}

impl Stream {
    /// Connects to `url` and applies the socket options of its transport.
    pub async fn connect(url: &str) -> Result<Stream> {
        match Url::parse(url)? {
            Url::Tcp(addr) => tcp::connect(&addr).await.map(Stream::Tcp),
            Url::Unix(path) | Url::Ring(path) => unix::connect(&path).await.map(Stream::Unix),
            Url::Tls(_) | Url::Quic(_) => Err(tls::require(None, url).unwrap_err()),
        }
    }

    /// Connects to `url` as `config` says (see [`TransportConfig`]). `tls://` and `quic://`
    /// need `config.tls`; their handshakes are part of the connect. TCP and Unix streams go
    /// through io_uring when the `io` mode asks for it (on the configured shared ring, or on
    /// a ring of their own).
    pub async fn connect_with(url: &str, config: &TransportConfig) -> Result<Stream> {
        match Url::parse(url)? {
            Url::Tls(addr) => {
                let c = tls::require(config.tls.as_ref(), url)?;
                tls::connect(&addr, &c)
                    .await
                    .map(|s| Stream::Tls(Box::new(s)))
            }
            Url::Quic(addr) => {
                let c = tls::require(config.tls.as_ref(), url)?;
                quic::connect(&addr, &c)
                    .await
                    .map(|s| Stream::Quic(Box::new(s)))
            }
            // The ring's socket carries only wake-ups and descriptors: epoll is all it needs.
            Url::Ring(_) => Stream::connect(url).await,
            _ => {
                let ring = config.ring_for_io()?;
                Stream::connect(url).await?.with_ring(ring)
            }
        }
    }

    /// Whether the bytes leave the host (TLS, QUIC): no attachment handle is offered there.
    pub fn is_remote(&self) -> bool {
        matches!(self, Stream::Tls(_) | Stream::Quic(_))
    }

    /// Hands a TCP or Unix stream to `ring` (io_uring); `None` keeps it on epoll. TLS and
    /// QUIC streams stay as they are.
    pub fn with_ring(self, ring: Option<uring::Ring>) -> Result<Stream> {
        let Some(ring) = ring else { return Ok(self) };
        let label = self.peer_label();
        let (fd, unix): (std::os::fd::OwnedFd, bool) = match self {
            Stream::Tcp(s) => (s.into_std()?.into(), false),
            Stream::Unix(s) => (s.into_std()?.into(), true),
            s @ (Stream::Uring(..) | Stream::Tls(_) | Stream::Quic(_)) => return Ok(s),
        };
        let u = uring::UringStream::new(fd, unix, ring)?;
        Ok(Stream::Uring(u, label))
    }

    /// Whether this is a Unix-domain socket (descriptors can be passed).
    pub fn is_unix(&self) -> bool {
        match self {
            Stream::Tcp(_) | Stream::Tls(_) | Stream::Quic(_) => false,
            Stream::Unix(_) => true,
            Stream::Uring(u, _) => u.is_unix(),
        }
    }

    /// The user id of the peer process where it can be known (local sockets; see
    /// [`peer::peer_uid`]).
    pub fn peer_uid(&self) -> Option<u32> {
        match self {
            Stream::Tcp(s) => peer::peer_uid(s, false),
            Stream::Unix(s) => peer::peer_uid(s, true),
            Stream::Uring(u, _) => peer::peer_uid(u.fd(), u.is_unix()),
            Stream::Tls(_) | Stream::Quic(_) => None,
        }
    }

    /// Whether io_uring moves this stream's bytes.
    pub fn is_uring(&self) -> bool {
        matches!(self, Stream::Uring(..))
    }

    /// A description of the peer for logs: `tcp://ip:port` or `unix://path`.
    pub fn peer_label(&self) -> String {
        match self {
            Stream::Tcp(s) => match s.peer_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_string(),
            },
            Stream::Unix(s) => unix::peer_label(s),
            Stream::Uring(_, label) => label.clone(),
            Stream::Tls(s) => s.peer_label(),
            Stream::Quic(s) => s.peer_label(),
        }
    }

    /// Splits into owned read and write halves (no lock between them).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Uring(s, _) => {
                let (r, w) = s.into_split();
                (ReadHalf::Uring(r), WriteHalf::Uring(w))
            }
            Stream::Tls(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
            Stream::Quic(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Quic(r), WriteHalf::Quic(w))
            }
        }
    }
}

macro_rules! delegate_read {
    ($ty:ident $(, $extra:ident)*) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Unix(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Uring(s, ..) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Quic(s) => Pin::new(s).poll_read(cx, buf),
                    $( $ty::$extra(s) => Pin::new(s).poll_read(cx, buf), )*
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ident $(, $extra:ident)*) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Unix(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Uring(s, ..) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Quic(s) => Pin::new(s).poll_write(cx, buf),
                    $( $ty::$extra(s) => Pin::new(s).poll_write(cx, buf), )*
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Uring(s, ..) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Quic(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $( $ty::$extra(s) => Pin::new(s).poll_write_vectored(cx, bufs), )*
                }
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_flush(cx),
                    $ty::Unix(s) => Pin::new(s).poll_flush(cx),
                    $ty::Uring(s, ..) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                    $ty::Quic(s) => Pin::new(s).poll_flush(cx),
                    $( $ty::$extra(s) => Pin::new(s).poll_flush(cx), )*
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Unix(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Uring(s, ..) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Quic(s) => Pin::new(s).poll_shutdown(cx),
                    $( $ty::$extra(s) => Pin::new(s).poll_shutdown(cx), )*
                }
            }
        }
    };
}

/// The owned read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    /// TCP.
    Tcp(tokio_tcp::OwnedReadHalf),
    /// Unix-domain socket.
    Unix(tokio_unix::OwnedReadHalf),
    /// io_uring.
    Uring(uring::UringRead),
    /// TLS.
    Tls(tls::TlsRead),
    /// QUIC.
    Quic(quic::QuicRead),
    /// The same-host ring (SPEC §9), after CAPS turned it on.
    Ring(ring::RingRead),
}

/// The owned write half of a [`Stream`]. Shutting it down (`AsyncWriteExt::shutdown`) sends
/// end-of-stream to the peer; dropping it does too.
#[derive(Debug)]
pub enum WriteHalf {
    /// TCP.
    Tcp(tokio_tcp::OwnedWriteHalf),
    /// Unix-domain socket.
    Unix(tokio_unix::OwnedWriteHalf),
    /// io_uring.
    Uring(uring::UringWrite),
    /// TLS.
    Tls(tls::TlsWrite),
    /// QUIC.
    Quic(quic::QuicWrite),
    /// The same-host ring (SPEC §9), after CAPS turned it on.
    Ring(ring::RingWrite),
}

delegate_read!(Stream);
delegate_write!(Stream);
delegate_read!(ReadHalf, Ring);
delegate_write!(WriteHalf, Ring);

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix-domain listener and the socket file it owns.
    Unix(tokio::net::UnixListener, std::sync::Arc<SocketFile>),
    /// A TLS listener (handshakes run in tasks of their own).
    Tls(tls::TlsListener),
    /// A QUIC endpoint.
    Quic(quic::QuicListener),
}

impl Listener {
    /// Binds `url`. For TCP, port 0 picks a free port (see [`Listener::local_url`]). For a Unix
    /// socket, a stale socket file (one nobody listens on) is removed first; a path where
    /// someone listens, or that is not a socket, is refused.
    pub async fn bind(url: &str) -> Result<Listener> {
        match Url::parse(url)? {
            Url::Tcp(addr) => tcp::bind(&addr).await.map(Listener::Tcp),
            Url::Unix(path) | Url::Ring(path) => {
                let (l, file) = unix::bind(&path)?;
                Ok(Listener::Unix(l, file))
            }
            Url::Tls(_) | Url::Quic(_) => Err(tls::require(None, url).unwrap_err()),
        }
    }

    /// Binds `url` as `config` says (see [`TransportConfig`]). `tls://` and `quic://` need
    /// `config.tls` with a certificate and key.
    pub async fn bind_with(url: &str, config: &TransportConfig) -> Result<Listener> {
        match Url::parse(url)? {
            Url::Tls(addr) => {
                let c = tls::require(config.tls.as_ref(), url)?;
                tls::TlsListener::bind(&addr, &c).await.map(Listener::Tls)
            }
            Url::Quic(addr) => {
                let c = tls::require(config.tls.as_ref(), url)?;
                quic::QuicListener::bind(&addr, &c)
                    .await
                    .map(Listener::Quic)
            }
            _ => Listener::bind(url).await,
        }
    }

    /// The URL really bound, such as `tcp://127.0.0.1:41234` or `unix:///tmp/x.sock`.
    pub fn local_url(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_string(),
            },
            Listener::Unix(_, file) => format!("unix://{}", file.path().display()),
            Listener::Tls(l) => l.local_url(),
            Listener::Quic(l) => l.local_url(),
        }
    }

    /// The socket file of a Unix listener (removed when the last owner of it drops).
    pub fn socket_file(&self) -> Option<std::sync::Arc<SocketFile>> {
        match self {
            Listener::Tcp(_) | Listener::Tls(_) | Listener::Quic(_) => None,
            Listener::Unix(_, f) => Some(f.clone()),
        }
    }

    /// Accepts the next connection, with the transport's socket options applied. Returns the
    /// stream and a description of the peer for logs.
    pub async fn accept(&self) -> Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                tcp::configure(&s)?;
                Ok((Stream::Tcp(s), format!("tcp://{addr}")))
            }
            Listener::Unix(l, file) => {
                let (s, _) = l.accept().await?;
                unix::configure(&s);
                let label = format!("unix://{} (accepted)", file.path().display());
                Ok((Stream::Unix(s), label))
            }
            Listener::Tls(l) => {
                let (s, label) = l.accept().await?;
                Ok((Stream::Tls(Box::new(s)), label))
            }
            Listener::Quic(l) => {
                let (s, label) = l.accept().await?;
                Ok((Stream::Quic(Box::new(s)), label))
            }
        }
    }
}

/// The most descriptors accepted with one `recvmsg`.
pub const MAX_FDS_PER_READ: usize = 16;

impl ReadHalf {
    /// The user id of the peer process where it can be known (see [`peer::peer_uid`]).
    pub fn peer_uid(&self) -> Option<u32> {
        match self {
            ReadHalf::Tcp(r) => peer::peer_uid(AsRef::<TcpStream>::as_ref(r), false),
            ReadHalf::Unix(r) => peer::peer_uid(AsRef::<UnixStream>::as_ref(r), true),
            ReadHalf::Uring(r) => peer::peer_uid(r.fd(), r.is_unix()),
            ReadHalf::Tls(_) | ReadHalf::Quic(_) | ReadHalf::Ring(_) => None,
        }
    }

    /// Whether file descriptors can arrive on this stream (`SCM_RIGHTS`, Unix sockets only).
    pub fn passes_fds(&self) -> bool {
        match self {
            ReadHalf::Tcp(_) | ReadHalf::Tls(_) | ReadHalf::Quic(_) => false,
            ReadHalf::Unix(_) | ReadHalf::Ring(_) => true,
            ReadHalf::Uring(r) => r.is_unix(),
        }
    }

    /// Receives into `scratch` with `recvmsg`, appending any descriptors that came with the
    /// bytes to `fds` (Unix sockets; on TCP it is a plain read). Use it instead of a plain read
    /// whenever the peer may pass descriptors: a plain read on a Unix socket discards them.
    /// Cancel-safe.
    pub async fn read_with_fds(
        &mut self,
        scratch: &mut [u8],
        fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let s: &UnixStream = match &mut *self {
            ReadHalf::Tcp(r) => return r.read(scratch).await,
            ReadHalf::Tls(r) => return r.read(scratch).await,
            ReadHalf::Quic(r) => return r.read(scratch).await,
            ReadHalf::Ring(r) => {
                let mut buf = bytes::BytesMut::new();
                let mut groups = Vec::new();
                let n = r.read_ring(&mut buf, scratch.len(), &mut groups).await?;
                r.take_fds(&mut groups)?;
                scratch[..n].copy_from_slice(&buf);
                fds.extend(groups.into_iter().flat_map(|(_, g)| g));
                return Ok(n);
            }
            ReadHalf::Unix(r) => (*r).as_ref(),
            ReadHalf::Uring(r) => return r.read_copy_with_fds(scratch, fds).await,
        };
        loop {
            s.readable().await?;
            match s.try_io(tokio::io::Interest::READABLE, || {
                unix::recv_with_fds(s, scratch, fds)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl WriteHalf {
    /// Whether file descriptors can be sent on this stream.
    pub fn passes_fds(&self) -> bool {
        match self {
            WriteHalf::Tcp(_) | WriteHalf::Tls(_) | WriteHalf::Quic(_) => false,
            WriteHalf::Unix(_) | WriteHalf::Ring(_) => true,
            WriteHalf::Uring(w) => w.is_unix(),
        }
    }

    /// Writes `slices` with `fds` attached to their first byte (`SCM_RIGHTS`). Returns the
    /// bytes written; when it is more than zero the descriptors went with them. Cancel-safe.
    pub async fn write_with_fds(
        &mut self,
        slices: &[IoSlice<'_>],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<usize> {
        if let WriteHalf::Uring(w) = self {
            let owned: Vec<bytes::Bytes> = slices
                .iter()
                .map(|s| bytes::Bytes::copy_from_slice(s))
                .collect();
            return w.send_owned(&owned, fds).await;
        }
        if let WriteHalf::Ring(w) = self {
            return w.write_ring(slices, fds).await;
        }
        let WriteHalf::Unix(w) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "file descriptors can only be passed on Unix sockets",
            ));
        };
        let s: &UnixStream = w.as_ref();
        loop {
            s.writable().await?;
            match s.try_io(tokio::io::Interest::WRITABLE, || {
                unix::send_with_fds(s, slices, fds)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_urls() {
        assert_eq!(
            Url::parse("tcp://127.0.0.1:9000").unwrap(),
            Url::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(
            Url::parse("TCP://localhost:1").unwrap(),
            Url::Tcp("localhost:1".into())
        );
        assert_eq!(
            Url::parse("tcp://[::1]:80").unwrap(),
            Url::Tcp("[::1]:80".into())
        );
        assert_eq!(
            Url::parse("unix:///tmp/x.sock").unwrap(),
            Url::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Url::parse("unix:///tmp/x.sock").unwrap().to_string(),
            "unix:///tmp/x.sock"
        );
        assert_eq!(
            Url::parse("tls://localhost:7443").unwrap(),
            Url::Tls("localhost:7443".into())
        );
        assert_eq!(
            Url::parse("QUIC://[::1]:7443").unwrap().to_string(),
            "quic://[::1]:7443"
        );
    }

    #[test]
    fn refuses_others_with_clear_messages() {
        for (url, needle) in [
            ("http://x:1", "unsupported scheme \"http\""),
            ("127.0.0.1:80", "no scheme"),
            ("tcp://127.0.0.1", "port"),
            ("tcp://:80", "host"),
            ("tcp://h:99999", "port"),
            ("tcp://h:80/path", "path"),
            ("tcp://::1:80", "bracket"),
            ("unix://relative/x", "absolute"),
            ("unix://", "absolute"),
        ] {
            let e = Url::parse(url).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{url}: {e:?}");
            let s = e.to_string();
            assert!(s.contains(needle), "{url}: {s}");
            assert!(s.contains("tcp://host:port"), "{url}: {s}");
            assert!(s.contains("quic://host:port"), "{url}: {s}");
        }
    }
}
