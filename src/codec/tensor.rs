//! Tensor bodies: TENSOR_F32, TENSOR_F16 and TENSOR_QNT8 (SPEC §5.2).
//!
//! A tensor body is a fixed 32-byte [`TensorHeader`] followed by the elements, contiguous and
//! without padding. [`TensorView::parse`] checks a received body completely without copying
//! it; [`TensorView::as_f32`] and [`TensorView::as_f16`] then borrow the elements in place when
//! the buffer is suitably aligned (the transport reads large payloads into 64-byte-aligned
//! buffers, and the header is 32 bytes, so the elements of a whole-message tensor body are
//! aligned). [`TensorView::to_f32_vec`] always works: it copies, converts F16 and dequantises
//! QNT8.
//!
//! The encoders ([`encode_f32`], [`encode_f16`], [`encode_f16_from_f32`], [`encode_qnt8`])
//! take the shape and the values in storage order and return a complete body; each has an
//! `*_into` form that appends to a caller's `BytesMut`, so a buffer can be reused.
//!
//! ```
//! use xcp::codec::CodecId;
//! use xcp::codec::tensor::{self, DType, TensorView};
//!
//! let body = tensor::encode_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], false)?;
//! assert_eq!(body.len(), 32 + 6 * 4);
//! let view = TensorView::parse(body, Some(CodecId::TENSOR_F32))?;
//! assert_eq!(view.dtype(), DType::F32);
//! assert_eq!(view.shape(), &[2, 3]);
//! assert_eq!(view.to_f32_vec(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//!
//! // Quantised with one scale per row: every value is within half a step (scale / 2).
//! let body = tensor::encode_qnt8(&[2, 2], &[127.0, -64.0, -63.5, 10.6], true, false)?;
//! let view = TensorView::parse(body, Some(CodecId::TENSOR_QNT8))?;
//! let scales: Vec<f32> = view.qnt8_rows().unwrap().map(|(scale, _)| scale).collect();
//! assert_eq!(scales, [1.0, 0.5]);
//! assert_eq!(view.to_f32_vec(), [127.0, -64.0, -63.5, 10.5]);
//! # Ok::<(), xcp::Error>(())
//! ```
//!
//! # Storage order and rows
//!
//! Values are always given and returned in **storage order**: row-major (the last dimension
//! varies fastest) unless `col_major` is set, in which case the first dimension varies
//! fastest. A *row* is a run of elements along the fastest-varying dimension: its length is
//! `shape[ndim - 1]` in row-major order and `shape[0]` in column-major order, and there are as
//! many rows as the product of the other dimensions. With `row_qnt`, each row is preceded by
//! its own little-endian f32 scale, so the data are `rows × (4 + row length)` bytes.
//!
//! # Decisions where the SPEC is silent
//!
//! - A dimension of 0 is allowed: the tensor has no elements (but with `row_qnt` every row
//!   still carries its scale). A shape whose row count exceeds 2^64 (rows of length 0) is
//!   refused, like one whose element count or byte length does.
//! - The header's `scale` is checked (finite, not negative) for QNT8 only; for F32 and F16 it
//!   is written as 1.0 and ignored when read.
//! - The QNT8 encoder uses `scale = max|x| / 127` of the row (or of the whole tensor) and
//!   `q = round(x / scale) + 128`, ties to even; an all-zero row gets scale 1.0 and
//!   `q = 128`, so it decodes to zeros. With `row_qnt` it writes 1.0 as the header's default
//!   scale. Values that are not finite are refused (`Error::Invalid`).
//! - A scale of 0 on the wire is accepted (the row decodes to zeros); a negative, NaN or
//!   infinite scale is `ERR_MALFORMED`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::CodecId;
use crate::error::{Error, ErrorCode, Result, Violation};

/// The length of the fixed tensor header, in bytes.
pub const HEADER_LEN: usize = 32;

/// The largest `ndim` (SPEC §5.2: the layout leaves room for six u32 dimensions).
pub const MAX_NDIM: usize = 6;

/// `flags` bit 0: every row carries its own f32 scale (QNT8 only).
const FLAG_ROW_QNT: u8 = 0x01;
/// `flags` bit 1: column-major storage order.
const FLAG_COL_MAJOR: u8 = 0x02;
/// Elements converted per step through a stack buffer that stays in L1.
const CHUNK: usize = 2048;

/// The element type of a tensor body: the header's `dtype` byte, and the tensor codec that
/// carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32, 4 bytes an element: `dtype` 0, TENSOR_F32.
    F32,
    /// IEEE 754 binary16, 2 bytes an element: `dtype` 1, TENSOR_F16.
    F16,
    /// One byte an element, `real = (q − 128) · scale`: `dtype` 2, TENSOR_QNT8.
    Qnt8,
}

impl DType {
    /// Every dtype, in `dtype` byte order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::Qnt8];

    /// The header's `dtype` byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Qnt8 => 2,
        }
    }

    /// The dtype of a header byte, or `None` for an unknown value.
    pub const fn from_byte(b: u8) -> Option<DType> {
        match b {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::Qnt8),
            _ => None,
        }
    }

    /// The tensor codec of this dtype.
    pub const fn codec(self) -> CodecId {
        match self {
            DType::F32 => CodecId::TENSOR_F32,
            DType::F16 => CodecId::TENSOR_F16,
            DType::Qnt8 => CodecId::TENSOR_QNT8,
        }
    }

    /// The dtype a tensor codec carries, or `None` when `codec` is not a tensor codec.
    pub const fn from_codec(codec: CodecId) -> Option<DType> {
        match codec.0 {
            0x0002 => Some(DType::F32),
            0x0003 => Some(DType::F16),
            0x0004 => Some(DType::Qnt8),
            _ => None,
        }
    }

    /// Bytes per element (not counting QNT8 row scales).
    pub const fn elem_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::Qnt8 => 1,
        }
    }

    /// A short lower-case name: `f32`, `f16` or `qnt8`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Qnt8 => "qnt8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a scale read from the wire is usable: finite and not negative (0 is allowed).
fn scale_ok(s: f32) -> bool {
    s.is_finite() && s >= 0.0
}

