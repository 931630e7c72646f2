//! The agent's own API, called by the control plane: exec, logs, console; and `/metrics`.
//! Described by its own OpenAPI document (`/agent/v1/openapi.json`, fuzzed in CI with a server
//! certificate); every error is the server API's JSON error body (`nimbus_http`).
//!
//! - exec, logs, console, the OpenAPI document: only the servers. Over TLS (a node joined with a certificate) that
//!   is a server certificate of the cluster CA, and nothing else; in plain HTTP the servers'
//!   credential for this node (the `agent_api_token` of its registration answer; never the
//!   node token every agent holds).
//! - `/metrics`: the servers as above, or the cluster's metrics token (its SHA-256 comes with
//!   every registration answer; `nimbus agent --metrics-token-file` adds a local one), so a
//!   stock Prometheus can scrape it over TLS without a client certificate;
//! - `/agent/healthz`: open, answers only `ok` (liveness for load balancers and probes; it
//!   reveals nothing about the node).
//!
//! Tokens are compared in constant time (the metrics token by its hash).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_api::{ApiError, ErrorBody, ErrorCode, ExecRequest, ExecResponse};
use nimbus_http::{ApiJson, ApiQuery, HttpError};
use serde::Deserialize;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::credential::constant_time_eq;
use crate::driver::DriverError;
use crate::runtime::Agent;

fn err(e: ApiError) -> Response {
    HttpError(e).into_response()
}

fn driver_err(e: &DriverError) -> ApiError {
    match e {
        DriverError::NotFound(_) => ApiError::new(ErrorCode::NotFound, e.to_string()),
        DriverError::NotRunning(_) => ApiError::conflict(e.to_string()),
        DriverError::Timeout(_) => ApiError::new(ErrorCode::Unavailable, e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// How long exec, logs and console wait for the agent's first assignments after a start.
const FIRST_POLL_WAIT: Duration = Duration::from_secs(10);

/// The bearer token of a request (scheme in any case, RFC 7235).
fn bearer(req: &Request) -> Option<&str> {
    let v = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `token` is the servers' credential for this node (plain HTTP only: over TLS the
/// servers present their certificates).
fn is_server(agent: &Agent, token: &str) -> bool {
    if agent.cfg.api_tls.is_some() {
        return false;
    }
    let c = agent.credentials.lock().expect("credentials lock");
    !c.agent_api_token.is_empty()
        && constant_time_eq(token.as_bytes(), c.agent_api_token.as_bytes())
}

/// Whether `token` is a metrics token: the cluster's (by the hash the servers sent) or the
/// locally configured one.
fn is_metrics(agent: &Agent, token: &str) -> bool {
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let cluster = {
        let c = agent.credentials.lock().expect("credentials lock");
        !c.metrics_token_sha256.is_empty()
            && constant_time_eq(hash.as_bytes(), c.metrics_token_sha256.as_bytes())
    };
    let local = agent.cfg.metrics_token.as_ref().is_some_and(|m| {
        !m.is_empty()
            && constant_time_eq(
                hash.as_bytes(),
                hex::encode(sha2::Sha256::digest(m.as_bytes())).as_bytes(),
            )
    });
    cluster | local
}

fn unauthorized() -> Response {
    err(ApiError::new(
        ErrorCode::Unauthorized,
        "missing or invalid server credential",
    ))
}

/// Whether the request came over TLS with a cluster server's certificate (the agent API's
/// TLS listener lets no other client certificate in; see `tls.rs`).
fn over_server_tls(req: &Request) -> bool {
    req.extensions().get::<crate::tls::ServerPeer>().is_some()
}

async fn auth(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    if over_server_tls(&req) || bearer(&req).is_some_and(|t| is_server(&agent, t)) {
        next.run(req).await
    } else {
        unauthorized()
    }
}

/// Prometheus exposition of the node's load-balancer data plane.
#[utoipa::path(get, path = "/metrics", tag = "agent",
    security(("mutual_tls" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "no server certificate, servers' credential or metrics token", body = ErrorBody),
    ))]
async fn metrics(State(agent): State<Arc<Agent>>, req: Request) -> Response {
    let ok = over_server_tls(&req)
        || bearer(&req).is_some_and(|t| is_server(&agent, t) || is_metrics(&agent, t));
    if !ok {
        return err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing or invalid metrics token or server credential",
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        agent.lbs.metrics().encode(),
    )
        .into_response()
}

/// Liveness: answers `ok` to anyone and reveals nothing else.
#[utoipa::path(get, path = "/agent/healthz", tag = "agent", security(()),
    responses((status = 200, description = "the agent is up", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/agent/v1/openapi.json", tag = "agent",
    responses(
        (status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object),
        (status = 401, description = "not a server of the cluster", body = ErrorBody),
    ))]
async fn openapi() -> Response {
    Json(api_doc()).into_response()
}

async fn not_found() -> Response {
    err(ApiError::new(ErrorCode::NotFound, "no such route"))
}

/// The OpenAPI description of the agent's API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "nimbus agent API", description = "Called by the cluster's servers (mutual TLS with a server certificate, or the servers' bearer credential for this node in plain HTTP); `/metrics` also takes the metrics token."),
    paths(exec, logs, console, metrics, healthz, openapi),
    components(schemas(ExecRequest, ExecResponse, ErrorBody)),
    modifiers(&Security),
)]
struct AgentApiDoc;

