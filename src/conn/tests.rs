//! In-memory connection pairs driven step by step.

use super::*;
use crate::control::Control;
use crate::wire::frame::FrameDecoder;

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
    let id = p.client.send(Outgoing::ether(&e, CodecId::JSON).unwrap()).unwrap();
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
    assert!(matches!(ev[0], Event::Pong { ping_id, .. } if ping_id == id), "{ev:?}");
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
    encode(&hdr, HeaderForm::Capnp, Flags::NONE, Bytes::from_static(b"x"))
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
    assert!(sev.iter().any(|e| matches!(e, Event::Refused { .. })));
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
    encode(&hdr, HeaderForm::Capnp, Flags::NONE, Bytes::from_static(b"{}"))
        .unwrap()
        .write_to(&mut buf);
    server.handle_input(&mut buf, now);
    assert!(server.is_closed());
    let nack = decode_nack(server.poll_transmit().unwrap());
    assert_eq!((nack.msg_id, nack.error_code), (5, ErrorCode::ERR_MALFORMED));
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
}

#[test]
fn no_common_codec_fails_both_sides() {
    let sc = Config::default();
    let mut cc = Config::default();
    cc.codecs = vec![];
    let now = Instant::now();
    let mut client = Connection::new(Role::Initiator, cc, now);
    // Forge a HELLO offering only PROTOBUF.
    client.transmits.clear();
    let hello = Control::Hello(Hello {
        codecs: vec![CodecId::TENSOR_F32],
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
    assert!(matches!(server.poll_event(), Some(Event::Closed(Some(Error::Timeout(_))))));
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
        Some(Event::Closed(Some(Error::Nack { retry_after_ms: 50, .. })))
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
    encode(&hdr, HeaderForm::Capnp, Flags::CRYPT, Bytes::from_static(b"sealed"))
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
