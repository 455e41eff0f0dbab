//! VMM allocations (`cuMemCreate`) exported and imported as POSIX file descriptors.

use super::*;

/// The allocation properties of a VMM allocation on device `ordinal` that can be exported as a
/// POSIX file descriptor.
pub(super) fn vmm_prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct (enums, ints, a pointer, bytes) for
    // which all-zero is the documented default of every field.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    prop
}

/// `len` rounded up to a multiple of `granularity` (itself at least 1).
pub fn round_to_granularity(len: u64, granularity: u64) -> Option<u64> {
    let g = granularity.max(1);
    len.max(1).div_ceil(g).checked_mul(g)
}

/// Reserves an address range of `size` bytes, maps `handle` there and makes it readable and
/// writable by device `ordinal`. On error everything done is undone.
pub(super) fn vmm_map(
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
    ordinal: i32,
) -> Result<u64> {
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: writes one device pointer; no fixed address or alignment asked for.
    check("cuMemAddressReserve", unsafe {
        sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0)
    })?;
    // SAFETY: the range was just reserved with `size` bytes; the handle is live.
    let r = unsafe { sys::cuMemMap(ptr, size, 0, handle, 0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        // SAFETY: the range was reserved above and nothing is mapped in it.
        let _ = unsafe { sys::cuMemAddressFree(ptr, size) };
        return Err(driver_err("cuMemMap", r));
    }
    let desc = sys::CUmemAccessDesc {
        location: vmm_prop(ordinal).location,
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the range is mapped; one access descriptor is passed.
    let r = unsafe { sys::cuMemSetAccess(ptr, size, &desc, 1) };
    if r != sys::CUresult::CUDA_SUCCESS {
        // SAFETY: undoes the map and the reservation above, once.
        unsafe {
            let _ = sys::cuMemUnmap(ptr, size);
            let _ = sys::cuMemAddressFree(ptr, size);
        }
        return Err(driver_err("cuMemSetAccess", r));
    }
    Ok(ptr)
}

/// A mapped VMM range; unmapped and its address range freed on drop (the memory itself goes
/// when its last handle and mapping are gone).
pub(super) struct VmmMapping {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) ptr: u64,
    pub(super) size: usize,
}

impl Drop for VmmMapping {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the range was mapped by `vmm_map` and is unmapped and freed once, here.
        unsafe {
            let _ = sys::cuMemUnmap(self.ptr, self.size);
            let _ = sys::cuMemAddressFree(self.ptr, self.size);
        }
    }
}

/// A device allocation made with the VMM API (`cuMemCreate`) that can be exported as a POSIX
/// file descriptor ([`VmmBuffer::export_fd`]). The descriptor passes to another process over
/// a Unix socket with `SCM_RIGHTS` (or by inheritance); unlike legacy IPC handles this needs
/// no ptrace rights between the processes. There is no IPC event on this path: the export
/// waits for the device's stream instead.
pub struct VmmBuffer {
    pub(super) cuda: Arc<Cuda>,
    pub(super) handle: sys::CUmemGenericAllocationHandle,
    pub(super) mapping: VmmMapping,
    pub(super) len: usize,
}

impl fmt::Debug for VmmBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VmmBuffer({:#x}, {} of {} bytes)",
            self.mapping.ptr, self.len, self.mapping.size
        )
    }
}

