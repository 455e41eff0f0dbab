//! Golden vectors for the tensor and MIXED_LATENT codecs: bodies whose bytes were worked out by
//! hand from SPEC §5.2–§5.3 (see `tests/vectors/README.md`). The encoders must produce them
//! byte for byte, and the decoders must read back the expected values.

use bytes::Bytes;
use half::f16;
use xcp::codec::tensor::{self, DType, TensorView};
use xcp::codec::{latent, validate_body, CodecId};

#[path = "support/hex.rs"]
mod hex;
use hex::parse_hex;

/// The vector as `Bytes`, and the same bytes at an odd address (elements misaligned).
fn load(text: &str) -> (Bytes, Bytes) {
    let v = parse_hex(text);
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&v);
    (Bytes::from(v), Bytes::from(shifted).slice(1..))
}

#[test]
fn tensor_f32() {
    let (expected, odd) = load(include_str!("vectors/tensor_f32.hex"));
    assert_eq!(expected.len(), 56);
    let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let encoded = tensor::encode_f32(&[2, 3], &values, false).unwrap();
    assert_eq!(
        encoded, expected,
        "encoder output differs from the golden vector"
    );

    for body in [expected, odd] {
        validate_body(CodecId::TENSOR_F32, &body).unwrap();
        let v = TensorView::parse(body, Some(CodecId::TENSOR_F32)).unwrap();
        assert_eq!(v.dtype(), DType::F32);
        assert_eq!(v.shape(), &[2, 3]);
        assert!(!v.header().col_major);
        assert_eq!(v.header().scale, 1.0);
        assert_eq!(v.to_f32_vec(), values);
        if let Some(in_place) = v.as_f32() {
            assert_eq!(in_place, values);
        }
    }
}

#[test]
fn tensor_f16() {
    let (expected, odd) = load(include_str!("vectors/tensor_f16.hex"));
    assert_eq!(expected.len(), 40);
    let values = [1.0f32, -2.0, 0.5, 65504.0];
    let encoded = tensor::encode_f16_from_f32(&[4], &values, false).unwrap();
    assert_eq!(
        encoded, expected,
        "F32 -> F16 encoder differs from the golden vector"
    );
    let halves = [0x3C00, 0xC000, 0x3800, 0x7BFF].map(f16::from_bits);
    let encoded = tensor::encode_f16(&[4], &halves, false).unwrap();
    assert_eq!(
        encoded, expected,
        "F16 encoder differs from the golden vector"
    );

    for body in [expected, odd] {
        let v = TensorView::parse(body, Some(CodecId::TENSOR_F16)).unwrap();
        assert_eq!(v.dtype(), DType::F16);
        assert_eq!(v.shape(), &[4]);
        assert_eq!(v.to_f32_vec(), values);
        if let Some(in_place) = v.as_f16() {
            assert_eq!(in_place, halves);
        }
    }
}

#[test]
fn tensor_qnt8_row() {
    let (expected, odd) = load(include_str!("vectors/tensor_qnt8_row.hex"));
    assert_eq!(expected.len(), 44);
    let encoded = tensor::encode_qnt8(&[2, 2], &[127.0, -64.0, -63.5, 10.6], true, false).unwrap();
    assert_eq!(
        encoded, expected,
        "encoder output differs from the golden vector"
    );

    for body in [expected, odd] {
        let v = TensorView::parse(body, Some(CodecId::TENSOR_QNT8)).unwrap();
        assert_eq!(v.dtype(), DType::Qnt8);
        assert!(v.header().row_qnt);
        assert_eq!(v.shape(), &[2, 2]);
        let rows: Vec<(f32, Vec<u8>)> = v
            .qnt8_rows()
            .unwrap()
            .map(|(s, q)| (s, q.to_vec()))
            .collect();
        assert_eq!(rows, vec![(1.0, vec![255, 64]), (0.5, vec![1, 149])]);
        assert_eq!(v.to_f32_vec(), [127.0, -64.0, -63.5, 10.5]);
    }
}

#[test]
fn latent() {
    let (expected, _) = load(include_str!("vectors/latent.hex"));
    assert_eq!(expected.len(), 76);
    let a = tensor::encode_f32(&[1], &[1.5], false).unwrap();
    let b = tensor::encode_qnt8(&[3], &[0.25, -31.75, 0.0], false, false).unwrap();
    let encoded = latent::encode(&[(CodecId::TENSOR_F32, a), (CodecId::TENSOR_QNT8, b)]).unwrap();
    assert_eq!(
        encoded, expected,
        "encoder output differs from the golden vector"
    );

    validate_body(CodecId::MIXED_LATENT, &expected).unwrap();
    let views = latent::decode(expected.clone()).unwrap();
    assert_eq!(views.len(), 2);
    assert_eq!(views[0].codec(), CodecId::TENSOR_F32);
    assert_eq!(views[0].shape(), &[1]);
    assert_eq!(views[0].to_f32_vec(), [1.5]);
    assert_eq!(views[1].codec(), CodecId::TENSOR_QNT8);
    assert_eq!(views[1].shape(), &[3]);
    assert_eq!(views[1].header().scale, 0.25);
    assert_eq!(views[1].data(), [0x81, 0x01, 0x80]);
    assert_eq!(views[1].to_f32_vec(), [0.25, -31.75, 0.0]);
    // The views are slices of the body: tensor 0 starts at offset 3, tensor 1 at 41.
    assert_eq!(views[0].body().as_ptr(), expected[3..].as_ptr());
    assert_eq!(views[1].body().as_ptr(), expected[41..].as_ptr());
}
