//! GPU tensors by handle (feature `cuda`): `cuda-ipc://` attachments (SPEC §7), device views
//! as DLPack `kDLCUDA` tensors, and the device kernels of [`kernels`].
//!
//! The CUDA driver and NVRTC are loaded at run time (cudarc's dynamic loading), so this module
//! builds and its tests run on machines without a GPU or a CUDA install: [`Cuda::load`] then
//! fails with an [`Unavailable`] reason instead of panicking.
//!
//! - **Export** ([`Cuda::export`]): a device pointer and a length become a [`DeviceExport`]
//!   whose URI names the IPC handle of the allocation's base (found with
//!   `cuMemGetAddressRange`), the offset into it, the size, the device UUID (not the ordinal:
//!   `CUDA_VISIBLE_DEVICES` differs between processes) and an IPC event recorded on the
//!   producer's stream after its writes. The IPC handle is made once per allocation and cached
//!   (keyed by base and the driver's buffer id, so a freed and reallocated base gets a new
//!   handle); events come from a bounded pool (the driver limits them) and go back to it when
//!   the export is dropped, which the producer does when the consumer ACKed.
//! - **Import** ([`Cuda::import`]): each memory handle is opened once per process (CUDA
//!   refuses a second open) and the mapping is cached, with the set of producer sessions that
//!   use it; [`release_producer`] forgets a producer when its session ends, and the mapping is
//!   closed (`cuIpcCloseMemHandle`) once no producer and no view holds it. The consumer's
//!   stream waits on the IPC event before the view is handed out. A handle exported by this
//!   very process is recognised and its pointer used directly.
//! - **VMM** ([`Cuda::alloc_vmm`], [`VmmBuffer::export_fd`], [`Cuda::import_vmm_fd`]): an
//!   allocation made with `cuMemCreate` is exported as a POSIX file descriptor
//!   (`cuMemExportToShareableHandle`) to pass with `SCM_RIGHTS` on a Unix socket, which needs
//!   no ptrace rights between the processes; the consumer maps it into its own address range.
//! - **Views** ([`DeviceView`]): pointer, length and device; [`DeviceView::into_dlpack`] makes a
//!   `DLManagedTensorVersioned` of device type `kDLCUDA` whose deleter drops the view, which
//!   runs its release hook (the session's ACK). [`cuda_descriptor`] and
//!   [`Cuda::import_dlpack`] are the same through a SPEC §5.5 DLPACK body whose bytes are a
//!   `cuda-ipc://` URI.
//!
//! Errors are explicit, never a silent fallback: a URI for a device this process cannot see
//! (another device set), a handle that does not open (a peer in another PID/IPC namespace, a
//! freed allocation, garbage), an event that does not open, or a region outside the allocation
//! are `ERR_ATTACHMENT` naming the cause; CUDA missing is an [`Unavailable`] reason (see
//! [`unavailable`]).
//!
//! ```
//! use xcp::attach::cuda::{self, Cuda};
//!
//! match Cuda::load(0) {
//!     Ok(gpu) => println!("device {} ({})", gpu.ordinal(), gpu.uuid_string()),
//!     Err(e) => println!("no CUDA: {}", cuda::unavailable(&e).map_or(e.to_string(), |u| u.to_string())),
//! }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod kernels;

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

use crate::attach::dlpack_ffi::{
    DLDataType, DLDevice, DLManagedTensorVersioned, DLPackVersion, DLTensor,
    DLPACK_FLAG_BITMASK_READ_ONLY,
};
use crate::attach::uri::{AttachmentUri, Target};
use crate::codec::dlpack::{
    data_extent, row_major_strides, DlData, DlDataType, DlpackDescriptor, DEVICE_CUDA, MAX_NDIM,
};
use crate::error::{Error, ErrorCode, Result};

/// The oldest driver accepted: CUDA 12.0 (`cuDriverGetVersion` 12000), the API version the
/// bindings are built for (cudarc feature `cuda-12000`).
pub const MIN_DRIVER_VERSION: i32 = 12000;
/// IPC events one process keeps at most (each in-flight export holds one until it is ACKed).
pub const MAX_EVENTS: usize = 1024;

/// Why CUDA cannot be used in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unavailable {
    /// The driver library (`libcuda.so`) is not installed or not on the loader's path.
    LibraryNotFound,
    /// The driver lacks an entry point this crate needs, or is older than
    /// [`MIN_DRIVER_VERSION`].
    DriverTooOld {
        /// The version the driver reports (`cuDriverGetVersion`), 0 when unknown.
        found: i32,
        /// What was missing.
        detail: String,
    },
    /// The driver loaded but sees no device (`CUDA_ERROR_NO_DEVICE`, an empty
    /// `CUDA_VISIBLE_DEVICES`), or not the ordinal asked for.
    NoDevice(String),
    /// NVRTC (`libnvrtc.so`), needed for the kernels, is not installed.
    NvrtcNotFound,
    /// `cuInit` or another start-up call failed otherwise.
    Driver(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::LibraryNotFound => write!(
                f,
                "CUDA unavailable: the driver library libcuda.so was not found (no NVIDIA \
                 driver installed, or not on LD_LIBRARY_PATH)"
            ),
            Unavailable::DriverTooOld { found, detail } => write!(
                f,
                "CUDA unavailable: driver too old (version {found}, need {MIN_DRIVER_VERSION}): \
                 {detail}"
            ),
            Unavailable::NoDevice(d) => write!(f, "CUDA unavailable: no device: {d}"),
            Unavailable::NvrtcNotFound => write!(
                f,
                "CUDA kernels unavailable: NVRTC (libnvrtc.so) was not found; install the CUDA \
                 runtime compiler"
            ),
            Unavailable::Driver(d) => write!(f, "CUDA unavailable: {d}"),
        }
    }
}

