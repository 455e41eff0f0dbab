//! The driver: one tokio task per connection that moves bytes between a [`Stream`] and a
//! sans-IO [`Connection`].
//!
//! It reads, writes, takes commands from the [`Session`](super::Session) handles and runs the
//! connection's timers in one `select!` loop, so reading and writing never wait on each other
//! (two peers that both send a lot cannot deadlock). Every branch of that loop is cancel-safe:
//! a single `write_vectored` (or a flush of what TLS held back), a single `read_buf`, an mpsc
//! `recv`/`reserve`, a sleep.
//!
//! Back-pressure:
//! - **outgoing**: commands are taken from the bounded command channel only while fewer than
//!   `OUT_HIGH_WATER` bytes wait to be written, so senders wait when the socket is slow
//!   (beyond it, one more message is taken per channel that has a single one waiting, for at
//!   most `MAX_STAGED_CHANNELS` channels: see the next point);
//! - **fairness between channels**: the frames of the application's messages wait per channel
//!   and enter the write queue round-robin, one frame per channel in turn, while it holds less
//!   than `FEED_TARGET` bytes. A long message on one channel therefore delays a message on
//!   another by a few frames, not by its whole length (SPEC §4: chunks of different messages
//!   interleave; the frames of one channel keep their order). The connection's own frames
//!   (ACK, NACK, PONG, handshake) skip that wait;
//! - **incoming**: messages go to a bounded channel; when it is full the driver stops reading
//!   the socket (TCP / socket-buffer back-pressure on the peer) instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::attach::map::Released;
use crate::attach::uri::{AttachmentUri, Target};
use crate::attach::{Lease, Mapper, Region, Scheme};
use crate::codec::dlpack::{DlData, DlpackDescriptor};
use crate::codec::CodecId;
use crate::conn::{Event, Incoming, Negotiated, Outgoing};
use crate::error::{CloseReason, Deadline, Error, ErrorCode, Result, Violation};
use crate::ether::{Attachment, Ether};
use crate::transport::ring::{self, RingConfig, RingMemory};
use crate::transport::{ReadHalf, Stream, WriteHalf};
use crate::wire::frame::EncodedFrame;

use super::core::{Core, CoreState};
use super::ratelog::{peer_log, PeerLog, PEER_FAULTS};

/// Bytes read per call at least.
const READ_CHUNK: usize = 64 * 1024;
/// Frames up to this size are copied into one buffer so several go out in one write; larger
/// payloads are written from their own `Bytes`, never copied.
const COALESCE_MAX: usize = 16 * 1024;
/// The most buffers handed to one `write_vectored`.
const MAX_IOVECS: usize = 64;
/// Stop taking commands while this many bytes wait to be written.
pub(crate) const OUT_HIGH_WATER: usize = 8 << 20;
/// Staged frames move to the write queue while it holds less than this (a few frames of the
/// negotiated size: enough to keep the socket busy, little for another channel to wait on).
const FEED_TARGET: usize = 2 << 20;
/// Beyond `OUT_HIGH_WATER`, a message is still taken while fewer channels than this have
/// frames staged and none has more than one message staged.
const MAX_STAGED_CHANNELS: usize = 16;
/// How long closing may take: flushing the last frames, then waiting for the peer's EOF.
pub(crate) const LINGER: Duration = Duration::from_secs(5);
/// After reading resumes (the application caught up), timers wait this long for the next read,
/// so a frame left half-read while we were not reading does not count as a peer stall.
const RESUME_GRACE: Duration = Duration::from_secs(1);

/// What a [`Session`](super::Session) handle asks of the driver.
pub(crate) enum Command {
    Send {
        msg: Outgoing,
        done: oneshot::Sender<Result<u64>>,
    },
    Request {
        msg: Outgoing,
        done: oneshot::Sender<Result<Incoming>>,
    },
    Ping {
        done: oneshot::Sender<Result<Duration>>,
    },
    Ack {
        msg_id: u64,
        done: oneshot::Sender<Result<()>>,
    },
    Nack {
        msg_id: u64,
        code: ErrorCode,
        retry_after_ms: u32,
        detail: String,
        done: oneshot::Sender<Result<()>>,
    },
    SendAttached {
        ether: Ether,
        codec: CodecId,
        regions: Vec<(Attachment, Region)>,
        reply: Option<oneshot::Sender<Result<Incoming>>>,
        done: oneshot::Sender<Result<u64>>,
    },
    /// Sends `msg`, whose handles need `held` alive until the peer ACKs (device exports).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    SendHeld {
        msg: Outgoing,
        held: Vec<Box<dyn std::any::Any + Send>>,
        reply: Option<oneshot::Sender<Result<Incoming>>>,
        done: oneshot::Sender<Result<u64>>,
    },
    SendDlpack {
        desc: DlpackDescriptor,
        region: Region,
        done: oneshot::Sender<Result<u64>>,
    },
    Close,
}

/// While more than this many bytes of the connection's own frames (PONGs, NACKs, ACKs) wait to
/// be written, the socket is not read: the peer that provokes them without reading them is
/// slowed, not buffered for.
const PROTO_BACKLOG: usize = 4 << 20;

/// The id under which the data of a DLPACK body that came by handle appears in
/// [`Incoming::views`].
pub const DLPACK_VIEW: &str = "dlpack";

/// Descriptors that came with one read. The kernel ends a read right after the data that
/// carried descriptors, and a sender attaches them to the first byte of a message's first
/// frame, so they belong to the message whose first frame starts in `start..end`.
struct FdGroup {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

impl FdGroup {
    /// A group from the ring's socket: it names the stream position of its frame's first
    /// byte exactly (see `RingRead::take_fds`).
    fn of_ring((pos, fds): (u64, Vec<OwnedFd>)) -> FdGroup {
        FdGroup {
            start: pos,
            end: pos + 1,
            fds,
        }
    }
}

/// Descriptors received but not yet claimed by a `memfd://` attachment, at most.
const MAX_PENDING_FDS: usize = 64;

/// A message of ours whose attachments went by handle: its regions stay loaned until the
/// peer ACKs; the rest is kept to resend inline if the peer refuses the handles.
struct SentLease {
    body: LeasedBody,
    channel_id: u32,
    /// Each region with the index of its attachment (0 for a DLPACK body).
    regions: Vec<(usize, Region)>,
    /// What else stays alive until the ACK: device exports (their IPC events). Only dropped.
    _held: Vec<Box<dyn std::any::Any + Send>>,
}

/// What a leased message carried.
enum LeasedBody {
    Ether {
        ether: Ether,
        codec: CodecId,
    },
    Dlpack {
        desc: DlpackDescriptor,
    },
    /// Handles with no inline form (device memory): a refusal fails the message.
    Held,
}

impl LeasedBody {
    /// The message with every region's bytes inline.
    fn inline(mut self, regions: &[(usize, Region)]) -> Result<Outgoing> {
        match &mut self {
            LeasedBody::Ether { ether, codec } => {
                for (i, region) in regions {
                    if let Some(att) = ether.attachments.get_mut(*i) {
                        att.uri.clear();
                        att.inline_bytes = Some(Bytes::copy_from_slice(region));
                    }
                }
                Outgoing::ether(ether, *codec)
            }
            LeasedBody::Dlpack { desc } => {
                if let Some((_, region)) = regions.first() {
                    desc.data = DlData::Inline(Bytes::copy_from_slice(region));
                }
                Ok(Outgoing::data(CodecId::DLPACK, desc.encode()?))
            }
            LeasedBody::Held => Err(Error::attachment("device memory has no inline form")),
        }
    }
}

/// State shared between the driver and the handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Why the connection ended, once it has, and the same in words.
    pub(crate) close_reason: Mutex<Option<(CloseReason, String)>>,
}

