//! The schema policy of a connection (SPEC §8): what a receiver accepts, converts or refuses,
//! and what a sender fills in and converts before sending.
//!
//! The rules apply to DATA messages whose body is an Ether (JSON or PROTOBUF), and only when
//! the configuration asks for them: a non-empty [`Config::accepts`] or a
//! [`Config::registry`]. The kind is the Ether's own `kind` (its FNV-1a 32), not the header's
//! `kindId`, so a peer that writes other numbers there (the Python proof of concept, SPEC
//! §2.1) is judged by what it sent; the major is the Ether's `schema_version`; the minor,
//! namespace and `hash128` come from the header.

use bytes::Bytes;
use serde_json::Value;

use crate::control::{Hello, KindRange};
use crate::error::{Error, ErrorCode, Result, Violation};
use crate::ether::{fnv1a32, kinds, Ether, SchemaKey};
use crate::wire::FrameHeader;

use super::{Config, Outgoing};

/// Whether the receiver rules are on: some `accepts`, or a registry.
pub(super) fn enforced(c: &Config) -> bool {
    !c.accepts.is_empty() || c.registry.is_some()
}

/// The name of a kind id, where this side knows it (its registry, the standard kinds, the
/// adapters), else its hex.
fn kind_label(c: &Config, kind_id: u32) -> String {
    let standard = [kinds::TEXT, kinds::TOKENS, kinds::EMBEDDING, kinds::IMAGE];
    if let Some(name) = c.registry.as_ref().and_then(|r| r.kind_name(kind_id)) {
        return name.to_string();
    }
    if let Some(name) = standard.iter().find(|k| fnv1a32(k) == kind_id) {
        return (*name).to_string();
    }
    if let Some(a) = c.adapters.iter().find(|a| fnv1a32(a.kind()) == kind_id) {
        return a.kind().to_string();
    }
    format!("0x{kind_id:08X}")
}

