//! TLS 1.3 with mutual authentication (`tls://host:port`), and the certificate material that
//! QUIC shares with it.
//!
//! [`TlsConfig`] loads PEM files once: this side's certificate chain and private key, and the
//! CA that every peer's certificate must chain to. Both ends authenticate: a server requires a
//! client certificate signed by its CA, a client checks the server's chain and that the
//! certificate is valid for the name it connects to (the URL's host, or
//! [`TlsConfig::with_server_name`]). Only TLS 1.3 is offered, with the `ring` provider, and
//! the ALPN protocol [`ALPN`].
//!
//! Every problem with the files is an [`Error::Tls`] naming the file: missing, unreadable, no
//! PEM block, an expired or not yet valid certificate, a key that does not belong to the
//! certificate. A refused handshake is one too, explained in words (the peer sent no
//! certificate, a certificate from another CA, an expired one, the peer does not speak TLS).
//!
//! A server handshakes in a task per connection, bounded in time ([`HANDSHAKE_TIMEOUT`]) and
//! in number ([`MAX_PENDING_HANDSHAKES`]), so a silent or hostile client never holds up the
//! others; each refusal is one log line, and the listener keeps serving. A plaintext XCP
//! client that reaches a TLS port is answered with a NACK that says so, in XCP, so that it
//! understands the refusal too.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::error::{CloseReason, Error, Result, TlsFailure, TlsIo};

/// The rustls version these types come from, for [`TlsConfig::from_rustls`].
pub use rustls;

/// The ALPN protocol id both ends require, on TLS and on QUIC.
pub const ALPN: &[u8] = b"xcp/0.2";

/// How long a server waits for one client's TLS (or QUIC) handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most handshakes a server runs at once; further connections wait in the kernel's
/// accept queue.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Certificate material for `tls://` and `quic://`: this side's certificate and key, and the
/// CA its peers' certificates must chain to. Cheap to clone.
///
/// ```no_run
/// # fn main() -> xcp::Result<()> {
/// use xcp::transport::TlsConfig;
/// use xcp::SessionConfig;
/// let tls = TlsConfig::from_files("dev/client.pem", "dev/client.key", "dev/ca.pem")?;
/// let config = SessionConfig::default().with_tls(tls);
/// # drop(config); Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<Material>,
}

struct Material {
    client: Arc<rustls::ClientConfig>,
    server: Option<Arc<rustls::ServerConfig>>,
    server_name: Option<String>,
    describe: String,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.inner.describe)
            .field("server_name", &self.inner.server_name)
            .finish()
    }
}