impl Shared {
    pub(crate) fn closed_error(&self) -> Error {
        let reason = match self.close_reason.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match reason {
            Some((why, words)) => Error::closed(why, words),
            None => Error::closed(CloseReason::Local, "connection is closed"),
        }
    }

    fn set_reason(&self, reason: (CloseReason, String)) {
        let mut g = match self.close_reason.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none() {
            *g = Some(reason);
        }
    }
}

/// The channels a driver is started with.
pub(crate) struct Channels {
    pub(crate) core: Arc<Core>,
    pub(crate) cmd_rx: mpsc::Receiver<Command>,
    pub(crate) recv_tx: mpsc::Sender<Incoming>,
    pub(crate) connected: oneshot::Sender<Result<Negotiated>>,
    pub(crate) done: watch::Sender<bool>,
    pub(crate) shared: Arc<Shared>,
    /// Read with `recvmsg` so descriptors passed by the peer are kept (memfd offered).
    pub(crate) fd_reads: bool,
    /// Regions below this size go inline.
    pub(crate) inline_threshold: usize,
    /// The most received messages with views outstanding.
    pub(crate) max_leases: usize,
    /// A server's connection count, released when the driver ends.
    pub(crate) guard: Option<super::ConnGuard>,
    /// The same-host ring's settings, used when CAPS turns it on.
    pub(crate) ring: RingConfig,
}

/// One staged message: its frames, the first with the descriptors it carries.
type StagedMessage = VecDeque<(EncodedFrame, Vec<OwnedFd>)>;

/// The application's frames waiting for the write queue, per channel (see the module docs).
#[derive(Default)]
struct Staged {
    /// Channels with frames staged, in turn order (each once).
    turn: VecDeque<u32>,
    /// Each channel's staged messages, oldest first.
    queues: HashMap<u32, VecDeque<StagedMessage>>,
    /// Channels with more than one message staged.
    crowded: usize,
    bytes: usize,
}

impl Staged {
    fn push(&mut self, channel: u32, msg: StagedMessage) {
        if msg.is_empty() {
            return;
        }
        self.bytes += msg.iter().map(|(f, _)| f.len()).sum::<usize>();
        let q = self.queues.entry(channel).or_default();
        if q.is_empty() {
            self.turn.push_back(channel);
        }
        q.push_back(msg);
        if q.len() == 2 {
            self.crowded += 1;
        }
    }

    /// The next frame in turn: the oldest frame of the next channel.
    fn pop(&mut self) -> Option<(EncodedFrame, Vec<OwnedFd>)> {
        let channel = self.turn.pop_front()?;
        let q = self.queues.get_mut(&channel)?;
        let msg = q.front_mut()?;
        let frame = msg.pop_front()?;
        if msg.is_empty() {
            q.pop_front();
            if q.len() == 1 {
                self.crowded -= 1;
            }
        }
        if q.is_empty() {
            self.queues.remove(&channel);
        } else {
            self.turn.push_back(channel);
        }
        self.bytes -= frame.0.len();
        Some(frame)
    }

    fn is_empty(&self) -> bool {
        self.turn.is_empty()
    }

    /// Whether one more message may be taken past `OUT_HIGH_WATER`: a message for a channel
    /// with nothing staged must not wait for another channel's long one.
    fn admits_more(&self) -> bool {
        self.crowded == 0 && self.turn.len() < MAX_STAGED_CHANNELS
    }
}

/// Frames waiting to be written: frozen segments, then a tail where small frames coalesce.
#[derive(Default)]
struct OutQueue {
    segs: VecDeque<Bytes>,
    tail: BytesMut,
    bytes: usize,
    /// Descriptors to send with the first byte of `segs[0]` (it starts a frame).
    front_fds: Vec<OwnedFd>,
    /// Descriptor sets waiting for their frame to reach the front: (segments before it, fds).
    later_fds: VecDeque<(usize, Vec<OwnedFd>)>,
}

impl OutQueue {
    /// Queues a frame whose first byte must carry `fds` (`SCM_RIGHTS`).
    fn push_with_fds(&mut self, f: EncodedFrame, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return self.push(f);
        }
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.segs.push_back(tail);
        }
        if self.segs.is_empty() && self.front_fds.is_empty() {
            self.front_fds = fds;
        } else {
            self.later_fds.push_back((self.segs.len(), fds));
        }
        self.bytes += f.len();
        self.segs.push_back(f.head);
        if !f.payload.is_empty() {
            self.segs.push_back(f.payload);
        }
        self.tail.put_slice(&f.trailer);
    }

    /// Queues bytes that continue a frame begun elsewhere (a caller's direct write).
    fn push_bytes(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.segs.push_back(tail);
        }
        self.bytes += b.len();
        self.segs.push_back(b);
    }

    fn push(&mut self, f: EncodedFrame) {
        self.bytes += f.len();
        if f.len() <= COALESCE_MAX {
            self.tail.reserve(f.len());
            self.tail.put_slice(&f.head);
            self.tail.put_slice(&f.payload);
            self.tail.put_slice(&f.trailer);
            return;
        }
        self.tail.put_slice(&f.head);
        let tail = self.tail.split().freeze();
        self.segs.push_back(tail);
        if !f.payload.is_empty() {
            self.segs.push_back(f.payload);
        }
        self.tail.put_slice(&f.trailer);
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Freezes the coalescing tail into a segment, so every queued byte is in a `Bytes` that
    /// an io_uring send can own while the kernel has it.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.segs.push_back(tail);
        }
    }

    /// The segments of the next write, as shared `Bytes` (after [`OutQueue::seal_tail`]).
    fn owned(&self) -> Vec<Bytes> {
        let limit = self
            .later_fds
            .front()
            .map_or(MAX_IOVECS, |(at, _)| (*at).clamp(1, MAX_IOVECS));
        self.segs.iter().take(limit).cloned().collect()
    }

    /// The descriptors to send with the next write, if any.
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.front_fds.iter().map(|f| f.as_fd()).collect()
    }

    fn slices(&self) -> Vec<IoSlice<'_>> {
        // A later frame's descriptors must go with its own first byte: stop the write there.
        let limit = self
            .later_fds
            .front()
            .map_or(MAX_IOVECS, |(at, _)| (*at).clamp(1, MAX_IOVECS));
        let mut v: Vec<IoSlice<'_>> = self
            .segs
            .iter()
            .take(limit)
            .map(|b| IoSlice::new(b))
            .collect();
        if v.len() < limit && self.later_fds.is_empty() && !self.tail.is_empty() {
            v.push(IoSlice::new(&self.tail));
        }
        v
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n.min(self.bytes);
        if n > 0 {
            // They went with the first byte written.
            self.front_fds.clear();
        }
        while n > 0 {
            match self.segs.front_mut() {
                Some(front) if front.len() <= n => {
                    n -= front.len();
                    self.segs.pop_front();
                    for (at, _) in self.later_fds.iter_mut() {
                        *at -= 1;
                    }
                    if self.later_fds.front().is_some_and(|(at, _)| *at == 0) {
                        if let Some((_, fds)) = self.later_fds.pop_front() {
                            self.front_fds = fds;
                        }
                    }
                }
                Some(front) => {
                    front.advance(n);
                    return;
                }
                None => {
                    let k = n.min(self.tail.len());
                    self.tail.advance(k);
                    return;
                }
            }
        }
    }
}

