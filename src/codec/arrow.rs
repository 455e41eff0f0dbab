//! ARROW_IPC (`0x0020`, SPEC §5.4): a complete Arrow IPC **stream** per body.
//!
//! A body is the schema message, one or more record batches (dictionary batches may come
//! between them) and the end-of-stream marker, exactly as arrow-ipc's `StreamWriter` writes it
//! and any Arrow implementation reads it. Any record batch may be carried as is
//! ([`encode_batches`] / [`decode_batches`]), and a batch of Ethers of one kind maps to one
//! record batch with one row per Ether ([`ethers_to_batch`] / [`batch_to_ethers`]).
//!
//! # Zero copy
//!
//! [`decode_batches`] wraps the body in an `arrow_buffer::Buffer` without copying
//! (`Buffer::from(bytes::Bytes)` keeps the `Bytes` alive), and arrow-ipc's `StreamDecoder`
//! slices every column buffer out of it: the decoded arrays point into the received bytes.
//! This holds when each buffer is aligned for its type. The stream format pads every buffer to
//! a multiple of 8 bytes from the start of the stream (64 with arrow-rs's default writer), so
//! a body that starts at an 8-byte-aligned address (16 for 128-bit types) is decoded without
//! any copy. arrow-ipc's behaviour on a misaligned body: its decoder, built with
//! `require_alignment = false` (the default, kept here), copies each misaligned buffer into a
//! fresh aligned allocation instead of failing, so the result is still correct, at the price of
//! one copy. Receive buffers in xcp are allocated 64-byte aligned (ARCHITECTURE.md), and
//! [`encode_batches`] returns a 64-byte-aligned body, so this does not happen in practice.
//!
//! # Ethers ↔ record batch
//!
//! All Ethers of a batch share `kind` and `schema_version`, which go in the schema metadata as
//! `xcp.kind` and `xcp.schema_version`; the first Ether's `metadata.trace_id` goes in the
//! schema metadata as `trace_id`. Each `payload` key becomes a column, in the order the keys
//! are first seen; a row without the key holds null. Column types are inferred from the values:
//!
//! | values (all rows) | column |
//! |---|---|
//! | strings | `Utf8` |
//! | integers (fit in `i64`) | `Int64` |
//! | numbers, some not integers | `Float64` |
//! | booleans | `Boolean` |
//! | lists of numbers with some non-integer, all of one length n > 0 | `FixedSizeList<Float32>(n)` |
//! | lists of numbers with some non-integer, lengths vary | `List<Float32>` |
//! | lists of integers (such as `token_ids`) | `FixedSizeList<Int64>(n)` / `List<Int64>` by the same rule |
//! | anything else, or any explicit JSON `null` | `Utf8` holding JSON text, field metadata `xcp.json` = `true` |
//!
//! Decisions the SPEC leaves open:
//!
//! - **Per-row metadata.** When every Ether's `metadata` is exactly `{"trace_id": <the first
//!   Ether's>}` (or empty, when the first has none), the schema key says it all and no column is
//!   added. Otherwise a `xcp.metadata` column (`Utf8`, JSON text) holds each row's whole
//!   metadata, per-row trace ids included. Non-empty `extra_fields` and `attachments` go the
//!   same way into `xcp.extra_fields` and `xcp.attachments`. Payload keys that start with `xcp.`
//!   are refused, and on decode unknown `xcp.` columns are ignored.
//! - **What is exact.** Strings, integers, booleans, nested JSON and f32-valued float lists
//!   (embeddings) round-trip exactly. Float lists are narrowed to f32, as the SPEC's embedding
//!   type intends; integers inside a float list come back as floats (`1` → `1.0`).
//! - **Decoding foreign batches.** [`batch_to_ethers`] reads `Utf8`/`LargeUtf8`/`Utf8View`,
//!   `Boolean`, every integer and float type, and (fixed-size / large) lists of them; any other
//!   column type is `ERR_MALFORMED` naming the column. A missing `xcp.schema_version` means 1.
//!
//! # Bad input
//!
//! Every failure to decode is `ERR_MALFORMED` with a message starting `arrow:`: garbage, a
//! stream cut anywhere (including a missing end-of-stream marker), bytes after the marker, a
//! stream without a schema or without a record batch, a buffer that points outside its
//! message body, compressed batches (no compression codec is built in), and a kind that does
//! not match the expected one ([`decode_ethers`]). Before handing the body to arrow-ipc, this
//! module walks the message framing itself and checks every length and buffer range against
//! the bytes that are there, so nothing is allocated from an unchecked length. arrow-ipc's
//! schema conversion still `panic!`s on some malformed schema messages (an unsupported bit
//! width, a missing field list); as a last resort the decode runs under
//! `std::panic::catch_unwind` and such a panic becomes `ERR_MALFORMED` (the default panic hook
//! still prints it; with `panic = "abort"` it would abort).
//!
//! ```
//! use xcp::codec::arrow;
//! use xcp::Ether;
//!
//! let ethers = vec![
//!     Ether::embedding(&[0.5, 1.0, 2.0]).with_trace_id("t-1"),
//!     Ether::embedding(&[-1.0, 0.0, 0.25]).with_trace_id("t-1"),
//! ];
//! let (schema, batch) = arrow::ethers_to_batch(&ethers)?;
//! assert_eq!(schema.metadata()["xcp.kind"], "embedding");
//! assert_eq!(schema.metadata()["trace_id"], "t-1");
//!
//! let body = arrow::encode_batches(&schema, &[batch])?;
//! let (schema2, batches) = arrow::decode_batches(body.clone())?;
//! assert_eq!(batches[0].num_rows(), 2);
//! assert_eq!(arrow::batch_to_ethers(&schema2, &batches[0])?, ethers);
//! assert_eq!(arrow::decode_ethers(body, Some("embedding"))?, ethers);
//! # Ok::<(), xcp::Error>(())
//! ```
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, FixedSizeListBuilder, Float64Builder, Int64Builder, ListBuilder,
    PrimitiveBuilder, StringBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::{Buffer, MutableBuffer};
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::StreamWriter;
use arrow_ipc::MessageHeader;
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::{Error, Result, Violation};
use crate::ether::{Attachment, Ether};

