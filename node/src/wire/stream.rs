//! A connection's message stream: pgwire's codec with raftpg's limit on the size of a message,
//! and a decoder that never takes the node down (a panic while decoding a malformed message
//! ends only its connection, as a protocol violation).

use std::io;
use std::panic::AssertUnwindSafe;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::error::PgWireError;
use pgwire::messages::{PgWireBackendMessage as B, PgWireFrontendMessage as F};
use pgwire::tokio::server::{MaybeTls, PgWireMessageServerCodec};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedParts};

use super::error;

/// The codec of a connection: pgwire's, with raftpg's limit on the size of a message, and
/// a decoder that never takes the node down (a panic while decoding a malformed message ends
/// only its connection, as a protocol violation).
pub struct WireCodec {
    inner: PgWireMessageServerCodec<()>,
    message_bytes_max: usize,
}

impl WireCodec {
    /// A codec of a new connection (`startup`: before the startup message, else after
    /// authentication), with `message_bytes_max`. For tests and fuzzing; connections get
    /// theirs from [`Wire::new`].
    pub fn new(startup: bool, message_bytes_max: usize) -> Self {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut inner = PgWireMessageServerCodec::new(pgwire::api::DefaultClient::new(addr, false));
        inner.client_info.set_state(match startup {
            true => PgWireConnectionState::AwaitingStartup,
            false => PgWireConnectionState::ReadyForQuery,
        });
        WireCodec {
            inner,
            message_bytes_max,
        }
    }

    /// Tells the decoder where the connection is.
    pub fn set_state(&mut self, s: PgWireConnectionState) {
        self.inner.client_info.set_state(s);
    }
}

impl Decoder for WireCodec {
    type Item = F;
    type Error = PgWireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<F>, PgWireError> {
        let after_startup = !matches!(
            self.inner.client_info.state(),
            PgWireConnectionState::AwaitingSslRequest | PgWireConnectionState::AwaitingStartup
        );
        if after_startup && src.len() >= 5 {
            let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
            if len < 4 {
                return Err(PgWireError::InvalidMessageType(src[0]));
            }
            if len as usize > self.message_bytes_max {
                return Err(PgWireError::MessageTooLarge(
                    self.message_bytes_max,
                    len as usize,
                ));
            }
            // A whole message is here: check its structure before pgwire reads it (its
            // decoders trust the lengths inside a message).
            if let Some(body) = src.get(5..1 + len as usize) {
                if !well_formed(src[0], body) {
                    return Err(PgWireError::InvalidMessageType(src[0]));
                }
            }
        }
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.decode(src))) {
            Ok(r) => r,
            Err(_) => {
                DECODER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let kind = src.first().copied().unwrap_or(0);
                src.clear();
                Err(PgWireError::InvalidMessageType(kind))
            }
        }
    }
}

/// Messages whose decoding panicked inside pgwire (caught: only their connection ended). The
/// structural check before decoding ([`well_formed`]) should leave none; the fuzz target
/// `wire_messages` asserts it.
pub static DECODER_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads the fields of a message body, each bounds-checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn cstring(&mut self) -> Option<()> {
        let nul = self.0.iter().position(|b| *b == 0)?;
        self.0 = &self.0[nul + 1..];
        Some(())
    }

    fn take(&mut self, n: usize) -> Option<()> {
        self.0 = self.0.get(n..)?;
        Some(())
    }

    fn i16(&mut self) -> Option<i16> {
        let v = i16::from_be_bytes(self.0.get(..2)?.try_into().ok()?);
        self.0 = &self.0[2..];
        Some(v)
    }

    fn i32(&mut self) -> Option<i32> {
        let v = i32::from_be_bytes(self.0.get(..4)?.try_into().ok()?);
        self.0 = &self.0[4..];
        Some(v)
    }

    /// `n` (≥ 0) items of `size` bytes.
    fn array(&mut self, size: usize) -> Option<()> {
        let n = usize::try_from(self.i16()?).ok()?;
        self.take(n.checked_mul(size)?)
    }
}