impl Cuda {
    /// Allocates at least `len` bytes with `cuMemCreate` (rounded up to the allocation
    /// granularity), exportable as a POSIX file descriptor, and maps them read-write.
    pub fn alloc_vmm(self: &Arc<Self>, len: usize) -> Result<VmmBuffer> {
        self.bind()?;
        let ordinal = self.ordinal() as i32;
        let prop = vmm_prop(ordinal);
        let mut gran = 0usize;
        // SAFETY: reads `prop`, writes one size.
        check("cuMemGetAllocationGranularity", unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })?;
        let size = round_to_granularity(len as u64, gran as u64)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| Error::invalid(format!("VMM allocation of {len} bytes is too large")))?;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: reads `prop`, writes one handle.
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut handle, size, &prop, 0)
        })?;
        let ptr = match vmm_map(handle, size, ordinal) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the handle was created above and is released once.
                let _ = unsafe { sys::cuMemRelease(handle) };
                return Err(e);
            }
        };
        Ok(VmmBuffer {
            cuda: self.clone(),
            handle,
            mapping: VmmMapping {
                ctx: self.ctx.clone(),
                ptr,
                size,
            },
            len,
        })
    }

    /// Maps a VMM allocation received as a file descriptor (from [`VmmBuffer::export_fd`] in
    /// another process) and returns a view of `[offset, offset + len)` of it. `alloc_size` is
    /// the allocation's size as the producer reported it ([`VmmBuffer::alloc_size`]). The
    /// descriptor may be closed afterwards. A descriptor that is not a CUDA allocation, or a
    /// region past `alloc_size`, is `ERR_ATTACHMENT`.
    pub fn import_vmm_fd(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        alloc_size: u64,
        offset: u64,
        len: u64,
    ) -> Result<DeviceView> {
        use std::os::fd::AsRawFd;
        match offset.checked_add(len) {
            Some(end) if end <= alloc_size => {}
            _ => {
                return Err(attach_err(format!(
                    "vmm: bytes {offset}+{len} lie outside the allocation of {alloc_size} bytes"
                )))
            }
        }
        let size = usize::try_from(alloc_size)
            .map_err(|_| attach_err(format!("vmm: allocation of {alloc_size} bytes")))?;
        self.bind()?;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX descriptors the "OS handle" is the descriptor's value itself,
        // passed as a pointer-sized integer; the driver dups what it keeps.
        let r = unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut handle,
                fd.as_raw_fd() as usize as *mut c_void,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(attach_err(format!(
                "vmm: the descriptor is not an exported CUDA allocation ({})",
                result_name(r)
            )));
        }
        let mapped = vmm_map(handle, size, self.ordinal() as i32);
        // SAFETY: the handle was imported above; the mapping (if any) keeps the memory, so the
        // handle is released once, here.
        let _ = unsafe { sys::cuMemRelease(handle) };
        let ptr = mapped.map_err(|e| attach_err(format!("vmm: {e}")))?;
        let mapping = VmmMapping {
            ctx: self.ctx.clone(),
            ptr,
            size,
        };
        Ok(DeviceView {
            ptr: ptr + offset,
            len,
            device_id: self.ordinal() as i32,
            _hold: Some(Arc::new(mapping)),
            on_release: Mutex::new(None),
        })
    }
}

impl VmmBuffer {
    /// The device pointer.
    pub fn ptr(&self) -> u64 {
        self.mapping.ptr
    }

    /// The length asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size of the allocation (the length rounded up to the granularity), which the
    /// consumer needs to map it.
    pub fn alloc_size(&self) -> u64 {
        self.mapping.size as u64
    }

    /// Copies `src` into the start of the buffer.
    pub fn write(&self, src: &[u8]) -> Result<()> {
        if src.len() > self.mapping.size {
            return Err(Error::invalid(format!(
                "{} bytes into a VMM buffer of {}",
                src.len(),
                self.mapping.size
            )));
        }
        // SAFETY: the buffer is mapped read-write for `size` bytes.
        unsafe { self.cuda.copy_htod(self.mapping.ptr, src) }
    }

    /// Waits for the device's stream (so the consumer sees every write queued so far) and
    /// exports the allocation as a POSIX file descriptor (`cuMemExportToShareableHandle`),
    /// to be sent with `SCM_RIGHTS`.
    pub fn export_fd(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        self.cuda.synchronize()?;
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: for POSIX descriptors the driver writes one int.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut std::ffi::c_int).cast(),
                self.handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        // SAFETY: the driver returned a new descriptor that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for VmmBuffer {
    fn drop(&mut self) {
        let _ = self.cuda.synchronize();
        // SAFETY: the handle came from cuMemCreate and is released once; the mapping (dropped
        // right after) keeps the memory until it is unmapped.
        let _ = unsafe { sys::cuMemRelease(self.handle) };
    }
}
