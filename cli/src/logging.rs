//! A log writer that never blocks the caller: formatted lines go to a bounded queue, and one
//! background thread writes them to stderr.
//!
//! A server's stderr is often a pipe to a supervisor or a log shipper. When that consumer
//! stops reading, the pipe fills and every `write(2)` to it blocks; written from the tokio
//! workers (as a plain `std::io::stderr` writer does), one stalled consumer stops the whole
//! data plane. Here the caller only hands its line over ([`Queue::submit`], a `try_send` and
//! a few atomics, no lock held across I/O); when the queue is full (by lines or by bytes) the
//! line is dropped and counted, and the next line that gets in is preceded by
//! `xcp: N log lines dropped (stderr was not being read)`.
//!
//! At exit, [`flush`] waits a short, bounded time for what is queued, so the last messages
//! still reach a terminal, and never hangs on a stalled stderr (the writer thread may stay
//! blocked in `write(2)`; the process exits around it).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// The most lines queued for the writer thread.
pub const QUEUE_LINES: usize = 1024;
/// The most bytes queued for the writer thread.
pub const QUEUE_BYTES: usize = 256 << 10;
/// How long [`flush`] waits for queued lines at exit.
pub const EXIT_FLUSH: Duration = Duration::from_millis(500);

/// The process's queue, for [`flush`].
static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// One line for the writer thread, with the count of lines dropped just before it.
struct Line {
    dropped_before: u64,
    bytes: Vec<u8>,
}

/// The producer side of the log queue, shared by every thread that logs.
pub struct Queue {
    tx: SyncSender<Line>,
    /// Lines dropped since the last one queued.
    dropped: AtomicU64,
    /// Bytes queued and not yet written.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Lines queued so far, and lines the writer thread is done with (written or failed).
    queued: AtomicU64,
    done: AtomicU64,
}

impl Queue {
    /// Starts a writer thread that writes to `out`, behind a queue of at most `lines` lines
    /// and `bytes` bytes.
    pub fn start(
        out: Box<dyn Write + Send>,
        lines: usize,
        bytes: usize,
    ) -> std::io::Result<Arc<Queue>> {
        let (tx, rx) = sync_channel(lines);
        let queue = Arc::new(Queue {
            tx,
            dropped: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            max_bytes: bytes,
            queued: AtomicU64::new(0),
            done: AtomicU64::new(0),
        });
        let q = queue.clone();
        std::thread::Builder::new()
            .name("xcp-log".into())
            .spawn(move || write_lines(rx, &q, out))?;
        Ok(queue)
    }

    /// Queues one formatted line (or several; whatever one event wrote) without blocking:
    /// when the queue is full it is dropped and counted.
    pub fn submit(&self, bytes: Vec<u8>) {
        let len = bytes.len();
        if self.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let dropped_before = self.dropped.swap(0, Ordering::AcqRel);
        self.send(Line {
            dropped_before,
            bytes,
        });
    }

