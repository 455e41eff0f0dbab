//! The asyncio bridge under `xcp.aio` (issue 21): every operation is a task on the same
//! tokio runtime the synchronous API uses, and no Python thread waits for it.
//!
//! A `_aio_*` function of the module checks its arguments (raising at once, as the sync call
//! would), spawns the operation on the runtime and returns an [`AioOp`] at once. When the
//! operation completes, its task posts the outcome to the bridge's one delivery thread, which
//! attaches to Python (once for every outcome queued at the time), turns the outcome into
//! Python objects and hands it to the event loop: `loop.call_soon_threadsafe(done, ok,
//! value)`, where `done` is the callable `xcp/aio.py` passed in (it resolves the
//! `asyncio.Future` the coroutine awaits, or, when that future was cancelled meanwhile, keeps
//! a received message or session for the next call so nothing is lost). The runtime's worker
//! threads never wait for the GIL (errors stay Rust values, [`Fail`], until delivery), except
//! to copy a bytes-like attachment into a region, and then they step aside
//! (`block_in_place`).
//!
//! `AioOp.cancel()` aborts the task. The library's `recv`, `accept` and `request` futures may
//! be dropped at any await point (a message not yet taken off the session's queue stays
//! there), so the session stays usable. An aborted task sends `done(None, None)` when it is
//! dropped, so `done` is called exactly once per operation, and `xcp.aio` knows when a
//! cancelled `recv` can no longer deliver (the next `recv` waits for that, keeping the order).
//!
//! Errors are the same exceptions the sync API raises (see `to_py_err`), delivered as the
//! value of a `done(False, exc)` call; a panic inside an operation is caught and delivered as
//! `xcp.XcpError`, never unwound across the FFI boundary.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use xcp::conn::Outgoing;
use xcp::Attachment;

use crate::{
    by_handle, code_arg, codec_arg, config, connect_config, empty_args, ether_arg, exported, lock,
    message, no_handles_error, panic_text, prepare_tensor, raise, raise_with, request_ether,
    runtime, seconds, send_ether, sent_paths, tensor_ether, timeout_error, tls_arg, to_py_err,
    type_name, Message, Region, Server, Session, Stats, TensorOut, TensorSource,
};

/// A running asyncio operation of `xcp.aio`: `cancel()` aborts its task on the runtime.
#[pyclass(module = "xcp._xcp", frozen)]
pub(crate) struct AioOp {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl AioOp {
    /// Aborts the operation's task: it stops at its next await point, and `done(None, None)`
    /// says when it is gone. A task that already finished (its `done` is scheduled, or ran)
    /// is not affected.
    fn cancel(&self) {
        self.abort.abort();
    }

    /// Whether the task finished (completed or aborted).
    #[getter]
    fn finished(&self) -> bool {
        self.abort.is_finished()
    }

    /// `AioOp(finished=...)`.
    fn __repr__(&self) -> String {
        format!("AioOp(finished={})", self.finished())
    }
}

/// Polls a future, catching a panic of its `poll` as the panic's message.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.get_mut().0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(panic_text(&*p))),
        }
    }
}

/// The `xcp.XcpError` of a caught panic.
fn panic_error(p: &str) -> PyErr {
    raise(
        "XcpError",
        format!("internal error in xcp (a bug; please report it): {p}"),
    )
}

