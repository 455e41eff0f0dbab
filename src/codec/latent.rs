//! MIXED_LATENT bodies (SPEC §5.3): several tensor bodies in one message.
//!
//! The body is `varuint count`, then for each tensor a `u8 subtype` (0x02, 0x03 or 0x04: the
//! tensor codec's ID), a `varuint length` and `length` bytes of a complete tensor body
//! (§5.2). A varuint is unsigned LEB128 of at most 10 bytes.
//!
//! [`decode`] returns [`TensorView`]s that are slices of the received body (no copy). The
//! tensors sit at arbitrary offsets, so [`TensorView::as_f32`] may find an inner tensor
//! misaligned and answer `None`; [`TensorView::to_f32_vec`] always works.
//!
//! ```
//! use xcp::codec::{latent, tensor, CodecId};
//!
//! let a = tensor::encode_f32(&[2], &[1.0, 2.0], false)?;
//! let b = tensor::encode_qnt8(&[3], &[0.25, -31.75, 0.0], false, false)?;
//! let body = latent::encode(&[(CodecId::TENSOR_F32, a), (CodecId::TENSOR_QNT8, b)])?;
//! assert_eq!(body[0], 2); // count
//!
//! let views = latent::decode(body)?;
//! assert_eq!(views.len(), 2);
//! assert_eq!(views[0].to_f32_vec(), [1.0, 2.0]);
//! assert_eq!(views[1].codec(), CodecId::TENSOR_QNT8);
//! assert_eq!(views[1].to_f32_vec(), [0.25, -31.75, 0.0]);
//! # Ok::<(), xcp::Error>(())
//! ```
//!
//! Decisions where the SPEC is silent: a count of 0 is a valid (empty) body; a varuint with
//! redundant continuation bytes (`80 00` for 0) is accepted as long as it fits 10 bytes and
//! u64; bytes after the last tensor are `ERR_MALFORMED`.

use bytes::{BufMut, Bytes, BytesMut};

use super::tensor::{self, DType, TensorView, HEADER_LEN};
use super::CodecId;
use crate::error::{Error, Result, Violation};

/// The longest varuint: 10 bytes hold 64 bits.
pub const MAX_VARUINT_LEN: usize = 10;

/// The fewest bytes one tensor can take: subtype, a 1-byte length, a bare header.
const MIN_ENTRY_LEN: usize = 1 + 1 + HEADER_LEN;

/// Appends `v` as unsigned LEB128 (1 to 10 bytes, the shortest form).
pub fn write_varuint(mut v: u64, out: &mut BytesMut) {
    loop {
        let low = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.put_u8(low);
            return;
        }
        out.put_u8(low | 0x80);
    }
}

