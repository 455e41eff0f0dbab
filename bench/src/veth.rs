//! `xcp bench --veth`: the matrix across a real link. Loopback is not a network: it has no
//! MTU to speak of, no qdisc and no second network stack. This mode makes two network
//! namespaces joined by a veth pair (a link between two "hosts" on this machine), runs the
//! bench's server processes in one and the client in the other, and measures the TCP rows
//! (`raw-tcp`, `tcp`, `tcp-comp-crypt`) over it, so XCP is compared with raw TCP on the same
//! link in the same run.
//!
//! It needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for `ip netns`) and the `ip` tool; where
//! either is missing, or the kernel refuses a namespace (a container without the rights), it
//! says so and skips with exit code 0. The namespaces are deleted when the run ends (which
//! deletes the veth pair with them), also when it fails.

use std::process::{Command, Stdio};

use super::args::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use super::BenchArgs;

/// The rows that can cross the link (the HTTP/2 and gRPC clients, the Unix socket rows and
/// the handle rows are bound to one host).
pub const PATHS: &[&str] = &["raw-tcp", "tcp", "tcp-comp-crypt"];

/// Default sizes across the link: a small message, a frame, and a bulk transfer.
pub const SIZES: &str = "64,1MiB,64MiB";

/// The two namespaces and the addresses of one run; deleted on drop.
struct Link {
    client_ns: String,
    server_ns: String,
    server_ip: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip")
                .args(["netns", "delete", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `ip ARGS`, an error in words when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes the namespaces, the veth pair between them and their addresses.
fn make_link() -> Result<Link, String> {
    let pid = std::process::id();
    // Names stay under IFNAMSIZ (15) and unique per run; the /30 subnet is picked by pid in
    // 10.213.0.0/16, a range this project reserves for its own tests.
    let (a, b) = (format!("xcpb{pid}a"), format!("xcpb{pid}b"));
    let (va, vb) = (format!("xv{pid}a"), format!("xv{pid}b"));
    let net = pid % (1 << 14);
    let (third, fourth) = (net >> 6, (net & 63) << 2);
    let client_ip = format!("10.213.{third}.{}", fourth + 1);
    let server_ip = format!("10.213.{third}.{}", fourth + 2);
    ip(&["netns", "add", &a])?;
    let link = Link {
        client_ns: a.clone(),
        server_ns: b.clone(),
        server_ip: server_ip.clone(),
    };
    ip(&["netns", "add", &b])?;
    ip(&[
        "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
    ])?;
    for (ns, dev, addr) in [(&a, &va, &client_ip), (&b, &vb, &server_ip)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    Ok(link)
}

/// Why this machine cannot make the link, if it cannot (checked before trying).
fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (CAP_NET_ADMIN) to make network namespaces".into());
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("needs the `ip` tool (iproute2)".into()),
    }
}

/// `xcp bench --veth`: makes the link, reruns this bench in the client namespace with the
/// servers in the other, and returns its exit code.
pub fn run(args: &BenchArgs) -> u8 {
    if let Some(paths) = &args.paths {
        if let Some(p) = paths
            .split(',')
            .map(str::trim)
            .find(|p| !p.is_empty() && !PATHS.contains(p))
        {
            eprintln!(
                "error: --veth: path {p:?} cannot cross the link (one of {})",
                PATHS.join(", ")
            );
            return EXIT_USAGE;
        }
    }
    if let Some(why) = unavailable() {
        println!("veth: skipped: {why}");
        return EXIT_OK;
    }
    let link = match make_link() {
        Ok(l) => l,
        Err(e) => {
            println!("veth: skipped: the kernel refused the link: {e}");
            return EXIT_OK;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find the xcp binary: {e}");
            return EXIT_FAILED;
        }
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.client_ns])
        .arg(&exe)
        .arg("bench")
        .args(["--paths", args.paths.as_deref().unwrap_or(&PATHS.join(","))])
        .args(["--sizes", args.sizes.as_deref().unwrap_or(SIZES)])
        .args(["--server-netns", &link.server_ns])
        .args(["--server-host", &link.server_ip])
        .args(["--io", args.io.name()]);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(d) = args.duration {
        cmd.args(["--duration", &d.to_string()]);
    }
    if let Some(n) = args.iterations {
        cmd.args(["--iterations", &n.to_string()]);
    }
    if let Some(j) = &args.json {
        cmd.arg("--json").arg(j);
    }
    if let Some(s) = &args.svg {
        cmd.arg("--svg").arg(s);
    }
    println!(
        "veth: client in netns {}, servers in netns {} at {} (a veth pair, MTU 1500)",
        link.client_ns, link.server_ns, link.server_ip
    );
    let code = match cmd.status() {
        Ok(s) => s.code().map_or(EXIT_FAILED, |c| c as u8),
        Err(e) => {
            eprintln!(
                "error: cannot run the bench in netns {}: {e}",
                link.client_ns
            );
            EXIT_FAILED
        }
    };
    drop(link);
    code
}