impl TlsConfig {
    /// Loads this side's certificate chain (`cert`, PEM, leaf first), its private key (`key`,
    /// PEM: PKCS#8, PKCS#1 or SEC1) and the CA (`ca`, PEM, one or more certificates) that
    /// peers' certificates must chain to. The same material serves as a client and as a
    /// server. Fails with [`Error::Tls`] naming the file when one is missing or unreadable,
    /// holds no PEM block, is expired or not yet valid, or when the key does not belong to
    /// the certificate.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<TlsConfig> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let roots = load_roots(ca)?;
        let chain = load_certs(cert, "certificate")?;
        let key_der = load_key(key)?;
        let mismatch = |e: rustls::Error| match e {
            rustls::Error::InconsistentKeys(_) => Error::tls(
                TlsFailure::KeyMismatch,
                format!(
                    "the private key {} does not belong to the certificate {} (give the key made \
                 with that certificate)",
                    key.display(),
                    cert.display()
                ),
            ),
            other => Error::tls(
                TlsFailure::File,
                format!(
                    "certificate {} with key {}: {other}",
                    cert.display(),
                    key.display()
                ),
            ),
        };
        let client = client_builder()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key_der.clone_key())
            .map_err(mismatch)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| Error::tls(TlsFailure::File, format!("CA {}: {e}", ca.display())))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::tls(TlsFailure::Config, format!("TLS 1.3 with ring: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_der)
            .map_err(mismatch)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        Ok(TlsConfig {
            inner: Arc::new(Material {
                client: Arc::new(with_alpn(client)),
                server: Some(Arc::new(server)),
                server_name: None,
                describe: format!(
                    "cert {}, key {}, ca {}",
                    cert.display(),
                    key.display(),
                    ca.display()
                ),
            }),
        })
    }

    /// A client that trusts `ca` but has no certificate of its own. Servers require one
    /// (mutual authentication), so they refuse it; it exists to check exactly that, and to
    /// tell a CA problem from a client-certificate problem. It cannot serve.
    pub fn trust_only(ca: impl AsRef<Path>) -> Result<TlsConfig> {
        let ca = ca.as_ref();
        let roots = load_roots(ca)?;
        let client = client_builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConfig {
            inner: Arc::new(Material {
                client: Arc::new(with_alpn(client)),
                server: None,
                server_name: None,
                describe: format!("no certificate, ca {}", ca.display()),
            }),
        })
    }

    /// Wraps rustls configurations built by the caller (a custom verifier, a key held
    /// elsewhere). The ALPN protocol [`ALPN`] is set where a configuration has none; for
    /// `quic://` both must allow TLS 1.3. No file checks happen here: what the configurations
    /// hold is what is presented.
    pub fn from_rustls(
        client: Arc<rustls::ClientConfig>,
        server: Option<Arc<rustls::ServerConfig>>,
    ) -> TlsConfig {
        let mut client = client;
        if client.alpn_protocols.is_empty() {
            Arc::make_mut(&mut client).alpn_protocols = vec![ALPN.to_vec()];
        }
        let server = server.map(|mut s| {
            if s.alpn_protocols.is_empty() {
                Arc::make_mut(&mut s).alpn_protocols = vec![ALPN.to_vec()];
            }
            s
        });
        TlsConfig {
            inner: Arc::new(Material {
                client,
                server,
                server_name: None,
                describe: "rustls configurations given by the application".into(),
            }),
        }
    }

    /// Checks the server's certificate against `name` instead of the URL's host (a DNS name
    /// or an IP address), for a server reached by an address its certificate does not list.
    pub fn with_server_name(self, name: impl Into<String>) -> TlsConfig {
        let m = &self.inner;
        TlsConfig {
            inner: Arc::new(Material {
                client: m.client.clone(),
                server: m.server.clone(),
                server_name: Some(name.into()),
                describe: m.describe.clone(),
            }),
        }
    }

    /// The files this was loaded from, for logs.
    pub fn describe(&self) -> &str {
        &self.inner.describe
    }

    /// The rustls client configuration (this side's certificate, the CA, ALPN [`ALPN`]), to
    /// reuse the same material for another protocol.
    pub fn rustls_client(&self) -> Arc<rustls::ClientConfig> {
        self.inner.client.clone()
    }

    /// The rustls server configuration (client certificates required), when there is one.
    pub fn rustls_server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.inner.server.clone()
    }

    pub(crate) fn client(&self) -> Arc<rustls::ClientConfig> {
        self.inner.client.clone()
    }

    pub(crate) fn server(&self, url: &str) -> Result<Arc<rustls::ServerConfig>> {
        self.inner.server.clone().ok_or_else(|| {
            Error::tls(
                TlsFailure::Config,
                format!(
                    "{url}: a server needs its own certificate and key (--cert, --key) besides \
                 the CA (--ca)"
                ),
            )
        })
    }

    /// The name the server's certificate must be valid for: the override, else `host`.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>> {
        let name = self.inner.server_name.as_deref().unwrap_or(host);
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        ServerName::try_from(bare.to_string())
            .map_err(|e| Error::tls(TlsFailure::Config, format!("server name {name:?}: {e}")))
    }
}

/// The configuration a `tls://` or `quic://` URL needs, or a clear error saying how to give it.
pub(crate) fn require(tls: Option<&TlsConfig>, url: &str) -> Result<TlsConfig> {
    tls.cloned().ok_or_else(|| {
        Error::tls(
            TlsFailure::Config,
            format!(
            "{url} needs certificates: pass --cert, --key and --ca (TransportConfig::tls in the \
             library); `xcp cert dev DIR` writes a development set"
        ),
        )
    })
}

/// The ring provider, AES-128-GCM first: with AES instructions it is the fastest TLS 1.3 suite
/// (fewer rounds than AES-256), which matters for bulk tensors; the others stay available.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The socket under TLS: reads go through a buffer of [`READ_BUFFER`] bytes, because rustls
/// asks for at most 4 KiB per read, which would cost a system call per 4 KiB of a tensor.
type Io = tokio::io::BufReader<TcpStream>;