impl std::error::Error for Unavailable {}

impl From<Unavailable> for Error {
    fn from(u: Unavailable) -> Error {
        Error::Io(std::io::Error::new(std::io::ErrorKind::Unsupported, u))
    }
}

/// The [`Unavailable`] reason inside an error from [`Cuda::load`] or
/// [`kernels::Kernels::load`], or `None` for any other error.
pub fn unavailable(e: &Error) -> Option<&Unavailable> {
    match e {
        Error::Io(io) => io.get_ref()?.downcast_ref::<Unavailable>(),
        _ => None,
    }
}

/// A driver call that failed locally: an I/O error naming the call and the driver's code.
fn driver_err(call: &str, r: sys::CUresult) -> Error {
    Error::Io(std::io::Error::other(format!("{call}: {}", result_name(r))))
}

/// A refused attachment: `ERR_ATTACHMENT` naming the cause.
fn attach_err(detail: impl fmt::Display) -> Error {
    Error::protocol(ErrorCode::ERR_ATTACHMENT, format!("cuda-ipc: {detail}"))
}

/// `CUDA_ERROR_…` name of a result code (the driver is loaded whenever this is called).
fn result_name(r: sys::CUresult) -> String {
    let e = cudarc::driver::result::DriverError(r);
    match e.error_name() {
        Ok(n) => format!("{} ({})", n.to_string_lossy(), r as i32),
        Err(_) => format!("{r:?}"),
    }
}

fn check(call: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_err(call, r))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Loads the driver library and runs `cuInit` once per process; every later call returns the
/// same outcome.
fn driver() -> std::result::Result<i32, Unavailable> {
    static STATE: OnceLock<std::result::Result<i32, Unavailable>> = OnceLock::new();
    STATE.get_or_init(init_driver).clone()
}

fn init_driver() -> std::result::Result<i32, Unavailable> {
    // cudarc resolves every entry point of the CUDA 12.0 driver API when it opens the library
    // and panics when one is missing (an older driver): the panic is caught and reported.
    let probe = std::panic::catch_unwind(|| -> std::result::Result<i32, Unavailable> {
        // SAFETY: tries to dlopen the candidate library names and to resolve the API's entry
        // points; nothing is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(Unavailable::LibraryNotFound);
        }
        // SAFETY: cuInit takes flags (must be 0) and may be called more than once.
        let r = unsafe { sys::cuInit(0) };
        match r {
            sys::CUresult::CUDA_SUCCESS => {}
            sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err(Unavailable::NoDevice(
                    "cuInit: CUDA_ERROR_NO_DEVICE (no GPU, or CUDA_VISIBLE_DEVICES hides all)"
                        .into(),
                ))
            }
            sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
            | sys::CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
                return Err(Unavailable::DriverTooOld {
                    found: 0,
                    detail: format!("cuInit: {r:?} (the kernel module and libcuda differ)"),
                })
            }
            other => return Err(Unavailable::Driver(format!("cuInit: {other:?}"))),
        }
        let mut version = 0i32;
        // SAFETY: writes one int.
        let r = unsafe { sys::cuDriverGetVersion(&mut version) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Unavailable::Driver(format!("cuDriverGetVersion: {r:?}")));
        }
        if version < MIN_DRIVER_VERSION {
            return Err(Unavailable::DriverTooOld {
                found: version,
                detail: "cuDriverGetVersion".into(),
            });
        }
        Ok(version)
    });
    probe.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic while loading the driver".into());
        if msg.contains("symbol") {
            Err(Unavailable::DriverTooOld {
                found: 0,
                detail: format!("the driver lacks an entry point of the CUDA 12.0 API: {msg}"),
            })
        } else {
            Err(Unavailable::Driver(msg))
        }
    })
}

/// Whether the CUDA driver can be used here, and if not why (cheap after the first call).
pub fn probe() -> std::result::Result<i32, Unavailable> {
    driver()
}

