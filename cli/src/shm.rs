//! `xcp shm gc`: removes the shared-memory objects that killed xcp processes left behind; and
//! the same collection, quietly, when any `xcp` process starts.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tracing::debug;

use xcp::attach::gc::{self, Collected};

use crate::{EXIT_OK, EXIT_USAGE};

const GC_AFTER_HELP: &str = "\
What it does:
  Every POSIX shm object xcp creates is named xcp-<pid>-<random>-<n>, after the process that
  created it. A process unlinks its objects when its pool is dropped, but one that was killed
  (kill -9, OOM) cannot. This removes every such object whose <pid> is no longer a live
  process, and keeps the others. Every `xcp` command does the same, quietly, when it starts
  (see it with -vv); this command says what it found:
    removed xcp-4242-1a2b3c4d-0   (owner pid 4242 is gone)
    kept    xcp-4343-5e6f7a8b-0   (owner pid 4343 is alive)
    removed 1, kept 1 in /dev/shm
  With --json, one line: {\"dir\": \"/dev/shm\", \"removed\": [...], \"kept\": [...]}.

  memfd segments have no name and need no collection: the kernel frees them with the last
  descriptor and mapping.

Exit code: 0 after a collection (whether or not anything was found); 2 when the directory
cannot be read.

Examples:
  xcp shm gc
  xcp shm gc --json";

/// Arguments of `xcp shm`.
#[derive(Args, Debug)]
pub struct ShmArgs {
    #[command(subcommand)]
    pub command: ShmCommand,
}

/// The subcommands of `xcp shm`.
#[derive(Subcommand, Debug)]
pub enum ShmCommand {
    /// Remove the shm objects of dead xcp processes; print what was removed and kept.
    #[command(after_help = GC_AFTER_HELP)]
    Gc(GcArgs),
}

/// Arguments of `xcp shm gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Print one JSON line instead of one line per object.
    #[arg(long)]
    pub json: bool,

    /// The directory where the system keeps POSIX shm objects.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub dir: PathBuf,
}

/// Runs `xcp shm ...`; returns the exit code.
pub fn run(args: ShmArgs) -> u8 {
    match args.command {
        ShmCommand::Gc(a) => run_gc(&a),
    }
}

fn collect(dir: &Path) -> std::io::Result<Collected> {
    if dir == Path::new("/dev/shm") {
        gc::collect()
    } else {
        gc::collect_in(dir)
    }
}

fn run_gc(args: &GcArgs) -> u8 {
    let found = match collect(&args.dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot collect in {}: {e}", args.dir.display());
            return EXIT_USAGE;
        }
    };
    if args.json {
        let line = serde_json::json!({
            "dir": args.dir.display().to_string(),
            "removed": found.removed,
            "kept": found.kept,
        });
        println!("{line}");
        return EXIT_OK;
    }
    let owner = |name: &str| gc::owner_pid(name).map_or_else(|| "?".into(), |p| p.to_string());
    for name in &found.removed {
        println!("removed {name}   (owner pid {} is gone)", owner(name));
    }
    for name in &found.kept {
        println!("kept    {name}   (owner pid {} is alive)", owner(name));
    }
    println!(
        "removed {}, kept {} in {}",
        found.removed.len(),
        found.kept.len(),
        args.dir.display()
    );
    EXIT_OK
}

/// The collection every `xcp` process runs when it starts: silent but for debug lines.
pub fn collect_at_start() {
    match gc::collect() {
        Ok(c) if !c.removed.is_empty() => debug!(
            removed = ?c.removed,
            kept = c.kept.len(),
            "removed shm objects of dead xcp processes"
        ),
        Ok(c) => debug!(kept = c.kept.len(), "no stale shm objects"),
        Err(e) => debug!("shm gc at start: {e}"),
    }
}
