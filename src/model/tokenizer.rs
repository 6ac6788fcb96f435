//! Tokenizer: text ⇄ token ids, built from GGUF metadata or a Hugging Face model folder.
//!
//! Two vocabulary kinds are supported from GGUF (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE (vocabulary + merges), pre-tokenizer chosen by `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece-style BPE with byte fallback, merges derived from the token scores.
//!
//! Control (type 3), unknown (type 2) and user-defined (type 4) tokens are matched literally
//! anywhere in the input text and encode to their single id, as Hugging Face does.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::model::chat::ChatTemplate;
use crate::model::gguf::MetaValue;

/// Everything that can go wrong while building or using a tokenizer or chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required `tokenizer.ggml.*` key is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingMetadata {
        /// The metadata key.
        key: String,
    },
    /// A tokenizer metadata key holds a value of the wrong type.
    #[error("GGUF metadata key `{key}` has the wrong type: expected {expected}")]
    MetadataType {
        /// The metadata key.
        key: String,
        /// The type expected.
        expected: &'static str,
    },
    /// A tokenizer metadata value is unusable (empty vocabulary, bad merge, id out of range, ...).
    #[error("GGUF metadata key `{key}` is invalid: {problem}")]
    InvalidMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A `tokenizer.ggml.model` other than gpt2 or llama.
    #[error("unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: gpt2, llama)")]
    UnsupportedModel {
        /// The model named by the file.
        model: String,
    },
    /// The `tokenizers` crate refused a piece built from the metadata.
    #[error("building the {what} failed: {message}")]
    Build {
        /// The piece being built.
        what: &'static str,
        /// The underlying message.
        message: String,
    },
    /// A tokenizer file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tokenizer file (tokenizer.json, tokenizer_config.json, ...) does not parse.
    #[error("cannot parse `{path}`: {message}")]
    FileFormat {
        /// The file.
        path: PathBuf,
        /// The underlying message.
        message: String,
    },
    /// Encoding text failed.
    #[error("encoding text failed: {message}")]
    Encode {
        /// The underlying message.
        message: String,
    },
    /// Decoding ids failed.
    #[error("decoding token ids failed: {message}")]
    Decode {
        /// The underlying message.
        message: String,
    },
    /// An id outside the vocabulary.
    #[error("token id {id} is not in the vocabulary (size {vocab_size})")]
    UnknownTokenId {
        /// The id given.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A BOS token was requested from a tokenizer without one.
    #[error("a BOS token was requested but the tokenizer defines none")]
    NoBosToken,
    /// The model has no chat template.
    #[error(
        "the model has no chat template (GGUF `tokenizer.chat_template`; chat_template.jinja, chat_template.json or tokenizer_config.json `chat_template`)"
    )]
    NoChatTemplate,
    /// The chat template does not compile (minijinja syntax error).
    #[error("the chat template does not compile: {message}")]
    TemplateSyntax {
        /// The underlying message.
        message: String,
    },
    /// The chat template called `raise_exception` (e.g. roles that do not alternate).
    #[error("the chat template raised an exception: {message}")]
    TemplateException {
        /// The underlying message.
        message: String,
    },
    /// Rendering the chat template failed otherwise.
    #[error("rendering the chat template failed: {message}")]
    TemplateRender {
        /// The underlying message.
        message: String,
    },
    /// Rendering went over one of the template's limits (instructions, output bytes, items in
    /// one sequence, format width, units of work, levels of nesting: see `model::chat`).
    #[error("rendering the chat template went over its limit of {limit} {what}")]
    TemplateLimit {
        /// What was counted, e.g. "bytes of output".
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;

    /// llama.cpp's name of a type, for messages.
    pub fn name(kind: i64) -> String {
        match kind {
            NORMAL => "normal".into(),
            UNKNOWN => "unknown".into(),
            CONTROL => "control".into(),
            USER_DEFINED => "user-defined".into(),
            5 => "unused".into(),
            6 => "byte".into(),
            other => format!("type {other}"),
        }
    }
}

/// Special token strings that end a generation whenever the vocabulary has them as special tokens.
const END_OF_GENERATION_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "<end_of_turn>"];

/// GPT-2's pre-tokenizer regex (what the ByteLevel pre-tokenizer applies with `use_regex`).
pub const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (`llama-bpe` in llama.cpp).
pub const LLAMA3_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex: like Llama 3's but every \p{N} character on its own.
pub const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's word-boundary marker, standing for a space.
const SPIECE_SPACE: &str = "\u{2581}";

