//! Server membership: stable node ids, the cluster id, bootstrap-expect, join, and the
//! membership API.
//!
//! - **Node id**: a random id created with the data dir (`<data-dir>/node.id`); a data dir
//!   that already holds a Raft store but no `node.id` is a single server of an earlier build,
//!   node 1.
//! - **Cluster id**: a random id created by the server that initializes the cluster and
//!   persisted in `<data-dir>/cluster.id`; other servers adopt it from the cluster when they
//!   join (and refuse a cluster whose id differs from theirs).
//! - **bootstrap-expect N**: the servers poll each other's `GET /v1/cluster/info` (with the
//!   shared cluster secret) until N uninitialized servers see each other; the one with the lowest
//!   id initializes Raft with all of them as voters; the others receive the membership through
//!   replication. A server whose peer is already initialized joins it instead.
//! - **join**: a new server asks any member (`POST /v1/cluster/join`); the member proxies the
//!   request to the leader, which adds the server as a learner, waits until it caught up, then
//!   makes it a voter.
//!
//! | route | token | what |
//! |---|---|---|
//! | `GET /v1/cluster` | admin or cluster secret | [`ClusterInfo`] of this server's view |
//! | `POST /v1/cluster/members` | admin | add the server at `{"url"}` |
//! | `DELETE /v1/cluster/members/{id}` | admin | remove a server (never the last voter) |
//! | `POST /v1/cluster/join` | cluster secret | a server asks to be added ([`JoinRequest`]) |

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use nimbus_api::{ApiError, ErrorCode};
use nimbus_state::raft::{Member, RaftNode, WriteError};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::HttpError;
use crate::StartError;

/// File holding this server's Raft node id.
pub const NODE_ID_FILE: &str = "node.id";
/// File holding the cluster id.
pub const CLUSTER_ID_FILE: &str = "cluster.id";

/// How a server finds its cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Form a new cluster once this many servers (this one included) see each other.
    pub bootstrap_expect: Option<usize>,
    /// Other servers' base URLs (for bootstrap-expect, and members to join through).
    pub peers: Vec<String>,
    /// Join an existing cluster through one of these members.
    pub join: Vec<String>,
}

impl ClusterOptions {
    /// A stand-alone single server (what `nimbus up` runs).
    pub fn single() -> Self {
        Self::default()
    }

    /// Whether this is a stand-alone single server.
    pub fn is_single(&self) -> bool {
        self.bootstrap_expect.is_none() && self.peers.is_empty() && self.join.is_empty()
    }
}

/// This server's view of the cluster (`GET /v1/cluster`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// This server's node id.
    pub node_id: u64,
    /// This server's advertised URL.
    pub url: String,
    /// The cluster id, once known.
    pub cluster_id: Option<String>,
    /// Whether this server has a Raft membership.
    pub initialized: bool,
    /// The bootstrap-expect count it was started with.
    pub bootstrap_expect: Option<usize>,
    /// The leader's id, if known.
    pub leader_id: Option<u64>,
    /// The servers of the membership.
    pub members: Vec<Member>,
    /// The last log index this server applied (the state revision): a cluster at rest does
    /// not move it, since heartbeats and telemetry are not written to the log.
    #[serde(default)]
    pub applied_index: u64,
}

/// `POST /v1/cluster/join`: a server asks to be added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its node id.
    pub id: u64,
    /// Its advertised URL.
    pub url: String,
    /// The cluster id it already belongs to, if any.
    pub cluster_id: Option<String>,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The cluster id to persist.
    pub cluster_id: Option<String>,
}

/// `POST /v1/cluster/members`: the operator adds the server at `url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddServerRequest {
    /// The new server's base URL.
    pub url: String,
}

/// How long a membership request waits for a leader to be elected before it is refused.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Cluster identity held by a server.
#[derive(Debug)]
pub struct ClusterState {
    data_dir: PathBuf,
    cluster_id: RwLock<Option<String>>,
    /// The bootstrap-expect count this server was started with.
    pub bootstrap_expect: Option<usize>,
}

