//! Who is at the other end of a local socket: the user id of the peer process.
//!
//! Handles by name (`shm://`) are only safe between processes of one user: a peer of another
//! user could otherwise name shared-memory objects of ours (our own outgoing segments, or
//! those of another process of ours) and have us map them as if they were its message. The
//! receiver therefore maps an `shm://` object only when the object's owner is the peer's user.
//!
//! - Unix sockets: `SO_PEERCRED`.
//! - TCP: the peer's socket in this network namespace's `/proc/net/tcp` / `tcp6` table (the
//!   entry whose local address is the peer's and whose remote address is ours), whose `uid`
//!   column is its owner. Not found (another namespace, another host) means unknown.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// The user id of the process at the other end of the connected socket `fd`, where it can be
/// known (see the module docs).
pub fn peer_uid(fd: impl AsFd, unix: bool) -> Option<u32> {
    if unix {
        return rustix::net::sockopt::socket_peercred(&fd)
            .ok()
            .map(|c| c.uid.as_raw());
    }
    let local = to_std(rustix::net::getsockname(&fd).ok()?)?;
    let peer = to_std(rustix::net::getpeername(&fd).ok()??)?;
    let table = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    tcp_owner(&text, peer, local)
}

fn to_std(a: rustix::net::SocketAddrAny) -> Option<SocketAddr> {
    SocketAddr::try_from(a).ok()
}

/// The uid of the socket whose local address is `sock` and remote address is `remote`, in
/// the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn tcp_owner(table: &str, sock: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let want_local = proc_addr(sock);
    let want_remote = proc_addr(remote);
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        if f[1].eq_ignore_ascii_case(&want_local) && f[2].eq_ignore_ascii_case(&want_remote) {
            return f[7].parse().ok();
        }
    }
    None
}

/// An address as `/proc/net/tcp*` writes it: the address as the 32-bit words of memory
/// printed as host-order numbers, then the port in hex.
fn proc_addr(a: SocketAddr) -> String {
    let words: Vec<u32> = match a.ip() {
        IpAddr::V4(v4) => vec![u32::from_ne_bytes(v4.octets())],
        IpAddr::V6(v6) => v6
            .octets()
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut s: String = words.iter().map(|w| format!("{w:08X}")).collect();
    s.push_str(&format!(":{:04X}", a.port()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        // 127.0.0.1:8080 as the kernel prints it on a little-endian machine.
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(proc_addr(a), "0100007F:1F90");
        }
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0\n";
        let b: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(tcp_owner(table, a, b), Some(1000));
            assert_eq!(tcp_owner(table, b, a), None);
        }
    }

    #[test]
    fn loopback_peers_are_this_user() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = rustix::process::getuid().as_raw();
        assert_eq!(peer_uid(&c, false), Some(me));
        assert_eq!(peer_uid(&s, false), Some(me));
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a, true), Some(me));
        drop(b);
    }
}