/// A model's tokenizer with the special-token facts generation needs.
#[derive(Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    end_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &(self.bos_id, &self.bos_token))
            .field("eos", &(self.eos_id, &self.eos_token))
            .field("end_ids", &self.end_ids)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata access helpers.

fn required<'m>(meta: &'m BTreeMap<String, MetaValue>, key: &str) -> Result<&'m MetaValue, TokenizerError> {
    meta.get(key).ok_or_else(|| TokenizerError::MissingMetadata { key: key.to_string() })
}

fn wrong_type(key: &str, expected: &'static str) -> TokenizerError {
    TokenizerError::MetadataType { key: key.to_string(), expected }
}

fn string_array(meta: &BTreeMap<String, MetaValue>, key: &str) -> Result<Vec<String>, TokenizerError> {
    let items = required(meta, key)?.as_array().ok_or_else(|| wrong_type(key, "an array of strings"))?;
    items.iter().map(|item| item.as_str().map(str::to_string).ok_or_else(|| wrong_type(key, "an array of strings"))).collect()
}

/// An optional per-token array; when present it must have one entry per token.
fn optional_per_token_array<'m>(
    meta: &'m BTreeMap<String, MetaValue>,
    key: &str,
    token_count: usize,
) -> Result<Option<&'m [MetaValue]>, TokenizerError> {
    let Some(value) = meta.get(key) else {
        return Ok(None);
    };
    let items = value.as_array().ok_or_else(|| wrong_type(key, "an array"))?;
    if items.len() != token_count {
        return Err(TokenizerError::InvalidMetadata {
            key: key.to_string(),
            problem: format!("has {} entries but there are {token_count} tokens", items.len()),
        });
    }
    Ok(Some(items))
}

fn optional_token_id(meta: &BTreeMap<String, MetaValue>, key: &str, token_count: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = meta.get(key) else {
        return Ok(None);
    };
    let id = value.as_u64().ok_or_else(|| wrong_type(key, "a non-negative integer"))?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < token_count => Ok(Some(id)),
        _ => Err(TokenizerError::InvalidMetadata {
            key: key.to_string(),
            problem: format!("token id {id} is outside the vocabulary of {token_count} tokens"),
        }),
    }
}

fn optional_bool(meta: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<bool>, TokenizerError> {
    meta.get(key).map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a bool"))).transpose()
}

fn optional_string<'m>(meta: &'m BTreeMap<String, MetaValue>, key: &str) -> Result<Option<&'m str>, TokenizerError> {
    meta.get(key).map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string"))).transpose()
}

fn build_error(what: &'static str) -> impl Fn(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Build { what, message: e.to_string() }
}

/// token → id, keeping the first id of a duplicated token string (the later ones stay unreachable
/// for encoding, as in llama.cpp).
fn vocab_from_tokens(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if vocab.contains_key(token) {
            log::warn!("tokenizer: duplicate token {token:?} at id {id}; encoding uses its first id");
        } else {
            vocab.insert(token.clone(), id as u32);
        }
    }
    vocab
}

/// GGUF `tokenizer.ggml.merges` entries are `"left right"`.
fn parse_merges(meta: &BTreeMap<String, MetaValue>) -> Result<Merges, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.merges";
    string_array(meta, KEY)?
        .into_iter()
        .enumerate()
        .map(|(index, merge)| match merge.split_once(' ') {
            Some((left, right)) if !left.is_empty() && !right.is_empty() => Ok((left.to_string(), right.to_string())),
            _ => Err(TokenizerError::InvalidMetadata {
                key: KEY.to_string(),
                problem: format!("entry {index} ({merge:?}) is not two tokens separated by a space"),
            }),
        })
        .collect()
}

