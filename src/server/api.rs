//! The OpenAI request and response bodies: a request body checked field by field into a
//! [`GenRequest`] (every wrong field an [`ApiError`] naming it), and the JSON of completions,
//! stream chunks and errors.
//!
//! Field names, defaults and ranges follow OpenAI's API reference for `POST /v1/chat/completions`
//! and `POST /v1/completions` (temperature 0..=2, default 1; top_p 0..=1, default 1; `n` 1).
//! Extensions, ignored by OpenAI's clients: `top_k`, `first` (the FiRST plan), `lora` (an
//! adapter by name) and vLLM's `return_token_ids`. Fields a client sends that firstrt cannot
//! honour (`logprobs`, penalties, `logit_bias`, tools, `n` > 1, ...) are refused with a 400
//! rather than silently ignored; unknown fields are ignored, as OpenAI's server does.

use serde_json::{Map, Value, json};

use crate::generate::FinishReason;
use crate::model::chat::ChatMessage;

/// The most stop strings a request may give (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;

/// The longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// An error answered with an OpenAI-style body:
/// `{"error": {"message", "type", "param", "code"}}` and the HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status: 400, 401, 404, 413, 429, 500 or 503.
    pub status: u16,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`,
    /// `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// One line for a person: what is wrong and the limit.
    pub message: String,
    /// The request field at fault (`max_tokens`, `first.routers`, `messages[2].content`).
    pub param: Option<String>,
    /// A machine-readable code where OpenAI has one (`context_length_exceeded`,
    /// `model_not_found`, `invalid_api_key`).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn bad_field(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: Some(param.into()), code: None }
    }

    /// 400 `invalid_request_error` about the request as a whole (its JSON).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: None, code: None }
    }

    /// 404 with `code` (`model_not_found`, `not_found`).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: 404, kind: "invalid_request_error", message: message.into(), param: None, code: Some(code) }
    }

    /// 401: the `Authorization: Bearer` key is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError { status: 401, kind: "authentication_error", message: message.into(), param: None, code: Some("invalid_api_key") }
    }

    /// 429: the queue is full; the client may retry later.
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError { status: 429, kind: "rate_limit_error", message: message.into(), param: None, code: Some("queue_full") }
    }

    /// 503: the server is shutting down or cannot take work.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError { status: 503, kind: "server_error", message: message.into(), param: None, code: Some("unavailable") }
    }

    /// 500: running the request failed on the server (a GPU error).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: 500, kind: "server_error", message: message.into(), param: None, code: None }
    }

    /// This error with `code` set.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`: messages through the model's chat template.
    Chat,
    /// `POST /v1/completions`: a raw prompt (text or token ids).
    Completion,
}

impl Endpoint {
    /// The `object` of a whole response (`chat.completion`, `text_completion`).
    pub fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The `object` of a stream chunk (`chat.completion.chunk`, `text_completion`).
    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The prefix of response ids (`chatcmpl-`, `cmpl-`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }
}

/// What to generate after.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Chat messages, rendered with the model's template and the generation prompt.
    Messages(Vec<ChatMessage>),
    /// A raw text prompt, encoded as `firstrt run -p` encodes it.
    Text(String),
    /// Token ids used as they are (no BOS added), each checked against the vocabulary later.
    Ids(Vec<u32>),
}

/// The `first` extension: which layers this request runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FirstRequest {
    /// A router file by the name given at start (`--routers NAME=FILE`).
    pub routers: Option<String>,
    /// A threshold in [0, 1] overriding the file's.
    pub threshold: Option<f32>,
    /// Skip at most this many layers.
    pub max_skip: Option<usize>,
    /// Skip at least this many layers.
    pub min_skip: Option<usize>,
    /// A static plan: these layers (0-based) skipped. Excludes the four fields above.
    pub skip_layers: Option<Vec<usize>>,
}

/// The `lora` extension: an adapter loaded at start (`--lora NAME=DIR`) and its user scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRequest {
    /// The adapter's name.
    pub name: String,
    /// The user scale S: the projections become W + S (alpha / r) B A. Default 1.
    pub scale: f32,
}

