//! QUIC (`quic://host:port`, quinn), with the same mutual authentication as TLS.
//!
//! # Design: channels on streams, one ordered byte stream for the driver
//!
//! The draft defines an XCP channel as a stream of its own, so that a slow channel does not
//! hold up the others. QUIC gives exactly that: every XCP channel travels on its own QUIC
//! bidirectional stream, and both directions of a channel use the same stream. The session
//! driver, however, reads and writes one ordered byte stream of whole frames, as on TCP. This
//! module keeps the driver unchanged by translating between the two:
//!
//! - **Write side** ([`QuicWrite`]): the bytes the driver writes are parsed into whole frames
//!   (prefix, header, PLEN, payload, CRC, SPEC §1). Each frame's `channelId` picks the QUIC
//!   stream of that channel; the first frame of a channel opens it (lazily; channel 0, which
//!   carries HELLO/CAPS, is the first). A task per stream writes its frames in order, so a
//!   stream blocked by flow control stalls only its own channel. What is queued for all streams
//!   together is bounded by [`WRITE_BUDGET`]: past it, writes wait (back-pressure).
//! - **Read side** ([`QuicRead`]): the peer's streams are accepted (at most
//!   [`MAX_PEER_STREAMS`] per connection: the peer that opens more is refused with a clear
//!   close reason and a log line), a task per stream reads whole frames from it (at most
//!   [`MAX_FRAME`] bytes each), and the reader hands them to the driver one whole frame at a
//!   time: bytes of two frames never interleave, and frames of one channel keep their order.
//!   Frames read but not yet handed over hold at most [`MAX_FRAME`] bytes per connection
//!   together (a stream waits for room before it reads a frame's body), so a peer cannot make
//!   this side buffer more by spreading frames over many streams.
//! - **End of stream**: shutting down the write side finishes every stream once its frames are
//!   written and acknowledged, then sends a one-off unidirectional stream holding the number
//!   of streams this side opened. The reader reports end-of-stream once that count arrived and
//!   every stream of the peer has been read to its end, so no frame is lost to a race between
//!   streams. The QUIC connection is closed when both halves are dropped, after the peer closed
//!   it or a short linger ([`CLOSE_LINGER`]), so that the last frames are not discarded.
//!
//! Handles are never offered on QUIC (the peer is on another host); CRYPT still works on top.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::task::JoinHandle;

use super::tls::{self, TlsConfig, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES};
use crate::error::{CloseReason, Deadline, Error, Result, TlsFailure};
use crate::wire::{Flags, MAGIC_BYTES, PREFIX_LEN, TRAILER_LEN};

/// The most bidirectional streams (channels) a peer may open on one connection.
pub const MAX_PEER_STREAMS: u64 = 256;

/// The largest frame read whole from a stream (prefix to CRC). A longer one is passed on up to
/// its PLEN, so the session refuses it (`ERR_MESSAGE_TOO_LARGE`), and the stream is not read
/// further.
pub const MAX_FRAME: u64 = 64 << 20;

/// Bytes queued for all streams of a connection before writes wait.
pub const WRITE_BUDGET: usize = 16 << 20;

/// How long a closed session's QUIC connection waits for the peer to close first.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// How long a failed stream waits for the connection's close (and its reason) before the
/// stream's own error is reported. Generous, because a loaded machine can take hundreds of
/// milliseconds to deliver the close; only a peer that resets one stream alone waits it out.
const STREAM_FAIL_GRACE: Duration = Duration::from_secs(1);

/// The application close code of a normal close.
const CLOSE_DONE: u32 = 0;
/// The application close code for a peer that opened too many streams.
const CLOSE_TOO_MANY_STREAMS: u32 = 1;

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One over the limit, so the peer that goes past it is seen and refused in words instead
    // of being silently held back by flow control.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_PEER_STREAMS as u32 + 1));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(1));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(60)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The TLS alert a QUIC error code carries (RFC 9001 §4.8: 0x100 + the alert), if it is one.
fn alert_of(code: u64) -> Option<rustls::AlertDescription> {
    (0x100..0x200)
        .contains(&code)
        .then(|| rustls::AlertDescription::from((code - 0x100) as u8))
}