/// Product of `dims`, or `None` on u64 overflow. Any zero dimension makes it 0, whatever the
/// order of the others.
fn product(dims: &[u32]) -> Option<u64> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::from(d)))
}

/// The 32-byte header of a tensor body (SPEC §5.2).
///
/// [`TensorHeader::parse`] reads and checks one; [`TensorHeader::new`] starts one for an
/// encoder. The fields are public so a caller can set `row_qnt`, `col_major` or `scale`;
/// [`TensorHeader::validate`] checks a header built by hand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorHeader {
    /// Number of dimensions, 1..=6.
    pub ndim: u8,
    /// Element type.
    pub dtype: DType,
    /// `flags` bit 0: each row is preceded by its own f32 scale (QNT8 only).
    pub row_qnt: bool,
    /// `flags` bit 1: column-major storage (the first dimension varies fastest).
    pub col_major: bool,
    /// The dimensions; entries at `ndim` and above are 0.
    pub shape: [u32; MAX_NDIM],
    /// QNT8: the global scale (with `row_qnt`, a default only). 1.0 for F32 and F16.
    pub scale: f32,
}

impl TensorHeader {
    /// A row-major header of this dtype and shape, with scale 1.0 and no flags. Fails with
    /// `Error::Invalid` when the shape has no dimension or more than six, or is so large that
    /// its byte length overflows u64.
    pub fn new(dtype: DType, shape: &[u32]) -> Result<TensorHeader> {
        if shape.is_empty() || shape.len() > MAX_NDIM {
            return Err(Error::invalid(format!(
                "tensor shape {shape:?}: {} dimensions, must be 1..=6",
                shape.len()
            )));
        }
        let mut dims = [0; MAX_NDIM];
        dims[..shape.len()].copy_from_slice(shape);
        let h = TensorHeader {
            ndim: shape.len() as u8,
            dtype,
            row_qnt: false,
            col_major: false,
            shape: dims,
            scale: 1.0,
        };
        h.check().map_err(Error::invalid)?;
        Ok(h)
    }

    /// Reads and checks the header at the start of `body` (which may hold more bytes: only the
    /// first 32 are read). Every violation of SPEC §5.2 is `ERR_MALFORMED` naming the field.
    /// This does not check the body's length against the shape; [`TensorView::parse`] does.
    pub fn parse(body: &[u8]) -> Result<TensorHeader> {
        let Some(b) = body.get(..HEADER_LEN) else {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "tensor.header: {} bytes, shorter than the {HEADER_LEN}-byte header",
                    body.len()
                ),
            ));
        };
        let ndim = b[0];
        if ndim == 0 || usize::from(ndim) > MAX_NDIM {
            return Err(Error::malformed(
                Violation::Body,
                format!("tensor.ndim: {ndim} not in 1..={MAX_NDIM}"),
            ));
        }
        let dtype = DType::from_byte(b[1]).ok_or_else(|| {
            Error::malformed(
                Violation::Body,
                format!(
                    "tensor.dtype: {} unknown (0 = F32, 1 = F16, 2 = QNT8)",
                    b[1]
                ),
            )
        })?;
        let flags = b[2];
        let reserved = flags & !(FLAG_ROW_QNT | FLAG_COL_MAJOR);
        if reserved != 0 {
            return Err(Error::malformed(
                Violation::Body,
                format!("tensor.flags: reserved bits 0x{reserved:02X} set (flags 0x{flags:02X})"),
            ));
        }
        if b[3] != 0 {
            return Err(Error::malformed(
                Violation::Body,
                format!("tensor.reserved: byte 3 is 0x{:02X}, must be 0", b[3]),
            ));
        }
        let mut shape = [0u32; MAX_NDIM];
        for (i, d) in shape.iter_mut().enumerate() {
            let o = 4 + 4 * i;
            *d = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        }
        let h = TensorHeader {
            ndim,
            dtype,
            row_qnt: flags & FLAG_ROW_QNT != 0,
            col_major: flags & FLAG_COL_MAJOR != 0,
            shape,
            scale: f32::from_le_bytes([b[28], b[29], b[30], b[31]]),
        };
        h.check()
            .map_err(|d| Error::malformed(Violation::Body, d))?;
        Ok(h)
    }

    /// Checks a header built by hand against SPEC §5.2 (`ndim` range, unused dims zero,
    /// `row_qnt` only on QNT8, the QNT8 scale finite and not negative, sizes within u64).
    /// Failures are `ERR_MALFORMED`, as for a received header.
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|d| Error::malformed(Violation::Body, d))
    }

    /// The checks of [`TensorHeader::validate`], returning the detail text.
    fn check(&self) -> std::result::Result<(), String> {
        let ndim = usize::from(self.ndim);
        if ndim == 0 || ndim > MAX_NDIM {
            return Err(format!("tensor.ndim: {ndim} not in 1..={MAX_NDIM}"));
        }
        if let Some(i) = (ndim..MAX_NDIM).find(|&i| self.shape[i] != 0) {
            return Err(format!(
                "tensor.shape[{i}]: {} in an unused dimension (ndim {ndim}), must be 0",
                self.shape[i]
            ));
        }
        if self.row_qnt && self.dtype != DType::Qnt8 {
            return Err(format!(
                "tensor.flags: row_qnt set on a {} tensor (QNT8 only)",
                self.dtype
            ));
        }
        if self.dtype == DType::Qnt8 && !scale_ok(self.scale) {
            return Err(format!(
                "tensor.scale: {} is not a finite, non-negative QNT8 scale",
                self.scale
            ));
        }
        self.sizes().map(|_| ())
    }

    /// The dimensions in use: `shape[..ndim]`.
    pub fn shape(&self) -> &[u32] {
        &self.shape[..usize::from(self.ndim).min(MAX_NDIM)]
    }

    /// The number of elements N = ∏ shape, or `ERR_MALFORMED` when it overflows u64.
    pub fn numel(&self) -> Result<u64> {
        product(self.shape()).ok_or_else(|| {
            Error::malformed(
                Violation::Body,
                format!(
                    "tensor.shape: {:?} has more than 2^64 elements",
                    self.shape()
                ),
            )
        })
    }

    /// The length of one row: the fastest-varying dimension in storage order
    /// (`shape[ndim - 1]`, or `shape[0]` when `col_major`).
    pub fn row_len(&self) -> u64 {
        let s = self.shape();
        let d = if self.col_major { s.first() } else { s.last() };
        d.map_or(0, |&d| u64::from(d))
    }

    /// The number of rows: the product of every dimension but the row's. `ERR_MALFORMED` when
    /// it overflows u64.
    pub fn rows(&self) -> Result<u64> {
        let s = self.shape();
        let others = match s.len() {
            0 => s,
            n if self.col_major => &s[1..n],
            n => &s[..n - 1],
        };
        product(others).ok_or_else(|| {
            Error::malformed(
                Violation::Body,
                format!("tensor.shape: {:?} has more than 2^64 rows", self.shape()),
            )
        })
    }

    /// The number of data bytes after the header: `4·N` (F32), `2·N` (F16), `N` (QNT8), plus
    /// four per row with `row_qnt`. `ERR_MALFORMED` when it overflows u64.
    pub fn data_len(&self) -> Result<u64> {
        self.sizes()
            .map(|(_, len)| len)
            .map_err(|d| Error::malformed(Violation::Body, d))
    }

    /// The whole body length the header describes: [`HEADER_LEN`] + [`Self::data_len`].
    pub fn body_len(&self) -> Result<u64> {
        let len = self.data_len()?;
        len.checked_add(HEADER_LEN as u64).ok_or_else(|| {
            Error::malformed(
                Violation::Body,
                format!(
                    "tensor.shape: {:?} needs more than 2^64 bytes",
                    self.shape()
                ),
            )
        })
    }

    /// (element count, data length), with u64 overflow reported by field.
    fn sizes(&self) -> std::result::Result<(u64, u64), String> {
        let shape = self.shape();
        let n = product(shape)
            .ok_or_else(|| format!("tensor.shape: {shape:?} has more than 2^64 elements"))?;
        let rows = self
            .rows()
            .map_err(|_| format!("tensor.shape: {shape:?} has more than 2^64 rows"))?;
        let len = match self.dtype {
            DType::F32 => n.checked_mul(4),
            DType::F16 => n.checked_mul(2),
            DType::Qnt8 if self.row_qnt => rows.checked_mul(4).and_then(|s| s.checked_add(n)),
            DType::Qnt8 => Some(n),
        };
        let len = len.ok_or_else(|| {
            format!(
                "tensor.shape: {shape:?} {} needs more than 2^64 bytes",
                self.dtype
            )
        })?;
        Ok((n, len))
    }

    /// The `flags` byte.
    pub fn flags(&self) -> u8 {
        (if self.row_qnt { FLAG_ROW_QNT } else { 0 })
            | (if self.col_major { FLAG_COL_MAJOR } else { 0 })
    }

    /// Appends the 32 header bytes to `out`, the fields exactly as they are (call
    /// [`TensorHeader::validate`] first for a header built by hand).
    pub fn write(&self, out: &mut impl BufMut) {
        out.put_slice(&self.to_bytes());
    }

    /// The 32 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.ndim;
        b[1] = self.dtype.to_byte();
        b[2] = self.flags();
        for (i, d) in self.shape.iter().enumerate() {
            b[4 + 4 * i..8 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        b[28..32].copy_from_slice(&self.scale.to_le_bytes());
        b
    }
}

