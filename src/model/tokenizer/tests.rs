use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::*;
use crate::model::chat::ChatMessage;

// ---------------------------------------------------------------------------------------------
// Fixtures: the SmolLM2 GGUF and the transformers ground truth.

use crate::testdata::{TempDir, fixtures_dir, model_path as smollm2_gguf_path};

fn smollm2_metadata() -> &'static BTreeMap<String, MetaValue> {
    static META: OnceLock<BTreeMap<String, MetaValue>> = OnceLock::new();
    META.get_or_init(|| {
        let path = smollm2_gguf_path();
        crate::model::GgufFile::open(&path)
            .map(|g| g.metadata)
            .unwrap_or_else(|e| panic!("reading GGUF metadata of {}: {e}", path.display()))
    })
}

fn smollm2() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ModelTokenizer::from_gguf_metadata(smollm2_metadata()).expect("building SmolLM2 tokenizer"))
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

fn load_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn tokenizer_cases() -> Vec<TokenizerCase> {
    let cases: Vec<TokenizerCase> = load_json("tokenizer_cases.json");
    assert_eq!(cases.len(), 22, "tokenizer_cases.json should hold 22 cases");
    cases
}

fn chat_cases() -> Vec<ChatCase> {
    let cases: Vec<ChatCase> = load_json("chat_template_cases.json");
    assert_eq!(cases.len(), 4, "chat_template_cases.json should hold 4 cases");
    cases
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 (byte-level BPE, `smollm` pre-tokenizer) against transformers.

#[test]
fn smollm2_special_token_facts() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(!tok.add_bos(), "SmolLM2's GGUF says add_bos_token = false");
    assert_eq!(tok.end_ids()[0], 2, "EOS comes first among the end ids");
    assert!(tok.is_end_id(2) && tok.is_end_id(0), "<|im_end|> and <|endoftext|> end generation: {:?}", tok.end_ids());
    assert!(!tok.is_end_id(1));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(6004).as_deref(), Some("hi"));
    assert!(tok.chat_template_source().is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn smollm2_encodes_and_decodes_every_fixture_case_exactly() {
    let tok = smollm2();
    let mut failures = Vec::new();
    for case in tokenizer_cases() {
        let ids = tok.encode(&case.text).unwrap();
        if ids != case.ids {
            failures.push(format!("encode({:?}):\n  got      {ids:?}\n  expected {:?}", case.text, case.ids));
        }
        let decoded = tok.decode(&case.ids).unwrap();
        if decoded != case.decoded {
            failures.push(format!("decode of {:?}: got {decoded:?}, expected {:?}", case.text, case.decoded));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn smollm2_splits_digits_individually_after_whitespace_runs() {
    // The `smollm` pre-tokenizer: "  12" → ['ĠĠ', '1', '2'], not ['Ġ', 'Ġ', '1', '2'] (plain GPT-2).
    assert_eq!(smollm2().encode("  12").unwrap(), vec![256, 33, 34]);
}

#[test]
fn smollm2_special_tokens_in_text_are_single_ids() {
    let tok = smollm2();
    let ids = tok.encode("a<|im_end|>b<|endoftext|>").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 2 || id == 0).count(), 2, "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), "a<|im_end|>b<|endoftext|>");
}

#[test]
fn smollm2_bos_is_added_only_on_request_and_never_twice() {
    let tok = smollm2();
    assert_eq!(tok.encode_with_bos("hi", true).unwrap(), vec![1, 6004]);
    assert_eq!(tok.encode_with_bos("<|im_start|>hi", true).unwrap(), vec![1, 6004]);
    assert_eq!(tok.encode_with_bos("hi", false).unwrap(), vec![6004]);
}

#[test]
fn smollm2_chat_template_cases_render_and_encode_exactly() {
    let tok = smollm2();
    let template = tok.chat_template().unwrap();
    for case in chat_cases() {
        let rendered = template.render(&case.messages, case.add_generation_prompt).unwrap();
        assert_eq!(rendered, case.rendered, "rendering {:?}", case.messages);
        assert_eq!(tok.encode(&rendered).unwrap(), case.ids, "encoding {rendered:?}");
    }
}

#[test]
fn named_special_tokens_are_control_tokens_whatever_their_type() {
    // issue 15: without `tokenizer.ggml.token_type` (an optional key), or with <|im_start|> and
    // <|im_end|> typed normal, this gave 17 ids; transformers gives these for all three files,
    // because the BOS/EOS ids still name those tokens.
    let text = "<|im_start|>user\nHi<|im_end|>";
    let want = [1, 4093, 198, 26843, 2];
    assert_eq!(smollm2().encode(text).unwrap(), want);
    let mut untyped = smollm2_metadata().clone();
    untyped.remove("tokenizer.ggml.token_type");
    let mut typed_normal = smollm2_metadata().clone();
    let Some(MetaValue::Array(types)) = typed_normal.get_mut("tokenizer.ggml.token_type") else { panic!("SmolLM2 has token types") };
    let normal = types[6004].clone(); // "hi"
    types[1] = normal.clone();
    types[2] = normal;
    for (variant, meta) in [("no token_type", untyped), ("typed normal", typed_normal)] {
        let tok = ModelTokenizer::from_gguf_metadata(&meta).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{variant}");
        assert!(tok.is_end_id(2) && tok.is_end_id(0), "{variant}: {:?}", tok.end_ids());
        assert_eq!(tok.decode(&want).unwrap(), text, "{variant}");
        let template = tok.chat_template().unwrap();
        for case in chat_cases() {
            let rendered = template.render(&case.messages, case.add_generation_prompt).unwrap();
            assert_eq!(tok.encode(&rendered).unwrap(), case.ids, "{variant}: a chat prompt keeps its length");
        }
    }
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    match smollm2().decode(&[1, 49152]) {
        Err(TokenizerError::UnknownTokenId { id: 49152, vocab_size: 49152 }) => {}
        other => panic!("expected UnknownTokenId, got {other:?}"),
    }
    assert!(matches!(smollm2().stream_decoder().push(u32::MAX), Err(TokenizerError::UnknownTokenId { .. })));
}

// ---------------------------------------------------------------------------------------------
// Streaming detokenisation.

/// Pushes every id; checks the chunks concatenate to `decode(ids)`, that none holds U+FFFD, and
/// returns how many pushes were held back (returned `None`).
fn check_streaming(tok: &ModelTokenizer, ids: &[u32]) -> usize {
    let expected = tok.decode(ids).unwrap();
    let mut stream = tok.stream_decoder();
    let mut streamed = String::new();
    let mut held_back = 0;
    for &id in ids {
        match stream.push(id).unwrap() {
            Some(chunk) => {
                assert!(!chunk.contains(char::REPLACEMENT_CHARACTER), "chunk {chunk:?} holds a broken character");
                streamed.push_str(&chunk);
            }
            None => held_back += 1,
        }
    }
    streamed.push_str(&stream.finish().unwrap());
    assert_eq!(streamed, expected);
    held_back
}

#[test]
fn stream_decoder_never_emits_broken_utf8_for_byte_level_tokens() {
    let tok = smollm2();
    let text = "Emoji 👋🏽🚀 and 世界你好, ünïcödé — 𝔘𝔫𝔦 ok<|im_end|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let held_back = check_streaming(tok, &ids);
    assert!(held_back > 0, "the text should contain characters split across byte-level tokens");
}

#[test]
fn stream_decoder_finish_flushes_an_incomplete_tail_lossily() {
    let tok = smollm2();
    let ids = tok.encode("🚀").unwrap();
    assert!(ids.len() > 1, "🚀 should span several byte-level tokens: {ids:?}");
    let mut stream = tok.stream_decoder();
    assert_eq!(stream.push(ids[0]).unwrap(), None);
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
    // After finish the decoder starts afresh.
    let mut text = String::new();
    for &id in &ids {
        text.extend(stream.push(id).unwrap());
    }
    assert_eq!(text, "🚀");
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folder round trip.

#[test]
fn hf_dir_round_trip_encodes_like_the_gguf_tokenizer() {
    let gguf = smollm2();
    let dir = TempDir::new("hf-tokenizer");
    gguf.inner().save(dir.path.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "lstrip": false},
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": gguf.chat_template_source().unwrap()},
        ],
    });
    std::fs::write(dir.path.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.path.join("generation_config.json"), r#"{"eos_token_id": [2, 7]}"#).unwrap();

    let hf = ModelTokenizer::from_hf_dir(&dir.path).unwrap();
    assert_eq!(hf.vocab_size(), 49152);
    assert_eq!((hf.bos_id(), hf.eos_id()), (Some(1), Some(2)));
    assert!(!hf.add_bos());
    assert!(hf.is_end_id(2) && hf.is_end_id(7) && hf.is_end_id(0), "{:?}", hf.end_ids());
    for case in tokenizer_cases() {
        assert_eq!(hf.encode(&case.text).unwrap(), case.ids, "encoding {:?}", case.text);
        assert_eq!(hf.decode(&case.ids).unwrap(), case.decoded);
    }
    let template = hf.chat_template().unwrap();
    for case in chat_cases() {
        assert_eq!(template.render(&case.messages, true).unwrap(), case.rendered);
    }
}

#[test]
fn hf_dir_reads_the_chat_template_files() {
    // issue 15: recent transformers saves the template as chat_template.jinja and not in
    // tokenizer_config.json; `inspect` said "chat template no" and `run --chat` failed.
    let gguf = smollm2();
    let source = gguf.chat_template_source().unwrap();
    let dir = TempDir::new("hf-template-files");
    gguf.inner().save(dir.path.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false});
    std::fs::write(dir.path.join("tokenizer_config.json"), config.to_string()).unwrap();
    assert!(ModelTokenizer::from_hf_dir(&dir.path).unwrap().chat_template_source().is_none());

    std::fs::write(dir.path.join("chat_template.json"), serde_json::json!({"chat_template": source}).to_string()).unwrap();
    assert_eq!(ModelTokenizer::from_hf_dir(&dir.path).unwrap().chat_template_source(), Some(source));

    // chat_template.jinja comes first, even over a template in tokenizer_config.json.
    let with_config_template = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "unused"});
    std::fs::write(dir.path.join("tokenizer_config.json"), with_config_template.to_string()).unwrap();
    std::fs::write(dir.path.join("chat_template.json"), r#"{"chat_template": "unused"}"#).unwrap();
    std::fs::write(dir.path.join("chat_template.jinja"), source).unwrap();
    let hf = ModelTokenizer::from_hf_dir(&dir.path).unwrap();
    let template = hf.chat_template().unwrap();
    for case in chat_cases() {
        assert_eq!(template.render(&case.messages, case.add_generation_prompt).unwrap(), case.rendered);
    }

    std::fs::remove_file(dir.path.join("chat_template.jinja")).unwrap();
    std::fs::write(dir.path.join("chat_template.json"), r#"{"template": 3}"#).unwrap();
    let err = ModelTokenizer::from_hf_dir(&dir.path).unwrap_err();
    assert!(matches!(err, TokenizerError::FileFormat { ref path, .. } if path.ends_with("chat_template.json")), "{err}");
}

#[test]
fn hf_dir_without_tokenizer_json_is_an_error() {
    let dir = TempDir::new("hf-empty");
    assert!(matches!(ModelTokenizer::from_hf_dir(&dir.path), Err(TokenizerError::Io { .. })));
    std::fs::write(dir.path.join("tokenizer.json"), "{not json").unwrap();
    assert!(matches!(ModelTokenizer::from_hf_dir(&dir.path), Err(TokenizerError::FileFormat { .. })));
}

// ---------------------------------------------------------------------------------------------
// Synthetic vocabularies.

fn strings(items: &[&str]) -> MetaValue {
    MetaValue::Array(items.iter().map(|s| MetaValue::String(s.to_string())).collect())
}

/// GPT-2's byte → printable character table.
fn byte_level_chars() -> Vec<char> {
    let mut next_free = 256u32;
    (0u32..256)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                next_free += 1;
                char::from_u32(next_free - 1).unwrap()
            }
        })
        .collect()
}