/// Words for a QUIC connection error.
pub(crate) fn explain(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as C;
    match e {
        C::TransportError(te) => match alert_of(u64::from(te.code)) {
            Some(_) => format!("TLS: {}", explain_local(&te.reason)),
            None => format!("QUIC transport error: {te}"),
        },
        C::ConnectionClosed(cc) => match alert_of(u64::from(cc.error_code)) {
            Some(a) => match tls::explain_alert(a) {
                Some(w) => format!("TLS: {w} (alert {a:?})"),
                None => format!("TLS: the peer refused the handshake (alert {a:?})"),
            },
            None => format!("the peer closed the connection: {cc}"),
        },
        C::ApplicationClosed(ac) => format!(
            "the peer closed the connection (code {}): {}",
            ac.error_code,
            String::from_utf8_lossy(&ac.reason)
        ),
        C::TimedOut => "no answer from the peer (no QUIC server there, or UDP blocked)".into(),
        other => other.to_string(),
    }
}

/// The TLS failure of a QUIC connection error, `None` when TLS had no part in it (what
/// [`explain`] puts in words). quinn reports our own side's TLS failures as text only, so
/// those are read from it.
fn failure_of(e: &quinn::ConnectionError) -> Option<TlsFailure> {
    use quinn::ConnectionError as C;
    match e {
        C::TransportError(te) if alert_of(u64::from(te.code)).is_some() => {
            Some(local_failure(&te.reason))
        }
        C::ConnectionClosed(cc) => alert_of(u64::from(cc.error_code)).map(tls::failure_of_alert),
        _ => None,
    }
}

/// The kind of a TLS failure of our own side, which quinn reports as text only.
fn local_failure(reason: &str) -> TlsFailure {
    let r = reason;
    if r.contains("UnknownIssuer") || r.contains("BadSignature") {
        TlsFailure::PeerCertificateUntrusted
    } else if r.contains("not valid for name") || r.contains("NotValidForName") {
        TlsFailure::PeerCertificateWrongName
    } else if r.contains("xpired") || r.contains("NotValidYet") {
        TlsFailure::PeerCertificateDated
    } else if r.contains("no certificates") {
        TlsFailure::PeerSentNoCertificate
    } else {
        TlsFailure::Handshake
    }
}

/// Words for a TLS failure of our own side (see [`local_failure`]).
fn explain_local(reason: &str) -> String {
    let words = match local_failure(reason) {
        TlsFailure::PeerCertificateUntrusted => {
            "the peer's certificate is not signed by our CA (--ca)"
        }
        TlsFailure::PeerCertificateWrongName => {
            "the server's certificate is not valid for the name we connect to (use a name it \
             lists, or set the server name)"
        }
        TlsFailure::PeerCertificateDated => {
            "the peer's certificate has expired or is not valid yet"
        }
        TlsFailure::PeerSentNoCertificate => {
            "the peer sent no certificate (a client needs --cert and --key)"
        }
        _ => "our check of the peer failed",
    };
    format!("{words} ({reason})")
}

fn conn_io_error(e: &quinn::ConnectionError, peer: &str) -> io::Error {
    let kind = match e {
        quinn::ConnectionError::TimedOut => io::ErrorKind::TimedOut,
        quinn::ConnectionError::LocallyClosed => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io_error(kind, failure_of(e), format!("{peer}: {}", explain(e)))
}

/// Connects: UDP endpoint, QUIC handshake with mutual authentication.
pub(super) async fn connect(addr: &str, tls: &TlsConfig) -> Result<QuicStream> {
    let url = format!("quic://{addr}");
    let name = tls.server_name(tls::host_of(addr))?;
    let remote: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("resolve {url}: {e}"))))?
        .next()
        .ok_or_else(|| Error::invalid(format!("{url}: the host resolves to no address")))?;
    let local: SocketAddr = if remote.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client()).map_err(|e| {
        Error::tls(
            TlsFailure::Config,
            format!("{url}: the TLS settings do not suit QUIC: {e}"),
        )
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config()));
    let endpoint = quinn::Endpoint::client(local)
        .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("{url}: UDP socket: {e}"))))?;
    let connecting = endpoint
        .connect_with(client, remote, &name.to_str())
        .map_err(|e| Error::invalid(format!("{url}: {e}")))?;
    let conn = connecting.await.map_err(|e| match e {
        quinn::ConnectionError::TimedOut => {
            Error::timeout(Deadline::Other, format!("{url}: {}", explain(&e)))
        }
        e => Error::tls(
            failure_of(&e).unwrap_or(TlsFailure::Handshake),
            format!("{url}: handshake refused: {}", explain(&e)),
        ),
    })?;
    Ok(QuicStream::new(
        conn,
        Some(endpoint),
        format!("quic://{remote}"),
    ))
}

