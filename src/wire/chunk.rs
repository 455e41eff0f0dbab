//! Chunking with MORE and bounded reassembly (SPEC §3).
//!
//! [`split`] cuts a wire body into payload slices of at most the peer's `max_frame_bytes`
//! (no copy: each chunk is a `Bytes` slice of the body). [`Reassembler`] puts the frames of a
//! message back together, keyed by channel and msgId, with the total of pending bytes bounded by
//! `max_message_bytes` and the number of pending messages bounded too.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::frame::FrameError;
use super::recvbuf::RecvBuffers;
use super::{Flags, Frame, FrameHeader, HeaderForm};
use crate::error::{ErrorCode, Violation};

/// Splits `body` into chunks of at most `max_frame_bytes` bytes, each with the flags it must
/// carry: `flags` (COMP/CRYPT) on all of them, MORE on all but the last. An empty body gives
/// one empty chunk.
pub fn split(body: Bytes, flags: Flags, max_frame_bytes: u64) -> Vec<(Flags, Bytes)> {
    let max = usize::try_from(max_frame_bytes.max(1)).unwrap_or(usize::MAX);
    let base = flags.with(Flags::MORE, false).with(Flags::LARGE, false);
    if body.len() <= max {
        return vec![(base, body)];
    }
    let n = body.len().div_ceil(max);
    let mut out = Vec::with_capacity(n);
    let mut off = 0;
    while off < body.len() {
        let end = (off + max).min(body.len());
        let more = end < body.len();
        out.push((base.with(Flags::MORE, more), body.slice(off..end)));
        off = end;
    }
    out
}

/// A whole logical message: the header of its frames and its reassembled wire body (still
/// compressed or sealed when `flags` says so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The header shared by all chunks.
    pub header: FrameHeader,
    /// COMP and CRYPT as set on the chunks (MORE and LARGE cleared).
    pub flags: Flags,
    /// The form of the header.
    pub header_form: HeaderForm,
    /// The body. For a single-frame message this is the frame's payload slice, not a copy.
    pub body: Bytes,
    /// How many frames carried it.
    pub frames: u32,
    /// Where its first frame started in the connection's byte stream (as given to
    /// [`Reassembler::push_at`]; 0 with [`Reassembler::push`]).
    pub stream_offset: u64,
}

/// A bound on the bytes pending reassembly shared by many connections (a server's budget).
/// Each connection's [`Reassembler`] takes from it as chunks arrive and gives back when a
/// message completes or is dropped.
#[derive(Clone, Debug)]
pub struct ReassemblyBudget {
    used: Arc<AtomicU64>,
    limit: u64,
}

impl ReassemblyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        ReassemblyBudget {
            used: Arc::new(AtomicU64::new(0)),
            limit,
        }
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Chunks smaller than this are copied while they wait, so that a small slice cannot pin a
/// whole receive buffer (which would escape the pending-bytes bound); larger ones stay slices
/// of the buffer they were read into (each about fills its own).
/// The most message buffers a connection keeps for reuse, and their bytes in all: a
/// connection that receives large chunked messages cycles through warm buffers instead of
/// faulting in fresh pages for every message (see [`RecvBuffers`]).
pub const BODY_SPARES: usize = 2;
/// See [`BODY_SPARES`].
pub const BODY_SPARE_BYTES: usize = 64 << 20;

/// Default bound on the number of messages pending reassembly at once per connection.
pub const DEFAULT_MAX_PENDING_MESSAGES: usize = 4096;

struct Partial {
    stream_offset: u64,
    header: FrameHeader,
    flags: Flags,
    form: HeaderForm,
    /// The payload so far. Each chunk is copied in as it arrives, while its bytes are still
    /// in cache, and its frame is let go at once, so the receive buffer it was read into can
    /// be reused for the next frame; the buffer itself comes from the reused ones.
    body: BytesMut,
    /// Payload bytes so far.
    len: usize,
    frames: u32,
}

