//! Completes the OpenAPI document: the bearer security scheme, and for every operation the
//! error statuses it can answer with, each with the JSON error body, so clients and fuzzers
//! can rely on the spec. The statuses follow from what every route shares (the token check,
//! request parsing, the Raft read barrier and write path) rather than from per-route
//! annotations; [`error_statuses`] is the rule.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::Ref;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::Modify;

/// Name of the security scheme in the document.
pub const BEARER: &str = "bearer";

/// Routes that need no token.
const PUBLIC: &[&str] = &["/healthz", "/v1/pki/join"];

/// The error statuses an operation can answer with: every authenticated route can refuse the
/// token (401) or its role (403), a malformed path or query string (400), a missing resource
/// or parent project (404), and cannot serve without a leader (503); a request with a body can
/// be too large (413) or fail validation (422), as can a query string; a write can conflict
/// with the state (409).
pub fn error_statuses(path: &str, method: &str, has_body: bool, has_query: bool) -> Vec<u16> {
    if PUBLIC.contains(&path) {
        return Vec::new();
    }
    let mut s = vec![400, 401, 403, 404];
    let write = matches!(method, "post" | "put" | "patch" | "delete");
    if write {
        s.push(409);
    }
    if has_body || write {
        s.push(413);
    }
    if has_body || has_query || write {
        s.push(422);
    }
    s.push(503);
    s
}

fn error_response(status: u16) -> RefOr<utoipa::openapi::Response> {
    let what = match status {
        400 => "Malformed request (body, path or query string)",
        401 => "Missing or wrong bearer token",
        403 => "The token may not do this",
        404 => "No such resource (or project)",
        409 => "Conflicts with the current state",
        413 => "Request body over the limit",
        422 => "A field failed validation",
        503 => "No leader or shutting down: retry",
        _ => "Error",
    };
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    RefOr::T(
        ResponseBuilder::new()
            .description(what)
            .content("application/json", content)
            .build(),
    )
}

fn operations(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    let mut out = Vec::new();
    for (m, op) in [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("patch", &mut item.patch),
        ("head", &mut item.head),
        ("options", &mut item.options),
        ("trace", &mut item.trace),
    ] {
        if let Some(op) = op.as_mut() {
            out.push((m, op));
        }
    }
    out
}

/// The [`Modify`] adding the security scheme and the error responses.
pub struct Documented;

impl Modify for Documented {
    fn modify(&self, api: &mut OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer TOKEN`: the admin token (every route), a node's \
                         own credential (its node's routes) or the shared node token \
                         (registering new nodes, hollow fleets)",
                    ))
                    .build(),
            ),
        );
        api.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
        for (path, item) in &mut api.paths.paths {
            let path_query = item
                .parameters
                .iter()
                .flatten()
                .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query));
            for (method, op) in operations(item) {
                let has_query = path_query
                    || op.parameters.iter().flatten().any(|p| {
                        matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query)
                    });
                let has_body = op.request_body.is_some();
                for s in error_statuses(path, method, has_body, has_query) {
                    op.responses
                        .responses
                        .entry(s.to_string())
                        .or_insert_with(|| error_response(s));
                }
                if PUBLIC.contains(&path.as_str()) {
                    // An empty requirement: no token needed.
                    op.security = Some(vec![SecurityRequirement::default()]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_documents_its_errors_and_the_bearer_scheme() {
        let api = <super::super::ApiDoc as utoipa::OpenApi>::openapi();
        let v = serde_json::to_value(&api).unwrap();
        assert_eq!(
            v["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        assert_eq!(v["security"][0][BEARER], serde_json::json!([]));
        let paths = v["paths"].as_object().unwrap();
        assert!(paths.len() > 30, "{}", paths.len());
        let mut ops = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                ops += 1;
                let responses = op["responses"].as_object().unwrap();
                if path == "/healthz" {
                    assert_eq!(op["security"], serde_json::json!([{}]));
                    continue;
                }
                for s in ["400", "401", "403", "404", "503"] {
                    let r = &responses
                        .get(s)
                        .unwrap_or_else(|| panic!("{method} {path} lacks {s}"));
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {s}"
                    );
                }
                if op.get("requestBody").is_some() {
                    for s in ["413", "422"] {
                        assert!(responses.contains_key(s), "{method} {path} lacks {s}");
                    }
                }
                if method != "get" {
                    assert!(responses.contains_key("409"), "{method} {path} lacks 409");
                }
            }
        }
        assert!(ops > 45, "{ops}");
    }

    #[test]
    fn statuses_follow_the_route_kind() {
        assert!(error_statuses("/healthz", "get", false, false).is_empty());
        assert_eq!(
            error_statuses("/v1/projects", "get", false, false),
            [400, 401, 403, 404, 503]
        );
        assert_eq!(
            error_statuses("/v1/projects", "post", true, false),
            [400, 401, 403, 404, 409, 413, 422, 503]
        );
        assert_eq!(
            error_statuses("/v1/events", "get", false, true),
            [400, 401, 403, 404, 422, 503]
        );
    }
}