static EVENT_WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many imports in this process found the producer's event not yet completed, so that
/// the device's stream had to wait on it (the rest found the writes done already).
pub fn event_waits() -> u64 {
    EVENT_WAITS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this process can use CUDA IPC at all: the driver loads and sees a device. A
/// session offers `cuda-ipc` only then.
pub fn usable() -> bool {
    visible_devices().is_ok_and(|v| !v.is_empty())
}

/// The [`Cuda`] of the device with this UUID, loaded once per process and shared: a session
/// imports the `cuda-ipc://` handles it receives through it, so its [`Cuda::stream`] is the
/// one that waits on producers' events. `ERR_ATTACHMENT` when no visible device has that UUID
/// (the producer runs on another device set or another host).
pub fn for_device(uuid: &[u8; 16]) -> Result<Arc<Cuda>> {
    static LOADED: OnceLock<Mutex<HashMap<[u8; 16], Arc<Cuda>>>> = OnceLock::new();
    let mut loaded = lock(LOADED.get_or_init(Default::default));
    if let Some(c) = loaded.get(uuid) {
        return Ok(c.clone());
    }
    let visible = visible_devices()
        .map_err(|e| attach_err(format!("cuda-ipc: CUDA is not usable in this process: {e}")))?;
    let Some(ordinal) = visible.iter().position(|u| u == uuid) else {
        return Err(attach_err(format!(
            "device {} is not visible to this process (visible: {}); the producer runs on \
             another device set (CUDA_VISIBLE_DEVICES) or another host",
            format_uuid(uuid),
            visible
                .iter()
                .map(format_uuid)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let c = Cuda::load(ordinal)?;
    loaded.insert(*uuid, c.clone());
    Ok(c)
}

/// The UUIDs of every device this process sees, by ordinal.
pub fn visible_devices() -> Result<Vec<[u8; 16]>> {
    driver()?;
    let mut n = 0i32;
    // SAFETY: the driver is initialised; writes one int.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    (0..n).map(device_uuid).collect()
}

fn device_uuid(ordinal: i32) -> Result<[u8; 16]> {
    let mut dev: sys::CUdevice = 0;
    // SAFETY: the driver is initialised; writes one device handle.
    check("cuDeviceGet", unsafe {
        sys::cuDeviceGet(&mut dev, ordinal)
    })?;
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: writes 16 bytes into `uuid`.
    check("cuDeviceGetUuid", unsafe {
        sys::cuDeviceGetUuid(&mut uuid, dev)
    })?;
    Ok(uuid.bytes.map(|b| b as u8))
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as `nvidia-smi -L` prints it.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h = |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// A CUDA device loaded for handles: its primary context, a stream, its UUID, the export
/// caches and the IPC event pool. Cheap to share (`Arc`); one per device is enough.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    uuid: [u8; 16],
    exports: Mutex<ExportCache>,
    events: Arc<EventPool>,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ordinal())
            .field("uuid", &self.uuid_string())
            .finish()
    }
}

impl Cuda {
    /// Loads the driver (once per process), retains the primary context of device `ordinal`
    /// and makes a stream. Fails with an [`Unavailable`] reason (see [`unavailable`]) when
    /// there is no driver, no device, or the driver is too old; never panics for those.
    pub fn load(ordinal: usize) -> Result<Arc<Cuda>> {
        driver()?;
        let mut n = 0i32;
        // SAFETY: the driver is initialised; writes one int.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
        if ordinal >= n as usize {
            return Err(
                Unavailable::NoDevice(format!("device {ordinal} asked for, {n} visible")).into(),
            );
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::from(Unavailable::Driver(format!("context: {e}"))))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("cuStreamCreate", e.0))?;
        let uuid = device_uuid(ordinal as i32)?;
        Ok(Arc::new(Cuda {
            ctx,
            stream,
            uuid,
            exports: Mutex::new(ExportCache::default()),
            events: Arc::new(EventPool::new(MAX_EVENTS)),
        }))
    }

    /// The device ordinal in this process.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device UUID (the same in every process, whatever `CUDA_VISIBLE_DEVICES` says).
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// The UUID as `GPU-…`.
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }

    /// The cudarc context (primary context of the device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream this device's imports wait on and its kernels run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("cuCtxSetCurrent", e.0))
    }

    /// Waits until everything queued on [`Self::stream`] finished.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream belongs to the bound context and is alive.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.stream.cu_stream())
        })
    }

    /// How many exports of this `Cuda` are alive (each holds a pooled IPC event until it is
    /// dropped: a session drops it when the peer ACKs).
    pub fn exports_in_flight(&self) -> usize {
        let st = lock(&self.events.state);
        st.1 - st.0.len()
    }

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

    /// Imports a `cuda-ipc://` URI sent by `producer` (any id unique per producer session in
    /// this process, such as a counter per connection): opens the memory handle once per
    /// process (cached; a handle this process exported itself is used directly), makes
    /// [`Self::stream`] wait on the URI's event, and returns a view of the region.
    ///
    /// Refusals are `ERR_ATTACHMENT` naming the cause: not a `cuda-ipc` URI, a device this
    /// process does not see or that is not this `Cuda`'s, a handle that does not open (peer in
    /// another PID/IPC namespace, freed allocation, invalid handle), a region outside the
    /// allocation, an event that does not open.
    pub fn import(&self, producer: u64, uri: &AttachmentUri) -> Result<DeviceView> {
        let Target::CudaIpc {
            device_uuid,
            mem_handle,
            event,
        } = uri.target()
        else {
            return Err(attach_err(format!("not a cuda-ipc URI: {uri}")));
        };
        if *device_uuid != self.uuid {
            let visible = visible_devices().unwrap_or_default();
            return Err(attach_err(
                match visible.iter().position(|u| u == device_uuid) {
                    Some(i) => format!(
                        "the handle is on {} (device {i} here), this Cuda is device {} ({}): load \
                     Cuda for device {i}",
                        format_uuid(device_uuid),
                        self.ordinal(),
                        self.uuid_string()
                    ),
                    None => format!(
                        "device {} is not visible to this process (visible: {}); the producer \
                     runs on another device set (CUDA_VISIBLE_DEVICES) or another host",
                        format_uuid(device_uuid),
                        visible
                            .iter()
                            .map(format_uuid)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            ));
        }
        self.bind()?;
        let (base, size, hold): (u64, u64, Option<Arc<dyn std::any::Any + Send + Sync>>) =
            match local_export(device_uuid, mem_handle) {
                Some(local) => {
                    // Our own export: check that the allocation is still the one exported.
                    match buffer_id(local.base) {
                        Ok(id) if id == local.buffer_id => {}
                        _ => {
                            return Err(attach_err(
                                "the allocation behind this handle (exported by this process) was \
                             freed",
                            ))
                        }
                    }
                    (local.base, local.size, None)
                }
                None => {
                    let m =
                        lock(imports()).get_or_open(producer, *device_uuid, *mem_handle, || {
                            IpcMapping::open(&self.ctx, mem_handle)
                        })?;
                    (
                        m.base,
                        m.size,
                        Some(m as Arc<dyn std::any::Any + Send + Sync>),
                    )
                }
            };
        if uri.end() > size {
            return Err(attach_err(format!(
                "bytes {}..{} lie outside the allocation of {size} bytes",
                uri.offset(),
                uri.end()
            )));
        }
        if let Some(ev) = event {
            let local = lock(local_events()).get(ev).copied();
            let _opened;
            let raw = match local {
                // Our own pooled event (kept in the registry only while its pool lives).
                Some(raw) if hold.is_none() => raw as sys::CUevent,
                _ => {
                    let opened = lock(imports()).event(producer, *ev, || open_event(ev))?;
                    let raw = opened.0;
                    _opened = opened;
                    raw
                }
            };
            // An event that has already completed orders nothing: the producer's writes are
            // done and visible on this device. Skipping the stream wait then matters: measured
            // on an H200, a stream waiting on an IPC event took ~200 us more to drain than
            // the whole hand-off message. Otherwise the stream waits on it.
            // SAFETY: the event is alive: a pooled event of this process, or one opened and
            // held by the cache (and `_opened`) until after this call.
            let r = unsafe { sys::cuEventQuery(raw) };
            match r {
                sys::CUresult::CUDA_SUCCESS => {}
                sys::CUresult::CUDA_ERROR_NOT_READY => {
                    EVENT_WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // SAFETY: as above; the stream belongs to the bound context.
                    check("cuStreamWaitEvent", unsafe {
                        sys::cuStreamWaitEvent(self.stream.cu_stream(), raw, 0)
                    })?;
                }
                other => {
                    return Err(attach_err(format!(
                        "the producer's IPC event cannot be queried ({})",
                        result_name(other)
                    )))
                }
            }
        }
        Ok(DeviceView {
            ptr: base + uri.offset(),
            len: uri.size(),
            device_id: self.ordinal() as i32,
            _hold: hold,
            on_release: Mutex::new(None),
        })
    }
}

/// `cuMemGetAddressRange`: the base and size of the allocation that holds `ptr`.
fn address_range(ptr: u64) -> std::result::Result<(u64, u64), sys::CUresult> {
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
fn buffer_id(base: u64) -> Result<u64> {
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

fn open_event(ev: &[u8; 64]) -> Result<RawEvent> {
    let h = sys::CUipcEventHandle {
        reserved: ev.map(|b| b as _),
    };
    let mut raw: sys::CUevent = std::ptr::null_mut();
    // SAFETY: writes one event handle; the handle bytes are passed by value.
    let r = unsafe { sys::cuIpcOpenEventHandle(&mut raw, h) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(attach_err(format!(
            "the IPC event does not open ({}): the producer is gone, or in another PID/IPC \
             namespace",
            result_name(r)
        )));
    }
    Ok(RawEvent(raw))
}

/// A device allocation made by [`Cuda::alloc`]; freed on drop (after synchronising the
/// context, so queued work that uses it has finished).
pub struct DeviceBuffer {
    cuda: Arc<Cuda>,
    ptr: u64,
    len: usize,
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
    uri: AttachmentUri,
    record: ExportRecord,
    _event: Option<PooledEvent>,
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
    by_base: HashMap<u64, (u64, [u8; 64])>,
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
struct LocalExport {
    base: u64,
    size: u64,
    buffer_id: u64,
}

/// A memory handle as the caches key it: the device UUID and the handle bytes.
type HandleKey = ([u8; 16], [u8; 64]);

fn local_exports() -> &'static Mutex<HashMap<HandleKey, LocalExport>> {
    static M: OnceLock<Mutex<HashMap<HandleKey, LocalExport>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The IPC events of this process's pools by handle bytes (as `usize` of the `CUevent`), so
/// an import of our own export waits on the event itself (it is not opened by handle).
fn local_events() -> &'static Mutex<HashMap<[u8; 64], usize>> {
    static M: OnceLock<Mutex<HashMap<[u8; 64], usize>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

fn local_export(uuid: &[u8; 16], handle: &[u8; 64]) -> Option<LocalExport> {
    lock(local_exports()).get(&(*uuid, *handle)).copied()
}

/// A raw CUDA event handle, owned by whoever holds it.
#[derive(Debug)]
struct RawEvent(sys::CUevent);

// SAFETY: a CUevent is an opaque driver handle usable from any thread (with its context
// current); the driver synchronises its use.
unsafe impl Send for RawEvent {}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: the event was created or opened by this process and is destroyed once.
        let _ = unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// A bounded pool of IPC events (`CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING`).
struct EventPool {
    cap: usize,
    state: Mutex<(Vec<RawEvent>, usize)>,
}

impl EventPool {
    fn new(cap: usize) -> Self {
        EventPool {
            cap,
            state: Mutex::new((Vec::new(), 0)),
        }
    }

    fn take(self: &Arc<Self>, _ctx: &Arc<CudaContext>) -> Result<PooledEvent> {
        let mut st = lock(&self.state);
        if let Some(raw) = st.0.pop() {
            return Ok(PooledEvent {
                raw: Some(raw),
                pool: self.clone(),
            });
        }
        if st.1 >= self.cap {
            return Err(Error::protocol(
                ErrorCode::ERR_BUSY,
                format!(
                    "cuda export: {} IPC events in flight (MAX_EVENTS); wait for ACKs",
                    st.1
                ),
            ));
        }
        let mut raw: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: the caller bound the context; writes one event handle.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut raw, flags)
        })?;
        st.1 += 1;
        Ok(PooledEvent {
            raw: Some(RawEvent(raw)),
            pool: self.clone(),
        })
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        let st = lock(&self.state);
        let mine: HashSet<usize> = st.0.iter().map(|e| e.0 as usize).collect();
        lock(local_events()).retain(|_, raw| !mine.contains(raw));
    }
}

/// An event on loan from the pool; returned when dropped.
struct PooledEvent {
    raw: Option<RawEvent>,
    pool: Arc<EventPool>,
}

impl PooledEvent {
    fn raw(&self) -> sys::CUevent {
        self.raw.as_ref().map_or(std::ptr::null_mut(), |r| r.0)
    }
}

impl Drop for PooledEvent {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            lock(&self.pool.state).0.push(raw);
        }
    }
}