/// A checked tensor body that borrows the received bytes (a ref-counted [`Bytes`] slice; no
/// copy is made).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorView {
    header: TensorHeader,
    body: Bytes,
}

impl TensorView {
    /// Checks a complete tensor body without copying it: the header (see
    /// [`TensorHeader::parse`]), the dtype against `expected` (the frame's `bodyCodec`, when
    /// known), the body length against the shape in both directions, and every QNT8 row
    /// scale. Violations are `ERR_MALFORMED` naming the field; an `expected` codec that is not
    /// a tensor codec is `ERR_CODEC_UNSUPPORTED`.
    pub fn parse(body: Bytes, expected: Option<CodecId>) -> Result<TensorView> {
        let expected = match expected {
            None => None,
            Some(codec) => Some(DType::from_codec(codec).ok_or_else(|| {
                Error::protocol(
                    Violation::Body,
                    ErrorCode::ERR_CODEC_UNSUPPORTED,
                    format!("bodyCodec {codec} is not a tensor codec"),
                )
            })?),
        };
        let header = TensorHeader::parse(&body)?;
        if let Some(want) = expected {
            if header.dtype != want {
                return Err(Error::malformed(
                    Violation::Body,
                    format!(
                        "tensor.dtype: {} ({}) disagrees with bodyCodec {}",
                        header.dtype.to_byte(),
                        header.dtype,
                        want.codec()
                    ),
                ));
            }
        }
        let have = (body.len() - HEADER_LEN) as u64;
        let need = header.data_len()?;
        if have != need {
            return Err(Error::malformed(
                Violation::Body,
                format!(
                    "tensor.body: {have} data bytes, but shape {:?} {}{} needs {need}",
                    header.shape(),
                    header.dtype,
                    if header.row_qnt { " row_qnt" } else { "" },
                ),
            ));
        }
        let view = TensorView { header, body };
        if header.row_qnt {
            let rows = view.qnt8_rows().into_iter().flatten();
            if let Some((i, (s, _))) = rows.enumerate().find(|(_, (s, _))| !scale_ok(*s)) {
                return Err(Error::malformed(
                    Violation::Body,
                    format!("tensor.row[{i}].scale: {s} is not a finite, non-negative scale"),
                ));
            }
        }
        Ok(view)
    }

    /// The header.
    pub fn header(&self) -> &TensorHeader {
        &self.header
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.header.dtype
    }

    /// The tensor codec of this body.
    pub fn codec(&self) -> CodecId {
        self.header.dtype.codec()
    }

    /// The dimensions in use.
    pub fn shape(&self) -> &[u32] {
        self.header.shape()
    }

    /// The number of elements (it fits in memory: the body holds them).
    pub fn numel(&self) -> usize {
        // Checked by `parse`: the body holds at least one byte per element.
        product(self.shape()).unwrap_or(0) as usize
    }

    /// The whole body, header included.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Gives back the whole body, header included.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// The data bytes after the header (with `row_qnt`, row scales included).
    pub fn data(&self) -> &[u8] {
        &self.body[HEADER_LEN..]
    }

