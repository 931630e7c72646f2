//! `/v1/projects/{project}/volumes`: create, list, get, delete, snapshot, resize, restore; and
//! `/v1/storage/pools`: list and get. Records only: volumes have no data path yet.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::volume::{
    self, CreateVolumeRequest, ResizeVolumeRequest, RestoreVolumeRequest, SnapshotVolumeRequest,
    StoragePool, Volume,
};
use nimbus_api::ApiError;
use nimbus_state::volumes::volume_key;
use nimbus_state::{Command, CommandOutput};

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::routes::page::{ListOpts, Page};

fn check_project(app: &AppState, project: &str) -> Result<(), ApiError> {
    if app.read(|s| s.projects.contains_key(project)) {
        Ok(())
    } else {
        Err(ApiError::not_found("project", project).with_field("project"))
    }
}

fn vol(out: CommandOutput) -> Result<Volume, ApiError> {
    match out {
        CommandOutput::Volume(v) => Ok(*v),
        other => Err(ApiError::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

/// Create a volume (size at most 16 TiB; pool `local` by default).
#[utoipa::path(post, path = "/v1/projects/{project}/volumes", request_body = CreateVolumeRequest,
    params(("project" = String, Path)),
    responses((status = 201, body = Volume)),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> HttpResult<(StatusCode, Json<Volume>)> {
    let draft = volume::create_volume(&req)?;
    check_project(&app, &project)?;
    let out = app
        .propose(Command::CreateVolume {
            project,
            volume: draft,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(vol(out)?)))
}

/// List volumes, in name order.
#[utoipa::path(get, path = "/v1/projects/{project}/volumes", params(("project" = String, Path), ListOpts),
    responses((status = 200, body = [Volume], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain")))),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Volume>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let path = format!("/v1/projects/{project}/volumes");
    Ok(app.read(|s| {
        Page::take(
            s.project_volumes(&project, after.as_deref()).cloned(),
            |x| &x.meta.name,
            &o,
            &path,
        )
    }))
}

/// Get a volume.
#[utoipa::path(get, path = "/v1/projects/{project}/volumes/{name}", params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Volume)),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<Volume>> {
    app.barrier().await?;
    check_project(&app, &project)?;
    app.read(|s| s.volumes.get(&volume_key(&project, &name)).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::not_found("volume", &name).into())
}

/// Delete a volume; refused (409) while attached.
#[utoipa::path(delete, path = "/v1/projects/{project}/volumes/{name}", params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204)),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    check_project(&app, &project)?;
    app.propose(Command::DeleteVolume { project, name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Record a snapshot of a volume (409 if the name is taken).
#[utoipa::path(post, path = "/v1/projects/{project}/volumes/{name}/snapshots", request_body = SnapshotVolumeRequest,
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 201, body = Volume)),
    security(("bearer" = [])))]
pub async fn snapshot(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<SnapshotVolumeRequest>,
) -> HttpResult<(StatusCode, Json<Volume>)> {
    nimbus_api::validate::name("name", &req.name)?;
    check_project(&app, &project)?;
    let out = app
        .propose(Command::SnapshotVolume {
            project,
            name,
            snapshot: req.name,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(vol(out)?)))
}

/// Grow a volume (a smaller size is refused with 422; a stale `version` with 409).
#[utoipa::path(post, path = "/v1/projects/{project}/volumes/{name}/resize", request_body = ResizeVolumeRequest,
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Volume)),
    security(("bearer" = [])))]
pub async fn resize(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> HttpResult<Json<Volume>> {
    let size_bytes = volume::volume_size("size", &req.size)?;
    check_project(&app, &project)?;
    let out = app
        .propose(Command::ResizeVolume {
            project,
            name,
            size_bytes,
            version: req.version,
        })
        .await?;
    Ok(Json(vol(out)?))
}

/// Roll a volume back to one of its own snapshots (refused while attached).
#[utoipa::path(post, path = "/v1/projects/{project}/volumes/{name}/restore", request_body = RestoreVolumeRequest,
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Volume)),
    security(("bearer" = [])))]
pub async fn restore(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<RestoreVolumeRequest>,
) -> HttpResult<Json<Volume>> {
    volume::snapshot_ref(&req.snapshot)?;
    check_project(&app, &project)?;
    let out = app
        .propose(Command::RestoreVolume {
            project,
            name,
            snapshot: req.snapshot,
            version: req.version,
        })
        .await?;
    Ok(Json(vol(out)?))
}

/// List storage pools (the built-in `local` included).
#[utoipa::path(get, path = "/v1/storage/pools",
    responses((status = 200, body = [StoragePool])),
    security(("bearer" = [])))]
pub async fn list_pools(State(app): State<AppState>) -> HttpResult<Json<Vec<StoragePool>>> {
    app.barrier().await?;
    Ok(Json(
        app.read(nimbus_state::StateMachine::storage_pool_list),
    ))
}

/// Get a storage pool.
#[utoipa::path(get, path = "/v1/storage/pools/{name}", params(("name" = String, Path)),
    responses((status = 200, body = StoragePool)),
    security(("bearer" = [])))]
pub async fn get_pool(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> HttpResult<Json<StoragePool>> {
    app.barrier().await?;
    app.read(|s| s.storage_pool(&name))
        .map(Json)
        .ok_or_else(|| ApiError::not_found("storage pool", &name).into())
}

/// The volume and storage-pool routes.
pub fn router() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/projects/{project}/volumes", post(create).get(list))
        .route(
            "/v1/projects/{project}/volumes/{name}",
            get(self::get).delete(delete),
        )
        .route(
            "/v1/projects/{project}/volumes/{name}/snapshots",
            post(snapshot),
        )
        .route("/v1/projects/{project}/volumes/{name}/resize", post(resize))
        .route(
            "/v1/projects/{project}/volumes/{name}/restore",
            post(restore),
        )
        .route("/v1/storage/pools", get(list_pools))
        .route("/v1/storage/pools/{name}", get(get_pool))
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;

    #[test]
    fn volumes_are_documented_with_their_statuses() {
        let doc = serde_json::to_value(crate::routes::ApiDoc::openapi()).unwrap();
        let paths = &doc["paths"];
        let ops = [
            ("/v1/projects/{project}/volumes", "post", "201"),
            ("/v1/projects/{project}/volumes", "get", "200"),
            ("/v1/projects/{project}/volumes/{name}", "get", "200"),
            ("/v1/projects/{project}/volumes/{name}", "delete", "204"),
            (
                "/v1/projects/{project}/volumes/{name}/snapshots",
                "post",
                "201",
            ),
            (
                "/v1/projects/{project}/volumes/{name}/resize",
                "post",
                "200",
            ),
            (
                "/v1/projects/{project}/volumes/{name}/restore",
                "post",
                "200",
            ),
            ("/v1/storage/pools", "get", "200"),
            ("/v1/storage/pools/{name}", "get", "200"),
        ];
        for (path, method, ok) in ops {
            let r = &paths[path][method]["responses"];
            assert!(r[ok].is_object(), "{method} {path} lacks {ok}");
            for s in ["400", "401", "403", "404", "503"] {
                assert!(r[s].is_object(), "{method} {path} lacks {s}");
            }
            if method != "get" {
                for s in ["409", "413", "422"] {
                    assert!(r[s].is_object(), "{method} {path} lacks {s}");
                }
            }
        }
        let schemas = &doc["components"]["schemas"];
        for s in [
            "Volume",
            "StoragePool",
            "CreateVolumeRequest",
            "ResizeVolumeRequest",
            "VolumeUse",
        ] {
            assert!(schemas[s].is_object(), "schema {s} missing");
        }
    }
}
