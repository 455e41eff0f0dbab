//! Starting the real `xcp serve` for tests over real processes: the command, and the URL from
//! its first stdout line (`listening on URL`), read on a thread so a server that never says
//! fails the test instead of hanging it; stdout is drained afterwards so it never fills.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `xcp serve --listen LISTEN`, stdin closed, stdout piped (for [`listening_url`]), no
/// `RUST_LOG` from the test's environment. Add arguments and choose stderr, then spawn.
pub fn command(listen: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xcp"));
    c.args(["serve", "--listen", listen])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    c
}

/// The URL `child` (spawned from [`command`]) says it listens on, within 20 s.
pub fn listening_url(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut r = BufReader::new(stdout);
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("xcp serve printed no address");
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}
