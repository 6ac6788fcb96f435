//! Training sequences from task files (the JSONL rows of [`crate::eval::data`]).
//!
//! A row becomes one token sequence, what the model reads when the assistant answers the
//! prompt in a chat:
//! ```text
//! ids = [ chat template(user: prompt) with the generation prompt | completion | turn end ]
//!        ^ prompt_len tokens: eval::run::prompt_ids exactly        ^ turn_end_id (<|im_end|>)
//! ```
//! The completion is a train row's `completion` (a test row's first reference), encoded
//! without a BOS token (it continues the sequence). The loss is the cross-entropy at positions
//! `t = prompt_len - 1 .. ids.len() - 1` (exclusive end) of the prediction of `ids[t + 1]`: the
//! completion's tokens and the turn-end token are the targets, so the model learns both the
//! answer and where to stop; the prompt is context only
//! ([`TrainSequence::loss_positions`], [`TrainSequence::targets`]).
//!
//! A row longer than the context is fitted per [`Overflow`]: by default the prompt is cut from
//! the left (as `run --truncate` cuts a prompt), keeping the completion and the turn end whole.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::eval::data::{DataError, TaskExample, load_task};
use crate::eval::run::prompt_ids;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::tokenizer::ModelTokenizer;
use crate::runtime::{LoadedModel, RuntimeError};

/// What to do with a row whose sequence is longer than the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Cut the prompt from the left (its oldest tokens, including the template's system
    /// header) so that the sequence fills the context exactly, keeping at least one prompt
    /// token; a row whose completion and turn end alone leave no room for one prompt token is
    /// skipped and counted in [`PrepareStats::skipped`].
    #[default]
    TruncatePrompt,
    /// Skip (and count) every row longer than the context.
    Skip,
}

/// One training sequence: a row's prompt, completion and turn-end token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSequence {
    /// The row's `id` (or `line N`).
    pub id: String,
    /// The 1-based line of the task file the row came from.
    pub line: usize,
    /// Token ids, `[prompt_len + completion tokens + 1]`, at most the context length.
    pub ids: Vec<u32>,
    /// Tokens of the (possibly left-truncated) prompt at the start of `ids`; at least 1.
    pub prompt_len: usize,
}

impl TrainSequence {
    /// The positions whose next-token prediction is in the loss:
    /// `prompt_len - 1 .. ids.len() - 1`; position `t` predicts `ids[t + 1]`.
    pub fn loss_positions(&self) -> Range<usize> {
        self.prompt_len - 1..self.ids.len() - 1
    }

    /// The target tokens, in order: `ids[prompt_len..]`, the completion then the turn end.
    pub fn targets(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }
}

/// What [`prepare`] did to the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrepareStats {
    /// Rows kept with their prompt cut from the left ([`Overflow::TruncatePrompt`]).
    pub truncated: usize,
    /// Rows left out because they did not fit the context.
    pub skipped: usize,
    /// Tokens in all kept sequences (sum of `ids.len()`).
    pub tokens: usize,
    /// Target tokens in all kept sequences (sum of `targets().len()`): the loss's denominator
    /// over the whole set.
    pub target_tokens: usize,
}

/// Task rows that cannot be made into training sequences; every message names the task file,
/// and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    /// The task file could not be read or parsed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A row that cannot be trained on: an empty or whitespace-only completion, or a prompt
    /// that renders to no token.
    #[error("{}:{line}: row '{id}': {what}", path.display())]
    BadRow {
        /// The task file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// The row's id.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// Encoding a row failed (the chat template or the tokenizer).
    #[error("{}:{line}: {source}", path.display())]
    Encode {
        /// The task file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// The template's or tokenizer's error (boxed: it is large).
        #[source]
        source: Box<RuntimeError>,
    },
    /// The token that ends an assistant turn could not be determined.
    #[error("{}: cannot tell which token ends an assistant turn: {what}", model.display())]
    TurnEnd {
        /// The model file or folder.
        model: PathBuf,
        /// Why.
        what: String,
    },
    /// No row fits the context.
    #[error(
        "{}: no row to train on: all {rows} rows are longer than the context of {ctx_len} tokens (with the prompt cut to 1 token when truncating)",
        path.display()
    )]
    NoRows {
        /// The task file.
        path: PathBuf,
        /// Rows in the file.
        rows: usize,
        /// The context length.
        ctx_len: usize,
    },
}

