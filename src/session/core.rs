//! What the [`Session`](super::Session) handles and the driver share: the sans-IO
//! [`Connection`] and the waiters of replies, under one short lock, so that a caller can
//! encode its own message and write it to the socket itself (issue 19, "the caller writes").
//!
//! # The direct path
//!
//! When the driver has nothing queued to write, a small message does not go to the driver at
//! all: the calling task takes the lock, has the connection encode the message (msgId,
//! compression, sealing, chunking), registers its reply waiter, and writes the frames with one
//! non-blocking `sendmsg`. The round trip then costs no task hop on the way out, and the msgId
//! or the error comes back synchronously. Whatever the socket does not take at once is left in
//! [`CoreState::pending`] and the driver is woken to write it first (all of this when the [`Direct`] guard drops); until then every other
//! sender takes the queued path (the command channel, with its back-pressure).
//!
//! Why frames never interleave or reorder:
//! - a caller writes only while [`CoreState::idle`] is set, and it holds the lock while it
//!   writes;
//! - the driver sets `idle` just before it waits, under the lock, and only when its write queue
//!   and its staged frames are empty and no caller left bytes pending; in that wait it does not
//!   write (it has nothing to write);
//! - every move of frames into the driver's queues happens under the lock and clears `idle`
//!   (see [`CoreState::take_for_driver`]), so once the driver has anything to write no caller
//!   writes any more; and the bytes a caller left pending are the first the driver queues;
//! - the connection's own frames (an ACK, a PONG) that the driver has not yet taken are
//!   written by the caller, in their order, before its own.
//!
//! The direct path is used on plain TCP and Unix sockets driven by epoll, after the handshake
//! and while the connection is open. io_uring, TLS, QUIC and the same-host ring keep the queued
//! path. A caller never waits for the lock: when the driver holds it (reading a large frame,
//! say), the caller takes the queued path instead.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::conn::{Connection, Incoming};
use crate::error::Result;
use crate::wire::frame::EncodedFrame;

/// Messages with bodies up to this size may take the direct path; larger ones (whose
/// compression or sealing would hold the lock for long, and which gain nothing from one task
/// hop less) are queued.
pub(crate) const DIRECT_MAX: usize = 64 * 1024;
/// The most buffers one direct write hands the kernel; the rest is left pending.
const DIRECT_IOVECS: usize = 48;

/// A request's waiter: gets the reply, or why none will come.
pub(crate) type ReplyTx = oneshot::Sender<Result<Incoming>>;
/// A PING's waiter.
pub(crate) type PongTx = oneshot::Sender<Result<Duration>>;

/// The shared part of one connection.
pub(crate) struct Core {
    st: Mutex<CoreState>,
    /// Wakes the driver when a caller left bytes in [`CoreState::pending`].
    pub(crate) wake: Notify,
}

/// The state under the lock.
pub(crate) struct CoreState {
    pub(crate) conn: Connection,
    /// Our requests waiting for their reply, by msgId.
    pub(crate) requests: HashMap<u64, ReplyTx>,
    purge_at: usize,
    /// Our PINGs waiting for their PONG, by msgId.
    pub(crate) pings: HashMap<u64, PongTx>,
    /// The socket a caller may write to directly (plain TCP or Unix through epoll, once
    /// established): a duplicate of the driver's descriptor, dropped (under the lock) before
    /// the driver shuts the socket, so it never keeps the connection open. `None` on other
    /// transports and once the connection is over.
    direct: Option<OwnedFd>,
    /// The driver has nothing queued or staged and waits: a caller's frames may go out now.
    idle: bool,
    /// Bytes a caller could not write: they go first when the driver next writes.
    pending: VecDeque<Bytes>,
    /// Direct writes made, and those the socket did not take whole (for tests and stats).
    pub(crate) direct_writes: u64,
    pub(crate) direct_partial: u64,
}

impl Core {
    pub(crate) fn new(conn: Connection) -> Core {
        Core {
            st: Mutex::new(CoreState {
                conn,
                requests: HashMap::new(),
                purge_at: 64,
                pings: HashMap::new(),
                direct: None,
                idle: false,
                pending: VecDeque::new(),
                direct_writes: 0,
                direct_partial: 0,
            }),
            wake: Notify::new(),
        }
    }

    /// The state, for the driver (it may wait a moment for a caller's write to finish).
    pub(crate) fn lock(&self) -> MutexGuard<'_, CoreState> {
        lock(&self.st)
    }

    /// Ends the direct path when dropped: the driver holds one for as long as it runs, so a
    /// driver that ends in any way (even dropped with its runtime) lets go of the socket.
    pub(crate) fn direct_guard(self: &std::sync::Arc<Self>) -> DirectGuard {
        DirectGuard(self.clone())
    }
}

/// See [`Core::direct_guard`].
pub(crate) struct DirectGuard(std::sync::Arc<Core>);

impl Drop for DirectGuard {
    fn drop(&mut self) {
        self.0.lock().set_direct(None);
    }
}

