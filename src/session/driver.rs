//! The driver: one tokio task per connection that moves bytes between a [`Stream`] and a
//! sans-IO [`Connection`].
//!
//! It reads, writes, takes commands from the [`Session`](super::Session) handles and runs the
//! connection's timers in one `select!` loop, so reading and writing never wait on each other
//! (two peers that both send a lot cannot deadlock). Every branch of that loop is cancel-safe:
//! a single `write_vectored`, a single `read_buf`, an mpsc `recv`/`reserve`, a sleep.
//!
//! Back-pressure:
//! - **outgoing**: commands are taken from the bounded command channel only while fewer than
//!   `OUT_HIGH_WATER` bytes wait to be written, so senders wait when the socket is slow;
//! - **incoming**: messages go to a bounded channel; when it is full the driver stops reading
//!   the socket (TCP / socket-buffer back-pressure on the peer) instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conn::{Connection, Event, Incoming, Negotiated, Outgoing};
use crate::error::{Error, ErrorCode, Result};
use crate::transport::{ReadHalf, Stream, WriteHalf};
use crate::wire::frame::EncodedFrame;

/// Bytes read per call at least.
const READ_CHUNK: usize = 64 * 1024;
/// Frames up to this size are copied into one buffer so several go out in one write; larger
/// payloads are written from their own `Bytes`, never copied.
const COALESCE_MAX: usize = 16 * 1024;
/// The most buffers handed to one `write_vectored`.
const MAX_IOVECS: usize = 64;
/// Stop taking commands while this many bytes wait to be written.
pub(crate) const OUT_HIGH_WATER: usize = 8 << 20;
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
    Close,
}

/// State shared between the driver and the handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Why the connection ended, once it has.
    pub(crate) close_reason: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn closed_error(&self) -> Error {
        let reason = match self.close_reason.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Error::Closed(reason.unwrap_or_else(|| "connection is closed".to_string()))
    }

    fn set_reason(&self, reason: String) {
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
    pub(crate) cmd_rx: mpsc::Receiver<Command>,
    pub(crate) recv_tx: mpsc::Sender<Incoming>,
    pub(crate) connected: oneshot::Sender<Result<Negotiated>>,
    pub(crate) done: watch::Sender<bool>,
    pub(crate) shared: Arc<Shared>,
}

/// Frames waiting to be written: frozen segments, then a tail where small frames coalesce.
#[derive(Default)]
struct OutQueue {
    segs: VecDeque<Bytes>,
    tail: BytesMut,
    bytes: usize,
}