/// A QUIC listener: an endpoint, handshakes in tasks of their own, finished connections handed
/// out by [`QuicListener::accept`].
pub struct QuicListener {
    local: String,
    rx: Mutex<mpsc::Receiver<QuicStream>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for QuicListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuicListener({})", self.local)
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QuicListener {
    /// Binds a UDP endpoint on `addr` and starts accepting.
    pub(super) async fn bind(addr: &str, tls: &TlsConfig) -> Result<QuicListener> {
        let url = format!("quic://{addr}");
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls.server(&url)?).map_err(|e| {
                Error::tls(
                    TlsFailure::Config,
                    format!("{url}: the TLS settings do not suit QUIC: {e}"),
                )
            })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config()));
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("resolve {url}: {e}"))))?
            .next()
            .ok_or_else(|| Error::invalid(format!("{url}: the host resolves to no address")))?;
        let endpoint = quinn::Endpoint::server(server, sock)
            .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("bind {url}: {e}"))))?;
        let local = match endpoint.local_addr() {
            Ok(a) => format!("quic://{a}"),
            Err(_) => url,
        };
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(endpoint, tx));
        Ok(QuicListener {
            local,
            rx: Mutex::new(rx),
            task,
        })
    }

    /// The URL really bound.
    pub fn local_url(&self) -> String {
        self.local.clone()
    }

    /// The next connection whose handshake succeeded, and its label.
    pub async fn accept(&self) -> Result<(QuicStream, String)> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(s) => {
                let label = s.peer_label();
                Ok((s, label))
            }
            None => Err(Error::closed(
                CloseReason::ServerStopped,
                format!("{} stopped accepting", self.local),
            )),
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, tx: mpsc::Sender<QuicStream>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = tx.closed() => return,
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let peer = format!("quic://{}", incoming.remote_address());
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                match incoming.accept() {
                    Ok(c) => c.await,
                    Err(e) => Err(e),
                }
            })
            .await;
            drop(permit);
            match r {
                Ok(Ok(conn)) => {
                    let _ = tx.send(QuicStream::new(conn, None, peer)).await;
                }
                Ok(Err(e)) => crate::session::ratelog::peer_log_global!(
                    INFO,
                    "{peer}: QUIC handshake refused: {}",
                    explain(&e)
                ),
                Err(_) => crate::session::ratelog::peer_log_global!(
                    INFO,
                    "{peer}: QUIC handshake refused: none within {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        });
    }
}

/// What the stream tasks tell the reader.
enum Event {
    /// One whole frame, and its share of the read budget (returned once handed over).
    Frame(Bytes, Option<tokio::sync::OwnedSemaphorePermit>),
    /// The peer opened a stream (counted against its goodbye).
    Accepted,
    /// We opened a stream; its receive side is read too.
    Opened,
    /// A stream was read to its end.
    StreamDone,
    /// The peer shut down, having opened this many streams.
    Goodbye(u64),
    /// The connection failed.
    Failed(io::Error),
}

#[derive(Default)]
struct State {
    /// The writer of each channel with a stream.
    channels: HashMap<u32, mpsc::UnboundedSender<Bytes>>,
    writers: Vec<JoinHandle<()>>,
    /// Streams this side opened.
    opened: u64,
    /// The write side was shut down.
    closing: bool,
    /// Why writing failed, once it did (and the TLS failure, when TLS ended it).
    failed: Option<(Option<TlsFailure>, String)>,
}

