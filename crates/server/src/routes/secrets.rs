//! `/v1/projects/{project}/secrets`: create (the value is sealed by this server before it is
//! proposed), list, get (metadata only), delete (refused while in use); the node-only fetch of
//! an instance's unsealed secrets; master-key rotation; and the sealing of load-balancer TLS
//! keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nimbus_api::lb::LoadBalancerSpec;
use nimbus_api::secret::{self, CreateSecretRequest, InstanceSecrets, Secret};
use nimbus_api::{validate, ApiError, ErrorCode};
use nimbus_state::secrets::{secret_aad, secret_key};
use nimbus_state::{Command, CommandOutput};
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::masterkey::RotateResponse;
use crate::routes::page::{ListOpts, Page};

fn check_project(app: &AppState, project: &str) -> Result<(), ApiError> {
    if app.read(|s| s.projects.contains_key(project)) {
        Ok(())
    } else {
        Err(ApiError::not_found("project", project).with_field("project"))
    }
}

/// Seals `value` and proposes the secret.
async fn put(
    app: &AppState,
    project: &str,
    name: &str,
    value: &[u8],
    labels: std::collections::BTreeMap<String, String>,
) -> Result<Secret, ApiError> {
    let sealed = app.keys.seal(value, &secret_aad(project, name))?;
    match app
        .propose(Command::CreateSecret {
            project: project.to_string(),
            name: name.to_string(),
            sealed,
            labels,
        })
        .await?
    {
        CommandOutput::Secret(s) => Ok(*s),
        other => Err(ApiError::internal(format!(
            "unexpected command output {other:?}"
        ))),
    }
}

/// Opens a secret of the project (`field` names it in errors).
fn open(
    app: &AppState,
    project: &str,
    name: &str,
    field: &str,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let sealed = app
        .read(|s| {
            s.secrets
                .get(&secret_key(project, name))
                .map(|v| v.sealed.clone())
        })
        .ok_or_else(|| ApiError::not_found("secret", name).with_field(field))?;
    app.keys.open(&sealed, &secret_aad(project, name))
}

/// Create a secret. The value (`data`, base64) is sealed under the cluster master key and is
/// never returned.
#[utoipa::path(post, path = "/v1/projects/{project}/secrets", request_body = CreateSecretRequest,
    params(("project" = String, Path)),
    responses((status = 201, body = Secret), (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody),
        (status = 409, body = nimbus_api::ErrorBody), (status = 413, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody),
        (status = 503, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiJson(req): ApiJson<CreateSecretRequest>,
) -> HttpResult<(StatusCode, Json<Secret>)> {
    let value = secret::create_secret(&req)?;
    check_project(&app, &project)?;
    let s = put(&app, &project, &req.name, &value, req.labels.clone()).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

/// List secrets (metadata only), in name order.
#[utoipa::path(get, path = "/v1/projects/{project}/secrets", params(("project" = String, Path), ListOpts),
    responses((status = 200, body = [Secret], headers(("Link" = String, description = "<next page>; rel=\"next\" when more remain"))),
        (status = 400, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Path(project): Path<String>,
    ApiQuery(o): ApiQuery<ListOpts>,
) -> HttpResult<Page<Secret>> {
    let after = o.start_after()?;
    if !o.stale {
        app.barrier().await?;
    }
    check_project(&app, &project)?;
    let path = format!("/v1/projects/{project}/secrets");
    Ok(app.read(|s| {
        Page::take(
            s.project_secrets(&project, after.as_deref()).cloned(),
            |x| &x.meta.name,
            &o,
            &path,
        )
    }))
}

/// Get a secret's metadata (never its value).
#[utoipa::path(get, path = "/v1/projects/{project}/secrets/{name}", params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Secret), (status = 404, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<Json<Secret>> {
    app.barrier().await?;
    check_project(&app, &project)?;
    app.read(|s| {
        s.secrets
            .get(&secret_key(&project, &name))
            .map(|v| v.secret.clone())
    })
    .map(Json)
    .ok_or_else(|| ApiError::not_found("secret", &name).into())
}

/// Delete a secret; refused (409) while an instance or a load balancer uses it.
#[utoipa::path(delete, path = "/v1/projects/{project}/secrets/{name}", params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    check_project(&app, &project)?;
    app.propose(Command::DeleteSecret { project, name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The unsealed secrets of an instance, for the node it is placed on only (node token).
#[utoipa::path(get, path = "/v1/nodes/{name}/instances/{id}/secrets", params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = InstanceSecrets), (status = 403, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody),
        (status = 422, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn for_instance(
    State(app): State<AppState>,
    Path((node, id)): Path<(String, String)>,
) -> HttpResult<Json<InstanceSecrets>> {
    app.barrier().await?;
    let inst = app
        .read(|s| s.instances.get(&id).cloned())
        .ok_or_else(|| ApiError::not_found("instance", &id))?;
    if inst.status.node.as_deref() != Some(node.as_str()) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("instance {id} is not placed on node {node}"),
        )
        .into());
    }
    let project = &inst.meta.project;
    let mut out = InstanceSecrets::default();
    for (i, u) in inst.spec.secrets.iter().enumerate() {
        let field = format!("secrets[{i}].secret");
        let value = open(&app, project, &u.secret, &field)?;
        if let Some(p) = &u.path {
            out.files.insert(p.clone(), secret::encode(&value));
        }
        if let Some(v) = &u.env {
            let text = std::str::from_utf8(&value)
                .ok()
                .filter(|t| !t.contains('\0'))
                .ok_or_else(|| {
                    ApiError::invalid(
                        field.clone(),
                        format!(
                            "secret {:?} is not text without NUL bytes, so it cannot be the environment variable {v}",
                            u.secret
                        ),
                    )
                })?;
            out.env.insert(v.clone(), text.to_string());
        }
    }
    Ok(Json(out))
}

/// Rotate the cluster master key: every sealed item is re-wrapped under a new key, which
/// every server then holds; the old key is forgotten.
#[utoipa::path(post, path = "/v1/cluster/master-key/rotate",
    responses((status = 200, body = RotateResponse), (status = 403, body = nimbus_api::ErrorBody), (status = 503, body = nimbus_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate(State(app): State<AppState>) -> HttpResult<Json<RotateResponse>> {
    // One rotation at a time on this server.
    static ROTATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = ROTATING.lock().await;
    Ok(Json(crate::masterkey::rotate(&app).await?))
}

/// Moves an inline LB TLS key into the secret `<lb>-tls-key` (sealed) and makes the spec
/// name it; for a spec naming a secret, checks the secret's key against the certificate.
/// Nothing is written when the key does not match.
pub async fn seal_lb_key(
    app: &AppState,
    project: &str,
    lb: &str,
    mut spec: LoadBalancerSpec,
) -> Result<LoadBalancerSpec, ApiError> {
    let Some(tls) = spec.tls.as_mut() else {
        return Ok(spec);
    };
    if let Some(name) = &tls.key_secret {
        let key = open(app, project, name, "tls.key_secret")?;
        let pem = std::str::from_utf8(&key).map_err(|_| {
            ApiError::invalid("tls.key_secret", "the secret is not a PEM private key")
        })?;
        nimbus_api::lb_tls::check_key(&tls.cert_pem, pem, "tls.key_secret")?;
        return Ok(spec);
    }
    // Inline: validate_spec already checked it against the certificate.
    let name = format!("{lb}-tls-key");
    validate::name("tls.key_pem", &name).map_err(|_| {
        ApiError::invalid(
            "tls.key_pem",
            "the load balancer name is too long to keep its key as <name>-tls-key; create a secret and pass key_secret",
        )
    })?;
    let key = Zeroizing::new(std::mem::take(&mut tls.key_pem).into_bytes());
    let existing = app.read(|s| s.secrets.contains_key(&secret_key(project, &name)));
    if existing {
        let held = open(app, project, &name, "tls.key_pem")?;
        if held.as_slice() != key.as_slice() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "secret {name:?} exists and holds another key; pass key_secret or delete it"
                ),
            )
            .with_field("tls.key_pem"));
        }
    } else {
        put(app, project, &name, &key, std::collections::BTreeMap::new()).await?;
    }
    tls.key_secret = Some(name);
    Ok(spec)
}

