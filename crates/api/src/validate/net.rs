//! Validation of networks, subnets, security-group rules and published ports.

use std::collections::BTreeSet;

use crate::cidr::Cidr;
use crate::network::{
    AddRuleRequest, CreateNetworkRequest, Direction, Protocol, PublishedPort, SecurityGroupRule,
};
use crate::ApiError;

/// The largest network: a /8.
pub const MIN_NETWORK_PREFIX: u8 = 8;
/// The smallest network: a /28 (13 instances).
pub const MAX_NETWORK_PREFIX: u8 = 28;
/// The smallest subnet: a /29 (5 instances).
pub const MAX_SUBNET_PREFIX: u8 = 29;
/// Most rules in one security group.
pub const MAX_RULES: usize = 5000;

/// Parses a CIDR for `field`, as a 422 on failure.
pub fn cidr(field: &str, value: &str) -> Result<Cidr, ApiError> {
    Cidr::parse(value.trim()).map_err(|e| ApiError::invalid(field, e.to_string()))
}

/// A network CIDR: parses and checks its size (/8 to /28).
pub fn network_cidr(field: &str, value: &str) -> Result<Cidr, ApiError> {
    let c = cidr(field, value)?;
    if c.prefix_len() > MAX_NETWORK_PREFIX {
        return Err(ApiError::invalid(
            field,
            format!("{c} is too small: a network needs at least a /{MAX_NETWORK_PREFIX}"),
        ));
    }
    if c.prefix_len() < MIN_NETWORK_PREFIX {
        return Err(ApiError::invalid(
            field,
            format!("{c} is too large: a network is at most a /{MIN_NETWORK_PREFIX}"),
        ));
    }
    Ok(c)
}

/// A validated network create request: the CIDR if given and the subnets (name, CIDR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidNetwork {
    /// The CIDR, if the user gave one.
    pub cidr: Option<Cidr>,
    /// Subnets; empty means one `default` subnet covering the whole CIDR.
    pub subnets: Vec<(String, Cidr)>,
}

/// Validates a network create request (everything that does not depend on other networks).
pub fn create_network(req: &CreateNetworkRequest) -> Result<ValidNetwork, ApiError> {
    super::name("name", &req.name)?;
    let net = req
        .cidr
        .as_deref()
        .map(|c| network_cidr("cidr", c))
        .transpose()?;
    if !req.subnets.is_empty() && net.is_none() {
        return Err(ApiError::invalid(
            "cidr",
            "give the network's cidr when you give subnets",
        ));
    }
    let mut names = BTreeSet::new();
    let mut subnets: Vec<(String, Cidr)> = Vec::new();
    for (i, s) in req.subnets.iter().enumerate() {
        super::name(&format!("subnets[{i}].name"), &s.name)?;
        if !names.insert(s.name.as_str()) {
            return Err(ApiError::invalid(
                format!("subnets[{i}].name"),
                format!("subnet name {:?} is given twice", s.name),
            ));
        }
        let field = format!("subnets[{i}].cidr");
        let c = cidr(&field, &s.cidr)?;
        if c.prefix_len() > MAX_SUBNET_PREFIX {
            return Err(ApiError::invalid(
                field,
                format!("subnet {c} is too small: a subnet needs at least a /{MAX_SUBNET_PREFIX}"),
            ));
        }
        if let Some(n) = net {
            if !n.contains_cidr(c) {
                return Err(ApiError::invalid(
                    field,
                    format!("subnet {c} is outside the network {n}"),
                ));
            }
        }
        if let Some((other, _)) = subnets.iter().find(|(_, o)| o.overlaps(c)) {
            return Err(ApiError::invalid(
                field,
                format!("subnet {c} overlaps subnet {other:?}"),
            ));
        }
        subnets.push((s.name.clone(), c));
    }
    Ok(ValidNetwork { cidr: net, subnets })
}

fn parse_port(field: &str, s: &str) -> Result<u16, ApiError> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(ApiError::invalid(
            field,
            format!("{s:?} is not a port (1-65535)"),
        )),
    }
}

