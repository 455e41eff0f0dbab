//! The paths `xcp bench` measures, the server process of each, and one client per path.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::SmallRng;
use rand::{RngCore as _, SeedableRng as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Mutex};

use xcp::codec::tensor::{DType, TensorHeader};
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::wire::seal::{CompressPolicy, Sealer};
use xcp::{Attachment, Ether, Session, SessionConfig};

use super::server::{
    pb, AttachMode, Summary, H2_CONN_WINDOW, H2_MAX_FRAME, H2_STREAM_WINDOW, MAX_MESSAGE,
};

/// One way of moving bytes from the client to the server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathId {
    /// Baseline: length-prefixed bytes on TCP.
    RawTcp,
    /// Baseline: length-prefixed bytes on a Unix stream socket.
    RawUnix,
    /// Baseline: HTTP/2 POST (hyper, h2c).
    Http2,
    /// Baseline: gRPC unary (tonic).
    Grpc,
    /// XCP over TCP, bytes inline.
    Tcp,
    /// XCP over a Unix socket, bytes inline.
    Unix,
    /// XCP over TCP, bytes by POSIX shm handle, receiver does not touch them.
    Shm,
    /// As `Shm`, the receiver reads every byte.
    ShmTouch,
    /// XCP over a Unix socket, bytes by memfd handle, receiver does not touch them.
    Memfd,
    /// As `Memfd`, the receiver reads every byte.
    MemfdTouch,
    /// XCP over TCP with COMP (auto) and CRYPT.
    Sealed,
    /// XCP over TLS 1.3 (mutual authentication), bytes inline.
    Tls,
    /// XCP over QUIC (mutual authentication), bytes inline.
    Quic,
    /// Baseline: gRPC unary over TLS 1.3 (mutual authentication).
    GrpcTls,
    /// XCP through the same-host ring (SPEC §9), bytes inline.
    Ring,
    /// XCP through the same-host ring, bytes by memfd handle, receiver does not touch them.
    RingMemfd,
}

impl PathId {
    /// Every path, in the order they run and print.
    pub const ALL: [PathId; 16] = [
        PathId::RawTcp,
        PathId::RawUnix,
        PathId::Http2,
        PathId::Grpc,
        PathId::GrpcTls,
        PathId::Tcp,
        PathId::Tls,
        PathId::Quic,
        PathId::Unix,
        PathId::Ring,
        PathId::Sealed,
        PathId::Shm,
        PathId::ShmTouch,
        PathId::Memfd,
        PathId::MemfdTouch,
        PathId::RingMemfd,
    ];

