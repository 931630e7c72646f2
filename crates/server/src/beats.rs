//! Heartbeats and telemetry on their way to the leader's store ([`crate::telemetry`]): the
//! API handlers call [`AppState::record_beats`], which records them when this server leads and
//! forwards them to the leader otherwise; a down node that is heard from again is marked ready
//! through Raft (the only write a heartbeat can cause). Servers exchange them on internal
//! routes that take the cluster secret: `POST /raft/fleet/beats` (forwarded heartbeats) and
//! `GET /raft/fleet/telemetry` (what a follower shows in `GET /v1/nodes`).

use std::collections::HashMap;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_api::lb::LoadBalancer;
use nimbus_api::{ApiError, ErrorCode, Node, NodeState};
use nimbus_state::Command;
use serde::Deserialize;
use tokio::time::Instant;

use crate::app::AppState;
pub use crate::telemetry::Beat;
use crate::telemetry::TelemetryView;

/// Internal route: heartbeats a follower forwards.
pub const PATH_BEATS: &str = "/raft/fleet/beats";
/// Internal route: the leader's telemetry.
pub const PATH_TELEMETRY: &str = "/raft/fleet/telemetry";

fn unavailable(message: String) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, message)
}

impl AppState {
    /// Records heartbeats in the leader's store (forwarding them when this server follows).
    pub async fn record_beats(&self, beats: Vec<Beat>) -> Result<(), ApiError> {
        match self.forwarder.leader_url() {
            Ok(None) => {
                self.record_beats_here(&beats).await;
                Ok(())
            }
            Ok(Some(url)) => self
                .forwarder
                .internal::<_, serde_json::Value>(
                    reqwest::Method::POST,
                    &url,
                    PATH_BEATS,
                    Some(&beats),
                )
                .await
                .map(|_| ())
                .map_err(unavailable),
            Err(e) => Err(unavailable(format!("cannot record the heartbeat: {e}"))),
        }
    }

    async fn record_beats_here(&self, beats: &[Beat]) {
        let now = Instant::now();
        let at = crate::app::now();
        for b in beats {
            self.telemetry.beat(b, now, &at);
        }
        if beats.iter().any(|b| b.acked.is_some()) {
            crate::controllers::finish_drains(self).await;
        }
        let revived: Vec<String> = self.read(|s| {
            beats
                .iter()
                .filter(|b| {
                    s.nodes
                        .get(&b.node)
                        .is_some_and(|n| n.state == NodeState::Down)
                })
                .map(|b| b.node.clone())
                .collect()
        });
        for name in revived {
            if let Err(e) = self
                .propose(Command::MarkNodeReady { name: name.clone() })
                .await
            {
                tracing::warn!(node = %name, "cannot mark node ready: {}", e.message);
            }
        }
    }

    /// The leader's telemetry of `names` (every node when `None`); empty when it cannot be
    /// had (the nodes are then shown with their committed fields only).
    pub async fn telemetry_views(
        &self,
        names: Option<&[String]>,
    ) -> HashMap<String, TelemetryView> {
        match self.forwarder.leader_url() {
            Ok(None) => self.telemetry.views(names),
            Ok(Some(url)) => {
                let query = names.map_or_else(String::new, |n| format!("?nodes={}", n.join(",")));
                self.forwarder
                    .internal::<(), HashMap<String, TelemetryView>>(
                        reqwest::Method::GET,
                        &url,
                        &format!("{PATH_TELEMETRY}{query}"),
                        None,
                    )
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            }
            Err(_) => HashMap::new(),
        }
    }

    /// Nodes as the API shows them: the committed resource with the leader's telemetry.
    pub async fn with_telemetry(&self, mut nodes: Vec<Node>) -> Vec<Node> {
        let names: Option<Vec<String>> =
            (nodes.len() == 1).then(|| vec![nodes[0].meta.name.clone()]);
        let views = self.telemetry_views(names.as_deref()).await;
        for n in &mut nodes {
            if let Some(v) = views.get(&n.meta.name) {
                crate::telemetry::apply(n, v);
            }
        }
        nodes
    }

    /// Load balancers as the API shows them: backend health from the leader's telemetry of
    /// their serving nodes.
    pub async fn with_lb_health(&self, mut lbs: Vec<LoadBalancer>) -> Vec<LoadBalancer> {
        let views = self.telemetry_views(None).await;
        for lb in &mut lbs {
            crate::telemetry::apply_lb(lb, &views);
        }
        lbs
    }
}

/// The internal routes (cluster secret).
pub fn internal_router(app: AppState) -> Router {
    Router::new()
        .route(PATH_BEATS, post(beats))
        .route(PATH_TELEMETRY, get(telemetry))
        .layer(middleware::from_fn_with_state(app.clone(), require_secret))
        .with_state(app)
}

pub(crate) async fn require_secret(
    State(app): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let ok = crate::auth::bearer(req.headers()).is_some_and(|t| app.forwarder.is_cluster_secret(t));
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "missing or wrong cluster secret").into_response()
    }
}

async fn beats(State(app): State<AppState>, Json(beats): Json<Vec<Beat>>) -> Response {
    if app.raft.is_leader() {
        app.record_beats_here(&beats).await;
        StatusCode::NO_CONTENT.into_response()
    } else {
        // Not forwarded again: the sender retries with the leader it learns next.
        (StatusCode::SERVICE_UNAVAILABLE, "not the leader").into_response()
    }
}

#[derive(Debug, Deserialize)]
struct TelemetryQuery {
    #[serde(default)]
    nodes: Option<String>,
}

async fn telemetry(
    State(app): State<AppState>,
    Query(q): Query<TelemetryQuery>,
) -> Json<HashMap<String, TelemetryView>> {
    let names: Option<Vec<String>> = q.nodes.map(|n| n.split(',').map(str::to_string).collect());
    Json(app.telemetry.views(names.as_deref()))
}

/// The network map last sent to each node, so the next long-poll that names its revision can
/// be answered with a delta (`nimbus_api::netmap_delta`). In memory only: after a restart, or
/// on another server, agents get the whole map once.
#[derive(Debug, Default)]
pub struct SentMaps {
    maps: std::sync::Mutex<HashMap<String, nimbus_api::agent::NetworkMap>>,
}

impl SentMaps {
    /// Records `map` as sent to `node` and returns the map sent before it.
    pub fn sent(
        &self,
        node: &str,
        map: nimbus_api::agent::NetworkMap,
    ) -> Option<nimbus_api::agent::NetworkMap> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_string(), map)
    }
}
