//! IPC events: the bounded pool the producer records from, and opening the peer's.

use super::*;

pub(super) static EVENT_WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many imports in this process found the producer's event not yet completed, so that
/// the device's stream had to wait on it (the rest found the writes done already).
pub fn event_waits() -> u64 {
    EVENT_WAITS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(super) fn open_event(ev: &[u8; 64]) -> Result<RawEvent> {
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

/// A raw CUDA event handle, owned by whoever holds it.
#[derive(Debug)]
pub(super) struct RawEvent(pub(super) sys::CUevent);

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
pub(super) struct EventPool {
    pub(super) cap: usize,
    pub(super) state: Mutex<(Vec<RawEvent>, usize)>,
}

impl EventPool {
    pub(super) fn new(cap: usize) -> Self {
        EventPool {
            cap,
            state: Mutex::new((Vec::new(), 0)),
        }
    }

    pub(super) fn take(self: &Arc<Self>, _ctx: &Arc<CudaContext>) -> Result<PooledEvent> {
        let mut st = lock(&self.state);
        if let Some(raw) = st.0.pop() {
            return Ok(PooledEvent {
                raw: Some(raw),
                pool: self.clone(),
            });
        }
        if st.1 >= self.cap {
            return Err(Error::protocol(
                crate::Violation::Limit,
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
pub(super) struct PooledEvent {
    pub(super) raw: Option<RawEvent>,
    pub(super) pool: Arc<EventPool>,
}

impl PooledEvent {
    pub(super) fn raw(&self) -> sys::CUevent {
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

// SAFETY: the raw event is only used through the driver, which is thread-safe; shared
// references never mutate it.
unsafe impl Sync for RawEvent {}
