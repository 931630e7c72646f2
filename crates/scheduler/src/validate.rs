//! Typed validation errors that name the offending field.

use std::collections::BTreeMap;
use std::fmt;

use crate::constraint::{ConstraintOp, ZONE_KEY};
use crate::{Cluster, InstanceRequest, Policy};

/// An invalid policy or request: the field (e.g. `weights.cpu`, `constraints[0]`,
/// `priority_class`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path of the offending field.
    pub field: String,
    /// Human-readable explanation.
    pub message: String,
}

impl PolicyError {
    /// A new error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for PolicyError {}

fn ratio(field: &str, v: f64) -> Result<(), PolicyError> {
    if v.is_finite() && v >= 1.0 {
        Ok(())
    } else {
        Err(PolicyError::new(
            field,
            format!("overcommit ratio must be a finite number >= 1, got {v}"),
        ))
    }
}

impl Policy {
    /// Checks ratios (finite, >= 1), instance limit (>= 1), weights (finite, non-negative, not all
    /// zero) and the adaptive law.
    pub fn validate(&self) -> Result<(), PolicyError> {
        ratio("cpu_overcommit", self.cpu_overcommit)?;
        ratio("memory_overcommit", self.memory_overcommit)?;
        ratio("disk_overcommit", self.disk_overcommit)?;
        if self.max_instances_per_node == 0 {
            return Err(PolicyError::new(
                "max_instances_per_node",
                "must be at least 1",
            ));
        }
        let w = self.weights;
        for (name, v) in [
            ("weights.cpu", w.cpu),
            ("weights.memory", w.memory),
            ("weights.network", w.network),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(PolicyError::new(
                    name,
                    format!("weight must be a finite number >= 0, got {v}"),
                ));
            }
        }
        if w.cpu + w.memory + w.network <= 0.0 {
            return Err(PolicyError::new(
                "weights",
                "at least one weight must be positive",
            ));
        }
        self.adaptive.validate()
    }
}

impl Cluster {
    /// Checks a request against this cluster: every constraint names a label key some node has
    /// (or a zone that exists), the constraints do not contradict each other, and at least one
    /// node satisfies all of them (ignoring capacity). Capacity shortfalls are not validation
    /// errors: they are [`crate::Unschedulable`].
    pub fn validate_request(&self, req: &InstanceRequest) -> Result<(), PolicyError> {
        let mut eq: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        for (i, c) in req.constraints.iter().enumerate() {
            let field = format!("constraints[{i}]");
            let values: Vec<&str> = match &c.op {
                ConstraintOp::Eq(v) | ConstraintOp::Ne(v) => vec![v.as_str()],
                ConstraintOp::In(vs) => vs.iter().map(String::as_str).collect(),
            };
            if values.is_empty() {
                return Err(PolicyError::new(
                    field,
                    format!("`{}` lists no values", c.key),
                ));
            }
            if c.key == ZONE_KEY {
                for z in &values {
                    if !self.has_zone(z) {
                        return Err(PolicyError::new(
                            field,
                            format!("unknown zone {z:?} (zones: {})", self.zones().join(", ")),
                        ));
                    }
                }
            } else if !self.has_label_key(&c.key) {
                return Err(PolicyError::new(
                    field,
                    format!("no node has a label {:?}", c.key),
                ));
            }
            if let ConstraintOp::Eq(v) = &c.op {
                if let Some((j, prev)) = eq.insert(&c.key, (i, v)) {
                    if prev != v {
                        return Err(PolicyError::new(
                            field,
                            format!("`{c}` contradicts constraints[{j}] ({}={prev})", c.key),
                        ));
                    }
                }
            }
        }
        if !req.constraints.is_empty()
            && !(0..self.len()).any(|i| self.matches(i, &req.constraints))
        {
            let list: Vec<String> = req.constraints.iter().map(ToString::to_string).collect();
            return Err(PolicyError::new(
                "constraints",
                format!("unsatisfiable: no node matches all of {}", list.join(", ")),
            ));
        }
        if req.anti_affinity && req.spread_group.is_none() {
            return Err(PolicyError::new(
                "anti_affinity",
                "hard anti-affinity needs a spread_group",
            ));
        }
        Ok(())
    }
}
