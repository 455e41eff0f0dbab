//! DLPACK (`0x0021`, SPEC §5.5): a DLPack tensor descriptor plus where its bytes live.
//!
//! A DLPack tensor cannot cross a process as a pointer, so the body describes the `DLTensor`
//! (device, dtype, shape, strides in elements, byte offset) and then carries the bytes inline or
//! names them with an attachment URI (SPEC §7). All integers are little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `DLPK` |
//! | 4 | 8 | DLPack version: u32 major (1), u32 minor (0) |
//! | 12 | 8 | i32 `device_type`, i32 `device_id` |
//! | 20 | 4 | dtype: u8 code, u8 bits, u16 lanes |
//! | 24 | 4 | u32 `ndim` |
//! | 28 | 8 | u64 `byte_offset` |
//! | 36 | 8·ndim | i64 shape |
//! | 36 + 8·ndim | 8·ndim | i64 strides, in elements |
//! | 36 + 16·ndim | 1 | `data_kind`: 0 inline, 1 URI |
//! | 37 + 16·ndim | … | inline: the bytes, to the end of the body; URI: u16 length + UTF-8 |
//!
//! Validation (each failure is `ERR_MALFORMED` with a message `dlpack.<field>: …`; a bad URI is
//! `ERR_ATTACHMENT` from [`AttachmentUri::parse`]):
//!
//! - `magic` must be `DLPK`; the major version must be 1 (any minor is accepted, as SPEC §1
//!   does for frames).
//! - `ndim` is at most [`MAX_NDIM`] = 64, the limit of NumPy 2 (DLPack has none), and
//!   `16·ndim` must fit in what is left of the body before anything is allocated.
//! - `device_id` must not be negative.
//! - `dtype`: a code DLPack 1.1 defines ([`DlDataType::KNOWN_CODES`]: int, uint, float,
//!   opaque handle, bfloat, complex, bool, the float8/6/4 codes 7–17), `bits` > 0, `lanes` > 0,
//!   and `bits · lanes` a multiple of 8: sub-byte elements (float4/float6, packed bools) are
//!   refused because their byte layout depends on DLPack's padding flag, which the body does
//!   not carry.
//! - `shape`: no negative dimension. `strides`: no negative stride (DLPack allows them, but
//!   PyTorch and most consumers do not; a producer can make the tensor contiguous first).
//! - The bytes the tensor addresses, `byte_offset + (Σ (shape[i] − 1)·strides[i] + 1) · bits ·
//!   lanes / 8` (0 when any dimension is 0), computed with checked arithmetic, must fit in the
//!   inline bytes, or in the URI's `<size>` for the URI form.
//! - Inline bytes are only allowed on host memory: device type 1 (`kDLCPU`) or 3
//!   (`kDLCUDAHost`).
//! - `data_kind` is 0 or 1; the URI is valid UTF-8 and a valid attachment URI; nothing follows
//!   it.
//!
//! [`DlpackDescriptor::decode`] does not copy: inline data is a slice of the body. The DLPack C
//! ABI (`DLManagedTensorVersioned`) for these descriptors is in [`crate::attach::dlpack_ffi`].
//!
//! ```
//! use bytes::Bytes;
//! use xcp::codec::dlpack::{DlData, DlDataType, DlpackDescriptor};
//!
//! let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let desc = DlpackDescriptor::cpu(DlDataType::F32, vec![2, 2], Bytes::from(values))?;
//! assert_eq!(desc.strides, vec![2, 1]); // compact row-major
//! let body = desc.encode()?;
//! assert_eq!(&body[..4], b"DLPK");
//! let back = DlpackDescriptor::decode(body.clone())?;
//! assert_eq!(back, desc);
//! let DlData::Inline(data) = &back.data else { unreachable!() };
//! assert_eq!(data.as_ptr(), body[body.len() - 16..].as_ptr()); // a view into the body
//! # Ok::<(), xcp::Error>(())
//! ```
#![forbid(unsafe_code)]

use bytes::{BufMut, Bytes, BytesMut};

use crate::attach::uri::AttachmentUri;
use crate::error::{Error, Result, Violation};

/// The body magic.
pub const MAGIC: [u8; 4] = *b"DLPK";
/// The DLPack major version this codec writes and accepts.
pub const VERSION_MAJOR: u32 = 1;
/// The DLPack minor version this codec writes.
pub const VERSION_MINOR: u32 = 0;
/// The largest `ndim` accepted (NumPy 2's limit; DLPack sets none).
pub const MAX_NDIM: usize = 64;
/// `kDLCPU`.
pub const DEVICE_CPU: i32 = 1;
/// `kDLCUDA`.
pub const DEVICE_CUDA: i32 = 2;
/// `kDLCUDAHost`: pinned host memory.
pub const DEVICE_CUDA_HOST: i32 = 3;

