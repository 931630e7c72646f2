//! `/v1/fleet/...`: the agent protocol for many nodes behind one connection (hollow nodes,
//! `nimbus agent --hollow --hollow-count N`): batched registration, heartbeats and status
//! reports, and one long-poll for the assignments of all the nodes of a fleet (the nodes
//! labelled [`FLEET_LABEL`]`=<fleet>`). Woken only by changes to the fleet's own nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use nimbus_api::agent::{
    FleetHeartbeatRequest, FleetRegisterRequest, FleetRegisterResponse, FleetStatusRequest,
    FleetWatchResponse, FLEET_LABEL,
};
use nimbus_api::{ApiError, ErrorCode};
use nimbus_state::{netmap, Command, NodeRegistrar, StateMachine};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::app::AppState;
use crate::beats::Beat;
use crate::error::{ApiJson, ApiQuery, HttpResult};

/// Most nodes in one batched request.
pub const MAX_FLEET_BATCH: usize = 10_000;

fn check_batch(n: usize) -> Result<(), ApiError> {
    if n > MAX_FLEET_BATCH {
        return Err(ApiError::invalid(
            "nodes",
            format!("at most {MAX_FLEET_BATCH} nodes per request, got {n}"),
        ));
    }
    Ok(())
}

/// Checks that every node exists and is not a real node (one with its own credential: the
/// node token of a fleet may not act for it).
fn fleet_nodes<'a>(
    s: &StateMachine,
    mut nodes: impl Iterator<Item = &'a String>,
) -> Result<(), ApiError> {
    nodes.try_for_each(|n| {
        if !s.nodes.contains_key(n.as_str()) {
            Err(ApiError::not_found("node", n))
        } else if s.node_credentials.contains_key(n.as_str()) {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("node {n} is a real node; a hollow fleet may not act for it"),
            )
            .with_field("nodes"))
        } else {
            Ok(())
        }
    })
}

