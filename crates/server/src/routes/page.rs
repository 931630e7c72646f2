//! Pagination of list routes, like Kubernetes' `limit` / `continue`: `?limit=N` returns at
//! most N items in name order, and when more remain a `Link: <...&continue=TOKEN>;
//! rel="next"` header (RFC 8288, as GitHub's API) names the next page. The token is opaque
//! (the hex of the last name returned); a page starts after it, so items created or deleted
//! between pages are seen or missed as they sort, never duplicated. Without `limit` a list
//! returns everything, as before.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};

/// The largest page.
pub const MAX_LIMIT: u64 = 1000;

/// Query parameters of a list route.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListOpts {
    /// Serve from the local replica without a leader round-trip.
    #[serde(default)]
    pub stale: bool,
    /// Most items to return (1-1000); all when absent.
    #[serde(default)]
    pub limit: Option<u64>,
    /// The token of the `Link: rel="next"` header of the previous page.
    #[serde(default, rename = "continue")]
    pub continue_token: Option<String>,
}

impl ListOpts {
    /// Checks the parameters and returns the name to start after, if any.
    pub fn start_after(&self) -> Result<Option<String>, ApiError> {
        if let Some(l) = self.limit {
            if l == 0 || l > MAX_LIMIT {
                return Err(ApiError::invalid(
                    "limit",
                    format!("limit must be between 1 and {MAX_LIMIT}, got {l}"),
                ));
            }
        }
        let Some(t) = &self.continue_token else {
            return Ok(None);
        };
        let bad = || {
            ApiError::new(
                ErrorCode::BadRequest,
                "invalid continue token: pass the one the previous page's Link header gave",
            )
            .with_field("continue")
        };
        let bytes = hex::decode(t).map_err(|_| bad())?;
        let name = String::from_utf8(bytes).map_err(|_| bad())?;
        nimbus_api::validate::name("continue", &name).map_err(|_| bad())?;
        Ok(Some(name))
    }
}

/// The values of `map` whose keys are `prefix` + a name, in name order, after the name
/// `after` (project-scoped resources are keyed `project/name`, others by name).
pub fn keyed<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    prefix: &'a str,
    after: Option<&str>,
) -> impl Iterator<Item = &'a V> + 'a {
    use std::ops::Bound;
    let start = match after {
        Some(a) => Bound::Excluded(format!("{prefix}{a}")),
        None => Bound::Included(prefix.to_string()),
    };
    map.range::<String, _>((start, Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
}

/// One page of a list and the link to the next.
#[derive(Debug)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The route of the next page (path and query), if more remain.
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// Takes a page from `items` (already in name order, starting after the token) for the
    /// route `path`.
    pub fn take(
        items: impl Iterator<Item = T>,
        name: impl Fn(&T) -> &str,
        opts: &ListOpts,
        path: &str,
    ) -> Self {
        let Some(limit) = opts.limit else {
            return Self {
                items: items.collect(),
                next: None,
            };
        };
        let mut items = items.peekable();
        let page: Vec<T> = items.by_ref().take(limit as usize).collect();
        let next = (items.peek().is_some())
            .then(|| page.last().map(|last| hex::encode(name(last))))
            .flatten()
            .map(|token| format!("{path}?limit={limit}&continue={token}"));
        Self { items: page, next }
    }
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        let mut resp = Json(self.items).into_response();
        if let Some(next) = self.next {
            if let Ok(v) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(limit: Option<u64>, token: Option<&str>) -> ListOpts {
        ListOpts {
            stale: false,
            limit,
            continue_token: token.map(String::from),
        }
    }

    #[test]
    fn pages_follow_each_other() {
        let names = ["a", "b", "c", "d", "e"];
        let o = opts(Some(2), None);
        let p = Page::take(names.iter().copied(), |n| n, &o, "/v1/x");
        assert_eq!(p.items, vec!["a", "b"]);
        let next = p.next.unwrap();
        let token = next.split("continue=").nth(1).unwrap();
        let after = opts(Some(2), Some(token)).start_after().unwrap().unwrap();
        assert_eq!(after, "b");
        let last = Page::take(["e"].into_iter(), |n| n, &opts(Some(2), None), "/v1/x");
        assert!(last.next.is_none());
        let all = Page::take(names.iter().copied(), |n| n, &opts(None, None), "/v1/x");
        assert_eq!(all.items.len(), 5);
    }

    #[test]
    fn bad_parameters_are_refused_with_their_field() {
        for l in [0, MAX_LIMIT + 1] {
            let e = opts(Some(l), None).start_after().unwrap_err();
            assert_eq!(e.field.as_deref(), Some("limit"));
        }
        for t in ["zz", "2f2f", &hex::encode("Bad Name")] {
            let e = opts(None, Some(t)).start_after().unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert_eq!(e.field.as_deref(), Some("continue"));
        }
    }
}