/// Whether the body of a frontend message of type `kind` holds the fields its type says
/// (strings terminated, counts and lengths within the message). Types not listed here have no
/// inner lengths to trust.
fn well_formed(kind: u8, body: &[u8]) -> bool {
    let mut f = Fields(body);
    let ok = match kind {
        b'Q' => f.cstring(),
        b'P' => f
            .cstring()
            .and_then(|_| f.cstring())
            .and_then(|_| f.array(4)),
        b'B' => (|| {
            f.cstring()?;
            f.cstring()?;
            f.array(2)?;
            let n = f.i16()?;
            if n < 0 {
                return None;
            }
            for _ in 0..n {
                match f.i32()? {
                    -1 => {}
                    len if len >= 0 => f.take(len as usize)?,
                    _ => return None,
                }
            }
            f.array(2)
        })(),
        b'E' => f.cstring().and_then(|_| f.i32()).map(|_| ()),
        b'D' | b'C' => f.take(1).and_then(|_| f.cstring()),
        b'f' => f.cstring(),
        _ => Some(()),
    };
    ok.is_some()
}

impl Encoder<B> for WireCodec {
    type Error = io::Error;

    fn encode(&mut self, item: B, dst: &mut BytesMut) -> Result<(), io::Error> {
        self.inner.encode(item, dst)
    }
}

/// A connection's message stream.
pub struct Wire {
    framed: Framed<MaybeTls, WireCodec>,
    /// While the session holds its output (writes of an extended-query pipeline wait for
    /// `Sync` to run as one write): the messages, and the places of results still to come.
    held: Option<Vec<Held>>,
}

/// Most messages held for one pipeline (a client that never sends `Sync` has its connection
/// closed rather than the node's memory filled).
pub const HELD_MAX: usize = 100_000;

/// A held message, or the place of a result still to come.
pub enum Held {
    /// A message.
    Msg(B),
    /// The result of the `n`th deferred `Execute`.
    Slot(usize),
}

impl Wire {
    /// Queues a message (sent when the buffer fills or at [`Wire::flush`]; kept back while
    /// the output is held).
    pub async fn feed(&mut self, m: B) -> io::Result<()> {
        match &mut self.held {
            Some(held) if held.len() >= HELD_MAX => Err(io::Error::other(format!(
                "more than {HELD_MAX} messages held for one pipeline; send Sync more often"
            ))),
            Some(held) => {
                held.push(Held::Msg(m));
                Ok(())
            }
            None => self.framed.feed(m).await,
        }
    }

    /// Holds the output from now on (no effect while held already).
    pub fn hold(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// Whether the output is held.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Marks the place of the result of deferred `Execute` number `n` (while held).
    pub fn slot(&mut self, n: usize) {
        if let Some(held) = &mut self.held {
            held.push(Held::Slot(n));
        }
    }

    /// Sends what was held, each slot replaced by `fill(n)`'s messages; a slot filled with
    /// `None` ends the sending (what comes after it is dropped: the pipeline failed there).
    pub async fn release(
        &mut self,
        mut fill: impl FnMut(usize) -> Option<Vec<B>>,
    ) -> io::Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        for h in held {
            match h {
                Held::Msg(m) => self.framed.feed(m).await?,
                Held::Slot(n) => match fill(n) {
                    Some(ms) => {
                        for m in ms {
                            self.framed.feed(m).await?;
                        }
                    }
                    None => break,
                },
            }
        }
        Ok(())
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        SinkExt::<B>::flush(&mut self.framed).await
    }

    /// The next message (`None`: the client left).
    pub async fn next(&mut self) -> Option<Result<F, PgWireError>> {
        self.framed.next().await
    }

    /// Tells the decoder where the connection is (startup or not).
    pub fn set_state(&mut self, s: PgWireConnectionState) {
        self.framed.codec_mut().inner.client_info.set_state(s);
    }

    /// Whether the connection runs over TLS.
    pub fn is_secure(&self) -> bool {
        self.framed.codec().inner.client_info.is_secure()
    }

    /// Sends a FATAL error and ends.
    pub async fn fatal(&mut self, sqlstate: &str, message: impl Into<String>) -> io::Result<()> {
        self.feed(B::ErrorResponse(error::fatal(sqlstate, message)))
            .await?;
        self.flush().await
    }
}

impl Wire {
    /// Takes over a connection pgwire negotiated TLS on, with `message_bytes_max`.
    pub fn new(
        framed: Framed<MaybeTls, PgWireMessageServerCodec<()>>,
        message_bytes_max: usize,
    ) -> Self {
        let parts = framed.into_parts();
        let mut new_parts = FramedParts::new(
            parts.io,
            WireCodec {
                inner: parts.codec,
                message_bytes_max,
            },
        );
        new_parts.read_buf = parts.read_buf;
        new_parts.write_buf = parts.write_buf;
        Wire {
            framed: Framed::from_parts(new_parts),
            held: None,
        }
    }
}
