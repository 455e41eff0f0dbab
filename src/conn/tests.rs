//! In-memory connection pairs driven step by step.

use super::*;
use crate::control::Control;
use crate::wire::frame::FrameDecoder;
use crate::wire::MIN_PEER_MAX_FRAME_BYTES;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

struct Pair {
    client: Connection,
    server: Connection,
    now: Instant,
}

fn pump(from: &mut Connection, to: &mut Connection, now: Instant) -> usize {
    let mut buf = BytesMut::new();
    let mut n = 0;
    while let Some(t) = from.poll_transmit() {
        t.write_to(&mut buf);
        n += 1;
    }
    to.handle_input(&mut buf, now);
    assert!(buf.is_empty(), "whole frames are consumed");
    n
}

impl Pair {
    fn new(cc: Config, sc: Config) -> Pair {
        let now = Instant::now();
        let mut p = Pair {
            client: Connection::new(Role::Initiator, cc, now),
            server: Connection::new(Role::Responder, sc, now),
            now,
        };
        p.run();
        p
    }

    /// Moves frames both ways until nothing is left.
    fn run(&mut self) {
        loop {
            let a = pump(&mut self.client, &mut self.server, self.now);
            let b = pump(&mut self.server, &mut self.client, self.now);
            if a + b == 0 {
                break;
            }
        }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }
}

fn data(body: &'static [u8]) -> Outgoing {
    Outgoing::data(CodecId::JSON, Bytes::from_static(body))
}

#[test]
fn handshake_negotiates() {
    let mut sc = Config::default();
    sc.limits.max_frame_bytes = 4096;
    sc.codecs = vec![CodecId::JSON];
    let mut p = Pair::new(Config::default(), sc);
    assert!(p.client.is_established() && p.server.is_established());
    let ce = Pair::events(&mut p.client);
    let Event::Connected(n) = &ce[0] else {
        panic!("{ce:?}")
    };
    assert_eq!(n.codecs, vec![CodecId::JSON]);
    assert_eq!(n.max_frame_bytes, 4096);
    let se = Pair::events(&mut p.server);
    assert!(matches!(&se[0], Event::Connected(n) if n.max_frame_bytes == 4096));
}

#[test]
fn json_header_initiator_gets_json_answers() {
    let cc = Config {
        header_form: HeaderForm::Json,
        ..Default::default()
    };
    let now = Instant::now();
    let mut client = Connection::new(Role::Initiator, cc, now);
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    pump(&mut client, &mut server, now);
    let caps = server.poll_transmit().unwrap();
    assert_eq!(caps.head[8], b'{', "CAPS answered in the JSON form");
    assert_eq!(server.header_form(), HeaderForm::Json);
}

#[test]
fn data_request_reply_and_ack() {
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.client);
    Pair::events(&mut p.server);
    let e = crate::ether::Ether::text("hi");
    let id = p
        .client
        .send(Outgoing::ether(&e, CodecId::JSON).unwrap())
        .unwrap();
    p.run();
    let ev = Pair::events(&mut p.server);
    let Event::Message(m) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(m.msg_id(), id);
    assert_eq!(m.ether.as_ref().unwrap(), &e);
    let rid = p
        .server
        .send(Outgoing::data(CodecId::JSON, m.body.clone()).reply_to(id))
        .unwrap();
    p.server.ack(id).unwrap();
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(matches!(&ev[0], Event::Message(r) if r.header.in_reply_to == id && r.msg_id() == rid));
    assert!(matches!(&ev[1], Event::Ack { msg_id } if *msg_id == id));
}

#[test]
fn msg_ids_never_reused() {
    let mut p = Pair::new(Config::default(), Config::default());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        assert!(seen.insert(p.client.send(data(b"{}")).unwrap()));
        assert!(seen.insert(p.client.ping(p.now).unwrap()));
    }
}

#[test]
fn ping_pong_rtt() {
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.client);
    let id = p.client.ping(p.now).unwrap();
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(
        matches!(ev[0], Event::Pong { ping_id, .. } if ping_id == id),
        "{ev:?}"
    );
}