/// The token the model's chat template writes to end an assistant turn (SmolLM2, Qwen2:
/// `<|im_end|>`; Llama 3: `<|eot_id|>`; Llama 2, Mistral: `</s>`), which generation stops on.
///
/// Found from the same sources of truth as generation's stop tokens: the chat template is
/// rendered with a user message and an assistant message holding a marker, and the text after
/// the marker is encoded; the first of its tokens that is one of the tokenizer's end ids
/// ([`crate::model::tokenizer::ModelTokenizer::end_ids`], the ids that end generation) is the
/// answer. When the template writes none, the tokenizer's EOS id.
///
/// Errors: [`TrainDataError::TurnEnd`] when the model has no chat template (or it fails to
/// render), or neither the template nor the tokenizer gives an end token.
pub fn turn_end_id(model: &LoadedModel) -> Result<u32, TrainDataError> {
    let turn_end = |what: String| TrainDataError::TurnEnd { model: model.path.clone(), what };
    let template = model.chat_template().map_err(|e| turn_end(e.to_string()))?;
    match template_turn_end(template, &model.tokenizer).map_err(turn_end)? {
        Some(id) => Ok(id),
        None => {
            let id = model.tokenizer.eos_id().ok_or_else(|| {
                turn_end("the chat template writes no end token after an assistant turn and the tokenizer has no EOS".into())
            })?;
            log::warn!("{}: the chat template writes no end token after an assistant turn; using EOS id {id}", model.path.display());
            Ok(id)
        }
    }
}

/// The first end id (see [`turn_end_id`]) that `template` writes after an assistant message's
/// content; `None` when it writes none. Errors: why the template could not be rendered or its
/// text encoded.
fn template_turn_end(template: &ChatTemplate, tokenizer: &ModelTokenizer) -> Result<Option<u32>, String> {
    const MARKER: &str = "firstrt-turn-end-probe";
    let text = template
        .render(&[ChatMessage::user("hello"), ChatMessage::assistant(MARKER)], false)
        .map_err(|e| format!("rendering an assistant turn: {e}"))?;
    let Some(i) = text.rfind(MARKER) else { return Ok(None) };
    let after = &text[i + MARKER.len()..];
    let ids = tokenizer.encode_with_bos(after, false).map_err(|e| format!("encoding {after:?}: {e}"))?;
    Ok(ids.into_iter().find(|&id| tokenizer.is_end_id(id)))
}

/// Make training sequences of `examples` (read from the task file `path`, which messages
/// name) for `model`, each at most `ctx_len` tokens; rows that are too long are fitted or
/// skipped per `overflow`. Sequences keep the rows' order.
///
/// Errors: [`TrainDataError::BadRow`] for the first row whose completion (`references[0]`) is
/// empty or whitespace only; [`TrainDataError::Encode`] when its prompt or completion cannot be
/// encoded; [`TrainDataError::TurnEnd`] (see [`turn_end_id`]); [`TrainDataError::NoRows`] when
/// no row fits (including when `examples` is empty).
pub fn prepare(
    model: &LoadedModel,
    path: &Path,
    examples: &[TaskExample],
    ctx_len: usize,
    overflow: Overflow,
) -> Result<(Vec<TrainSequence>, PrepareStats), TrainDataError> {
    let end = turn_end_id(model)?;
    let mut stats = PrepareStats::default();
    let mut sequences = Vec::with_capacity(examples.len());
    for example in examples {
        let bad =
            |what: &str| TrainDataError::BadRow { path: path.to_path_buf(), line: example.line, id: example.id.clone(), what: what.into() };
        let encode =
            |source: RuntimeError| TrainDataError::Encode { path: path.to_path_buf(), line: example.line, source: Box::new(source) };
        let completion = example.references.first().map_or("", String::as_str);
        if completion.trim().is_empty() {
            return Err(bad("the completion is empty: there is nothing to train on"));
        }
        let prompt = prompt_ids(model, example).map_err(encode)?;
        if prompt.is_empty() {
            return Err(bad("the prompt renders to no token"));
        }
        let completion = model.tokenizer.encode_with_bos(completion, false).map_err(|e| encode(e.into()))?;
        // The completion's tokens and the turn end: what the loss is taken on.
        let answer = completion.len() + 1;
        let total = prompt.len() + answer;
        let keep = if total <= ctx_len {
            prompt.len()
        } else if overflow == Overflow::TruncatePrompt && answer < ctx_len {
            stats.truncated += 1;
            ctx_len - answer
        } else {
            stats.skipped += 1;
            continue;
        };
        let mut ids = Vec::with_capacity(keep + answer);
        ids.extend_from_slice(&prompt[prompt.len() - keep..]);
        ids.extend_from_slice(&completion);
        ids.push(end);
        stats.tokens += ids.len();
        stats.target_tokens += answer;
        sequences.push(TrainSequence { id: example.id.clone(), line: example.line, ids, prompt_len: keep });
    }
    if sequences.is_empty() {
        return Err(TrainDataError::NoRows { path: path.to_path_buf(), rows: examples.len(), ctx_len });
    }
    Ok((sequences, stats))
}