/// Parses a protocol name for `field`.
pub fn protocol(field: &str, s: &str) -> Result<Protocol, ApiError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "icmp" => Ok(Protocol::Icmp),
        "all" | "any" | "-1" => Ok(Protocol::All),
        _ => Err(ApiError::invalid(
            field,
            format!("unknown protocol {s:?}: use tcp, udp, icmp or all"),
        )),
    }
}

/// Parses a port range `80` or `8000-8100` (`None` or empty: all ports).
pub fn port_range(field: &str, s: Option<&str>) -> Result<(u16, u16), ApiError> {
    let s = s.map(str::trim).unwrap_or_default();
    if s.is_empty() || s == "all" {
        return Ok((1, 65535));
    }
    let (a, b) = if let Some((a, b)) = s.split_once('-') {
        (parse_port(field, a)?, parse_port(field, b)?)
    } else {
        let p = parse_port(field, s)?;
        (p, p)
    };
    if a > b {
        return Err(ApiError::invalid(
            field,
            format!("port range {s:?} is backwards: the first port must not exceed the last"),
        ));
    }
    Ok((a, b))
}

/// Validates a rule (without its id); `group` references are checked by the state machine.
pub fn rule(req: &AddRuleRequest) -> Result<SecurityGroupRule, ApiError> {
    let direction = match req.direction.as_deref().map(str::trim) {
        None | Some("" | "ingress" | "in") => Direction::Ingress,
        Some("egress" | "out") => Direction::Egress,
        Some(other) => {
            return Err(ApiError::invalid(
                "direction",
                format!("unknown direction {other:?}: use ingress or egress"),
            ))
        }
    };
    let protocol = protocol("protocol", &req.protocol)?;
    let (port_min, port_max) = if protocol.has_ports() {
        port_range("ports", req.ports.as_deref())?
    } else {
        if req.ports.as_deref().is_some_and(|p| !p.trim().is_empty()) {
            return Err(ApiError::invalid(
                "ports",
                format!("protocol {} has no ports", protocol.as_str()),
            ));
        }
        (0, 0)
    };
    let cidr = match (&req.cidr, &req.group) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "group",
                "give either cidr or group, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "cidr",
                "a rule needs a peer: a cidr (0.0.0.0/0 for anywhere) or a group",
            ))
        }
        (Some(c), None) => Some(cidr("cidr", c)?.to_string()),
        (None, Some(g)) => {
            super::name("group", g)?;
            None
        }
    };
    if req.description.len() > 255 {
        return Err(ApiError::invalid(
            "description",
            "description is at most 255 characters",
        ));
    }
    Ok(SecurityGroupRule {
        id: String::new(),
        direction,
        protocol,
        port_min,
        port_max,
        cidr,
        group: req.group.clone(),
        description: req.description.clone(),
    })
}

/// Parses a published port `HOSTPORT:PORT[/tcp|udp]` for `field`.
pub fn publish(field: &str, s: &str) -> Result<PublishedPort, ApiError> {
    let bad = || {
        ApiError::invalid(
            field,
            format!("invalid published port {s:?}: use HOSTPORT:PORT or HOSTPORT:PORT/udp"),
        )
    };
    let (ports, proto) = match s.trim().split_once('/') {
        Some((p, proto)) => (p, protocol(field, proto)?),
        None => (s.trim(), Protocol::Tcp),
    };
    if !proto.has_ports() {
        return Err(ApiError::invalid(
            field,
            format!(
                "only tcp and udp ports can be published, not {}",
                proto.as_str()
            ),
        ));
    }
    let (host, inner) = ports.split_once(':').ok_or_else(bad)?;
    Ok(PublishedPort {
        host_port: parse_port(field, host)?,
        port: parse_port(field, inner)?,
        protocol: proto,
    })
}