/// Size of the fixed part, before shape and strides.
const FIXED: usize = 36;

/// A DLPack `DLDataType`: type code, bits per lane, lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DlDataType {
    /// `DLDataTypeCode`: 0 int, 1 uint, 2 float, 3 opaque handle, 4 bfloat, 5 complex, 6 bool,
    /// 7–17 the float8/float6/float4 codes of DLPack 1.1.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes (1 for scalars, more for vector types).
    pub lanes: u16,
}

impl DlDataType {
    /// The codes DLPack 1.1 defines (`kDLInt` = 0 … `kDLFloat4_e2m1fn` = 17).
    pub const KNOWN_CODES: std::ops::RangeInclusive<u8> = 0..=17;
    /// `float32`.
    pub const F32: DlDataType = DlDataType::new(2, 32, 1);
    /// `float16`.
    pub const F16: DlDataType = DlDataType::new(2, 16, 1);
    /// `bfloat16`.
    pub const BF16: DlDataType = DlDataType::new(4, 16, 1);
    /// `float64`.
    pub const F64: DlDataType = DlDataType::new(2, 64, 1);
    /// `int64`.
    pub const I64: DlDataType = DlDataType::new(0, 64, 1);
    /// `int32`.
    pub const I32: DlDataType = DlDataType::new(0, 32, 1);
    /// `uint8`.
    pub const U8: DlDataType = DlDataType::new(1, 8, 1);
    /// `bool` (one byte per element).
    pub const BOOL: DlDataType = DlDataType::new(6, 8, 1);

    /// A dtype from its three fields.
    pub const fn new(code: u8, bits: u8, lanes: u16) -> Self {
        DlDataType { code, bits, lanes }
    }

    /// Bytes per element (`bits · lanes / 8`), after checking the rules of the module docs.
    pub fn element_bytes(&self) -> Result<u64, String> {
        if !Self::KNOWN_CODES.contains(&self.code) {
            return Err(format!(
                "dlpack.dtype.code: unknown code {} (DLPack 1.1 defines 0..=17)",
                self.code
            ));
        }
        if self.bits == 0 {
            return Err("dlpack.dtype.bits: 0".into());
        }
        if self.lanes == 0 {
            return Err("dlpack.dtype.lanes: 0".into());
        }
        let bits = u64::from(self.bits) * u64::from(self.lanes);
        if bits % 8 != 0 {
            return Err(format!(
                "dlpack.dtype.bits: {} bits x {} lanes is not a whole number of bytes \
                 (sub-byte elements are not supported)",
                self.bits, self.lanes
            ));
        }
        Ok(bits / 8)
    }
}

/// Where the tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DlData {
    /// The bytes travel in the body (host memory only).
    Inline(Bytes),
    /// The bytes are behind an attachment handle (SPEC §7).
    Uri(AttachmentUri),
}

/// A DLPACK body (SPEC §5.5): the fields of a `DLTensor` and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlpackDescriptor {
    /// `DLDeviceType`: [`DEVICE_CPU`], [`DEVICE_CUDA`], [`DEVICE_CUDA_HOST`], …
    pub device_type: i32,
    /// The device ordinal (0 for the CPU).
    pub device_id: i32,
    /// Element type.
    pub dtype: DlDataType,
    /// Dimensions, `ndim` of them.
    pub shape: Vec<i64>,
    /// Strides in elements, one per dimension (always present on the wire).
    pub strides: Vec<i64>,
    /// Offset in bytes from the start of the data to the first element.
    pub byte_offset: u64,
    /// The bytes, inline or by handle.
    pub data: DlData,
}

/// Compact row-major strides (in elements) for `shape`; `None` if the product overflows.
pub fn row_major_strides(shape: &[i64]) -> Option<Vec<i64>> {
    let mut strides = vec![0i64; shape.len()];
    let mut acc: i64 = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.checked_mul(d.max(1))?;
    }
    Some(strides)
}

