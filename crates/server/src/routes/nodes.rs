//! `/v1/nodes`: agent registration, heartbeats, assignments (long-poll), status; operator
//! cordon/uncordon.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::agent::{
    Assignment, AssignmentsResponse, HeartbeatRequest, ImageRef, LbHealthReport,
    RegisterNodeRequest, StatusReport,
};
use nimbus_api::lb::{VipLeaseRequest, VipLeaseResponse};
use nimbus_api::{ApiError, Node, UpdateNodeRequest};
use nimbus_state::{netmap, Command, CommandOutput, StateMachine};
use serde::Deserialize;

use crate::app::AppState;
use crate::error::{ApiJson, HttpResult};
use crate::fleet::Beat;

/// Register (or re-register) a node.
#[utoipa::path(post, path = "/v1/nodes", request_body = RegisterNodeRequest, responses((status = 200, body = Node)))]
pub async fn register(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<RegisterNodeRequest>,
) -> HttpResult<Json<Node>> {
    match app.propose(Command::RegisterNode(req)).await? {
        CommandOutput::Node(n) => Ok(Json(n)),
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// List nodes.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = [Node])))]
pub async fn list(State(app): State<AppState>) -> HttpResult<Json<Vec<Node>>> {
    app.barrier().await?;
    let nodes = app.read(|s| s.nodes.values().cloned().collect());
    Ok(Json(app.with_telemetry(nodes).await))
}

/// Get a node.
#[utoipa::path(get, path = "/v1/nodes/{name}", params(("name" = String, Path)), responses((status = 200, body = Node)))]
pub async fn get(State(app): State<AppState>, Path(name): Path<String>) -> HttpResult<Json<Node>> {
    app.barrier().await?;
    let node = app
        .read(|s| s.nodes.get(&name).cloned())
        .ok_or_else(|| ApiError::not_found("node", &name))?;
    let mut shown = app.with_telemetry(vec![node]).await;
    Ok(Json(shown.remove(0)))
}

/// Cordon / uncordon.
#[utoipa::path(patch, path = "/v1/nodes/{name}", request_body = UpdateNodeRequest, params(("name" = String, Path)), responses((status = 200, body = Node)))]
pub async fn update(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateNodeRequest>,
) -> HttpResult<Json<Node>> {
    let Some(cordoned) = req.cordoned else {
        return Err(ApiError::invalid("cordoned", "nothing to update: set cordoned").into());
    };
    match app
        .propose(Command::SetNodeCordon {
            name,
            cordoned,
            version: req.version,
        })
        .await?
    {
        CommandOutput::Node(n) => Ok(Json(n)),
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// Cordon the node and move its instances to other nodes through the scheduler.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = String, Path)), responses((status = 200, body = Node)))]
pub async fn drain(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> HttpResult<Json<Node>> {
    match app.propose(Command::DrainNode { name }).await? {
        CommandOutput::Node(n) => Ok(Json(n)),
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// Heartbeat: renews the node's lease in the leader's memory (no Raft write unless the node
/// was down).
#[utoipa::path(post, path = "/v1/nodes/{name}/heartbeat", request_body = HeartbeatRequest, params(("name" = String, Path)), responses((status = 204)))]
pub async fn heartbeat(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> HttpResult<StatusCode> {
    let memory = app
        .read(|s| s.nodes.get(&name).map(|n| n.capacity.memory_bytes))
        .ok_or_else(|| ApiError::not_found("node", &name))?;
    let utilization = nimbus_api::validate::heartbeat(&req, memory)?;
    app.record_beats(vec![Beat {
        node: name,
        utilization,
        ..Beat::default()
    }])
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Status reports: instance state transitions go through Raft; interface counters are
/// telemetry and stay in the leader's memory.
#[utoipa::path(post, path = "/v1/nodes/{name}/status", request_body = StatusReport, params(("name" = String, Path)), responses((status = 204)))]
pub async fn status(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<StatusReport>,
) -> HttpResult<StatusCode> {
    if !app.read(|s| s.nodes.contains_key(&name)) {
        return Err(ApiError::not_found("node", &name).into());
    }
    if !req.interfaces.is_empty() {
        app.record_beats(vec![Beat {
            node: name.clone(),
            interfaces: Some(req.interfaces),
            ..Beat::default()
        }])
        .await?;
    }
    if !req.instances.is_empty() {
        app.propose(Command::ReportStatus {
            node: name,
            reports: req.instances,
            interfaces: Vec::new(),
        })
        .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Backend health of the load balancers a node serves (telemetry in the leader's memory).
#[utoipa::path(post, path = "/v1/nodes/{name}/lb-health", request_body = LbHealthReport, params(("name" = String, Path)), responses((status = 204)))]
pub async fn lb_health(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<LbHealthReport>,
) -> HttpResult<StatusCode> {
    if !app.read(|s| s.nodes.contains_key(&name)) {
        return Err(ApiError::not_found("node", &name).into());
    }
    app.record_beats(vec![Beat {
        node: name,
        loadbalancers: Some(req.loadbalancers),
        ..Beat::default()
    }])
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Acquire, renew or release an LB's floating-VIP lease for the node. A request that would
/// surely be refused (another node's live lease, judged by this server's clock) is answered
/// without a Raft write; grants are decided by the state machine at the log time.
#[utoipa::path(post, path = "/v1/nodes/{name}/vip-lease", request_body = VipLeaseRequest, params(("name" = String, Path)), responses((status = 200, body = VipLeaseResponse)))]
pub async fn vip_lease(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VipLeaseRequest>,
) -> HttpResult<Json<VipLeaseResponse>> {
    let now = chrono::Utc::now().timestamp_millis();
    let refused = app.read(|s| {
        if !s.nodes.contains_key(&name) {
            return Err(ApiError::not_found("node", &name));
        }
        Ok(!req.release && s.vip_lease_refused(&req.project, &req.name, &name, now))
    })?;
    if refused {
        let lease = app.read(|s| {
            s.loadbalancer(&req.project, &req.name)
                .and_then(|lb| lb.status.vip.clone())
        });
        return Ok(Json(VipLeaseResponse {
            held: false,
            lease,
            ttl_ms: nimbus_api::lb::VIP_LEASE_TTL_MS,
        }));
    }
    match app
        .propose(Command::VipLease {
            node: name,
            project: req.project,
            name: req.name,
            vip: req.vip,
            release: req.release,
        })
        .await?
    {
        CommandOutput::VipLease(r) => Ok(Json(r)),
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// Long-poll parameters.
#[derive(Debug, Deserialize)]
pub struct PollOpts {
    /// Return once the node's assignment revision is above this.
    #[serde(default)]
    pub after: u64,
    /// Also return once the cluster's network revision is above this (agents that program a
    /// datapath pass the revision of the network map they hold).
    #[serde(default)]
    pub net_after: Option<u64>,
    /// Longest wait in seconds (default 30, at most 60).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// The node's assignments and network map; blocks until either changes past `after` /
/// `net_after` or `wait` elapses.
#[utoipa::path(get, path = "/v1/nodes/{name}/assignments", params(("name" = String, Path), ("after" = Option<u64>, Query), ("net_after" = Option<u64>, Query), ("wait" = Option<u64>, Query)), responses((status = 200, body = AssignmentsResponse)))]
pub async fn assignments(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(o): Query<PollOpts>,
) -> HttpResult<Json<AssignmentsResponse>> {
    if !app.read(|s| s.nodes.contains_key(&name)) {
        return Err(ApiError::not_found("node", &name).into());
    }
    let mut watch = app.raft.applied_watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(o.wait.unwrap_or(30).min(60));
    loop {
        let (rev, net_rev) = app.read(|s| (s.assignment_revision(&name), s.network_revision));
        if rev > o.after || o.net_after.is_some_and(|n| net_rev > n) || o.wait == Some(0) {
            break;
        }
        if tokio::time::timeout_at(deadline, watch.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(Json(app.read(|s| assignments_of(s, &name))))
}

/// Builds the assignments and the network map of a node from the state.
pub fn assignments_of(s: &StateMachine, node: &str) -> AssignmentsResponse {
    let assignments = s
        .instances_on(node)
        .filter_map(|i| {
            let image = s
                .images
                .values()
                .find(|im| im.digest == i.spec.image_digest)?;
            Some(Assignment {
                id: i.meta.id.clone(),
                name: i.meta.name.clone(),
                project: i.meta.project.clone(),
                generation: i.status.generation,
                desired: i.spec.desired,
                restart_nonce: i.spec.restart_nonce,
                spec: i.spec.clone(),
                image: ImageRef {
                    name: image.meta.name.clone(),
                    digest: image.digest.clone(),
                    layers: image.layers.clone(),
                    default_command: image.default_command.clone(),
                    default_env: image.default_env.clone(),
                    working_dir: image.working_dir.clone(),
                },
                network: netmap::attachment(s, i)?,
            })
        })
        .collect();
    AssignmentsResponse {
        revision: s.assignment_revision(node),
        assignments,
        loadbalancers: s.lb_assignments(node),
        network: netmap::network_map(s, node),
    }
}
