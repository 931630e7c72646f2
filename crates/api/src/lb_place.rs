//! Validation of a load balancer's placement: `nodes` (the nodes it may be placed on),
//! `replicas` (how many serve it) and how they constrain `vip_nodes` (the VIP can only be held
//! by a node that serves the LB).

use crate::lb::LoadBalancerSpecRequest;
use crate::ApiError;

/// Most serving nodes an LB can ask for.
pub const MAX_REPLICAS: u32 = 1_000;

/// Validate `nodes`: node names, none twice; the VIP nodes must be among them.
pub fn nodes(req: &LoadBalancerSpecRequest) -> Result<Vec<String>, ApiError> {
    for (i, n) in req.nodes.iter().enumerate() {
        crate::validate::name(&format!("nodes[{i}]"), n)?;
        if req.nodes[..i].contains(n) {
            return Err(ApiError::invalid(
                format!("nodes[{i}]"),
                format!("node {n:?} is listed twice"),
            ));
        }
    }
    if !req.nodes.is_empty() {
        if let Some((i, n)) = req
            .vip_nodes
            .iter()
            .enumerate()
            .find(|(_, n)| !req.nodes.contains(n))
        {
            return Err(ApiError::invalid(
                format!("vip_nodes[{i}]"),
                format!("VIP node {n:?} is not among the LB's nodes, so it would not serve the LB"),
            ));
        }
    }
    Ok(req.nodes.clone())
}

/// Validate `replicas`: 1 to [`MAX_REPLICAS`], at most the number of `nodes` given and at
/// least the number of `vip_nodes` (placement picks the VIP nodes first, so they all serve).
pub fn replicas(req: &LoadBalancerSpecRequest) -> Result<Option<u32>, ApiError> {
    let Some(r) = req.replicas else {
        return Ok(None);
    };
    if r == 0 || r > MAX_REPLICAS {
        return Err(ApiError::invalid(
            "replicas",
            format!("replicas {r} out of range 1-{MAX_REPLICAS}"),
        ));
    }
    if !req.nodes.is_empty() && r as usize > req.nodes.len() {
        return Err(ApiError::invalid(
            "replicas",
            format!(
                "replicas {r} is more than the {} nodes given",
                req.nodes.len()
            ),
        ));
    }
    if req.vip_nodes.len() > r as usize {
        return Err(ApiError::invalid(
            "vip_nodes",
            format!(
                "{} VIP nodes but only {r} replicas: every VIP node must serve the LB",
                req.vip_nodes.len()
            ),
        ));
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use crate::lb::tests::{base, field};
    use crate::lb::validate_spec;

    #[test]
    fn placement_validation() {
        let s = validate_spec(&base()).unwrap();
        assert!(s.nodes.is_empty() && s.replicas.is_none());
        let mut r = base();
        r.nodes = vec!["n1".into(), "n2".into()];
        r.replicas = Some(2);
        r.vip = Some("10.0.0.50".into());
        r.vip_nodes = vec!["n2".into()];
        let s = validate_spec(&r).unwrap();
        assert_eq!((s.nodes.len(), s.replicas), (2, Some(2)));

        let mut bad = r.clone();
        bad.replicas = Some(3);
        assert_eq!(field(&bad), "replicas");
        bad.replicas = Some(0);
        assert_eq!(field(&bad), "replicas");
        let mut bad = r.clone();
        bad.vip_nodes = vec!["n3".into()];
        assert_eq!(field(&bad), "vip_nodes[0]");
        let mut bad = r.clone();
        bad.nodes = vec!["n1".into(), "n1".into()];
        assert_eq!(field(&bad), "nodes[1]");
        bad.nodes = vec!["Bad Name".into()];
        assert_eq!(field(&bad), "nodes[0]");
        let mut bad = r;
        bad.nodes.clear();
        bad.replicas = Some(1);
        bad.vip_nodes = vec!["n1".into(), "n2".into()];
        assert_eq!(field(&bad), "vip_nodes");
        let mut ok = base();
        ok.replicas = Some(MAX);
        assert!(validate_spec(&ok).is_ok());
        ok.replicas = Some(MAX + 1);
        assert_eq!(field(&ok), "replicas");
    }

    const MAX: u32 = super::MAX_REPLICAS;
}