/// The read buffer under TLS (see [`Io`]).
const READ_BUFFER: usize = 256 << 10;

fn buffered(tcp: TcpStream) -> Io {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

fn client_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls(TlsFailure::Config, format!("TLS 1.3 with ring: {e}")))
}

fn with_alpn(mut c: rustls::ClientConfig) -> rustls::ClientConfig {
    c.alpn_protocols = vec![ALPN.to_vec()];
    c
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            " (`xcp cert dev DIR` writes a development set)"
        } else {
            ""
        };
        Error::tls(
            TlsFailure::File,
            format!("cannot read {what} {}: {e}{hint}", path.display()),
        )
    })
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::tls(
                TlsFailure::File,
                format!("{what} {}: bad PEM: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::tls(
            TlsFailure::File,
            format!(
                "{what} {} holds no PEM certificate (a \"-----BEGIN CERTIFICATE-----\" block)",
                path.display()
            ),
        ));
    }
    for c in &certs {
        check_validity(c, path, what)?;
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => Error::tls(
            TlsFailure::File,
            format!(
                "private key {} holds no PEM private key (a \"-----BEGIN PRIVATE KEY-----\" block)",
                path.display()
            ),
        ),
        e => Error::tls(
            TlsFailure::File,
            format!("private key {}: bad PEM: {e}", path.display()),
        ),
    })
}

fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let certs = load_certs(path, "CA")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            Error::tls(
                TlsFailure::File,
                format!("CA {}: not a usable CA: {e}", path.display()),
            )
        })?;
    }
    Ok(Arc::new(roots))
}

/// Refuses a certificate outside its validity period, naming the file and the dates.
fn check_validity(der: &CertificateDer<'_>, path: &Path, what: &str) -> Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
        Error::tls(
            TlsFailure::File,
            format!("{what} {}: not an X.509 certificate: {e}", path.display()),
        )
    })?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > v.not_after {
        return Err(Error::tls(
            TlsFailure::OwnCertificateDated,
            format!(
                "{what} {} expired on {} (valid from {}); make a new one (`xcp cert dev DIR` for \
             development)",
                path.display(),
                v.not_after,
                v.not_before
            ),
        ));
    }
    if now < v.not_before {
        return Err(Error::tls(
            TlsFailure::OwnCertificateDated,
            format!(
                "{what} {} is not valid yet: valid from {} (check the clock)",
                path.display(),
                v.not_before
            ),
        ));
    }
    Ok(())
}

/// Words for a TLS alert the peer sent us.
pub(crate) fn explain_alert(a: rustls::AlertDescription) -> Option<&'static str> {
    use rustls::AlertDescription as A;
    Some(match a {
        A::CertificateRequired => {
            "the peer requires a client certificate and we sent none (pass --cert and --key)"
        }
        A::UnknownCA => {
            "the peer refused our certificate: it is not signed by a CA the peer trusts (its --ca)"
        }
        A::BadCertificate => "the peer refused our certificate (not signed by its CA, or broken)",
        A::CertificateExpired => "the peer refused our certificate: it has expired",
        A::CertificateUnknown | A::UnsupportedCertificate => "the peer refused our certificate",
        A::NoApplicationProtocol => "the peer does not speak XCP over TLS (no common ALPN)",
        A::ProtocolVersion => "the peer does not speak TLS 1.3",
        _ => return None,
    })
}

/// The kind of a TLS alert the peer sent us.
pub(crate) fn failure_of_alert(a: rustls::AlertDescription) -> TlsFailure {
    use rustls::AlertDescription as A;
    match a {
        A::CertificateRequired
        | A::UnknownCA
        | A::BadCertificate
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnsupportedCertificate => TlsFailure::PeerRefusedOurCertificate,
        A::NoApplicationProtocol | A::ProtocolVersion => TlsFailure::PeerNotXcpTls,
        _ => TlsFailure::Handshake,
    }
}

