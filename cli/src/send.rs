//! `xcp send`: one Ether as a request; the reply printed as JSON. With `--random-bytes N`,
//! N random bytes as an attachment (by handle where negotiated) that `xcp serve` checks.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args, ValueEnum};
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};

use xcp::attach::Scheme;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::session::AttachConfig;
use xcp::{Attachment, Error, Ether, Session};

use crate::serve::{BLOB_ATTACHMENT, BLOB_KIND, BLOB_REPLY_KIND};
use crate::{parse_bytes, ConnArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
What it does:
  Builds an Ether: `--text STR` makes a `text` Ether ({\"kind\":\"text\",\"schema_version\":1,
  \"payload\":{\"text\":STR},\"metadata\":{}}); `--ether FILE` reads one from a JSON file, and
  `--ether -` from stdin (SPEC §5.1: kind, schema_version >= 1, payload and metadata are
  required). It is encoded with --codec, sent as a DATA request (chunked when it is larger
  than the negotiated max_frame_bytes), and the reply's Ether is printed on stdout as pretty
  JSON. Against `xcp serve` the reply is the same Ether.

  `--random-bytes N` (suffixes K, M, G) loans a region of N bytes from the session's pool of
  shared segments, fills it with random bytes in place, and sends it as the attachment
  \"data\" (application/octet-stream, dtype uint8) of a `blob` Ether, always with the
  PROTOBUF codec (inline bytes travel raw, not base64). By handle (`shm://` or `memfd://`,
  SPEC §7) when both sides negotiated a scheme and N is at least the inline threshold
  (64 KiB); inline otherwise, or when the server refuses the handle. `xcp serve` answers with
  the CRC32C of the bytes it read and how they came; one JSON line is printed:
    {\"bytes\": N, \"path\": \"shm\"|\"memfd\"|\"inline\", \"checksum_ok\": true, \"seconds\": T}
  T is the time from handing the region to the session until the checked answer arrived
  (filling the region and the local checksum are not counted).

  `--attach` chooses the handle schemes offered: auto (memfd on a Unix socket, else shm),
  shm, memfd (unix:// only: the descriptor travels with SCM_RIGHTS) or inline (no handles).

Exit code: 0 when a reply came; 1 when the peer refused the message (NACK, printed as
`error: peer refused message N with ERR_...: detail`), no reply came within --timeout-ms,
the reply was not an Ether, or (--random-bytes) the checksum did not match; 2 for bad
arguments or input, or no connection.

Examples:
  xcp send tcp://127.0.0.1:7070 --text hello
  xcp send tcp://127.0.0.1:7070 --text hello --codec protobuf --channel 3
  xcp send unix:///tmp/xcp.sock --ether embedding.json
  echo '{\"kind\":\"embedding\",\"schema_version\":1,\"payload\":{\"values\":[0.5,1.5],\"dim\":2},\"metadata\":{}}' \\
    | xcp send tcp://127.0.0.1:7070 --ether - --json-header
  xcp send tcp://127.0.0.1:7070 --random-bytes 64M --attach shm
  xcp send unix:///tmp/xcp.sock --random-bytes 64M            # memfd by default";

/// The body codecs `send` can encode an Ether with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Codec {
    /// UTF-8 JSON (bodyCodec 0x0001); every peer supports it.
    Json,
    /// `EtherProto` of proto/ether.proto (bodyCodec 0x0008).
    Protobuf,
}

impl Codec {
    fn id(self) -> CodecId {
        match self {
            Codec::Json => CodecId::JSON,
            Codec::Protobuf => CodecId::PROTOBUF,
        }
    }
}

/// Arguments of `xcp send`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("input").required(true).args(["text", "ether", "random_bytes"])))]
pub struct SendArgs {
    /// The server: tcp://HOST:PORT, unix:///path/to/socket, tls://HOST:PORT or
    /// quic://HOST:PORT (the last two with --cert, --key and --ca).
    #[arg(value_name = "URL")]
    pub url: String,

    /// Send a `text` Ether with this text.
    #[arg(long, short = 't', value_name = "STR")]
    pub text: Option<String>,

    /// Send the Ether in this JSON file; `-` reads it from stdin.
    #[arg(long, short = 'e', value_name = "FILE|-")]
    pub ether: Option<PathBuf>,

    /// Send this many random bytes (suffixes K, M, G) as an attachment, by handle where
    /// negotiated, and check the server's CRC32C of them (prints one JSON line).
    #[arg(long, value_name = "N", value_parser = parse_bytes)]
    pub random_bytes: Option<u64>,

    /// How attachments may travel: auto (memfd on a Unix socket, else shm), shm, memfd
    /// (unix:// only) or inline (no handles).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// The body codec of the request (`--random-bytes` always uses protobuf).
    #[arg(long, value_enum, default_value_t = Codec::Json)]
    pub codec: Codec,

    /// The channel (logical stream) to send on (not with --random-bytes: channel 0).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub channel: u32,

    /// Milliseconds to wait for the reply (and for the connection).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    #[command(flatten)]
    pub conn: ConnArgs,
}

/// How attachments may travel (`--attach` of `send` and `serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// memfd on a Unix socket, POSIX shm otherwise (both offered; the peer picks).
    Auto,
    /// POSIX shm objects (`shm://`), on any transport of the same host.
    Shm,
    /// memfd descriptors passed with SCM_RIGHTS (`memfd://`); Unix sockets only.
    Memfd,
    /// No handles: every attachment travels inline in the message.
    Inline,
}

impl AttachMode {
    /// The attachment settings for a connection to (or a listener on) `url`.
    pub fn config(self, url: &str) -> Result<AttachConfig, String> {
        let only = |scheme| AttachConfig::default().with_schemes(vec![scheme]);
        let remote = url.starts_with("tls://") || url.starts_with("quic://");
        match self {
            AttachMode::Shm | AttachMode::Memfd if remote => Err(format!(
                "--attach {}: handles never cross hosts, and {url} goes across hosts (TLS or \
                 QUIC): attachments travel inline there (leave --attach at auto or inline)",
                if self == AttachMode::Shm {
                    "shm"
                } else {
                    "memfd"
                }
            )),
            AttachMode::Auto => Ok(AttachConfig::default()),
            AttachMode::Shm => Ok(only(Scheme::Shm)),
            AttachMode::Memfd if url.starts_with("unix://") || url.starts_with("ring://") => {
                Ok(only(Scheme::Memfd))
            }
            AttachMode::Memfd => Err(format!(
                "--attach memfd needs a unix:// or ring:// URL (memfd descriptors travel with \
                 SCM_RIGHTS over Unix sockets), not {url}; use --attach shm for TCP"
            )),
            AttachMode::Inline => Ok(AttachConfig::inline_only()),
        }
    }
}

/// Sends the Ether and prints the reply; returns the exit code.
pub async fn run(args: SendArgs) -> u8 {
    if let Some(n) = args.random_bytes {
        return run_random(&args, n).await;
    }
    let ether = match build_ether(&args).await {
        Ok(e) => e,
        Err(msg) => {
            eprintln!("error: {msg}");
            return EXIT_USAGE;
        }
    };
    let request = match Outgoing::ether(&ether, args.codec.id()) {
        Ok(o) => o.on_channel(args.channel),
        Err(e) => {
            eprintln!("error: cannot encode the Ether as {:?}: {e}", args.codec);
            return EXIT_USAGE;
        }
    };

    let session = match connect(&args, 0).await {
        Ok(s) => s,
        Err(code) => return code,
    };

    let code = match session.request(request).await {
        Ok(reply) => match reply.ether() {
            Ok(e) => match serde_json::to_string_pretty(&e) {
                Ok(json) => {
                    println!("{json}");
                    EXIT_OK
                }
                Err(err) => {
                    eprintln!("error: cannot print the reply as JSON: {err}");
                    EXIT_FAILED
                }
            },
            Err(e) => {
                eprintln!(
                    "error: reply {} (bodyCodec {}) is not an Ether: {e}",
                    reply.msg_id(),
                    reply.header.body_codec
                );
                EXIT_FAILED
            }
        },
        Err(e) => request_failed(&args, e),
    };
    let _ = session.close().await;
    code
}

/// Connects with the options of `args`; `attachment_bytes` is the size of what will be
/// attached (the pool must hold it). The error is the exit code, already explained on stderr.
async fn connect(args: &SendArgs, attachment_bytes: u64) -> Result<Session, u8> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut config = args.conn.session_config(timeout);
    config.connect_timeout = timeout;
    config.attach = args.attach.config(&args.url).map_err(|msg| {
        eprintln!("error: {msg}");
        EXIT_USAGE
    })?;
    // Room for the one region, whatever its size (segments above 64 MiB come in 2 MiB steps).
    let need = attachment_bytes.div_ceil(2 << 20).saturating_add(1) * (2 << 20);
    config.attach.pool_cap_bytes = config.attach.pool_cap_bytes.max(need);
    Session::connect(&args.url, config).await.map_err(|e| {
        eprintln!("error: cannot connect to {}: {e}", args.url);
        EXIT_USAGE
    })
}

/// Explains a failed request on stderr; returns the exit code.
fn request_failed(args: &SendArgs, e: Error) -> u8 {
    match e {
        Error::Nack {
            msg_id,
            code,
            detail,
            ..
        } => {
            let name = code.name().map_or_else(|| code.to_string(), str::to_string);
            if detail.is_empty() {
                eprintln!("error: peer refused message {msg_id} with {name}");
            } else {
                eprintln!("error: peer refused message {msg_id} with {name}: {detail}");
            }
        }
        Error::Timeout { detail: what, .. } => {
            eprintln!(
                "error: no reply from {} within {} ms ({what})",
                args.url, args.timeout_ms
            );
        }
        e => eprintln!("error: request to {} failed: {e}", args.url),
    }
    EXIT_FAILED
}

/// `--random-bytes N`: a region of N random bytes to `xcp serve`, which answers with their
/// CRC32C; prints one JSON line and returns the exit code.
async fn run_random(args: &SendArgs, n: u64) -> u8 {
    let Ok(len) = usize::try_from(n) else {
        eprintln!("error: --random-bytes {n}: too large for this machine");
        return EXIT_USAGE;
    };
    let session = match connect(args, n).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let code = match send_random(&session, len).await {
        Ok(code) => code,
        Err(e) => request_failed(args, e),
    };
    let _ = session.close().await;
    code
}

/// Loans, fills, sends and checks; `Err` for what [`request_failed`] explains.
async fn send_random(session: &Session, len: usize) -> Result<u8, Error> {
    let mut region = session.alloc(len).await?;
    // Filling and checksumming 64 MiB takes a while: keep it off the runtime's workers.
    let (region, want) = tokio::task::spawn_blocking(move || {
        fill_random(&mut region, rand::random());
        let crc = xcp::wire::frame::crc32c(&region);
        (region, crc)
    })
    .await
    .map_err(|e| Error::invalid(format!("filling the region failed: {e}")))?;

    let mut ether = Ether::new(BLOB_KIND, serde_json::Map::new());
    ether.payload.insert("bytes".into(), len.into());
    ether.payload.insert("reply".into(), "crc32c".into());
    let attachment = Attachment {
        id: BLOB_ATTACHMENT.into(),
        media_type: "application/octet-stream".into(),
        dtype: "uint8".into(),
        shape: u32::try_from(len).map(|l| vec![l]).unwrap_or_default(),
        ..Attachment::default()
    };
    let started = Instant::now();
    let reply = session
        .request_regions(ether, CodecId::PROTOBUF, vec![(attachment, region)])
        .await?;
    let seconds = started.elapsed().as_secs_f64();

    let answer = match reply.ether() {
        Ok(e) if e.kind == BLOB_REPLY_KIND => e,
        Ok(e) => {
            eprintln!(
                "error: the reply is a {:?} Ether, not {BLOB_REPLY_KIND:?}: is the peer `xcp serve`?",
                e.kind
            );
            return Ok(EXIT_FAILED);
        }
        Err(e) => {
            eprintln!("error: reply {} is not an Ether: {e}", reply.msg_id());
            return Ok(EXIT_FAILED);
        }
    };
    if let Some(err) = answer.payload.get("error").and_then(|v| v.as_str()) {
        eprintln!("error: the server could not check the bytes: {err}");
        return Ok(EXIT_FAILED);
    }
    let got_crc = answer.payload.get("crc32c").and_then(|v| v.as_u64());
    let got_len = answer.payload.get("bytes").and_then(|v| v.as_u64());
    let path = answer
        .payload
        .get("path")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string();
    let ok = got_crc == Some(u64::from(want)) && got_len == Some(len as u64);
    println!(
        "{{\"bytes\": {len}, \"path\": {}, \"checksum_ok\": {ok}, \"seconds\": {seconds:.6}}}",
        serde_json::Value::String(path)
    );
    if !ok {
        eprintln!(
            "error: the server read {} bytes with CRC32C {}, we sent {len} bytes with CRC32C {want:#010x}",
            got_len.map_or_else(|| "?".to_string(), |l| l.to_string()),
            got_crc.map_or_else(|| "?".to_string(), |c| format!("{c:#010x}")),
        );
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}

/// Fills `buf` with pseudo-random bytes from `seed` (the project's one seeded generator,
/// [`SmallRng`]: fast, and good enough to make every byte count in a checksum).
fn fill_random(buf: &mut [u8], seed: u64) {
    SmallRng::seed_from_u64(seed).fill_bytes(buf);
}

/// The Ether to send, from `--text` or `--ether`; the error names the problem.
async fn build_ether(args: &SendArgs) -> Result<Ether, String> {
    if let Some(text) = &args.text {
        return Ok(Ether::text(text.clone()));
    }
    let Some(path) = args.ether.clone() else {
        return Err("give --text STR or --ether FILE|-".into());
    };
    // Reading a file or stdin blocks; keep it off the runtime's workers.
    tokio::task::spawn_blocking(move || read_ether(&path))
        .await
        .map_err(|e| format!("--ether: reading the input failed: {e}"))?
}

/// Reads and parses the Ether of `--ether FILE|-`.
fn read_ether(path: &Path) -> Result<Ether, String> {
    if path.as_os_str() == "-" {
        let mut raw = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut raw)
            .map_err(|e| format!("--ether -: cannot read stdin: {e}"))?;
        parse_ether("stdin", &raw)
    } else {
        let raw = std::fs::read(path)
            .map_err(|e| format!("--ether {}: cannot read: {e}", path.display()))?;
        parse_ether(&path.display().to_string(), &raw)
    }
}

/// Parses and validates an Ether from JSON text read from `source`.
fn parse_ether(source: &str, raw: &[u8]) -> Result<Ether, String> {
    let ether: Ether = serde_json::from_slice(raw)
        .map_err(|e| format!("--ether {source}: not a valid Ether JSON: {e}"))?;
    ether
        .validate()
        .map_err(|e| format!("--ether {source}: invalid Ether: {e}"))?;
    Ok(ether)
}

#[cfg(test)]
mod tests {
    use super::{fill_random, parse_ether};

    #[test]
    fn random_fill_is_seeded_and_covers_every_byte() {
        // Lengths that are not a multiple of the generator's word, so the tail is filled too.
        for len in [0usize, 1, 7, 9, 4099] {
            let (mut a, mut b, mut c) = (vec![0u8; len], vec![0u8; len], vec![0u8; len]);
            fill_random(&mut a, 42);
            fill_random(&mut b, 42);
            fill_random(&mut c, 43);
            assert_eq!(a, b, "same seed, same bytes ({len})");
            if len >= 8 {
                assert_ne!(a, c, "another seed, other bytes ({len})");
                // The last bytes are written as well (a zeroed tail would pass the checksum
                // check on both sides and test nothing).
                assert!(a[len - 8..].iter().any(|&x| x != 0), "tail of {len}");
            }
        }
        // Not a constant pattern: a 4 KiB fill uses most byte values.
        let mut buf = vec![0u8; 4096];
        fill_random(&mut buf, 7);
        let mut seen = [false; 256];
        buf.iter().for_each(|&x| seen[usize::from(x)] = true);
        assert!(seen.iter().filter(|&&s| s).count() > 200);
    }

    #[test]
    fn ether_input_errors_name_the_problem() {
        let err = parse_ether("stdin", b"{not json").unwrap_err();
        assert!(err.contains("stdin") && err.contains("line 1"), "{err}");
        let err = parse_ether("f.json", br#"{"kind":"text","schema_version":1}"#).unwrap_err();
        assert!(err.contains("payload"), "{err}");
        let err = parse_ether(
            "f.json",
            br#"{"kind":"text","schema_version":1,"payload":{},"metadata":{}}"#,
        )
        .unwrap_err();
        assert!(err.contains("payload.text"), "{err}");
        let ok = parse_ether(
            "f.json",
            br#"{"kind":"text","schema_version":1,"payload":{"text":"hi"},"metadata":{}}"#,
        )
        .unwrap();
        assert_eq!(ok.payload["text"], "hi");
    }
}