/// A request body, checked: what the server needs to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The endpoint it came to.
    pub endpoint: Endpoint,
    /// The model the request names (checked against the served model later).
    pub model: String,
    /// Messages or prompt.
    pub input: Input,
    /// `max_completion_tokens`, else `max_tokens` (≥ 1); None: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Sampling temperature in [0, 2] (0: greedy). Default 1.
    pub temperature: f32,
    /// Nucleus sampling mass in [0, 1]. Default 1.
    pub top_p: f32,
    /// Sample among the K most likely (0: every candidate read back, at most 256).
    pub top_k: usize,
    /// Seed of the sampler; None: a fresh one per request.
    pub seed: Option<u64>,
    /// Stop strings (at most [`MAX_STOP_STRINGS`], each 1..=[`MAX_STOP_BYTES`] bytes).
    pub stop: Vec<String>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Add `token_ids` (and `prompt_token_ids`) to the response (vLLM's extension).
    pub return_token_ids: bool,
    /// The `first` extension.
    pub first: Option<FirstRequest>,
    /// The `lora` extension.
    pub lora: Option<LoraRequest>,
}

/// A JSON object's fields, read one by one with the field's full name in every error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value, None when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn number(&self, key: &str, range: std::ops::RangeInclusive<f64>, allowed: &str) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let x = v.as_f64().ok_or_else(|| ApiError::bad_field(self.name(key), format!("{} must be a number, not {v}", self.name(key))))?;
        if !range.contains(&x) {
            return Err(ApiError::bad_field(self.name(key), format!("{} {x} is outside the allowed range {allowed}", self.name(key))));
        }
        Ok(Some(x))
    }

    fn count(&self, key: &str, min: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(ApiError::bad_field(self.name(key), format!("{} must be an integer >= {min}, not {v}", self.name(key)))),
        }
    }

    fn boolean(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::bad_field(self.name(key), format!("{} must be true or false, not {v}", self.name(key)))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::bad_field(self.name(key), format!("{} must be a string, not {}", self.name(key), kind(v)))),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields { map, prefix: "" })),
            Some(v) => Err(ApiError::bad_field(self.name(key), format!("{} must be an object, not {}", self.name(key), kind(v)))),
        }
    }

    /// Refuse a field that firstrt cannot honour when it asks for something (not null, false,
    /// 0 or empty).
    fn unsupported(&self, key: &str, what: &str) -> Result<(), ApiError> {
        let asks = match self.get(key) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if asks {
            return Err(ApiError::bad_field(self.name(key), format!("{} is not supported by firstrt ({what})", self.name(key))));
        }
        Ok(())
    }
}

/// A JSON value's kind, for errors ("a number", "an array").
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Check a request body for `endpoint`. Errors: a 400 naming the field for every value of the
/// wrong type or outside its range, a missing `model`, `messages` or `prompt`, and every field
/// firstrt cannot honour; invalid JSON is a 400 with serde's line and column.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<GenRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request(format!("the request body must be a JSON object, not {}", kind(&value))));
    };
    let f = Fields { map, prefix: "" };
    let model = f.string("model")?.ok_or_else(|| ApiError::bad_field("model", "model is required"))?.to_string();
    let input = match endpoint {
        Endpoint::Chat => Input::Messages(parse_messages(f.get("messages"))?),
        Endpoint::Completion => parse_prompt(f.get("prompt"))?,
    };
    for (key, what) in [
        ("logprobs", "no log-probabilities are returned"),
        ("top_logprobs", "no log-probabilities are returned"),
        ("presence_penalty", "no penalties"),
        ("frequency_penalty", "no penalties"),
        ("logit_bias", "no logit bias"),
        ("tools", "no tool calls"),
        ("functions", "no function calls"),
        ("echo", "the prompt is not echoed"),
        ("suffix", "no insertion"),
    ] {
        f.unsupported(key, what)?;
    }
    if let Some(n) = f.count("n", 0)?
        && n != 1
    {
        return Err(ApiError::bad_field("n", format!("n {n} is not supported: firstrt returns one choice (n = 1)")));
    }
    if let Some(n) = f.count("best_of", 0)?
        && n > 1
    {
        return Err(ApiError::bad_field("best_of", format!("best_of {n} is not supported (1 only)")));
    }
    if let Some(format) = f.object("response_format")? {
        match format.string("type")? {
            None | Some("text") => {}
            Some(other) => {
                return Err(ApiError::bad_field(
                    "response_format.type",
                    format!("response_format.type {other} is not supported (text only)"),
                ));
            }
        }
    }
    let max_completion = f.count("max_completion_tokens", 1)?;
    let max_tokens = match max_completion {
        Some(n) => Some(n),
        None => f.count("max_tokens", 1)?,
    };
    let temperature = f.number("temperature", 0.0..=2.0, "0..=2")?.unwrap_or(1.0) as f32;
    let top_p = f.number("top_p", 0.0..=1.0, "0..=1")?.unwrap_or(1.0) as f32;
    let top_k = f.count("top_k", 0)?.unwrap_or(0);
    if top_k > crate::runtime::session::MAX_CANDIDATES as u64 {
        return Err(ApiError::bad_field(
            "top_k",
            format!("top_k {top_k} is outside the allowed range 0..={} (0: no limit)", crate::runtime::session::MAX_CANDIDATES),
        ));
    }
    let seed = match f.get("seed") {
        None => None,
        // OpenAI's seed is any 64-bit integer; a negative one is used by its bits.
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::bad_field("seed", format!("seed must be an integer, not {v}")))?,
        ),
    };
    let stop = parse_stop(f.get("stop"))?;
    let stream = f.boolean("stream")?;
    let include_usage = match f.object("stream_options")? {
        Some(o) => Fields { prefix: "stream_options.", ..o }.boolean("include_usage")?,
        None => false,
    };
    let return_token_ids = f.boolean("return_token_ids")?;
    let first = match f.object("first")? {
        Some(o) => Some(parse_first(&Fields { prefix: "first.", ..o })?),
        None => None,
    };
    let lora = match f.object("lora")? {
        Some(o) => {
            let o = Fields { prefix: "lora.", ..o };
            let name = o.string("name")?.ok_or_else(|| ApiError::bad_field("lora.name", "lora.name is required"))?.to_string();
            let scale = o.number("scale", -1e6..=1e6, "-1e6..=1e6")?.unwrap_or(1.0) as f32;
            Some(LoraRequest { name, scale })
        }
        None => None,
    };
    Ok(GenRequest {
        endpoint,
        model,
        input,
        max_tokens: max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        temperature,
        top_p,
        top_k: top_k as usize,
        seed,
        stop,
        stream,
        include_usage,
        return_token_ids,
        first,
        lora,
    })
}

