//! The same-host ring (SPEC §9): frames through shared memory instead of a socket.
//!
//! [`mem`] is the shared memory itself (layout, the two single-producer single-consumer byte
//! rings, the sleep flags of the wake-up protocol, every check a hostile peer makes
//! necessary); `docs/ring.md` describes it. This module puts it under a session: a
//! [`RingRead`] and a [`RingWrite`] that stand where a Unix socket's halves stood, the socket
//! itself kept for what a ring cannot carry:
//!
//! - **wake-ups**: a side that sleeps (its ring empty, or its peer's ring full) is woken by
//!   one byte on the socket, [`WAKE_DATA`] or [`WAKE_SPACE`], sent only when its sleep flag
//!   says it sleeps (so at most one per sleep);
//! - **descriptors** (`memfd://` handles): [`FDS`] and the ring position of the first byte
//!   of the frame that names them (u64, little endian), the descriptors attached to the
//!   marker by `SCM_RIGHTS`, sent *before* that frame's bytes are published. A reader that
//!   loads the ring's tail and then drains the socket therefore holds every descriptor of
//!   every frame it can see;
//! - **the end**: the socket closing is the connection closing; a ring has no end of stream.
//!
//! Waiting: a side that finds nothing to do re-polls for [`RingConfig::spin`] by yielding
//! to the runtime (its task is woken again at once, so other tasks and the session's other
//! branches run in between: no thread is held), then arms its sleep flag and waits for the
//! socket.

pub mod mem;
#[cfg(test)]
mod model;

pub use mem::{Consumer, End, Producer, RingMemory};

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// The wake-up byte that says "your ring has data".
pub const WAKE_DATA: u8 = b'D';
/// The wake-up byte that says "your peer's ring has room again".
pub const WAKE_SPACE: u8 = b'S';
/// The marker that carries descriptors, followed by a u64 ring position.
pub const FDS: u8 = b'F';

/// The most descriptor groups held for frames not read yet; a peer passing more is refused.
const MAX_PENDING_GROUPS: usize = 64;
/// The most socket bytes handled in one drain, so a flood of wake-ups cannot hold the task.
const DRAIN_BUDGET: usize = 16 << 10;

/// How a session uses the same-host ring.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// As responder on a Unix socket: agree when the initiator asks (`ring` in HELLO). An
    /// initiator asks when its URL is `ring:///path`.
    pub offer: bool,
    /// The bytes of each direction's ring (a power of two, 4 KiB to 1 GiB); the responder's
    /// choice is the connection's.
    pub capacity: usize,
    /// How long a side re-polls an empty (or full) ring before it sleeps on the socket.
    /// Zero: sleep at once (each message then costs a wake-up, as on a socket).
    pub spin: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            offer: true,
            capacity: mem::DEFAULT_CAPACITY,
            spin: Duration::from_micros(50),
        }
    }
}

with_fields!(RingConfig {
    /// Whether a responder agrees to the ring.
    with_offer => offer: bool;
    /// This ring size per direction.
    with_capacity => capacity: usize;
    /// This long re-polling before sleeping.
    with_spin => spin: Duration;
});

/// What either half found on the socket for the other, or for itself.
#[derive(Default)]
struct Inbox {
    /// A descriptor marker cut by the socket: its bytes so far.
    partial: Vec<u8>,
    /// Descriptors of the marker in `partial`.
    partial_fds: Vec<OwnedFd>,
    /// Complete groups: the ring position of the frame that names them, and them.
    groups: VecDeque<(u64, Vec<OwnedFd>)>,
    /// The socket ended (or failed): the connection is over.
    eof: bool,
    error: Option<io::ErrorKind>,
}