/// What one turn of the driver loop did.
#[allow(clippy::large_enum_variant)] // one per loop turn, on the stack
enum Step {
    Wrote(std::io::Result<Written>),
    Read(std::io::Result<usize>),
    Delivered,
    ReceiverGone,
    Command(Option<Command>),
    Release(Option<Released>),
    /// A caller left bytes for us to write.
    Woken,
    Timer,
}

struct Driver {
    /// The connection and the reply waiters, shared with the handles (see [`super::core`]).
    core: Arc<Core>,
    peer: String,
    rd: ReadHalf,
    wr: WriteHalf,
    rbuf: BytesMut,
    out: OutQueue,
    /// The application's frames not yet in `out`.
    staged: Staged,
    backlog: VecDeque<Incoming>,
    recv_tx: mpsc::Sender<Incoming>,
    cmd_rx: mpsc::Receiver<Command>,
    cmd_open: bool,
    connected: Option<oneshot::Sender<Result<Negotiated>>>,
    close_error: Option<Error>,
    /// The peer closed its write side.
    eof: bool,
    /// The socket failed; nothing more can be written or read.
    broken: bool,
    /// Timers wait until then (or the next read) after reading resumed.
    timer_hold: Option<Instant>,
    /// Set when the connection closed: the last frames must be out by then.
    flush_deadline: Option<Instant>,
    /// Bytes were written to a transport that may keep some of them (TLS: a write returns once
    /// rustls took the bytes, though the socket may not have), and no flush has finished since.
    unflushed: bool,
    fd_reads: bool,
    scratch: Vec<u8>,
    /// Descriptors received, waiting for the `memfd://` attachments of their message, with
    /// the stream range of the read that brought them.
    fds: VecDeque<FdGroup>,
    /// Bytes read from the peer so far.
    rx_total: u64,
    /// Maps the peer's segments (set once handles are negotiated).
    mapper: Option<Mapper>,
    /// Leases of received messages report here when their last view is dropped.
    release_tx: mpsc::UnboundedSender<Released>,
    release_rx: mpsc::UnboundedReceiver<Released>,
    /// Our messages whose regions wait for the peer's ACK.
    leases: HashMap<u64, SentLease>,
    /// Handle schemes both sides take (empty after the peer refused a handle).
    handle_schemes: Vec<Scheme>,
    inline_threshold: usize,
    /// Bytes of the connection's own frames queued since the write queue was last empty.
    proto_bytes: usize,
    /// Received messages whose views are still held, and the bound on them.
    live_leases: usize,
    max_leases: usize,
    /// Bounds the lines this peer can make us log (see [`super::ratelog`]).
    plog: PeerLog,
    ring_config: RingConfig,
    /// The ring's memory, made for the CAPS being written: the switch waits for its last byte.
    ring_pending: Option<Arc<RingMemory>>,
}

/// Runs one connection until it is over.
pub(crate) async fn run(stream: Stream, peer: String, ch: Channels) {
    let (rd, wr) = stream.into_split();
    let Channels {
        core,
        cmd_rx,
        recv_tx,
        connected,
        done,
        shared,
        fd_reads,
        inline_threshold,
        max_leases,
        guard,
        ring,
    } = ch;
    let _guard = guard;
    let _direct = core.direct_guard();
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    let mut d = Driver {
        core,
        peer,
        rd,
        wr,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        out: OutQueue::default(),
        staged: Staged::default(),
        backlog: VecDeque::new(),
        recv_tx,
        cmd_rx,
        cmd_open: true,
        connected: Some(connected),
        close_error: None,
        eof: false,
        broken: false,
        timer_hold: None,
        flush_deadline: None,
        unflushed: false,
        fd_reads,
        scratch: if fd_reads {
            vec![0; READ_CHUNK * 4]
        } else {
            Vec::new()
        },
        fds: VecDeque::new(),
        rx_total: 0,
        mapper: None,
        release_tx,
        release_rx,
        leases: HashMap::new(),
        handle_schemes: Vec::new(),
        inline_threshold,
        proto_bytes: 0,
        live_leases: 0,
        max_leases,
        plog: PeerLog::new(),
        ring_config: ring,
        ring_pending: None,
    };
    d.main_loop().await;

    // The connection is over: no caller writes to the socket any more, and everyone waiting is
    // told.
    let (closed_for, requests, pings) = {
        let mut st = d.st();
        st.set_direct(None);
        (
            st.conn.closed_for(),
            std::mem::take(&mut st.requests),
            std::mem::take(&mut st.pings),
        )
    };
    let reason = match &d.close_error {
        Some(e) => (CloseReason::of(e), e.to_string()),
        None => match closed_for {
            Some(CloseReason::PeerClosed) => (
                CloseReason::PeerClosed,
                "the peer closed the connection".into(),
            ),
            Some(why) => (why, "closed".into()),
            None => (CloseReason::Local, "closed by this side".into()),
        },
    };
    tracing::debug!(peer = %d.peer, "connection over: {}", reason.1);
    d.plog.flush(Instant::now(), &PEER_FAULTS, &d.peer);
    shared.set_reason(reason.clone());
    for (_, tx) in requests {
        let _ = tx.send(Err(Error::closed(reason.0, reason.1.clone())));
    }
    for (_, tx) in pings {
        let _ = tx.send(Err(Error::closed(reason.0, reason.1.clone())));
    }
    if let Some(tx) = d.connected.take() {
        let err = d.close_error.take().unwrap_or_else(|| {
            Error::closed(CloseReason::Handshake, "closed during the handshake")
        });
        let _ = tx.send(Err(err));
    }
    d.cmd_rx.close();
    while let Ok(cmd) = d.cmd_rx.try_recv() {
        fail_command(cmd, &reason);
    }
    d.shutdown().await;
    let Driver {
        rd,
        wr,
        backlog,
        recv_tx,
        leases,
        ..
    } = d;
    // The regions of our messages go back to the pool before anyone is told the connection is
    // over, so a `close` that returned has returned them.
    drop((rd, wr, leases));
    let _ = done.send(true);
    // Messages received before the end are still delivered, then recv() reports the close.
    for m in backlog {
        if recv_tx.send(m).await.is_err() {
            break;
        }
    }
}

