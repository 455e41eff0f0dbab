//! The fuzz entry points, in one place for both of their callers:
//!
//! - the cargo-fuzz targets `fuzz/fuzz_targets/<name>.rs` (nightly, libFuzzer), one per
//!   function here;
//! - `tests/fuzz_corpus.rs`, which replays every file of `fuzz/corpus/<name>/` through the same
//!   function as an ordinary `cargo test` on the stable toolchain.
//!
//! Every function takes arbitrary bytes. It must not panic, and it checks with `assert!` the
//! invariants its doc names (limits that hold, round trips that must agree), so a broken
//! invariant is a crash the fuzzer reports like any other.
// Each fuzz target uses one of these functions; the corpus replay uses them all.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use xcp::attach::uri::AttachmentUri;
use xcp::codec::dlpack::DlpackDescriptor;
use xcp::codec::tensor::TensorView;
use xcp::codec::{self, arrow, json, latent, protobuf, CodecId};
use xcp::conn::{Config, Connection, Event, Outgoing, Role};
use xcp::control::Control;
use xcp::wire::chunk::Reassembler;
use xcp::wire::frame::{encode_frame, FrameDecoder, FrameError};
use xcp::wire::seal::{self, Direction, Sealer};
use xcp::wire::{header, Flags, FrameHeader, HeaderForm, Limits, MsgType, PREFIX_LEN};
use xcp::ErrorCode;

/// A fuzz entry point.
pub type Entry = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Entry)] = &[
    ("frame_decoder", frame_decoder),
    ("header", header),
    ("codecs", codecs),
    ("attach_uri", attach_uri),
    ("connection", connection),
];

// ----- panics the library catches ---------------------------------------------------------

/// Lets panics raised inside the arrow crates unwind quietly.
///
/// The arrow-ipc decoder can panic on a malformed stream, and `codec::arrow::decode_batches`
/// catches that (`catch_unwind`) and answers `ERR_MALFORMED`. libFuzzer's panic hook aborts on
/// every panic, caught or not, so such a panic would be reported as a crash though nothing
/// escapes. This hook ignores panics located in the arrow crates and hands every other one to
/// the previous hook; a panic that escapes the library still fails the run (libFuzzer aborts
/// when its `catch_unwind` sees it, and the corpus replay reports it).
fn let_caught_arrow_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_arrow = info
                .location()
                .is_some_and(|l| l.file().contains("/arrow-"));
            if !in_arrow {
                previous(info);
            }
        }));
    });
}

/// An application action of the `connection` target.
#[derive(Clone, Copy, Debug)]
enum Action {
    Ping,
    Nack,
    Close,
}

// ----- split points ------------------------------------------------------------------------

/// Chunk lengths drawn from a seed: single bytes, small and medium pieces, and "the rest", so
/// one input is fed to a decoder cut at many different places.
struct Splits {
    state: u64,
}

impl Splits {
    fn new(seed: u8) -> Splits {
        Splits {
            state: 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed).wrapping_mul(0x2545_F491_4F6C_DD1D),
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn next_len(&mut self) -> usize {
        let x = self.next_u64();
        let pick = (x >> 32) as usize;
        match x % 5 {
            0 => 1,
            1 => 1 + pick % 8,
            2 => 1 + pick % 64,
            3 => 1 + pick % 4096,
            _ => usize::MAX,
        }
    }

    /// How far the clock moves after a piece: mostly not at all or a little, sometimes past
    /// the keep-alive (1 s), frame (2 s) or handshake (5 s) timers, rarely past the idle one.
    fn next_step(&mut self) -> Duration {
        let x = self.next_u64();
        match x % 16 {
            0..=5 => Duration::ZERO,
            6..=10 => Duration::from_millis(50),
            11..=12 => Duration::from_millis(1100),
            13 => Duration::from_millis(2100),
            14 => Duration::from_millis(5100),
            _ if x % 64 == 15 => Duration::from_secs(61),
            _ => Duration::from_millis(300),
        }
    }

    /// What the application does now: mostly nothing.
    fn next_action(&mut self) -> Option<Action> {
        match self.next_u64() % 64 {
            0..=3 => Some(Action::Ping),
            4..=5 => Some(Action::Nack),
            6 => Some(Action::Close),
            _ => None,
        }
    }

    /// `data` cut into pieces.
    fn cut<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = self.next_len().min(data.len());
            let (a, b) = data.split_at(n);
            out.push(a);
            data = b;
        }
        out
    }
}