/// Reassembles chunked messages with bounded memory.
pub struct Reassembler {
    max_message_bytes: u64,
    max_pending_messages: usize,
    pending: HashMap<(u32, u64), Partial>,
    pending_bytes: u64,
    /// Messages refused part-way: their remaining chunks are dropped silently.
    discarding: HashSet<(u32, u64)>,
    /// A budget shared with other connections, if any.
    shared: Option<ReassemblyBudget>,
    /// Message buffers to reuse.
    bodies: RecvBuffers,
}

impl Drop for Reassembler {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Reassembler {
    /// A reassembler that refuses messages over `max_message_bytes` and keeps at most
    /// `max_message_bytes` bytes pending in total.
    pub fn new(max_message_bytes: u64) -> Self {
        Reassembler {
            max_message_bytes,
            max_pending_messages: DEFAULT_MAX_PENDING_MESSAGES,
            pending: HashMap::new(),
            pending_bytes: 0,
            discarding: HashSet::new(),
            shared: None,
            bodies: RecvBuffers::with_limits(BODY_SPARES, BODY_SPARE_BYTES),
        }
    }

    /// Also bounds pending bytes by `budget`, shared with other connections; a chunk that
    /// does not fit is refused with `ERR_BUSY` (retry later).
    pub fn set_shared_budget(&mut self, budget: Option<ReassemblyBudget>) {
        self.shared = budget;
    }

    /// Changes the bound on messages pending at once.
    pub fn set_max_pending_messages(&mut self, n: usize) {
        self.max_pending_messages = n.max(1);
    }

    /// Bytes held for incomplete messages.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Incomplete messages held.
    pub fn pending_messages(&self) -> usize {
        self.pending.len()
    }

    /// Drops every incomplete message (the connection closed).
    pub fn clear(&mut self) {
        for (_, p) in self.pending.drain() {
            let size = p.body.capacity();
            self.bodies.give(p.body, size);
        }
        self.discarding.clear();
        if let Some(b) = &self.shared {
            b.give(self.pending_bytes);
        }
        self.pending_bytes = 0;
    }

    /// Adds one frame. Returns the message when this frame completes it.
    ///
    /// An error refuses the whole message (it is dropped, and its later chunks are ignored);
    /// other messages are unaffected.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, FrameError> {
        self.push_at(frame, 0)
    }

