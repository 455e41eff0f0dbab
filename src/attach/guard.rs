//! The SIGBUS guard: mappings of a peer's memory that survive the peer shrinking it (SPEC §7).
//!
//! A POSIX shm object cannot be sealed, so a local peer can `ftruncate` one after we mapped
//! it. Touching a page that now lies past the end of the object raises SIGBUS, and the default
//! action of SIGBUS kills the whole process, every connection included. Like
//! libwayland-server's `wl_shm` for client pools, we answer such a fault by mapping zeros over
//! the pages and remembering that the range faulted; the reader then learns from the mapping
//! that what it read is not what the peer sent (the receiver NACKs the message).
//!
//! # How it works
//!
//! - Every mapping of a peer's memory (and our own writable segments, which a peer of our
//!   user could truncate too) registers its address range in a fixed table of
//!   [`SLOTS`] slots, made of atomics only. A registration claims a free slot with a
//!   compare-exchange, writes the range, then marks the slot live with a `Release` store; it
//!   frees the slot when it is dropped, which its owner does before unmapping.
//! - [`install`] (run by the first registration, and idempotent) installs one process-wide
//!   SIGBUS handler with `sigaction`, after saving whatever handler was there before.
//! - On SIGBUS the handler takes the fault address (`si_addr`) and looks for a live slot whose
//!   range holds it. When it finds one, it maps private anonymous zero pages (`MAP_FIXED`,
//!   read-only, or read-write for a writable registration) from the faulting page to the end of
//!   the registered range in one call — the object shrank, so every later page is gone too —,
//!   flags the slot as faulted, counts the fault and returns: the faulting instruction runs
//!   again and reads zeros.
//! - A fault outside every registered range is a real bug, or someone else's: the handler
//!   chains to the previous handler if there was one (Rust's own runtime installs one that
//!   reports stack overflows), and otherwise restores the default action and returns, so the
//!   faulting instruction runs again and the process dies of SIGBUS as it would have without
//!   us. A SIGBUS sent by a process (`kill`, `sigqueue`), which has no fault address, is never
//!   absorbed.
//!
//! # Why the handler is async-signal-safe
//!
//! A signal handler may interrupt any code, an allocator or a lock holder included, so the
//! handler does only this:
//!
//! - loads and stores of atomics in statics (the slot table, the page size read once by
//!   [`install`], the saved previous handler, the fault counter), all lock-free: no
//!   allocation, no lock, no logging, no thread-local beyond `errno`;
//! - the system calls `mmap` (not on POSIX's list of async-signal-safe functions, but on Linux,
//!   with glibc and musl alike, a bare system call with no lock or allocation; libwayland
//!   relies on the same), `sigaction` and `raise` (both on the list);
//! - a call of the previous handler, which was itself written to run as a signal handler.
//!
//! It saves `errno` on entry and restores it on return, so the interrupted code never sees
//! the handler's system calls.
//!
//! # Why a slot is never read while it is reused
//!
//! A slot is freed only by its owner, and the owner is dropped only after nothing reads its
//! memory any more, and before that memory is unmapped. A SIGBUS inside a range therefore
//! arrives while the range's slot is live and stays live. The handler still reads each slot
//! as a sequence lock (a generation count in the slot's state word, read before and after the
//! range), so that a slot freed and claimed again by other threads during the scan is seen
//! either wholly before or wholly after the change, never as a torn range.

use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{Error, ErrorCode, Violation};

/// How many ranges the guard can watch at once in one process.
///
/// The receiver maps at most 1024 segments per connection and most peers use a handful, so
/// this is sixteen connections at that limit, or thousands of ordinary ones. A registration
/// beyond it fails with `ERR_BUSY` (retry later) instead of mapping unguarded. The table is
/// 32 bytes a slot (512 KiB of zero-initialised static memory, only touched as it is used),
/// and new registrations take the lowest free slots, so the handler scans only up to the most
/// ranges ever registered at once.
pub const SLOTS: usize = 16384;

/// The low bits of a slot's state word: free, being written by a registration, or live.
const STATE: usize = 0b11;
const FREE: usize = 0;
const CLAIMED: usize = 1;
const LIVE: usize = 2;
/// The generation count above the state bits, bumped each time a slot is freed.
const GENERATION: usize = STATE + 1;

