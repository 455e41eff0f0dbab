//! DLPack `kDLCUDA` tensors over device memory, and DLPACK bodies naming it by handle.

use super::*;

/// The DLPACK descriptor (SPEC §5.5) of a device tensor by handle: device `kDLCUDA`
/// `device_id`, compact row-major, `byte_offset` 0, its bytes named by `uri` (a `cuda-ipc://`
/// URI). Needs no GPU. `Error::Invalid` for another scheme, or a shape that addresses more
/// bytes than the URI's size.
pub fn cuda_descriptor(
    uri: AttachmentUri,
    device_id: i32,
    dtype: DlDataType,
    shape: Vec<i64>,
) -> Result<DlpackDescriptor> {
    if !matches!(uri.target(), Target::CudaIpc { .. }) {
        return Err(Error::invalid(format!(
            "dlpack device descriptor: {} is not a cuda-ipc URI",
            uri.scheme()
        )));
    }
    let strides = row_major_strides(&shape)
        .ok_or_else(|| Error::invalid("dlpack device descriptor: element count overflows"))?;
    let d = DlpackDescriptor {
        device_type: DEVICE_CUDA,
        device_id,
        dtype,
        shape,
        strides,
        byte_offset: 0,
        data: DlData::Uri(uri),
    };
    d.validate()
        .map_err(|e| Error::invalid(format!("dlpack device descriptor: {e}")))?;
    Ok(d)
}

impl DeviceExport {
    /// This export as a DLPACK descriptor (SPEC §5.5): see [`cuda_descriptor`].
    pub fn dlpack_descriptor(
        &self,
        device_id: i32,
        dtype: DlDataType,
        shape: Vec<i64>,
    ) -> Result<DlpackDescriptor> {
        cuda_descriptor(self.uri.clone(), device_id, dtype, shape)
    }
}

impl Cuda {
    /// Imports a DLPACK descriptor whose bytes are a `cuda-ipc://` URI (as [`Self::import`])
    /// and hands it to a DLPack consumer as a read-only `kDLCUDA` tensor with the
    /// descriptor's dtype, shape, strides and byte offset. The tensor owns the view; its
    /// deleter runs `on_release` (the ACK). `ERR_ATTACHMENT` as [`Self::import`];
    /// `Error::Invalid` for inline data or a descriptor that addresses more than the URI's
    /// bytes.
    pub fn import_dlpack(
        &self,
        producer: u64,
        desc: &DlpackDescriptor,
        on_release: impl FnOnce() + Send + 'static,
    ) -> Result<*mut DLManagedTensorVersioned> {
        let DlData::Uri(uri) = &desc.data else {
            return Err(Error::invalid(
                "dlpack import: inline bytes are host memory, not a device tensor",
            ));
        };
        let view = self.import(producer, uri)?.on_release(on_release);
        let device = DLDevice {
            device_type: DEVICE_CUDA,
            device_id: view.device_id,
        };
        let (ptr, len) = (view.ptr, view.len);
        device_tensor_strided(
            ptr,
            len,
            device,
            desc.dtype,
            desc.shape.clone(),
            Some(desc.strides.clone()),
            desc.byte_offset,
            view,
        )
    }
}

/// What a device tensor made by [`device_tensor`] keeps alive.
pub(super) struct DeviceCtx<O> {
    pub(super) _owner: O,
    pub(super) shape: Vec<i64>,
    pub(super) strides: Vec<i64>,
}

/// Builds a read-only `DLManagedTensorVersioned` for `len` bytes of memory at `data` on
/// `device` (e.g. `kDLCUDA`), compact row-major, owning `owner` until the consumer calls the
/// deleter. Does not touch the memory, so it needs no GPU. `Error::Invalid` for a bad dtype or
/// shape, or one that addresses more than `len` bytes.
pub fn device_tensor<O: Send + 'static>(
    data: u64,
    len: u64,
    device: DLDevice,
    dtype: DlDataType,
    shape: Vec<i64>,
    owner: O,
) -> Result<*mut DLManagedTensorVersioned> {
    device_tensor_strided(data, len, device, dtype, shape, None, 0, owner)
}

/// [`device_tensor`] with explicit `strides` (in elements; `None`: compact row-major) and a
/// `byte_offset` from `data` to the first element; the bytes addressed, offset included, must
/// fit in `len`.
#[allow(clippy::too_many_arguments)]
pub fn device_tensor_strided<O: Send + 'static>(
    data: u64,
    len: u64,
    device: DLDevice,
    dtype: DlDataType,
    shape: Vec<i64>,
    strides: Option<Vec<i64>>,
    byte_offset: u64,
    owner: O,
) -> Result<*mut DLManagedTensorVersioned> {
    if shape.len() > MAX_NDIM {
        return Err(Error::invalid(format!(
            "dlpack device tensor: ndim {} above {MAX_NDIM}",
            shape.len()
        )));
    }
    let strides = match strides {
        Some(s) => s,
        None => row_major_strides(&shape)
            .ok_or_else(|| Error::invalid("dlpack device tensor: element count overflows i64"))?,
    };
    let extent = data_extent(dtype, &shape, &strides, byte_offset)
        .map_err(|e| Error::invalid(format!("dlpack device tensor: {e}")))?;
    if extent > len {
        return Err(Error::invalid(format!(
            "dlpack device tensor: shape {shape:?} addresses {extent} bytes, the view has {len}"
        )));
    }
    let mut ctx = Box::new(DeviceCtx {
        _owner: owner,
        shape,
        strides,
    });
    let dl_tensor = DLTensor {
        data: data as usize as *mut c_void,
        device,
        ndim: ctx.shape.len() as i32,
        dtype: DLDataType {
            code: dtype.code,
            bits: dtype.bits,
            lanes: dtype.lanes,
        },
        // The vectors' heap buffers do not move when the box becomes a raw pointer.
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset,
    };
    let managed = Box::new(DLManagedTensorVersioned {
        version: DLPackVersion { major: 1, minor: 0 },
        manager_ctx: Box::into_raw(ctx).cast(),
        deleter: Some(device_deleter::<O>),
        flags: DLPACK_FLAG_BITMASK_READ_ONLY,
        dl_tensor,
    });
    Ok(Box::into_raw(managed))
}

/// The deleter of tensors made by [`device_tensor`].
pub(super) unsafe extern "C" fn device_deleter<O>(t: *mut DLManagedTensorVersioned) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` came from `Box::into_raw` in `device_tensor`; DLPack's contract is one call
    // of the deleter, after which the consumer does not touch the tensor.
    let managed = unsafe { Box::from_raw(t) };
    if !managed.manager_ctx.is_null() {
        // SAFETY: `manager_ctx` is the `Box<DeviceCtx<O>>` made in `device_tensor` for this
        // very `O` (the deleter is monomorphised with it), freed only here.
        drop(unsafe { Box::from_raw(managed.manager_ctx.cast::<DeviceCtx<O>>()) });
    }
}