struct Link {
    sock: UnixStream,
    inbox: Mutex<Inbox>,
    spin: Duration,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // Held for a few instructions, never across an await; a poisoned lock still holds
        // consistent data (every update is a single push or flag).
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what the socket holds now, without waiting: wake-ups (which need no action but
    /// a re-check), descriptor groups, the end. An unknown byte is the peer's error.
    fn drain(&self) -> io::Result<()> {
        let mut buf = [0u8; 512];
        let mut taken = 0usize;
        while taken < DRAIN_BUDGET {
            let mut fds = Vec::new();
            let mut asked = false;
            let mut r = self.sock.try_io(tokio::io::Interest::READABLE, || {
                asked = true;
                super::unix::recv_with_fds(&self.sock, &mut buf, &mut fds)
            });
            if !asked {
                // The reactor has not seen the socket readable yet, but what the peer sent
                // before publishing a frame is there already (a Unix socket delivers at
                // `sendmsg`): ask the kernel. Its EAGAIN leaves the reactor's readiness as it
                // was (not set), so no readiness event is lost.
                r = super::unix::recv_with_fds(&self.sock, &mut buf, &mut fds);
            }
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.lock().error = Some(e.kind());
                    return Err(e);
                }
            };
            let mut inbox = self.lock();
            if n == 0 {
                inbox.eof = true;
                return Ok(());
            }
            taken += n;
            inbox.take(&buf[..n], fds)?;
        }
        Ok(())
    }

    /// One wake-up byte to the peer, sent at once (not through the reactor, whose idea of
    /// the socket's writability may lag). The socket is full only when the peer does not
    /// read it (each byte answers a sleep of the peer's): that peer is broken.
    fn wake(&self, byte: u8) -> io::Result<()> {
        use rustix::net::SendFlags;
        loop {
            match rustix::net::send(
                &self.sock,
                &[byte],
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "ring: the peer does not read its socket (a wake-up could not be sent)",
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn over(&self) -> Option<io::Error> {
        let inbox = self.lock();
        if let Some(kind) = inbox.error {
            return Some(io::Error::new(kind, "ring: the socket failed"));
        }
        inbox.eof.then(|| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "ring: the peer closed the connection",
            )
        })
    }
}

impl Inbox {
    fn take(&mut self, bytes: &[u8], mut fds: Vec<OwnedFd>) -> io::Result<()> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut i = 0;
        while i < bytes.len() {
            if !self.partial.is_empty() {
                let want = 9 - self.partial.len();
                let got = want.min(bytes.len() - i);
                self.partial.extend_from_slice(&bytes[i..i + got]);
                i += got;
                if self.partial.len() == 9 {
                    let pos = u64::from_le_bytes(self.partial[1..9].try_into().unwrap());
                    self.partial.clear();
                    let group = std::mem::take(&mut self.partial_fds);
                    if self.groups.len() >= MAX_PENDING_GROUPS {
                        return Err(bad(format!(
                            "ring: the peer passed more than {MAX_PENDING_GROUPS} descriptor \
                             groups ahead of their frames"
                        )));
                    }
                    self.groups.push_back((pos, group));
                }
                continue;
            }
            match bytes[i] {
                WAKE_DATA | WAKE_SPACE => i += 1,
                FDS => {
                    // Descriptors arrive with the first byte of the `sendmsg` that carried
                    // them, which is this marker.
                    self.partial.push(FDS);
                    self.partial_fds = std::mem::take(&mut fds);
                    i += 1;
                }
                other => {
                    return Err(bad(format!(
                        "ring: byte {other:#04x} on the socket, where only wake-ups and \
                         descriptor markers may come (SPEC §9)"
                    )))
                }
            }
        }
        if !fds.is_empty() {
            return Err(bad(
                "ring: descriptors on the socket without their marker".to_string()
            ));
        }
        Ok(())
    }
}

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// Waits for the socket to hold something (a wake-up, descriptors, the end).
fn readable(link: &Arc<Link>) -> Readable {
    let link = link.clone();
    Box::pin(async move { link.sock.readable().await })
}

/// Re-polling, then sleeping: the state both halves keep while they wait.
#[derive(Default)]
struct Wait {
    since: Option<Instant>,
    /// The runtime's yield (`tokio::task::yield_now`) while spinning.
    yielding: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    sleep: Option<Readable>,
}

impl Wait {
    /// `Some(Pending)` while the spin lasts. Each turn yields to the runtime the way
    /// `tokio::task::yield_now` does: the task runs again once the worker's other ready tasks
    /// have run and its I/O was polled, on the same worker, and no idle worker is woken for
    /// it (a plain self-wake would wake one, a scheduler round trip per turn).
    fn spin(&mut self, cx: &mut Context<'_>, spin: Duration) -> Option<Poll<()>> {
        if spin.is_zero() {
            return None;
        }
        if let Some(y) = &mut self.yielding {
            if y.as_mut().poll(cx).is_pending() {
                // Woken for something else: the yield still stands.
                return Some(Poll::Pending);
            }
            self.yielding = None;
        }
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < spin {
            let mut y: Pin<Box<dyn Future<Output = ()> + Send>> =
                Box::pin(tokio::task::yield_now());
            if y.as_mut().poll(cx).is_pending() {
                self.yielding = Some(y);
            } else {
                cx.waker().wake_by_ref();
            }
            return Some(Poll::Pending);
        }
        None
    }

