//! `xcp._xcp`: the Python extension over the `xcp` library (PyO3, abi3, Python ≥ 3.11).
//!
//! The synchronous API and the asyncio bridge of the Python package (issue 21). Every call
//! that can block (connect, bind, accept, send, request, recv, ping, alloc, close) runs on one
//! tokio multi-thread runtime per process with the GIL released, so other Python threads run
//! meanwhile; while waiting it checks for signals every 100 ms, so Ctrl-C interrupts it.
//! The asyncio API (`xcp.aio`) runs its calls as tasks on the same runtime, bridged to the
//! event loop in [`aio`]. CUDA tensors are a later step.
//!
//! Zero copy goes through the buffer protocol and DLPack ([`dlpack`]): a [`Region`] is a
//! writable buffer over a loaned slot of the session's shared pool, a [`View`] a read-only
//! buffer over the peer's mapped segment; both have `__dlpack__`. Both count their
//! outstanding exports (buffers and DLPack tensors) so the memory behind a pointer handed to
//! Python stays alive (and is not released, nor sent by `send`) while any export is live.
//! `send_tensor` hands a region over even with arrays over it alive: the region holds its
//! pool, which keeps every segment mapped, so those arrays stay valid memory.
//!
//! No Rust panic reaches Python as a panic: errors of the library become the exceptions of
//! `xcp._errors` (see [`to_py_err`]), and a panic inside a blocking call is caught and raised
//! as `xcp.XcpError`.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use pyo3::buffer::PyBuffer;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};
use xcp::codec::CodecId;
use xcp::conn::{Incoming, Outgoing};
use xcp::{AttachConfig, Attachment, Error, ErrorCode, SessionConfig};

mod aio;
mod dlpack;

// ---------------------------------------------------------------------------------------------
// The runtime and the blocking wait.

/// The process's runtime and the process it was started in (a forked child cannot use it:
/// its worker threads stayed in the parent).
struct Runtime {
    rt: tokio::runtime::Runtime,
    pid: u32,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The Python main thread (where the module was imported, when that was the main thread):
/// only there are signals handled, and only there is it safe to attach while waiting (a
/// daemon thread that attaches while the interpreter finalizes would panic).
static MAIN_THREAD: OnceLock<std::thread::ThreadId> = OnceLock::new();

/// How often a blocking call wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The process-wide runtime, started on first use.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    if RUNTIME.get().is_none() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("xcp-runtime")
            .build()
            .map_err(|e| raise("XcpError", format!("could not start the xcp runtime: {e}")))?;
        // Another thread may have won the race: then its runtime is the one, ours is dropped.
        let _ = RUNTIME.set(Runtime {
            rt,
            pid: std::process::id(),
        });
    }
    let r = RUNTIME
        .get()
        .ok_or_else(|| raise("XcpError", "the xcp runtime did not start".to_string()))?;
    if r.pid != std::process::id() {
        return Err(raise(
            "InvalidError",
            format!(
                "xcp was used in process {} before this process forked from it: a forked child \
                 cannot use the parent's runtime; start workers with multiprocessing's \"spawn\" \
                 (or \"forkserver\") start method, or import and use xcp only in the child",
                r.pid
            ),
        ));
    }
    Ok(&r.rt)
}

/// How a blocking wait ended.
enum Waited<T> {
    Done(T),
    TimedOut,
    Interrupted(PyErr),
    Panicked(String),
}

/// Runs `fut` on the runtime with the GIL released, until it finishes or `timeout` passes
/// (`None`: no limit of its own). `Ok(None)` means the timeout passed; the future is dropped
/// then, which every library call used here tolerates (the session stays usable).
fn wait<F, T>(py: Python<'_>, timeout: Option<Duration>, fut: F) -> PyResult<Option<T>>
where
    F: Future<Output = T> + Send,
    T: Send,
{
    let rt = runtime()?;
    let on_main = MAIN_THREAD.get() == Some(&std::thread::current().id());
    let outcome = py.detach(move || {
        let run = AssertUnwindSafe(move || {
            rt.block_on(async move {
                tokio::pin!(fut);
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                loop {
                    tokio::select! {
                        r = &mut fut => return Waited::Done(r),
                        _ = until(deadline) => return Waited::TimedOut,
                        _ = tokio::time::sleep(SIGNAL_CHECK), if on_main => {
                            if let Err(e) = Python::attach(|py| py.check_signals()) {
                                return Waited::Interrupted(e);
                            }
                        }
                    }
                }
            })
        });
        match std::panic::catch_unwind(run) {
            Ok(w) => w,
            Err(p) => Waited::Panicked(panic_text(&*p)),
        }
    });
    match outcome {
        Waited::Done(r) => Ok(Some(r)),
        Waited::TimedOut => Ok(None),
        Waited::Interrupted(e) => Err(e),
        Waited::Panicked(p) => Err(raise(
            "XcpError",
            format!("internal error in xcp (a bug; please report it): {p}"),
        )),
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// `wait` for a library call: its error raised as the matching exception, a passed timeout as
/// `xcp.TimeoutError` saying what was waited for.
fn call<F, T>(py: Python<'_>, timeout: Option<Duration>, what: &str, fut: F) -> PyResult<T>
where
    F: Future<Output = xcp::Result<T>> + Send,
    T: Send,
{
    match wait(py, timeout, fut)? {
        Some(r) => r.map_err(to_py_err),
        None => Err(timeout_error(what, timeout)),
    }
}

/// The `xcp.TimeoutError` of a `timeout=` argument that passed.
fn timeout_error(what: &str, timeout: Option<Duration>) -> PyErr {
    let secs = timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
    raise_with(
        "TimeoutError",
        format!(
            "timed out: {what}: nothing within {secs} s (timeout=); the session is still usable"
        ),
        |e| e.setattr("deadline", "call"),
    )
}

/// A `timeout=` or `*_timeout=` argument in seconds as a duration (`None` stays `None`).
fn seconds(name: &str, v: Option<f64>) -> PyResult<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s).map(Some).map_err(|_| {
            raise(
                "InvalidError",
                format!("{name}={s}: must be a finite number of seconds >= 0"),
            )
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Exceptions: the classes live in `xcp/_errors.py` (they need two builtin bases each, which a
// Python class statement gives simply); the extension looks them up when it raises.

/// An instance of the exception class `class` of `xcp._errors` with `message`, `fill` setting
/// its attributes. If the module cannot be imported (a broken install) the import error is
/// what is raised.
fn raise_with(
    class: &str,
    message: String,
    fill: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<()>,
) -> PyErr {
    Python::attach(|py| {
        let made = (|| -> PyResult<PyErr> {
            let cls = py.import("xcp._errors")?.getattr(class)?;
            let exc = cls.call1((message,))?;
            fill(&exc)?;
            Ok(PyErr::from_value(exc))
        })();
        made.unwrap_or_else(|e| e)
    })
}

/// [`raise_with`] without attributes.
fn raise(class: &str, message: String) -> PyErr {
    raise_with(class, message, |_| Ok(()))
}

/// Sets `code`, `name` and `detail` on an exception about an error code.
fn set_code(e: &Bound<'_, PyAny>, code: ErrorCode, detail: &str) -> PyResult<()> {
    e.setattr("code", code.0)?;
    e.setattr("name", code.name().unwrap_or("UNKNOWN"))?;
    e.setattr("detail", detail)
}

/// The Python exception for a library error: every variant maps to one class of
/// `xcp._errors` (all subclasses of `xcp.XcpError`), with the variant's fields as attributes.
fn to_py_err(e: Error) -> PyErr {
    let message = e.to_string();
    // A TLS refusal the stream reports as I/O or as a closed connection (the peer refused our
    // certificate after the handshake) is a TlsError too, with the failure it carries.
    if !matches!(e, Error::Tls { .. }) {
        if let Some(failure) = e.tls_failure() {
            return raise_with("TlsError", message.clone(), |x| {
                x.setattr("failure", format!("{failure:?}"))?;
                x.setattr("detail", message.as_str())
            });
        }
    }
    match &e {
        Error::Nack {
            msg_id,
            code,
            retry_after_ms,
            detail,
        } => raise_with("NackError", message, |x| {
            set_code(x, *code, detail)?;
            x.setattr("msg_id", *msg_id)?;
            x.setattr("retry_after_ms", *retry_after_ms)
        }),
        Error::Protocol {
            violation,
            code,
            detail,
        } => {
            let class = if *code == ErrorCode::ERR_ATTACHMENT {
                "AttachmentError"
            } else {
                "ProtocolError"
            };
            raise_with(class, message, |x| {
                set_code(x, *code, detail)?;
                x.setattr("violation", format!("{violation:?}"))
            })
        }
        Error::Incompatible { code, detail } => {
            raise_with("ProtocolError", message, |x| set_code(x, *code, detail))
        }
        Error::Invalid(_) => raise("InvalidError", message),
        Error::Timeout { deadline, .. } => raise_with("TimeoutError", message, |x| {
            x.setattr("deadline", format!("{deadline:?}").to_lowercase())
        }),
        Error::Closed { reason, .. } => raise_with("ClosedError", message, |x| {
            x.setattr("reason", format!("{reason:?}"))
        }),
        Error::Io(io) => {
            use std::io::ErrorKind::*;
            let connection = matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | UnexpectedEof
            );
            let class = if connection {
                "ClosedError"
            } else {
                "XcpError"
            };
            let errno = io.raw_os_error();
            let kind = format!("Io({:?})", io.kind());
            raise_with(class, message, |x| {
                x.setattr("errno", errno)?;
                if connection {
                    x.setattr("reason", kind)?;
                }
                Ok(())
            })
        }
        Error::Tls { failure, detail } => raise_with("TlsError", message, |x| {
            x.setattr("failure", format!("{failure:?}"))?;
            x.setattr("detail", detail)
        }),
        // Variants added later.
        _ => raise("XcpError", message),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON values <-> Python objects.

/// How deep a payload may nest (serde_json refuses deeper input too): a cycle or a runaway
/// structure is an `InvalidError`, not a stack overflow.
const MAX_DEPTH: usize = 128;

/// A Python value (dict with str keys, list, tuple, str, int, float, bool, None) as JSON.
fn to_json(obj: &Bound<'_, PyAny>, path: &str, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(raise(
            "InvalidError",
            format!("{path}: nested more than {MAX_DEPTH} levels deep (a cycle?)"),
        ));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: a Python bool is an int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(raise(
            "InvalidError",
            format!("{path}: integer out of the 64-bit range of JSON numbers here"),
        ));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| {
                raise(
                    "InvalidError",
                    format!("{path}: {} is not a JSON number", f.value()),
                )
            });
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_string()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key = k.cast::<PyString>().map_err(|_| {
                raise(
                    "InvalidError",
                    format!("{path}: keys must be str, got {}", type_name(&k)),
                )
            })?;
            let key = key.to_str()?.to_string();
            let value = to_json(&v, &format!("{path}.{key}"), depth + 1)?;
            m.insert(key, value);
        }
        return Ok(Value::Object(m));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut out = Vec::new();
        for (i, item) in obj.try_iter()?.enumerate() {
            out.push(to_json(&item?, &format!("{path}[{i}]"), depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    Err(raise(
        "InvalidError",
        format!(
            "{path}: {} cannot travel in an Ether (dict, list, tuple, str, int, float, bool or \
             None; send bytes as attachments)",
            type_name(obj)
        ),
    ))
}

/// The name of an object's type, for messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// A JSON value as a Python object.
fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(m) => to_py_dict(py, m)?.into_any(),
    })
}

/// A JSON object as a Python dict.
fn to_py_dict<'py>(py: Python<'py>, m: &Map<String, Value>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, to_py(py, v)?)?;
    }
    Ok(d)
}