/// Slot flags: the zero pages are mapped read-write; the range has faulted.
const WRITABLE: u32 = 1;
const FAULTED: u32 = 2;

/// `sigaction` flags of our handler: see [`install`].
const SA_FLAGS: libc::c_int = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;

/// One registered range `[start, start + len)`.
struct Slot {
    /// Generation and state (`FREE`, `CLAIMED`, `LIVE`).
    state: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    /// `WRITABLE` and `FAULTED`.
    flags: AtomicU32,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicUsize::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            flags: AtomicU32::new(0),
        }
    }

    /// The range and flags of a live slot, read consistently (a sequence-lock read), or `None`
    /// when the slot is not live. Async-signal-safe.
    fn read_live(&self) -> Option<(usize, usize, u32)> {
        loop {
            let before = self.state.load(Ordering::Acquire);
            if before & STATE != LIVE {
                return None;
            }
            let start = self.start.load(Ordering::Relaxed);
            let len = self.len.load(Ordering::Relaxed);
            let flags = self.flags.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.state.load(Ordering::Relaxed) == before {
                return Some((start, len, flags));
            }
            // Freed (and perhaps claimed again) meanwhile: read it again.
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// One past the highest slot ever claimed: the handler scans `TABLE[..HIGH]`.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Where a registration starts looking for a free slot (at or below the lowest free one,
/// most of the time).
static HINT: AtomicUsize = AtomicUsize::new(0);
/// Faults absorbed so far.
static ABSORBED: AtomicU64 = AtomicU64::new(0);
/// The page size, read by `install` (`sysconf` is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(0);
/// The SIGBUS handler before ours (`sa_sigaction`, which may be `SIG_DFL` or `SIG_IGN`), and
/// whether it takes three arguments (`SA_SIGINFO`).
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_SIGINFO: AtomicBool = AtomicBool::new(false);
/// Set once the handler is installed; `INSTALL` serialises the installation.
static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALL: Mutex<()> = Mutex::new(());

/// A registered range of memory `[base, base + len)` that the SIGBUS guard watches.
/// Unregisters on drop. Must be dropped before the memory is unmapped.
///
/// The range must lie within one mapping of a file (a shm object or memfd), so that when a page
/// of it faults every later page of it lies past the end of the file too.
pub(crate) struct Guarded {
    slot: usize,
}

impl Guarded {
    /// Registers `[base, base + len)`; installs the process-wide handler the first time
    /// (idempotent, thread-safe). With `writable`, the replacement zero pages are mapped
    /// `PROT_READ | PROT_WRITE` (for our own writable segments) instead of `PROT_READ`.
    ///
    /// Errors: `ERR_BUSY` when the table is full ([`SLOTS`] ranges registered); `Error::Io`
    /// when `sigaction` fails; `Error::Invalid` for a range that wraps around the address space.
    pub(crate) fn register(base: *const u8, len: usize, writable: bool) -> crate::Result<Guarded> {
        install()?;
        let page = PAGE.load(Ordering::Relaxed);
        let start = base as usize;
        // The handler rounds the end up to a page; it must not overflow there.
        if start
            .checked_add(len)
            .and_then(|end| end.checked_add(page - 1))
            .is_none()
        {
            return Err(Error::invalid(format!(
                "SIGBUS guard: range {start:#x}+{len} wraps around the address space"
            )));
        }
        let flags = if writable { WRITABLE } else { 0 };
        let hint = HINT.load(Ordering::Relaxed) % SLOTS;
        for i in (hint..SLOTS).chain(0..hint) {
            let slot = &TABLE[i];
            let state = slot.state.load(Ordering::Relaxed);
            if state & STATE != FREE
                || slot
                    .state
                    .compare_exchange(state, state | CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            // Sequence-lock writer: a reader that sees any of the stores below also sees
            // `CLAIMED` when it loads the state again, and retries.
            fence(Ordering::Release);
            slot.start.store(start, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.flags.store(flags, Ordering::Relaxed);
            HIGH.fetch_max(i + 1, Ordering::Release);
            slot.state.store(state | LIVE, Ordering::Release);
            HINT.store(i + 1, Ordering::Relaxed);
            return Ok(Guarded { slot: i });
        }
        Err(Error::protocol(
            Violation::Attachment,
            ErrorCode::ERR_BUSY,
            format!("SIGBUS guard: all {SLOTS} slots are in use; retry later"),
        ))
    }

    /// Whether a SIGBUS hit this range since it was registered (the pages from the faulting one
    /// to the end now read as zeros).
    pub(crate) fn faulted(&self) -> bool {
        TABLE[self.slot].flags.load(Ordering::Acquire) & FAULTED != 0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        // Only the owner changes a live slot, so this is the state it stored.
        let state = slot.state.load(Ordering::Relaxed);
        debug_assert_eq!(state & STATE, LIVE);
        slot.state.store(
            (state & !STATE).wrapping_add(GENERATION) | FREE,
            Ordering::Release,
        );
        slot.flags.store(0, Ordering::Relaxed);
        HINT.fetch_min(self.slot, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = &TABLE[self.slot];
        f.debug_struct("Guarded")
            .field("slot", &self.slot)
            .field("start", &(slot.start.load(Ordering::Relaxed) as *const u8))
            .field("len", &slot.len.load(Ordering::Relaxed))
            .field("faulted", &self.faulted())
            .finish()
    }
}

/// Installs the SIGBUS handler now (idempotent, thread-safe). Registering a range installs it;
/// a program may call this up front to learn early whether it can.
///
/// The handler is installed with `SA_SIGINFO` (it needs the fault address), `SA_ONSTACK` (it
/// runs on the thread's alternate signal stack where there is one, as the handler it chains to
/// may need: Rust's stack-overflow reporter) and `SA_RESTART` (a SIGBUS sent by another
/// process and passed on interrupts no system call). Not `SA_NODEFER`: SIGBUS stays blocked
/// while the handler runs, so a fault inside it cannot recurse (the kernel kills the process
/// instead). Not `SA_RESETHAND`: the guard stays installed after a fault it absorbed.
///
/// Errors: `Error::Io` when `sigaction` or `sysconf(_SC_PAGESIZE)` fails.
pub fn install() -> crate::Result<()> {
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let _lock = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .ok_or_else(|| Error::Io(std::io::Error::last_os_error()))?;
    PAGE.store(page, Ordering::Relaxed);

    // Save the current handler before ours can run, so a fault that is not ours is passed on
    // from the first one.
    // SAFETY: an all-zero `sigaction` is a valid value (SIG_DFL, empty mask, no flags).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `old` is a valid, writable `sigaction`.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    remember(&old);

    // SAFETY: as above, all zeros is a valid `sigaction`.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    ours.sa_sigaction = handler as libc::sighandler_t;
    ours.sa_flags = SA_FLAGS;
    // SAFETY: `sa_mask` is a valid, writable `sigset_t`.
    unsafe { libc::sigemptyset(&mut ours.sa_mask) };
    // SAFETY: `ours` is fully initialised, `old` writable; `on_sigbus` is a three-argument
    // handler, as `SA_SIGINFO` announces, and async-signal-safe (see the module docs).
    if unsafe { libc::sigaction(libc::SIGBUS, &ours, &mut old) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // Someone may have changed the handler between the two calls: keep the one we replaced.
    remember(&old);
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// How many faults the guard has absorbed in this process (for tests and stats).
pub fn faults_absorbed() -> u64 {
    ABSORBED.load(Ordering::Relaxed)
}

/// Saves `old` as the handler to pass foreign faults to (never our own, which would recurse).
fn remember(old: &libc::sigaction) {
    let ours: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    let handler = if old.sa_sigaction == ours as libc::sighandler_t {
        libc::SIG_DFL
    } else {
        old.sa_sigaction
    };
    PREV_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Relaxed);
    PREV_HANDLER.store(handler, Ordering::Release);
}

/// The SIGBUS handler. Async-signal-safe: see the module docs.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let errno = errno::get();
    if !absorb(info) {
        pass_on(sig, info, ctx);
    }
    errno::set(errno);
}

/// Maps zeros over a fault inside a live registered range, from the faulting page to the end
/// of the range; whether it did. Async-signal-safe.
fn absorb(info: *const libc::siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo; for a SIGBUS the kernel
    // raised (si_code > 0) the union holds the fault fields, so si_addr is the fault address.
    let addr = unsafe {
        if (*info).si_code <= 0 {
            // Sent by a process (kill, sigqueue, tgkill): there is no fault to absorb.
            return false;
        }
        (*info).si_addr() as usize
    };
    let page = PAGE.load(Ordering::Relaxed);
    if page == 0 {
        return false;
    }
    let high = HIGH.load(Ordering::Acquire).min(SLOTS);
    let mut absorbed = false;
    for slot in &TABLE[..high] {
        let Some((start, len, flags)) = slot.read_live() else {
            continue;
        };
        if addr.wrapping_sub(start) >= len {
            continue;
        }
        let from = addr & !(page - 1);
        // No overflow: `register` checked `start + len + page - 1`.
        let end = (start + len + page - 1) & !(page - 1);
        let prot = if flags & WRITABLE != 0 {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `[from, end)` lies within the registered range rounded out to whole pages,
        // that is within the live mapping of a file whose pages from `from` on are past the
        // file's end (the owner keeps the mapping until it drops its registration, which it
        // does only once nothing reads the memory): replacing them loses nothing and no other
        // object lives there. MAP_FIXED replaces them atomically.
        let mapped = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                end - from,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            continue;
        }
        slot.flags.fetch_or(FAULTED, Ordering::Release);
        absorbed = true;
    }
    if absorbed {
        ABSORBED.fetch_add(1, Ordering::Relaxed);
    }
    absorbed
}

/// A SIGBUS that is not ours: does what would have happened without the guard.
/// Async-signal-safe.
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREV_HANDLER.load(Ordering::Acquire);
    if prev != libc::SIG_DFL && prev != libc::SIG_IGN {
        if PREV_SIGINFO.load(Ordering::Relaxed) {
            // SAFETY: `prev` was installed with SA_SIGINFO, so it is a three-argument handler;
            // it gets the kernel's own arguments.
            let handler = unsafe {
                std::mem::transmute::<
                    libc::sighandler_t,
                    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
                >(prev)
            };
            handler(sig, info, ctx);
        } else {
            // SAFETY: `prev` was installed without SA_SIGINFO, so it is a one-argument handler.
            let handler = unsafe {
                std::mem::transmute::<libc::sighandler_t, extern "C" fn(libc::c_int)>(prev)
            };
            handler(sig);
        }
        return;
    }
    // SAFETY: `info` is null or the kernel's valid siginfo.
    let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
    if sent && prev == libc::SIG_IGN {
        // A signal sent by a process, which was ignored before us.
        return;
    }
    // SAFETY: an all-zero `sigaction` is SIG_DFL with an empty mask; sigaction is
    // async-signal-safe.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
    }
    if sent {
        // SAFETY: raise is async-signal-safe. SIGBUS is blocked until the handler returns,
        // then the default action runs; a fault instead runs its instruction again.
        unsafe { libc::raise(libc::SIGBUS) };
    }
}

/// Saving and restoring `errno` around the handler.
mod errno {
    /// The calling thread's `errno`.
    #[cfg(target_os = "linux")]
    pub(super) fn get() -> libc::c_int {
        // SAFETY: `__errno_location` returns the calling thread's errno, always valid, and is
        // async-signal-safe.
        unsafe { *libc::__errno_location() }
    }

    /// Sets the calling thread's `errno`.
    #[cfg(target_os = "linux")]
    pub(super) fn set(value: libc::c_int) {
        // SAFETY: as in `get`.
        unsafe { *libc::__errno_location() = value }
    }

    /// Elsewhere (the crate targets Linux) `errno` is left alone.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn get() -> libc::c_int {
        0
    }

    /// Elsewhere (the crate targets Linux) `errno` is left alone.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn set(_value: libc::c_int) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::{MmapOptions, MmapRaw};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::ExitStatusExt;

    /// Set in a child process to the name of the case it runs.
    const CHILD_ENV: &str = "XCP_GUARD_CHILD";

    fn page() -> usize {
        install().unwrap();
        PAGE.load(Ordering::Relaxed)
    }

    /// A memfd of `len` bytes filled with a non-zero pattern.
    fn memfd(len: usize) -> (File, Vec<u8>) {
        let fd =
            rustix::fs::memfd_create("xcp-guard-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(len as u64).unwrap();
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all_at(&pattern, 0).unwrap();
        (file, pattern)
    }

    fn map_ro(file: &File, len: usize) -> MmapRaw {
        MmapOptions::new().len(len).map_raw_read_only(file).unwrap()
    }

    /// Reads `len` bytes one by one, as a reader of a view would touch them.
    fn read(ptr: *const u8, len: usize) -> Vec<u8> {
        (0..len)
            // SAFETY: the callers pass a live mapping of at least `len` bytes.
            .map(|i| unsafe { std::ptr::read_volatile(ptr.add(i)) })
            .collect()
    }

    #[test]
    fn shrunk_mapping_reads_zeros_and_reports_the_fault() {
        let page = page();
        let len = 4 * page;
        let (file, pattern) = memfd(len);
        let map = map_ro(&file, len);
        let guard = Guarded::register(map.as_ptr(), len, false).unwrap();
        assert!(!guard.faulted());
        let before = faults_absorbed();

        file.set_len(page as u64).unwrap();
        let bytes = read(map.as_ptr(), len);
        assert_eq!(
            bytes[..page],
            pattern[..page],
            "page 0 still holds the object's bytes"
        );
        assert!(
            bytes[page..].iter().all(|&b| b == 0),
            "pages 1..4 read as zeros"
        );
        assert!(guard.faulted());
        assert!(faults_absorbed() > before);
        // Read again: the zero pages stay, no further fault.
        assert_eq!(read(map.as_ptr(), len), bytes);
        drop(guard);

        // A new registration (likely in the slot just freed) starts clean.
        let (file2, pattern2) = memfd(len);
        let map2 = map_ro(&file2, len);
        let guard2 = Guarded::register(map2.as_ptr(), len, false).unwrap();
        assert_eq!(read(map2.as_ptr(), len), pattern2);
        assert!(!guard2.faulted());
        drop(guard2);
        drop(map2);
        drop(map);
    }

    #[test]
    fn shrunk_writable_mapping_takes_writes() {
        let page = page();
        let len = 4 * page;
        let (file, _) = memfd(len);
        let map = MmapOptions::new().len(len).map_raw(&file).unwrap();
        let guard = Guarded::register(map.as_ptr(), len, true).unwrap();

        file.set_len(page as u64).unwrap();
        let ptr = map.as_mut_ptr();
        for k in 0..4 {
            // SAFETY: inside the live read-write mapping of `len` bytes.
            unsafe { std::ptr::write_volatile(ptr.add(k * page + 7), 0xAB) };
        }
        let bytes = read(map.as_ptr(), len);
        for k in 0..4 {
            assert_eq!(bytes[k * page + 7], 0xAB, "page {k} keeps the write");
        }
        assert!(bytes[page..]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == 0 || i % page == 7));
        assert!(guard.faulted());
        // Page 0 is still the shared object; the rest is private.
        let mut first = [0u8; 8];
        file.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first[7], 0xAB);
        drop(guard);
        drop(map);
    }

    #[test]
    fn wrapping_range_is_refused() {
        let e = Guarded::register((usize::MAX - 10) as *const u8, 100, false).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    #[test]
    fn faults_among_churning_registrations() {
        let page = page();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let churners: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4096]).collect();
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::Relaxed) || rounds == 0 {
                        let guards: Vec<Guarded> = bufs
                            .iter()
                            .map(|b| Guarded::register(b.as_ptr(), b.len(), false).unwrap())
                            .collect();
                        assert!(guards.iter().all(|g| !g.faulted()));
                        drop(guards);
                        rounds += 1;
                    }
                    rounds
                })
            })
            .collect();

        for _ in 0..16 {
            let len = 4 * page;
            let (file, pattern) = memfd(len);
            let map = map_ro(&file, len);
            let guard = Guarded::register(map.as_ptr(), len, false).unwrap();
            file.set_len(0).unwrap();
            let bytes = read(map.as_ptr(), len);
            assert!(bytes.iter().all(|&b| b == 0));
            assert!(guard.faulted());
            drop(guard);
            drop(map);
            drop(pattern);
        }
        stop.store(true, Ordering::Relaxed);
        for t in churners {
            assert!(t.join().unwrap() > 0);
        }
    }

    /// Runs one of the `child_*` tests in a fresh process of this test binary.
    fn run_child(test: &str, case: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("attach::guard::tests::{test}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, case)
            .output()
            .unwrap()
    }

    /// In a child about to die on purpose: no core file.
    fn no_core_dump() {
        let _ =
            rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Core,
            rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        );
    }

    fn assert_died_of_sigbus(out: &std::process::Output, marker: &str) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child status {:?}, stderr:\n{stderr}",
            out.status
        );
        assert!(stderr.contains(marker), "child never got there:\n{stderr}");
        assert!(!stderr.contains("survived"), "{stderr}");
    }

    #[test]
    fn unregistered_fault_still_kills_with_sigbus() {
        let out = run_child("child_faults", "unregistered");
        assert_died_of_sigbus(&out, "child: faulting outside the guard");
    }

    #[test]
    fn unregistered_fault_after_absorbed_one_still_kills_with_sigbus() {
        let out = run_child("child_faults", "after-absorbed");
        assert_died_of_sigbus(&out, "child: absorbed one");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("child: faulting outside the guard"),
            "{stderr}"
        );
    }

    #[test]
    fn full_table_is_busy() {
        let out = run_child("child_fills_table", "fill");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}\n{stderr}", out.status);
        assert!(stderr.contains("child: table full"), "{stderr}");
    }

    /// Only does something in a child started by the tests above.
    #[test]
    fn child_faults() {
        let Ok(case) = std::env::var(CHILD_ENV) else {
            return;
        };
        no_core_dump();
        let page = page();
        // Something registered, so the table is not empty.
        let (other, _) = memfd(page);
        let other_map = map_ro(&other, page);
        let other_guard = Guarded::register(other_map.as_ptr(), page, false).unwrap();

        // Kept registered (and mapped) while the foreign fault happens.
        let absorbed = (case == "after-absorbed").then(|| {
            let (file, _) = memfd(2 * page);
            let map = map_ro(&file, 2 * page);
            let guard = Guarded::register(map.as_ptr(), 2 * page, false).unwrap();
            file.set_len(0).unwrap();
            assert!(read(map.as_ptr(), 2 * page).iter().all(|&b| b == 0));
            assert!(guard.faulted());
            assert_eq!(faults_absorbed(), 1);
            eprintln!("child: absorbed one");
            (guard, map)
        });

        let (file, _) = memfd(2 * page);
        let map = map_ro(&file, 2 * page);
        file.set_len(0).unwrap();
        eprintln!("child: faulting outside the guard");
        let byte = read(map.as_ptr(), 1)[0];
        eprintln!("child: survived, read {byte}");
        drop((absorbed, other_guard, other_map, map));
    }

    /// Only does something in a child started by `full_table_is_busy`.
    #[test]
    fn child_fills_table() {
        if std::env::var(CHILD_ENV).is_err() {
            return;
        }
        let buf = [0u8; 64];
        let mut guards = Vec::new();
        let err = loop {
            match Guarded::register(buf.as_ptr(), buf.len(), false) {
                Ok(g) => guards.push(g),
                Err(e) => break e,
            }
        };
        assert_eq!(guards.len(), SLOTS);
        assert_eq!(err.code(), ErrorCode::ERR_BUSY, "{err}");
        assert_eq!(HIGH.load(Ordering::Relaxed), SLOTS);
        // A freed slot is found again, wherever it is.
        guards.swap_remove(SLOTS / 2);
        guards.push(Guarded::register(buf.as_ptr(), buf.len(), false).unwrap());
        assert!(Guarded::register(buf.as_ptr(), buf.len(), false).is_err());
        drop(guards);
        eprintln!("child: table full");
    }
}