/// An I/O error of `kind` saying `why`, carrying `tls` when TLS ended the connection (so the
/// session reports a TLS error with its kind).
fn io_error(kind: io::ErrorKind, tls: Option<TlsFailure>, why: String) -> io::Error {
    match tls {
        Some(f) => crate::error::TlsIo::error(kind, f, why),
        None => io::Error::new(kind, why),
    }
}

/// [`explain`] and [`failure_of`] of an error that may have lost the connection.
fn lost(e: &quinn::ConnectionError) -> (Option<TlsFailure>, String) {
    (failure_of(e), explain(e))
}

struct Shared {
    conn: quinn::Connection,
    peer: String,
    state: StdMutex<State>,
    queued: AtomicUsize,
    room: AtomicWaker,
    events: mpsc::Sender<Event>,
    /// Bytes of frames read from streams and not yet handed to the driver ([`MAX_FRAME`]).
    read_budget: Arc<Semaphore>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent: take it anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.room.wake();
    }

    fn fail(&self, tls: Option<TlsFailure>, why: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some((tls, why));
        }
        drop(st);
        self.room.wake();
    }

    /// Queues `frame` on the stream of `channel`, opening it if needed.
    fn send(self: &Arc<Self>, channel: u32, frame: Bytes) -> io::Result<()> {
        let mut st = self.lock();
        if let Some((tls, why)) = &st.failed {
            return Err(io_error(io::ErrorKind::BrokenPipe, *tls, why.clone()));
        }
        if st.closing {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            ));
        }
        let tx = match st.channels.get(&channel) {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                st.channels.insert(channel, tx.clone());
                let me = self.clone();
                st.writers.push(tokio::spawn(
                    async move { me.open_and_write(channel, rx).await },
                ));
                tx
            }
        };
        drop(st);
        let len = frame.len();
        if tx.send(frame).is_err() {
            self.release(len);
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{}: the stream of channel {channel} is gone", self.peer),
            ));
        }
        Ok(())
    }

    async fn open_and_write(self: Arc<Self>, channel: u32, rx: mpsc::UnboundedReceiver<Bytes>) {
        match self.conn.open_bi().await {
            Ok((send, recv)) => {
                self.lock().opened += 1;
                let _ = self.events.send(Event::Opened).await;
                let me = self.clone();
                tokio::spawn(async move { me.read_stream(recv, None).await });
                self.write_stream(channel, send, rx).await;
            }
            Err(e) => {
                self.fail(
                    failure_of(&e),
                    format!(
                        "{}: opening the stream of channel {channel}: {}",
                        self.peer,
                        explain(&e)
                    ),
                );
                drain(&self, rx).await;
            }
        }
    }

    async fn write_stream(
        &self,
        channel: u32,
        mut send: quinn::SendStream,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
    ) {
        while let Some(frame) = rx.recv().await {
            let len = frame.len();
            let r = send.write_chunk(frame).await;
            self.release(len);
            if let Err(e) = r {
                let (tls, why) = match e {
                    quinn::WriteError::ConnectionLost(c) => lost(&c),
                    other => (None, other.to_string()),
                };
                self.fail(tls, format!("{}: channel {channel}: {why}", self.peer));
                drain(self, rx).await;
                return;
            }
        }
        // The write side shut down: end the stream once the peer has every byte.
        if send.finish().is_ok() {
            let _ = send.stopped().await;
        }
    }

    /// Adopts the send side of a stream the peer opened for `channel`, unless this side already
    /// writes that channel elsewhere or shut down (then the stream is finished at once).
    fn adopt(self: &Arc<Self>, channel: u32, mut send: quinn::SendStream) {
        let mut st = self.lock();
        if st.closing || st.failed.is_some() || st.channels.contains_key(&channel) {
            drop(st);
            let _ = send.finish();
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        st.channels.insert(channel, tx);
        let me = self.clone();
        st.writers.push(tokio::spawn(async move {
            me.write_stream(channel, send, rx).await
        }));
    }

    /// Reads whole frames from one stream until it ends.
    async fn read_stream(
        self: Arc<Self>,
        mut recv: quinn::RecvStream,
        adopt: Option<quinn::SendStream>,
    ) {
        let mut adopt = adopt;
        loop {
            match read_frame(&mut recv, &self.read_budget).await {
                Ok(Some((frame, permit, channel, last))) => {
                    if let Some(send) = adopt.take() {
                        self.adopt(channel, send);
                    }
                    if self.events.send(Event::Frame(frame, permit)).await.is_err() {
                        return;
                    }
                    if last {
                        // A frame we cannot take whole: the session refuses it and closes.
                        let _ = recv.stop(quinn::VarInt::from_u32(0));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // A peer that refuses the connection resets its streams and closes the
                    // connection with the reason; the reset can arrive first. Wait a moment for
                    // the close, so the reason (not "reset") is what the session reports.
                    let (tls, why) =
                        match tokio::time::timeout(STREAM_FAIL_GRACE, self.conn.closed()).await {
                            Ok(closed) => lost(&closed),
                            Err(_) => (None, e.to_string()),
                        };
                    let _ = self
                        .events
                        .send(Event::Failed(io_error(
                            e.kind(),
                            tls,
                            format!("{}: {why}", self.peer),
                        )))
                        .await;
                    return;
                }
            }
        }
        if let Some(mut send) = adopt {
            let _ = send.finish();
        }
        let _ = self.events.send(Event::StreamDone).await;
    }

    /// Accepts the peer's streams until the connection ends.
    async fn accept_streams(self: Arc<Self>) {
        let mut accepted = 0u64;
        loop {
            tokio::select! {
                r = self.conn.accept_bi() => match r {
                    Ok((send, recv)) => {
                        accepted += 1;
                        if accepted > MAX_PEER_STREAMS {
                            let why = format!(
                                "the peer opened more than {MAX_PEER_STREAMS} streams (XCP \
                                 channels) on one connection: refused"
                            );
                            crate::session::ratelog::peer_log_global!(WARN, "{}: {why}", self.peer);
                            self.conn.close(
                                quinn::VarInt::from_u32(CLOSE_TOO_MANY_STREAMS),
                                why.as_bytes(),
                            );
                            self.fail(None, format!("{}: {why}", self.peer));
                            let _ = self
                                .events
                                .send(Event::Failed(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("{}: {why}", self.peer),
                                )))
                                .await;
                            return;
                        }
                        if self.events.send(Event::Accepted).await.is_err() {
                            return;
                        }
                        let me = self.clone();
                        tokio::spawn(async move { me.read_stream(recv, Some(send)).await });
                    }
                    Err(e) => {
                        self.fail(failure_of(&e), format!("{}: {}", self.peer, explain(&e)));
                        let _ = self.events.send(Event::Failed(conn_io_error(&e, &self.peer))).await;
                        return;
                    }
                },
                r = self.conn.accept_uni() => match r {
                    Ok(mut recv) => {
                        let me = self.clone();
                        tokio::spawn(async move {
                            let ev = match recv.read_to_end(8).await {
                                Ok(b) if b.len() == 8 => {
                                    let mut n = [0u8; 8];
                                    n.copy_from_slice(&b);
                                    Event::Goodbye(u64::from_le_bytes(n))
                                }
                                Ok(_) => Event::Failed(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("{}: a malformed end-of-stream notice", me.peer),
                                )),
                                Err(e) => Event::Failed(io::Error::new(
                                    io::ErrorKind::ConnectionAborted,
                                    format!("{}: end-of-stream notice: {e}", me.peer),
                                )),
                            };
                            let _ = me.events.send(ev).await;
                        });
                    }
                    Err(e) => {
                        self.fail(failure_of(&e), format!("{}: {}", self.peer, explain(&e)));
                        let _ = self.events.send(Event::Failed(conn_io_error(&e, &self.peer))).await;
                        return;
                    }
                },
            }
        }
    }
}

