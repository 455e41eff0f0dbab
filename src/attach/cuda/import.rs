//! Imports: each peer handle opened once per process ([`ImportCache`]), and the
//! [`DeviceView`]s handed to the application.

use super::*;

impl Cuda {
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

/// An opened IPC memory handle; closed (`cuIpcCloseMemHandle`) when the last holder drops it.
pub(super) struct IpcMapping {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) base: u64,
    pub(super) size: u64,
}

impl IpcMapping {
    pub(super) fn open(ctx: &Arc<CudaContext>, handle: &[u8; 64]) -> Result<IpcMapping> {
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
    pub(super) maps: HashMap<HandleKey, (Arc<M>, HashSet<u64>)>,
    pub(super) events: HashMap<(u64, [u8; 64]), Arc<dyn std::any::Any + Send + Sync>>,
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

    pub(super) fn event<E: Send + Sync + 'static>(
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

pub(super) fn imports() -> &'static Mutex<ImportCache<IpcMapping>> {
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
    pub(super) ptr: u64,
    pub(super) len: u64,
    pub(super) device_id: i32,
    pub(super) _hold: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// In a mutex only so that the view is `Sync` (shared by `Arc` in a received message).
    pub(super) on_release: Mutex<Option<Box<dyn FnOnce() + Send>>>,
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
