//! The frame decoder and encoder as `tokio_util::codec::{Decoder, Encoder}`, so a user can put
//! XCP framing on any `AsyncRead`/`AsyncWrite` they already have.
//!
//! With `Framed`, any decoder error ends the stream (that is how `tokio_util` treats codec
//! errors). The session layer drives [`FrameDecoder`] directly instead, so it can NACK a bad
//! frame and go on.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::frame::{encode_head, trailer_bytes, FrameDecoder};
use super::{Flags, Frame, FrameHeader, HeaderForm, Limits};
use crate::error::Error;

/// XCP framing for `tokio_util::codec::Framed`.
#[derive(Debug)]
pub struct XcpCodec {
    decoder: FrameDecoder,
    form: HeaderForm,
}

impl XcpCodec {
    /// A codec enforcing `limits` on input and writing headers in `form`.
    pub fn new(limits: Limits, form: HeaderForm) -> Self {
        XcpCodec {
            decoder: FrameDecoder::new(limits),
            form,
        }
    }
}

impl Default for XcpCodec {
    fn default() -> Self {
        Self::new(Limits::default(), HeaderForm::Capnp)
    }
}

impl Decoder for XcpCodec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        self.decoder.decode(src).map_err(Error::from)
    }
}

/// An outgoing frame for [`XcpCodec`]: header, flags (COMP/CRYPT/MORE) and payload.
pub type OutFrame = (FrameHeader, Flags, Bytes);

impl Encoder<OutFrame> for XcpCodec {
    type Error = Error;

    fn encode(&mut self, (hdr, flags, payload): OutFrame, dst: &mut BytesMut) -> Result<(), Error> {
        encode_head(&hdr, self.form, flags, payload.len() as u64, dst)?;
        dst.extend_from_slice(&payload);
        dst.extend_from_slice(&trailer_bytes(crate::wire::frame::crc32c(&payload), self.form));
        Ok(())
    }
}

impl Encoder<Frame> for XcpCodec {
    type Error = Error;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), Error> {
        let form = self.form;
        self.form = f.header_form;
        let r = Encoder::<OutFrame>::encode(self, (f.header, f.flags, f.payload), dst);
        self.form = form;
        r
    }
}