/// Drops the frames still queued for a failed stream, returning their budget.
async fn drain(shared: &Shared, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    rx.close();
    while let Some(f) = rx.recv().await {
        shared.release(f.len());
    }
}

/// Fills `buf` from the stream. `Ok(false)`: the stream ended cleanly before its first byte.
async fn read_full(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await {
            Ok(Some(n)) => filled += n,
            Ok(None) if filled == 0 => return Ok(false),
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a QUIC stream ended inside a frame",
                ))
            }
            Err(e) => {
                let (tls, msg) = match &e {
                    quinn::ReadError::ConnectionLost(c) => lost(c),
                    other => (None, other.to_string()),
                };
                return Err(io_error(io::ErrorKind::ConnectionAborted, tls, msg));
            }
        }
    }
    Ok(true)
}

/// A frame read from a stream: its bytes, its share of the read budget, its channel, and
/// whether the stream is read no further.
type ReadFrame = (Bytes, Option<tokio::sync::OwnedSemaphorePermit>, u32, bool);

/// Reads one whole frame: `(bytes, permit, channel, last)`. `last` is set when the frame is malformed
/// or too long to read whole: the bytes so far are passed on for the session to refuse, and
/// the stream is read no further. `None`: the stream ended at a frame boundary.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    budget: &Arc<Semaphore>,
) -> io::Result<Option<ReadFrame>> {
    let mut prefix = [0u8; PREFIX_LEN];
    if !read_full(recv, &mut prefix).await? {
        return Ok(None);
    }
    if prefix[..4] != MAGIC_BYTES {
        return Ok(Some((Bytes::copy_from_slice(&prefix), None, 0, true)));
    }
    let large = Flags(prefix[5]).contains(Flags::LARGE);
    let hlen = usize::from(u16::from_le_bytes([prefix[6], prefix[7]]));
    let plen_len = if large { 8 } else { 4 };
    let mut head = BytesMut::zeroed(PREFIX_LEN + hlen + plen_len);
    head[..PREFIX_LEN].copy_from_slice(&prefix);
    if !read_full(recv, &mut head[PREFIX_LEN..]).await? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "a QUIC stream ended inside a frame",
        ));
    }
    let channel = channel_of(&head[PREFIX_LEN..PREFIX_LEN + hlen]);
    let p = &head[PREFIX_LEN + hlen..];
    let plen = if large {
        u64::from_le_bytes(p.try_into().unwrap_or([0xFF; 8]))
    } else {
        u64::from(u32::from_le_bytes(p.try_into().unwrap_or([0xFF; 4])))
    };
    let total = (head.len() as u64)
        .checked_add(plen)
        .and_then(|t| t.checked_add(TRAILER_LEN as u64));
    let total = match total {
        Some(t) if t <= MAX_FRAME => t as usize,
        _ => return Ok(Some((head.freeze(), None, channel, true))),
    };
    // Room for the whole frame first (`total` is at most MAX_FRAME, which fits a u32).
    let permit = budget
        .clone()
        .acquire_many_owned(total as u32)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::ConnectionAborted, "connection over"))?;
    // The body: appended chunk by chunk as quinn holds it (one copy, no zeroing first).
    head.reserve(total - head.len());
    while head.len() < total {
        match recv.read_chunk(total - head.len(), true).await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a QUIC stream ended inside a frame",
                ))
            }
            Err(e) => {
                let (tls, msg) = match &e {
                    quinn::ReadError::ConnectionLost(c) => lost(c),
                    other => (None, other.to_string()),
                };
                return Err(io_error(io::ErrorKind::ConnectionAborted, tls, msg));
            }
        }
    }
    Ok(Some((head.freeze(), Some(permit), channel, false)))
}

