//! The async API on tokio: [`Session`] (one connection, a cheap handle that many tasks share)
//! and [`Server`] (a listener that hands out sessions whose handshake completed).
//!
//! Each connection is driven by one tokio task (the driver) that owns the socket and the
//! sans-IO [`Connection`]. Handles talk to it over a bounded
//! channel, so a slow socket pushes back on senders, and a slow reader pushes back on the peer.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> xcp::Result<()> {
//! use xcp::{codec::CodecId, Ether, Server, Session, SessionConfig};
//! use xcp::conn::Outgoing;
//!
//! let server = Server::bind("tcp://127.0.0.1:0", SessionConfig::default()).await?;
//! let url = server.local_url();
//! tokio::spawn(async move {
//!     while let Ok(s) = server.accept().await {
//!         tokio::spawn(async move {
//!             while let Ok(m) = s.recv().await {
//!                 let echo = Outgoing::data(m.header.body_codec, m.body.clone());
//!                 if s.reply(&m, echo).await.is_err() { break; }
//!             }
//!         });
//!     }
//! });
//!
//! let client = Session::connect(&url, SessionConfig::default()).await?;
//! let reply = client.request(Outgoing::ether(&Ether::text("hi"), CodecId::JSON)?).await?;
//! assert_eq!(reply.ether()?, Ether::text("hi"));
//! client.close().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod core;
mod driver;
pub mod ratelog;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;

use crate::attach::{Pool, PoolConfig, Region, Scheme};
use crate::codec::dlpack::DlpackDescriptor;
use crate::codec::CodecId;
use crate::conn::{self, Connection, Incoming, Negotiated, Outgoing, Role};
use crate::error::{CloseReason, Deadline, Error, ErrorCode, Result};
use crate::ether::Attachment;
use crate::ether::Ether;
use crate::transport::{Listener, SocketFile, Stream};
pub use driver::DLPACK_VIEW;
use driver::{Channels, Command, Shared, LINGER};

/// Settings of a [`Session`] or of every session of a [`Server`].
///
/// Start from `Default` and change what differs with the `with_*` methods (or assign the
/// public fields); new fields can be added without breaking callers:
///
/// ```
/// use std::time::Duration;
/// use xcp::{AttachConfig, SessionConfig};
/// let config = SessionConfig::default()
///     .with_request_timeout(Duration::from_secs(5))
///     .with_attach(AttachConfig::inline_only());
/// assert!(config.attach.schemes.is_empty());
/// ```
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The connection's own settings: limits, codecs, handshake/idle/frame timeouts.
    pub conn: conn::Config,
    /// How long [`Session::connect`] (socket connect and handshake) may take; a server also
    /// drops a connection whose handshake takes longer.
    pub connect_timeout: Duration,
    /// How long [`Session::request`] waits for the reply.
    pub request_timeout: Duration,
    /// Back-pressure: the most commands (sends, requests, ...) queued for the driver, and the
    /// most received messages queued for [`Session::recv`]. When the receive queue is full the
    /// driver stops reading the socket.
    pub max_in_flight: usize,
    /// Attachments by handle: which schemes to offer, the pool, the inline threshold.
    pub attach: AttachConfig,
    /// A server's limit on connections at once (handshaking or open). A connection beyond it
    /// gets NACK `ERR_BUSY` with `retry_after_ms` and is closed.
    pub max_connections: usize,
    /// A server's limit on bytes pending reassembly across all its connections (each one is
    /// also bounded by its `max_message_bytes`). A chunk beyond it gets NACK `ERR_BUSY`.
    pub server_reassembly_bytes: u64,
    /// How streams are opened: epoll or io_uring (and, across hosts, TLS).
    pub transport: crate::transport::TransportConfig,
    /// The same-host ring (SPEC §9): whether a server agrees to it on Unix sockets, its
    /// size, how long a side spins before it sleeps. A client asks for it with a
    /// `ring:///path` URL.
    pub ring: crate::transport::ring::RingConfig,
}