// ----- frame_decoder -----------------------------------------------------------------------

/// The limits of the `frame_decoder` target: small, so the fuzzer reaches them.
pub const FRAME_LIMITS: Limits = Limits::new(512, 2048);
/// Messages pending reassembly at once in the `frame_decoder` target.
pub const FRAME_MAX_PENDING: usize = 8;

/// What decoding a stream produced, in order.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(FrameHeader, Flags, Bytes),
    FrameError(FrameError),
    Message(FrameHeader, Flags, Bytes, u32),
    Refused(FrameError),
}

/// Feeds `pieces` to a [`FrameDecoder`] and a [`Reassembler`] with small limits, as the
/// connection does, and checks each step's bounds.
fn decode_stream(pieces: &[&[u8]]) -> Vec<Outcome> {
    let mut dec = FrameDecoder::new(FRAME_LIMITS);
    let mut re = Reassembler::new(FRAME_LIMITS.max_message_bytes);
    re.set_max_pending_messages(FRAME_MAX_PENDING);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() as u64 <= FRAME_LIMITS.max_frame_bytes);
                    check_frame_round_trip(&frame);
                    out.push(Outcome::Frame(
                        frame.header.clone(),
                        frame.flags,
                        frame.payload.clone(),
                    ));
                    match re.push(frame) {
                        Ok(None) => {}
                        Ok(Some(m)) => {
                            assert!(m.body.len() as u64 <= FRAME_LIMITS.max_message_bytes);
                            assert!(!m.flags.contains(Flags::MORE));
                            out.push(Outcome::Message(m.header, m.flags, m.body, m.frames));
                        }
                        Err(e) => {
                            assert!(!e.fatal, "the reassembler never fails the stream");
                            out.push(Outcome::Refused(e));
                        }
                    }
                }
                Err(e) => {
                    if e.fatal {
                        // Poisoned: the same error from now on, whatever comes.
                        let mut more = BytesMut::from(&b"\x10\x7a\xa1\xa9"[..]);
                        assert_eq!(dec.decode(&mut more).unwrap_err(), e);
                        assert!(!dec.is_mid_frame());
                        out.push(Outcome::FrameError(e));
                        check_reassembly_bounds(&re);
                        return out;
                    }
                    re.abandon(e.channel_id, e.msg_id, e.more);
                    out.push(Outcome::FrameError(e));
                }
            }
            check_reassembly_bounds(&re);
        }
        // What stays buffered is less than one frame: the decoder consumed every whole one.
        let one_frame = PREFIX_LEN as u64 + 65535 + 8 + FRAME_LIMITS.max_frame_bytes + 4;
        assert!((buf.len() as u64) < one_frame, "{} bytes left", buf.len());
    }
    out
}

fn check_reassembly_bounds(re: &Reassembler) {
    assert!(re.pending_bytes() <= FRAME_LIMITS.max_message_bytes);
    assert!(re.pending_messages() <= FRAME_MAX_PENDING);
}

/// A decoded frame encodes again (when its header fits our canonical encoding) to bytes that
/// decode to the same frame.
fn check_frame_round_trip(frame: &xcp::wire::Frame) {
    let flags = frame.flags.with(Flags::LARGE, false);
    let Ok(bytes) = encode_frame(&frame.header, frame.header_form, flags, &frame.payload) else {
        return;
    };
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(&bytes[..]);
    let again = dec
        .decode(&mut buf)
        .expect("our own frame decodes")
        .expect("whole");
    assert!(buf.is_empty());
    assert_eq!(again.header, frame.header);
    assert_eq!(again.header_form, frame.header_form);
    assert_eq!(again.flags, flags);
    assert_eq!(again.payload, frame.payload);
}