fn fail_command(cmd: Command, reason: &(CloseReason, String)) {
    let e = || Error::closed(reason.0, reason.1.clone());
    match cmd {
        Command::Send { done, .. } => drop(done.send(Err(e()))),
        Command::Request { done, .. } => drop(done.send(Err(e()))),
        Command::Ping { done } => drop(done.send(Err(e()))),
        Command::Ack { done, .. } | Command::Nack { done, .. } => drop(done.send(Err(e()))),
        Command::SendAttached { done, .. }
        | Command::SendDlpack { done, .. }
        | Command::SendHeld { done, .. } => drop(done.send(Err(e()))),
        Command::Close => {}
    }
}

impl Driver {
    async fn main_loop(&mut self) {
        loop {
            self.pump();
            self.feed_out();
            if self.out.bytes > self.out_hard_limit() {
                // The peer does not read what it makes us send (replies to its own PINGs,
                // NACKs of its own bad frames): drop it rather than grow without bound.
                self.note_error(Error::protocol(
                    Violation::Limit,
                    ErrorCode::ERR_BUSY,
                    format!(
                        "{} bytes wait to be written to {}: the peer does not read",
                        self.out.bytes, self.peer
                    ),
                ));
                peer_log!(
                    self.plog,
                    self.peer,
                    WARN,
                    "closing: {} bytes unsent, the peer does not read",
                    self.out.bytes
                );
                self.broken = true;
            }
            if self.broken {
                return;
            }
            if self.st().conn.is_closed() {
                if self.out.is_empty() && self.staged.is_empty() {
                    return;
                }
                let now = Instant::now();
                let deadline = *self.flush_deadline.get_or_insert(now + LINGER);
                if now >= deadline {
                    self.note_error(Error::timeout(
                        Deadline::Close,
                        format!(
                            "could not flush the last frames to {} within {LINGER:?}",
                            self.peer
                        ),
                    ));
                    return;
                }
            }
            let closed = self.st().conn.is_closed();
            let paused = !self.backlog.is_empty();
            // A peer that does not read the replies it provokes (a PING flood) stops being read
            // until it does: its own writes then block, not our memory.
            let provoked = self.proto_bytes > PROTO_BACKLOG;
            let can_read = !self.eof && (closed || !paused) && !provoked;
            let take_cmds = self.cmd_open
                && !closed
                && (self.out.bytes + self.staged.bytes < OUT_HIGH_WATER
                    || self.staged.admits_more());
            let deadline = if closed {
                self.flush_deadline
            } else if paused {
                None
            } else {
                self.st()
                    .conn
                    .poll_timeout()
                    .map(|t| self.timer_hold.map_or(t, |h| t.max(h)))
            };
            let has_out = !self.out.is_empty();
            // A TLS write can end with records still in rustls (the socket was full); nothing
            // else would push them out once the queue is empty, so a flush follows.
            let flush_due = self.unflushed && !has_out;
            let uring_write = matches!(self.wr, WriteHalf::Uring(_));
            if uring_write && has_out {
                self.out.seal_tail();
            }
            let owned = if uring_write && has_out {
                self.out.owned()
            } else {
                Vec::new()
            };
            let slices = self.out.slices();
            let out_fds = self.out.fds();
            let fd_reads = self.fd_reads;
            let rbuf_spare = self.rbuf.capacity() - self.rbuf.len();
            let read_busy = matches!(&self.rd, ReadHalf::Uring(r) if r.busy());
            // What the frame in progress still needs (io_uring receives a large remainder
            // straight into `rbuf`, and smaller reads through its provided buffers).
            let want = self.st().conn.bytes_wanted(&self.rbuf);
            if can_read && !read_busy && rbuf_spare < READ_CHUNK / 4 {
                self.core
                    .lock()
                    .conn
                    .reserve_input(&mut self.rbuf, want.max(READ_CHUNK));
            }
            // Nothing to write while we wait: a caller may write its own frames meanwhile.
            self.st()
                .set_idle(!has_out && !flush_due && self.staged.is_empty() && !closed);
            let step = tokio::select! {
                r = write_out(&mut self.wr, &slices, &owned, &out_fds), if has_out || flush_due => Step::Wrote(r),
                r = read_in(&mut self.rd, &mut self.rbuf, &mut self.scratch, &mut self.fds, &mut self.rx_total, fd_reads, want), if can_read => Step::Read(r),
                id = self.release_rx.recv() => Step::Release(id),
                p = self.recv_tx.reserve(), if paused && !closed => match p {
                    Ok(permit) => {
                        if let Some(m) = self.backlog.pop_front() {
                            permit.send(m);
                        }
                        Step::Delivered
                    }
                    Err(_) => Step::ReceiverGone,
                },
                c = self.cmd_rx.recv(), if take_cmds => Step::Command(c),
                _ = self.core.wake.notified() => Step::Woken,
                _ = sleep_until(deadline), if deadline.is_some() => Step::Timer,
            };
            drop((slices, out_fds, owned));
            match step {
                Step::Wrote(Ok(Written::Bytes(0))) => {
                    self.io_failed(std::io::ErrorKind::WriteZero.into(), "write")
                }
                Step::Wrote(Ok(Written::Flushed)) => self.unflushed = false,
                Step::Wrote(Ok(Written::Bytes(n))) => {
                    self.unflushed = matches!(self.wr, WriteHalf::Tls(_));
                    self.out.advance(n);
                    if self.out.is_empty() {
                        self.proto_bytes = 0;
                        if let Some(mem) = self.ring_pending.take() {
                            // CAPS and its memfd are out: everything after goes by the ring.
                            self.switch_to_ring(mem, ring::End::Responder);
                        }
                    }
                }
                Step::Wrote(Err(e)) => self.io_failed(e, "write"),
                Step::Read(r) => {
                    self.timer_hold = None;
                    match r {
                        Ok(0) => {
                            self.eof = true;
                            self.st().conn.handle_eof();
                        }
                        Ok(_) if closed => self.rbuf.clear(),
                        Ok(_) => {
                            self.bound_fds();
                            self.core
                                .lock()
                                .conn
                                .handle_input(&mut self.rbuf, Instant::now())
                        }
                        Err(e) => self.io_failed(e, "read"),
                    }
                }
                Step::Delivered => {
                    if self.backlog.is_empty() {
                        self.timer_hold = Some(Instant::now() + RESUME_GRACE);
                    }
                }
                // No handle can receive any more: nobody will read these.
                Step::ReceiverGone => self.backlog.clear(),
                Step::Command(Some(cmd)) => self.on_command(cmd),
                Step::Release(Some(r)) => self.on_release(r),
                // The driver holds a sender itself: never closed while it runs.
                Step::Release(None) => {}
                Step::Command(None) => {
                    // Every handle is gone: close gracefully.
                    self.cmd_open = false;
                    self.st().conn.close();
                }
                Step::Woken => {}
                Step::Timer => {
                    if !closed {
                        self.st().conn.handle_timeout(Instant::now());
                    }
                }
            }
        }
    }