/// How attachments travel (SPEC §6 `shared_mem`/`attach`, §7).
///
/// Handles are used only when both sides offer the same scheme and report the same
/// `host_id`; otherwise, after an `ERR_ATTACHMENT` from the peer, and for regions smaller than
/// `inline_threshold`, the bytes go inline in the Ether (chunked like any message).
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct AttachConfig {
    /// Schemes offered, in order of preference. `memfd` is offered on Unix sockets only
    /// (its descriptors travel with `SCM_RIGHTS`), `cuda-ipc` only in builds with feature
    /// `cuda` where the driver loads and sees a device. Empty: everything goes inline.
    pub schemes: Vec<Scheme>,
    /// The most bytes of shared segments a session's pool holds.
    pub pool_cap_bytes: u64,
    /// How long [`Session::alloc`] waits for the pool to have room before `ERR_BUSY`.
    pub alloc_timeout: Duration,
    /// Regions smaller than this go inline even when handles are negotiated: below it a copy
    /// is cheaper than the handle's round trip (measured with `xcp bench`).
    pub inline_threshold: usize,
    /// The most received messages whose views the application still holds; a message by
    /// handle beyond it gets NACK `ERR_BUSY` (the peer retries after `retry_after_ms`).
    pub max_leases_per_peer: usize,
}

impl Default for AttachConfig {
    fn default() -> Self {
        AttachConfig {
            // `cuda-ipc` is offered only where it can work (see `attach::scheme::cuda_usable`).
            schemes: vec![Scheme::Memfd, Scheme::Shm, Scheme::CudaIpc],
            pool_cap_bytes: 1 << 30,
            alloc_timeout: Duration::from_secs(5),
            inline_threshold: 64 << 10,
            max_leases_per_peer: 1024,
        }
    }
}

with_fields!(AttachConfig {
    /// These schemes offered, in order of preference (empty: everything inline).
    with_schemes => schemes: Vec<Scheme>;
    /// At most this many bytes of shared segments in the pool.
    with_pool_cap_bytes => pool_cap_bytes: u64;
    /// [`Session::alloc`] waits this long for room in the pool.
    with_alloc_timeout => alloc_timeout: Duration;
    /// Regions smaller than this go inline.
    with_inline_threshold => inline_threshold: usize;
    /// At most this many received messages whose views the application holds.
    with_max_leases_per_peer => max_leases_per_peer: usize;
});

with_fields!(SessionConfig {
    /// The connection's own settings (limits, codecs, timeouts, key, compression).
    with_conn => conn: conn::Config;
    /// Connect and handshake within this long.
    with_connect_timeout => connect_timeout: Duration;
    /// Requests and PINGs wait this long for their answer.
    with_request_timeout => request_timeout: Duration;
    /// At most this many commands queued for the driver, and received messages for `recv`.
    with_max_in_flight => max_in_flight: usize;
    /// How attachments travel.
    with_attach => attach: AttachConfig;
    /// A server's limit on connections at once.
    with_max_connections => max_connections: usize;
    /// A server's limit on bytes pending reassembly across its connections.
    with_server_reassembly_bytes => server_reassembly_bytes: u64;
    /// How streams are opened (epoll or io_uring; TLS).
    with_transport => transport: crate::transport::TransportConfig;
    /// The same-host ring's settings.
    with_ring => ring: crate::transport::ring::RingConfig;
});

impl SessionConfig {
    /// This configuration with its connection's receive limits set to `limits`.
    #[must_use]
    pub fn with_limits(mut self, limits: crate::wire::Limits) -> Self {
        self.conn.limits = limits;
        self
    }

    /// This configuration with I/O mode `io` (epoll, io_uring, or io_uring where available).
    #[must_use]
    pub fn with_io(mut self, io: crate::transport::IoMode) -> Self {
        self.transport.io = io;
        self
    }

    /// This configuration with certificates for `tls://` and `quic://`.
    #[must_use]
    pub fn with_tls(mut self, tls: crate::transport::TlsConfig) -> Self {
        self.transport.tls = Some(tls);
        self
    }
}

impl AttachConfig {
    /// No handles: every attachment travels inline.
    pub fn inline_only() -> Self {
        AttachConfig {
            schemes: Vec::new(),
            ..Self::default()
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            conn: conn::Config::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 4096,
            attach: AttachConfig::default(),
            max_connections: 4096,
            server_reassembly_bytes: 1 << 30,
            transport: crate::transport::TransportConfig::default(),
            ring: crate::transport::ring::RingConfig::default(),
        }
    }
}

