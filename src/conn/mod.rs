//! The connection state machine (sans-IO): handshake and negotiation (SPEC §6), PING/PONG,
//! ACK/NACK with the SPEC's error codes, chunking and reassembly, channels interleaved.
//!
//! A [`Connection`] never touches a socket or reads the clock. Its methods come in three groups,
//! the way `quinn-proto` is organised:
//!
//! - **inputs**: [`Connection::handle_input`] (bytes from the peer),
//!   [`Connection::handle_timeout`] (the time now), [`Connection::handle_eof`], and the
//!   application's [`Connection::send`], [`Connection::ping`], [`Connection::ack`],
//!   [`Connection::nack`], [`Connection::close`];
//! - **outputs**: [`Connection::poll_transmit`] (frames to write, in order),
//!   [`Connection::poll_event`] (what happened), [`Connection::poll_timeout`] (when to call
//!   `handle_timeout` next);
//! - **getters**: [`Connection::is_established`], [`Connection::is_closed`],
//!   [`Connection::negotiated`], ...
//!
//! Two connections can be driven against each other in memory, step by step:
//!
//! ```
//! use std::time::Instant;
//! use bytes::{Bytes, BytesMut};
//! use xcp::codec::CodecId;
//! use xcp::conn::{Config, Connection, Event, Outgoing, Role};
//!
//! let now = Instant::now();
//! let mut client = Connection::new(Role::Initiator, Config::default(), now);
//! let mut server = Connection::new(Role::Responder, Config::default(), now);
//!
//! // Moves every queued frame from one side to the other, as a socket would.
//! fn pump(from: &mut Connection, to: &mut Connection, now: Instant) {
//!     let mut wire = BytesMut::new();
//!     while let Some(frame) = from.poll_transmit() {
//!         frame.write_to(&mut wire);
//!     }
//!     to.handle_input(&mut wire, now);
//! }
//!
//! pump(&mut client, &mut server, now); // HELLO
//! pump(&mut server, &mut client, now); // CAPS
//! assert!(client.is_established() && server.is_established());
//!
//! let id = client.send(Outgoing::data(CodecId::JSON, Bytes::from_static(
//!     br#"{"kind":"text","schema_version":1,"payload":{"text":"hi"},"metadata":{}}"#))).unwrap();
//! pump(&mut client, &mut server, now);
//! while let Some(ev) = server.poll_event() {
//!     if let Event::Message(m) = ev {
//!         assert_eq!(m.msg_id(), id);
//!         assert_eq!(m.ether.unwrap().payload["text"], "hi");
//!     }
//! }
//! ```
#![forbid(unsafe_code)]

mod negotiate;
mod schema;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::CodecId;
use crate::control::{Ack, Control, Hello, KindRange, Nack, Ping};
use crate::error::{CloseReason, Deadline, Error, ErrorCode, Result, Violation};
use crate::ether::{Ether, SchemaKey};
use crate::wire::chunk::{split, Message, Reassembler};
use crate::wire::frame::{encode, EncodedFrame, FrameDecoder, FrameError};
use crate::wire::seal::{self, CompressPolicy, Direction, Sealer};
use crate::wire::{Flags, FrameHeader, HeaderForm, Limits, MsgType, Tag};

pub use negotiate::negotiate;

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection; sends HELLO first; its frames are `c2s`.
    Initiator,
    /// Accepted the connection; answers HELLO with CAPS; its frames are `s2c`.
    Responder,
}

/// Connection settings. `Default` gives the SPEC's defaults; change what differs with the
/// `with_*` methods (or assign the public fields).
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Config {
    /// Our receive limits, advertised in HELLO/CAPS.
    pub limits: Limits,
    /// Body codecs we decode, advertised in HELLO/CAPS. JSON is always added.
    pub codecs: Vec<CodecId>,
    /// The header form an initiator uses (a responder answers in the form of the HELLO).
    pub header_form: HeaderForm,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// Send a PING when nothing has been received for this long (zero: never).
    pub keepalive_interval: Duration,
    /// Close when nothing has been received for this long (zero: never).
    pub idle_timeout: Duration,
    /// Close when a frame that has started arriving is not complete after this long, so a peer
    /// that stalls half-way through a frame (or trickles it) cannot hold the connection.
    pub frame_timeout: Duration,
    /// The most messages pending reassembly at once.
    pub max_pending_messages: usize,
    /// Check every DATA body on arrival with the codec its frame names (JSON and PROTOBUF
    /// are decoded, and the [`Ether`] handed to the application; tensor, latent, Arrow and
    /// DLPack bodies are parsed as views, without copying), and NACK a bad one with
    /// `ERR_MALFORMED` before it reaches the application.
    pub decode_ethers: bool,
    /// Capabilities beyond the core: `shared_mem`, `attach`, `host_id`, `shm_prefix`, `crypt`.
    pub shared_mem: bool,
    /// Handle schemes supported, in order of preference (advertised by name in `attach`).
    pub attach: Vec<crate::attach::Scheme>,
    /// Host identifier (empty: unknown).
    pub host_id: String,
    /// Name prefix of announced shm objects.
    pub shm_prefix: String,
    /// The static key (SPEC §3). With a key, this side advertises `crypt`, seals every message
    /// it sends, and refuses plaintext messages (`ERR_DECRYPT`); a peer without a key cannot
    /// connect.
    pub sealer: Option<Sealer>,
    /// When to compress bodies we send. Compressed bodies we receive are always accepted.
    pub compress: CompressPolicy,
    /// The zstd level for compression.
    pub compress_level: i32,
    /// Bytes pending reassembly shared with other connections (a server's budget); a chunk
    /// that does not fit is refused with `ERR_BUSY`.
    pub reassembly_budget: Option<crate::wire::chunk::ReassemblyBudget>,
    /// The `retry_after_ms` sent with `ERR_BUSY`.
    pub busy_retry_after_ms: u32,
    /// Kinds and majors this side accepts (HELLO/CAPS `accepts`, SPEC §8); empty = any.
    /// With some, a DATA Ether of another kind is refused with `ERR_SCHEMA_UNKNOWN`, and one
    /// at another major is converted by [`Config::adapters`] or refused with
    /// `ERR_KIND_MISMATCH`. Only DATA bodies that are Ethers (JSON, PROTOBUF) are judged, by
    /// the Ether's own `kind` and `schema_version`; any minor of an accepted major passes.
    pub accepts: Vec<KindRange>,
    /// Kinds and majors this side emits (HELLO/CAPS `emits`); empty = any. Announced only.
    pub emits: Vec<KindRange>,
    /// The schemas this side holds (SPEC §8): the SchemaKey of a DATA message sent gets its
    /// `minor` and `hash128` from it, and a DATA Ether received whose schema it holds is
    /// checked (`hash128`, and the payload when [`Config::validate_payloads`] is on). `None`:
    /// no schema is held.
    pub registry: Option<std::sync::Arc<crate::schema::Registry>>,
    /// Adapters between majors (SPEC §8), announced in HELLO/CAPS `adapters`: applied to
    /// received Ethers at a major `accepts` does not take, and to sent Ethers that the
    /// peer's `accepts` take only at another major.
    pub adapters: crate::schema::AdapterGraph,
    /// Whether received payloads are validated against the registry's schemas (feature
    /// `schema`); a failure is NACK `ERR_MALFORMED` naming the JSON pointer.
    pub validate_payloads: bool,
    /// `ring` in HELLO/CAPS (SPEC §9): as initiator, ask to move frames through a same-host
    /// shared-memory ring; as responder, agree when asked. Only a Unix-socket session can
    /// carry it (the session sets it from the transport).
    pub ring: bool,
}