/// Registers (or re-registers) many hollow nodes (never a real node: one with a credential).
#[utoipa::path(post, path = "/v1/fleet/register", request_body = FleetRegisterRequest,
    responses((status = 200, body = FleetRegisterResponse), (status = 400, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn register(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<FleetRegisterRequest>,
) -> HttpResult<Json<FleetRegisterResponse>> {
    check_batch(req.nodes.len())?;
    // Proposed together: group commit packs them into few log entries.
    let results = futures::future::join_all(req.nodes.into_iter().map(|n| {
        let app = app.clone();
        async move {
            let name = n.name.clone();
            let by = NodeRegistrar::Fleet;
            (
                name,
                app.propose(Command::RegisterNodeAs { node: n, by }).await,
            )
        }
    }))
    .await;
    let refused = results
        .into_iter()
        .filter_map(|(n, r)| r.err().map(|e| (n, e)))
        .collect();
    Ok(Json(FleetRegisterResponse { refused }))
}

/// Renews the leases of many nodes (no Raft write).
#[utoipa::path(post, path = "/v1/fleet/heartbeats", request_body = FleetHeartbeatRequest,
    responses((status = 204), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn heartbeats(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<FleetHeartbeatRequest>,
) -> HttpResult<axum::http::StatusCode> {
    check_batch(req.nodes.len())?;
    app.read(|s| fleet_nodes(s, req.nodes.iter()))?;
    app.record_beats(
        req.nodes
            .into_iter()
            .map(|node| Beat {
                node,
                ..Beat::default()
            })
            .collect(),
    )
    .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Status reports of many nodes (one Raft command per node, group-committed).
#[utoipa::path(post, path = "/v1/fleet/status", request_body = FleetStatusRequest,
    responses((status = 204), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn status(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<FleetStatusRequest>,
) -> HttpResult<axum::http::StatusCode> {
    check_batch(req.nodes.len())?;
    app.read(|s| fleet_nodes(s, req.nodes.keys()))?;
    let results =
        futures::future::join_all(req.nodes.into_iter().filter(|(_, r)| !r.is_empty()).map(
            |(node, reports)| {
                app.propose(Command::ReportStatus {
                    node,
                    reports,
                    interfaces: Vec::new(),
                })
            },
        ))
        .await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(e.into());
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Watch parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchOpts {
    /// The revision of the previous answer (0: every node of the fleet).
    #[serde(default)]
    pub since: u64,
    /// Longest wait in seconds (default 30, at most 60).
    #[serde(default)]
    pub wait: Option<u64>,
}

fn in_fleet(s: &StateMachine, node: &str, fleet: &str) -> bool {
    s.nodes
        .get(node)
        .and_then(|n| n.meta.labels.get(FLEET_LABEL))
        .is_some_and(|f| f == fleet)
        && !s.node_credentials.contains_key(node)
}

/// The nodes whose assignments woken keys may concern: `n/NODE`, and the nodes serving a
/// woken `lb/KEY` (network and group keys only concern maps, which hollow nodes do not ask for).
fn woken_nodes(s: &StateMachine, keys: &std::collections::BTreeSet<String>) -> Vec<String> {
    let mut nodes = Vec::new();
    for k in keys {
        if let Some(n) = k.strip_prefix("n/") {
            nodes.push(n.to_string());
        } else if let Some(lb) = k.strip_prefix("lb/").and_then(|k| s.loadbalancers.get(k)) {
            nodes.extend(lb.status.nodes.iter().cloned());
        }
    }
    nodes
}

/// The fleet's nodes whose assignments changed after `since` (all of them for 0).
fn changed(s: &StateMachine, fleet: &str, since: u64) -> Vec<String> {
    s.nodes
        .values()
        .filter(|n| n.meta.labels.get(FLEET_LABEL).is_some_and(|f| f == fleet))
        .filter(|n| !s.node_credentials.contains_key(&n.meta.name))
        .filter(|n| since == 0 || s.assignment_revision(&n.meta.name) > since)
        .map(|n| n.meta.name.clone())
        .collect()
}

/// Long-polls the assignments of a fleet's nodes: answers with those that changed after
/// `since`, as soon as one did, or with none when the wait ends.
#[utoipa::path(get, path = "/v1/fleet/{fleet}/watch", params(("fleet" = String, Path), WatchOpts),
    responses((status = 200, body = FleetWatchResponse), (status = 400, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn watch(
    State(app): State<AppState>,
    Path(fleet): Path<String>,
    ApiQuery(o): ApiQuery<WatchOpts>,
) -> HttpResult<Json<FleetWatchResponse>> {
    nimbus_api::validate::label(FLEET_LABEL, &fleet).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("invalid fleet name {fleet:?}"),
        )
        .with_field("fleet")
    })?;
    let mut woken = app.raft.wakeups().subscribe_fleet();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(o.wait.unwrap_or(30).min(60));
    // The answer is built in the same read that found the changes, so nothing that changes
    // in between can fall below the revision it reports.
    let answer = |names: Option<&std::collections::BTreeSet<String>>| {
        app.read(|s| {
            let nodes: Vec<String> = match names {
                None => changed(s, &fleet, o.since),
                Some(keys) => woken_nodes(s, keys)
                    .into_iter()
                    .filter(|n| in_fleet(s, n, &fleet) && s.assignment_revision(n) > o.since)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            FleetWatchResponse {
                revision: s.revision,
                nodes: nodes
                    .iter()
                    .map(|n| (n.clone(), netmap::assignments_of(s, n, false)))
                    .collect::<BTreeMap<_, _>>(),
            }
        })
    };
    // The first look covers every node; later ones only the nodes a change woke.
    let mut out = answer(None);
    while out.nodes.is_empty() {
        match tokio::time::timeout_at(deadline, woken.recv()).await {
            Err(_) | Ok(Err(RecvError::Closed)) => break,
            Ok(Ok(names)) => out = answer(Some(&names)),
            Ok(Err(RecvError::Lagged(_))) => out = answer(None),
        }
    }
    Ok(Json(out))
}