    fn send(&self, line: Line) {
        let len = line.bytes.len();
        match self.tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                let lost = line.dropped_before + u64::from(!line.bytes.is_empty());
                self.dropped.fetch_add(lost, Ordering::AcqRel);
            }
        }
    }

    /// Lines dropped and not yet reported.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    /// Reports the drops not yet reported, then waits until the writer thread has written
    /// everything queued before this call, or `timeout` passed. Whether it all went out.
    pub fn flush(&self, timeout: Duration) -> bool {
        let dropped_before = self.dropped.swap(0, Ordering::AcqRel);
        if dropped_before > 0 {
            self.send(Line {
                dropped_before,
                bytes: Vec::new(),
            });
        }
        let target = self.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            if self.done.load(Ordering::Acquire) >= target {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The writer thread: writes each line, preceded by the note of what was dropped before it.
/// Write errors (stderr closed) are ignored: there is nowhere else to say so.
fn write_lines(rx: Receiver<Line>, queue: &Queue, mut out: Box<dyn Write + Send>) {
    for line in rx {
        if line.dropped_before > 0 {
            let _ = writeln!(
                out,
                "xcp: {} log lines dropped (stderr was not being read)",
                line.dropped_before
            );
        }
        if !line.bytes.is_empty() {
            let _ = out.write_all(&line.bytes);
        }
        let _ = out.flush();
        queue
            .queued_bytes
            .fetch_sub(line.bytes.len(), Ordering::AcqRel);
        queue.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// The [`MakeWriter`] of the subscriber: every event's line goes to the queue.
#[derive(Clone)]
pub struct NonBlocking(Arc<Queue>);

impl NonBlocking {
    /// A writer onto `queue`.
    pub fn new(queue: Arc<Queue>) -> NonBlocking {
        NonBlocking(queue)
    }
}

/// One event's output: collected, then queued when dropped.
pub struct LineWriter<'a> {
    queue: &'a Queue,
    buf: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.submit(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            queue: &self.0,
            buf: Vec::with_capacity(256),
        }
    }
}

/// The process's non-blocking stderr writer, started on the first call. The thread writes to
/// a duplicate of descriptor 2 (so it never holds the lock of `std::io::stderr` while it is
/// blocked). `None` where the thread could not be started.
pub fn stderr_writer() -> Option<NonBlocking> {
    if let Some(q) = QUEUE.get() {
        return Some(NonBlocking::new(q.clone()));
    }
    let out: Box<dyn Write + Send> = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        Err(_) => Box::new(std::io::stderr()),
    };
    let queue = Queue::start(out, QUEUE_LINES, QUEUE_BYTES).ok()?;
    Some(NonBlocking::new(QUEUE.get_or_init(|| queue).clone()))
}

/// At exit: waits up to [`EXIT_FLUSH`] for the queued lines to be written (and reports lines
/// dropped and not yet reported). Returns at once without a queue.
pub fn flush() {
    if let Some(q) = QUEUE.get() {
        q.flush(EXIT_FLUSH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// A writer that blocks until told to go on, and records what it wrote.
    struct Stalled {
        go: mpsc::Receiver<()>,
        open: bool,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if !self.open {
                let _ = self.go.recv();
                self.open = true;
            }
            self.out.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn stalled(lines: usize, bytes: usize) -> (Arc<Queue>, mpsc::Sender<()>, Arc<Mutex<Vec<u8>>>) {
        let (go_tx, go) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let w = Stalled {
            go,
            open: false,
            out: out.clone(),
        };
        (Queue::start(Box::new(w), lines, bytes).unwrap(), go_tx, out)
    }

    fn text(out: &Arc<Mutex<Vec<u8>>>) -> String {
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    /// The counts of the drop notes in `text`.
    fn notes(text: &str) -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("xcp: "))
            .filter_map(|l| l.strip_suffix(" log lines dropped (stderr was not being read)"))
            .map(|n| n.parse().unwrap())
            .collect()
    }

    #[test]
    fn a_stalled_writer_never_blocks_the_caller_and_drops_are_reported() {
        let (q, go, out) = stalled(8, 1 << 20);
        let started = Instant::now();
        for i in 0..10_000 {
            q.submit(format!("line {i}\n").into_bytes());
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The thread holds one line (once it took it), the queue eight: the rest were dropped.
        let queued = q.queued.load(Ordering::Acquire);
        assert!((8..=9).contains(&queued), "{queued}");
        let dropped = 10_000 - queued;
        // Unreported: all of them, or those after the line that got in when the thread took
        // the first one (that line carries the count before it).
        let unreported = q.dropped();
        assert!(unreported > 0 && unreported <= dropped, "{unreported}");
        assert!(!q.flush(Duration::from_millis(20)), "flush must give up");
        assert_eq!(q.dropped(), unreported);
        // The consumer reads again: what was queued goes out, then the next line, after the
        // count of what was dropped.
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.done.load(Ordering::Acquire) < queued {
            assert!(Instant::now() < deadline, "the writer thread did not drain");
            std::thread::sleep(Duration::from_millis(1));
        }
        q.submit(b"after\n".to_vec());
        assert!(q.flush(Duration::from_secs(5)));
        let text = text(&out);
        assert!(text.starts_with("line 0\n"), "{text}");
        let note =
            format!("xcp: {unreported} log lines dropped (stderr was not being read)\nafter\n");
        assert!(text.ends_with(&note), "{text}");
        assert_eq!(notes(&text).iter().sum::<u64>(), dropped, "{text}");
        assert_eq!(
            text.lines().count() as u64,
            queued + 1 + notes(&text).len() as u64
        );
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn the_byte_bound_drops_too() {
        let (q, go, out) = stalled(1000, 100);
        q.submit(vec![b'a'; 60]);
        q.submit(vec![b'b'; 60]);
        assert_eq!(q.dropped(), 1);
        go.send(()).unwrap();
        assert!(q.flush(Duration::from_secs(5)));
        let text = text(&out);
        assert!(text.starts_with(&"a".repeat(60)), "{text}");
        assert!(text.ends_with("xcp: 1 log lines dropped (stderr was not being read)\n"));
    }

    #[test]
    fn the_subscriber_writes_through_the_queue() {
        let (q, go, out) = stalled(64, 1 << 20);
        go.send(()).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(NonBlocking::new(q.clone()))
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::warn!("hello {}", 42));
        assert!(q.flush(Duration::from_secs(5)));
        assert!(text(&out).contains("hello 42"));
    }
}