#[test]
fn chunked_message_reassembles() {
    let sc = Config {
        limits: Limits {
            max_frame_bytes: 1000,
            ..Default::default()
        },
        decode_ethers: false,
        ..Default::default()
    };
    let mut p = Pair::new(Config::default(), sc);
    Pair::events(&mut p.server);
    let body: Vec<u8> = (0..10_500u32).map(|i| i as u8).collect();
    p.client
        .send(Outgoing::data(CodecId::JSON, Bytes::from(body.clone())))
        .unwrap();
    assert_eq!(p.client.pending_transmits(), 11);
    p.run();
    let ev = Pair::events(&mut p.server);
    let Event::Message(m) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(m.frames, 11);
    assert_eq!(&m.body[..], &body[..]);
}

#[test]
fn codec_not_negotiated_is_nacked_connection_lives() {
    let sc = Config {
        codecs: vec![CodecId::JSON],
        ..Default::default()
    };
    let mut p = Pair::new(Config::default(), sc);
    Pair::events(&mut p.client);
    // The client's API refuses it...
    assert_eq!(
        p.client
            .send(Outgoing::data(CodecId::PROTOBUF, Bytes::new()))
            .unwrap_err()
            .code(),
        ErrorCode::ERR_CODEC_UNSUPPORTED
    );
    // ...so forge the frame by hand.
    let hdr = FrameHeader {
        msg_type: MsgType::DATA,
        body_codec: CodecId(0x77),
        msg_id: 99,
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    encode(
        &hdr,
        HeaderForm::Capnp,
        Flags::NONE,
        Bytes::from_static(b"x"),
    )
    .unwrap()
    .write_to(&mut buf);
    p.server.handle_input(&mut buf, p.now);
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(
        matches!(&ev[0], Event::Nack { msg_id: 99, code, .. } if *code == ErrorCode::ERR_CODEC_UNSUPPORTED),
        "{ev:?}"
    );
    assert!(p.server.is_established());
}

#[test]
fn undecodable_body_is_malformed() {
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.client);
    let id = p.client.send(data(b"{not json")).unwrap();
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(
        matches!(&ev[0], Event::Nack { msg_id, code, .. } if *msg_id == id && *code == ErrorCode::ERR_MALFORMED),
        "{ev:?}"
    );
    let sev = Pair::events(&mut p.server);
    assert!(
        sev.iter().any(|e| matches!(e, Event::Refused { error, .. }
            if error.violation() == Some(Violation::Body))),
        "{sev:?}"
    );
}

#[test]
fn data_before_hello_closes() {
    let now = Instant::now();
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    let hdr = FrameHeader {
        msg_type: MsgType::DATA,
        msg_id: 5,
        body_codec: CodecId::JSON,
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    encode(
        &hdr,
        HeaderForm::Capnp,
        Flags::NONE,
        Bytes::from_static(b"{}"),
    )
    .unwrap()
    .write_to(&mut buf);
    server.handle_input(&mut buf, now);
    assert!(server.is_closed());
    let nack = decode_nack(server.poll_transmit().unwrap());
    assert_eq!(
        (nack.msg_id, nack.error_code),
        (5, ErrorCode::ERR_MALFORMED)
    );
    let ev: Vec<Event> = std::iter::from_fn(|| server.poll_event()).collect();
    assert!(
        ev.iter().any(|e| matches!(e, Event::Closed(Some(e))
            if e.violation() == Some(Violation::Sequence))),
        "{ev:?}"
    );
}

#[test]
fn second_hello_refused_connection_lives() {
    let mut p = Pair::new(Config::default(), Config::default());
    let hello = Control::Hello(p.client.local_hello.clone());
    p.client.queue_control(&hello, 0, 0);
    p.run();
    assert!(p.server.is_established() && p.client.is_established());
    let ev = Pair::events(&mut p.client);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Nack { code, .. } if *code == ErrorCode::ERR_MALFORMED)));
    let sev = Pair::events(&mut p.server);
    assert!(
        sev.iter().any(|e| matches!(e, Event::Refused { error, .. }
            if error.violation() == Some(Violation::Sequence))),
        "{sev:?}"
    );
}