/// `frame_decoder`: byte 0 seeds the split points, the rest is a byte stream. The stream is
/// decoded (frames, then reassembly with small limits) twice, whole and cut into pieces; both
/// must give the same frames, messages and errors. Checked on the way: no payload over
/// `max_frame_bytes`, no message over `max_message_bytes`, pending bytes and messages within
/// their bounds, less than one frame left buffered, a fatal error that sticks, and every
/// decoded frame surviving an encode/decode round trip.
pub fn frame_decoder(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_stream(&[stream]);
    let pieces = Splits::new(seed).cut(stream);
    let split = decode_stream(&pieces);
    assert_eq!(whole, split, "results depend on where the input was split");
}

// ----- header ------------------------------------------------------------------------------

fn other_form(f: HeaderForm) -> HeaderForm {
    match f {
        HeaderForm::Capnp => HeaderForm::Json,
        HeaderForm::Json => HeaderForm::Capnp,
    }
}

/// `header`: [`header::decode`] of arbitrary bytes (`{` first: the JSON form, else Cap'n
/// Proto). A failure is `ERR_MALFORMED`; a decoded header encodes in both forms (unless it
/// would not fit HLEN) to bytes that decode to the same header.
pub fn header(data: &[u8]) {
    match header::decode(data) {
        Err(e) => assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}"),
        Ok((h, form)) => {
            assert_eq!(form == HeaderForm::Json, data[0] == b'{');
            for f in [form, other_form(form)] {
                let Ok(bytes) = header::encode(&h, f) else {
                    continue;
                };
                assert!(!bytes.is_empty() && bytes.len() <= header::MAX_HEADER_LEN);
                let (again, f2) = header::decode(&bytes).expect("our own header decodes");
                assert_eq!(f2, f);
                assert_eq!(again, h);
            }
        }
    }
}

// ----- codecs ------------------------------------------------------------------------------

/// The cap on inflated bytes in the `codecs` target's zstd case.
pub const ZSTD_MAX: u64 = 4096;

/// The control msgTypes fuzzed (every defined one, and two unknown).
const CONTROL_TYPES: [MsgType; 10] = [
    MsgType::HELLO,
    MsgType::CAPS,
    MsgType::ACK,
    MsgType::NACK,
    MsgType::PING,
    MsgType::PONG,
    MsgType::CLARIFY_REQ,
    MsgType::CLARIFY_RES,
    MsgType(0x0042),
    MsgType(0x00FF),
];