/// Schema metadata key: the Ethers' kind.
pub const META_KIND: &str = "xcp.kind";
/// Schema metadata key: the Ethers' schema version, decimal.
pub const META_SCHEMA_VERSION: &str = "xcp.schema_version";
/// Schema metadata key: the first Ether's `metadata.trace_id`.
pub const META_TRACE_ID: &str = "trace_id";
/// Field metadata key, value `true`: the `Utf8` column holds JSON text.
pub const FIELD_JSON: &str = "xcp.json";
/// Column of each row's whole `metadata`, when it differs from the schema-level trace id.
pub const COL_METADATA: &str = "xcp.metadata";
/// Column of each row's `extra_fields`, when any is non-empty.
pub const COL_EXTRA_FIELDS: &str = "xcp.extra_fields";
/// Column of each row's `attachments`, when any Ether has one.
pub const COL_ATTACHMENTS: &str = "xcp.attachments";

fn malformed(detail: impl std::fmt::Display) -> Error {
    Error::malformed(Violation::Body, format!("arrow: {detail}"))
}

fn invalid(detail: impl std::fmt::Display) -> Error {
    Error::invalid(format!("arrow: {detail}"))
}

// ---------------------------------------------------------------------------------------------
// Record batches ↔ stream bytes

/// A `std::io::Write` into a 64-byte-aligned arrow `MutableBuffer`.
struct AlignedSink(MutableBuffer);

impl std::io::Write for AlignedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An arrow `Buffer` as the owner of a `Bytes`.
struct BufferOwner(Buffer);

impl AsRef<[u8]> for BufferOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Writes `batches` as one Arrow IPC stream (schema, batches, end-of-stream marker). The
/// result starts at a 64-byte-aligned address, so a local decode of it is zero-copy.
///
/// Refused with `Error::invalid`: no batch (SPEC §5.4 wants at least one), or a batch whose
/// columns differ from `schema`'s.
pub fn encode_batches(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Bytes> {
    if batches.is_empty() {
        return Err(invalid("a stream needs at least one record batch"));
    }
    for (i, b) in batches.iter().enumerate() {
        if b.schema().fields() != schema.fields() {
            return Err(invalid(format!(
                "batch {i} has other columns than the schema"
            )));
        }
    }
    let estimate: usize = batches
        .iter()
        .map(RecordBatch::get_array_memory_size)
        .sum::<usize>()
        + 1024;
    let sink = AlignedSink(MutableBuffer::with_capacity(estimate));
    let write = || -> Result<AlignedSink, ArrowError> {
        let mut w = StreamWriter::try_new(sink, schema)?;
        for b in batches {
            w.write(b)?;
        }
        w.into_inner()
    };
    let sink = write().map_err(|e| invalid(format!("cannot write the stream: {e}")))?;
    Ok(Bytes::from_owner(BufferOwner(sink.0.into())))
}

/// Reads a whole Arrow IPC stream: its schema and every record batch, in order. The column
/// buffers of the batches point into `body` (see the module docs on alignment).
///
/// Errors are `ERR_MALFORMED` with a message starting `arrow:`.
pub fn decode_batches(body: Bytes) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    scan(&body)?;
    match catch_unwind(AssertUnwindSafe(|| decode_scanned(body))) {
        Ok(r) => r,
        Err(_) => Err(malformed(
            "invalid IPC stream (the arrow-ipc decoder panicked on it)",
        )),
    }
}

fn decode_scanned(body: Bytes) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let arrow_err = |e: ArrowError| malformed(format!("invalid IPC stream: {e}"));
    let mut buf = Buffer::from(body);
    let mut decoder = StreamDecoder::new();
    let mut batches = Vec::new();
    while !buf.is_empty() {
        if let Some(batch) = decoder.decode(&mut buf).map_err(arrow_err)? {
            batches.push(batch);
        }
    }
    decoder.finish().map_err(arrow_err)?;
    let schema = decoder
        .schema()
        .ok_or_else(|| malformed("the stream has no schema message"))?;
    Ok((schema, batches))
}

