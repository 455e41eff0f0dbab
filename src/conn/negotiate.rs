//! Capability negotiation (SPEC §6).

use crate::codec::CodecId;
use crate::control::Hello;
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES, MIN_PEER_MAX_FRAME_BYTES};

/// The protocol version we announce.
pub const VERSION_STRING: &str = "0.2";

/// What a peer's limit means when it did not state one (0).
fn or_default(v: u64, default: u64) -> u64 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// Computes the CAPS a responder answers to `peer`'s HELLO, given its own offer `local`.
///
/// `codecs` is the intersection (in `local`'s order), `max_frame_bytes` and
/// `max_message_bytes` the minimum, `shared_mem` true only when both offer it and report the
/// same non-empty `host_id`, `attach` the intersection (empty without `shared_mem`), `crypt`
/// true only when both hold a key, `ring` only when both ask, `accepts`, `emits` and `adapters`
/// the responder's own. An empty codec intersection is
/// `Error::Incompatible(ERR_CODEC_UNSUPPORTED)`; a peer `max_frame_bytes` under
/// [`MIN_PEER_MAX_FRAME_BYTES`] is `Error::Incompatible(ERR_MESSAGE_TOO_LARGE)`.
pub fn negotiate(local: &Hello, peer: &Hello) -> Result<Hello> {
    let codecs: Vec<CodecId> = local
        .codecs
        .iter()
        .copied()
        .filter(|c| peer.codecs.contains(c))
        .collect();
    if codecs.is_empty() {
        return Err(Error::Incompatible {
            code: ErrorCode::ERR_CODEC_UNSUPPORTED,
            detail: format!(
                "no common codec: we decode {:?}, the peer {:?}",
                local.codecs, peer.codecs
            ),
        });
    }
    check_frame_floor(peer.max_frame_bytes, "HELLO")?;
    let same_host = !local.host_id.is_empty() && local.host_id == peer.host_id;
    let shared_mem = local.shared_mem && peer.shared_mem && same_host;
    let attach = if shared_mem {
        local
            .attach
            .iter()
            .filter(|s| peer.attach.contains(s))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    Ok(Hello {
        codecs,
        max_frame_bytes: or_default(local.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)
            .min(or_default(peer.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)),
        accepts: local.accepts.clone(),
        emits: local.emits.clone(),
        shared_mem,
        version: VERSION_STRING.to_string(),
        attach,
        host_id: local.host_id.clone(),
        shm_prefix: local.shm_prefix.clone(),
        crypt: local.crypt && peer.crypt,
        max_message_bytes: or_default(local.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES).min(
            or_default(peer.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES),
        ),
        adapters: local.adapters.clone(),
        ring: local.ring && peer.ring,
    })
}

/// Refuses a peer's `max_frame_bytes` under [`MIN_PEER_MAX_FRAME_BYTES`] (0 means the
/// default and passes); `what` names the frame it came in.
pub(crate) fn check_frame_floor(max_frame_bytes: u64, what: &str) -> Result<()> {
    if max_frame_bytes != 0 && max_frame_bytes < MIN_PEER_MAX_FRAME_BYTES {
        return Err(Error::Incompatible {
            code: ErrorCode::ERR_MESSAGE_TOO_LARGE,
            detail: format!(
                "{what} max_frame_bytes {max_frame_bytes} is under the {MIN_PEER_MAX_FRAME_BYTES} \
                 bytes this side accepts: every message would be cut into frames of a few bytes"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(codecs: &[CodecId], mfb: u64) -> Hello {
        Hello {
            codecs: codecs.to_vec(),
            max_frame_bytes: mfb,
            ..Default::default()
        }
    }

    #[test]
    fn intersection_and_minimum() {
        let a = hello(
            &[CodecId::JSON, CodecId::PROTOBUF, CodecId::TENSOR_F32],
            4096,
        );
        let b = hello(&[CodecId::TENSOR_F32, CodecId::JSON], 1 << 20);
        let caps = negotiate(&a, &b).unwrap();
        assert_eq!(caps.codecs, vec![CodecId::JSON, CodecId::TENSOR_F32]);
        assert_eq!(caps.max_frame_bytes, 4096);
        assert_eq!(caps.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert!(!caps.shared_mem);
    }

    #[test]
    fn peer_without_limit_gets_default() {
        let a = hello(&[CodecId::JSON], 8 << 20);
        let b = hello(&[CodecId::JSON], 0);
        assert_eq!(
            negotiate(&a, &b).unwrap().max_frame_bytes,
            DEFAULT_MAX_FRAME_BYTES
        );
    }

    #[test]
    fn peer_frame_limit_has_a_floor() {
        let a = hello(&[CodecId::JSON], 0);
        for mfb in [1, 16, MIN_PEER_MAX_FRAME_BYTES - 1] {
            let e = negotiate(&a, &hello(&[CodecId::JSON], mfb)).unwrap_err();
            assert_eq!(e.code(), ErrorCode::ERR_MESSAGE_TOO_LARGE, "{mfb}");
            assert!(
                e.to_string().contains(&format!("max_frame_bytes {mfb} ")),
                "{e}"
            );
        }
        for (mfb, want) in [
            (0, DEFAULT_MAX_FRAME_BYTES),
            (MIN_PEER_MAX_FRAME_BYTES, MIN_PEER_MAX_FRAME_BYTES),
        ] {
            let caps = negotiate(&a, &hello(&[CodecId::JSON], mfb)).unwrap();
            assert_eq!(caps.max_frame_bytes, want);
        }
    }

    #[test]
    fn empty_intersection_refused() {
        let a = hello(&[CodecId::JSON], 0);
        let b = hello(&[CodecId::PROTOBUF], 0);
        let e = negotiate(&a, &b).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_CODEC_UNSUPPORTED);
    }

    #[test]
    fn shared_mem_needs_same_host() {
        let mut a = hello(&[CodecId::JSON], 0);
        a.shared_mem = true;
        a.attach = vec!["shm".into(), "memfd".into()];
        a.host_id = "boot-1".into();
        let mut b = a.clone();
        b.attach = vec!["memfd".into()];
        let caps = negotiate(&a, &b).unwrap();
        assert!(caps.shared_mem);
        assert_eq!(caps.attach, vec!["memfd".to_string()]);
        b.host_id = "boot-2".into();
        let caps = negotiate(&a, &b).unwrap();
        assert!(!caps.shared_mem);
        assert!(caps.attach.is_empty());
    }
}
