//! Removal of shm objects left behind by processes that died without unlinking them.
//!
//! Every object xcp creates is named `xcp-<pid>-<random>-<n>`. An object whose `<pid>` is no
//! longer a live process is garbage: [`collect`] unlinks it. The next `xcp` process to start
//! does this, and so does `xcp shm gc`. A pid that lives again in a process started after the
//! object last changed (its owner died and the pid was reused) counts as dead too.

use std::path::Path;

/// The start of every shm object name xcp creates.
pub const NAME_START: &str = "xcp-";

/// What [`collect`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Objects removed (their owner is dead).
    pub removed: Vec<String>,
    /// Objects kept (their owner lives).
    pub kept: Vec<String>,
}

/// The pid in an xcp object name, if it is one.
pub fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_START)?;
    let pid = rest.split('-').next()?;
    pid.parse().ok().filter(|p: &i32| *p > 0)
}

fn alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        // It exists but belongs to someone else.
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// See [`owner_lives`].
const CLOCK_SLACK_SECS: u64 = 3600;

/// When process `pid` started, in seconds since the epoch (from `/proc`), if it can be read.
fn started_at(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, starttime in clock ticks after boot; fields after the `(comm)` start at 3.
    let rest = stat.rsplit_once(')')?.1;
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // /proc reports ticks of USER_HZ, 100 on every architecture xcp builds for.
    Some(boot + ticks / 100)
}

/// Whether the process that made an object last changed at `changed` (seconds since the
/// epoch) may still be alive: pid `pid` lives and did not start after the object changed.
/// An hour of slack keeps a wall-clock step (a VM resumed, a first NTP sync) from passing a
/// live owner for dead: a pid reused within the hour keeps the object until the next run.
fn owner_lives(pid: i32, changed: Option<i64>) -> bool {
    if !alive(pid) {
        return false;
    }
    match (started_at(pid), changed) {
        (Some(start), Some(changed)) => {
            start <= u64::try_from(changed).unwrap_or(0) + CLOCK_SLACK_SECS
        }
        _ => true,
    }
}

/// Unlinks xcp shm objects in `dir` (normally `/dev/shm`) whose owner process is dead.
pub fn collect_in(dir: &Path) -> std::io::Result<Collected> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Collected::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        let changed = entry.metadata().ok().map(|m| m.ctime());
        if owner_lives(pid, changed) {
            out.kept.push(name);
        } else if std::fs::remove_file(entry.path()).is_ok() {
            // Removing the file in the shm directory is what shm_unlink does there.
            out.removed.push(name);
        }
    }
    out.removed.sort();
    out.kept.sort();
    Ok(out)
}

/// Unlinks xcp shm objects in `/dev/shm` whose owner is dead. A missing `/dev/shm` finds
/// nothing.
pub fn collect() -> std::io::Result<Collected> {
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        return Ok(Collected::default());
    }
    collect_in(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_does_not_keep_old_objects() {
        let me = std::process::id() as i32;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let start = started_at(me).expect("our own start time");
        assert!(start <= now as u64 + 1, "started {start}, now {now}");
        // Changed now: this process made it (or may have).
        assert!(owner_lives(me, Some(now)));
        // Changed long before this process started: its owner was an earlier process with
        // the same pid.
        assert!(!owner_lives(
            me,
            Some(start as i64 - 2 * CLOCK_SLACK_SECS as i64)
        ));
        assert!(owner_lives(me, Some(start as i64 - 60)), "within the slack");
        // Unknown times: the pid alone decides.
        assert!(owner_lives(me, None));
    }

    #[test]
    fn parses_owner() {
        assert_eq!(owner_pid("xcp-1234-abcd-0"), Some(1234));
        assert_eq!(owner_pid("xcp-x-1"), None);
        assert_eq!(owner_pid("other-1234"), None);
    }

    #[test]
    fn removes_objects_of_dead_processes_only() {
        // A pid that cannot be alive: above the kernel's pid_max.
        let dead = format!("xcp-{}-deadbeef-0", (1 << 22) + 7);
        let fd = rustix::shm::open(
            format!("/{dead}").as_str(),
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::RDWR,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .unwrap();
        drop(fd);
        let live = crate::attach::pool::Pool::new(crate::attach::pool::PoolConfig::new(
            crate::attach::Scheme::Shm,
            1 << 20,
        ));
        let r = live.try_alloc(1).unwrap().unwrap();
        let got = collect().unwrap();
        assert!(got.removed.contains(&dead), "{got:?}");
        assert!(
            got.kept.contains(&r.segment().name().to_string()),
            "{got:?}"
        );
        assert!(!Path::new(&format!("/dev/shm/{dead}")).exists());
    }
}
