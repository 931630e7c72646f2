//! `/v1/projects`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::{ApiError, CreateProjectRequest, Project};
use nimbus_state::{Command, CommandOutput};

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::routes::page::{keyed, ListOpts, Page};

/// Create a project.
#[utoipa::path(post, path = "/v1/projects", request_body = CreateProjectRequest, responses((status = 201, body = Project), (status = 409, body = nimbus_api::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CreateProjectRequest>,
) -> HttpResult<(StatusCode, Json<Project>)> {
    nimbus_api::validate::name("name", &req.name)?;
    match app
        .propose(Command::CreateProject {
            name: req.name,
            description: req.description,
            idempotency_key: crate::routes::instances::idempotency_key(&headers)?,
        })
        .await?
    {
        CommandOutput::Project(p) => Ok((StatusCode::CREATED, Json(p))),
        other => Err(ApiError::internal(format!("unexpected output {other:?}")).into()),
    }
}

/// List projects, in name order; `limit` and `continue` page through them.
#[utoipa::path(get, path = "/v1/projects", params(ListOpts), responses((status = 200, body = [Project], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))), (status = 400, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Project>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    Ok(app.read(|s| {
        Page::take(
            keyed(&s.projects, "", after.as_deref()).cloned(),
            |p| &p.meta.name,
            &o,
            "/v1/projects",
        )
    }))
}

/// Get a project.
#[utoipa::path(get, path = "/v1/projects/{project}", params(("project" = String, Path)), responses((status = 200, body = Project)))]
pub async fn get(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> HttpResult<Json<Project>> {
    app.barrier().await?;
    Ok(Json(
        app.read(|s| s.projects.get(&name).cloned())
            .ok_or_else(|| ApiError::not_found("project", &name))?,
    ))
}

/// Delete an empty project.
#[utoipa::path(delete, path = "/v1/projects/{project}", params(("project" = String, Path)), responses((status = 204)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> HttpResult<StatusCode> {
    app.propose(Command::DeleteProject { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}