    fn done(&mut self) {
        self.since = None;
        self.yielding = None;
        self.sleep = None;
    }

    /// Sleeps until the socket is readable, then drains it. `Ready(Ok(()))` means: look at
    /// the ring again. `arm` sets this side's sleep flag and re-checks the ring (`Ok(true)`:
    /// still nothing to do, sleep); it runs only once this task waits on the socket, so a
    /// wake-up for this sleep (sent after the peer saw the flag) comes after the wait began
    /// and wakes this task, even when the other half of this side drains its byte first.
    fn sleep(
        &mut self,
        cx: &mut Context<'_>,
        link: &Arc<Link>,
        arm: impl FnOnce() -> io::Result<bool>,
    ) -> Poll<io::Result<()>> {
        let fut = match &mut self.sleep {
            Some(fut) => fut,
            None => {
                let mut fut = readable(link);
                if fut.as_mut().poll(cx).is_pending() {
                    if !arm()? {
                        return Poll::Ready(Ok(()));
                    }
                    self.sleep = Some(fut);
                    return Poll::Pending;
                }
                link.drain()?;
                return Poll::Ready(Ok(()));
            }
        };
        ready!(fut.as_mut().poll(cx))?;
        self.sleep = None;
        link.drain()?;
        Poll::Ready(Ok(()))
    }
}

/// Splits a connection whose CAPS turned the ring on into its two halves. `sock` is the
/// connection's Unix socket, `mem` the ring memory (made by [`RingMemory::create`] on the
/// responder, [`RingMemory::open`] on the initiator), `end` this side.
pub fn split(
    sock: UnixStream,
    mem: Arc<RingMemory>,
    end: End,
    spin: Duration,
) -> (RingRead, RingWrite) {
    let link = Arc::new(Link {
        sock,
        inbox: Mutex::new(Inbox::default()),
        spin,
    });
    (
        RingRead {
            link: link.clone(),
            cons: mem.consumer(end),
            wait: Wait::default(),
            base: 0,
        },
        RingWrite {
            link,
            prod: mem.producer(end),
            wait: Wait::default(),
            shut: false,
        },
    )
}

/// The read half: frames from the peer's ring, descriptors and the end from the socket.
pub struct RingRead {
    link: Arc<Link>,
    cons: Consumer,
    wait: Wait,
    /// The connection's stream position of the ring's first byte (what the socket carried
    /// before the ring took over): descriptor groups are reported at `base` + ring position.
    base: u64,
}

impl std::fmt::Debug for RingRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingRead")
            .field("position", &self.cons.position())
            .finish()
    }
}

impl RingRead {
    /// Appends what the ring holds (at most `max` bytes) to `buf`, and the descriptor groups
    /// found on the socket while waiting to `fds` (see [`RingRead::take_fds`] for the rest).
    /// `Ok(0)`: the peer closed the connection and its ring is empty.
    pub fn poll_read_ring(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
        fds: &mut Vec<(u64, Vec<OwnedFd>)>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.cons.available()? > 0 {
                self.take_groups(fds);
                let n = self.cons.read(buf, max)?;
                if self.cons.must_wake() {
                    self.link.wake(WAKE_SPACE)?;
                }
                self.wait.done();
                return Poll::Ready(Ok(n));
            }
            {
                let inbox = self.link.lock();
                if let Some(kind) = inbox.error {
                    return Poll::Ready(Err(io::Error::new(kind, "ring: the socket failed")));
                }
                if inbox.eof {
                    return Poll::Ready(Ok(0));
                }
            }
            if self.wait.sleep.is_none() {
                if let Some(Poll::Pending) = self.wait.spin(cx, self.link.spin) {
                    return Poll::Pending;
                }
            }
            let cons = &self.cons;
            ready!(self.wait.sleep(cx, &self.link, || cons.arm_sleep()))?;
        }
    }

    /// Every descriptor group the socket holds now, for frames read so far and maybe later
    /// ones, as (stream position of its frame, see [`RingRead::with_base`]; descriptors).
    /// Descriptors go on the socket before the bytes of their frame are published, so once
    /// a frame that names some has been read, this finds them; it costs a system call, and
    /// only frames with handles need it.
    pub fn take_fds(&mut self, fds: &mut Vec<(u64, Vec<OwnedFd>)>) -> io::Result<()> {
        self.link.drain()?;
        self.take_groups(fds);
        Ok(())
    }

    fn take_groups(&self, fds: &mut Vec<(u64, Vec<OwnedFd>)>) {
        let base = self.base;
        let mut inbox = self.link.lock();
        fds.extend(
            inbox
                .groups
                .drain(..)
                .map(|(pos, g)| (base.wrapping_add(pos), g)),
        );
    }

    /// Counts positions from `base`: the connection's stream position of the ring's first
    /// byte (the bytes its socket carried before the ring took over).
    pub fn with_base(mut self, base: u64) -> Self {
        self.base = base;
        self
    }

    /// Reads into `buf` and `fds` (see [`RingRead::poll_read_ring`]).
    pub async fn read_ring(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        fds: &mut Vec<(u64, Vec<OwnedFd>)>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_ring(cx, buf, max, fds)).await
    }

    /// Bytes read from the ring so far: the ring position of the next one.
    pub fn position(&self) -> u64 {
        self.cons.position()
    }
}