struct Inner {
    negotiated: Negotiated,
    pool: Pool,
    alloc_timeout: Duration,
    peer: String,
    request_timeout: Duration,
    cmd: mpsc::Sender<Command>,
    /// The connection itself, for the direct path (see [`core`]).
    core: Arc<core::Core>,
    recv: Mutex<mpsc::Receiver<Incoming>>,
    done: watch::Receiver<bool>,
    shared: Arc<Shared>,
    io: crate::transport::Io,
}

/// One XCP connection. Cloning gives another handle to the same connection; any number of
/// tasks may send, request and receive at once. When the last handle is dropped the
/// connection is closed gracefully.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.inner.peer)
            .field("codecs", &self.inner.negotiated.codecs)
            .field("max_frame_bytes", &self.inner.negotiated.max_frame_bytes)
            .finish()
    }
}

impl Session {
    /// Connects to `url` (`tcp://host:port`, `unix:///path`, or across hosts `tls://host:port`
    /// and `quic://host:port` with `config.transport.tls`) and returns once the handshake
    /// finished. Fails with [`Error::Timeout`] after `connect_timeout`, with
    /// [`Error::Incompatible`] when the peer shares no codec (it NACKs
    /// `ERR_CODEC_UNSUPPORTED`) or speaks a newer major version.
    ///
    /// `ring:///path` connects to the Unix socket `path` and asks for the same-host ring
    /// (SPEC §9): after the handshake every frame goes through shared memory, with no system
    /// call per message ([`Session::io`] says [`Io::Ring`](crate::transport::Io::Ring)). A
    /// peer that does not agree is [`Error::Incompatible`] (`ERR_ATTACHMENT`), never a silent
    /// fall back to the socket.
    pub async fn connect(url: &str, config: SessionConfig) -> Result<Session> {
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let stream =
            match tokio::time::timeout_at(deadline, Stream::connect_with(url, &config.transport))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::timeout(
                        Deadline::Connect,
                        format!(
                            "connect {url}: no connection within {:?}",
                            config.connect_timeout
                        ),
                    ))
                }
            };
        let peer = stream.peer_label();
        let ask_ring = matches!(
            crate::transport::Url::parse(url)?,
            crate::transport::Url::Ring(_)
        );
        let session = start(
            stream,
            peer,
            Role::Initiator,
            &config,
            deadline,
            None,
            ask_ring,
        )
        .await?;
        if ask_ring && !session.inner.negotiated.ring {
            // Asked for by name: no silent fall back to the socket.
            return Err(Error::Incompatible {
                code: ErrorCode::ERR_ATTACHMENT,
                detail: format!(
                    "{url}: the peer does not offer the same-host ring (SPEC §9); connect with \
                     unix:// to use the socket alone"
                ),
            });
        }
        Ok(session)
    }

    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.inner.negotiated
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// The kernel interface that moves this connection's bytes (what `auto` settled on).
    pub fn io(&self) -> crate::transport::Io {
        self.inner.io
    }

    /// Sends a message; returns its msgId once it is queued (the body is chunked to the
    /// negotiated `max_frame_bytes`). Waits while too much is queued already.
    ///
    /// A small message on a plain TCP or Unix socket with nothing queued ahead of it is written
    /// to the socket by the calling task itself, before this returns.
    pub async fn send(&self, msg: Outgoing) -> Result<u64> {
        let msg = match self.send_direct(msg, None) {
            Ok(r) => return r,
            Err((msg, _)) => msg,
        };
        let (done, rx) = oneshot::channel();
        self.command(Command::Send { msg, done }).await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Sends `e` as a DATA message encoded with `codec` (JSON or PROTOBUF).
    pub async fn send_ether(&self, e: &Ether, codec: CodecId) -> Result<u64> {
        self.send(Outgoing::ether(e, codec)?).await
    }

    /// Sends `msg` and waits for the reply: the message whose `inReplyTo` is our msgId. A NACK
    /// of the message is [`Error::Nack`]; no reply within `request_timeout` is
    /// [`Error::Timeout`]; the end of the connection is [`Error::Closed`].
    pub async fn request(&self, msg: Outgoing) -> Result<Incoming> {
        let (done, rx) = oneshot::channel();
        match self.send_direct(msg, Some(done)) {
            Ok(r) => {
                r?;
            }
            Err((msg, done)) => {
                let done = done.expect("send_direct hands the waiter back");
                self.command(Command::Request { msg, done }).await?;
            }
        }
        self.await_reply(rx).await
    }

    /// The direct path (see [`core`]): encodes `msg` and writes it from this task when the
    /// connection allows it now, registering `reply` as its request's waiter. `Err` hands
    /// both back: queue them.
    #[allow(clippy::type_complexity)]
    fn send_direct(
        &self,
        msg: Outgoing,
        reply: Option<core::ReplyTx>,
    ) -> std::result::Result<Result<u64>, (Outgoing, Option<core::ReplyTx>)> {
        if msg.body.len() > core::DIRECT_MAX {
            return Err((msg, reply));
        }
        let Some(mut d) = self.inner.core.direct() else {
            return Err((msg, reply));
        };
        let sent = match reply {
            Some(tx) => d.request(msg, tx).map_err(|(e, _)| e),
            None => d.conn.send(msg),
        };
        // Dropping the guard writes the frames.
        drop(d);
        Ok(sent)
    }

    /// The reply a request's waiter gets, within `request_timeout`.
    async fn await_reply(&self, rx: oneshot::Receiver<Result<Incoming>>) -> Result<Incoming> {
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(r) => r.map_err(|_| self.closed())?,
            Err(_) => Err(Error::timeout(
                Deadline::Reply,
                format!(
                    "request to {}: no reply within {:?}",
                    self.inner.peer, self.inner.request_timeout
                ),
            )),
        }
    }

    /// The next message that is not a reply to one of our pending requests. After the
    /// connection ended, and every message received before was delivered, this is
    /// [`Error::Closed`] saying why.
    pub async fn recv(&self) -> Result<Incoming> {
        let mut rx = self.inner.recv.lock().await;
        match rx.recv().await {
            Some(m) => Ok(m),
            None => Err(self.closed()),
        }
    }

    /// Sends `msg` as the reply to `to` (sets `inReplyTo` and uses the same channel).
    pub async fn reply(&self, to: &Incoming, msg: Outgoing) -> Result<u64> {
        self.send(msg.reply_to(to.msg_id()).on_channel(to.header.channel_id))
            .await
    }

    /// Sends a PING and returns the round-trip time when the PONG arrives (bounded by
    /// `request_timeout`).
    pub async fn ping(&self) -> Result<Duration> {
        let (done, rx) = oneshot::channel();
        let queued = match self.inner.core.direct() {
            Some(mut d) => {
                d.ping(done).map_err(|(e, _)| e)?;
                None
            }
            None => Some(done),
        };
        if let Some(done) = queued {
            self.command(Command::Ping { done }).await?;
        }
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(r) => r.map_err(|_| self.closed())?,
            Err(_) => Err(Error::timeout(
                Deadline::Reply,
                format!(
                    "ping {}: no PONG within {:?}",
                    self.inner.peer, self.inner.request_timeout
                ),
            )),
        }
    }

    /// Acknowledges the peer's message `msg_id` (ACK).
    pub async fn ack(&self, msg_id: u64) -> Result<()> {
        if let Some(mut d) = self.inner.core.direct() {
            return d.conn.ack(msg_id);
        }
        let (done, rx) = oneshot::channel();
        self.command(Command::Ack { msg_id, done }).await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Refuses the peer's message `msg_id` (NACK with `code`).
    pub async fn nack(
        &self,
        msg_id: u64,
        code: ErrorCode,
        retry_after_ms: u32,
        detail: &str,
    ) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Nack {
            msg_id,
            code,
            retry_after_ms,
            detail: detail.to_string(),
            done,
        })
        .await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Loans a writable region of `len` bytes from this session's pool of shared segments
    /// (memfd on a Unix socket that negotiated it, else POSIX shm). Fill it in place, then send
    /// it with [`Session::send_regions`]; it returns to the pool when the peer ACKs. When the
    /// pool is full this waits (`alloc_timeout`) for regions to come back, then fails with
    /// `ERR_BUSY`. Works whatever was negotiated: without handles the bytes go inline.
    pub async fn alloc(&self, len: usize) -> Result<Region> {
        self.inner.pool.alloc(len, self.inner.alloc_timeout).await
    }

    /// The pool [`Session::alloc`] loans from.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Sends `ether` with each region as an attachment: by handle (`shm://` or `memfd://` in
    /// the attachment's `uri`) when negotiated and the region is at least `inline_threshold`
    /// bytes, else inline. Each `Attachment` gives the metadata (id, media type, codec, shape,
    /// dtype); `uri`, `size_bytes` and `inline_bytes` are filled in here. The regions stay
    /// loaned until the peer ACKs the message (it does when it drops its views); if the peer
    /// refuses the handles (`ERR_ATTACHMENT`), the same message is sent again inline and the
    /// session uses inline bytes from then on.
    pub async fn send_regions(
        &self,
        ether: Ether,
        codec: CodecId,
        regions: Vec<(Attachment, Region)>,
    ) -> Result<u64> {
        let (done, rx) = oneshot::channel();
        self.command(Command::SendAttached {
            ether,
            codec,
            regions,
            reply: None,
            done,
        })
        .await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// [`Session::send_regions`], then waits for the reply, as [`Session::request`] does.
    pub async fn request_regions(
        &self,
        ether: Ether,
        codec: CodecId,
        regions: Vec<(Attachment, Region)>,
    ) -> Result<Incoming> {
        let (done, sent) = oneshot::channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.command(Command::SendAttached {
            ether,
            codec,
            regions,
            reply: Some(reply_tx),
            done,
        })
        .await?;
        sent.await.map_err(|_| self.closed())??;
        self.await_reply(reply_rx).await
    }

    /// Sends a DLPACK tensor whose bytes are `region`: the body is `desc` with its data set to
    /// the region's handle URI (or to the bytes inline, as for [`Session::send_regions`]).
    /// The receiver gets the bytes as `Incoming::view(DLPACK_VIEW)`, and
    /// [`Incoming::dlpack`] gives a descriptor ready for the DLPack C ABI without a copy.
    pub async fn send_dlpack(&self, desc: DlpackDescriptor, region: Region) -> Result<u64> {
        let (done, rx) = oneshot::channel();
        self.command(Command::SendDlpack { desc, region, done })
            .await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Sends `ether` with device memory attached by handle (feature `cuda`): each
    /// [`DeviceExport`](crate::attach::cuda::DeviceExport) becomes its attachment's
    /// `cuda-ipc://` URI (SPEC §7), and the session keeps the export (its IPC event) until the
    /// peer ACKs, which it does when it drops its [`DeviceView`](crate::attach::cuda::DeviceView)s.
    /// Each `Attachment` gives the metadata; `uri` and `size_bytes` are filled in here. Keep the
    /// memory itself alive and unchanged until then too.
    ///
    /// There is no silent fallback: without `cuda-ipc` negotiated (a peer without a GPU,
    /// another host) this is `ERR_ATTACHMENT`, and a peer that cannot open the handle (another
    /// PID/IPC namespace or device set) answers NACK `ERR_ATTACHMENT`, which comes back as the
    /// error of [`Session::request_device`] (a plain send logs it).
    ///
    /// ```no_run
    /// # async fn f(s: xcp::Session, cuda: std::sync::Arc<xcp::attach::cuda::Cuda>, ptr: u64) -> xcp::Result<()> {
    /// use xcp::{codec::CodecId, ether::Attachment, Ether};
    /// let export = cuda.export(ptr, 1 << 20, None)?; // after the writes queued on cuda.stream()
    /// let att = Attachment { id: "kv".into(), dtype: "float32".into(), ..Default::default() };
    /// let reply = s
    ///     .request_device(Ether::new("kv.block", Default::default()), CodecId::JSON, vec![(att, export)])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cuda")]
    pub async fn send_device(
        &self,
        ether: Ether,
        codec: CodecId,
        exports: Vec<(Attachment, crate::attach::cuda::DeviceExport)>,
    ) -> Result<u64> {
        let (msg, held) = self.device_message(ether, codec, exports)?;
        let (done, rx) = oneshot::channel();
        self.command(Command::SendHeld {
            msg,
            held,
            reply: None,
            done,
        })
        .await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// [`Session::send_device`], then waits for the reply, as [`Session::request`] does.
    #[cfg(feature = "cuda")]
    pub async fn request_device(
        &self,
        ether: Ether,
        codec: CodecId,
        exports: Vec<(Attachment, crate::attach::cuda::DeviceExport)>,
    ) -> Result<Incoming> {
        let (msg, held) = self.device_message(ether, codec, exports)?;
        let (done, sent) = oneshot::channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.command(Command::SendHeld {
            msg,
            held,
            reply: Some(reply_tx),
            done,
        })
        .await?;
        sent.await.map_err(|_| self.closed())??;
        self.await_reply(reply_rx).await
    }

    /// The Ether of [`Session::send_device`] and what its lease holds.
    #[cfg(feature = "cuda")]
    #[allow(clippy::type_complexity)]
    fn device_message(
        &self,
        mut ether: Ether,
        codec: CodecId,
        exports: Vec<(Attachment, crate::attach::cuda::DeviceExport)>,
    ) -> Result<(Outgoing, Vec<Box<dyn std::any::Any + Send>>)> {
        let n = &self.inner.negotiated;
        if !(n.shared_mem && n.attach.contains(&Scheme::CudaIpc)) {
            return Err(Error::attachment(format!(
                "cuda-ipc was not negotiated with {} (negotiated: {:?}): device memory \
                     cannot go by handle; copy it to the host and send it inline if that is \
                     what you want",
                self.inner.peer, n.attach
            )));
        }
        let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::with_capacity(exports.len());
        for (mut att, ex) in exports {
            att.uri = ex.uri().to_string();
            att.size_bytes = ex.uri().size();
            att.inline_bytes = None;
            ether.attachments.push(att);
            held.push(Box::new(ex));
        }
        Ok((Outgoing::ether(&ether, codec)?, held))
    }

    /// Closes gracefully: what was sent before is flushed, the write side is shut down, and
    /// this waits (up to a few seconds) for the driver to finish. Closing a closed session is
    /// not an error.
    pub async fn close(&self) -> Result<()> {
        // A closed channel means the driver is already over.
        let _ = self.inner.cmd.send(Command::Close).await;
        let mut done = self.inner.done.clone();
        let finished = tokio::time::timeout(LINGER * 2, async {
            // Err: the driver dropped its side, which also means it is over.
            let _ = done.wait_for(|d| *d).await;
        })
        .await
        .is_ok();
        match finished {
            true => Ok(()),
            false => Err(Error::timeout(
                Deadline::Close,
                format!(
                    "close {}: the connection did not finish within {:?}",
                    self.inner.peer,
                    LINGER * 2
                ),
            )),
        }
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        *self.inner.done.borrow() || self.inner.cmd.is_closed()
    }

    async fn command(&self, cmd: Command) -> Result<()> {
        self.inner.cmd.send(cmd).await.map_err(|_| self.closed())
    }

    fn closed(&self) -> Error {
        self.inner.shared.closed_error()
    }
}

/// Starts the driver of a new connection and waits for its handshake until `deadline`.
async fn start(
    stream: Stream,
    peer: String,
    role: Role,
    config: &SessionConfig,
    deadline: tokio::time::Instant,
    guard: Option<ConnGuard>,
    ask_ring: bool,
) -> Result<Session> {
    let cap = config.max_in_flight.max(1);
    let (cmd_tx, cmd_rx) = mpsc::channel(cap);
    let (recv_tx, recv_rx) = mpsc::channel(cap);
    let (connected_tx, connected_rx) = oneshot::channel();
    let (done_tx, done_rx) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let unix = stream.is_unix();
    let mut io = if stream.is_uring() {
        crate::transport::Io::Uring
    } else {
        crate::transport::Io::Epoll
    };
    // The ring replaces a plain (epoll) Unix socket, whose descriptor its wake-ups then use.
    let ring_capable = matches!(stream, Stream::Unix(_));
    // Across hosts (TLS, QUIC) no handle can work: everything goes inline, chunked.
    let remote = stream.is_remote();
    let offered: Vec<Scheme> = config
        .attach
        .schemes
        .iter()
        .copied()
        .filter(|s| {
            s.handler()
                .negotiate(crate::attach::scheme::Link { unix, remote })
        })
        .collect();
    let mut conn_config = config.conn.clone();
    if !offered.is_empty() {
        conn_config.shared_mem = true;
        conn_config.attach = offered.clone();
        conn_config.host_id = crate::attach::host_id().to_string();
        conn_config.shm_prefix = crate::attach::process_prefix().to_string();
    }
    conn_config.ring = ring_capable
        && match role {
            Role::Initiator => ask_ring,
            Role::Responder => config.ring.offer,
        };
    // The ring's memfd comes with CAPS.
    let fd_reads = offered.contains(&Scheme::Memfd) || conn_config.ring;
    let conn = Connection::new(role, conn_config, Instant::now());
    let core = Arc::new(core::Core::new(conn));
    let task = tokio::spawn(driver::run(
        stream,
        peer.clone(),
        Channels {
            core: core.clone(),
            cmd_rx,
            recv_tx,
            connected: connected_tx,
            done: done_tx,
            shared: shared.clone(),
            fd_reads,
            inline_threshold: config.attach.inline_threshold,
            max_leases: config.attach.max_leases_per_peer,
            guard,
            ring: config.ring.clone(),
        },
    ));
    let negotiated = match tokio::time::timeout_at(deadline, connected_rx).await {
        Ok(Ok(Ok(n))) => n,
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(_)) => {
            return Err(Error::closed(
                CloseReason::Handshake,
                format!("{peer}: the connection ended during the handshake"),
            ))
        }
        Err(_) => {
            task.abort();
            return Err(Error::timeout(
                Deadline::Connect,
                format!("{peer}: no handshake within {:?}", config.connect_timeout),
            ));
        }
    };
    if negotiated.ring {
        io = crate::transport::Io::Ring;
    }
    // Regions come from memfd when the peer takes memfd (or when no handle was negotiated:
    // then they are plain memory with no name in /dev/shm), else from POSIX shm.
    let scheme = if negotiated.attach.contains(&Scheme::Memfd)
        || !negotiated.attach.contains(&Scheme::Shm)
    {
        Scheme::Memfd
    } else {
        Scheme::Shm
    };
    let pool = Pool::new(PoolConfig::new(scheme, config.attach.pool_cap_bytes));
    Ok(Session {
        inner: Arc::new(Inner {
            negotiated,
            pool,
            alloc_timeout: config.attach.alloc_timeout,
            peer,
            request_timeout: config.request_timeout,
            cmd: cmd_tx,
            core,
            recv: Mutex::new(recv_rx),
            done: done_rx,
            shared,
            io,
        }),
    })
}

/// A listening socket that accepts XCP connections. Handshakes run concurrently, one task per
/// connection; [`Server::accept`] returns the sessions whose handshake completed. Dropping the
/// server stops accepting (sessions already accepted live on) and removes a Unix socket file.
pub struct Server {
    local_url: String,
    sessions: Mutex<mpsc::Receiver<Session>>,
    accept_task: JoinHandle<()>,
    socket_file: Option<Arc<SocketFile>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_url", &self.local_url)
            .finish()
    }
}

