//! `nimbus lb create|list|show|update|delete|backends`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use nimbus_api::lb::{
    CreateLoadBalancerRequest, LbBackends, LbHealthCheck, LbInstanceRef, LbListener, LbProtocol,
    LbTls, LoadBalancerSpec, LoadBalancerSpecRequest, UpdateLoadBalancerRequest,
};
use nimbus_client::Client;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::cli::{Output, OutputArg};
use crate::lb_route;

/// `nimbus lb`.
#[derive(Debug, Subcommand)]
pub enum LbCmd {
    /// Create a load balancer.
    Create {
        /// Name.
        name: String,
        /// Listener and backend settings.
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List load balancers.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show one load balancer.
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Change a load balancer: the flags given replace those settings.
    Update {
        /// Name.
        name: String,
        /// Settings to change.
        #[command(flatten)]
        spec: SpecArgs,
        /// Turn the edge cache off.
        #[arg(long, conflicts_with = "cache")]
        no_cache: bool,
        /// Remove the health check.
        #[arg(long, conflicts_with = "health_check")]
        no_health_check: bool,
        /// Remove the VIP.
        #[arg(long, conflicts_with = "vip")]
        no_vip: bool,
        /// Remove all routing rules.
        #[arg(long, conflicts_with = "route")]
        no_routes: bool,
        /// Serve the LB on every ready node again (drop --node and --replicas).
        #[arg(long, conflicts_with_all = ["node", "replicas"])]
        all_nodes: bool,
    },
    /// Delete a load balancer.
    Delete {
        /// Name.
        name: String,
    },
    /// Each backend's health, per serving node.
    Backends {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
}

/// Spec flags shared by create and update.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Listener `PORT/PROTO` or `PORT:TARGET_PORT/PROTO`; PROTO is tcp, udp, http or https.
    /// Repeatable.
    #[arg(long = "listen", value_name = "PORT/PROTO")]
    pub listen: Vec<String>,
    /// Backends: running instances with this label.
    #[arg(long, value_name = "K=V", group = "sel")]
    pub backend_label: Option<String>,
    /// Backends: the instances of this group.
    #[arg(long, value_name = "GROUP", group = "sel")]
    pub backend_group: Option<String>,
    /// Backends: these instances (`NAME` or `NAME:WEIGHT`; repeatable or comma-separated).
    #[arg(long, value_name = "INSTANCE", value_delimiter = ',', group = "sel", num_args = 1..)]
    pub backend: Vec<String>,
    /// round_robin (default), least_connections, ip_hash, consistent_hash, weighted.
    #[arg(long)]
    pub algorithm: Option<String>,
    /// For consistent_hash: hash this request header instead of the client address.
    #[arg(long, value_name = "HEADER")]
    pub hash_header: Option<String>,
    /// `tcp` or `http:/PATH`, with optional `,interval=2s,timeout=1s,healthy=2,unhealthy=3,status=200`.
    #[arg(long, value_name = "SPEC")]
    pub health_check: Option<String>,
    /// PEM certificate chain for https listeners (with --tls-key or --tls-key-secret).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for https listeners; the server keeps it as the secret `<lb>-tls-key`.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        conflicts_with = "tls_key_secret"
    )]
    pub tls_key: Option<PathBuf>,
    /// Secret (of the project) holding the PEM private key for https listeners.
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_key_secret: Option<String>,
    /// Sticky sessions with this cookie name (L7).
    #[arg(long, value_name = "NAME")]
    pub sticky_cookie: Option<String>,
    /// Edge-cache cacheable GET/HEAD responses (L7).
    #[arg(long)]
    pub cache: bool,
    /// Floating IPv4 address held by one node at a time and moved on failure.
    #[arg(long, value_name = "ADDR")]
    pub vip: Option<String>,
    /// Nodes that may hold the VIP (repeatable or comma-separated; default: any serving node).
    #[arg(long, value_name = "NODE", value_delimiter = ',', num_args = 1..)]
    pub vip_node: Vec<String>,
    /// L7 routing rule, repeatable, tried in order (on update, the routes given replace all
    /// routes). Comma-separated items: `host=H` (exact or `*.suffix`), `path=/PREFIX`,
    /// `header=Name=value` (at least one of these; all given must match) and exactly one
    /// backend selector for matching requests: `backend-label=K=V`, `backend-group=G` or
    /// `backend=NAME[:WEIGHT]` (repeatable). Values cannot contain `,`.
    /// Example: `--route host=api.example.com,path=/v1,backend-label=app=api`.
    #[arg(long, value_name = "RULE")]
    pub route: Vec<String>,
    /// Place the LB only on these nodes (repeatable or comma-separated; default: any node).
    /// Must include every `--vip-node`.
    #[arg(long, value_name = "NODE", value_delimiter = ',', num_args = 1..)]
    pub node: Vec<String>,
    /// Serve the LB on this many ready, uncordoned nodes (chosen by the control plane, VIP
    /// nodes first; a node that goes down is replaced). Default: every ready node (or every
    /// `--node`).
    #[arg(long, value_name = "N")]
    pub replicas: Option<u32>,
}

