//! The REST API router.

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_api::Health;
use utoipa::OpenApi;

use crate::app::AppState;
use spec::Documented;

pub mod events;
pub mod fleet;
pub mod images;
pub mod instances;
pub mod loadbalancers;
pub mod networks;
pub mod nodes;
pub mod page;
pub mod projects;
pub mod secrets;
pub mod spec;
pub mod volumes;

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "nimbus",
        description = "The nimbus cloud REST API. Every route but /healthz needs `Authorization: Bearer TOKEN`."
    ),
    paths(
        health,
        projects::create,
        projects::list,
        projects::get,
        projects::delete,
        instances::create,
        instances::list,
        instances::get,
        instances::start,
        instances::stop,
        instances::restart,
        instances::delete,
        instances::exec,
        instances::logs,
        instances::console,
        loadbalancers::create,
        loadbalancers::list,
        loadbalancers::get,
        loadbalancers::update,
        loadbalancers::delete,
        loadbalancers::backends,
        nodes::lb_health,
        nodes::vip_lease,
        nodes::register,
        nodes::list,
        nodes::get,
        nodes::update,
        nodes::remove,
        nodes::drain,
        nodes::heartbeat,
        nodes::status,
        nodes::assignments,
        fleet::register,
        fleet::heartbeats,
        fleet::status,
        fleet::watch,
        images::import,
        images::list,
        images::get,
        images::delete,
        images::blob,
        events::list,
        networks::create,
        networks::list,
        networks::get,
        networks::delete,
        networks::create_group,
        networks::list_groups,
        networks::get_group,
        networks::delete_group,
        networks::add_rule,
        networks::delete_rule,
        secrets::create,
        secrets::list,
        secrets::get,
        secrets::delete,
        secrets::for_instance,
        secrets::rotate,
        volumes::create,
        volumes::list,
        volumes::get,
        volumes::delete,
        volumes::snapshot,
        volumes::resize,
        volumes::restore,
        volumes::list_pools,
        volumes::get_pool,
    ),
    components(schemas(nimbus_api::ErrorBody, nimbus_api::ApiError, nimbus_api::ErrorCode)),
    modifiers(&Documented)
)]
pub struct ApiDoc;

/// Liveness and leader.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn health(State(app): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        leader: app.raft.leader(),
    })
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::identity::PkiDoc::openapi());
    utoipa::Modify::modify(&Documented, &mut doc);
    Json(doc)
}

async fn not_found() -> crate::error::HttpError {
    crate::error::HttpError(nimbus_api::ApiError::new(
        nimbus_api::ErrorCode::NotFound,
        "no such route",
    ))
}

/// Builds the API router (without the Raft RPC routes).
pub fn router(app: AppState) -> Router {
    let limit = app.cfg.body_limit;
    let json_routes = Router::new()
        .route("/healthz", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/projects", post(projects::create).get(projects::list))
        .route(
            "/v1/projects/{project}",
            get(projects::get).delete(projects::delete),
        )
        .route(
            "/v1/projects/{project}/instances",
            post(instances::create).get(instances::list),
        )
        .route(
            "/v1/projects/{project}/instances/{name}",
            get(instances::get).delete(instances::delete),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/start",
            post(instances::start),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/stop",
            post(instances::stop),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/restart",
            post(instances::restart),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/exec",
            post(instances::exec),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/logs",
            get(instances::logs),
        )
        .route(
            "/v1/projects/{project}/instances/{name}/console",
            get(instances::console),
        )
        .route(
            "/v1/projects/{project}/loadbalancers",
            post(loadbalancers::create).get(loadbalancers::list),
        )
        .route(
            "/v1/projects/{project}/loadbalancers/{name}",
            get(loadbalancers::get)
                .patch(loadbalancers::update)
                .delete(loadbalancers::delete),
        )
        .route(
            "/v1/projects/{project}/loadbalancers/{name}/backends",
            get(loadbalancers::backends),
        )
        .route("/v1/nodes/{name}/lb-health", post(nodes::lb_health))
        .route("/v1/nodes/{name}/vip-lease", post(nodes::vip_lease))
        .route(
            "/v1/projects/{project}/networks",
            post(networks::create).get(networks::list),
        )
        .route(
            "/v1/projects/{project}/networks/{name}",
            get(networks::get).delete(networks::delete),
        )
        .route(
            "/v1/projects/{project}/security-groups",
            post(networks::create_group).get(networks::list_groups),
        )
        .route(
            "/v1/projects/{project}/security-groups/{name}",
            get(networks::get_group).delete(networks::delete_group),
        )
        .route(
            "/v1/projects/{project}/security-groups/{name}/rules",
            post(networks::add_rule),
        )
        .route(
            "/v1/projects/{project}/security-groups/{name}/rules/{rule}",
            axum::routing::delete(networks::delete_rule),
        )
        .route("/v1/nodes", post(nodes::register).get(nodes::list))
        .route(
            "/v1/nodes/{name}",
            get(nodes::get).patch(nodes::update).delete(nodes::remove),
        )
        .route("/v1/nodes/{name}/heartbeat", post(nodes::heartbeat))
        .route("/v1/nodes/{name}/drain", post(nodes::drain))
        .route("/v1/nodes/{name}/status", post(nodes::status))
        .route("/v1/nodes/{name}/assignments", get(nodes::assignments))
        .route("/v1/fleet/register", post(fleet::register))
        .route("/v1/fleet/heartbeats", post(fleet::heartbeats))
        .route("/v1/fleet/status", post(fleet::status))
        .route("/v1/fleet/{fleet}/watch", get(fleet::watch))
        .route("/v1/images", get(images::list))
        .route("/v1/images/{name}", get(images::get).delete(images::delete))
        .route("/v1/images/blobs/{digest}", get(images::blob))
        .route("/v1/events", get(events::list))
        .route(
            "/v1/projects/{project}/secrets",
            post(secrets::create).get(secrets::list),
        )
        .route(
            "/v1/projects/{project}/secrets/{name}",
            get(secrets::get).delete(secrets::delete),
        )
        .route(
            "/v1/nodes/{name}/instances/{id}/secrets",
            get(secrets::for_instance),
        )
        .route("/v1/cluster/master-key/rotate", post(secrets::rotate))
        .merge(volumes::router())
        .merge(crate::identity::router())
        .layer(DefaultBodyLimit::max(limit));
    let upload = Router::new()
        .route("/v1/images", post(images::import))
        .layer(DefaultBodyLimit::disable());
    json_routes
        .merge(upload)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::auth::require_token,
        ))
        // Outermost: every error, the token check's included, leaves as a JSON error body.
        .layer(axum::middleware::from_fn(crate::error::json_errors))
        .layer(axum::middleware::from_fn(crate::unread::close_if_unread))
        .with_state(app)
}
