//! `xcp bench-server`: the server side of `xcp bench` and `xcp demo`, run as a separate
//! process. Its first stdout line is `listening on URL`.
//!
//! Every mode answers a request carrying N bytes with a tiny reply, so each row of the bench
//! moves its payload one way (client → server) and the rows compare like with like:
//! - `raw-tcp`: a u64 little-endian length, then that many bytes; the reply is the length
//!   (8 bytes). No framing, no checksum.
//! - `raw-unix`: the same on a Unix stream socket with the buffers XCP sets on its own.
//! - `http2`: `POST /echo` over HTTP/2 without TLS (h2c); the reply body is the length.
//! - `grpc`: the unary `xcp.bench.Echo/Echo`; the reply is a `Blob` holding the length.
//! - `xcp`: each DATA message is answered with a [`Summary`] in a 16-byte TENSOR_QNT8 body:
//!   the CRC32C of the bytes it carried (when `--touch`), how many attachments came by handle,
//!   and the byte count. Bodies up to `--echo-max` bytes without attachments are echoed
//!   instead (the demo uses that to check text and Arrow round trips).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming as HyperBody;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use xcp::attach::Scheme;
use xcp::codec::tensor::{DType, TensorHeader};
use xcp::codec::CodecId;
use xcp::conn::{Incoming, Outgoing};
use xcp::session::AttachConfig;
use xcp::wire::frame::{crc32c, crc32c_append};
use xcp::Server;

use crate::args::{parse_bytes, ConnArgs, EXIT_USAGE};

/// The generated gRPC stubs (`proto/bench.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/xcp.bench.rs"));
}

/// HTTP/2 flow-control windows of the hyper and tonic baselines, both ends: large enough
/// that a 64 MiB body is not throttled by the 64 KiB protocol default.
pub const H2_STREAM_WINDOW: u32 = 8 << 20;
/// The connection-level window of the baselines.
pub const H2_CONN_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame the baselines send (the protocol allows up to 16 MiB - 1).
pub const H2_MAX_FRAME: u32 = 1 << 20;
/// The largest message of any path (64 MiB plus headroom for encodings).
pub const MAX_MESSAGE: usize = 80 << 20;

/// What a server process speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// XCP (the library's `Server`).
    Xcp,
    /// Length-prefixed bytes on a plain TCP socket.
    RawTcp,
    /// Length-prefixed bytes on a plain Unix stream socket.
    RawUnix,
    /// HTTP/2 with hyper, no TLS.
    Http2,
    /// gRPC with tonic, no TLS.
    Grpc,
    /// gRPC with tonic over TLS 1.3 (rustls; the certificates of `--cert --key --ca`, client
    /// certificates required).
    GrpcTls,
}

/// Which attachment schemes the XCP server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// None: everything inline.
    None,
    /// POSIX shm (any transport on the same host).
    Shm,
    /// memfd over `SCM_RIGHTS` (Unix sockets).
    Memfd,
}

impl AttachMode {
    /// The attachment settings this mode stands for; regions of every size go by handle (no
    /// inline threshold), so a handle row measures handles at every size.
    pub fn config(self) -> AttachConfig {
        match self {
            AttachMode::None => AttachConfig::inline_only(),
            AttachMode::Shm | AttachMode::Memfd => AttachConfig::default()
                .with_schemes(vec![if self == AttachMode::Shm {
                    Scheme::Shm
                } else {
                    Scheme::Memfd
                }])
                .with_inline_threshold(0),
        }
    }
}

/// Arguments of the hidden `xcp bench-server`.
#[derive(Args, Debug)]
pub struct BenchServerArgs {
    /// What to speak.
    #[arg(long, value_enum)]
    pub mode: Mode,

    /// Where to listen: tcp://HOST:PORT (port 0: any) or, for `xcp`, unix:///path.
    #[arg(long, short = 'l', value_name = "URL")]
    pub listen: String,

