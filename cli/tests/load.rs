//! The load test at a small scale: `xcp bench --load` (the same code path as the full run)
//! with 4 clients × 200 requests of mixed sizes and codecs through an `xcp serve` child.
//! Asserts that every reply arrived and matched its request byte for byte; no timing is
//! asserted (the figures are only printed).

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the run may take (a debug build on a busy CI machine).
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn load_small_scale_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("load.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xcp"))
        .args(["bench", "--load", "--clients", "4", "--messages", "200"])
        .arg("--json")
        .arg(&json)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xcp bench --load");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xcp bench --load did not finish within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        status.success(),
        "status {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the --json file")).expect("JSON");
    assert_eq!(doc["expected"], 800, "{doc}");
    assert_eq!(doc["sent"], 800, "{doc}");
    assert_eq!(doc["verified"], 800, "{doc}");
    assert_eq!(doc["lost"], 0, "{doc}");
    assert_eq!(doc["mismatched"], 0, "{doc}");
    // Every codec of the mix was exercised.
    for codec in ["json", "protobuf", "tensor_f32", "arrow_ipc"] {
        assert!(
            doc["by_codec"][codec].as_u64().unwrap_or(0) > 0,
            "{codec}: {doc}"
        );
    }
    assert!(stdout.contains("800 verified byte for byte"), "{stdout}");
}