/// The number of bytes the tensor addresses, starting at the data pointer:
/// `byte_offset + (Σ (shape[i] − 1)·strides[i] + 1) · element_bytes`, or `byte_offset` when the
/// tensor has no element. Checks dtype, negative dims and negative strides; every step is
/// checked arithmetic. The error is the message of an `ERR_MALFORMED`.
pub fn data_extent(
    dtype: DlDataType,
    shape: &[i64],
    strides: &[i64],
    byte_offset: u64,
) -> Result<u64, String> {
    let elem = dtype.element_bytes()?;
    if shape.len() != strides.len() {
        return Err(format!(
            "dlpack.strides: {} strides for {} dimensions",
            strides.len(),
            shape.len()
        ));
    }
    if shape.len() > MAX_NDIM {
        return Err(format!("dlpack.ndim: {} exceeds {MAX_NDIM}", shape.len()));
    }
    if let Some((i, d)) = shape.iter().enumerate().find(|(_, d)| **d < 0) {
        return Err(format!("dlpack.shape[{i}]: negative ({d})"));
    }
    if let Some((i, s)) = strides.iter().enumerate().find(|(_, s)| **s < 0) {
        return Err(format!(
            "dlpack.strides[{i}]: negative ({s}); negative strides are not supported"
        ));
    }
    if shape.contains(&0) {
        return Ok(byte_offset);
    }
    let overflow = || "dlpack.strides: the addressed range overflows u64".to_string();
    let mut last: u64 = 0;
    for (&d, &s) in shape.iter().zip(strides) {
        // Both are non-negative here.
        let step = ((d - 1) as u64)
            .checked_mul(s as u64)
            .ok_or_else(overflow)?;
        last = last.checked_add(step).ok_or_else(overflow)?;
    }
    last.checked_add(1)
        .and_then(|n| n.checked_mul(elem))
        .and_then(|n| n.checked_add(byte_offset))
        .ok_or_else(overflow)
}

