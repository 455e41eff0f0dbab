//! ARROW_IPC decode throughput (SPEC §5.4) at 4 KiB, 1 MiB and 64 MiB of column data, against
//! `memcpy` of the same bytes in the same group (these machines are noisy: the ratios are what
//! count).
//!
//! - `memcpy`: `dst.copy_from_slice(src)` of the column's bytes into a buffer allocated once;
//! - `decode_f32`: [`arrow::decode_batches`] of a stream with one `Float32` column;
//! - `decode_embedding`: the same for one `FixedSizeList<Float32>(256)` column, the layout of an
//!   embedding batch.
//!
//! Throughput is counted in bytes of column data. Decoding is a view (the column buffers point
//! into the body, which [`arrow::encode_batches`] returns 64-byte aligned), so its cost is the
//! stream's framing, the flatbuffer checks and arrow's validation, independent of the size:
//! the goal is decode ≥ 0.9× memcpy, which a view exceeds by far once the body is large.
//!
//! Run with `cargo bench --bench arrow`; the whole file takes well under a minute.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xcp::codec::arrow;

const SIZES: [(&str, usize); 3] = [("4KiB", 4 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)];

/// Embedding width of the `FixedSizeList` benchmark.
const DIM: i32 = 256;

fn f32_stream(n: usize) -> Bytes {
    let values = Float32Array::from_iter_values((0..n).map(|i| i as f32 * 0.5));
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float32, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap();
    arrow::encode_batches(&schema, &[batch]).unwrap()
}

fn embedding_stream(n: usize) -> Bytes {
    let values = Float32Array::from_iter_values((0..n).map(|i| i as f32 * 0.25));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(item, DIM, Arc::new(values), None).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new(
        "values",
        list.data_type().clone(),
        false,
    )]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).unwrap();
    arrow::encode_batches(&schema, &[batch]).unwrap()
}

fn decode(c: &mut Criterion) {
    for (name, bytes) in SIZES {
        let n = bytes / 4;
        let mut g = c.benchmark_group(format!("arrow/{name}"));
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

        let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
        let mut dst = vec![0u8; bytes];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });

        let body = f32_stream(n);
        g.bench_function("decode_f32", |b| {
            b.iter(|| black_box(arrow::decode_batches(black_box(body.clone())).unwrap()))
        });

        let body = embedding_stream(n);
        g.bench_function("decode_embedding", |b| {
            b.iter(|| black_box(arrow::decode_batches(black_box(body.clone())).unwrap()))
        });
        g.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