impl ClusterState {
    /// Loads the cluster id persisted in `data_dir`, if any.
    pub fn load(data_dir: &Path, bootstrap_expect: Option<usize>) -> Self {
        let id = std::fs::read_to_string(data_dir.join(CLUSTER_ID_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        Self {
            data_dir: data_dir.to_owned(),
            cluster_id: RwLock::new(id),
            bootstrap_expect,
        }
    }

    /// The cluster id, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Persists `id` as the cluster id; refuses a different id than the one already held.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), String> {
        let mut cur = self
            .cluster_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match cur.as_deref() {
            Some(c) if c == id => return Ok(()),
            Some(c) => {
                return Err(format!(
                    "cluster id mismatch: this server belongs to cluster {c}, the other to cluster {id}"
                ))
            }
            None => {}
        }
        write_file(&self.data_dir.join(CLUSTER_ID_FILE), id)?;
        tracing::info!(cluster_id = id, "cluster id set");
        *cur = Some(id.to_owned());
        Ok(())
    }
}

fn write_file(path: &Path, content: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    crate::write_private(&tmp, format!("{content}\n").as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A fresh random cluster id (128 bits, hex).
pub fn new_cluster_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Reads this server's node id from `<data_dir>/node.id`, creating a random one for a new data
/// dir (a data dir with a Raft store but no id file is node 1 of an earlier build).
pub fn load_or_create_node_id(data_dir: &Path) -> Result<u64, StartError> {
    let err = |message: String| StartError::DataDir {
        path: data_dir.display().to_string(),
        message,
    };
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            return s
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&id| id > 0)
                .ok_or_else(|| {
                    err(format!(
                        "{} is not a node id: {:?}",
                        path.display(),
                        s.trim()
                    ))
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("reading {}: {e}", path.display()))),
    }
    std::fs::create_dir_all(data_dir).map_err(|e| err(format!("cannot create: {e}")))?;
    let id = if data_dir
        .join("raft")
        .join(nimbus_state::raft::node::DB_FILE)
        .exists()
    {
        1
    } else {
        use rand::Rng;
        // Below 2^53 so the id survives any JSON number parser.
        rand::rngs::OsRng.gen_range(2..(1u64 << 53))
    };
    write_file(&path, &id.to_string()).map_err(err)?;
    Ok(id)
}

/// Which credentials a route accepts.
#[derive(Clone, Copy)]
enum Allow {
    Admin,
    Server,
    Either,
}

fn authorize(app: &AppState, headers: &HeaderMap, allow: Allow) -> Result<(), HttpError> {
    use crate::auth::Identity;
    let who = app.identify(headers)?;
    let ok = matches!(
        (allow, &who),
        (Allow::Admin | Allow::Either, Identity::Admin)
            | (Allow::Server | Allow::Either, Identity::Server)
    );
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            "this credential may not read or change cluster membership",
        )
        .into())
    }
}

fn unavailable(e: &WriteError) -> HttpError {
    match e {
        WriteError::Refused(m) => ApiError::new(ErrorCode::Conflict, m.clone()).into(),
        e => ApiError::new(
            ErrorCode::Unavailable,
            format!("membership change failed: {e}"),
        )
        .into(),
    }
}

/// The membership routes (they authenticate themselves; see the module docs).
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/cluster", get(info))
        .route("/v1/cluster/members", post(add_server))
        .route("/v1/cluster/members/{id}", delete(remove_server))
        .route("/v1/cluster/join", post(join_handler))
        .with_state(app)
}

/// This server's view of the cluster.
pub async fn cluster_info(app: &AppState) -> ClusterInfo {
    ClusterInfo {
        node_id: app.raft.node_id(),
        url: app.raft.advertise_url().to_owned(),
        cluster_id: app.cluster.cluster_id(),
        initialized: app.raft.is_initialized().await,
        bootstrap_expect: app.cluster.bootstrap_expect,
        leader_id: app.raft.leader(),
        members: app.raft.members(),
        applied_index: app.read(|s| s.revision),
    }
}

