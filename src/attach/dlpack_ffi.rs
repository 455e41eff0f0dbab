//! The DLPack C ABI, version 1.x (`DLManagedTensorVersioned`), for host tensors with inline
//! bytes: [`export`] hands a [`DlpackDescriptor`] to a C consumer (PyTorch, NumPy, JAX, …)
//! without copying, and [`import`] takes a tensor from a C producer into a descriptor by copying
//! its bytes.
//!
//! The struct layouts follow `dlpack.h` v1.0/1.1 field for field (`DLManagedTensorVersioned`:
//! version, manager_ctx, deleter, flags, dl_tensor). An exported tensor is marked
//! [`DLPACK_FLAG_BITMASK_READ_ONLY`]: its data is the descriptor's shared `Bytes`, which other
//! owners may be reading. The deleter frees the tensor, its shape and strides, and drops its
//! reference to the bytes; the consumer must call it exactly once.
//!
//! ```
//! use bytes::Bytes;
//! use xcp::attach::dlpack_ffi::{export, import, DLPACK_FLAG_BITMASK_READ_ONLY};
//! use xcp::codec::dlpack::{DlDataType, DlpackDescriptor};
//!
//! let desc = DlpackDescriptor::cpu(DlDataType::U8, vec![2, 2], Bytes::from_static(&[1, 2, 3, 4]))?;
//! let t = export(&desc)?;
//! // SAFETY: `t` was just returned by `export` and is not used after `import` (which calls
//! // its deleter).
//! unsafe {
//!     assert_eq!((*t).flags & DLPACK_FLAG_BITMASK_READ_ONLY, DLPACK_FLAG_BITMASK_READ_ONLY);
//!     assert_eq!((*t).dl_tensor.ndim, 2);
//! }
//! // SAFETY: as above.
//! let back = unsafe { import(t) }?;
//! assert_eq!(back, desc);
//! # Ok::<(), xcp::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::c_void;

use bytes::Bytes;

use crate::codec::dlpack::{
    data_extent, row_major_strides, DlData, DlDataType, DlpackDescriptor, DEVICE_CPU,
    DEVICE_CUDA_HOST, MAX_NDIM,
};
use crate::error::{Error, Result};

/// The tensor must not be written through.
pub const DLPACK_FLAG_BITMASK_READ_ONLY: u64 = 1 << 0;
/// The producer made a copy for this consumer, who may write to it.
pub const DLPACK_FLAG_BITMASK_IS_COPIED: u64 = 1 << 1;
/// Sub-byte elements are padded to whole bytes (DLPack 1.1).
pub const DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED: u64 = 1 << 2;

/// `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDevice {
    /// `DLDeviceType` (1 CPU, 2 CUDA, 3 CUDA host, …).
    pub device_type: i32,
    /// The device ordinal.
    pub device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDataType {
    /// `DLDataTypeCode`.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes.
    pub lanes: u16,
}

/// `DLTensor`: a strided view of memory, owned by someone else.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    /// The data pointer (the first element is at `data + byte_offset`).
    pub data: *mut c_void,
    /// Where the data lives.
    pub device: DLDevice,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: DLDataType,
    /// `ndim` dimensions.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or null for compact row-major.
    pub strides: *mut i64,
    /// Offset in bytes from `data` to the first element.
    pub byte_offset: u64,
}

/// `DLPackVersion`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLPackVersion {
    /// Major version; a consumer refuses a major it does not know.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// The deleter of a [`DLManagedTensorVersioned`]: frees the tensor and everything it owns.
pub type DLDeleter = Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>;

/// `DLManagedTensorVersioned`: a [`DLTensor`] plus who owns it.
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensorVersioned {
    /// The DLPack ABI version of this struct.
    pub version: DLPackVersion,
    /// The producer's private context.
    pub manager_ctx: *mut c_void,
    /// Called once by the consumer when it is done; frees `self`.
    pub deleter: DLDeleter,
    /// `DLPACK_FLAG_BITMASK_*`.
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: DLTensor,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<DLTensor>() == 48);
    assert!(std::mem::size_of::<DLManagedTensorVersioned>() == 80);
    assert!(std::mem::offset_of!(DLManagedTensorVersioned, flags) == 24);
    assert!(std::mem::offset_of!(DLManagedTensorVersioned, dl_tensor) == 32);
};

