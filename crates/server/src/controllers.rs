//! Level-triggered controllers run on the leader: node liveness and the retry of placements.

use std::collections::HashMap;
use std::time::Duration;

use nimbus_api::{DesiredState, InstanceState, NodeState};
use nimbus_state::Command;
use tokio::time::Instant;

use crate::app::AppState;

/// Starts the controllers.
pub fn spawn(app: AppState) {
    tokio::spawn(node_liveness(app));
}

/// Marks nodes down when they miss heartbeats for the grace period. Uses the monotonic clock:
/// a node's deadline restarts whenever its recorded heartbeat changes, and on leadership change.
async fn node_liveness(app: AppState) {
    let grace = app.cfg.heartbeat_grace;
    let mut seen: HashMap<String, (String, Instant)> = HashMap::new();
    let mut was_leader = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let leader = app.raft.is_leader();
        if !leader {
            was_leader = false;
            continue;
        }
        if !was_leader {
            seen.clear();
            was_leader = true;
        }
        let now = Instant::now();
        let nodes: Vec<(String, String, NodeState)> = app.read(|s| {
            s.nodes
                .values()
                .map(|n| (n.meta.name.clone(), n.last_heartbeat.clone(), n.state))
                .collect()
        });
        for (name, hb, state) in nodes {
            let entry = seen
                .entry(name.clone())
                .or_insert_with(|| (hb.clone(), now));
            if entry.0 != hb {
                *entry = (hb, now);
                continue;
            }
            if state == NodeState::Ready && now.duration_since(entry.1) > grace {
                let reason = format!("no heartbeat for {}s", grace.as_secs());
                tracing::warn!(node = %name, "marking node down: {reason}");
                if let Err(e) = app
                    .propose(Command::MarkNodeDown {
                        name: name.clone(),
                        reason,
                    })
                    .await
                {
                    tracing::warn!(node = %name, "cannot mark node down: {}", e.message);
                }
            }
        }
        retry_pending(&app).await;
    }
}

/// Instances that are pending without a node (never placed) get another placement attempt.
async fn retry_pending(app: &AppState) {
    let pending: Vec<String> = app.read(|s| {
        s.instances
            .values()
            .filter(|i| {
                i.status.node.is_none()
                    && i.status.state == InstanceState::Pending
                    && i.spec.desired != DesiredState::Deleted
            })
            .map(|i| i.meta.id.clone())
            .collect()
    });
    for id in pending {
        let _ = app
            .propose(Command::ScheduleInstance {
                id,
                node: None,
                message: String::new(),
            })
            .await;
    }
}