fn lock(m: &Mutex<CoreState>) -> MutexGuard<'_, CoreState> {
    // A panic while holding the lock cannot leave the state half-changed in a way that
    // matters more than the panic itself: keep going with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    /// The state for a direct send, if one may happen now: the lock is free, the driver is
    /// idle, the transport allows it and the connection is open. `None` means: queue it.
    pub(crate) fn direct(&self) -> Option<Direct<'_>> {
        let st = match self.st.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if !st.idle || st.direct.is_none() || !st.conn.is_established() || st.conn.is_closed() {
            return None;
        }
        Some(Direct { st, core: self })
    }
}

impl CoreState {
    /// Registers a request's waiter, dropping those whose caller stopped waiting now and then.
    pub(crate) fn insert_request(&mut self, id: u64, tx: ReplyTx) {
        self.requests.insert(id, tx);
        if self.requests.len() >= self.purge_at {
            self.requests.retain(|_, tx| !tx.is_closed());
            self.purge_at = (self.requests.len() * 2).max(64);
        }
    }

    /// Queues a request and registers `done` as the waiter of its reply; on an error `done`
    /// comes back with it.
    pub(crate) fn request(
        &mut self,
        msg: crate::conn::Outgoing,
        done: ReplyTx,
    ) -> std::result::Result<u64, (crate::Error, ReplyTx)> {
        match self.conn.send(msg) {
            Ok(id) => {
                self.insert_request(id, done);
                Ok(id)
            }
            Err(e) => Err((e, done)),
        }
    }

    /// Queues a PING and registers `done` as the waiter of its PONG (dropping the waiters of
    /// PINGs whose caller gave up); on an error `done` comes back with it.
    pub(crate) fn ping(&mut self, done: PongTx) -> std::result::Result<(), (crate::Error, PongTx)> {
        self.pings.retain(|_, tx| !tx.is_closed());
        match self.conn.ping(std::time::Instant::now()) {
            Ok(id) => {
                self.pings.insert(id, done);
                Ok(())
            }
            Err(e) => Err((e, done)),
        }
    }

    /// Lets callers write to `fd` directly from now on (`None`: never again).
    pub(crate) fn set_direct(&mut self, fd: Option<OwnedFd>) {
        if fd.is_none() {
            self.idle = false;
        }
        self.direct = fd;
    }

    /// Whether the driver may mark itself idle: nothing is pending from a caller.
    pub(crate) fn set_idle(&mut self, idle: bool) {
        self.idle = idle && self.direct.is_some() && self.pending.is_empty();
    }

    /// What the driver must write next, before anything else: the bytes a caller left, then the
    /// connection's frames. The driver is no longer idle after this.
    pub(crate) fn take_for_driver(&mut self) -> (VecDeque<Bytes>, Vec<EncodedFrame>) {
        self.idle = false;
        let pending = std::mem::take(&mut self.pending);
        let mut frames = Vec::new();
        while let Some(f) = self.conn.poll_transmit() {
            frames.push(f);
        }
        (pending, frames)
    }
}

/// The lock, held for one direct send (see the module docs).
pub(crate) struct Direct<'a> {
    st: MutexGuard<'a, CoreState>,
    core: &'a Core,
}

impl std::ops::Deref for Direct<'_> {
    type Target = CoreState;
    fn deref(&self) -> &CoreState {
        &self.st
    }
}

impl std::ops::DerefMut for Direct<'_> {
    fn deref_mut(&mut self) -> &mut CoreState {
        &mut self.st
    }
}

impl Drop for Direct<'_> {
    /// Writes what the connection queued meanwhile, and lets go of the lock.
    fn drop(&mut self) {
        self.write();
    }
}

