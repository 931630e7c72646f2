//! The agent's connection to the control plane, failing over between the known servers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nimbus_api::agent::{
    AssignmentsResponse, HeartbeatRequest, RegisterNodeRequest, RegisteredNode, StatusReport,
};
use nimbus_api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Failures talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No server answered.
    #[error("no control-plane server reachable (tried {tried}): {last}")]
    Unreachable {
        /// Servers tried.
        tried: String,
        /// Last error.
        last: String,
    },
    /// The server refused the request.
    #[error("server refused: {} ({})", .0.message, .0.code.as_str())]
    Refused(nimbus_api::ApiError),
    /// The address answered but is not a nimbus server.
    #[error("{0} does not look like a nimbus server: {1}")]
    NotNimbus(String, String),
}

/// HTTP link to the servers.
pub struct ServerLink {
    servers: Vec<String>,
    current: AtomicUsize,
    token: std::sync::RwLock<String>,
    http: reqwest::Client,
}

impl ServerLink {
    /// A link to `servers` with a bearer token (the node token, or the node's credential).
    pub fn new(servers: Vec<String>, token: String) -> Self {
        Self::with_tls(servers, token, None)
    }

    /// A link to `servers` authenticated by `tls` (a client certificate; see
    /// `nimbus_pki`) or, without it, by the node token.
    pub fn with_tls(
        servers: Vec<String>,
        token: String,
        tls: Option<rustls::ClientConfig>,
    ) -> Self {
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if let Some(tls) = tls {
            b = b.use_preconfigured_tls(tls);
        }
        let http = b.build().unwrap_or_default();
        Self {
            servers,
            current: AtomicUsize::new(0),
            token: std::sync::RwLock::new(token),
            http,
        }
    }

    /// Uses `token` for the calls from now on (the node's credential once it has one).
    pub fn set_token(&self, token: String) {
        *self.token.write().expect("token lock") = token;
    }

    fn token(&self) -> String {
        self.token.read().expect("token lock").clone()
    }

    /// A fresh certificate for this node's identity over the key of `csr` (authenticated by
    /// the current client certificate).
    pub async fn renew_cert(&self, csr: String) -> Result<nimbus_api::pki::IssuedCert, LinkError> {
        self.call(
            reqwest::Method::POST,
            "/v1/pki/renew",
            Some(&nimbus_api::pki::RenewRequest { csr }),
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| LinkError::NotNimbus(self.servers.join(","), "empty answer".into()))
    }