/// A dict of JSON values as a JSON object.
fn to_json_map(d: &Bound<'_, PyDict>, path: &str) -> PyResult<Map<String, Value>> {
    match to_json(d.as_any(), path, 0)? {
        Value::Object(m) => Ok(m),
        _ => Ok(Map::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// Ether.

/// The body of a DATA message (SPEC §5.1): a `kind`, its `schema_version`, the kind's fields
/// in `payload` and free-form `metadata` (both dicts of JSON values).
///
/// `payload` may be given as a str: `Ether("text", "hello")` is `Ether("text", {"text":
/// "hello"})`. Bytes do not go in the payload: they travel as attachments (see
/// `Session.send(..., attachments=...)`).
#[pyclass(module = "xcp._xcp")]
struct Ether {
    /// The kind, such as "text" or "embedding".
    #[pyo3(get, set)]
    kind: String,
    /// The schema version of the kind (>= 1).
    #[pyo3(get, set)]
    schema_version: u32,
    /// The kind's fields: a dict of JSON values.
    #[pyo3(get, set)]
    payload: Py<PyDict>,
    /// trace_id, producer, created_at and anything else: a dict of JSON values.
    #[pyo3(get, set)]
    metadata: Py<PyDict>,
}

#[pymethods]
impl Ether {
    /// Makes an Ether; `payload` is a dict (or a str, short for `{"text": payload}`),
    /// `metadata` a dict; both default to empty.
    #[new]
    #[pyo3(signature = (kind, payload=None, metadata=None, *, schema_version=1))]
    fn new(
        py: Python<'_>,
        kind: String,
        payload: Option<&Bound<'_, PyAny>>,
        metadata: Option<Bound<'_, PyDict>>,
        schema_version: u32,
    ) -> PyResult<Self> {
        if kind.is_empty() {
            return Err(raise(
                "InvalidError",
                "Ether: kind must not be empty".into(),
            ));
        }
        if schema_version < 1 {
            return Err(raise(
                "InvalidError",
                "Ether: schema_version must be >= 1".into(),
            ));
        }
        let payload = match payload {
            None => PyDict::new(py),
            Some(p) if p.is_none() => PyDict::new(py),
            Some(p) => {
                if let Ok(s) = p.cast::<PyString>() {
                    let d = PyDict::new(py);
                    d.set_item("text", s)?;
                    d
                } else if let Ok(d) = p.cast::<PyDict>() {
                    d.clone()
                } else {
                    return Err(raise(
                        "InvalidError",
                        format!(
                            "Ether: payload must be a dict or a str, got {}",
                            type_name(p)
                        ),
                    ));
                }
            }
        };
        Ok(Ether {
            kind,
            schema_version,
            payload: payload.unbind(),
            metadata: metadata.unwrap_or_else(|| PyDict::new(py)).unbind(),
        })
    }

    /// A "text" Ether: `Ether.text("hi")` is `Ether("text", {"text": "hi"})`.
    #[staticmethod]
    fn text(py: Python<'_>, text: String) -> PyResult<Self> {
        let d = PyDict::new(py);
        d.set_item("text", text)?;
        Ok(Ether {
            kind: "text".into(),
            schema_version: 1,
            payload: d.unbind(),
            metadata: PyDict::new(py).unbind(),
        })
    }

    /// Equal when kind, schema_version, payload and metadata are.
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Ok(other) = other.cast::<Ether>() else {
            return Ok(false);
        };
        let o = other.borrow();
        Ok(self.kind == o.kind
            && self.schema_version == o.schema_version
            && self.payload.bind(py).eq(o.payload.bind(py))?
            && self.metadata.bind(py).eq(o.metadata.bind(py))?)
    }

    /// `Ether(kind=..., payload=..., metadata=..., schema_version=...)`.
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Ether(kind={:?}, payload={}, metadata={}, schema_version={})",
            self.kind,
            self.payload.bind(py).repr()?,
            self.metadata.bind(py).repr()?,
            self.schema_version
        ))
    }
}

impl Ether {
    /// The library's Ether (no attachments yet).
    fn to_rust(&self, py: Python<'_>) -> PyResult<xcp::Ether> {
        let mut e = xcp::Ether::new(
            self.kind.clone(),
            to_json_map(self.payload.bind(py), "payload")?,
        );
        e.schema_version = self.schema_version;
        e.metadata = to_json_map(self.metadata.bind(py), "metadata")?;
        Ok(e)
    }

    /// A Python Ether of a received one (its attachments are the message's).
    fn from_rust(py: Python<'_>, e: &xcp::Ether) -> PyResult<Ether> {
        Ok(Ether {
            kind: e.kind.clone(),
            schema_version: e.schema_version,
            payload: to_py_dict(py, &e.payload)?.unbind(),
            metadata: to_py_dict(py, &e.metadata)?.unbind(),
        })
    }
}

/// The Ether of an `ether` argument (an `xcp.Ether`).
fn ether_arg(py: Python<'_>, ether: &Bound<'_, PyAny>) -> PyResult<xcp::Ether> {
    let e = ether.cast::<Ether>().map_err(|_| {
        raise(
            "InvalidError",
            format!("expected an xcp.Ether, got {}", type_name(ether)),
        )
    })?;
    let r = e.borrow().to_rust(py);
    r
}