/// BPE merges for a SentencePiece vocabulary: every normal token that splits into two vocabulary
/// pieces yields a merge of those pieces; merges producing higher-scored tokens come first.
fn merges_from_scores(tokens: &[String], vocab: &Vocab, scores: &[f32], types: &[i64]) -> Merges {
    struct Candidate {
        score: f32,
        merged_id: u32,
        left_id: u32,
        right_id: u32,
    }
    let mut candidates = Vec::new();
    for (merged_id, merged) in tokens.iter().enumerate() {
        if types[merged_id] != token_type::NORMAL {
            continue;
        }
        if vocab.get(merged) != Some(&(merged_id as u32)) {
            continue; // a later duplicate of an earlier token
        }
        for (split_at, _) in merged.char_indices().skip(1) {
            let (left, right) = merged.split_at(split_at);
            if let (Some(&left_id), Some(&right_id)) = (vocab.get(left), vocab.get(right)) {
                candidates.push(Candidate { score: scores[merged_id], merged_id: merged_id as u32, left_id, right_id });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(a.merged_id.cmp(&b.merged_id)).then(a.left_id.cmp(&b.left_id)).then(a.right_id.cmp(&b.right_id))
    });
    candidates.into_iter().map(|c| (tokens[c.left_id as usize].clone(), tokens[c.right_id as usize].clone())).collect()
}

fn regex_split(pattern: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(build_error("pre-tokenizer regex"))?;
    Ok(split.into())
}

/// Pre-tokenizer (and optional normalizer) for a byte-level BPE vocabulary, by `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<(PreTokenizerWrapper, Option<NormalizerWrapper>), TokenizerError> {
    let gpt2 = || PreTokenizerWrapper::from(ByteLevel::new(false, true, true));
    let regex_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        Ok(PreTokenizerSequence::new(vec![regex_split(pattern)?, ByteLevel::new(false, false, false).into()]).into())
    };
    Ok(match pre {
        None | Some("default") | Some("gpt2") => (gpt2(), None),
        Some("smollm") => (PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2()]).into(), None),
        Some("llama-bpe") | Some("llama3") => (regex_then_bytes(LLAMA3_REGEX)?, None),
        Some("qwen2") => (regex_then_bytes(QWEN2_REGEX)?, Some(NFC.into())),
        Some(other) => {
            log::warn!("tokenizer: unknown pre-tokenizer `{other}` (tokenizer.ggml.pre); using GPT-2's regex");
            (gpt2(), None)
        }
    })
}

/// GGUF keys whose token ids name a special role (llama.cpp `llama_vocab` special ids).
const SPECIAL_ID_KEYS: &[&str] = &[
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
];

/// Chat-template markers that are control tokens wherever a vocabulary has them (ChatML, Llama 3,
/// Gemma); with [`END_OF_GENERATION_TOKENS`].
const CHAT_MARKER_TOKENS: &[&str] = &["<|im_start|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>"];

/// The token types encoding uses: the file's `tokenizer.ggml.token_type` (all normal when the
/// key is absent; it is optional), with every token that a `SPECIAL_ID_KEYS` id names and every
/// chat marker of the vocabulary (`CHAT_MARKER_TOKENS`, `END_OF_GENERATION_TOKENS`) made a
/// control token, as transformers does for a GGUF's named special tokens: `<|im_start|>` then
/// encodes to its one id whatever the file's type says. A warning names each token whose type
/// was overridden. Errors: a special id outside the vocabulary (`InvalidMetadata`), but for the
/// padding id, which is ignored with a warning (no generation depends on it).
fn control_token_types(
    meta: &BTreeMap<String, MetaValue>,
    tokens: &[String],
    vocab: &Vocab,
    file_types: Option<Vec<i64>>,
) -> Result<Vec<i64>, TokenizerError> {
    let mut named = Vec::new();
    for &key in SPECIAL_ID_KEYS {
        match optional_token_id(meta, key, tokens.len()) {
            Ok(id) => named.extend(id.map(|id| (id, key))),
            Err(e) if key == "tokenizer.ggml.padding_token_id" => log::warn!("tokenizer: ignoring {key}: {e}"),
            Err(e) => return Err(e),
        }
    }
    for &marker in CHAT_MARKER_TOKENS.iter().chain(END_OF_GENERATION_TOKENS) {
        named.extend(vocab.get(marker).map(|&id| (id, "a chat marker")));
    }
    let typed = file_types.is_some();
    let mut types = file_types.unwrap_or_else(|| vec![token_type::NORMAL; tokens.len()]);
    let mut untyped = Vec::new();
    for (id, role) in named {
        let kind = &mut types[id as usize];
        if *kind == token_type::CONTROL || *kind == token_type::UNKNOWN {
            continue;
        }
        if typed {
            log::warn!(
                "tokenizer: token {:?} (id {id}) is {role} but tokenizer.ggml.token_type says {}; treating it as a control token",
                tokens[id as usize],
                token_type::name(*kind)
            );
        } else {
            untyped.push(tokens[id as usize].as_str());
        }
        *kind = token_type::CONTROL;
    }
    if !untyped.is_empty() {
        log::info!("tokenizer: no tokenizer.ggml.token_type; control tokens: {}", untyped.join(" "));
    }
    Ok(types)
}