    /// The F32 elements in place, in storage order, or `None` when this is not an F32 tensor,
    /// the data are not 4-byte aligned, or the host is big-endian. [`Self::to_f32_vec`]
    /// always works.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.header.dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.data()).ok()
    }

    /// The F16 elements in place, in storage order, or `None` when this is not an F16 tensor,
    /// the data are not 2-byte aligned, or the host is big-endian.
    pub fn as_f16(&self) -> Option<&[f16]> {
        if self.header.dtype != DType::F16 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.data()).ok()
    }

    /// The QNT8 rows as `(scale, quantised bytes)`, in storage order, or `None` when this is
    /// not a QNT8 tensor. Without `row_qnt`, every row has the header's scale.
    pub fn qnt8_rows(&self) -> Option<Qnt8Rows<'_>> {
        if self.header.dtype != DType::Qnt8 {
            return None;
        }
        Some(Qnt8Rows {
            data: self.data(),
            row_len: self.header.row_len() as usize,
            remaining: self.header.rows().unwrap_or(0),
            row_qnt: self.header.row_qnt,
            scale: self.header.scale,
        })
    }

    /// The values as f32, in storage order: a copy for F32 (also when unaligned), a
    /// conversion for F16, `(q − 128) · scale` for QNT8.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let data = self.data();
        match self.header.dtype {
            DType::F32 => match self.as_f32() {
                Some(v) => v.to_vec(),
                None => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            },
            DType::F16 => {
                let mut out = vec![0.0f32; data.len() / 2];
                match self.as_f16() {
                    Some(h) => h.convert_to_f32_slice(&mut out),
                    None => {
                        let mut buf = [f16::ZERO; CHUNK];
                        for (dst, src) in out.chunks_mut(CHUNK).zip(data.chunks(2 * CHUNK)) {
                            let buf = &mut buf[..dst.len()];
                            for (h, c) in buf.iter_mut().zip(src.chunks_exact(2)) {
                                *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                            }
                            buf.convert_to_f32_slice(dst);
                        }
                    }
                }
                out
            }
            DType::Qnt8 if !self.header.row_qnt => {
                let scale = self.header.scale;
                data.iter().map(|&q| dequantise(q, scale)).collect()
            }
            DType::Qnt8 => {
                let mut out = Vec::with_capacity(self.numel());
                for (scale, q) in self.qnt8_rows().into_iter().flatten() {
                    out.extend(q.iter().map(|&q| dequantise(q, scale)));
                }
                out
            }
        }
    }
}

/// `real = (q − 128) · scale`.
#[inline]
fn dequantise(q: u8, scale: f32) -> f32 {
    (f32::from(q) - 128.0) * scale
}

/// The rows of a QNT8 tensor as `(scale, quantised bytes)`: see [`TensorView::qnt8_rows`].
#[derive(Clone, Debug)]
pub struct Qnt8Rows<'a> {
    data: &'a [u8],
    row_len: usize,
    remaining: u64,
    row_qnt: bool,
    scale: f32,
}

impl<'a> Iterator for Qnt8Rows<'a> {
    type Item = (f32, &'a [u8]);

    fn next(&mut self) -> Option<(f32, &'a [u8])> {
        if self.remaining == 0 {
            return None;
        }
        let mut scale = self.scale;
        if self.row_qnt {
            let (s, rest) = self.data.split_first_chunk::<4>()?;
            scale = f32::from_le_bytes(*s);
            self.data = rest;
        }
        let (row, rest) = self.data.split_at_checked(self.row_len)?;
        self.data = rest;
        self.remaining -= 1;
        Some((scale, row))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        (0, Some(n))
    }
}

/// Builds the header of an encoder's output, checks the value count, and reserves the body's
/// length in `out`.
fn start(
    dtype: DType,
    shape: &[u32],
    values: usize,
    col_major: bool,
    row_qnt: bool,
    out: &mut BytesMut,
) -> Result<TensorHeader> {
    let mut h = TensorHeader::new(dtype, shape)?;
    h.col_major = col_major;
    h.row_qnt = row_qnt;
    let (n, len) = h.sizes().map_err(Error::invalid)?;
    if n != values as u64 {
        return Err(Error::invalid(format!(
            "tensor shape {shape:?} holds {n} elements, but {values} values were given"
        )));
    }
    let len = len
        .checked_add(HEADER_LEN as u64)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| Error::invalid(format!("tensor shape {shape:?}: body too large")))?;
    out.reserve(len);
    Ok(h)
}

/// Runs an `*_into` encoder on a fresh buffer of exactly the body's size.
fn fresh(encode: impl FnOnce(&mut BytesMut) -> Result<()>) -> Result<Bytes> {
    let mut out = BytesMut::new();
    encode(&mut out)?;
    Ok(out.freeze())
}

/// Encodes a TENSOR_F32 body. `values` are in storage order (column-major when `col_major`);
/// their count must be the product of `shape`, which has 1..=6 dimensions (else
/// `Error::Invalid`).
pub fn encode_f32(shape: &[u32], values: &[f32], col_major: bool) -> Result<Bytes> {
    fresh(|out| encode_f32_into(shape, values, col_major, out))
}

/// [`encode_f32`], appending the body to `out` (so a caller can reuse one buffer). On error
/// nothing is appended.
pub fn encode_f32_into(
    shape: &[u32],
    values: &[f32],
    col_major: bool,
    out: &mut BytesMut,
) -> Result<()> {
    let h = start(DType::F32, shape, values.len(), col_major, false, out)?;
    h.write(out);
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for &v in values {
            out.put_f32_le(v);
        }
    }
    Ok(())
}

/// Appends F16 values in little-endian order.
fn put_f16s(out: &mut BytesMut, values: &[f16]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for v in values {
            out.put_u16_le(v.to_bits());
        }
    }
}

/// Encodes a TENSOR_F16 body from F16 values (see [`encode_f32`] for the rules).
pub fn encode_f16(shape: &[u32], values: &[f16], col_major: bool) -> Result<Bytes> {
    fresh(|out| encode_f16_into(shape, values, col_major, out))
}