async fn info(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<ClusterInfo>, HttpError> {
    authorize(&app, &headers, Allow::Either)?;
    Ok(Json(cluster_info(&app).await))
}

/// Sends the request on to the leader with the caller's token, or `None` if this server leads.
async fn proxy_to_leader(
    app: &AppState,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    if app.raft.is_leader() {
        return None;
    }
    // Right after a cluster is initialized (or while it elects a new leader) there is briefly
    // no leader: wait for one instead of refusing at once.
    if app.raft.leader().is_none() {
        let _ = app.raft.wait_for_leader(LEADER_WAIT).await;
        if app.raft.is_leader() {
            return None;
        }
    }
    let Some(url) = app.raft.leader().and_then(|l| app.raft.node_url(l)) else {
        return Some(
            HttpError(ApiError::new(
                ErrorCode::Unavailable,
                "no leader is elected yet; retry shortly",
            ))
            .into_response(),
        );
    };
    let mut rb = app
        .peer_http
        .request(method, format!("{}{path}", url.trim_end_matches('/')))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(t) = crate::auth::bearer(headers) {
        rb = rb.bearer_auth(t);
    }
    Some(match rb.send().await {
        Ok(resp) => {
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = resp.bytes().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Err(e) => HttpError(ApiError::new(
            ErrorCode::Unavailable,
            format!("cannot reach the leader at {url}: {e}"),
        ))
        .into_response(),
    })
}

async fn join_handler(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = authorize(&app, &headers, Allow::Server) {
        return e.into_response();
    }
    let req: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return HttpError(ApiError::new(
                ErrorCode::BadRequest,
                format!("invalid join request: {e}"),
            ))
            .into_response()
        }
    };
    let ours = app.cluster.cluster_id();
    if let (Some(ours), Some(theirs)) = (&ours, &req.cluster_id) {
        if ours != theirs {
            return HttpError(ApiError::new(
                ErrorCode::Conflict,
                format!("server {} belongs to cluster {theirs}, not to this cluster {ours}; refusing to join it", req.id),
            ))
            .into_response();
        }
    }
    if let Some(r) = proxy_to_leader(&app, Method::POST, "/v1/cluster/join", &headers, body).await {
        return r;
    }
    tracing::info!(id = req.id, url = %req.url, "adding server to the cluster");
    match app.raft.add_server(req.id, &req.url).await {
        Ok(()) => Json(JoinResponse {
            cluster_id: app.cluster.cluster_id(),
        })
        .into_response(),
        Err(e) => unavailable(&e).into_response(),
    }
}

async fn add_server(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = authorize(&app, &headers, Allow::Admin) {
        return e.into_response();
    }
    let req: AddServerRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return HttpError(ApiError::new(
                ErrorCode::BadRequest,
                format!("invalid request: {e}"),
            ))
            .into_response()
        }
    };
    if let Some(r) =
        proxy_to_leader(&app, Method::POST, "/v1/cluster/members", &headers, body).await
    {
        return r;
    }
    let info = match fetch_info(&app.peer_http, &req.url, &app.creds.cluster_secret).await {
        Ok(i) => i,
        Err(m) => {
            if let Some(e) = other_ca(&app, &req.url).await {
                return HttpError(e).into_response();
            }
            return HttpError(ApiError::new(ErrorCode::BadRequest, m)).into_response();
        }
    };
    if let (Some(ours), Some(theirs)) = (app.cluster.cluster_id(), &info.cluster_id) {
        if &ours != theirs {
            return HttpError(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "the server at {} belongs to cluster {theirs}, not to this cluster {ours}",
                    req.url
                ),
            ))
            .into_response();
        }
    }
    match app.raft.add_server(info.node_id, &info.url).await {
        Ok(()) => Json(cluster_info(&app).await).into_response(),
        Err(e) => unavailable(&e).into_response(),
    }
}

/// TLS: why the server at `url` cannot be added if it presents a certificate of another CA
/// than the cluster's (it created its own at its first start: its identity, master key and
/// state belong to another cluster), with what to do instead.
async fn other_ca(app: &AppState, url: &str) -> Option<ApiError> {
    let ours = app.pki.ca.as_ref()?.fingerprint();
    let theirs = crate::tlsboot::presented_ca(url)
        .await
        .ok()
        .and_then(|pem| crate::tlsboot::pem_fingerprint(&pem))?;
    (theirs != ours).then(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!(
                "the server at {url} has its own CA ({theirs}), not this cluster's ({ours}): a TLS server cannot be added once it runs with its own CA. Stop it, and start it with an empty data dir as `nimbus server --join {} --ca-fingerprint {ours} --cluster-secret-file FILE` (it then gets its certificate, the master key and the CA from the cluster)",
                app.raft.advertise_url()
            ),
        )
    })
}