impl ModelTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf_metadata(meta: &BTreeMap<String, MetaValue>) -> Result<Self, TokenizerError> {
        const MODEL_KEY: &str = "tokenizer.ggml.model";
        let model = required(meta, MODEL_KEY)?.as_str().ok_or_else(|| wrong_type(MODEL_KEY, "a string"))?;
        let tokens = string_array(meta, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(TokenizerError::InvalidMetadata { key: "tokenizer.ggml.tokens".into(), problem: "the vocabulary is empty".into() });
        }
        let file_types: Option<Vec<i64>> = optional_per_token_array(meta, "tokenizer.ggml.token_type", tokens.len())?
            .map(|items| {
                items
                    .iter()
                    .map(|t| t.as_i64().ok_or_else(|| wrong_type("tokenizer.ggml.token_type", "an array of integers")))
                    .collect::<Result<_, _>>()
            })
            .transpose()?;
        let vocab = vocab_from_tokens(&tokens);
        let unk_id = optional_token_id(meta, "tokenizer.ggml.unknown_token_id", tokens.len())?;
        let types = control_token_types(meta, &tokens, &vocab, file_types)?;

        let is_sentencepiece = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(TokenizerError::UnsupportedModel { model: other.to_string() });
            }
        };

        let mut inner = if is_sentencepiece {
            const SCORES_KEY: &str = "tokenizer.ggml.scores";
            let scores: Vec<f32> = optional_per_token_array(meta, SCORES_KEY, tokens.len())?
                .ok_or_else(|| TokenizerError::MissingMetadata { key: SCORES_KEY.into() })?
                .iter()
                .map(|s| s.as_f64().map(|s| s as f32).ok_or_else(|| wrong_type(SCORES_KEY, "an array of floats")))
                .collect::<Result<_, _>>()?;
            let merges = merges_from_scores(&tokens, &vocab, &scores, &types);
            let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
            if let Some(unk) = unk_id {
                builder = builder.unk_token(tokens[unk as usize].clone());
            }
            let bpe = builder.build().map_err(build_error("SentencePiece BPE model"))?;
            let add_space_prefix = optional_bool(meta, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let space_to_marker = Replace::new(" ", SPIECE_SPACE).map_err(build_error("normalizer"))?;
            let normalizer: NormalizerWrapper = if add_space_prefix {
                NormalizerSequence::new(vec![Prepend::new(SPIECE_SPACE.into()).into(), space_to_marker.into()]).into()
            } else {
                space_to_marker.into()
            };
            let mut decoders: Vec<DecoderWrapper> = vec![
                Replace::new(SPIECE_SPACE, " ").map_err(build_error("decoder"))?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space_prefix {
                decoders.push(DecoderStrip::new(' ', 1, 0).into());
            }
            let mut tokenizer = Tokenizer::new(bpe);
            tokenizer.with_normalizer(Some(normalizer)).map_err(build_error("normalizer"))?;
            tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
            tokenizer
        } else {
            let merges = parse_merges(meta)?;
            let longest = tokens.iter().map(String::len).max().unwrap_or(0);
            check_merge_lengths(merges.iter().map(|(a, b)| (a.as_str(), b.as_str())), longest, 0)
                .map_err(|problem| TokenizerError::InvalidMetadata { key: "tokenizer.ggml.merges".into(), problem })?;
            let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(build_error("byte-level BPE model"))?;
            let (pre_tokenizer, normalizer) = byte_level_pre_tokenizer(optional_string(meta, "tokenizer.ggml.pre")?)?;
            let mut tokenizer = Tokenizer::new(bpe);
            if let Some(normalizer) = normalizer {
                tokenizer.with_normalizer(Some(normalizer)).map_err(build_error("normalizer"))?;
            }
            tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
            tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
            tokenizer
        };

        // Tokens matched literally in the text: special (control/unknown) and user-defined ones.
        let mut special_ids = HashSet::new();
        let mut literal_tokens = Vec::new();
        for (id, (token, &kind)) in tokens.iter().zip(&types).enumerate() {
            let special = kind == token_type::CONTROL || kind == token_type::UNKNOWN;
            if token.is_empty() || !(special || kind == token_type::USER_DEFINED) {
                continue;
            }
            if special {
                special_ids.insert(id as u32);
            }
            literal_tokens.push(AddedToken::from(token.clone(), special).normalized(false));
        }
        inner.add_tokens(literal_tokens).map_err(build_error("added-token vocabulary"))?;

        let bos_id = optional_token_id(meta, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let eos_id = optional_token_id(meta, "tokenizer.ggml.eos_token_id", tokens.len())?;
        let add_bos_requested = optional_bool(meta, "tokenizer.ggml.add_bos_token")?.unwrap_or(is_sentencepiece);
        if add_bos_requested && bos_id.is_none() {
            log::warn!("tokenizer: GGUF asks to add a BOS token but defines no tokenizer.ggml.bos_token_id");
        }

        let mut end_ids = Vec::new();
        end_ids.extend(eos_id);
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            end_ids.extend(optional_token_id(meta, key, tokens.len())?);
        }
        for name in END_OF_GENERATION_TOKENS {
            if let Some(id) = inner.token_to_id(name).filter(|id| special_ids.contains(id)) {
                end_ids.push(id);
            }
        }

        let mut result = Self {
            vocab_size: tokens.len(),
            bos_id,
            eos_id,
            end_ids: Vec::new(),
            add_bos: add_bos_requested && bos_id.is_some(),
            chat_template: optional_string(meta, "tokenizer.chat_template")?.map(str::to_string),
            bos_token: bos_id.map(|id| tokens[id as usize].clone()),
            eos_token: eos_id.map(|id| tokens[id as usize].clone()),
            inner,
        };
        result.add_end_ids(end_ids);
        Ok(result)
    }

    /// Loads a Hugging Face tokenizer folder: `tokenizer.json` (required), `tokenizer_config.json`
    /// (chat template, BOS/EOS tokens, `add_bos_token`), `chat_template.jinja` or
    /// `chat_template.json` (the chat template, before the config's) and `generation_config.json`
    /// (extra EOS ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TokenizerError::Io {
                path: tokenizer_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            });
        }
        let text =
            std::fs::read_to_string(&tokenizer_path).map_err(|source| TokenizerError::Io { path: tokenizer_path.clone(), source })?;
        let format_error = |e: serde_json::Error| TokenizerError::FileFormat { path: tokenizer_path.clone(), message: e.to_string() };
        // JSON syntax first: tokenizers 0.23 panics ("Helper") on a syntax error inside
        // `decoder` when it reads the text itself; from a parsed value only type errors remain.
        let json: serde_json::Value = serde_json::from_str(&text).map_err(format_error)?;
        check_bpe_merges(&json).map_err(|message| TokenizerError::FileFormat { path: tokenizer_path.clone(), message })?;
        let inner: Tokenizer = serde_json::from_value(json).map_err(format_error)?;
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);

        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let config_path = dir.join("tokenizer_config.json");

        let config_token = |field: &str| -> Option<String> {
            match config.as_ref()?.get(field)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let generation_ids = |field: &str| -> Vec<u32> {
            match generation.as_ref().and_then(|g| g.get(field)) {
                Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
                Some(serde_json::Value::Array(items)) => {
                    items.iter().filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
                }
                _ => Vec::new(),
            }
        };

        let bos_token = config_token("bos_token").or_else(|| generation_ids("bos_token_id").first().and_then(|&id| inner.id_to_token(id)));
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let generation_eos_ids = generation_ids("eos_token_id");
        let eos_token = config_token("eos_token").or_else(|| generation_eos_ids.first().and_then(|&id| inner.id_to_token(id)));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));

        let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(b)) => *b,
            // Not configured: follow what tokenizer.json's post-processor does.
            _ => match (bos_id, inner.encode("", true)) {
                (Some(bos), Ok(encoding)) => encoding.get_ids().first() == Some(&bos),
                _ => false,
            },
        } && bos_id.is_some();

        let chat_template = match template_file(dir)? {
            Some(template) => Some(template),
            None => config_chat_template(config.as_ref(), &config_path)?,
        };

        let added = inner.get_added_tokens_decoder();
        let mut end_ids: Vec<u32> = eos_id.into_iter().chain(generation_eos_ids).collect();
        for name in END_OF_GENERATION_TOKENS {
            if let Some(id) = inner.token_to_id(name).filter(|id| added.get(id).is_some_and(|t| t.special)) {
                end_ids.push(id);
            }
        }

        let mut result = Self { inner, vocab_size, bos_id, eos_id, end_ids: Vec::new(), add_bos, chat_template, bos_token, eos_token };
        result.add_end_ids(end_ids);
        Ok(result)
    }

    /// Adds ids that end generation (e.g. from a `generation_config.json`), skipping duplicates.
    pub fn add_end_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if !self.end_ids.contains(&id) {
                self.end_ids.push(id);
            }
        }
    }

    /// Encodes text; special-token strings in it become their single ids. A BOS id is
    /// prepended when the model asks for one ([`Self::add_bos`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with_bos(text, self.add_bos)
    }

    /// Encodes text, prepending the BOS id when `add_bos` is true and the text's own tokens do not
    /// already start with it (a chat template usually writes the BOS itself).
    pub fn encode_with_bos(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Encode { message: e.to_string() })?;
        let ids = encoding.get_ids();
        if !add_bos {
            return Ok(ids.to_vec());
        }
        let bos = self.bos_id.ok_or(TokenizerError::NoBosToken)?;
        if ids.first() == Some(&bos) {
            return Ok(ids.to_vec());
        }
        let mut with_bos = Vec::with_capacity(ids.len() + 1);
        with_bos.push(bos);
        with_bos.extend_from_slice(ids);
        Ok(with_bos)
    }

    /// Decodes ids to text, keeping special tokens and without any clean-up.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownTokenId { id, vocab_size: self.vocab_size });
        }
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Decode { message: e.to_string() })
    }

    /// A streaming detokeniser over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// Number of token ids (for GGUF: the number of entries of `tokenizer.ggml.tokens`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of token string `token` (as in the vocabulary, e.g. `Ġthe`), if present.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of `id`, if in range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence id, if the tokenizer defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence id, if the tokenizer defines one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The BOS token's string (e.g. `<|im_start|>`), for chat templates.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token's string (e.g. `<|im_end|>`), for chat templates.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Every id that ends generation (EOS, end-of-turn tokens, generation_config EOS ids).
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
    }

    /// Whether `id` is one of [`Self::end_ids`].
    pub fn is_end_id(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// Whether [`Self::encode`] prepends the BOS id.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The model's chat template, compiled, with this tokenizer's BOS/EOS token strings.
    pub fn chat_template(&self) -> Result<ChatTemplate, TokenizerError> {
        let source = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        ChatTemplate::new(source, self.bos_token.as_deref(), self.eos_token.as_deref())
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The merges of a BPE model in `tokenizer.json` that tokenizers 0.23 would index out of
/// bounds while building the model (see [`check_merge_lengths`]); also, its
/// `continuing_subword_prefix` must begin the second token of every merge, as the builder cuts
/// that many bytes off it unchecked.
fn check_bpe_merges(json: &serde_json::Value) -> Result<(), String> {
    let model = &json["model"];
    let prefix = model["continuing_subword_prefix"].as_str().unwrap_or_default();
    let longest = model["vocab"].as_object().map_or(0, |vocab| vocab.keys().map(String::len).max().unwrap_or(0));
    let mut pairs = Vec::new();
    for (index, merge) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let pair = match merge {
            serde_json::Value::Array(pair) => {
                pair.first().and_then(serde_json::Value::as_str).zip(pair.get(1).and_then(serde_json::Value::as_str))
            }
            serde_json::Value::String(text) => text.split_once(' '),
            _ => None,
        };
        let Some((first, second)) = pair else { continue };
        if !second.starts_with(prefix) {
            return Err(format!(
                "merge {index}'s second token does not start with model.continuing_subword_prefix ({} bytes)",
                prefix.len()
            ));
        }
        pairs.push((first, second));
    }
    check_merge_lengths(pairs, longest, prefix.len()).map_err(|problem| format!("model.merges: {problem}"))
}

/// tokenizers 0.23's BPE builder joins each merge in a buffer as long as the longest
/// vocabulary token, without checking: a longer merge panics. It cannot make a vocabulary
/// token anyway.
fn check_merge_lengths<'a>(
    merges: impl IntoIterator<Item = (&'a str, &'a str)>,
    longest_token: usize,
    prefix_len: usize,
) -> Result<(), String> {
    for (index, (first, second)) in merges.into_iter().enumerate() {
        if first.len() + second.len().saturating_sub(prefix_len) > longest_token {
            return Err(format!("entry {index} joins to a token longer than every vocabulary token ({longest_token} bytes)"));
        }
    }
    Ok(())
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io { path: path.to_path_buf(), source });
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::FileFormat { path: path.to_path_buf(), message: e.to_string() })
}