with_fields!(Config {
    /// These receive limits (advertised in HELLO/CAPS).
    with_limits => limits: Limits;
    /// These body codecs decoded (JSON is always added).
    with_codecs => codecs: Vec<CodecId>;
    /// This header form for an initiator's frames.
    with_header_form => header_form: HeaderForm;
    /// The handshake within this long.
    with_handshake_timeout => handshake_timeout: Duration;
    /// A PING after this long without input (zero: never).
    with_keepalive_interval => keepalive_interval: Duration;
    /// Closed after this long without input (zero: never).
    with_idle_timeout => idle_timeout: Duration;
    /// A started frame complete within this long.
    with_frame_timeout => frame_timeout: Duration;
    /// At most this many messages pending reassembly.
    with_max_pending_messages => max_pending_messages: usize;
    /// Whether DATA bodies are checked with their codec on arrival.
    with_decode_ethers => decode_ethers: bool;
    /// The static key (SPEC §3): seal what is sent, require CRYPT from the peer.
    with_sealer => sealer: Option<Sealer>;
    /// When to compress bodies sent.
    with_compress => compress: CompressPolicy;
    /// This zstd level.
    with_compress_level => compress_level: i32;
    /// This `retry_after_ms` with `ERR_BUSY`.
    with_busy_retry_after_ms => busy_retry_after_ms: u32;
    /// These kinds and majors accepted (empty: any).
    with_accepts => accepts: Vec<KindRange>;
    /// These kinds and majors announced as emitted.
    with_emits => emits: Vec<KindRange>;
    /// These schemas held (SchemaKey filled on send, payloads checked on receipt).
    with_registry => registry: Option<std::sync::Arc<crate::schema::Registry>>;
    /// These adapters between majors.
    with_adapters => adapters: crate::schema::AdapterGraph;
    /// Whether received payloads are validated against the registry.
    with_validate_payloads => validate_payloads: bool;
    /// Whether the same-host ring is asked for (initiator) or agreed to (responder).
    with_ring => ring: bool;
});

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            codecs: crate::codec::Registry::default().ids(),
            header_form: HeaderForm::Capnp,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(30),
            max_pending_messages: crate::wire::chunk::DEFAULT_MAX_PENDING_MESSAGES,
            decode_ethers: true,
            shared_mem: false,
            attach: Vec::new(),
            host_id: String::new(),
            shm_prefix: String::new(),
            sealer: None,
            compress: CompressPolicy::Off,
            compress_level: 1,
            reassembly_budget: None,
            busy_retry_after_ms: 100,
            accepts: Vec::new(),
            emits: Vec::new(),
            registry: None,
            adapters: crate::schema::AdapterGraph::new(),
            validate_payloads: true,
            ring: false,
        }
    }
}

/// The result of the handshake.
#[derive(Clone, Debug, PartialEq)]
pub struct Negotiated {
    /// Codecs both sides decode.
    pub codecs: Vec<CodecId>,
    /// The chunk size: the smaller of both sides' `max_frame_bytes`.
    pub max_frame_bytes: u64,
    /// The largest message the peer accepts (the SPEC default when it did not say).
    pub peer_max_message_bytes: u64,
    /// Both sides take handles and are on the same host.
    pub shared_mem: bool,
    /// Handle schemes both support, in this side's order of preference. A name neither
    /// side's build knows is dropped (it is still in `peer.attach`).
    pub attach: Vec<crate::attach::Scheme>,
    /// The header form used on this connection.
    pub header_form: HeaderForm,
    /// Frames move through the same-host ring after CAPS (SPEC §9): the responder passes
    /// the ring's memfd with CAPS, and from then on the socket carries only descriptors,
    /// wake-ups and the end of the connection.
    pub ring: bool,
    /// What the peer announced (its HELLO, or its CAPS).
    pub peer: Hello,
}

