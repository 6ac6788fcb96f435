//! Text generation over a [`Session`](crate::runtime::Session): what `firstrt run`,
//! `firstrt chat` and a server share.
//!
//! - [`TokenStream`]: the token loop (prefill, then sample and decode) as an iterator of
//!   [`Event`]s (token ids, final text, the finish reason with [`Timings`]); [`generate`] runs it
//!   to the end.
//! - [`Sampler`] / [`SamplerConfig`]: temperature, top-k, top-p and a seeded RNG over the
//!   session's candidates.
//! - [`StopMatcher`] / [`TextDecoder`]: streaming detokenisation with stop strings held back
//!   until they are known not to be one.
//! - [`Conversation`]: chat turns through the model's template, the KV cache reused across
//!   turns, the oldest exchanges dropped (the system prompt kept) when the context is full;
//!   [`fit_prompt`] for a single prompt.
//!
//! This sits above `runtime` (which runs steps on the GPU and knows nothing of text) and uses
//! `model` (tokenizer, chat template); nothing in `runtime`, `kernels` or `model` depends on it.

pub mod conversation;
pub mod sampler;
pub mod stop;
pub mod stream;

pub use conversation::{Conversation, Turn, fit_prompt};
pub use sampler::{Sampler, SamplerConfig, SamplerError};
pub use stop::{StopMatcher, TextDecoder};
pub use stream::{Event, FinishReason, GenerateOptions, Generation, Timings, TokenStream, generate};

use crate::model::tokenizer::TokenizerError;
use crate::runtime::RuntimeError;

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A session step failed (GPU, a token outside the vocabulary, the context's end), or
    /// rendering a chat prompt did.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Detokenising the generated ids failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The prompt (for a conversation: the system prompt and the question, all earlier
    /// exchanges dropped) leaves no room for a generated token.
    #[error("the prompt has {tokens} tokens but the context holds {ctx_len} (room is needed for at least one generated token)")]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// The context length (KV-cache rows).
        ctx_len: usize,
    },
}