/// The kind of a rustls failure (what [`explain`] puts in words).
pub(crate) fn failure_of(e: &rustls::Error) -> TlsFailure {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::AlertReceived(a) => failure_of_alert(*a),
        rustls::Error::NoCertificatesPresented => TlsFailure::PeerSentNoCertificate,
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => TlsFailure::PeerCertificateDated,
            C::UnknownIssuer | C::BadSignature => TlsFailure::PeerCertificateUntrusted,
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                TlsFailure::PeerCertificateWrongName
            }
            _ => TlsFailure::Handshake,
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::NoApplicationProtocol => {
            TlsFailure::PeerNotXcpTls
        }
        _ => TlsFailure::Handshake,
    }
}

/// Words for a rustls failure, naming who is at fault.
pub(crate) fn explain(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let words = match e {
        rustls::Error::AlertReceived(a) => explain_alert(*a),
        rustls::Error::NoCertificatesPresented => {
            Some("the peer sent no certificate (a client needs --cert and --key)")
        }
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => Some("the peer's certificate has expired"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                Some("the peer's certificate is not valid yet")
            }
            C::UnknownIssuer => Some("the peer's certificate is not signed by our CA (--ca)"),
            C::BadSignature => Some("the peer's certificate has a bad signature (another CA?)"),
            C::NotValidForName | C::NotValidForNameContext { .. } => Some(
                "the server's certificate is not valid for the name we connect to (use a name \
                 it lists, or set the server name)",
            ),
            _ => None,
        },
        rustls::Error::InvalidMessage(_) => {
            Some("the peer does not speak TLS (a plaintext xcp server? connect with tcp:// there)")
        }
        rustls::Error::NoApplicationProtocol => {
            Some("the peer does not speak XCP over TLS (no common ALPN)")
        }
        _ => None,
    };
    match words {
        Some(w) => format!("{w} ({e})"),
        None => e.to_string(),
    }
}

/// An I/O error from tokio-rustls, with the rustls failure inside put in words.
fn explain_io(e: io::Error, peer: &str) -> io::Error {
    let (failure, words) = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => (failure_of(t), explain(t)),
        None => return e,
    };
    TlsIo::error(e.kind(), failure, format!("{peer}: {words}"))
}

/// Checks the `host:port` of a `tls://` URL (the same rules as `tcp://`).
pub(super) fn parse_authority(url: &str, rest: &str) -> Result<String> {
    super::tcp::parse_authority(url, rest)
}

/// The host part of `host:port` (brackets kept for IPv6; [`TlsConfig::server_name`] strips
/// them).
pub(crate) fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// Connects TCP, then runs the client handshake.
pub(super) async fn connect(addr: &str, tls: &TlsConfig) -> Result<TlsStream> {
    let url = format!("tls://{addr}");
    let name = tls.server_name(host_of(addr))?;
    let tcp = super::tcp::connect(addr).await?;
    let peer = match tcp.peer_addr() {
        Ok(a) => format!("tls://{a}"),
        Err(_) => url.clone(),
    };
    let connector = tokio_rustls::TlsConnector::from(tls.client());
    match connector.connect(name, buffered(tcp)).await {
        Ok(s) => Ok(TlsStream {
            inner: Box::new(tokio_rustls::TlsStream::Client(s)),
            peer,
        }),
        Err(e) => Err(io_to_tls(e, &url)),
    }
}

fn io_to_tls(e: io::Error, url: &str) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => Error::tls(
            failure_of(t),
            format!("{url}: handshake refused: {}", explain(t)),
        ),
        None if e.kind() == io::ErrorKind::UnexpectedEof => Error::tls(
            TlsFailure::Handshake,
            format!(
                "{url}: the peer closed the connection during the TLS handshake (a plaintext \
             server, or it refused us: see its log)"
            ),
        ),
        None => Error::tls(TlsFailure::Handshake, format!("{url}: TLS handshake: {e}")),
    }
}

/// A TLS connection, client or server side.
pub struct TlsStream {
    inner: Box<tokio_rustls::TlsStream<Io>>,
    peer: String,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .finish()
    }
}

impl TlsStream {
    /// `tls://ip:port` of the peer.
    pub fn peer_label(&self) -> String {
        self.peer.clone()
    }

