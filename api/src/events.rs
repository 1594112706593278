//! Events you can follow: the cluster-wide feed (`GET /v1/events`), every runtime's events and
//! the audit stream in one global order (the raft log's: an event's id is its position), a page
//! at a time after a cursor; and the same as server-sent events (`GET /v1/events/stream`,
//! `GET /v1/runtimes/{id}/events/stream`), resumed from `Last-Event-ID` through any node.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::{Event, EventSeverity};
use runtimeai_raft::state_reader::{EventCursor, NotAnEventId};

use crate::auth::{may, Caller, Permission};
use crate::doc_types::{ProblemResponses, TenantId};
use crate::extract::{Consistency, PathParam, QueryParams};
use crate::problem::Problem;
use crate::runtimes::EventView;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events)).routes(routes!(events_stream)).routes(routes!(runtime_events_stream))
}

/// How many events one call looks at, at most: a filter that passes over many ends the page
/// early, with `next_after` to go on from.
const SCAN_LIMIT: usize = 10_000;

/// The feed's filters (all optional).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FeedParams {
    /// Only events after the event with this id (the `id` of the last one you have, or the
    /// page's `next_after`).
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^ev_[0-9a-f]{16}_[0-9]{1,9}$")]
    pub after: Option<String>,
    /// At most this many, oldest first (1 to 1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Only this runtime's events (or the audit stream's: `cluster`).
    #[serde(default)]
    pub runtime_id: Option<String>,
    /// Only events of this type (`runtime.created`, `operation.succeeded`, ...).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// Only events of this severity.
    #[serde(default)]
    pub severity: Option<EventSeverity>,
    /// Streams only: end the stream after this many seconds (1 to 86400; by default it lasts
    /// as long as the connection), as a Kubernetes watch's `timeoutSeconds` does.
    #[serde(default)]
    #[param(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

/// The place after the event `after` names (400 if it names none).
pub(crate) fn event_cursor(after: Option<&str>) -> Result<Option<EventCursor>, Problem> {
    after.map(|id| id.parse().map_err(|e: NotAnEventId| Problem::invalid_field("after", e.to_string()))).transpose()
}

/// A page's `limit`: 100 by default, 1 to 1000 (400 otherwise).
pub(crate) fn page_limit(limit: Option<usize>) -> Result<usize, Problem> {
    let limit = limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid_field("limit", "must be between 1 and 1000"));
    }
    Ok(limit)
}

/// Waits for this node to apply more entries; `None` once `deadline` passes first (or the
/// state machine is gone).
pub(crate) async fn more_applied(
    applied: &mut tokio::sync::watch::Receiver<u64>,
    deadline: Option<tokio::time::Instant>,
) -> Option<()> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, applied.changed()).await.ok()?.ok(),
        None => applied.changed().await.ok(),
    }
}

/// When a stream asked to end after `timeout_seconds` ends (400 outside 1 to 86400).
pub(crate) fn stream_deadline(timeout_seconds: Option<u64>) -> Result<Option<tokio::time::Instant>, Problem> {
    match timeout_seconds {
        None => Ok(None),
        Some(seconds @ 1..=86_400) => Ok(Some(tokio::time::Instant::now() + Duration::from_secs(seconds))),
        Some(_) => Err(Problem::invalid_field("timeout_seconds", "must be between 1 and 86400")),
    }
}

/// A page of the feed.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventFeedPage {
    pub items: Vec<EventView>,
    /// Where to go on from (`after`): the last event this page looked at, also when the filters
    /// passed over it. Absent when the page reached the end of the feed.
    pub next_after: Option<String>,
}

impl FeedParams {
    fn cursor(&self, resume: Option<&str>) -> Result<Option<EventCursor>, Problem> {
        event_cursor(resume.or(self.after.as_deref()))
    }
}

/// Decides which events a caller sees: runtimes of its tenants (of the one it chose), the audit
/// stream only with `manage_cluster`; the tenant of each runtime read once per page.
struct Visibility<'a> {
    state: &'a AppState,
    caller: &'a Caller,
    tenants: HashMap<String, bool>,
}

impl Visibility<'_> {
    fn sees(&mut self, event: &Event) -> Result<bool, Problem> {
        if let Some(seen) = self.tenants.get(&event.runtime_id) {
            return Ok(*seen);
        }
        let seen = if event.runtime_id == runtimeai_raft::AUDIT_STREAM {
            may(&self.caller.principal, Permission::ManageCluster)
        } else {
            match self.state.replica.state().get_runtime(&event.runtime_id)? {
                Some(runtime) => self.caller.sees(runtime.tenant_id.as_deref()),
                // A deleted runtime's tenant is gone with it: its events are for principals of
                // every tenant (as its own feed is).
                None => self.caller.sees(None),
            }
        };
        self.tenants.insert(event.runtime_id.clone(), seen);
        Ok(seen)
    }
}

