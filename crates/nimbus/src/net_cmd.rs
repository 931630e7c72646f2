//! `nimbus network ...` and `nimbus sg ...`: tenant networks and security groups.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use nimbus_api::{AddRuleRequest, CreateNetworkRequest, SubnetRequest};
use nimbus_client::Client;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::cli::{Output, OutputArg};

/// `nimbus network`.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network (VPC).
    Create {
        /// Name.
        name: String,
        /// CIDR (default: the next free /24 of the cluster's pool).
        #[arg(long)]
        cidr: Option<String>,
        /// Subnet NAME=CIDR inside the network (repeatable; default one subnet `default`
        /// covering the whole CIDR).
        #[arg(long = "subnet", value_name = "NAME=CIDR")]
        subnets: Vec<String>,
    },
    /// List networks.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show a network.
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Delete a network (it must have no instances).
    #[command(alias = "rm")]
    Delete {
        /// Name.
        name: String,
    },
}

/// `nimbus sg`.
#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// Create a security group (all inbound from its own members, all outbound).
    Create {
        /// Name.
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List security groups.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show a security group and its rules.
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Delete a security group no instance or rule uses.
    #[command(alias = "rm")]
    Delete {
        /// Name.
        name: String,
    },
    /// Rules.
    #[command(subcommand)]
    Rule(RuleCmd),
}

/// `nimbus sg rule`.
#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Allow traffic: `nimbus sg rule add web --proto tcp --ports 80 --cidr 0.0.0.0/0`.
    Add(RuleArgs),
    /// Delete a rule by id (see `nimbus sg show`).
    #[command(alias = "rm")]
    Delete {
        /// Group.
        group: String,
        /// Rule id.
        rule: String,
    },
}

/// `nimbus sg rule add`.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Group.
    pub group: String,
    /// Protocol: tcp, udp, icmp or all.
    #[arg(long = "proto", alias = "protocol")]
    pub protocol: String,
    /// Port or range (tcp/udp): 80, 8000-8100 (default all).
    #[arg(long, alias = "port")]
    pub ports: Option<String>,
    /// Peer CIDR: source of ingress, destination of egress.
    #[arg(long)]
    pub cidr: Option<String>,
    /// Peer security group (its members).
    #[arg(long = "group", alias = "from-group")]
    pub peer_group: Option<String>,
    /// An egress rule (default ingress).
    #[arg(long)]
    pub egress: bool,
    /// Description.
    #[arg(long, default_value = "")]
    pub description: String,
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table<T: Tabled>(rows: Vec<T>) {
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

#[derive(Tabled)]
struct NetworkRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "CIDR")]
    cidr: String,
    #[tabled(rename = "VNI")]
    vni: u32,
    #[tabled(rename = "SUBNETS")]
    subnets: String,
}

/// `nimbus network ...`.
pub async fn network(c: &Client, cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            cidr,
            subnets,
        } => {
            let subnets = subnets
                .iter()
                .map(|s| {
                    s.split_once('=')
                        .map(|(n, c)| SubnetRequest {
                            name: n.into(),
                            cidr: c.into(),
                        })
                        .ok_or_else(|| anyhow!("invalid --subnet {s:?}: use NAME=CIDR"))
                })
                .collect::<Result<Vec<_>>>()?;
            let n = c
                .create_network(&CreateNetworkRequest {
                    name,
                    cidr,
                    subnets,
                })
                .await?;
            println!(
                "network {} created: {} (vni {})",
                n.meta.name, n.cidr, n.vni
            );
        }
        NetworkCmd::List(o) => {
            let v = c.list_networks().await?;
            if o.output == Output::Json {
                return print_json(&v);
            }
            print_table(
                v.into_iter()
                    .map(|n| NetworkRow {
                        subnets: n
                            .subnets
                            .iter()
                            .map(|s| format!("{}={}", s.name, s.cidr))
                            .collect::<Vec<_>>()
                            .join(","),
                        name: n.meta.name,
                        cidr: n.cidr,
                        vni: n.vni,
                    })
                    .collect(),
            );
        }
        NetworkCmd::Show { name, o } => {
            let n = c.get_network(&name).await?;
            if o.output == Output::Json {
                return print_json(&n);
            }
            println!("name:      {}", n.meta.name);
            println!("project:   {}", n.meta.project);
            println!("id:        {}", n.meta.id);
            println!("cidr:      {}", n.cidr);
            println!("vni:       {}", n.vni);
            for s in &n.subnets {
                println!("subnet:    {} {} gateway {}", s.name, s.cidr, s.gateway);
            }
            println!("created:   {}", n.meta.created_at);
        }
        NetworkCmd::Delete { name } => {
            c.delete_network(&name).await?;
            println!("network {name} deleted");
        }
    }
    Ok(())
}

#[derive(Tabled)]
struct GroupRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "RULES")]
    rules: usize,
    #[tabled(rename = "DESCRIPTION")]
    description: String,
}

#[derive(Tabled)]
struct RuleRow {
    #[tabled(rename = "ID")]
    id: String,
    #[tabled(rename = "DIRECTION")]
    direction: String,
    #[tabled(rename = "PROTOCOL")]
    protocol: String,
    #[tabled(rename = "PEER")]
    peer: String,
    #[tabled(rename = "DESCRIPTION")]
    description: String,
}

/// `nimbus sg ...`.
pub async fn sg(c: &Client, cmd: SgCmd) -> Result<()> {
    match cmd {
        SgCmd::Create { name, description } => {
            c.create_security_group(&name, &description).await?;
            println!("security group {name} created");
        }
        SgCmd::Delete { name } => {
            c.delete_security_group(&name).await?;
            println!("security group {name} deleted");
        }
        SgCmd::List(o) => {
            let v = c.list_security_groups().await?;
            if o.output == Output::Json {
                return print_json(&v);
            }
            print_table(
                v.into_iter()
                    .map(|g| GroupRow {
                        name: g.meta.name,
                        rules: g.rules.len(),
                        description: g.description,
                    })
                    .collect(),
            );
        }
        SgCmd::Show { name, o } => {
            let g = c.get_security_group(&name).await?;
            if o.output == Output::Json {
                return print_json(&g);
            }
            println!("name:    {}", g.meta.name);
            if !g.description.is_empty() {
                println!("description: {}", g.description);
            }
            print_table(
                g.rules
                    .iter()
                    .map(|r| RuleRow {
                        id: r.id.clone(),
                        direction: r.direction.as_str().into(),
                        protocol: r.ports_text(),
                        peer: r.peer_text(),
                        description: r.description.clone(),
                    })
                    .collect(),
            );
        }
        SgCmd::Rule(RuleCmd::Add(a)) => {
            let g = c
                .add_rule(
                    &a.group,
                    &AddRuleRequest {
                        direction: Some(if a.egress { "egress" } else { "ingress" }.into()),
                        protocol: a.protocol,
                        ports: a.ports,
                        cidr: a.cidr,
                        group: a.peer_group,
                        description: a.description,
                    },
                )
                .await?;
            let id = g.rules.last().map(|r| r.id.clone()).unwrap_or_default();
            println!("rule {id} added to {}", a.group);
        }
        SgCmd::Rule(RuleCmd::Delete { group, rule }) => {
            c.delete_rule(&group, &rule).await?;
            println!("rule {rule} deleted from {group}");
        }
    }
    Ok(())
}
