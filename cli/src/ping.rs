//! `xcp ping`: round-trip times with PING/PONG.

use std::time::Duration;

use clap::Args;

use xcp::{Error, Session};

use crate::{ConnArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
What it does:
  Connects (HELLO/CAPS handshake), then sends COUNT PINGs one after the other, INTERVAL
  milliseconds apart, and prints one line per PONG:
    pong from tcp://127.0.0.1:7070: seq=1 time=0.123 ms
  then a summary: PINGs sent, PONGs received, loss, and min/avg/max/p50 round-trip time. A PING
  whose PONG does not come back within --timeout-ms counts as lost. Ctrl-C stops early and
  still prints the summary.

Exit code: 0 when every PONG came back, 1 when one was lost, 2 when the connection could
not be made.

Examples:
  xcp ping tcp://127.0.0.1:7070
  xcp ping tcp://127.0.0.1:7070 --count 100 --interval 0
  xcp ping unix:///tmp/xcp.sock --json-header";

/// Arguments of `xcp ping`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct PingArgs {
    /// The server: tcp://HOST:PORT, unix:///path/to/socket, tls://HOST:PORT or
    /// quic://HOST:PORT (the last two with --cert, --key and --ca).
    #[arg(value_name = "URL")]
    pub url: String,

    /// How many PINGs to send.
    #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,

    /// Milliseconds to wait between a PONG and the next PING (0: back to back).
    #[arg(long, short = 'i', value_name = "MS", default_value_t = 1000)]
    pub interval: u64,

    /// Milliseconds to wait for each PONG (and for the connection) before giving up.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Pings until COUNT PINGs were sent; returns the exit code.
pub async fn run(args: PingArgs) -> u8 {
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
    {
        let n = session.negotiated();
        println!(
            "PING {} ({:?} header, codecs {:?}, max_frame_bytes {}, {})",
            args.url,
            n.header_form,
            n.codecs,
            n.max_frame_bytes,
            session.io()
        );
    }

    let mut sent: u32 = 0;
    let mut rtts: Vec<Duration> = Vec::with_capacity(args.count as usize);
    // Ctrl-C ends the run early; if its handler cannot be installed, it simply never fires.
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupt);
    'pings: for seq in 1..=args.count {
        sent += 1;
        let outcome = tokio::select! {
            _ = &mut interrupt => { sent -= 1; break 'pings; }
            r = session.ping() => r,
        };
        match outcome {
            Ok(rtt) => {
                println!(
                    "pong from {}: seq={seq} time={:.3} ms",
                    args.url,
                    millis(rtt)
                );
                rtts.push(rtt);
            }
            Err(Error::Closed { detail: why, .. }) => {
                eprintln!("error: connection to {} closed: {why}", args.url);
                break;
            }
            Err(e) => eprintln!("no pong from {}: seq={seq}: {e}", args.url),
        }
        if seq < args.count && args.interval > 0 {
            tokio::select! {
                _ = &mut interrupt => break 'pings,
                () = tokio::time::sleep(Duration::from_millis(args.interval)) => {}
            }
        }
    }
    let _ = session.close().await;

    let received = rtts.len() as u32;
    println!("--- {} ping statistics ---", args.url);
    println!("{}", summary(sent, &mut rtts));
    if received == args.count {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `N sent, M received, X% loss` and, when any PONG came, the round-trip statistics.
fn summary(sent: u32, rtts: &mut [Duration]) -> String {
    let received = rtts.len() as u32;
    let loss = if sent == 0 {
        0.0
    } else {
        f64::from(sent - received.min(sent)) * 100.0 / f64::from(sent)
    };
    let mut s = format!("{sent} sent, {received} received, {loss:.1}% loss");
    if !rtts.is_empty() {
        rtts.sort_unstable();
        let min = rtts[0];
        let max = rtts[rtts.len() - 1];
        let avg = rtts.iter().sum::<Duration>() / received;
        // Nearest-rank median.
        let p50 = rtts[rtts.len().div_ceil(2) - 1];
        s.push_str(&format!(
            "\nrtt min/avg/max/p50 = {:.3}/{:.3}/{:.3}/{:.3} ms",
            millis(min),
            millis(avg),
            millis(max),
            millis(p50)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines() {
        let ms = Duration::from_millis;
        let mut rtts = vec![ms(3), ms(1), ms(2), ms(10)];
        let s = summary(5, &mut rtts);
        assert_eq!(
            s,
            "5 sent, 4 received, 20.0% loss\nrtt min/avg/max/p50 = 1.000/4.000/10.000/2.000 ms"
        );
        assert_eq!(summary(2, &mut []), "2 sent, 0 received, 100.0% loss");
        assert_eq!(summary(0, &mut []), "0 sent, 0 received, 0.0% loss");
    }
}
