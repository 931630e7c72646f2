//! `/v1/projects/{project}/networks` and `/v1/projects/{project}/security-groups`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::{
    AddRuleRequest, ApiError, CreateNetworkRequest, CreateSecurityGroupRequest, Network,
    SecurityGroup,
};
use nimbus_state::{Command, CommandOutput};

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::routes::page::{keyed, ListOpts, Page};

fn check_project(app: &AppState, project: &str) -> Result<(), ApiError> {
    if app.read(|s| s.projects.contains_key(project)) {
        Ok(())
    } else {
        Err(ApiError::not_found("project", project).with_field("project"))
    }
}

fn network(out: CommandOutput) -> Result<Network, ApiError> {
    match out {
        CommandOutput::Network(n) => Ok(*n),
        other => Err(ApiError::internal(format!("unexpected output {other:?}"))),
    }
}

fn group(out: CommandOutput) -> Result<SecurityGroup, ApiError> {
    match out {
        CommandOutput::SecurityGroup(g) => Ok(*g),
        other => Err(ApiError::internal(format!("unexpected output {other:?}"))),
    }
}

/// Create a network.
#[utoipa::path(post, path = "/v1/projects/{project}/networks", request_body = CreateNetworkRequest,
    params(("project" = String, Path)),
    responses((status = 201, body = Network), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiJson(request): ApiJson<CreateNetworkRequest>,
) -> HttpResult<(StatusCode, Json<Network>)> {
    check_project(&app, &project)?;
    nimbus_api::validate::net::create_network(&request)?;
    let out = app
        .propose(Command::CreateNetwork { project, request })
        .await?;
    Ok((StatusCode::CREATED, Json(network(out)?)))
}

/// List the project's networks.
#[utoipa::path(get, path = "/v1/projects/{project}/networks", params(("project" = String, Path), ListOpts), responses((status = 200, body = [Network], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Network>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let (prefix, path) = (
        format!("{project}/"),
        format!("/v1/projects/{project}/networks"),
    );
    Ok(app.read(|s| {
        Page::take(
            keyed(&s.networks, &prefix, after.as_deref()).cloned(),
            |n| &n.meta.name,
            &o,
            &path,
        )
    }))
}

/// Get one network.
#[utoipa::path(get, path = "/v1/projects/{project}/networks/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = Network), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<Network>> {
    app.barrier().await?;
    check_project(&app, &project)?;
    Ok(Json(
        app.read(|s| s.network_by_name(&project, &name).cloned())
            .ok_or_else(|| ApiError::not_found("network", &name))?,
    ))
}

/// Delete a network that has no instances.
#[utoipa::path(delete, path = "/v1/projects/{project}/networks/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 204), (status = 409, body = nimbus_api::ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    check_project(&app, &project)?;
    app.propose(Command::DeleteNetwork { project, name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a security group (rules: all ingress from its members, all egress).
#[utoipa::path(post, path = "/v1/projects/{project}/security-groups", request_body = CreateSecurityGroupRequest,
    params(("project" = String, Path)),
    responses((status = 201, body = SecurityGroup), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn create_group(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiJson(request): ApiJson<CreateSecurityGroupRequest>,
) -> HttpResult<(StatusCode, Json<SecurityGroup>)> {
    check_project(&app, &project)?;
    nimbus_api::validate::name("name", &request.name)?;
    let out = app
        .propose(Command::CreateSecurityGroup { project, request })
        .await?;
    Ok((StatusCode::CREATED, Json(group(out)?)))
}

/// List the project's security groups.
#[utoipa::path(get, path = "/v1/projects/{project}/security-groups", params(("project" = String, Path), ListOpts), responses((status = 200, body = [SecurityGroup], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list_groups(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<SecurityGroup>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let (prefix, path) = (
        format!("{project}/"),
        format!("/v1/projects/{project}/security-groups"),
    );
    Ok(app.read(|s| {
        Page::take(
            keyed(&s.security_groups, &prefix, after.as_deref()).cloned(),
            |g| &g.meta.name,
            &o,
            &path,
        )
    }))
}

/// Get one security group.
#[utoipa::path(get, path = "/v1/projects/{project}/security-groups/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = SecurityGroup), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn get_group(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<SecurityGroup>> {
    app.barrier().await?;
    check_project(&app, &project)?;
    Ok(Json(
        app.read(|s| s.security_group_by_name(&project, &name).cloned())
            .ok_or_else(|| ApiError::not_found("security group", &name))?,
    ))
}

/// Delete a security group no instance or rule uses.
#[utoipa::path(delete, path = "/v1/projects/{project}/security-groups/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 204), (status = 409, body = nimbus_api::ErrorBody)))]
pub async fn delete_group(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    check_project(&app, &project)?;
    app.propose(Command::DeleteSecurityGroup { project, name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a rule to a security group; every node enforces it within a second.
#[utoipa::path(post, path = "/v1/projects/{project}/security-groups/{name}/rules", request_body = AddRuleRequest,
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 201, body = SecurityGroup), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn add_rule(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    ApiJson(request): ApiJson<AddRuleRequest>,
) -> HttpResult<(StatusCode, Json<SecurityGroup>)> {
    check_project(&app, &project)?;
    nimbus_api::validate::net::rule(&request)?;
    let out = app
        .propose(Command::AddSecurityGroupRule {
            project,
            group: name,
            request,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(group(out)?)))
}

/// Delete a rule from a security group.
#[utoipa::path(delete, path = "/v1/projects/{project}/security-groups/{name}/rules/{rule}", params(("project" = String, Path), ("name" = String, Path), ("rule" = String, Path)), responses((status = 200, body = SecurityGroup), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn delete_rule(
    State(app): State<AppState>,
    Path((project, name, rule)): Path<(String, String, String)>,
) -> HttpResult<Json<SecurityGroup>> {
    check_project(&app, &project)?;
    let out = app
        .propose(Command::DeleteSecurityGroupRule {
            project,
            group: name,
            rule,
        })
        .await?;
    Ok(Json(group(out)?))
}