/// `text@1, embedding@2..` of a list of ranges.
fn accepted_list(c: &Config, ranges: &[KindRange]) -> String {
    let mut out: Vec<String> = Vec::new();
    for r in ranges {
        let s = format!("{}@{}", kind_label(c, r.kind_id), r.major);
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.join(", ")
}

/// The receiver rules for one DATA message whose body decoded to `ether`. On a conversion,
/// `ether`, `body` (re-encoded with the message's codec) and the header's schema key are
/// replaced by the converted ones. Errors are the NACKs of SPEC §8, each a peer fault the
/// connection lives on after.
pub(super) fn on_receive(
    c: &Config,
    header: &mut FrameHeader,
    body: &mut Bytes,
    ether: &mut Ether,
) -> Result<()> {
    let kind_id = fnv1a32(&ether.kind);
    let Ok(major) = u16::try_from(ether.schema_version) else {
        return Err(Error::malformed(
            Violation::Body,
            format!(
                "ether.schema_version: {} is above the 65535 a SchemaKey carries",
                ether.schema_version
            ),
        ));
    };
    let mut path = None;
    if !c.accepts.is_empty() {
        let ranges: Vec<KindRange> = c
            .accepts
            .iter()
            .filter(|r| r.kind_id == kind_id)
            .copied()
            .collect();
        if ranges.is_empty() {
            return Err(Error::protocol(
                Violation::Body,
                ErrorCode::ERR_SCHEMA_UNKNOWN,
                format!(
                    "kind {:?} (major {major}) is not accepted; this side accepts {}",
                    ether.kind,
                    accepted_list(c, &c.accepts)
                ),
            ));
        }
        if !ranges.iter().any(|r| r.major == major) {
            match c
                .adapters
                .path(kind_id, major, |m| ranges.iter().any(|r| r.major == m))
            {
                Some(p) => path = Some(p),
                None => {
                    return Err(Error::protocol(
                        Violation::Body,
                        ErrorCode::ERR_KIND_MISMATCH,
                        format!(
                            "kind {:?} major {major} is not accepted and no adapter leads from \
                             it; this side accepts {}",
                            ether.kind,
                            accepted_list(c, &ranges)
                        ),
                    ))
                }
            }
        }
    }
    if let Some(reg) = &c.registry {
        let key = SchemaKey {
            ns_hash: header.schema_key.ns_hash,
            kind_id,
            major,
            minor: header.schema_key.minor,
            hash128: header.schema_key.hash128,
        };
        if key.hash128 != [0; 16] {
            if let Some(own) = reg.get_key(&key) {
                if own.hash128() != key.hash128 {
                    return Err(Error::protocol(
                        Violation::Body,
                        ErrorCode::ERR_SCHEMA_UNKNOWN,
                        format!(
                            "schema hash differs for {}: the peer's {}, ours {}",
                            own.id(),
                            crate::schema::registry_hex(&key.hash128),
                            crate::schema::registry_hex(&own.hash128())
                        ),
                    ));
                }
            }
        }
        if c.validate_payloads {
            if let Some(schema) = reg.for_key(&key) {
                check_payload(schema, ether)?;
            }
        }
    }
    if let Some(p) = path {
        c.adapters.apply(ether, &p)?;
        *body = crate::codec::encode_ether(ether, header.body_codec)?;
        let key = &mut header.schema_key;
        key.kind_id = kind_id;
        key.major = p.target_major();
        key.minor = 0;
        key.hash128 = [0; 16];
        if let Some(reg) = &c.registry {
            reg.fill_key(key);
        }
    }
    Ok(())
}

/// Validates `ether.payload` against `schema` without copying it; `ERR_MALFORMED` naming
/// the JSON pointer of the first failure.
fn check_payload(schema: &crate::schema::Schema, ether: &mut Ether) -> Result<()> {
    let v = Value::Object(std::mem::take(&mut ether.payload));
    let r = schema.validate(&v);
    if let Value::Object(m) = v {
        ether.payload = m;
    }
    r.map_err(|e| {
        Error::malformed(
            Violation::Body,
            format!("payload fails schema {}: {e}", schema.id()),
        )
    })
}

/// The sender rules for one outgoing DATA message: converts it to a major the peer accepts
/// when the peer's `accepts` take its kind but not its major and our adapters lead there,
/// then fills `minor` and `hash128` of its key from our registry.
///
/// Only messages whose key names a kind (as [`Outgoing::ether`] sets it) are looked at.
/// Errors: `Error::Invalid` when the body must be converted but does not decode, or an
/// adapter refuses it.
pub(super) fn on_send(c: &Config, peer: &Hello, msg: &mut Outgoing) -> Result<()> {
    let key = msg.schema_key;
    if key.kind_id == 0 {
        return Ok(());
    }
    let ranges: Vec<&KindRange> = peer
        .accepts
        .iter()
        .filter(|r| r.kind_id == key.kind_id)
        .collect();
    if !ranges.is_empty() && !ranges.iter().any(|r| r.major == key.major) {
        if let Some(p) = c.adapters.path(key.kind_id, key.major, |m| {
            ranges.iter().any(|r| r.major == m)
        }) {
            let convert = || -> Result<Bytes> {
                let mut e = crate::codec::decode_ether(msg.codec, &msg.body)?;
                c.adapters.apply(&mut e, &p)?;
                crate::codec::encode_ether(&e, msg.codec)
            };
            msg.body = convert().map_err(|e| {
                Error::invalid(format!(
                    "send: converting {}@{} for the peer: {e}",
                    kind_label(c, key.kind_id),
                    key.major
                ))
            })?;
            msg.schema_key.major = p.target_major();
            msg.schema_key.minor = 0;
            msg.schema_key.hash128 = [0; 16];
        }
    }
    if let Some(reg) = &c.registry {
        reg.fill_key(&mut msg.schema_key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::BytesMut;

    use crate::codec::CodecId;
    use crate::conn::{Config, Connection, Event, Incoming, Outgoing, Role};
    use crate::control::KindRange;
    use crate::error::ErrorCode;
    use crate::ether::{fnv1a32, Ether};
    use crate::schema::{AdapterGraph, Registry};

    fn pump(from: &mut Connection, to: &mut Connection, now: Instant) -> usize {
        let mut buf = BytesMut::new();
        let mut n = 0;
        while let Some(t) = from.poll_transmit() {
            t.write_to(&mut buf);
            n += 1;
        }
        to.handle_input(&mut buf, now);
        n
    }

    struct Pair {
        client: Connection,
        server: Connection,
        now: Instant,
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
            assert!(p.client.is_established() && p.server.is_established());
            while p.client.poll_event().is_some() {}
            while p.server.poll_event().is_some() {}
            p
        }

        fn run(&mut self) {
            while pump(&mut self.client, &mut self.server, self.now)
                + pump(&mut self.server, &mut self.client, self.now)
                > 0
            {}
        }

        /// Sends `o` from the client; what the server delivered, and the NACKs the client
        /// got.
        fn send(&mut self, o: Outgoing) -> (Vec<Incoming>, Vec<(ErrorCode, String)>) {
            self.client.send(o).expect("send");
            self.run();
            let mut got = Vec::new();
            while let Some(ev) = self.server.poll_event() {
                if let Event::Message(m) = ev {
                    got.push(m);
                }
            }
            let mut nacks = Vec::new();
            while let Some(ev) = self.client.poll_event() {
                if let Event::Nack { code, detail, .. } = ev {
                    nacks.push((code, detail));
                }
            }
            (got, nacks)
        }
    }

    fn ether(e: &Ether) -> Outgoing {
        Outgoing::ether(e, CodecId::JSON).expect("encode")
    }

    fn v2(values: &[f32]) -> Ether {
        let mut e = Ether::embedding(values);
        AdapterGraph::standard().convert_to(&mut e, 2).unwrap();
        e.metadata.clear();
        e
    }

    /// After a refusal the connection lives on and delivers the next accepted message.
    fn lives_on(p: &mut Pair) {
        let (got, nacks) = p.send(ether(&Ether::text("still here")));
        assert!(nacks.is_empty(), "{nacks:?}");
        assert_eq!(got.len(), 1);
        assert!(!p.client.is_closed() && !p.server.is_closed());
    }

    fn accepts_text_and_embedding2() -> Config {
        Config::default().with_accepts(vec![
            KindRange::of("text", 1),
            KindRange::of("embedding", 2),
        ])
    }

    #[test]
    fn unknown_kind_is_schema_unknown() {
        let mut p = Pair::new(Config::default(), accepts_text_and_embedding2());
        let (got, nacks) = p.send(ether(&Ether::new("pose", Default::default())));
        assert!(got.is_empty());
        assert_eq!(nacks.len(), 1);
        assert_eq!(nacks[0].0, ErrorCode::ERR_SCHEMA_UNKNOWN);
        assert!(nacks[0].1.contains("\"pose\""), "{}", nacks[0].1);
        assert!(nacks[0].1.contains("text@1, embedding@2"), "{}", nacks[0].1);
        lives_on(&mut p);
    }

    #[test]
    fn wrong_major_without_adapters_is_kind_mismatch() {
        let mut p = Pair::new(Config::default(), accepts_text_and_embedding2());
        let (got, nacks) = p.send(ether(&Ether::embedding(&[1.0])));
        assert!(got.is_empty());
        assert_eq!(nacks[0].0, ErrorCode::ERR_KIND_MISMATCH);
        assert!(nacks[0].1.contains("major 1"), "{}", nacks[0].1);
        assert!(nacks[0].1.contains("embedding@2"), "{}", nacks[0].1);
        lives_on(&mut p);
    }

    #[test]
    fn receiver_converts_with_lineage() {
        let sc = accepts_text_and_embedding2().with_adapters(AdapterGraph::standard());
        let mut p = Pair::new(Config::default(), sc);
        // CAPS carries the responder's adapters and accepts.
        let peer = &p.client.negotiated().unwrap().peer;
        assert_eq!(peer.adapters, AdapterGraph::standard().edges());
        assert_eq!(peer.accepts.len(), 2);
        let (got, nacks) = p.send(ether(&Ether::embedding(&[3.0, 4.0])));
        assert!(nacks.is_empty(), "{nacks:?}");
        let m = &got[0];
        let e = m.ether.as_ref().unwrap();
        assert_eq!(e.schema_version, 2);
        assert_eq!(e.payload["norm"], 5.0);
        assert_eq!(e.metadata["lineage"][0]["adapter"], "embedding-v1-to-v2");
        assert_eq!(m.header.schema_key.major, 2);
        // The body is the converted Ether too.
        assert_eq!(&m.ether().unwrap(), e);
        assert_eq!(
            crate::codec::decode_ether(CodecId::JSON, &m.body).unwrap(),
            *e
        );
    }

    #[test]
    fn sender_converts_for_the_peer() {
        let cc = Config::default().with_adapters(AdapterGraph::standard());
        let sc = Config::default().with_accepts(vec![KindRange::of("embedding", 1)]);
        let mut p = Pair::new(cc, sc);
        // The HELLO carried the initiator's adapters.
        let peer = &p.server.negotiated().unwrap().peer;
        assert_eq!(peer.adapters.len(), 2);
        let (got, nacks) = p.send(ether(&v2(&[3.0, 4.0])));
        assert!(nacks.is_empty(), "{nacks:?}");
        let e = got[0].ether.as_ref().unwrap();
        assert_eq!(e.schema_version, 1);
        assert_eq!(e.payload["dim"], 2);
        assert_eq!(e.metadata["lineage"][0]["adapter"], "embedding-v2-to-v1");
        assert_eq!(got[0].header.schema_key.major, 1);
    }

    #[test]
    fn schema_violation_names_the_pointer() {
        let sc = Config::default().with_registry(Some(Arc::new(Registry::standard())));
        let mut p = Pair::new(Config::default(), sc);
        let mut e = Ether::embedding(&[1.0, 2.0]);
        e.payload["values"][1] = "two".into();
        let (got, nacks) = p.send(ether(&e));
        if crate::schema::Schema::validates() {
            assert!(got.is_empty());
            assert_eq!(nacks[0].0, ErrorCode::ERR_MALFORMED);
            assert!(nacks[0].1.contains("/payload/values/1"), "{}", nacks[0].1);
        }
        lives_on(&mut p);
        // Validation off: it passes.
        let sc = Config::default()
            .with_registry(Some(Arc::new(Registry::standard())))
            .with_validate_payloads(false);
        let mut p = Pair::new(Config::default(), sc);
        let (got, nacks) = p.send(ether(&e));
        assert!(nacks.is_empty() && got.len() == 1);
    }

    #[test]
    fn hash_is_filled_and_checked() {
        let reg = Arc::new(Registry::standard());
        let cc = Config::default().with_registry(Some(reg.clone()));
        let sc = Config::default().with_registry(Some(reg.clone()));
        let mut p = Pair::new(cc, sc);
        let (got, nacks) = p.send(ether(&Ether::text("hi")));
        assert!(nacks.is_empty(), "{nacks:?}");
        let want = reg.latest("", "text", 1).unwrap().hash128();
        assert_eq!(got[0].header.schema_key.hash128, want);
        let mut o = ether(&Ether::text("hi"));
        o.schema_key.hash128 = [7; 16];
        let (got, nacks) = p.send(o);
        assert!(got.is_empty());
        assert_eq!(nacks[0].0, ErrorCode::ERR_SCHEMA_UNKNOWN);
        assert!(nacks[0].1.contains("schema hash differs"), "{}", nacks[0].1);
        lives_on(&mut p);
    }

    /// With empty `accepts` a peer's kind ids need not be FNV-1a (the Python proof of
    /// concept's are not), and with `accepts` the Ether's own kind is what counts.
    #[test]
    fn header_kind_ids_are_not_trusted() {
        for sc in [Config::default(), accepts_text_and_embedding2()] {
            let mut p = Pair::new(Config::default(), sc);
            let mut o = ether(&Ether::text("poc"));
            o.schema_key.kind_id = 0x0000_0001;
            let (got, nacks) = p.send(o);
            assert!(nacks.is_empty(), "{nacks:?}");
            assert_eq!(got[0].ether.as_ref().unwrap().payload["text"], "poc");
        }
        assert_ne!(fnv1a32("text"), 1);
    }
}