/// The schemes of `names` that this build knows, in order, once each.
fn schemes_named<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<crate::attach::Scheme> {
    let mut out = Vec::new();
    for s in names
        .into_iter()
        .filter_map(|n| crate::attach::Scheme::from_name(n))
    {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// A message for the application: DATA (or a msgType above DATA), or CLARIFY_REQ/RES.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The header of the message.
    pub header: FrameHeader,
    /// The wire body, reassembled (a slice of the receive buffer when it came in one frame).
    pub body: Bytes,
    /// The decoded Ether, for JSON and PROTOBUF bodies when [`Config::decode_ethers`] is on.
    pub ether: Option<Ether>,
    /// The decoded control body, for CLARIFY_REQ / CLARIFY_RES.
    pub control: Option<Control>,
    /// COMP and CRYPT as they were on the wire (the body here is already opened and inflated).
    pub flags: Flags,
    /// Read-only views of the attachments that came by handle, by attachment id (filled in by
    /// the session, which maps them; empty at this layer). The message is ACKed when the last
    /// view, and every `Bytes` made from one, is dropped.
    pub views: Vec<(String, crate::attach::View)>,
    /// Views of device memory that came by `cuda-ipc://` handle (feature `cuda`), by
    /// attachment id, filled in by the session. Work queued on the device's
    /// [`Cuda::stream`](crate::attach::cuda::Cuda::stream) after arrival sees the producer's
    /// writes. The message is ACKed when these and the host views are all dropped.
    #[cfg(feature = "cuda")]
    pub device_views: Vec<(String, std::sync::Arc<crate::attach::cuda::DeviceView>)>,
    /// How many frames carried it.
    pub frames: u32,
    /// Where its first frame started in the peer's byte stream (descriptors passed with
    /// `SCM_RIGHTS` are matched to the message by it).
    pub stream_offset: u64,
}

impl Incoming {
    /// The msgId.
    pub fn msg_id(&self) -> u64 {
        self.header.msg_id
    }

    /// The view of the attachment `id`, if it came by handle.
    pub fn view(&self, id: &str) -> Option<&crate::attach::View> {
        self.views.iter().find(|(i, _)| i == id).map(|(_, v)| v)
    }

    /// The device view of attachment `id`, if it came by `cuda-ipc://` handle.
    #[cfg(feature = "cuda")]
    pub fn device_view(
        &self,
        id: &str,
    ) -> Option<&std::sync::Arc<crate::attach::cuda::DeviceView>> {
        self.device_views
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, v)| v)
    }

    /// Whether a mapping behind one of the message's views faulted: the peer shrank a
    /// segment while it was mapped, and what was read past its new end are zeros (SPEC §7).
    /// Check it after reading the views (or `Bytes` made from them) to the end; when the
    /// views are dropped the session answers such a message NACK `ERR_ATTACHMENT`.
    pub fn faulted(&self) -> bool {
        self.views.iter().any(|(_, v)| v.faulted())
    }

    /// The bytes of attachment `id`, wherever they came: a handle's view (no copy) or the
    /// inline bytes of the Ether. For a handle, check [`Incoming::faulted`] after reading
    /// them: a peer that shrinks its segment makes the rest read as zeros.
    pub fn attachment_bytes(&self, id: &str) -> Option<Bytes> {
        if let Some(v) = self.view(id) {
            return Some(v.clone().into_bytes());
        }
        self.ether
            .as_ref()?
            .attachments
            .iter()
            .find(|a| a.id == id)?
            .inline_bytes
            .clone()
    }

    /// A DLPACK body as a descriptor whose data is inline bytes: the body's own bytes, or the
    /// view of a handle (no copy either way), ready for
    /// [`dlpack_ffi::export`](crate::attach::dlpack_ffi::export).
    pub fn dlpack(&self) -> Result<crate::codec::dlpack::DlpackDescriptor> {
        use crate::codec::dlpack::{DlData, DlpackDescriptor};
        let mut d = DlpackDescriptor::decode(self.body.clone())?;
        if let DlData::Uri(u) = &d.data {
            let v = self
                .view("dlpack")
                .ok_or_else(|| Error::attachment(format!("dlpack: {u} was not mapped")))?;
            d.data = DlData::Inline(v.clone().into_bytes());
        }
        Ok(d)
    }

    /// The decoded Ether, decoding now if it was not decoded on arrival.
    pub fn ether(&self) -> Result<Ether> {
        match &self.ether {
            Some(e) => Ok(e.clone()),
            None => crate::codec::decode_ether(self.header.body_codec, &self.body),
        }
    }
}

/// A message to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The channel (0 by default).
    pub channel_id: u32,
    /// DATA by default; CLARIFY_REQ/RES or a layered type above DATA are allowed too.
    pub msg_type: MsgType,
    /// The body codec.
    pub codec: CodecId,
    /// The Ether schema of the body.
    pub schema_key: SchemaKey,
    /// The msgId this answers, 0 if none.
    pub in_reply_to: u64,
    /// Free-form tags.
    pub tags: Vec<Tag>,
    /// The encoded body.
    pub body: Bytes,
}

impl Outgoing {
    /// A DATA message with an already-encoded body.
    pub fn data(codec: CodecId, body: Bytes) -> Self {
        Outgoing {
            channel_id: 0,
            msg_type: MsgType::DATA,
            codec,
            schema_key: SchemaKey::default(),
            in_reply_to: 0,
            tags: Vec::new(),
            body,
        }
    }

    /// A DATA message carrying `ether` encoded with `codec` (JSON or PROTOBUF).
    pub fn ether(ether: &Ether, codec: CodecId) -> Result<Self> {
        let body = crate::codec::encode_ether(ether, codec)?;
        let mut o = Self::data(codec, body);
        o.schema_key = SchemaKey::for_ether(ether);
        Ok(o)
    }

    /// The same message as a reply to `msg_id`.
    #[must_use]
    pub fn reply_to(mut self, msg_id: u64) -> Self {
        self.in_reply_to = msg_id;
        self
    }

    /// The same message on `channel`.
    #[must_use]
    pub fn on_channel(mut self, channel: u32) -> Self {
        self.channel_id = channel;
        self
    }
}

