//! Rate limits for log lines that a remote peer can cause.
//!
//! A peer that sends bad frames, refused handles or unasked descriptors, or that opens and
//! drops connections by the thousand, decides how often such a line is logged. Unbounded, that
//! is a flooding vector of its own (and, with a log consumer that falls behind, a way to stall
//! the process on its stderr). Two limits bound it:
//!
//! - [`PeerLog`], owned by one connection (its driver): the first [`PeerLog::LINES`] lines of
//!   a [`PeerLog::WINDOW`] go through, later ones are only counted; the next line after the
//!   window rolls over carries one summary saying how many were suppressed for that peer.
//! - [`LogBudget`], shared by the whole process ([`PEER_FAULTS`] for peer faults): a token
//!   bucket refilled by time, so that thousands of *different* connections cannot flood
//!   either. When it is spent, lines are counted, and the next line that passes carries the
//!   count.
//!
//! Neither takes a lock or allocates to suppress a line: [`PeerLog`] is plain fields behind
//! `&mut`, [`LogBudget`] a compare-and-swap on one atomic (the generic cell rate algorithm:
//! the state is the "theoretical arrival time" of the next line; the only other state is the
//! clock's origin, set once by the budget's first call). Both take the time as an argument, so
//! tests drive them with made-up instants.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The process-wide budget of log lines caused by peers' faults (bad frames, refused messages,
/// failed handshakes, unasked descriptors, ...): bursts of [`PEER_FAULTS_BURST`], then
/// [`PEER_FAULTS_PER_SECOND`] a second.
pub static PEER_FAULTS: LogBudget =
    LogBudget::new("peer faults", PEER_FAULTS_PER_SECOND, PEER_FAULTS_BURST);

/// The sustained rate of [`PEER_FAULTS`], in lines a second: a few kilobytes a second of log,
/// whatever the number of hostile peers.
pub const PEER_FAULTS_PER_SECOND: u32 = 20;

/// The burst of [`PEER_FAULTS`]: enough that the first faults of an incident are all logged.
pub const PEER_FAULTS_BURST: u32 = 100;

/// A process-wide, lock-free budget of log lines: bursts of `burst` lines, refilled at
/// `per_second` lines a second. Lines beyond it are counted and reported by the next line that
/// passes (see [`LogBudget::admit`] and [`LogBudget::log_summary`]).
#[derive(Debug)]
pub struct LogBudget {
    name: &'static str,
    per_second: u32,
    burst: u32,
    /// Nanoseconds between two lines at the sustained rate.
    interval_ns: u64,
    /// How far ahead of now the next arrival time may be: `(burst - 1)` intervals.
    tolerance_ns: u64,
    /// Where the clock starts: set by the first call.
    epoch: OnceLock<Instant>,
    /// The theoretical arrival time of the next line, in nanoseconds after `epoch`.
    tat: AtomicU64,
    /// Lines refused since the last one that passed.
    suppressed: AtomicU64,
}

impl LogBudget {
    /// A budget named `name` (in its summary lines) of `burst` lines at once, refilled at
    /// `per_second` lines a second. Zeros count as one.
    pub const fn new(name: &'static str, per_second: u32, burst: u32) -> LogBudget {
        let per_second = if per_second == 0 { 1 } else { per_second };
        let burst = if burst == 0 { 1 } else { burst };
        let interval_ns = 1_000_000_000 / per_second as u64;
        LogBudget {
            name,
            per_second,
            burst,
            interval_ns,
            tolerance_ns: interval_ns * (burst as u64 - 1),
            epoch: OnceLock::new(),
            tat: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Takes one line from the budget at `now`. `Some(n)`: log it, after a summary of the `n`
    /// lines refused before it when `n > 0` ([`LogBudget::log_summary`]); `None`: the budget
    /// is spent, the line was counted and must not be logged.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(|| now);
        let t = u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            if tat > t.saturating_add(self.tolerance_ns) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let next = tat.max(t).saturating_add(self.interval_ns);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(current) => tat = current,
            }
        }
    }

    /// Lines refused since the last one that passed (not yet reported).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Logs (at warn) that `suppressed` lines were refused by this budget; nothing for 0.
    pub fn log_summary(&self, suppressed: u64) {
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "{suppressed} log lines suppressed ({}: at most {} a second after a burst of {})",
                self.name,
                self.per_second,
                self.burst
            );
        }
    }
}

