//! Body transforms of SPEC §3: zstd compression (COMP) with a zip-bomb guard, and
//! ChaCha20-Poly1305 sealing (CRYPT) with per-direction keys.
//!
//! Sender order for one logical message: encode → [`compress`] → [`Sealer::seal`] → chunk.
//! Receiver: reassemble → [`Sealer::open`] → [`decompress`] → decode.
//!
//! The AEAD is the RFC 8439 construction, built here on the `chacha20` and `poly1305`
//! primitives rather than through the `chacha20poly1305` crate, for one measured reason:
//! ChaCha20 is seekable, so the keystream of a large message is applied on several cores at
//! once, while Poly1305 runs over the ciphertext in one pass. The RFC 8439 test vector and a
//! cross-check against `chacha20poly1305` pin the construction.
//!
//! ```
//! use xcp::wire::seal::{Direction, Sealer, aad};
//! use xcp::wire::MsgType;
//! use xcp::codec::CodecId;
//!
//! let sealer = Sealer::new(&[7u8; 32]);
//! let ad = aad(MsgType::DATA, CodecId::JSON, 0, 42);
//! let sealed = sealer.seal(Direction::C2S, 42, 0, &ad, b"secret tensor bytes");
//! assert_eq!(sealed.len(), 19 + 16);
//! let opened = sealer.open(Direction::C2S, 42, 0, &ad, &sealed).unwrap();
//! assert_eq!(&opened[..], b"secret tensor bytes");
//! // The other direction's key does not open it.
//! assert!(sealer.open(Direction::S2C, 42, 0, &ad, &sealed).is_err());
//! ```

use bytes::{Bytes, BytesMut};
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use hmac::{Hmac, KeyInit, Mac};
use poly1305::universal_hash::UniversalHash;
use poly1305::Poly1305;
use sha2::Sha256;

use super::MsgType;
use crate::codec::CodecId;
use crate::error::{Error, ErrorCode, Result, Violation};

/// Length of the Poly1305 tag appended to the ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of the static key.
pub const KEY_LEN: usize = 32;
/// Messages at least this large are sealed and opened on several threads.
pub const PARALLEL_THRESHOLD: usize = 1 << 20;
/// Bodies smaller than this are not worth compressing (the draft's rule).
pub const MIN_COMPRESS_BYTES: usize = 1024;

// ----- compression ------------------------------------------------------------------------

/// When to compress a message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressPolicy {
    /// Never.
    #[default]
    Off,
    /// Whenever the body has at least this many bytes.
    Above(usize),
    /// Bodies of at least [`MIN_COMPRESS_BYTES`], and only when compression shrinks them.
    Auto,
}

impl std::str::FromStr for CompressPolicy {
    type Err = Error;
    /// `off`, `auto`, or a byte count (`on` = `1024`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" | "none" => Ok(CompressPolicy::Off),
            "auto" => Ok(CompressPolicy::Auto),
            "on" => Ok(CompressPolicy::Above(MIN_COMPRESS_BYTES)),
            n => n.parse().map(CompressPolicy::Above).map_err(|_| {
                Error::invalid(format!(
                    "compression policy {s:?}: expected off, on, auto or a byte count"
                ))
            }),
        }
    }
}

impl CompressPolicy {
    /// Applies the policy: `Some(compressed)` when the body should travel with COMP.
    pub fn apply(self, body: &[u8], level: i32) -> Option<Bytes> {
        match self {
            CompressPolicy::Off => None,
            CompressPolicy::Above(n) if body.len() < n => None,
            CompressPolicy::Above(_) => compress(body, level).ok(),
            CompressPolicy::Auto if body.len() < MIN_COMPRESS_BYTES => None,
            CompressPolicy::Auto => compress(body, level).ok().filter(|c| c.len() < body.len()),
        }
    }
}

/// Compresses `body` into one zstd frame with its content size recorded.
pub fn compress(body: &[u8], level: i32) -> Result<Bytes> {
    let mut c = zstd::bulk::Compressor::new(level).map_err(Error::Io)?;
    c.include_contentsize(true).map_err(Error::Io)?;
    c.compress(body).map(Bytes::from).map_err(Error::Io)
}

/// Decompresses a COMP body, refusing to inflate past `max_bytes`.
///
/// The frame must record its content size; that size is checked against `max_bytes` before
/// anything is allocated, and the output may not exceed it.
pub fn decompress(body: &[u8], max_bytes: u64) -> Result<Bytes> {
    let size = match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(Error::malformed(
                Violation::Transform,
                "comp: zstd frame does not record its content size",
            ))
        }
        Err(_) => {
            return Err(Error::malformed(
                Violation::Transform,
                "comp: not a zstd frame",
            ))
        }
    };
    if size > max_bytes {
        return Err(Error::protocol(
            Violation::Transform,
            ErrorCode::ERR_MESSAGE_TOO_LARGE,
            format!("comp: content size {size} exceeds max_message_bytes {max_bytes}"),
        ));
    }
    let out = zstd::bulk::decompress(body, size as usize)
        .map_err(|e| Error::malformed(Violation::Transform, format!("comp: zstd: {e}")))?;
    if out.len() as u64 != size {
        return Err(Error::malformed(
            Violation::Transform,
            format!("comp: inflated to {} bytes, frame said {size}", out.len()),
        ));
    }
    Ok(Bytes::from(out))
}