/// The number of bytes [`write_varuint`] writes for `v`.
pub fn varuint_len(v: u64) -> usize {
    let bits = 64 - v.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Why a varuint could not be read.
enum VarErr {
    /// The input ends before the last byte.
    Truncated,
    /// The 10th byte still has its continuation bit.
    TooLong,
    /// The 10th byte has bits beyond bit 63.
    Overflow(u8),
}

impl VarErr {
    fn text(&self) -> String {
        match self {
            VarErr::Truncated => "the body ends inside the varuint".to_string(),
            VarErr::TooLong => "varuint longer than 10 bytes".to_string(),
            VarErr::Overflow(b) => {
                format!("varuint exceeds 64 bits (10th byte 0x{b:02X}, at most 0x01)")
            }
        }
    }
}

fn read_var(buf: &[u8]) -> std::result::Result<(u64, usize), VarErr> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().take(MAX_VARUINT_LEN).enumerate() {
        if i == MAX_VARUINT_LEN - 1 {
            if b & 0x80 != 0 {
                return Err(VarErr::TooLong);
            }
            if b > 1 {
                return Err(VarErr::Overflow(b));
            }
        }
        v |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(VarErr::Truncated)
}

/// Reads an unsigned LEB128 value at the start of `buf`: the value and the number of bytes it
/// took. A value cut short, longer than 10 bytes, or beyond u64 is `ERR_MALFORMED`.
pub fn read_varuint(buf: &[u8]) -> Result<(u64, usize)> {
    read_var(buf).map_err(|e| Error::malformed(Violation::Body, format!("varuint: {}", e.text())))
}

/// Encodes a MIXED_LATENT body from complete tensor bodies, each with its tensor codec. Each
/// body is checked first (with [`TensorView::parse`]); a codec that is not a tensor codec, or
/// a bad body, is `Error::Invalid`. The bodies are copied into one buffer.
pub fn encode(tensors: &[(CodecId, Bytes)]) -> Result<Bytes> {
    for (i, (codec, body)) in tensors.iter().enumerate() {
        if DType::from_codec(*codec).is_none() {
            return Err(Error::invalid(format!(
                "latent[{i}]: {codec} is not a tensor codec"
            )));
        }
        TensorView::parse(body.clone(), Some(*codec))
            .map_err(|e| Error::invalid(format!("latent[{i}]: {}", tensor::detail(&e))))?;
    }
    Ok(write(tensors.iter().map(|(c, b)| (*c, &b[..]))))
}

/// Encodes a MIXED_LATENT body from views that are already checked. The bodies are copied
/// into one buffer.
pub fn encode_views(views: &[TensorView]) -> Bytes {
    write(views.iter().map(|v| (v.codec(), &v.body()[..])))
}

/// Writes count and entries into a buffer of exactly the right size.
fn write<'a>(entries: impl Iterator<Item = (CodecId, &'a [u8])> + Clone) -> Bytes {
    let count = entries.clone().count() as u64;
    let len = varuint_len(count)
        + entries
            .clone()
            .map(|(_, b)| 1 + varuint_len(b.len() as u64) + b.len())
            .sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    write_varuint(count, &mut out);
    for (codec, body) in entries {
        out.put_u8(codec.0 as u8);
        write_varuint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
    }
    out.freeze()
}

/// Puts `latent[i].` in front of an inner tensor error's detail.
fn in_entry(i: usize, e: Error) -> Error {
    match e {
        Error::Protocol {
            violation,
            code,
            detail,
        } => Error::protocol(violation, code, format!("latent[{i}].{detail}")),
        other => other,
    }
}

