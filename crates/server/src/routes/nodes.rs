//! `/v1/nodes`: agent registration, heartbeats, assignments (long-poll), status; operator
//! cordon/uncordon, drain and removal. Which caller may call which route is decided by
//! [`crate::auth::permits`]; registration also depends on the body (below).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nimbus_api::agent::{
    AssignmentsResponse, HeartbeatRequest, LbHealthReport, RegisterNodeRequest, RegisteredNode,
    StatusReport,
};
use nimbus_api::lb::{VipLeaseRequest, VipLeaseResponse};
use nimbus_api::{ApiError, ErrorCode, Node, UpdateNodeRequest};
use nimbus_state::{netmap, Command, CommandOutput, NodeRegistrar};
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::Identity;
use crate::beats::Beat;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::routes::page::{ListOpts, Page};

/// Register a node (shared node token: new nodes only; the answer carries the node's
/// credential, shown once) or re-register it (its own credential).
#[utoipa::path(post, path = "/v1/nodes", request_body = RegisterNodeRequest,
    responses((status = 200, body = RegisteredNode),
        (status = 400, body = nimbus_api::ErrorBody), (status = 401, body = nimbus_api::ErrorBody),
        (status = 403, body = nimbus_api::ErrorBody),
        (status = 409, description = "the node is registered already (the node token may only register new nodes) or its underlay address is another node's", body = nimbus_api::ErrorBody),
        (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn register(
    State(app): State<AppState>,
    Extension(who): Extension<Identity>,
    cert: Option<Extension<crate::identity::PeerIdentity>>,
    ApiJson(req): ApiJson<RegisterNodeRequest>,
) -> HttpResult<Json<RegisteredNode>> {
    let (by, credential) = if let Identity::Node(me) = &who {
        if *me != req.name {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "the credential of node {me} may not register node {}",
                    req.name
                ),
            )
            .with_field("name")
            .into());
        }
        if cert.is_some() {
            // A certificate of the cluster CA names the node (see `identity`).
            (NodeRegistrar::Certificate, None)
        } else {
            let credential_sha256 = app
                .read(|s| s.node_credentials.get(me).cloned())
                .unwrap_or_default();
            (NodeRegistrar::Node { credential_sha256 }, None)
        }
    } else {
        let (secret, credential_sha256) = crate::auth::new_node_credential(&req.name);
        (NodeRegistrar::NodeToken { credential_sha256 }, Some(secret))
    };
    match app
        .propose(Command::RegisterNodeAs { node: req, by })
        .await?
    {
        CommandOutput::Node(node) => {
            let agent_api_token = Some(crate::auth::agent_api_token(
                &app.creds.cluster_secret,
                &node.meta.name,
                &node.meta.id,
            ));
            Ok(Json(RegisteredNode {
                node,
                credential,
                agent_api_token,
                metrics_token_sha256: Some(hex::encode(app.creds.metrics_sha256)),
            }))
        }
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// Removal options.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveOpts {
    /// Remove the node even while instances are assigned to it: it is fenced like a lost node
    /// first (instances that restart move to other nodes, the others fail).
    #[serde(default)]
    pub force: bool,
}

/// Remove a node (admin): refused while instances are assigned unless `force`. Its credential
/// stops working at once; its agent must register anew (node token) to come back.
#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = String, Path), RemoveOpts),
    responses((status = 204),
        (status = 401, body = nimbus_api::ErrorBody), (status = 403, body = nimbus_api::ErrorBody),
        (status = 404, body = nimbus_api::ErrorBody),
        (status = 409, description = "instances are assigned to the node (use force)", body = nimbus_api::ErrorBody)))]
pub async fn remove(
    State(app): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(o): ApiQuery<RemoveOpts>,
) -> HttpResult<StatusCode> {
    app.propose(Command::RemoveNode {
        name,
        force: o.force,
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List nodes, in name order; `limit` and `continue` page through them.
#[utoipa::path(get, path = "/v1/nodes", params(crate::routes::page::ListOpts),
    responses((status = 200, body = [Node], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))),
        (status = 400, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Node>> {
    use std::ops::Bound;
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    let page = app.read(|s| {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Page::take(
            s.nodes
                .range((start, Bound::Unbounded))
                .map(|(_, n)| n.clone()),
            |n| &n.meta.name,
            &o,
            "/v1/nodes",
        )
    });
    Ok(Page {
        items: app.with_telemetry(page.items).await,
        next: page.next,
    })
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
    /// Also return once the node's network-map revision is above this (agents that program a
    /// datapath pass the revision of the map they hold); the answer then carries the map.
    #[serde(default)]
    pub net_after: Option<u64>,
    /// Answer with the changes since the map at `net_after` when this server can (it sent
    /// that map), instead of the whole map.
    #[serde(default)]
    pub delta: bool,
    /// Longest wait in seconds (default 30, at most 60).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// The node's assignments and network map (or its delta); blocks until either changes past
/// `after` / `net_after` or `wait` elapses. Only changes that concern this node wake it.
#[utoipa::path(get, path = "/v1/nodes/{name}/assignments", params(("name" = String, Path), ("after" = Option<u64>, Query), ("net_after" = Option<u64>, Query), ("delta" = Option<bool>, Query), ("wait" = Option<u64>, Query)), responses((status = 200, body = AssignmentsResponse)))]
pub async fn assignments(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(o): Query<PollOpts>,
) -> HttpResult<Json<AssignmentsResponse>> {
    if !app.read(|s| s.nodes.contains_key(&name)) {
        return Err(ApiError::not_found("node", &name).into());
    }
    if o.after > 0 {
        // Polling for what comes after `after` says everything up to it is applied (agents
        // reconcile their load balancers before they poll again): drains wait for that.
        let ack = Beat {
            node: name.clone(),
            acked: Some(o.after),
            ..Beat::default()
        };
        if let Err(e) = app.record_beats(vec![ack]).await {
            tracing::debug!(node = %name, "recording an assignment ack: {}", e.message);
        }
    }
    // One waiter under the keys of what this node sees (its own, its networks', its groups',
    // its LBs'): a change elsewhere does not wake it.
    let woken = app.raft.wakeups().watch(app.read(|s| s.wake_keys(&name)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(o.wait.unwrap_or(30).min(60));
    loop {
        let (rev, net_rev) =
            app.read(|s| (s.assignment_revision(&name), s.network_revision(&name)));
        if rev > o.after || o.net_after.is_some_and(|n| net_rev > n) || o.wait == Some(0) {
            break;
        }
        if tokio::time::timeout_at(deadline, woken.notified())
            .await
            .is_err()
        {
            break;
        }
    }
    let mut resp = app.read(|s| netmap::assignments_of(s, &name, o.net_after.is_some()));
    crate::routes::secrets::unseal_lb_keys(&app, &mut resp.loadbalancers);
    if let Some(map) = resp.network.take() {
        let delta = app
            .net_maps
            .sent(&name, map.clone())
            .filter(|_| o.delta)
            .and_then(|prev| {
                o.net_after
                    .filter(|h| *h == prev.revision)
                    .and_then(|_| prev.diff(&map))
            });
        match delta {
            Some(d) => resp.network_delta = Some(d),
            None => resp.network = Some(map),
        }
    }
    Ok(Json(resp))
}
