//! The conformance suite of the transports (`tests/support/session_suite.rs`) over `tls://`
//! and `quic://`: every case, the adversarial ones included, with mutual authentication on
//! loopback. The raw clients of the adversarial cases speak TLS or QUIC too (their
//! hand-built frames travel inside it), so what the server's connection sees is the same as
//! over TCP.
//!
//! Every session of this binary carries one TLS configuration (made once, `suite_tls`): the
//! client side presents the development client certificate, the server side the server
//! certificate, both signed by one development CA made for the run.

const IO: xcp::transport::IoMode = xcp::transport::IoMode::Epoll;

include!("support/session_suite.rs");

/// The development set, made once: its directory and the configuration with both sides'
/// certificates.
fn dev_set() -> &'static (tempfile::TempDir, xcp::transport::TlsConfig) {
    static SET: std::sync::OnceLock<(tempfile::TempDir, xcp::transport::TlsConfig)> =
        std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = xcp::transport::tls::write_dev_set(dir.path(), &[], 1).expect("dev set");
        let client =
            xcp::transport::tls::TlsConfig::from_files(&set.client.0, &set.client.1, &set.ca)
                .expect("client config");
        let server =
            xcp::transport::tls::TlsConfig::from_files(&set.server.0, &set.server.1, &set.ca)
                .expect("server config");
        let both = xcp::transport::tls::TlsConfig::from_rustls(
            client.rustls_client(),
            server.rustls_server(),
        );
        (dir, both)
    })
}

/// The certificates every session of this binary carries.
fn suite_tls() -> Option<xcp::transport::TlsConfig> {
    Some(dev_set().1.clone())
}

macro_rules! tls_suite {
    ($($name:ident),* $(,)?) => {
        mod tls {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    cases::$name(Addr::across("tls")).await
                }
            )*
        }
    };
}

macro_rules! quic_suite {
    ($($name:ident),* $(,)?) => {
        mod quic {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    cases::$name(Addr::across("quic")).await
                }
            )*
        }
    };
}

for_each_case!(tls_suite);

// Over QUIC every case but four: the QUIC transport maps each whole frame to its channel's
// stream, so a client built on it cannot put a broken frame on the wire at all (`bad_magic`:
// it refuses bytes that are not a frame; `plen_over_limit` and `stall_mid_frame`: a frame
// leaves only once it is whole), and nobody listening on a UDP port is a handshake timeout,
// not a refused connection (`connect_failures`). tests/quic.rs covers QUIC's own bad input.
quic_suite!(
    handshake,
    echo_json_and_protobuf,
    ping,
    concurrent_requests,
    chunked_message,
    many_connections,
    graceful_close,
    request_nack_and_timeout,
    slow_receiver,
    backpressure,
    drop_closes,
    version_too_high,
    higher_minor_accepted,
    reserved_flags,
    garbage_header,
    crc_mismatch,
    codec_not_negotiated,
    undecodable_json,
    data_before_hello,
    message_over_limit,
    slow_handshake_does_not_block,
);