    /// [`Reassembler::push`] for a frame that started at `stream_offset` in the byte stream;
    /// the message reports its first frame's offset.
    pub fn push_at(
        &mut self,
        frame: Frame,
        stream_offset: u64,
    ) -> Result<Option<Message>, FrameError> {
        let key = (frame.header.channel_id, frame.header.msg_id);
        let more = frame.flags.contains(Flags::MORE);
        let flags = frame
            .flags
            .with(Flags::MORE, false)
            .with(Flags::LARGE, false);
        let err = |code: ErrorCode, detail: String| FrameError {
            violation: Violation::Transform,
            code,
            detail,
            fatal: false,
            msg_id: key.1,
            channel_id: key.0,
            header_form: frame.header_form,
            more,
        };
        if self.discarding.contains(&key) {
            if !more {
                self.discarding.remove(&key);
            }
            return Ok(None);
        }
        let len = frame.payload.len() as u64;
        match self.pending.get_mut(&key) {
            None if !more => {
                if len > self.max_message_bytes {
                    return Err(err(
                        ErrorCode::ERR_MESSAGE_TOO_LARGE,
                        format!(
                            "message: {len} bytes exceeds max_message_bytes {}",
                            self.max_message_bytes
                        ),
                    ));
                }
                Ok(Some(Message {
                    header: frame.header,
                    flags,
                    header_form: frame.header_form,
                    body: frame.payload,
                    frames: 1,
                    stream_offset,
                }))
            }
            None => {
                if self.pending.len() >= self.max_pending_messages {
                    self.discard(key, more);
                    return Err(err(
                        ErrorCode::ERR_BUSY,
                        format!(
                            "reassembly: {} messages already pending on this connection",
                            self.pending.len()
                        ),
                    ));
                }
                if let Some(e) = self.over_budget(0, len) {
                    self.discard(key, more);
                    return Err(err(ErrorCode::ERR_MESSAGE_TOO_LARGE, e));
                }
                if !self.take_shared(len) {
                    self.discard(key, more);
                    return Err(err(ErrorCode::ERR_BUSY, self.shared_full(len)));
                }
                let len0 = frame.payload.len();
                // Room for this chunk (a reused buffer may hold many); it grows by doubling
                // beyond, so what a message holds stays within twice its bytes.
                let mut body = self.bodies.take(len0);
                body.extend_from_slice(&frame.payload);
                self.pending_bytes += len;
                self.pending.insert(
                    key,
                    Partial {
                        stream_offset,
                        header: frame.header,
                        flags,
                        form: frame.header_form,
                        body,
                        len: len0,
                        frames: 1,
                    },
                );
                Ok(None)
            }
            Some(p) => {
                let so_far = p.len as u64;
                let mismatch = if p.header.msg_type != frame.header.msg_type {
                    Some("msgType")
                } else if p.header.body_codec != frame.header.body_codec {
                    Some("bodyCodec")
                } else if p.flags != flags {
                    Some("flags COMP/CRYPT")
                } else {
                    None
                };
                if let Some(field) = mismatch {
                    self.drop_partial(key);
                    self.discard(key, more);
                    return Err(err(
                        ErrorCode::ERR_MALFORMED,
                        format!("chunk: {field} differs from the message's first chunk"),
                    ));
                }
                if let Some(e) = self.over_budget(so_far, len) {
                    self.drop_partial(key);
                    self.discard(key, more);
                    return Err(err(ErrorCode::ERR_MESSAGE_TOO_LARGE, e));
                }
                if !self.take_shared(len) {
                    let detail = self.shared_full(len);
                    self.drop_partial(key);
                    self.discard(key, more);
                    return Err(err(ErrorCode::ERR_BUSY, detail));
                }
                let p = self.pending.get_mut(&key).expect("present");
                p.len += frame.payload.len();
                p.body.extend_from_slice(&frame.payload);
                p.frames += 1;
                self.pending_bytes += len;
                if more {
                    return Ok(None);
                }
                let p = self.pending.remove(&key).expect("present");
                self.pending_bytes -= p.len as u64;
                if let Some(b) = &self.shared {
                    b.give(p.len as u64);
                }
                let mut rest = p.body;
                let size = rest.capacity();
                let body = rest.split().freeze();
                // The rest of the allocation waits, as a spare, for this message to go.
                self.bodies.give(rest, size);
                Ok(Some(Message {
                    header: p.header,
                    flags: p.flags,
                    header_form: p.form,
                    body,
                    frames: p.frames,
                    stream_offset: p.stream_offset,
                }))
            }
        }
    }

    /// Drops a message one of whose frames was refused before it got here (a bad CRC, say):
    /// its pending chunks go, and when `more` (the refused frame had MORE) its later chunks
    /// are dropped as they arrive, so a message with a hole is never delivered.
    pub fn abandon(&mut self, channel_id: u32, msg_id: u64, more: bool) {
        let key = (channel_id, msg_id);
        self.drop_partial(key);
        if !more {
            self.discarding.remove(&key);
        }
        self.discard(key, more);
    }

    fn over_budget(&self, so_far: u64, add: u64) -> Option<String> {
        let msg = so_far.saturating_add(add);
        if msg > self.max_message_bytes {
            return Some(format!(
                "message: {msg} bytes so far exceeds max_message_bytes {}",
                self.max_message_bytes
            ));
        }
        let total = self.pending_bytes.saturating_add(add);
        if total > self.max_message_bytes {
            return Some(format!(
                "reassembly: {total} bytes pending on this connection exceeds {}",
                self.max_message_bytes
            ));
        }
        None
    }

    fn drop_partial(&mut self, key: (u32, u64)) {
        if let Some(p) = self.pending.remove(&key) {
            self.pending_bytes -= p.len as u64;
            if let Some(b) = &self.shared {
                b.give(p.len as u64);
            }
            let size = p.body.capacity();
            self.bodies.give(p.body, size);
        }
    }

    fn take_shared(&self, n: u64) -> bool {
        self.shared.as_ref().is_none_or(|b| b.try_take(n))
    }

