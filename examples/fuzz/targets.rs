//! The fuzz targets: which parser each one drives, its seed inputs, and how one input is run.
//!
//! An input is one byte that selects the target's entry point (its [`Part`], modulo the number
//! of parts) followed by the bytes of the file that entry point reads. Running an input must
//! return `Ok` or `Err`; a panic, an abort, an allocation over the cap or a hang is a crash
//! (see `main.rs`). This file is also compiled into `tests/fuzz_regressions.rs`, which replays
//! the seeds and every saved regression input under `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use firstrt::model::chat::{ChatMessage, ChatTemplate};
use firstrt::model::config::ModelConfig;
use firstrt::model::gguf_test_writer::GgufBuilder;
use firstrt::model::lora::{LoraAdapter, LoraConfig, Projection};
use firstrt::model::routers::{ModelIdentity, RouterFile};
use firstrt::model::tokenizer::ModelTokenizer;
use firstrt::model::{GgmlType, GgufFile, GgufWeights, HostTensor, MetaValue, WeightSource};
use safetensors::Dtype;

/// How the mutator treats a part's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Binary file: bit flips, byte edits, integer fields overwritten with boundary values.
    Binary,
    /// JSON text: the binary edits plus structural ones on the parsed value.
    Json,
    /// Jinja template text: the binary edits plus insertion of template fragments.
    Jinja,
}

/// One entry point of a target: a file kind and the parser that reads it.
pub struct Part {
    /// File name the part is written as (for messages and the README).
    pub file: &'static str,
    /// How the mutator edits it.
    pub format: Format,
}

/// A fuzz target: a name for `--target`, its entry points and its runner.
pub struct Target {
    /// `--target` name; also the prefix of its crash files and its regression folder.
    pub name: &'static str,
    /// Entry points; an input's first byte (modulo their number) selects one.
    pub parts: &'static [Part],
    /// Runs one input's payload through the selected part, in `dir` (a scratch folder).
    run: fn(dir: &Path, part: usize, payload: &[u8]) -> Result<(), String>,
    /// The seed inputs (selector byte + payload), all valid files.
    seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target, in `--target all` order.
pub const TARGETS: [Target; 6] = [
    Target { name: "gguf", parts: &[Part { file: "model.gguf", format: Format::Binary }], run: run_gguf, seeds: gguf_seeds },
    Target {
        name: "routers",
        parts: &[Part { file: "routers.safetensors", format: Format::Binary }],
        run: run_routers,
        seeds: router_seeds,
    },
    Target {
        name: "lora",
        parts: &[
            Part { file: "adapter_config.json", format: Format::Json },
            Part { file: "adapter_model.safetensors", format: Format::Binary },
        ],
        run: run_lora,
        seeds: lora_seeds,
    },
    Target { name: "hf-config", parts: &[Part { file: "config.json", format: Format::Json }], run: run_hf_config, seeds: hf_config_seeds },
    Target {
        name: "tokenizer",
        parts: &[
            Part { file: "tokenizer.json", format: Format::Json },
            Part { file: "tokenizer_config.json", format: Format::Json },
            Part { file: "generation_config.json", format: Format::Json },
            Part { file: "model.gguf (tokenizer metadata)", format: Format::Binary },
        ],
        run: run_tokenizer,
        seeds: tokenizer_seeds,
    },
    Target {
        name: "chat-template",
        parts: &[Part { file: "chat template", format: Format::Jinja }],
        run: run_chat_template,
        seeds: chat_template_seeds,
    },
];

impl Target {
    /// The target called `name`.
    pub fn by_name(name: &str) -> Option<&'static Target> {
        TARGETS.iter().find(|t| t.name == name)
    }

    /// Index of the part an input selects (its first byte modulo the number of parts).
    pub fn part_of(&self, input: &[u8]) -> usize {
        input.first().map_or(0, |&b| usize::from(b) % self.parts.len())
    }

    /// Runs one input (selector byte + payload); an empty input is an empty file for part 0.
    pub fn run(&self, dir: &Path, input: &[u8]) -> Result<(), String> {
        let payload = input.get(1..).unwrap_or_default();
        (self.run)(dir, self.part_of(input), payload)
    }

    /// The seed inputs: valid files of every part.
    pub fn seeds(&self) -> Vec<Vec<u8>> {
        (self.seeds)()
    }
}

