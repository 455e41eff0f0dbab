//! An exhaustive check of the ring's wake-up protocol (see `mem.rs` and `docs/ring.md`).
//!
//! Each side is a small program of atomic steps over a sequentially consistent state: the
//! ring's `tail` and `head` (in messages), the two sleep flags, and per side a count of
//! wake-up bytes pending on the socket. Every interleaving of the two programs is explored
//! (depth first; states already explored are not explored again, and the number of
//! schedules through them is added from a table, so the count is exact). In every state
//! where a side is asleep and nothing is left that could wake it (the other side has
//! finished or sleeps too), the sleeper's condition must not hold (no data for a consumer, no
//! room for a producer): otherwise a wake-up was lost. Every terminal state must have both
//! sides finished.
//!
//! The real steps, in order (SeqCst stands for the `fence(SeqCst)` and SeqCst operations of
//! `mem.rs`, under which the hardware behaves as this interleaving model):
//!
//! - consumer: load `tail`; if empty: store `consumer_sleeping = 1`, load `tail` again; if
//!   data appeared, clear the flag and read, else sleep until a wake byte. Reading: load
//!   `tail`, store `head`, then (fence) load `producer_sleeping`; when 1, swap it to 0 and, if
//!   the swap took the 1, send a wake byte;
//! - producer: symmetric (load `head`; full: arm `producer_sleeping`, re-check; else store
//!   `tail`, fence, load `consumer_sleeping`, swap, wake).
//!
//! Mutants (each must be caught): the consumer sleeping without its re-check after arming,
//! and a producer without the fence, modelled as loading the flag before publishing.

use std::collections::HashMap;

