//! L7 routing rules (pure): match on host, path prefix and a header; first matching rule wins.

use serde::{Deserialize, Serialize};

/// A header that must be present with an exact value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value.
    pub value: String,
}

/// What a rule matches. Every given part must match; an empty matcher matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteMatch {
    /// Host, exact (`api.example.com`) or a leading wildcard (`*.example.com`, which matches any
    /// subdomain but not `example.com` itself). Case-insensitive, port ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, starting with `/` (plain string prefix, like nginx's `location /api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Header equality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RouteMatch {
    /// Refuse invalid patterns with a message naming the part.
    pub fn check(&self) -> Result<(), String> {
        if let Some(h) = &self.host {
            let name = h.strip_prefix("*.").unwrap_or(h);
            if h.len() > 253 || !name.split('.').all(valid_label) {
                return Err(format!(
                    "invalid host pattern {h:?}: expected a host name, optionally starting with '*.'"
                ));
            }
        }
        if let Some(p) = &self.path_prefix {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
                return Err(format!(
                    "invalid path prefix {p:?}: must start with '/' and contain no spaces"
                ));
            }
        }
        if let Some(hm) = &self.header {
            if !valid_token(&hm.name) {
                return Err(format!("invalid header name {:?}", hm.name));
            }
            if hm.value.bytes().any(|b| b < 0x20 && b != b'\t') {
                return Err(format!("invalid header value for {:?}", hm.name));
            }
        }
        Ok(())
    }

    /// Whether a request matches. `host` is the Host header or URI authority (port allowed).
    pub fn matches(
        &self,
        host: Option<&str>,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> bool {
        if let Some(want) = &self.host {
            let Some(h) = host else { return false };
            let h = strip_port(h);
            let ok = match want.strip_prefix("*.") {
                Some(suffix) => {
                    h.len() > suffix.len() + 1
                        && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                        && h.as_bytes()[h.len() - suffix.len() - 1] == b'.'
                }
                None => h.eq_ignore_ascii_case(want),
            };
            if !ok {
                return false;
            }
        }
        if let Some(p) = &self.path_prefix {
            if !path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(hm) = &self.header {
            if header(&hm.name).as_deref() != Some(hm.value.as_str()) {
                return false;
            }
        }
        true
    }
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split(']').next().map_or(h, |x| &x[1..]);
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    }
}

/// Pick the first matching rule's index.
pub fn route<'a>(
    rules: impl IntoIterator<Item = &'a RouteMatch>,
    host: Option<&str>,
    path: &str,
    header: impl Fn(&str) -> Option<String> + Copy,
) -> Option<usize> {
    rules
        .into_iter()
        .position(|r| r.matches(host, path, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(host: Option<&str>, path: Option<&str>) -> RouteMatch {
        RouteMatch {
            host: host.map(Into::into),
            path_prefix: path.map(Into::into),
            header: None,
        }
    }

    #[test]
    fn host_exact_wildcard_and_port() {
        let none = |_: &str| None;
        assert!(m(Some("api.example.com"), None).matches(Some("API.example.com:8080"), "/", none));
        assert!(!m(Some("api.example.com"), None).matches(Some("www.example.com"), "/", none));
        let w = m(Some("*.example.com"), None);
        assert!(w.matches(Some("a.b.example.com"), "/", none));
        assert!(!w.matches(Some("example.com"), "/", none));
        assert!(!w.matches(Some("badexample.com"), "/", none));
        assert!(!w.matches(None, "/", none));
    }

    #[test]
    fn path_and_header_and_order() {
        let rules = [
            RouteMatch {
                header: Some(HeaderMatch {
                    name: "x-canary".into(),
                    value: "1".into(),
                }),
                ..RouteMatch::default()
            },
            m(None, Some("/api/")),
            m(Some("static.example.com"), None),
        ];
        let hdr = |n: &str| (n == "x-canary").then(|| "1".to_string());
        let none = |_: &str| None;
        assert_eq!(route(&rules, None, "/api/x", hdr), Some(0));
        assert_eq!(route(&rules, None, "/api/x", none), Some(1));
        assert_eq!(
            route(&rules, Some("static.example.com"), "/a", none),
            Some(2)
        );
        assert_eq!(route(&rules, Some("other"), "/a", none), None);
    }

    #[test]
    fn invalid_patterns_are_refused() {
        assert!(m(Some("a..b"), None).check().is_err());
        assert!(m(Some("a.*.b"), None).check().is_err());
        assert!(m(Some("exa mple.com"), None).check().is_err());
        assert!(m(None, Some("api")).check().is_err());
        assert!(m(None, Some("/a b")).check().is_err());
        let bad_header = RouteMatch {
            header: Some(HeaderMatch {
                name: "bad name".into(),
                value: "x".into(),
            }),
            ..RouteMatch::default()
        };
        assert!(bad_header.check().is_err());
        assert!(m(Some("*.example.com"), Some("/api")).check().is_ok());
    }
}
