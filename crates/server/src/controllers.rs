//! Level-triggered controllers run on the leader: node liveness (leases held in memory, see
//! [`crate::telemetry`]), the periodic utilisation snapshot, and the retry of placements.

use std::time::Duration;

use nimbus_api::NodeState;
use nimbus_state::Command;
use tokio::time::Instant;

use crate::app::AppState;
use crate::telemetry::{changed_utilizations, Liveness, UTILIZATION_SNAPSHOT_EVERY};

/// How often the leader's controllers run.
const PASS_EVERY: Duration = Duration::from_millis(500);

/// Starts the controllers.
pub fn spawn(app: AppState) {
    tokio::spawn(leader_loop(app));
}

/// Runs the leader's passes while this server leads; forgets the leases when it stops.
async fn leader_loop(app: AppState) {
    let ttl = app.cfg.heartbeat_grace;
    let mut liveness: Option<Liveness> = None;
    let mut last_snapshot = Instant::now();
    let mut suppressed: Option<String> = None;
    let mut tick = tokio::time::interval(PASS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !app.raft.is_leader() {
            if liveness.take().is_some() {
                app.telemetry.clear();
            }
            continue;
        }
        let now = Instant::now();
        let l = liveness.get_or_insert_with(|| {
            last_snapshot = now;
            Liveness::new(now)
        });
        let nodes: Vec<(String, NodeState)> = app.read(|s| {
            s.nodes
                .values()
                .map(|n| (n.meta.name.clone(), n.state))
                .collect()
        });
        let verdict = l.pass(now, &nodes, &app.telemetry.last_seen(), ttl);
        if verdict.suppressed != suppressed {
            if let Some(why) = &verdict.suppressed {
                tracing::error!("node liveness: {why}");
            }
            suppressed.clone_from(&verdict.suppressed);
        }
        for name in verdict.down {
            let reason = format!("no heartbeat for {}s", ttl.as_secs());
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
        if now.duration_since(last_snapshot) >= UTILIZATION_SNAPSHOT_EVERY {
            last_snapshot = now;
            utilization_snapshot(&app).await;
        }
        finish_drains(&app).await;
        retry_pending(&app).await;
    }
}

/// Finishes the drains whose load-balancer nodes all applied the change (or went down, or
/// belong to a hollow fleet, which runs no load balancer), or that waited
/// [`DRAIN_TIMEOUT_MS`](nimbus_state::drain::DRAIN_TIMEOUT_MS) on this leader's clock.
pub async fn finish_drains(app: &AppState) {
    if !app.raft.is_leader() {
        return;
    }
    let acked = app.telemetry.acked();
    let now = Instant::now();
    let timeout = Duration::from_millis(nimbus_state::drain::DRAIN_TIMEOUT_MS);
    let done: Vec<String> = {
        let mut first_seen = app
            .drain_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let done = app.read(|s| {
            first_seen.retain(|id, _| s.drains.contains_key(id));
            s.drains
                .iter()
                .filter(|(id, d)| {
                    let seen = *first_seen.entry((*id).clone()).or_insert(now);
                    now.duration_since(seen) >= timeout
                        || d.nodes.iter().all(|n| {
                            acked.get(n).is_some_and(|a| *a >= d.since)
                                || s.nodes.get(n).is_none_or(|n| {
                                    n.state != NodeState::Ready
                                        || n.meta
                                            .labels
                                            .contains_key(nimbus_api::agent::FLEET_LABEL)
                                })
                        })
                })
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>()
        });
        done
    };
    if done.is_empty() {
        return;
    }
    if let Err(e) = app.propose(Command::FinishDrain { ids: done }).await {
        tracing::warn!("cannot finish load-balancer drains: {}", e.message);
    }
}

/// Commits the measurements that changed since the last snapshot (nothing when none did).
async fn utilization_snapshot(app: &AppState) {
    let live = app.telemetry.utilizations();
    app.telemetry
        .retain(|n| app.read(|s| s.nodes.contains_key(n)));
    let changed =
        app.read(|s| changed_utilizations(&live, &|n| s.nodes.get(n).map(|n| n.utilization)));
    if changed.is_empty() {
        return;
    }
    if let Err(e) = app
        .propose(Command::UtilizationSnapshot { nodes: changed })
        .await
    {
        tracing::warn!("cannot commit the utilisation snapshot: {}", e.message);
    }
}

/// Instances that are pending without a node (never placed) get another placement attempt.
async fn retry_pending(app: &AppState) {
    let pending: Vec<String> = app.read(|s| s.pending_instances().map(String::from).collect());
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