/// The codec of a `codec=` argument.
fn codec_arg(codec: &str) -> PyResult<CodecId> {
    match codec.to_ascii_lowercase().as_str() {
        "json" => Ok(CodecId::JSON),
        "protobuf" => Ok(CodecId::PROTOBUF),
        other => Err(raise(
            "InvalidError",
            format!("codec={other:?}: the Ether codecs are \"json\" and \"protobuf\""),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers: Region (writable, ours) and View (read-only, the peer's).

/// Locks a mutex, taking the data of a poisoned one (its holder panicked; the state it guards
/// is a counter and an option, consistent at every step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fills `view` for `len` bytes at `ptr`, owned by `owner` (which the buffer keeps alive).
///
/// # Safety
/// `view` is the `Py_buffer` CPython passed to `bf_getbuffer`; `ptr..ptr+len` stays valid
/// (and, when `readonly` is false, writable) until the matching `bf_releasebuffer`.
unsafe fn fill(
    owner: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    let len = isize::try_from(len)
        .map_err(|_| raise("InvalidError", format!("{len} bytes: too large a buffer")))?;
    // SAFETY: `view` is valid for writes (the caller's contract); PyBuffer_FillInfo sets every
    // field, takes a reference to `owner` in `view.obj`, and refuses a writable request of a
    // read-only buffer with BufferError (returning -1, nothing set).
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr.cast(),
            len,
            c_int::from(readonly),
            flags,
        )
    };
    if rc != 0 {
        // SAFETY: as above; a failed getbuffer must leave `obj` NULL.
        unsafe { (*view).obj = std::ptr::null_mut() };
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// Clears `view.obj` of a getbuffer that fails before [`fill`].
///
/// # Safety
/// `view` is the `Py_buffer` CPython passed to `bf_getbuffer`.
unsafe fn refuse(view: *mut ffi::Py_buffer, e: PyErr) -> PyResult<()> {
    // SAFETY: `view` is valid for writes (the caller's contract).
    unsafe { (*view).obj = std::ptr::null_mut() };
    Err(e)
}

/// A writable slot of the session's shared pool (memfd or POSIX shm), from `Session.alloc`.
///
/// It has the buffer protocol: `memoryview(region)` or `np.frombuffer(region, dtype=...)`
/// write straight into the shared segment, no copy. Send it with
/// `session.send(ether, attachments={"id": region})`: by handle where the session negotiated
/// one (the peer maps the same memory), inline otherwise. Sending gives the slot to the peer
/// until it releases its view, so a region can be sent once, and only after every buffer over
/// it is released (`del` the arrays and memoryviews, or use `with memoryview(region) as m:`).
/// `dtype` and `shape`, when set, travel with the attachment.
///
/// `Session.empty(shape, dtype)` makes one shaped as a tensor: `__dlpack__` gives numpy and
/// torch arrays over the same memory, and `Session.send_tensor` sends the region (or such an
/// array) by handle, handing it over even while arrays over it are alive (do not write to
/// them afterwards).
#[pyclass(module = "xcp._xcp", frozen)]
struct Region {
    state: Arc<Mutex<RegionState>>,
    nbytes: usize,
    /// The pool it came from: holding it keeps every segment of the pool mapped, so an array
    /// over this region stays valid memory after the region was handed over by `send_tensor`
    /// (and came back to the pool).
    _pool: xcp::attach::Pool,
}

/// Every live region of this process (of any session), to find the one a tensor lies in.
static REGIONS: Mutex<Vec<Weak<Mutex<RegionState>>>> = Mutex::new(Vec::new());

impl Region {
    /// A region of `pool` for Python, registered so `send_tensor` finds arrays over it.
    fn new(
        region: xcp::attach::Region,
        pool: xcp::attach::Pool,
        dtype: String,
        shape: Vec<u32>,
    ) -> Region {
        let nbytes = region.len();
        let state = Arc::new(Mutex::new(RegionState {
            region: Some(region),
            exports: 0,
            gone: "",
            dtype,
            shape,
        }));
        let mut all = lock(&REGIONS);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&state));
        Region {
            state,
            nbytes,
            _pool: pool,
        }
    }

    /// Counts a released export (a buffer, or a DLPack tensor whose deleter ran).
    fn unexport(&self) {
        let mut st = lock(&self.state);
        st.exports = st.exports.saturating_sub(1);
    }
}

/// The live region whose memory starts at `addr` and holds at least `nbytes`, and that has
/// exports: an array over a region's memory always came from one of its exports (DLPack or
/// buffer). An array left over from a region handed over before, whose slot the pool loaned
/// again to a region nothing was exported from, so does not take that region away (it is
/// copied).
fn region_at(addr: usize, nbytes: usize) -> Option<Arc<Mutex<RegionState>>> {
    let all = lock(&REGIONS);
    all.iter().filter_map(Weak::upgrade).find(|r| {
        let st = lock(r);
        st.exports > 0
            && st
                .region
                .as_ref()
                .is_some_and(|g| g.as_ptr() as usize == addr && g.len() >= nbytes)
    })
}

/// The DLPack dtype and shape of a tensor with these attachment fields over `nbytes` bytes
/// (no dtype: uint8; no shape: one dimension over all the bytes), and the bytes it needs.
fn tensor_of(
    dtype: &str,
    shape: &[u32],
    nbytes: usize,
) -> Result<(xcp::attach::dlpack_ffi::DLDataType, Vec<i64>, usize), String> {
    let dt = if dtype.is_empty() {
        dlpack::dtype_of("uint8").expect("a known dtype")
    } else {
        dlpack::dtype_of(dtype)
            .ok_or_else(|| format!("dtype {dtype:?}: not a dtype DLPack names"))?
    };
    let size = dlpack::itemsize(dt);
    let dims: Vec<i64> = if shape.is_empty() {
        vec![(nbytes / size) as i64]
    } else {
        shape.iter().map(|&d| i64::from(d)).collect()
    };
    let need = dims
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| format!("shape {shape:?}: the size overflows"))?;
    if need > nbytes {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {need} bytes, the memory has {nbytes}"
        ));
    }
    Ok((dt, dims, need))
}

/// What a [`Region`] guards.
struct RegionState {
    /// The loaned slot; `None` once sent or released.
    region: Option<xcp::attach::Region>,
    /// Buffers exported to Python and not released yet.
    exports: usize,
    /// Why `region` is gone, for messages.
    gone: &'static str,
    dtype: String,
    shape: Vec<u32>,
}

#[pymethods]
impl Region {
    /// Exports the region as a writable buffer (the buffer protocol).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let mut st = lock(&this.state);
        let gone = st.gone;
        let Some(region) = st.region.as_mut() else {
            let e = raise(
                "InvalidError",
                format!("this region was {gone}: it has no memory any more"),
            );
            // SAFETY: `view` comes from CPython's getbuffer call.
            return unsafe { refuse(view, e) };
        };
        let bytes: &mut [u8] = region;
        let (ptr, len) = (bytes.as_mut_ptr(), bytes.len());
        // SAFETY: the slot stays loaned and mapped read-write while `exports` > 0: `send` and
        // `release` refuse a region with exports, and `view.obj` keeps this object alive.
        unsafe { fill(slf.as_any(), view, ptr, len, false, flags)? };
        st.exports += 1;
        Ok(())
    }

    /// Counts a released buffer export.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.unexport();
    }

    /// A DLPack capsule over the region (writable), shaped by its `dtype` and `shape` (uint8
    /// over every byte when they are not set): `np.from_dlpack(region)` and
    /// `torch.from_dlpack(region)` give arrays over the same memory. "dltensor_versioned"
    /// when `max_version` is (1, 0) or later, else the legacy "dltensor"; `copy=True` gives a
    /// copy. The region cannot be `send()`-ed or released while such an array lives;
    /// `send_tensor` hands it over anyway (do not write to the array after that).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        slf: &Bound<'py, Self>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<&Bound<'py, PyAny>>,
        dl_device: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (versioned, copy) = dlpack::protocol_args(stream, max_version, dl_device, copy)?;
        let this = slf.get();
        let (ptr, need, dt, dims) = {
            let mut st = lock(&this.state);
            let gone = st.gone;
            let Some(region) = st.region.as_ref() else {
                return Err(raise(
                    "InvalidError",
                    format!("this region was {gone}: it has no memory any more"),
                ));
            };
            let (dt, dims, need) = tensor_of(&st.dtype, &st.shape, region.len())
                .map_err(pyo3::exceptions::PyBufferError::new_err)?;
            let ptr = region.as_ptr();
            st.exports += 1;
            (ptr, need, dt, dims)
        };
        // SAFETY (of the pointer): the slot stays loaned (or, after send_tensor, mapped by the
        // pool this region holds) while the export is counted, and the capsule's tensor keeps
        // `slf` alive until its deleter uncounts it.
        let keep = dlpack::Keep::Region(slf.clone().unbind());
        dlpack::capsule(slf.py(), keep, ptr, need, dims, dt, false, versioned, copy)
    }

    /// `(1, 0)`: the CPU (DLPack's kDLCPU).
    fn __dlpack_device__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        dlpack::cpu_device(py)
    }

    /// Its size in bytes.
    fn __len__(&self) -> usize {
        self.nbytes
    }

    /// Its size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Whether it was sent (or released): then it has no memory any more.
    #[getter]
    fn sent(&self) -> bool {
        lock(&self.state).region.is_none()
    }

    /// The element type name that travels with the attachment ("" when not set), such as
    /// "float32".
    #[getter]
    fn get_dtype(&self) -> String {
        lock(&self.state).dtype.clone()
    }

    /// Sets the element type name.
    #[setter]
    fn set_dtype(&self, dtype: String) {
        lock(&self.state).dtype = dtype;
    }

    /// The tensor shape that travels with the attachment (empty when not set).
    #[getter]
    fn get_shape(&self) -> Vec<u32> {
        lock(&self.state).shape.clone()
    }

    /// Sets the tensor shape.
    #[setter]
    fn set_shape(&self, shape: Vec<u32>) {
        lock(&self.state).shape = shape;
    }

    /// Gives the slot back to the pool unsent. Refused while buffers over it are exported.
    fn release(&self) -> PyResult<()> {
        let mut st = lock(&self.state);
        if st.exports > 0 {
            return Err(exported(st.exports, "released"));
        }
        st.region = None;
        if st.gone.is_empty() {
            st.gone = "released";
        }
        Ok(())
    }

    /// `Region(nbytes=..., sent=...)`.
    fn __repr__(&self) -> String {
        format!("Region(nbytes={}, sent={})", self.nbytes, self.sent())
    }
}

/// The error of sending or releasing a region that still has buffer exports.
fn exported(n: usize, verb: &str) -> PyErr {
    raise(
        "InvalidError",
        format!(
            "the region cannot be {verb}: {n} buffer(s) over it (memoryview, numpy array) are \
             still alive; release them first (del the array, or `with memoryview(region) as m:`)"
        ),
    )
}