/// `codecs`: byte 0 picks a decoder, the rest is its body.
///
/// | byte 0 % 12 | decoder | checked |
/// |---|---|---|
/// | 0 | JSON Ether | a decoded Ether encodes and decodes to itself |
/// | 1 | PROTOBUF Ether | the same |
/// | 2, 3, 4 | TENSOR_F32 / F16 / QNT8 | every element converts; size = header's |
/// | 5 | MIXED_LATENT | the same for each tensor |
/// | 6 | ARROW_IPC | batches, and Ethers from them |
/// | 7 | DLPACK | a decoded descriptor validates and encodes to what decodes to itself |
/// | 8 | control body: byte 1 picks the msgType and JSON/PROTOBUF | a decoded body round-trips |
/// | 9 | `seal::decompress` with a 4 KiB cap | never more than the cap |
/// | 10 | `validate_body` with the codec in bytes 1..3 | only the SPEC's codes |
/// | 11 | `Sealer::open` | always `ERR_DECRYPT` |
pub fn codecs(data: &[u8]) {
    let_caught_arrow_panics_unwind();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(rest);
    match sel % 12 {
        0 => {
            if let Ok(e) = json::decode(rest) {
                let again = json::encode(&e).expect("a decoded Ether encodes");
                assert_same_ether(&json::decode(&again).expect("and decodes"), &e);
            }
        }
        1 => {
            if let Ok(e) = protobuf::decode(rest) {
                let again = protobuf::encode(&e).expect("a decoded Ether encodes");
                assert_same_ether(&protobuf::decode(&again).expect("and decodes"), &e);
            }
        }
        c @ 2..=4 => {
            let codec = CodecId(u16::from(c));
            if let Ok(v) = TensorView::parse(body.clone(), Some(codec)) {
                check_tensor(&v);
                assert!(codec::validate_body(codec, &body).is_ok());
            }
        }
        5 => {
            if let Ok(views) = latent::decode(body.clone()) {
                views.iter().for_each(check_tensor);
                assert!(codec::validate_body(CodecId::MIXED_LATENT, &body).is_ok());
            }
        }
        6 => {
            if let Ok((_schema, batches)) = arrow::decode_batches(body.clone()) {
                for b in &batches {
                    assert!(b.num_columns() <= b.schema().fields().len());
                }
            }
            let _ = arrow::decode_ethers(body, None);
        }
        7 => {
            if let Ok(d) = DlpackDescriptor::decode(body) {
                d.validate().expect("a decoded descriptor is valid");
                let _ = d.extent();
                let again = d.encode().expect("a decoded descriptor encodes");
                assert_eq!(DlpackDescriptor::decode(again).expect("and decodes"), d);
            }
        }
        8 => {
            let Some((&which, body)) = rest.split_first() else {
                return;
            };
            let t = CONTROL_TYPES[usize::from(which) % CONTROL_TYPES.len()];
            let codec = if which & 0x80 != 0 {
                CodecId::PROTOBUF
            } else {
                CodecId::JSON
            };
            match Control::decode(t, codec, body) {
                Ok(c) => {
                    assert_eq!(c.msg_type(), t);
                    let again = c.encode(codec).expect("a decoded control body encodes");
                    let back = Control::decode(t, codec, &again).expect("and decodes");
                    assert!(
                        same_json(&back.to_json(), &c.to_json()),
                        "{back:?} != {c:?}"
                    );
                }
                Err(e) => assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}"),
            }
        }
        9 => match seal::decompress(rest, ZSTD_MAX) {
            Ok(out) => assert!(out.len() as u64 <= ZSTD_MAX),
            Err(e) => assert!(
                e.code() == ErrorCode::ERR_MALFORMED
                    || e.code() == ErrorCode::ERR_MESSAGE_TOO_LARGE,
                "{e}"
            ),
        },
        10 => {
            let Some(id) = rest.get(..2) else {
                return;
            };
            let codec = CodecId(u16::from_le_bytes([id[0], id[1]]));
            let body = body.slice(2..);
            if let Err(e) = codec::validate_body(codec, &body) {
                let c = e.code();
                assert!(
                    c == ErrorCode::ERR_MALFORMED
                        || c == ErrorCode::ERR_ATTACHMENT
                        || c == ErrorCode::ERR_CODEC_UNSUPPORTED,
                    "{e}"
                );
            }
        }
        _ => {
            let sealer = Sealer::new(&[7u8; 32]);
            let ad = seal::aad(MsgType::DATA, CodecId::JSON, 1, 2);
            let e = sealer
                .open(Direction::C2S, 2, 1, &ad, rest)
                .expect_err("a forgery");
            assert_eq!(e.code(), ErrorCode::ERR_DECRYPT);
        }
    }
}

/// JSON values equal but for the last bits of floats. serde_json (without its
/// `float_roundtrip` feature) parses some long decimal numbers to a neighbour of the nearest
/// f64, so a float written and read again may move by an ulp; nothing else may change.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn assert_same_ether(a: &xcp::Ether, b: &xcp::Ether) {
    let (x, y) = (
        serde_json::to_value(a).expect("an Ether serializes"),
        serde_json::to_value(b).expect("an Ether serializes"),
    );
    assert!(same_json(&x, &y), "{a:?} != {b:?}");
}

fn check_tensor(v: &TensorView) {
    let n = v.numel();
    assert_eq!(n as u64, v.header().numel().expect("checked"));
    assert_eq!(
        v.body().len() as u64,
        v.header().body_len().expect("checked")
    );
    assert_eq!(v.to_f32_vec().len(), n);
}

// ----- attach_uri --------------------------------------------------------------------------

/// `attach_uri`: [`AttachmentUri::parse`] of arbitrary UTF-8. A failure is `ERR_ATTACHMENT`;
/// a parsed URI has `offset + size` without overflow, and prints as a URI that parses to
/// itself.
pub fn attach_uri(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match AttachmentUri::parse(s) {
        Err(e) => assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{e}"),
        Ok(u) => {
            assert_eq!(u.offset().checked_add(u.size()), Some(u.end()));
            let printed = u.to_string();
            assert_eq!(AttachmentUri::parse(&printed).expect("reparses"), u);
        }
    }
}

// ----- connection --------------------------------------------------------------------------

