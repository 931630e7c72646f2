//! Wakes the long-polls that an applied command concerns, and no others.
//!
//! `StateMachine::apply` records the wake-up keys of what it changed (`n/NODE` for a node's own
//! assignments and map, `net/KEY` for a network, `g/KEY` for a security group, `lb/KEY` for a
//! load balancer; `StateMachine::take_woken`). A node's long-poll registers one waiter under the
//! keys of what it sees (`StateMachine::wake_keys`), so a create in a network wakes the polls of
//! the nodes hosting that network through one key, whatever their number. A fleet watcher
//! (many hollow nodes behind one connection) gets the woken keys on a broadcast channel and
//! picks its own. A snapshot install wakes everyone.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{broadcast, Notify};

/// How many woken-key batches a fleet watcher may fall behind before it must re-check all.
const FLEET_BACKLOG: usize = 1024;

/// Waiters by wake-up key.
#[derive(Debug)]
pub struct Wakeups {
    waiters: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
    fleet: broadcast::Sender<Arc<BTreeSet<String>>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Self {
            waiters: Mutex::new(HashMap::new()),
            fleet: broadcast::channel(FLEET_BACKLOG).0,
        }
    }
}

impl Wakeups {
    /// A waiter notified when something under one of `keys` changes (its permit is kept, so a
    /// change between registering and waiting is not lost). Dropping it unregisters it.
    pub fn watch(&self, keys: impl IntoIterator<Item = String>) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        for k in keys {
            let list = waiters.entry(k).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&notify));
        }
        notify
    }

    /// A receiver of the woken keys of every applied batch (`Lagged`: re-check all).
    pub fn subscribe_fleet(&self) -> broadcast::Receiver<Arc<BTreeSet<String>>> {
        self.fleet.subscribe()
    }

    /// Wakes the waiters of `woken` keys; `None` wakes every waiter.
    pub fn notify(&self, woken: Option<BTreeSet<String>>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let wake = |list: &mut Vec<Weak<Notify>>| {
            list.retain(|w| match w.upgrade() {
                Some(n) => {
                    n.notify_one();
                    true
                }
                None => false,
            });
        };
        if let Some(keys) = &woken {
            for k in keys {
                if let Some(list) = waiters.get_mut(k) {
                    wake(list);
                    if list.is_empty() {
                        waiters.remove(k);
                    }
                }
            }
        } else {
            waiters.values_mut().for_each(wake);
            waiters.retain(|_, l| !l.is_empty());
        }
        drop(waiters);
        if self.fleet.receiver_count() > 0 {
            let _ = self.fleet.send(Arc::new(woken.unwrap_or_default()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_waiters_of_woken_keys_wake() {
        let w = Wakeups::default();
        let a = w.watch(["n/a".to_string(), "net/p/x".to_string()]);
        let b = w.watch(["n/b".to_string()]);
        w.notify(Some(["net/p/x".to_string()].into()));
        tokio::time::timeout(std::time::Duration::from_secs(1), a.notified())
            .await
            .expect("a woken through its network");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.notified())
                .await
                .is_err(),
            "b not woken"
        );
        w.notify(None);
        tokio::time::timeout(std::time::Duration::from_secs(1), b.notified())
            .await
            .expect("everyone woken");
        drop(a);
        drop(b);
        w.notify(None);
        assert!(
            w.waiters.lock().unwrap().is_empty(),
            "dropped waiters are forgotten"
        );
    }
}