#[test]
fn no_common_codec_fails_both_sides() {
    let sc = Config::default();
    let cc = Config {
        codecs: vec![],
        ..Default::default()
    };
    let now = Instant::now();
    let mut client = Connection::new(Role::Initiator, cc, now);
    // Forge a HELLO offering only a codec nobody implements.
    client.transmits.clear();
    let hello = Control::Hello(Hello {
        codecs: vec![CodecId(0x77)],
        ..Default::default()
    });
    client.queue_control(&hello, 0, 0);
    let mut server = Connection::new(Role::Responder, sc, now);
    pump(&mut client, &mut server, now);
    assert!(server.is_closed());
    pump(&mut server, &mut client, now);
    assert!(client.is_closed());
    let ev = Pair::events(&mut client);
    assert!(
        matches!(&ev[0], Event::Closed(Some(Error::Incompatible { code, .. })) if *code == ErrorCode::ERR_CODEC_UNSUPPORTED),
        "{ev:?}"
    );
}

#[test]
fn handshake_timeout() {
    let now = Instant::now();
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    let t = server.poll_timeout().unwrap();
    assert_eq!(t, now + Config::default().handshake_timeout);
    server.handle_timeout(t);
    assert!(server.is_closed());
    assert!(matches!(
        server.poll_event(),
        Some(Event::Closed(Some(Error::Timeout {
            deadline: Deadline::Handshake,
            ..
        })))
    ));
}

#[test]
fn stall_mid_frame_times_out() {
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.server);
    let mut buf = BytesMut::new();
    p.client.send(data(b"{\"a\":1}")).unwrap();
    p.client.poll_transmit().unwrap().write_to(&mut buf);
    let mut half = buf.split_to(buf.len() / 2);
    p.server.handle_input(&mut half, p.now);
    let deadline = p.server.poll_timeout().unwrap();
    assert_eq!(deadline, p.now + Config::default().frame_timeout);
    p.server.handle_timeout(deadline);
    assert!(p.server.is_closed());
}