/// What happened on the connection.
// Events are moved once, from the connection to its driver; boxing the message would cost an
// allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
#[derive(Debug)]
pub enum Event {
    /// The handshake finished.
    Connected(Negotiated),
    /// A message for the application.
    Message(Incoming),
    /// The peer acknowledged one of our messages.
    Ack {
        /// Our msgId.
        msg_id: u64,
    },
    /// The peer refused one of our messages.
    Nack {
        /// Our msgId (0 when the peer could not tell which).
        msg_id: u64,
        /// Its error code.
        code: ErrorCode,
        /// How long it asks us to wait before retrying.
        retry_after_ms: u32,
        /// Its explanation.
        detail: String,
    },
    /// A PONG answered one of our PINGs.
    Pong {
        /// The msgId of our PING.
        ping_id: u64,
        /// The round-trip time, as measured with the times given to this connection.
        rtt: Duration,
    },
    /// We refused something the peer sent (and sent the NACK); for logs and metrics.
    Refused {
        /// The peer's msgId, when known.
        msg_id: u64,
        /// The msgId of ours that the refused message answered (its `inReplyTo`), or 0: a
        /// request waiting for it fails with `error`.
        in_reply_to: u64,
        /// What was wrong.
        error: Error,
    },
    /// The connection is over; `None` for a clean close.
    Closed(Option<Error>),
}

/// The most PINGs the application may have outstanding at once.
pub const MAX_OUTSTANDING_PINGS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Responder waiting for HELLO.
    AwaitHello,
    /// Initiator waiting for CAPS.
    AwaitCaps,
    /// Handshake done.
    Established,
    /// Over; only queued transmits remain to be written.
    Closed,
}

/// One XCP connection, sans-IO. See the [module docs](self).
pub struct Connection {
    role: Role,
    config: Config,
    state: State,
    /// Why the connection closed, once it has (the first reason wins).
    closed_for: Option<CloseReason>,
    decoder: FrameDecoder,
    reassembler: Reassembler,
    /// The header form of our frames.
    form: HeaderForm,
    next_msg_id: u64,
    local_hello: Hello,
    negotiated: Option<Negotiated>,
    transmits: VecDeque<EncodedFrame>,
    events: VecDeque<Event>,
    pings: HashMap<u64, Instant>,
    keepalive: Option<(u64, Instant)>,
    /// Bytes of the peer's stream consumed so far: where the next frame starts.
    rx_offset: u64,
    started: Instant,
    last_rx: Instant,
    frame_started: Option<Instant>,
}

impl Connection {
    /// A new connection. An initiator queues its HELLO at once.
    pub fn new(role: Role, config: Config, now: Instant) -> Connection {
        let mut codecs = vec![CodecId::JSON];
        for c in &config.codecs {
            if !codecs.contains(c) {
                codecs.push(*c);
            }
        }
        let local_hello = Hello {
            codecs,
            max_frame_bytes: config.limits.max_frame_bytes,
            accepts: config.accepts.clone(),
            emits: config.emits.clone(),
            shared_mem: config.shared_mem,
            version: negotiate::VERSION_STRING.to_string(),
            attach: config.attach.iter().map(|s| s.name().to_string()).collect(),
            host_id: config.host_id.clone(),
            shm_prefix: config.shm_prefix.clone(),
            crypt: config.sealer.is_some(),
            max_message_bytes: config.limits.max_message_bytes,
            adapters: config.adapters.edges(),
            ring: config.ring,
        };
        let mut reassembler = Reassembler::new(config.limits.max_message_bytes);
        reassembler.set_max_pending_messages(config.max_pending_messages);
        reassembler.set_shared_budget(config.reassembly_budget.clone());
        let mut conn = Connection {
            closed_for: None,
            role,
            state: match role {
                Role::Initiator => State::AwaitCaps,
                Role::Responder => State::AwaitHello,
            },
            decoder: FrameDecoder::new(config.limits),
            reassembler,
            form: config.header_form,
            next_msg_id: 1,
            local_hello,
            negotiated: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            pings: HashMap::new(),
            keepalive: None,
            rx_offset: 0,
            started: now,
            last_rx: now,
            frame_started: None,
            config,
        };
        if role == Role::Initiator {
            let hello = Control::Hello(conn.local_hello.clone());
            conn.queue_control(&hello, 0, 0);
        }
        conn
    }

    // ----- inputs -------------------------------------------------------------------------