/// An opened IPC memory handle; closed (`cuIpcCloseMemHandle`) when the last holder drops it.
struct IpcMapping {
    ctx: Arc<CudaContext>,
    base: u64,
    size: u64,
}

impl IpcMapping {
    fn open(ctx: &Arc<CudaContext>, handle: &[u8; 64]) -> Result<IpcMapping> {
        let h = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as _),
        };
        let mut base: sys::CUdeviceptr = 0;
        // SAFETY: the context is bound by the caller; writes one device pointer.
        let r = unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut base,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(attach_err(format!(
                "the memory handle does not open ({}): the allocation was freed, the handle is \
                 invalid, or the producer runs in another PID/IPC namespace (a container \
                 without --ipc=host --pid=host)",
                result_name(r)
            )));
        }
        match address_range(base) {
            Ok((_, size)) => Ok(IpcMapping {
                ctx: ctx.clone(),
                base,
                size,
            }),
            Err(r) => {
                // SAFETY: `base` was just opened and is closed once, here.
                let _ = unsafe { sys::cuIpcCloseMemHandle(base) };
                Err(driver_err("cuMemGetAddressRange", r))
            }
        }
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `base` came from cuIpcOpenMemHandle in this context and is closed once.
        let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
    }
}

/// The consumer's process-wide cache of opened handles and events.
///
/// A memory handle is opened once per process however many producer sessions name it (CUDA
/// refuses a second open), and the entry remembers which producers use it;
/// [`ImportCache::release_producer`] drops a producer, and an entry no producer uses is
/// forgotten (the mapping closes when the last view of it is dropped). Events are cached per
/// producer. Generic over the mapping type so the bookkeeping is tested without a GPU.
#[derive(Debug)]
pub struct ImportCache<M> {
    maps: HashMap<HandleKey, (Arc<M>, HashSet<u64>)>,
    events: HashMap<(u64, [u8; 64]), Arc<dyn std::any::Any + Send + Sync>>,
}

