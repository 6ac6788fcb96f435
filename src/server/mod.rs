//! `firstrt serve`: an OpenAI-compatible HTTP server over one model.
//!
//! - [`api`]: request bodies checked field by field, and the JSON of responses, stream chunks
//!   and errors.
//! - [`scheduler`]: one thread owning every running sequence ([`Session`](crate::runtime::Session)
//!   per request over the shared weights), interleaving their decode steps round robin, with a
//!   bounded number running and waiting.
//! - [`http`]: the axum routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   `/health`), API-key check, server-sent events, and graceful shutdown.
//! - [`ServedModel`]: the model with the router files and adapters loaded at start, which turns a
//!   checked request into a [`Job`](scheduler::Job): prompt ids, plan, adapter and limits.
//!
//! Requests choose their layers and adapter by name only (`"first": {"routers": NAME}`,
//! `"lora": {"name": NAME}`), among files loaded at start: a request cannot make the server read
//! a path. The server keeps nothing of a request after it ends, so any number of instances can
//! run behind an ordinary HTTP load balancer.

pub mod api;
pub mod http;
pub mod scheduler;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::generate::{GenerateOptions, SamplerConfig};
use crate::runtime::routed::Routing;
use crate::runtime::{GpuLora, LoadedModel, PlanChoice, PlanPolicyArgs};

use api::{ApiError, FirstRequest, GenRequest, Input};

/// A router file loaded at start under a name.
#[derive(Debug, Clone)]
pub struct ServedRouters {
    /// Its plan choice under the file's own threshold: routed (uploaded once, shared by every
    /// request that names it) or the static plan it holds.
    pub choice: PlanChoice,
}

/// A LoRA adapter uploaded at start (unmerged) under a name.
#[derive(Clone)]
pub struct ServedAdapter {
    /// The adapter on the GPU, shared by every request that names it.
    pub gpu: Arc<GpuLora>,
}

/// The model a server answers for, with what requests may choose among.
pub struct ServedModel {
    /// Weights, tokenizer and chat template.
    pub loaded: Arc<LoadedModel>,
    /// The id requests name in `model` and `/v1/models` lists.
    pub id: String,
    /// The most tokens (prompt + generated) one sequence may hold (`--ctx`).
    pub ctx_len: usize,
    /// Router files by name (`--routers NAME=FILE`).
    pub routers: BTreeMap<String, ServedRouters>,
    /// Adapters by name (`--lora NAME=DIR`).
    pub adapters: BTreeMap<String, ServedAdapter>,
    /// The router file a request without `first` runs under (`--default-routers`); None: the
    /// full model.
    pub default_routers: Option<String>,
    /// `max_tokens` of a request that gives none (`--default-max-tokens`), capped by the room
    /// its prompt leaves: a sequence's KV cache is sized for its prompt plus `max_tokens`.
    pub default_max_tokens: usize,
}

/// What a request's names resolve to ([`ServedModel::resolve`]).
pub struct Resolved {
    /// The plan: static, or routers deciding in the prefill.
    pub plan: PlanChoice,
    /// The router file's name, if one decides.
    pub routers: Option<String>,
    /// The adapter and its user scale.
    pub lora: Option<(Arc<GpuLora>, f32)>,
}

/// A checked request with its prompt encoded and its names resolved: a job once it has a
/// channel and a slot.
pub struct Prepared {
    /// The prompt's ids.
    pub prompt_ids: Vec<u32>,
    /// Token budget, sampler and end ids.
    pub options: GenerateOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The plan: static, or routers deciding in the prefill.
    pub plan: PlanChoice,
    /// The router file's name, if one decides.
    pub routers: Option<String>,
    /// The adapter and its user scale.
    pub lora: Option<(Arc<GpuLora>, f32)>,
    /// KV-cache rows: prompt + `max_tokens`.
    pub ctx_len: usize,
}

