//! The fuzz corpus, replayed as an ordinary test (as rustls does): every file of
//! `fuzz/corpus/<target>/` goes through the same entry function as the cargo-fuzz target of
//! that name (`fuzz/fuzz_targets/common.rs`, included here), on the stable toolchain. A file
//! that makes one panic fails the test, naming the file.
//!
//! The corpus holds hand-made seeds (written by [`write_seed_corpus`], an ignored test:
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus`), the golden vectors of
//! `tests/vectors/` as binary, and inputs the fuzzer found interesting (minimised), including
//! those that once crashed a target.

#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use xcp::codec::{arrow, dlpack, json, latent, protobuf, tensor, CodecId};
use xcp::conn::{Config, Connection, Outgoing, Role};
use xcp::control::{Ack, ClarifyReq, ClarifyRes, Control, Hello, KindRange, Nack, Ping};
use xcp::wire::frame::encode_frame;
use xcp::wire::seal::{CompressPolicy, Sealer};
use xcp::wire::{header, Flags, FrameHeader, HeaderForm, MsgType, SchemaKey, Tag, MAGIC_BYTES};
use xcp::{Attachment, ErrorCode, Ether};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs every corpus file of `target` through its entry function.
fn replay(target: &str) {
    let (_, entry) = common::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{target}: only {} seeds", files.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read corpus file");
        let r = std::panic::catch_unwind(|| entry(&data));
        if r.is_err() {
            failed.push(file.display().to_string());
        }
    }
    eprintln!(
        "{target}: {} files replayed in {:?}",
        files.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{target}: these inputs panic: {failed:#?}"
    );
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder");
}

#[test]
fn header_corpus() {
    replay("header");
}

#[test]
fn codecs_corpus() {
    replay("codecs");
}

#[test]
fn attach_uri_corpus() {
    replay("attach_uri");
}

#[test]
fn connection_corpus() {
    replay("connection");
}

/// Every target has a corpus directory, and nothing else is there.
#[test]
fn corpus_directories_match_targets() {
    let mut dirs: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"))
            .expect("fuzz/corpus")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
    dirs.sort();
    let mut targets: Vec<String> = common::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    targets.sort();
    assert_eq!(dirs, targets);
}

// ----- the hand-made seeds -----------------------------------------------------------------

#[path = "support/hex.rs"]
mod hex;
use hex::parse_hex;

fn vector(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    parse_hex(&std::fs::read_to_string(&path).expect("vector"))
}

struct Seeds {
    dir: PathBuf,
}

impl Seeds {
    fn new(target: &str) -> Seeds {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Seeds { dir }
    }

    fn put(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}

fn with(first: &[u8], rest: &[u8]) -> Vec<u8> {
    [first, rest].concat()
}

fn hdr(t: MsgType, codec: CodecId, id: u64, channel: u32) -> FrameHeader {
    FrameHeader {
        channel_id: channel,
        msg_type: t,
        body_codec: codec,
        msg_id: id,
        ..FrameHeader::default()
    }
}

fn frame(h: &FrameHeader, form: HeaderForm, flags: Flags, body: &[u8]) -> Vec<u8> {
    encode_frame(h, form, flags, &Bytes::copy_from_slice(body)).expect("frame")
}

fn rich_header() -> FrameHeader {
    FrameHeader {
        channel_id: 7,
        msg_type: MsgType::DATA,
        body_codec: CodecId::PROTOBUF,
        schema_key: SchemaKey {
            ns_hash: 1,
            kind_id: 0xBDE6_4E3E,
            major: 1,
            minor: 2,
            hash128: [0xAB; 16],
        },
        msg_id: u64::MAX,
        in_reply_to: 3,
        tags: vec![
            Tag {
                key: "k".into(),
                val: "v".into(),
            },
            Tag {
                key: String::new(),
                val: "é\u{1}\"".into(),
            },
        ],
    }
}

/// A Cap'n Proto header whose `tags` list claims `n` elements of zero words each: 64 bytes for
/// any `n` (the reader's traversal limit must bound the work).
fn zero_size_tags_header(n: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0u32.to_le_bytes()); // one segment
    v.extend_from_slice(&7u32.to_le_bytes()); // of 7 words
                                              // Root: a struct pointer to word 1, 3 data words, 2 pointers.
    v.extend_from_slice(&(3u64 << 32 | 2u64 << 48).to_le_bytes());
    // Data: channelId 0, msgType DATA, bodyCodec JSON; msgId 1; inReplyTo 0.
    v.extend_from_slice(&(0x0100u64 << 32 | 1u64 << 48).to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes()); // schemaKey: null
                                              // tags: a list pointer (kind 1) to the next word, inline composite (7), 0 words of elements.
    v.extend_from_slice(&(1u64 | 7u64 << 32).to_le_bytes());
    // The list's tag word: `n` elements of 0 data words, 0 pointers.
    v.extend_from_slice(&(u64::from(n) << 2).to_le_bytes());
    v
}

fn text_body(text: &str) -> Vec<u8> {
    json::encode(&Ether::text(text)).expect("ether").to_vec()
}

fn hello() -> Hello {
    Hello {
        codecs: vec![CodecId::JSON, CodecId::TENSOR_F32],
        max_frame_bytes: 1024,
        accepts: vec![KindRange {
            kind_id: 0xBDE6_4E3E,
            major: 1,
            min_minor: 0,
            max_minor: 3,
        }],
        shared_mem: true,
        version: "0.2".into(),
        attach: vec!["shm".into(), "memfd".into()],
        host_id: "host".into(),
        shm_prefix: "xcp-1-".into(),
        crypt: true,
        max_message_bytes: 4096,
        ..Hello::default()
    }
}

fn controls() -> Vec<Control> {
    let mut values = serde_json::Map::new();
    values.insert("x".into(), serde_json::json!([1, 2.5, "s", null]));
    vec![
        Control::Hello(hello()),
        Control::Caps(hello()),
        Control::Ack(Ack { msg_id: 9 }),
        Control::Nack(Nack {
            msg_id: 9,
            error_code: ErrorCode::ERR_BUSY,
            retry_after_ms: 100,
            detail: Some("busy".into()),
        }),
        Control::Ping(Ping { nonce: 1 }),
        Control::Pong(Ping { nonce: 1 }),
        Control::ClarifyReq(ClarifyReq {
            fields: vec!["a".into(), "b".into()],
            reason: Some("why".into()),
        }),
        Control::ClarifyRes(ClarifyRes {
            values,
            idempotency_key: Some("k".into()),
        }),
    ]
}

/// Frames a keyed or plain initiator sends after the handshake of the `connection` target.
fn client_frames(keyed: bool, form: HeaderForm) -> Vec<u8> {
    after_handshake(Role::Initiator, keyed, form, CompressPolicy::Off).1
}

/// The CAPS a library responder answers a HELLO with, in the `connection` target's setup.
fn server_caps(keyed: bool, form: HeaderForm) -> Vec<u8> {
    after_handshake(Role::Responder, keyed, form, CompressPolicy::Off).0
}

/// Frames a keyed or plain responder sends after the handshake of the `connection` target.
fn server_frames(keyed: bool, form: HeaderForm) -> Vec<u8> {
    after_handshake(Role::Responder, keyed, form, CompressPolicy::Off).1
}

/// A handshake between two library connections with the `connection` target's limits, then
/// every kind of frame from `sender`, its bodies compressed by `compress`: (what `sender`
/// wrote during the handshake, what it wrote after).
fn after_handshake(
    sender: Role,
    keyed: bool,
    form: HeaderForm,
    compress: CompressPolicy,
) -> (Vec<u8>, Vec<u8>) {
    let now = Instant::now();
    let cfg = |keyed: bool| {
        Config::default()
            .with_limits(common::CONN_LIMITS)
            .with_header_form(form)
            .with_sealer(keyed.then(|| Sealer::new(&common::CONN_KEY)))
            .with_compress(compress)
    };
    let mut client = Connection::new(Role::Initiator, cfg(keyed), now);
    let mut server = Connection::new(Role::Responder, cfg(keyed), now);
    let mut hello = BytesMut::new();
    while let Some(f) = client.poll_transmit() {
        f.write_to(&mut hello);
    }
    let during_client = hello.to_vec();
    server.handle_input(&mut hello, now);
    let mut back = BytesMut::new();
    while let Some(f) = server.poll_transmit() {
        f.write_to(&mut back);
    }
    let during_server = back.to_vec();
    client.handle_input(&mut back, now);
    assert!(client.is_established());
    let (conn, during) = match sender {
        Role::Initiator => (&mut client, during_client),
        Role::Responder => (&mut server, during_server),
    };
    conn.send(Outgoing::ether(&Ether::text("hi"), CodecId::JSON).expect("ether"))
        .expect("send");
    // Chunked: 3000 bytes at 1024 a frame.
    let big = Ether::text("x".repeat(3000));
    conn.send(
        Outgoing::ether(&big, CodecId::JSON)
            .expect("ether")
            .on_channel(5),
    )
    .expect("send");
    let t = tensor::encode_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0], false).expect("tensor");
    conn.send(Outgoing::data(CodecId::TENSOR_F32, t))
        .expect("send");
    let req = Control::ClarifyReq(ClarifyReq {
        fields: vec!["f".into()],
        reason: None,
    });
    let mut o = Outgoing::data(CodecId::JSON, req.encode(CodecId::JSON).expect("body"));
    o.msg_type = MsgType::CLARIFY_REQ;
    conn.send(o).expect("send");
    conn.ping(now).expect("ping");
    conn.ack(1).expect("ack");
    conn.nack(2, ErrorCode::ERR_BUSY, 10, "later")
        .expect("nack");
    let mut out = BytesMut::new();
    while let Some(f) = conn.poll_transmit() {
        f.write_to(&mut out);
    }
    (during, out.to_vec())
}

/// Writes the hand-made seeds into `fuzz/corpus/` (run by hand after changing them).
#[test]
#[ignore = "writes into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let ping_capnp = vector("ping_capnp.hex");
    let ping_json = vector("ping_json.hex");

    // frame_decoder: byte 0 seeds the split points.
    let s = Seeds::new("frame_decoder");
    s.put("ping-capnp", &with(&[0], &ping_capnp));
    s.put("ping-json", &with(&[1], &ping_json));
    s.put(
        "two-pings",
        &with(&[2], &[ping_capnp.clone(), ping_json.clone()].concat()),
    );
    let data = hdr(MsgType::DATA, CodecId::JSON, 5, 1);
    let body = text_body("chunked message");
    let (a, b) = body.split_at(10);
    let mut chunked = frame(&data, HeaderForm::Capnp, Flags::MORE, a);
    chunked.extend(frame(
        &hdr(MsgType::DATA, CodecId::JSON, 6, 2),
        HeaderForm::Capnp,
        Flags::MORE,
        b"interleaved",
    ));
    chunked.extend(frame(&data, HeaderForm::Capnp, Flags::NONE, b));
    chunked.extend(frame(
        &hdr(MsgType::DATA, CodecId::JSON, 6, 2),
        HeaderForm::Capnp,
        Flags::NONE,
        b"!",
    ));
    s.put("chunked-interleaved", &with(&[3], &chunked));
    s.put(
        "rich-header",
        &with(
            &[4],
            &frame(&rich_header(), HeaderForm::Capnp, Flags::COMP, b"zzz"),
        ),
    );
    s.put(
        "rich-header-json",
        &with(
            &[5],
            &frame(&rich_header(), HeaderForm::Json, Flags::CRYPT, b"sealed"),
        ),
    );
    let mut large = ping_capnp.clone();
    let hlen = u16::from_le_bytes([large[6], large[7]]) as usize;
    large[5] |= Flags::LARGE.0;
    large.splice(8 + hlen..8 + hlen + 4, 11u64.to_le_bytes());
    s.put("large-small-plen", &with(&[6], &large));
    let mut bad_crc = ping_capnp.clone();
    *bad_crc.last_mut().expect("trailer") ^= 1;
    s.put(
        "bad-crc-then-ping",
        &with(&[7], &[bad_crc, ping_capnp.clone()].concat()),
    );
    let mut reserved = ping_capnp.clone();
    reserved[5] = 0x01;
    s.put("reserved-flags", &with(&[8], &reserved));
    let mut plen_over = ping_capnp[..8 + hlen].to_vec();
    plen_over.extend_from_slice(&513u32.to_le_bytes());
    s.put("plen-over", &with(&[9], &plen_over));
    let mut version = ping_capnp.clone();
    version[4] = 0x12;
    s.put("version-high", &with(&[10], &version));
    let mut over_message = Vec::new();
    for i in 0..5u8 {
        let flags = if i < 4 { Flags::MORE } else { Flags::NONE };
        over_message.extend(frame(&data, HeaderForm::Capnp, flags, &[b' '; 500]));
    }
    s.put("message-over", &with(&[11], &over_message));
    let mut garbage = MAGIC_BYTES.to_vec();
    garbage.extend_from_slice(&[0x02, 0x00, 8, 0]);
    garbage.extend_from_slice(&[0xFF; 8]);
    garbage.extend_from_slice(&0u32.to_le_bytes());
    garbage.extend_from_slice(&[0; 4]);
    s.put("garbage-header", &with(&[12], &garbage));

    // header
    let s = Seeds::new("header");
    s.put("ping-capnp", &ping_capnp[8..8 + hlen]);
    let jlen = u16::from_le_bytes([ping_json[6], ping_json[7]]) as usize;
    s.put("ping-json", &ping_json[8..8 + jlen]);
    for form in [HeaderForm::Capnp, HeaderForm::Json] {
        let h = header::encode(&rich_header(), form).expect("header");
        s.put(&format!("rich-{form:?}"), &h);
    }
    s.put("json-minimal", b"{}");
    s.put(
        "json-nulls",
        br#"{"channelId":null,"tags":[{"key":null}],"schemaKey":{"hash128":""}}"#,
    );
    s.put("zero-size-tags", &zero_size_tags_header(3));
    s.put("zero-size-tags-over", &zero_size_tags_header(70_000));

    // codecs: byte 0 picks the decoder.
    let s = Seeds::new("codecs");
    let mut rich = Ether::text("hello");
    rich.extra_fields
        .insert("n".into(), serde_json::json!({"a": [1, 2]}));
    rich.attachments.push(Attachment {
        id: "a".into(),
        uri: "shm://xcp-1-x#0,4".into(),
        shape: vec![1],
        dtype: "float32".into(),
        size_bytes: 4,
        inline_bytes: Some(Bytes::from_static(b"abcd")),
        ..Attachment::default()
    });
    s.put(
        "json-ether",
        &with(&[0], &json::encode(&rich).expect("json")),
    );
    s.put(
        "protobuf-ether",
        &with(&[1], &protobuf::encode(&rich).expect("pb")),
    );
    s.put("tensor-f32", &with(&[2], &vector("tensor_f32.hex")));
    s.put("tensor-f16", &with(&[3], &vector("tensor_f16.hex")));
    s.put(
        "tensor-qnt8-row",
        &with(&[4], &vector("tensor_qnt8_row.hex")),
    );
    let q = tensor::encode_qnt8(&[2, 2], &[0.5, -1.0, 2.0, 0.0], false, true).expect("qnt8");
    s.put("tensor-qnt8-col", &with(&[4], &q));
    s.put("latent", &with(&[5], &vector("latent.hex")));
    let f32t = tensor::encode_f32(&[3], &[1.0, 2.0, 3.0], false).expect("f32");
    let lat = latent::encode(&[(CodecId::TENSOR_F32, f32t.clone())]).expect("latent");
    s.put("latent-one", &with(&[5], &lat));
    let arrow_body = arrow::encode_ethers(&[Ether::text("a"), Ether::text("b")]).expect("arrow");
    s.put("arrow-ethers", &with(&[6], &arrow_body));
    let emb = arrow::encode_ethers(&[Ether::embedding(&[1.0, 2.0])]).expect("arrow");
    s.put("arrow-embedding", &with(&[6], &emb));
    s.put("dlpack-inline", &with(&[7], &vector("dlpack_inline.hex")));
    s.put("dlpack-uri", &with(&[7], &vector("dlpack_uri.hex")));
    let d = dlpack::DlpackDescriptor::cpu(
        dlpack::DlDataType::F32,
        vec![2],
        Bytes::from_static(&[0; 8]),
    )
    .expect("dlpack");
    s.put("dlpack-cpu", &with(&[7], &d.encode().expect("encode")));
    for (i, c) in controls().iter().enumerate() {
        let t = c.msg_type().0 as u8;
        s.put(
            &format!("control-{i}-json"),
            &with(&[8, t], &c.encode(CodecId::JSON).expect("json")),
        );
        s.put(
            &format!("control-{i}-pb"),
            &with(&[8, t | 0x80], &c.encode(CodecId::PROTOBUF).expect("pb")),
        );
    }
    s.put("control-unknown", &with(&[8, 8], b"{}"));
    let z = xcp::wire::seal::compress(&[b'a'; 1000], 3).expect("zstd");
    s.put("zstd-small", &with(&[9], &z));
    let bomb = xcp::wire::seal::compress(&vec![0u8; 1 << 20], 3).expect("zstd");
    s.put("zstd-bomb", &with(&[9], &bomb));
    s.put("validate-f32", &with(&[10, 2, 0], &f32t));
    s.put("validate-unknown", &with(&[10, 0x77, 0], b"x"));
    s.put("sealed", &with(&[11], &[0u8; 40]));

    // attach_uri
    let s = Seeds::new("attach_uri");
    let hex = "0123456789abcdef".repeat(8);
    for (name, uri) in [
        ("shm", "shm://xcp-1-abc.seg_0#0,4096".to_string()),
        ("memfd", "memfd://3#16,1024".to_string()),
        (
            "cuda",
            format!("cuda-ipc://GPU-12345678-1234-1234-1234-123456789abc/{hex}#0,256"),
        ),
        (
            "cuda-event",
            format!("cuda-ipc://GPU-12345678-1234-1234-1234-123456789abc/{hex}?event={hex}#0,256"),
        ),
        (
            "cuda-event-after",
            format!("cuda-ipc://GPU-12345678-1234-1234-1234-123456789abc/{hex}#0,256?event={hex}"),
        ),
        ("dotdot", "shm://..#0,1".to_string()),
        ("overflow", format!("shm://a#{},{}", u64::MAX, 1)),
        ("no-fragment", "shm://abc".to_string()),
        ("no-scheme", "abc#0,1".to_string()),
    ] {
        s.put(name, uri.as_bytes());
    }

    // connection: byte 0 = mode (bit 0 keyed, bit 1 JSON header form, bits 2-3 the scene:
    // 0 served, 1 no HELLO yet, 2 an initiator awaiting CAPS, 3 an initiator connected; bits
    // 4.. the seed of splits, clock and application).
    let s = Seeds::new("connection");
    s.put(
        "plain",
        &with(&[0], &client_frames(false, HeaderForm::Capnp)),
    );
    s.put(
        "keyed",
        &with(&[1], &client_frames(true, HeaderForm::Capnp)),
    );
    s.put(
        "json-form",
        &with(&[2], &client_frames(false, HeaderForm::Json)),
    );
    s.put(
        "keyed-json",
        &with(&[3], &client_frames(true, HeaderForm::Json)),
    );
    s.put("no-hello-ping", &with(&[4], &ping_capnp));
    let hello_frame = frame(
        &hdr(MsgType::HELLO, CodecId::JSON, 1, 0),
        HeaderForm::Capnp,
        Flags::NONE,
        &Control::Hello(hello())
            .encode(CodecId::JSON)
            .expect("hello"),
    );
    s.put("no-hello-hello", &with(&[4], &hello_frame));
    s.put("second-hello", &with(&[0], &hello_frame));
    s.put("chunks-over", &with(&[16], &over_message));
    // A PING of 3000 bytes in three chunks: its PONG must be chunked too (it once went out as
    // one frame over the peer's max_frame_bytes).
    let mut ping_body = b"{\"nonce\":1}".to_vec();
    ping_body.resize(3000, b' ');
    let ping = hdr(MsgType::PING, CodecId::JSON, 50, 0);
    let mut chunked_ping = Vec::new();
    for (i, c) in ping_body.chunks(1024).enumerate() {
        let flags = if i < 2 { Flags::MORE } else { Flags::NONE };
        chunked_ping.extend(frame(&ping, HeaderForm::Capnp, flags, c));
    }
    s.put("chunked-ping", &with(&[0], &chunked_ping));
    // The initiator's side: the server's answer to its HELLO, then what a server sends.
    for (mode, keyed, form, name) in [
        (0b1000, false, HeaderForm::Capnp, "plain"),
        (0b1001, true, HeaderForm::Capnp, "keyed"),
        (0b1010, false, HeaderForm::Json, "json-form"),
    ] {
        s.put(
            &format!("caps-{name}"),
            &with(&[mode], &server_caps(keyed, form)),
        );
        s.put(
            &format!("server-{name}"),
            &with(&[mode | 0b0100], &server_frames(keyed, form)),
        );
    }
    // The server's NACK of the HELLO (msgId 1).
    let hello_nack = |error_code, retry_after_ms, detail: Option<&str>| {
        frame(
            &hdr(MsgType::NACK, CodecId::JSON, 1, 0),
            HeaderForm::Capnp,
            Flags::NONE,
            &Control::Nack(Nack {
                msg_id: 1,
                error_code,
                retry_after_ms,
                detail: detail.map(String::from),
            })
            .encode(CodecId::JSON)
            .expect("nack"),
        )
    };
    let refusal = hello_nack(ErrorCode::ERR_VERSION, 0, Some("no"));
    s.put("caps-refused", &with(&[0b1000], &refusal));
    s.put("server-hello", &with(&[0b1100], &hello_frame));
    // The initiator's other ways out of the handshake: a NACK that is not about codecs or
    // versions, a CAPS that states no limits (the defaults), a plain CAPS to a keyed side, and
    // a CAPS naming no codec we offered.
    let nack_busy = hello_nack(ErrorCode::ERR_BUSY, 100, None);
    s.put("caps-busy", &with(&[0b1000], &nack_busy));
    let caps_json = |body: &[u8]| {
        let mut h = hdr(MsgType::CAPS, CodecId::JSON, 1, 0);
        h.in_reply_to = 1;
        frame(&h, HeaderForm::Capnp, Flags::NONE, body)
    };
    s.put(
        "caps-no-limits",
        &with(&[0b1000], &caps_json(br#"{"codecs":[1,2]}"#)),
    );
    s.put(
        "caps-foreign-codecs",
        &with(&[0b1000], &caps_json(br#"{"codecs":[4096]}"#)),
    );
    s.put(
        "caps-plain-to-keyed",
        &with(&[0b1001], &server_caps(false, HeaderForm::Capnp)),
    );
    // Compressed bodies both ways.
    for (role, mode, name) in [
        (Role::Initiator, 0b0000, "client"),
        (Role::Responder, 0b1100, "server"),
    ] {
        let (_, frames) =
            after_handshake(role, false, HeaderForm::Capnp, CompressPolicy::Above(16));
        s.put(&format!("{name}-compressed"), &with(&[mode], &frames));
    }
    // PONGs for the application's PINGs (its first msgIds, whatever the drawn actions): the
    // RTT path, one file per application seed.
    let mut pongs = Vec::new();
    for id in 2..=8u64 {
        let mut h = hdr(MsgType::PONG, CodecId::JSON, 100 + id, 0);
        h.in_reply_to = id;
        pongs.extend(frame(
            &h,
            HeaderForm::Capnp,
            Flags::NONE,
            &Control::Pong(Ping { nonce: id })
                .encode(CodecId::JSON)
                .expect("pong"),
        ));
    }
    for seed in 0..16u8 {
        s.put(
            &format!("server-pongs-{seed:x}"),
            &with(&[0b1100 | seed << 4], &pongs),
        );
    }
    // DATA before any HELLO, and more half-messages than a connection keeps (ERR_BUSY).
    let data_hdr = hdr(MsgType::DATA, CodecId::JSON, 7, 0);
    s.put(
        "data-before-hello",
        &with(
            &[0b0100],
            &frame(&data_hdr, HeaderForm::Capnp, Flags::NONE, b"{}"),
        ),
    );
    let mut halves = Vec::new();
    for i in 0..20u32 {
        halves.extend(frame(
            &hdr(MsgType::DATA, CodecId::JSON, 10 + u64::from(i), i),
            HeaderForm::Capnp,
            Flags::MORE,
            b"{\"payload\":",
        ));
    }
    s.put("half-messages", &with(&[0], &halves));
}
