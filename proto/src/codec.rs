//! The codec of every raftpg service: protobuf (prost), except that a message that does not
//! decode is refused with `INVALID_ARGUMENT` ("malformed request"), not `INTERNAL`: a
//! hand-made or corrupted request is the sender's error, and a node answering it stays well.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Protobuf codec whose decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct RaftpgCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for RaftpgCodec<T, U> {
    fn default() -> Self {
        RaftpgCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for RaftpgCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(ProstDecoder::default())
    }
}

/// Decodes with prost; a malformed message is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed message: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
