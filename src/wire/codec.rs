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
        dst.extend_from_slice(&trailer_bytes(
            crate::wire::frame::crc32c(&payload),
            self.form,
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MsgType;
    use futures_util::{SinkExt, StreamExt};
    use tokio_util::codec::Framed;

    #[tokio::test]
    async fn framed_over_a_duplex_stream() {
        let (a, b) = tokio::io::duplex(64);
        let mut tx = Framed::new(a, XcpCodec::default());
        let mut rx = Framed::new(b, XcpCodec::default());
        let hdr = FrameHeader {
            msg_type: MsgType::DATA,
            msg_id: 9,
            ..Default::default()
        };
        let body = Bytes::from(vec![5u8; 1000]);
        let send = async {
            tx.send((hdr.clone(), Flags::NONE, body.clone()))
                .await
                .unwrap();
            tx.send((hdr.clone(), Flags::MORE, Bytes::new()))
                .await
                .unwrap();
        };
        let recv = async {
            let f1 = rx.next().await.unwrap().unwrap();
            let f2 = rx.next().await.unwrap().unwrap();
            (f1, f2)
        };
        let ((), (f1, f2)) = tokio::join!(send, recv);
        assert_eq!(f1.header, hdr);
        assert_eq!(f1.payload, body);
        assert_eq!(f2.flags, Flags::MORE);
    }

    #[tokio::test]
    async fn decoder_error_ends_framed_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut rx = Framed::new(b, XcpCodec::default());
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let e = rx.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::ERR_MALFORMED);
    }
}
