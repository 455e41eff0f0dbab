//! `xcp serve`: an echo server, and the checker of `xcp send --random-bytes`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use xcp::codec::CodecId;
use xcp::conn::{Incoming, Outgoing};
use xcp::session::ratelog::{LogBudget, PeerLog, PEER_FAULTS};
use xcp::wire::MsgType;
use xcp::{Error, Ether, Server, Session};

use crate::send::AttachMode;
use crate::{ConnArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// The kind of the Ether `xcp send --random-bytes` sends: its attachment
/// [`BLOB_ATTACHMENT`] holds the bytes, `payload.reply` is `"crc32c"`.
pub const BLOB_KIND: &str = "blob";
/// The id of the attachment that holds a blob's bytes.
pub const BLOB_ATTACHMENT: &str = "data";
/// The kind of the answer to a blob: `payload` = `{bytes, crc32c, path}` or `{error}`.
pub const BLOB_REPLY_KIND: &str = "blob.checksum";

const AFTER_HELP: &str = "\
What it does:
  The first line on stdout is exactly `listening on URL`, with the address really bound (so
  port 0 picks a free port and the line tells which), flushed at once: scripts read it to
  find the server. Every DATA message (msgType 0x0100 and the layered types above it) is
  answered with a message of the same type, codec, body, channel, schema key and tags, with
  inReplyTo set to its msgId. PING is answered with PONG by the library itself. One info line
  is logged on stderr when a connection opens (peer, negotiated codecs, max_frame_bytes,
  header form, handle schemes) and one when it closes (reason, messages answered): for the
  first 50 connections at once, then 10 a second; beyond that they are counted, and the next
  line logged says how many were suppressed. Lines a peer causes by misbehaving (bad frames,
  failed handshakes) are limited the same way, per peer and for the whole process.

  Except one kind: a `blob` Ether whose payload says \"reply\": \"crc32c\" (what
  `xcp send --random-bytes N` sends) is answered with a `blob.checksum` Ether: the CRC32C of
  the bytes of its attachment \"data\", read in place from the sender's shared segment when
  they came by handle, their length, and how they came: \"shm\", \"memfd\" or \"inline\".

  `--attach` chooses the handle schemes offered: auto (memfd and shm on a Unix socket, shm on
  TCP), shm, memfd (unix:// only) or inline (none: every attachment must come inline).

  Each peer is answered in the header form of its HELLO, Cap'n Proto or JSON, whatever
  --json-header says; the flag is accepted for symmetry with the clients.

  Ctrl-C or SIGTERM stops it cleanly: no new connections, open sessions closed, exit 0.

Examples:
  xcp serve --listen tcp://127.0.0.1:7070
  xcp serve --listen tcp://127.0.0.1:0            # any free port; read it from stdout
  xcp serve --listen unix:///tmp/xcp.sock
  xcp serve --listen tcp://127.0.0.1:7070 --attach inline   # attachments inline only
  xcp serve --listen tcp://0.0.0.0:7070 --max-frame-bytes 4MiB -v
  xcp serve --listen tcp://127.0.0.1:7070 --accepts text@1,embedding@2 --registry schemas/";

/// How long open sessions get to close when the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The budget of the "connection open" and "connection closed" lines: a flood of connections
/// must not become a flood of lines (a handful of connections still log each one).
static CONNECTION_LINES: LogBudget = LogBudget::new("connections opened and closed", 10, 50);

/// Arguments of `xcp serve`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ServeArgs {
    /// Where to listen: tcp://HOST:PORT (port 0: any free port), unix:///path/to/socket, or
    /// tls://HOST:PORT and quic://HOST:PORT (with --cert, --key and --ca).
    #[arg(long, short = 'l', value_name = "URL")]
    pub listen: String,

    /// Which attachment handles to offer: auto (memfd and shm on a Unix socket, shm on TCP),
    /// shm, memfd (unix:// only) or inline (none).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// For tests: keep each blob's bytes (and so the sender's segment) this many milliseconds
    /// before answering.
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub hold_ms: u64,

    /// Kinds accepted and schemas held (SPEC §8).
    #[command(flatten)]
    pub schema: crate::schema::ServeSchemaArgs,

    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Runs the server until Ctrl-C or SIGTERM; returns the exit code.
pub async fn run(args: ServeArgs) -> u8 {
    // Install the signal handlers before announcing the address, so a signal sent by whoever
    // read the first line is never missed.
    let mut shutdown = match Shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return EXIT_USAGE;
        }
    };

    let mut config = args.conn.session_config(Duration::from_secs(30));
    config.attach = match args.attach.config(&args.listen) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("error: {msg}");
            return EXIT_USAGE;
        }
    };
    if let Err(msg) = args.schema.apply(&mut config.conn) {
        eprintln!("error: {msg}");
        return EXIT_USAGE;
    }
    let hold = Duration::from_millis(args.hold_ms);
    let server = match Server::bind(&args.listen, config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return EXIT_USAGE;
        }
    };
    let url = server.local_url();
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "listening on {url}")
            .and_then(|()| out.flush())
            .is_err()
        {
            // Nobody reads stdout any more; the server is still useful, carry on.
            warn!("could not write the address to stdout");
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    let mut next_conn: u64 = 1;
    let stopped_by = loop {
        // Only the shutdown branch can interrupt an accept (which is cancel-safe anyway), and
        // that ends the loop.
        tokio::select! {
            sig = shutdown.recv() => break Ok(sig),
            accepted = server.accept() => match accepted {
                Ok(session) => {
                    sessions.spawn(serve_session(session, next_conn, stop_rx.clone(), hold));
                    next_conn += 1;
                }
                Err(Error::Closed { detail: why, .. }) => break Err(why),
                Err(e) => {
                    // Handshake failures are logged by the library and never returned here;
                    // anything else is a listener-level error: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
        while sessions.try_join_next().is_some() {}
    };
    while sessions.try_join_next().is_some() {}
    let exit = match stopped_by {
        Ok(signal) => {
            info!(
                signal,
                open = sessions.len(),
                "shutting down: no new connections, closing open sessions"
            );
            EXIT_OK
        }
        Err(why) => {
            error!(reason = %why, open = sessions.len(), "cannot accept any more; closing open sessions");
            EXIT_FAILED
        }
    };
    // Dropping the server stops accepting and removes a Unix socket file.
    drop(server);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = sessions.len(),
            "sessions did not close in time; dropping them"
        );
        sessions.abort_all();
    }
    info!("stopped");
    exit
}

/// Echoes every message of one session (and checks blobs) until it closes or the server
/// stops.
async fn serve_session(
    session: Session,
    conn: u64,
    mut stop: watch::Receiver<bool>,
    hold: Duration,
) {
    let peer = session.peer().to_string();
    let mut plog = PeerLog::new();
    // A connection whose open was logged has its close logged too. Nothing is counted as
    // suppressed where info is off anyway.
    let info_on = tracing::enabled!(tracing::Level::INFO);
    let open_logged = info_on.then(|| CONNECTION_LINES.admit(Instant::now()));
    let open_logged = open_logged.flatten().inspect(|&n| {
        CONNECTION_LINES.log_summary(n);
        let n = session.negotiated();
        info!(
            conn,
            %peer,
            codecs = ?n.codecs,
            max_frame_bytes = n.max_frame_bytes,
            header_form = ?n.header_form,
            attach = ?n.attach.iter().map(|s| s.name()).collect::<Vec<_>>(),
            io = session.io().name(),
            "connection open"
        );
    });
    let mut echoed: u64 = 0;
    let reason = loop {
        tokio::select! {
            _ = stop.changed() => {
                let reason = match session.close().await {
                    Ok(()) => "server shutting down".to_string(),
                    Err(e) => format!("server shutting down (close: {e})"),
                };
                break reason;
            }
            received = session.recv() => match received {
                Ok(msg) if is_blob(&msg) => {
                    let msg_id = msg.msg_id();
                    match answer_blob(&session, msg, conn, hold).await {
                        Ok(()) => echoed += 1,
                        Err(Error::Closed { detail: why, .. }) => break why,
                        Err(e) => {
                            if let Some(pass) = plog.admit(Instant::now(), &PEER_FAULTS) {
                                pass.log_summaries(&peer);
                                warn!(conn, msg_id, error = %e, "blob answer failed");
                            }
                        }
                    }
                }
                Ok(msg) => {
                    let Some(answer) = echo_of(&msg) else {
                        debug!(conn, msg_type = ?msg.header.msg_type, msg_id = msg.msg_id(), "not echoed");
                        continue;
                    };
                    match session.reply(&msg, answer).await {
                        Ok(_) => echoed += 1,
                        Err(Error::Closed { detail: why, .. }) => break why,
                        Err(e) => {
                            if let Some(pass) = plog.admit(Instant::now(), &PEER_FAULTS) {
                                pass.log_summaries(&peer);
                                warn!(conn, msg_id = msg.msg_id(), error = %e, "echo failed");
                            }
                        }
                    }
                }
                Err(Error::Closed { detail: why, .. }) => break why,
                Err(e) => break e.to_string(),
            },
        }
    };
    plog.flush(Instant::now(), &PEER_FAULTS, &peer);
    let close_logged = match open_logged {
        Some(_) => true,
        None if !info_on => false,
        None => CONNECTION_LINES
            .admit(Instant::now())
            .inspect(|&n| CONNECTION_LINES.log_summary(n))
            .is_some(),
    };
    if close_logged {
        info!(conn, %peer, %reason, messages = echoed, "connection closed");
    }
}

/// Whether `msg` is a blob to check (`xcp send --random-bytes`) rather than to echo.
fn is_blob(msg: &Incoming) -> bool {
    if msg.header.msg_type != MsgType::DATA {
        return false;
    }
    let blob = |e: &Ether| {
        e.kind == BLOB_KIND && e.payload.get("reply").and_then(|r| r.as_str()) == Some("crc32c")
    };
    match &msg.ether {
        Some(e) => blob(e),
        // Not decoded on arrival (a codec the connection does not decode): not a blob.
        None => false,
    }
}

/// How an attachment's bytes came, from its URI: "shm", "memfd" or "inline".
fn path_of(uri: &str) -> &str {
    match uri.split_once("://") {
        Some((scheme, _)) => scheme,
        None => "inline",
    }
}

/// Answers a blob with the CRC32C of its bytes and how they came; the views are dropped (and
/// the message so ACKed) before the answer goes out.
async fn answer_blob(
    session: &Session,
    mut msg: Incoming,
    conn: u64,
    hold: Duration,
) -> Result<(), Error> {
    let attachment = msg
        .ether
        .as_ref()
        .and_then(|e| e.attachments.iter().find(|a| a.id == BLOB_ATTACHMENT))
        .cloned();
    let mut reply = Ether::new(BLOB_REPLY_KIND, serde_json::Map::new());
    let found = attachment.and_then(|a| Some((a.uri, msg.attachment_bytes(BLOB_ATTACHMENT)?)));
    match found {
        Some((uri, bytes)) => {
            let path = path_of(&uri).to_string();
            let len = bytes.len();
            // 64 MiB take tens of milliseconds: off the runtime's workers.
            let crc = tokio::task::spawn_blocking(move || xcp::wire::frame::crc32c(&bytes))
                .await
                .map_err(|e| Error::invalid(format!("checksum task failed: {e}")))?;
            if msg.faulted() {
                // The sender shrank its segment while we read it: what we summed is partly
                // zeros. No answer from us: dropping the views makes the session NACK the
                // message ERR_ATTACHMENT ("segment shrank while mapped", SPEC §7).
                debug!(
                    conn,
                    msg_id = msg.msg_id(),
                    "blob's segment shrank while mapped"
                );
                msg.views.clear();
                return Ok(());
            }
            debug!(conn, msg_id = msg.msg_id(), len, %path, crc, "blob checked");
            if !hold.is_zero() {
                info!(
                    conn,
                    msg_id = msg.msg_id(),
                    hold_ms = hold.as_millis() as u64,
                    "holding the blob before answering"
                );
                tokio::time::sleep(hold).await;
            }
            reply.payload.insert("bytes".into(), len.into());
            reply.payload.insert("crc32c".into(), crc.into());
            reply.payload.insert("path".into(), path.into());
        }
        None => {
            reply.payload.insert(
                "error".into(),
                format!("the blob has no attachment {BLOB_ATTACHMENT:?} with bytes").into(),
            );
        }
    }
    // Done with the sender's segment: dropping the views ACKs the message.
    msg.views.clear();
    let out = Outgoing::ether(&reply, CodecId::JSON)?;
    session.reply(&msg, out).await.map(|_| ())
}

/// The answer to `msg`: the same type, codec, body, channel, schema key and tags, in reply to
/// it. `None` for what is not echoed (CLARIFY_REQ/RES).
fn echo_of(msg: &Incoming) -> Option<Outgoing> {
    let h = &msg.header;
    if h.msg_type < MsgType::DATA {
        return None;
    }
    let mut out = Outgoing::data(h.body_codec, msg.body.clone())
        .on_channel(h.channel_id)
        .reply_to(h.msg_id);
    out.msg_type = h.msg_type;
    out.schema_key = h.schema_key;
    out.tags = h.tags.clone();
    Some(out)
}

/// Ctrl-C and SIGTERM, installed up front.
struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Shutdown {})
    }

    /// Waits for the next signal; returns its name.
    #[cfg(unix)]
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
