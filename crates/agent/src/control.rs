//! The agent's side of the conversation with the control plane: registration (retried),
//! heartbeats with measured utilisation, the long-poll of assignments and network maps, and the
//! load balancers' backend health reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nimbus_api::agent::{Assignment, HeartbeatRequest, RegisterNodeRequest};
use nimbus_api::NodeCapabilities;
use tokio::sync::watch;

use crate::runtime::Agent;
use crate::server_link::LinkError;

impl Agent {
    pub(crate) async fn register(&self, reg: &RegisterNodeRequest) -> Result<(), LinkError> {
        let mut delay = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.link.register(reg).await {
                Ok(r) => {
                    tracing::info!(node = %r.node.meta.name, underlay = %r.node.underlay_ip, "registered with the control plane");
                    self.keep_credentials(&r);
                    return Ok(());
                }
                Err(LinkError::Refused(mut e)) => {
                    let registered = !self
                        .credentials
                        .lock()
                        .expect("credentials lock")
                        .credential
                        .is_empty();
                    if registered && e.code == nimbus_api::ErrorCode::Unauthorized {
                        e.message = format!(
                            "{}: the control plane no longer accepts this node's credential (was the node removed?); to register it anew with the node token, delete {}",
                            e.message,
                            crate::credential::path(&self.cfg.data_dir).display()
                        );
                    }
                    return Err(LinkError::Refused(e));
                }
                Err(e @ LinkError::NotNimbus(..)) => return Err(e),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!("registration failed, retrying: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Changes what the node reports it can run (for example once the VM accelerator probe has
    /// finished) and re-registers.
    pub async fn set_capabilities(&self, caps: NodeCapabilities) -> Result<(), LinkError> {
        *self.capabilities.lock().expect("caps lock") = caps.clone();
        let reg = {
            let mut r = self.registration.lock().expect("registration lock");
            let Some(reg) = r.as_mut() else { return Ok(()) };
            reg.capabilities = caps;
            reg.clone()
        };
        let r = self.link.register(&reg).await?;
        self.keep_credentials(&r);
        Ok(())
    }

    /// Keeps (and saves) what a registration answer carries: the node's credential after its
    /// first registration (used for every call from then on), the servers' token and the
    /// metrics token's hash.
    pub(crate) fn keep_credentials(&self, r: &nimbus_api::agent::RegisteredNode) {
        let mut c = self.credentials.lock().expect("credentials lock");
        let mut changed = false;
        if let Some(cred) = r.credential.as_ref().filter(|n| **n != c.credential) {
            c.credential.clone_from(cred);
            self.link.set_token(cred.clone());
            changed = true;
        }
        if let Some(t) = r
            .agent_api_token
            .as_ref()
            .filter(|t| **t != c.agent_api_token)
        {
            c.agent_api_token.clone_from(t);
            changed = true;
        }
        if let Some(h) = r
            .metrics_token_sha256
            .as_ref()
            .filter(|h| **h != c.metrics_token_sha256)
        {
            c.metrics_token_sha256.clone_from(h);
            changed = true;
        }
        if changed {
            if let Err(e) = crate::credential::save(&self.cfg.data_dir, &c) {
                tracing::error!(
                    "saving the node credentials in {}: {e}; this node cannot register again after a restart",
                    crate::credential::path(&self.cfg.data_dir).display()
                );
            }
        }
    }

    pub(crate) async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat_every);
        let mut usage = crate::usage::Sampler::new();
        loop {
            tick.tick().await;
            let hb = if self.cfg.hollow {
                HeartbeatRequest::default()
            } else {
                usage.sample().await
            };
            match self.link.heartbeat(&self.cfg.name, &hb).await {
                Ok(()) => {}
                Err(LinkError::Refused(e)) if e.code == nimbus_api::ErrorCode::NotFound => {
                    tracing::warn!("the control plane forgot this node; registering again");
                    let reg = self.registration.lock().expect("registration lock").clone();
                    if let Some(reg) = reg {
                        if let Ok(r) = self.link.register(&reg).await {
                            self.keep_credentials(&r);
                        }
                    }
                }
                Err(e) => tracing::warn!("heartbeat failed: {e}"),
            }
        }
    }

    pub(crate) async fn watch_loop(
        self: Arc<Self>,
        tx: watch::Sender<Option<u64>>,
        net_tx: watch::Sender<u64>,
    ) {
        let mut after = 0;
        let mut net_after = 0;
        let mut first = true;
        loop {
            let wait = if first { 0 } else { 30 };
            match self
                .link
                // A hollow node has no datapath: network changes need not wake it.
                .assignments(
                    &self.cfg.name,
                    after,
                    (!self.cfg.hollow).then_some(net_after),
                    wait,
                )
                .await
            {
                Ok(resp) => {
                    if let (Some(list), Some(r)) = (&self.cfg.revocation, &resp.revoked_servers) {
                        list.set(r.names.iter().cloned(), r.serials.iter().cloned());
                    }
                    let map = {
                        let mut held = self.net_map.lock().expect("net map lock");
                        match (resp.network, &resp.network_delta) {
                            (Some(map), _) => Some(map),
                            (None, Some(delta)) => {
                                let mut map = held.clone().unwrap_or_default();
                                match map.apply(delta) {
                                    Ok(()) => Some(map),
                                    Err(e) => {
                                        // Ask for the whole map next time.
                                        tracing::warn!("{e}; asking for the whole map");
                                        *held = None;
                                        net_after = 0;
                                        None
                                    }
                                }
                            }
                            (None, None) => None,
                        }
                    };
                    if let Some(map) = map {
                        if first || map.revision != net_after {
                            net_after = map.revision;
                            *self.net_map.lock().expect("net map lock") = Some(map);
                            net_tx.send_replace(net_after);
                        }
                    }
                    // In-kernel L4 tables live next to the datapath's (same prefix); a hollow
                    // node has no datapath.
                    let kernel_l4 = (!self.cfg.hollow).then(|| {
                        self.cfg.nft_table.clone().unwrap_or_else(|| {
                            self.net_map
                                .lock()
                                .expect("net map lock")
                                .as_ref()
                                .map(|m| m.prefix.clone())
                                .unwrap_or_default()
                        })
                    });
                    self.lbs
                        .reconcile(&resp.loadbalancers, kernel_l4.as_deref())
                        .await;
                    self.vips.set_targets(&resp.loadbalancers);
                    // Instances may reach the node's LB listeners: open them in the datapath.
                    let ports = crate::netloop::lb_ports(&resp.loadbalancers);
                    let ports_changed = {
                        let mut held = self.lb_ports.lock().expect("lb ports lock");
                        let changed = *held != ports;
                        *held = ports;
                        changed
                    };
                    if ports_changed {
                        net_tx.send_modify(|_| {});
                    }
                    if first || resp.revision != after {
                        let map: BTreeMap<String, Assignment> = resp
                            .assignments
                            .into_iter()
                            .map(|a| (a.id.clone(), a))
                            .collect();
                        *self.assignments.lock().expect("assignments lock") = map;
                        self.assignments_known.send_replace(true);
                        after = resp.revision;
                        let _ = tx.send(Some(after));
                    }
                    first = false;
                }
                Err(e) => {
                    tracing::warn!("watching assignments failed: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Reports backend health of the LBs this node serves when it changes (checked every
    /// 500 ms, re-sent every 30 s).
    pub(crate) async fn lb_health_loop(self: Arc<Self>) {
        let mut last = None;
        let mut last_sent = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.lbs.health().await;
            if now.is_empty() && last.is_none() {
                continue;
            }
            if last.as_ref() == Some(&now) && last_sent.elapsed() < Duration::from_secs(30) {
                continue;
            }
            let report = nimbus_api::agent::LbHealthReport {
                loadbalancers: now.clone(),
            };
            match self.link.lb_health(&self.cfg.name, &report).await {
                Ok(()) => {
                    last = Some(now);
                    last_sent = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!("reporting load-balancer health failed: {e}"),
            }
        }
    }
}
