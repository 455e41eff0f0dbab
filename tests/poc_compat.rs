//! Interop with the JSON compatibility profile (SPEC §2.2 + §4 with JSON bodies), which is what
//! the Python proof of concept speaks: JSON headers, big-endian CRC trailers, and HELLO and the
//! first DATA both with msgId 1.
//!
//! The peer here is written from the SPEC alone, with hand-built frames (serde_json headers,
//! `crc32c` for the trailer): it does not use xcp's wire module, so the two implementations
//! check each other.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use xcp::codec::CodecId;
use xcp::conn::Outgoing;
use xcp::wire::HeaderForm;
use xcp::{Ether, Server, Session, SessionConfig};

const T: Duration = Duration::from_secs(10);

/// One frame as the PoC writes it.
fn poc_frame(msg_type: u16, msg_id: u64, in_reply_to: u64, body: &[u8]) -> Vec<u8> {
    let header = json!({"channelId": 0, "msgType": msg_type, "bodyCodec": 1,
                        "msgId": msg_id, "inReplyTo": in_reply_to});
    let header = serde_json::to_vec(&header).unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&[0x10, 0x7A, 0xA1, 0xA9, 0x02, 0x00]);
    f.extend_from_slice(&(header.len() as u16).to_le_bytes());
    f.extend_from_slice(&header);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(body);
    f.extend_from_slice(&xcp::wire::frame::crc32c(body).to_be_bytes());
    f
}

/// Reads one frame the way the PoC does; insists on a JSON header and a big-endian CRC.
async fn poc_read(s: &mut TcpStream) -> Option<(Value, Vec<u8>)> {
    let mut prefix = [0u8; 8];
    s.read_exact(&mut prefix).await.ok()?;
    assert_eq!(&prefix[..4], &[0x10, 0x7A, 0xA1, 0xA9], "magic");
    assert_eq!(prefix[4], 0x02, "version");
    assert_eq!(prefix[5], 0x00, "flags");
    let hlen = u16::from_le_bytes([prefix[6], prefix[7]]) as usize;
    let mut header = vec![0u8; hlen];
    s.read_exact(&mut header).await.ok()?;
    assert_eq!(header[0], b'{', "the peer answers in the JSON form");
    let header: Value = serde_json::from_slice(&header).expect("JSON header");
    let plen = s.read_u32_le().await.ok()? as usize;
    let mut body = vec![0u8; plen];
    s.read_exact(&mut body).await.ok()?;
    let mut crc = [0u8; 4];
    s.read_exact(&mut crc).await.ok()?;
    assert_eq!(
        u32::from_be_bytes(crc),
        xcp::wire::frame::crc32c(&body),
        "CRC written big-endian in the JSON form"
    );
    Some((header, body))
}

fn json_client_config() -> SessionConfig {
    let mut c = SessionConfig::default();
    c.conn.header_form = HeaderForm::Json;
    c
}

#[tokio::test]
async fn xcp_client_against_poc_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut next_id = 100;
        while let Some((h, body)) = poc_read(&mut s).await {
            let t = h["msgType"].as_u64().unwrap() as u16;
            let id = h["msgId"].as_u64().unwrap();
            seen.push(t);
            next_id += 1;
            let reply = match t {
                0 => poc_frame(
                    1,
                    next_id,
                    id,
                    br#"{"codecs":[1],"max_frame_bytes":1048576}"#,
                ),
                4 => poc_frame(5, next_id, id, &body),
                0x100 => {
                    let mut e: Value = serde_json::from_slice(&body).unwrap();
                    e["payload"]["text"] =
                        json!(format!("echo: {}", e["payload"]["text"].as_str().unwrap()));
                    poc_frame(0x100, next_id, id, &serde_json::to_vec(&e).unwrap())
                }
                _ => continue,
            };
            s.write_all(&reply).await.unwrap();
        }
        seen
    });

    let url = format!("tcp://{addr}");
    let session = timeout(T, Session::connect(&url, json_client_config()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.negotiated().codecs, vec![CodecId::JSON]);
    timeout(T, session.ping()).await.unwrap().unwrap();
    let reply = timeout(
        T,
        session.request(Outgoing::ether(&Ether::text("hi"), CodecId::JSON).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.ether().unwrap().payload["text"], "echo: hi");
    timeout(T, session.close()).await.unwrap().unwrap();
    let seen = timeout(T, peer).await.unwrap().unwrap();
    assert_eq!(&seen[..3], &[0, 4, 0x100]);
}

#[tokio::test]
async fn poc_client_against_xcp_server() {
    let server = Server::bind("tcp://127.0.0.1:0", SessionConfig::default())
        .await
        .unwrap();
    let url = server.local_url();
    tokio::spawn(async move {
        while let Ok(s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    let out = Outgoing::data(m.header.body_codec, m.body.clone());
                    if s.reply(&m, out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let addr = url.strip_prefix("tcp://").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The PoC's HELLO and its first DATA share msgId 1.
    s.write_all(&poc_frame(
        0,
        1,
        0,
        br#"{"codecs":[1],"max_frame_bytes":1048576}"#,
    ))
    .await
    .unwrap();
    let (caps_h, caps) = timeout(T, poc_read(&mut s)).await.unwrap().unwrap();
    assert_eq!(caps_h["msgType"], 1);
    assert_eq!(caps_h["inReplyTo"], 1);
    let caps: Value = serde_json::from_slice(&caps).unwrap();
    assert_eq!(caps["codecs"], json!([1]));

    let ether =
        br#"{"kind":"text","schema_version":1,"payload":{"text":"from the poc"},"metadata":{}}"#;
    s.write_all(&poc_frame(0x100, 1, 0, ether)).await.unwrap();
    let (h, body) = timeout(T, poc_read(&mut s)).await.unwrap().unwrap();
    assert_eq!(h["msgType"], 0x100);
    assert_eq!(h["inReplyTo"], 1);
    assert_eq!(&body[..], &ether[..]);

    s.write_all(&poc_frame(4, 2, 0, br#"{"nonce":77}"#))
        .await
        .unwrap();
    let (h, body) = timeout(T, poc_read(&mut s)).await.unwrap().unwrap();
    assert_eq!(
        (h["msgType"].as_u64(), h["inReplyTo"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(&body[..], br#"{"nonce":77}"#);
}
