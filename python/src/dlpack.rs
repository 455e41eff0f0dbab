//! DLPack for host memory (issue 21): `__dlpack__` capsules over our regions and views, and
//! the tensors `send_tensor` takes from any object with `__dlpack__`.
//!
//! Export (producer): [`capsule`] makes a PyCapsule named "dltensor_versioned" (a
//! `DLManagedTensorVersioned`, DLPack 1.0, when the consumer passed `max_version` with a
//! major >= 1) or "dltensor" (the legacy `DLManagedTensor`). The managed tensor's context
//! holds the Python object whose memory it points into (a `Region` or a `View`) and counts as
//! one of its exports, so the memory stays mapped, and a view's ACK waits, until the tensor's
//! deleter runs. The deleter runs exactly once: by the consumer, which renames the capsule
//! "used_dltensor[_versioned]" and owns the tensor from then on, or, for a capsule nobody
//! consumed, by the capsule's destructor (which checks the name first).
//!
//! Import (consumer): [`import`] asks an object for its capsule and reads the `DLTensor`
//! without taking ownership: the capsule is kept unconsumed (so its own destructor frees the
//! tensor), and the data pointer stays valid while it is alive.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicIsize, Ordering};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use xcp::attach::dlpack_ffi::{
    DLDataType, DLDevice, DLManagedTensorVersioned, DLPackVersion, DLTensor,
    DLPACK_FLAG_BITMASK_IS_COPIED, DLPACK_FLAG_BITMASK_READ_ONLY,
};
use xcp::codec::dlpack::{DEVICE_CPU, DEVICE_CUDA_HOST};

use crate::{raise, type_name, Region, View};

/// The capsule names of the DLPack Python protocol.
const NAME_VERSIONED: &CStr = c"dltensor_versioned";
const NAME_LEGACY: &CStr = c"dltensor";

/// The legacy (pre-1.0) `DLManagedTensor`: a tensor, its owner's context and its deleter.
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// Managed tensors exported and not deleted yet (a test hook: `_xcp._dlpack_live()`).
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// How many exported managed tensors are alive (their deleter has not run).
#[pyfunction]
pub(crate) fn _dlpack_live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// Element types.

/// The dtype names xcp knows, as DLPack `(code, bits)` (one lane).
const DTYPES: &[(&str, u8, u8)] = &[
    ("bool", 6, 8),
    ("int8", 0, 8),
    ("int16", 0, 16),
    ("int32", 0, 32),
    ("int64", 0, 64),
    ("uint8", 1, 8),
    ("uint16", 1, 16),
    ("uint32", 1, 32),
    ("uint64", 1, 64),
    ("float16", 2, 16),
    ("float32", 2, 32),
    ("float64", 2, 64),
    ("bfloat16", 4, 16),
    ("complex64", 5, 64),
    ("complex128", 5, 128),
];

/// The DLPack dtype of a name ("float32"; "torch.float32" too).
pub(crate) fn dtype_of(name: &str) -> Option<DLDataType> {
    let name = name.strip_prefix("torch.").unwrap_or(name);
    let name = match name {
        "half" => "float16",
        "float" => "float32",
        "double" => "float64",
        "long" => "int64",
        "int" => "int32",
        other => other,
    };
    DTYPES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, code, bits)| DLDataType {
            code,
            bits,
            lanes: 1,
        })
}

/// The name of a DLPack dtype, if xcp knows it.
pub(crate) fn name_of(dt: DLDataType) -> Option<&'static str> {
    if dt.lanes != 1 {
        return None;
    }
    DTYPES
        .iter()
        .find(|(_, code, bits)| *code == dt.code && *bits == dt.bits)
        .map(|(n, _, _)| *n)
}

/// Bytes per element of a known dtype.
pub(crate) fn itemsize(dt: DLDataType) -> usize {
    usize::from(dt.bits) / 8
}

