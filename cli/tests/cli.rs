//! The `xcp` binary, run for real: help texts, `serve` announcing its address, `ping` and
//! `send` against it over TCP and Unix sockets in both header forms, and the error paths.
//!
//! Every child process is owned by a guard that kills it on drop, and every wait has a
//! deadline, so a broken build fails these tests instead of hanging them.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any one command may take (generous: CI machines are slow and busy).
const DEADLINE: Duration = Duration::from_secs(60);

fn xcp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcp"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A child process that is killed when dropped.
struct Guard(Child);

impl Guard {
    fn spawn(mut cmd: Command) -> Guard {
        Guard(cmd.spawn().expect("spawn xcp"))
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
            thread::sleep(Duration::from_millis(20));
        }
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

/// What a finished command left.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `xcp ARGS` (with `stdin` fed to it) to completion, within [`DEADLINE`].
fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = xcp();
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Guard::spawn(cmd);
    if let Some(input) = stdin {
        let mut pipe = child.0.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    let stdout = drain(child.0.stdout.take().unwrap());
    let stderr = drain(child.0.stderr.take().unwrap());
    let status = child.wait(DEADLINE);
    // The drain threads finish at EOF, right after the exit; give them a moment.
    thread::sleep(Duration::from_millis(50));
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    Output {
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
    }
}

/// `run`, asserting exit 0.
fn run_ok(args: &[&str]) -> Output {
    let out = run(args, None);
    assert!(
        out.status.success(),
        "xcp {args:?} failed\n{}",
        out.describe()
    );
    out
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
            let first = lines.next();
            let _ = tx.send(first);
            // Keep reading so the server never blocks on stdout.
            for _ in lines {}
        });
        let first = match rx.recv_timeout(DEADLINE) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "xcp serve printed no first line ({other:?}); stderr:\n{}",
                String::from_utf8_lossy(&stderr.lock().unwrap())
            ),
        };
        let url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Server { child, url, stderr }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

/// Parses `send`'s stdout as an Ether and returns `payload.text`.
fn reply_text(out: &Output) -> String {
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", out.describe()));
    assert_eq!(v["kind"], "text", "{}", out.describe());
    v["payload"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no payload.text\n{}", out.describe()))
        .to_string()
}

fn pong_lines(out: &Output) -> usize {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("pong from "))
        .count()
}

#[test]
fn help_texts_name_their_flags() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--help"], &["serve", "ping", "send", "--verbose"]),
        (
            &["serve", "--help"],
            &[
                "--listen",
                "--json-header",
                "--max-frame-bytes",
                "--max-message-bytes",
                "Examples",
            ],
        ),
        (
            &["ping", "--help"],
            &["--count", "--interval", "--json-header", "Examples"],
        ),
        (
            &["send", "--help"],
            &[
                "--text",
                "--ether",
                "--codec",
                "--json-header",
                "--channel",
                "--timeout-ms",
                "protobuf",
                "Examples",
            ],
        ),
    ];
    for (args, words) in cases {
        let out = run_ok(args);
        for word in *words {
            assert!(
                out.stdout.contains(word),
                "`xcp {}` does not mention {word}\n{}",
                args.join(" "),
                out.stdout
            );
        }
    }
}

#[test]
fn serve_announces_the_bound_port() {
    let server = Server::start("tcp://127.0.0.1:0", &[]);
    let port = server
        .url
        .strip_prefix("tcp://127.0.0.1:")
        .unwrap_or_else(|| panic!("bad url {}", server.url));
    let port: u16 = port.parse().expect("numeric port");
    assert_ne!(port, 0);
}

#[test]
fn ping_counts_pongs() {
    let server = Server::start("tcp://127.0.0.1:0", &[]);
    let out = run_ok(&["ping", &server.url, "--count", "3", "--interval", "0"]);
    assert_eq!(pong_lines(&out), 3, "{}", out.describe());
    assert!(
        out.stdout.contains("3 sent, 3 received, 0.0% loss"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("min/avg/max/p50"), "{}", out.describe());
}

#[test]
fn send_text_json_and_protobuf_over_tcp() {
    let server = Server::start("tcp://127.0.0.1:0", &[]);
    let out = run_ok(&["send", &server.url, "--text", "hi"]);
    assert_eq!(reply_text(&out), "hi");
    let out = run_ok(&["send", &server.url, "--text", "hi", "--codec", "protobuf"]);
    assert_eq!(reply_text(&out), "hi");
    let out = run_ok(&[
        "send",
        &server.url,
        "--text",
        "on a channel",
        "--channel",
        "7",
    ]);
    assert_eq!(reply_text(&out), "on a channel");
}

#[test]
fn send_and_ping_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xcp.sock");
    let listen = format!("unix://{}", path.display());
    let server = Server::start(&listen, &[]);
    assert_eq!(server.url, listen);
    let out = run_ok(&["send", &server.url, "--text", "hi"]);
    assert_eq!(reply_text(&out), "hi");
    let out = run_ok(&["send", &server.url, "--text", "hi", "--codec", "protobuf"]);
    assert_eq!(reply_text(&out), "hi");
    let out = run_ok(&["ping", &server.url, "--count", "2", "--interval", "0"]);
    assert_eq!(pong_lines(&out), 2, "{}", out.describe());
}

