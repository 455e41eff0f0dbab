//! `xcp send`: one Ether as a request; the reply printed as JSON.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};

use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::{Error, Ether, Session};

use crate::{ConnArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
What it does:
  Builds an Ether: `--text STR` makes a `text` Ether ({\"kind\":\"text\",\"schema_version\":1,
  \"payload\":{\"text\":STR},\"metadata\":{}}); `--ether FILE` reads one from a JSON file, and
  `--ether -` from stdin (SPEC §5.1: kind, schema_version >= 1, payload and metadata are
  required). It is encoded with --codec, sent as a DATA request (chunked when it is larger
  than the negotiated max_frame_bytes), and the reply's Ether is printed on stdout as pretty
  JSON. Against `xcp serve` the reply is the same Ether.

Exit code: 0 when a reply came; 1 when the peer refused the message (NACK, printed as
`error: peer refused message N with ERR_...: detail`), no reply came within --timeout-ms,
or the reply was not an Ether; 2 for bad arguments or input, or no connection.

Examples:
  xcp send tcp://127.0.0.1:7070 --text hello
  xcp send tcp://127.0.0.1:7070 --text hello --codec protobuf --channel 3
  xcp send unix:///tmp/xcp.sock --ether embedding.json
  echo '{\"kind\":\"embedding\",\"schema_version\":1,\"payload\":{\"values\":[0.5,1.5],\"dim\":2},\"metadata\":{}}' \\
    | xcp send tcp://127.0.0.1:7070 --ether - --json-header";

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
#[command(group(ArgGroup::new("input").required(true).args(["text", "ether"])))]
pub struct SendArgs {
    /// The server: tcp://HOST:PORT or unix:///path/to/socket.
    #[arg(value_name = "URL")]
    pub url: String,

    /// Send a `text` Ether with this text.
    #[arg(long, short = 't', value_name = "STR")]
    pub text: Option<String>,

    /// Send the Ether in this JSON file; `-` reads it from stdin.
    #[arg(long, short = 'e', value_name = "FILE|-")]
    pub ether: Option<PathBuf>,

    /// The body codec of the request.
    #[arg(long, value_enum, default_value_t = Codec::Json)]
    pub codec: Codec,

    /// The channel (logical stream) to send on.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub channel: u32,

    /// Milliseconds to wait for the reply (and for the connection).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Sends the Ether and prints the reply; returns the exit code.
pub async fn run(args: SendArgs) -> u8 {
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

    let timeout = Duration::from_millis(args.timeout_ms);
    let mut config = args.conn.session_config(timeout);
    config.connect_timeout = timeout;
    let session = match Session::connect(&args.url, config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", args.url);
            return EXIT_USAGE;
        }
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
        Err(Error::Nack {
            msg_id,
            code,
            detail,
            ..
        }) => {
            let name = code.name().map_or_else(|| code.to_string(), str::to_string);
            if detail.is_empty() {
                eprintln!("error: peer refused message {msg_id} with {name}");
            } else {
                eprintln!("error: peer refused message {msg_id} with {name}: {detail}");
            }
            EXIT_FAILED
        }
        Err(Error::Timeout(what)) => {
            eprintln!(
                "error: no reply from {} within {} ms ({what})",
                args.url, args.timeout_ms
            );
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("error: request to {} failed: {e}", args.url);
            EXIT_FAILED
        }
    };
    let _ = session.close().await;
    code
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
    use super::parse_ether;

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