impl<M> Default for ImportCache<M> {
    fn default() -> Self {
        ImportCache {
            maps: HashMap::new(),
            events: HashMap::new(),
        }
    }
}

impl<M> ImportCache<M> {
    /// The mapping of `(uuid, handle)`, opened with `open` the first time; records that
    /// `producer` uses it.
    pub fn get_or_open(
        &mut self,
        producer: u64,
        uuid: [u8; 16],
        handle: [u8; 64],
        open: impl FnOnce() -> Result<M>,
    ) -> Result<Arc<M>> {
        if let Some((m, users)) = self.maps.get_mut(&(uuid, handle)) {
            users.insert(producer);
            return Ok(m.clone());
        }
        let m = Arc::new(open()?);
        self.maps
            .insert((uuid, handle), (m.clone(), HashSet::from([producer])));
        Ok(m)
    }

    /// Forgets `producer`: its events and its use of every mapping; mappings nobody uses any
    /// more leave the cache. Returns how many mappings left.
    pub fn release_producer(&mut self, producer: u64) -> usize {
        self.events.retain(|(p, _), _| *p != producer);
        let before = self.maps.len();
        self.maps.retain(|_, (_, users)| {
            users.remove(&producer);
            !users.is_empty()
        });
        before - self.maps.len()
    }

    /// How many mappings are cached.
    pub fn mappings(&self) -> usize {
        self.maps.len()
    }

    fn event<E: Send + Sync + 'static>(
        &mut self,
        producer: u64,
        handle: [u8; 64],
        open: impl FnOnce() -> Result<E>,
    ) -> Result<Arc<E>> {
        if let Some(e) = self.events.get(&(producer, handle)) {
            if let Ok(e) = e.clone().downcast::<E>() {
                return Ok(e);
            }
        }
        let e = Arc::new(open()?);
        self.events.insert((producer, handle), e.clone());
        Ok(e)
    }
}

// SAFETY: the raw event is only used through the driver, which is thread-safe; shared
// references never mutate it.
unsafe impl Sync for RawEvent {}

