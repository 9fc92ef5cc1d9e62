//! Coalesces the leader's read-index confirmations: every linearizable read needs the leader to
//! confirm its leadership with a quorum (a round of heartbeats) *after* the read arrived. Reads
//! that arrive while a round is in flight share the next round instead of each starting its own,
//! so a burst of reads costs one round trip to the followers, not one per read.
//!
//! Owns the queue of waiting reads. Invariant: a read is answered only by a round that started
//! after it was queued (its read index is at least the commit index at its arrival).

use std::sync::{Arc, Mutex};

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::oneshot;

use crate::command::{NodeId, Raft};

/// Why a round did not confirm a read index.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadIndexError {
    /// This node is not the leader.
    #[error("this node is not the leader")]
    NotLeader,
    /// A quorum did not confirm this node's leadership (openraft's reason).
    #[error("{0}")]
    Unconfirmed(Arc<RaftError<NodeId, CheckIsLeaderError<NodeId, crate::command::NodeAddr>>>),
    /// The confirmation round ended without an answer (the node is shutting down).
    #[error("the read index round ended without an answer")]
    RoundLost,
}

type Waiter = oneshot::Sender<Result<u64, ReadIndexError>>;

/// The shared queue of reads waiting for a confirmation round.
#[derive(Default)]
pub struct ReadIndexBatcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: bool,
    waiting: Vec<Waiter>,
}

impl ReadIndexBatcher {
    /// The read index for a read arriving now (confirmed by a quorum after this call began).
    pub async fn read_index(self: &Arc<Self>, raft: &Raft) -> Result<u64, ReadIndexError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let this = self.clone();
            let raft = raft.clone();
            tokio::spawn(async move { this.rounds(raft).await });
        }
        rx.await.unwrap_or(Err(ReadIndexError::RoundLost))
    }

    /// Runs rounds while reads are waiting; each round answers the reads queued before it began.
    async fn rounds(&self, raft: Raft) {
        loop {
            let batch = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.waiting.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            let result = match raft.get_read_log_id().await {
                Ok((read_log_id, _)) => Ok(read_log_id.map(|l| l.index).unwrap_or(0)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                    Err(ReadIndexError::NotLeader)
                }
                Err(e) => Err(ReadIndexError::Unconfirmed(Arc::new(e))),
            };
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }
}