impl DlpackDescriptor {
    /// A CPU tensor with inline bytes, compact row-major strides and no byte offset. Fails
    /// (`Error::invalid`) when the bytes are too few for the shape.
    pub fn cpu(dtype: DlDataType, shape: Vec<i64>, data: Bytes) -> Result<Self> {
        let strides = row_major_strides(&shape)
            .ok_or_else(|| Error::invalid("dlpack.shape: element count overflows i64"))?;
        let d = DlpackDescriptor {
            device_type: DEVICE_CPU,
            device_id: 0,
            dtype,
            shape,
            strides,
            byte_offset: 0,
            data: DlData::Inline(data),
        };
        d.check().map_err(Error::invalid)?;
        Ok(d)
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// The number of bytes the tensor addresses from the start of its data (see
    /// [`data_extent`]).
    pub fn extent(&self) -> Result<u64> {
        data_extent(self.dtype, &self.shape, &self.strides, self.byte_offset)
            .map_err(|d| Error::malformed(Violation::Body, d))
    }

    /// Checks every rule of the module docs: `ERR_MALFORMED` (or `ERR_ATTACHMENT`) naming the
    /// field. [`DlpackDescriptor::decode`] has already done this for a received body.
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|d| Error::malformed(Violation::Body, d))
    }

    /// The rules of the module docs; the message names the field.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.device_id < 0 {
            return Err(format!("dlpack.device_id: negative ({})", self.device_id));
        }
        let extent = data_extent(self.dtype, &self.shape, &self.strides, self.byte_offset)?;
        match &self.data {
            DlData::Inline(bytes) => {
                if self.device_type != DEVICE_CPU && self.device_type != DEVICE_CUDA_HOST {
                    return Err(format!(
                        "dlpack.device_type: inline data needs host memory (1 CPU or 3 CUDA \
                         host), got {}",
                        self.device_type
                    ));
                }
                if extent > bytes.len() as u64 {
                    return Err(format!(
                        "dlpack.strides: the tensor addresses {extent} bytes, only {} inline",
                        bytes.len()
                    ));
                }
            }
            DlData::Uri(uri) => {
                if extent > uri.size() {
                    return Err(format!(
                        "dlpack.strides: the tensor addresses {extent} bytes, the URI names {}",
                        uri.size()
                    ));
                }
                if uri.to_string().len() > usize::from(u16::MAX) {
                    return Err("dlpack.uri: longer than 65535 bytes".into());
                }
            }
        }
        Ok(())
    }

    /// Writes the body. A descriptor that breaks a rule of the module docs is refused with
    /// `Error::invalid` naming the field.
    pub fn encode(&self) -> Result<Bytes> {
        self.check().map_err(Error::invalid)?;
        let ndim = self.ndim();
        let uri = match &self.data {
            DlData::Uri(u) => Some(u.to_string()),
            DlData::Inline(_) => None,
        };
        let tail = match (&self.data, &uri) {
            (DlData::Inline(b), _) => b.len(),
            (_, Some(u)) => 2 + u.len(),
            _ => 0,
        };
        let mut out = BytesMut::with_capacity(FIXED + 16 * ndim + 1 + tail);
        out.put_slice(&MAGIC);
        out.put_u32_le(VERSION_MAJOR);
        out.put_u32_le(VERSION_MINOR);
        out.put_i32_le(self.device_type);
        out.put_i32_le(self.device_id);
        out.put_u8(self.dtype.code);
        out.put_u8(self.dtype.bits);
        out.put_u16_le(self.dtype.lanes);
        out.put_u32_le(ndim as u32);
        out.put_u64_le(self.byte_offset);
        self.shape.iter().for_each(|&d| out.put_i64_le(d));
        self.strides.iter().for_each(|&s| out.put_i64_le(s));
        match (&self.data, uri) {
            (DlData::Inline(b), _) => {
                out.put_u8(0);
                out.put_slice(b);
            }
            (DlData::Uri(_), Some(u)) => {
                out.put_u8(1);
                out.put_u16_le(u.len() as u16);
                out.put_slice(u.as_bytes());
            }
            (DlData::Uri(_), None) => unreachable!("the URI text was made above"),
        }
        Ok(out.freeze())
    }

    /// Reads and validates a body. Inline data is a zero-copy slice of `body`. Errors are
    /// `ERR_MALFORMED` naming the field (`ERR_ATTACHMENT` for a bad URI); no length from the
    /// body is trusted before it has been checked against the bytes that are there.
    pub fn decode(body: Bytes) -> Result<DlpackDescriptor> {
        let mut r = Reader { b: &body, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(Error::malformed(
                Violation::Body,
                format!("dlpack.magic: expected \"DLPK\", got {magic:02x?}"),
            ));
        }
        let major = r.u32("version")?;
        let _minor = r.u32("version")?;
        if major != VERSION_MAJOR {
            return Err(Error::malformed(
                Violation::Body,
                format!("dlpack.version: major {major} not supported (expected 1)"),
            ));
        }
        let device_type = r.i32("device_type")?;
        let device_id = r.i32("device_id")?;
        let code = r.u8("dtype")?;
        let bits = r.u8("dtype")?;
        let lanes = r.u16("dtype")?;
        let ndim = r.u32("ndim")? as usize;
        if ndim > MAX_NDIM {
            return Err(Error::malformed(
                Violation::Body,
                format!("dlpack.ndim: {ndim} exceeds {MAX_NDIM}"),
            ));
        }
        let byte_offset = r.u64("byte_offset")?;
        if ndim * 16 > r.remaining() {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "dlpack.shape: ndim {ndim} needs {} bytes of shape and strides, {} left",
                    ndim * 16,
                    r.remaining()
                ),
            ));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.i64("shape")?);
        }
        let mut strides = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            strides.push(r.i64("strides")?);
        }
        let data = match r.u8("data_kind")? {
            0 => DlData::Inline(body.slice(r.pos..)),
            1 => {
                let len = usize::from(r.u16("uri")?);
                let raw = r.take(len, "uri")?;
                let text = std::str::from_utf8(raw).map_err(|e| {
                    Error::malformed(Violation::Body, format!("dlpack.uri: not UTF-8: {e}"))
                })?;
                let uri = AttachmentUri::parse(text)?;
                if r.remaining() != 0 {
                    return Err(Error::malformed(
                        Violation::Body,
                        format!("dlpack.uri: {} trailing bytes after the URI", r.remaining()),
                    ));
                }
                DlData::Uri(uri)
            }
            k => {
                return Err(Error::malformed(
                    Violation::Body,
                    format!("dlpack.data_kind: {k} (expected 0 inline or 1 URI)"),
                ))
            }
        };
        let d = DlpackDescriptor {
            device_type,
            device_id,
            dtype: DlDataType { code, bits, lanes },
            shape,
            strides,
            byte_offset,
            data,
        };
        d.check()
            .map_err(|d| Error::malformed(Violation::Body, d))?;
        Ok(d)
    }
}