/// The bytes behind a [`View`].
enum ViewData {
    /// A read-only view of the peer's mapped segment; dropping it ACKs the message once the
    /// message's other views are gone.
    Mapped(xcp::attach::View),
    /// Bytes that came inline (a slice of the receive buffer).
    Inline(Bytes),
}

impl ViewData {
    fn bytes(&self) -> &[u8] {
        match self {
            ViewData::Mapped(v) => v.as_slice(),
            ViewData::Inline(b) => b,
        }
    }
}

/// A received attachment: a read-only buffer over the bytes where they arrived, with no
/// copy. `path` says how they came: "memfd" or "shm" (mapped from the sender's shared segment)
/// or "inline" (in the message itself).
///
/// `memoryview(view)` and `np.frombuffer(view, dtype=...)` read the bytes in place (read-only).
/// `release()` (or leaving its `with` block) ends it; once every attachment of the message is
/// released (or garbage), the sender gets its ACK and reuses the memory. Buffers still
/// exported then keep the bytes until they are released themselves; a released view refuses
/// new buffers with `xcp.InvalidError`.
#[pyclass(module = "xcp._xcp", frozen)]
struct View {
    state: Mutex<ViewState>,
    /// The attachment id.
    #[pyo3(get)]
    id: String,
    /// "memfd", "shm" or "inline".
    #[pyo3(get)]
    path: String,
    /// Size in bytes.
    #[pyo3(get)]
    nbytes: usize,
    /// The element type the sender named ("" when none), such as "float32".
    #[pyo3(get)]
    dtype: String,
    /// The tensor shape the sender gave (empty when none).
    #[pyo3(get)]
    shape: Vec<u32>,
    /// The MIME type the sender gave ("" when none).
    #[pyo3(get)]
    media_type: String,
    /// The msgId of the message it came with.
    #[pyo3(get)]
    msg_id: u64,
}

/// What a [`View`] guards.
struct ViewState {
    data: Option<ViewData>,
    exports: usize,
    released: bool,
}

#[pymethods]
impl View {
    /// Exports the bytes as a read-only buffer (a writable request raises BufferError).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let mut st = lock(&this.state);
        let data = match (&st.data, st.released) {
            (Some(d), false) => d,
            _ => {
                let e = released_error(&this.id);
                // SAFETY: `view` comes from CPython's getbuffer call.
                return unsafe { refuse(view, e) };
            }
        };
        let bytes = data.bytes();
        let (ptr, len) = (bytes.as_ptr().cast_mut(), bytes.len());
        // SAFETY: the mapping (or the inline bytes) lives while `data` does, and `data` is
        // dropped only when no export is left (see `__releasebuffer__`); the buffer is marked
        // read-only, so no consumer writes through `ptr`.
        unsafe { fill(slf.as_any(), view, ptr, len, true, flags)? };
        st.exports += 1;
        Ok(())
    }

    /// Counts a released export; the last one after `release()` drops the bytes.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.unexport();
    }

    /// A read-only DLPack capsule over the bytes where they arrived (no copy), shaped by the
    /// sender's `dtype` and `shape` (uint8 over every byte when it gave none):
    /// `np.from_dlpack(view)` is a read-only array over the mapped segment. The versioned
    /// capsule ("dltensor_versioned", flagged read-only) needs `max_version` >= (1, 0); the
    /// legacy one cannot say read-only, so it is refused (BufferError, as numpy does for its
    /// read-only arrays) unless `copy=True`. The mapping, and the sender's ACK, wait until
    /// the consumer's tensor is deleted, even after `release()`.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        slf: &Bound<'py, Self>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<&Bound<'py, PyAny>>,
        dl_device: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (versioned, copy) = dlpack::protocol_args(stream, max_version, dl_device, copy)?;
        if !versioned && !copy {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "a received view is read-only, which the legacy DLPack capsule cannot signal: \
                 ask with max_version=(1, 0) (numpy >= 2.1, torch >= 2.4) or copy=True",
            ));
        }
        let this = slf.get();
        let (ptr, need, dt, dims) = {
            let mut st = lock(&this.state);
            let data = match (&st.data, st.released) {
                (Some(d), false) => d,
                _ => return Err(released_error(&this.id)),
            };
            let bytes = data.bytes();
            let (dt, dims, need) = tensor_of(&this.dtype, &this.shape, bytes.len())
                .map_err(pyo3::exceptions::PyBufferError::new_err)?;
            let ptr = bytes.as_ptr();
            st.exports += 1;
            (ptr, need, dt, dims)
        };
        // SAFETY (of the pointer): the bytes live while `data` does, which waits for every
        // counted export; the tensor keeps `slf` alive and is flagged read-only.
        let keep = dlpack::Keep::View(slf.clone().unbind());
        dlpack::capsule(slf.py(), keep, ptr, need, dims, dt, true, versioned, copy)
    }

    /// `(1, 0)`: the CPU (DLPack's kDLCPU).
    fn __dlpack_device__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        dlpack::cpu_device(py)
    }

    /// Its size in bytes.
    fn __len__(&self) -> usize {
        self.nbytes
    }

    /// Whether `release()` was called.
    #[getter]
    fn released(&self) -> bool {
        lock(&self.state).released
    }

    /// Whether the sender shrank its segment under the mapping (SPEC §7): the bytes past the
    /// new end read as zeros. Check it after reading a view to the end.
    #[getter]
    fn faulted(&self) -> bool {
        match &lock(&self.state).data {
            Some(ViewData::Mapped(v)) => v.faulted(),
            _ => false,
        }
    }

    /// A copy of the bytes (`bytes`); raises `xcp.InvalidError` once released.
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let st = lock(&self.state);
        match (&st.data, st.released) {
            (Some(d), false) => Ok(PyBytes::new(py, d.bytes())),
            _ => Err(released_error(&self.id)),
        }
    }

    /// Ends the view: no new buffers; the bytes (and the sender's ACK) go once the buffers
    /// exported before are released. Releasing twice is not an error.
    fn release(&self) {
        let dropped = {
            let mut st = lock(&self.state);
            st.released = true;
            if st.exports == 0 {
                st.data.take()
            } else {
                None
            }
        };
        drop(dropped);
    }

    /// `with view:` releases it at the end of the block.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Releases the view.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.release();
        false
    }

    /// `View(id=..., path=..., nbytes=...)`.
    fn __repr__(&self) -> String {
        format!(
            "View(id={:?}, path={:?}, nbytes={}, released={})",
            self.id,
            self.path,
            self.nbytes,
            self.released()
        )
    }
}

impl View {
    /// Counts a released export (a buffer, or a DLPack tensor whose deleter ran); the last
    /// one after `release()` drops the bytes (and so lets the ACK go).
    fn unexport(&self) {
        let dropped = {
            let mut st = lock(&self.state);
            st.exports = st.exports.saturating_sub(1);
            if st.exports == 0 && st.released {
                st.data.take()
            } else {
                None
            }
        };
        drop(dropped);
    }
}

/// The error of using a released view.
fn released_error(id: &str) -> PyErr {
    raise(
        "InvalidError",
        format!("attachment {id:?}: the view was released"),
    )
}

// ---------------------------------------------------------------------------------------------
// Messages and sessions.

/// A received message: the Ether (None for a body that is not an Ether), its attachments by
/// id, and the header fields a reply needs.
#[pyclass(module = "xcp._xcp", frozen)]
struct Message {
    /// Its msgId.
    #[pyo3(get)]
    msg_id: u64,
    /// The msgId it answers (0: none).
    #[pyo3(get)]
    in_reply_to: u64,
    /// The channel it came on.
    #[pyo3(get)]
    channel: u32,
    /// The body codec's name, such as "JSON".
    #[pyo3(get)]
    codec: String,
    /// The decoded Ether, or None when the body is not an Ether (see `body`).
    #[pyo3(get)]
    ether: Option<Py<Ether>>,
    /// Attachment id -> `xcp.View` (read-only, zero copy).
    #[pyo3(get)]
    attachments: Py<PyDict>,
    body: Bytes,
}

#[pymethods]
impl Message {
    /// The wire body, decoded from COMP/CRYPT (a copy, as bytes).
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    /// The tensor of a `send_tensor`: the attachment `id` (default: "tensor", or the only
    /// attachment), an `xcp.View` with `__dlpack__`: `np.from_dlpack(msg.tensor())` is a
    /// read-only array over the bytes where they arrived, no copy. Raises
    /// `xcp.InvalidError` when there is no such attachment.
    #[pyo3(signature = (id=None))]
    fn tensor<'py>(&self, py: Python<'py>, id: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
        let d = self.attachments.bind(py);
        let want = id.unwrap_or("tensor");
        if let Some(v) = d.get_item(want)? {
            return Ok(v);
        }
        if id.is_none() && d.len() == 1 {
            if let Some((_, v)) = d.iter().next() {
                return Ok(v);
            }
        }
        let ids: Vec<String> = d.keys().iter().map(|k| k.to_string()).collect();
        Err(raise(
            "InvalidError",
            format!(
                "message {}: no tensor attachment {want:?} (attachments: {ids:?})",
                self.msg_id
            ),
        ))
    }

    /// `Message(msg_id=..., kind=..., attachments=[...])`.
    fn __repr__(&self, py: Python<'_>) -> String {
        let kind = self
            .ether
            .as_ref()
            .map(|e| e.borrow(py).kind.clone())
            .unwrap_or_default();
        let ids: Vec<String> = self
            .attachments
            .bind(py)
            .keys()
            .iter()
            .map(|k| k.to_string())
            .collect();
        format!(
            "Message(msg_id={}, in_reply_to={}, kind={kind:?}, attachments={ids:?})",
            self.msg_id, self.in_reply_to
        )
    }
}