/// Read the task file `path` ([`load_task`]) and [`prepare`] its rows.
/// Errors: [`TrainDataError::Data`] for the file, then as [`prepare`].
pub fn load(
    model: &LoadedModel,
    path: &Path,
    ctx_len: usize,
    overflow: Overflow,
) -> Result<(Vec<TrainSequence>, PrepareStats), TrainDataError> {
    let examples = load_task(path)?;
    prepare(model, path, &examples, ctx_len, overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data::parse_task;
    use crate::gpu::DType;
    use crate::testdata::{TempDir, data_dir, load_model};

    fn model() -> LoadedModel {
        load_model(&crate::gpu::test_context(), DType::F16)
    }

    fn rows(text: &str) -> Vec<TaskExample> {
        parse_task(Path::new("t.jsonl"), text.as_bytes()).unwrap()
    }

    fn row(prompt: &str, completion: &str) -> String {
        serde_json::json!({ "prompt": prompt, "completion": completion }).to_string() + "\n"
    }

    #[test]
    fn turn_end_is_the_end_token_the_template_writes() {
        let tokenizer = crate::runtime::load_tokenizer(&crate::testdata::model_path()).unwrap();
        let id = |t: &str| tokenizer.token_to_id(t).unwrap();
        // SmolLM2's end ids: <|im_end|> (EOS) and <|endoftext|>.
        assert!(tokenizer.is_end_id(id("<|im_end|>")) && tokenizer.is_end_id(id("<|endoftext|>")));
        let end =
            |source: &str| template_turn_end(&ChatTemplate::new(source, Some("<|im_start|>"), Some("<|im_end|>")).unwrap(), &tokenizer);
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
        assert_eq!(end(chatml).unwrap(), Some(id("<|im_end|>")));
        // Another end token, after text that is not one: the first end id is the answer.
        assert_eq!(
            end("{% for m in messages %}{{ m.content }} [end] <|endoftext|><|im_end|>{% endfor %}").unwrap(),
            Some(id("<|endoftext|>"))
        );
        assert_eq!(end("{% for m in messages %}{{ m.content }}\n\n{% endfor %}").unwrap(), None);
        assert_eq!(end("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}").unwrap(), None);
        let e = end("{{ raise_exception('no assistant turns') }}").unwrap_err();
        assert!(e.contains("rendering an assistant turn") && e.contains("no assistant turns"), "{e}");
    }

    /// Everything on one model load (loading is the slow part).
    #[test]
    fn sequences_on_the_test_model() {
        let model = model();
        let im_end = model.tokenizer.token_to_id("<|im_end|>").unwrap();
        assert_eq!(turn_end_id(&model).unwrap(), im_end);

        // E2E train rows: the prompt exactly as eval builds it, the completion, <|im_end|>; the
        // whole equals the chat template's rendering of the exchange, up to the turn end.
        let path = data_dir().join("e2e_nlg/train.jsonl");
        let examples = load_task(&path).unwrap();
        let examples = &examples[..4];
        let (seqs, stats) = prepare(&model, &path, examples, 2048, Overflow::default()).unwrap();
        assert_eq!((seqs.len(), stats.truncated, stats.skipped), (4, 0, 0));
        let template = model.chat_template().unwrap();
        for (seq, ex) in seqs.iter().zip(examples) {
            let prompt = prompt_ids(&model, ex).unwrap();
            assert_eq!((seq.id.as_str(), seq.line, seq.prompt_len), (ex.id.as_str(), ex.line, prompt.len()));
            assert_eq!(&seq.ids[..seq.prompt_len], &prompt[..]);
            assert_eq!(*seq.ids.last().unwrap(), im_end);
            assert_eq!(model.tokenizer.decode(seq.targets()).unwrap(), format!("{}<|im_end|>", ex.references[0]));
            let chat = [ChatMessage::user(ex.prompt.clone()), ChatMessage::assistant(ex.references[0].clone())];
            let rendered = model.tokenizer.encode_with_bos(&template.render(&chat, false).unwrap(), false).unwrap();
            assert_eq!(&rendered[..seq.ids.len()], &seq.ids[..], "{}", ex.id);
            assert_eq!(seq.loss_positions(), seq.prompt_len - 1..seq.ids.len() - 1);
            assert_eq!(seq.loss_positions().len(), seq.targets().len());
        }
        assert_eq!(stats.tokens, seqs.iter().map(|s| s.ids.len()).sum::<usize>());
        assert_eq!(stats.target_tokens, seqs.iter().map(|s| s.targets().len()).sum::<usize>());

        // Too long for the context: the prompt cut from the left, or the row skipped.
        let long_prompt = "describe the weather in every city you know, ".repeat(8);
        let text = row("short", "fine") + &row(&long_prompt, "Sunny.") + &row("short", &"very long answer ".repeat(60));
        let examples = rows(&text);
        let (full, _) = prepare(&model, Path::new("t.jsonl"), &examples, 4096, Overflow::TruncatePrompt).unwrap();
        let long = &full[1];
        let ctx = long.ids.len() - 5;
        assert!(full[0].ids.len() <= ctx && full[2].targets().len() >= ctx, "pick other test texts");
        let (seqs, stats) = prepare(&model, Path::new("t.jsonl"), &examples, ctx, Overflow::TruncatePrompt).unwrap();
        assert_eq!((seqs.len(), stats.truncated, stats.skipped), (2, 1, 1));
        assert_eq!(seqs[0], full[0]);
        assert_eq!(seqs[1].ids, &long.ids[5..]);
        assert_eq!((seqs[1].prompt_len, seqs[1].ids.len(), seqs[1].line), (long.prompt_len - 5, ctx, 2));
        assert_eq!(stats.tokens, full[0].ids.len() + ctx);
        // Exactly one prompt token left.
        let tight = long.targets().len() + 1;
        let (seqs, stats) = prepare(&model, Path::new("t.jsonl"), &examples[1..2], tight, Overflow::TruncatePrompt).unwrap();
        assert_eq!((seqs[0].prompt_len, seqs[0].loss_positions().start, stats.truncated), (1, 0, 1));
        let e = prepare(&model, Path::new("t.jsonl"), &examples[1..2], tight - 1, Overflow::TruncatePrompt).unwrap_err();
        assert!(e.to_string().contains("t.jsonl: no row to train on: all 1 rows are longer than the context of"), "{e}");
        let (seqs, stats) = prepare(&model, Path::new("t.jsonl"), &examples, ctx, Overflow::Skip).unwrap();
        assert_eq!((seqs.len(), stats.truncated, stats.skipped), (1, 0, 2));
        assert_eq!(seqs[0], full[0]);

        // An empty or blank completion names the file and line.
        let dir = TempDir::new("train-data");
        let file = dir.join("bad.jsonl");
        for completion in ["", " \n\t "] {
            std::fs::write(&file, row("p", "ok") + "\n" + &row("q", completion)).unwrap();
            let e = load(&model, &file, 512, Overflow::default()).unwrap_err().to_string();
            assert!(e.contains(&format!("{}:3: row 'line 3': the completion is empty", file.display())), "{e}");
        }
        let e = load(&model, &dir.join("missing.jsonl"), 512, Overflow::default()).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }
}