/// Parses all published ports of a request; a host port may appear once per protocol.
pub fn publish_list(items: &[String]) -> Result<Vec<PublishedPort>, ApiError> {
    let mut out: Vec<PublishedPort> = Vec::new();
    for (i, s) in items.iter().enumerate() {
        let field = format!("publish[{i}]");
        let p = publish(&field, s)?;
        if out
            .iter()
            .any(|o| o.host_port == p.host_port && o.protocol == p.protocol)
        {
            return Err(ApiError::invalid(
                field,
                format!(
                    "host port {}/{} is published twice",
                    p.host_port,
                    p.protocol.as_str()
                ),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::SubnetRequest;

    fn field(e: &ApiError) -> &str {
        e.field.as_deref().unwrap_or_default()
    }

    #[test]
    fn networks() {
        let mut r = CreateNetworkRequest {
            name: "web".into(),
            cidr: Some("10.50.0.0/16".into()),
            subnets: vec![
                SubnetRequest {
                    name: "a".into(),
                    cidr: "10.50.1.0/24".into(),
                },
                SubnetRequest {
                    name: "b".into(),
                    cidr: "10.50.2.0/24".into(),
                },
            ],
        };
        let v = create_network(&r).unwrap();
        assert_eq!(v.subnets.len(), 2);
        r.subnets[1].cidr = "10.51.0.0/24".into();
        let e = create_network(&r).unwrap_err();
        assert_eq!(field(&e), "subnets[1].cidr");
        assert!(e.message.contains("outside"), "{}", e.message);
        r.subnets[1].cidr = "10.50.1.128/25".into();
        assert!(create_network(&r).unwrap_err().message.contains("overlaps"));
        r.subnets[1].cidr = "10.50.9.0/30".into();
        assert!(create_network(&r)
            .unwrap_err()
            .message
            .contains("too small"));
        r.subnets.clear();
        r.cidr = Some("10.50.0.0/29".into());
        let e = create_network(&r).unwrap_err();
        assert_eq!(field(&e), "cidr");
        assert!(e.message.contains("too small"));
        r.cidr = Some("10.50.0.1/16".into());
        assert!(create_network(&r)
            .unwrap_err()
            .message
            .contains("host bits"));
        r.cidr = Some("nonsense".into());
        assert_eq!(field(&create_network(&r).unwrap_err()), "cidr");
    }

    #[test]
    fn rules() {
        let mut r = AddRuleRequest {
            protocol: "tcp".into(),
            ports: Some("80-90".into()),
            cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        };
        let v = rule(&r).unwrap();
        assert_eq!((v.port_min, v.port_max), (80, 90));
        assert_eq!(v.direction, Direction::Ingress);
        for (ports, why) in [
            ("90-80", "backwards"),
            ("0", "not a port"),
            ("70000", "not a port"),
            ("a-b", "not a port"),
        ] {
            r.ports = Some(ports.into());
            let e = rule(&r).unwrap_err();
            assert_eq!(field(&e), "ports");
            assert!(e.message.contains(why), "{ports}: {}", e.message);
        }
        r.ports = None;
        r.protocol = "sctp".into();
        assert_eq!(field(&rule(&r).unwrap_err()), "protocol");
        r.protocol = "icmp".into();
        r.ports = Some("80".into());
        assert_eq!(field(&rule(&r).unwrap_err()), "ports");
        r.ports = None;
        r.group = Some("web".into());
        assert_eq!(field(&rule(&r).unwrap_err()), "group");
        r.cidr = None;
        assert_eq!(rule(&r).unwrap().group.as_deref(), Some("web"));
        r.group = None;
        assert_eq!(field(&rule(&r).unwrap_err()), "cidr");
        r.direction = Some("sideways".into());
        assert_eq!(field(&rule(&r).unwrap_err()), "direction");
    }

    #[test]
    fn published_ports() {
        let p = publish("publish[0]", "8080:80").unwrap();
        assert_eq!((p.host_port, p.port, p.protocol), (8080, 80, Protocol::Tcp));
        assert_eq!(p.to_string(), "8080:80/tcp");
        assert_eq!(publish("p", "53:53/udp").unwrap().protocol, Protocol::Udp);
        for bad in [
            "8080",
            "0:80",
            "8080:80/icmp",
            "8080:80/sctp",
            "a:b",
            "8080:99999",
        ] {
            assert!(publish("p", bad).is_err(), "{bad}");
        }
        let e = publish_list(&["80:80".into(), "80:81/tcp".into()]).unwrap_err();
        assert_eq!(field(&e), "publish[1]");
        assert!(publish_list(&["80:80".into(), "80:80/udp".into()]).is_ok());
    }
}