/// The scheme named by an attachment URI ("memfd://..." -> "memfd").
fn uri_path(uri: &str) -> String {
    uri.split("://").next().unwrap_or("").to_string()
}

/// A received message for Python. The library's message is dropped here: from now on only
/// the Python views hold the lease, so the ACK goes when they are released.
fn message(py: Python<'_>, m: Incoming, stats: &Stats) -> PyResult<Message> {
    let codec = m.header.body_codec;
    let ether = if codec == CodecId::JSON || codec == CodecId::PROTOBUF {
        Some(m.ether().map_err(to_py_err)?)
    } else {
        None
    };
    let attachments = PyDict::new(py);
    // (path, bytes) of each attachment, for the session's stats.
    let mut seen: Vec<(String, u64)> = Vec::new();
    if let Some(e) = &ether {
        for a in &e.attachments {
            let (data, path) = match (m.view(&a.id), &a.inline_bytes) {
                (Some(v), _) => (ViewData::Mapped(v.clone()), uri_path(&a.uri)),
                (None, Some(b)) => (ViewData::Inline(b.clone()), "inline".to_string()),
                // A device handle (a later step) or a refused one: no host bytes to show.
                (None, None) => continue,
            };
            let nbytes = data.bytes().len();
            seen.push((path.clone(), nbytes as u64));
            let view = View {
                state: Mutex::new(ViewState {
                    data: Some(data),
                    exports: 0,
                    released: false,
                }),
                id: a.id.clone(),
                path,
                nbytes,
                dtype: a.dtype.clone(),
                shape: a.shape.clone(),
                media_type: a.media_type.clone(),
                msg_id: m.msg_id(),
            };
            attachments.set_item(&a.id, Py::new(py, view)?)?;
        }
    }
    let ether = match &ether {
        Some(e) => Some(Py::new(py, Ether::from_rust(py, e)?)?),
        None => None,
    };
    stats.record(false, &seen);
    Ok(Message {
        msg_id: m.msg_id(),
        in_reply_to: m.header.in_reply_to,
        channel: m.header.channel_id,
        codec: codec
            .name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("0x{:04X}", codec.0)),
        ether,
        attachments: attachments.unbind(),
        body: m.body.clone(),
    })
}

/// One XCP connection (from `xcp.connect` or `Server.accept`). Every method that waits
/// releases the GIL; one session may be used from many threads at once. `with session:`
/// closes it at the end of the block.
#[pyclass(module = "xcp._xcp", frozen)]
struct Session {
    inner: xcp::Session,
    /// What this Python session sent and received, by path (see `stats()`).
    stats: Arc<Stats>,
}

impl Session {
    /// A Python session over a library session, with its counters at zero.
    fn new(inner: xcp::Session) -> Session {
        Session {
            inner,
            stats: Arc::new(Stats::default()),
        }
    }
}

/// The counters of `Session.stats()`: DATA messages and attachment bytes sent and received,
/// in total and by the path each attachment took ("memfd", "shm", "inline", ...), counted
/// where the Python layer hands a message to the session and where it turns a received one
/// into a `Message`.
#[derive(Default)]
pub(crate) struct Stats {
    inner: Mutex<[Side; 2]>,
}

/// One direction of [`Stats`].
#[derive(Default, Clone)]
struct Side {
    messages: u64,
    bytes: u64,
    /// path -> (messages with an attachment on it, attachment bytes on it)
    paths: BTreeMap<String, (u64, u64)>,
}

impl Stats {
    /// Counts one message, sent (`sent`) or received, whose attachments took `paths`
    /// ((path, bytes) each; empty for a message without attachments).
    pub(crate) fn record(&self, sent: bool, paths: &[(String, u64)]) {
        let mut all = lock(&self.inner);
        let side = &mut all[usize::from(!sent)];
        side.messages += 1;
        let mut counted: Vec<&str> = Vec::new();
        for (path, n) in paths {
            side.bytes += n;
            let e = side.paths.entry(path.clone()).or_default();
            e.1 += n;
            if !counted.contains(&path.as_str()) {
                e.0 += 1;
                counted.push(path);
            }
        }
    }

    /// The counters as `{"sent": {...}, "received": {...}}`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let all = lock(&self.inner).clone();
        let d = PyDict::new(py);
        for (name, side) in ["sent", "received"].iter().zip(all.iter()) {
            let s = PyDict::new(py);
            s.set_item("messages", side.messages)?;
            s.set_item("bytes", side.bytes)?;
            let by = PyDict::new(py);
            for (path, (m, b)) in &side.paths {
                let p = PyDict::new(py);
                p.set_item("messages", m)?;
                p.set_item("bytes", b)?;
                by.set_item(path, p)?;
            }
            s.set_item("by_path", by)?;
            d.set_item(*name, s)?;
        }
        Ok(d)
    }
}

/// The path an attachment of ours will take on `session`: its segment's scheme where the
/// session negotiated that scheme and the region is not below the inline threshold (the
/// library's rule), "inline" otherwise. An inline fallback after a refused handle (the peer's
/// ERR_ATTACHMENT) is not seen here.
fn sent_path(session: &xcp::Session, region: &xcp::attach::Region) -> String {
    let n = session.negotiated();
    let scheme = region.segment().scheme();
    let threshold = AttachConfig::default().inline_threshold;
    if n.shared_mem
        && n.attach.contains(&scheme)
        && scheme != xcp::attach::Scheme::Local
        && region.len() >= threshold
    {
        scheme.name().to_string()
    } else {
        "inline".to_string()
    }
}

/// The (path, bytes) of every attachment of a message about to be sent: the regions (see
/// [`sent_path`]) and the bytes already inline in the Ether.
pub(crate) fn sent_paths(
    session: &xcp::Session,
    e: &xcp::Ether,
    regions: &[(Attachment, xcp::attach::Region)],
) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = e
        .attachments
        .iter()
        .filter_map(|a| a.inline_bytes.as_ref())
        .map(|b| ("inline".to_string(), b.len() as u64))
        .collect();
    for (_, r) in regions {
        out.push((sent_path(session, r), r.len() as u64));
    }
    out
}

