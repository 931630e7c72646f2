//! `/v1/images`: import (tarball upload), list, get, delete, and blob download for agents.

use std::io::Write as _;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use nimbus_api::{ApiError, ErrorCode, Image, Meta};
use nimbus_image::ImportedImage;
use nimbus_state::{Command, CommandOutput};
use serde::Deserialize;

use crate::app::AppState;
use crate::error::{ApiQuery, HttpResult};
use crate::routes::page::{keyed, ListOpts, Page};

/// Largest accepted image tarball.
pub const MAX_IMAGE_BYTES: u64 = 8 << 30;

/// Import options.
#[derive(Debug, Deserialize)]
pub struct ImportOpts {
    /// Name to give the image (default: from the tarball's tag).
    #[serde(default)]
    pub name: Option<String>,
}

/// Converts an imported image to the API record.
pub fn record(img: &ImportedImage) -> Image {
    Image {
        meta: Meta {
            id: String::new(),
            name: img.name.clone(),
            project: String::new(),
            version: 0,
            created_at: String::new(),
            updated_at: String::new(),
            labels: std::collections::BTreeMap::new(),
        },
        digest: img.digest.clone(),
        layers: img.layers.clone(),
        size_bytes: img.size_bytes,
        default_command: img.default_command.clone(),
        default_env: img.default_env.clone(),
        working_dir: img.working_dir.clone(),
    }
}

/// Records an imported image in the state.
pub async fn put(app: &AppState, img: &ImportedImage) -> Result<Image, ApiError> {
    match app.propose(Command::PutImage(record(img))).await? {
        CommandOutput::Image(i) => Ok(i),
        other => Err(ApiError::internal(format!("unexpected output {other:?}"))),
    }
}

/// Import an OCI image-layout or `docker save` tarball sent as the request body.
#[utoipa::path(post, path = "/v1/images", params(("name" = Option<String>, Query)), request_body(content = Vec<u8>, description = "The tarball (any content type: the CLI sends application/x-tar)", content_type = "application/octet-stream"), responses((status = 201, body = Image)))]
pub async fn import(
    State(app): State<AppState>,
    ApiQuery(o): ApiQuery<ImportOpts>,
    body: Body,
) -> HttpResult<(StatusCode, Json<Image>)> {
    if let Some(n) = &o.name {
        nimbus_api::validate::name("name", n)?;
    }
    let tmp_dir = app.cfg.data_dir.join("tmp");
    std::fs::create_dir_all(&tmp_dir)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", tmp_dir.display())))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
        .map_err(|e| ApiError::internal(format!("temp file: {e}")))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("reading upload: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_IMAGE_BYTES {
            return Err(
                ApiError::new(ErrorCode::PayloadTooLarge, "image tarball is over 8 GiB").into(),
            );
        }
        tmp.write_all(&chunk)
            .map_err(|e| ApiError::internal(format!("writing upload: {e}")))?;
    }
    if total == 0 {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "empty upload: send the image tarball as the body",
        )
        .into());
    }
    let store = app.images.clone();
    let path = tmp.path().to_path_buf();
    let name = o.name.clone();
    let imported =
        tokio::task::spawn_blocking(move || store.import_tarball(&path, name.as_deref()))
            .await
            .map_err(|e| ApiError::internal(format!("import task: {e}")))?
            .map_err(|e| {
                // The server's own paths (the upload's temporary file, the staging directory)
                // are nobody's business.
                let msg = redact_paths(&e.to_string(), &app.cfg.data_dir);
                ApiError::invalid("body", format!("not a valid image tarball: {msg}"))
            })?;
    drop(tmp);
    let img = put(&app, &imported).await?;
    Ok((StatusCode::CREATED, Json(img)))
}

/// List images, in name order; `limit` and `continue` page through them.
#[utoipa::path(get, path = "/v1/images", params(ListOpts), responses((status = 200, body = [Image], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))), (status = 400, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Image>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    Ok(app.read(|s| {
        Page::take(
            keyed(&s.images, "", after.as_deref()).cloned(),
            |i| &i.meta.name,
            &o,
            "/v1/images",
        )
    }))
}

/// Get an image.
#[utoipa::path(get, path = "/v1/images/{name}", params(("name" = String, Path)), responses((status = 200, body = Image)))]
pub async fn get(State(app): State<AppState>, Path(name): Path<String>) -> HttpResult<Json<Image>> {
    app.barrier().await?;
    Ok(Json(
        app.read(|s| s.images.get(&name).cloned())
            .ok_or_else(|| ApiError::not_found("image", &name))?,
    ))
}

/// Delete an image record (refused while instances use it).
#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path)), responses((status = 204)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> HttpResult<StatusCode> {
    app.propose(Command::DeleteImage { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Blob download options.
#[derive(Debug, Default, Deserialize)]
pub struct BlobOpts {
    /// Serve only what this server holds: do not fetch a missing blob from the other servers
    /// (what servers use among themselves).
    #[serde(default)]
    pub local: bool,
}

/// Download a blob (agents pull layers this way). A server of a cluster that does not hold
/// the blob fetches it from the other servers first (digest verified), unless `local=true`.
#[utoipa::path(get, path = "/v1/images/blobs/{digest}", params(("digest" = String, Path), ("local" = Option<bool>, Query)), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>)))]
pub async fn blob(
    State(app): State<AppState>,
    Path(digest): Path<String>,
    ApiQuery(o): ApiQuery<BlobOpts>,
) -> HttpResult<Response> {
    let valid = digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return Err(ApiError::not_found("blob", &digest).into());
    }
    if !app.images.has_blob(&digest) {
        if o.local || app.raft.members().len() <= 1 {
            return Err(ApiError::not_found("blob", &digest).into());
        }
        if let Err(e) = crate::blobs::ensure_local(&app, &digest).await {
            tracing::warn!(digest, "blob not held by any server: {e}");
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("blob {digest} is not held by this server nor by the other servers ({e})"),
            )
            .into());
        }
    }
    let file = tokio::fs::File::open(app.images.blob_path(&digest))
        .await
        .map_err(|e| ApiError::internal(format!("opening blob: {e}")))?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `msg` with every path under `dir` (up to the next space, quote or `:`) replaced by
/// `<server path>`.
pub fn redact_paths(msg: &str, dir: &std::path::Path) -> String {
    let dir = dir.display().to_string();
    if dir.is_empty() || dir == "/" {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find(&dir) {
        out.push_str(&rest[..at]);
        out.push_str("<server path>");
        let tail = &rest[at + dir.len()..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ':' | '"' | '\'' | ')' | ','))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact_paths;
    use std::path::Path;

    #[test]
    fn server_paths_are_redacted_from_import_errors() {
        let dir = Path::new("/var/lib/nimbus");
        assert_eq!(
            redact_paths(
                "open layer /var/lib/nimbus/tmp/import-Ab12/3: No such file; read /var/lib/nimbus/tmp/.tmpX",
                dir
            ),
            "open layer <server path>: No such file; read <server path>"
        );
        assert_eq!(
            redact_paths("bad image tarball: x", dir),
            "bad image tarball: x"
        );
        assert_eq!(redact_paths("a /var/lib/nimbus", dir), "a <server path>");
    }
}
