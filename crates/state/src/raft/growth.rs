//! When to snapshot: by the size and age of the log since the last snapshot, not only by its
//! entry count (one entry can hold hundreds of group-committed commands). Restart time is
//! the snapshot's load plus the replay of the log after it, so bounding the log's bytes bounds
//! restart time whatever the uptime; a cluster at rest writes nothing, so it snapshots never.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Snapshot once this many bytes of log were written since the last one.
pub const SNAPSHOT_LOG_BYTES: u64 = 16 << 20;
/// Snapshot a log that has grown at all once the last snapshot is this old.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(600);
/// How often the policy looks.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Log bytes written since the last snapshot, shared by the log store (which adds) and the
/// state-machine store (which resets when it builds a snapshot).
#[derive(Debug)]
pub struct LogGrowth {
    bytes: AtomicU64,
    since: Mutex<Instant>,
}

impl Default for LogGrowth {
    fn default() -> Self {
        Self {
            bytes: AtomicU64::new(0),
            since: Mutex::new(Instant::now()),
        }
    }
}

impl LogGrowth {
    /// Counts appended log bytes.
    pub fn appended(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot was built.
    pub fn snapshotted(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Whether a snapshot is due (pure given the readings; see the module docs).
    pub fn due(&self) -> bool {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let age = self
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        bytes >= SNAPSHOT_LOG_BYTES || (bytes > 0 && age >= SNAPSHOT_MAX_AGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_by_size_and_not_at_rest() {
        let g = LogGrowth::default();
        assert!(!g.due(), "nothing written");
        g.appended(SNAPSHOT_LOG_BYTES - 1);
        assert!(!g.due());
        g.appended(1);
        assert!(g.due());
        g.snapshotted();
        assert!(!g.due());
        // Old and grown: due; old and at rest: not.
        *g.since.lock().unwrap() = Instant::now().checked_sub(SNAPSHOT_MAX_AGE).unwrap();
        assert!(!g.due());
        g.appended(10);
        assert!(g.due());
    }
}
