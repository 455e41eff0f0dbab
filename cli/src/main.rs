//! `xcp`: the command-line tool of the xcp library (package `xcp-cli` of the workspace).
//!
//! One file per subcommand: [`serve`] (an echo server), [`ping`] (round-trip times),
//! [`send`] (one Ether, prints the reply), [`frame`] (frames from a JSON description and
//! back), [`demo`], [`shm`] and [`cert`]; `bench` and `bench-server` come from the bench
//! package (`xcp-bench`), which also holds the options every subcommand shares
//! ([`ConnArgs`], [`KeyArgs`], byte counts, exit codes: the bench's server process takes them
//! too, and a package cannot depend on the binary's). This file holds logging and the
//! runtime.

mod cert;
mod demo;
mod frame;
mod logging;
mod ping;
mod schema;
mod send;
mod serve;
mod shm;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

/// `xcp bench` and `xcp bench-server` (the bench package of this workspace).
use xcp_bench as bench;
pub use xcp_bench::args::{parse_bytes, ConnArgs, KeyArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const MAIN_AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  the peer answered, but not as hoped (a PONG lost, a NACK, a reply timed out);
     `frame decode`: a frame or message failed a check (its line has an \"error\")
  2  nothing could be tried: bad arguments or input, no connection, cannot listen

Logging goes to stderr. `serve` logs at info level, the clients at warn; each -v raises it one
step (info, debug, trace). RUST_LOG, when set, takes precedence (e.g. RUST_LOG=xcp=debug).
Logging never blocks the work: lines go through a bounded queue to a writer thread, and when
stderr is not being read (a stalled pipe) they are dropped and counted (\"xcp: N log lines
dropped\"). Lines a peer can cause (bad frames, failed handshakes, connections opened and
closed) are rate-limited, per peer and process-wide, with a summary of what was suppressed.

URLs: tcp://HOST:PORT, unix:///absolute/path/to/socket, ring:///absolute/path/to/socket (the
same-host shared-memory ring, SPEC §9: a client asks for it, a server on a Unix socket agrees),
tls://HOST:PORT (TLS 1.3) or quic://HOST:PORT (QUIC). tls:// and quic:// authenticate both ends: give every side
`--cert FILE --key FILE --ca FILE` (or XCP_TLS_CERT, XCP_TLS_KEY, XCP_TLS_CA); `xcp cert dev DIR`
writes a development CA with a server and a client certificate.

Encryption (SPEC §3): `--key-file FILE` (or XCP_KEY_FILE) on any subcommand gives it a 32-byte
pre-shared static key. A side with a key seals every DATA message it sends (ChaCha20-Poly1305,
one key per direction derived from the static key) and requires CRYPT from its peer: a peer
without the key cannot connect (ERR_DECRYPT). The file must be exactly 32 bytes and readable
by its owner only; make one with
  head -c 32 /dev/urandom > key && chmod 600 key
and give the same file to both ends. Compression: `--compress off|on|auto|BYTES`.

Two-process check:
  shell 1:  xcp serve --listen tcp://127.0.0.1:7070
  shell 2:  xcp ping tcp://127.0.0.1:7070 --count 3
            xcp send tcp://127.0.0.1:7070 --text hello
            xcp send tcp://127.0.0.1:7070 --text hello --codec protobuf --json-header

Inspecting frames:
  echo '{\"header\":{\"msgType\":4},\"body\":{\"control\":{\"nonce\":1}}}' | xcp frame encode | xcp frame decode";

/// XCP v0.2 from the command line: an echo server, two clients, and a frame inspector.
///
/// XCP is a binary, capability-negotiated framing protocol for tensors, tables, text and
/// control messages. `xcp serve` answers every DATA message with the same body; `xcp ping`
/// measures round trips; `xcp send` sends one Ether and prints the reply; `xcp frame`
/// turns a JSON description into frame bytes and frame bytes back into descriptions.
#[derive(Parser, Debug)]
#[command(name = "xcp", version, after_help = MAIN_AFTER_HELP, propagate_version = true)]
struct Cli {
    /// More log output on stderr: -v, -vv, -vvv (RUST_LOG takes precedence when set).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an echo server: every DATA message comes back with the same body.
    Serve(serve::ServeArgs),
    /// Measure round-trip times with PING/PONG.
    Ping(ping::PingArgs),
    /// Send one Ether as a request and print the reply as JSON.
    Send(send::SendArgs),
    /// Encode frames from a JSON description, or decode frames into descriptions.
    Frame(frame::FrameArgs),
    /// Measure latency and throughput of XCP's paths against raw TCP, HTTP/2 and gRPC.
    Bench(bench::BenchArgs),
    /// Show the main job in seconds: text, Arrow, a 64 MiB tensor inline and by handle.
    Demo(demo::DemoArgs),
    /// The server process of `xcp bench` and `xcp demo` (started by them).
    #[command(hide = true)]
    BenchServer(bench::server::BenchServerArgs),
    /// Shared-memory housekeeping: `xcp shm gc` removes the segments of killed processes.
    Shm(shm::ShmArgs),
    /// Certificates for tls:// and quic://: `xcp cert dev DIR` writes a development set.
    Cert(cert::CertArgs),
    /// The schema registry: `list`, `show KIND@MAJOR`, `check FILE`, `convert FILE --to MAJOR`.
    Schema(schema::SchemaArgs),
}

impl Command {
    /// Loads what the arguments name before anything runs (the static key): a refusal here is
    /// a usage error.
    fn prepare(&mut self) -> Result<(), String> {
        match self {
            Command::Serve(a) => a.conn.load(),
            Command::Ping(a) => a.conn.load(),
            Command::Send(a) => a.conn.load(),
            Command::Frame(a) => a.key_args().load(),
            Command::Bench(_) | Command::Demo(_) => Ok(()),
            Command::BenchServer(a) => a.conn.load(),
            Command::Shm(_) | Command::Cert(_) | Command::Schema(_) => Ok(()),
        }
    }
}

/// Installs the stderr logger: `default` level, raised one step per `-v`; RUST_LOG wins.
fn init_logging(default: LevelFilter, verbose: u8) {
    const STEPS: [LevelFilter; 5] = [
        LevelFilter::ERROR,
        LevelFilter::WARN,
        LevelFilter::INFO,
        LevelFilter::DEBUG,
        LevelFilter::TRACE,
    ];
    let base = STEPS.iter().position(|l| *l == default).unwrap_or(1);
    let level = STEPS[(base + usize::from(verbose)).min(STEPS.len() - 1)];
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(verbose > 0);
    // A stalled stderr must not stall the runtime's workers: lines go through a queue to a
    // writer thread (see `logging`); where that thread cannot start, straight to stderr.
    match logging::stderr_writer() {
        Some(writer) => builder.with_writer(writer).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

fn main() -> ExitCode {
    let code = run();
    // What is still queued for stderr goes out now, within a bounded wait.
    logging::flush();
    code
}

fn run() -> ExitCode {
    let mut cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => LevelFilter::INFO,
        Command::Bench(_) | Command::Demo(_) | Command::BenchServer(_) => LevelFilter::WARN,
        Command::Ping(_)
        | Command::Send(_)
        | Command::Frame(_)
        | Command::Shm(_)
        | Command::Cert(_)
        | Command::Schema(_) => LevelFilter::WARN,
    };
    init_logging(default_level, cli.verbose);
    // Segments left by killed xcp processes go first (`xcp shm gc` reports its own collection).
    if !matches!(cli.command, Command::Shm(_)) {
        shm::collect_at_start();
    }
    if let Err(msg) = cli.command.prepare() {
        eprintln!("error: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }
    // `frame` reads stdin and writes stdout; it needs no runtime.
    let command = match cli.command {
        Command::Frame(args) => return ExitCode::from(frame::run(args)),
        Command::Shm(args) => return ExitCode::from(shm::run(args)),
        Command::Cert(args) => return ExitCode::from(cert::run(args)),
        Command::Schema(args) => return ExitCode::from(schema::run(args)),
        command => command,
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(async move {
        match command {
            Command::Serve(args) => serve::run(args).await,
            Command::Ping(args) => ping::run(args).await,
            Command::Send(args) => send::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::BenchServer(args) => bench::server::run(args).await,
            Command::Frame(_) => unreachable!("`frame` runs without the runtime"),
            Command::Shm(_) => unreachable!("`shm` runs without the runtime"),
            Command::Cert(_) => unreachable!("`cert` runs without the runtime"),
            Command::Schema(_) => unreachable!("`schema` runs without the runtime"),
        }
    });
    // Sessions still draining in the background must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