/// Walks the stream's message framing and checks every length against the bytes present, the
/// message order (schema first, then batches, then end of stream), and that every buffer of a
/// batch lies inside its message body. Arrow's own decoder then never sees an impossible range.
fn scan(body: &[u8]) -> Result<()> {
    let mut pos = 0usize;
    let mut index = 0usize;
    let mut schema_seen = false;
    let mut batches = 0usize;
    let read_u32 = |pos: usize, index: usize| -> Result<u32> {
        body.get(pos..pos + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| {
                malformed(format!(
                    "truncated stream: the length of message {index} is cut at byte {}",
                    body.len()
                ))
            })
    };
    loop {
        if pos == body.len() {
            return Err(malformed(format!(
                "truncated stream: no end-of-stream marker after {index} messages"
            )));
        }
        let mut len = read_u32(pos, index)?;
        pos += 4;
        if len == 0xFFFF_FFFF {
            // The continuation marker of the current format; the length follows.
            len = read_u32(pos, index)?;
            pos += 4;
        }
        if len == 0 {
            if pos != body.len() {
                return Err(malformed(format!(
                    "{} bytes after the end-of-stream marker",
                    body.len() - pos
                )));
            }
            break;
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > i32::MAX as usize || len > body.len() - pos {
            return Err(malformed(format!(
                "truncated stream: message {index} metadata is {len} bytes, {} left",
                body.len() - pos
            )));
        }
        let message = arrow_ipc::root_as_message(&body[pos..pos + len])
            .map_err(|e| malformed(format!("message {index}: invalid metadata: {e}")))?;
        pos += len;
        let body_len = usize::try_from(message.bodyLength())
            .map_err(|_| malformed(format!("message {index}: negative body length")))?;
        if body_len > body.len() - pos {
            return Err(malformed(format!(
                "truncated stream: message {index} body is {body_len} bytes, {} left",
                body.len() - pos
            )));
        }
        let header = message.header_type();
        let batch = match header {
            MessageHeader::Schema => {
                if schema_seen || index != 0 {
                    return Err(malformed(format!(
                        "message {index}: a schema message after the first message"
                    )));
                }
                let has_fields = message
                    .header_as_schema()
                    .is_some_and(|s| s.fields().is_some());
                if !has_fields {
                    return Err(malformed("the schema message has no field list"));
                }
                schema_seen = true;
                None
            }
            MessageHeader::RecordBatch => {
                batches += 1;
                message.header_as_record_batch()
            }
            MessageHeader::DictionaryBatch => {
                message.header_as_dictionary_batch().and_then(|d| d.data())
            }
            other => {
                return Err(malformed(format!(
                    "message {index}: {other:?} messages are not part of a record batch stream"
                )))
            }
        };
        if header != MessageHeader::Schema && !schema_seen {
            return Err(malformed(
                "the stream has no schema message before its first batch",
            ));
        }
        if header != MessageHeader::Schema {
            let batch = batch
                .ok_or_else(|| malformed(format!("message {index}: batch header is missing")))?;
            if batch.compression().is_some() {
                return Err(malformed(format!(
                    "message {index}: compressed batches are not supported"
                )));
            }
            for (k, b) in batch.buffers().into_iter().flatten().enumerate() {
                let (off, blen) = (b.offset(), b.length());
                let end = off.checked_add(blen);
                if off < 0 || blen < 0 || end.is_none_or(|e| e as u64 > body_len as u64) {
                    return Err(malformed(format!(
                        "message {index}: buffer {k} ({off}, {blen}) lies outside the \
                         {body_len}-byte body"
                    )));
                }
            }
        }
        pos += body_len;
        index += 1;
    }
    if !schema_seen {
        return Err(malformed("the stream has no schema message"));
    }
    if batches == 0 {
        return Err(malformed("the stream has no record batch"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ethers → record batch

/// How a payload key's values are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ColumnKind {
    Utf8,
    Int64,
    Float64,
    Bool,
    /// Lists of numbers; `int`: all integers (Int64 elements, else Float32); `fixed`: the
    /// common length, when all rows have the same length > 0.
    List {
        int: bool,
        fixed: Option<i32>,
    },
    Json,
}

fn infer(rows: &[Option<&Value>]) -> ColumnKind {
    let present: Vec<&Value> = rows.iter().flatten().copied().collect();
    let is_num = |v: &Value| v.as_i64().is_some() || v.is_f64();
    if present.is_empty() || present.iter().any(|v| v.is_null()) {
        return ColumnKind::Json;
    }
    if present.iter().all(|v| v.is_string()) {
        return ColumnKind::Utf8;
    }
    if present.iter().all(|v| v.is_boolean()) {
        return ColumnKind::Bool;
    }
    if present.iter().all(|v| v.as_i64().is_some()) {
        return ColumnKind::Int64;
    }
    if present.iter().all(|v| is_num(v)) {
        return ColumnKind::Float64;
    }
    let lists: Option<Vec<&Vec<Value>>> = present.iter().map(|v| v.as_array()).collect();
    let Some(lists) = lists else {
        return ColumnKind::Json;
    };
    if !lists.iter().all(|l| l.iter().all(is_num)) {
        return ColumnKind::Json;
    }
    let int = lists.iter().all(|l| l.iter().all(|v| v.as_i64().is_some()));
    let n = lists[0].len();
    let fixed = (n > 0 && lists.iter().all(|l| l.len() == n))
        .then(|| i32::try_from(n).ok())
        .flatten();
    ColumnKind::List { int, fixed }
}

fn json_text_column(rows: &[Option<String>]) -> ArrayRef {
    let mut b = StringBuilder::new();
    for r in rows {
        b.append_option(r.as_deref());
    }
    Arc::new(b.finish())
}

fn list_column<T: ArrowPrimitiveType>(
    rows: &[Option<&Value>],
    fixed: Option<i32>,
    conv: impl Fn(&Value) -> T::Native,
) -> ArrayRef {
    let items = |v: &Value| -> Vec<T::Native> {
        v.as_array()
            .map(|l| l.iter().map(&conv).collect())
            .unwrap_or_default()
    };
    match fixed {
        Some(n) => {
            let mut b = FixedSizeListBuilder::new(PrimitiveBuilder::<T>::new(), n);
            for r in rows {
                match r {
                    Some(v) => {
                        b.values().append_slice(&items(v));
                        b.append(true);
                    }
                    None => {
                        b.values().append_nulls(n as usize);
                        b.append(false);
                    }
                }
            }
            Arc::new(b.finish())
        }
        None => {
            let mut b = ListBuilder::new(PrimitiveBuilder::<T>::new());
            for r in rows {
                match r {
                    Some(v) => {
                        b.values().append_slice(&items(v));
                        b.append(true);
                    }
                    None => b.append(false),
                }
            }
            Arc::new(b.finish())
        }
    }
}

fn build_column(rows: &[Option<&Value>], kind: ColumnKind) -> ArrayRef {
    match kind {
        ColumnKind::Utf8 => {
            let mut b = StringBuilder::new();
            rows.iter()
                .for_each(|r| b.append_option(r.and_then(Value::as_str)));
            Arc::new(b.finish())
        }
        ColumnKind::Int64 => {
            let mut b = Int64Builder::with_capacity(rows.len());
            rows.iter()
                .for_each(|r| b.append_option(r.and_then(Value::as_i64)));
            Arc::new(b.finish())
        }
        ColumnKind::Float64 => {
            let mut b = Float64Builder::with_capacity(rows.len());
            rows.iter()
                .for_each(|r| b.append_option(r.and_then(Value::as_f64)));
            Arc::new(b.finish())
        }
        ColumnKind::Bool => {
            let mut b = BooleanBuilder::with_capacity(rows.len());
            rows.iter()
                .for_each(|r| b.append_option(r.and_then(Value::as_bool)));
            Arc::new(b.finish())
        }
        ColumnKind::List { int: true, fixed } => {
            list_column::<Int64Type>(rows, fixed, |v| v.as_i64().unwrap_or_default())
        }
        ColumnKind::List { int: false, fixed } => {
            list_column::<Float32Type>(rows, fixed, |v| v.as_f64().unwrap_or_default() as f32)
        }
        ColumnKind::Json => {
            let text: Vec<Option<String>> = rows.iter().map(|r| r.map(Value::to_string)).collect();
            json_text_column(&text)
        }
    }
}

fn json_field(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable).with_metadata(HashMap::from([(
        FIELD_JSON.to_string(),
        "true".to_string(),
    )]))
}

/// Maps Ethers of one kind to one record batch, one row per Ether (see the module docs for the
/// column types and metadata). Refused with `Error::invalid`: no Ether, Ethers of different
/// kinds or schema versions, or a payload key starting with `xcp.`.
pub fn ethers_to_batch(ethers: &[Ether]) -> Result<(SchemaRef, RecordBatch)> {
    let first = ethers
        .first()
        .ok_or_else(|| invalid("no Ether to put in a batch"))?;
    if let Some((i, e)) = ethers
        .iter()
        .enumerate()
        .find(|(_, e)| e.kind != first.kind || e.schema_version != first.schema_version)
    {
        return Err(invalid(format!(
            "Ether {i} is {:?} v{}, the first is {:?} v{}: a batch holds one kind",
            e.kind, e.schema_version, first.kind, first.schema_version
        )));
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    for e in ethers {
        for k in e.payload.keys() {
            if k.starts_with("xcp.") {
                return Err(invalid(format!(
                    "payload key {k:?} uses the reserved prefix \"xcp.\""
                )));
            }
            if seen.insert(k.as_str()) {
                keys.push(k);
            }
        }
    }

    let mut fields = Vec::with_capacity(keys.len() + 3);
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(keys.len() + 3);
    for k in keys {
        let rows: Vec<Option<&Value>> = ethers.iter().map(|e| e.payload.get(k)).collect();
        let nullable = rows.iter().any(Option::is_none);
        let kind = infer(&rows);
        let col = build_column(&rows, kind);
        fields.push(if kind == ColumnKind::Json {
            json_field(k, nullable)
        } else {
            Field::new(k, col.data_type().clone(), nullable)
        });
        columns.push(col);
    }

    let trace_id = first.trace_id();
    let default_meta = default_metadata(trace_id);
    if ethers.iter().any(|e| e.metadata != default_meta) {
        let text: Vec<Option<String>> = ethers
            .iter()
            .map(|e| Some(Value::Object(e.metadata.clone()).to_string()))
            .collect();
        fields.push(json_field(COL_METADATA, false));
        columns.push(json_text_column(&text));
    }
    if ethers.iter().any(|e| !e.extra_fields.is_empty()) {
        let text: Vec<Option<String>> = ethers
            .iter()
            .map(|e| Some(Value::Object(e.extra_fields.clone()).to_string()))
            .collect();
        fields.push(json_field(COL_EXTRA_FIELDS, false));
        columns.push(json_text_column(&text));
    }
    if ethers.iter().any(|e| !e.attachments.is_empty()) {
        let text = ethers
            .iter()
            .map(|e| serde_json::to_string(&e.attachments).map(Some))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("attachments: {e}")))?;
        fields.push(json_field(COL_ATTACHMENTS, false));
        columns.push(json_text_column(&text));
    }

    let mut meta = HashMap::from([
        (META_KIND.to_string(), first.kind.clone()),
        (
            META_SCHEMA_VERSION.to_string(),
            first.schema_version.to_string(),
        ),
    ]);
    if let Some(t) = trace_id {
        meta.insert(META_TRACE_ID.to_string(), t.to_string());
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, meta));
    let batch = RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(ethers.len())),
    )
    .map_err(|e| invalid(format!("cannot build the batch: {e}")))?;
    Ok((schema, batch))
}