/// Adds the two ways in: a server certificate (mutual TLS) or a bearer token.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
        };
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "mutual_tls",
            SecurityScheme::MutualTls {
                description: Some("a server certificate of the cluster CA".into()),
                extensions: None,
            },
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        api.security = Some(vec![
            SecurityRequirement::new("mutual_tls", Vec::<String>::new()),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
        ]);
    }
}

/// The agent API's OpenAPI document.
pub fn api_doc() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    AgentApiDoc::openapi()
}

/// The router. Every error leaves as the JSON error body of the server's API.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/agent/v1/instances/{id}/exec", post(exec))
        .route("/agent/v1/instances/{id}/logs", get(logs))
        .route("/agent/v1/instances/{id}/console", get(console))
        .route("/agent/v1/openapi.json", get(openapi))
        .layer(axum::middleware::from_fn_with_state(agent.clone(), auth))
        .route("/agent/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(nimbus_http::json_errors))
        .with_state(agent)
}

/// Runs a command in the instance and answers its exit code and output.
#[utoipa::path(post, path = "/agent/v1/instances/{id}/exec", tag = "agent",
    params(("id" = String, Path, description = "instance id")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "the command ran (its own exit code inside)", body = ExecResponse),
        (status = 400, description = "malformed request", body = ErrorBody),
        (status = 401, description = "not a server of the cluster", body = ErrorBody),
        (status = 404, description = "no such instance on this node", body = ErrorBody),
        (status = 409, description = "the instance is not running", body = ErrorBody),
        (status = 413, description = "request body too large", body = ErrorBody),
        (status = 422, description = "invalid request (an empty command)", body = ErrorBody),
        (status = 503, description = "the instance did not answer in time", body = ErrorBody),
    ))]
async fn exec(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Response {
    let timeout = match nimbus_api::validate::exec(&req) {
        Ok(t) => t,
        Err(e) => return err(e),
    };
    agent.assignments_loaded(FIRST_POLL_WAIT).await;
    let Some((driver, a)) = agent.lookup(&id) else {
        return err(ApiError::not_found("instance", &id));
    };
    match driver.exec(&id, &req.command, timeout).await {
        Ok(r) => Json(r).into_response(),
        Err(DriverError::NotRunning(_)) => err(ApiError::conflict(format!(
            "instance {} is not running",
            a.name
        ))),
        Err(e) => err(driver_err(&e)),
    }
}

/// `GET .../logs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Keep the response open and stream lines as they are written.
    #[serde(default)]
    follow: bool,
    /// Start this many lines before the end.
    #[serde(default)]
    tail: Option<u64>,
}

fn tail_offset(data: &[u8], lines: u64) -> usize {
    if lines == 0 {
        return data.len();
    }
    let mut seen = 0;
    let end = if data.last() == Some(&b'\n') {
        data.len() - 1
    } else {
        data.len()
    };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            seen += 1;
            if seen == lines {
                return i + 1;
            }
        }
    }
    0
}