async fn remove_server(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&app, &headers, Allow::Admin) {
        return e.into_response();
    }
    if !app.raft.members().iter().any(|m| m.id == id) {
        return HttpError(ApiError::not_found("server", &id.to_string())).into_response();
    }
    let path = format!("/v1/cluster/members/{id}");
    if let Some(r) = proxy_to_leader(&app, Method::DELETE, &path, &headers, Bytes::new()).await {
        return r;
    }
    match app.raft.remove_server(id).await {
        Ok(()) => Json(cluster_info(&app).await).into_response(),
        Err(e) => unavailable(&e).into_response(),
    }
}

/// `GET {url}/v1/cluster` with the cluster secret.
pub async fn fetch_info(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<ClusterInfo, String> {
    let resp = http
        .get(format!("{}/v1/cluster", url.trim_end_matches('/')))
        .bearer_auth(token)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "{url} refused this server's cluster secret: every server must share the same cluster.secret (--cluster-secret-file)"
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{url} is not a nimbus server (HTTP {status} for /v1/cluster)"
        ));
    }
    resp.json()
        .await
        .map_err(|_| format!("{url} is not a nimbus server (unexpected answer to /v1/cluster)"))
}

/// Asks the member at `url` to add this server; persists the cluster id it answers.
pub async fn join_via(app: &AppState, url: &str) -> Result<(), String> {
    let req = JoinRequest {
        id: app.raft.node_id(),
        url: app.raft.advertise_url().to_owned(),
        cluster_id: app.cluster.cluster_id(),
    };
    let resp = app
        .peer_http
        .post(format!("{}/v1/cluster/join", url.trim_end_matches('/')))
        .bearer_auth(app.creds.cluster_secret.as_str())
        .json(&req)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if matches!(
        status,
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
    ) {
        return Err(format!(
            "{url} refused this server's cluster secret: every server must share the same cluster.secret (--cluster-secret-file)"
        ));
    }
    if !status.is_success() {
        let msg = serde_json::from_str::<nimbus_api::ErrorBody>(&text)
            .map_or_else(|_| format!("HTTP {status}"), |b| b.error.message);
        return Err(format!("{url} refused the join: {msg}"));
    }
    let r: JoinResponse = serde_json::from_str(&text)
        .map_err(|_| format!("{url} is not a nimbus server (unexpected answer to a join)"))?;
    if let Some(id) = r.cluster_id {
        app.cluster.set_cluster_id(&id)?;
    }
    Ok(())
}

/// Whether a join error can never succeed by retrying.
fn permanent(msg: &str) -> bool {
    msg.contains("cluster id mismatch")
        || msg.contains("belongs to cluster")
        || msg.contains("cluster secret")
}

