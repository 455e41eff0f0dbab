//! Exports: device allocations, their IPC handles (cached per allocation) and the
//! [`DeviceExport`]s that name them in `cuda-ipc://` URIs.

use super::*;

impl Cuda {
    /// Allocates `len` bytes of device memory with `cuMemAlloc` (exportable by IPC).
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer> {
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the context is current.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            cuda: self.clone(),
            ptr,
            len,
        })
    }

    /// Copies host bytes to device memory at `dst`, in order on [`Self::stream`], and waits
    /// for the copy.
    ///
    /// # Safety
    ///
    /// `dst` must be a device pointer of this context writable for `src.len()` bytes.
    pub unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range; `src` is a live host slice, and
        // the stream is synchronised before it can go.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.stream.cu_stream())
        })?;
        self.synchronize()
    }

    /// Copies device memory at `src` to host bytes, in order after the work queued on
    /// [`Self::stream`], and waits for the copy.
    ///
    /// # Safety
    ///
    /// `src` must be a device pointer readable in this context for `dst.len()` bytes.
    pub unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range; `dst` is a live host slice, and
        // the stream is synchronised before it can go.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.as_mut_ptr().cast(),
                src,
                dst.len(),
                self.stream.cu_stream(),
            )
        })?;
        self.synchronize()
    }

    /// Copies `len` bytes from device memory at `src` to device memory at `dst`, in order
    /// after the work queued on [`Self::stream`], and waits for the copy (the device's copy
    /// bandwidth is the yardstick of the kernels).
    ///
    /// # Safety
    ///
    /// `src` must be readable and `dst` writable in this context for `len` bytes.
    pub unsafe fn copy_dtod(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees both device ranges.
        check("cuMemcpyDtoDAsync", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, len, self.stream.cu_stream())
        })?;
        self.synchronize()
    }

    /// Queues setting `len` bytes at `dst` to `byte` on [`Self::stream`] (no wait).
    ///
    /// # Safety
    ///
    /// `dst` must be writable in this context for `len` bytes until the stream has run it.
    pub(crate) unsafe fn memset_async(&self, dst: u64, byte: u8, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(dst, byte, len, self.stream.cu_stream())
        })
    }

    /// Exports `[ptr, ptr + len)` of a device allocation of this device as a `cuda-ipc://`
    /// attachment. When `stream` (default: [`Self::stream`]) still has work queued, an IPC
    /// event is recorded on it after that work and put in the URI, so the consumer's stream
    /// waits for the producer's writes; when the stream is idle the writes are done and the
    /// URI carries no event ([`DeviceExport::has_event`]).
    ///
    /// Keep the export alive until the consumer ACKed: dropping it returns its event to the
    /// pool (the memory itself stays the caller's). `Error::Invalid` for a pointer that is not
    /// a live allocation of this context or a range past its end; the event pool running dry
    /// ([`MAX_EVENTS`] exports in flight) is `ERR_BUSY`.
    pub fn export(&self, ptr: u64, len: u64, stream: Option<&CudaStream>) -> Result<DeviceExport> {
        self.bind()?;
        let (base, size) = address_range(ptr).map_err(|r| {
            Error::invalid(format!(
                "cuda export: {ptr:#x} is not a device allocation of this context ({})",
                result_name(r)
            ))
        })?;
        let buffer_id = buffer_id(base)?;
        let mem_handle = {
            let mut cache = lock(&self.exports);
            match cache.get(base, buffer_id) {
                Some(h) => h,
                None => {
                    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
                    // SAFETY: `base` is the base of a live allocation (cuMemGetAddressRange
                    // said so); writes 64 bytes into `h`.
                    check("cuIpcGetMemHandle", unsafe {
                        sys::cuIpcGetMemHandle(&mut h, base)
                    })?;
                    let h = h.reserved.map(|b| b as u8);
                    cache.insert(base, buffer_id, h);
                    lock(local_exports()).insert(
                        (self.uuid, h),
                        LocalExport {
                            base,
                            size,
                            buffer_id,
                        },
                    );
                    h
                }
            }
        };
        let record = ExportRecord {
            device_uuid: self.uuid,
            mem_handle,
            base,
            alloc_size: size,
            ptr,
            len,
        };
        record.check()?;
        let stream = stream.unwrap_or(&self.stream);
        // A stream with nothing pending has finished the producer's writes: the URI needs no
        // event then, and the consumer no wait. That is the common case (the producer waited
        // for its kernels) and the cheap one: measured on an H200, an IPC event recorded on
        // an idle stream was still incomplete in the consumer ~25 us later, and a consumer
        // stream waiting on it drained ~200 us later, ten times the hand-off's message.
        // SAFETY: the stream belongs to the bound context.
        match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
            sys::CUresult::CUDA_SUCCESS => {
                let uri = record.uri(None)?;
                return Ok(DeviceExport {
                    uri,
                    record,
                    _event: None,
                });
            }
            sys::CUresult::CUDA_ERROR_NOT_READY => {}
            other => return Err(driver_err("cuStreamQuery", other)),
        }
        let event = self.events.take(&self.ctx)?;
        // SAFETY: the event and the stream belong to the bound context.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(event.raw(), stream.cu_stream())
        })?;
        // A query makes the driver submit the record now rather than with its next batch (its
        // answer does not matter here), so the consumer's wait ends as soon as the writes do.
        // SAFETY: the event was just recorded in the bound context.
        let _ = unsafe { sys::cuEventQuery(event.raw()) };
        let mut eh = sys::CUipcEventHandle { reserved: [0; 64] };
        // SAFETY: the event was created with CU_EVENT_INTERPROCESS; writes 64 bytes.
        check("cuIpcGetEventHandle", unsafe {
            sys::cuIpcGetEventHandle(&mut eh, event.raw())
        })?;
        let eh = eh.reserved.map(|b| b as u8);
        lock(local_events()).insert(eh, event.raw() as usize);
        let uri = record.uri(Some(eh))?;
        Ok(DeviceExport {
            uri,
            record,
            _event: Some(event),
        })
    }
}

