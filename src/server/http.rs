//! The HTTP side: axum routes, the API-key check, whole responses and server-sent events.
//!
//! A generation request is parsed and checked ([`api::parse_request`]), has its model, plan
//! and adapter names resolved ([`ServedModel::resolve`]), takes a unit of capacity (429 when
//! none is left), has its prompt encoded on tokio's blocking pool
//! ([`ServedModel::prepare`]), and goes to the scheduler. The handler waits for the prefill
//! (`Started`, or an error, still answered as a 4xx/5xx), then either collects the whole text or
//! streams a chunk per decode step. When a client disconnects, its receiver is dropped and the
//! scheduler drops the sequence before its next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::ServedModel;
use super::api::{self, ApiError, Endpoint, GenRequest, ResponseHead};
use super::scheduler::{Job, JobEvent, Scheduler};

/// The largest request body read (bytes); a larger one is a 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What every handler shares.
pub struct AppState {
    /// The model, routers and adapters.
    pub model: Arc<ServedModel>,
    /// The scheduler of the running sequences.
    pub scheduler: Scheduler,
    /// `--api-key`: requests to `/v1/*` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
}

impl AppState {
    /// Serve `model` with `scheduler`, checking `api_key` when given.
    pub fn new(model: Arc<ServedModel>, scheduler: Scheduler, api_key: Option<String>) -> AppState {
        AppState { model, scheduler, api_key }
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        match given {
            // Compared in time independent of where the first difference is.
            Some(g) if g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 => Ok(()),
            Some(_) => Err(ApiError::unauthorized("the API key in Authorization: Bearer is not this server's")),
            None => Err(ApiError::unauthorized("this server needs an API key: send Authorization: Bearer KEY")),
        }
    }
}

impl IntoResponse for ApiError {
    /// The status and JSON body; a 429 or 503 also says `Retry-After: 1` (seconds).
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self.body())).into_response();
        if matches!(self.status, 429 | 503) {
            response.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError::not_found("not_found", "no such route: firstrt serves /v1/chat/completions, /v1/completions, /v1/models and /health")
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: 405,
                kind: "invalid_request_error",
                message: "method not allowed for this route".into(),
                param: None,
                code: None,
            }
        })
        .with_state(state)
}

/// Resident memory of this process (bytes), from /proc/self/statm; 0 where unavailable.
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.map_or(0, |p| p * page.max(0) as u64)
}

/// `GET /health`: 200 `{"status": "ok", ...}` with the running and waiting sequences, the
/// batched decode steps so far (and the sequence steps they held), the bytes the GPU holds and
/// the process's resident memory; 503 while shutting down.
async fn health(State(s): State<Arc<AppState>>) -> Response {
    let (running, waiting) = s.scheduler.counts();
    let (batched_steps, batched_rows, batched_prefills) = s.scheduler.batched();
    let draining = s.scheduler.draining();
    let body = json!({
        "status": if draining { "shutting_down" } else { "ok" },
        "model": s.model.id,
        "running": running,
        "waiting": waiting,
        "in_flight": s.scheduler.in_flight(),
        "batched_steps": batched_steps,
        "batched_rows": batched_rows,
        "batched_prefills": batched_prefills,
        "gpu_bytes": s.model.loaded.weights.ctx.memory.live_bytes(),
        "rss_bytes": rss_bytes(),
    });
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(body)).into_response()
}

fn model_object(m: &ServedModel) -> Value {
    json!({
        "id": m.id, "object": "model", "created": 0, "owned_by": "firstrt",
        "n_layers": m.loaded.weights.config.n_layers,
        "context_length": m.ctx_len,
        "routers": m.routers.keys().collect::<Vec<_>>(),
        "default_routers": m.default_routers,
        "adapters": m.adapters.keys().collect::<Vec<_>>(),
    })
}

/// `GET /v1/models`: the one served model, with its router files and adapters by name.
async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.check_key(&headers) {
        return e.into_response();
    }
    axum::Json(json!({"object": "list", "data": [model_object(&s.model)]})).into_response()
}

