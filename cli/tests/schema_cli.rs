//! `xcp schema` and `xcp serve --accepts/--registry`, run for real (SPEC §8): the registry
//! listed and shown, Ethers checked and converted, and a server that refuses what it does not
//! accept, converts what its adapters can, and serves on after each.
//!
//! Every child is killed on drop and every wait has a deadline.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn xcp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xcp"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs `xcp ARGS` with stdin closed, killing it past the deadline.
fn run(args: &[&str]) -> Output {
    let child = xcp()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xcp");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("xcp {args:?} did not exit within {DEADLINE:?}"))
        .expect("wait")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `xcp serve` killed on drop.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(extra: &[&str]) -> Serve {
        let mut child = xcp()
            .args(["serve", "--listen", "tcp://127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xcp serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let first = match rx.recv_timeout(DEADLINE) {
            Ok(Some(Ok(line))) => line,
            other => panic!("xcp serve printed no first line: {other:?}"),
        };
        let url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Serve { child, url }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn list_show_check_convert() {
    let out = run(&["schema", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    for id in [
        "text@1.0",
        "tokens@1.0",
        "embedding@1.0",
        "embedding@2.0",
        "image@1.0",
    ] {
        assert!(list.contains(id), "{list}");
    }
    assert!(list.contains("b60674025fb334833be5aef87f804d74"), "{list}");

    let out = run(&["schema", "show", "embedding@2"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("\"norm\""));

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"kind":"embedding","schema_version":1,"payload":{"values":[3,4],"dim":2},"metadata":{}}"#,
    )
    .unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"kind":"tokens","schema_version":1,"payload":{"token_ids":[1,"x"]},"metadata":{}}"#,
    )
    .unwrap();
    let out = run(&["schema", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).starts_with("ok: embedding@1.0"));
    let out = run(&["schema", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("/payload/token_ids/1"),
        "{}",
        text(&out.stdout)
    );

    let out = run(&["schema", "convert", good.to_str().unwrap(), "--to", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["schema_version"], 2);
    assert_eq!(e["payload"]["norm"], 5.0);
    assert_eq!(e["metadata"]["lineage"][0]["adapter"], "embedding-v1-to-v2");
    let out = run(&["schema", "convert", bad.to_str().unwrap(), "--to", "2"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn serve_accepts_refuses_and_converts() {
    let server = Serve::start(&["--accepts", "text@1,embedding@2"]);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    let pose = write(
        "pose.json",
        r#"{"kind":"pose","schema_version":1,"payload":{"x":1},"metadata":{}}"#,
    );
    let emb1 = write(
        "emb1.json",
        r#"{"kind":"embedding","schema_version":1,"payload":{"values":[3,4],"dim":2},"metadata":{}}"#,
    );

    let out = run(&["send", &server.url, "--ether", &pose]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ERR_SCHEMA_UNKNOWN"),
        "{}",
        text(&out.stderr)
    );

    // embedding v1 is converted to v2 by the server's built-in adapter and echoed.
    let out = run(&["send", &server.url, "--ether", &emb1]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("embedding-v1-to-v2"), "{stdout}");
    assert!(stdout.contains("\"norm\""), "{stdout}");

    let out = run(&["send", &server.url, "--text", "still serving"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("still serving"));
}