/// The limits of the `connection` target's responder.
pub const CONN_LIMITS: Limits = Limits::new(1024, 4096);
/// The static key of the `connection` target's keyed runs.
pub const CONN_KEY: [u8; 32] = [0x42; 32];

fn conn_config(keyed: bool) -> Config {
    Config::default()
        .with_limits(CONN_LIMITS)
        .with_max_pending_messages(16)
        .with_handshake_timeout(Duration::from_secs(5))
        .with_frame_timeout(Duration::from_secs(2))
        .with_idle_timeout(Duration::from_secs(60))
        .with_keepalive_interval(Duration::from_secs(1))
        .with_sealer(keyed.then(|| Sealer::new(&CONN_KEY)))
}

/// What the `connection` target puts under test, from bits 2 and 3 of its mode byte.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scene {
    /// A responder that got a valid HELLO; the input is what the client sends next.
    Served,
    /// A responder that got nothing yet: the handshake itself is fuzzed.
    Unhandshaken,
    /// An initiator that sent its HELLO: the input is the server's answer (CAPS, NACK, …).
    Greeting,
    /// An initiator a valid server answered; the input is what the server sends next.
    Connected,
}

impl Scene {
    fn from_mode(mode: u8) -> Scene {
        match (mode >> 2) & 3 {
            0 => Scene::Served,
            1 => Scene::Unhandshaken,
            2 => Scene::Greeting,
            _ => Scene::Connected,
        }
    }

    /// Whether the peer's limits are the library's own (so a message we accepted can be
    /// echoed back).
    fn peer_is_library(self) -> bool {
        matches!(self, Scene::Served | Scene::Connected)
    }
}

/// `connection`: one [`Connection`] (small limits) fed arbitrary bytes as its peer's stream,
/// while its application answers. Byte 0 is the mode: bit 0 gives both sides a key, bit 1
/// makes the library peer use the JSON header form, bits 2-3 pick the [`Scene`] (a responder
/// after a valid HELLO, a responder before any, an initiator awaiting CAPS, an initiator after
/// a valid CAPS), bits 4.. seed the split points, the clock and the application.
///
/// The clock moves by a drawn step per piece (0 to 61 s), so the handshake, frame, idle and
/// keep-alive timers all fire. The application ACKs and echoes back each message it gets, and
/// now and then PINGs, NACKs or closes.
///
/// It must never panic; bytes pending reassembly stay within `max_message_bytes`, less than
/// one frame stays buffered, no message over the limit reaches the application, every frame
/// the connection writes decodes, a fired timer is re-armed in the future (no busy loop), an
/// accepted message can be echoed to a library peer, and nothing is kept after the end.
pub fn connection(data: &[u8]) {
    let_caught_arrow_panics_unwind();
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let keyed = mode & 1 != 0;
    let scene = Scene::from_mode(mode);
    let t0 = Instant::now();
    let role = match scene {
        Scene::Served | Scene::Unhandshaken => Role::Responder,
        Scene::Greeting | Scene::Connected => Role::Initiator,
    };
    let mut conn = Connection::new(role, conn_config(keyed), t0);
    // Both sides offer the same limits, so the negotiated chunk size is ours.
    let mut out = FrameDecoder::new(CONN_LIMITS);
    let mut written = BytesMut::new();
    let mut peer_cfg = conn_config(keyed);
    if mode & 2 != 0 {
        peer_cfg.header_form = HeaderForm::Json;
    }
    match scene {
        Scene::Served => {
            let mut peer = Connection::new(Role::Initiator, peer_cfg, t0);
            let mut hello = take_transmits(&mut peer);
            conn.handle_input(&mut hello, t0);
            assert!(conn.is_established(), "a valid HELLO is accepted");
        }
        Scene::Connected => {
            let mut peer = Connection::new(Role::Responder, peer_cfg, t0);
            let mut hello = take_transmits(&mut conn);
            peer.handle_input(&mut hello, t0);
            let mut caps = take_transmits(&mut peer);
            conn.handle_input(&mut caps, t0);
            assert!(conn.is_established(), "a valid CAPS is accepted");
        }
        Scene::Unhandshaken | Scene::Greeting => {}
    }
    let mut app = App {
        rng: Splits::new((mode >> 4) ^ 0xA5),
        echo_must_work: scene.peer_is_library(),
        connected: 0,
    };
    app.react(&mut conn, &mut out, &mut written, t0);
    let mut now = t0;
    let mut buf = BytesMut::new();
    let mut splits = Splits::new(mode >> 4);
    for piece in splits.cut(stream) {
        buf.extend_from_slice(piece);
        conn.handle_input(&mut buf, now);
        if !conn.is_closed() {
            let one_frame = PREFIX_LEN as u64 + 65535 + 8 + CONN_LIMITS.max_frame_bytes + 4;
            assert!((buf.len() as u64) < one_frame, "{} bytes left", buf.len());
        }
        now += splits.next_step();
        fire_timers(&mut conn, now);
        app.react(&mut conn, &mut out, &mut written, now);
        if conn.is_closed() {
            buf.clear();
        }
    }
    // Let every timer that is still armed fire, then end the stream.
    if mode & 0x10 != 0 {
        now += Duration::from_secs(61);
        fire_timers(&mut conn, now);
        app.react(&mut conn, &mut out, &mut written, now);
    }
    conn.handle_eof();
    app.react(&mut conn, &mut out, &mut written, now);
    assert_eq!(
        conn.pending_reassembly_bytes(),
        0,
        "nothing kept after the end"
    );
}

