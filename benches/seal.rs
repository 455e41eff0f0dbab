//! Sealing (ChaCha20-Poly1305) and compression throughput for 64 KiB and 4 MiB bodies,
//! against `memcpy` of the same bytes in the same run. `seal_1t` / `open_1t` run on one thread;
//! `seal` / `open` may split a large body's keystream across cores.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use std::hint::black_box;
use std::time::Duration;
use xcp::codec::CodecId;
use xcp::wire::seal::{aad, compress, decompress, Direction, Sealer};
use xcp::wire::MsgType;

fn body(n: usize) -> Vec<u8> {
    // Text-like bytes: compressible, but not trivially (20 letters, seeded: every run the same).
    let mut rng = SmallRng::seed_from_u64(0x2545_F491_4F6C_DD1D);
    (0..n).map(|_| b'a' + rng.random_range(0..20u8)).collect()
}

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let par = Sealer::new(&[7; 32]);
    let one = Sealer::new(&[7; 32]).with_threads(1);
    let ad = aad(MsgType::DATA, CodecId::TENSOR_F32, 0, 1);
    for (n, id) in [(64 << 10, "64KiB"), (4 << 20, "4MiB")] {
        let data = body(n);
        g.throughput(Throughput::Bytes(n as u64));
        // The destination sits half a page from the source (mod 4096): glibc's copy on AMD
        // Zen runs many times slower when dst - src is a small multiple of 16 mod 4096, which
        // back-to-back allocations give; the baseline must be an ordinary memcpy.
        let mut dst_buf = vec![0u8; n + 4096];
        let gap = (dst_buf.as_ptr() as usize).wrapping_sub(data.as_ptr() as usize);
        let off = (2048 + 4096 - gap % 4096) % 4096;
        let dst = &mut dst_buf[off..off + n];
        g.bench_function(BenchmarkId::new("memcpy", id), |b| {
            b.iter(|| {
                dst.copy_from_slice(&data);
                black_box(&dst);
            })
        });
        g.bench_function(BenchmarkId::new("seal_1t", id), |b| {
            b.iter(|| black_box(one.seal(Direction::C2S, 1, 0, &ad, &data)))
        });
        g.bench_function(BenchmarkId::new("seal", id), |b| {
            b.iter(|| black_box(par.seal(Direction::C2S, 1, 0, &ad, &data)))
        });
        let sealed = par.seal(Direction::C2S, 1, 0, &ad, &data);
        g.bench_function(BenchmarkId::new("open_1t", id), |b| {
            b.iter(|| black_box(one.open(Direction::C2S, 1, 0, &ad, &sealed).unwrap()))
        });
        g.bench_function(BenchmarkId::new("open", id), |b| {
            b.iter(|| black_box(par.open(Direction::C2S, 1, 0, &ad, &sealed).unwrap()))
        });
        g.bench_function(BenchmarkId::new("zstd1_compress", id), |b| {
            b.iter(|| black_box(compress(&data, 1).unwrap()))
        });
        let z = compress(&data, 1).unwrap();
        g.bench_function(BenchmarkId::new("zstd_decompress", id), |b| {
            b.iter(|| black_box(decompress(&z, 1 << 30).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
