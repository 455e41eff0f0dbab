//! Unix-domain stream sockets: path parsing, connect, bind (with stale-file cleanup), socket
//! buffer sizes.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};

use super::{SUPPORTED, UNIX_SOCKET_BUFFER};
use crate::error::{Error, Result};

/// Checks the path of a `unix://` URL: it must be absolute (`unix:///abs/path`).
pub(super) fn parse_path(url: &str, rest: &str) -> Result<PathBuf> {
    if !rest.starts_with('/') || rest.len() < 2 {
        return Err(Error::invalid(format!(
            "URL {url:?}: a unix URL needs an absolute path, as in unix:///run/xcp.sock; {SUPPORTED}"
        )));
    }
    if rest.contains('\0') {
        return Err(Error::invalid(format!(
            "URL {url:?}: the path contains a NUL byte"
        )));
    }
    Ok(PathBuf::from(rest))
}

/// Connects and applies [`configure`].
pub(super) async fn connect(path: &Path) -> Result<UnixStream> {
    let s = UnixStream::connect(path).await.map_err(|e| {
        Error::Io(io::Error::new(
            e.kind(),
            format!("connect unix://{}: {e}", path.display()),
        ))
    })?;
    configure(&s);
    Ok(s)
}

/// Sets 4 MiB `SO_SNDBUF` / `SO_RCVBUF` (about 3× the loopback throughput of the defaults; see
/// ARCHITECTURE.md). The kernel may cap the values (`net.core.wmem_max`); failures are logged,
/// not fatal.
pub(super) fn configure(s: &UnixStream) {
    let sock = socket2::SockRef::from(s);
    if let Err(e) = sock.set_send_buffer_size(UNIX_SOCKET_BUFFER) {
        tracing::debug!("unix socket: SO_SNDBUF {UNIX_SOCKET_BUFFER}: {e}");
    }
    if let Err(e) = sock.set_recv_buffer_size(UNIX_SOCKET_BUFFER) {
        tracing::debug!("unix socket: SO_RCVBUF {UNIX_SOCKET_BUFFER}: {e}");
    }
}

/// A description of the peer for logs.
pub(super) fn peer_label(s: &UnixStream) -> String {
    match s.peer_addr() {
        Ok(a) => match a.as_pathname() {
            Some(p) => format!("unix://{}", p.display()),
            None => "unix://(unnamed)".to_string(),
        },
        Err(_) => "unix://?".to_string(),
    }
}

/// The socket file of a bound Unix listener. It is removed once, by [`SocketFile::remove`] or
/// when the last reference is dropped.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    removed: AtomicBool,
}

impl SocketFile {
    /// The path of the socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file now (once; later calls do nothing).
    pub fn remove(&self) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!("remove {}: {e}", self.path.display());
                }
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds and listens on `path` with a [`LISTEN_BACKLOG`](super::LISTEN_BACKLOG)-deep accept
/// queue (tokio's `UnixListener::bind` asks for 128).
fn listen_on(path: &Path) -> io::Result<UnixListener> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(super::LISTEN_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(
        socket,
    )))
}

/// Binds `path`, first removing a stale socket file that nobody listens on.
pub(super) fn bind(path: &Path) -> Result<(UnixListener, Arc<SocketFile>)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::Io(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "bind unix://{}: a server is listening there",
                            path.display()
                        ),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!("removing stale socket file {}", path.display());
                    std::fs::remove_file(path)?;
                }
                Err(e) => {
                    return Err(Error::Io(io::Error::new(
                        e.kind(),
                        format!(
                            "bind unix://{}: probing the existing socket: {e}",
                            path.display()
                        ),
                    )))
                }
            }
        }
        Ok(_) => {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "bind unix://{}: the path exists and is not a socket",
                    path.display()
                ),
            )))
        }
        Err(_) => {}
    }
    let l = listen_on(path).map_err(|e| {
        Error::Io(io::Error::new(
            e.kind(),
            format!("bind unix://{}: {e}", path.display()),
        ))
    })?;
    let file = Arc::new(SocketFile {
        path: path.to_path_buf(),
        removed: AtomicBool::new(false),
    });
    Ok((l, file))
}

/// One `recvmsg` into `buf`, collecting `SCM_RIGHTS` descriptors (close-on-exec) into `fds`.
pub(super) fn recv_with_fds(
    s: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::mem::MaybeUninit;
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(super::MAX_FDS_PER_READ))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        s,
        &mut iov,
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )
    .map_err(io::Error::from)?;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Ok(msg.bytes)
}

/// One `sendmsg` of `slices` with `fds` attached.
pub(super) fn send_with_fds(
    s: &UnixStream,
    slices: &[io::IoSlice<'_>],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    rustix::net::sendmsg(
        s,
        slices,
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )
    .map_err(io::Error::from)
}