fn imports() -> &'static Mutex<ImportCache<IpcMapping>> {
    static M: OnceLock<Mutex<ImportCache<IpcMapping>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// Forgets a producer session whose connection ended: its events are destroyed and the
/// mappings only it used are closed once their last view is dropped. Returns how many
/// mappings left the cache. Cheap, and a no-op without CUDA.
pub fn release_producer(producer: u64) -> usize {
    if driver().is_err() {
        return 0;
    }
    lock(imports()).release_producer(producer)
}

/// A view of device memory received by handle: pointer, length, device. Dropping it runs its
/// release hook (set with [`DeviceView::on_release`]: the session's ACK) and lets the mapping
/// close once its producer is released.
pub struct DeviceView {
    ptr: u64,
    len: u64,
    device_id: i32,
    _hold: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// In a mutex only so that the view is `Sync` (shared by `Arc` in a received message).
    on_release: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl fmt::Debug for DeviceView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceView({:#x}, {} bytes, cuda:{})",
            self.ptr, self.len, self.device_id
        )
    }
}

impl DeviceView {
    /// The device pointer of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the view has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device ordinal in this process.
    pub fn device_id(&self) -> i32 {
        self.device_id
    }

    /// Whether the pointer is the producer's own (a handle this process exported).
    pub fn is_local(&self) -> bool {
        self._hold.is_none()
    }

    /// Sets what runs when the view is dropped (typically: ACK the message that carried it).
    pub fn on_release(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_release = Mutex::new(Some(Box::new(f)));
        self
    }

    /// Hands the view to a DLPack consumer as a `kDLCUDA` tensor of `dtype` and `shape`
    /// (compact row-major), marked read-only. The tensor owns the view: its deleter drops it,
    /// which runs the release hook. `Error::Invalid` when the shape addresses more bytes than
    /// the view has.
    pub fn into_dlpack(
        self,
        dtype: DlDataType,
        shape: Vec<i64>,
    ) -> Result<*mut DLManagedTensorVersioned> {
        let device = DLDevice {
            device_type: DEVICE_CUDA,
            device_id: self.device_id,
        };
        let (ptr, len) = (self.ptr, self.len);
        device_tensor(ptr, len, device, dtype, shape, self)
    }
}

impl Drop for DeviceView {
    fn drop(&mut self) {
        let hook = self
            .on_release
            .get_mut()
            .map_or_else(|p| p.into_inner().take(), Option::take);
        if let Some(f) = hook {
            f();
        }
    }
}

