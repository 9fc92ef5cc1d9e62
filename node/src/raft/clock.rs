//! The leader's clock for log entries.
//!
//! Owns the timestamp stamped on each proposed entry. Invariant: timestamps never go backwards
//! along the log, even across leader changes and clock steps: every node observes the
//! timestamps of the entries it applies, and a new leader stamps at least one microsecond after
//! anything it has seen.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Monotonic entry clock (microseconds since the Unix epoch).
#[derive(Default)]
pub struct EntryClock {
    last_micros: AtomicI64,
}

fn wall_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl EntryClock {
    /// The timestamp for a new entry: the wall clock, or one past the last seen if that is later.
    pub fn next(&self) -> i64 {
        let now = wall_micros();
        let mut prev = self.last_micros.load(Ordering::Relaxed);
        loop {
            let ts = now.max(prev.saturating_add(1));
            match self.last_micros.compare_exchange_weak(
                prev,
                ts,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return ts,
                Err(p) => prev = p,
            }
        }
    }

    /// Records a timestamp seen in the log.
    pub fn observe(&self, ts: i64) {
        self.last_micros.fetch_max(ts, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn monotonic_after_observing_the_future() {
        let c = super::EntryClock::default();
        let future = super::wall_micros() + 10_000_000;
        c.observe(future);
        let a = c.next();
        let b = c.next();
        assert!(a > future && b > a);
    }
}