    fn shared_full(&self, n: u64) -> String {
        let b = self
            .shared
            .as_ref()
            .expect("called when a shared budget refused");
        format!(
            "reassembly: the server's budget of {} pending bytes is spent ({} in use, {n} more asked)",
            b.limit(),
            b.used()
        )
    }

    fn discard(&mut self, key: (u32, u64), more: bool) {
        if more && self.discarding.len() < self.max_pending_messages {
            self.discarding.insert(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MsgType;

    fn frame(ch: u32, id: u64, flags: Flags, payload: &[u8]) -> Frame {
        Frame {
            version: 2,
            flags,
            header: FrameHeader {
                channel_id: ch,
                msg_id: id,
                msg_type: MsgType::DATA,
                ..Default::default()
            },
            header_form: HeaderForm::Capnp,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    /// Pushes `body` as chunks of `chunk` bytes of message `id`; returns the message.
    fn reassemble(r: &mut Reassembler, id: u64, body: &[u8], chunk: u64) -> Message {
        let parts = split(Bytes::copy_from_slice(body), Flags::NONE, chunk);
        let mut out = None;
        for (flags, part) in parts {
            out = r.push(frame(1, id, flags, &part)).unwrap();
        }
        out.expect("complete")
    }

    #[test]
    fn message_buffers_are_reused_once_the_message_is_gone() {
        let mut r = Reassembler::new(64 << 20);
        let body: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        let first = reassemble(&mut r, 1, &body, 1 << 20);
        assert_eq!(first.body, body);
        assert_eq!(first.frames, 4);
        let at = first.body.as_ptr();
        // Still held: the next message cannot land there.
        let second = reassemble(&mut r, 2, &body, 1 << 20);
        assert_ne!(second.body.as_ptr(), at);
        drop(first);
        // Gone: the next message reuses its warm buffer.
        let third = reassemble(&mut r, 3, &body, 1 << 20);
        assert_eq!(third.body.as_ptr(), at);
        assert_eq!(third.body, body);
        drop((second, third));
        // Tiny chunks cost tiny buffers, not a spare-sized one each.
        let mut tiny = Reassembler::new(1 << 20);
        for id in 0..100 {
            tiny.push(frame(1, id, Flags::MORE, b"ab")).unwrap();
        }
        assert_eq!(tiny.pending_bytes(), 200);
        let held: usize = tiny.pending.values().map(|p| p.body.capacity()).sum();
        assert!(held <= 100 * 64, "{held} bytes held for 200 pending");
    }

    #[test]
    fn split_sizes_and_flags() {
        let body = Bytes::from(vec![7u8; 10]);
        let parts = split(body.clone(), Flags::COMP, 4);
        let lens: Vec<_> = parts.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(lens, vec![4, 4, 2]);
        assert!(parts[0].0.contains(Flags::MORE | Flags::COMP));
        assert!(parts[1].0.contains(Flags::MORE));
        assert_eq!(parts[2].0, Flags::COMP);
        assert_eq!(split(Bytes::new(), Flags::NONE, 4).len(), 1);
        assert_eq!(split(body, Flags::NONE, 10).len(), 1);
    }

    #[test]
    fn interleaved_channels_reassemble() {
        let mut r = Reassembler::new(1 << 20);
        assert!(r.push(frame(1, 10, Flags::MORE, b"ab")).unwrap().is_none());
        assert!(r.push(frame(2, 11, Flags::MORE, b"xy")).unwrap().is_none());
        assert_eq!(r.pending_bytes(), 4);
        let m1 = r.push(frame(1, 10, Flags::NONE, b"c")).unwrap().unwrap();
        let m2 = r.push(frame(2, 11, Flags::NONE, b"z")).unwrap().unwrap();
        assert_eq!((&m1.body[..], m1.frames), (&b"abc"[..], 2));
        assert_eq!(&m2.body[..], b"xyz");
        assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn too_large_is_refused_and_rest_dropped() {
        let mut r = Reassembler::new(5);
        r.push(frame(0, 1, Flags::MORE, b"abc")).unwrap();
        let e = r.push(frame(0, 1, Flags::MORE, b"def")).unwrap_err();
        assert_eq!(e.code, ErrorCode::ERR_MESSAGE_TOO_LARGE);
        assert_eq!(r.pending_bytes(), 0);
        // Later chunks of the refused message vanish, the next message is fine.
        assert!(r.push(frame(0, 1, Flags::MORE, b"g")).unwrap().is_none());
        assert!(r.push(frame(0, 1, Flags::NONE, b"h")).unwrap().is_none());
        assert_eq!(
            &r.push(frame(0, 2, Flags::NONE, b"ok"))
                .unwrap()
                .unwrap()
                .body[..],
            b"ok"
        );
    }

    #[test]
    fn pending_total_bounded_across_messages() {
        let mut r = Reassembler::new(6);
        r.push(frame(1, 1, Flags::MORE, b"abcd")).unwrap();
        let e = r.push(frame(2, 2, Flags::MORE, b"efg")).unwrap_err();
        assert_eq!(e.code, ErrorCode::ERR_MESSAGE_TOO_LARGE);
        assert_eq!(r.pending_bytes(), 4);
    }

    #[test]
    fn pending_count_bounded() {
        let mut r = Reassembler::new(1 << 20);
        r.set_max_pending_messages(2);
        r.push(frame(1, 1, Flags::MORE, b"a")).unwrap();
        r.push(frame(2, 2, Flags::MORE, b"a")).unwrap();
        assert_eq!(
            r.push(frame(3, 3, Flags::MORE, b"a")).unwrap_err().code,
            ErrorCode::ERR_BUSY
        );
        assert_eq!(r.pending_messages(), 2);
    }

    #[test]
    fn codec_change_mid_message_is_malformed() {
        let mut r = Reassembler::new(1 << 20);
        r.push(frame(1, 1, Flags::MORE, b"a")).unwrap();
        let mut f = frame(1, 1, Flags::NONE, b"b");
        f.header.body_codec = crate::codec::CodecId::PROTOBUF;
        assert_eq!(r.push(f).unwrap_err().code, ErrorCode::ERR_MALFORMED);
        assert_eq!(r.pending_messages(), 0);
    }

    #[test]
    fn abandoned_message_is_never_delivered() {
        let mut r = Reassembler::new(1 << 20);
        r.push(frame(1, 7, Flags::MORE, b"a")).unwrap();
        // The second chunk failed its CRC upstream.
        r.abandon(1, 7, true);
        assert_eq!(r.pending_bytes(), 0);
        assert!(r.push(frame(1, 7, Flags::MORE, b"c")).unwrap().is_none());
        assert!(r.push(frame(1, 7, Flags::NONE, b"d")).unwrap().is_none());
        // The next message on the channel is whole.
        assert_eq!(
            &r.push(frame(1, 8, Flags::NONE, b"ok"))
                .unwrap()
                .unwrap()
                .body[..],
            b"ok"
        );
    }

    #[test]
    fn shared_budget_bounds_all_connections() {
        let budget = ReassemblyBudget::new(5);
        let mut a = Reassembler::new(1 << 20);
        let mut b = Reassembler::new(1 << 20);
        a.set_shared_budget(Some(budget.clone()));
        b.set_shared_budget(Some(budget.clone()));
        a.push(frame(1, 1, Flags::MORE, b"abc")).unwrap();
        let e = b.push(frame(1, 1, Flags::MORE, b"def")).unwrap_err();
        assert_eq!(e.code, ErrorCode::ERR_BUSY);
        assert_eq!(budget.used(), 3);
        // Completing gives the bytes back; so does dropping a connection's reassembler.
        a.push(frame(1, 1, Flags::NONE, b"g")).unwrap().unwrap();
        assert_eq!(budget.used(), 0);
        b.push(frame(2, 2, Flags::MORE, b"hi")).unwrap();
        assert_eq!(budget.used(), 2);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn single_frame_is_not_copied() {
        let mut r = Reassembler::new(1 << 20);
        let f = frame(0, 1, Flags::NONE, b"zero-copy");
        let ptr = f.payload.as_ptr();
        let m = r.push(f).unwrap().unwrap();
        assert_eq!(m.body.as_ptr(), ptr);
    }
}