// ----- encryption -------------------------------------------------------------------------

/// The direction of a frame: from the connection's initiator (`c2s`) or toward it (`s2c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Frames sent by the initiator.
    C2S,
    /// Frames sent by the responder.
    S2C,
}

impl Direction {
    /// `c2s` or `s2c`.
    pub fn label(self) -> &'static str {
        match self {
            Direction::C2S => "c2s",
            Direction::S2C => "s2c",
        }
    }
}

impl std::str::FromStr for Direction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "c2s" => Ok(Direction::C2S),
            "s2c" => Ok(Direction::S2C),
            _ => Err(Error::invalid(format!(
                "direction {s:?}: expected c2s or s2c"
            ))),
        }
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The associated data of a sealed message (SPEC §3):
/// `LE16(msgType) || LE16(bodyCodec) || LE32(channelId) || LE64(msgId)`.
pub fn aad(msg_type: MsgType, codec: CodecId, channel_id: u32, msg_id: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0..2].copy_from_slice(&msg_type.0.to_le_bytes());
    a[2..4].copy_from_slice(&codec.0.to_le_bytes());
    a[4..8].copy_from_slice(&channel_id.to_le_bytes());
    a[8..16].copy_from_slice(&msg_id.to_le_bytes());
    a
}

/// Seals and opens message bodies with the keys derived from one 32-byte static key.
#[derive(Clone)]
pub struct Sealer {
    static_key: [u8; KEY_LEN],
    c2s: [u8; KEY_LEN],
    s2c: [u8; KEY_LEN],
    threads: usize,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer { keys: <redacted> }")
    }
}

impl Sealer {
    /// Derives the per-direction AEAD keys:
    /// `HMAC-SHA256(static_key, "xcp-0.2 key " + dir)`.
    pub fn new(static_key: &[u8; KEY_LEN]) -> Self {
        Sealer {
            static_key: *static_key,
            c2s: hmac_sha256(static_key, &[b"xcp-0.2 key c2s"]),
            s2c: hmac_sha256(static_key, &[b"xcp-0.2 key s2c"]),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Limits the threads used for large messages (1: never parallel).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The AEAD key of a direction.
    pub fn key(&self, dir: Direction) -> &[u8; KEY_LEN] {
        match dir {
            Direction::C2S => &self.c2s,
            Direction::S2C => &self.s2c,
        }
    }

    /// The nonce of a message (draft rule):
    /// `HMAC-SHA256(static_key, LE64(msgId) || LE32(channelId))[0..12]`.
    pub fn nonce(&self, msg_id: u64, channel_id: u32) -> [u8; 12] {
        let h = hmac_sha256(
            &self.static_key,
            &[&msg_id.to_le_bytes(), &channel_id.to_le_bytes()],
        );
        h[..12].try_into().expect("12 bytes")
    }

    /// Seals `plaintext`: ciphertext followed by the 16-byte tag.
    pub fn seal(
        &self,
        dir: Direction,
        msg_id: u64,
        channel_id: u32,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Bytes {
        let nonce = self.nonce(msg_id, channel_id);
        let mut buf = BytesMut::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        let tag = seal_in_place(self.key(dir), &nonce, aad, &mut buf, self.threads);
        buf.extend_from_slice(&tag);
        buf.freeze()
    }

    /// Opens a sealed body. Any failure is `ERR_DECRYPT`; nothing is returned unverified.
    pub fn open(
        &self,
        dir: Direction,
        msg_id: u64,
        channel_id: u32,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Bytes> {
        if sealed.len() < TAG_LEN {
            return Err(Error::protocol(
                Violation::Transform,
                ErrorCode::ERR_DECRYPT,
                format!("crypt: {} bytes is shorter than the tag", sealed.len()),
            ));
        }
        let nonce = self.nonce(msg_id, channel_id);
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut buf = BytesMut::from(ct);
        open_in_place(self.key(dir), &nonce, aad, &mut buf, tag, self.threads)?;
        Ok(buf.freeze())
    }
}

fn poly_key(key: &[u8; 32], nonce: &[u8; 12]) -> [u8; 32] {
    let mut c = ChaCha20::new(key.into(), nonce.into());
    let mut block = [0u8; 32];
    c.apply_keystream(&mut block);
    block
}

fn mac(poly_key: &[u8; 32], aad: &[u8], ct: &[u8]) -> [u8; 16] {
    let mut p = Poly1305::new(poly_key.into());
    p.update_padded(aad);
    p.update_padded(ct);
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&(aad.len() as u64).to_le_bytes());
    lens[8..].copy_from_slice(&(ct.len() as u64).to_le_bytes());
    p.update_padded(&lens);
    p.finalize().into()
}

/// XORs the ChaCha20 keystream (block counter 1 onward) into `data`, on up to `threads` threads.
fn keystream(key: &[u8; 32], nonce: &[u8; 12], data: &mut [u8], threads: usize) {
    let mut base = ChaCha20::new(key.into(), nonce.into());
    base.seek(64u64);
    if threads <= 1 || data.len() < PARALLEL_THRESHOLD {
        base.apply_keystream(data);
        return;
    }
    // Parts are whole 64-byte blocks so each thread seeks to a block boundary.
    let part = data.len().div_ceil(threads).div_ceil(64) * 64;
    std::thread::scope(|s| {
        for (i, chunk) in data.chunks_mut(part).enumerate() {
            let mut c = ChaCha20::new(key.into(), nonce.into());
            c.seek(64u64 + (i * part) as u64);
            s.spawn(move || c.apply_keystream(chunk));
        }
    });
}

fn seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    threads: usize,
) -> [u8; 16] {
    let pk = poly_key(key, nonce);
    keystream(key, nonce, data, threads);
    mac(&pk, aad, data)
}

fn open_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    tag: &[u8],
    threads: usize,
) -> Result<()> {
    let pk = poly_key(key, nonce);
    let want = mac(&pk, aad, data);
    // Constant-time comparison.
    let diff = want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 || tag.len() != TAG_LEN {
        return Err(Error::protocol(
            Violation::Transform,
            ErrorCode::ERR_DECRYPT,
            "crypt: authentication failed (wrong key, or tampered body or header)",
        ));
    }
    keystream(key, nonce, data, threads);
    Ok(())
}

/// Seals with explicit key and nonce (the raw RFC 8439 AEAD; for tests and tools).
pub fn aead_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut v = plaintext.to_vec();
    let tag = seal_in_place(key, nonce, aad, &mut v, 1);
    v.extend_from_slice(&tag);
    v
}