/// The regions of an `attachments=` argument, taken out of their `Region` objects (a
/// bytes-like value is copied once into a new region). Nothing is taken unless all can be.
fn take_regions(
    py: Python<'_>,
    session: &xcp::Session,
    attachments: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<(Attachment, xcp::attach::Region)>> {
    let Some(attachments) = attachments else {
        return Ok(Vec::new());
    };
    enum Item<'py> {
        Ours(Bound<'py, Region>),
        Copied(xcp::attach::Region),
    }
    let mut items = Vec::new();
    for (k, v) in attachments.iter() {
        let id: String = k.extract().map_err(|_| {
            raise(
                "InvalidError",
                format!("attachments: ids must be str, got {}", type_name(&k)),
            )
        })?;
        if let Ok(r) = v.cast::<Region>() {
            items.push((id, Item::Ours(r.clone())));
            continue;
        }
        // Any other buffer: one copy into a region of the pool.
        let bytes_view = py
            .import("builtins")?
            .getattr("memoryview")?
            .call1((&v,))
            .and_then(|m| m.call_method1("cast", ("B",)))
            .map_err(|_| {
                raise(
                    "InvalidError",
                    format!(
                        "attachments[{id:?}]: expected an xcp.Region or a C-contiguous \
                         bytes-like object, got {}",
                        type_name(&v)
                    ),
                )
            })?;
        let buf = PyBuffer::<u8>::get(&bytes_view)?;
        let len = buf.item_count();
        let s = session.clone();
        let mut region = call(py, None, "alloc", async move { s.alloc(len).await })?;
        buf.copy_to_slice(py, &mut region[..])?;
        drop(buf);
        items.push((id, Item::Copied(region)));
    }
    // Check every region before taking any (the GIL is held from here on).
    for (id, item) in &items {
        if let Item::Ours(r) = item {
            let st = lock(&r.get().state);
            if st.region.is_none() {
                return Err(raise(
                    "InvalidError",
                    format!("attachments[{id:?}]: this region was {} already", st.gone),
                ));
            }
            if st.exports > 0 {
                return Err(exported(st.exports, "sent"));
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (id, item) in items {
        let (region, dtype, shape) = match item {
            Item::Copied(r) => (r, String::new(), Vec::new()),
            Item::Ours(r) => {
                let mut st = lock(&r.get().state);
                st.gone = "sent";
                let region = st
                    .region
                    .take()
                    .ok_or_else(|| raise("InvalidError", format!("attachments[{id:?}]: gone")))?;
                (region, st.dtype.clone(), st.shape.clone())
            }
        };
        let att = Attachment {
            id,
            dtype,
            shape,
            ..Default::default()
        };
        out.push((att, region));
    }
    Ok(out)
}

#[pymethods]
impl Session {
    /// Sends `ether` as a DATA message and returns its msgId once queued. `attachments` maps
    /// ids to `xcp.Region`s (by handle where negotiated, else inline) or to bytes-like objects
    /// (copied once into a region). `codec` is "json" (default) or "protobuf".
    #[pyo3(signature = (ether, *, attachments=None, codec="json"))]
    fn send(
        &self,
        py: Python<'_>,
        ether: &Bound<'_, PyAny>,
        attachments: Option<&Bound<'_, PyDict>>,
        codec: &str,
    ) -> PyResult<u64> {
        let e = ether_arg(py, ether)?;
        let codec = codec_arg(codec)?;
        let regions = take_regions(py, &self.inner, attachments)?;
        self.stats
            .record(true, &sent_paths(&self.inner, &e, &regions));
        let s = self.inner.clone();
        call(py, None, "send", async move {
            send_ether(&s, e, codec, regions).await
        })
    }

    /// Sends `ether` (with `attachments`, as `send` does) and waits for the reply. Raises
    /// `xcp.NackError` when the peer refuses it, `xcp.TimeoutError` after `timeout` seconds
    /// (at most the session's `request_timeout`), `xcp.ClosedError` when the connection ends.
    #[pyo3(signature = (ether, *, attachments=None, codec="json", timeout=None))]
    fn request(
        &self,
        py: Python<'_>,
        ether: &Bound<'_, PyAny>,
        attachments: Option<&Bound<'_, PyDict>>,
        codec: &str,
        timeout: Option<f64>,
    ) -> PyResult<Message> {
        let e = ether_arg(py, ether)?;
        let codec = codec_arg(codec)?;
        let timeout = seconds("timeout", timeout)?;
        let regions = take_regions(py, &self.inner, attachments)?;
        self.stats
            .record(true, &sent_paths(&self.inner, &e, &regions));
        let s = self.inner.clone();
        let m = call(py, timeout, "request", async move {
            request_ether(&s, e, codec, regions).await
        })?;
        message(py, m, &self.stats)
    }

    /// The next message that is not a reply to one of our requests. Raises
    /// `xcp.TimeoutError` after `timeout` seconds (None: wait as long as it takes) and leaves
    /// the session usable; `xcp.ClosedError` once the connection ended and every message was
    /// delivered.
    #[pyo3(signature = (timeout=None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Message> {
        let timeout = seconds("timeout", timeout)?;
        let s = self.inner.clone();
        let m = call(py, timeout, "recv", async move { s.recv().await })?;
        message(py, m, &self.stats)
    }

    /// Sends `ether` as the reply to `msg` (its inReplyTo and channel) and returns its msgId.
    #[pyo3(signature = (msg, ether, *, codec="json"))]
    fn reply(
        &self,
        py: Python<'_>,
        msg: PyRef<'_, Message>,
        ether: &Bound<'_, PyAny>,
        codec: &str,
    ) -> PyResult<u64> {
        let e = ether_arg(py, ether)?;
        let codec = codec_arg(codec)?;
        let (to, channel) = (msg.msg_id, msg.channel);
        self.stats.record(true, &[]);
        let s = self.inner.clone();
        call(py, None, "reply", async move {
            let out = Outgoing::ether(&e, codec)?.reply_to(to).on_channel(channel);
            s.send(out).await
        })
    }

    /// Refuses `msg` with a NACK: `code` is a SPEC name ("ERR_BUSY") or number; the peer's
    /// request raises `xcp.NackError` with these `code`, `retry_after_ms` and `detail`.
    #[pyo3(signature = (msg, code, *, retry_after_ms=0, detail=""))]
    fn nack(
        &self,
        py: Python<'_>,
        msg: PyRef<'_, Message>,
        code: &Bound<'_, PyAny>,
        retry_after_ms: u32,
        detail: &str,
    ) -> PyResult<()> {
        let code = code_arg(code)?;
        let (id, detail) = (msg.msg_id, detail.to_string());
        let s = self.inner.clone();
        call(py, None, "nack", async move {
            s.nack(id, code, retry_after_ms, &detail).await
        })
    }

    /// Sends a PING and returns the round-trip time in seconds.
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        let s = self.inner.clone();
        call(py, None, "ping", async move { s.ping().await }).map(|d| d.as_secs_f64())
    }

    /// A writable `xcp.Region` of `nbytes` from the session's shared pool (memfd on a Unix
    /// socket that negotiated it, else POSIX shm). Waits for room while the pool is full
    /// (`xcp.TimeoutError` after the pool's alloc timeout).
    fn alloc(&self, py: Python<'_>, nbytes: usize) -> PyResult<Region> {
        if nbytes == 0 {
            return Err(raise(
                "InvalidError",
                "alloc(0): a region has at least one byte".into(),
            ));
        }
        let s = self.inner.clone();
        let region = call(py, None, "alloc", async move { s.alloc(nbytes).await })?;
        let pool = self.inner.pool().clone();
        Ok(Region::new(region, pool, String::new(), Vec::new()))
    }

    /// A writable `xcp.Region` of the session's pool shaped as a tensor: `shape` (a tuple of
    /// ints) of `dtype` ("float32", "float16", "bfloat16", "int8", "uint8", "int32",
    /// "int64", ... or a numpy or torch dtype), compact row-major. `np.from_dlpack(region)`
    /// (or `torch.from_dlpack(region)`) is an array over the same memory; fill it, then
    /// `send_tensor(region)` (or the array) sends it by handle with no copy.
    fn empty(
        &self,
        py: Python<'_>,
        shape: &Bound<'_, PyAny>,
        dtype: &Bound<'_, PyAny>,
    ) -> PyResult<Region> {
        let (nbytes, name, dims) = empty_args(shape, dtype)?;
        let s = self.inner.clone();
        let region = call(
            py,
            None,
            "alloc",
            async move { s.alloc(nbytes.max(1)).await },
        )?;
        let pool = self.inner.pool().clone();
        Ok(Region::new(region, pool, name.to_string(), dims))
    }

    /// Sends a tensor: any object with `__dlpack__` in host memory (a numpy array, a torch
    /// CPU tensor, an `xcp.Region` from `empty`, a received `xcp.View`), as the attachment
    /// `id` of `ether` (default `Ether("tensor")`) with its dtype and shape. A tensor that
    /// starts at the first byte of one of our regions goes by handle with no copy (the region
    /// is handed over: arrays over it must not be written to afterwards); any other is
    /// copied once into a region of the pool, which goes by handle, or, when the session
    /// negotiated no handle scheme, copied once inline into the message. The receiver gets
    /// it with `msg.tensor()`. Raises `xcp.InvalidError` for device (non-CPU) tensors,
    /// non-C-contiguous ones and dtypes xcp does not know. Returns the msgId.
    #[pyo3(signature = (tensor, ether=None, *, id="tensor", codec="json"))]
    fn send_tensor(
        &self,
        py: Python<'_>,
        tensor: &Bound<'_, PyAny>,
        ether: Option<&Bound<'_, PyAny>>,
        id: &str,
        codec: &str,
    ) -> PyResult<u64> {
        let e = tensor_ether(py, ether)?;
        let codec = codec_arg(codec)?;
        let out = prepare_tensor(py, &self.inner, tensor, id)?;
        let (e, regions) = finish_tensor_sync(py, &self.inner, e, out)?;
        self.stats
            .record(true, &sent_paths(&self.inner, &e, &regions));
        let s = self.inner.clone();
        call(py, None, "send_tensor", async move {
            send_ether(&s, e, codec, regions).await
        })
    }

    /// `send_tensor`, then waits for the reply (as `request` does) and returns it.
    #[pyo3(signature = (tensor, ether=None, *, id="tensor", codec="json", timeout=None))]
    fn request_tensor(
        &self,
        py: Python<'_>,
        tensor: &Bound<'_, PyAny>,
        ether: Option<&Bound<'_, PyAny>>,
        id: &str,
        codec: &str,
        timeout: Option<f64>,
    ) -> PyResult<Message> {
        let e = tensor_ether(py, ether)?;
        let codec = codec_arg(codec)?;
        let timeout = seconds("timeout", timeout)?;
        let out = prepare_tensor(py, &self.inner, tensor, id)?;
        let (e, regions) = finish_tensor_sync(py, &self.inner, e, out)?;
        self.stats
            .record(true, &sent_paths(&self.inner, &e, &regions));
        let s = self.inner.clone();
        let m = call(py, timeout, "request_tensor", async move {
            request_ether(&s, e, codec, regions).await
        })?;
        message(py, m, &self.stats)
    }

    /// What this session sent and received: `{"sent": {...}, "received": {...}}`, each with
    /// `messages` (DATA messages: sends, requests, replies, tensors; received messages and
    /// replies), `bytes` (attachment bytes) and `by_path`, path ("memfd", "shm", "inline",
    /// ...) -> `{"messages": n, "bytes": n}` (the messages with an attachment on that path,
    /// and the bytes of those attachments). Sent attachments are counted as they are handed
    /// to the session, by the path the session's negotiation gives them; received ones by
    /// `view.path`. The same counters as this session's `xcp.aio.Session`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.stats.to_dict(py)
    }

    /// Closes gracefully (what was sent is flushed). Closing a closed session is no error.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.inner.clone();
        call(py, None, "close", async move { s.close().await })
    }

    /// Whether the connection is over.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// The peer's address.
    #[getter]
    fn peer(&self) -> String {
        self.inner.peer().to_string()
    }

    /// What the handshake settled: {"codecs": [...], "handles": [...], "max_frame_bytes": n,
    /// "ring": bool}. `handles` lists the handle schemes both sides took ("memfd", "shm"),
    /// empty when attachments go inline; `ring` says frames go by the same-host ring (a
    /// `ring://` URL).
    #[getter]
    fn negotiated<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.inner.negotiated();
        let d = PyDict::new(py);
        let codecs: Vec<String> = n.codecs.iter().map(|c| c.to_string()).collect();
        let handles: Vec<&str> = if n.shared_mem {
            n.attach.iter().map(|s| s.name()).collect()
        } else {
            Vec::new()
        };
        d.set_item("codecs", codecs)?;
        d.set_item("handles", handles)?;
        d.set_item("max_frame_bytes", n.max_frame_bytes)?;
        d.set_item("ring", n.ring)?;
        Ok(d)
    }

    /// `with session:` closes it at the end of the block.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Closes the session.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// `Session(peer=..., closed=...)`.
    fn __repr__(&self) -> String {
        format!(
            "Session(peer={:?}, closed={})",
            self.inner.peer(),
            self.inner.is_closed()
        )
    }
}