/// What an exported tensor keeps alive: the bytes and the shape and strides arrays.
struct ExportCtx {
    _data: Bytes,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Hands a host tensor with inline bytes to the DLPack C ABI without copying the bytes.
///
/// The result is owned by the consumer, who must call its `deleter` exactly once; until then
/// the descriptor's bytes stay alive (the tensor holds a reference). The tensor is marked
/// read-only. Refused with `Error::invalid`: a URI descriptor (map it first), a device other
/// than CPU or CUDA host, or a descriptor that breaks the DLPACK codec's rules.
pub fn export(desc: &DlpackDescriptor) -> Result<*mut DLManagedTensorVersioned> {
    let DlData::Inline(bytes) = &desc.data else {
        return Err(Error::invalid(
            "dlpack export: only inline data can be exported; map the URI first",
        ));
    };
    desc.check()
        .map_err(|e| Error::invalid(format!("dlpack export: {e}")))?;
    let mut ctx = Box::new(ExportCtx {
        _data: bytes.clone(),
        shape: desc.shape.clone(),
        strides: desc.strides.clone(),
    });
    let dl_tensor = DLTensor {
        // The consumer is told (READ_ONLY) not to write through this pointer.
        data: bytes.as_ptr().cast_mut().cast(),
        device: DLDevice {
            device_type: desc.device_type,
            device_id: desc.device_id,
        },
        // validate() capped ndim at MAX_NDIM.
        ndim: desc.shape.len() as i32,
        dtype: DLDataType {
            code: desc.dtype.code,
            bits: desc.dtype.bits,
            lanes: desc.dtype.lanes,
        },
        // The vectors' heap buffers do not move when the box is turned into a raw pointer.
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: desc.byte_offset,
    };
    let managed = Box::new(DLManagedTensorVersioned {
        version: DLPackVersion { major: 1, minor: 0 },
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(export_deleter),
        flags: DLPACK_FLAG_BITMASK_READ_ONLY,
        dl_tensor,
    });
    Ok(Box::into_raw(managed))
}

/// The deleter of tensors made by [`export`].
unsafe extern "C" fn export_deleter(t: *mut DLManagedTensorVersioned) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` came from `Box::into_raw` in `export`, and DLPack's contract is that the
    // deleter is called once, after which the consumer does not touch the tensor.
    let managed = unsafe { Box::from_raw(t) };
    if !managed.manager_ctx.is_null() {
        // SAFETY: `manager_ctx` was made by `Box::into_raw(Box<ExportCtx>)` in `export` and is
        // freed only here.
        drop(unsafe { Box::from_raw(managed.manager_ctx.cast::<ExportCtx>()) });
    }
}

/// Calls a managed tensor's deleter when dropped, so that every exit of [`import`] releases
/// the tensor exactly once.
struct ReleaseOnDrop(*mut DLManagedTensorVersioned);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        // SAFETY: `import`'s caller guarantees the pointer is a live tensor whose ownership
        // passed to us; `version` and `deleter` lie in the part of the struct that DLPack keeps
        // stable across versions, and we call the deleter once and never touch `self.0` again.
        unsafe {
            if let Some(deleter) = (*self.0).deleter {
                deleter(self.0);
            }
        }
    }
}

fn import_err(detail: impl std::fmt::Display) -> Error {
    Error::invalid(format!("dlpack import: {detail}"))
}

/// Takes a host tensor from the DLPack C ABI: copies the bytes it addresses into an inline
/// descriptor (device CPU, same shape, dtype and strides, `byte_offset` 0), then calls the
/// tensor's deleter, on success and on every error alike.
///
/// Refused with `Error::invalid`: a null pointer, a major version other than 1, a device other
/// than CPU (1) or CUDA host (3), `ndim` negative or above [`MAX_NDIM`], a null shape or data
/// pointer where elements exist, and any dtype, shape or stride the DLPACK codec refuses. Null
/// strides mean compact row-major.
///
/// # Safety
///
/// `t` must be null or point to a valid `DLManagedTensorVersioned` whose ownership passes to
/// this call (the caller must not use or delete it afterwards). For major version 1, its shape
/// (and strides, when not null) must point to `ndim` readable `i64`s, and `data + byte_offset`
/// must be readable for every byte that the shape, strides and dtype address.
pub unsafe fn import(t: *mut DLManagedTensorVersioned) -> Result<DlpackDescriptor> {
    if t.is_null() {
        return Err(import_err("null tensor"));
    }
    let _release = ReleaseOnDrop(t);
    // SAFETY: the caller guarantees `t` is a valid tensor; it stays alive until `_release`
    // drops, after our last use of `m`.
    let m = unsafe { &*t };
    if m.version.major != 1 {
        return Err(import_err(format!(
            "DLPack major version {} not supported",
            m.version.major
        )));
    }
    let dt = &m.dl_tensor;
    if dt.device.device_type != DEVICE_CPU && dt.device.device_type != DEVICE_CUDA_HOST {
        return Err(import_err(format!(
            "device type {} is not host memory (1 CPU or 3 CUDA host)",
            dt.device.device_type
        )));
    }
    let ndim = usize::try_from(dt.ndim)
        .ok()
        .filter(|&n| n <= MAX_NDIM)
        .ok_or_else(|| import_err(format!("ndim {} outside 0..={MAX_NDIM}", dt.ndim)))?;
    let read_i64s = |p: *mut i64, what: &str| -> Result<Vec<i64>> {
        if ndim == 0 {
            return Ok(Vec::new());
        }
        if p.is_null() {
            return Err(import_err(format!("{what} is null")));
        }
        // SAFETY: the caller guarantees a non-null shape/strides pointer addresses `ndim`
        // readable i64s.
        Ok(unsafe { std::slice::from_raw_parts(p, ndim) }.to_vec())
    };
    let shape = read_i64s(dt.shape, "shape")?;
    let strides = if dt.strides.is_null() {
        row_major_strides(&shape).ok_or_else(|| import_err("element count overflows i64"))?
    } else {
        read_i64s(dt.strides, "strides")?
    };
    let dtype = DlDataType::new(dt.dtype.code, dt.dtype.bits, dt.dtype.lanes);
    let extent = data_extent(dtype, &shape, &strides, 0).map_err(import_err)?;
    let len = usize::try_from(extent)
        .ok()
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| import_err(format!("{extent} bytes do not fit in memory")))?;
    let offset = usize::try_from(dt.byte_offset)
        .map_err(|_| import_err(format!("byte_offset {} too large", dt.byte_offset)))?;
    let bytes = if len == 0 {
        Bytes::new()
    } else {
        if dt.data.is_null() {
            return Err(import_err("data is null"));
        }
        // SAFETY: the caller guarantees that `data + byte_offset` is readable for every byte
        // the tensor addresses, which is `len` bytes from there (computed above with checked
        // arithmetic), and that the memory is host memory (checked above).
        let slice = unsafe {
            let first = dt.data.cast::<u8>().cast_const().add(offset);
            std::slice::from_raw_parts(first, len)
        };
        Bytes::copy_from_slice(slice)
    };
    Ok(DlpackDescriptor {
        device_type: DEVICE_CPU,
        device_id: 0,
        dtype,
        shape,
        strides,
        byte_offset: 0,
        data: DlData::Inline(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::uri::AttachmentUri;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts how often the bytes' owner is dropped.
    struct Owner(Vec<u8>, Arc<AtomicUsize>);

    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    static DELETER_CALLS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn counting_deleter(t: *mut DLManagedTensorVersioned) {
        DELETER_CALLS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: `t` is a tensor made by `export`, handed to us once by `import`.
        unsafe { export_deleter(t) }
    }

    fn f32_desc(owner_drops: &Arc<AtomicUsize>) -> DlpackDescriptor {
        let values: Vec<u8> = (0..6u8).flat_map(|i| f32::from(i).to_le_bytes()).collect();
        let data = Bytes::from_owner(Owner(values, owner_drops.clone()));
        DlpackDescriptor::cpu(DlDataType::F32, vec![2, 3], data).unwrap()
    }

    #[test]
    fn export_import_round_trip_runs_the_deleter_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let desc = f32_desc(&drops);
        let before = DELETER_CALLS.load(Ordering::SeqCst);
        let t = export(&desc).unwrap();
        // SAFETY: `t` is live (just exported) and owned by this test.
        unsafe {
            let dt = &(*t).dl_tensor;
            let DlData::Inline(b) = &desc.data else {
                unreachable!()
            };
            assert_eq!(dt.data.cast_const().cast::<u8>(), b.as_ptr(), "not a copy");
            assert_eq!(std::slice::from_raw_parts(dt.shape, 2), &[2, 3]);
            assert_eq!(std::slice::from_raw_parts(dt.strides, 2), &[3, 1]);
            assert_eq!((*t).version, DLPackVersion { major: 1, minor: 0 });
            (*t).deleter = Some(counting_deleter);
        }
        // SAFETY: `t` is live and ownership passes to `import`.
        let back = unsafe { import(t) }.unwrap();
        assert_eq!(back, desc);
        assert_eq!(DELETER_CALLS.load(Ordering::SeqCst) - before, 1);
        // The export's reference is gone; the descriptor still holds one.
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(desc);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn import_errors_still_release_the_tensor() {
        let drops = Arc::new(AtomicUsize::new(0));
        let desc = f32_desc(&drops);
        let t = export(&desc).unwrap();
        drop(desc);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "the export keeps the bytes"
        );
        // SAFETY: `t` is live and owned by this test.
        unsafe { (*t).dl_tensor.device.device_type = 2 };
        // SAFETY: `t` is live and ownership passes to `import`.
        let err = unsafe { import(t) }.unwrap_err();
        assert!(err.to_string().contains("not host memory"), "{err}");
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the deleter ran");
    }

    #[test]
    fn import_of_a_foreign_tensor_with_null_strides_and_offset() {
        // A tensor laid out by hand, as a C producer would: 2 x 2 u16 after a 2-byte offset.
        let mut data: Vec<u16> = vec![0xAAAA, 1, 2, 3, 4];
        let mut shape = [2i64, 2];
        let mut t = DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 1 },
            manager_ctx: std::ptr::null_mut(),
            deleter: None,
            flags: 0,
            dl_tensor: DLTensor {
                data: data.as_mut_ptr().cast(),
                device: DLDevice {
                    device_type: DEVICE_CPU,
                    device_id: 0,
                },
                ndim: 2,
                dtype: DLDataType {
                    code: 1,
                    bits: 16,
                    lanes: 1,
                },
                shape: shape.as_mut_ptr(),
                strides: std::ptr::null_mut(),
                byte_offset: 2,
            },
        };
        // SAFETY: every pointer in `t` points into live locals of the right length.
        let d = unsafe { import(&mut t) }.unwrap();
        assert_eq!(d.strides, vec![2, 1]);
        assert_eq!(d.byte_offset, 0);
        let want: Vec<u8> = [1u16, 2, 3, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(d.data, DlData::Inline(Bytes::from(want)));

        t.version.major = 2;
        // SAFETY: as above; the version is checked before anything else is read.
        let e = unsafe { import(&mut t) }.unwrap_err();
        assert!(e.to_string().contains("major version 2"), "{e}");
        t.version.major = 1;
        t.dl_tensor.ndim = -1;
        // SAFETY: as above.
        let e = unsafe { import(&mut t) }.unwrap_err();
        assert!(e.to_string().contains("ndim -1"), "{e}");
        // SAFETY: a null pointer is allowed.
        assert!(unsafe { import(std::ptr::null_mut()) }.is_err());
    }

    #[test]
    fn export_refuses_uris() {
        let d = DlpackDescriptor {
            data: DlData::Uri(AttachmentUri::memfd(0, 0, 64).unwrap()),
            ..f32_desc(&Arc::new(AtomicUsize::new(0)))
        };
        assert!(export(&d).is_err());
    }
}