/// A byte-level vocabulary: the 256 byte characters, "Ġa", "ĠĠ", and a control token.
fn tiny_byte_level_metadata(pre: &str) -> BTreeMap<String, MetaValue> {
    let mut tokens: Vec<String> = byte_level_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(["Ġa".to_string(), "ĠĠ".to_string(), "<|end|>".to_string()]);
    let mut types = vec![MetaValue::I32(1); 258];
    types.push(MetaValue::I32(3));
    BTreeMap::from([
        ("tokenizer.ggml.model".to_string(), MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), MetaValue::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect())),
        ("tokenizer.ggml.token_type".to_string(), MetaValue::Array(types)),
        ("tokenizer.ggml.merges".to_string(), strings(&["Ġ a", "Ġ Ġ"])),
        ("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(258)),
    ])
}

#[test]
fn byte_level_pre_tokenizer_variants_build_and_round_trip() {
    let text = "a a  12 Straße 😀 ١٢";
    for pre in ["gpt2", "smollm", "llama-bpe", "llama3", "qwen2", "some-future-pre"] {
        let tok = ModelTokenizer::from_gguf_metadata(&tiny_byte_level_metadata(pre)).unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "pre = {pre}");
        assert!(ids.contains(&256), "' a' should merge to id 256 with pre = {pre}: {ids:?}");
        let x_then_end = tok.encode("x<|end|>").unwrap();
        assert_eq!(x_then_end, vec![tok.token_to_id("x").unwrap(), 258], "pre = {pre}");
        assert_eq!(tok.end_ids(), &[258]);
    }
}

