//! Attachments by handle between real `xcp` processes: 64 MiB by shm (TCP) and by memfd
//! (Unix socket) with their contents checked by the server, the fallback to inline bytes, no
//! shm object left behind, and the collection of the objects of a sender killed with
//! `kill -9` by the next `xcp` that starts (and by `xcp shm gc`).
//!
//! Every child is owned by a guard that kills it on drop, and every wait has a deadline. The
//! tests run one at a time (they move 64 MiB each and some collect /dev/shm).

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// How long any one command may take (generous: CI machines are slow and busy).
const DEADLINE: Duration = Duration::from_secs(60);
const MIB_64: u64 = 64 << 20;

/// One test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn xcp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcp"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A child process that is killed (SIGKILL) when dropped.
struct Guard(Child);

impl Guard {
    fn spawn(mut cmd: Command) -> Guard {
        Guard(cmd.spawn().expect("spawn xcp"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the exit until `deadline`; kills the child and panics past it.
    fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = self.0.kill();
                panic!("xcp did not exit within {deadline:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`, and waits for it to be gone.
    fn kill9(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.wait(DEADLINE);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Drains a pipe on a thread into a shared buffer, so the child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

/// What a finished command left.
struct Output {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "pid {}, status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `xcp ARGS` to completion within [`DEADLINE`].
fn run(args: &[&str]) -> Output {
    let mut cmd = xcp();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Guard::spawn(cmd);
    let pid = child.pid();
    let stdout = drain(child.0.stdout.take().unwrap());
    let stderr = drain(child.0.stderr.take().unwrap());
    let status = child.wait(DEADLINE);
    // The drain threads finish at EOF, right after the exit; give them a moment.
    thread::sleep(Duration::from_millis(50));
    Output {
        pid,
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
    }
}

/// A running `xcp serve`, killed when dropped.
struct Server {
    child: Guard,
    url: String,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Server {
    /// Starts `xcp serve --listen LISTEN EXTRA...` and reads the URL from its first line.
    fn start(listen: &str, extra: &[&str]) -> Server {
        let mut cmd = xcp();
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Guard::spawn(cmd);
        let stderr = drain(child.0.stderr.take().unwrap());
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let first = match rx.recv_timeout(DEADLINE) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "xcp serve printed no first line ({other:?}); stderr:\n{}",
                text(&stderr)
            ),
        };
        let url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Server { child, url, stderr }
    }

    fn stderr(&self) -> String {
        text(&self.stderr)
    }

    /// Waits until its stderr contains `needle`.
    fn wait_for_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                start.elapsed() < DEADLINE,
                "the server never logged {needle:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The shm objects in /dev/shm whose names say process `pid` made them.
fn shm_objects_of(pid: u32) -> Vec<String> {
    let prefix = format!("xcp-{pid}-");
    let mut found: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn assert_no_objects(pids: &[u32]) {
    for &pid in pids {
        let left = shm_objects_of(pid);
        assert!(left.is_empty(), "process {pid} left {left:?} in /dev/shm");
    }
}

/// The JSON line of `xcp send --random-bytes`.
struct Sent {
    bytes: u64,
    path: String,
    checksum_ok: bool,
}

fn send_random(url: &str, n: &str, attach: &str) -> (Output, Sent) {
    let out = run(&[
        "send",
        url,
        "--random-bytes",
        n,
        "--attach",
        attach,
        "--timeout-ms",
        "30000",
    ]);
    let line = out.stdout.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not one JSON line ({e})\n{}", out.describe()));
    let keys: Vec<&String> = v.as_object().expect("an object").keys().collect();
    assert_eq!(keys.len(), 4, "{}", out.describe());
    assert!(v["seconds"].as_f64().is_some(), "{}", out.describe());
    let sent = Sent {
        bytes: v["bytes"].as_u64().expect("bytes"),
        path: v["path"].as_str().expect("path").to_string(),
        checksum_ok: v["checksum_ok"].as_bool().expect("checksum_ok"),
    };
    (out, sent)
}

/// Sends `n` random bytes and checks what came back: exit 0, the size, the path, the checksum.
fn check_send(url: &str, n: &str, attach: &str, want_path: &str, want_bytes: u64) -> u32 {
    let (out, sent) = send_random(url, n, attach);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(sent.bytes, want_bytes, "{}", out.describe());
    assert_eq!(sent.path, want_path, "{}", out.describe());
    assert!(sent.checksum_ok, "{}", out.describe());
    out.pid
}

fn unix_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("unix://{}/{name}", dir.path().display())
}

#[test]
fn shm_over_tcp_64_mib() {
    let _one = serial();
    let server = Server::start("tcp://127.0.0.1:0", &["--attach", "shm"]);
    let sender = check_send(&server.url, "64M", "shm", "shm", MIB_64);
    // The sender unlinked its segment when it exited; the server never made one.
    assert_no_objects(&[sender, server.child.pid()]);
    assert!(
        server.stderr().contains("attach=[\"shm\"]"),
        "{}",
        server.stderr()
    );
}

#[test]
fn memfd_over_unix_64_mib() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&unix_url(&dir, "m.sock"), &[]);
    let sender = check_send(&server.url, "64M", "memfd", "memfd", MIB_64);
    // memfd segments have no name at all.
    assert_no_objects(&[sender, server.child.pid()]);
}

#[test]
fn auto_is_memfd_on_unix_and_shm_on_tcp() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let unix = Server::start(&unix_url(&dir, "a.sock"), &[]);
    let tcp = Server::start("tcp://127.0.0.1:0", &[]);
    let a = check_send(&unix.url, "1M", "auto", "memfd", 1 << 20);
    let b = check_send(&tcp.url, "1M", "auto", "shm", 1 << 20);
    // Below the inline threshold (64 KiB) the bytes go inline even where handles work.
    let c = check_send(&tcp.url, "1000", "shm", "inline", 1000);
    // An odd size, by handle.
    let d = check_send(&tcp.url, "100003", "shm", "shm", 100_003);
    assert_no_objects(&[a, b, c, d, unix.child.pid(), tcp.child.pid()]);
}

#[test]
fn inline_when_handles_are_not_negotiated() {
    let _one = serial();
    // The server offers no handles: the 64 MiB travel inline, chunked.
    let server = Server::start("tcp://127.0.0.1:0", &["--attach", "inline"]);
    let a = check_send(&server.url, "64M", "shm", "inline", MIB_64);
    // The sender offers none.
    let dir = tempfile::tempdir().unwrap();
    let unix = Server::start(&unix_url(&dir, "i.sock"), &[]);
    let b = check_send(&unix.url, "64M", "inline", "inline", MIB_64);
    assert_no_objects(&[a, b, server.child.pid(), unix.child.pid()]);
}

#[test]
fn memfd_needs_a_unix_url() {
    let _one = serial();
    let out = run(&[
        "send",
        "tcp://127.0.0.1:9",
        "--random-bytes",
        "1M",
        "--attach",
        "memfd",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("unix://"), "{}", out.describe());
    let out = run(&[
        "serve",
        "--listen",
        "tcp://127.0.0.1:0",
        "--attach",
        "memfd",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
}

#[test]
fn echo_still_works_next_to_blobs() {
    let _one = serial();
    let server = Server::start("tcp://127.0.0.1:0", &[]);
    let out = run(&[
        "send",
        &server.url,
        "--text",
        "hello",
        "--codec",
        "protobuf",
    ]);
    assert!(out.status.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(v["payload"]["text"], "hello");
}

/// Starts `xcp send --random-bytes 64M --attach shm` against a server that holds the bytes,
/// and returns it once its segment is mapped and held by the server: a sender with a segment
/// outstanding.
fn sender_with_segment_outstanding(server: &Server, held: usize) -> (Guard, String) {
    let mut cmd = xcp();
    cmd.args([
        "send",
        &server.url,
        "--random-bytes",
        "64M",
        "--attach",
        "shm",
        "--timeout-ms",
        "60000",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let sender = Guard::spawn(cmd);
    // The server says so once it read the bytes and holds them.
    let start = Instant::now();
    while server.stderr().matches("holding the blob").count() < held {
        assert!(
            start.elapsed() < DEADLINE,
            "the server never held the blob; stderr:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let objects = shm_objects_of(sender.pid());
    assert_eq!(objects.len(), 1, "one segment of 64 MiB: {objects:?}");
    (sender, objects[0].clone())
}

#[test]
fn objects_of_a_killed_sender_are_removed_by_the_next_start() {
    let _one = serial();
    let server = Server::start(
        "tcp://127.0.0.1:0",
        &["--attach", "shm", "--hold-ms", "600000"],
    );
    server.wait_for_log("listening on");

    // kill -9 while the server holds the segment: nobody unlinks it.
    let (mut sender, object) = sender_with_segment_outstanding(&server, 1);
    sender.kill9();
    let path = format!("/dev/shm/{object}");
    assert!(Path::new(&path).exists(), "the killed sender left {path}");

    // The next xcp process that starts, whatever it does, removes it.
    let out = run(&["ping", "tcp://127.0.0.1:9", "--count", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(!Path::new(&path).exists(), "{path} outlived the next start");

    // Again, and this time `xcp shm gc` collects it and says so.
    let (mut sender, object) = sender_with_segment_outstanding(&server, 2);
    sender.kill9();
    let path = format!("/dev/shm/{object}");
    assert!(Path::new(&path).exists(), "the killed sender left {path}");
    let out = run(&["shm", "gc", "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    assert!(!Path::new(&path).exists(), "{path} outlived `xcp shm gc`");
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON line");
    let removed: Vec<&str> = v["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    // Another xcp started on this machine at the same moment may have collected it first.
    if !removed.contains(&object.as_str()) {
        eprintln!("note: {object} was collected by another process first");
    }
    assert_no_objects(&[server.child.pid()]);
}

#[test]
fn shm_gc_prints_what_it_removed_and_kept() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    // A pid above the kernel's largest (2^22) is never alive; ours is.
    let dead = format!("xcp-{}-{:08x}-0", (1u32 << 22) + 7, rand_u32());
    let live = format!("xcp-{}-{:08x}-3", std::process::id(), rand_u32());
    for name in [&dead, &live, &"unrelated".to_string()] {
        std::fs::write(dir.path().join(name), b"x").unwrap();
    }
    let dir_arg = dir.path().to_str().unwrap();

    let out = run(&["shm", "gc", "--dir", dir_arg]);
    assert!(out.status.success(), "{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("removed {dead}")) && l.contains("is gone")),
        "{}",
        out.describe()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("kept") && l.contains(&live) && l.contains("is alive")),
        "{}",
        out.describe()
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("removed 1, kept 1 in {dir_arg}").as_str()),
        "{}",
        out.describe()
    );
    assert!(!dir.path().join(&dead).exists());
    assert!(dir.path().join(&live).exists());
    assert!(dir.path().join("unrelated").exists());

    // Nothing left to remove; the JSON form.
    let out = run(&["shm", "gc", "--dir", dir_arg, "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(v["removed"], serde_json::json!([]));
    assert_eq!(v["kept"], serde_json::json!([live]));

    // A directory that cannot be read is a usage error.
    let out = run(&["shm", "gc", "--dir", "/nonexistent/xcp-shm"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}