/// The allocation properties of a VMM allocation on device `ordinal` that can be exported as a
/// POSIX file descriptor.
fn vmm_prop(ordinal: i32) -> sys::CUmemAllocationProp {
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
fn vmm_map(handle: sys::CUmemGenericAllocationHandle, size: usize, ordinal: i32) -> Result<u64> {
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
struct VmmMapping {
    ctx: Arc<CudaContext>,
    ptr: u64,
    size: usize,
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
    cuda: Arc<Cuda>,
    handle: sys::CUmemGenericAllocationHandle,
    mapping: VmmMapping,
    len: usize,
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
struct DeviceCtx<O> {
    _owner: O,
    shape: Vec<i64>,
    strides: Vec<i64>,
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
unsafe extern "C" fn device_deleter<O>(t: *mut DLManagedTensorVersioned) {
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

/// This process's PID and IPC namespaces (`/proc/self/ns/{pid,ipc}` link targets), so a
/// producer can send them and a consumer refuse a handle from another namespace up front,
/// where legacy CUDA IPC would fail.
pub fn namespaces() -> String {
    let ns = |n: &str| {
        std::fs::read_link(format!("/proc/self/ns/{n}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!("{} {}", ns("pid"), ns("ipc"))
}

/// Compares a peer's [`namespaces`] string with ours: `ERR_ATTACHMENT` naming the difference.
pub fn check_peer_namespaces(peer: &str) -> Result<()> {
    let ours = namespaces();
    if peer == ours {
        Ok(())
    } else {
        Err(attach_err(format!(
            "the producer runs in other PID/IPC namespaces ({peer:?}, ours {ours:?}): CUDA IPC \
             handles cannot be opened across them (run both with --ipc=host --pid=host)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn uri_from_an_export_record() {
        let rec = ExportRecord {
            device_uuid: [0x11; 16],
            mem_handle: [0xab; 64],
            base: 0x7f00_0000_0000,
            alloc_size: 1 << 20,
            ptr: 0x7f00_0000_1000,
            len: 4096,
        };
        let u = rec.uri(Some([0x0c; 64])).unwrap();
        assert_eq!((u.offset(), u.size()), (0x1000, 4096));
        let text = u.to_string();
        assert!(text.starts_with("cuda-ipc://GPU-11111111-1111-1111-1111-111111111111/abab"));
        assert!(text.ends_with(&format!("?event={}#4096,4096", "0c".repeat(64))));
        assert_eq!(AttachmentUri::parse(&text).unwrap(), u);
        // Outside the allocation: refused before any URI is made.
        let bad = ExportRecord {
            len: (1 << 20) - 0x1000 + 1,
            ..rec.clone()
        };
        assert!(bad.uri(None).is_err());
        let below = ExportRecord {
            ptr: rec.base - 1,
            ..rec
        };
        assert!(below.check().is_err());
    }

    #[test]
    fn export_cache_is_keyed_by_base_and_buffer_id() {
        let mut c = ExportCache::default();
        c.insert(0x1000, 7, [1; 64]);
        assert_eq!(c.get(0x1000, 7), Some([1; 64]));
        // The same base after a free and a new allocation: another buffer id, no stale handle.
        assert_eq!(c.get(0x1000, 8), None);
        c.insert(0x1000, 8, [2; 64]);
        assert_eq!(c.get(0x1000, 8), Some([2; 64]));
        assert_eq!(c.len(), 1);
        c.remove_base(0x1000);
        assert!(c.is_empty());
    }

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn import_cache_opens_once_and_closes_after_the_last_producer() {
        let closed = Arc::new(AtomicUsize::new(0));
        let opens = AtomicUsize::new(0);
        let mut cache: ImportCache<Counted> = ImportCache::default();
        let open = || {
            opens.fetch_add(1, Ordering::SeqCst);
            Ok(Counted(closed.clone()))
        };
        let (u, h) = ([9u8; 16], [3u8; 64]);
        let a = cache.get_or_open(1, u, h, open).unwrap();
        let b = cache.get_or_open(2, u, h, open).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "a second producer reuses the one open");
        assert_eq!(opens.load(Ordering::SeqCst), 1);
        // Another handle or another device is another mapping.
        cache.get_or_open(1, u, [4; 64], open).unwrap();
        cache.get_or_open(1, [8; 16], h, open).unwrap();
        assert_eq!((opens.load(Ordering::SeqCst), cache.mappings()), (3, 3));
        // A failed open caches nothing.
        let err = cache.get_or_open(1, u, [5; 64], || Err(attach_err("no")));
        assert!(err.is_err());
        assert_eq!(cache.mappings(), 3);

        drop((a, b));
        assert_eq!(cache.release_producer(1), 2, "the two only producer 1 used");
        assert_eq!(closed.load(Ordering::SeqCst), 2);
        assert_eq!(cache.mappings(), 1);
        assert_eq!(cache.release_producer(2), 1);
        assert_eq!(closed.load(Ordering::SeqCst), 3);
        assert_eq!(cache.release_producer(2), 0);

        // A view that outlives its producer keeps the mapping until it is dropped.
        let v = cache.get_or_open(3, u, h, open).unwrap();
        cache.release_producer(3);
        assert_eq!(closed.load(Ordering::SeqCst), 3);
        drop(v);
        assert_eq!(closed.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn import_cache_events_are_per_producer() {
        let mut cache: ImportCache<()> = ImportCache::default();
        let opens = AtomicUsize::new(0);
        let open = || {
            opens.fetch_add(1, Ordering::SeqCst);
            Ok(5u32)
        };
        let e1 = cache.event(1, [1; 64], open).unwrap();
        let e2 = cache.event(1, [1; 64], open).unwrap();
        assert!(Arc::ptr_eq(&e1, &e2));
        cache.event(2, [1; 64], open).unwrap();
        assert_eq!(opens.load(Ordering::SeqCst), 2);
        cache.release_producer(1);
        cache.event(1, [1; 64], open).unwrap();
        assert_eq!(opens.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn dlpack_cuda_tensor_fields_and_deleter() {
        let drops = Arc::new(AtomicUsize::new(0));
        let dev = DLDevice {
            device_type: DEVICE_CUDA,
            device_id: 3,
        };
        let ptr = 0x7f12_3400_0000u64;
        let t = device_tensor(
            ptr,
            24,
            dev,
            DlDataType::F32,
            vec![2, 3],
            Counted(drops.clone()),
        )
        .unwrap();
        // SAFETY: `t` was just made and is owned by this test until its deleter runs.
        unsafe {
            let m = &*t;
            assert_eq!(m.version, DLPackVersion { major: 1, minor: 0 });
            assert_eq!(m.flags, DLPACK_FLAG_BITMASK_READ_ONLY);
            assert_eq!(m.dl_tensor.data as usize as u64, ptr);
            assert_eq!(m.dl_tensor.device, dev);
            assert_eq!((m.dl_tensor.ndim, m.dl_tensor.byte_offset), (2, 0));
            assert_eq!(
                (
                    m.dl_tensor.dtype.code,
                    m.dl_tensor.dtype.bits,
                    m.dl_tensor.dtype.lanes
                ),
                (2, 32, 1)
            );
            assert_eq!(std::slice::from_raw_parts(m.dl_tensor.shape, 2), &[2, 3]);
            assert_eq!(std::slice::from_raw_parts(m.dl_tensor.strides, 2), &[3, 1]);
            assert_eq!(drops.load(Ordering::SeqCst), 0);
            (m.deleter.unwrap())(t);
        }
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the owner went with the tensor"
        );
        // Too many bytes for the view, and a bad dtype, are refused (and drop the owner).
        let e = device_tensor(ptr, 23, dev, DlDataType::F32, vec![2, 3], ()).unwrap_err();
        assert!(e.to_string().contains("addresses 24 bytes"), "{e}");
        assert!(device_tensor(ptr, 8, dev, DlDataType::new(99, 8, 1), vec![1], ()).is_err());
    }

    #[test]
    fn dlpack_descriptor_of_a_device_tensor_by_handle() {
        let rec = ExportRecord {
            device_uuid: [0x22; 16],
            mem_handle: [0x33; 64],
            base: 0x1000,
            alloc_size: 4096,
            ptr: 0x1100,
            len: 64,
        };
        let uri = rec.uri(Some([0x44; 64])).unwrap();
        let d = cuda_descriptor(uri.clone(), 1, DlDataType::F16, vec![4, 8]).unwrap();
        assert_eq!((d.device_type, d.device_id), (DEVICE_CUDA, 1));
        assert_eq!(d.strides, vec![8, 1]);
        // The SPEC §5.5 body round-trips, the URI with it.
        let back = DlpackDescriptor::decode(d.encode().unwrap()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.data, DlData::Uri(uri.clone()));
        // 4 x 9 f16 = 72 bytes > 64: refused; so is a host scheme.
        assert!(cuda_descriptor(uri, 1, DlDataType::F16, vec![4, 9]).is_err());
        let shm = AttachmentUri::shm("xcp-x", 0, 64).unwrap();
        assert!(cuda_descriptor(shm, 0, DlDataType::U8, vec![64]).is_err());
    }

    #[test]
    fn dlpack_strided_device_tensor_checks_offset_and_strides() {
        let dev = DLDevice {
            device_type: DEVICE_CUDA,
            device_id: 0,
        };
        // A 2 x 2 f32 column of a 2 x 4 matrix, 8 bytes in: strides (4, 1), extent
        // 8 + (1·4 + 1·1 + 1)·4 = 32 bytes.
        let t = device_tensor_strided(
            0x9000,
            32,
            dev,
            DlDataType::F32,
            vec![2, 2],
            Some(vec![4, 1]),
            8,
            (),
        )
        .unwrap();
        // SAFETY: `t` was just made; its deleter runs once below.
        unsafe {
            assert_eq!((*t).dl_tensor.byte_offset, 8);
            assert_eq!(
                std::slice::from_raw_parts((*t).dl_tensor.strides, 2),
                &[4, 1]
            );
            ((*t).deleter.unwrap())(t);
        }
        let e = device_tensor_strided(
            0x9000,
            31,
            dev,
            DlDataType::F32,
            vec![2, 2],
            Some(vec![4, 1]),
            8,
            (),
        )
        .unwrap_err();
        assert!(e.to_string().contains("addresses 32 bytes"), "{e}");
    }

    #[test]
    fn unavailable_is_typed_inside_the_error() {
        let e: Error = Unavailable::LibraryNotFound.into();
        assert_eq!(unavailable(&e), Some(&Unavailable::LibraryNotFound));
        assert!(e.to_string().contains("libcuda.so"), "{e}");
        assert_eq!(unavailable(&Error::invalid("x")), None);
    }

    #[test]
    fn load_never_panics_and_says_why() {
        match Cuda::load(0) {
            Ok(c) => println!("CUDA present: {c:?}"),
            Err(e) => {
                let why = unavailable(&e).expect("a typed reason");
                println!("skipped: {why}");
            }
        }
        // A second call gives the same outcome (the probe runs once).
        assert_eq!(probe().is_ok(), Cuda::load(0).is_ok() || probe().is_ok());
    }

    #[test]
    fn vmm_sizes_round_up_to_the_granularity() {
        assert_eq!(round_to_granularity(1, 2 << 20), Some(2 << 20));
        assert_eq!(round_to_granularity(2 << 20, 2 << 20), Some(2 << 20));
        assert_eq!(round_to_granularity((2 << 20) + 1, 2 << 20), Some(4 << 20));
        assert_eq!(round_to_granularity(0, 0), Some(1));
        assert_eq!(round_to_granularity(u64::MAX, 1 << 21), None);
    }

    #[test]
    fn namespaces_of_this_process_match() {
        let ns = namespaces();
        check_peer_namespaces(&ns).unwrap();
        let e = check_peer_namespaces("pid:[1] ipc:[2]").unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
        assert_eq!(
            format_uuid(&[0xab; 16]),
            "GPU-abababab-abab-abab-abab-abababababab"
        );
    }

    /// The session's resolver of `cuda-ipc://` attachments refuses, with `ERR_ATTACHMENT`
    /// naming the cause, a URI whose scheme was not negotiated and one naming a device this
    /// process does not see (on a machine without CUDA: CUDA not usable); the lease of a
    /// refused message is never released by it.
    #[test]
    fn session_resolver_refusals() {
        use crate::attach::{Lease, Mapper, Scheme};
        let uri = AttachmentUri::parse(&format!(
            "cuda-ipc://GPU-00000000-0000-0000-0000-0000000000ff/{}#0,16",
            "ab".repeat(64)
        ))
        .unwrap();
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let lease = Lease::new(9, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        let mut no_cuda = Mapper::new(vec![Scheme::Shm], "xcp-x-");
        let e = no_cuda.resolve_device(&uri, &lease).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
        assert!(e.to_string().contains("not negotiated"), "{e}");
        let mut cuda = Mapper::new(vec![Scheme::CudaIpc], "");
        let e = cuda.resolve_device(&uri, &lease).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
        let why = e.to_string();
        assert!(
            why.contains("not usable in this process") || why.contains("is not visible"),
            "{why}"
        );
        // A host URI is not a device one.
        let shm = AttachmentUri::parse("shm://xcp-x-1#0,1").unwrap();
        assert!(cuda.resolve_device(&shm, &lease).is_err());
        // And the host resolver does not take device URIs.
        let e = cuda.resolve(&uri, &[], &lease).unwrap_err();
        assert!(e.to_string().contains("no host view"), "{e}");
        drop(lease);
        assert_eq!(
            released.load(Ordering::SeqCst),
            1,
            "the lease itself still works"
        );
    }
}