    /// The name used by `--paths`, the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            PathId::RawTcp => "raw-tcp",
            PathId::RawUnix => "raw-unix",
            PathId::Http2 => "http2",
            PathId::Grpc => "grpc",
            PathId::Tcp => "tcp",
            PathId::Unix => "unix",
            PathId::Shm => "shm",
            PathId::ShmTouch => "shm-touch",
            PathId::Memfd => "memfd",
            PathId::MemfdTouch => "memfd-touch",
            PathId::Sealed => "tcp-comp-crypt",
            PathId::Tls => "tls",
            PathId::Quic => "quic",
            PathId::GrpcTls => "grpc-tls",
            PathId::Ring => "ring",
            PathId::RingMemfd => "ring-memfd",
        }
    }

    /// What the row measures, in one line.
    pub fn description(self) -> &'static str {
        match self {
            PathId::RawTcp => "baseline: TCP, u64 length + bytes, 8-byte reply; no framing, no checksum",
            PathId::RawUnix => "baseline: Unix socket (4 MiB buffers, as XCP's), u64 length + bytes, 8-byte reply",
            PathId::Http2 => "baseline: HTTP/2 POST, hyper 1.x h2c (no TLS), 8-byte reply body",
            PathId::Grpc => "baseline: gRPC unary, tonic + prost (protox-generated), 8-byte reply",
            PathId::Tcp => "XCP over TCP, bytes inline (TENSOR_QNT8 body, CRC32C), 48-byte reply",
            PathId::Unix => "XCP over a Unix socket, bytes inline, 48-byte reply",
            PathId::Sealed => "XCP over TCP, COMP auto (zstd tried; random bytes stay raw) + CRYPT (ChaCha20-Poly1305)",
            PathId::Shm => "XCP over TCP, bytes by shm handle; receiver does NOT touch them (descriptor only)",
            PathId::ShmTouch => "XCP over TCP, bytes by shm handle; receiver reads every byte (CRC32C of the view)",
            PathId::Memfd => "XCP over a Unix socket, bytes by memfd handle (SCM_RIGHTS); receiver does NOT touch them",
            PathId::MemfdTouch => "XCP over a Unix socket, bytes by memfd handle; receiver reads every byte (CRC32C)",
            PathId::Tls => "XCP over TLS 1.3 (rustls, ring, mutual auth), bytes inline, 48-byte reply",
            PathId::Quic => "XCP over QUIC (quinn, mutual auth), a stream per channel, bytes inline",
            PathId::GrpcTls => "baseline: gRPC unary over TLS 1.3 (tonic + rustls, mutual auth), 8-byte reply",
            PathId::Ring => "XCP through the same-host shared-memory ring (ring://), bytes inline, 48-byte reply",
            PathId::RingMemfd => "XCP through the same-host ring, bytes by memfd handle; receiver does NOT touch them",
        }
    }

    /// Parses a `--paths` name.
    pub fn from_name(s: &str) -> Option<PathId> {
        let s = s.trim();
        PathId::ALL.into_iter().find(|p| p.name() == s).or(match s {
            "sealed" | "comp-crypt" => Some(PathId::Sealed),
            _ => None,
        })
    }

    /// Whether the bytes go by handle.
    pub fn by_handle(self) -> bool {
        matches!(
            self,
            PathId::Shm | PathId::ShmTouch | PathId::Memfd | PathId::MemfdTouch | PathId::RingMemfd
        )
    }

    /// Whether the receiver reads every byte (always for bytes that cross the socket).
    pub fn touched(self) -> bool {
        !matches!(self, PathId::Shm | PathId::Memfd | PathId::RingMemfd)
    }

    /// Whether the row goes through the same-host ring.
    fn ring(self) -> bool {
        matches!(self, PathId::Ring | PathId::RingMemfd)
    }

    fn unix(self) -> bool {
        matches!(
            self,
            PathId::RawUnix
                | PathId::Unix
                | PathId::Memfd
                | PathId::MemfdTouch
                | PathId::Ring
                | PathId::RingMemfd
        )
    }

    fn attach(self) -> AttachMode {
        match self {
            PathId::Shm | PathId::ShmTouch => AttachMode::Shm,
            PathId::Memfd | PathId::MemfdTouch | PathId::RingMemfd => AttachMode::Memfd,
            _ => AttachMode::None,
        }
    }

    /// Whether the row goes across hosts (TLS or QUIC): run only when asked (`--tls`, or
    /// named in `--paths`).
    pub fn across_hosts(self) -> bool {
        matches!(self, PathId::Tls | PathId::Quic | PathId::GrpcTls)
    }

    fn mode(self) -> &'static str {
        match self {
            PathId::RawTcp => "raw-tcp",
            PathId::RawUnix => "raw-unix",
            PathId::Http2 => "http2",
            PathId::Grpc => "grpc",
            PathId::GrpcTls => "grpc-tls",
            _ => "xcp",
        }
    }
}

/// A server child process; killed when dropped.
pub struct ServerProc {
    child: Child,
    /// The URL its first line announced.
    pub url: String,
    socket: Option<PathBuf>,
}