/// [`encode_f16`], appending the body to `out`. On error nothing is appended.
pub fn encode_f16_into(
    shape: &[u32],
    values: &[f16],
    col_major: bool,
    out: &mut BytesMut,
) -> Result<()> {
    let h = start(DType::F16, shape, values.len(), col_major, false, out)?;
    h.write(out);
    put_f16s(out, values);
    Ok(())
}

/// Encodes a TENSOR_F16 body from F32 values, converting with `half`'s vectorised slice
/// routine (F16C on x86-64 when the CPU has it). Rounds to nearest even; values beyond the F16
/// range become infinities (see [`encode_f32`] for the other rules).
pub fn encode_f16_from_f32(shape: &[u32], values: &[f32], col_major: bool) -> Result<Bytes> {
    fresh(|out| encode_f16_from_f32_into(shape, values, col_major, out))
}

/// [`encode_f16_from_f32`], appending the body to `out`. On error nothing is appended.
pub fn encode_f16_from_f32_into(
    shape: &[u32],
    values: &[f32],
    col_major: bool,
    out: &mut BytesMut,
) -> Result<()> {
    let h = start(DType::F16, shape, values.len(), col_major, false, out)?;
    h.write(out);
    let mut buf = [f16::ZERO; CHUNK];
    for chunk in values.chunks(CHUNK) {
        let buf = &mut buf[..chunk.len()];
        buf.convert_from_f32_slice(chunk);
        put_f16s(out, buf);
    }
    Ok(())
}

/// Encodes a TENSOR_QNT8 body: with `row_qnt`, every row (see the module docs) gets its own
/// scale `max|x| / 127`; otherwise one scale for the whole tensor goes in the header. Each
/// element becomes `q = round(x / scale) + 128` (ties to even), so it decodes within half a
/// step (`scale / 2`) of `x`. An all-zero row gets scale 1.0. A value that is NaN or infinite
/// is `Error::Invalid`, as are the rules of [`encode_f32`].
pub fn encode_qnt8(shape: &[u32], values: &[f32], row_qnt: bool, col_major: bool) -> Result<Bytes> {
    fresh(|out| encode_qnt8_into(shape, values, row_qnt, col_major, out))
}

/// [`encode_qnt8`], appending the body to `out`. On error nothing is appended.
pub fn encode_qnt8_into(
    shape: &[u32],
    values: &[f32],
    row_qnt: bool,
    col_major: bool,
    out: &mut BytesMut,
) -> Result<()> {
    let mut h = start(DType::Qnt8, shape, values.len(), col_major, row_qnt, out)?;
    if !row_qnt {
        let max = max_abs(values)
            .ok_or_else(|| Error::invalid("tensor values: NaN or infinite value in QNT8 input"))?;
        let (scale, quant) = Quantiser::new(max);
        h.scale = scale;
        h.write(out);
        quant.put(out, values);
        return Ok(());
    }
    let row_len = h.row_len() as usize;
    if row_len == 0 {
        // Rows of no elements: each still carries a scale (1.0, as for an all-zero row).
        let rows = h.rows().map_err(|e| Error::invalid(detail(&e)))?;
        h.write(out);
        for _ in 0..rows {
            out.put_f32_le(1.0);
        }
        return Ok(());
    }
    let start = out.len();
    h.write(out);
    for (i, row) in values.chunks_exact(row_len).enumerate() {
        let Some(max) = max_abs(row) else {
            out.truncate(start);
            return Err(Error::invalid(format!(
                "tensor values: NaN or infinite value in QNT8 row {i}"
            )));
        };
        let (scale, quant) = Quantiser::new(max);
        out.put_f32_le(scale);
        quant.put(out, row);
    }
    Ok(())
}

/// max |x| over `values`, or `None` when one is NaN or infinite. Works on the bits: for
/// non-negative floats the integer order is the float order, and it vectorises.
fn max_abs(values: &[f32]) -> Option<f32> {
    let m = values
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
    (m < 0x7F80_0000).then(|| f32::from_bits(m))
}

/// 1.5 · 2^23: added to a float in [0, 2^22), it leaves the value rounded to an integer (ties
/// to even) in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// How one row (or tensor) is quantised.
enum Quantiser {
    /// All zero: every byte is 128.
    Zero,
    /// The usual case: `x · inv` lies in [−127, 127] (up to rounding), so `x · inv + 128` is in
    /// [1, 255] and the magic-number addition rounds it without a conversion instruction; this
    /// vectorises (about 5× faster than `as u8`).
    Fast {
        /// 1 / scale.
        inv: f32,
    },
    /// The scale is subnormal and its inverse would overflow: divide in f64.
    Tiny {
        /// The scale as stored.
        scale: f64,
    },
}

impl Quantiser {
    /// The scale to store for a row whose largest magnitude is `max`, and how to quantise it.
    fn new(max: f32) -> (f32, Quantiser) {
        if max == 0.0 {
            return (1.0, Quantiser::Zero);
        }
        let scale = max / 127.0;
        if scale.is_normal() {
            return (scale, Quantiser::Fast { inv: 1.0 / scale });
        }
        let mut scale = (f64::from(max) / 127.0) as f32;
        if scale == 0.0 {
            scale = f32::from_bits(1);
        }
        (
            scale,
            Quantiser::Tiny {
                scale: f64::from(scale),
            },
        )
    }

    /// Appends one quantised byte per value.
    fn put(&self, out: &mut BytesMut, values: &[f32]) {
        match *self {
            Quantiser::Zero => out.put_bytes(128, values.len()),
            Quantiser::Fast { inv } => put_mapped(out, values, |x| {
                (x * inv + (128.0 + ROUND_MAGIC)).to_bits() as u8
            }),
            Quantiser::Tiny { scale } => put_mapped(out, values, |x| {
                ((f64::from(x) / scale).round_ties_even() + 128.0).clamp(0.0, 255.0) as u8
            }),
        }
    }
}

/// Appends `f(x)` for every value, through a stack buffer so the loop vectorises.
#[inline]
fn put_mapped(out: &mut BytesMut, values: &[f32], f: impl Fn(f32) -> u8) {
    let mut buf = [0u8; CHUNK];
    for chunk in values.chunks(CHUNK) {
        let buf = &mut buf[..chunk.len()];
        for (b, &x) in buf.iter_mut().zip(chunk) {
            *b = f(x);
        }
        out.extend_from_slice(buf);
    }
}