    async fn call<B: Serialize + Sync, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Option<R>, LinkError> {
        let n = self.servers.len().max(1);
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no servers configured");
        let token = self.token();
        let mut retried = false;
        let mut k = 0;
        while k < n {
            let idx = (start + k) % n;
            k += 1;
            let Some(base) = self.servers.get(idx) else {
                break;
            };
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&token)
                .timeout(timeout);
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        self.current.store(idx, Ordering::Relaxed);
                        if status == reqwest::StatusCode::NO_CONTENT {
                            return Ok(None);
                        }
                        // A body cut short (a slow or overloaded server) is worth a retry; a
                        // whole body that is not ours means this is not a nimbus server.
                        match resp.bytes().await {
                            Ok(body) => {
                                return serde_json::from_slice::<R>(&body).map(Some).map_err(|e| {
                                    LinkError::NotNimbus(base.clone(), e.to_string())
                                });
                            }
                            Err(e) => last = format!("{base}: reading the answer: {e}"),
                        }
                        continue;
                    }
                    let text = resp.text().await.unwrap_or_default();
                    match serde_json::from_str::<ErrorBody>(&text) {
                        Ok(b) if b.error.code == nimbus_api::ErrorCode::Unavailable => {
                            last = b.error.message;
                        }
                        // A kept-alive connection that outlived the node's previous
                        // certificate (refused before the router, then closed): again on a
                        // new connection, with the renewed certificate.
                        Ok(b)
                            if b.error.code == nimbus_api::ErrorCode::CertificateExpired
                                && !retried =>
                        {
                            retried = true;
                            k -= 1;
                            last = b.error.message;
                        }
                        Ok(b) => return Err(LinkError::Refused(b.error)),
                        Err(_) => {
                            return Err(LinkError::NotNimbus(
                                base.clone(),
                                format!(
                                    "HTTP {status}: {}",
                                    text.chars().take(200).collect::<String>()
                                ),
                            ))
                        }
                    }
                }
                Err(e) => last = format!("{base}: {e}"),
            }
        }
        Err(LinkError::Unreachable {
            tried: self.servers.join(", "),
            last,
        })
    }

    /// Registers the node (the answer carries its credentials).
    pub async fn register(&self, req: &RegisterNodeRequest) -> Result<RegisteredNode, LinkError> {
        self.call(
            reqwest::Method::POST,
            "/v1/nodes",
            Some(req),
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| {
            LinkError::NotNimbus(
                self.servers.join(","),
                "empty answer to registration".into(),
            )
        })
    }

    /// Heartbeat.
    pub async fn heartbeat(&self, node: &str, req: &HeartbeatRequest) -> Result<(), LinkError> {
        self.call::<_, serde_json::Value>(
            reqwest::Method::POST,
            &format!("/v1/nodes/{node}/heartbeat"),
            Some(req),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }

    /// Long-polls assignments and the network map: returns when the node's assignments
    /// change past `after` or the network map past `net_after` (`None`: network changes do
    /// not wake the poll), or after `wait` seconds. The map comes as a delta against the one
    /// at `net_after` when the server can make one.
    pub async fn assignments(
        &self,
        node: &str,
        after: u64,
        net_after: Option<u64>,
        wait: u64,
    ) -> Result<AssignmentsResponse, LinkError> {
        let net = net_after
            .map(|n| format!("&net_after={n}&delta=true"))
            .unwrap_or_default();
        self.call::<(), AssignmentsResponse>(
            reqwest::Method::GET,
            &format!("/v1/nodes/{node}/assignments?after={after}{net}&wait={wait}"),
            None,
            Duration::from_secs(wait + 10),
        )
        .await?
        .ok_or_else(|| LinkError::NotNimbus(self.servers.join(","), "empty assignments".into()))
    }

    /// The unsealed secrets of instance `id`, which the control plane gives only to the node
    /// the instance is placed on.
    pub async fn instance_secrets(
        &self,
        node: &str,
        id: &str,
    ) -> Result<nimbus_api::secret::InstanceSecrets, LinkError> {
        self.call::<(), nimbus_api::secret::InstanceSecrets>(
            reqwest::Method::GET,
            &format!("/v1/nodes/{node}/instances/{id}/secrets"),
            None,
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| LinkError::NotNimbus(self.servers.join(","), "empty secrets".into()))
    }

    /// Sends status reports.
    pub async fn report(&self, node: &str, report: &StatusReport) -> Result<(), LinkError> {
        self.call::<_, serde_json::Value>(
            reqwest::Method::POST,
            &format!("/v1/nodes/{node}/status"),
            Some(report),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    }

    /// Sends load-balancer backend health.
    pub async fn lb_health(
        &self,
        node: &str,
        report: &nimbus_api::agent::LbHealthReport,
    ) -> Result<(), LinkError> {
        self.call::<_, serde_json::Value>(
            reqwest::Method::POST,
            &format!("/v1/nodes/{node}/lb-health"),
            Some(report),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    }

    /// Acquires, renews or releases an LB's VIP lease; `timeout` bounds the whole request.
    pub async fn vip_lease(
        &self,
        node: &str,
        req: &nimbus_api::lb::VipLeaseRequest,
        timeout: Duration,
    ) -> Result<nimbus_api::lb::VipLeaseResponse, LinkError> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/nodes/{node}/vip-lease"),
            Some(req),
            timeout,
        )
        .await?
        .ok_or_else(|| {
            LinkError::NotNimbus(self.servers.join(","), "empty VIP lease answer".into())
        })
    }

    /// Registers many nodes (a hollow fleet); returns the refused ones.
    pub async fn register_fleet(
        &self,
        req: &nimbus_api::agent::FleetRegisterRequest,
    ) -> Result<nimbus_api::agent::FleetRegisterResponse, LinkError> {
        self.call(
            reqwest::Method::POST,
            "/v1/fleet/register",
            Some(req),
            Duration::from_secs(60),
        )
        .await?
        .ok_or_else(|| LinkError::NotNimbus(self.servers.join(","), "empty answer".into()))
    }

    /// Heartbeats for many nodes.
    pub async fn heartbeat_fleet(
        &self,
        req: &nimbus_api::agent::FleetHeartbeatRequest,
    ) -> Result<(), LinkError> {
        self.call::<_, serde_json::Value>(
            reqwest::Method::POST,
            "/v1/fleet/heartbeats",
            Some(req),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    }

    /// Status reports of many nodes.
    pub async fn report_fleet(
        &self,
        req: &nimbus_api::agent::FleetStatusRequest,
    ) -> Result<(), LinkError> {
        self.call::<_, serde_json::Value>(
            reqwest::Method::POST,
            "/v1/fleet/status",
            Some(req),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    /// Long-polls the assignments of a fleet's nodes changed after `since`.
    pub async fn watch_fleet(
        &self,
        fleet: &str,
        since: u64,
        wait: u64,
    ) -> Result<nimbus_api::agent::FleetWatchResponse, LinkError> {
        self.call::<(), _>(
            reqwest::Method::GET,
            &format!("/v1/fleet/{fleet}/watch?since={since}&wait={wait}"),
            None,
            Duration::from_secs(wait + 30),
        )
        .await?
        .ok_or_else(|| LinkError::NotNimbus(self.servers.join(","), "empty answer".into()))
    }

    /// Downloads a blob into `dest` (a writer).
    pub async fn blob(&self, digest: &str) -> Result<bytes::Bytes, LinkError> {
        let mut last = String::new();
        let token = self.token();
        for base in &self.servers {
            match self
                .http
                .get(format!("{base}/v1/images/blobs/{digest}"))
                .bearer_auth(&token)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) => return Ok(b),
                    Err(e) => last = e.to_string(),
                },
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(LinkError::Unreachable {
            tried: self.servers.join(", "),
            last,
        })
    }
}
