//! Cancel requests (psql's Ctrl-C): a client opens a new connection and sends the process id
//! and secret key its session was given at startup; the session's running read then ends
//! with `57014`.
//!
//! Owns the registry of this node's sessions by (process id, secret key). A write is not
//! cancelled once submitted (its outcome is decided by the log); a read is, and its
//! PostgreSQL connection is closed, which stops the query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The cancel signal of one session.
#[derive(Debug, Default)]
pub struct CancelSignal {
    fired: AtomicBool,
    notify: Notify,
}

impl CancelSignal {
    /// Clears an earlier cancel (a new statement starts).
    pub fn reset(&self) {
        self.fired.store(false, Ordering::SeqCst);
    }

    /// Cancels the session's running statement.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once the running statement is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.fired.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// The sessions of this node that can be cancelled.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<(i32, i32), Arc<CancelSignal>>>,
    next_pid: AtomicI32,
}

/// A session's entry in the registry, removed when dropped.
pub struct Registered {
    registry: Arc<Registry>,
    key: (i32, i32),
    /// The session's signal.
    pub signal: Arc<CancelSignal>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut s) = self.registry.sessions.lock() {
            s.remove(&self.key);
        }
    }
}

impl Registered {
    /// The process id and secret key given to the client.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }
}

impl Registry {
    /// Registers a new session with a fresh process id and a random secret key.
    pub fn register(self: &Arc<Self>) -> Registered {
        let pid = 1 + self
            .next_pid
            .fetch_add(1, Ordering::Relaxed)
            .rem_euclid(i32::MAX - 1);
        let secret = i32::from_be_bytes(
            uuid::Uuid::new_v4().as_bytes()[..4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let signal = Arc::new(CancelSignal::default());
        if let Ok(mut s) = self.sessions.lock() {
            s.insert((pid, secret), signal.clone());
        }
        Registered {
            registry: self.clone(),
            key: (pid, secret),
            signal,
        }
    }

    /// Cancels the session with this process id and secret key, if there is one.
    pub fn cancel(&self, pid: i32, secret: i32) -> bool {
        let signal = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&(pid, secret)).cloned());
        match signal {
            Some(s) => {
                s.fire();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_reaches_its_session_only() {
        let r = Arc::new(Registry::default());
        let a = r.register();
        let b = r.register();
        assert_ne!(a.key(), b.key());
        let (pid, secret) = a.key();
        assert!(!r.cancel(pid, secret.wrapping_add(1)));
        assert!(r.cancel(pid, secret));
        a.signal.cancelled().await;
        assert!(!b.signal.fired.load(Ordering::SeqCst));
        drop(a);
        assert!(!r.cancel(pid, secret));
    }
}