fn default_metadata(trace_id: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(t) = trace_id {
        m.insert(META_TRACE_ID.into(), Value::String(t.into()));
    }
    m
}

/// Encodes Ethers of one kind as an ARROW_IPC body: [`ethers_to_batch`] then
/// [`encode_batches`].
pub fn encode_ethers(ethers: &[Ether]) -> Result<Bytes> {
    let (schema, batch) = ethers_to_batch(ethers)?;
    encode_batches(&schema, &[batch])
}

// ---------------------------------------------------------------------------------------------
// Record batch → Ethers

fn primitive_json<T: ArrowPrimitiveType>(
    a: &dyn Array,
    i: usize,
    f: impl Fn(T::Native) -> Value,
) -> Value {
    f(a.as_primitive::<T>().value(i))
}

/// One cell as JSON. `json_text`: a string cell holds JSON text to parse.
fn cell(a: &dyn Array, i: usize, json_text: bool, column: &str) -> Result<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    let text = |s: &str| -> Result<Value> {
        if json_text {
            serde_json::from_str(s)
                .map_err(|e| malformed(format!("column {column:?} row {i}: bad JSON text: {e}")))
        } else {
            Ok(Value::String(s.to_string()))
        }
    };
    let list = |child: ArrayRef| -> Result<Value> {
        (0..child.len())
            .map(|j| cell(child.as_ref(), j, false, column))
            .collect::<Result<Vec<_>>>()
            .map(Value::Array)
    };
    Ok(match a.data_type() {
        DataType::Utf8 => text(a.as_string::<i32>().value(i))?,
        DataType::LargeUtf8 => text(a.as_string::<i64>().value(i))?,
        DataType::Utf8View => text(a.as_string_view().value(i))?,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => primitive_json::<Int8Type>(a, i, Value::from),
        DataType::Int16 => primitive_json::<Int16Type>(a, i, Value::from),
        DataType::Int32 => primitive_json::<Int32Type>(a, i, Value::from),
        DataType::Int64 => primitive_json::<Int64Type>(a, i, Value::from),
        DataType::UInt8 => primitive_json::<UInt8Type>(a, i, Value::from),
        DataType::UInt16 => primitive_json::<UInt16Type>(a, i, Value::from),
        DataType::UInt32 => primitive_json::<UInt32Type>(a, i, Value::from),
        DataType::UInt64 => primitive_json::<UInt64Type>(a, i, Value::from),
        DataType::Float16 => primitive_json::<Float16Type>(a, i, |v| Value::from(v.to_f64())),
        DataType::Float32 => primitive_json::<Float32Type>(a, i, |v| Value::from(f64::from(v))),
        DataType::Float64 => primitive_json::<Float64Type>(a, i, Value::from),
        DataType::List(_) => list(a.as_list::<i32>().value(i))?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i))?,
        DataType::FixedSizeList(_, _) => list(a.as_fixed_size_list().value(i))?,
        other => {
            return Err(malformed(format!(
                "column {column:?}: type {other} has no Ether mapping"
            )))
        }
    })
}