/// Why an operation failed, kept as Rust values on the runtime: the Python exception is made
/// where the outcome is delivered (holding the GIL), so a worker thread never waits for it.
enum Fail {
    /// An error of the library (raised as `to_py_err` maps it).
    Lib(xcp::Error),
    /// A `timeout=` of the call passed: what was waited for, and how long.
    Timeout(&'static str, Duration),
    /// An exception made at delivery.
    Later(Box<dyn FnOnce() -> PyErr + Send>),
    /// An exception made already (under the GIL).
    Py(PyErr),
}

impl From<xcp::Error> for Fail {
    fn from(e: xcp::Error) -> Fail {
        Fail::Lib(e)
    }
}

impl From<PyErr> for Fail {
    fn from(e: PyErr) -> Fail {
        Fail::Py(e)
    }
}

impl Fail {
    /// The Python exception (the GIL is held: `raise` attaches again, which is free then).
    fn into_py(self) -> PyErr {
        match self {
            Fail::Lib(e) => to_py_err(e),
            Fail::Timeout(what, t) => timeout_error(what, Some(t)),
            Fail::Later(make) => make(),
            Fail::Py(e) => e,
        }
    }
}

/// What an operation's future gives.
type Outcome<T> = Result<T, Fail>;

/// Spawns `fut` on the runtime (bounded by `timeout`, which raises `xcp.TimeoutError`
/// naming `what`); its result, made a Python object by `convert`, goes to the event loop
/// `event_loop` as `done(True, value)`, an error as `done(False, exception)`, and an aborted
/// task says so with `done(None, None)` when it is dropped: `done` is called exactly once.
fn start<F, T, C>(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    timeout: Option<Duration>,
    what: &'static str,
    fut: F,
    convert: C,
) -> PyResult<AioOp>
where
    F: Future<Output = Outcome<T>> + Send + 'static,
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let rt = runtime()?;
    let answer = Answer {
        to: Some((event_loop.clone().unbind(), done.clone().unbind())),
    };
    let bounded = async move {
        match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(Fail::Timeout(what, t)),
            },
            None => fut.await,
        }
    };
    let task = async move {
        // Moved into the task: dropped with it when it is aborted before it answers.
        let answer = answer;
        let outcome = CatchUnwind(Box::pin(bounded)).await;
        answer.deliver(outcome, convert);
    };
    let handle = rt.spawn(task);
    Ok(AioOp {
        abort: handle.abort_handle(),
    })
}

/// Where an operation's outcome goes: `loop.call_soon_threadsafe(done, ok, value)`. Dropped
/// without delivering (the task was aborted), it sends `done(None, None)`, so the Python side
/// knows the task will never deliver (a cancelled `recv` may still deliver a message until
/// then; the next `recv` waits for that before it takes the next one, keeping the order).
struct Answer {
    to: Option<(Py<PyAny>, Py<PyAny>)>,
}

impl Answer {
    /// Posts an outcome for the event loop to the delivery thread. While the interpreter
    /// shuts down nothing is delivered (nobody waits any more); a closed loop refuses the
    /// call, and the value is dropped then.
    fn deliver<T, C>(mut self, outcome: Result<Outcome<T>, String>, convert: C)
    where
        T: Send + 'static,
        C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    {
        let Some((event_loop, done)) = self.to.take() else {
            return;
        };
        post(Box::new(move |py| {
            let result = match outcome {
                Ok(Ok(v)) => std::panic::catch_unwind(AssertUnwindSafe(|| convert(py, v)))
                    .unwrap_or_else(|p| Err(panic_error(&panic_text(&*p)))),
                Ok(Err(e)) => Err(e.into_py()),
                Err(p) => Err(panic_error(&p)),
            };
            let (ok, value) = match result {
                Ok(v) => (true, v),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            // A closed loop raises RuntimeError: the awaiting coroutine is gone with it.
            let _ = event_loop
                .bind(py)
                .call_method1("call_soon_threadsafe", (done.bind(py), ok, value));
        }));
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some((event_loop, done)) = self.to.take() {
            post(Box::new(move |py| {
                let _ = event_loop.bind(py).call_method1(
                    "call_soon_threadsafe",
                    (done.bind(py), py.None(), py.None()),
                );
            }));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The delivery thread: the one thread that attaches to Python for outcomes, so the runtime's
// worker threads never wait for the GIL (a loop busy in Python code would stall every
// session's I/O otherwise). It attaches once for all the outcomes queued at the time.

/// Work for the delivery thread, run with the GIL held.
type Job = Box<dyn for<'py> FnOnce(Python<'py>) + Send>;

/// The delivery thread's queue (None where the thread could not start).
static DELIVERY: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();

/// How many queued jobs the delivery thread runs under one attach before it lets the event
/// loop have the GIL again.
const BATCH: usize = 256;

/// Runs `job` on the delivery thread (or, where it is not running, here).
fn post(job: Job) {
    let queue = DELIVERY.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("xcp-aio-deliver".into())
            .spawn(move || delivery_loop(rx))
            .ok()
            .map(|_| tx)
    });
    let job = match queue {
        Some(tx) => match tx.send(job) {
            Ok(()) => return,
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    run_job(job);
}

/// Runs `job` attached to Python, unless the interpreter is shutting down.
fn run_job(job: Job) {
    let _ = Python::try_attach(|py| run_attached(py, job));
}

/// Runs `job` (a panic stays here: the job's future simply never resolves).
fn run_attached(py: Python<'_>, job: Job) {
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(py)));
}

/// The delivery thread: each job that comes, and whatever queued behind it, under one attach.
fn delivery_loop(rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let attached = Python::try_attach(|py| {
            run_attached(py, first);
            for _ in 1..BATCH {
                match rx.try_recv() {
                    Ok(job) => run_attached(py, job),
                    Err(_) => break,
                }
            }
        });
        if attached.is_none() {
            // The interpreter is gone or going: nobody waits for these any more.
            return;
        }
    }
}

