//! Membership and follower reads on [`RaftNode`]: list the servers, add a server (learner,
//! then voter), remove one (never the last voter), and the read-index protocol a follower
//! uses to serve linearizable reads (ask the leader for its confirmed commit index, then wait
//! until that index is applied locally).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};

use super::node::{RaftNode, WriteError, REQUEST_TIMEOUT};

/// One server of the Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Raft node id.
    pub id: u64,
    /// Base URL the server is reached at.
    pub url: String,
    /// Whether it votes (false: a learner that only replicates).
    pub voter: bool,
    /// Whether it is the current leader (as this node knows it).
    pub leader: bool,
}

impl RaftNode {
    /// Whether this node has a membership (was initialized or received one from a leader).
    pub async fn is_initialized(&self) -> bool {
        self.raft().is_initialized().await.unwrap_or(false)
    }

    /// The servers of the current (last known) membership, ordered by id.
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft().metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                url: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
            })
            .collect()
    }

    /// The voter ids of the current membership.
    pub fn voter_ids(&self) -> BTreeSet<u64> {
        self.members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// Adds server `id` at `url`: as a learner (waiting until it has caught up), then as a
    /// voter. Idempotent: a server that already votes is left alone. Must run on the leader.
    pub async fn add_server(&self, id: u64, url: &str) -> Result<(), WriteError> {
        if self.voter_ids().contains(&id) {
            return Ok(());
        }
        self.add_learner(id, url.to_owned()).await?;
        let res = self
            .raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await;
        self.membership_result(res)
    }

    /// Removes server `id` from the voters and from the membership. Refuses to remove the
    /// last voter. Must run on the leader.
    pub async fn remove_server(&self, id: u64) -> Result<(), WriteError> {
        let voters = self.voter_ids();
        if voters.contains(&id) {
            if voters.len() <= 1 {
                return Err(WriteError::Refused(format!(
                    "server {id} is the last voter; removing it would destroy the cluster"
                )));
            }
            let res = self
                .raft()
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await;
            self.membership_result(res)?;
        }
        if self.members().iter().any(|m| m.id == id) {
            let res = self
                .raft()
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await;
            self.membership_result(res)?;
        }
        Ok(())
    }

    /// On the leader: confirms leadership with a quorum and returns the log index a
    /// linearizable read must wait for (the read index).
    ///
    /// The index is the larger of openraft's read log id and the leader's last log index when
    /// the call started. openraft 0.9's read log id is `max(committed, first log of the
    /// leader's term)`; a leader restarted without losing its term (openraft restores it as
    /// leader at once) starts from the committed id it last persisted, which this log store
    /// saves lazily, so writes of the current term that were acknowledged before the restart
    /// could lie above it and a read would miss them. Every acknowledged write is in the
    /// leader's log, so waiting for its last index is always enough.
    pub async fn read_index(&self) -> Result<u64, WriteError> {
        let last = self.raft().metrics().borrow().last_log_index.unwrap_or(0);
        let res = tokio::time::timeout(REQUEST_TIMEOUT, self.raft().get_read_log_id())
            .await
            .map_err(|_| WriteError::Timeout(REQUEST_TIMEOUT))?;
        match res {
            Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index).max(last)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(self.forward_error(&f))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(WriteError::Unavailable(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(WriteError::Fatal(f.to_string())),
        }
    }

    /// Waits until the log is applied up to `index` (a read index from the leader).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), WriteError> {
        let mut rx = self.applied_watch();
        let wait = async move {
            loop {
                if *rx.borrow_and_update() >= index {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteError::Unavailable("Raft is shut down".to_owned())),
            Err(_) => Err(WriteError::Timeout(timeout)),
        }
    }

    /// The members map for an initial membership of `(id, url)` pairs.
    pub fn initial_members(servers: &[(u64, String)]) -> BTreeMap<u64, BasicNode> {
        servers
            .iter()
            .map(|(id, url)| (*id, BasicNode::new(url.clone())))
            .collect()
    }
}
