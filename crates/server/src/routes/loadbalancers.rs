//! `/v1/projects/{project}/loadbalancers`: create, list, get, update (replace the spec), delete,
//! backends (health as reported by the nodes serving the LB).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::lb::{
    validate_spec, CreateLoadBalancerRequest, LbBackendHealth, LoadBalancer,
    UpdateLoadBalancerRequest,
};
use nimbus_api::{validate, ApiError};
use nimbus_state::{Command, CommandOutput};

use crate::app::AppState;
use crate::error::ApiQuery;
use crate::error::{ApiJson, HttpResult};
use crate::routes::page::{keyed, ListOpts, Page};

fn lb(out: CommandOutput) -> Result<LoadBalancer, ApiError> {
    match out {
        CommandOutput::LoadBalancer(l) => Ok(*l),
        other => Err(ApiError::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

fn check_project(app: &AppState, project: &str) -> Result<(), ApiError> {
    if app.read(|s| s.projects.contains_key(project)) {
        Ok(())
    } else {
        Err(ApiError::not_found("project", project).with_field("project"))
    }
}

/// Create a load balancer.
#[utoipa::path(post, path = "/v1/projects/{project}/loadbalancers", request_body = CreateLoadBalancerRequest,
    params(("project" = String, Path)),
    responses((status = 201, body = LoadBalancer), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiJson(req): ApiJson<CreateLoadBalancerRequest>,
) -> HttpResult<(StatusCode, Json<LoadBalancer>)> {
    check_project(&app, &project)?;
    validate::name("name", &req.name)?;
    for (k, v) in &req.labels {
        validate::label(k, v)?;
    }
    let spec = validate_spec(&req.spec)?;
    let spec = crate::routes::secrets::seal_lb_key(&app, &project, &req.name, spec).await?;
    let out = app
        .propose(Command::CreateLoadBalancer {
            project,
            name: req.name,
            spec: Box::new(spec),
            labels: req.labels,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(lb(out)?)))
}

/// List load balancers.
#[utoipa::path(get, path = "/v1/projects/{project}/loadbalancers", params(("project" = String, Path), ListOpts), responses((status = 200, body = [LoadBalancer], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<LoadBalancer>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let (prefix, path) = (
        format!("{project}/"),
        format!("/v1/projects/{project}/loadbalancers"),
    );
    let page = app.read(|s| {
        Page::take(
            keyed(&s.loadbalancers, &prefix, after.as_deref()).cloned(),
            |l| &l.meta.name,
            &o,
            &path,
        )
    });
    Ok(Page {
        items: app.with_lb_health(page.items).await,
        next: page.next,
    })
}

async fn find(app: &AppState, project: &str, name: &str) -> Result<LoadBalancer, ApiError> {
    check_project(app, project)?;
    let lb = app
        .read(|s| s.loadbalancer(project, name).cloned())
        .ok_or_else(|| ApiError::not_found("load balancer", name))?;
    Ok(app.with_lb_health(vec![lb]).await.remove(0))
}

/// Get one load balancer.
#[utoipa::path(get, path = "/v1/projects/{project}/loadbalancers/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = LoadBalancer), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<LoadBalancer>> {
    app.barrier().await?;
    Ok(Json(find(&app, &project, &name).await?))
}

/// Replace a load balancer's spec.
#[utoipa::path(patch, path = "/v1/projects/{project}/loadbalancers/{name}", request_body = UpdateLoadBalancerRequest, params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = LoadBalancer), (status = 404, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn update(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<UpdateLoadBalancerRequest>,
) -> HttpResult<Json<LoadBalancer>> {
    check_project(&app, &project)?;
    let spec = validate_spec(&req.spec)?;
    let spec = crate::routes::secrets::seal_lb_key(&app, &project, &name, spec).await?;
    let out = app
        .propose(Command::UpdateLoadBalancer {
            project,
            name,
            spec: Box::new(spec),
            version: req.version,
        })
        .await?;
    Ok(Json(lb(out)?))
}

/// Delete a load balancer.
#[utoipa::path(delete, path = "/v1/projects/{project}/loadbalancers/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 204), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    check_project(&app, &project)?;
    app.propose(Command::DeleteLoadBalancer { project, name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Backend health of a load balancer, per serving node.
#[utoipa::path(get, path = "/v1/projects/{project}/loadbalancers/{name}/backends", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = [LbBackendHealth]), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn backends(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<Vec<LbBackendHealth>>> {
    app.barrier().await?;
    let l = find(&app, &project, &name).await?;
    Ok(Json(l.status.backends))
}