/// Decodes a MIXED_LATENT body into views that share `body` (no copy). Every tensor is checked
/// as by [`TensorView::parse`]. A bad varuint, a count that cannot fit in the body, an unknown
/// subtype, a length past the end, a bad tensor, or bytes after the last tensor is
/// `ERR_MALFORMED` naming the field (such as `latent[2].length`).
pub fn decode(body: Bytes) -> Result<Vec<TensorView>> {
    let (count, mut pos) = read_var(&body)
        .map_err(|e| Error::malformed(Violation::Body, format!("latent.count: {}", e.text())))?;
    let left = body.len() - pos;
    if count > (left / MIN_ENTRY_LEN) as u64 {
        return Err(Error::malformed(
            Violation::Body,
            format!(
                "latent.count: {count} tensors cannot fit in the {left} bytes that follow \
             (each takes at least {MIN_ENTRY_LEN})"
            ),
        ));
    }
    let count = count as usize;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let Some(&sub) = body.get(pos) else {
            return Err(Error::malformed(
                Violation::Body,
                format!("latent[{i}].subtype: the body ends before tensor {i} of {count}"),
            ));
        };
        let codec = CodecId(u16::from(sub));
        if DType::from_codec(codec).is_none() {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "latent[{i}].subtype: 0x{sub:02X} is not a tensor codec (0x02, 0x03 or 0x04)"
                ),
            ));
        }
        pos += 1;
        let (len, n) = read_var(&body[pos..]).map_err(|e| {
            Error::malformed(Violation::Body, format!("latent[{i}].length: {}", e.text()))
        })?;
        pos += n;
        let left = (body.len() - pos) as u64;
        if len > left {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "latent[{i}].length: {len} bytes, {} past the end of the body",
                    len - left
                ),
            ));
        }
        let end = pos + len as usize;
        let view =
            TensorView::parse(body.slice(pos..end), Some(codec)).map_err(|e| in_entry(i, e))?;
        out.push(view);
        pos = end;
    }
    if pos != body.len() {
        return Err(Error::malformed(
            Violation::Body,
            format!(
                "latent: {} trailing bytes after the last of {count} tensors",
                body.len() - pos
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    fn malformed(body: Vec<u8>, field: &str) {
        let err = decode(Bytes::from(body)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ERR_MALFORMED, "{err}");
        assert!(
            tensor::detail(&err).starts_with(field),
            "expected an error naming {field}, got: {err}"
        );
    }

    fn var(v: u64) -> Vec<u8> {
        let mut b = BytesMut::new();
        write_varuint(v, &mut b);
        b.to_vec()
    }

    #[test]
    fn varuint_vectors() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (300, &[0xAC, 0x02]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                u64::MAX,
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            ),
            (
                1 << 63,
                &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            ),
        ];
        for &(v, bytes) in cases {
            assert_eq!(var(v), bytes, "{v}");
            assert_eq!(varuint_len(v), bytes.len());
            let mut b = bytes.to_vec();
            b.push(0xEE); // what follows is not read
            assert_eq!(read_varuint(&b).unwrap(), (v, bytes.len()));
        }
        // Redundant but within 10 bytes: accepted.
        assert_eq!(read_varuint(&[0x80, 0x00]).unwrap(), (0, 2));
    }

    #[test]
    fn varuint_errors() {
        let check = |b: &[u8], what: &str| {
            let err = read_varuint(b).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ERR_MALFORMED);
            assert!(err.to_string().contains(what), "{err}");
        };
        check(&[], "ends inside");
        check(&[0x80], "ends inside");
        check(&[0xFF; 9], "ends inside");
        check(&[0xFF; 11], "longer than 10 bytes");
        check(
            &[
                0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
            ],
            "longer",
        );
        let mut b = vec![0xFF; 9];
        b.push(0x02);
        check(&b, "exceeds 64 bits");
        b[9] = 0x7F;
        check(&b, "exceeds 64 bits");
    }

    fn sample() -> Vec<(CodecId, Bytes)> {
        vec![
            (
                CodecId::TENSOR_F32,
                tensor::encode_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0], false).unwrap(),
            ),
            (
                CodecId::TENSOR_F16,
                tensor::encode_f16_from_f32(&[3], &[0.5, -1.0, 2.0], false).unwrap(),
            ),
            (
                CodecId::TENSOR_QNT8,
                tensor::encode_qnt8(&[2, 3], &[1.0, 2.0, 3.0, -4.0, 0.0, 4.0], true, false)
                    .unwrap(),
            ),
        ]
    }

    #[test]
    fn round_trip_shares_the_body() {
        let tensors = sample();
        let body = encode(&tensors).unwrap();
        let views = decode(body.clone()).unwrap();
        assert_eq!(views.len(), 3);
        for ((codec, b), v) in tensors.iter().zip(&views) {
            assert_eq!(v.codec(), *codec);
            assert_eq!(v.body(), b);
            // The view points into the received body: no copy.
            let range = body.as_ptr_range();
            assert!(range.contains(&v.body().as_ptr()));
        }
        assert_eq!(encode_views(&views), body);
        assert_eq!(views[1].to_f32_vec(), [0.5, -1.0, 2.0]);
        assert_eq!(decode(Bytes::from_static(&[0])).unwrap(), vec![]);
        assert_eq!(encode(&[]).unwrap(), Bytes::from_static(&[0]));
    }

    #[test]
    fn encode_refuses_bad_input() {
        let t = sample();
        let r = encode(&[(CodecId::JSON, t[0].1.clone())]);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        let r = encode(&[(CodecId::TENSOR_F16, t[0].1.clone())]);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        let r = encode(&[t[0].clone(), (CodecId::TENSOR_F32, t[0].1.slice(..40))]);
        match r {
            Err(Error::Invalid(d)) => assert!(d.starts_with("latent[1]: tensor.body"), "{d}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_bodies() {
        let t = sample();
        let good = encode(&t).unwrap().to_vec();
        malformed(vec![], "latent.count");
        malformed(vec![0xFF; 11], "latent.count");
        malformed(vec![5, 2, 2], "latent.count");
        // A count far beyond the body: refused before allocating.
        let mut huge = var(u64::MAX);
        huge.extend_from_slice(&[0; 64]);
        malformed(huge, "latent.count");
        // Unknown subtype.
        let mut b = good.clone();
        b[1] = 0x10;
        malformed(b, "latent[0].subtype");
        // Second entry's subtype not a tensor codec.
        let second = 1 + 1 + 1 + t[0].1.len();
        let mut b = good.clone();
        b[second] = 0x01;
        malformed(b, "latent[1].subtype");
        // Length past the end.
        let mut b = vec![1, 2];
        b.extend(var(500));
        b.extend_from_slice(&t[0].1);
        malformed(b, "latent[0].length: 500 bytes, 452 past the end");
        // Length varint too long.
        let mut b = vec![1, 2];
        b.extend_from_slice(&[0x80; 11]);
        b.extend_from_slice(&[0; 40]);
        malformed(b, "latent[0].length");
        // The body runs out before the counted tensors.
        let mut b = good.clone();
        b[0] = 4;
        b.extend_from_slice(&[0; 40]);
        malformed(b, "latent[3].subtype");
        // An inner tensor that is bad.
        let mut b = good.clone();
        b[3] = 0; // latent[0] ndim
        malformed(b, "latent[0].tensor.ndim");
        let mut b = good.clone();
        b[1] = 0x03; // F32 body announced as F16
        malformed(b, "latent[0].tensor.dtype");
        // Trailing bytes.
        let mut b = good.clone();
        b.push(0);
        malformed(b, "latent: 1 trailing bytes");
    }

    proptest! {
        #[test]
        fn decode_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = decode(Bytes::from(body)) {
                prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
            }
        }

        #[test]
        fn mutated_bodies_never_panic(pos in 0usize..200, byte: u8, cut in 0usize..200) {
            let mut b = encode(&sample()).unwrap().to_vec();
            let p = pos % b.len();
            b[p] = byte;
            b.truncate(b.len() - cut.min(b.len()));
            if let Ok(views) = decode(Bytes::from(b)) {
                for v in views {
                    prop_assert_eq!(v.to_f32_vec().len(), v.numel());
                }
            }
        }

        #[test]
        fn varuint_round_trip(v: u64) {
            let b = var(v);
            prop_assert_eq!(b.len(), varuint_len(v));
            prop_assert_eq!(read_varuint(&b).unwrap(), (v, b.len()));
        }

        #[test]
        fn latent_round_trip(dims in prop::collection::vec((0u8..3, 1u32..6, 1u32..6), 0..5)) {
            let tensors: Vec<(CodecId, Bytes)> = dims
                .iter()
                .map(|&(d, a, b)| {
                    let vals: Vec<f32> = (0..a * b).map(|i| i as f32 - 3.0).collect();
                    let body = match d {
                        0 => tensor::encode_f32(&[a, b], &vals, false),
                        1 => tensor::encode_f16_from_f32(&[a, b], &vals, true),
                        _ => tensor::encode_qnt8(&[a, b], &vals, true, false),
                    };
                    (DType::ALL[d as usize].codec(), body.unwrap())
                })
                .collect();
            let views = decode(encode(&tensors).unwrap()).unwrap();
            prop_assert_eq!(views.len(), tensors.len());
            for ((c, b), v) in tensors.iter().zip(views) {
                prop_assert_eq!(v.codec(), *c);
                prop_assert_eq!(v.body(), b);
            }
        }
    }
}