/// A SentencePiece-style vocabulary with byte-fallback tokens.
fn tiny_sentencepiece_metadata() -> BTreeMap<String, MetaValue> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "i", "he", "ll", "llo", "hello", "▁hello", "or", "ld", "▁w", "▁wor", "▁world", "▁h", "▁hi",
    ];
    for piece in pieces {
        tokens.push(piece.to_string());
        types.push(1);
    }
    // Longer pieces score higher so that they are merged in sensible order.
    let scores: Vec<MetaValue> =
        tokens.iter().map(|t| MetaValue::F32(if t.starts_with("<") { 0.0 } else { t.chars().count() as f32 })).collect();
    BTreeMap::from([
        ("tokenizer.ggml.model".to_string(), MetaValue::String("llama".into())),
        ("tokenizer.ggml.tokens".to_string(), MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect())),
        ("tokenizer.ggml.token_type".to_string(), MetaValue::Array(types.into_iter().map(MetaValue::I32).collect())),
        ("tokenizer.ggml.scores".to_string(), MetaValue::Array(scores)),
        ("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_string(), MetaValue::U32(0)),
    ])
}

#[test]
fn sentencepiece_vocabulary_encodes_with_space_marker_and_bos() {
    let tok = ModelTokenizer::from_gguf_metadata(&tiny_sentencepiece_metadata()).unwrap();
    assert!(tok.add_bos(), "SentencePiece vocabularies add BOS by default");
    let hello = tok.token_to_id("▁hello").unwrap();
    let world = tok.token_to_id("▁world").unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![1, hello, world]);
    assert_eq!(tok.encode_with_bos("hello world", false).unwrap(), vec![hello, world]);
    assert_eq!(tok.decode(&[hello, world]).unwrap(), "hello world");
    assert_eq!(tok.end_ids(), &[2]);
}