/// Everything `conn` has queued, written out.
fn take_transmits(conn: &mut Connection) -> BytesMut {
    let mut b = BytesMut::new();
    while let Some(f) = conn.poll_transmit() {
        f.write_to(&mut b);
    }
    b
}

/// Calls [`Connection::handle_timeout`] when a timer is due, as an event loop does; a timer
/// that fired must not stay due (the loop would spin).
fn fire_timers(conn: &mut Connection, now: Instant) {
    if conn.poll_timeout().is_some_and(|t| t <= now) {
        conn.handle_timeout(now);
        if let Some(t) = conn.poll_timeout() {
            assert!(t > now, "a timer is still due after it fired");
        }
    }
}

/// The application on top of the fuzzed connection.
struct App {
    rng: Splits,
    echo_must_work: bool,
    /// `Event::Connected`s seen.
    connected: u32,
}

impl App {
    /// Takes everything the connection has to say (its frames must decode, its events keep
    /// the limits) and answers: each message is ACKed and echoed back, and a drawn action
    /// (PING, NACK, close) now and then.
    fn react(
        &mut self,
        conn: &mut Connection,
        out: &mut FrameDecoder,
        written: &mut BytesMut,
        now: Instant,
    ) {
        assert!(conn.pending_reassembly_bytes() <= CONN_LIMITS.max_message_bytes);
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Message(m) => {
                    assert!(m.body.len() as u64 <= CONN_LIMITS.max_message_bytes);
                    if conn.is_closed() {
                        continue;
                    }
                    conn.ack(m.msg_id()).expect("ACK on an open connection");
                    let echo = Outgoing::data(m.header.body_codec, m.body.clone())
                        .reply_to(m.msg_id())
                        .on_channel(m.header.channel_id);
                    let sent = conn.send(echo);
                    if self.echo_must_work {
                        if let Err(e) = sent {
                            panic!("echo of an accepted message failed: {e}");
                        }
                    }
                }
                Event::Connected(_) => {
                    // Events are read after the input that made them: the connection may have
                    // closed since. It connects once.
                    self.connected += 1;
                    assert_eq!(self.connected, 1, "a second Connected");
                }
                _ => {}
            }
        }
        if conn.is_established() && !conn.is_closed() {
            match self.rng.next_action() {
                Some(Action::Ping) => {
                    let _ = conn.ping(now);
                }
                Some(Action::Nack) => {
                    conn.nack(7, ErrorCode::ERR_BUSY, 5, "later")
                        .expect("NACK on an open connection");
                }
                Some(Action::Close) => conn.close(),
                None => {}
            }
        }
        while let Some(f) = conn.poll_transmit() {
            f.write_to(written);
        }
        while let Some(frame) = out
            .decode(written)
            .expect("the connection writes valid frames")
        {
            assert!(frame.payload.len() as u64 <= CONN_LIMITS.max_frame_bytes);
        }
    }
}