impl ServerProc {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts `xcp bench-server` (this same executable) with `args`, and waits for its
/// `listening on URL` line.
pub fn spawn_server(args: &[String], socket: Option<PathBuf>) -> Result<ServerProc, String> {
    let mut full = vec!["bench-server".to_string()];
    full.extend_from_slice(args);
    spawn_listening(&full, socket, None)
}

/// Starts this same executable with `args` (a subcommand and its options) and waits up to
/// 20 s for its first stdout line, `listening on URL`. `log` sets `RUST_LOG` for the child.
pub fn spawn_listening(
    args: &[String],
    socket: Option<PathBuf>,
    log: Option<&str>,
) -> Result<ServerProc, String> {
    spawn_listening_in(None, args, socket, log)
}

/// [`spawn_listening`] in the network namespace `netns` (through `ip netns exec`), or in
/// this one.
pub fn spawn_listening_in(
    netns: Option<&str>,
    args: &[String],
    socket: Option<PathBuf>,
    log: Option<&str>,
) -> Result<ServerProc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the xcp binary: {e}"))?;
    let what = format!("xcp {}", args.join(" "));
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(level) = log {
        cmd.env("RUST_LOG", level);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let mut proc = ServerProc {
        child,
        url: String::new(),
        socket,
    };
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(line)) => match line.trim().strip_prefix("listening on ") {
            Some(url) => {
                proc.url = url.to_string();
                Ok(proc)
            }
            None => Err(format!("{what} said {line:?}")),
        },
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no address within 20 s")),
    }
}

/// Per-run settings shared by every path.
pub struct Env {
    /// A 32-byte key file (mode 600) for the sealed path.
    pub key_file: PathBuf,
    /// Its sealer.
    pub sealer: Sealer,
    /// A directory for Unix sockets.
    pub dir: PathBuf,
    /// The I/O interface of the XCP paths, both sides (`--io`).
    pub io: xcp::transport::IoMode,
    /// The network namespace the servers run in (`--veth`), if not this one.
    pub server_netns: Option<String>,
    /// The address TCP servers listen on (default 127.0.0.1).
    pub server_host: Option<String>,
    /// Development certificates for the TLS and QUIC rows.
    pub certs: xcp::transport::tls::DevSet,
}

impl Env {
    /// Makes the key file and the socket directory under the temp directory.
    pub fn new() -> Result<Env, String> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = std::env::temp_dir().join(format!("xcp-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let key: [u8; 32] = rand::random();
        let key_file = dir.join("key");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .map_err(|e| format!("{}: {e}", key_file.display()))?;
        std::io::Write::write_all(&mut f, &key).map_err(|e| e.to_string())?;
        let certs = xcp::transport::tls::write_dev_set(&dir.join("certs"), &[], 1)
            .map_err(|e| e.to_string())?;
        Ok(Env {
            key_file,
            sealer: Sealer::new(&key),
            dir,
            io: xcp::transport::IoMode::Epoll,
            server_netns: None,
            server_host: None,
            certs,
        })
    }
}

impl Env {
    /// The `--cert --key --ca` options of the server of a TLS or QUIC row.
    fn server_cert_args(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.certs.server.0.display().to_string(),
            "--key".into(),
            self.certs.server.1.display().to_string(),
            "--ca".into(),
            self.certs.ca.display().to_string(),
        ]
    }