fn listener(s: &str) -> Result<LbListener> {
    let bad = || anyhow!("invalid --listen {s:?}: use PORT/PROTO, e.g. 80/http");
    let (ports, proto) = s.split_once('/').ok_or_else(bad)?;
    let protocol = match proto {
        "tcp" => LbProtocol::Tcp,
        "udp" => LbProtocol::Udp,
        "http" => LbProtocol::Http,
        "https" => LbProtocol::Https,
        p => bail!("invalid --listen {s:?}: unknown protocol {p:?} (tcp, udp, http, https)"),
    };
    let (port, target) = match ports.split_once(':') {
        Some((p, t)) => (p, Some(t.parse::<u32>().map_err(|_| bad())?)),
        None => (ports, None),
    };
    Ok(LbListener {
        port: port.parse().map_err(|_| bad())?,
        protocol,
        target_port: target,
    })
}

fn duration_ms(field: &str, v: &str) -> Result<u64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1000.0)
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid {field} {v:?}: use e.g. 2s or 500ms"))?;
    Ok((n * mult) as u64)
}

fn health_check(spec: &str) -> Result<LbHealthCheck> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let mut hc = LbHealthCheck::default();
    match head.split_once(':') {
        Some(("http", path)) => {
            hc.kind = "http".into();
            hc.path = Some(path.to_string());
        }
        None if head == "http" => {
            hc.kind = "http".into();
            hc.path = Some("/".into());
        }
        None => hc.kind = head.to_string(),
        Some(_) => bail!("invalid --health-check {spec:?}: use tcp or http:/PATH"),
    }
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("invalid --health-check option {kv:?}: use key=value"))?;
        let num = || {
            v.parse::<u32>()
                .map_err(|_| anyhow!("invalid --health-check {k}={v:?}"))
        };
        match k {
            "interval" => hc.interval_ms = duration_ms("interval", v)?,
            "timeout" => hc.timeout_ms = duration_ms("timeout", v)?,
            "healthy" => hc.healthy_threshold = num()?,
            "unhealthy" => hc.unhealthy_threshold = num()?,
            "status" => hc.expect_status = num()? as u16,
            _ => bail!("unknown --health-check option {k:?} (interval, timeout, healthy, unhealthy, status)"),
        }
    }
    Ok(hc)
}

fn backends(a: &SpecArgs) -> Result<Option<LbBackends>> {
    if let Some(l) = &a.backend_label {
        return Ok(Some(LbBackends {
            label: Some(l.clone()),
            ..LbBackends::default()
        }));
    }
    if let Some(g) = &a.backend_group {
        return Ok(Some(LbBackends {
            group: Some(g.clone()),
            ..LbBackends::default()
        }));
    }
    if a.backend.is_empty() {
        return Ok(None);
    }
    let instances = a
        .backend
        .iter()
        .map(|b| match b.split_once(':') {
            Some((n, w)) => Ok(LbInstanceRef {
                name: n.to_string(),
                weight: w
                    .parse()
                    .map_err(|_| anyhow!("invalid --backend {b:?}: use NAME or NAME:WEIGHT"))?,
            }),
            None => Ok(LbInstanceRef {
                name: b.clone(),
                weight: 1,
            }),
        })
        .collect::<Result<_>>()?;
    Ok(Some(LbBackends {
        instances,
        ..LbBackends::default()
    }))
}