/// One connection's limit on the lines its peer causes: the first [`PeerLog::LINES`] lines of
/// each [`PeerLog::WINDOW`] go through (if [`PEER_FAULTS`] or the budget given has room), the
/// rest are counted and summarised by the first line of a later window, or by
/// [`PeerLog::flush`] when the connection ends.
#[derive(Debug, Clone)]
pub struct PeerLog {
    lines: u32,
    window: Duration,
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl Default for PeerLog {
    fn default() -> Self {
        PeerLog::new()
    }
}

impl PeerLog {
    /// The lines a peer may cause per window by default: enough to see what it does wrong.
    pub const LINES: u32 = 5;
    /// The default window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A limiter of [`PeerLog::LINES`] lines per [`PeerLog::WINDOW`].
    pub const fn new() -> PeerLog {
        PeerLog::with_limits(PeerLog::LINES, PeerLog::WINDOW)
    }

    /// A limiter of `lines` lines per `window` (at least one line).
    pub const fn with_limits(lines: u32, window: Duration) -> PeerLog {
        PeerLog {
            lines: if lines == 0 { 1 } else { lines },
            window,
            window_start: None,
            passed: 0,
            suppressed: 0,
        }
    }

    /// Asks to log one line at `now`: first this peer's window, then `budget` (the
    /// process-wide one). `Some`: log it, after [`Pass::log_summaries`]; `None`: it was counted
    /// (here or in `budget`) and must not be logged.
    pub fn admit<'b>(&mut self, now: Instant, budget: &'b LogBudget) -> Option<Pass<'b>> {
        let rolled = match self.window_start {
            Some(start) => now.saturating_duration_since(start) >= self.window,
            None => true,
        };
        if rolled {
            self.window_start = Some(now);
            self.passed = 0;
        }
        if self.passed >= self.lines {
            self.suppressed += 1;
            return None;
        }
        self.passed += 1;
        let global = budget.admit(now)?;
        Some(Pass {
            peer_suppressed: std::mem::take(&mut self.suppressed),
            global_suppressed: global,
            lines: self.lines,
            window: self.window,
            budget,
        })
    }

    /// Lines suppressed for this peer and not yet reported.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// At the end of the connection: the summary of what is still counted, if any (through
    /// `budget`, which may refuse it too; then it is counted there).
    pub fn flush(&mut self, now: Instant, budget: &LogBudget, peer: &str) {
        if self.suppressed == 0 || !tracing::enabled!(tracing::Level::WARN) {
            return;
        }
        if let Some(global) = budget.admit(now) {
            budget.log_summary(global);
            let n = std::mem::take(&mut self.suppressed);
            peer_summary(peer, n, self.lines, self.window);
        }
    }
}

/// The warn line that says how many lines about `peer` were suppressed.
fn peer_summary(peer: &str, n: u64, lines: u32, window: Duration) {
    tracing::warn!(
        peer = %peer,
        suppressed = n,
        "{n} more log lines about this peer suppressed (at most {lines} per {window:?})"
    );
}

/// A line let through by [`PeerLog::admit`], with what was suppressed before it.
#[derive(Debug)]
#[must_use = "log the summaries, then the line"]
pub struct Pass<'b> {
    peer_suppressed: u64,
    global_suppressed: u64,
    lines: u32,
    window: Duration,
    budget: &'b LogBudget,
}

impl Pass<'_> {
    /// Lines of this peer suppressed since its last line.
    pub fn peer_suppressed(&self) -> u64 {
        self.peer_suppressed
    }

    /// Lines refused by the process-wide budget since its last line (all peers).
    pub fn global_suppressed(&self) -> u64 {
        self.global_suppressed
    }

    /// Logs (at warn) the summaries this line carries: the budget's, then this peer's.
    pub fn log_summaries(&self, peer: &str) {
        self.budget.log_summary(self.global_suppressed);
        if self.peer_suppressed > 0 {
            peer_summary(peer, self.peer_suppressed, self.lines, self.window);
        }
    }
}