impl OutQueue {
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

    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v: Vec<IoSlice<'_>> = self
            .segs
            .iter()
            .take(MAX_IOVECS)
            .map(|b| IoSlice::new(b))
            .collect();
        if v.len() < MAX_IOVECS && !self.tail.is_empty() {
            v.push(IoSlice::new(&self.tail));
        }
        v
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n.min(self.bytes);
        while n > 0 {
            match self.segs.front_mut() {
                Some(front) if front.len() <= n => {
                    n -= front.len();
                    self.segs.pop_front();
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
enum Step {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
    Delivered,
    ReceiverGone,
    Command(Option<Command>),
    Timer,
}

struct Driver {
    conn: Connection,
    peer: String,
    rd: ReadHalf,
    wr: WriteHalf,
    rbuf: BytesMut,
    out: OutQueue,
    requests: HashMap<u64, oneshot::Sender<Result<Incoming>>>,
    purge_at: usize,
    pings: HashMap<u64, oneshot::Sender<Result<Duration>>>,
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
}

/// Runs one connection until it is over.
pub(crate) async fn run(stream: Stream, peer: String, conn: Connection, ch: Channels) {
    let (rd, wr) = stream.into_split();
    let Channels {
        cmd_rx,
        recv_tx,
        connected,
        done,
        shared,
    } = ch;
    let mut d = Driver {
        conn,
        peer,
        rd,
        wr,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        out: OutQueue::default(),
        requests: HashMap::new(),
        purge_at: 64,
        pings: HashMap::new(),
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
    };
    d.main_loop().await;

    // The connection is over: tell everyone waiting.
    let reason = match &d.close_error {
        Some(e) => e.to_string(),
        None => "closed".to_string(),
    };
    tracing::debug!(peer = %d.peer, "connection over: {reason}");
    shared.set_reason(reason.clone());
    for (_, tx) in d.requests.drain() {
        let _ = tx.send(Err(Error::Closed(reason.clone())));
    }
    for (_, tx) in d.pings.drain() {
        let _ = tx.send(Err(Error::Closed(reason.clone())));
    }
    if let Some(tx) = d.connected.take() {
        let err = d
            .close_error
            .take()
            .unwrap_or_else(|| Error::Closed("closed during the handshake".to_string()));
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
        ..
    } = d;
    drop((rd, wr));
    let _ = done.send(true);
    // Messages received before the end are still delivered, then recv() reports the close.
    for m in backlog {
        if recv_tx.send(m).await.is_err() {
            break;
        }
    }
}

fn fail_command(cmd: Command, reason: &str) {
    let e = || Error::Closed(reason.to_string());
    match cmd {
        Command::Send { done, .. } => drop(done.send(Err(e()))),
        Command::Request { done, .. } => drop(done.send(Err(e()))),
        Command::Ping { done } => drop(done.send(Err(e()))),
        Command::Ack { done, .. } | Command::Nack { done, .. } => drop(done.send(Err(e()))),
        Command::Close => {}
    }
}

impl Driver {
    async fn main_loop(&mut self) {
        loop {
            self.pump();
            if self.broken {
                return;
            }
            if self.conn.is_closed() {
                if self.out.is_empty() {
                    return;
                }
                let now = Instant::now();
                let deadline = *self.flush_deadline.get_or_insert(now + LINGER);
                if now >= deadline {
                    self.note_error(Error::Timeout(format!(
                        "could not flush the last frames to {} within {LINGER:?}",
                        self.peer
                    )));
                    return;
                }
            }
            let closed = self.conn.is_closed();
            let paused = !self.backlog.is_empty();
            let can_read = !self.eof && (closed || !paused);
            let take_cmds = self.cmd_open && !closed && self.out.bytes < OUT_HIGH_WATER;
            let deadline = if closed {
                self.flush_deadline
            } else if paused {
                None
            } else {
                self.conn
                    .poll_timeout()
                    .map(|t| self.timer_hold.map_or(t, |h| t.max(h)))
            };
            let has_out = !self.out.is_empty();
            let slices = self.out.slices();
            let rbuf_spare = self.rbuf.capacity() - self.rbuf.len();
            if can_read && rbuf_spare < READ_CHUNK / 4 {
                let want = self.conn.bytes_wanted(&self.rbuf).max(READ_CHUNK);
                self.rbuf.reserve(want);
            }
            let step = tokio::select! {
                r = self.wr.write_vectored(&slices), if has_out => Step::Wrote(r),
                r = self.rd.read_buf(&mut self.rbuf), if can_read => Step::Read(r),
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
                _ = sleep_until(deadline), if deadline.is_some() => Step::Timer,
            };
            drop(slices);
            match step {
                Step::Wrote(Ok(0)) => self.io_failed(std::io::ErrorKind::WriteZero.into(), "write"),
                Step::Wrote(Ok(n)) => self.out.advance(n),
                Step::Wrote(Err(e)) => self.io_failed(e, "write"),
                Step::Read(r) => {
                    self.timer_hold = None;
                    match r {
                        Ok(0) => {
                            self.eof = true;
                            self.conn.handle_eof();
                        }
                        Ok(_) if closed => self.rbuf.clear(),
                        Ok(_) => self.conn.handle_input(&mut self.rbuf, Instant::now()),
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
                Step::Command(None) => {
                    // Every handle is gone: close gracefully.
                    self.cmd_open = false;
                    self.conn.close();
                }
                Step::Timer => {
                    if !closed {
                        self.conn.handle_timeout(Instant::now());
                    }
                }
            }
        }
    }

    /// Moves frames to the write queue, dispatches events, and hands queued messages to the
    /// application as far as its channel has room.
    fn pump(&mut self) {
        while let Some(f) = self.conn.poll_transmit() {
            self.out.push(f);
        }
        while let Some(ev) = self.conn.poll_event() {
            self.on_event(ev);
        }
        while let Some(m) = self.backlog.pop_front() {
            match self.recv_tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.backlog.push_front(m);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    break;
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(neg) => {
                tracing::debug!(peer = %self.peer, codecs = ?neg.codecs, max_frame = neg.max_frame_bytes, "connected");
                if let Some(tx) = self.connected.take() {
                    if tx.send(Ok(neg)).is_err() {
                        // Nobody waits for this connection any more.
                        self.conn.close();
                    }
                }
            }
            Event::Message(m) => {
                let to = m.header.in_reply_to;
                if to != 0 {
                    if let Some(tx) = self.requests.remove(&to) {
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
            }
            Event::Nack {
                msg_id,
                code,
                retry_after_ms,
                detail,
            } => {
                let err = Error::Nack {
                    msg_id,
                    code,
                    retry_after_ms,
                    detail,
                };
                if let Some(tx) = self.requests.remove(&msg_id) {
                    let _ = tx.send(Err(err));
                } else if let Some(tx) = self.pings.remove(&msg_id) {
                    let _ = tx.send(Err(err));
                } else {
                    tracing::warn!(peer = %self.peer, "{err}");
                }
            }
            Event::Pong { ping_id, rtt } => {
                if let Some(tx) = self.pings.remove(&ping_id) {
                    let _ = tx.send(Ok(rtt));
                }
            }
            Event::Refused { msg_id, error } => {
                tracing::warn!(peer = %self.peer, "refused msgId {msg_id} from the peer: {error}");
            }
            Event::Closed(err) => {
                match &err {
                    None => tracing::debug!(peer = %self.peer, "connection closed"),
                    Some(e) if self.connected.is_some() => {
                        tracing::info!(peer = %self.peer, "handshake failed: {e}")
                    }
                    Some(e) => tracing::info!(peer = %self.peer, "connection closed: {e}"),
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
                let _ = done.send(self.conn.send(msg));
            }
            Command::Request { msg, done } => match self.conn.send(msg) {
                Ok(id) => {
                    self.requests.insert(id, done);
                    if self.requests.len() >= self.purge_at {
                        // Drop the requests whose caller stopped waiting (timed out).
                        self.requests.retain(|_, tx| !tx.is_closed());
                        self.purge_at = (self.requests.len() * 2).max(64);
                    }
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            },
            Command::Ping { done } => {
                self.pings.retain(|_, tx| !tx.is_closed());
                match self.conn.ping(Instant::now()) {
                    Ok(id) => {
                        self.pings.insert(id, done);
                    }
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Command::Ack { msg_id, done } => {
                let _ = done.send(self.conn.ack(msg_id));
            }
            Command::Nack {
                msg_id,
                code,
                retry_after_ms,
                detail,
                done,
            } => {
                let _ = done.send(self.conn.nack(msg_id, code, retry_after_ms, &detail));
            }
            Command::Close => self.conn.close(),
        }
    }

    fn note_error(&mut self, e: Error) {
        if self.close_error.is_none() {
            self.close_error = Some(e);
        }
    }

    fn io_failed(&mut self, e: std::io::Error, op: &str) {
        tracing::debug!(peer = %self.peer, "{op}: {e}");
        if !self.conn.is_closed() {
            self.note_error(Error::Io(std::io::Error::new(
                e.kind(),
                format!("{op} {}: {e}", self.peer),
            )));
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

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}