fn tls(a: &SpecArgs) -> Result<Option<LbTls>> {
    let Some(c) = &a.tls_cert else {
        return Ok(None);
    };
    let cert_pem =
        std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
    match (&a.tls_key, &a.tls_key_secret) {
        (Some(k), _) => Ok(Some(LbTls {
            cert_pem,
            key_pem: std::fs::read_to_string(k)
                .with_context(|| format!("reading {}", k.display()))?,
            key_secret: None,
        })),
        (None, Some(s)) => Ok(Some(LbTls {
            cert_pem,
            key_pem: String::new(),
            key_secret: Some(s.clone()),
        })),
        (None, None) => bail!("--tls-cert needs --tls-key FILE or --tls-key-secret NAME"),
    }
}

/// Overlay the given flags on a spec (create starts from an empty one).
fn apply(a: &SpecArgs, base: LoadBalancerSpecRequest) -> Result<LoadBalancerSpecRequest> {
    let mut s = base;
    if !a.listen.is_empty() {
        s.listeners = a
            .listen
            .iter()
            .map(|l| listener(l))
            .collect::<Result<_>>()?;
    }
    if let Some(b) = backends(a)? {
        s.backends = b;
    }
    if a.algorithm.is_some() {
        s.algorithm.clone_from(&a.algorithm);
    }
    if a.hash_header.is_some() {
        s.hash_header.clone_from(&a.hash_header);
    }
    if let Some(h) = &a.health_check {
        s.health_check = Some(health_check(h)?);
    }
    if let Some(t) = tls(a)? {
        s.tls = Some(t);
    }
    if a.sticky_cookie.is_some() {
        s.sticky_cookie.clone_from(&a.sticky_cookie);
    }
    if a.cache {
        s.cache = true;
    }
    if a.vip.is_some() {
        s.vip.clone_from(&a.vip);
    }
    if !a.vip_node.is_empty() {
        s.vip_nodes.clone_from(&a.vip_node);
    }
    if !a.node.is_empty() {
        s.nodes.clone_from(&a.node);
    }
    if a.replicas.is_some() {
        s.replicas = a.replicas;
    }
    if !a.route.is_empty() {
        s.routes = a
            .route
            .iter()
            .map(|r| lb_route::parse(r))
            .collect::<Result<_>>()?;
    }
    Ok(s)
}

fn to_request(s: LoadBalancerSpec) -> LoadBalancerSpecRequest {
    LoadBalancerSpecRequest {
        listeners: s.listeners,
        backends: s.backends,
        algorithm: Some(s.algorithm),
        hash_header: s.hash_header,
        health_check: s.health_check,
        routes: s.routes,
        sticky_cookie: s.sticky_cookie,
        tls: s.tls,
        cache: s.cache,
        vip: s.vip,
        vip_nodes: s.vip_nodes,
        nodes: s.nodes,
        replicas: s.replicas,
    }
}

#[derive(Tabled)]
struct LbRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "LISTENERS")]
    listeners: String,
    #[tabled(rename = "BACKENDS")]
    backends: String,
    #[tabled(rename = "ALGORITHM")]
    algorithm: String,
    #[tabled(rename = "HEALTHY")]
    healthy: String,
    #[tabled(rename = "NODES")]
    nodes: String,
    #[tabled(rename = "VIP (HOLDER)")]
    vip: String,
}