/// A model: states, their successors, and what must hold.
trait Model: Clone + Eq + std::hash::Hash + std::fmt::Debug {
    /// The states one step away, each with the step's name.
    fn steps(&self) -> Vec<(&'static str, Self)>;
    /// The invariant of every state.
    fn check(&self) -> Result<(), String>;
    /// The invariant of a state without successors.
    fn check_terminal(&self) -> Result<(), String>;
}

/// What an exploration found.
#[derive(Debug)]
struct Explored {
    /// Complete schedules (paths from the start to a terminal state).
    schedules: u128,
    /// Distinct states.
    states: usize,
}

/// Explores every schedule from `start`; on a violation, the schedule that reaches it.
fn explore<M: Model>(start: &M) -> Result<Explored, String> {
    fn go<M: Model>(
        s: &M,
        done: &mut HashMap<M, u128>,
        on_path: &mut Vec<M>,
        trace: &mut Vec<&'static str>,
    ) -> Result<u128, String> {
        if let Some(&n) = done.get(s) {
            return Ok(n);
        }
        if on_path.contains(s) {
            return Err(format!(
                "a cycle (an endless schedule) through {s:?}: {trace:?}"
            ));
        }
        s.check()
            .map_err(|e| format!("{e}\n  state: {s:?}\n  schedule: {trace:?}"))?;
        let next = s.steps();
        let n = if next.is_empty() {
            s.check_terminal()
                .map_err(|e| format!("{e}\n  state: {s:?}\n  schedule: {trace:?}"))?;
            1
        } else {
            on_path.push(s.clone());
            let mut n = 0u128;
            for (name, t) in next {
                trace.push(name);
                n += go(&t, done, on_path, trace)?;
                trace.pop();
            }
            on_path.pop();
            n
        };
        done.insert(s.clone(), n);
        Ok(n)
    }
    let mut done = HashMap::new();
    let schedules = go(start, &mut done, &mut Vec::new(), &mut Vec::new())?;
    Ok(Explored {
        schedules,
        states: done.len(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum C {
    /// Load `tail`: data → `Read`, else `Arm`.
    Check,
    /// Store `consumer_sleeping = 1`.
    Arm,
    /// Load `tail`: data → `Clear`, else `Sleep`.
    Recheck,
    /// Store `consumer_sleeping = 0`.
    Clear,
    /// Blocked until a wake byte is pending; takes them all (a socket drain).
    Sleep,
    /// Load `tail` (what to copy, at most up to the goal).
    Read,
    /// Store `head`.
    Release,
    /// Load `producer_sleeping` (after the fence).
    WakeCheck,
    /// Swap `producer_sleeping` to 0; wake when it was 1.
    WakeSwap,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum P {
    /// Load `head`: room → `Write` (or `EarlyFlag` in the fence mutant), else `Arm`.
    Check,
    /// Mutant only: load `consumer_sleeping` before publishing.
    EarlyFlag,
    /// Store `tail` (one message more).
    Write,
    /// Load `consumer_sleeping` (after the fence).
    WakeCheck,
    /// Swap `consumer_sleeping` to 0; wake when it was 1.
    WakeSwap,
    /// Store `producer_sleeping = 1`.
    Arm,
    /// Load `head`: room → `Clear`, else `Sleep`.
    Recheck,
    /// Store `producer_sleeping = 0`.
    Clear,
    /// Blocked until a wake byte is pending.
    Sleep,
    Done,
}

/// Which protocol: the real one, or a mutant that must fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Variant {
    consumer_rechecks: bool,
    producer_fence: bool,
}

const REAL: Variant = Variant {
    consumer_rechecks: true,
    producer_fence: true,
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Ring {
    v: Variant,
    cap: u32,
    // Shared memory.
    tail: u32,
    head: u32,
    consumer_sleeping: u32,
    producer_sleeping: u32,
    // The socket: wake bytes pending for each side.
    wake_consumer: u32,
    wake_producer: u32,
    // The consumer: program counter, private head, what it loaded, how far it reads.
    c: C,
    c_head: u32,
    c_seen: u32,
    c_goal: u32,
    // The producer: program counter, private tail, an early-loaded flag, how far it writes.
    p: P,
    p_tail: u32,
    p_flag: u32,
    p_goal: u32,
}

impl Ring {
    /// `start` messages already in the ring; the producer writes up to `p_goal` in all, the
    /// consumer reads up to `c_goal`.
    fn new(v: Variant, cap: u32, start: u32, p_goal: u32, c_goal: u32) -> Ring {
        assert!(start <= cap && start <= p_goal && c_goal <= p_goal);
        Ring {
            v,
            cap,
            tail: start,
            head: 0,
            consumer_sleeping: 0,
            producer_sleeping: 0,
            wake_consumer: 0,
            wake_producer: 0,
            c: if c_goal == 0 { C::Done } else { C::Check },
            c_head: 0,
            c_seen: 0,
            c_goal,
            p: if p_goal == start { P::Done } else { P::Check },
            p_tail: start,
            p_flag: 0,
            p_goal,
        }
    }

    fn consumer_step(&self) -> Option<(&'static str, Ring)> {
        let mut s = self.clone();
        let name = match self.c {
            C::Done => return None,
            C::Sleep if self.wake_consumer == 0 => return None,
            C::Check => {
                s.c = if self.tail != self.c_head {
                    C::Read
                } else {
                    C::Arm
                };
                "c: load tail"
            }
            C::Arm => {
                s.consumer_sleeping = 1;
                s.c = if self.v.consumer_rechecks {
                    C::Recheck
                } else {
                    C::Sleep
                };
                "c: consumer_sleeping = 1"
            }
            C::Recheck => {
                s.c = if self.tail != self.c_head {
                    C::Clear
                } else {
                    C::Sleep
                };
                "c: re-load tail"
            }
            C::Clear => {
                s.consumer_sleeping = 0;
                s.c = C::Check;
                "c: consumer_sleeping = 0"
            }
            C::Sleep => {
                s.wake_consumer = 0;
                s.c = C::Check;
                "c: woken"
            }
            C::Read => {
                s.c_seen = self.tail.min(self.c_goal);
                s.c = C::Release;
                "c: load tail, copy"
            }
            C::Release => {
                s.c_head = self.c_seen;
                s.head = self.c_seen;
                s.c = C::WakeCheck;
                "c: store head"
            }
            C::WakeCheck => {
                s.c = if self.producer_sleeping == 1 {
                    C::WakeSwap
                } else {
                    s.consumer_next()
                };
                "c: fence, load producer_sleeping"
            }
            C::WakeSwap => {
                s.producer_sleeping = 0;
                if self.producer_sleeping == 1 {
                    s.wake_producer += 1;
                }
                s.c = s.consumer_next();
                "c: swap producer_sleeping, wake"
            }
        };
        Some((name, s))
    }

    fn consumer_next(&self) -> C {
        if self.c_head == self.c_goal {
            C::Done
        } else {
            C::Check
        }
    }

    fn producer_step(&self) -> Option<(&'static str, Ring)> {
        let mut s = self.clone();
        let room = |head: u32| self.p_tail - head < self.cap;
        let name = match self.p {
            P::Done => return None,
            P::Sleep if self.wake_producer == 0 => return None,
            P::Check => {
                s.p = match (room(self.head), self.v.producer_fence) {
                    (true, true) => P::Write,
                    (true, false) => P::EarlyFlag,
                    (false, _) => P::Arm,
                };
                "p: load head"
            }
            P::EarlyFlag => {
                s.p_flag = self.consumer_sleeping;
                s.p = P::Write;
                "p: load consumer_sleeping (no fence)"
            }
            P::Write => {
                s.p_tail += 1;
                s.tail = s.p_tail;
                s.p = if self.v.producer_fence {
                    P::WakeCheck
                } else if self.p_flag == 1 {
                    P::WakeSwap
                } else {
                    s.producer_next()
                };
                "p: store tail"
            }
            P::WakeCheck => {
                s.p = if self.consumer_sleeping == 1 {
                    P::WakeSwap
                } else {
                    s.producer_next()
                };
                "p: fence, load consumer_sleeping"
            }
            P::WakeSwap => {
                s.consumer_sleeping = 0;
                if self.consumer_sleeping == 1 {
                    s.wake_consumer += 1;
                }
                s.p = s.producer_next();
                "p: swap consumer_sleeping, wake"
            }
            P::Arm => {
                s.producer_sleeping = 1;
                s.p = P::Recheck;
                "p: producer_sleeping = 1"
            }
            P::Recheck => {
                s.p = if room(self.head) { P::Clear } else { P::Sleep };
                "p: re-load head"
            }
            P::Clear => {
                s.producer_sleeping = 0;
                s.p = P::Check;
                "p: producer_sleeping = 0"
            }
            P::Sleep => {
                s.wake_producer = 0;
                s.p = P::Check;
                "p: woken"
            }
        };
        Some((name, s))
    }

    fn producer_next(&self) -> P {
        if self.p_tail == self.p_goal {
            P::Done
        } else {
            P::Check
        }
    }

    /// Blocked for good unless someone else acts: finished, or asleep with no wake pending.
    fn consumer_stuck(&self) -> bool {
        self.c == C::Done || (self.c == C::Sleep && self.wake_consumer == 0)
    }

    fn producer_stuck(&self) -> bool {
        self.p == P::Done || (self.p == P::Sleep && self.wake_producer == 0)
    }
}

impl Model for Ring {
    fn steps(&self) -> Vec<(&'static str, Ring)> {
        self.consumer_step()
            .into_iter()
            .chain(self.producer_step())
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        // Indices stay sane (the model's own consistency).
        if self.tail < self.head || self.tail - self.head > self.cap {
            return Err(format!("impossible indices {} / {}", self.tail, self.head));
        }
        let data = self.tail != self.head && self.c_head < self.c_goal;
        let room = self.tail - self.head < self.cap && self.p_tail < self.p_goal;
        if self.c == C::Sleep && self.wake_consumer == 0 && data && self.producer_stuck() {
            return Err("lost wake-up: the consumer sleeps on data, nobody will wake it".into());
        }
        if self.p == P::Sleep && self.wake_producer == 0 && room && self.consumer_stuck() {
            return Err("lost wake-up: the producer sleeps on room, nobody will wake it".into());
        }
        Ok(())
    }

    fn check_terminal(&self) -> Result<(), String> {
        if self.c == C::Done && self.p == P::Done {
            Ok(())
        } else {
            Err(format!(
                "stuck: consumer {:?}, producer {:?} (a lost wake-up)",
                self.c, self.p
            ))
        }
    }
}

/// A consumer that checks, arms, re-checks and sleeps, against a producer of 1..=3 messages
/// (room for all of them: the producer never sleeps).
fn scenario_a(v: Variant) -> Vec<Ring> {
    (1..=3).map(|m| Ring::new(v, 8, 0, m, m)).collect()
}

/// A producer on a full ring (`cap` messages in it, `cap` more to write) against a consumer
/// that frees space (reads the first `cap`, which are there from the start, and stops).
fn scenario_b(v: Variant) -> Vec<Ring> {
    (1..=2)
        .map(|cap| Ring::new(v, cap, cap, 2 * cap, cap))
        .collect()
}

/// Both sleeping: 3 messages through a ring of 1 or 2.
fn scenario_c(v: Variant) -> Vec<Ring> {
    (1..=2).map(|cap| Ring::new(v, cap, 0, 3, 3)).collect()
}

fn run_all(name: &str, starts: Vec<Ring>) -> Vec<u128> {
    starts
        .iter()
        .map(|s| {
            let e = explore(s).unwrap_or_else(|e| panic!("{name}: {e}"));
            eprintln!(
                "{name}: cap {}, {} messages: {} schedules over {} states",
                s.cap, s.p_goal, e.schedules, e.states
            );
            assert!(e.schedules > 0);
            e.schedules
        })
        .collect()
}

/// The explorer itself: two independent straight-line programs of `a` and `b` steps have
/// exactly C(a + b, a) interleavings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pair {
    a: (u32, u32),
    b: (u32, u32),
}

impl Model for Pair {
    fn steps(&self) -> Vec<(&'static str, Pair)> {
        let mut v = Vec::new();
        if self.a.0 < self.a.1 {
            let mut s = self.clone();
            s.a.0 += 1;
            v.push(("a", s));
        }
        if self.b.0 < self.b.1 {
            let mut s = self.clone();
            s.b.0 += 1;
            v.push(("b", s));
        }
        v
    }

    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    fn check_terminal(&self) -> Result<(), String> {
        Ok(())
    }
}

fn binomial(n: u128, k: u128) -> u128 {
    (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

#[test]
fn explorer_counts_every_interleaving() {
    for (a, b) in [(0, 0), (1, 0), (1, 1), (3, 2), (10, 10), (20, 17)] {
        let e = explore(&Pair {
            a: (0, a),
            b: (0, b),
        })
        .unwrap();
        assert_eq!(e.schedules, binomial((a + b) as u128, a as u128), "{a}+{b}");
        assert_eq!(e.states, ((a + 1) * (b + 1)) as usize);
    }
}

#[test]
fn explorer_finds_violations_and_cycles() {
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct Spin(u32);
    impl Model for Spin {
        fn steps(&self) -> Vec<(&'static str, Spin)> {
            vec![("inc", Spin((self.0 + 1) % 3))]
        }
        fn check(&self) -> Result<(), String> {
            Ok(())
        }
        fn check_terminal(&self) -> Result<(), String> {
            Ok(())
        }
    }
    assert!(explore(&Spin(0)).unwrap_err().contains("cycle"));
}

/// The schedule counts of the real protocol, as the enumeration produces them: pinned, so a
/// change of the model (or of the explorer) shows here.
#[test]
fn wake_up_protocol_never_loses_a_wake_up() {
    let a = run_all("(a) consumer sleeps", scenario_a(REAL));
    let b = run_all("(b) producer sleeps", scenario_b(REAL));
    let c = run_all("(c) both sleep", scenario_c(REAL));
    eprintln!("schedules: a {a:?}, b {b:?}, c {c:?}");
    assert_eq!(a, A_SCHEDULES);
    assert_eq!(b, B_SCHEDULES);
    assert_eq!(c, C_SCHEDULES);
}

const A_SCHEDULES: [u128; 3] = [101, 46_719, 32_107_535];
const B_SCHEDULES: [u128; 2] = [152, 236];
const C_SCHEDULES: [u128; 2] = [1_700_138_030_458, 78_638_243];

fn must_fail(v: Variant, starts: Vec<Ring>) -> String {
    let found: Vec<String> = starts.iter().filter_map(|s| explore(s).err()).collect();
    assert!(
        !found.is_empty(),
        "the mutant {v:?} passed: the checker cannot fail"
    );
    assert!(
        found.iter().all(|e| e.contains("lost wake-up")),
        "{found:?}"
    );
    found[0].clone()
}

#[test]
fn mutant_without_recheck_loses_a_wake_up() {
    let v = Variant {
        consumer_rechecks: false,
        ..REAL
    };
    let e = must_fail(v, scenario_a(v));
    eprintln!("no re-check: {e}");
    must_fail(v, scenario_c(v));
}

#[test]
fn mutant_without_fence_loses_a_wake_up() {
    let v = Variant {
        producer_fence: false,
        ..REAL
    };
    let e = must_fail(v, scenario_a(v));
    eprintln!("no fence: {e}");
    must_fail(v, scenario_c(v));
}
