//! `xcp serve`: an echo server.

use std::io::Write as _;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use xcp::conn::{Incoming, Outgoing};
use xcp::wire::MsgType;
use xcp::{Error, Server, Session};

use crate::{ConnArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
What it does:
  The first line on stdout is exactly `listening on URL`, with the address really bound (so
  port 0 picks a free port and the line tells which), flushed at once: scripts read it to
  find the server. Every DATA message (msgType 0x0100 and the layered types above it) is
  answered with a message of the same type, codec, body, channel, schema key and tags, with
  inReplyTo set to its msgId. PING is answered with PONG by the library itself. One info line
  is logged on stderr when a connection opens (peer, negotiated codecs, max_frame_bytes,
  header form) and one when it closes (reason, messages echoed).

  Each peer is answered in the header form of its HELLO, Cap'n Proto or JSON, whatever
  --json-header says; the flag is accepted for symmetry with the clients.

  Ctrl-C or SIGTERM stops it cleanly: no new connections, open sessions closed, exit 0.

Examples:
  xcp serve --listen tcp://127.0.0.1:7070
  xcp serve --listen tcp://127.0.0.1:0            # any free port; read it from stdout
  xcp serve --listen unix:///tmp/xcp.sock
  xcp serve --listen tcp://0.0.0.0:7070 --max-frame-bytes 4MiB -v";

/// How long open sessions get to close when the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `xcp serve`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ServeArgs {
    /// Where to listen: tcp://HOST:PORT (port 0: any free port) or unix:///path/to/socket.
    #[arg(long, short = 'l', value_name = "URL")]
    pub listen: String,

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

    let config = args.conn.session_config(Duration::from_secs(30));
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
                    sessions.spawn(serve_session(session, next_conn, stop_rx.clone()));
                    next_conn += 1;
                }
                Err(Error::Closed(why)) => break Err(why),
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

/// Echoes every message of one session until it closes or the server stops.
async fn serve_session(session: Session, conn: u64, mut stop: watch::Receiver<bool>) {
    let peer = session.peer().to_string();
    {
        let n = session.negotiated();
        info!(
            conn,
            %peer,
            codecs = ?n.codecs,
            max_frame_bytes = n.max_frame_bytes,
            header_form = ?n.header_form,
            "connection open"
        );
    }
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
                Ok(msg) => {
                    let Some(answer) = echo_of(&msg) else {
                        debug!(conn, msg_type = ?msg.header.msg_type, msg_id = msg.msg_id(), "not echoed");
                        continue;
                    };
                    match session.reply(&msg, answer).await {
                        Ok(_) => echoed += 1,
                        Err(Error::Closed(why)) => break why,
                        Err(e) => warn!(conn, msg_id = msg.msg_id(), error = %e, "echo failed"),
                    }
                }
                Err(Error::Closed(why)) => break why,
                Err(e) => break e.to_string(),
            },
        }
    };
    info!(conn, %peer, %reason, messages = echoed, "connection closed");
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
