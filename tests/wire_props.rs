//! Property tests of the wire layer: every header, flag set and payload round-trips, and the
//! decoder yields the same frames however its input is split.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use xcp::codec::CodecId;
use xcp::wire::chunk::{split, Reassembler};
use xcp::wire::frame::{encode, FrameDecoder};
use xcp::wire::{Flags, Frame, FrameHeader, HeaderForm, Limits, MsgType, SchemaKey, Tag};

fn header() -> impl Strategy<Value = FrameHeader> {
    (
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 16]>(),
        ),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(("[a-z0-9]{0,8}", "\\PC{0,12}"), 0..4),
    )
        .prop_map(|(ch, t, c, (ns, k, ma, mi, h), id, rt, tags)| FrameHeader {
            channel_id: ch,
            msg_type: MsgType(t),
            body_codec: CodecId(c),
            schema_key: SchemaKey {
                ns_hash: ns,
                kind_id: k,
                major: ma,
                minor: mi,
                hash128: h,
            },
            msg_id: id,
            in_reply_to: rt,
            tags: tags
                .into_iter()
                .map(|(key, val)| Tag { key, val })
                .collect(),
        })
}

fn form() -> impl Strategy<Value = HeaderForm> {
    prop_oneof![Just(HeaderForm::Capnp), Just(HeaderForm::Json)]
}

fn flags() -> impl Strategy<Value = Flags> {
    (0u8..8)
        .prop_map(|b| Flags(((b & 1) * 0x80) | (((b >> 1) & 1) * 0x40) | (((b >> 2) & 1) * 0x20)))
}

fn decode_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    for c in cuts {
        buf.extend_from_slice(&bytes[at..c]);
        at = c;
        while let Some(f) = dec.decode(&mut buf).expect("valid input") {
            out.push(f);
        }
    }
    assert!(buf.is_empty());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frame_round_trips(h in header(), f in form(), fl in flags(),
                         payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let enc = encode(&h, f, fl, Bytes::from(payload.clone())).unwrap();
        let frames = decode_pieces(&enc.to_vec(), &[]);
        prop_assert_eq!(frames.len(), 1);
        let got = &frames[0];
        prop_assert_eq!(&got.header, &h);
        prop_assert_eq!(got.header_form, f);
        prop_assert_eq!(got.flags, fl);
        prop_assert_eq!(&got.payload[..], &payload[..]);
    }

    #[test]
    fn any_split_gives_same_frames(
        frames in proptest::collection::vec(
            (header(), form(), flags(), proptest::collection::vec(any::<u8>(), 0..600)), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut wire = Vec::new();
        for (h, f, fl, p) in &frames {
            wire.extend(encode(h, *f, *fl, Bytes::from(p.clone())).unwrap().to_vec());
        }
        let whole = decode_pieces(&wire, &[]);
        let pieces = decode_pieces(&wire, &cuts);
        prop_assert_eq!(&whole, &pieces);
        prop_assert_eq!(whole.len(), frames.len());
        // Byte by byte, too.
        let every: Vec<usize> = (0..wire.len()).collect();
        prop_assert_eq!(&whole, &decode_pieces(&wire, &every));
    }

    #[test]
    fn chunking_round_trips(body in proptest::collection::vec(any::<u8>(), 0..5000),
                            max in 1u64..700, h in header()) {
        let body = Bytes::from(body);
        let chunks = split(body.clone(), Flags::NONE, max);
        let mut wire = Vec::new();
        for (fl, c) in chunks {
            prop_assert!(c.len() as u64 <= max);
            wire.extend(encode(&h, HeaderForm::Capnp, fl, c).unwrap().to_vec());
        }
        let mut r = Reassembler::new(1 << 20);
        let mut done = Vec::new();
        for f in decode_pieces(&wire, &[]) {
            if let Some(m) = r.push(f).unwrap() {
                done.push(m);
            }
        }
        prop_assert_eq!(done.len(), 1);
        prop_assert_eq!(&done[0].body, &body);
        prop_assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                   prefix_ok in any::<bool>()) {
        let mut input = Vec::new();
        if prefix_ok {
            input.extend_from_slice(&xcp::wire::MAGIC_BYTES);
            input.push(0x02);
        }
        input.extend(bytes);
        let mut dec = FrameDecoder::new(Limits::new(4096, 1 << 16));
        let mut buf = BytesMut::from(&input[..]);
        for _ in 0..64 {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.fatal => break,
                Err(_) => {}
            }
        }
    }
}