/// The chat template of a Hugging Face folder's own file, as transformers reads it: the text of
/// `chat_template.jinja` (what recent transformers versions save; it takes precedence over
/// `tokenizer_config.json`), else the `chat_template` string of `chat_template.json` (the
/// processor file of multimodal models). None when neither file exists.
fn template_file(dir: &Path) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TokenizerError::Io { path: jinja, source }),
    }
    let json_path = dir.join("chat_template.json");
    let Some(json) = read_optional_json(&json_path)? else {
        return Ok(None);
    };
    match json.get("chat_template") {
        Some(serde_json::Value::String(template)) => Ok(Some(template.clone())),
        _ => Err(TokenizerError::FileFormat { path: json_path, message: "no `chat_template` string".into() }),
    }
}

/// The `chat_template` of `tokenizer_config.json` (`config_path`): a string, or a list of
/// `{name, template}` of which the one named `default` (else the first) is taken.
fn config_chat_template(config: Option<&serde_json::Value>, config_path: &Path) -> Result<Option<String>, TokenizerError> {
    Ok(match config.and_then(|c| c.get("chat_template")) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => {
            let template_named = |wanted: Option<&str>| {
                named.iter().find_map(|entry| {
                    let name = entry.get("name")?.as_str()?;
                    let template = entry.get("template")?.as_str()?;
                    (wanted.is_none() || wanted == Some(name)).then(|| template.to_string())
                })
            };
            Some(template_named(Some("default")).or_else(|| template_named(None)).ok_or_else(|| TokenizerError::FileFormat {
                path: config_path.to_path_buf(),
                message: "`chat_template` is a list without a {name, template} entry".into(),
            })?)
        }
        Some(_) => {
            return Err(TokenizerError::FileFormat {
                path: config_path.to_path_buf(),
                message: "`chat_template` is neither a string nor a list of {name, template}".into(),
            });
        }
    })
}