    /// Feeds bytes received from the peer. Whole frames are consumed from `buf`; a partial
    /// frame stays in it for the next call.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        if self.state == State::Closed || buf.is_empty() {
            return;
        }
        self.last_rx = now;
        let mut completed = false;
        while self.state != State::Closed {
            let (before, at) = (buf.len(), self.rx_offset);
            let r = self.decoder.decode(buf);
            self.rx_offset += (before - buf.len()) as u64;
            match r {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    completed = true;
                    self.on_frame(frame, at);
                }
                Err(e) => {
                    completed = true;
                    self.on_frame_error(e);
                }
            }
        }
        // Bytes left in `buf` are the start of a frame too, even before its 8-byte prefix is
        // whole: a peer trickling the prefix must not escape the frame timeout.
        if !self.decoder.is_mid_frame() && buf.is_empty() {
            self.frame_started = None;
        } else if completed || self.frame_started.is_none() {
            self.frame_started = Some(now);
        }
    }

    /// Tells the connection the time; call it at [`Connection::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let c = &self.config;
        if self.state != State::Established && now >= self.started + c.handshake_timeout {
            let what = match self.role {
                Role::Initiator => "no CAPS from the peer",
                Role::Responder => "no HELLO from the peer",
            };
            return self.fail(Error::timeout(
                Deadline::Handshake,
                format!("handshake: {what} within {:?}", c.handshake_timeout),
            ));
        }
        if let Some(t) = self.frame_started {
            if !c.frame_timeout.is_zero() && now >= t + c.frame_timeout {
                return self.fail(Error::timeout(
                    Deadline::Frame,
                    format!("peer stalled mid-frame for {:?}", c.frame_timeout),
                ));
            }
        }
        if !c.idle_timeout.is_zero() && now >= self.last_rx + c.idle_timeout {
            return self.fail(Error::timeout(
                Deadline::Idle,
                format!("nothing received for {:?}", c.idle_timeout),
            ));
        }
        if self.keepalive_due(now) {
            let id = self.queue_control(&Control::Ping(Ping { nonce: 0 }), 0, 0);
            self.keepalive = Some((id, now));
        }
    }

    /// The peer closed its side of the stream.
    pub fn handle_eof(&mut self) {
        if self.state == State::Closed {
            return;
        }
        // `frame_started` is also set while the start of a frame shorter than its prefix
        // waits in the caller's buffer.
        if self.decoder.is_mid_frame() || self.frame_started.is_some() {
            self.fail(Error::closed(
                CloseReason::PeerClosedMidFrame,
                "peer closed the stream mid-frame",
            ));
        } else if self.state != State::Established {
            self.fail(Error::closed(
                CloseReason::Handshake,
                "peer closed the stream during the handshake",
            ));
        } else {
            self.finish(None, CloseReason::PeerClosed);
        }
    }

    /// Queues a message; returns its msgId. The body is split into chunks of the negotiated
    /// `max_frame_bytes` without being copied.
    pub fn send(&mut self, mut msg: Outgoing) -> Result<u64> {
        let neg = self.established()?;
        if msg.msg_type.is_control()
            && msg.msg_type != MsgType::CLARIFY_REQ
            && msg.msg_type != MsgType::CLARIFY_RES
        {
            return Err(Error::invalid(format!(
                "send: {:?} is sent by the connection itself",
                msg.msg_type
            )));
        }
        if !msg.msg_type.is_control() && !neg.codecs.contains(&msg.codec) {
            return Err(Error::Incompatible {
                code: ErrorCode::ERR_CODEC_UNSUPPORTED,
                detail: format!(
                    "codec {} was not negotiated (common codecs: {:?})",
                    msg.codec, neg.codecs
                ),
            });
        }
        if msg.msg_type == MsgType::DATA {
            schema::on_send(&self.config, &neg.peer, &mut msg)?;
        }
        let len = msg.body.len() as u64;
        if len > neg.peer_max_message_bytes {
            return Err(Error::invalid(format!(
                "send: body of {len} bytes exceeds the peer's max_message_bytes {}",
                neg.peer_max_message_bytes
            )));
        }
        let max_frame = neg.max_frame_bytes;
        let id = self.next_id();
        let hdr = FrameHeader {
            channel_id: msg.channel_id,
            msg_type: msg.msg_type,
            body_codec: msg.codec,
            schema_key: msg.schema_key,
            msg_id: id,
            in_reply_to: msg.in_reply_to,
            tags: msg.tags,
        };
        // encode → compress → encrypt → chunk (SPEC §3).
        let mut flags = Flags::NONE;
        let mut body = msg.body;
        if let Some(c) = self
            .config
            .compress
            .apply(&body, self.config.compress_level)
        {
            body = c;
            flags = flags | Flags::COMP;
        }
        if let Some(sealer) = &self.config.sealer {
            let ad = seal::aad(hdr.msg_type, hdr.body_codec, hdr.channel_id, id);
            body = sealer.seal(self.direction(), id, hdr.channel_id, &ad, &body);
            flags = flags | Flags::CRYPT;
        }
        for (flags, chunk) in split(body, flags, max_frame) {
            let f = encode(&hdr, self.form, flags, chunk)?;
            self.transmits.push_back(f);
        }
        Ok(id)
    }

    /// Sends a PING; [`Event::Pong`] follows with the round-trip time.
    pub fn ping(&mut self, now: Instant) -> Result<u64> {
        self.established()?;
        if self.pings.len() >= MAX_OUTSTANDING_PINGS {
            return Err(Error::invalid(format!(
                "ping: {MAX_OUTSTANDING_PINGS} PINGs already outstanding"
            )));
        }
        let nonce = self.next_msg_id;
        let id = self.queue_control(&Control::Ping(Ping { nonce }), 0, 0);
        self.pings.insert(id, now);
        Ok(id)
    }

    /// Acknowledges the peer's message `msg_id`.
    pub fn ack(&mut self, msg_id: u64) -> Result<()> {
        self.established()?;
        self.queue_control(&Control::Ack(Ack { msg_id }), 0, msg_id);
        Ok(())
    }

    /// Refuses the peer's message `msg_id` with `code`.
    pub fn nack(
        &mut self,
        msg_id: u64,
        code: ErrorCode,
        retry_after_ms: u32,
        detail: &str,
    ) -> Result<()> {
        self.established()?;
        self.queue_nack(0, msg_id, code, retry_after_ms, detail);
        Ok(())
    }

    /// Closes gracefully: input is no longer processed, queued frames are still transmitted,
    /// and [`Event::Closed`]`(None)` is emitted.
    pub fn close(&mut self) {
        if self.state != State::Closed {
            self.finish(None, CloseReason::Local);
        }
    }

    // ----- outputs ------------------------------------------------------------------------

    /// The next frame to write. Frames must be written in the order they are returned.
    pub fn poll_transmit(&mut self) -> Option<EncodedFrame> {
        self.transmits.pop_front()
    }

    /// How many frames are waiting to be written.
    pub fn pending_transmits(&self) -> usize {
        self.transmits.len()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let c = &self.config;
        let mut t: Option<Instant> = None;
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if self.state != State::Established {
            consider(self.started + c.handshake_timeout);
        }
        if let Some(fs) = self.frame_started {
            if !c.frame_timeout.is_zero() {
                consider(fs + c.frame_timeout);
            }
        }
        if !c.idle_timeout.is_zero() {
            consider(self.last_rx + c.idle_timeout);
        }
        if self.state == State::Established
            && !c.keepalive_interval.is_zero()
            && self.keepalive.is_none_or(|(_, at)| at < self.last_rx)
        {
            consider(self.last_rx + c.keepalive_interval);
        }
        t
    }

    // ----- getters ------------------------------------------------------------------------

    /// Whether the handshake has finished and the connection is open.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the connection is over (queued frames may still wait in `poll_transmit`).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The negotiated parameters, once established.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The header form of our frames.
    pub fn header_form(&self) -> HeaderForm {
        self.form
    }

    /// At least how many more bytes the frame being received needs (a read-size hint).
    pub fn bytes_wanted(&self, buf: &BytesMut) -> usize {
        self.decoder.bytes_wanted(buf)
    }

    /// Makes room in the input buffer `buf` for `additional` bytes, reusing a receive buffer
    /// whose messages are gone before allocating (see [`crate::wire::recvbuf`]).
    pub fn reserve_input(&mut self, buf: &mut BytesMut, additional: usize) {
        self.decoder.reserve(buf, additional);
    }

    /// Bytes held for messages still being reassembled.
    pub fn pending_reassembly_bytes(&self) -> u64 {
        self.reassembler.pending_bytes()
    }

    // ----- internals ----------------------------------------------------------------------

    /// Why the connection closed, once it has.
    pub fn closed_for(&self) -> Option<CloseReason> {
        self.closed_for
    }

    /// Why the connection is closed (this side's close when it is not).
    fn close_reason(&self) -> CloseReason {
        self.closed_for.unwrap_or(CloseReason::Local)
    }

    fn established(&self) -> Result<&Negotiated> {
        match self.state {
            State::Established => Ok(self.negotiated.as_ref().expect("set when established")),
            State::Closed => Err(Error::closed(self.close_reason(), "connection is closed")),
            _ => Err(Error::invalid("the handshake has not finished")),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_msg_id;
        self.next_msg_id += 1;
        id
    }

    fn keepalive_due(&self, now: Instant) -> bool {
        let iv = self.config.keepalive_interval;
        self.state == State::Established
            && !iv.is_zero()
            && now >= self.last_rx + iv
            && self.keepalive.is_none_or(|(_, at)| at < self.last_rx)
    }

    /// Queues a control frame (JSON body, channel, inReplyTo); returns its msgId.
    fn queue_control(&mut self, ctl: &Control, channel_id: u32, in_reply_to: u64) -> u64 {
        let id = self.next_id();
        let hdr = FrameHeader {
            channel_id,
            msg_type: ctl.msg_type(),
            body_codec: CodecId::JSON,
            msg_id: id,
            in_reply_to,
            ..Default::default()
        };
        // Control bodies are small and made by us: encoding cannot fail.
        match ctl
            .encode(CodecId::JSON)
            .and_then(|body| encode(&hdr, self.form, Flags::NONE, body))
        {
            Ok(f) => self.transmits.push_back(f),
            Err(e) => crate::session::ratelog::peer_log_global!(
                WARN,
                "encoding {:?} failed: {e}",
                ctl.msg_type()
            ),
        }
        id
    }

    fn queue_nack(
        &mut self,
        channel_id: u32,
        msg_id: u64,
        code: ErrorCode,
        retry_after_ms: u32,
        detail: &str,
    ) {
        let nack = Control::Nack(Nack {
            msg_id,
            error_code: code,
            retry_after_ms,
            detail: if detail.is_empty() {
                None
            } else {
                Some(detail.to_string())
            },
        });
        self.queue_control(&nack, channel_id, msg_id);
    }

    /// Refuses a message of the peer: NACK on the wire, `Refused` for the application.
    fn refuse(&mut self, channel_id: u32, msg_id: u64, error: Error) {
        self.refuse_reply(0, channel_id, msg_id, error)
    }

    /// Refuses a message that may answer one of ours (`in_reply_to`, 0 when it does not):
    /// the NACK goes to the peer, and the event names the request, whose caller must not
    /// wait for a reply that was refused.
    fn refuse_reply(&mut self, in_reply_to: u64, channel_id: u32, msg_id: u64, error: Error) {
        let (code, detail) = match &error {
            Error::Protocol { code, detail, .. } | Error::Incompatible { code, detail } => {
                (*code, detail.clone())
            }
            other => (other.code(), other.to_string()),
        };
        let retry = if code == ErrorCode::ERR_BUSY {
            self.config.busy_retry_after_ms
        } else {
            0
        };
        self.queue_nack(channel_id, msg_id, code, retry, &detail);
        self.events.push_back(Event::Refused {
            msg_id,
            in_reply_to,
            error,
        });
    }

    fn on_frame_error(&mut self, e: FrameError) {
        if self.state == State::AwaitHello {
            // Answer in the form the peer used, as far as we can tell.
            self.form = e.header_form;
        }
        let fatal = e.fatal;
        let (ch, id) = (e.channel_id, e.msg_id);
        if !fatal && self.state == State::Established {
            // The rest of its message must not be assembled around the hole.
            self.reassembler.abandon(ch, id, e.more);
        }
        let err = Error::from(e);
        if fatal {
            self.queue_nack(ch, id, err.code(), 0, &detail_of(&err));
            self.fail(err);
        } else {
            self.refuse(ch, id, err);
        }
    }

    fn on_frame(&mut self, frame: crate::wire::Frame, at: u64) {
        let t = frame.header.msg_type;
        match self.state {
            State::AwaitHello if t != MsgType::HELLO => {
                self.form = frame.header_form;
                let err = Error::malformed(
                    Violation::Sequence,
                    format!("handshake: expected HELLO first, got {t:?}"),
                );
                self.queue_nack(
                    frame.header.channel_id,
                    frame.header.msg_id,
                    err.code(),
                    0,
                    &detail_of(&err),
                );
                return self.fail(err);
            }
            State::AwaitCaps if t != MsgType::CAPS && t != MsgType::NACK => {
                let err = Error::malformed(
                    Violation::Sequence,
                    format!("handshake: expected CAPS, got {t:?}"),
                );
                self.queue_nack(
                    frame.header.channel_id,
                    frame.header.msg_id,
                    err.code(),
                    0,
                    &detail_of(&err),
                );
                return self.fail(err);
            }
            _ => {}
        }
        match self.reassembler.push_at(frame, at) {
            Ok(Some(msg)) => self.on_message(msg),
            Ok(None) => {}
            Err(e) => self.on_frame_error(e),
        }
    }

    fn on_message(&mut self, mut msg: Message) {
        let reply_to = msg.header.in_reply_to;
        let (ch, id) = (msg.header.channel_id, msg.header.msg_id);
        let t = msg.header.msg_type;
        // Handshake messages, and what answers them, are plaintext; everything else is sealed
        // when this side holds a key.
        let may_be_plain = matches!(
            t,
            MsgType::HELLO
                | MsgType::CAPS
                | MsgType::ACK
                | MsgType::NACK
                | MsgType::PING
                | MsgType::PONG
        );
        if msg.flags.contains(Flags::CRYPT) {
            let Some(sealer) = &self.config.sealer else {
                return self.refuse_reply(
                    reply_to,
                    ch,
                    id,
                    Error::protocol(
                        Violation::Transform,
                        ErrorCode::ERR_DECRYPT,
                        "flags: CRYPT set but this side holds no key",
                    ),
                );
            };
            let ad = seal::aad(t, msg.header.body_codec, ch, id);
            let peer_dir = match self.direction() {
                Direction::C2S => Direction::S2C,
                Direction::S2C => Direction::C2S,
            };
            match sealer.open(peer_dir, id, ch, &ad, &msg.body) {
                Ok(plain) => msg.body = plain,
                Err(e) => return self.refuse_reply(reply_to, ch, id, e),
            }
        } else if self.config.sealer.is_some() && !may_be_plain {
            return self.refuse_reply(
                reply_to,
                ch,
                id,
                Error::protocol(
                    Violation::Transform,
                    ErrorCode::ERR_DECRYPT,
                    format!("{t:?} sent in plaintext; this side requires CRYPT"),
                ),
            );
        }
        if msg.flags.contains(Flags::COMP) {
            match seal::decompress(&msg.body, self.config.limits.max_message_bytes) {
                Ok(plain) => msg.body = plain,
                Err(e) => return self.refuse_reply(reply_to, ch, id, e),
            }
        }
        if t.is_control() {
            self.on_control(msg)
        } else {
            self.on_data(msg)
        }
    }

    /// The direction of the frames we send.
    fn direction(&self) -> Direction {
        match self.role {
            Role::Initiator => Direction::C2S,
            Role::Responder => Direction::S2C,
        }
    }

    fn on_control(&mut self, msg: Message) {
        let h = &msg.header;
        let (ch, id, t) = (h.channel_id, h.msg_id, h.msg_type);
        let ctl = match Control::decode(t, h.body_codec, &msg.body) {
            Ok(c) => c,
            Err(e) => {
                if matches!(self.state, State::AwaitHello | State::AwaitCaps) {
                    self.form = msg.header_form;
                    self.queue_nack(ch, id, e.code(), 0, &detail_of(&e));
                    return self.fail(e);
                }
                return self.refuse(ch, id, e);
            }
        };
        match ctl {
            Control::Hello(peer) => {
                if self.state != State::AwaitHello {
                    return self.refuse(
                        ch,
                        id,
                        Error::malformed(
                            Violation::Sequence,
                            "handshake: HELLO on an established connection",
                        ),
                    );
                }
                self.form = msg.header_form;
                if self.config.sealer.is_some() && !peer.crypt {
                    let e = Error::Incompatible {
                        code: ErrorCode::ERR_DECRYPT,
                        detail: "this side requires CRYPT; the peer holds no key".into(),
                    };
                    self.queue_nack(ch, id, e.code(), 0, &detail_of(&e));
                    return self.fail(e);
                }
                match negotiate(&self.local_hello, &peer) {
                    Ok(caps) => {
                        self.queue_control(&Control::Caps(caps.clone()), ch, id);
                        let neg = Negotiated {
                            codecs: caps.codecs.clone(),
                            max_frame_bytes: caps.max_frame_bytes,
                            peer_max_message_bytes: caps.max_message_bytes,
                            shared_mem: caps.shared_mem,
                            attach: schemes_named(&caps.attach),
                            header_form: self.form,
                            ring: caps.ring,
                            peer,
                        };
                        self.establish(neg);
                    }
                    Err(e) => {
                        self.queue_nack(ch, id, e.code(), 0, &detail_of(&e));
                        self.fail(e);
                    }
                }
            }
            Control::Caps(caps) => {
                if self.state != State::AwaitCaps {
                    return self.refuse(
                        ch,
                        id,
                        Error::malformed(Violation::Sequence, "handshake: unexpected CAPS"),
                    );
                }
                // The responder's CAPS is the negotiated result; we still intersect with our
                // own offer so a wrong CAPS cannot make us send what we did not offer.
                let codecs: Vec<CodecId> = caps
                    .codecs
                    .iter()
                    .copied()
                    .filter(|c| self.local_hello.codecs.contains(c))
                    .collect();
                if codecs.is_empty() {
                    let e = Error::Incompatible {
                        code: ErrorCode::ERR_CODEC_UNSUPPORTED,
                        detail: format!("CAPS lists no codec we offered: {:?}", caps.codecs),
                    };
                    return self.fail(e);
                }
                if self.config.sealer.is_some() && !caps.crypt {
                    return self.fail(Error::Incompatible {
                        code: ErrorCode::ERR_DECRYPT,
                        detail: "this side requires CRYPT; the peer holds no key".into(),
                    });
                }
                if let Err(e) = negotiate::check_frame_floor(caps.max_frame_bytes, "CAPS") {
                    return self.fail(e);
                }
                if caps.ring && !self.local_hello.ring {
                    // The responder would write to a ring we never read: nothing could arrive.
                    return self.fail(Error::malformed(
                        Violation::Control,
                        "CAPS turns on the shared-memory ring, which our HELLO did not ask for",
                    ));
                }
                let mfb = match caps.max_frame_bytes {
                    0 => crate::wire::DEFAULT_MAX_FRAME_BYTES,
                    v => v,
                };
                let mmb = match caps.max_message_bytes {
                    0 => crate::wire::DEFAULT_MAX_MESSAGE_BYTES,
                    v => v,
                };
                let neg = Negotiated {
                    codecs,
                    max_frame_bytes: mfb.min(self.local_hello.max_frame_bytes),
                    peer_max_message_bytes: mmb,
                    shared_mem: caps.shared_mem && self.local_hello.shared_mem,
                    attach: schemes_named(
                        caps.attach
                            .iter()
                            .filter(|s| self.local_hello.attach.contains(s)),
                    ),
                    header_form: self.form,
                    ring: caps.ring,
                    peer: caps,
                };
                self.establish(neg);
            }
            Control::Ack(a) => self.events.push_back(Event::Ack { msg_id: a.msg_id }),
            Control::Nack(n) => {
                let detail = n.detail.unwrap_or_default();
                if self.state == State::AwaitCaps {
                    let e = if n.error_code == ErrorCode::ERR_CODEC_UNSUPPORTED
                        || n.error_code == ErrorCode::ERR_VERSION
                    {
                        Error::Incompatible {
                            code: n.error_code,
                            detail,
                        }
                    } else {
                        Error::Nack {
                            msg_id: n.msg_id,
                            code: n.error_code,
                            retry_after_ms: n.retry_after_ms,
                            detail,
                        }
                    };
                    return self.fail(e);
                }
                self.events.push_back(Event::Nack {
                    msg_id: n.msg_id,
                    code: n.error_code,
                    retry_after_ms: n.retry_after_ms,
                    detail,
                });
            }
            Control::Ping(_) => {
                // Echo the body exactly, in the codec it came in.
                let hdr = FrameHeader {
                    channel_id: ch,
                    msg_type: MsgType::PONG,
                    body_codec: msg.header.body_codec,
                    msg_id: self.next_id(),
                    in_reply_to: id,
                    ..Default::default()
                };
                // A PING may have come in chunks: its echo is chunked to the peer's limit too.
                let max_frame = self
                    .negotiated
                    .as_ref()
                    .map_or(crate::wire::DEFAULT_MAX_FRAME_BYTES, |n| n.max_frame_bytes);
                for (flags, chunk) in split(msg.body, Flags::NONE, max_frame) {
                    match encode(&hdr, self.form, flags, chunk) {
                        Ok(f) => self.transmits.push_back(f),
                        // The echo of the peer's PING: the peer decides how often.
                        Err(e) => crate::session::ratelog::peer_log_global!(
                            WARN,
                            "encoding PONG failed: {e}"
                        ),
                    }
                }
            }
            Control::Pong(pong) => {
                // Our PING's nonce is its msgId, so a peer that echoes the body but leaves
                // inReplyTo at 0 is still matched.
                let to = match msg.header.in_reply_to {
                    0 => pong.nonce,
                    id => id,
                };
                if let Some(sent) = self.pings.remove(&to) {
                    self.events.push_back(Event::Pong {
                        ping_id: to,
                        rtt: self.last_rx.saturating_duration_since(sent),
                    });
                } else if self.keepalive.is_some_and(|(k, _)| k == to) {
                    // Keep-alive answered; nothing for the application.
                } else {
                    tracing::debug!("PONG for msgId {to}, which was not a PING of ours");
                }
            }
            c @ (Control::ClarifyReq(_) | Control::ClarifyRes(_)) => {
                if self.state != State::Established {
                    return;
                }
                self.events.push_back(Event::Message(Incoming {
                    header: msg.header,
                    body: msg.body,
                    ether: None,
                    control: Some(c),
                    flags: msg.flags,
                    views: Vec::new(),
                    #[cfg(feature = "cuda")]
                    device_views: Vec::new(),
                    frames: msg.frames,
                    stream_offset: msg.stream_offset,
                }));
            }
        }
    }

    fn on_data(&mut self, mut msg: Message) {
        let reply_to = msg.header.in_reply_to;
        let (ch, id) = (msg.header.channel_id, msg.header.msg_id);
        let Some(neg) = self.negotiated.as_ref() else {
            return self.refuse_reply(
                reply_to,
                ch,
                id,
                Error::malformed(Violation::Sequence, "DATA before the handshake finished"),
            );
        };
        let codec = msg.header.body_codec;
        if !neg.codecs.contains(&codec) {
            return self.refuse_reply(
                reply_to,
                ch,
                id,
                Error::protocol(
                    Violation::Body,
                    ErrorCode::ERR_CODEC_UNSUPPORTED,
                    format!("bodyCodec {codec} was not negotiated"),
                ),
            );
        }
        let mut ether = None;
        let enforce = schema::enforced(&self.config);
        if (self.config.decode_ethers || enforce) && msg.header.msg_type == MsgType::DATA {
            let checked = if codec == CodecId::JSON || codec == CodecId::PROTOBUF {
                crate::codec::decode_ether(codec, &msg.body).map(|e| ether = Some(e))
            } else if self.config.decode_ethers {
                crate::codec::validate_body(codec, &msg.body)
            } else {
                Ok(())
            };
            if let Err(e) = checked {
                return self.refuse_reply(reply_to, ch, id, e);
            }
        }
        if let (true, Some(e)) = (enforce, ether.as_mut()) {
            if let Err(err) = schema::on_receive(&self.config, &mut msg.header, &mut msg.body, e) {
                return self.refuse_reply(reply_to, ch, id, err);
            }
        }
        self.events.push_back(Event::Message(Incoming {
            header: msg.header,
            body: msg.body,
            ether,
            control: None,
            flags: msg.flags,
            views: Vec::new(),
            #[cfg(feature = "cuda")]
            device_views: Vec::new(),
            frames: msg.frames,
            stream_offset: msg.stream_offset,
        }));
    }

    fn establish(&mut self, neg: Negotiated) {
        self.state = State::Established;
        self.reassembler = {
            // Bound reassembly by what we advertised.
            let mut r = Reassembler::new(self.config.limits.max_message_bytes);
            r.set_max_pending_messages(self.config.max_pending_messages);
            r.set_shared_budget(self.config.reassembly_budget.clone());
            r
        };
        self.events.push_back(Event::Connected(neg.clone()));
        self.negotiated = Some(neg);
    }

    fn fail(&mut self, err: Error) {
        let reason = CloseReason::of(&err);
        self.finish(Some(err), reason);
    }

    fn finish(&mut self, err: Option<Error>, reason: CloseReason) {
        self.state = State::Closed;
        self.closed_for.get_or_insert(reason);
        self.reassembler.clear();
        self.pings.clear();
        self.frame_started = None;
        self.events.push_back(Event::Closed(err));
    }
}

fn detail_of(e: &Error) -> String {
    match e {
        Error::Protocol { detail, .. } | Error::Incompatible { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("next_msg_id", &self.next_msg_id)
            .field("transmits", &self.transmits.len())
            .field("events", &self.events.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
