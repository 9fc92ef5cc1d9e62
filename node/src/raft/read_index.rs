//! Coalesces read-index rounds: every linearizable read needs the leader to confirm its
//! leadership with a quorum (a round of heartbeats) *after* the read arrived, and a follower
//! asks the leader for that. Reads that arrive while a round is in flight share the next round
//! instead of each starting its own ([`Rounds`]), so a burst of reads costs one round trip to
//! the followers (on a follower: one request to the leader), not one per read.
//!
//! Owns the queues of waiting reads. Invariant: a read is answered only by a round that started
//! after it was queued (its read index is at least the commit index at its arrival).

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use openraft::error::{LinearizableReadError, RaftError};
use tokio::sync::oneshot;

use crate::command::TypeConfig;
use openraft::storage::RaftStateMachine;

/// Why a round did not confirm a read index.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadIndexError {
    /// This node is not the leader.
    #[error("this node is not the leader")]
    NotLeader,
    /// A quorum did not confirm this node's leadership (openraft's reason).
    #[error("{0}")]
    Unconfirmed(Arc<RaftError<TypeConfig, LinearizableReadError<TypeConfig>>>),
    /// The confirmation round ended without an answer (the node is shutting down).
    #[error("the read index round ended without an answer")]
    RoundLost,
}

/// One round: an asynchronous call whose answer every caller queued before it began shares.
pub type RoundFn<T, E> = Arc<dyn Fn() -> BoxFuture<'static, Result<T, E>> + Send + Sync>;

type Waiter<T, E> = oneshot::Sender<Result<T, E>>;

/// Coalesces callers of a round (a leader's quorum confirmation, a follower's request to the
/// leader): callers that arrive while a round is in flight share the next round. Each caller
/// brings the round it would run; each round runs the one brought last (a follower's latest
/// idea of the leader, say).
///
/// Invariant: a caller is answered only by a round that started after it was queued.
pub struct Rounds<T, E> {
    state: Mutex<State<T, E>>,
}

struct State<T, E> {
    running: bool,
    waiting: Vec<Waiter<T, E>>,
    /// The round brought by the last caller.
    round: Option<RoundFn<T, E>>,
}

impl<T, E> Default for Rounds<T, E> {
    fn default() -> Self {
        Rounds {
            state: Mutex::new(State {
                running: false,
                waiting: Vec::new(),
                round: None,
            }),
        }
    }
}

impl<T: Clone + Send + 'static, E: Clone + Send + 'static> Rounds<T, E> {
    /// The answer of a round that starts after this call (`None`: the rounds ended without
    /// one, the node is shutting down).
    pub async fn join(self: &Arc<Self>, round: RoundFn<T, E>) -> Option<Result<T, E>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiting.push(tx);
            st.round = Some(round);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.rounds().await });
        }
        rx.await.ok()
    }

    /// Runs rounds while callers are waiting; each round answers the callers queued before it
    /// began.
    async fn rounds(&self) {
        loop {
            let (batch, round) = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let round = match (st.waiting.is_empty(), st.round.clone()) {
                    (false, Some(round)) => round,
                    _ => {
                        st.running = false;
                        st.round = None;
                        return;
                    }
                };
                (std::mem::take(&mut st.waiting), round)
            };
            let result = round().await;
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }
}

/// The leader's quorum confirmations, coalesced.
#[derive(Default)]
pub struct ReadIndexBatcher {
    rounds: Arc<Rounds<u64, ReadIndexError>>,
}

impl ReadIndexBatcher {
    /// The read index for a read arriving now (confirmed by a quorum after this call began).
    pub async fn read_index<SM: RaftStateMachine<TypeConfig>>(
        &self,
        raft: &openraft::Raft<TypeConfig, SM>,
    ) -> Result<u64, ReadIndexError> {
        let raft = raft.clone();
        let round: RoundFn<u64, ReadIndexError> = Arc::new(move || {
            let raft = raft.clone();
            Box::pin(async move {
                match raft
                    .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
                    .await
                {
                    Ok((read_log_id, _)) => Ok(read_log_id.index()),
                    Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
                        Err(ReadIndexError::NotLeader)
                    }
                    Err(e) => Err(ReadIndexError::Unconfirmed(Arc::new(e))),
                }
            })
        });
        self.rounds
            .join(round)
            .await
            .unwrap_or(Err(ReadIndexError::RoundLost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A round that counts how many rounds began, takes 50 ms, and answers `(tag, number)`.
    fn round(tag: u64, begun: &Arc<AtomicU64>) -> RoundFn<(u64, u64), ()> {
        let begun = begun.clone();
        Arc::new(move || {
            let begun = begun.clone();
            Box::pin(async move {
                let n = begun.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok((tag, n))
            })
        })
    }

    #[tokio::test]
    async fn callers_share_the_next_round_never_one_already_running() {
        let rounds: Arc<Rounds<(u64, u64), ()>> = Default::default();
        let begun = Arc::new(AtomicU64::new(0));
        let first = {
            let (r, f) = (rounds.clone(), round(1, &begun));
            tokio::spawn(async move { r.join(f).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(begun.load(Ordering::SeqCst), 1, "the first round runs");
        let later: Vec<_> = (0..10)
            .map(|_| {
                let (r, f) = (rounds.clone(), round(2, &begun));
                tokio::spawn(async move { r.join(f).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Some(Ok((1, 1))));
        for l in later {
            // Queued while round 1 ran: answered by round 2, which runs the round they brought.
            assert_eq!(l.await.unwrap(), Some(Ok((2, 2))));
        }
        assert_eq!(begun.load(Ordering::SeqCst), 2, "ten callers, one round");
        // Idle again: the next caller starts a round of its own.
        assert_eq!(rounds.join(round(3, &begun)).await, Some(Ok((3, 3))));
    }
}