/// Moves the inline TLS keys of load balancers written by older builds into secrets (run by
/// the leader at start). Their old log entries keep the plain key until the log is compacted.
pub async fn migrate_lb_keys(app: &AppState) {
    let inline: Vec<(String, String, LoadBalancerSpec, u64)> = app.read(|s| {
        s.loadbalancers
            .values()
            .filter(|l| {
                l.spec
                    .tls
                    .as_ref()
                    .is_some_and(|t| !t.key_pem.is_empty() && t.key_secret.is_none())
            })
            .map(|l| {
                (
                    l.meta.project.clone(),
                    l.meta.name.clone(),
                    l.spec.clone(),
                    l.meta.version,
                )
            })
            .collect()
    });
    for (project, name, spec, version) in inline {
        let moved = match seal_lb_key(app, &project, &name, spec).await {
            Ok(spec) => {
                app.propose(Command::UpdateLoadBalancer {
                    project: project.clone(),
                    name: name.clone(),
                    spec: Box::new(spec),
                    version: Some(version),
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = moved {
            tracing::warn!(lb = %name, project = %project, "moving the TLS key into a secret: {}", e.message);
        } else {
            tracing::info!(lb = %name, project = %project, "TLS key moved into a secret");
        }
    }
}

/// Fills in the private keys of the LBs a node serves (its assignments only).
pub fn unseal_lb_keys(app: &AppState, lbs: &mut [nimbus_api::agent::LbAssignment]) {
    for lb in lbs {
        let project = lb.project.clone();
        let Some(tls) = lb.spec.tls.as_mut() else {
            continue;
        };
        let Some(name) = tls.key_secret.clone() else {
            continue;
        };
        match open(app, &project, &name, "tls.key_secret") {
            Ok(key) => tls.key_pem = String::from_utf8_lossy(&key).into_owned(),
            Err(e) => tracing::warn!(lb = %lb.name, "cannot unseal the TLS key: {}", e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;

    #[test]
    fn secrets_are_documented_in_the_openapi_spec() {
        let doc = serde_json::to_value(crate::routes::ApiDoc::openapi()).unwrap();
        let paths = &doc["paths"];
        for (path, method) in [
            ("/v1/projects/{project}/secrets", "post"),
            ("/v1/projects/{project}/secrets", "get"),
            ("/v1/projects/{project}/secrets/{name}", "get"),
            ("/v1/projects/{project}/secrets/{name}", "delete"),
            ("/v1/nodes/{name}/instances/{id}/secrets", "get"),
            ("/v1/cluster/master-key/rotate", "post"),
        ] {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} undocumented"
            );
        }
        let create = &paths["/v1/projects/{project}/secrets"]["post"]["responses"];
        for status in ["201", "409", "413", "422"] {
            assert!(
                create[status].is_object(),
                "create does not document {status}"
            );
        }
        let schemas = &doc["components"]["schemas"];
        for s in [
            "CreateSecretRequest",
            "Secret",
            "SecretUse",
            "InstanceSecrets",
        ] {
            assert!(schemas[s].is_object(), "schema {s} missing");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}