/// Reads a page of the feed after `cursor` for `caller`.
fn page(
    state: &AppState,
    caller: &Caller,
    params: &FeedParams,
    cursor: Option<EventCursor>,
) -> Result<EventFeedPage, Problem> {
    let limit = page_limit(params.limit)?;
    let mut visibility = Visibility { state, caller, tenants: HashMap::new() };
    let mut page = EventFeedPage { items: Vec::new(), next_after: None };
    let mut last = None;
    for (looked, event) in state.replica.state().events_after(cursor).enumerate() {
        let event = event?;
        if looked == SCAN_LIMIT || page.items.len() == limit {
            page.next_after = last;
            return Ok(page);
        }
        last = Some(event.id.clone());
        let wanted = params.runtime_id.as_ref().is_none_or(|id| *id == event.runtime_id)
            && params.event_type.as_ref().is_none_or(|t| *t == event.event_type)
            && params.severity.is_none_or(|s| s == event.severity);
        if wanted && visibility.sees(&event)? {
            page.items.push(EventView::from(event));
        }
    }
    Ok(page)
}

/// Every event of the cluster the caller may see — runtimes' and, for cluster admins, the audit
/// stream's (policies, keys, settings, members) — in one global order, oldest first. Follow
/// `next_after` (or the last item's `id`) as `after` for the next page.
#[utoipa::path(get, path = "/v1/events", tag = "Events", params(FeedParams, TenantId),
    responses((status = 200, description = "OK", body = EventFeedPage), ProblemResponses))]
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<FeedParams>,
) -> Result<Json<EventFeedPage>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    let cursor = params.cursor(None)?;
    Ok(Json(page(&state, &caller, &params, cursor)?))
}

/// The feed as server-sent events (`text/event-stream`): each event's `id` is its id, `event`
/// its type, `data` the event as JSON. Resumes after `Last-Event-ID` (or `after`) on any node;
/// a comment every 15 s keeps the connection alive. Same filters as `GET /v1/events`.
#[utoipa::path(get, path = "/v1/events/stream", tag = "Events", params(FeedParams, TenantId),
    responses((status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        ProblemResponses))]
pub(crate) async fn events_stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    QueryParams(params): QueryParams<FeedParams>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    follow(state, caller, &headers, params)
}

/// One runtime's events as server-sent events (see `GET /v1/events/stream`).
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/events/stream", tag = "Events",
    params(("runtime_id" = String, Path), FeedParams, TenantId),
    responses((status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        ProblemResponses))]
pub(crate) async fn runtime_events_stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(mut params): QueryParams<FeedParams>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    crate::runtimes::read_runtime(&state, &caller, &runtime_id, params.consistency).await?;
    params.runtime_id = Some(runtime_id);
    follow(state, caller, &headers, params)
}

/// Streams the feed from the cursor on: what is there, then each event as this node applies it
/// (the caller has read as `params.consistency` asks).
fn follow(
    state: AppState,
    caller: Caller,
    headers: &HeaderMap,
    params: FeedParams,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let cursor = params.cursor(resume.as_deref())?;
    let applied = state.replica.state().watch_applied();
    let deadline = stream_deadline(params.timeout_seconds)?;
    let follower = Follower { state, caller, params, cursor, pending: Vec::new().into_iter(), applied, deadline };
    let stream = futures::stream::unfold(follower, |mut follower| async move {
        let event = follower.next().await?;
        Some((Ok(event), follower))
    });
    Ok(sse(stream))
}

/// A server-sent events answer of `stream`, with a keep-alive comment every 15 s.
pub(crate) fn sse<S>(stream: S) -> Sse<axum::response::sse::KeepAliveStream<S>>
where
    S: futures::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
}

/// A stream's reader: pages of the feed, and a wait for the next applied entry between them.
struct Follower {
    state: AppState,
    caller: Caller,
    params: FeedParams,
    cursor: Option<EventCursor>,
    pending: std::vec::IntoIter<EventView>,
    applied: tokio::sync::watch::Receiver<u64>,
    /// When the stream ends, if the client asked for an end.
    deadline: Option<tokio::time::Instant>,
}

impl Follower {
    /// The next event to send; `None` ends the stream (the node is stopping, or a read failed).
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if self.deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
                return None;
            }
            if let Some(event) = self.pending.next() {
                return Some(sse_event(&event));
            }
            self.applied.mark_unchanged();
            let page = match page(&self.state, &self.caller, &self.params, self.cursor) {
                Ok(page) => page,
                Err(problem) => {
                    tracing::warn!(detail = %problem.detail, "an event stream ends on a read error");
                    return None;
                }
            };
            let last = page.items.last().map(|event| event.id.clone()).or(page.next_after.clone());
            if let Some(cursor) = last.and_then(|id| id.parse().ok()) {
                self.cursor = Some(cursor);
            }
            if page.items.is_empty() && page.next_after.is_none() {
                more_applied(&mut self.applied, self.deadline).await?;
            }
            self.pending = page.items.into_iter();
        }
    }
}

fn sse_event(event: &EventView) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_default();
    SseEvent::default().id(event.id.clone()).event(event.event_type.clone()).data(data)
}