/// `cuMemGetAddressRange`: the base and size of the allocation that holds `ptr`.
pub(super) fn address_range(ptr: u64) -> std::result::Result<(u64, u64), sys::CUresult> {
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: writes the two outputs; any pointer value may be asked about.
    let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok((base, size as u64))
    } else {
        Err(r)
    }
}

/// The driver's process-unique id of the allocation at `base` (never reused after a free).
pub(super) fn buffer_id(base: u64) -> Result<u64> {
    let mut id = 0u64;
    // SAFETY: CU_POINTER_ATTRIBUTE_BUFFER_ID writes one unsigned long long.
    check("cuPointerGetAttribute(BUFFER_ID)", unsafe {
        sys::cuPointerGetAttribute(
            (&mut id as *mut u64).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
            base,
        )
    })?;
    Ok(id)
}

/// A device allocation made by [`Cuda::alloc`]; freed on drop (after synchronising the
/// context, so queued work that uses it has finished).
pub struct DeviceBuffer {
    pub(super) cuda: Arc<Cuda>,
    pub(super) ptr: u64,
    pub(super) len: usize,
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.len)
    }
}

impl DeviceBuffer {
    /// The device pointer.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the start of the buffer (synchronous).
    pub fn write(&self, src: &[u8]) -> Result<()> {
        if src.len() > self.len {
            return Err(Error::invalid(format!(
                "{} bytes into a buffer of {}",
                src.len(),
                self.len
            )));
        }
        // SAFETY: the buffer is a live allocation of at least `src.len()` bytes.
        unsafe { self.cuda.copy_htod(self.ptr, src) }
    }

    /// Copies the whole buffer to the host (after synchronising the device's stream).
    pub fn read(&self) -> Result<Vec<u8>> {
        self.cuda.synchronize()?;
        let mut out = vec![0u8; self.len];
        // SAFETY: the buffer is a live allocation of `len` bytes.
        unsafe { self.cuda.copy_dtoh(&mut out, self.ptr) }?;
        Ok(out)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.cuda.synchronize();
        // Forget the export of this allocation: the base may be reused by a later allocation.
        lock(&self.cuda.exports).remove_base(self.ptr);
        lock(local_exports()).retain(|_, l| l.base != self.ptr);
        // SAFETY: the pointer came from cuMemAlloc in this context and is freed once.
        let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

/// What an export says about an allocation: everything the URI needs, without CUDA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRecord {
    /// The device UUID.
    pub device_uuid: [u8; 16],
    /// The IPC handle of the allocation base.
    pub mem_handle: [u8; 64],
    /// The allocation base (from `cuMemGetAddressRange`).
    pub base: u64,
    /// The allocation size.
    pub alloc_size: u64,
    /// The first exported byte.
    pub ptr: u64,
    /// The number of exported bytes.
    pub len: u64,
}

impl ExportRecord {
    /// Checks that `[ptr, ptr + len)` lies inside the allocation.
    pub fn check(&self) -> Result<()> {
        let end = self.ptr.checked_add(self.len);
        let alloc_end = self.base.checked_add(self.alloc_size);
        match (end, alloc_end) {
            (Some(e), Some(ae)) if self.ptr >= self.base && e <= ae => Ok(()),
            _ => Err(Error::invalid(format!(
                "cuda export: {:#x}+{} lies outside the allocation {:#x}+{}",
                self.ptr, self.len, self.base, self.alloc_size
            ))),
        }
    }

