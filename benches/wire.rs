//! Frame encode/decode and CRC32C throughput, against `memcpy` of the same bytes in the same
//! run (the figure to compare with: these machines are noisy, ratios are what count).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use xcp::codec::CodecId;
use xcp::wire::frame::{crc32c, encode, FrameDecoder};
use xcp::wire::{Flags, FrameHeader, HeaderForm, Limits, MsgType};

const SIZES: &[usize] = &[64, 4 << 10, 64 << 10, 1 << 20];

fn header() -> FrameHeader {
    FrameHeader {
        channel_id: 1,
        msg_type: MsgType::DATA,
        body_codec: CodecId::TENSOR_F32,
        msg_id: 42,
        ..Default::default()
    }
}

fn label(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

fn wire(c: &mut Criterion) {
    let limits = Limits::default().with_max_frame_bytes(4 << 20);
    let mut g = c.benchmark_group("wire");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for &n in SIZES {
        let payload = Bytes::from((0..n).map(|i| i as u8).collect::<Vec<_>>());
        g.throughput(Throughput::Bytes(n as u64));
        let id = label(n);

        // The destination sits half a page from the source (mod 4096): glibc's copy on AMD
        // Zen runs many times slower when dst - src is a small multiple of 16 mod 4096, which
        // back-to-back allocations give; the baseline must be an ordinary memcpy.
        let mut dst_buf = vec![0u8; n + 4096];
        let gap = (dst_buf.as_ptr() as usize).wrapping_sub(payload.as_ptr() as usize);
        let off = (2048 + 4096 - gap % 4096) % 4096;
        let dst = &mut dst_buf[off..off + n];
        g.bench_with_input(BenchmarkId::new("memcpy", &id), &payload, |b, p| {
            b.iter(|| {
                dst.copy_from_slice(p);
                black_box(&dst);
            })
        });
        g.bench_with_input(BenchmarkId::new("crc32c", &id), &payload, |b, p| {
            b.iter(|| black_box(crc32c(p)))
        });
        for (form, name) in [(HeaderForm::Capnp, "capnp"), (HeaderForm::Json, "json")] {
            g.bench_with_input(
                BenchmarkId::new(format!("encode_{name}"), &id),
                &payload,
                |b, p| {
                    b.iter(|| black_box(encode(&header(), form, Flags::NONE, p.clone()).unwrap()))
                },
            );
            let bytes = encode(&header(), form, Flags::NONE, payload.clone())
                .unwrap()
                .to_vec();
            g.bench_with_input(
                BenchmarkId::new(format!("decode_{name}"), &id),
                &bytes,
                |b, bytes| {
                    b.iter_batched(
                        || BytesMut::from(&bytes[..]),
                        |mut buf| {
                            let mut dec = FrameDecoder::new(limits);
                            black_box(dec.decode(&mut buf).unwrap().unwrap())
                        },
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