/// A bounds-checked little-endian reader whose errors name the field.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "dlpack.{field}: truncated (need {n} bytes at offset {}, {} left)",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn i32(&mut self, field: &str) -> Result<i32> {
        self.array(field).map(i32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn i64(&mut self, field: &str) -> Result<i64> {
        self.array(field).map(i64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    fn f32_bytes(v: &[f32]) -> Bytes {
        v.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }

    fn sample() -> DlpackDescriptor {
        DlpackDescriptor::cpu(DlDataType::F32, vec![2, 3], f32_bytes(&[0.0; 6])).unwrap()
    }

    /// Patches `body` at `at` with `bytes` and expects `ERR_MALFORMED` mentioning `needle`.
    fn refused(body: &Bytes, at: usize, bytes: &[u8], needle: &str) {
        let mut v = body.to_vec();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        let e = DlpackDescriptor::decode(v.into()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{e}");
        assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
    }

    #[test]
    fn round_trips_inline_and_uri() {
        let d = sample();
        let body = d.encode().unwrap();
        assert_eq!(body.len(), FIXED + 32 + 1 + 24);
        assert_eq!(DlpackDescriptor::decode(body).unwrap(), d);

        let uri = AttachmentUri::shm("xcp-seg", 4096, 24).unwrap();
        let d = DlpackDescriptor {
            device_type: DEVICE_CUDA,
            device_id: 1,
            data: DlData::Uri(uri.clone()),
            ..sample()
        };
        let body = d.encode().unwrap();
        let text = uri.to_string();
        assert_eq!(body.len(), FIXED + 32 + 1 + 2 + text.len());
        assert_eq!(DlpackDescriptor::decode(body).unwrap(), d);
    }

    #[test]
    fn extent_rules() {
        let e =
            |shape: &[i64], strides: &[i64], off| data_extent(DlDataType::F32, shape, strides, off);
        assert_eq!(e(&[2, 3], &[3, 1], 0), Ok(24));
        assert_eq!(e(&[2, 3], &[1, 2], 4), Ok(4 + 24)); // column-major
        assert_eq!(e(&[4], &[0], 0), Ok(4)); // broadcast
        assert_eq!(e(&[0, 5], &[5, 1], 8), Ok(8)); // empty
        assert_eq!(e(&[], &[], 0), Ok(4)); // scalar
        assert!(e(&[2], &[-1], 0).unwrap_err().contains("strides[0]"));
        assert!(e(&[-2], &[1], 0).unwrap_err().contains("shape[0]"));
        assert!(e(&[i64::MAX, 3], &[i64::MAX, 1], 0)
            .unwrap_err()
            .contains("overflow"));
        assert!(e(&[2], &[1], u64::MAX).unwrap_err().contains("overflow"));
        assert!(e(&[2], &[1, 1], 0).unwrap_err().contains("2 strides"));
        assert_eq!(row_major_strides(&[2, 0, 4]), Some(vec![4, 4, 1]));
        assert_eq!(row_major_strides(&[i64::MAX, 2, 2]), None);
    }

    #[test]
    fn refuses_each_bad_field() {
        let body = sample().encode().unwrap();
        refused(&body, 0, b"DLPX", "dlpack.magic");
        refused(&body, 4, &2u32.to_le_bytes(), "dlpack.version");
        refused(&body, 16, &(-1i32).to_le_bytes(), "dlpack.device_id");
        refused(&body, 12, &2i32.to_le_bytes(), "dlpack.device_type");
        refused(&body, 20, &[18], "dlpack.dtype.code");
        refused(&body, 21, &[0], "dlpack.dtype.bits");
        refused(&body, 22, &[0, 0], "dlpack.dtype.lanes");
        refused(&body, 20, &[17, 4, 1, 0], "sub-byte");
        refused(&body, 24, &65u32.to_le_bytes(), "dlpack.ndim");
        refused(&body, 24, &4u32.to_le_bytes(), "needs 64 bytes"); // 57 are left
        refused(&body, 24, &u32::MAX.to_le_bytes(), "dlpack.ndim");
        refused(&body, 36, &(-2i64).to_le_bytes(), "dlpack.shape[0]");
        refused(&body, 52, &(-1i64).to_le_bytes(), "dlpack.strides[0]");
        refused(&body, 52, &4i64.to_le_bytes(), "dlpack.strides"); // addresses 28 > 24 bytes
        refused(&body, 28, &1u64.to_le_bytes(), "dlpack.strides"); // byte_offset pushes out
        refused(&body, 68, &[2], "dlpack.data_kind");
        for n in 0..FIXED + 33 {
            let e = DlpackDescriptor::decode(body.slice(..n)).unwrap_err();
            assert_eq!(e.code(), ErrorCode::ERR_MALFORMED, "{n}: {e}");
        }
        // Inline bytes fewer than the shape needs.
        let e = DlpackDescriptor::decode(body.slice(..body.len() - 1)).unwrap_err();
        assert!(e.to_string().contains("only 23 inline"), "{e}");
    }

    #[test]
    fn ndim_larger_than_the_body_is_refused_before_allocating() {
        let mut v = sample().encode().unwrap().to_vec();
        v.truncate(FIXED);
        v[24..28].copy_from_slice(&64u32.to_le_bytes());
        let e = DlpackDescriptor::decode(v.into()).unwrap_err();
        assert!(e.to_string().contains("needs 1024 bytes"), "{e}");
    }

    #[test]
    fn refuses_bad_uris() {
        let uri_body = |uri: &[u8], extra: &[u8]| {
            let mut v = sample().encode().unwrap().to_vec();
            v.truncate(FIXED + 32);
            v.push(1);
            v.extend_from_slice(&(uri.len() as u16).to_le_bytes());
            v.extend_from_slice(uri);
            v.extend_from_slice(extra);
            DlpackDescriptor::decode(v.into())
        };
        assert!(uri_body(b"shm://a#0,24", b"").is_ok());
        let e = uri_body(b"shm://a#0,24", b"x").unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
        let e = uri_body(b"shm://a#0,23", b"").unwrap_err();
        assert!(e.to_string().contains("the URI names 23"), "{e}");
        let e = uri_body(b"shm://\xff#0,24", b"").unwrap_err();
        assert!(e.to_string().contains("dlpack.uri: not UTF-8"), "{e}");
        let e = uri_body(b"shm://a/b#0,24", b"").unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
        let mut v = sample().encode().unwrap().to_vec();
        v.truncate(FIXED + 32);
        v.extend_from_slice(&[1, 10, 0, b's']);
        let e = DlpackDescriptor::decode(v.into()).unwrap_err();
        assert!(e.to_string().contains("dlpack.uri: truncated"), "{e}");
    }

    #[test]
    fn encode_refuses_bad_descriptors() {
        let mut d = sample();
        d.device_type = DEVICE_CUDA;
        assert!(d.encode().unwrap_err().to_string().contains("host memory"));
        let mut d = sample();
        d.strides = vec![1];
        assert!(d.encode().is_err());
        assert!(DlpackDescriptor::cpu(DlDataType::F32, vec![7], f32_bytes(&[0.0; 6])).is_err());
    }

    fn arb_desc() -> impl Strategy<Value = DlpackDescriptor> {
        let dtype = prop_oneof![
            Just(DlDataType::F32),
            Just(DlDataType::F16),
            Just(DlDataType::U8),
            Just(DlDataType::I64),
            Just(DlDataType::new(5, 64, 1)),
            Just(DlDataType::new(2, 32, 4)),
        ];
        let dims = prop::collection::vec((0i64..4, 0i64..8), 0..5);
        (dtype, dims, 0u64..16, any::<bool>(), 0usize..8).prop_map(
            |(dtype, dims, byte_offset, uri, slack)| {
                let shape: Vec<i64> = dims.iter().map(|d| d.0).collect();
                let strides: Vec<i64> = dims.iter().map(|d| d.1).collect();
                let extent = data_extent(dtype, &shape, &strides, byte_offset).unwrap();
                let len = extent as usize + slack;
                let data = if uri {
                    DlData::Uri(AttachmentUri::memfd(0, 7, len as u64).unwrap())
                } else {
                    DlData::Inline((0..len).map(|i| i as u8).collect::<Vec<u8>>().into())
                };
                DlpackDescriptor {
                    device_type: if uri { DEVICE_CUDA } else { DEVICE_CPU },
                    device_id: 0,
                    dtype,
                    shape,
                    strides,
                    byte_offset,
                    data,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(d in arb_desc()) {
            let body = d.encode().unwrap();
            prop_assert_eq!(DlpackDescriptor::decode(body).unwrap(), d);
        }

        #[test]
        fn arbitrary_bytes_never_panic(v in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = DlpackDescriptor::decode(v.into()) {
                prop_assert!(matches!(e.code(), ErrorCode::ERR_MALFORMED | ErrorCode::ERR_ATTACHMENT));
            }
        }

        #[test]
        fn mutated_bodies_never_panic(d in arb_desc(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
            let mut v = d.encode().unwrap().to_vec();
            let i = at.index(v.len());
            v[i] = b;
            let _ = DlpackDescriptor::decode(v.into());
        }
    }
}