/// The byte size, dtype name and attachment shape of `empty(shape, dtype)`.
fn empty_args(
    shape: &Bound<'_, PyAny>,
    dtype: &Bound<'_, PyAny>,
) -> PyResult<(usize, &'static str, Vec<u32>)> {
    let dims: Vec<i64> = if let Ok(n) = shape.extract::<i64>() {
        vec![n]
    } else {
        shape.extract().map_err(|_| {
            raise(
                "InvalidError",
                format!("shape: a tuple of ints, got {}", type_name(shape)),
            )
        })?
    };
    if dims.len() > xcp::codec::dlpack::MAX_NDIM {
        return Err(raise(
            "InvalidError",
            format!("shape: {} dimensions, at most 64", dims.len()),
        ));
    }
    let name = dlpack::dtype_arg(dtype)?;
    let dt = dlpack::dtype_of(name).expect("a known dtype");
    let (nbytes, dims) = dlpack::layout(&dims, dt)?;
    Ok((nbytes, name, dims))
}

/// The Ether of a `send_tensor` (`Ether("tensor")` when none is given).
fn tensor_ether(py: Python<'_>, ether: Option<&Bound<'_, PyAny>>) -> PyResult<xcp::Ether> {
    match ether {
        Some(e) if !e.is_none() => ether_arg(py, e),
        _ => Ok(xcp::Ether::new("tensor", Map::new())),
    }
}

/// Where the bytes of a tensor to send come from.
pub(crate) enum TensorSource {
    /// One of our regions, taken: it goes by handle (inline where no scheme was negotiated).
    Ours(xcp::attach::Region),
    /// Another host tensor, to copy once into a new region of the pool.
    Copy(dlpack::Imported),
    /// Copied once inline (no handle scheme negotiated).
    Inline(Bytes),
}

/// A tensor ready to send: its attachment (id, dtype, shape) and its bytes.
pub(crate) struct TensorOut {
    pub(crate) att: Attachment,
    pub(crate) source: TensorSource,
}

/// Whether a session sends attachments by handle.
pub(crate) fn by_handle(s: &xcp::Session) -> bool {
    s.negotiated().shared_mem && !s.negotiated().attach.is_empty()
}

/// Sends `e`: with `regions` through the library's attachment path (by handle, or inline
/// where it decides so), as a plain Ether when there are none.
pub(crate) async fn send_ether(
    s: &xcp::Session,
    e: xcp::Ether,
    codec: CodecId,
    regions: Vec<(Attachment, xcp::attach::Region)>,
) -> xcp::Result<u64> {
    if regions.is_empty() {
        s.send(Outgoing::ether(&e, codec)?).await
    } else {
        s.send_regions(e, codec, regions).await
    }
}

/// [`send_ether`], then waits for the reply.
pub(crate) async fn request_ether(
    s: &xcp::Session,
    e: xcp::Ether,
    codec: CodecId,
    regions: Vec<(Attachment, xcp::attach::Region)>,
) -> xcp::Result<Incoming> {
    if regions.is_empty() {
        s.request(Outgoing::ether(&e, codec)?).await
    } else {
        s.request_regions(e, codec, regions).await
    }
}

/// The session configuration `connect` builds from its arguments (both APIs), refusing
/// `require_handles` without `handles`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect_config(
    connect_timeout: f64,
    request_timeout: f64,
    handles: bool,
    require_handles: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    server_name: Option<&str>,
) -> PyResult<SessionConfig> {
    if require_handles && !handles {
        return Err(raise(
            "InvalidError",
            "require_handles=True with handles=False: nothing could ever be sent by handle".into(),
        ));
    }
    let tls = tls_arg(cert, key, ca, server_name)?;
    config(connect_timeout, request_timeout, handles, tls)
}

/// The `xcp.AttachmentError` of a `require_handles=True` connect to `peer` that negotiated
/// no handle scheme (the GIL is held).
pub(crate) fn no_handles_error(peer: &str) -> PyErr {
    raise_with(
        "AttachmentError",
        format!(
            "{peer}: no attachment handle scheme was negotiated (the peer offers none, or is on \
             another host), and require_handles=True refuses the inline fallback"
        ),
        |x| set_code(x, ErrorCode::ERR_ATTACHMENT, "no handle scheme negotiated"),
    )
}

/// Takes the tensor of a `send_tensor` (the GIL is held): one of our regions (by itself or
/// under an array that starts at its first byte) is taken out of its `Region`; any other host
/// tensor is read through `__dlpack__`.
pub(crate) fn prepare_tensor(
    py: Python<'_>,
    session: &xcp::Session,
    tensor: &Bound<'_, PyAny>,
    id: &str,
) -> PyResult<TensorOut> {
    let take =
        |state: &Mutex<RegionState>, dtype: String, shape: Vec<u32>| -> PyResult<TensorOut> {
            let mut st = lock(state);
            let gone = st.gone;
            let region = st.region.take().ok_or_else(|| {
                raise(
                    "InvalidError",
                    format!("send_tensor: this region was {gone} already"),
                )
            })?;
            st.gone = "sent";
            let att = Attachment {
                id: id.to_string(),
                dtype,
                shape,
                ..Default::default()
            };
            Ok(TensorOut {
                att,
                source: TensorSource::Ours(region),
            })
        };
    if let Ok(r) = tensor.cast::<Region>() {
        let r = r.get();
        let (dtype, shape) = {
            let st = lock(&r.state);
            let len = st.region.as_ref().map_or(r.nbytes, |g| g.len());
            let (dt, dims, _) = tensor_of(&st.dtype, &st.shape, len)
                .map_err(|e| raise("InvalidError", format!("send_tensor: {e}")))?;
            let dims: Vec<u32> = dims.iter().map(|&d| d as u32).collect();
            (dlpack::name_of(dt).unwrap_or("uint8").to_string(), dims)
        };
        return take(&r.state, dtype, shape);
    }
    let imp = dlpack::import(py, tensor)?;
    if imp.nbytes > 0 {
        if let Some(state) = region_at(imp.addr, imp.nbytes) {
            let (dtype, shape) = (imp.dtype.to_string(), imp.shape.clone());
            drop(imp);
            return take(&state, dtype, shape);
        }
    }
    let att = Attachment {
        id: id.to_string(),
        dtype: imp.dtype.to_string(),
        shape: imp.shape.clone(),
        ..Default::default()
    };
    let source = if by_handle(session) {
        TensorSource::Copy(imp)
    } else {
        let b = Bytes::copy_from_slice(imp.bytes());
        drop(imp);
        TensorSource::Inline(b)
    };
    Ok(TensorOut { att, source })
}

/// The Ether and regions to send for `out`, on the sync path: a copy is allocated (waiting
/// with the GIL released) and filled here; inline bytes go into the Ether.
fn finish_tensor_sync(
    py: Python<'_>,
    session: &xcp::Session,
    mut e: xcp::Ether,
    out: TensorOut,
) -> PyResult<(xcp::Ether, Vec<(Attachment, xcp::attach::Region)>)> {
    let TensorOut { mut att, source } = out;
    match source {
        TensorSource::Ours(r) => Ok((e, vec![(att, r)])),
        TensorSource::Copy(imp) => {
            let n = imp.nbytes.max(1);
            let s = session.clone();
            let mut region = call(py, None, "alloc", async move { s.alloc(n).await })?;
            region[..imp.nbytes].copy_from_slice(imp.bytes());
            drop(imp);
            Ok((e, vec![(att, region)]))
        }
        TensorSource::Inline(b) => {
            att.size_bytes = b.len() as u64;
            att.inline_bytes = Some(b);
            e.attachments.push(att);
            Ok((e, Vec::new()))
        }
    }
}