    /// The `cuda-ipc://` URI of the region, with `event` when given.
    pub fn uri(&self, event: Option<[u8; 64]>) -> Result<AttachmentUri> {
        self.check()?;
        AttachmentUri::cuda_ipc(
            self.device_uuid,
            self.mem_handle,
            event,
            self.ptr - self.base,
            self.len,
        )
    }
}

/// One exported region: its URI plus the pooled IPC event it carries. Keep it until the
/// consumer ACKed the message that named it.
pub struct DeviceExport {
    pub(super) uri: AttachmentUri,
    pub(super) record: ExportRecord,
    pub(super) _event: Option<PooledEvent>,
}

impl fmt::Debug for DeviceExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceExport({})", self.uri)
    }
}

impl DeviceExport {
    /// The `cuda-ipc://` URI to send.
    pub fn uri(&self) -> &AttachmentUri {
        &self.uri
    }

    /// What was exported.
    pub fn record(&self) -> &ExportRecord {
        &self.record
    }

    /// Whether the URI carries an IPC event: the producer's stream still had work queued at
    /// export, so the consumer's stream waits on it. Without one the writes were done.
    pub fn has_event(&self) -> bool {
        self._event.is_some()
    }
}

/// The producer's cache of IPC handles, one per allocation: keyed by base and the driver's
/// buffer id, so a base freed and reallocated gets a fresh handle.
#[derive(Default, Debug)]
pub struct ExportCache {
    pub(super) by_base: HashMap<u64, (u64, [u8; 64])>,
}

impl ExportCache {
    /// The cached handle of the allocation at `base` with `buffer_id`, if any.
    pub fn get(&self, base: u64, buffer_id: u64) -> Option<[u8; 64]> {
        match self.by_base.get(&base) {
            Some((id, h)) if *id == buffer_id => Some(*h),
            _ => None,
        }
    }

    /// Remembers the handle of an allocation (replacing a stale one at the same base).
    pub fn insert(&mut self, base: u64, buffer_id: u64, handle: [u8; 64]) {
        self.by_base.insert(base, (buffer_id, handle));
    }

    /// Forgets the allocation at `base`.
    pub fn remove_base(&mut self, base: u64) {
        self.by_base.remove(&base);
    }

    /// How many allocations are cached.
    pub fn len(&self) -> usize {
        self.by_base.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.by_base.is_empty()
    }
}

/// An allocation this process exported, so a handle coming back is used as a pointer.
#[derive(Clone, Copy, Debug)]
pub(super) struct LocalExport {
    pub(super) base: u64,
    pub(super) size: u64,
    pub(super) buffer_id: u64,
}

/// A memory handle as the caches key it: the device UUID and the handle bytes.
pub(super) type HandleKey = ([u8; 16], [u8; 64]);

pub(super) fn local_exports() -> &'static Mutex<HashMap<HandleKey, LocalExport>> {
    static M: OnceLock<Mutex<HashMap<HandleKey, LocalExport>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The IPC events of this process's pools by handle bytes (as `usize` of the `CUevent`), so
/// an import of our own export waits on the event itself (it is not opened by handle).
pub(super) fn local_events() -> &'static Mutex<HashMap<[u8; 64], usize>> {
    static M: OnceLock<Mutex<HashMap<[u8; 64], usize>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

pub(super) fn local_export(uuid: &[u8; 16], handle: &[u8; 64]) -> Option<LocalExport> {
    lock(local_exports()).get(&(*uuid, *handle)).copied()
}