fn selector(b: &LbBackends) -> String {
    if let Some(l) = &b.label {
        format!("label {l}")
    } else if let Some(g) = &b.group {
        format!("group {g}")
    } else {
        b.instances
            .iter()
            .map(|i| {
                if i.weight == 1 {
                    i.name.clone()
                } else {
                    format!("{}:{}", i.name, i.weight)
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn row(l: nimbus_api::lb::LoadBalancer) -> LbRow {
    let healthy = l.status.backends.iter().filter(|b| b.healthy).count();
    LbRow {
        listeners: l
            .spec
            .listeners
            .iter()
            .map(|x| format!("{}/{}", x.port, x.protocol.as_str()))
            .collect::<Vec<_>>()
            .join(","),
        backends: selector(&l.spec.backends),
        algorithm: l.spec.algorithm,
        healthy: format!("{healthy}/{}", l.status.backends.len()),
        nodes: l.status.nodes.join(","),
        vip: match (&l.spec.vip, &l.status.vip) {
            (None, _) => "-".into(),
            (Some(v), Some(lease)) if lease.address == *v => {
                format!("{v} ({})", lease.holder.as_deref().unwrap_or("none"))
            }
            (Some(v), _) => format!("{v} (none)"),
        },
        name: l.meta.name,
    }
}

fn table<T: Tabled>(rows: Vec<T>) {
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(Tabled)]
struct BackendRow {
    #[tabled(rename = "INSTANCE")]
    instance: String,
    #[tabled(rename = "ADDRESS")]
    address: String,
    #[tabled(rename = "HEALTH")]
    health: String,
    #[tabled(rename = "NODE")]
    node: String,
}

/// Run an `lb` verb.
pub async fn run(c: &Client, cmd: LbCmd) -> Result<()> {
    match cmd {
        LbCmd::Create { name, spec } => {
            if spec.listen.is_empty() {
                bail!("nimbus lb create needs at least one --listen PORT/PROTO");
            }
            if spec.backend_label.is_none()
                && spec.backend_group.is_none()
                && spec.backend.is_empty()
            {
                bail!("nimbus lb create needs --backend-label K=V, --backend-group GROUP or --backend INSTANCE");
            }
            let req = CreateLoadBalancerRequest {
                name,
                spec: apply(&spec, LoadBalancerSpecRequest::default())?,
                labels: std::collections::BTreeMap::new(),
            };
            let l = c.create_lb(&req).await?;
            println!("created load balancer {}", l.meta.name);
        }
        LbCmd::List(o) => {
            let v = c.list_lbs().await?;
            if o.output == Output::Json {
                return json(&v);
            }
            table(v.into_iter().map(row).collect());
        }
        LbCmd::Show { name, o } => {
            let l = c.get_lb(&name).await?;
            if o.output == Output::Json {
                return json(&l);
            }
            let routes: Vec<String> = l.spec.routes.iter().map(lb_route::format).collect();
            table(vec![row(l)]);
            if !routes.is_empty() {
                println!("routes (in order; the first match wins):");
                for (i, r) in routes.iter().enumerate() {
                    println!("  {i}: {r}");
                }
            }
        }
        LbCmd::Update {
            name,
            spec,
            no_cache,
            no_health_check,
            no_vip,
            no_routes,
            all_nodes,
        } => {
            let cur = c.get_lb(&name).await?;
            let mut s = apply(&spec, to_request(cur.spec))?;
            if no_cache {
                s.cache = false;
            }
            if no_health_check {
                s.health_check = None;
            }
            if no_vip {
                s.vip = None;
                s.vip_nodes.clear();
            }
            if no_routes {
                s.routes.clear();
            }
            if all_nodes {
                s.nodes.clear();
                s.replicas = None;
            }
            let l = c
                .update_lb(
                    &name,
                    &UpdateLoadBalancerRequest {
                        spec: s,
                        version: Some(cur.meta.version),
                    },
                )
                .await?;
            println!(
                "updated load balancer {} (version {})",
                l.meta.name, l.meta.version
            );
        }
        LbCmd::Delete { name } => {
            c.delete_lb(&name).await?;
            println!("deleted load balancer {name}");
        }
        LbCmd::Backends { name, o } => {
            let v = c.lb_backends(&name).await?;
            if o.output == Output::Json {
                return json(&v);
            }
            table(
                v.into_iter()
                    .map(|b| BackendRow {
                        instance: b.instance,
                        address: b.address,
                        health: if b.healthy { "healthy" } else { "unhealthy" }.into(),
                        node: b.node,
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_listeners_and_health_checks() {
        let l = listener("8080:80/http").unwrap();
        assert_eq!(
            (l.port, l.target_port, l.protocol),
            (8080, Some(80), LbProtocol::Http)
        );
        assert!(listener("80").is_err());
        assert!(listener("80/sctp").is_err());
        let h = health_check("http:/healthz,interval=500ms,unhealthy=2").unwrap();
        assert_eq!(h.kind, "http");
        assert_eq!(h.path.as_deref(), Some("/healthz"));
        assert_eq!(h.interval_ms, 500);
        assert_eq!(h.unhealthy_threshold, 2);
        assert!(health_check("tcp,bogus=1").is_err());
    }
}
