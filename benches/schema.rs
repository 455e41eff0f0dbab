//! What the schema rules of SPEC §8 cost a receiver per message, against decoding alone.
//!
//! For a `text` Ether and an `embedding` of 768 values (JSON bodies, as on the wire):
//!
//! - `decode`: [`xcp::codec::decode_ether`] alone, the work every JSON DATA message gets;
//! - `decode_validate`: decode, then validate the payload against the standard schema;
//! - `decode_convert`: decode, then convert `embedding` v1 → v2 by the adapter graph
//!   (path search, adapter, lineage);
//! - `decode_convert_encode`: that, plus re-encoding the converted Ether, which is what a
//!   receiver that converts delivers.
//!
//! And the whole receive path of a sans-IO connection pair (frame decode, Ether decode, the
//! rules), per message: `conn/plain` (no rules), `conn/enforced` (`accepts` embedding@1 and the
//! standard registry: kind check, hash check, validation), `conn/converting` (`accepts`
//! embedding@2 with the standard adapters: validation, conversion, re-encoding).
//!
//! Run with `cargo bench --bench schema` (`-- --warm-up-time 1 --measurement-time 3` for a
//! short run); compare each line with `decode` of the same message.

use std::hint::black_box;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::Value;
use xcp::codec::{decode_ether, encode_ether, CodecId};
use xcp::conn::{Config, Connection, Event, Outgoing, Role};
use xcp::control::KindRange;
use xcp::ether::fnv1a32;
use xcp::schema::{AdapterGraph, Registry};
use xcp::Ether;

fn messages() -> Vec<(&'static str, bytes::Bytes)> {
    let values: Vec<f32> = (0..768)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    vec![
        (
            "text",
            encode_ether(
                &Ether::text("the quick brown fox jumps over the lazy dog").with_trace_id("t-1"),
                CodecId::JSON,
            )
            .expect("encode"),
        ),
        (
            "embedding768",
            encode_ether(
                &Ether::embedding(&values).with_trace_id("t-1"),
                CodecId::JSON,
            )
            .expect("encode"),
        ),
    ]
}

fn validate(reg: &Registry, e: &mut Ether) {
    let schema = reg
        .latest("", &e.kind, e.schema_version as u16)
        .expect("standard kind");
    let v = Value::Object(std::mem::take(&mut e.payload));
    schema.validate(&v).expect("valid");
    if let Value::Object(m) = v {
        e.payload = m;
    }
}

fn bench(c: &mut Criterion) {
    let reg = Registry::standard();
    let graph = AdapterGraph::standard();
    for (name, body) in messages() {
        let mut g = c.benchmark_group(format!("schema/{name}"));
        g.bench_function("decode", |b| {
            b.iter(|| black_box(decode_ether(CodecId::JSON, black_box(&body)).expect("decode")))
        });
        g.bench_function("decode_validate", |b| {
            b.iter(|| {
                let mut e = decode_ether(CodecId::JSON, black_box(&body)).expect("decode");
                validate(&reg, &mut e);
                black_box(e)
            })
        });
        if name.starts_with("embedding") {
            g.bench_function("decode_convert", |b| {
                b.iter(|| {
                    let mut e = decode_ether(CodecId::JSON, black_box(&body)).expect("decode");
                    let p = graph.path(fnv1a32(&e.kind), 1, |m| m == 2).expect("path");
                    graph.apply(&mut e, &p).expect("convert");
                    black_box(e)
                })
            });
            g.bench_function("decode_convert_encode", |b| {
                b.iter(|| {
                    let mut e = decode_ether(CodecId::JSON, black_box(&body)).expect("decode");
                    let p = graph.path(fnv1a32(&e.kind), 1, |m| m == 2).expect("path");
                    graph.apply(&mut e, &p).expect("convert");
                    black_box(encode_ether(&e, CodecId::JSON).expect("encode"))
                })
            });
        }
        g.finish();
    }
}

fn pump(from: &mut Connection, to: &mut Connection, now: Instant) {
    let mut buf = BytesMut::new();
    while let Some(t) = from.poll_transmit() {
        t.write_to(&mut buf);
    }
    to.handle_input(&mut buf, now);
}

/// A handshaken client/server pair, the server configured with `sc`.
fn pair(sc: Config) -> (Connection, Connection, Instant) {
    let now = Instant::now();
    let mut c = Connection::new(Role::Initiator, Config::default(), now);
    let mut s = Connection::new(Role::Responder, sc, now);
    pump(&mut c, &mut s, now);
    pump(&mut s, &mut c, now);
    while c.poll_event().is_some() {}
    while s.poll_event().is_some() {}
    (c, s, now)
}

fn bench_conn(c: &mut Criterion) {
    let (_, body) = messages().pop().expect("embedding");
    let ether = decode_ether(CodecId::JSON, &body).expect("decode");
    let out = Outgoing::ether(&ether, CodecId::JSON).expect("encode");
    let reg = Arc::new(Registry::standard());
    let configs = [
        ("plain", Config::default()),
        (
            "enforced",
            Config::default()
                .with_accepts(vec![KindRange::of("embedding", 1)])
                .with_registry(Some(reg.clone())),
        ),
        (
            "converting",
            Config::default()
                .with_accepts(vec![KindRange::of("embedding", 2)])
                .with_registry(Some(reg.clone()))
                .with_adapters(AdapterGraph::standard()),
        ),
    ];
    let mut g = c.benchmark_group("schema/conn_embedding768");
    for (name, sc) in configs {
        let (mut client, mut server, now) = pair(sc);
        g.bench_function(name, |b| {
            b.iter(|| {
                client.send(out.clone()).expect("send");
                pump(&mut client, &mut server, now);
                let mut delivered = 0;
                while let Some(ev) = server.poll_event() {
                    if let Event::Message(m) = ev {
                        delivered += 1;
                        black_box(m);
                    }
                }
                assert_eq!(delivered, 1);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_conn);
criterion_main!(benches);