/// `payload` prefixed with the selector of part `part`.
fn input(part: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![part];
    out.extend_from_slice(payload);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("harness: writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Deterministic bytes (xorshift), for tensor data in seeds.
fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

// ---------------------------------------------------------------------------------------------
// gguf: header, metadata and tensor infos, the configuration and the weight mapping.

/// `{arch}.*` keys of a tiny model: 1 layer, d_model 8, 2 heads of 4, 1 KV head, d_ff 12.
fn tiny_llama_keys(b: GgufBuilder, arch: &str) -> GgufBuilder {
    let key = |k: &str| format!("{arch}.{k}");
    b.kv("general.architecture", MetaValue::String(arch.into()))
        .kv("general.name", MetaValue::String("tiny".into()))
        .kv(&key("block_count"), MetaValue::U32(1))
        .kv(&key("embedding_length"), MetaValue::U32(8))
        .kv(&key("attention.head_count"), MetaValue::U32(2))
        .kv(&key("attention.head_count_kv"), MetaValue::U32(1))
        .kv(&key("feed_forward_length"), MetaValue::U32(12))
        .kv(&key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5))
        .kv(&key("rope.freq_base"), MetaValue::F32(10_000.0))
        .kv(&key("context_length"), MetaValue::U32(64))
        .kv(&key("vocab_size"), MetaValue::U32(5))
}

/// The tensors of that tiny model, f32 and f16.
fn tiny_llama_tensors(b: GgufBuilder) -> GgufBuilder {
    let f16 = |n: usize| (0..n).flat_map(|i| half::f16::from_f32(i as f32 * 0.01).to_le_bytes()).collect::<Vec<u8>>();
    let f32s = |n: usize| f32_bytes((0..n).map(|i| 1.0 + i as f32 * 0.001));
    b.tensor("token_embd.weight", &[8, 5], GgmlType::F16, f16(40))
        .tensor("output_norm.weight", &[8], GgmlType::F32, f32s(8))
        .tensor("blk.0.attn_norm.weight", &[8], GgmlType::F32, f32s(8))
        .tensor("blk.0.attn_q.weight", &[8, 8], GgmlType::F16, f16(64))
        .tensor("blk.0.attn_k.weight", &[8, 4], GgmlType::F32, f32s(32))
        .tensor("blk.0.attn_v.weight", &[8, 4], GgmlType::F16, f16(32))
        .tensor("blk.0.attn_output.weight", &[8, 8], GgmlType::F32, f32s(64))
        .tensor("blk.0.ffn_norm.weight", &[8], GgmlType::F32, f32s(8))
        .tensor("blk.0.ffn_gate.weight", &[8, 12], GgmlType::F16, f16(96))
        .tensor("blk.0.ffn_up.weight", &[8, 12], GgmlType::F16, f16(96))
        .tensor("blk.0.ffn_down.weight", &[12, 8], GgmlType::BF16, f16(96))
}

/// Every metadata value type, once.
fn every_value_type(b: GgufBuilder) -> GgufBuilder {
    b.kv("t.u8", MetaValue::U8(200))
        .kv("t.i8", MetaValue::I8(-5))
        .kv("t.u16", MetaValue::U16(60000))
        .kv("t.i16", MetaValue::I16(-300))
        .kv("t.i32", MetaValue::I32(-70000))
        .kv("t.u64", MetaValue::U64(1 << 40))
        .kv("t.i64", MetaValue::I64(-(1 << 40)))
        .kv("t.f64", MetaValue::F64(0.1))
        .kv("t.bool", MetaValue::Bool(true))
        .kv("t.strings", MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("é✓".into())]))
        .kv("t.nested", MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I32(1)]), MetaValue::Array(vec![MetaValue::I32(3)])]))
}

fn gguf_seeds() -> Vec<Vec<u8>> {
    let plain = tiny_llama_tensors(every_value_type(tiny_llama_keys(GgufBuilder::new(), "llama")));
    // Every quantised layout this crate reads, 256 elements each, plus llama3 rope scaling keys.
    let quant_types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    let mut quants = tiny_llama_tensors(tiny_llama_keys(GgufBuilder::new(), "llama"))
        .kv("llama.rope.scaling.type", MetaValue::String("llama3".into()))
        .kv("llama.rope.scaling.factor", MetaValue::F32(8.0))
        .kv("llama.rope.scaling.original_context_length", MetaValue::U32(8192));
    for (i, ty) in quant_types.into_iter().enumerate() {
        let layout = ty.block_layout().expect("known layout");
        let bytes = (256 / layout.elements * layout.bytes) as usize;
        quants = quants.tensor(&format!("q.{ty}"), &[256], ty, pseudo_random_bytes(bytes, i as u64 + 1));
    }
    quants.version = 2;
    quants.alignment = Some(64);
    // Qwen2 with q/k/v biases, an untied output and llama3 scaling from rope_freqs.weight.
    let qwen = tiny_llama_tensors(tiny_llama_keys(GgufBuilder::new(), "qwen2"))
        .f32_tensor("blk.0.attn_q.bias", &[8], &[0.5; 8])
        .f32_tensor("blk.0.attn_k.bias", &[4], &[0.5; 4])
        .f32_tensor("blk.0.attn_v.bias", &[4], &[0.5; 4])
        .tensor("output.weight", &[8, 5], GgmlType::F32, f32_bytes((0..40).map(|i| i as f32)))
        .f32_tensor("rope_freqs.weight", &[2], &[1.0, 4.0]);
    [plain, quants, qwen].iter().map(|b| input(0, &b.build())).collect()
}

