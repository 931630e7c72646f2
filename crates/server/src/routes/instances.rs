//! `/v1/projects/{project}/instances`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_api::{
    validate, ApiError, CreateInstanceRequest, DesiredState, ErrorCode, ExecRequest, ExecResponse,
    Instance, InstanceActionRequest,
};
use nimbus_state::{Command, CommandOutput, InstanceAction};
use serde::Deserialize;

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::routes::page::{ListOpts, Page};

fn instance(out: CommandOutput) -> Result<Instance, ApiError> {
    match out {
        CommandOutput::Instance(i) => Ok(*i),
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

/// The `Idempotency-Key` header, validated (1-255 printable ASCII characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::BadRequest,
            "Idempotency-Key must be 1-255 printable ASCII characters",
        )
        .with_field("Idempotency-Key")
    };
    let k = v.to_str().map_err(|_| bad())?;
    if k.is_empty() || k.len() > 255 {
        return Err(bad());
    }
    Ok(Some(k.to_string()))
}

/// Create an instance.
#[utoipa::path(post, path = "/v1/projects/{project}/instances", request_body = CreateInstanceRequest,
    params(("project" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, body = Instance), (status = 409, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateInstanceRequest>,
) -> HttpResult<(StatusCode, Json<Instance>)> {
    let draft = validate::create_instance(&project, &req)?;
    let key = idempotency_key(&headers)?;
    let out = app
        .propose(Command::CreateInstance {
            instance: Box::new(draft),
            idempotency_key: key,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(instance(out)?)))
}

/// List instances, in name order; `limit` and `continue` page through them.
#[utoipa::path(get, path = "/v1/projects/{project}/instances", params(("project" = String, Path), crate::routes::page::ListOpts),
    responses((status = 200, body = [Instance], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))),
        (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Instance>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let path = format!("/v1/projects/{project}/instances");
    Ok(app.read(|s| {
        Page::take(
            s.project_instances(&project, after.as_deref()).cloned(),
            |i| &i.meta.name,
            &o,
            &path,
        )
    }))
}

/// Get one instance.
#[utoipa::path(get, path = "/v1/projects/{project}/instances/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = Instance), (status = 404, body = nimbus_api::ErrorBody)))]
pub async fn get(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<Instance>> {
    app.barrier().await?;
    Ok(Json(find(&app, &project, &name)?))
}

/// Finds an instance or 404.
pub fn find(app: &AppState, project: &str, name: &str) -> Result<Instance, ApiError> {
    check_project(app, project)?;
    app.read(|s| s.instance_by_name(project, name).cloned())
        .ok_or_else(|| ApiError::not_found("instance", name))
}

fn optional_body(body: &[u8]) -> Result<Option<InstanceActionRequest>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split("unknown field `")
            .nth(1)
            .and_then(|s| s.split('`').next())
            .map(String::from);
        ApiError {
            code: ErrorCode::BadRequest,
            message: format!("invalid JSON body: {msg}"),
            field,
        }
    })
}

async fn action(
    app: AppState,
    project: String,
    name: String,
    action: InstanceAction,
    body: Option<InstanceActionRequest>,
) -> HttpResult<Json<Instance>> {
    check_project(&app, &project)?;
    let version = body.and_then(|b| b.version);
    let out = app
        .propose(Command::SetInstanceDesired {
            project,
            name,
            action,
            version,
        })
        .await?;
    Ok(Json(instance(out)?))
}