/// Logs a line a peer caused, through a connection's [`PeerLog`] and [`PEER_FAULTS`]:
/// `peer_log!(limiter, peer, WARN, "format", args...)`; the line gets a `peer` field. Nothing
/// is evaluated (or formatted) for a line that is filtered out or suppressed.
macro_rules! peer_log {
    ($limiter:expr, $peer:expr, $lvl:ident, $($arg:tt)+) => {
        if ::tracing::enabled!(::tracing::Level::$lvl) {
            if let Some(pass) = $limiter.admit(
                ::std::time::Instant::now(),
                &$crate::session::ratelog::PEER_FAULTS,
            ) {
                pass.log_summaries(&$peer);
                ::tracing::event!(::tracing::Level::$lvl, peer = %$peer, $($arg)+);
            }
        }
    };
}

/// Logs a line a peer caused where no connection's limiter is at hand (accept loops,
/// handshakes), through [`PEER_FAULTS`] only: `peer_log_global!(INFO, "format", args...)`.
macro_rules! peer_log_global {
    ($lvl:ident, $($arg:tt)+) => {
        if ::tracing::enabled!(::tracing::Level::$lvl) {
            let budget = &$crate::session::ratelog::PEER_FAULTS;
            if let Some(n) = budget.admit(::std::time::Instant::now()) {
                budget.log_summary(n);
                ::tracing::event!(::tracing::Level::$lvl, $($arg)+);
            }
        }
    };
}