/// Sessions that finished their handshake and wait for [`Server::accept`].
const ACCEPT_QUEUE: usize = 128;

impl Server {
    /// Binds `url` (`tcp://host:port`, port 0 for any; `unix:///path`; `tls://host:port` or
    /// `quic://host:port` with `config.transport.tls`) and starts accepting. `ring:///path`
    /// binds the Unix socket `path`: a server on a Unix socket agrees to the same-host ring
    /// whenever a client asks (and [`SessionConfig::ring`] offers it, the default); its
    /// [`Server::local_url`] then says `ring://`.
    pub async fn bind(url: &str, config: SessionConfig) -> Result<Server> {
        let ring = config.transport.ring_for_io()?;
        let listener = Listener::bind_with(url, &config.transport).await?;
        let mut local_url = listener.local_url();
        if let crate::transport::Url::Ring(_) = crate::transport::Url::parse(url)? {
            // Bound as a Unix socket; clients of this URL ask for the ring.
            if let Some(path) = local_url.strip_prefix("unix://") {
                local_url = format!("ring://{path}");
            }
        }
        let socket_file = listener.socket_file();
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let accept_task = tokio::spawn(accept_loop(listener, config, ring, tx));
        tracing::info!("listening on {local_url}");
        Ok(Server {
            local_url,
            sessions: Mutex::new(rx),
            accept_task,
            socket_file,
        })
    }