/// The channel of a frame header; 0 when the header does not decode (the session refuses
/// such a frame anyway).
fn channel_of(header: &[u8]) -> u32 {
    crate::wire::header::decode(header)
        .map(|(h, _)| h.channel_id)
        .unwrap_or(0)
}

/// The length and channel of the whole frame at the start of `buf`, once it is all there.
fn frame_at(buf: &[u8]) -> io::Result<Option<(usize, u32)>> {
    if buf.len() < PREFIX_LEN {
        return Ok(None);
    }
    if buf[..4] != MAGIC_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "QUIC transport: written bytes are not an XCP frame",
        ));
    }
    let large = Flags(buf[5]).contains(Flags::LARGE);
    let hlen = usize::from(u16::from_le_bytes([buf[6], buf[7]]));
    let plen_len = if large { 8 } else { 4 };
    let head = PREFIX_LEN + hlen + plen_len;
    if buf.len() < head {
        return Ok(None);
    }
    let p = &buf[PREFIX_LEN + hlen..head];
    let plen = if large {
        u64::from_le_bytes(p.try_into().unwrap_or([0xFF; 8]))
    } else {
        u64::from(u32::from_le_bytes(p.try_into().unwrap_or([0xFF; 4])))
    };
    let total = (head as u64)
        .checked_add(plen)
        .and_then(|t| t.checked_add(TRAILER_LEN as u64))
        .and_then(|t| usize::try_from(t).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame length overflows"))?;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        total,
        channel_of(&buf[PREFIX_LEN..PREFIX_LEN + hlen]),
    )))
}

