//! `xcp bench` and `xcp demo` from the command line: they run, exit 0, and report figures.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the xcp binary with `args`, killing it after `limit`.
fn xcp(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xcp"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xcp");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "xcp {args:?} ran over {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bench_quick_tcp_and_raw_tcp_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let out = xcp(
        &[
            "bench",
            "--quick",
            "--paths",
            "tcp,raw-tcp",
            "--sizes",
            "64,16384",
            "--duration",
            "0.2",
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("x raw"), "{stdout}");
    assert!(
        stdout.contains("XCP rows over epoll"),
        "the I/O interface is named: {stdout}"
    );

    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).expect("valid JSON");
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!doc["machine"]["kernel"].as_str().unwrap().is_empty());
    let rows = doc["rows"].as_array().unwrap();
    for path in ["tcp", "raw-tcp"] {
        for size in [64u64, 16384] {
            let r = rows
                .iter()
                .find(|r| r["path"] == path && r["size"].as_u64() == Some(size))
                .unwrap_or_else(|| panic!("no row for {path} at {size}: {doc:#}"));
            for f in ["p50_us", "p95_us", "p99_us", "max_us"] {
                assert!(r["latency"][f].as_f64().unwrap() > 0.0, "{path} {size} {f}");
            }
            assert!(r["throughput"]["mb_per_s"].as_f64().unwrap() > 0.0);
            assert!(r["throughput"]["msg_per_s"].as_f64().unwrap() > 0.0);
            assert!(r["ratio_vs_raw_tcp"].as_f64().unwrap() > 0.0);
        }
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("<polyline"));
}

/// `--io-compare` measures every row for epoll and, where the kernel allows it, io_uring,
/// and writes them as JSON.
#[test]
fn bench_io_compare_writes_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("io.json");
    let out = xcp(
        &[
            "bench",
            "--io-compare",
            "--duration",
            "0.2",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("uring/epoll"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).expect("valid JSON");
    let mut modes = vec!["epoll"];
    match xcp::transport::uring::probe() {
        Ok(()) => modes.push("uring"),
        Err(why) => eprintln!("io_uring rows skipped: {why}"),
    }
    for mode in modes {
        let m = &doc["modes"][mode];
        for key in [
            "rtt-64B p50 (us)",
            "stream-16KiB (MB/s)",
            "stream-1MiB (MB/s)",
            "conns-64 (msg/s)",
            "stream-1MiB cpu (s/GB)",
        ] {
            let v = m[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{mode} {key}: {doc:#}"));
            assert!(v > 0.0, "{mode} {key} = {v}");
        }
    }
}

#[test]
fn bench_refuses_unknown_paths() {
    let out = xcp(
        &["bench", "--paths", "carrier-pigeon"],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn demo_passes_and_prints_its_table() {
    // A smaller tensor keeps the debug build quick; the release demo uses 64 MiB.
    let out = xcp(
        &["demo", "--tensor-mib", "8", "--repeat", "2"],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "[7/7] ring",
        "tensor inline (TCP)",
        "tensor by shm handle (TCP)",
        "tensor by memfd handle (Unix)",
        "tensor inline (ring)",
        "small round trip (ring)",
        "all checks passed",
    ] {
        assert!(stdout.contains(want), "{want:?} missing:\n{stdout}");
    }
}

/// `--veth`: the TCP rows across a veth pair between two network namespaces the run makes
/// (and deletes), or, where this machine cannot make them, a skip that says why.
#[test]
fn bench_veth_crosses_a_link_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("veth.json");
    let out = xcp(
        &[
            "bench",
            "--veth",
            "--sizes",
            "64,65536",
            "--duration",
            "0.2",
            "--iterations",
            "200",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    if let Some(line) = stdout.lines().find(|l| l.starts_with("veth: skipped: ")) {
        println!("{line}");
        assert!(!json.exists(), "a skipped run writes no figures");
        return;
    }
    let ns = stdout
        .lines()
        .find_map(|l| l.strip_prefix("veth: client in netns "))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("no namespace line:\n{stdout}"))
        .to_string();
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("figures written")).unwrap();
    let rows = figures["rows"].as_array().expect("rows");
    for path in ["raw-tcp", "tcp", "tcp-comp-crypt"] {
        for size in [64, 65536] {
            let row = rows
                .iter()
                .find(|r| r["path"] == path && r["size"] == size)
                .unwrap_or_else(|| panic!("no {path} {size} row:\n{stdout}"));
            assert!(
                row["throughput"]["mb_per_s"].as_f64().unwrap() > 0.0,
                "{row}"
            );
        }
    }
    // The servers listened on the other namespace's address, not on loopback.
    assert!(
        stdout.contains("servers in netns") && stdout.contains(" at 10.213."),
        "{stdout}"
    );
    // Both namespaces are gone.
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    let base = ns.trim_end_matches('a');
    assert!(!left.contains(base), "namespaces left behind: {left}");
}

/// `--veth` refuses the rows that cannot leave the host.
#[test]
fn bench_veth_refuses_host_bound_rows() {
    let out = xcp(
        &["bench", "--veth", "--paths", "unix"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot cross the link"),
        "{out:?}"
    );
}
