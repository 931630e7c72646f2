//! Label and zone constraints: `key=value`, `key!=value`, `key in (a,b,c)`.
//!
//! The key `zone` is special: it matches the node's zone rather than a label. A missing label
//! never satisfies `=` or `in`, and always satisfies `!=`.

use std::fmt;
use std::str::FromStr;

use crate::PolicyError;

/// The key that constrains the node's zone instead of a label.
pub const ZONE_KEY: &str = "zone";

/// One constraint on a node label (or on the zone, with key [`ZONE_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Constraint {
    /// Label key, or `zone`.
    pub key: String,
    /// Operator and operand.
    pub op: ConstraintOp,
}

/// A constraint operator with its operand(s).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstraintOp {
    /// The label equals the value.
    Eq(String),
    /// The label is absent or differs from the value.
    Ne(String),
    /// The label equals one of the values.
    In(Vec<String>),
}

impl ConstraintOp {
    /// Whether a node whose label is `value` (`None`: absent) satisfies the operator.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Self::Eq(v), Some(x)) => v == x,
            (Self::Ne(v), Some(x)) => v != x,
            (Self::Ne(_), None) => true,
            (Self::In(vs), Some(x)) => vs.iter().any(|v| v == x),
            (Self::Eq(_) | Self::In(_), None) => false,
        }
    }
}

impl Constraint {
    /// `key=value`.
    pub fn eq(key: &str, value: &str) -> Self {
        Self {
            key: key.into(),
            op: ConstraintOp::Eq(value.into()),
        }
    }

    /// `key!=value`.
    pub fn ne(key: &str, value: &str) -> Self {
        Self {
            key: key.into(),
            op: ConstraintOp::Ne(value.into()),
        }
    }

    /// `key in (values)`.
    pub fn one_of(key: &str, values: &[&str]) -> Self {
        Self {
            key: key.into(),
            op: ConstraintOp::In(values.iter().map(|v| (*v).to_string()).collect()),
        }
    }

    /// Parses a list of constraints (`"disk=ssd"`, ...), naming the failing one as
    /// `constraints[i]`.
    pub fn parse_all<S: AsRef<str>>(items: &[S]) -> Result<Vec<Self>, PolicyError> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_ref().parse().map_err(|e: PolicyError| PolicyError {
                    field: format!("constraints[{i}]"),
                    message: e.message,
                })
            })
            .collect()
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn token(s: &str, what: &str, input: &str) -> Result<String, PolicyError> {
    let t = s.trim();
    if valid_token(t) {
        Ok(t.to_string())
    } else {
        Err(PolicyError::new(
            "constraints",
            format!("invalid {what} {t:?} in {input:?} (use letters, digits, - _ . /)"),
        ))
    }
}

impl FromStr for Constraint {
    type Err = PolicyError;

    /// Parses `key=value`, `key!=value` or `key in (a,b)` (whitespace-tolerant; `in` needs at
    /// least one value).
    fn from_str(input: &str) -> Result<Self, PolicyError> {
        let s = input.trim();
        if let Some((k, v)) = s.split_once("!=") {
            return Ok(Self {
                key: token(k, "key", input)?,
                op: ConstraintOp::Ne(token(v, "value", input)?),
            });
        }
        if let Some((k, v)) = s.split_once('=') {
            return Ok(Self {
                key: token(k, "key", input)?,
                op: ConstraintOp::Eq(token(v.strip_prefix('=').unwrap_or(v), "value", input)?),
            });
        }
        if let Some(pos) = s.find(" in ").or_else(|| s.find(" in(")) {
            let key = token(&s[..pos], "key", input)?;
            let rest = s[pos + 3..].trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    PolicyError::new(
                        "constraints",
                        format!("expected `{key} in (a,b)` in {input:?}"),
                    )
                })?;
            let values = inner
                .split(',')
                .map(|v| token(v, "value", input))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Self {
                key,
                op: ConstraintOp::In(values),
            });
        }
        Err(PolicyError::new(
            "constraints",
            format!(
                "cannot parse constraint {input:?}: expected key=value, key!=value or key in (a,b)"
            ),
        ))
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            ConstraintOp::Eq(v) => write!(f, "{}={v}", self.key),
            ConstraintOp::Ne(v) => write!(f, "{}!={v}", self.key),
            ConstraintOp::In(vs) => write!(f, "{} in ({})", self.key, vs.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            "disk=ssd".parse::<Constraint>().unwrap(),
            Constraint::eq("disk", "ssd")
        );
        assert_eq!(
            " tier != batch ".parse::<Constraint>().unwrap(),
            Constraint::ne("tier", "batch")
        );
        assert_eq!(
            "zone in (a, b)".parse::<Constraint>().unwrap(),
            Constraint::one_of("zone", &["a", "b"])
        );
        assert_eq!(
            "disk==ssd".parse::<Constraint>().unwrap(),
            Constraint::eq("disk", "ssd")
        );
        for c in ["disk=ssd", "tier!=batch", "zone in (a,b)"] {
            assert_eq!(c.parse::<Constraint>().unwrap().to_string(), c);
        }
    }

    #[test]
    fn rejects_garbage_naming_the_field() {
        for bad in [
            "",
            "disk",
            "=ssd",
            "disk=",
            "zone in a,b",
            "zone in ()",
            "a b=c",
        ] {
            let e = bad.parse::<Constraint>().unwrap_err();
            assert_eq!(e.field, "constraints", "{bad}");
        }
        let e = Constraint::parse_all(&["disk=ssd", "oops"]).unwrap_err();
        assert_eq!(e.field, "constraints[1]");
    }

    #[test]
    fn matching_semantics() {
        assert!(ConstraintOp::Eq("x".into()).matches(Some("x")));
        assert!(!ConstraintOp::Eq("x".into()).matches(None));
        assert!(ConstraintOp::Ne("x".into()).matches(None));
        assert!(!ConstraintOp::Ne("x".into()).matches(Some("x")));
        let in_ = ConstraintOp::In(vec!["a".into(), "b".into()]);
        assert!(in_.matches(Some("b")) && !in_.matches(Some("c")) && !in_.matches(None));
    }
}