/// The dtype name of a `dtype` argument: a str ("float32"), a numpy dtype or scalar type
/// (`np.float32`), or a torch dtype (`torch.float32`).
pub(crate) fn dtype_arg(dtype: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    let text: String = if let Ok(s) = dtype.extract::<String>() {
        s
    } else if let Ok(n) = dtype
        .getattr("__name__")
        .and_then(|n| n.extract::<String>())
    {
        n
    } else {
        dtype.str()?.to_string()
    };
    dtype_of(&text).and_then(name_of).ok_or_else(|| {
        let known: Vec<&str> = DTYPES.iter().map(|d| d.0).collect();
        raise(
            "InvalidError",
            format!(
                "dtype={text:?}: not a dtype xcp knows ({})",
                known.join(", ")
            ),
        )
    })
}

/// The byte size of `shape` elements of `dt` (checked), and the shape as the u32 list an
/// attachment carries.
pub(crate) fn layout(shape: &[i64], dt: DLDataType) -> PyResult<(usize, Vec<u32>)> {
    let mut n: usize = itemsize(dt);
    let mut dims = Vec::with_capacity(shape.len());
    for (i, &d) in shape.iter().enumerate() {
        let d32 = u32::try_from(d).map_err(|_| {
            raise(
                "InvalidError",
                format!("shape[{i}]={d}: dimensions are 0..=4294967295"),
            )
        })?;
        n = n.checked_mul(d32 as usize).ok_or_else(|| {
            raise(
                "InvalidError",
                format!("shape {shape:?}: the tensor's size overflows"),
            )
        })?;
        dims.push(d32);
    }
    Ok((n, dims))
}

// ---------------------------------------------------------------------------------------------
// Export.

/// What an exported tensor keeps alive.
pub(crate) enum Keep {
    /// A region of ours (writable).
    Region(Py<Region>),
    /// A received view (read-only).
    View(Py<View>),
    /// A copy made for a `copy=True` consumer.
    Copied(#[allow(dead_code)] Vec<u8>),
}

/// The context of an exported managed tensor: what it points into, and its shape and strides.
struct Ctx {
    keep: Keep,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        match &self.keep {
            Keep::Region(r) => r.get().unexport(),
            Keep::View(v) => v.get().unexport(),
            Keep::Copied(_) => {}
        }
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees a context; the Python reference it holds is dropped attached to Python where the
/// interpreter still runs (else pyo3 defers it).
fn free_ctx(ctx: Box<Ctx>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _ = Python::try_attach(move |_py| drop(ctx));
    }));
}