#[test]
fn json_header_form_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let listen_unix = format!("unix://{}", dir.path().join("j.sock").display());
    for listen in ["tcp://127.0.0.1:0", listen_unix.as_str()] {
        let server = Server::start(listen, &[]);
        for codec in ["json", "protobuf"] {
            let out = run_ok(&[
                "send",
                &server.url,
                "--text",
                "hi",
                "--json-header",
                "--codec",
                codec,
            ]);
            assert_eq!(reply_text(&out), "hi");
        }
        let out = run_ok(&[
            "ping",
            &server.url,
            "--count",
            "2",
            "--interval",
            "0",
            "--json-header",
        ]);
        assert_eq!(pong_lines(&out), 2, "{}", out.describe());
        assert!(out.stdout.contains("Json header"), "{}", out.describe());
    }
}

#[test]
fn send_ether_from_stdin_and_file() {
    let server = Server::start("tcp://127.0.0.1:0", &[]);
    let ether = br#"{"kind":"embedding","schema_version":1,
        "payload":{"values":[0.5,1.5],"dim":2},"metadata":{"trace_id":"t-1"}}"#;
    let out = run(&["send", &server.url, "--ether", "-"], Some(ether));
    assert!(out.status.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["kind"], "embedding");
    assert_eq!(v["payload"]["values"], serde_json::json!([0.5, 1.5]));
    assert_eq!(v["metadata"]["trace_id"], "t-1");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.json");
    std::fs::write(&file, ether).unwrap();
    let out = run_ok(&[
        "send",
        &server.url,
        "--ether",
        file.to_str().unwrap(),
        "--codec",
        "protobuf",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["payload"]["dim"], 2);
}

#[test]
fn a_large_message_is_chunked_and_comes_back_whole() {
    let server = Server::start("tcp://127.0.0.1:0", &["--max-frame-bytes", "4KiB"]);
    let text = "x".repeat(100_000);
    let out = run_ok(&["send", &server.url, "--text", &text]);
    assert_eq!(reply_text(&out), text);
}

#[test]
fn send_without_server_fails_clearly() {
    // A port that was free a moment ago.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("tcp://127.0.0.1:{port}");
    let out = run(&["send", &url, "--text", "hi"], None);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stdout.is_empty(), "{}", out.describe());
    assert!(
        out.stderr.contains("error: cannot connect to") && out.stderr.contains(&url),
        "{}",
        out.describe()
    );
    let out = run(&["ping", &url, "--count", "1"], None);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
}

#[test]
fn invalid_ether_json_exits_2() {
    // No server is needed: the input is checked before connecting.
    let out = run(
        &["send", "tcp://127.0.0.1:9", "--ether", "-"],
        Some(b"{\"kind\": \"text\", oops"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("not a valid Ether JSON") && out.stderr.contains("line 1"),
        "{}",
        out.describe()
    );
    let out = run(
        &["send", "tcp://127.0.0.1:9", "--ether", "-"],
        Some(br#"{"kind":"text","schema_version":1,"payload":{},"metadata":{}}"#),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("payload.text"), "{}", out.describe());
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["send", "tcp://127.0.0.1:9"][..],
        &["send", "tcp://127.0.0.1:9", "--text", "a", "--ether", "-"],
        &["send", "tcp://127.0.0.1:9", "--text", "a", "--codec", "xml"],
        &["ping", "tcp://127.0.0.1:9", "--count", "0"],
        &["serve"],
    ] {
        let out = run(args, None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "xcp {args:?}\n{}",
            out.describe()
        );
    }
}

#[cfg(unix)]
#[test]
fn serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sock");
    let mut server = Server::start(&format!("unix://{}", path.display()), &[]);
    run_ok(&["ping", &server.url, "--count", "1", "--interval", "0"]);
    assert!(path.exists());
    let pid = server.child.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = server.child.wait(DEADLINE);
    assert!(status.success(), "{status}\n{}", server.stderr());
    let log = server.stderr();
    assert!(log.contains("connection open"), "{log}");
    assert!(log.contains("connection closed"), "{log}");
    assert!(!path.exists(), "the socket file was left behind");
}