/// An error code from a name ("ERR_BUSY") or a number.
fn code_arg(code: &Bound<'_, PyAny>) -> PyResult<ErrorCode> {
    if let Ok(n) = code.extract::<u32>() {
        return Ok(ErrorCode(n));
    }
    let name: String = code.extract().map_err(|_| {
        raise(
            "InvalidError",
            format!(
                "code: a SPEC name such as \"ERR_BUSY\" or a number, got {}",
                type_name(code)
            ),
        )
    })?;
    (0..=0xFFu32)
        .map(ErrorCode)
        .find(|c| c.name() == Some(name.as_str()))
        .ok_or_else(|| {
            raise(
                "InvalidError",
                format!("code={name:?}: not a SPEC error code name"),
            )
        })
}

/// The certificate material of the `cert=`, `key=`, `ca=` and `server_name=` arguments of
/// `connect` and `Server.bind` (paths to PEM files): all three files make a configuration
/// that serves and connects (mutual authentication); `ca` alone a client that trusts the CA
/// but has no certificate (servers refuse it; it cannot serve). None of them: no TLS
/// material (a `tls://` or `quic://` URL then fails). A missing or unusable file raises
/// `xcp.TlsError` with `failure == "File"`, a key of another certificate "KeyMismatch".
pub(crate) fn tls_arg(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    server_name: Option<&str>,
) -> PyResult<Option<xcp::transport::TlsConfig>> {
    use xcp::transport::TlsConfig;
    let tls = match (cert.as_deref(), key.as_deref(), ca.as_deref()) {
        (None, None, None) => None,
        (Some(c), Some(k), Some(a)) => Some(TlsConfig::from_files(c, k, a).map_err(to_py_err)?),
        (None, None, Some(a)) => Some(TlsConfig::trust_only(a).map_err(to_py_err)?),
        (c, k, a) => {
            let missing: Vec<&str> = [("cert", c), ("key", k), ("ca", a)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(n, _)| *n)
                .collect();
            return Err(raise_with(
                "TlsError",
                format!(
                    "TLS: cert=, key= and ca= go together (or ca= alone, for a client without                      a certificate); missing: {}",
                    missing.join(", ")
                ),
                |x| {
                    x.setattr("failure", "Config")?;
                    x.setattr("detail", format!("missing {}", missing.join(", ")))
                },
            ));
        }
    };
    match (tls, server_name) {
        (Some(t), Some(n)) => Ok(Some(t.with_server_name(n))),
        (None, Some(_)) => Err(raise(
            "InvalidError",
            "server_name= needs the TLS material too (ca=, and cert= and key=)".into(),
        )),
        (t, None) => Ok(t),
    }
}

/// The session configuration of the keyword arguments of `connect` and `Server.bind`.
fn config(
    connect_timeout: f64,
    request_timeout: f64,
    handles: bool,
    tls: Option<xcp::transport::TlsConfig>,
) -> PyResult<SessionConfig> {
    let ct = seconds("connect_timeout", Some(connect_timeout))?.unwrap_or_default();
    let rt = seconds("request_timeout", Some(request_timeout))?.unwrap_or_default();
    let attach = if handles {
        AttachConfig::default()
    } else {
        AttachConfig::inline_only()
    };
    let cfg = SessionConfig::default()
        .with_connect_timeout(ct)
        .with_request_timeout(rt)
        .with_attach(attach);
    Ok(match tls {
        Some(t) => cfg.with_tls(t),
        None => cfg,
    })
}

/// Connects to `url` ("tcp://host:port" or "unix:///path") and returns the `Session` once the
/// handshake finished. `handles=False` sends every attachment inline; `require_handles=True`
/// raises `xcp.AttachmentError` when no handle scheme was negotiated (the peer offers none,
/// or is on another host) instead of falling back to inline bytes. A bad URL raises
/// `xcp.InvalidError`, no answer within `connect_timeout` seconds `xcp.TimeoutError`.
///
/// `tls://host:port` and `quic://host:port` (another host) take `cert=`, `key=` and `ca=`
/// (paths to PEM files: this side's certificate and key, the CA the server's certificate
/// must chain to; `ca=` alone for a client without a certificate) and `server_name=` (the
/// name to check the server's certificate against instead of the URL's host). A missing
/// file or a refused handshake raises `xcp.TlsError`.
#[pyfunction]
#[pyo3(signature = (url, *, connect_timeout=10.0, request_timeout=30.0, handles=true, require_handles=false, cert=None, key=None, ca=None, server_name=None))]
#[allow(clippy::too_many_arguments)]
fn connect(
    py: Python<'_>,
    url: &str,
    connect_timeout: f64,
    request_timeout: f64,
    handles: bool,
    require_handles: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    server_name: Option<&str>,
) -> PyResult<Session> {
    let cfg = connect_config(
        connect_timeout,
        request_timeout,
        handles,
        require_handles,
        cert,
        key,
        ca,
        server_name,
    )?;
    let url = url.to_string();
    let s = call(py, None, "connect", async move {
        xcp::Session::connect(&url, cfg).await
    })?;
    if require_handles && !by_handle(&s) {
        let peer = s.peer().to_string();
        let c = s.clone();
        // Best effort: the error below is what matters.
        let _ = call(py, None, "close", async move { c.close().await });
        return Err(no_handles_error(&peer));
    }
    Ok(Session::new(s))
}

/// A listening socket for XCP connections: `Server.bind(url)`, then `accept()` sessions.
/// `with server:` closes it at the end of the block (sessions accepted live on).
#[pyclass(module = "xcp._xcp", frozen)]
struct Server {
    inner: Mutex<Option<std::sync::Arc<xcp::Server>>>,
    /// The URL really bound: with the real port when bound to port 0.
    #[pyo3(get)]
    url: String,
    /// Set by `close()`: a waiting `accept()` stops then (it holds the server too, so
    /// dropping ours alone would not end it).
    stop: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// A Python server over a bound library server.
    fn new(server: xcp::Server) -> Server {
        Server {
            url: server.local_url(),
            inner: Mutex::new(Some(std::sync::Arc::new(server))),
            stop: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The `xcp.ClosedError` of a closed server.
    fn closed_error(&self) -> PyErr {
        raise_with(
            "ClosedError",
            format!("server {} is closed", self.url),
            |x| x.setattr("reason", "ServerStopped"),
        )
    }
}

/// Resolves once `close()` was called on the server of `stop`.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

#[pymethods]
impl Server {
    /// Binds `url` ("tcp://127.0.0.1:0" for any free port, "unix:///path/x.sock") and starts
    /// accepting; `url` then gives the address really bound. `handles=False` offers no handle
    /// schemes (peers send attachments inline). `tls://` and `quic://` need `cert=`, `key=`
    /// and `ca=` (PEM paths: the server's certificate and key, the CA clients' certificates
    /// must chain to: clients must present one); a missing file raises `xcp.TlsError`.
    #[staticmethod]
    #[pyo3(signature = (url, *, handles=true, connect_timeout=10.0, request_timeout=30.0, cert=None, key=None, ca=None))]
    #[allow(clippy::too_many_arguments)]
    fn bind(
        py: Python<'_>,
        url: &str,
        handles: bool,
        connect_timeout: f64,
        request_timeout: f64,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> PyResult<Server> {
        let tls = tls_arg(cert, key, ca, None)?;
        let cfg = config(connect_timeout, request_timeout, handles, tls)?;
        let url = url.to_string();
        let server = call(py, None, "bind", async move {
            xcp::Server::bind(&url, cfg).await
        })?;
        Ok(Server::new(server))
    }

    /// The next connection whose handshake completed, as a `Session`. Raises
    /// `xcp.TimeoutError` after `timeout` seconds (None: no limit), `xcp.ClosedError` once
    /// the server is closed.
    #[pyo3(signature = (timeout=None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Session> {
        let timeout = seconds("timeout", timeout)?;
        // Subscribed before the check: a close() from now on is seen.
        let stop = self.stop.subscribe();
        let server = lock(&self.inner)
            .clone()
            .ok_or_else(|| self.closed_error())?;
        let s = call(py, timeout, "accept", async move {
            tokio::select! {
                r = server.accept() => r.map(Some),
                _ = stopped(stop) => Ok(None),
            }
        })?;
        match s {
            Some(s) => Ok(Session::new(s)),
            None => Err(self.closed_error()),
        }
    }

    /// Stops accepting and removes a Unix socket file; an `accept()` waiting in another
    /// thread raises `xcp.ClosedError` (reason "ServerStopped") at once. Sessions accepted
    /// live on.
    fn close(&self) {
        let server = lock(&self.inner).take();
        self.stop.send_replace(true);
        drop(server);
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.inner).is_none()
    }

    /// `with server:` closes it at the end of the block.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Closes the server.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    /// `Server(url=...)`.
    fn __repr__(&self) -> String {
        format!("Server(url={:?}, closed={})", self.url, self.closed())
    }
}

/// The extension module `xcp._xcp` (use it through the package `xcp`).
#[pymodule]
fn _xcp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let threading = m.py().import("threading")?;
    let main_ident = threading.call_method0("main_thread")?.getattr("ident")?;
    if threading.call_method0("get_ident")?.eq(main_ident)? {
        let _ = MAIN_THREAD.set(std::thread::current().id());
    }
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_class::<Server>()?;
    m.add_class::<Session>()?;
    m.add_class::<Message>()?;
    m.add_class::<Ether>()?;
    m.add_class::<Region>()?;
    m.add_class::<View>()?;
    m.add_function(wrap_pyfunction!(dlpack::_dlpack_live, m)?)?;
    aio::register(m)?;
    Ok(())
}