    /// The last view of a message by handle is gone: ACK it, or, if one of its mappings
    /// faulted (the peer shrank a segment under us, SPEC §7), NACK it `ERR_ATTACHMENT` and
    /// refuse that scheme's handles from this peer for the rest of the connection.
    fn on_release(&mut self, r: Released) {
        self.live_leases = self.live_leases.saturating_sub(1);
        if let Some(scheme) = r.faulted {
            if let Some(mapper) = self.mapper.as_mut() {
                if !mapper.is_refused(scheme) {
                    peer_log!(
                        self.plog,
                        self.peer,
                        WARN,
                        "the peer shrank a {} segment while msgId {} was mapped; refusing its {} handles from now on",
                        scheme.name(),
                        r.msg_id,
                        scheme.name()
                    );
                }
                mapper.refuse(scheme, "a segment shrank while mapped");
            }
        }
        let mut st = self.core.lock();
        if st.conn.is_closed() {
            return;
        }
        let answered = match r.faulted {
            Some(_) => st.conn.nack(
                r.msg_id,
                ErrorCode::ERR_ATTACHMENT,
                0,
                "segment shrank while mapped",
            ),
            None => st.conn.ack(r.msg_id),
        };
        drop(st);
        if let Err(e) = answered {
            tracing::debug!(peer = %self.peer, "answering msgId {}: {e}", r.msg_id);
        }
    }