/// The instance's output (both streams, as one log).
#[utoipa::path(get, path = "/agent/v1/instances/{id}/logs", tag = "agent",
    params(("id" = String, Path, description = "instance id"), LogQuery),
    responses(
        (status = 200, description = "the log (streamed with follow)", content_type = "text/plain", body = String),
        (status = 400, description = "malformed query string", body = ErrorBody),
        (status = 401, description = "not a server of the cluster", body = ErrorBody),
        (status = 404, description = "no such instance on this node", body = ErrorBody),
    ))]
async fn logs(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Response {
    agent.assignments_loaded(FIRST_POLL_WAIT).await;
    let Some((driver, _)) = agent.lookup(&id) else {
        return err(ApiError::not_found("instance", &id));
    };
    let path = driver.log_path(&id);
    // The older generation (`<log>.1`) first; following continues in the current file.
    let current_len = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
    let data = crate::logs::read_all(&path).await;
    let start = q.tail.map_or(0, |n| tail_offset(&data, n));
    let initial = data[start..].to_vec();
    if !q.follow {
        return (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            initial,
        )
            .into_response();
    }
    let offset = current_len;
    let stream = futures::stream::unfold(
        (Some(initial), offset, agent, id, path),
        |(first, mut offset, agent, id, path)| async move {
            if let Some(b) = first {
                return Some((Ok::<_, Infallible>(b), (None, offset, agent, id, path)));
            }
            loop {
                agent.lookup(&id)?;
                if let Ok(mut f) = tokio::fs::File::open(&path).await {
                    let len = f.metadata().await.map_or(0, |m| m.len());
                    if len < offset {
                        offset = 0; // truncated
                    }
                    if len > offset && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                        let mut buf = Vec::new();
                        if f.take(1 << 20).read_to_end(&mut buf).await.is_ok() && !buf.is_empty() {
                            offset += buf.len() as u64;
                            return Some((Ok(buf), (None, offset, agent, id, path)));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Attaches to the instance's interactive console: answers `101 Switching Protocols` and then
/// splices the upgraded connection to the console socket.
#[utoipa::path(get, path = "/agent/v1/instances/{id}/console", tag = "agent",
    params(("id" = String, Path, description = "instance id")),
    responses(
        (status = 101, description = "upgraded: the connection is the console (`Upgrade: nimbus-console`)"),
        (status = 401, description = "not a server of the cluster", body = ErrorBody),
        (status = 404, description = "no such instance on this node", body = ErrorBody),
        (status = 409, description = "the instance has no console, or it is not available", body = ErrorBody),
    ))]
async fn console(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    mut req: Request,
) -> Response {
    agent.assignments_loaded(FIRST_POLL_WAIT).await;
    let Some((driver, a)) = agent.lookup(&id) else {
        return err(ApiError::not_found("instance", &id));
    };
    let Some(sock) = driver.console_socket(&id) else {
        return err(ApiError::conflict(format!(
            "instance {} has no interactive console; use exec",
            a.name
        )));
    };
    let mut stream = match tokio::net::UnixStream::connect(&sock).await {
        Ok(s) => s,
        Err(e) => {
            return err(ApiError::conflict(format!(
                "the console of {} is not available: {e}",
                a.name
            )))
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut io, &mut stream).await;
            }
            Err(e) => tracing::warn!("console upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, "nimbus-console")
        .body(Body::empty())
        .unwrap_or_else(|_| err(ApiError::internal("building the upgrade response")))
}

#[cfg(test)]
mod tests {
    use super::tail_offset;

    #[test]
    fn tail() {
        let d = b"a\nb\nc\n";
        assert_eq!(&d[tail_offset(d, 1)..], b"c\n");
        assert_eq!(&d[tail_offset(d, 2)..], b"b\nc\n");
        assert_eq!(&d[tail_offset(d, 9)..], d);
        assert_eq!(&d[tail_offset(d, 0)..], b"");
    }
}
