//! Loading the driver, the devices, and [`Cuda`]: one device's context and stream.

use super::*;

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
pub(super) fn driver_err(call: &str, r: sys::CUresult) -> Error {
    Error::Io(std::io::Error::other(format!("{call}: {}", result_name(r))))
}

/// A refused attachment: `ERR_ATTACHMENT` naming the cause.
pub(super) fn attach_err(detail: impl fmt::Display) -> Error {
    Error::attachment(format!("cuda-ipc: {detail}"))
}

/// `CUDA_ERROR_…` name of a result code (the driver is loaded whenever this is called).
pub(super) fn result_name(r: sys::CUresult) -> String {
    let e = cudarc::driver::result::DriverError(r);
    match e.error_name() {
        Ok(n) => format!("{} ({})", n.to_string_lossy(), r as i32),
        Err(_) => format!("{r:?}"),
    }
}

pub(super) fn check(call: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_err(call, r))
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Loads the driver library and runs `cuInit` once per process; every later call returns the
/// same outcome.
pub(super) fn driver() -> std::result::Result<i32, Unavailable> {
    static STATE: OnceLock<std::result::Result<i32, Unavailable>> = OnceLock::new();
    STATE.get_or_init(init_driver).clone()
}

pub(super) fn init_driver() -> std::result::Result<i32, Unavailable> {
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

pub(super) fn device_uuid(ordinal: i32) -> Result<[u8; 16]> {
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
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) uuid: [u8; 16],
    pub(super) exports: Mutex<ExportCache>,
    pub(super) events: Arc<EventPool>,
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

    pub(super) fn bind(&self) -> Result<()> {
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