/// Opens with explicit key and nonce (the raw RFC 8439 AEAD).
pub fn aead_open(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < TAG_LEN {
        return Err(Error::protocol(
            Violation::Transform,
            ErrorCode::ERR_DECRYPT,
            "crypt: too short",
        ));
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut v = ct.to_vec();
    open_in_place(key, nonce, aad, &mut v, tag, 1)?;
    Ok(v)
}

/// Reads a 32-byte static key from a file, refusing a file of any other size or one that
/// other users can read.
pub fn load_key_file(path: &std::path::Path) -> Result<[u8; KEY_LEN]> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::invalid(format!("key file {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::invalid(format!(
                "key file {}: mode {:o} lets other users read it; run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(Error::invalid(format!(
            "key file {}: {} bytes; a static key is exactly {KEY_LEN} bytes \
             (make one with `head -c 32 /dev/urandom > FILE`)",
            path.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("key file {}: {e}", path.display())))?;
    bytes.try_into().map_err(|_| {
        Error::invalid(format!(
            "key file {}: changed size while being read",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{RngCore as _, SeedableRng as _};

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8439 §2.8.2.
    #[test]
    fn rfc8439_aead_vector() {
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let key: [u8; 32] = hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .try_into()
            .unwrap();
        let nonce: [u8; 12] = hex("070000004041424344454647").try_into().unwrap();
        let ct = hex(
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
             3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
             92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
             3ff4def08e4b7a9de576d26586cec64b6116",
        );
        let tag = hex("1ae10b594f09e26a7e902ecbd0600691");
        let sealed = aead_seal(&key, &nonce, &aad, pt);
        assert_eq!(&sealed[..pt.len()], &ct[..]);
        assert_eq!(&sealed[pt.len()..], &tag[..]);
        assert_eq!(aead_open(&key, &nonce, &aad, &sealed).unwrap(), pt);
    }

    #[test]
    fn matches_chacha20poly1305_crate_and_parallel_path() {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let key = [9u8; 32];
        let nonce = [3u8; 12];
        let aad = b"header";
        for len in [0usize, 1, 63, 64, 65, 1000, PARALLEL_THRESHOLD + 12345] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let theirs = chacha20poly1305::ChaCha20Poly1305::new(&key.into())
                .encrypt(&nonce.into(), Payload { msg: &pt, aad })
                .unwrap();
            let mut ours = pt.clone();
            let tag = seal_in_place(&key, &nonce, aad, &mut ours, 2);
            ours.extend_from_slice(&tag);
            assert_eq!(ours, theirs, "len {len}");
            let (ct, tag) = ours.split_at(len);
            let mut back = ct.to_vec();
            open_in_place(&key, &nonce, aad, &mut back, tag, 3).unwrap();
            assert_eq!(back, pt);
        }
    }

    /// Pinned vector for our key and nonce derivation (computed independently with Python's
    /// `hmac` and `hashlib`; see tests/vectors/README.md).
    #[test]
    fn derivation_vector() {
        let s = Sealer::new(&[0u8; 32]);
        let expect = |h: &str| hex(h);
        assert_eq!(s.key(Direction::C2S).to_vec(), expect(DERIVED_C2S));
        assert_eq!(s.key(Direction::S2C).to_vec(), expect(DERIVED_S2C));
        assert_eq!(s.nonce(1, 0).to_vec(), expect(NONCE_1_0));
    }

    const DERIVED_C2S: &str = "77586117de19d076d16d214ed54df05ca82fb6bbf6c73d91f16a452555b38706";
    const DERIVED_S2C: &str = "1094da87952b1ba01feaf60aa0dd2d4e8311e18220442a0968bc34881a4d7410";
    const NONCE_1_0: &str = "984efe10df205d931f242145";

    #[test]
    fn tampering_fails() {
        let s = Sealer::new(&[1u8; 32]);
        let ad = aad(MsgType::DATA, CodecId::JSON, 2, 7);
        let sealed = s.seal(Direction::S2C, 7, 2, &ad, b"payload");
        let mut bad = sealed.to_vec();
        bad[0] ^= 1;
        assert_eq!(
            s.open(Direction::S2C, 7, 2, &ad, &bad).unwrap_err().code(),
            ErrorCode::ERR_DECRYPT
        );
        let other_ad = aad(MsgType::DATA, CodecId::PROTOBUF, 2, 7);
        assert!(s.open(Direction::S2C, 7, 2, &other_ad, &sealed).is_err());
        assert!(s.open(Direction::S2C, 8, 2, &ad, &sealed).is_err());
        assert!(Sealer::new(&[2u8; 32])
            .open(Direction::S2C, 7, 2, &ad, &sealed)
            .is_err());
        assert!(s.open(Direction::S2C, 7, 2, &ad, &sealed[..10]).is_err());
    }

    #[test]
    fn zstd_round_trip_and_guards() {
        let body = vec![b'a'; 100_000];
        let c = compress(&body, 1).unwrap();
        assert!(c.len() < 1000);
        assert_eq!(decompress(&c, 100_000).unwrap(), body);
        // Zip-bomb guard: refused from the recorded size, before inflating.
        assert_eq!(
            decompress(&c, 99_999).unwrap_err().code(),
            ErrorCode::ERR_MESSAGE_TOO_LARGE
        );
        // Truncated frame.
        assert_eq!(
            decompress(&c[..c.len() - 3], 1 << 20).unwrap_err().code(),
            ErrorCode::ERR_MALFORMED
        );
        assert!(decompress(b"not zstd at all", 1 << 20).is_err());
        // A streamed frame without a content size.
        let mut streamed = Vec::new();
        {
            let mut e = zstd::stream::Encoder::new(&mut streamed, 1).unwrap();
            std::io::Write::write_all(&mut e, &body).unwrap();
            e.finish().unwrap();
        }
        let e = decompress(&streamed, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("content size"), "{e}");
    }

    #[test]
    fn policy() {
        let text = vec![b'x'; 4096];
        let mut noise = vec![0u8; 4096];
        SmallRng::seed_from_u64(0x9E37_79B9_7F4A_7C15).fill_bytes(&mut noise);
        assert!(CompressPolicy::Off.apply(&text, 1).is_none());
        assert!(CompressPolicy::Auto.apply(&text, 1).is_some());
        assert!(CompressPolicy::Auto.apply(&noise, 1).is_none());
        assert!(CompressPolicy::Auto.apply(&text[..100], 1).is_none());
        assert!(CompressPolicy::Above(10).apply(&noise, 1).is_some());
        assert_eq!(
            "auto".parse::<CompressPolicy>().unwrap(),
            CompressPolicy::Auto
        );
        assert_eq!(
            "64".parse::<CompressPolicy>().unwrap(),
            CompressPolicy::Above(64)
        );
        assert!("sometimes".parse::<CompressPolicy>().is_err());
    }

    #[test]
    fn key_file_rules() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [5u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_key_file(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key_file(&p).unwrap(), [5u8; 32]);
        std::fs::write(&p, [5u8; 31]).unwrap();
        assert!(load_key_file(&p)
            .unwrap_err()
            .to_string()
            .contains("exactly 32"));
    }
}
