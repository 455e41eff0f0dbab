//! The `FrameHeader` in its two forms (SPEC §2). PLACEHOLDER: being written.
use super::{FrameHeader, HeaderForm};
use crate::error::Result;

/// Encodes `header` in `form`. Fails if the encoding exceeds 65535 bytes.
pub fn encode(header: &FrameHeader, form: HeaderForm) -> Result<Vec<u8>> {
    let _ = (header, form);
    todo!()
}

/// Decodes a header, telling the form apart by the first byte (`{` = JSON).
pub fn decode(bytes: &[u8]) -> Result<(FrameHeader, HeaderForm)> {
    let _ = bytes;
    todo!()
}