    /// Owned halves; they share the TLS state behind a lock that only they take.
    pub fn into_split(self) -> (TlsRead, TlsWrite) {
        let (r, w) = tokio::io::split(*self.inner);
        (
            TlsRead {
                inner: r,
                peer: self.peer.clone(),
            },
            TlsWrite {
                inner: w,
                peer: self.peer,
            },
        )
    }
}

/// The read half of a [`TlsStream`].
pub struct TlsRead {
    inner: tokio::io::ReadHalf<tokio_rustls::TlsStream<Io>>,
    peer: String,
}

/// The write half of a [`TlsStream`].
pub struct TlsWrite {
    inner: tokio::io::WriteHalf<tokio_rustls::TlsStream<Io>>,
    peer: String,
}

impl fmt::Debug for TlsRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsRead({})", self.peer)
    }
}

impl fmt::Debug for TlsWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsWrite({})", self.peer)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_io(e, &this.peer))),
            other => other,
        }
    }
}

impl AsyncRead for TlsRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(explain_io(e, &this.peer))),
            other => other,
        }
    }
}

macro_rules! tls_write {
    ($ty:ty, $field:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let this = self.get_mut();
                match Pin::new(&mut this.$field).poll_write(cx, buf) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(explain_io(e, &this.peer))),
                    other => other,
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let this = self.get_mut();
                match Pin::new(&mut this.$field).poll_write_vectored(cx, bufs) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(explain_io(e, &this.peer))),
                    other => other,
                }
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                Pin::new(&mut this.$field).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                Pin::new(&mut this.$field).poll_shutdown(cx)
            }
        }
    };
}

tls_write!(TlsStream, inner);
tls_write!(TlsWrite, inner);

/// A TLS listener: TCP accept in a task, one handshake task per connection, finished
/// connections handed out by [`TlsListener::accept`].
pub struct TlsListener {
    local: String,
    rx: Mutex<mpsc::Receiver<TlsStream>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsListener({})", self.local)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    /// Binds `addr` and starts accepting and handshaking.
    pub(super) async fn bind(addr: &str, tls: &TlsConfig) -> Result<TlsListener> {
        let url = format!("tls://{addr}");
        let config = tls.server(&url)?;
        let listener = super::tcp::bind(addr).await.map_err(|e| match e {
            Error::Io(io) => Error::Io(io::Error::new(
                io.kind(),
                io.to_string().replace("tcp://", "tls://"),
            )),
            other => other,
        })?;
        let local = match listener.local_addr() {
            Ok(a) => format!("tls://{a}"),
            Err(_) => url,
        };
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, config, tx, local.clone()));
        Ok(TlsListener {
            local,
            rx: Mutex::new(rx),
            task,
        })
    }

    /// The URL really bound.
    pub fn local_url(&self) -> String {
        self.local.clone()
    }

    /// The next connection whose TLS handshake succeeded, and its label.
    pub async fn accept(&self) -> Result<(TlsStream, String)> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(s) => {
                let label = s.peer_label();
                Ok((s, label))
            }
            None => Err(Error::closed(
                CloseReason::ServerStopped,
                format!("{} stopped accepting", self.local),
            )),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<TlsStream>,
    local: String,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    crate::session::ratelog::peer_log_global!(WARN, "accept on {local}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let peer = format!("tls://{addr}");
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(acceptor, tcp, &peer)).await;
            drop(permit);
            match r {
                Ok(Some(s)) => {
                    let _ = tx.send(s).await;
                }
                Ok(None) => {}
                Err(_) => crate::session::ratelog::peer_log_global!(
                    INFO,
                    "{peer}: TLS handshake refused: none within {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        });
    }
}

/// A TLS handshake record starts with content type 22; an XCP frame starts with this.
const XCP_FIRST_BYTE: u8 = crate::wire::MAGIC_BYTES[0];

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: &str,
) -> Option<TlsStream> {
    let mut first = [0u8; 1];
    if let Ok(1) = tcp.peek(&mut first).await {
        if first[0] == XCP_FIRST_BYTE {
            crate::session::ratelog::peer_log_global!(
                INFO,
                "{peer}: refused: a plaintext XCP client on a TLS port"
            );
            refuse_plaintext(tcp).await;
            return None;
        }
    }
    match acceptor.accept(buffered(tcp)).await {
        Ok(s) => Some(TlsStream {
            inner: Box::new(tokio_rustls::TlsStream::Server(s)),
            peer: peer.to_string(),
        }),
        Err(e) => {
            let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(t) => explain(t),
                None => e.to_string(),
            };
            crate::session::ratelog::peer_log_global!(INFO, "{peer}: TLS handshake refused: {why}");
            None
        }
    }
}