fn json_object(v: Value, column: &str, i: usize) -> Result<Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        _ => Err(malformed(format!(
            "column {column:?} row {i}: not a JSON object"
        ))),
    }
}

/// Maps a record batch back to Ethers, one per row (the inverse of [`ethers_to_batch`]). The
/// kind and schema version come from `schema`'s metadata; each Ether is validated.
///
/// Errors are `ERR_MALFORMED`: no `xcp.kind` ("arrow: schema metadata has no xcp.kind"), a bad
/// `xcp.schema_version`, a column type with no Ether mapping, bad JSON text, an Ether that
/// breaks SPEC §5.1. A batch whose column count differs from `schema`'s is `Error::invalid`.
pub fn batch_to_ethers(schema: &SchemaRef, batch: &RecordBatch) -> Result<Vec<Ether>> {
    let meta = schema.metadata();
    let kind = meta
        .get(META_KIND)
        .ok_or_else(|| malformed("schema metadata has no xcp.kind"))?;
    let schema_version = match meta.get(META_SCHEMA_VERSION) {
        None => 1,
        Some(v) => v.parse::<u32>().ok().filter(|&v| v >= 1).ok_or_else(|| {
            malformed(format!(
                "schema metadata xcp.schema_version {v:?} is not an integer >= 1"
            ))
        })?,
    };
    if batch.num_columns() != schema.fields().len() {
        return Err(invalid(format!(
            "the batch has {} columns, the schema {}",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let default_meta = default_metadata(meta.get(META_TRACE_ID).map(String::as_str));
    // The row count is the batch's own claim (a batch without columns, or of Null columns,
    // needs no buffer for it): reserve for what is plausible, not for the claim.
    let mut ethers = Vec::with_capacity(batch.num_rows().min(MAX_PREALLOCATED_ROWS));
    for i in 0..batch.num_rows() {
        let mut e = Ether {
            kind: kind.clone(),
            schema_version,
            payload: Map::new(),
            metadata: default_meta.clone(),
            extra_fields: Map::new(),
            attachments: Vec::new(),
        };
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            let name = field.name().as_str();
            let json_text = field
                .metadata()
                .get(FIELD_JSON)
                .is_some_and(|v| v == "true");
            match name {
                COL_METADATA => {
                    e.metadata = json_object(cell(col.as_ref(), i, true, name)?, name, i)?
                }
                COL_EXTRA_FIELDS => {
                    e.extra_fields = json_object(cell(col.as_ref(), i, true, name)?, name, i)?
                }
                COL_ATTACHMENTS => {
                    let v = cell(col.as_ref(), i, true, name)?;
                    if !v.is_null() {
                        e.attachments = serde_json::from_value::<Vec<Attachment>>(v)
                            .map_err(|err| malformed(format!("column {name:?} row {i}: {err}")))?;
                    }
                }
                _ if name.starts_with("xcp.") => {}
                _ if col.is_null(i) => {}
                _ => {
                    let v = cell(col.as_ref(), i, json_text, name)?;
                    e.payload.insert(name.to_string(), v);
                }
            }
        }
        e.validate()
            .map_err(|err| malformed(format!("row {i}: {err}")))?;
        ethers.push(e);
    }
    Ok(ethers)
}

/// Decodes an ARROW_IPC body of Ethers: every batch of the stream, in order. With
/// `expected_kind`, a stream whose `xcp.kind` is another kind is `ERR_MALFORMED`.
pub fn decode_ethers(body: Bytes, expected_kind: Option<&str>) -> Result<Vec<Ether>> {
    let body_len = body.len();
    let (schema, batches) = decode_batches(body)?;
    let kind = schema
        .metadata()
        .get(META_KIND)
        .ok_or_else(|| malformed("schema metadata has no xcp.kind"))?;
    if let Some(want) = expected_kind {
        if kind != want {
            return Err(malformed(format!(
                "schema metadata xcp.kind is {kind:?}, expected {want:?}"
            )));
        }
    }
    // Every row of an Ether stream takes at least one bit of the body (its cells are backed by
    // buffers): a larger row count is a claim, which would make us build that many Ethers.
    let rows = batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    let plausible = body_len.saturating_mul(8);
    if rows > plausible {
        return Err(malformed(format!(
            "the stream claims {rows} rows in {body_len} bytes"
        )));
    }
    let mut out = Vec::new();
    for b in &batches {
        out.extend(batch_to_ethers(&schema, b)?);
    }
    Ok(out)
}

/// The most Ethers [`batch_to_ethers`] reserves room for before it has made them.
const MAX_PREALLOCATED_ROWS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use arrow_array::{Float32Array, Int32Array, StringArray};
    use arrow_ipc::reader::StreamReader;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn embeddings() -> Vec<Ether> {
        vec![
            Ether::embedding(&[0.1, -2.5, 3.0e-7]).with_trace_id("trace-7"),
            Ether::embedding(&[f32::MAX, 0.0, -0.0]).with_trace_id("trace-7"),
        ]
    }

    fn texts() -> Vec<Ether> {
        let mut b = Ether::text("zwei").with_trace_id("t-2");
        b.metadata.insert("producer".into(), json!("unit-test"));
        b.extra_fields.insert("lang".into(), json!({"code": "de"}));
        vec![Ether::text("one").with_trace_id("t-1"), b, Ether::text("")]
    }

    fn float_column(body: &Bytes) -> (RecordBatch, SchemaRef) {
        let (schema, batches) = decode_batches(body.clone()).unwrap();
        (batches[0].clone(), schema)
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}");
        e.to_string()
    }

    #[test]
    fn embedding_batch_round_trips_exactly() {
        let ethers = embeddings();
        let (schema, batch) = ethers_to_batch(&ethers).unwrap();
        let values = schema.field_with_name("values").unwrap();
        assert!(matches!(
            values.data_type(),
            DataType::FixedSizeList(f, 3) if f.data_type() == &DataType::Float32
        ));
        assert_eq!(
            schema.field_with_name("dim").unwrap().data_type(),
            &DataType::Int64
        );
        assert_eq!(schema.fields().len(), 2, "no metadata column: one trace id");
        assert_eq!(schema.metadata()[META_SCHEMA_VERSION], "1");
        assert_eq!(schema.metadata()[META_TRACE_ID], "trace-7");
        let body = encode_batches(&schema, &[batch]).unwrap();
        assert_eq!(decode_ethers(body, Some("embedding")).unwrap(), ethers);
    }

    #[test]
    fn text_batch_round_trips_exactly() {
        let ethers = texts();
        let (schema, batch) = ethers_to_batch(&ethers).unwrap();
        assert_eq!(
            schema.field_with_name("text").unwrap().data_type(),
            &DataType::Utf8
        );
        assert!(schema.field_with_name(COL_METADATA).is_ok());
        assert!(schema.field_with_name(COL_EXTRA_FIELDS).is_ok());
        assert_eq!(schema.metadata()[META_TRACE_ID], "t-1");
        let body = encode_batches(&schema, &[batch]).unwrap();
        assert_eq!(decode_ethers(body, Some("text")).unwrap(), ethers);
    }

    #[test]
    fn column_types_follow_the_values() {
        let mk = |p: Value| {
            let mut e = Ether::new("custom", obj(p));
            e.attachments.push(Attachment {
                id: "a".into(),
                uri: "shm://x#0,4".into(),
                size_bytes: 4,
                ..Attachment::default()
            });
            e
        };
        let ethers = vec![
            mk(
                json!({"ids": [1, 2, 3], "f": 1.5, "n": 1, "b": true, "obj": {"k": [1]},
                      "mixed": 1, "nullish": null, "ragged": [0.5], "big": 18446744073709551615u64}),
            ),
            mk(json!({"ids": [4], "f": 2, "n": -7, "b": false, "obj": [],
                      "mixed": "x", "nullish": 3, "ragged": [0.5, 1.5]})),
        ];
        let (schema, batch) = ethers_to_batch(&ethers).unwrap();
        let ty = |n: &str| schema.field_with_name(n).unwrap().data_type().clone();
        let json = |n: &str| {
            schema
                .field_with_name(n)
                .unwrap()
                .metadata()
                .get(FIELD_JSON)
                .cloned()
        };
        assert!(matches!(ty("ids"), DataType::List(f) if f.data_type() == &DataType::Int64));
        assert!(matches!(ty("ragged"), DataType::List(f) if f.data_type() == &DataType::Float32));
        assert_eq!(ty("f"), DataType::Float64);
        assert_eq!(ty("n"), DataType::Int64);
        assert_eq!(ty("b"), DataType::Boolean);
        for j in ["obj", "mixed", "nullish", "big"] {
            assert_eq!(json(j).as_deref(), Some("true"), "{j}");
        }
        assert!(schema.field_with_name("big").unwrap().is_nullable());
        assert!(!schema.field_with_name("n").unwrap().is_nullable());
        let body = encode_batches(&schema, &[batch]).unwrap();
        let back = decode_ethers(body, None).unwrap();
        // Exact except `f`: 2 was stored as Float64 and comes back as 2.0.
        let mut want = ethers.clone();
        want[1].payload.insert("f".into(), json!(2.0));
        assert_eq!(back, want);
    }

    #[test]
    fn decode_is_zero_copy_on_an_aligned_body() {
        let values: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float32, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Float32Array::from(values.clone()))],
        )
        .unwrap();
        let body = encode_batches(&schema, &[batch]).unwrap();
        assert_eq!(
            body.as_ptr() as usize % 64,
            0,
            "encode_batches aligns its output"
        );
        let range = body.as_ptr_range();
        let (batch, _) = float_column(&body);
        let col = batch.column(0).as_primitive::<Float32Type>();
        let p = col.values().as_ptr().cast::<u8>();
        assert!(range.contains(&p), "column data was copied out of the body");
        assert_eq!(col.values().as_ref(), values.as_slice());

        // A misaligned body still decodes, through arrow-ipc's realigning copy.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&body);
        let odd = Bytes::from(shifted).slice(1..);
        let (batch, _) = float_column(&odd);
        let col = batch.column(0).as_primitive::<Float32Type>();
        assert_eq!(col.values().as_ref(), values.as_slice());
    }

    #[test]
    fn interoperates_with_arrow_ipc_reader_and_writer() {
        // A stream written by arrow-ipc's own writer, into a plain Vec, decodes.
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int32Array::from(vec![Some(1), None, Some(3)])),
                Arc::new(StringArray::from(vec![Some("x"), Some("yy"), None])),
            ],
        )
        .unwrap();
        let mut w = StreamWriter::try_new(Vec::new(), &schema).unwrap();
        w.write(&batch).unwrap();
        w.write(&batch.slice(1, 2)).unwrap();
        let theirs = w.into_inner().unwrap();
        let (s2, batches) = decode_batches(Bytes::from(theirs)).unwrap();
        assert_eq!(s2, schema);
        assert_eq!(batches, vec![batch.clone(), batch.slice(1, 2)]);
        // Without xcp.kind, there are no Ethers in it.
        let msg = err(batch_to_ethers(&s2, &batches[0]));
        assert!(
            msg.contains("arrow: schema metadata has no xcp.kind"),
            "{msg}"
        );

        // Ours is read by arrow-ipc's StreamReader.
        let ours = encode_ethers(&embeddings()).unwrap();
        let reader = StreamReader::try_new(std::io::Cursor::new(ours.to_vec()), None).unwrap();
        assert_eq!(reader.schema().metadata()[META_KIND], "embedding");
        let read: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].num_rows(), 2);
    }

    fn valid_stream() -> Bytes {
        encode_ethers(&texts()).unwrap()
    }

    #[test]
    fn refuses_bad_streams() {
        let body = valid_stream();
        assert!(err(decode_batches(Bytes::new())).contains("no end-of-stream marker"));
        assert!(err(decode_batches(Bytes::from_static(b"garbage!garbage!"))).contains("arrow:"));
        let cut = body.slice(..body.len() - 8);
        assert!(err(decode_batches(cut)).contains("no end-of-stream marker"));
        let mut extra = body.to_vec();
        extra.push(0);
        assert!(err(decode_batches(extra.into())).contains("after the end-of-stream"));
        for n in 0..body.len() {
            let msg = err(decode_batches(body.slice(..n)));
            assert!(
                msg.starts_with("peer error ERR_MALFORMED(0x0008): arrow:"),
                "{msg}"
            );
        }

        // Drop the schema message: the stream starts with a batch.
        let meta_len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
        let headless = body.slice(8 + meta_len..);
        assert!(err(decode_batches(headless)).contains("no schema message"));

        // Schema and end of stream, no batch.
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let mut w = StreamWriter::try_new(Vec::new(), &schema).unwrap();
        w.finish().unwrap();
        let empty = Bytes::from(w.into_inner().unwrap());
        assert!(err(decode_batches(empty)).contains("no record batch"));

        // The legacy end-of-stream marker (4 zero bytes, no continuation) is accepted.
        let mut legacy = body.slice(..body.len() - 8).to_vec();
        legacy.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(decode_ethers(legacy.into(), Some("text")).unwrap(), texts());
    }

    #[test]
    fn refuses_the_wrong_kind_and_unmappable_columns() {
        let body = encode_ethers(&embeddings()).unwrap();
        let msg = err(decode_ethers(body, Some("text")));
        assert!(
            msg.contains("xcp.kind is \"embedding\", expected \"text\""),
            "{msg}"
        );

        let schema = Arc::new(Schema::new_with_metadata(
            vec![Field::new("when", DataType::Date32, false)],
            HashMap::from([(META_KIND.to_string(), "event".to_string())]),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow_array::Date32Array::from(vec![1]))],
        )
        .unwrap();
        let msg = err(batch_to_ethers(&schema, &batch));
        assert!(msg.contains("column \"when\": type Date32"), "{msg}");

        let mut bad_version = schema.metadata().clone();
        bad_version.insert(META_SCHEMA_VERSION.into(), "0".into());
        let s = Arc::new(Schema::new_with_metadata(
            schema.fields().clone(),
            bad_version,
        ));
        let msg = err(batch_to_ethers(&s, &batch));
        assert!(msg.contains("xcp.schema_version"), "{msg}");

        // A standard kind whose required payload field is missing.
        let s = Arc::new(Schema::new_with_metadata(
            vec![Field::new("other", DataType::Utf8, false)],
            HashMap::from([(META_KIND.to_string(), "text".to_string())]),
        ));
        let b =
            RecordBatch::try_new(s.clone(), vec![Arc::new(StringArray::from(vec!["x"]))]).unwrap();
        let msg = err(batch_to_ethers(&s, &b));
        assert!(msg.contains("ether.payload.text"), "{msg}");
    }

    #[test]
    fn refuses_bad_ether_batches() {
        assert!(ethers_to_batch(&[]).is_err());
        let mixed = vec![Ether::text("a"), Ether::embedding(&[1.0])];
        assert!(ethers_to_batch(&mixed)
            .unwrap_err()
            .to_string()
            .contains("one kind"));
        let mut v2 = Ether::text("b");
        v2.schema_version = 2;
        assert!(ethers_to_batch(&[Ether::text("a"), v2]).is_err());
        let reserved = Ether::new("k", obj(json!({"xcp.kind": 1})));
        assert!(ethers_to_batch(&[reserved])
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        let (schema, batch) = ethers_to_batch(&texts()).unwrap();
        let other = Arc::new(Schema::new(vec![Field::new("q", DataType::Utf8, true)]));
        assert!(encode_batches(&other, &[batch]).is_err());
        assert!(encode_batches(&schema, &[]).is_err());
    }

    #[test]
    fn a_schema_that_makes_arrow_ipc_panic_is_malformed() {
        // An Int32 column whose flatbuffer `bitWidth` (32) is changed to 24: arrow-ipc's schema
        // conversion panics on it ("Unexpected bitwidth"), and the catch_unwind net holds.
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int32, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![7]))])
            .unwrap();
        let body = encode_batches(&schema, &[batch]).unwrap().to_vec();
        let meta_len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
        let schema_msg = 8..8 + meta_len;
        let hits: Vec<usize> = body[schema_msg.clone()]
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == [32, 0, 0, 0])
            .map(|(i, _)| i + schema_msg.start)
            .collect();
        assert!(!hits.is_empty());
        let mut panicked = 0;
        for at in hits {
            let mut v = body.clone();
            v[at] = 24;
            if let Err(e) = decode_batches(v.into()) {
                assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
                panicked += usize::from(e.to_string().contains("panicked"));
            }
        }
        assert!(panicked >= 1, "no variant reached the panicking path");
    }

    fn check_no_panic(body: Bytes) {
        // Whatever the bytes, the answer is a value or ERR_MALFORMED.
        if let Err(e) = decode_batches(body.clone()) {
            assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
        }
        let _ = decode_ethers(body, Some("text"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(v in prop::collection::vec(any::<u8>(), 0..512)) {
            check_no_panic(v.into());
        }

        #[test]
        fn truncations_and_mutations_never_panic(
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let body = valid_stream();
            let mut v = body.slice(..cut.index(body.len() + 1)).to_vec();
            for (at, b) in flips {
                if !v.is_empty() {
                    let i = at.index(v.len());
                    v[i] = b;
                }
            }
            check_no_panic(v.into());
        }

        #[test]
        fn tokens_round_trip(rows in prop::collection::vec(
            (prop::collection::vec(any::<i64>(), 0..6), "[a-z]{0,4}"), 1..6)) {
            let ethers: Vec<Ether> = rows.iter().map(|(ids, tag)| {
                Ether::new("tokens", obj(json!({"token_ids": ids, "tag": tag})))
            }).collect();
            let body = encode_ethers(&ethers).unwrap();
            prop_assert_eq!(decode_ethers(body, Some("tokens")).unwrap(), ethers);
        }

        #[test]
        fn embeddings_round_trip(dim in 1usize..16, rows in 1usize..5, seed in any::<u32>()) {
            let ethers: Vec<Ether> = (0..rows).map(|r| {
                let v: Vec<f32> = (0..dim)
                    .map(|i| f32::from_bits(seed.wrapping_mul(2654435761).wrapping_add((r * dim + i) as u32) & 0x7F7F_FFFF))
                    .collect();
                Ether::embedding(&v)
            }).collect();
            let body = encode_ethers(&ethers).unwrap();
            prop_assert_eq!(decode_ethers(body, None).unwrap(), ethers);
        }
    }
}