impl Direct<'_> {
    /// Writes every frame the connection has queued with one non-blocking `sendmsg`, and
    /// leaves what the socket did not take to the driver (woken for it).
    fn write(&mut self) {
        if self.st.direct.is_none() {
            return;
        }
        let mut frames = Vec::new();
        while let Some(f) = self.st.conn.poll_transmit() {
            frames.push(f);
        }
        if frames.is_empty() {
            return;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() * 3);
        for f in &frames {
            slices.push(IoSlice::new(&f.head));
            if !f.payload.is_empty() {
                slices.push(IoSlice::new(&f.payload));
            }
            slices.push(IoSlice::new(&f.trailer));
        }
        let take = slices.len().min(DIRECT_IOVECS);
        use rustix::net::{SendAncillaryBuffer, SendFlags};
        let written = match &self.st.direct {
            Some(sock) => rustix::net::sendmsg(
                sock.as_fd(),
                &slices[..take],
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            )
            // EAGAIN, or a failure the driver's own write will meet and report: the bytes wait.
            .unwrap_or(0),
            None => 0,
        };
        let total: usize = slices.iter().map(|s| s.len()).sum();
        drop(slices);
        self.st.direct_writes += 1;
        if written >= total {
            return;
        }
        self.st.direct_partial += 1;
        let mut skip = written;
        for f in frames {
            let parts = [f.head, f.payload, Bytes::copy_from_slice(&f.trailer)];
            for mut b in parts {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                if skip > 0 {
                    b = b.slice(skip..);
                    skip = 0;
                }
                self.st.pending.push_back(b);
            }
        }
        self.st.idle = false;
        self.core.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use crate::codec::CodecId;
    use crate::conn::Outgoing;
    use crate::session::{Server, Session, SessionConfig};

    /// The body of message `seq` on `channel`: an F32 tensor of 1 to ~16k elements (up to
    /// 64 KiB), whose first two values say where it belongs and every other one is distinct.
    fn body(channel: u32, seq: u32) -> Bytes {
        let n = 2 + (seq as usize * 7919) % (super::DIRECT_MAX / 4 - 64);
        let mut v: Vec<f32> = (0..n).map(|i| (i as u32 ^ seq) as f32).collect();
        v[0] = channel as f32;
        v[1] = seq as f32;
        crate::codec::tensor::encode_f32(&[n as u32], &v, false).expect("tensor")
    }

    async fn pair(url: &str) -> (Server, Session, Session) {
        // The peer takes few messages ahead of its reader, so a peer that does not read
        // soon stops reading the socket.
        let config = SessionConfig::default().with_max_in_flight(8);
        let server = Server::bind(url, config).await.expect("bind");
        let url = server.local_url();
        let client = Session::connect(&url, SessionConfig::default());
        let (client, peer) = tokio::join!(client, server.accept());
        (server, client.expect("connect"), peer.expect("accept"))
    }

    /// Senders that write their own frames while the peer reads nothing: the socket fills,
    /// a direct write is cut short, the rest goes by the driver, and the peer still gets every
    /// message, byte for byte, in order on each channel.
    async fn direct_writes_keep_every_byte(url: &str) {
        let (_server, client, peer) = pair(url).await;
        const PER_CHANNEL: u32 = 400;
        let mut senders = Vec::new();
        for channel in 1..=3u32 {
            let c = client.clone();
            senders.push(tokio::spawn(async move {
                for seq in 0..PER_CHANNEL {
                    let m = Outgoing::data(CodecId::TENSOR_F32, body(channel, seq));
                    c.send(m.on_channel(channel)).await.expect("send");
                }
            }));
        }
        // Let the socket buffers fill before reading anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut next = [0u32; 4];
        for _ in 0..3 * PER_CHANNEL {
            let m = tokio::time::timeout(Duration::from_secs(20), peer.recv())
                .await
                .expect("a message within 20 s")
                .expect("recv");
            let channel = m.header.channel_id;
            let at = &mut next[channel as usize];
            assert_eq!(
                m.body,
                body(channel, *at),
                "channel {channel}, message {at}"
            );
            *at += 1;
        }
        for s in senders {
            s.await.expect("sender");
        }
        let (writes, partial) = {
            let st = client.inner.core.lock();
            (st.direct_writes, st.direct_partial)
        };
        assert!(writes > 0, "no message was written by its caller");
        assert!(
            partial > 0,
            "the socket never cut a direct write short ({writes} writes)"
        );
        // And the connection still works both ways.
        let r = tokio::time::timeout(Duration::from_secs(5), client.ping()).await;
        r.expect("pong in time").expect("ping");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_keep_every_byte_tcp() {
        direct_writes_keep_every_byte("tcp://127.0.0.1:0").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_keep_every_byte_unix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("unix://{}", dir.path().join("s.sock").display());
        direct_writes_keep_every_byte(&url).await;
    }

    /// A request written by its caller gets its reply, and a message the connection refuses
    /// (a codec that was not negotiated) fails at once, synchronously, without reaching the
    /// driver.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_request_and_refusal() {
        let (_server, client, peer) = pair("tcp://127.0.0.1:0").await;
        let echo = tokio::spawn(async move {
            for _ in 0..10 {
                let m = peer.recv().await.expect("recv");
                let reply = Outgoing::data(m.header.body_codec, m.body.clone());
                peer.reply(&m, reply).await.expect("reply");
            }
            peer
        });
        let before = client.inner.core.lock().direct_writes;
        for seq in 0..10 {
            let r = client
                .request(Outgoing::data(CodecId::TENSOR_F32, body(0, seq)))
                .await
                .expect("request");
            assert_eq!(r.body, body(0, seq));
        }
        // Right after the handshake the driver may still be busy; after a reply it is idle.
        let direct = client.inner.core.lock().direct_writes - before;
        assert!(
            direct >= 5,
            "{direct} of 10 requests were written by their caller"
        );
        let e = client
            .send(Outgoing::data(CodecId(0x77), Bytes::new()))
            .await
            .expect_err("codec 0x77 was not negotiated");
        assert_eq!(e.code(), crate::error::ErrorCode::ERR_CODEC_UNSUPPORTED);
        let _peer = echo.await.expect("echo");
    }
}
