//! Wakes the long-polls of exactly the nodes an applied command concerned.
//!
//! `StateMachine::apply` records the nodes whose assignment or network revision moved
//! (`StateMachine::take_woken`); after each applied batch the store hands them to
//! [`Wakeups::notify`]. A node's long-poll waits on its own channel, so a change wakes one
//! task, not every agent's; a fleet watcher (many hollow nodes behind one connection) gets
//! the woken names on a broadcast channel and picks its own. A snapshot install wakes
//! everyone (anything may have changed).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{broadcast, watch};

/// How many woken-name batches a fleet watcher may fall behind before it must re-check all.
const FLEET_BACKLOG: usize = 1024;

/// The per-node wake-up channels.
#[derive(Debug)]
pub struct Wakeups {
    nodes: Mutex<HashMap<String, watch::Sender<u64>>>,
    fleet: broadcast::Sender<Arc<BTreeSet<String>>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            fleet: broadcast::channel(FLEET_BACKLOG).0,
        }
    }
}

impl Wakeups {
    /// A receiver that changes whenever `node`'s assignments or network map may have changed.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// A receiver of the woken node names of every applied batch (`Lagged`: re-check all).
    pub fn subscribe_fleet(&self) -> broadcast::Receiver<Arc<BTreeSet<String>>> {
        self.fleet.subscribe()
    }

    /// Wakes `woken` (after applying up to log index `index`); `None` wakes every node.
    pub fn notify(&self, woken: Option<BTreeSet<String>>, index: u64) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        match &woken {
            Some(w) => {
                for n in w {
                    if let Some(tx) = nodes.get(n) {
                        tx.send_replace(index);
                    }
                }
            }
            None => {
                for tx in nodes.values() {
                    tx.send_replace(index);
                }
            }
        }
        // Forget nodes nobody waits for.
        nodes.retain(|_, tx| tx.receiver_count() > 0);
        drop(nodes);
        if self.fleet.receiver_count() > 0 {
            let all = woken.unwrap_or_default();
            let _ = self.fleet.send(Arc::new(all));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_woken_node_wakes() {
        let w = Wakeups::default();
        let mut a = w.subscribe("a");
        let b = w.subscribe("b");
        w.notify(Some(["a".to_string()].into()), 7);
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        assert_eq!(*a.borrow_and_update(), 7);
        w.notify(None, 8);
        assert!(b.has_changed().unwrap());
        assert!(a.has_changed().unwrap());
    }
}