impl ServedModel {
    /// Encode the request's prompt and check its length and `max_tokens` against the context;
    /// `resolved` is what [`ServedModel::resolve`] made of its names.
    ///
    /// Errors (400): a chat request to a model without a usable chat template, or messages its
    /// template refuses; a token id outside the vocabulary; a prompt that leaves no room in the
    /// context or a `max_tokens` beyond it (`context_length_exceeded`).
    pub fn prepare(&self, req: &GenRequest, resolved: Resolved) -> Result<Prepared, ApiError> {
        let (prompt_ids, field) = match &req.input {
            Input::Messages(messages) => {
                let ids = self.loaded.chat_ids(messages).map_err(|e| ApiError::bad_field("messages", format!("messages: {e}")))?;
                (ids, "messages")
            }
            Input::Text(text) => (self.loaded.text_ids(text).map_err(|e| ApiError::bad_field("prompt", format!("prompt: {e}")))?, "prompt"),
            Input::Ids(ids) => {
                let vocab = self.loaded.weights.config.vocab_size;
                if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::bad_field("prompt", format!("prompt token id {id} is outside the vocabulary (0..{vocab})")));
                }
                (ids.clone(), "prompt")
            }
        };
        let n = prompt_ids.len();
        if n == 0 {
            return Err(ApiError::bad_field(field, format!("the {field} encode to no tokens")));
        }
        if n >= self.ctx_len {
            return Err(ApiError::bad_field(
                field,
                format!(
                    "this model's context holds {} tokens, but the {field} are {n} tokens, leaving no room to generate (--ctx sets the context)",
                    self.ctx_len
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = self.ctx_len - n;
        let max_tokens = match req.max_tokens {
            Some(m) if m > room => {
                let param = "max_tokens";
                return Err(ApiError::bad_field(
                    param,
                    format!("max_tokens {m} is over the limit: the prompt has {n} tokens and the context holds {}, so at most {room} can be generated", self.ctx_len),
                )
                .with_code("context_length_exceeded"));
            }
            Some(m) => m,
            None => self.default_max_tokens.min(room),
        };
        let Resolved { plan, routers, lora } = resolved;
        let seed = req.seed.unwrap_or_else(rand::random);
        let sampler = SamplerConfig { temperature: req.temperature, top_k: req.top_k, top_p: req.top_p, seed };
        let options = GenerateOptions { max_tokens, sampler, end_ids: self.loaded.tokenizer.end_ids().to_vec() };
        Ok(Prepared { prompt_ids, options, stop: req.stop.clone(), plan, routers, lora, ctx_len: n + max_tokens })
    }

    /// Resolve what a request names, without encoding its prompt: the model, the plan
    /// (`first`) and the adapter. The server does this before it counts the request against
    /// its capacity, so that a full server still answers a wrong name with its 4xx, not 429.
    ///
    /// Errors (400 unless said): `model` other than [`ServedModel::id`] (404,
    /// `model_not_found`); an unknown router or adapter name; `first` fields that contradict
    /// each other or the file.
    pub fn resolve(&self, req: &GenRequest) -> Result<Resolved, ApiError> {
        if req.model != self.id {
            return Err(ApiError::not_found(
                "model_not_found",
                format!("the model '{}' does not exist; this server has '{}'", req.model, self.id),
            ));
        }
        let (plan, routers) = self.plan(req.first.as_ref())?;
        let lora = match &req.lora {
            None => None,
            Some(l) => Some((self.adapter(&l.name)?.gpu.clone(), l.scale)),
        };
        Ok(Resolved { plan, routers, lora })
    }

    /// The adapter loaded under `name`; a 400 naming `lora.name` when there is none.
    fn adapter(&self, name: &str) -> Result<&ServedAdapter, ApiError> {
        self.adapters.get(name).ok_or_else(|| {
            ApiError::bad_field("lora.name", format!("no adapter named '{name}' (this server has: {})", names(self.adapters.keys())))
        })
    }

    /// The plan a request's `first` asks for, and the router file's name when one decides.
    fn plan(&self, first: Option<&FirstRequest>) -> Result<(PlanChoice, Option<String>), ApiError> {
        let n_layers = self.loaded.weights.config.n_layers;
        let default = FirstRequest::default();
        let first = first.unwrap_or(&default);
        let policy = PlanPolicyArgs { threshold: first.threshold, max_skip: first.max_skip, min_skip: first.min_skip };
        let policy_field = policy.first_given_as(["first.threshold", "first.min_skip", "first.max_skip"]);
        if let Some(skip) = &first.skip_layers {
            if first.routers.is_some() {
                return Err(ApiError::bad_field("first.skip_layers", "first.skip_layers and first.routers exclude each other: give one"));
            }
            if let Some(field) = policy_field {
                return Err(ApiError::bad_field(field, format!("{field} applies to routers, not to a static first.skip_layers")));
            }
            let plan = PlanChoice::skipping(n_layers, skip)
                .map_err(|e| ApiError::bad_field("first.skip_layers", format!("first.skip_layers: {e}")))?;
            return Ok((plan, None));
        }
        let name = match (&first.routers, &self.default_routers) {
            (Some(name), _) => name,
            (None, Some(name)) => name,
            (None, None) => {
                if let Some(field) = policy_field {
                    return Err(ApiError::bad_field(field, format!("{field} needs first.routers (no router file decides by default)")));
                }
                return Ok((PlanChoice::Static(crate::runtime::LayerPlan::full(n_layers)), None));
            }
        };
        let served = self.routers.get(name).ok_or_else(|| {
            ApiError::bad_field("first.routers", format!("no router file named '{name}' (this server has: {})", names(self.routers.keys())))
        })?;
        let choice = match &served.choice {
            PlanChoice::Static(plan) => {
                if let Some(field) = policy_field {
                    return Err(ApiError::bad_field(
                        field,
                        format!("{field} does not apply: router file '{name}' holds a static plan (skips {:?})", plan.skipped_layers()),
                    ));
                }
                served.choice.clone()
            }
            PlanChoice::Routed(routing) => {
                let p = policy.apply(&routing.policy);
                p.validate().map_err(|e| ApiError::bad_field(policy_field.unwrap_or("first"), format!("first: {e}")))?;
                PlanChoice::Routed(Routing { routers: routing.routers.clone(), policy: p })
            }
        };
        Ok((choice, Some(name.clone())))
    }
}

/// "a, b" or "none".
fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = keys.map(String::as_str).collect();
    if list.is_empty() { "none".to_string() } else { list.join(", ") }
}

/// Serve the routes of `state` on `listener` until `shutdown` resolves, then shut down
/// gracefully: stop accepting connections, answer waiting and new requests with 503, let the
/// running sequences finish for up to `grace` or until `force` resolves (a second Ctrl-C), then
/// cancel what still runs (its clients get an error event), and return once every connection is
/// closed and the scheduler has stopped.
///
/// Errors: the listener's I/O errors.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<http::AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    force: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    let draining = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let (state, draining) = (state.clone(), draining.clone());
        async move {
            shutdown.await;
            state.scheduler.drain();
            draining.notify_one();
        }
    };
    let server = axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(signal).into_future();
    tokio::pin!(server);
    tokio::pin!(force);
    let result = tokio::select! {
        r = &mut server => r,
        () = draining.notified() => tokio::select! {
            r = &mut server => r,
            () = tokio::time::sleep(grace) => {
                log::warn!("shutting down: cancelling the sequences still running after {:.0} s", grace.as_secs_f64());
                state.scheduler.cancel_all();
                server.await
            }
            () = &mut force => {
                state.scheduler.cancel_all();
                server.await
            }
        },
    };
    state.scheduler.drain();
    let scheduler_state = state.clone();
    // The scheduler ends once its running sequences have (they were cancelled or finished).
    tokio::task::spawn_blocking(move || scheduler_state.scheduler.join()).await.ok();
    result
}
