//! Tensor codec throughput (SPEC §5.2) at 4 KiB, 1 MiB and 64 MiB, against `memcpy` of the same
//! bytes in the same group (these machines are noisy: the ratios are what count).
//!
//! Every benchmark's throughput is counted in bytes of the F32 tensor (`4·N`), whatever the
//! wire form, so "GB/s" means f32 bytes processed a second for every codec:
//!
//! - `memcpy`: `dst.copy_from_slice(src)` into a buffer allocated once;
//! - `memcpy_alloc`: `src.to_vec()`, a copy into a fresh allocation, which is what an encoder
//!   that returns a new body also pays;
//! - `f32_encode`: [`tensor::encode_f32`], into a fresh allocation;
//! - `*_into`: the `*_into` encoders, into one reused `BytesMut` (no allocation, no page
//!   faults: compare with `memcpy`; the others compare with `memcpy_alloc`);
//! - `f32_decode_view`: [`TensorView::parse`] + [`TensorView::as_f32`] on an aligned body (a
//!   view, no copy: the goal is ≥ 0.9× memcpy);
//! - `f32_decode_copy`: [`TensorView::to_f32_vec`];
//! - `f16_encode`, `f16_encode_into`: [`tensor::encode_f16_from_f32`] (goal ≥ 2 GB/s on one
//!   core);
//! - `f16_decode`: parse + `to_f32_vec` of the F16 body;
//! - `qnt8_encode_into`, `qnt8_encode_rows_into`: [`tensor::encode_qnt8_into`] with one scale,
//!   or a scale per row of 1024 elements;
//! - `qnt8_decode_rows`: parse + `to_f32_vec` (dequantise) of the per-row body.
//!
//! Run with `cargo bench --bench codecs`; the whole file takes about a minute.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use xcp::codec::tensor::{self, TensorView};
use xcp::codec::CodecId;

const SIZES: [(&str, usize); 3] = [("4KiB", 4 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)];

/// Elements a row for the per-row QNT8 benchmarks.
const ROW: usize = 1024;

/// Deterministic values in [-10, 10) (seeded: every run the same).
fn values(n: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(0x2545_F491_4F6C_DD1D);
    (0..n).map(|_| rng.random_range(-10.0f32..10.0)).collect()
}

/// A copy of `body` whose first byte is 64-byte aligned, as the transport delivers large
/// payloads, so the elements (at offset 32) can be viewed in place.
fn aligned(body: &Bytes) -> Bytes {
    let mut v = vec![0u8; body.len() + 64];
    let off = (64 - (v.as_ptr() as usize) % 64) % 64;
    v[off..off + body.len()].copy_from_slice(body);
    Bytes::from(v).slice(off..off + body.len())
}

fn codecs(c: &mut Criterion) {
    for (name, bytes) in SIZES {
        let n = bytes / 4;
        let vals = values(n);
        let rows_shape = [(n / ROW).max(1) as u32, n.min(ROW) as u32];

        let mut g = c.benchmark_group(format!("codecs/{name}"));
        g.throughput(Throughput::Bytes(bytes as u64));
        if bytes >= 64 << 20 {
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2));
        } else {
            g.sample_size(20)
                .warm_up_time(Duration::from_millis(200))
                .measurement_time(Duration::from_millis(800));
        }

        let src: Vec<u8> = bytemuck::cast_slice(&vals).to_vec();
        // The destination sits half a page away from the source, modulo 4096: on AMD Zen with
        // FSRM, glibc's `rep movsb` copy runs ~25x slower when dst - src is a small multiple
        // of 16 modulo 4096, which two back-to-back 4 KiB allocations give. Measured: 2.5 µs
        // instead of 0.1 µs for 4 KiB. The baseline should be an ordinary memcpy.
        let mut dst_buf = vec![0u8; bytes + 4096];
        let gap = (dst_buf.as_ptr() as usize).wrapping_sub(src.as_ptr() as usize);
        let off = (2048 + 4096 - gap % 4096) % 4096;
        let dst = &mut dst_buf[off..off + bytes];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        g.bench_function("memcpy_alloc", |b| b.iter(|| black_box(src.to_vec())));

        g.bench_function("f32_encode", |b| {
            b.iter(|| tensor::encode_f32(&[n as u32], black_box(&vals), false).unwrap())
        });
        let mut out = BytesMut::with_capacity(bytes + 4 * (n / ROW + 1) + 64);
        g.bench_function("f32_encode_into", |b| {
            b.iter(|| {
                out.clear();
                tensor::encode_f32_into(&[n as u32], black_box(&vals), false, &mut out).unwrap();
                black_box(out.len())
            })
        });
        let f32_body = aligned(&tensor::encode_f32(&[n as u32], &vals, false).unwrap());
        g.bench_function("f32_decode_view", |b| {
            b.iter(|| {
                let v = TensorView::parse(black_box(f32_body.clone()), Some(CodecId::TENSOR_F32))
                    .unwrap();
                let s = v.as_f32().expect("aligned body gives an in-place view");
                black_box(s[s.len() - 1])
            })
        });
        g.bench_function("f32_decode_copy", |b| {
            b.iter(|| {
                TensorView::parse(black_box(f32_body.clone()), Some(CodecId::TENSOR_F32))
                    .unwrap()
                    .to_f32_vec()
            })
        });

        g.bench_function("f16_encode", |b| {
            b.iter(|| tensor::encode_f16_from_f32(&[n as u32], black_box(&vals), false).unwrap())
        });
        g.bench_function("f16_encode_into", |b| {
            b.iter(|| {
                out.clear();
                tensor::encode_f16_from_f32_into(&[n as u32], black_box(&vals), false, &mut out)
                    .unwrap();
                black_box(out.len())
            })
        });
        let f16_body = aligned(&tensor::encode_f16_from_f32(&[n as u32], &vals, false).unwrap());
        g.bench_function("f16_decode", |b| {
            b.iter(|| {
                TensorView::parse(black_box(f16_body.clone()), Some(CodecId::TENSOR_F16))
                    .unwrap()
                    .to_f32_vec()
            })
        });

        g.bench_function("qnt8_encode_into", |b| {
            b.iter(|| {
                out.clear();
                tensor::encode_qnt8_into(&[n as u32], black_box(&vals), false, false, &mut out)
                    .unwrap();
                black_box(out.len())
            })
        });
        g.bench_function("qnt8_encode_rows_into", |b| {
            b.iter(|| {
                out.clear();
                tensor::encode_qnt8_into(&rows_shape, black_box(&vals), true, false, &mut out)
                    .unwrap();
                black_box(out.len())
            })
        });
        let q_body = aligned(&tensor::encode_qnt8(&rows_shape, &vals, true, false).unwrap());
        g.bench_function("qnt8_decode_rows", |b| {
            b.iter(|| {
                TensorView::parse(black_box(q_body.clone()), Some(CodecId::TENSOR_QNT8))
                    .unwrap()
                    .to_f32_vec()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, codecs);
criterion_main!(benches);