/// Incremental detokenisation for streaming output.
///
/// Decodes a sliding window of ids and emits only the text that became final: a chunk is
/// released once the window's text no longer ends in U+FFFD (an incomplete UTF-8 sequence from a
/// byte-level token or a SentencePiece byte-fallback token). The window keeps the ids of the
/// previous chunk as context, so decoders that depend on neighbours (leading-space stripping)
/// produce the same text as one `decode` of all ids.
pub struct StreamDecoder<'t> {
    tokenizer: &'t ModelTokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded as context.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder with nothing pending.
    pub fn new(tokenizer: &'t ModelTokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one id; returns the text it completed, or `None` while bytes of a character are pending.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        if self.tokenizer.id_to_token(id).is_none() {
            return Err(TokenizerError::UnknownTokenId { id, vocab_size: self.tokenizer.vocab_size });
        }
        self.ids.push(id);
        let (emitted, window) = self.decode_window()?;
        if window.len() <= emitted.len() || window.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new_text = new_suffix(&emitted, &window).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new_text))
    }

    /// Flushes any pending text (an incomplete trailing character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let (emitted, window) = self.decode_window()?;
        let rest = new_suffix(&emitted, &window).to_string();
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(rest)
    }

    /// (text of the already emitted part of the window, text of the whole window)
    fn decode_window(&self) -> Result<(String, String), TokenizerError> {
        let emitted = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        Ok((emitted, window))
    }
}

/// The part of `window` after the already emitted text. Normally `window` extends `emitted`; if
/// a decoder rewrote the tail, everything after the longest common prefix is new.
fn new_suffix<'w>(emitted: &str, window: &'w str) -> &'w str {
    if let Some(rest) = window.strip_prefix(emitted) {
        return rest;
    }
    let common =
        emitted.char_indices().zip(window.chars()).find(|((_, a), b)| a != b).map_or(emitted.len().min(window.len()), |((i, _), _)| i);
    &window[common..]
}

#[cfg(test)]
mod tests;