/// Closes the QUIC connection when both halves are gone: after the peer closed it, or after
/// [`CLOSE_LINGER`].
struct Closer {
    conn: quinn::Connection,
    endpoint: Option<quinn::Endpoint>,
    accept: JoinHandle<()>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let conn = self.conn.clone();
        let endpoint = self.endpoint.take();
        let accept = self.accept.abort_handle();
        let linger = async move {
            let _ = tokio::time::timeout(CLOSE_LINGER, conn.closed()).await;
            accept.abort();
            conn.close(quinn::VarInt::from_u32(CLOSE_DONE), b"done");
            if let Some(ep) = endpoint {
                let _ = tokio::time::timeout(CLOSE_LINGER, ep.wait_idle()).await;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(linger);
            }
            Err(_) => {
                self.accept.abort();
                self.conn
                    .close(quinn::VarInt::from_u32(CLOSE_DONE), b"done");
            }
        }
    }
}

/// A QUIC connection seen as one byte stream of whole XCP frames (see the module docs).
pub struct QuicStream {
    read: QuicRead,
    write: QuicWrite,
}

impl fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuicStream({})", self.read.shared.peer)
    }
}

impl QuicStream {
    fn new(conn: quinn::Connection, endpoint: Option<quinn::Endpoint>, peer: String) -> QuicStream {
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            peer,
            state: StdMutex::new(State::default()),
            queued: AtomicUsize::new(0),
            room: AtomicWaker::new(),
            events: tx,
            read_budget: Arc::new(Semaphore::new(MAX_FRAME as usize)),
        });
        let accept = tokio::spawn(shared.clone().accept_streams());
        let closer = Arc::new(Closer {
            conn,
            endpoint,
            accept,
        });
        QuicStream {
            read: QuicRead {
                shared: shared.clone(),
                events: rx,
                current: Bytes::new(),
                held: None,
                accepted: 0,
                live: 0,
                goodbye: None,
                eof: false,
                _closer: closer.clone(),
            },
            write: QuicWrite {
                shared,
                asm: BytesMut::new(),
                shutdown: None,
                _closer: closer,
            },
        }
    }

    /// `quic://ip:port` of the peer.
    pub fn peer_label(&self) -> String {
        self.read.shared.peer.clone()
    }

    /// Owned halves.
    pub fn into_split(self) -> (QuicRead, QuicWrite) {
        (self.read, self.write)
    }
}

/// The read half of a [`QuicStream`]: whole frames from every stream, one at a time.
pub struct QuicRead {
    shared: Arc<Shared>,
    events: mpsc::Receiver<Event>,
    current: Bytes,
    /// The read budget `current` holds, returned when it is all handed over.
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    accepted: u64,
    live: u64,
    goodbye: Option<u64>,
    eof: bool,
    _closer: Arc<Closer>,
}

impl fmt::Debug for QuicRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuicRead({})", self.shared.peer)
    }
}

impl QuicRead {
    fn at_end(&self) -> bool {
        self.eof || matches!(self.goodbye, Some(n) if self.accepted >= n && self.live == 0)
    }
}

