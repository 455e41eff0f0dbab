//! TCP: URL authority parsing, connect, bind, socket options.

use tokio::net::{TcpListener, TcpStream};

use super::SUPPORTED;
use crate::error::{Error, Result};

/// Checks the `host:port` part of a `tcp://` URL and returns it as given.
pub(super) fn parse_authority(url: &str, rest: &str) -> Result<String> {
    let bad = |what: &str| Error::invalid(format!("URL {url:?}: {what}; {SUPPORTED}"));
    if rest.contains(['/', '?', '#']) {
        return Err(bad("a tcp URL has no path, query or fragment"));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(bad("missing port (tcp://host:port)"));
    };
    if host.is_empty() {
        return Err(bad("missing host (tcp://host:port)"));
    }
    let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    match inner {
        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_err() => {
            return Err(bad("the bracketed host is not an IPv6 address"));
        }
        None if host.contains(':') => {
            return Err(bad(
                "an IPv6 host must be in brackets, as in tcp://[::1]:7000",
            ));
        }
        _ => {}
    }
    if port.parse::<u16>().is_err() {
        return Err(bad(&format!("port {port:?} is not a number in 0..=65535")));
    }
    Ok(rest.to_string())
}

/// Connects and applies [`configure`].
pub(super) async fn connect(addr: &str) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).await.map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("connect tcp://{addr}: {e}"),
        ))
    })?;
    configure(&s)?;
    Ok(s)
}

/// Binds a listener with a [`LISTEN_BACKLOG`](super::LISTEN_BACKLOG)-deep accept queue
/// (tokio's `TcpListener::bind` asks for 128). Each address `addr` resolves to is tried in
/// turn, as `TcpListener::bind` does.
pub(super) async fn bind(addr: &str) -> Result<TcpListener> {
    let err = |e: std::io::Error| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("bind tcp://{addr}: {e}"),
        ))
    };
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await.map_err(err)? {
        match listen_on(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    })))
}

fn listen_on(a: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if a.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do for listeners: a restarted server can bind while old connections
    // of the previous one sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(a)?;
    socket.listen(super::LISTEN_BACKLOG)
}

/// `TCP_NODELAY` on: frames are written whole, often in one vectored write, so Nagle only adds
/// latency. Buffer sizes stay with the kernel's autotuning.
pub(super) fn configure(s: &TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    Ok(())
}