fn parse_first(f: &Fields<'_>) -> Result<FirstRequest, ApiError> {
    let skip_layers = match f.get("skip_layers") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_u64().and_then(|l| usize::try_from(l).ok()).ok_or_else(|| {
                        ApiError::bad_field(
                            "first.skip_layers",
                            format!("first.skip_layers must hold layer indices (integers >= 0), not {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<usize>, ApiError>>()?,
        ),
        Some(v) => return Err(ApiError::bad_field("first.skip_layers", format!("first.skip_layers must be an array, not {}", kind(v)))),
    };
    let as_usize = |n: Option<u64>| n.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    Ok(FirstRequest {
        routers: f.string("routers")?.map(str::to_string),
        threshold: f.number("threshold", 0.0..=1.0, "0..=1")?.map(|t| t as f32),
        max_skip: as_usize(f.count("max_skip", 0)?),
        min_skip: as_usize(f.count("min_skip", 0)?),
        skip_layers,
    })
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match v {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_field("stop", format!("stop must hold strings, not {s}"))))
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(ApiError::bad_field("stop", format!("stop must be a string or an array of strings, not {}", kind(v)))),
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_field("stop", format!("stop has {} strings; at most {MAX_STOP_STRINGS} are allowed", stops.len())));
    }
    if let Some(s) = stops.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_field("stop", format!("a stop string must be 1 to {MAX_STOP_BYTES} bytes long, not {}", s.len())));
    }
    Ok(stops)
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match v {
        None => return Err(ApiError::bad_field("messages", "messages is required")),
        Some(Value::Array(items)) if items.is_empty() => return Err(ApiError::bad_field("messages", "messages must not be empty")),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(ApiError::bad_field("messages", format!("messages must be an array, not {}", kind(v)))),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let name = format!("messages[{i}]");
            let Value::Object(map) = m else {
                return Err(ApiError::bad_field(&name, format!("{name} must be an object, not {}", kind(m))));
            };
            let prefix = format!("{name}.");
            let f = Fields { map, prefix: &prefix };
            let role = match f.string("role")? {
                Some(r @ ("system" | "user" | "assistant")) => r,
                // OpenAI's newer name for instructions that outrank the user's.
                Some("developer") => "system",
                Some(other) => {
                    return Err(ApiError::bad_field(
                        f.name("role"),
                        format!("{} '{other}' is not supported (system, developer, user or assistant)", f.name("role")),
                    ));
                }
                None => return Err(ApiError::bad_field(f.name("role"), format!("{} is required", f.name("role")))),
            };
            let content = match f.get("content") {
                None => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        let pname = format!("{name}.content[{j}]");
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (Some(other), _) if other != "text" => {
                                return Err(ApiError::bad_field(
                                    &pname,
                                    format!("{pname}: content parts of type '{other}' are not supported (text only)"),
                                ));
                            }
                            _ => return Err(ApiError::bad_field(&pname, format!("{pname} must be {{\"type\": \"text\", \"text\": ...}}"))),
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(ApiError::bad_field(
                        f.name("content"),
                        format!("{} must be a string or an array of text parts, not {}", f.name("content"), kind(v)),
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn parse_prompt(v: Option<&Value>) -> Result<Input, ApiError> {
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| ApiError::bad_field("prompt", format!("prompt token ids must be integers in 0..2^32, not {v}")))
            })
            .collect()
    };
    let input = match v {
        None => return Err(ApiError::bad_field("prompt", "prompt is required")),
        Some(Value::String(s)) => Input::Text(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => return Err(ApiError::bad_field("prompt", "prompt must not be empty")),
            [Value::String(s)] => Input::Text(s.clone()),
            [Value::Array(inner)] => Input::Ids(ids(inner)?),
            items if items.iter().all(Value::is_number) => Input::Ids(ids(items)?),
            items => {
                return Err(ApiError::bad_field(
                    "prompt",
                    format!("prompt must be a string or token ids; a batch of {} prompts is not supported (one per request)", items.len()),
                ));
            }
        },
        Some(v) => return Err(ApiError::bad_field("prompt", format!("prompt must be a string or an array of token ids, not {}", kind(v)))),
    };
    match &input {
        Input::Text(s) if s.is_empty() => Err(ApiError::bad_field("prompt", "prompt must not be empty")),
        Input::Ids(ids) if ids.is_empty() => Err(ApiError::bad_field("prompt", "prompt must not be empty")),
        _ => Ok(input),
    }
}

