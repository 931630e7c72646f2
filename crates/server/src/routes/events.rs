//! `/v1/events`: list and follow.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_api::Event;
use serde::Deserialize;

use crate::app::AppState;
use crate::error::{ApiQuery, HttpResult};

/// Query.
#[derive(Debug, Deserialize)]
pub struct EventOpts {
    /// Only this project's events (and cluster events if empty).
    #[serde(default)]
    pub project: Option<String>,
    /// Only events with a sequence number above this.
    #[serde(default)]
    pub after: u64,
    /// Stream new events as NDJSON.
    #[serde(default)]
    pub follow: bool,
    /// Only events about this resource name.
    #[serde(default)]
    pub name: Option<String>,
}

fn matching(app: &AppState, o: &EventOpts, after: u64) -> Vec<Event> {
    app.read(|s| {
        s.events
            .iter()
            .filter(|e| e.seq > after)
            .filter(|e| o.project.as_ref().is_none_or(|p| &e.project == p))
            .filter(|e| o.name.as_ref().is_none_or(|n| &e.name == n))
            .cloned()
            .collect()
    })
}

/// Events in commit order; with `follow=true`, an endless NDJSON stream.
#[utoipa::path(get, path = "/v1/events", params(("project" = Option<String>, Query), ("after" = Option<u64>, Query), ("follow" = Option<bool>, Query)), responses((status = 200, body = [Event])))]
pub async fn list(
    State(app): State<AppState>,
    ApiQuery(o): ApiQuery<EventOpts>,
) -> HttpResult<Response> {
    if !o.follow {
        return Ok(Json(matching(&app, &o, o.after)).into_response());
    }
    let watch = app.raft.applied_watch();
    let stream = futures::stream::unfold(
        (app, o, watch, None::<u64>),
        |(app, o, mut watch, last)| async move {
            let mut after = last.unwrap_or(o.after);
            loop {
                let evs = matching(&app, &o, after);
                if !evs.is_empty() {
                    after = evs.last().map_or(after, |e| e.seq);
                    let mut buf = String::new();
                    for e in evs {
                        buf.push_str(&serde_json::to_string(&e).unwrap_or_default());
                        buf.push('\n');
                    }
                    return Some((Ok::<_, Infallible>(buf), (app, o, watch, Some(after))));
                }
                if watch.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