#[test]
fn sentencepiece_byte_fallback_round_trips_and_streams() {
    let tok = ModelTokenizer::from_gguf_metadata(&tiny_sentencepiece_metadata()).unwrap();
    let text = "hi 😀 wörld";
    let ids = tok.encode_with_bos(text, false).unwrap();
    let first_emoji_byte = tok.token_to_id("<0xF0>").unwrap();
    assert!(ids.contains(&first_emoji_byte), "😀 should fall back to bytes: {ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let held_back = check_streaming(&tok, &ids);
    assert!(held_back >= 3, "the 4 byte tokens of 😀 should be held back until complete");
}

// ---------------------------------------------------------------------------------------------
// Bad metadata is an error, never a panic.

#[test]
fn missing_tokens_key_is_reported_by_name() {
    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.remove("tokenizer.ggml.tokens");
    match ModelTokenizer::from_gguf_metadata(&meta) {
        Err(TokenizerError::MissingMetadata { key }) => assert_eq!(key, "tokenizer.ggml.tokens"),
        other => panic!("expected MissingMetadata, got {other:?}"),
    }
}

#[test]
fn merges_that_are_not_strings_are_rejected() {
    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.insert("tokenizer.ggml.merges".into(), MetaValue::Array(vec![MetaValue::U32(5)]));
    match ModelTokenizer::from_gguf_metadata(&meta) {
        Err(TokenizerError::MetadataType { key, .. }) => assert_eq!(key, "tokenizer.ggml.merges"),
        other => panic!("expected MetadataType, got {other:?}"),
    }
    meta.insert("tokenizer.ggml.merges".into(), strings(&["Ġa"]));
    assert!(matches!(
        ModelTokenizer::from_gguf_metadata(&meta),
        Err(TokenizerError::InvalidMetadata { key, .. }) if key == "tokenizer.ggml.merges"
    ));
}

#[test]
fn unknown_model_type_is_rejected() {
    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.insert("tokenizer.ggml.model".into(), MetaValue::String("bert".into()));
    match ModelTokenizer::from_gguf_metadata(&meta) {
        Err(TokenizerError::UnsupportedModel { model }) => assert_eq!(model, "bert"),
        other => panic!("expected UnsupportedModel, got {other:?}"),
    }
}

#[test]
fn inconsistent_metadata_is_rejected() {
    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(vec![MetaValue::I32(1)]));
    assert!(matches!(
        ModelTokenizer::from_gguf_metadata(&meta),
        Err(TokenizerError::InvalidMetadata { key, .. }) if key == "tokenizer.ggml.token_type"
    ));

    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(100_000));
    assert!(matches!(
        ModelTokenizer::from_gguf_metadata(&meta),
        Err(TokenizerError::InvalidMetadata { key, .. }) if key == "tokenizer.ggml.bos_token_id"
    ));

    let mut meta = tiny_byte_level_metadata("gpt2");
    meta.insert("tokenizer.ggml.tokens".into(), MetaValue::String("not an array".into()));
    assert!(matches!(
        ModelTokenizer::from_gguf_metadata(&meta),
        Err(TokenizerError::MetadataType { key, .. }) if key == "tokenizer.ggml.tokens"
    ));

    let mut meta = tiny_sentencepiece_metadata();
    meta.remove("tokenizer.ggml.scores");
    assert!(matches!(
        ModelTokenizer::from_gguf_metadata(&meta),
        Err(TokenizerError::MissingMetadata { key }) if key == "tokenizer.ggml.scores"
    ));
}

#[test]
fn model_without_chat_template_reports_it() {
    let tok = ModelTokenizer::from_gguf_metadata(&tiny_byte_level_metadata("gpt2")).unwrap();
    assert!(matches!(tok.chat_template(), Err(TokenizerError::NoChatTemplate)));
    assert!(matches!(tok.encode_with_bos("a", true), Err(TokenizerError::NoBosToken)));
}