/// OpenAI's `finish_reason` for why generation ended: `stop` (an end token or a stop string)
/// or `length` (`max_tokens`, or the context is full). A caller's stop is not reported: the
/// client is gone.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::EndToken | FinishReason::StopString | FinishReason::Caller => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
    }
}

/// `usage`: prompt, completion and total token counts.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `chatcmpl-...` or `cmpl-...`.
    pub id: String,
    /// Unix time of the request (s).
    pub created: u64,
    /// The served model's id.
    pub model: String,
}

impl ResponseHead {
    fn object(&self, object: &str, choices: Value) -> Map<String, Value> {
        let Value::Object(map) = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": null, "choices": choices,
        }) else {
            unreachable!("a json! object literal")
        };
        map
    }

    /// The whole (non-streamed) response: one choice with `text`, `finish`, `usage`, and the
    /// extension fields in `extra` (`first`, `lora`) at the top level.
    pub fn completion(&self, text: &str, finish: &str, usage: Value, token_ids: Option<&[u32]>, extra: &Map<String, Value>) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": null,
            }),
            Endpoint::Completion => json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
        };
        if let Some(ids) = token_ids {
            choice["token_ids"] = json!(ids);
        }
        let mut map = self.object(self.endpoint.object(), json!([choice]));
        map.insert("usage".into(), usage);
        map.extend(extra.clone());
        Value::Object(map)
    }

    /// One stream chunk: `text` as the delta (chat: with `"role": "assistant"` on the first
    /// chunk), `finish` on the last; `extra` (the plan, on the first chunk) at the top level.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first_chunk: bool,
        finish: Option<&str>,
        token_ids: Option<&[u32]>,
        extra: Option<&Map<String, Value>>,
    ) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if first_chunk {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Completion => json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null}),
        };
        if let Some(ids) = token_ids {
            choice["token_ids"] = json!(ids);
        }
        let mut map = self.object(self.endpoint.chunk_object(), json!([choice]));
        if let Some(extra) = extra {
            map.extend(extra.clone());
        }
        Value::Object(map)
    }

    /// The last chunk with `stream_options.include_usage`: no choice, only `usage`.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut map = self.object(self.endpoint.chunk_object(), json!([]));
        map.insert("usage".into(), usage);
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<GenRequest, ApiError> {
        parse_request(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn a_full_chat_request() {
        let r = chat(
            r#"{"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": -1,
                "stop": "\n", "stream": true, "stream_options": {"include_usage": true}, "n": 1, "user": "x",
                "first": {"routers": "r", "threshold": 0.25, "max_skip": 4}, "lora": {"name": "a"}}"#,
        )
        .unwrap();
        assert_eq!(r.input, Input::Messages(vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi there")]));
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!((r.temperature, r.top_p, r.top_k, r.seed), (0.0, 0.5, 3, Some(u64::MAX)));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage && !r.return_token_ids);
        let first = r.first.unwrap();
        assert_eq!((first.routers.as_deref(), first.threshold, first.max_skip, first.min_skip), (Some("r"), Some(0.25), Some(4), None));
        assert_eq!(r.lora, Some(LoraRequest { name: "a".into(), scale: 1.0 }));
    }

    #[test]
    fn defaults_follow_openai() {
        let r = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "x"}]}"#).unwrap();
        assert_eq!((r.temperature, r.top_p, r.top_k, r.max_tokens, r.seed), (1.0, 1.0, 0, None, None));
        assert!(!r.stream && r.stop.is_empty() && r.first.is_none() && r.lora.is_none());
    }

    #[test]
    fn prompts_of_every_form() {
        let p = |s: &str| parse_request(Endpoint::Completion, format!(r#"{{"model": "m", "prompt": {s}}}"#).as_bytes()).map(|r| r.input);
        assert_eq!(p(r#""hi""#).unwrap(), Input::Text("hi".into()));
        assert_eq!(p(r#"["hi"]"#).unwrap(), Input::Text("hi".into()));
        assert_eq!(p("[1, 2]").unwrap(), Input::Ids(vec![1, 2]));
        assert_eq!(p("[[3]]").unwrap(), Input::Ids(vec![3]));
        for bad in [r#""""#, "[]", r#"["a", "b"]"#, "[-1]", "[4294967296]", "{}", "[[]]"] {
            assert_eq!(p(bad).unwrap_err().param.as_deref(), Some("prompt"), "{bad}");
        }
    }

    /// Each bad field is a 400 naming that field.
    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "model"),
            (r#"{"model": "m"}"#, "messages"),
            (r#"{"model": "m", "messages": []}"#, "messages"),
            (r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#, "messages[0].role"),
            (r#"{"model": "m", "messages": [{"role": "user", "content": 3}]}"#, "messages[0].content"),
            (r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#, "messages[0].content[0]"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}"#, "max_tokens"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": -3}"#, "max_completion_tokens"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "temperature": 2.5}"#, "temperature"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "temperature": "hot"}"#, "temperature"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "top_p": -0.1}"#, "top_p"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "top_k": 257}"#, "top_k"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "n": 2}"#, "n"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "stop": 5}"#, "stop"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "stop": [""]}"#, "stop"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "logprobs": true}"#, "logprobs"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}"#, "stream"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "first": {"threshold": 1.5}}"#, "first.threshold"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "first": {"skip_layers": [-1]}}"#, "first.skip_layers"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "first": {"routers": 3}}"#, "first.routers"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "lora": {"scale": 2}}"#, "lora.name"),
            (r#"{"model": "m", "messages": [{"role": "user"}], "response_format": {"type": "json_object"}}"#, "response_format.type"),
        ];
        for (body, param) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {}", e.message);
            assert!(e.message.contains(param.split('[').next().unwrap()), "{body}: {}", e.message);
        }
        // Asking for nothing is fine.
        chat(r#"{"model": "m", "messages": [{"role": "user"}], "logprobs": false, "presence_penalty": 0, "n": 1, "tools": []}"#).unwrap();
    }

    #[test]
    fn invalid_json_says_where() {
        let e = chat(r#"{"model": "m", "#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON") && e.message.contains("column"), "{}", e.message);
        assert!(chat("[1]").unwrap_err().message.contains("JSON object"));
    }

    #[test]
    fn response_shapes() {
        let head = ResponseHead { endpoint: Endpoint::Chat, id: "chatcmpl-1".into(), created: 5, model: "m".into() };
        let mut extra = Map::new();
        extra.insert("first".into(), json!({"skipped_layers": [3]}));
        let body = head.completion("hi", "stop", usage(3, 1), None, &extra);
        assert_eq!(body["choices"][0]["message"]["content"], "hi");
        assert_eq!(body["usage"]["total_tokens"], 4);
        assert_eq!(body["first"]["skipped_layers"], json!([3]));
        let chunk = head.chunk(Some("h"), true, None, Some(&[7]), Some(&extra));
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["choices"][0]["delta"], json!({"role": "assistant", "content": "h"}));
        assert_eq!(chunk["choices"][0]["token_ids"], json!([7]));
        assert_eq!(chunk["first"]["skipped_layers"], json!([3]));
        let last = head.chunk(None, false, Some("length"), None, None);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert!(last.get("first").is_none());
        let text = ResponseHead { endpoint: Endpoint::Completion, ..head };
        assert_eq!(text.completion("x", "length", usage(1, 1), None, &Map::new())["choices"][0]["text"], "x");
        assert_eq!(text.usage_chunk(usage(1, 2))["choices"], json!([]));
    }
}
