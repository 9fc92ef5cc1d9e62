//! `Read.Query` and `Read.QueryStream`: decode the request, admit and run it through the
//! service ([`Service::admit_read`]), encode the rows.

use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use raftpg_proto::v1::read_server::Read;
use raftpg_proto::v1::{QueryChunk, QueryRequest, QueryResponse};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::auth;
use super::convert;
use super::status::to_status;
use crate::service::{ReadChunk, Service, ServiceError};

/// The read service.
pub struct ReadService {
    svc: Arc<Service>,
}

impl ReadService {
    /// Creates the service.
    pub fn new(svc: Arc<Service>) -> Self {
        ReadService { svc }
    }
}

type ChunkStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<QueryChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Read for ReadService {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let principal = auth::principal(&self.svc, &request).await?;
        let req = request.into_inner();
        let bytes = req.encoded_len();
        let mut req = convert::read_request(req, bytes, false);
        req.principal = principal;
        let whole = self.svc.read(req).await.map_err(to_status)?;
        Ok(Response::new(convert::query_response(whole)))
    }

    type QueryStreamStream = ChunkStream;

    async fn query_stream(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let principal = auth::principal(&self.svc, &request).await?;
        let req = request.into_inner();
        let bytes = req.encoded_len();
        let mut req = convert::read_request(req, bytes, true);
        req.principal = principal;
        let read = self.svc.admit_read(req).await.map_err(to_status)?;
        // Two chunks in flight at most: the query runs as fast as the client reads, and no
        // longer than the read's bound, even when the client stops reading.
        let (tx, rx) = mpsc::channel(2);
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(async move {
            // The receiver is gone only if the client is: nobody to tell.
            let _ = done_tx.send(read.run(tx).await);
        });
        Ok(Response::new(Box::pin(chunks_then_outcome(rx, done_rx))))
    }
}

/// The response stream of a streamed read: its chunks, then its ending status unless it ended
/// well. The ending travels apart from the chunks, so that it is delivered even when the read
/// ended because the chunk channel was full.
fn chunks_then_outcome(
    rx: mpsc::Receiver<ReadChunk>,
    done: oneshot::Receiver<Result<(), ServiceError>>,
) -> impl futures::Stream<Item = Result<QueryChunk, Status>> + Send {
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok(convert::query_chunk(c)), rx))
    });
    let ending = futures::stream::once(done).filter_map(|outcome| async move {
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Err(to_status(e))),
            Err(_) => Some(Err(Status::internal("the read ended without an outcome"))),
        }
    });
    chunks.chain(ending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn the_ending_follows_the_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let (tx, rx) = mpsc::channel(2);
            let (done_tx, done_rx) = oneshot::channel();
            tx.send(ReadChunk::default()).await.expect("room");
            drop(tx);
            done_tx
                .send(Err(ServiceError::deadline("late")))
                .expect("receiver");
            let items: Vec<_> = chunks_then_outcome(rx, done_rx).collect().await;
            assert_eq!(items.len(), 2);
            assert!(items[0].is_ok());
            assert!(
                matches!(&items[1], Err(s) if s.code() == Code::DeadlineExceeded),
                "{items:?}"
            );
        });
    }
}