    /// The URL really bound (with the real port when bound to port 0).
    pub fn local_url(&self) -> String {
        self.local_url.clone()
    }

    /// The next connection whose handshake completed. Connections that fail their handshake
    /// are logged and never returned.
    pub async fn accept(&self) -> Result<Session> {
        let mut rx = self.sessions.lock().await;
        rx.recv().await.ok_or_else(|| {
            Error::closed(
                CloseReason::ServerStopped,
                format!("server {} stopped accepting", self.local_url),
            )
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Some(f) = &self.socket_file {
            f.remove();
        }
    }
}

/// Counts a server's live connection until dropped (with its driver).
pub(crate) struct ConnGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Refuses a connection beyond `max_connections`: NACK `ERR_BUSY` with a retry hint, then
/// close (bounded in time).
async fn refuse_busy(mut stream: Stream, peer: String, retry_after_ms: u32, live: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nack = crate::control::Control::Nack(crate::control::Nack {
        msg_id: 0,
        error_code: ErrorCode::ERR_BUSY,
        retry_after_ms,
        detail: Some(format!("server busy: {live} connections")),
    });
    let hdr = crate::wire::FrameHeader {
        msg_type: crate::wire::MsgType::NACK,
        body_codec: CodecId::JSON,
        msg_id: 1,
        ..Default::default()
    };
    let frame = nack.encode(CodecId::JSON).and_then(|body| {
        crate::wire::frame::encode(
            &hdr,
            crate::wire::HeaderForm::Capnp,
            crate::wire::Flags::NONE,
            body,
        )
    });
    ratelog::peer_log_global!(
        INFO,
        "{peer}: refused, {live} connections already (max_connections)"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if let Ok(f) = frame {
            stream.write_all(&f.to_vec()).await?;
        }
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Accepts connections; with `ring`, each one is handed to io_uring once accepted (all of a
/// server's connections share its ring).
async fn accept_loop(
    listener: Listener,
    config: SessionConfig,
    ring: Option<crate::transport::uring::Ring>,
    tx: mpsc::Sender<Session>,
) {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut config = config;
    if config.conn.reassembly_budget.is_none() {
        config.conn.reassembly_budget = Some(crate::wire::chunk::ReassemblyBudget::new(
            config.server_reassembly_bytes,
        ));
    }
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like (a connection flood): wait a
                    // little, keep serving.
                    ratelog::peer_log_global!(WARN, "accept on {}: {e}", listener.local_url());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        tracing::debug!("accepted {peer}");
        let now_live = live.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let guard = ConnGuard(live.clone());
        if now_live >= config.max_connections {
            let retry = config.conn.busy_retry_after_ms;
            tokio::spawn(async move {
                refuse_busy(stream, peer, retry, now_live).await;
                drop(guard);
            });
            continue;
        }
        let stream = match stream.with_ring(ring.clone()) {
            Ok(s) => s,
            Err(e) => {
                ratelog::peer_log_global!(
                    WARN,
                    "{peer}: could not hand the connection to io_uring: {e}"
                );
                continue;
            }
        };
        let config = config.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + config.connect_timeout;
            match start(
                stream,
                peer.clone(),
                Role::Responder,
                &config,
                deadline,
                Some(guard),
                false,
            )
            .await
            {
                Ok(session) => {
                    // If the server is gone, dropping the session closes it.
                    let _ = tx.send(session).await;
                }
                Err(e) => ratelog::peer_log_global!(INFO, "{peer}: handshake failed: {e}"),
            }
        });
    }
}
