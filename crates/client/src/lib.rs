//! Typed Rust client of the nimbus REST API (used by the CLI and the tests).

mod lb;

use std::time::Duration;

use futures::Stream;
use nimbus_api::{
    ApiError, CreateInstanceRequest, CreateProjectRequest, ErrorBody, Event, ExecRequest,
    ExecResponse, Health, Image, Instance, Node, Project, UpdateNodeRequest,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod network;
mod secret;
mod volume;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// The server could not be reached.
    #[error("cannot reach nimbus at {url}: {source}")]
    Connect {
        /// URL.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// Something else on the wire.
    #[error("unexpected answer from {url}: {message}")]
    Protocol {
        /// URL.
        url: String,
        /// What.
        message: String,
    },
}

impl ClientError {
    /// The API error, if this is one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, ClientError>;

/// One server of the control-plane cluster (`GET /v1/cluster`).
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
pub struct ClusterMember {
    /// Raft node id.
    pub id: u64,
    /// Base URL.
    pub url: String,
    /// Whether it votes (false: learner).
    pub voter: bool,
    /// Whether it is the leader.
    pub leader: bool,
}

/// A server's view of the control-plane cluster (`GET /v1/cluster`).
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
pub struct ClusterInfo {
    /// The answering server's node id.
    pub node_id: u64,
    /// Its URL.
    pub url: String,
    /// The cluster id, once known.
    pub cluster_id: Option<String>,
    /// Whether it has a Raft membership.
    pub initialized: bool,
    /// Its bootstrap-expect count.
    pub bootstrap_expect: Option<usize>,
    /// The leader's node id, if known.
    pub leader_id: Option<u64>,
    /// The servers.
    pub members: Vec<ClusterMember>,
    /// The last log index the answering server applied.
    #[serde(default)]
    pub applied_index: u64,
}

/// Items per page when a list is read whole.
pub const PAGE_SIZE: u32 = 500;

/// The target of a `Link` header's `rel="next"` entry.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// A client bound to a server URL, a token and a project.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: String,
    /// Project used by instance calls.
    pub project: String,
    http: reqwest::Client,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    timeout: Option<Duration>,
}

impl Client {
    /// New client.
    pub fn new(
        base: impl Into<String>,
        token: impl Into<String>,
        project: impl Into<String>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            project: project.into(),
            http,
            tls: None,
            timeout: None,
        }
    }

    fn build_http(
        tls: Option<&rustls::ClientConfig>,
        timeout: Option<Duration>,
    ) -> reqwest::Client {
        let mut b = reqwest::Client::builder().connect_timeout(
            timeout.map_or(Duration::from_secs(5), |t| t.min(Duration::from_secs(5))),
        );
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        if let Some(tls) = tls {
            b = b.use_preconfigured_tls(tls.clone());
        }
        b.build().unwrap_or_default()
    }

    /// The same client speaking TLS with `config` (e.g. trusting only the cluster CA, see
    /// `nimbus_pki`).
    #[must_use]
    pub fn with_tls(&self, config: rustls::ClientConfig) -> Self {
        let http = Self::build_http(Some(&config), self.timeout);
        Self {
            http,
            tls: Some(std::sync::Arc::new(config)),
            ..self.clone()
        }
    }

    /// The same client for another project.
    #[must_use]
    pub fn with_project(&self, project: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            ..self.clone()
        }
    }

    /// The same client with a timeout on every whole request (connect and answer).
    #[must_use]
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        let http = Self::build_http(self.tls.as_deref(), Some(timeout));
        Self {
            http,
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// Base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|source| ClientError::Connect {
            url: self.base.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ClientError::Api(b.error)),
            Err(_) => Err(ClientError::Protocol {
                url: self.base.clone(),
                message: format!(
                    "HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                ),
            }),
        }
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|e| ClientError::Protocol {
            url: self.base.clone(),
            message: e.to_string(),
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let mut rb = self.req(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        self.json(rb).await
    }

    /// One page of a list route (`path` with its `limit` and `continue`), and the route of
    /// the next page if more remain.
    pub async fn list_page<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(Vec<T>, Option<String>)> {
        let resp = self.send(self.req(Method::GET, path)).await?;
        let next = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let page: Vec<T> = resp.json().await.map_err(|e| ClientError::Protocol {
            url: self.base.clone(),
            message: e.to_string(),
        })?;
        Ok((page, next))
    }

    /// Every item of a paginated list route, following its `Link: rel="next"` pages of
    /// [`PAGE_SIZE`].
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut next = Some(format!("{path}{sep}limit={PAGE_SIZE}"));
        let mut all = Vec::new();
        while let Some(p) = next.take() {
            let (page, more) = self.list_page(&p).await?;
            all.extend(page);
            next = more;
        }
        Ok(all)
    }

    fn ipath(&self, rest: &str) -> String {
        format!("/v1/projects/{}/instances{rest}", self.project)
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health> {
        self.call::<(), _>(Method::GET, "/healthz", None).await
    }

    /// Creates an instance.
    pub async fn create_instance(
        &self,
        req: &CreateInstanceRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Instance> {
        let mut rb = self.req(Method::POST, &self.ipath("")).json(req);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        self.json(rb).await
    }

    /// Lists instances (all pages).
    pub async fn list_instances(&self) -> Result<Vec<Instance>> {
        self.list_all(&self.ipath("")).await
    }

    /// Gets an instance.
    pub async fn get_instance(&self, name: &str) -> Result<Instance> {
        self.call::<(), _>(Method::GET, &self.ipath(&format!("/{name}")), None)
            .await
    }

    /// `start`, `stop` or `restart`.
    pub async fn instance_action(&self, name: &str, action: &str) -> Result<Instance> {
        self.call::<(), _>(
            Method::POST,
            &self.ipath(&format!("/{name}/{action}")),
            None,
        )
        .await
    }

    /// Deletes an instance (returns once the deletion is accepted).
    pub async fn delete_instance(&self, name: &str) -> Result<Instance> {
        self.call::<(), _>(Method::DELETE, &self.ipath(&format!("/{name}")), None)
            .await
    }

    /// Runs a command in an instance.
    pub async fn exec(&self, name: &str, command: Vec<String>) -> Result<ExecResponse> {
        let req = ExecRequest {
            command,
            timeout_secs: None,
        };
        let rb = self
            .req(Method::POST, &self.ipath(&format!("/{name}/exec")))
            .json(&req)
            .timeout(Duration::from_secs(90));
        self.json(rb).await
    }

    /// The instance's log so far.
    pub async fn logs(&self, name: &str, tail: Option<u64>) -> Result<String> {
        let mut rb = self.req(Method::GET, &self.ipath(&format!("/{name}/logs")));
        if let Some(t) = tail {
            rb = rb.query(&[("tail", t)]);
        }
        let resp = self.send(rb).await?;
        resp.text().await.map_err(|e| ClientError::Protocol {
            url: self.base.clone(),
            message: e.to_string(),
        })
    }

    /// The instance's log, followed: a stream of chunks.
    pub async fn follow_logs(
        &self,
        name: &str,
        tail: Option<u64>,
    ) -> Result<impl Stream<Item = reqwest::Result<bytes::Bytes>>> {
        let mut rb = self
            .req(Method::GET, &self.ipath(&format!("/{name}/logs")))
            .query(&[("follow", "true")]);
        if let Some(t) = tail {
            rb = rb.query(&[("tail", t)]);
        }
        Ok(self.send(rb).await?.bytes_stream())
    }

    /// Attaches to an instance's interactive console: a raw bidirectional byte stream.
    pub async fn console(&self, name: &str) -> Result<reqwest::Upgraded> {
        let resp = self
            .req(Method::GET, &self.ipath(&format!("/{name}/console")))
            .header("connection", "upgrade")
            .header("upgrade", "nimbus-console")
            .send()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return resp.upgrade().await.map_err(|e| ClientError::Protocol {
                url: self.base.clone(),
                message: format!("console upgrade: {e}"),
            });
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ClientError::Api(b.error),
            Err(_) => ClientError::Protocol {
                url: self.base.clone(),
                message: format!("expected 101 Switching Protocols, got {status}"),
            },
        })
    }

    /// Projects.
    pub async fn list_projects(&self) -> Result<Vec<Project>> {
        self.list_all("/v1/projects").await
    }

    /// Creates a project.
    pub async fn create_project(&self, name: &str) -> Result<Project> {
        self.call(
            Method::POST,
            "/v1/projects",
            Some(&CreateProjectRequest {
                name: name.into(),
                description: String::new(),
            }),
        )
        .await
    }

    /// Deletes a project.
    pub async fn delete_project(&self, name: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &format!("/v1/projects/{name}")))
            .await
            .map(|_| ())
    }

    /// Nodes (all pages).
    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        self.list_all("/v1/nodes").await
    }

    /// Cordons or uncordons a node.
    pub async fn cordon_node(&self, name: &str, cordoned: bool) -> Result<Node> {
        self.call(
            Method::PATCH,
            &format!("/v1/nodes/{name}"),
            Some(&UpdateNodeRequest {
                cordoned: Some(cordoned),
                version: None,
            }),
        )
        .await
    }

    /// Drains a node: cordons it and moves its instances elsewhere.
    pub async fn drain_node(&self, name: &str) -> Result<Node> {
        self.call::<(), _>(Method::POST, &format!("/v1/nodes/{name}/drain"), None)
            .await
    }

    /// Removes a node (admin); `force` also while instances are assigned to it (they fail
    /// over like on a lost node).
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<()> {
        let path = format!("/v1/nodes/{name}?force={force}");
        self.send(self.req(Method::DELETE, &path)).await.map(|_| ())
    }

    /// Images.
    pub async fn list_images(&self) -> Result<Vec<Image>> {
        self.list_all("/v1/images").await
    }

    /// Imports an image tarball.
    pub async fn import_image(
        &self,
        tarball: &std::path::Path,
        name: Option<&str>,
    ) -> Result<Image> {
        let file = tokio::fs::File::open(tarball)
            .await
            .map_err(|e| ClientError::Protocol {
                url: tarball.display().to_string(),
                message: e.to_string(),
            })?;
        let len = file.metadata().await.map_or(0, |m| m.len());
        let body = reqwest::Body::wrap_stream(tokio_util_stream(file));
        let mut rb = self
            .req(Method::POST, "/v1/images")
            .header("content-type", "application/x-tar")
            .header("content-length", len)
            .body(body);
        if let Some(n) = name {
            rb = rb.query(&[("name", n)]);
        }
        self.json(rb.timeout(Duration::from_secs(60 * 60))).await
    }

    /// Events after `after` (optionally for one project).
    pub async fn events(&self, project: Option<&str>, after: u64) -> Result<Vec<Event>> {
        let mut rb = self
            .req(Method::GET, "/v1/events")
            .query(&[("after", after)]);
        if let Some(p) = project {
            rb = rb.query(&[("project", p)]);
        }
        self.json(rb).await
    }

    /// Follows events as a stream of NDJSON chunks.
    pub async fn follow_events(
        &self,
        project: Option<&str>,
        after: u64,
    ) -> Result<impl Stream<Item = reqwest::Result<bytes::Bytes>>> {
        let mut rb = self
            .req(Method::GET, "/v1/events")
            .query(&[("after", after.to_string()), ("follow", "true".into())]);
        if let Some(p) = project {
            rb = rb.query(&[("project", p)]);
        }
        Ok(self.send(rb).await?.bytes_stream())
    }

    /// The control-plane cluster as the server answering sees it.
    pub async fn cluster_info(&self) -> Result<ClusterInfo> {
        self.call::<(), _>(Method::GET, "/v1/cluster", None).await
    }

    /// Adds the running server at `url` to the cluster.
    pub async fn cluster_add_server(&self, url: &str) -> Result<ClusterInfo> {
        self.call(
            Method::POST,
            "/v1/cluster/members",
            Some(&serde_json::json!({ "url": url })),
        )
        .await
    }

    /// Removes server `id` from the cluster.
    pub async fn cluster_remove_server(&self, id: u64) -> Result<ClusterInfo> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/cluster/members/{id}"), None)
            .await
    }

    /// Creates a one-time join token valid for `ttl_seconds`.
    pub async fn create_join_token(&self, ttl_seconds: u64) -> Result<nimbus_api::pki::JoinToken> {
        let body = nimbus_api::pki::CreateJoinTokenRequest { ttl_seconds };
        self.call(Method::POST, "/v1/join-tokens", Some(&body))
            .await
    }

    /// Trades a join token and a CSR for a node certificate (needs no bearer token).
    pub async fn join_node(
        &self,
        req: &nimbus_api::pki::NodeJoinRequest,
    ) -> Result<nimbus_api::pki::IssuedCert> {
        self.call(Method::POST, "/v1/pki/join", Some(req)).await
    }

    /// Revokes every certificate of node `name` (refused at the next handshake or request).
    pub async fn revoke_node(&self, name: &str) -> Result<()> {
        self.revoke(name, &nimbus_api::pki::RevokeQuery::default())
            .await
    }

    /// Revokes certificates of the node or server `name`: all of them, or the one of
    /// `q.serial` (see [`nimbus_api::pki::RevokeQuery`]).
    pub async fn revoke(&self, name: &str, q: &nimbus_api::pki::RevokeQuery) -> Result<()> {
        let mut rb = self.req(Method::POST, &format!("/v1/pki/revoke/{name}"));
        if q.role == nimbus_api::pki::RevokeRole::Server {
            rb = rb.query(&[("role", "server")]);
        }
        if let Some(s) = &q.serial {
            rb = rb.query(&[("serial", s)]);
        }
        if q.force {
            rb = rb.query(&[("force", "true")]);
        }
        self.send(rb).await.map(|_| ())
    }

    /// Raw request for tests: returns status and body text.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Result<(StatusCode, String)> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().await.map_err(|source| ClientError::Connect {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        Ok((status, resp.text().await.unwrap_or_default()))
    }
}

fn tokio_util_stream(file: tokio::fs::File) -> impl Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