impl AsyncRead for RingRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut tmp = BytesMut::new();
        let mut fds = Vec::new();
        // Descriptors read this way (a plain read) have no frame to go to: they close.
        ready!(this.poll_read_ring(cx, &mut tmp, out.remaining(), &mut fds))?;
        out.put_slice(&tmp);
        Poll::Ready(Ok(()))
    }
}

/// The write half: frames into this side's ring, descriptor markers and wake-ups on the
/// socket.
pub struct RingWrite {
    link: Arc<Link>,
    prod: Producer,
    wait: Wait,
    shut: bool,
}

impl std::fmt::Debug for RingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingWrite")
            .field("position", &self.prod.position())
            .finish()
    }
}

impl RingWrite {
    /// Writes what fits of `slices` into the ring, `fds` (when any) going first on the
    /// socket with the position of the first byte. Returns the bytes written; when more than
    /// zero, the descriptors went with them.
    pub fn poll_write_ring(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "ring: written after shutdown",
            )));
        }
        loop {
            if let Some(e) = self.link.over() {
                return Poll::Ready(Err(e));
            }
            if self.prod.free()? > 0 {
                if !fds.is_empty() {
                    ready!(self.poll_send_fds(cx, fds))?;
                }
                let n = self.prod.write_from(slices)?;
                debug_assert!(n > 0 || slices.iter().all(|s| s.is_empty()));
                if self.prod.must_wake() {
                    self.link.wake(WAKE_DATA)?;
                }
                self.wait.done();
                return Poll::Ready(Ok(n));
            }
            if self.wait.sleep.is_none() {
                if let Some(Poll::Pending) = self.wait.spin(cx, self.link.spin) {
                    return Poll::Pending;
                }
            }
            let prod = &self.prod;
            ready!(self.wait.sleep(cx, &self.link, || prod.arm_sleep()))?;
        }
    }

    /// The descriptor marker for the next byte of the ring, with `fds`.
    fn poll_send_fds(
        &mut self,
        cx: &mut Context<'_>,
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<()>> {
        let mut marker = [0u8; 9];
        marker[0] = FDS;
        marker[1..].copy_from_slice(&self.prod.position().to_le_bytes());
        loop {
            ready!(self.link.sock.poll_write_ready(cx))?;
            match self.link.sock.try_io(tokio::io::Interest::WRITABLE, || {
                super::unix::send_with_fds(&self.link.sock, &[IoSlice::new(&marker)], fds)
            }) {
                Ok(9) => return Poll::Ready(Ok(())),
                // The socket carries only markers and wake-ups, a few bytes per message by
                // handle: full to its last bytes, its peer does not read it.
                Ok(_) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "ring: the peer does not read its socket (a descriptor marker was cut)",
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `slices` with `fds` (see [`RingWrite::poll_write_ring`]).
    pub async fn write_ring(
        &mut self,
        slices: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write_ring(cx, slices, fds)).await
    }
}

impl AsyncWrite for RingWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_ring(cx, &[IoSlice::new(buf)], &[])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_ring(cx, bufs, &[])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Published bytes are the peer's at once.
        Poll::Ready(Ok(()))
    }

    /// Ends the connection: shuts the socket's write side (the peer reads the end there).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            let r = rustix::net::shutdown(&this.link.sock, rustix::net::Shutdown::Write);
            if let Err(e) = r {
                if e != rustix::io::Errno::NOTCONN {
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}
