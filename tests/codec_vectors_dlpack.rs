//! Golden vectors for the DLPACK codec: bodies whose bytes were worked out by hand from SPEC
//! §5.5 (see `tests/vectors/README.md`). The encoder must produce them byte for byte, and the
//! decoder must read back every field.

use bytes::Bytes;
use xcp::attach::uri::{AttachmentUri, Target};
use xcp::codec::dlpack::{DlData, DlDataType, DlpackDescriptor, DEVICE_CPU, DEVICE_CUDA};
use xcp::codec::{validate_body, CodecId};

#[path = "support/hex.rs"]
mod hex;

/// A vector file as `Bytes`.
fn parse_hex(text: &str) -> Bytes {
    Bytes::from(hex::parse_hex(text))
}

#[test]
fn dlpack_inline() {
    let expected = parse_hex(include_str!("vectors/dlpack_inline.hex"));
    assert_eq!(expected.len(), 85);
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let desc =
        DlpackDescriptor::cpu(DlDataType::F32, vec![2, 2], Bytes::from(data.clone())).unwrap();
    assert_eq!(
        desc.encode().unwrap(),
        expected,
        "encoder output differs from the golden vector"
    );

    validate_body(CodecId::DLPACK, &expected).unwrap();
    let d = DlpackDescriptor::decode(expected.clone()).unwrap();
    assert_eq!(d.device_type, DEVICE_CPU);
    assert_eq!(d.device_id, 0);
    assert_eq!(d.dtype, DlDataType::new(2, 32, 1));
    assert_eq!(d.shape, [2, 2]);
    assert_eq!(d.strides, [2, 1]);
    assert_eq!(d.byte_offset, 0);
    let DlData::Inline(bytes) = &d.data else {
        panic!("expected inline data")
    };
    assert_eq!(bytes[..], data[..]);
    assert_eq!(
        bytes.as_ptr(),
        expected[69..].as_ptr(),
        "inline data is a view"
    );
    assert_eq!(d, desc);
}

#[test]
fn dlpack_uri() {
    let expected = parse_hex(include_str!("vectors/dlpack_uri.hex"));
    assert_eq!(expected.len(), 95);
    let desc = DlpackDescriptor {
        device_type: DEVICE_CUDA,
        device_id: 1,
        dtype: DlDataType::F32,
        shape: vec![2, 2],
        strides: vec![1, 2],
        byte_offset: 0,
        data: DlData::Uri(AttachmentUri::shm("xcp-demo.0", 4096, 16).unwrap()),
    };
    assert_eq!(
        desc.encode().unwrap(),
        expected,
        "encoder output differs from the golden vector"
    );

    validate_body(CodecId::DLPACK, &expected).unwrap();
    let d = DlpackDescriptor::decode(expected).unwrap();
    assert_eq!((d.device_type, d.device_id), (2, 1));
    assert_eq!(d.strides, [1, 2]);
    let DlData::Uri(uri) = &d.data else {
        panic!("expected a URI")
    };
    assert_eq!(
        uri.target(),
        &Target::Shm {
            name: "xcp-demo.0".into()
        }
    );
    assert_eq!((uri.offset(), uri.size()), (4096, 16));
    assert_eq!(uri.to_string(), "shm://xcp-demo.0#4096,16");
    assert_eq!(d, desc);
}