/// The detail text of an error, without the code prefix that `Display` adds.
pub(crate) fn detail(e: &Error) -> String {
    match e {
        Error::Protocol { detail, .. } | Error::Incompatible { detail, .. } => detail.clone(),
        Error::Invalid(detail) => detail.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A header as bytes: ndim, dtype, flags, byte 3, shape, scale.
    fn raw_header(ndim: u8, dtype: u8, flags: u8, b3: u8, shape: [u32; 6], scale: f32) -> Vec<u8> {
        let mut b = vec![ndim, dtype, flags, b3];
        for d in shape {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&scale.to_le_bytes());
        b
    }

    fn malformed(body: Vec<u8>, codec: Option<CodecId>, field: &str) {
        let err = TensorView::parse(Bytes::from(body), codec).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ERR_MALFORMED, "{err}");
        assert!(
            detail(&err).starts_with(field),
            "expected an error naming {field}, got: {err}"
        );
    }

    /// A body in a fresh buffer at an odd address, so the elements are misaligned.
    fn misaligned(body: &Bytes) -> Bytes {
        let mut v = Vec::with_capacity(body.len() + 1);
        v.push(0u8);
        v.extend_from_slice(body);
        Bytes::from(v).slice(1..)
    }

    #[test]
    fn dtype_mapping() {
        for d in DType::ALL {
            assert_eq!(DType::from_byte(d.to_byte()), Some(d));
            assert_eq!(DType::from_codec(d.codec()), Some(d));
        }
        assert_eq!(DType::from_byte(3), None);
        assert_eq!(DType::from_codec(CodecId::JSON), None);
        assert_eq!(DType::F16.codec(), CodecId::TENSOR_F16);
        assert_eq!(DType::Qnt8.to_string(), "qnt8");
    }

    #[test]
    fn header_round_trip() {
        let mut h = TensorHeader::new(DType::Qnt8, &[3, 4, 5]).unwrap();
        h.row_qnt = true;
        h.col_major = true;
        h.scale = 0.25;
        let b = h.to_bytes();
        assert_eq!(b[..4], [3, 2, 3, 0]);
        assert_eq!(TensorHeader::parse(&b).unwrap(), h);
        assert_eq!(h.numel().unwrap(), 60);
        assert_eq!(h.row_len(), 3); // column-major: the first dimension
        assert_eq!(h.rows().unwrap(), 20);
        assert_eq!(h.data_len().unwrap(), 60 + 4 * 20);
        assert_eq!(h.body_len().unwrap(), 32 + 140);
        h.col_major = false;
        assert_eq!(h.row_len(), 5);
        assert_eq!(h.rows().unwrap(), 12);
    }

    #[test]
    fn encode_errors_are_invalid() {
        for r in [
            encode_f32(&[], &[], false),
            encode_f32(&[1; 7], &[0.0], false),
            encode_f32(&[2, 3], &[0.0; 5], false),
            encode_f16_from_f32(&[4], &[0.0; 3], false),
            encode_qnt8(&[2], &[1.0, f32::NAN], false, false),
            encode_qnt8(&[1, 2], &[1.0, f32::INFINITY], true, false),
            encode_f32(&[u32::MAX; 6], &[], false),
        ] {
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        }
    }

    #[test]
    fn zero_dims() {
        let b = encode_f32(&[2, 0, 3], &[], false).unwrap();
        assert_eq!(b.len(), 32);
        let v = TensorView::parse(b, None).unwrap();
        assert_eq!(v.numel(), 0);
        assert_eq!(v.to_f32_vec(), Vec::<f32>::new());
        // Row-quantised with rows of length 0: three rows, each with its scale.
        let b = encode_qnt8(&[3, 0], &[], true, false).unwrap();
        assert_eq!(b.len(), 32 + 3 * 4);
        let v = TensorView::parse(b, Some(CodecId::TENSOR_QNT8)).unwrap();
        assert_eq!(v.qnt8_rows().unwrap().count(), 3);
        // A huge dimension beside a zero one is still an empty tensor.
        let b = encode_f16_from_f32(&[u32::MAX, u32::MAX, 0, u32::MAX], &[], false).unwrap();
        assert_eq!(TensorView::parse(b, None).unwrap().numel(), 0);
        // But more than 2^64 rows (of length 0) is refused, even without elements.
        let r = encode_f16_from_f32(&[u32::MAX, u32::MAX, u32::MAX, 0], &[], false);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        let b = raw_header(4, 1, 0, 0, [u32::MAX, u32::MAX, u32::MAX, 0, 0, 0], 1.0);
        malformed(b, None, "tensor.shape");
    }

    #[test]
    fn qnt8_zero_row_and_tiny_values() {
        let b = encode_qnt8(&[2, 3], &[0.0, 0.0, -0.0, 1.0, -2.0, 0.5], true, false).unwrap();
        let v = TensorView::parse(b, None).unwrap();
        let rows: Vec<(f32, Vec<u8>)> = v
            .qnt8_rows()
            .unwrap()
            .map(|(s, q)| (s, q.to_vec()))
            .collect();
        assert_eq!(rows[0], (1.0, vec![128, 128, 128]));
        assert_eq!(rows[1].0, 2.0 / 127.0);
        assert_eq!(v.to_f32_vec()[..3], [0.0, 0.0, 0.0]);
        // Subnormal magnitudes take the slow path and still decode close by.
        let tiny = [f32::from_bits(1), -f32::from_bits(300), 1e-40];
        let b = encode_qnt8(&[3], &tiny, false, false).unwrap();
        let v = TensorView::parse(b, None).unwrap();
        let s = v.header().scale;
        assert!(s > 0.0);
        for (x, y) in tiny.iter().zip(v.to_f32_vec()) {
            assert!((x - y).abs() <= s * 0.5 + f32::from_bits(1), "{x} {y} {s}");
        }
    }

    #[test]
    fn qnt8_rounds_ties_to_even_and_saturates_nothing() {
        let b = encode_qnt8(&[6], &[127.0, 0.5, 1.5, -0.5, -2.5, -127.0], false, false).unwrap();
        let v = TensorView::parse(b, None).unwrap();
        assert_eq!(v.header().scale, 1.0);
        assert_eq!(v.data(), [255, 128, 130, 128, 126, 1]);
        let big = [f32::MAX, -f32::MAX, 1.0];
        let b = encode_qnt8(&[3], &big, false, false).unwrap();
        let v = TensorView::parse(b, None).unwrap();
        assert_eq!(v.data()[..2], [255, 1]);
    }

    #[test]
    fn into_appends_and_leaves_nothing_on_error() {
        let mut out = BytesMut::from(&b"xy"[..]);
        encode_f32_into(&[1], &[2.0], false, &mut out).unwrap();
        encode_f16_into(&[1], &[f16::ONE], false, &mut out).unwrap();
        encode_f16_from_f32_into(&[1], &[1.0], false, &mut out).unwrap();
        encode_qnt8_into(&[1], &[1.0], true, false, &mut out).unwrap();
        assert_eq!(out.len(), 2 + 36 + 34 + 34 + 37);
        assert_eq!(&out[2..38], &encode_f32(&[1], &[2.0], false).unwrap()[..]);
        let len = out.len();
        let bad = [1.0, 2.0, 3.0, f32::NAN];
        assert!(encode_qnt8_into(&[2, 2], &bad, true, false, &mut out).is_err());
        assert!(encode_qnt8_into(&[4], &bad, false, false, &mut out).is_err());
        assert!(encode_f32_into(&[5], &bad, false, &mut out).is_err());
        assert_eq!(out.len(), len);
    }

    #[test]
    fn views_in_place_and_unaligned() {
        let vals = [1.5f32, -2.25, 3.0, 1e-3];
        let b = encode_f32(&[4], &vals, false).unwrap();
        // A Vec<u8> allocation is at least 4-byte aligned on every allocator we build for.
        let v = TensorView::parse(b.clone(), None).unwrap();
        if (v.data().as_ptr() as usize).is_multiple_of(4) {
            assert_eq!(v.as_f32().unwrap(), &vals);
        }
        let u = TensorView::parse(misaligned(&b), None).unwrap();
        assert_eq!(u.as_f32(), None);
        assert_eq!(u.to_f32_vec(), vals);
        assert_eq!(u.as_f16(), None);
        assert!(u.qnt8_rows().is_none());

        let b = encode_f16_from_f32(&[2, 2], &vals, false).unwrap();
        let want: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let v = TensorView::parse(b.clone(), None).unwrap();
        if (v.data().as_ptr() as usize).is_multiple_of(2) {
            assert_eq!(v.as_f16().unwrap()[1], f16::from_f32(-2.25));
        }
        assert_eq!(v.to_f32_vec(), want);
        let u = TensorView::parse(misaligned(&b), None).unwrap();
        assert_eq!(u.as_f16(), None);
        assert_eq!(u.to_f32_vec(), want);
    }

    #[test]
    fn f16_encoders_agree_and_span_chunks() {
        let vals: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.37).collect();
        let halves: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
        let a = encode_f16_from_f32(&[50, 100], &vals, true).unwrap();
        let b = encode_f16(&[50, 100], &halves, true).unwrap();
        assert_eq!(a, b);
        let v = TensorView::parse(a, None).unwrap();
        assert!(v.header().col_major);
        let got = v.to_f32_vec();
        let want: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_headers() {
        let z = [0u32; 6];
        let s23 = [2, 3, 0, 0, 0, 0];
        let f32_body = |h: Vec<u8>, n: usize| {
            let mut b = h;
            b.resize(b.len() + n, 0);
            b
        };
        malformed(vec![1, 0, 0], None, "tensor.header");
        malformed(vec![], None, "tensor.header");
        malformed(raw_header(0, 0, 0, 0, z, 1.0), None, "tensor.ndim");
        malformed(raw_header(7, 0, 0, 0, [1; 6], 1.0), None, "tensor.ndim");
        malformed(raw_header(2, 3, 0, 0, s23, 1.0), None, "tensor.dtype");
        malformed(raw_header(2, 255, 0, 0, s23, 1.0), None, "tensor.dtype");
        malformed(
            f32_body(raw_header(2, 1, 0, 0, s23, 1.0), 12),
            Some(CodecId::TENSOR_F32),
            "tensor.dtype",
        );
        malformed(
            f32_body(raw_header(2, 0, 0, 0, s23, 1.0), 24),
            Some(CodecId::TENSOR_QNT8),
            "tensor.dtype",
        );
        malformed(raw_header(2, 0, 0x04, 0, s23, 1.0), None, "tensor.flags");
        malformed(raw_header(2, 0, 0x80, 0, s23, 1.0), None, "tensor.flags");
        malformed(raw_header(2, 0, 0x01, 0, s23, 1.0), None, "tensor.flags"); // row_qnt on F32
        malformed(raw_header(2, 1, 0x01, 0, s23, 1.0), None, "tensor.flags"); // row_qnt on F16
        malformed(raw_header(2, 0, 0, 1, s23, 1.0), None, "tensor.reserved");
        malformed(
            raw_header(2, 0, 0, 0, [2, 3, 1, 0, 0, 0], 1.0),
            None,
            "tensor.shape[2]",
        );
        malformed(
            raw_header(1, 0, 0, 0, [2, 0, 0, 0, 0, 9], 1.0),
            None,
            "tensor.shape[5]",
        );
        // Body size that disagrees with the shape, both ways.
        malformed(
            f32_body(raw_header(2, 0, 0, 0, s23, 1.0), 23),
            None,
            "tensor.body",
        );
        malformed(
            f32_body(raw_header(2, 0, 0, 0, s23, 1.0), 25),
            None,
            "tensor.body",
        );
        malformed(
            f32_body(raw_header(2, 1, 0, 0, s23, 1.0), 24),
            None,
            "tensor.body",
        );
        malformed(
            f32_body(raw_header(2, 2, 1, 0, s23, 1.0), 6),
            None,
            "tensor.body",
        );
        malformed(raw_header(2, 0, 0, 0, s23, 1.0), None, "tensor.body");
        // Element count and byte length overflows.
        malformed(
            raw_header(6, 0, 0, 0, [u32::MAX; 6], 1.0),
            None,
            "tensor.shape",
        );
        malformed(
            raw_header(3, 0, 0, 0, [u32::MAX, u32::MAX, 2, 0, 0, 0], 1.0),
            None,
            "tensor.shape",
        );
        malformed(
            raw_header(3, 2, 1, 0, [u32::MAX, u32::MAX, 1, 0, 0, 0], 1.0),
            None,
            "tensor.shape",
        );
        // Global QNT8 scale.
        for bad in [f32::NAN, -1.0, f32::INFINITY, f32::NEG_INFINITY] {
            malformed(
                f32_body(raw_header(1, 2, 0, 0, [4, 0, 0, 0, 0, 0], bad), 4),
                None,
                "tensor.scale",
            );
        }
        // Row scales.
        for bad in [f32::NAN, -0.5, f32::INFINITY] {
            let mut b = raw_header(2, 2, 1, 0, [3, 2, 0, 0, 0, 0], 1.0);
            for (i, s) in [1.0f32, 1.0, bad].iter().enumerate() {
                b.extend_from_slice(&s.to_le_bytes());
                b.extend_from_slice(&[i as u8, 200]);
            }
            malformed(b, Some(CodecId::TENSOR_QNT8), "tensor.row[2].scale");
        }
        // Accepted: scale 0 on a row, any scale on F32 (ignored), a zero dim.
        let mut b = raw_header(1, 2, 1, 0, [2, 0, 0, 0, 0, 0], 1.0);
        b.extend_from_slice(&0.0f32.to_le_bytes());
        b.extend_from_slice(&[1, 255]);
        let v = TensorView::parse(Bytes::from(b), None).unwrap();
        assert_eq!(v.to_f32_vec(), [0.0, 0.0]);
        let b = f32_body(raw_header(1, 0, 0, 0, [1, 0, 0, 0, 0, 0], f32::NAN), 4);
        assert!(TensorView::parse(Bytes::from(b), None).is_ok());
    }

    #[test]
    fn non_tensor_codec_is_unsupported() {
        let b = encode_f32(&[1], &[1.0], false).unwrap();
        let err = TensorView::parse(b, Some(CodecId::JSON)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
    }

    fn shape_and_values() -> impl Strategy<Value = (Vec<u32>, Vec<f32>)> {
        prop::collection::vec(1u32..5, 1..=6).prop_flat_map(|shape| {
            let n: u32 = shape.iter().product();
            let vals = prop::collection::vec(
                prop_oneof![
                    4 => -1e4f32..1e4,
                    1 => -1.0f32..1.0,
                    1 => Just(0.0f32),
                ],
                n as usize,
            );
            (Just(shape), vals)
        })
    }

    proptest! {
        #[test]
        fn f32_round_trip((shape, vals) in shape_and_values(), col_major: bool) {
            let b = encode_f32(&shape, &vals, col_major).unwrap();
            prop_assert_eq!(b.len(), 32 + 4 * vals.len());
            let v = TensorView::parse(b, Some(CodecId::TENSOR_F32)).unwrap();
            prop_assert_eq!(v.shape(), &shape[..]);
            prop_assert_eq!(v.header().col_major, col_major);
            prop_assert_eq!(v.to_f32_vec(), vals);
        }

        #[test]
        fn f16_round_trip((shape, vals) in shape_and_values(), col_major: bool) {
            let b = encode_f16_from_f32(&shape, &vals, col_major).unwrap();
            let v = TensorView::parse(b, Some(CodecId::TENSOR_F16)).unwrap();
            prop_assert_eq!(v.shape(), &shape[..]);
            for (x, y) in vals.iter().zip(v.to_f32_vec()) {
                // Round to nearest: within half an F16 ulp (relative 2^-11), or the subnormal step.
                let tol = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                prop_assert!((x - y).abs() <= tol, "{} -> {}", x, y);
            }
        }

        #[test]
        fn qnt8_round_trip((shape, vals) in shape_and_values(), row_qnt: bool, col_major: bool) {
            let b = encode_qnt8(&shape, &vals, row_qnt, col_major).unwrap();
            let v = TensorView::parse(b, Some(CodecId::TENSOR_QNT8)).unwrap();
            prop_assert_eq!(v.shape(), &shape[..]);
            let got = v.to_f32_vec();
            prop_assert_eq!(got.len(), vals.len());
            let row_len = v.header().row_len() as usize;
            let mut i = 0;
            for (scale, q) in v.qnt8_rows().unwrap() {
                prop_assert_eq!(q.len(), row_len);
                let row = &vals[i..i + row_len];
                let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                if row_qnt {
                    let want = if max == 0.0 { 1.0 } else { max / 127.0 };
                    prop_assert_eq!(scale, want);
                }
                for (k, x) in row.iter().enumerate() {
                    let err = (x - got[i + k]).abs();
                    prop_assert!(err <= scale * (0.5 + 1e-4), "{} -> {} (scale {})", x, got[i + k], scale);
                }
                i += row_len;
            }
            prop_assert_eq!(i, vals.len());
        }

        #[test]
        fn parse_never_panics(body in prop::collection::vec(any::<u8>(), 0..128)) {
            if let Err(e) = TensorView::parse(Bytes::from(body.clone()), None) {
                prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED);
            }
            for d in DType::ALL {
                if let Ok(v) = TensorView::parse(Bytes::from(body.clone()), Some(d.codec())) {
                    prop_assert_eq!(v.to_f32_vec().len(), v.numel());
                }
            }
        }

        #[test]
        fn parse_mutated_headers(
            ndim in 0u8..8, dtype in 0u8..4, flags in 0u8..4,
            shape in prop::array::uniform6(prop_oneof![Just(0u32), 1u32..4, Just(u32::MAX)]),
            scale in prop_oneof![Just(1.0f32), Just(-1.0), Just(f32::NAN), Just(0.0)],
            extra in 0usize..64,
        ) {
            let mut b = raw_header(ndim, dtype, flags, 0, shape, scale);
            b.resize(b.len() + extra, 0x3f);
            match TensorView::parse(Bytes::from(b), None) {
                Ok(v) => prop_assert_eq!(v.to_f32_vec().len(), v.numel()),
                Err(e) => prop_assert_eq!(e.code(), ErrorCode::ERR_MALFORMED),
            }
        }
    }
}