    /// `xcp`: the handle schemes offered.
    #[arg(long, value_enum, default_value = "none")]
    pub attach: AttachMode,

    /// `xcp`: read every byte received (CRC32C of each view or body) before answering.
    /// Without it a handle is answered without touching its bytes.
    #[arg(long)]
    pub touch: bool,

    /// `xcp`: echo bodies of up to this many bytes that carry no attachment.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_echo_max)]
    pub echo_max: u64,

    #[command(flatten)]
    pub conn: ConnArgs,
}

fn parse_echo_max(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(s)
}

/// The answer of the XCP bench server: what it saw of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// CRC32C of every byte carried (attachments in order, else the body); 0 without `--touch`.
    pub crc: u32,
    /// How many attachments came by handle.
    pub handles: u32,
    /// Bytes carried (attachments, else the body).
    pub bytes: u64,
}

impl Summary {
    const SHAPE: [u32; 1] = [16];

    /// The reply body: a TENSOR_QNT8 of 16 bytes (crc, handles, bytes; little-endian).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(48);
        let header = TensorHeader::new(DType::Qnt8, &Self::SHAPE).expect("a valid shape");
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.extend_from_slice(&self.handles.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.freeze()
    }

    /// Reads a reply body made by [`Summary::encode`].
    pub fn decode(body: &[u8]) -> Option<Summary> {
        let d = body.get(32..48)?;
        Some(Summary {
            crc: u32::from_le_bytes(d[0..4].try_into().ok()?),
            handles: u32::from_le_bytes(d[4..8].try_into().ok()?),
            bytes: u64::from_le_bytes(d[8..16].try_into().ok()?),
        })
    }
}

/// Runs the server until killed; returns an exit code only when it cannot start.
pub async fn run(args: BenchServerArgs) -> u8 {
    // A server outlives nothing: when the bench or demo that started it dies, so does it.
    #[cfg(target_os = "linux")]
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    let r = match args.mode {
        Mode::Xcp => run_xcp(&args).await,
        Mode::RawTcp => run_raw(&args.listen).await,
        Mode::RawUnix => run_raw_unix(&args.listen).await,
        Mode::Http2 => run_http2(&args.listen).await,
        Mode::Grpc => run_grpc(&args.listen, None).await,
        Mode::GrpcTls => match &args.conn.tls.loaded {
            Some(tls) => match tls.rustls_server() {
                Some(sc) => {
                    let mut sc = (*sc).clone();
                    sc.alpn_protocols = vec![b"h2".to_vec()];
                    run_grpc(
                        &args.listen,
                        Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(sc))),
                    )
                    .await
                }
                None => Err("grpc-tls needs --cert and --key".to_string()),
            },
            None => Err("grpc-tls needs --cert, --key and --ca".to_string()),
        },
    };
    match r {
        Ok(()) => crate::args::EXIT_OK,
        Err(e) => {
            eprintln!(
                "error: bench-server {:?} on {}: {e}",
                args.mode, args.listen
            );
            EXIT_USAGE
        }
    }
}

fn announce(url: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {url}").and_then(|()| out.flush());
}

fn tcp_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("{url}: this mode listens on tcp://HOST:PORT only"))?;
    rest.parse().map_err(|e| format!("{url}: {e}"))
}

async fn bind_tcp(url: &str) -> Result<TcpListener, String> {
    let l = TcpListener::bind(tcp_addr(url)?)
        .await
        .map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    announce(&format!("tcp://{addr}"));
    Ok(l)
}

