//! Streaming a file (a snapshot, a backup) to a gRPC client: its pieces are read ahead by a
//! task, at most two in flight, each at most [`PIECE_BYTES`]; a handler turns each piece into
//! its message type. The last piece is empty (the end of the file), so a handler can send a
//! trailer with it (a checksum).

use tokio::sync::mpsc;
use tonic::Status;

/// Size of the pieces a file is streamed in.
pub const PIECE_BYTES: usize = 1024 * 1024;

/// A server stream of messages of type `T`.
pub type MessageStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// Streams `file` as messages made by `to_message(piece, is_first)`; the last piece is empty.
/// A read error ends the stream with an INTERNAL status.
pub fn stream_file<T, F>(mut file: tokio::fs::File, mut to_message: F) -> MessageStream<T>
where
    T: Send + 'static,
    F: FnMut(Vec<u8>, bool) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(2);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut first = true;
        loop {
            let mut piece = vec![0u8; PIECE_BYTES];
            let n = match file.read(&mut piece).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("reading the file: {e}"))))
                        .await;
                    return;
                }
            };
            piece.truncate(n);
            let message = to_message(piece, first);
            first = false;
            if tx.send(Ok(message)).await.is_err() || n == 0 {
                return;
            }
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    }))
}
