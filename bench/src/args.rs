//! The options every `xcp` subcommand shares: how a connection is shaped (limits, header form,
//! compression, the static key, certificates, the I/O mode), byte counts, and the exit codes.
//!
//! They live here rather than in the CLI package because the bench's server process
//! (`xcp bench-server`, run by [`crate::server::run`]) takes the same options; the CLI
//! re-exports them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use xcp::conn::Config;
use xcp::transport::{IoMode, TransportConfig};
use xcp::wire::seal::{load_key_file, CompressPolicy, Sealer, MIN_COMPRESS_BYTES};
use xcp::wire::{HeaderForm, Limits, DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES};
use xcp::SessionConfig;

/// Exit code: everything worked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the peer answered, but not what was hoped for (a lost PONG, a NACK, a timeout).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: nothing could be tried (bad arguments, bad input, no connection).
pub const EXIT_USAGE: u8 = 2;

/// The static key of SPEC §3, shared by every subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// A file holding the 32-byte pre-shared static key (SPEC §3): exactly 32 bytes, readable
    /// by its owner only (make one with `head -c 32 /dev/urandom > key && chmod 600 key`).
    /// With a key, a connection seals every DATA message it sends and requires CRYPT from
    /// its peer, so a peer without the same key cannot connect (ERR_DECRYPT).
    #[arg(long, value_name = "FILE", env = "XCP_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// The sealer made from the key file by [`KeyArgs::load`].
    #[arg(skip)]
    pub sealer: Option<Sealer>,
}

impl KeyArgs {
    /// Reads the key file, if one was given, and keeps its [`Sealer`]. The error says which
    /// rule the file breaks (size, permissions) and how to fix it.
    pub fn load(&mut self) -> Result<(), String> {
        let Some(path) = &self.key_file else {
            return Ok(());
        };
        let key = load_key_file(path).map_err(|e| match e {
            xcp::Error::Invalid(msg) => msg,
            other => other.to_string(),
        })?;
        self.sealer = Some(Sealer::new(&key));
        Ok(())
    }
}

/// Certificates for `tls://` and `quic://`, shared by every connecting subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This side's certificate chain (PEM) for tls:// and quic:// (mutual authentication:
    /// servers and clients both need one). `xcp cert dev DIR` writes a development set.
    #[arg(long, value_name = "FILE", env = "XCP_TLS_CERT")]
    pub cert: Option<PathBuf>,

    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", env = "XCP_TLS_KEY")]
    pub key: Option<PathBuf>,

    /// The CA (PEM) that the peer's certificate must be signed by. Alone, without --cert, a
    /// client connects with no certificate of its own (servers refuse it; useful to tell a CA
    /// problem from a client-certificate problem).
    #[arg(long, value_name = "FILE", env = "XCP_TLS_CA")]
    pub ca: Option<PathBuf>,

    /// The name the server's certificate must be valid for, when it is not the URL's host.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// The material loaded by [`TlsArgs::load`].
    #[arg(skip)]
    pub loaded: Option<xcp::transport::TlsConfig>,
}

impl TlsArgs {
    /// Loads the files, if any were given. The error names the file and what is wrong with it
    /// (missing, no PEM, expired, key not matching the certificate).
    pub fn load(&mut self) -> Result<(), String> {
        let tls = match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => return Ok(()),
            (Some(c), Some(k), Some(ca)) => xcp::transport::TlsConfig::from_files(c, k, ca),
            (None, None, Some(ca)) => xcp::transport::TlsConfig::trust_only(ca),
            (Some(_), Some(_), None) => {
                return Err("--cert and --key need --ca too: the CA that signs the peer's                             certificate (`xcp cert dev DIR` writes ca.pem)"
                    .into())
            }
            _ => return Err("--cert and --key go together (a certificate and its key)".into()),
        };
        let tls = tls.map_err(|e| e.to_string())?;
        self.loaded = Some(match &self.server_name {
            Some(n) => tls.with_server_name(n.clone()),
            None => tls,
        });
        Ok(())
    }
}

/// Options that shape a connection, shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Use the JSON header form of SPEC §2.2 (the Python proof of concept's form) instead of
    /// Cap'n Proto. An initiator (ping, send) writes its frames in it; a server always answers
    /// each peer in the form of that peer's HELLO, so there it changes nothing.
    #[arg(long)]
    pub json_header: bool,

    /// The largest frame payload accepted, in bytes (suffixes K, KiB, M, MiB, G, GiB). Longer
    /// messages are chunked at the smaller of both sides' value.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = parse_bytes)]
    pub max_frame_bytes: u64,

    /// The largest reassembled message accepted, in bytes (suffixes as above).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_bytes)]
    pub max_message_bytes: u64,

    /// When to compress the bodies this side sends with zstd (COMP): `off`; `on` (bodies of
    /// 1 KiB and more); `auto` (bodies of 1 KiB and more, and only when compression shrinks
    /// them: random floats travel as they are); or a byte count (bodies of at least that
    /// many bytes). Compressed bodies from the peer are always accepted.
    #[arg(long, value_name = "off|on|auto|BYTES", default_value = "off", value_parser = parse_compress)]
    pub compress: CompressPolicy,

    #[command(flatten)]
    pub key: KeyArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Which kernel interface moves the bytes: `epoll` (readiness, through tokio), `uring`
    /// (completion-based io_uring; fails with the reason where the kernel refuses it) or
    /// `auto` (io_uring where a probe at start-up shows it works, else epoll with one log
    /// line). epoll is the default: it has the lower small-message latency; io_uring moves
    /// large messages and many connections faster (`xcp bench --io-compare` measures both).
    /// Setting `XCP_URING_DISABLE=1` makes this process behave as if the kernel refused
    /// io_uring (`uring` fails, `auto` falls back), to try that path.
    #[arg(
        long,
        value_name = "epoll|uring|auto",
        default_value = "epoll",
        env = "XCP_IO"
    )]
    pub io: IoMode,
}