/// `GET /v1/models/{id}`.
async fn model(State(s): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = s.check_key(&headers) {
        return e.into_response();
    }
    if id != s.model.id {
        return ApiError::not_found("model_not_found", format!("the model '{id}' does not exist; this server has '{}'", s.model.id))
            .into_response();
    }
    axum::Json(model_object(&s.model)).into_response()
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Endpoint::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Endpoint::Completion, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// What a response reports besides the text: the plan (`first`) and the adapter (`lora`).
fn extensions(req: &GenRequest, routers: Option<&str>, n_layers: usize, skipped: &[usize], probs: &[Option<f32>]) -> Map<String, Value> {
    let kind = match routers {
        Some(_) if probs.iter().any(Option::is_some) => "routed",
        _ if skipped.is_empty() => "full",
        _ => "static",
    };
    let mut first = json!({
        "plan": kind, "routers": routers, "skipped_layers": skipped, "kept_layers": n_layers - skipped.len(), "n_layers": n_layers,
    });
    if kind == "routed" {
        first["router_probs"] = json!(probs);
    }
    let mut map = Map::new();
    map.insert("first".into(), first);
    if let Some(l) = &req.lora {
        map.insert("lora".into(), json!({"name": l.name, "scale": l.scale}));
    }
    map
}

async fn generate(s: Arc<AppState>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    s.check_key(&headers)?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| ApiError {
        status: 413,
        kind: "invalid_request_error",
        message: format!("the request body could not be read or is over {MAX_BODY_BYTES} bytes: {e}"),
        param: None,
        code: None,
    })?;
    let req = api::parse_request(endpoint, &bytes)?;
    let resolved = s.model.resolve(&req)?;
    let slot = s.scheduler.reserve()?;
    let prepared = {
        let (s, req) = (s.clone(), req.clone());
        tokio::task::spawn_blocking(move || s.model.prepare(&req, resolved))
            .await
            .map_err(|e| ApiError::internal(format!("internal error (a bug in firstrt) preparing the request: {e}")))??
    };
    let (tx, mut rx) = unbounded_channel();
    let prompt_tokens = prepared.prompt_ids.len();
    let prompt_ids = req.return_token_ids.then(|| prepared.prompt_ids.clone());
    let routers = prepared.routers.clone();
    s.scheduler.submit(Job {
        prompt_ids: prepared.prompt_ids,
        options: prepared.options,
        stop: prepared.stop,
        plan: prepared.plan,
        lora: prepared.lora,
        ctx_len: prepared.ctx_len,
        events: tx,
        slot,
    })?;
    let (skipped, probs) = match rx.recv().await {
        Some(JobEvent::Started { skipped_layers, router_probs }) => (skipped_layers, router_probs),
        Some(JobEvent::Failed(e)) => return Err(e),
        Some(other) => return Err(ApiError::internal(format!("internal error (a bug in firstrt): {other:?} before the start"))),
        None => return Err(ApiError::unavailable("the server is shutting down")),
    };
    let n_layers = s.model.loaded.weights.config.n_layers;
    let mut extra = extensions(&req, routers.as_deref(), n_layers, &skipped, &probs);
    if let Some(ids) = prompt_ids {
        extra.insert("prompt_token_ids".into(), json!(ids));
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = format!("{}{:024x}", endpoint.id_prefix(), rand::random::<u128>() >> 32);
    let head = ResponseHead { endpoint, id, created, model: s.model.id.clone() };
    if req.stream {
        return Ok(stream_response(head, rx, extra, prompt_tokens, &req).into_response());
    }
    let (mut text, mut ids) = (String::new(), Vec::new());
    loop {
        match rx.recv().await {
            Some(JobEvent::Delta { ids: i, text: t }) => {
                ids.extend(i);
                text.push_str(&t);
            }
            Some(JobEvent::Finished { reason, completion_tokens, .. }) => {
                let ids = req.return_token_ids.then_some(ids.as_slice());
                let body = head.completion(&text, api::finish_reason(reason), api::usage(prompt_tokens, completion_tokens), ids, &extra);
                return Ok(axum::Json(body).into_response());
            }
            Some(JobEvent::Failed(e)) => return Err(e),
            Some(JobEvent::Started { .. }) => {}
            None => return Err(ApiError::unavailable("the server is shutting down: the generation was cancelled")),
        }
    }
}

/// The state of one server-sent event stream.
struct StreamState {
    head: ResponseHead,
    rx: UnboundedReceiver<JobEvent>,
    prompt_tokens: usize,
    include_usage: bool,
    return_token_ids: bool,
    pending: std::collections::VecDeque<SseEvent>,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// `"stream": true`: a chunk with the role (and the plan) first, a chunk per decode step with
/// text, a last chunk with the finish reason, the usage chunk when asked, then `data: [DONE]`.
/// An error after the start is sent as a `data: {"error": ...}` event before the end.
fn stream_response(
    head: ResponseHead,
    rx: UnboundedReceiver<JobEvent>,
    extra: Map<String, Value>,
    prompt_tokens: usize,
    req: &GenRequest,
) -> impl IntoResponse {
    let mut pending = std::collections::VecDeque::new();
    pending.push_back(data(&head.chunk(Some(""), true, None, None, Some(&extra))));
    let state = StreamState {
        head,
        rx,
        prompt_tokens,
        include_usage: req.include_usage,
        return_token_ids: req.return_token_ids,
        pending,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.pending.pop_front() {
                return Some((Ok::<SseEvent, Infallible>(event), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(JobEvent::Delta { ids, text }) => {
                    if !text.is_empty() || st.return_token_ids {
                        let ids = st.return_token_ids.then_some(ids.as_slice());
                        st.pending.push_back(data(&st.head.chunk(Some(&text), false, None, ids, None)));
                    }
                }
                Some(JobEvent::Finished { reason, completion_tokens, .. }) => {
                    st.pending.push_back(data(&st.head.chunk(None, false, Some(api::finish_reason(reason)), None, None)));
                    if st.include_usage {
                        st.pending.push_back(data(&st.head.usage_chunk(api::usage(st.prompt_tokens, completion_tokens))));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(JobEvent::Failed(e)) => {
                    st.pending.push_back(data(&e.body()));
                    st.done = true;
                }
                Some(JobEvent::Started { .. }) => {}
                // Cancelled at shutdown: the stream ends without [DONE].
                None => st.done = true,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