/// Joins the cluster through one of `members` (retrying for up to a minute).
pub async fn join_cluster(app: &AppState, members: &[String]) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut last = String::new();
        for m in members {
            match join_via(app, m).await {
                Ok(()) => {
                    tracing::info!(via = %m, "joined the cluster");
                    return Ok(());
                }
                Err(e) if permanent(&e) => return Err(StartError::Cluster(e)),
                Err(e) => {
                    tracing::warn!("join via {m} failed: {e}");
                    last = e;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(StartError::Cluster(format!(
                "could not join the cluster: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Checks that an already initialized server is not pointed at another cluster.
pub async fn check_peers(app: &AppState, peers: &[String]) -> Result<(), StartError> {
    let Some(ours) = app.cluster.cluster_id() else {
        return Ok(());
    };
    for p in peers {
        if let Ok(info) = fetch_info(&app.peer_http, p, &app.creds.cluster_secret).await {
            if let Some(theirs) = info.cluster_id.filter(|t| *t != ours) {
                return Err(StartError::Cluster(format!(
                    "this server belongs to cluster {ours} but {p} belongs to cluster {theirs}; refusing to start"
                )));
            }
        }
    }
    Ok(())
}

/// Waits until `expect` servers see each other, then the lowest id initializes the cluster
/// with all of them as voters; then reports the cluster ready once this server sees a leader
/// and `expect` voters (`nimbus server: cluster ready: ...`).
pub async fn bootstrap_expect(app: AppState, expect: usize, peers: Vec<String>) {
    form_cluster(&app, expect, &peers).await;
    report_ready(&app, expect).await;
}

/// Waits until this server knows a leader and at least `expect` voters, printing what it
/// still waits for every 5 s, then prints that the cluster is ready.
async fn report_ready(app: &AppState, expect: usize) {
    let since = tokio::time::Instant::now();
    let mut last_msg = since;
    loop {
        let voters = app.raft.voter_ids().len();
        if let Some(leader) = app.raft.leader() {
            if voters >= expect {
                let msg = format!(
                    "nimbus server: cluster ready: {voters} voters, leader {leader} (after {:.1} s)",
                    since.elapsed().as_secs_f64()
                );
                eprintln!("{msg}");
                tracing::info!("{msg}");
                return;
            }
        }
        if last_msg.elapsed() >= Duration::from_secs(5) {
            let leader = app
                .raft
                .leader()
                .map_or_else(|| "no leader yet".to_owned(), |l| format!("leader {l}"));
            eprintln!("cluster initialized, waiting for {expect} voters (have {voters}, {leader})");
            last_msg = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn form_cluster(app: &AppState, expect: usize, peers: &[String]) {
    let raft: &RaftNode = &app.raft;
    let me = (raft.node_id(), raft.advertise_url().to_owned());
    let mut last_msg = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        if raft.is_initialized().await {
            return;
        }
        let mut found = vec![me.clone()];
        let mut problems = Vec::new();
        let mut initialized_peer = None;
        let mut named_in_membership = false;
        for p in peers {
            match fetch_info(&app.peer_http, p, &app.creds.cluster_secret).await {
                Ok(info) if info.initialized && info.members.iter().any(|m| m.id == me.0) => {
                    // The cluster was initialized with this server as a voter: the membership
                    // arrives through replication; joining would only race it.
                    named_in_membership = true;
                }
                Ok(info) if info.initialized && info.cluster_id.is_some() => {
                    initialized_peer = Some(p.clone());
                }
                Ok(info) if info.node_id != me.0 => found.push((info.node_id, info.url)),
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        if named_in_membership {
            // Wait for the leader's first append (the loop ends once it has arrived).
        } else if let Some(p) = initialized_peer {
            match join_via(app, &p).await {
                Ok(()) => return,
                Err(e) => tracing::warn!("joining the existing cluster via {p}: {e}"),
            }
        } else {
            found.sort();
            found.dedup_by_key(|s| s.0);
            if found.len() >= expect {
                let lowest = found[0].0;
                if lowest == me.0 {
                    if app.cluster.cluster_id().is_none() {
                        if let Err(e) = app.cluster.set_cluster_id(&new_cluster_id()) {
                            tracing::error!("{e}");
                        }
                    }
                    let members = RaftNode::initial_members(&found);
                    match raft.initialize(members).await {
                        Ok(()) => {
                            eprintln!(
                                "nimbus server: bootstrapped a cluster of {} servers",
                                found.len()
                            );
                            return;
                        }
                        Err(e) => tracing::error!("initializing the cluster: {e}"),
                    }
                } else if last_msg.elapsed() >= Duration::from_secs(5) {
                    eprintln!(
                        "found {} servers; waiting for server {lowest} to initialize the cluster",
                        found.len()
                    );
                    last_msg = tokio::time::Instant::now();
                }
            } else if last_msg.elapsed() >= Duration::from_secs(5) {
                let more = expect - found.len();
                let s = if more == 1 { "" } else { "s" };
                let mut msg =
                    format!("waiting for {more} more server{s} (bootstrap-expect {expect})");
                if !problems.is_empty() {
                    msg = format!("{msg}: {}", problems.join("; "));
                }
                eprintln!("{msg}");
                tracing::warn!("{msg}");
                last_msg = tokio::time::Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Once this server is in a cluster, learns the cluster id from the other members (or, as
/// the leader of a cluster where nobody has one, e.g. a pre-cluster-id data dir, creates it).
pub async fn adopt_cluster_id(app: AppState) {
    while app.cluster.cluster_id().is_none() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !app.raft.is_initialized().await || app.raft.leader().is_none() {
            continue;
        }
        let mut all_answered = true;
        for m in app.raft.members() {
            if m.id == app.raft.node_id() {
                continue;
            }
            match fetch_info(&app.peer_http, &m.url, &app.creds.cluster_secret).await {
                Ok(ClusterInfo {
                    cluster_id: Some(id),
                    ..
                }) => {
                    if let Err(e) = app.cluster.set_cluster_id(&id) {
                        tracing::error!("{e}");
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => all_answered = false,
            }
        }
        if app.cluster.cluster_id().is_none() && all_answered && app.raft.is_leader() {
            if let Err(e) = app.cluster.set_cluster_id(&new_cluster_id()) {
                tracing::error!("{e}");
            }
        }
    }
}