    /// The client's certificate material.
    fn client_tls(&self) -> Result<xcp::transport::TlsConfig, BoxError> {
        let (cert, key) = &self.certs.client;
        Ok(xcp::transport::TlsConfig::from_files(
            cert,
            key,
            &self.certs.ca,
        )?)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the server of `path`.
pub fn start_server(path: PathId, env: &Env) -> Result<ServerProc, String> {
    let mut args: Vec<String> = vec!["--mode".into(), path.mode().into()];
    let socket = path
        .unix()
        .then(|| env.dir.join(format!("{}.sock", path.name())));
    let listen = match (&socket, path) {
        // The server binds the socket; its clients ask for the ring by the URL.
        (Some(p), _) if path.ring() => format!("ring://{}", p.display()),
        (Some(p), _) => format!("unix://{}", p.display()),
        (None, PathId::Tls) => "tls://127.0.0.1:0".to_string(),
        (None, PathId::Quic) => "quic://127.0.0.1:0".to_string(),
        (None, _) => format!(
            "tcp://{}:0",
            env.server_host.as_deref().unwrap_or("127.0.0.1")
        ),
    };
    args.extend(["--listen".into(), listen]);
    if path.across_hosts() {
        args.extend(env.server_cert_args());
    }
    if path.mode() == "xcp" {
        let attach = match path.attach() {
            AttachMode::None => "none",
            AttachMode::Shm => "shm",
            AttachMode::Memfd => "memfd",
        };
        args.extend(["--attach".into(), attach.into()]);
        // The ring needs no I/O interface but for its wake-ups: epoll.
        let io = if path.ring() {
            xcp::transport::IoMode::Epoll
        } else {
            env.io
        };
        args.extend(["--io".into(), io.name().into()]);
        if path.by_handle() && path.touched() {
            args.push("--touch".into());
        }
        if path == PathId::Sealed {
            args.extend([
                "--key-file".into(),
                env.key_file.display().to_string(),
                "--compress".into(),
                "auto".into(),
            ]);
        }
    }
    let mut full = vec!["bench-server".to_string()];
    full.extend(args);
    spawn_listening_in(env.server_netns.as_deref(), &full, socket, None)
}

/// The bytes of one size, in the forms the paths send.
pub struct Payload {
    /// The size in bytes.
    pub size: usize,
    /// `size` bytes (raw TCP, HTTP/2, gRPC).
    pub raw: Bytes,
    /// A TENSOR_QNT8 body of `size` bytes in all (XCP inline).
    pub tensor: Bytes,
}

impl Payload {
    /// Pseudo-random (incompressible) bytes; `size` must be at least 33.
    pub fn new(size: usize) -> Payload {
        let mut raw = vec![0u8; size];
        fill(&mut raw, size as u64);
        let header = TensorHeader::new(DType::Qnt8, &[(size - 32) as u32]).expect("shape");
        let mut tensor = BytesMut::with_capacity(size);
        tensor.extend_from_slice(&header.to_bytes());
        tensor.extend_from_slice(&raw[32..]);
        Payload {
            size,
            raw: Bytes::from(raw),
            tensor: tensor.freeze(),
        }
    }
}

/// Fills `buf` with pseudo-random (incompressible) bytes from `seed`: the same seed gives
/// the same bytes, from [`SmallRng`].
pub fn fill(buf: &mut [u8], seed: u64) {
    SmallRng::seed_from_u64(seed).fill_bytes(buf);
}

/// A connected client of one path. Shared by the tasks of a throughput run.
pub enum Client {
    /// Pipelined length-prefixed writes; a reader task completes replies in order.
    Raw(RawClient),
    /// An HTTP/2 connection (requests multiplexed as streams).
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    /// A gRPC channel.
    Grpc(pb::echo_client::EchoClient<tonic::transport::Channel>),
    /// An XCP session.
    Xcp {
        /// The session.
        session: Session,
        /// Send the bytes as a region (by handle) instead of inline.
        handle: bool,
        /// The server reads every byte and returns its CRC32C.
        touch: bool,
    },
}

/// Gives a raw Unix-socket baseline the socket buffers XCP's Unix transport sets
/// ([`xcp::transport::UNIX_SOCKET_BUFFER`]), so the two rows compare like with like.
pub fn set_unix_buffers(s: &UnixStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_send_buffer_size(xcp::transport::UNIX_SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(xcp::transport::UNIX_SOCKET_BUFFER)
}

/// The raw TCP or Unix-socket client.
pub struct RawClient {
    wr: Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Arc<std::sync::Mutex<VecDeque<oneshot::Sender<u64>>>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Client {
    /// Connects to the server of `path`.
    pub async fn connect(path: PathId, url: &str, env: &Env) -> Result<Client, BoxError> {
        match path {
            PathId::RawTcp | PathId::RawUnix => {
                let (mut rd, wr): (
                    Box<dyn AsyncRead + Send + Unpin>,
                    Box<dyn AsyncWrite + Send + Unpin>,
                ) = match url.strip_prefix("unix://") {
                    Some(path) => {
                        let s = UnixStream::connect(path).await?;
                        set_unix_buffers(&s)?;
                        let (rd, wr) = s.into_split();
                        (Box::new(rd), Box::new(wr))
                    }
                    None => {
                        let s = TcpStream::connect(url.trim_start_matches("tcp://")).await?;
                        s.set_nodelay(true)?;
                        let (rd, wr) = s.into_split();
                        (Box::new(rd), Box::new(wr))
                    }
                };
                let pending: Arc<std::sync::Mutex<VecDeque<oneshot::Sender<u64>>>> = Arc::default();
                let p = pending.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 8];
                    while rd.read_exact(&mut b).await.is_ok() {
                        let tx = p.lock().ok().and_then(|mut q| q.pop_front());
                        if let Some(tx) = tx {
                            let _ = tx.send(u64::from_le_bytes(b));
                        }
                    }
                });
                Ok(Client::Raw(RawClient {
                    wr: Mutex::new(wr),
                    pending,
                }))
            }
            PathId::Http2 => {
                let addr = url.trim_start_matches("tcp://");
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let (sr, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(H2_STREAM_WINDOW)
                    .initial_connection_window_size(H2_CONN_WINDOW)
                    .max_frame_size(H2_MAX_FRAME)
                    .handshake(TokioIo::new(s))
                    .await?;
                tokio::spawn(conn);
                Ok(Client::Http2(sr))
            }
            PathId::Grpc | PathId::GrpcTls => {
                let tls = path == PathId::GrpcTls;
                let scheme = if tls { "https" } else { "http" };
                let http = format!("{scheme}://{}", url.trim_start_matches("tcp://"));
                let mut endpoint = tonic::transport::Endpoint::from_shared(http)?
                    .initial_stream_window_size(H2_STREAM_WINDOW)
                    .initial_connection_window_size(H2_CONN_WINDOW)
                    .tcp_nodelay(true);
                if tls {
                    let read =
                        |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
                    let (cert, key) = &env.certs.client;
                    let config = tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(read(
                            &env.certs.ca,
                        )?))
                        .identity(tonic::transport::Identity::from_pem(
                            read(cert)?,
                            read(key)?,
                        ))
                        .domain_name("localhost");
                    endpoint = endpoint.tls_config(config)?;
                }
                let channel = endpoint.connect().await?;
                let c = pb::echo_client::EchoClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                Ok(Client::Grpc(c))
            }
            _ => {
                let mut cfg = SessionConfig::default()
                    .with_request_timeout(Duration::from_secs(60))
                    .with_attach(path.attach().config());
                cfg.transport.io = env.io;
                if path == PathId::Sealed {
                    cfg.conn.sealer = Some(env.sealer.clone());
                    cfg.conn.compress = CompressPolicy::Auto;
                }
                if path.across_hosts() {
                    cfg.transport.tls = Some(env.client_tls()?);
                }
                let session = Session::connect(url, cfg).await?;
                if path.by_handle() && session.negotiated().attach.is_empty() {
                    return Err(format!("{}: no handle scheme negotiated", path.name()).into());
                }
                Ok(Client::Xcp {
                    session,
                    handle: path.by_handle(),
                    touch: path.touched(),
                })
            }
        }
    }

    /// One request carrying `p.size` bytes; checks the reply. With `verify`, the handle
    /// region is filled with known bytes and the server's checksum is compared.
    pub async fn call(&self, p: &Payload, verify: bool) -> Result<(), BoxError> {
        match self {
            Client::Raw(c) => {
                let (tx, rx) = oneshot::channel();
                {
                    let mut wr = c.wr.lock().await;
                    c.pending.lock().map_err(|_| "poisoned")?.push_back(tx);
                    wr.write_all(&(p.size as u64).to_le_bytes()).await?;
                    wr.write_all(&p.raw).await?;
                }
                let n = rx.await?;
                check(n == p.size as u64, "raw: wrong reply length")
            }
            Client::Http2(sr) => {
                let mut sr = sr.clone();
                sr.ready().await?;
                let req =
                    hyper::Request::post("http://127.0.0.1/echo").body(Full::new(p.raw.clone()))?;
                let resp = sr.send_request(req).await?;
                let body = resp.into_body().collect().await?.to_bytes();
                check(
                    body.as_ref() == (p.size as u64).to_le_bytes(),
                    "http2: wrong reply",
                )
            }
            Client::Grpc(c) => {
                let mut c = c.clone();
                let r = c
                    .echo(pb::Blob {
                        data: p.raw.clone(),
                    })
                    .await?;
                check(
                    r.get_ref().data.as_ref() == (p.size as u64).to_le_bytes(),
                    "grpc: wrong reply",
                )
            }
            Client::Xcp {
                session,
                handle: false,
                ..
            } => {
                let reply = session
                    .request(Outgoing::data(CodecId::TENSOR_QNT8, p.tensor.clone()))
                    .await?;
                let s = Summary::decode(&reply.body).ok_or("xcp: bad reply")?;
                check(s.bytes == p.size as u64, "xcp: wrong byte count")
            }
            Client::Xcp {
                session,
                handle: true,
                touch,
            } => {
                let mut region = session.alloc(p.size).await?;
                let want = if verify {
                    fill(&mut region, 7);
                    xcp::wire::frame::crc32c(&region)
                } else {
                    0
                };
                let att = Attachment {
                    id: "blob".into(),
                    media_type: "application/octet-stream".into(),
                    ..Default::default()
                };
                let reply = session
                    .request_regions(Ether::text("bench"), CodecId::PROTOBUF, vec![(att, region)])
                    .await?;
                let s = Summary::decode(&reply.body).ok_or("xcp: bad reply")?;
                check(s.bytes == p.size as u64, "xcp: wrong byte count")?;
                check(s.handles == 1, "xcp: the bytes did not go by handle")?;
                if verify && *touch {
                    check(s.crc == want, "xcp: checksum of the handle's bytes differs")?;
                }
                Ok(())
            }
        }
    }

    /// Closes the connection (XCP sessions close gracefully).
    pub async fn close(self) {
        if let Client::Xcp { session, .. } = self {
            let _ = session.close().await;
        }
    }
}

fn check(ok: bool, what: &'static str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(what.into())
    }
}

#[cfg(test)]
mod tests {
    use super::{fill, Payload};

    #[test]
    fn fill_is_seeded_and_payloads_are_incompressible() {
        let (mut a, mut b, mut c) = (vec![0u8; 1001], vec![0u8; 1001], vec![0u8; 1001]);
        fill(&mut a, 5);
        fill(&mut b, 5);
        fill(&mut c, 6);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a[993..].iter().any(|&x| x != 0), "the tail is filled");
        let p = Payload::new(4096);
        assert_eq!((p.size, p.raw.len(), p.tensor.len()), (4096, 4096, 4096));
        // The tensor form carries the raw bytes after its 32-byte header.
        assert_eq!(p.tensor[32..], p.raw[32..]);
        let mut seen = [false; 256];
        p.raw.iter().for_each(|&x| seen[usize::from(x)] = true);
        assert!(seen.iter().filter(|&&s| s).count() > 200);
    }
}
