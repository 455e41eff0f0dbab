//! Removal of shm objects left behind by processes that died without unlinking them.
//!
//! Every object xcp creates is named `xcp-<pid>-<random>-<n>`. An object whose `<pid>` is no
//! longer a live process is garbage: [`collect`] unlinks it. The next `xcp` process to start
//! does this, and so does `xcp shm gc`.

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

/// Unlinks xcp shm objects in `dir` (normally `/dev/shm`) whose owner process is dead.
pub fn collect_in(dir: &Path) -> std::io::Result<Collected> {
    let mut out = Collected::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if alive(pid) {
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