pub(crate) use {peer_log, peer_log_global};

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn budget_bursts_then_refills_at_its_rate() {
        let b = LogBudget::new("test", 10, 3);
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), None);
        assert_eq!(b.admit(t0 + ms(50)), None);
        assert_eq!(b.suppressed(), 2);
        // One line per 100 ms: the next one passes and carries the count.
        assert_eq!(b.admit(t0 + ms(100)), Some(2));
        assert_eq!(b.suppressed(), 0);
        assert_eq!(b.admit(t0 + ms(150)), None);
        assert_eq!(b.admit(t0 + ms(200)), Some(1));
        // Idle long enough: the whole burst again, and no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.admit(later), Some(0));
        }
        assert_eq!(b.admit(later), None);
    }

    #[test]
    fn budget_bounds_lines_over_time() {
        let b = LogBudget::new("test", 20, 100);
        let t0 = Instant::now();
        // 100,000 attempts over 10 s: the burst plus 20 a second pass, and every other one
        // is reported by a line that passes, or still counted.
        let (mut passed, mut reported) = (0u64, 0u64);
        for i in 0..100_000u64 {
            if let Some(n) = b.admit(t0 + Duration::from_micros(i * 100)) {
                passed += 1;
                reported += n;
            }
        }
        assert!((100..=100 + 20 * 10 + 1).contains(&passed), "{passed}");
        assert_eq!(passed + reported + b.suppressed(), 100_000);
    }

    #[test]
    fn budget_zero_rates_count_as_one() {
        let b = LogBudget::new("test", 0, 0);
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0 + ms(999)), None);
        assert_eq!(b.admit(t0 + ms(1000)), Some(1));
    }

    #[test]
    fn budget_tolerates_a_clock_before_its_epoch() {
        let b = LogBudget::new("test", 1, 1);
        let t0 = Instant::now() + Duration::from_secs(5);
        assert_eq!(b.admit(t0), Some(0));
        // An instant taken earlier by another thread, arriving late: no panic, no refill.
        assert_eq!(b.admit(t0 - ms(10)), None);
    }

    #[test]
    fn budget_is_shared_across_threads() {
        static B: LogBudget = LogBudget::new("test", 1, 50);
        let t0 = Instant::now();
        let passed: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(move || (0..1000).filter(|_| B.admit(t0).is_some()).count()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 50);
        assert_eq!(B.suppressed(), 8 * 1000 - 50);
    }

    #[test]
    fn peer_log_lets_the_first_lines_of_a_window_through() {
        static B: LogBudget = LogBudget::new("test", 1000, 1000);
        let mut p = PeerLog::with_limits(5, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..5 {
            let pass = p.admit(t0 + ms(i), &B).expect("within the window's lines");
            assert_eq!(pass.peer_suppressed(), 0);
        }
        for i in 5..100 {
            assert!(p.admit(t0 + ms(i), &B).is_none());
        }
        assert_eq!(p.suppressed(), 95);
        // Still the same window.
        assert!(p.admit(t0 + ms(9_999), &B).is_none());
        // The window rolls over: the next line passes and carries the summary.
        let pass = p.admit(t0 + ms(10_000), &B).expect("a new window");
        assert_eq!(pass.peer_suppressed(), 96);
        assert_eq!(pass.global_suppressed(), 0);
        assert_eq!(p.suppressed(), 0);
        for i in 1..5 {
            assert_eq!(
                p.admit(t0 + ms(10_000 + i), &B).unwrap().peer_suppressed(),
                0
            );
        }
        assert!(p.admit(t0 + ms(10_005), &B).is_none());
        assert_eq!(p.suppressed(), 1);
    }

    #[test]
    fn peer_log_defers_to_the_global_budget() {
        static B: LogBudget = LogBudget::new("test", 1, 3);
        let t0 = Instant::now();
        // Ten different peers, one line each: three pass, seven are counted globally.
        let passed = (0..10)
            .filter(|_| PeerLog::new().admit(t0, &B).is_some())
            .count();
        assert_eq!(passed, 3);
        assert_eq!(B.suppressed(), 7);
        // The next line that passes (a second later) carries the global count.
        let mut p = PeerLog::new();
        let pass = p.admit(t0 + ms(1000), &B).expect("refilled");
        assert_eq!(pass.global_suppressed(), 7);
        assert_eq!(pass.peer_suppressed(), 0);
        assert_eq!(B.suppressed(), 0);
        // A line refused by the budget is not this peer's suppression.
        assert!(p.admit(t0 + ms(1001), &B).is_none());
        assert_eq!(p.suppressed(), 0);
        assert_eq!(B.suppressed(), 1);
    }

    /// Runs `f` with a subscriber (every level) that writes into the returned text.
    fn captured(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn peer_log_flush_reports_what_is_left() {
        static B: LogBudget = LogBudget::new("test", 1000, 1000);
        let mut p = PeerLog::with_limits(1, Duration::from_secs(10));
        let t0 = Instant::now();
        let _ = p.admit(t0, &B).expect("first");
        assert!(p.admit(t0, &B).is_none());
        assert!(p.admit(t0, &B).is_none());
        assert_eq!(p.suppressed(), 2);
        // Without a subscriber, warn is not enabled: nothing is taken.
        p.flush(t0 + ms(1), &B, "tcp://peer");
        assert_eq!(p.suppressed(), 2);
        let out = captured(|| p.flush(t0 + ms(1), &B, "tcp://peer"));
        assert_eq!(p.suppressed(), 0);
        assert!(
            out.contains("2 more log lines about this peer suppressed"),
            "{out}"
        );
        assert!(out.contains("tcp://peer"), "{out}");
    }

    #[test]
    fn macros_log_summaries_then_the_line_and_evaluate_nothing_when_suppressed() {
        let mut evaluated = 0u32;
        let out = captured(|| {
            let mut p = PeerLog::with_limits(2, Duration::from_secs(3600));
            let peer = "tcp://192.0.2.1:9".to_string();
            for i in 0..10 {
                peer_log!(p, peer, WARN, "bad frame {}", {
                    evaluated += 1;
                    i
                });
            }
            assert_eq!(p.suppressed(), 8);
            // A budget of its own: the process-wide one is spent by the other tests of this
            // binary that log peer faults at the same time.
            static SUMMARIES: LogBudget = LogBudget::new("test", 1000, 1000);
            p.flush(Instant::now(), &SUMMARIES, &peer);
            peer_log_global!(INFO, "handshake failed: {}", "bad magic");
        });
        assert_eq!(evaluated, 2);
        assert!(
            out.contains("bad frame 0") && out.contains("bad frame 1"),
            "{out}"
        );
        assert!(!out.contains("bad frame 2"), "{out}");
        assert!(
            out.contains("8 more log lines about this peer suppressed"),
            "{out}"
        );
        assert!(out.contains("peer=tcp://192.0.2.1:9"), "{out}");
        assert!(out.contains("handshake failed: bad magic"), "{out}");
        // No subscriber: the level is off, the line is neither counted nor evaluated.
        let mut p = PeerLog::with_limits(1, Duration::from_secs(3600));
        for _ in 0..3 {
            peer_log!(p, "tcp://192.0.2.1:9", WARN, "off {}", {
                evaluated += 1;
                0
            });
        }
        assert_eq!((evaluated, p.suppressed()), (2, 0));
    }

    #[test]
    fn zero_lines_count_as_one() {
        static B: LogBudget = LogBudget::new("test", 1000, 1000);
        let mut p = PeerLog::with_limits(0, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(p.admit(t0, &B).is_some());
        assert!(p.admit(t0, &B).is_none());
    }
}