impl AsyncRead for QuicRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.current.is_empty() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current[..n]);
                this.current.advance(n);
                if this.current.is_empty() {
                    this.held = None;
                }
                return Poll::Ready(Ok(()));
            }
            if this.at_end() {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            match this.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("{}: the QUIC connection ended", this.shared.peer),
                    )))
                }
                Poll::Ready(Some(ev)) => match ev {
                    Event::Frame(b, permit) => {
                        this.current = b;
                        this.held = permit;
                    }
                    Event::Accepted => {
                        this.accepted += 1;
                        this.live += 1;
                    }
                    Event::Opened => this.live += 1,
                    Event::StreamDone => this.live = this.live.saturating_sub(1),
                    Event::Goodbye(n) => this.goodbye = Some(n),
                    Event::Failed(e) => return Poll::Ready(Err(e)),
                },
            }
        }
    }
}

type ShutdownFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// The write half of a [`QuicStream`]: frames parsed out of the bytes written, each sent on
/// the stream of its channel.
pub struct QuicWrite {
    shared: Arc<Shared>,
    asm: BytesMut,
    shutdown: Option<ShutdownFuture>,
    _closer: Arc<Closer>,
}

impl fmt::Debug for QuicWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuicWrite({})", self.shared.peer)
    }
}

impl QuicWrite {
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((tls, why)) = &self.shared.lock().failed {
            return Poll::Ready(Err(io_error(io::ErrorKind::BrokenPipe, *tls, why.clone())));
        }
        if self.shared.queued.load(Ordering::Acquire) < WRITE_BUDGET {
            return Poll::Ready(Ok(()));
        }
        self.shared.room.register(cx.waker());
        if self.shared.queued.load(Ordering::Acquire) < WRITE_BUDGET
            || self.shared.lock().failed.is_some()
        {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Sends every whole frame assembled so far.
    fn dispatch(&mut self) -> io::Result<()> {
        while let Some((len, channel)) = frame_at(&self.asm)? {
            let frame = self.asm.split_to(len).freeze();
            self.shared.queued.fetch_add(len, Ordering::AcqRel);
            self.shared.send(channel, frame)?;
        }
        Ok(())
    }

    fn start_shutdown(&mut self) -> ShutdownFuture {
        let shared = self.shared.clone();
        let writers = {
            let mut st = shared.lock();
            st.closing = true;
            st.channels.clear();
            std::mem::take(&mut st.writers)
        };
        let leftover = !self.asm.is_empty();
        Box::pin(async move {
            for w in writers {
                let _ = w.await;
            }
            if leftover {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "QUIC transport: shut down inside a frame",
                ));
            }
            let opened = shared.lock().opened;
            let mut uni = shared
                .conn
                .open_uni()
                .await
                .map_err(|e| conn_io_error(&e, &shared.peer))?;
            uni.write_all(&opened.to_le_bytes())
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
            let _ = uni.finish();
            let _ = uni.stopped().await;
            Ok(())
        })
    }
}

impl AsyncWrite for QuicWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shutdown.is_some() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        match this.poll_room(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        let mut n = 0;
        for b in bufs {
            this.asm.extend_from_slice(b);
            n += b.len();
        }
        this.dispatch()?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shutdown.is_none() {
            this.shutdown = Some(this.start_shutdown());
        }
        match this.shutdown.as_mut() {
            Some(f) => f.as_mut().poll(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameHeader, HeaderForm, MsgType};

    fn frame(channel: u32, body: &[u8]) -> Vec<u8> {
        let hdr = FrameHeader {
            channel_id: channel,
            msg_type: MsgType::DATA,
            msg_id: 7,
            ..Default::default()
        };
        crate::wire::frame::encode(
            &hdr,
            HeaderForm::Capnp,
            Flags::NONE,
            Bytes::copy_from_slice(body),
        )
        .unwrap()
        .to_vec()
    }

    #[test]
    fn finds_whole_frames_and_their_channel() {
        let a = frame(3, b"hello");
        let b = frame(9, &[0u8; 1000]);
        let mut both = a.clone();
        both.extend_from_slice(&b);
        for cut in 0..a.len() {
            assert_eq!(frame_at(&both[..cut]).unwrap(), None, "cut {cut}");
        }
        assert_eq!(frame_at(&both).unwrap(), Some((a.len(), 3)));
        assert_eq!(frame_at(&b).unwrap(), Some((b.len(), 9)));
        assert!(frame_at(b"GET / HTTP/1.1\r\n").is_err());
    }
}