/// `None` as a Python object.
fn none(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(py.None())
}

/// A msgId as a Python int.
fn int(py: Python<'_>, id: u64) -> PyResult<Py<PyAny>> {
    Ok(id.into_pyobject(py)?.into_any().unbind())
}

/// The conversion of a received message to an `xcp.Message`, counted in `stats`.
fn msg(
    stats: Arc<Stats>,
) -> impl FnOnce(Python<'_>, xcp::conn::Incoming) -> PyResult<Py<PyAny>> + Send + 'static {
    move |py, m| Ok(Py::new(py, message(py, m, &stats)?)?.into_any())
}

/// A library session as an `xcp.Session` (the sync class; `xcp.aio.Session` wraps it).
fn session(py: Python<'_>, s: xcp::Session) -> PyResult<Py<PyAny>> {
    Ok(Py::new(py, Session::new(s))?.into_any())
}

// ---------------------------------------------------------------------------------------------
// Attachments: taken and copied on the runtime, not on the event loop's thread.

/// An attachment of an `attachments=` argument, before it is sent.
enum Pending {
    /// One of our regions: taken out of its `Region` right before sending.
    Ours(Py<Region>),
    /// Any other C-contiguous buffer: copied once into a region allocated on the runtime (an
    /// allocation may wait for room in the pool, which must not block the event loop).
    Copy(PyBuffer<u8>),
}

/// The attachments of an `attachments=` argument, checked for their types (the GIL is held:
/// this runs in the coroutine's call).
fn collect(
    py: Python<'_>,
    attachments: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<(String, Pending)>> {
    let Some(attachments) = attachments else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (k, v) in attachments.iter() {
        let id: String = k.extract().map_err(|_| {
            raise(
                "InvalidError",
                format!("attachments: ids must be str, got {}", type_name(&k)),
            )
        })?;
        if let Ok(r) = v.cast::<Region>() {
            out.push((id, Pending::Ours(r.clone().unbind())));
            continue;
        }
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
        out.push((id, Pending::Copy(PyBuffer::<u8>::get(&bytes_view)?)));
    }
    Ok(out)
}

/// The regions to send of `pending`: copies allocated (awaiting room) and filled, then every
/// region of ours checked and taken, all or none, as the sync `send` does.
async fn materialize(
    s: &xcp::Session,
    pending: Vec<(String, Pending)>,
) -> Outcome<Vec<(Attachment, xcp::attach::Region)>> {
    if pending.is_empty() {
        // Nothing to copy or check: no GIL, so no block_in_place (each one hands this worker's
        // tasks to a fresh thread while it waits for a GIL the event loop may hold).
        return Ok(Vec::new());
    }
    let mut copies = Vec::with_capacity(pending.len());
    for (_, p) in &pending {
        copies.push(match p {
            Pending::Copy(buf) => Some(s.alloc(buf.item_count()).await?),
            Pending::Ours(_) => None,
        });
    }
    // The copies and the checks need the GIL: the worker steps aside while it waits for it
    // (block_in_place hands its other tasks to another worker).
    let taken = tokio::task::block_in_place(|| Python::attach(|py| take(py, pending, copies)));
    Ok(taken?)
}

/// The second half of [`materialize`], under the GIL: fills the copies, then checks and takes
/// our regions.
fn take(
    py: Python<'_>,
    pending: Vec<(String, Pending)>,
    mut copies: Vec<Option<xcp::attach::Region>>,
) -> PyResult<Vec<(Attachment, xcp::attach::Region)>> {
    for ((_, p), copy) in pending.iter().zip(copies.iter_mut()) {
        if let (Pending::Copy(buf), Some(region)) = (p, copy.as_mut()) {
            buf.copy_to_slice(py, &mut region[..])?;
        }
    }
    for (id, p) in &pending {
        if let Pending::Ours(r) = p {
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
    let mut out = Vec::with_capacity(pending.len());
    for ((id, p), copy) in pending.into_iter().zip(copies) {
        let (region, dtype, shape) = match (p, copy) {
            (Pending::Ours(r), _) => {
                let mut st = lock(&r.get().state);
                st.gone = "sent";
                let region = st
                    .region
                    .take()
                    .ok_or_else(|| raise("InvalidError", format!("attachments[{id:?}]: gone")))?;
                (region, st.dtype.clone(), st.shape.clone())
            }
            (Pending::Copy(buf), Some(region)) => {
                drop(buf);
                (region, String::new(), Vec::new())
            }
            (Pending::Copy(_), None) => {
                return Err(raise(
                    "XcpError",
                    format!("attachments[{id:?}]: no region was allocated (a bug)"),
                ))
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

// ---------------------------------------------------------------------------------------------
// The operations. Each takes the running loop and the `done` callable first, then the
// session or server it works on, then the arguments of the sync call.

/// Starts `connect` (see `xcp.connect`); `done` gets an `xcp.Session`.
#[pyfunction]
#[pyo3(signature = (event_loop, done, url, *, connect_timeout=10.0, request_timeout=30.0, handles=true, require_handles=false, cert=None, key=None, ca=None, server_name=None))]
#[allow(clippy::too_many_arguments)]
fn _aio_connect(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    url: &str,
    connect_timeout: f64,
    request_timeout: f64,
    handles: bool,
    require_handles: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    server_name: Option<&str>,
) -> PyResult<AioOp> {
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
    let fut = async move {
        let s = xcp::Session::connect(&url, cfg).await?;
        if require_handles && !by_handle(&s) {
            let peer = s.peer().to_string();
            // Best effort: the error below is what matters.
            let _ = s.close().await;
            return Err(Fail::Later(Box::new(move || no_handles_error(&peer))));
        }
        Ok(s)
    };
    start(event_loop, done, None, "connect", fut, session)
}

/// Starts `Server.bind`; `done` gets an `xcp.Server`.
#[pyfunction]
#[pyo3(signature = (event_loop, done, url, *, handles=true, connect_timeout=10.0, request_timeout=30.0, cert=None, key=None, ca=None))]
#[allow(clippy::too_many_arguments)]
fn _aio_bind(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    url: &str,
    handles: bool,
    connect_timeout: f64,
    request_timeout: f64,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> PyResult<AioOp> {
    let tls = tls_arg(cert, key, ca, None)?;
    let cfg = config(connect_timeout, request_timeout, handles, tls)?;
    let url = url.to_string();
    let fut = async move { Ok(xcp::Server::bind(&url, cfg).await?) };
    start(event_loop, done, None, "bind", fut, |py, server| {
        Ok(Py::new(py, Server::new(server))?.into_any())
    })
}

/// Starts `server.accept(timeout)`; `done` gets an `xcp.Session`.
#[pyfunction]
#[pyo3(signature = (event_loop, done, server, timeout=None))]
fn _aio_accept(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    server: &Bound<'_, Server>,
    timeout: Option<f64>,
) -> PyResult<AioOp> {
    let timeout = seconds("timeout", timeout)?;
    let this = server.get();
    let inner = lock(&this.inner).clone().ok_or_else(|| {
        raise_with(
            "ClosedError",
            format!("server {} is closed", this.url),
            |x| x.setattr("reason", "ServerStopped"),
        )
    })?;
    let fut = async move { Ok(inner.accept().await?) };
    start(event_loop, done, timeout, "accept", fut, session)
}

/// Starts `session.send(...)`; `done` gets the msgId.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, ether, *, attachments=None, codec="json"))]
fn _aio_send(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    ether: &Bound<'_, PyAny>,
    attachments: Option<&Bound<'_, PyDict>>,
    codec: &str,
) -> PyResult<AioOp> {
    let e = ether_arg(py, ether)?;
    let codec = codec_arg(codec)?;
    let pending = collect(py, attachments)?;
    let s = session.get().inner.clone();
    let stats = session.get().stats.clone();
    let fut = async move {
        let regions = materialize(&s, pending).await?;
        stats.record(true, &sent_paths(&s, &e, &regions));
        Ok(send_ether(&s, e, codec, regions).await?)
    };
    start(event_loop, done, None, "send", fut, int)
}

/// Starts `session.request(...)`; `done` gets the reply, an `xcp.Message`.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, ether, *, attachments=None, codec="json", timeout=None))]
#[allow(clippy::too_many_arguments)]
fn _aio_request(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    ether: &Bound<'_, PyAny>,
    attachments: Option<&Bound<'_, PyDict>>,
    codec: &str,
    timeout: Option<f64>,
) -> PyResult<AioOp> {
    let e = ether_arg(py, ether)?;
    let codec = codec_arg(codec)?;
    let timeout = seconds("timeout", timeout)?;
    let pending = collect(py, attachments)?;
    let s = session.get().inner.clone();
    let stats = session.get().stats.clone();
    let sent = stats.clone();
    let fut = async move {
        let regions = materialize(&s, pending).await?;
        sent.record(true, &sent_paths(&s, &e, &regions));
        Ok(request_ether(&s, e, codec, regions).await?)
    };
    start(event_loop, done, timeout, "request", fut, msg(stats))
}

/// Starts `session.recv(timeout)`; `done` gets an `xcp.Message`.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, timeout=None))]
fn _aio_recv(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    timeout: Option<f64>,
) -> PyResult<AioOp> {
    let timeout = seconds("timeout", timeout)?;
    let s = session.get().inner.clone();
    let stats = session.get().stats.clone();
    // The library's recv may be dropped before it returns (a cancel, a timeout) without
    // losing a message: one not taken off the queue yet stays there for the next recv.
    let fut = async move { Ok(s.recv().await?) };
    start(event_loop, done, timeout, "recv", fut, msg(stats))
}

/// Starts `session.reply(msg, ether)`; `done` gets the msgId.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, msg, ether, *, codec="json"))]
fn _aio_reply(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    msg: PyRef<'_, Message>,
    ether: &Bound<'_, PyAny>,
    codec: &str,
) -> PyResult<AioOp> {
    let e = ether_arg(py, ether)?;
    let codec = codec_arg(codec)?;
    let (to, channel) = (msg.msg_id, msg.channel);
    let s = session.get().inner.clone();
    let stats = session.get().stats.clone();
    let fut = async move {
        stats.record(true, &[]);
        let sent = match Outgoing::ether(&e, codec) {
            Ok(out) => s.send(out.reply_to(to).on_channel(channel)).await,
            Err(err) => Err(err),
        };
        Ok(sent?)
    };
    start(event_loop, done, None, "reply", fut, int)
}

/// Starts `session.nack(msg, code, ...)`; `done` gets None.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, msg, code, *, retry_after_ms=0, detail=""))]
#[allow(clippy::too_many_arguments)]
fn _aio_nack(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    msg: PyRef<'_, Message>,
    code: &Bound<'_, PyAny>,
    retry_after_ms: u32,
    detail: &str,
) -> PyResult<AioOp> {
    let code = code_arg(code)?;
    let (id, detail) = (msg.msg_id, detail.to_string());
    let s = session.get().inner.clone();
    let fut = async move {
        s.nack(id, code, retry_after_ms, &detail).await?;
        Ok(())
    };
    start(event_loop, done, None, "nack", fut, |py, ()| none(py))
}

/// Starts `session.ping()`; `done` gets the round-trip time in seconds.
#[pyfunction]
fn _aio_ping(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
) -> PyResult<AioOp> {
    let s = session.get().inner.clone();
    let fut = async move { Ok(s.ping().await?) };
    start(event_loop, done, None, "ping", fut, |py, d: Duration| {
        Ok(d.as_secs_f64().into_pyobject(py)?.into_any().unbind())
    })
}

/// Starts `session.alloc(nbytes)`; `done` gets an `xcp.Region`.
#[pyfunction]
fn _aio_alloc(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    nbytes: usize,
) -> PyResult<AioOp> {
    if nbytes == 0 {
        return Err(raise(
            "InvalidError",
            "alloc(0): a region has at least one byte".into(),
        ));
    }
    let s = session.get().inner.clone();
    let pool = s.pool().clone();
    let fut = async move { Ok(s.alloc(nbytes).await?) };
    start(event_loop, done, None, "alloc", fut, move |py, region| {
        let r = Region::new(region, pool, String::new(), Vec::new());
        Ok(Py::new(py, r)?.into_any())
    })
}

/// Starts `session.empty(shape, dtype)`; `done` gets an `xcp.Region` shaped as the tensor.
#[pyfunction]
fn _aio_empty(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    shape: &Bound<'_, PyAny>,
    dtype: &Bound<'_, PyAny>,
) -> PyResult<AioOp> {
    let (nbytes, name, dims) = empty_args(shape, dtype)?;
    let s = session.get().inner.clone();
    let pool = s.pool().clone();
    let fut = async move { Ok(s.alloc(nbytes.max(1)).await?) };
    start(event_loop, done, None, "empty", fut, move |py, region| {
        let r = Region::new(region, pool, name.to_string(), dims);
        Ok(Py::new(py, r)?.into_any())
    })
}

/// The Ether and regions to send for a prepared tensor, on the runtime: a copy is allocated
/// there (awaiting room in the pool) and filled with the GIL held, the worker stepping aside
/// meanwhile (`block_in_place`); inline bytes go into the Ether.
async fn finish_tensor(
    s: &xcp::Session,
    mut e: xcp::Ether,
    out: TensorOut,
) -> Outcome<(xcp::Ether, Vec<(Attachment, xcp::attach::Region)>)> {
    let TensorOut { mut att, source } = out;
    match source {
        TensorSource::Ours(r) => Ok((e, vec![(att, r)])),
        TensorSource::Copy(imp) => {
            let mut region = s.alloc(imp.nbytes.max(1)).await?;
            tokio::task::block_in_place(|| {
                Python::attach(|_py| {
                    region[..imp.nbytes].copy_from_slice(imp.bytes());
                    // The producer's capsule goes with the GIL held.
                    drop(imp);
                })
            });
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

/// Starts `session.send_tensor(tensor, ether, ...)`; `done` gets the msgId.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, tensor, ether=None, *, id="tensor", codec="json"))]
#[allow(clippy::too_many_arguments)]
fn _aio_send_tensor(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    tensor: &Bound<'_, PyAny>,
    ether: Option<&Bound<'_, PyAny>>,
    id: &str,
    codec: &str,
) -> PyResult<AioOp> {
    let e = tensor_ether(py, ether)?;
    let codec = codec_arg(codec)?;
    let s = session.get().inner.clone();
    let out = prepare_tensor(py, &s, tensor, id)?;
    let stats = session.get().stats.clone();
    let fut = async move {
        let (e, regions) = finish_tensor(&s, e, out).await?;
        stats.record(true, &sent_paths(&s, &e, &regions));
        Ok(send_ether(&s, e, codec, regions).await?)
    };
    start(event_loop, done, None, "send_tensor", fut, int)
}

/// Starts `session.request_tensor(tensor, ether, ...)`; `done` gets the reply.
#[pyfunction]
#[pyo3(signature = (event_loop, done, session, tensor, ether=None, *, id="tensor", codec="json", timeout=None))]
#[allow(clippy::too_many_arguments)]
fn _aio_request_tensor(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
    tensor: &Bound<'_, PyAny>,
    ether: Option<&Bound<'_, PyAny>>,
    id: &str,
    codec: &str,
    timeout: Option<f64>,
) -> PyResult<AioOp> {
    let e = tensor_ether(py, ether)?;
    let codec = codec_arg(codec)?;
    let timeout = seconds("timeout", timeout)?;
    let s = session.get().inner.clone();
    let out = prepare_tensor(py, &s, tensor, id)?;
    let stats = session.get().stats.clone();
    let sent = stats.clone();
    let fut = async move {
        let (e, regions) = finish_tensor(&s, e, out).await?;
        sent.record(true, &sent_paths(&s, &e, &regions));
        Ok(request_ether(&s, e, codec, regions).await?)
    };
    start(event_loop, done, timeout, "request_tensor", fut, msg(stats))
}

/// Starts `session.close()`; `done` gets None.
#[pyfunction]
fn _aio_close(
    event_loop: &Bound<'_, PyAny>,
    done: &Bound<'_, PyAny>,
    session: &Bound<'_, Session>,
) -> PyResult<AioOp> {
    let s = session.get().inner.clone();
    let fut = async move { Ok(s.close().await?) };
    start(event_loop, done, None, "close", fut, |py, ()| none(py))
}

/// Adds the bridge's class and functions to the module `xcp._xcp`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<AioOp>()?;
    m.add_function(wrap_pyfunction!(_aio_connect, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_bind, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_accept, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_send, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_request, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_recv, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_reply, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_nack, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_ping, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_alloc, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_empty, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_send_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_request_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(_aio_close, m)?)?;
    Ok(())
}