/// Start.
#[utoipa::path(post, path = "/v1/projects/{project}/instances/{name}/start", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = Instance)))]
pub async fn start(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> HttpResult<Json<Instance>> {
    action(app, p, n, InstanceAction::Start, optional_body(&body)?).await
}

/// Stop.
#[utoipa::path(post, path = "/v1/projects/{project}/instances/{name}/stop", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = Instance)))]
pub async fn stop(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> HttpResult<Json<Instance>> {
    action(app, p, n, InstanceAction::Stop, optional_body(&body)?).await
}

/// Restart.
#[utoipa::path(post, path = "/v1/projects/{project}/instances/{name}/restart", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = Instance)))]
pub async fn restart(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> HttpResult<Json<Instance>> {
    action(app, p, n, InstanceAction::Restart, optional_body(&body)?).await
}

/// Delete (asynchronous: the instance shows `deleting` until its node confirms).
#[utoipa::path(delete, path = "/v1/projects/{project}/instances/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 202, body = Instance)))]
pub async fn delete(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
) -> HttpResult<(StatusCode, Json<Instance>)> {
    let Json(i) = action(app, p, n, InstanceAction::Delete, None).await?;
    Ok((StatusCode::ACCEPTED, Json(i)))
}

/// The URL of the agent running `inst` and the credential the servers present to it.
fn agent_of(app: &AppState, inst: &Instance) -> Result<(String, String), ApiError> {
    let node = inst.status.node.clone().ok_or_else(|| {
        ApiError::conflict(format!(
            "instance {} is not placed on a node",
            inst.meta.name
        ))
    })?;
    let (target, hollow) = app
        .read(|s| {
            s.nodes.get(&node).map(|n| {
                let hollow = n.meta.labels.contains_key(nimbus_api::agent::FLEET_LABEL);
                let token = crate::auth::agent_api_token(
                    &app.creds.cluster_secret,
                    &n.meta.name,
                    &n.meta.id,
                );
                ((n.agent_url.clone(), token), hollow)
            })
        })
        .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, format!("node {node} is unknown")))?;
    if hollow {
        return Err(ApiError::conflict(format!(
            "instance {} runs on hollow node {node} (a test mode that runs nothing)",
            inst.meta.name
        )));
    }
    Ok(target)
}

/// Run a command in a running instance.
#[utoipa::path(post, path = "/v1/projects/{project}/instances/{name}/exec", request_body = ExecRequest, params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, body = ExecResponse)))]
pub async fn exec(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> HttpResult<Json<ExecResponse>> {
    let timeout = nimbus_api::validate::exec(&req)? + std::time::Duration::from_secs(10);
    let inst = find(&app, &p, &n)?;
    if inst.spec.desired == DesiredState::Deleted {
        return Err(ApiError::not_found("instance", &n).into());
    }
    let (url, token) = agent_of(&app, &inst)?;
    let resp = app
        .http
        .post(format!("{url}/agent/v1/instances/{}/exec", inst.meta.id))
        .bearer_auth(token)
        .timeout(timeout)
        .json(&req)
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("node agent unreachable: {e}"),
            )
        })?;
    Ok(forward_json(resp).await.map(Json)?)
}

async fn forward_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, ApiError> {
    if resp.status().is_success() {
        return resp
            .json()
            .await
            .map_err(|e| ApiError::internal(format!("bad agent answer: {e}")));
    }
    match resp.json::<nimbus_api::ErrorBody>().await {
        Ok(b) => Err(b.error),
        Err(e) => Err(ApiError::internal(format!("bad agent error answer: {e}"))),
    }
}

/// Log options.
#[derive(Debug, Deserialize)]
pub struct LogOpts {
    /// Keep streaming.
    #[serde(default)]
    pub follow: bool,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<u64>,
}

/// The instance's log (container stdout/stderr or VM console), optionally followed.
#[utoipa::path(get, path = "/v1/projects/{project}/instances/{name}/logs", params(("project" = String, Path), ("name" = String, Path), ("follow" = Option<bool>, Query), ("tail" = Option<u64>, Query)), responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn logs(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    ApiQuery(o): ApiQuery<LogOpts>,
) -> HttpResult<Response> {
    let inst = find(&app, &p, &n)?;
    let (url, token) = agent_of(&app, &inst)?;
    let mut req = app
        .http
        .get(format!("{url}/agent/v1/instances/{}/logs", inst.meta.id))
        .bearer_auth(token)
        .query(&[("follow", o.follow.to_string())]);
    if let Some(t) = o.tail {
        req = req.query(&[("tail", t.to_string())]);
    }
    let resp = req.send().await.map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("node agent unreachable: {e}"),
        )
    })?;
    if !resp.status().is_success() {
        return Err(forward_json::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or_else(|| ApiError::internal("agent failed"))
            .into());
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        Body::from_stream(resp.bytes_stream()),
    )
        .into_response())
}

/// Attach to the instance's interactive console (VM serial console) over an HTTP upgrade
/// (`Connection: upgrade`, `Upgrade: nimbus-console`); the connection then carries raw bytes.
#[utoipa::path(get, path = "/v1/projects/{project}/instances/{name}/console", params(("project" = String, Path), ("name" = String, Path)), responses((status = 101, description = "raw console stream follows")))]
pub async fn console(
    State(app): State<AppState>,
    Path((p, n)): Path<(String, String)>,
    mut req: axum::extract::Request,
) -> HttpResult<Response> {
    let inst = find(&app, &p, &n)?;
    let (url, token) = agent_of(&app, &inst)?;
    let resp = app
        .http
        .get(format!("{url}/agent/v1/instances/{}/console", inst.meta.id))
        .bearer_auth(token)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, "nimbus-console")
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("node agent unreachable: {e}"),
            )
        })?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Err(forward_json::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or_else(|| ApiError::internal("the agent did not switch protocols"))
            .into());
    }
    let mut agent_io = resp
        .upgrade()
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("console upgrade: {e}")))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(client) = on_upgrade.await {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut agent_io).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, "nimbus-console")
        .body(Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?)
}