/// The canonical (Hugging Face) names of the tiny model's tensors.
const CANONICAL_NAMES: [&str; 14] = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.k_proj.bias",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
];

fn run_gguf(dir: &Path, _part: usize, payload: &[u8]) -> Result<(), String> {
    let path = write(dir, "model.gguf", payload)?;
    let file = GgufFile::open(&path).map_err(|e| e.to_string())?;
    for t in &file.tensors {
        let _ = file.tensor_f32(&t.name);
    }
    let weights = GgufWeights::from_file(file).map_err(|e| e.to_string())?;
    let _ = (weights.config().parameter_count(), weights.describe_dtypes(), weights.total_param_bytes());
    for name in CANONICAL_NAMES {
        if weights.has(name) {
            let _ = weights.get(name);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// routers: the router file (safetensors + metadata) against a model identity.

/// The model the router seeds were made for: 3 layers, hidden size 8.
fn router_identity() -> ModelIdentity {
    ModelIdentity { arch: "llama".into(), n_layers: 3, d_model: 8, vocab_size: 100, weight_hash: "0123456789abcdef".into() }
}

fn router_seeds() -> Vec<Vec<u8>> {
    let dir = firstrt::testdata::TempDir::new("fuzz-router-seeds");
    let mut linear = RouterFile::init(&router_identity(), 0, 1.0, 1e-5, 0.5);
    linear.layers[1] = None;
    let mut mlp = RouterFile::init(&router_identity(), 2, 2.0, 1e-6, 0.7);
    mlp.skip_first_last = true;
    [linear, mlp]
        .iter()
        .map(|f| {
            let path = dir.join("r.safetensors");
            f.save(&path).expect("saving a router seed");
            input(0, &std::fs::read(&path).expect("reading a router seed"))
        })
        .collect()
}

fn run_routers(dir: &Path, _part: usize, payload: &[u8]) -> Result<(), String> {
    let path = write(dir, "routers.safetensors", payload)?;
    let file = RouterFile::load(&path, &router_identity()).map_err(|e| e.to_string())?;
    let h: Vec<f32> = (0..2 * file.hidden).map(|i| i as f32 * 0.1 - 0.5).collect();
    for layer in 0..file.n_layers() {
        file.probability_ref(layer, &h, 2).map_err(|e| e.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// lora: adapter_config.json, and adapter_model.safetensors checked against a base model.

const LORA_CONFIG: &str = include_str!("../../fuzz/seeds/lora/adapter_config.json");

/// The base model of the LoRA seeds: 2 layers, d_model 8, 2 heads of 4, 1 KV head, d_ff 12.
fn lora_base() -> ModelConfig {
    firstrt::testdata::tiny_llama_config()
}

/// The seed adapter's configuration (what part 1's tensors are checked against).
fn lora_config() -> LoraConfig {
    LoraConfig::parse(Path::new("adapter_config.json"), LORA_CONFIG).expect("the LoRA seed config parses")
}

fn lora_seeds() -> Vec<Vec<u8>> {
    let config = lora_config();
    let base = lora_base();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..base.n_layers {
        for &p in &config.targets {
            let (out, inp) = p.dims(&base);
            let prefix = format!("base_model.model.model.layers.{layer}.{}.{}", p.block(), p.module());
            let a = f32_bytes((0..config.rank * inp).map(|i| i as f32 * 0.01));
            let b = f32_bytes((0..out * config.rank).map(|i| 0.5 - i as f32 * 0.01));
            tensors.push((format!("{prefix}.lora_A.weight"), vec![config.rank, inp], a));
            tensors.push((format!("{prefix}.lora_B.weight"), vec![out, config.rank], b));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d).expect("seed tensor view")))
        .collect();
    let weights = safetensors::serialize(views, None).expect("serialising the LoRA seed");
    vec![input(0, LORA_CONFIG.as_bytes()), input(1, &weights)]
}

fn run_lora(dir: &Path, part: usize, payload: &[u8]) -> Result<(), String> {
    let base = lora_base();
    let config_path = dir.join("adapter_config.json");
    let (config, weights) = match part {
        0 => {
            let text = std::str::from_utf8(payload).map_err(|e| format!("adapter_config.json is not UTF-8: {e}"))?;
            static SEED_WEIGHTS: OnceLock<Vec<u8>> = OnceLock::new();
            let weights = SEED_WEIGHTS.get_or_init(|| lora_seeds().swap_remove(1).split_off(1));
            (LoraConfig::parse(&config_path, text).map_err(|e| e.to_string())?, weights.as_slice())
        }
        _ => (lora_config(), payload),
    };
    let adapter =
        LoraAdapter::from_safetensors(dir, &dir.join("adapter_model.safetensors"), weights, config, &base).map_err(|e| e.to_string())?;
    adapter.check_model(&base).map_err(|e| e.to_string())?;
    let _ = adapter.scaling();
    for layer in 0..base.n_layers {
        for p in Projection::ALL {
            let (out, inp) = p.dims(&base);
            let mut w = HostTensor { name: p.weight_name(layer), shape: vec![out, inp], data: vec![0.0; out * inp] };
            adapter.merge_into(layer, p, &mut w, 0.5).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hf-config: a Hugging Face config.json.

fn hf_config_seeds() -> Vec<Vec<u8>> {
    [
        include_str!("../../fuzz/seeds/hf-config/llama.json"),
        include_str!("../../fuzz/seeds/hf-config/llama3-rope.json"),
        include_str!("../../fuzz/seeds/hf-config/qwen2.json"),
    ]
    .iter()
    .map(|text| input(0, text.as_bytes()))
    .collect()
}

fn run_hf_config(dir: &Path, _part: usize, payload: &[u8]) -> Result<(), String> {
    let path = write(dir, "config.json", payload)?;
    let config = ModelConfig::from_hf_config(&path).map_err(|e| e.to_string())?;
    let _ = (config.q_dim(), config.kv_dim(), config.parameter_count());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tokenizer: tokenizer.json + tokenizer_config.json + generation_config.json, or GGUF metadata.

const TOKENIZER_CONFIG: &str = include_str!("../../fuzz/seeds/tokenizer/tokenizer_config.json");
const GENERATION_CONFIG: &str = include_str!("../../fuzz/seeds/tokenizer/generation_config.json");
const CHATML: &str = include_str!("../../fuzz/seeds/chat-template/smollm2.jinja");

fn strings(items: &[&str]) -> MetaValue {
    MetaValue::Array(items.iter().map(|s| MetaValue::String((*s).into())).collect())
}

/// Byte-level BPE (`gpt2`, SmolLM2's pre-tokenizer) with ChatML control tokens.
fn gpt2_tokenizer_gguf() -> Vec<u8> {
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "H",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "Ċ",
        "1",
        "2",
        "He",
        "ll",
        "Hell",
        "Hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
        "<tool>",
    ];
    let types: Vec<MetaValue> = tokens
        .iter()
        .map(|t| {
            MetaValue::I32(if t.starts_with("<|") {
                3
            } else if *t == "<tool>" {
                4
            } else {
                1
            })
        })
        .collect();
    GgufBuilder::new()
        .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strings(&tokens))
        .kv("tokenizer.ggml.token_type", MetaValue::Array(types))
        .kv("tokenizer.ggml.merges", strings(&["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .kv("tokenizer.chat_template", MetaValue::String(CHATML.into()))
        .build()
}

/// SentencePiece-style BPE (`llama`) with byte fallback, merges from the scores.
fn llama_tokenizer_gguf() -> Vec<u8> {
    let tokens =
        ["<unk>", "<s>", "</s>", "<0x0A>", "<0xE2>", "<0x98>", "<0x83>", "▁", "H", "e", "l", "o", "▁H", "ll", "▁He", "llo", "▁Hello"];
    let types: Vec<MetaValue> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            MetaValue::I32(if i == 0 {
                2
            } else if i < 3 {
                3
            } else if t.starts_with("<0x") {
                6
            } else {
                1
            })
        })
        .collect();
    let scores: Vec<MetaValue> = (0..tokens.len()).map(|i| MetaValue::F32(-(i as f32))).collect();
    GgufBuilder::new()
        .kv("tokenizer.ggml.model", MetaValue::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strings(&tokens))
        .kv("tokenizer.ggml.token_type", MetaValue::Array(types))
        .kv("tokenizer.ggml.scores", MetaValue::Array(scores))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
        .kv("tokenizer.ggml.add_space_prefix", MetaValue::Bool(true))
        .build()
}

/// `tokenizer.json` of the tokenizer built from a GGUF seed.
fn tokenizer_json(gguf: &[u8]) -> String {
    let dir = firstrt::testdata::TempDir::new("fuzz-tokenizer-seed");
    let path = dir.join("t.gguf");
    std::fs::write(&path, gguf).expect("writing a tokenizer seed");
    let file = GgufFile::open(&path).expect("the tokenizer seed GGUF opens");
    let tokenizer = ModelTokenizer::from_gguf_metadata(&file.metadata).expect("the tokenizer seed builds");
    tokenizer.inner().to_string(false).expect("serialising tokenizer.json")
}

fn tokenizer_seeds() -> Vec<Vec<u8>> {
    let (gpt2, llama) = (gpt2_tokenizer_gguf(), llama_tokenizer_gguf());
    vec![
        input(0, tokenizer_json(&gpt2).as_bytes()),
        input(0, tokenizer_json(&llama).as_bytes()),
        input(1, TOKENIZER_CONFIG.as_bytes()),
        input(2, GENERATION_CONFIG.as_bytes()),
        input(3, &gpt2),
        input(3, &llama),
    ]
}

/// Text with ChatML markers, a newline, digits and characters outside the seed vocabularies.
const TOKENIZER_TEXT: &str = "<|im_start|>user\nHello world 12 ☃ <tool><|im_end|>";

fn run_tokenizer(dir: &Path, part: usize, payload: &[u8]) -> Result<(), String> {
    let tokenizer = if part == 3 {
        let path = write(dir, "model.gguf", payload)?;
        let file = GgufFile::open(&path).map_err(|e| e.to_string())?;
        ModelTokenizer::from_gguf_metadata(&file.metadata).map_err(|e| e.to_string())?
    } else {
        static SEED_JSON: OnceLock<String> = OnceLock::new();
        let seed_json = SEED_JSON.get_or_init(|| tokenizer_json(&gpt2_tokenizer_gguf()));
        let files: [(&str, &[u8]); 3] = [
            ("tokenizer.json", if part == 0 { payload } else { seed_json.as_bytes() }),
            ("tokenizer_config.json", if part == 1 { payload } else { TOKENIZER_CONFIG.as_bytes() }),
            ("generation_config.json", if part == 2 { payload } else { GENERATION_CONFIG.as_bytes() }),
        ];
        for (name, bytes) in files {
            write(dir, name, bytes)?;
        }
        ModelTokenizer::from_hf_dir(dir).map_err(|e| e.to_string())?
    };
    let ids = tokenizer.encode(TOKENIZER_TEXT).map_err(|e| e.to_string())?;
    tokenizer.decode(&ids).map_err(|e| e.to_string())?;
    let mut stream = tokenizer.stream_decoder();
    for &id in &ids {
        stream.push(id).map_err(|e| e.to_string())?;
    }
    stream.finish().map_err(|e| e.to_string())?;
    let _ = (tokenizer.is_end_id(0), tokenizer.bos_token(), tokenizer.eos_token());
    if tokenizer.chat_template_source().is_some() {
        render(&tokenizer.chat_template().map_err(|e| e.to_string())?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// chat-template: compiling and rendering a template.

fn chat_template_seeds() -> Vec<Vec<u8>> {
    [
        CHATML,
        include_str!("../../fuzz/seeds/chat-template/llama3.jinja"),
        include_str!("../../fuzz/seeds/chat-template/mistral.jinja"),
        include_str!("../../fuzz/seeds/chat-template/python-methods.jinja"),
    ]
    .iter()
    .map(|text| input(0, text.as_bytes()))
    .collect()
}

/// Renders a short conversation with and without the generation prompt.
fn render(template: &ChatTemplate) -> Result<(), String> {
    let messages = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi there, 12 + 3?"),
        ChatMessage::assistant(" 15 "),
        ChatMessage::user("And <|im_end|> ☃?"),
    ];
    template.render(&messages, true).map_err(|e| e.to_string())?;
    template.render(&messages[1..2], false).map_err(|e| e.to_string())?;
    Ok(())
}

fn run_chat_template(_dir: &Path, _part: usize, payload: &[u8]) -> Result<(), String> {
    let source = std::str::from_utf8(payload).map_err(|e| format!("the template is not UTF-8: {e}"))?;
    render(&ChatTemplate::new(source, Some("<s>"), Some("</s>")).map_err(|e| e.to_string())?)
}