/// Answers a plaintext XCP client with NACK `ERR_MALFORMED` saying this port speaks TLS, then
/// closes (bounded in time).
async fn refuse_plaintext(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nack = crate::control::Control::Nack(crate::control::Nack {
        msg_id: 0,
        error_code: crate::error::ErrorCode::ERR_MALFORMED,
        retry_after_ms: 0,
        detail: Some(
            "this port speaks TLS: connect with tls://HOST:PORT and a client certificate \
             (--cert, --key, --ca)"
                .to_string(),
        ),
    });
    let hdr = crate::wire::FrameHeader {
        msg_type: crate::wire::MsgType::NACK,
        body_codec: crate::codec::CodecId::JSON,
        msg_id: 1,
        ..Default::default()
    };
    let frame = nack
        .encode(crate::codec::CodecId::JSON)
        .and_then(|body| {
            crate::wire::frame::encode(
                &hdr,
                crate::wire::HeaderForm::Capnp,
                crate::wire::Flags::NONE,
                body,
            )
        })
        .map(|f| f.to_vec());
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if let Ok(f) = frame {
            tcp.write_all(&f).await?;
        }
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// Where `xcp cert dev` writes each file, relative to its directory.
pub mod dev {
    /// The development CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// The development CA's private key (keep it to make more certificates).
    pub const CA_KEY: &str = "ca.key";
    /// The server certificate.
    pub const SERVER_CERT: &str = "server.pem";
    /// The server's private key.
    pub const SERVER_KEY: &str = "server.key";
    /// The client certificate.
    pub const CLIENT_CERT: &str = "client.pem";
    /// The client's private key.
    pub const CLIENT_KEY: &str = "client.key";
}

/// The paths of a development set written by [`write_dev_set`].
#[derive(Clone, Debug)]
pub struct DevSet {
    /// The CA certificate (give it to both sides as `--ca`).
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// The client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

/// Writes a development CA, a server certificate (valid for `localhost`, `127.0.0.1`, `::1`
/// and each of `names`) and a client certificate into `dir`, valid for `days` days from now.
/// Keys are ECDSA P-256, written with mode 0600. Not for production: the CA key sits beside
/// the certificates.
pub fn write_dev_set(dir: &Path, names: &[String], days: u32) -> Result<DevSet> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let gen =
        |e: rcgen::Error| Error::tls(TlsFailure::Config, format!("generating certificates: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::tls(
            TlsFailure::File,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(i64::from(days.max(1)));

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "xcp development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let leaf = |cn: &str, sans: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(gen)?;
        let mut p = CertificateParams::new(sans).map_err(gen)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![purpose];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = not_before;
        p.not_after = not_after;
        let cert = p.signed_by(&key, &issuer).map_err(gen)?;
        Ok::<_, Error>((cert.pem(), key.serialize_pem()))
    };
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let server = leaf(
        "xcp development server",
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = leaf(
        "xcp development client",
        vec!["xcp-dev-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let set = DevSet {
        ca: dir.join(dev::CA_CERT),
        server: (dir.join(dev::SERVER_CERT), dir.join(dev::SERVER_KEY)),
        client: (dir.join(dev::CLIENT_CERT), dir.join(dev::CLIENT_KEY)),
    };
    write_file(&set.ca, ca_cert.pem().as_bytes(), false)?;
    write_file(
        &dir.join(dev::CA_KEY),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&set.server.0, server.0.as_bytes(), false)?;
    write_file(&set.server.1, server.1.as_bytes(), true)?;
    write_file(&set.client.0, client.0.as_bytes(), false)?;
    write_file(&set.client.1, client.1.as_bytes(), true)?;
    Ok(set)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    opts.mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(|e| {
        Error::tls(
            TlsFailure::File,
            format!("cannot write {}: {e}", path.display()),
        )
    })?;
    f.write_all(bytes).map_err(|e| {
        Error::tls(
            TlsFailure::File,
            format!("cannot write {}: {e}", path.display()),
        )
    })
}