async fn run_xcp(args: &BenchServerArgs) -> Result<(), String> {
    let mut config = args.conn.session_config(Duration::from_secs(60));
    config.attach = args.attach.config();
    let server = Server::bind(&args.listen, config)
        .await
        .map_err(|e| e.to_string())?;
    announce(&server.local_url());
    let (touch, echo_max) = (args.touch, args.echo_max);
    while let Ok(s) = server.accept().await {
        tokio::spawn(async move {
            while let Ok(m) = s.recv().await {
                let (to, out) = answer(m, touch, echo_max);
                if s.send(out.reply_to(to.0).on_channel(to.1)).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The reply to one message, and (msgId, channel) to answer. Views are dropped before the
/// reply is queued, so the sender's regions are released (ACK) as early as they can be.
fn answer(mut m: Incoming, touch: bool, echo_max: u64) -> ((u64, u32), Outgoing) {
    let to = (m.msg_id(), m.header.channel_id);
    let views = std::mem::take(&mut m.views);
    let attachments = m.ether.as_ref().map(|e| e.attachments.clone());
    let mut s = Summary {
        crc: 0,
        handles: views.len() as u32,
        bytes: 0,
    };
    match attachments {
        Some(atts) if !atts.is_empty() => {
            for a in &atts {
                let bytes: &[u8] = match views.iter().find(|(id, _)| *id == a.id) {
                    Some((_, v)) => v.as_slice(),
                    None => a.inline_bytes.as_deref().unwrap_or(&[]),
                };
                s.bytes += bytes.len() as u64;
                if touch {
                    s.crc = crc32c_append(s.crc, bytes);
                }
            }
        }
        _ => {
            if (m.body.len() as u64) <= echo_max {
                let mut out = Outgoing::data(m.header.body_codec, m.body.clone());
                out.schema_key = m.header.schema_key;
                return (to, out);
            }
            s.bytes = m.body.len() as u64;
            if touch {
                s.crc = crc32c(&m.body);
            }
        }
    }
    drop(views);
    (to, Outgoing::data(CodecId::TENSOR_QNT8, s.encode()))
}

async fn run_raw(url: &str) -> Result<(), String> {
    let l = bind_tcp(url).await?;
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(raw_conn(s));
    }
}

async fn run_raw_unix(url: &str) -> Result<(), String> {
    let path = url
        .strip_prefix("unix://")
        .ok_or_else(|| format!("{url}: raw-unix listens on unix:///path"))?;
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).map_err(|e| format!("{path}: {e}"))?;
    announce(url);
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            crate::client::set_unix_buffers(&s)?;
            raw_echo(s).await
        });
    }
}

async fn raw_conn(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    raw_echo(s).await
}

/// Reads u64-length-prefixed messages and answers each with its length.
async fn raw_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 0];
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let n = u64::from_le_bytes(len) as usize;
        if n > MAX_MESSAGE {
            return Ok(());
        }
        if buf.len() < n {
            buf.resize(n, 0);
        }
        s.read_exact(&mut buf[..n]).await?;
        s.write_all(&len).await?;
    }
}

async fn run_http2(url: &str) -> Result<(), String> {
    let l = bind_tcp(url).await?;
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<HyperBody>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                let len = (body.len() as u64).to_le_bytes();
                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::copy_from_slice(
                    &len,
                ))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_frame_size(H2_MAX_FRAME)
                .serve_connection(TokioIo::new(s), service)
                .await;
        });
    }
}

struct EchoService;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<pb::Blob>,
    ) -> Result<tonic::Response<pb::Blob>, tonic::Status> {
        let len = (request.get_ref().data.len() as u64).to_le_bytes();
        Ok(tonic::Response::new(pb::Blob {
            data: Bytes::copy_from_slice(&len),
        }))
    }
}

async fn run_grpc(url: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<(), String> {
    // The generated tonic service is a tower service: hyper's HTTP/2 server drives it, with
    // the same settings as the HTTP/2 baseline (tonic's own server needs its `router`
    // feature, which brings axum; the bytes on the wire are the same).
    let l = bind_tcp(url).await?;
    let svc = pb::echo_server::EchoServer::new(EchoService)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_frame_size(H2_MAX_FRAME)
                .clone();
            match tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                }
                Some(acceptor) => {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(s)).await
                    {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            }
        });
    }
}
