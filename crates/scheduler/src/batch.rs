//! Batch placement of N identical instances.
//!
//! The batch is placed all-or-nothing, one scan per instance over the incrementally updated
//! engine (each commit is O(1) and refreshes only the chosen node's hot record, so there is no
//! rebuild between instances). The instances always spread across zones: with a `spread_group`
//! they count as members of that group (existing members included); without one they form an
//! anonymous group of their own, so the batch alone is balanced across zones, then across nodes.

use std::fmt;

use crate::{Cluster, InstanceRequest, Unschedulable};

const BATCH_GROUP: &str = "\u{0}batch";

/// A batch that could not be placed in full (nothing was committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Instances requested.
    pub requested: usize,
    /// Instances that fitted before the first failure.
    pub placed: usize,
    /// Why the next one did not fit.
    pub reason: Unschedulable,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "only {} of {} instances fit; then {}",
            self.placed, self.requested, self.reason
        )
    }
}

impl std::error::Error for BatchError {}

impl Cluster {
    /// Places `count` instances of `req` and commits them; returns their node indices in order.
    /// All-or-nothing: on failure nothing stays committed.
    pub fn place_batch(
        &mut self,
        req: &InstanceRequest,
        count: usize,
    ) -> Result<Vec<usize>, BatchError> {
        let anonymous = req.spread_group.is_none();
        let mut r = req.clone();
        if anonymous {
            r.spread_group = Some(BATCH_GROUP.to_string());
        }
        let mut placed = Vec::with_capacity(count);
        for _ in 0..count {
            match self.place(&r) {
                Ok(i) => {
                    self.commit(i, &r);
                    placed.push(i);
                }
                Err(reason) => {
                    for &i in &placed {
                        self.release(i, &r);
                    }
                    return Err(BatchError {
                        requested: count,
                        placed: placed.len(),
                        reason,
                    });
                }
            }
        }
        if anonymous {
            // The anonymous group only lives for this batch.
            let gid = self.group_id(BATCH_GROUP);
            for &i in &placed {
                self.group_member(gid, i, -1);
            }
        }
        Ok(placed)
    }
}