impl ConnArgs {
    /// Loads the files the options name (static key, certificates); the error is a usage error.
    pub fn load(&mut self) -> Result<(), String> {
        self.key.load()?;
        self.tls.load()?;
        self.io = io_allowed(self.io, uring_disabled_by_env())?;
        Ok(())
    }

    /// The session configuration these options describe, with `request_timeout` for every
    /// request and PING.
    pub fn session_config(&self, request_timeout: Duration) -> SessionConfig {
        let conn = Config::default()
            .with_limits(Limits::new(self.max_frame_bytes, self.max_message_bytes))
            .with_header_form(if self.json_header {
                HeaderForm::Json
            } else {
                HeaderForm::Capnp
            })
            .with_sealer(self.key.sealer.clone())
            .with_compress(self.compress);
        SessionConfig::default()
            .with_conn(conn)
            .with_request_timeout(request_timeout)
            .with_transport(
                TransportConfig::default()
                    .with_io(self.io)
                    .with_tls(self.tls.loaded.clone()),
            )
    }
}

/// Whether `XCP_URING_DISABLE` asks this process to behave as if io_uring were refused.
pub fn uring_disabled_by_env() -> bool {
    std::env::var_os("XCP_URING_DISABLE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The I/O mode to use when io_uring is `disabled` (by `XCP_URING_DISABLE`): an explicit
/// `uring` is refused with the reason and what to do, `auto` becomes epoll with one log line.
pub fn io_allowed(io: IoMode, disabled: bool) -> Result<IoMode, String> {
    if !disabled {
        return Ok(io);
    }
    const WHY: &str = "disabled by the environment variable XCP_URING_DISABLE";
    match io {
        IoMode::Uring => Err(format!(
            "io_uring is not available: {WHY}; use --io epoll (or auto), or unset \
             XCP_URING_DISABLE"
        )),
        IoMode::Auto => {
            tracing::warn!("io_uring unavailable ({WHY}); using epoll");
            Ok(IoMode::Epoll)
        }
        other => Ok(other),
    }
}

/// Parses a byte count: a plain number, or one with a K/M/G suffix (powers of 1024, an
/// optional `iB` or `B`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a byte count (examples: 65536, 512KiB, 4M)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is too large a byte count"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown unit {other:?} (use K, M or G)")),
    };
    let v = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large a byte count"))?;
    if v == 0 {
        return Err("must be at least 1 byte".into());
    }
    Ok(v)
}

/// Parses a compression policy: `off` (or `none`), `on` (= 1 KiB), `auto`, or a byte count
/// with the suffixes of [`parse_bytes`].
pub fn parse_compress(s: &str) -> Result<CompressPolicy, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" | "none" => Ok(CompressPolicy::Off),
        "on" => Ok(CompressPolicy::Above(MIN_COMPRESS_BYTES)),
        "auto" => Ok(CompressPolicy::Auto),
        _ => {
            let n = parse_bytes(s).map_err(|e| format!("{e}; or use off, on or auto"))?;
            usize::try_from(n)
                .map(CompressPolicy::Above)
                .map_err(|_| format!("{s:?} is too large a byte count"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_disabled_refuses_uring_and_turns_auto_to_epoll() {
        assert_eq!(io_allowed(IoMode::Uring, false), Ok(IoMode::Uring));
        assert_eq!(io_allowed(IoMode::Auto, false), Ok(IoMode::Auto));
        let e = io_allowed(IoMode::Uring, true).unwrap_err();
        assert!(
            e.contains("XCP_URING_DISABLE") && e.contains("--io epoll"),
            "{e}"
        );
        assert_eq!(io_allowed(IoMode::Auto, true), Ok(IoMode::Epoll));
        assert_eq!(io_allowed(IoMode::Epoll, true), Ok(IoMode::Epoll));
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("4M"), Ok(4 << 20));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn compress_policies() {
        use super::{parse_compress, CompressPolicy};
        assert_eq!(parse_compress("off"), Ok(CompressPolicy::Off));
        assert_eq!(parse_compress("auto"), Ok(CompressPolicy::Auto));
        assert_eq!(parse_compress("on"), Ok(CompressPolicy::Above(1024)));
        assert_eq!(parse_compress("4KiB"), Ok(CompressPolicy::Above(4096)));
        assert!(parse_compress("sometimes").is_err());
    }
}