/// The deleter of versioned tensors made by [`capsule`].
unsafe extern "C" fn delete_versioned(t: *mut DLManagedTensorVersioned) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` was made by `Box::into_raw` in `capsule`; DLPack's contract is that the
    // deleter runs once, after which nobody touches the tensor.
    let managed = unsafe { Box::from_raw(t) };
    if !managed.manager_ctx.is_null() {
        // SAFETY: `manager_ctx` is the `Box<Ctx>` made in `capsule`, freed only here.
        free_ctx(unsafe { Box::from_raw(managed.manager_ctx.cast::<Ctx>()) });
    }
}

/// The deleter of legacy tensors made by [`capsule`].
unsafe extern "C" fn delete_legacy(t: *mut DLManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: as for `delete_versioned`.
    let managed = unsafe { Box::from_raw(t) };
    if !managed.manager_ctx.is_null() {
        // SAFETY: as for `delete_versioned`.
        free_ctx(unsafe { Box::from_raw(managed.manager_ctx.cast::<Ctx>()) });
    }
}

/// The destructor of a versioned capsule: deletes the tensor unless a consumer took it.
unsafe extern "C" fn destroy_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with the capsule being destroyed (and the GIL held).
    // IsValid/GetPointer with the right name set no error; a renamed ("used_") capsule is
    // the consumer's, who calls the deleter itself.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, NAME_VERSIONED.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(cap, NAME_VERSIONED.as_ptr())
                .cast::<DLManagedTensorVersioned>();
            if let Some(d) = (*t).deleter {
                d(t);
            }
        }
    }
}

/// The destructor of a legacy capsule: deletes the tensor unless a consumer took it.
unsafe extern "C" fn destroy_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: as for `destroy_versioned`.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, NAME_LEGACY.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(cap, NAME_LEGACY.as_ptr()).cast::<DLManagedTensor>();
            if let Some(d) = (*t).deleter {
                d(t);
            }
        }
    }
}

/// The arguments of `__dlpack__`, checked: whether the consumer wants the versioned capsule,
/// and whether it wants a copy.
pub(crate) fn protocol_args(
    stream: Option<&Bound<'_, PyAny>>,
    max_version: Option<&Bound<'_, PyAny>>,
    dl_device: Option<&Bound<'_, PyAny>>,
    copy: Option<bool>,
) -> PyResult<(bool, bool)> {
    if let Some(s) = stream {
        if !s.is_none() && s.extract::<i64>().ok() != Some(-1) {
            return Err(PyBufferError::new_err(
                "__dlpack__: stream must be None (or -1) for CPU memory",
            ));
        }
    }
    let versioned = match max_version {
        None => false,
        Some(v) if v.is_none() => false,
        Some(v) => {
            let (major, _minor): (u32, u32) = v.extract().map_err(|_| {
                PyTypeError::new_err("__dlpack__: max_version must be a (major, minor) tuple")
            })?;
            major >= 1
        }
    };
    if let Some(d) = dl_device {
        if !d.is_none() {
            let (t, id): (i32, i32) = d.extract().map_err(|_| {
                PyTypeError::new_err("__dlpack__: dl_device must be a (device_type, id) tuple")
            })?;
            if t != DEVICE_CPU || id != 0 {
                return Err(PyBufferError::new_err(format!(
                    "__dlpack__: dl_device=({t}, {id}): this memory is on the CPU (1, 0) and \
                     xcp does not move it"
                )));
            }
        }
    }
    Ok((versioned, copy == Some(true)))
}

/// `(kDLCPU, 0)`, the answer of `__dlpack_device__`.
pub(crate) fn cpu_device(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    PyTuple::new(py, [DEVICE_CPU, 0])
}

/// A DLPack capsule over `len` bytes at `ptr` laid out as `shape` of `dtype`, compact
/// row-major. `keep` is the object the memory belongs to (its export was counted by the
/// caller; the tensor's deleter uncounts it). `copy` gives the consumer a writable copy of the
/// bytes instead (and the export is dropped at once).
#[allow(clippy::too_many_arguments)]
pub(crate) fn capsule<'py>(
    py: Python<'py>,
    keep: Keep,
    ptr: *const u8,
    len: usize,
    shape: Vec<i64>,
    dtype: DLDataType,
    readonly: bool,
    versioned: bool,
    copy: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut strides = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for (s, &d) in strides.iter_mut().zip(&shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(d.max(1));
    }
    LIVE.fetch_add(1, Ordering::SeqCst);
    let (keep, data, flags) = if copy {
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable (its export is counted
        // and `keep` is alive until this returns).
        let mut v = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        let p = v.as_mut_ptr();
        // The export over the original is over: its context goes now (uncounting it).
        LIVE.fetch_add(1, Ordering::SeqCst);
        drop(Ctx {
            keep,
            shape: Vec::new(),
            strides: Vec::new(),
        });
        (Keep::Copied(v), p, DLPACK_FLAG_BITMASK_IS_COPIED)
    } else {
        let flags = if readonly {
            DLPACK_FLAG_BITMASK_READ_ONLY
        } else {
            0
        };
        (keep, ptr.cast_mut(), flags)
    };
    let mut ctx = Box::new(Ctx {
        keep,
        shape,
        strides,
    });
    let dl_tensor = DLTensor {
        data: data.cast(),
        device: DLDevice {
            device_type: DEVICE_CPU,
            device_id: 0,
        },
        ndim: ctx.shape.len() as i32,
        dtype,
        // The vectors' heap buffers do not move when the box becomes a raw pointer.
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let ctx = Box::into_raw(ctx).cast::<c_void>();
    let made = if versioned {
        let t = Box::into_raw(Box::new(DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: ctx,
            deleter: Some(delete_versioned),
            flags,
            dl_tensor,
        }));
        // SAFETY: `t` is a live managed tensor; the capsule owns it until a consumer renames
        // the capsule, and `destroy_versioned` frees it otherwise. A failed PyCapsule_New
        // returns null with an exception set, and we free the tensor ourselves then.
        let cap = unsafe {
            ffi::PyCapsule_New(t.cast(), NAME_VERSIONED.as_ptr(), Some(destroy_versioned))
        };
        if cap.is_null() {
            // SAFETY: no capsule took `t`, so it is still ours alone.
            unsafe { delete_versioned(t) };
        }
        cap
    } else {
        let t = Box::into_raw(Box::new(DLManagedTensor {
            dl_tensor,
            manager_ctx: ctx,
            deleter: Some(delete_legacy),
        }));
        // SAFETY: as above, for the legacy struct.
        let cap =
            unsafe { ffi::PyCapsule_New(t.cast(), NAME_LEGACY.as_ptr(), Some(destroy_legacy)) };
        if cap.is_null() {
            // SAFETY: as above.
            unsafe { delete_legacy(t) };
        }
        cap
    };
    // SAFETY: `made` is a new reference or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, made) }
}

// ---------------------------------------------------------------------------------------------
// Import.

/// A host tensor taken from an object's `__dlpack__`: its capsule (unconsumed, so the data
/// stays valid while it is alive) and its compact layout.
pub(crate) struct Imported {
    /// Keeps the producer's tensor alive; its destructor deletes it.
    pub(crate) _capsule: Py<PyAny>,
    /// The address of the first element.
    pub(crate) addr: usize,
    /// Bytes of the tensor (compact).
    pub(crate) nbytes: usize,
    pub(crate) dtype: &'static str,
    pub(crate) shape: Vec<u32>,
}

impl Imported {
    /// The tensor's bytes.
    ///
    /// The slice is valid while `self` (its capsule) is alive: DLPack guarantees the data
    /// until the tensor's deleter runs, which happens only when the capsule is destroyed.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.nbytes == 0 {
            return &[];
        }
        // SAFETY: `addr` is the producer's first element and the tensor is compact, so
        // `nbytes` bytes from there are its data, readable host memory (device checked in
        // `import`) until the deleter runs, which waits for `self._capsule`.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.nbytes) }
    }
}

/// Device names for messages.
fn device_name(t: i32) -> &'static str {
    match t {
        2 => "CUDA",
        4 => "OpenCL",
        7 => "Vulkan",
        8 => "Metal",
        9 => "VPI",
        10 => "ROCm",
        13 => "CUDA managed",
        14 => "oneAPI",
        _ => "a device",
    }
}

/// The `xcp.InvalidError` of a device tensor.
fn device_error(t: i32, id: i32) -> PyErr {
    raise(
        "InvalidError",
        format!(
            "send_tensor: the tensor is on device ({t}, {id}) ({}), not in host memory: only \
             CPU tensors can be sent for now (device tensors by cuda-ipc are a later step); \
             move it to the host first (tensor.cpu())",
            device_name(t)
        ),
    )
}

/// Takes the host tensor of an object with `__dlpack__` (numpy arrays, torch CPU tensors,
/// our own regions and views). Refused with `xcp.InvalidError`: no `__dlpack__`, a device
/// other than the CPU (or CUDA host memory), an unknown dtype, and a layout that is not
/// compact row-major (non-contiguous or negative strides, or a byte offset the attachment
/// cannot carry).
pub(crate) fn import(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Imported> {
    if !obj.hasattr("__dlpack__")? {
        return Err(raise(
            "InvalidError",
            format!(
                "send_tensor: {} has no __dlpack__ (numpy arrays, torch tensors and xcp \
                 regions do)",
                type_name(obj)
            ),
        ));
    }
    // Ask for the device first: a device tensor's __dlpack__ may synchronize streams.
    if let Ok(dev) = obj.call_method0("__dlpack_device__") {
        if let Ok((t, id)) = dev.extract::<(i32, i32)>() {
            if t != DEVICE_CPU && t != DEVICE_CUDA_HOST {
                return Err(device_error(t, id));
            }
        }
    }
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("max_version", (1u32, 0u32))?;
    let cap = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(c) => c,
        // A producer from before DLPack 1.0 has no max_version.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__")?,
        Err(e) => return Err(e),
    };
    let p = cap.as_ptr();
    // SAFETY: `p` is a live object (we hold `cap`); PyCapsule_GetName sets an error for a
    // non-capsule, which `PyErr::take` clears.
    let name = unsafe { ffi::PyCapsule_GetName(p) };
    if name.is_null() {
        let _ = PyErr::take(py);
        return Err(raise(
            "InvalidError",
            format!(
                "send_tensor: {}.__dlpack__() returned {}, not a DLPack capsule",
                type_name(obj),
                type_name(&cap)
            ),
        ));
    }
    // SAFETY: a capsule's name is a NUL-terminated string that lives as long as the capsule.
    let name = unsafe { CStr::from_ptr(name) };
    // SAFETY (both arms): the capsule holds a managed tensor of the type its name says, alive
    // until the capsule is destroyed (we hold it and do not consume it).
    let (dt, major) = if name == NAME_VERSIONED {
        let t = unsafe { ffi::PyCapsule_GetPointer(p, name.as_ptr()) }
            .cast::<DLManagedTensorVersioned>();
        if t.is_null() {
            return Err(PyErr::fetch(py));
        }
        let t = unsafe { &*t };
        (&t.dl_tensor as *const DLTensor, t.version.major)
    } else if name == NAME_LEGACY {
        let t = unsafe { ffi::PyCapsule_GetPointer(p, name.as_ptr()) }.cast::<DLManagedTensor>();
        if t.is_null() {
            return Err(PyErr::fetch(py));
        }
        let t = unsafe { &*t };
        (&t.dl_tensor as *const DLTensor, 1)
    } else {
        return Err(raise(
            "InvalidError",
            format!(
                "send_tensor: the capsule is named {name:?}: it was consumed already (or is no \
                 DLPack tensor)"
            ),
        ));
    };
    if major != 1 {
        return Err(raise(
            "InvalidError",
            format!("send_tensor: DLPack major version {major} is not supported (1 is)"),
        ));
    }
    // SAFETY: `dt` points into the managed tensor, alive while `cap` is.
    let dt = unsafe { &*dt };
    if dt.device.device_type != DEVICE_CPU && dt.device.device_type != DEVICE_CUDA_HOST {
        return Err(device_error(dt.device.device_type, dt.device.device_id));
    }
    let dtype = name_of(dt.dtype).ok_or_else(|| {
        raise(
            "InvalidError",
            format!(
                "send_tensor: DLPack dtype (code {}, bits {}, lanes {}) is not one xcp knows",
                dt.dtype.code, dt.dtype.bits, dt.dtype.lanes
            ),
        )
    })?;
    let ndim = usize::try_from(dt.ndim)
        .ok()
        .filter(|&n| n <= xcp::codec::dlpack::MAX_NDIM)
        .ok_or_else(|| raise("InvalidError", format!("send_tensor: ndim {}", dt.ndim)))?;
    let read = |q: *mut i64| -> Vec<i64> {
        if ndim == 0 || q.is_null() {
            return Vec::new();
        }
        // SAFETY: DLPack: a non-null shape/strides pointer addresses `ndim` i64s, alive with
        // the tensor.
        unsafe { std::slice::from_raw_parts(q, ndim) }.to_vec()
    };
    let shape = read(dt.shape);
    if shape.len() != ndim {
        return Err(raise("InvalidError", "send_tensor: no shape".into()));
    }
    let (nbytes, dims) = layout(&shape, dt.dtype)?;
    if !dt.strides.is_null() && nbytes > 0 {
        let strides = read(dt.strides);
        let mut want = 1i64;
        for i in (0..ndim).rev() {
            if shape[i] != 1 && strides[i] != want {
                return Err(raise(
                    "InvalidError",
                    format!(
                        "send_tensor: the tensor is not C-contiguous (shape {shape:?}, strides \
                         {strides:?} in elements): an attachment carries compact row-major \
                         bytes; make it contiguous first (np.ascontiguousarray(a), \
                         t.contiguous())"
                    ),
                ));
            }
            want = want.saturating_mul(shape[i]);
        }
    }
    let addr = if nbytes == 0 {
        0
    } else {
        if dt.data.is_null() {
            return Err(raise("InvalidError", "send_tensor: data is null".into()));
        }
        (dt.data as usize)
            .checked_add(dt.byte_offset as usize)
            .ok_or_else(|| raise("InvalidError", "send_tensor: bad byte_offset".into()))?
    };
    Ok(Imported {
        _capsule: cap.unbind(),
        addr,
        nbytes,
        dtype,
        shape: dims,
    })
}