#[test]
fn keepalive_then_idle_close() {
    let cfg = Config {
        keepalive_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let mut p = Pair::new(cfg.clone(), cfg);
    Pair::events(&mut p.client);
    let t1 = p.client.poll_timeout().unwrap();
    assert_eq!(t1, p.now + Duration::from_secs(1));
    p.client.handle_timeout(t1);
    assert_eq!(p.client.pending_transmits(), 1, "keep-alive PING queued");
    // The peer answers; its PONG is not an application event.
    p.now = t1;
    p.run();
    assert!(Pair::events(&mut p.client).is_empty());
    // Silence: the idle timeout closes.
    let t = p.now + Duration::from_secs(3);
    p.client.handle_timeout(t);
    assert!(p.client.is_closed());
}

#[test]
fn peer_nack_during_handshake_is_error() {
    let now = Instant::now();
    let mut client = Connection::new(Role::Initiator, Config::default(), now);
    client.transmits.clear();
    let mut buf = BytesMut::new();
    let hdr = FrameHeader {
        msg_type: MsgType::NACK,
        body_codec: CodecId::JSON,
        msg_id: 1,
        ..Default::default()
    };
    let body = Control::Nack(Nack {
        msg_id: 1,
        error_code: ErrorCode::ERR_BUSY,
        retry_after_ms: 50,
        detail: None,
    })
    .encode(CodecId::JSON)
    .unwrap();
    encode(&hdr, HeaderForm::Capnp, Flags::NONE, body)
        .unwrap()
        .write_to(&mut buf);
    client.handle_input(&mut buf, now);
    assert!(matches!(
        client.poll_event(),
        Some(Event::Closed(Some(Error::Nack {
            retry_after_ms: 50,
            ..
        })))
    ));
}

#[test]
fn crypt_without_key_is_decrypt_error() {
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.client);
    let hdr = FrameHeader {
        msg_type: MsgType::DATA,
        body_codec: CodecId::JSON,
        msg_id: 50,
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    encode(
        &hdr,
        HeaderForm::Capnp,
        Flags::CRYPT,
        Bytes::from_static(b"sealed"),
    )
    .unwrap()
    .write_to(&mut buf);
    p.server.handle_input(&mut buf, p.now);
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(
        matches!(&ev[0], Event::Nack { msg_id: 50, code, .. } if *code == ErrorCode::ERR_DECRYPT),
        "{ev:?}"
    );
}

#[test]
fn graceful_close_keeps_queued_frames() {
    let mut p = Pair::new(Config::default(), Config::default());
    p.client.send(data(b"{}")).unwrap();
    p.client.close();
    assert!(p.client.is_closed());
    assert_eq!(p.client.pending_transmits(), 1);
    assert!(p.client.send(data(b"{}")).is_err());
}

fn decode_nack(t: EncodedFrame) -> Nack {
    let mut buf = BytesMut::new();
    t.write_to(&mut buf);
    let f = FrameDecoder::new(Limits::default())
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(f.header.msg_type, MsgType::NACK);
    match Control::decode(f.header.msg_type, f.header.body_codec, &f.payload).unwrap() {
        Control::Nack(n) => n,
        other => panic!("{other:?}"),
    }
}

// ----- COMP and CRYPT ---------------------------------------------------------------------

fn sealed_config(key: u8) -> Config {
    Config {
        sealer: Some(crate::wire::seal::Sealer::new(&[key; 32])),
        compress: CompressPolicy::Auto,
        decode_ethers: false,
        ..Default::default()
    }
}

/// Sends a hand-made DATA frame from the client's side of the pair straight into the server.
fn inject(p: &mut Pair, hdr: &FrameHeader, flags: Flags, body: Bytes) {
    let mut buf = BytesMut::new();
    encode(hdr, HeaderForm::Capnp, flags, body)
        .unwrap()
        .write_to(&mut buf);
    p.server.handle_input(&mut buf, p.now);
    p.run();
}

fn nack_codes(c: &mut Connection) -> Vec<(u64, ErrorCode)> {
    Pair::events(c)
        .into_iter()
        .filter_map(|e| match e {
            Event::Nack { msg_id, code, .. } => Some((msg_id, code)),
            _ => None,
        })
        .collect()
}

#[test]
fn sealed_and_compressed_chunked_round_trip() {
    let mut sc = sealed_config(1);
    sc.limits.max_frame_bytes = 1024;
    let mut p = Pair::new(sealed_config(1), sc);
    assert!(p.client.negotiated().unwrap().peer.crypt);
    Pair::events(&mut p.server);
    // 16 letters at random: compressible, but not to nothing.
    let mut rng = SmallRng::seed_from_u64(88172645463325252);
    let body: Vec<u8> = (0..200_000)
        .map(|_| b'a' + rng.random_range(0..16u8))
        .collect();
    let id = p
        .client
        .send(Outgoing::data(CodecId::JSON, Bytes::from(body.clone())))
        .unwrap();
    // Compressed first, so far fewer than 200 chunks; every frame has COMP and CRYPT.
    let frames: Vec<_> = std::iter::from_fn(|| p.client.poll_transmit()).collect();
    assert!(frames.len() > 1 && frames.len() < 196, "{}", frames.len());
    let mut buf = BytesMut::new();
    for f in &frames {
        assert_eq!(f.head[5] & 0xC0, 0xC0, "COMP and CRYPT on every chunk");
        f.write_to(&mut buf);
    }
    p.server.handle_input(&mut buf, p.now);
    let ev = Pair::events(&mut p.server);
    let Event::Message(m) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(m.msg_id(), id);
    assert_eq!(m.flags, Flags::COMP | Flags::CRYPT);
    assert_eq!(&m.body[..], &body[..]);
    // And back the other way (the s2c key).
    p.server
        .send(Outgoing::data(CodecId::JSON, Bytes::from_static(b"ok")).reply_to(id))
        .unwrap();
    p.run();
    let ev = Pair::events(&mut p.client);
    assert!(
        matches!(&ev[..], [Event::Connected(_), Event::Message(m)] if &m.body[..] == b"ok"),
        "{ev:?}"
    );
}

#[test]
fn wrong_key_is_decrypt_error_and_connection_lives() {
    let mut p = Pair::new(sealed_config(1), sealed_config(2));
    Pair::events(&mut p.client);
    let id = p.client.send(data(b"{}")).unwrap();
    p.run();
    assert_eq!(
        nack_codes(&mut p.client),
        vec![(id, ErrorCode::ERR_DECRYPT)]
    );
    assert!(Pair::events(&mut p.server)
        .iter()
        .all(|e| !matches!(e, Event::Message(_))));
    assert!(p.server.is_established());
    p.client.ping(p.now).unwrap();
    p.run();
    assert!(matches!(p.client.poll_event(), Some(Event::Pong { .. })));
}

#[test]
fn tampered_header_fails_authentication() {
    let mut p = Pair::new(sealed_config(1), sealed_config(1));
    Pair::events(&mut p.client);
    Pair::events(&mut p.server);
    let sealer = crate::wire::seal::Sealer::new(&[1; 32]);
    let hdr = FrameHeader {
        msg_type: MsgType::DATA,
        body_codec: CodecId::JSON,
        msg_id: 500,
        ..Default::default()
    };
    let ad = seal::aad(hdr.msg_type, hdr.body_codec, 0, 500);
    let sealed = sealer.seal(Direction::C2S, 500, 0, &ad, b"{}");
    // The right header opens...
    inject(&mut p, &hdr, Flags::CRYPT, sealed.clone());
    assert!(matches!(p.server.poll_event(), Some(Event::Message(_))));
    // ...a changed bodyCodec, channel or msgId does not.
    for change in 0..3 {
        let mut h = hdr.clone();
        match change {
            0 => h.body_codec = CodecId::PROTOBUF,
            1 => h.channel_id = 9,
            _ => h.msg_id = 501,
        }
        inject(&mut p, &h, Flags::CRYPT, sealed.clone());
        let ev = Pair::events(&mut p.server);
        assert!(
            matches!(&ev[..], [Event::Refused { error, .. }]
                if error.code() == ErrorCode::ERR_DECRYPT
                    && error.violation() == Some(Violation::Transform)),
            "{change}: {ev:?}"
        );
    }
}

#[test]
fn plaintext_to_a_keyed_side_is_refused() {
    let mut p = Pair::new(sealed_config(1), sealed_config(1));
    Pair::events(&mut p.client);
    let hdr = FrameHeader {
        msg_type: MsgType::DATA,
        body_codec: CodecId::JSON,
        msg_id: 77,
        ..Default::default()
    };
    inject(&mut p, &hdr, Flags::NONE, Bytes::from_static(b"{}"));
    assert_eq!(
        nack_codes(&mut p.client),
        vec![(77, ErrorCode::ERR_DECRYPT)]
    );
}

#[test]
fn keyed_server_refuses_client_without_key() {
    let now = Instant::now();
    let mut client = Connection::new(Role::Initiator, Config::default(), now);
    let mut server = Connection::new(Role::Responder, sealed_config(1), now);
    pump(&mut client, &mut server, now);
    assert!(server.is_closed());
    pump(&mut server, &mut client, now);
    let ev = Pair::events(&mut client);
    assert!(
        matches!(&ev[..], [Event::Closed(Some(e))] if e.code() == ErrorCode::ERR_DECRYPT),
        "{ev:?}"
    );
}

#[test]
fn bad_zstd_bodies_are_refused() {
    let mut p = Pair::new(
        Config::default(),
        Config {
            limits: Limits {
                max_message_bytes: 10_000,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    Pair::events(&mut p.client);
    let big = seal::compress(&vec![b' '; 50_000], 3).unwrap();
    let mut streamed = Vec::new();
    {
        let mut e = zstd::stream::Encoder::new(&mut streamed, 1).unwrap();
        std::io::Write::write_all(&mut e, b"{}").unwrap();
        e.finish().unwrap();
    }
    let ok = seal::compress(
        br#"{"kind":"text","schema_version":1,"payload":{"text":"z"},"metadata":{}}"#,
        1,
    )
    .unwrap();
    let cases: [(u64, Bytes, ErrorCode); 4] = [
        (1, big, ErrorCode::ERR_MESSAGE_TOO_LARGE),
        (2, ok.slice(..ok.len() - 2), ErrorCode::ERR_MALFORMED),
        (3, Bytes::from(streamed), ErrorCode::ERR_MALFORMED),
        (4, ok, ErrorCode::OK),
    ];
    for (id, body, _) in &cases {
        let hdr = FrameHeader {
            msg_type: MsgType::DATA,
            body_codec: CodecId::JSON,
            msg_id: 1000 + id,
            ..Default::default()
        };
        inject(&mut p, &hdr, Flags::COMP, body.clone());
    }
    let got = nack_codes(&mut p.client);
    let want: Vec<_> = cases
        .iter()
        .filter(|c| c.2 != ErrorCode::OK)
        .map(|c| (1000 + c.0, c.2))
        .collect();
    assert_eq!(got, want);
    let ev = Pair::events(&mut p.server);
    assert!(ev.iter().any(|e| matches!(e, Event::Message(m) if m.msg_id() == 1004 && m.ether.as_ref().unwrap().payload["text"] == "z")));
}

#[test]
fn nonces_never_repeat_across_chunked_and_interleaved_sends() {
    let mut sc = sealed_config(1);
    sc.limits.max_frame_bytes = 256;
    let mut p = Pair::new(sealed_config(1), sc);
    let sealer = crate::wire::seal::Sealer::new(&[1; 32]);
    let mut nonces = std::collections::HashSet::new();
    let mut frames = 0;
    for i in 0..200u32 {
        let body = Bytes::from(vec![(i % 7) as u8; (i as usize * 37) % 2000]);
        let o = Outgoing::data(CodecId::JSON, body).on_channel(i % 5);
        p.client.send(o).unwrap();
        if i % 3 == 0 {
            p.client.ping(p.now).unwrap();
        }
    }
    let mut buf = BytesMut::new();
    let mut last = None;
    while let Some(f) = p.client.poll_transmit() {
        f.write_to(&mut buf);
        let fr = FrameDecoder::new(Limits::default())
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        frames += 1;
        if fr.flags.contains(Flags::CRYPT) && last != Some(fr.header.msg_id) {
            let n = sealer.nonce(fr.header.msg_id, fr.header.channel_id);
            assert!(
                nonces.insert(n),
                "nonce reused for msgId {}",
                fr.header.msg_id
            );
        }
        last = Some(fr.header.msg_id);
    }
    assert_eq!(nonces.len(), 200);
    assert!(frames > 400);
}

#[test]
fn corrupt_middle_chunk_drops_the_whole_message() {
    let sc = Config {
        limits: Limits {
            max_frame_bytes: 400,
            ..Default::default()
        },
        decode_ethers: false,
        ..Default::default()
    };
    let mut p = Pair::new(Config::default(), sc);
    Pair::events(&mut p.server);
    Pair::events(&mut p.client);
    let id = p
        .client
        .send(Outgoing::data(CodecId::JSON, Bytes::from(vec![1u8; 1500])))
        .unwrap();
    let mut buf = BytesMut::new();
    for (i, f) in std::iter::from_fn(|| p.client.poll_transmit()).enumerate() {
        let mut v = f.to_vec();
        if i == 1 {
            let n = v.len();
            v[n - 1] ^= 0xFF;
        }
        buf.extend_from_slice(&v);
    }
    p.server.handle_input(&mut buf, p.now);
    let ev = Pair::events(&mut p.server);
    assert!(
        ev.iter().all(|e| !matches!(e, Event::Message(_))),
        "a message with a hole is not delivered: {ev:?}"
    );
    assert_eq!(p.server.pending_reassembly_bytes(), 0);
    p.run();
    assert_eq!(
        nack_codes(&mut p.client),
        vec![(id, ErrorCode::ERR_CHECKSUM)]
    );
    p.client
        .send(Outgoing::data(CodecId::JSON, Bytes::from(vec![2u8; 1500])))
        .unwrap();
    p.run();
    let ev = Pair::events(&mut p.server);
    assert!(
        matches!(&ev[..], [Event::Message(m)] if m.body.len() == 1500),
        "{ev:?}"
    );
}

/// The end of the stream with the start of a frame shorter than its 8-byte prefix left over
/// is a truncated frame, not a clean close; a close between frames is clean.
#[test]
fn eof_after_a_partial_prefix_is_not_clean() {
    for (leftover, clean) in [(&b""[..], true), (&crate::wire::MAGIC_BYTES[..3], false)] {
        let mut p = Pair::new(Config::default(), Config::default());
        Pair::events(&mut p.server);
        let mut buf = BytesMut::from(leftover);
        p.server.handle_input(&mut buf, p.now);
        p.server.handle_eof();
        let closed = Pair::events(&mut p.server)
            .into_iter()
            .find_map(|e| match e {
                Event::Closed(err) => Some(err),
                _ => None,
            })
            .expect("closed");
        match (clean, closed) {
            (true, None) => {}
            (
                false,
                Some(Error::Closed {
                    reason: CloseReason::PeerClosedMidFrame,
                    ..
                }),
            ) => {}
            (c, other) => panic!("leftover {leftover:?}: clean={c}, got {other:?}"),
        }
    }
}

/// A peer announcing a `max_frame_bytes` under the floor is refused at the handshake, from
/// either side: the responder NACKs the HELLO and closes, the initiator closes on the CAPS.
#[test]
fn tiny_frame_limits_are_refused_at_the_handshake() {
    let now = Instant::now();
    let closed_with = |c: &mut Connection, what: &str| {
        let ev = Pair::events(c);
        assert!(
            ev.iter().any(|e| matches!(e, Event::Closed(Some(e))
                if e.code() == ErrorCode::ERR_MESSAGE_TOO_LARGE
                    && e.to_string().contains(what))),
            "{ev:?}"
        );
    };
    let hello_with = |mfb: u64| {
        let mut client = Connection::new(Role::Initiator, Config::default(), now);
        client.transmits.clear();
        let mut hello = client.local_hello.clone();
        hello.max_frame_bytes = mfb;
        client.queue_control(&Control::Hello(hello), 0, 0);
        client
    };
    // A HELLO of 100: the responder NACKs and closes.
    let mut client = hello_with(100);
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    pump(&mut client, &mut server, now);
    assert!(server.is_closed());
    closed_with(
        &mut server,
        "HELLO max_frame_bytes 100 is under the 256 bytes",
    );
    pump(&mut server, &mut client, now);
    assert!(client.is_closed());
    closed_with(&mut client, "HELLO max_frame_bytes 100");
    // A CAPS of 100: the initiator closes.
    let mut client = Connection::new(Role::Initiator, Config::default(), now);
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    pump(&mut client, &mut server, now);
    server.transmits.clear();
    let mut caps = server.local_hello.clone();
    caps.max_frame_bytes = 100;
    server.queue_control(&Control::Caps(caps), 0, 1);
    pump(&mut server, &mut client, now);
    assert!(client.is_closed());
    closed_with(&mut client, "CAPS max_frame_bytes 100");
    // At the floor, both agree, and messages go in frames of 256.
    let mut client = hello_with(MIN_PEER_MAX_FRAME_BYTES);
    let mut server = Connection::new(Role::Responder, Config::default(), now);
    pump(&mut client, &mut server, now);
    assert!(server.is_established());
    server
        .send(Outgoing::data(CodecId::JSON, Bytes::from(vec![b' '; 1000])))
        .unwrap();
    let frames = std::iter::from_fn(|| server.poll_transmit()).count();
    assert_eq!(frames, 1 + 4, "the CAPS, then 1000 bytes in frames of 256");
}

#[test]
fn a_refused_reply_names_the_request_it_answered() {
    // A reply whose body does not decode is refused like any message, and the event carries
    // its inReplyTo, so the session can fail the request instead of waiting for ever.
    let mut p = Pair::new(Config::default(), Config::default());
    Pair::events(&mut p.client);
    Pair::events(&mut p.server);
    for (in_reply_to, body) in [(41u64, &b"{\"crc\":1}"[..]), (0, b"not json")] {
        let hdr = FrameHeader {
            msg_type: MsgType::DATA,
            body_codec: CodecId::JSON,
            msg_id: 900 + in_reply_to,
            in_reply_to,
            ..Default::default()
        };
        inject(&mut p, &hdr, Flags::NONE, Bytes::copy_from_slice(body));
        let ev = Pair::events(&mut p.server);
        assert!(
            matches!(&ev[..], [Event::Refused { msg_id, in_reply_to: to, error }]
                if *msg_id == 900 + in_reply_to && *to == in_reply_to
                    && error.code() == ErrorCode::ERR_MALFORMED),
            "{ev:?}"
        );
        // The NACK went back for the reply's own msgId.
        assert!(nack_codes(&mut p.client).contains(&(900 + in_reply_to, ErrorCode::ERR_MALFORMED)));
    }
}