    /// Moves frames to the write queue, dispatches events, and hands queued messages to the
    /// application as far as its channel has room.
    fn pump(&mut self) {
        loop {
            let ev = self.st().conn.poll_event();
            let Some(ev) = ev else { break };
            self.on_event(ev);
        }
        // After the events: handling them may queue frames (a NACK, an ACK).
        self.pump_transmits();
        while let Some(m) = self.backlog.pop_front() {
            match self.recv_tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.backlog.push_front(m);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed { .. }) => {
                    self.backlog.clear();
                    break;
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(neg) => {
                tracing::debug!(peer = %self.peer, codecs = ?neg.codecs, max_frame = neg.max_frame_bytes, attach = ?neg.attach, "connected");
                if neg.shared_mem {
                    self.handle_schemes = neg
                        .attach
                        .iter()
                        .copied()
                        // Never negotiated with a peer, whatever it says.
                        .filter(|s| *s != Scheme::Local)
                        .collect();
                    if !self.handle_schemes.is_empty() {
                        let uid = if self.handle_schemes.contains(&Scheme::Shm) {
                            self.rd.peer_uid()
                        } else {
                            None
                        };
                        self.mapper = Some(
                            Mapper::new(self.handle_schemes.clone(), &neg.peer.shm_prefix)
                                .with_peer_uid(uid),
                        );
                    }
                }
                if neg.ring {
                    if let Err(e) = self.start_ring() {
                        self.note_error(e);
                        self.broken = true;
                        return;
                    }
                }
                if !neg.ring {
                    // Plain sockets through epoll: callers may write their own frames.
                    let fd = match &self.wr {
                        WriteHalf::Tcp(w) => AsRef::<tokio::net::TcpStream>::as_ref(w)
                            .as_fd()
                            .try_clone_to_owned(),
                        WriteHalf::Unix(w) => AsRef::<tokio::net::UnixStream>::as_ref(w)
                            .as_fd()
                            .try_clone_to_owned(),
                        _ => Err(std::io::Error::other("no direct writes")),
                    }
                    // Without a duplicate (out of descriptors), everything is queued.
                    .ok();
                    self.st().set_direct(fd);
                }
                if let Some(tx) = self.connected.take() {
                    if tx.send(Ok(neg)).is_err() {
                        // Nobody waits for this connection any more.
                        self.st().conn.close();
                    }
                }
            }
            Event::Message(mut m) => {
                if let Err(e) = self.attach_views(&mut m) {
                    peer_log!(
                        self.plog,
                        self.peer,
                        WARN,
                        "refused the attachments of msgId {}: {e}",
                        m.msg_id()
                    );
                    let detail = match &e {
                        Error::Protocol { detail, .. } => detail.clone(),
                        other => other.to_string(),
                    };
                    let retry = if e.code() == ErrorCode::ERR_BUSY {
                        100
                    } else {
                        0
                    };
                    let nacked = self.st().conn.nack(m.msg_id(), e.code(), retry, &detail);
                    if let Err(e) = nacked {
                        tracing::debug!(peer = %self.peer, "NACK: {e}");
                    }
                    self.reply_refused(m.header.in_reply_to, e);
                    return;
                }
                let to = m.header.in_reply_to;
                if to != 0 {
                    let waiter = self.st().requests.remove(&to);
                    if let Some(tx) = waiter {
                        if tx.send(Ok(m)).is_err() {
                            tracing::debug!(peer = %self.peer, "reply to msgId {to} came after its request was abandoned");
                        }
                        return;
                    }
                }
                self.backlog.push_back(m);
            }
            Event::Ack { msg_id } => {
                tracing::trace!(peer = %self.peer, "ACK for msgId {msg_id}");
                // Its regions return to the pool.
                self.leases.remove(&msg_id);
            }
            Event::Nack {
                msg_id,
                code,
                retry_after_ms,
                detail,
            } => {
                if code == ErrorCode::ERR_ATTACHMENT {
                    if let Some(lease) = self.leases.remove(&msg_id) {
                        // Our own segment shrank under it (someone truncated it): its bytes
                        // are gone, so sending them inline would send zeros. The refusal goes
                        // to the sender as it is (below), as it does for device memory.
                        let shrank = lease.regions.iter().any(|(_, r)| r.segment().shrank());
                        if !matches!(lease.body, LeasedBody::Held) && !shrank {
                            return self.resend_inline(msg_id, lease, &detail);
                        }
                    }
                }
                self.leases.remove(&msg_id);
                let err = Error::Nack {
                    msg_id,
                    code,
                    retry_after_ms,
                    detail,
                };
                let waiter = {
                    let mut st = self.st();
                    match st.requests.remove(&msg_id) {
                        Some(tx) => Some(Ok(tx)),
                        None => st.pings.remove(&msg_id).map(Err),
                    }
                };
                if let Some(Ok(tx)) = waiter {
                    let _ = tx.send(Err(err));
                } else if let Some(Err(tx)) = waiter {
                    let _ = tx.send(Err(err));
                } else {
                    peer_log!(self.plog, self.peer, WARN, "{err}");
                }
            }
            Event::Pong { ping_id, rtt } => {
                let waiter = self.st().pings.remove(&ping_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok(rtt));
                }
            }
            Event::Refused {
                msg_id,
                in_reply_to,
                error,
            } => {
                peer_log!(
                    self.plog,
                    self.peer,
                    WARN,
                    "refused msgId {msg_id} from the peer: {error}"
                );
                self.reply_refused(in_reply_to, error);
            }
            Event::Closed(err) => {
                match &err {
                    None => tracing::debug!(peer = %self.peer, "connection closed"),
                    // Logged by the server's accept loop; a client gets it from `connect`.
                    Some(e) if self.connected.is_some() => {
                        tracing::debug!(peer = %self.peer, "handshake failed: {e}")
                    }
                    Some(e) => peer_log!(self.plog, self.peer, INFO, "connection closed: {e}"),
                }
                if let Some(e) = err {
                    self.note_error(e);
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Send { msg, done } => {
                let channel = msg.channel_id;
                let r = self.st().conn.send(msg);
                self.stage_app_transmits(channel, Vec::new());
                let _ = done.send(r);
            }
            Command::Request { msg, done } => {
                let channel = msg.channel_id;
                let sent = self.st().request(msg, done);
                match sent {
                    Ok(_) => self.stage_app_transmits(channel, Vec::new()),
                    Err((e, done)) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Command::Ping { done } => {
                let pinged = self.st().ping(done);
                if let Err((e, done)) = pinged {
                    let _ = done.send(Err(e));
                }
            }
            Command::Ack { msg_id, done } => {
                let acked = self.st().conn.ack(msg_id);
                let _ = done.send(acked);
            }
            Command::Nack {
                msg_id,
                code,
                retry_after_ms,
                detail,
                done,
            } => {
                let nacked = self.st().conn.nack(msg_id, code, retry_after_ms, &detail);
                let _ = done.send(nacked);
            }
            Command::SendHeld {
                msg,
                held,
                reply,
                done,
            } => {
                let r = self.send_leased(msg, Vec::new(), Vec::new(), LeasedBody::Held, held);
                if let (Ok(id), Some(reply)) = (&r, reply) {
                    self.st().insert_request(*id, reply);
                }
                let _ = done.send(r);
            }
            Command::SendAttached {
                ether,
                codec,
                regions,
                reply,
                done,
            } => {
                let r = self.send_attached(ether, codec, regions);
                if let (Ok(id), Some(reply)) = (&r, reply) {
                    self.st().insert_request(*id, reply);
                }
                let _ = done.send(r);
            }
            Command::SendDlpack { desc, region, done } => {
                let _ = done.send(self.send_dlpack(desc, region));
            }
            Command::Close => self.st().conn.close(),
        }
    }

    /// Sends an Ether with regions: by handle where negotiated and large enough, else inline.
    fn send_attached(
        &mut self,
        mut ether: Ether,
        codec: CodecId,
        regions: Vec<(Attachment, Region)>,
    ) -> Result<u64> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut kept: Vec<(usize, Region)> = Vec::new();
        for (mut att, region) in regions {
            att.size_bytes = region.len() as u64;
            att.inline_bytes = None;
            match self.handle_for(&region, &mut fds)? {
                Some(uri) => {
                    att.uri = uri.to_string();
                    kept.push((ether.attachments.len(), region));
                }
                None => {
                    att.uri.clear();
                    att.inline_bytes = Some(Bytes::copy_from_slice(&region));
                }
            }
            ether.attachments.push(att);
        }
        let out = Outgoing::ether(&ether, codec)?;
        self.send_leased(
            out,
            fds,
            kept,
            LeasedBody::Ether { ether, codec },
            Vec::new(),
        )
    }

    /// Sends a DLPACK descriptor whose data is `region`: by handle (a URI in the body) when
    /// negotiated and large enough, else inline.
    fn send_dlpack(&mut self, mut desc: DlpackDescriptor, region: Region) -> Result<u64> {
        let mut fds = Vec::new();
        let mut kept = Vec::new();
        match self.handle_for(&region, &mut fds)? {
            Some(uri) => {
                desc.data = DlData::Uri(uri);
                kept.push((0, region));
            }
            None => desc.data = DlData::Inline(Bytes::copy_from_slice(&region)),
        }
        let out = Outgoing::data(CodecId::DLPACK, desc.encode()?);
        self.send_leased(out, fds, kept, LeasedBody::Dlpack { desc }, Vec::new())
    }

    /// The handle URI for `region` when it should go by handle (a memfd's descriptor is added
    /// to `fds`), or `None` for inline.
    fn handle_for(&self, region: &Region, fds: &mut Vec<OwnedFd>) -> Result<Option<AttachmentUri>> {
        let scheme = region.segment().scheme();
        if region.len() < self.inline_threshold || !self.handle_schemes.contains(&scheme) {
            return Ok(None);
        }
        scheme.handler().export(region, fds)
    }

    /// Queues `out` with `fds` on its first frame, and keeps `kept` loaned until the ACK.
    fn send_leased(
        &mut self,
        out: Outgoing,
        mut fds: Vec<OwnedFd>,
        kept: Vec<(usize, Region)>,
        body: LeasedBody,
        held: Vec<Box<dyn std::any::Any + Send>>,
    ) -> Result<u64> {
        let channel_id = out.channel_id;
        // Frames queued before this message go first, so the next frame is this message's.
        self.pump_transmits();
        let id = self.st().conn.send(out)?;
        self.stage_app_transmits(channel_id, std::mem::take(&mut fds));
        if !kept.is_empty() || !held.is_empty() {
            self.leases.insert(
                id,
                SentLease {
                    body,
                    channel_id,
                    regions: kept,
                    _held: held,
                },
            );
        }
        Ok(id)
    }

    /// The peer refused our handles: send the same message again with the bytes inline, and
    /// use inline bytes from now on.
    fn resend_inline(&mut self, old_id: u64, lease: SentLease, detail: &str) {
        if !self.handle_schemes.is_empty() {
            peer_log!(
                self.plog,
                self.peer,
                WARN,
                "the peer refused a handle ({detail}); sending attachments inline from now on"
            );
            self.handle_schemes.clear();
        }
        let SentLease {
            body,
            channel_id,
            regions,
            _held: _,
        } = lease;
        let out = body.inline(&regions);
        drop(regions);
        let waiter = self.st().requests.remove(&old_id);
        let sent = out
            .map(|o| o.on_channel(channel_id))
            .and_then(|o| self.st().conn.send(o));
        match (sent, waiter) {
            (Ok(new_id), Some(w)) => {
                self.st().insert_request(new_id, w);
            }
            (Ok(_), None) => {}
            (Err(e), Some(w)) => {
                let _ = w.send(Err(e));
            }
            (Err(e), None) => {
                peer_log!(
                    self.plog,
                    self.peer,
                    WARN,
                    "resending msgId {old_id} inline: {e}"
                )
            }
        }
    }

    /// Maps the handle attachments of a received message into views (SPEC §7). Descriptors
    /// for `memfd://` come from those received with the message, in order.
    fn attach_views(&mut self, m: &mut Incoming) -> Result<()> {
        let mut with_uri: Vec<(String, String)> = match &m.ether {
            Some(ether) => ether
                .attachments
                .iter()
                .filter(|a| !a.uri.is_empty())
                .map(|a| (a.id.clone(), a.uri.clone()))
                .collect(),
            None => Vec::new(),
        };
        if m.header.body_codec == CodecId::DLPACK && m.header.msg_type == crate::wire::MsgType::DATA
        {
            // Checked on arrival by the connection; a URI body names the tensor's bytes.
            if let Ok(DlpackDescriptor {
                data: DlData::Uri(u),
                ..
            }) = DlpackDescriptor::decode(m.body.clone())
            {
                with_uri.push((DLPACK_VIEW.to_string(), u.to_string()));
            }
        }
        if with_uri.is_empty() {
            return Ok(());
        }
        if self.mapper.is_none() {
            return Err(Error::attachment(
                "attachment by handle, but no handle scheme was negotiated",
            ));
        }
        let mut uris = Vec::with_capacity(with_uri.len());
        let mut fd_count = 0usize;
        for (id, uri) in with_uri {
            let u = AttachmentUri::parse(&uri)?;
            if let Target::Memfd { index } = u.target() {
                fd_count = fd_count.max(*index as usize + 1);
            }
            uris.push((id, u));
        }
        if fd_count > 0 {
            self.take_ring_fds()?;
        }
        // The descriptors that came with this message's first frame; taken now, so that a
        // refusal below still consumes them.
        let at = m.stream_offset;
        let fds: Vec<OwnedFd> = match self.fds.iter().position(|g| g.start <= at && at < g.end) {
            Some(i) => self.fds.remove(i).map(|g| g.fds).unwrap_or_default(),
            None => Vec::new(),
        };
        let Some(mapper) = self.mapper.as_mut() else {
            return Err(Error::attachment(
                "attachment by handle, but no handle scheme was negotiated",
            ));
        };
        if fd_count > fds.len() {
            return Err(Error::attachment(format!(
                "memfd: the message names {fd_count} descriptors, {} came with it",
                fds.len()
            )));
        }
        if self.live_leases >= self.max_leases {
            return Err(Error::protocol(
                Violation::Limit,
                ErrorCode::ERR_BUSY,
                format!(
                    "{} messages by handle are still held here (max_leases_per_peer)",
                    self.live_leases
                ),
            ));
        }
        let tx = self.release_tx.clone();
        let lease = Lease::new(m.msg_id(), move |r| {
            let _ = tx.send(r);
        });
        let mut views = Vec::with_capacity(uris.len());
        #[cfg(feature = "cuda")]
        let mut device_views = Vec::new();
        for (id, u) in uris {
            #[cfg(feature = "cuda")]
            if let Target::CudaIpc { .. } = u.target() {
                match mapper.resolve_device(&u, &lease) {
                    Ok(v) => device_views.push((id, Arc::new(v))),
                    Err(e) => {
                        // Refused, not consumed: no ACK for it. Views made so far hold
                        // the disarmed lease and release nothing.
                        lease.disarm();
                        return Err(e);
                    }
                }
                continue;
            }
            match mapper.resolve(&u, &fds, &lease) {
                Ok(v) => views.push((id, v)),
                Err(e) => {
                    // Refused, not consumed: no ACK for it.
                    lease.disarm();
                    return Err(e);
                }
            }
        }
        m.views = views;
        #[cfg(feature = "cuda")]
        {
            m.device_views = device_views;
        }
        self.live_leases += 1;
        Ok(())
    }

    /// A reply to our request `to` (0: none) was refused: its caller gets the reason instead
    /// of waiting for a reply that will not come.
    fn reply_refused(&mut self, to: u64, error: Error) {
        if to == 0 {
            return;
        }
        let waiter = self.st().requests.remove(&to);
        if let Some(tx) = waiter {
            let _ = tx.send(Err(error));
        }
    }

    /// CAPS turned the ring on. The responder makes the memory and sends its memfd with CAPS
    /// (the switch follows once CAPS is written); the initiator maps the memfd that came with
    /// CAPS and switches at once (the responder sends nothing on the socket after CAPS).
    fn start_ring(&mut self) -> Result<()> {
        let ring_err = |what: String| Error::malformed(Violation::Control, what);
        let role = self.st().conn.role();
        match role {
            crate::conn::Role::Responder => {
                let (mem, fd) = RingMemory::create(self.ring_config.capacity).map_err(|e| {
                    Error::Io(std::io::Error::new(
                        e.kind(),
                        format!("ring for {}: {e}", self.peer),
                    ))
                })?;
                // CAPS was queued before the event: it is the last frame waiting.
                let (_, mut frames) = self.st().take_for_driver();
                let Some(caps) = frames.pop() else {
                    return Err(Error::invalid("ring: no CAPS to send its memfd with"));
                };
                for f in frames {
                    self.out.push(f);
                }
                self.out.push_with_fds(caps, vec![fd]);
                self.ring_pending = Some(mem);
            }
            crate::conn::Role::Initiator => {
                let fd = self.fds.pop_back().and_then(|mut g| g.fds.pop());
                let Some(fd) = fd else {
                    return Err(ring_err(
                        "CAPS turned the ring on but carried no memfd (SPEC §9)".into(),
                    ));
                };
                if !self.rbuf.is_empty() {
                    return Err(ring_err(format!(
                        "{} bytes followed CAPS on the socket, where the ring takes over",
                        self.rbuf.len()
                    )));
                }
                let mem = RingMemory::open(fd, ring::mem::MAX_CAPACITY)
                    .map_err(|e| ring_err(format!("the ring's memfd: {e}")))?;
                self.switch_to_ring(mem, ring::End::Initiator);
            }
        }
        Ok(())
    }

    /// Puts the ring where the socket's halves were; the socket itself stays under it for
    /// wake-ups, descriptors and the end of the connection.
    fn switch_to_ring(&mut self, mem: Arc<RingMemory>, end: ring::End) {
        let sock = match &self.wr {
            WriteHalf::Unix(w) => {
                let s: &tokio::net::UnixStream = w.as_ref();
                s.as_fd()
                    .try_clone_to_owned()
                    .map(std::os::unix::net::UnixStream::from)
                    .and_then(|s| {
                        s.set_nonblocking(true)?;
                        tokio::net::UnixStream::from_std(s)
                    })
            }
            _ => Err(std::io::Error::other("the ring needs a plain Unix socket")),
        };
        let sock = match sock {
            Ok(s) => s,
            Err(e) => return self.io_failed(e, "ring"),
        };
        let (r, w) = ring::split(sock, mem, end, self.ring_config.spin);
        // Bytes read from the socket before the ring took over: ring positions start there.
        let r = r.with_base(self.rx_total);
        if let WriteHalf::Unix(old) = std::mem::replace(&mut self.wr, WriteHalf::Ring(w)) {
            // Dropping it would shut the socket's write side, which the ring still uses.
            old.forget();
        }
        self.rd = ReadHalf::Ring(r);
        tracing::debug!(peer = %self.peer, "frames now go by the same-host ring");
    }

    /// Descriptors on the ring's socket, for the frames read so far (see
    /// [`ring::RingRead::take_fds`]).
    fn take_ring_fds(&mut self) -> Result<()> {
        let ReadHalf::Ring(r) = &mut self.rd else {
            return Ok(());
        };
        let mut groups = Vec::new();
        if let Err(e) = r.take_fds(&mut groups) {
            return Err(Error::protocol(
                Violation::Attachment,
                ErrorCode::ERR_ATTACHMENT,
                format!("ring: {e}"),
            ));
        }
        self.fds.extend(groups.into_iter().map(FdGroup::of_ring));
        self.bound_fds();
        Ok(())
    }

    /// Keeps received descriptors only where memfd was negotiated, and a bounded number.
    fn bound_fds(&mut self) {
        let take = if self.handle_schemes.contains(&Scheme::Memfd) {
            MAX_PENDING_FDS
        } else if self.ring_handshake() {
            // The ring's memfd, coming with CAPS.
            1
        } else {
            0
        };
        let mut held: usize = self.fds.iter().map(|g| g.fds.len()).sum();
        while held > take {
            // The oldest go first: their message, if any, is long done.
            let Some(g) = self.fds.pop_front() else { break };
            peer_log!(
                self.plog,
                self.peer,
                WARN,
                "closing {} descriptors the peer passed unasked",
                g.fds.len()
            );
            held -= g.fds.len();
        }
    }

    /// Moves the connection's own frames (replies, NACKs, ACKs, handshake, keep-alive) to the
    /// write queue, counting them: see [`PROTO_BACKLOG`].
    fn pump_transmits(&mut self) {
        if self.ring_pending.is_some() {
            // Nothing may follow CAPS on the socket: it waits for the ring.
            return;
        }
        let (pending, frames) = self.st().take_for_driver();
        // What a caller could not write goes first: it is the rest of frames begun on the
        // socket (the queue was empty when the caller wrote).
        for b in pending {
            self.out.push_bytes(b);
        }
        for f in frames {
            self.proto_bytes += f.len();
            self.out.push(f);
        }
    }

    /// The connection asked for the ring and is still in its handshake.
    fn ring_handshake(&self) -> bool {
        let st = self.st();
        st.conn.config().ring && !st.conn.is_established()
    }

    /// The shared state (see [`super::core`]); never held across an `.await`.
    fn st(&self) -> std::sync::MutexGuard<'_, CoreState> {
        self.core.lock()
    }

    /// Stages the frames of the message the application just sent on `channel` (bounded by
    /// the command back-pressure, not counted as the connection's own); `fds` go with its
    /// first frame.
    fn stage_app_transmits(&mut self, channel: u32, mut fds: Vec<OwnedFd>) {
        let (pending, frames) = self.st().take_for_driver();
        for b in pending {
            self.out.push_bytes(b);
        }
        let mut msg = StagedMessage::new();
        for f in frames {
            msg.push_back((f, std::mem::take(&mut fds)));
        }
        self.staged.push(channel, msg);
    }

    /// Moves staged frames to the write queue, a frame per channel in turn, up to
    /// `FEED_TARGET`.
    fn feed_out(&mut self) {
        if self.ring_pending.is_some() {
            return;
        }
        while self.out.bytes < FEED_TARGET {
            let Some((f, fds)) = self.staged.pop() else {
                break;
            };
            self.out.push_with_fds(f, fds);
        }
    }

    /// The most bytes that may wait to be written: what the application may queue (commands
    /// stop at `OUT_HIGH_WATER`, plus one message of the peer's largest size), plus room for
    /// the connection's own replies.
    fn out_hard_limit(&self) -> usize {
        let peer_max = self
            .st()
            .conn
            .negotiated()
            .map_or(crate::wire::DEFAULT_MAX_MESSAGE_BYTES, |n| {
                n.peer_max_message_bytes
            });
        OUT_HIGH_WATER
            .saturating_add(usize::try_from(peer_max).unwrap_or(usize::MAX))
            .saturating_add(OUT_HIGH_WATER * 2)
    }

    fn note_error(&mut self, e: Error) {
        if self.close_error.is_none() {
            self.close_error = Some(e);
        }
    }

    fn io_failed(&mut self, e: std::io::Error, op: &str) {
        tracing::debug!(peer = %self.peer, "{op}: {e}");
        if !self.st().conn.is_closed() {
            // A TLS stream reports the peer's refusal after the handshake as I/O; it stays a
            // TLS error with its kind.
            let err = match Error::tls_in_io(&e) {
                Some(failure) => Error::tls(failure, e.to_string()),
                None => Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{op} {}: {e}", self.peer),
                )),
            };
            self.note_error(err);
        }
        self.broken = true;
    }

    /// Ends the stream politely: end-of-stream to the peer, then read (and discard) until the
    /// peer closes too, so that unread bytes do not turn our close into a reset that could
    /// destroy the last frames before the peer reads them. Bounded by [`LINGER`].
    async fn shutdown(&mut self) {
        if self.broken {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        let _ = tokio::time::timeout_at(deadline, self.wr.shutdown()).await;
        if self.eof {
            return;
        }
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// What one write branch of the driver loop did.
#[derive(Debug)]
enum Written {
    /// This many bytes of the queue were taken.
    Bytes(usize),
    /// Nothing was queued; what the transport held back went out.
    Flushed,
}

/// One write: vectored, with descriptors attached when there are any, or a flush when nothing
/// is queued. io_uring sends `owned` (the same bytes as `slices`, as `Bytes` the kernel can
/// hold while the send is in flight).
async fn write_out(
    wr: &mut WriteHalf,
    slices: &[IoSlice<'_>],
    owned: &[Bytes],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<Written> {
    if slices.is_empty() {
        wr.flush().await?;
        return Ok(Written::Flushed);
    }
    let n = if let WriteHalf::Uring(w) = wr {
        w.send_owned(owned, fds).await?
    } else if fds.is_empty() {
        wr.write_vectored(slices).await?
    } else {
        wr.write_with_fds(slices, fds).await?
    };
    Ok(Written::Bytes(n))
}

/// One read into `rbuf`: plain, or with `recvmsg` through `scratch` when descriptors may come.
async fn read_in(
    rd: &mut ReadHalf,
    rbuf: &mut BytesMut,
    scratch: &mut [u8],
    fds: &mut VecDeque<FdGroup>,
    rx_total: &mut u64,
    fd_reads: bool,
    want: usize,
) -> std::io::Result<usize> {
    let start = *rx_total;
    if let ReadHalf::Ring(r) = rd {
        let mut groups = Vec::new();
        let max = (rbuf.capacity() - rbuf.len()).max(want.min(READ_CHUNK * 4));
        let n = r.read_ring(rbuf, max, &mut groups).await?;
        *rx_total += n as u64;
        fds.extend(groups.into_iter().map(FdGroup::of_ring));
        return Ok(n);
    }
    if let ReadHalf::Uring(r) = rd {
        // Straight into the read buffer, descriptors included: no scratch copy.
        let mut got = Vec::new();
        let n = r
            .read_owned(rbuf, if fd_reads { Some(&mut got) } else { None }, want)
            .await?;
        *rx_total += n as u64;
        if !got.is_empty() {
            fds.push_back(FdGroup {
                start,
                end: start + n as u64,
                fds: got,
            });
        }
        return Ok(n);
    }
    if !fd_reads {
        let n = rd.read_buf(rbuf).await?;
        *rx_total += n as u64;
        return Ok(n);
    }
    let mut got = Vec::new();
    let n = rd.read_with_fds(scratch, &mut got).await?;
    rbuf.extend_from_slice(&scratch[..n]);
    *rx_total += n as u64;
    if !got.is_empty() {
        fds.push_back(FdGroup {
            start,
            end: start + n as u64,
            fds: got,
        });
    }
    Ok(n)
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}
