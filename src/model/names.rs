//! The Hugging Face tensor-name scheme of LLaMA-family decoders (LLaMA, Mistral, Qwen2), in one
//! place: building and parsing the canonical names, their GGUF spelling (llama.cpp's
//! `convert_hf_to_gguf.py` tensor map) and the PEFT LoRA keys built on them.
//!
//! Canonical names (Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` state dict) and GGUF names:
//! ```text
//! model.embed_tokens.weight                         token_embd.weight    [vocab, d_model]
//! model.norm.weight                                 output_norm.weight   [d_model]
//! lm_head.weight                                    output.weight        [vocab, d_model]  (absent when tied)
//! model.layers.{i}.input_layernorm.weight           blk.{i}.attn_norm.weight    [d_model]
//! model.layers.{i}.self_attn.q_proj.weight          blk.{i}.attn_q.weight       [n_heads * head_dim, d_model]
//! model.layers.{i}.self_attn.{k,v}_proj.weight      blk.{i}.attn_{k,v}.weight   [n_kv_heads * head_dim, d_model]
//! model.layers.{i}.self_attn.o_proj.weight          blk.{i}.attn_output.weight  [d_model, n_heads * head_dim]
//! model.layers.{i}.self_attn.{q,k,v}_proj.bias      blk.{i}.attn_{q,k,v}.bias   [rows of the weight]  (qwen2)
//! model.layers.{i}.post_attention_layernorm.weight  blk.{i}.ffn_norm.weight     [d_model]
//! model.layers.{i}.mlp.{gate,up}_proj.weight        blk.{i}.ffn_{gate,up}.weight [d_ff, d_model]
//! model.layers.{i}.mlp.down_proj.weight             blk.{i}.ffn_down.weight     [d_model, d_ff]
//! ```
//! Shapes are row-major, outermost first: a linear weight is `[out, in]`. The layer index `{i}`
//! is a canonical decimal (no sign, no leading zero).
//!
//! A PEFT LoRA adapter (`adapter_model.safetensors`) names the two factors of projection `p` in
//! layer `i` `base_model.model.model.layers.{i}.{block}.{module}.lora_{A,B}.weight`, that is
//! `base_model.model.` + the projection's canonical name with `.weight` replaced by
//! `.lora_A.weight` or `.lora_B.weight` ([`LoraTensorName`]).

use super::config::ModelConfig;

/// Prefix of every per-layer canonical name.
const LAYER_PREFIX: &str = "model.layers.";
/// What PEFT puts before a base model's module path.
const PEFT_PREFIX: &str = "base_model.model.";

/// The linear projections of a LLaMA decoder layer (each a weight `[out, in]`, see
/// [`Projection::dims`]); also the modules a LoRA adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// Attention query, `self_attn.q_proj`: `[n_heads * head_dim, d_model]`.
    Q,
    /// Attention key, `self_attn.k_proj`: `[n_kv_heads * head_dim, d_model]`.
    K,
    /// Attention value, `self_attn.v_proj`: `[n_kv_heads * head_dim, d_model]`.
    V,
    /// Attention output, `self_attn.o_proj`: `[d_model, n_heads * head_dim]`.
    O,
    /// MLP gate (SwiGLU's SiLU branch), `mlp.gate_proj`: `[d_ff, d_model]`.
    Gate,
    /// MLP up, `mlp.up_proj`: `[d_ff, d_model]`.
    Up,
    /// MLP down, `mlp.down_proj`: `[d_model, d_ff]`.
    Down,
}

impl Projection {
    /// Every projection, in layer order; [`Projection::index`] is the position here.
    pub const ALL: [Projection; 7] =
        [Projection::Q, Projection::K, Projection::V, Projection::O, Projection::Gate, Projection::Up, Projection::Down];

    /// The PEFT / Hugging Face module name, e.g. `q_proj`.
    pub fn module(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The block holding it: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// The GGUF (llama.cpp) stem, e.g. `attn_q` in `blk.3.attn_q.weight`.
    pub fn gguf_stem(self) -> &'static str {
        match self {
            Projection::Q => "attn_q",
            Projection::K => "attn_k",
            Projection::V => "attn_v",
            Projection::O => "attn_output",
            Projection::Gate => "ffn_gate",
            Projection::Up => "ffn_up",
            Projection::Down => "ffn_down",
        }
    }

    /// The projection whose module name is `module` (`q_proj`, ...); `None` for any other name.
    pub fn parse(module: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.module() == module)
    }

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// `(out, in)` of the base weight `[out, in]` in a model of `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        match self {
            Projection::Q => (q, cfg.d_model),
            Projection::K | Projection::V => (kv, cfg.d_model),
            Projection::O => (cfg.d_model, q),
            Projection::Gate | Projection::Up => (cfg.d_ff, cfg.d_model),
            Projection::Down => (cfg.d_model, cfg.d_ff),
        }
    }

    /// The canonical name of its weight in layer `layer`, e.g.
    /// `model.layers.3.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        TensorName::Layer(layer, LayerTensor::Weight(self)).hf_name()
    }
}

/// One tensor of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    /// RMSNorm weight before attention, `input_layernorm.weight` `[d_model]`.
    InputNorm,
    /// RMSNorm weight before the MLP, `post_attention_layernorm.weight` `[d_model]`.
    PostAttentionNorm,
    /// A projection's weight `[out, in]`.
    Weight(Projection),
    /// A projection's bias `[out]`: only q, k and v have one, and only in Qwen2.
    Bias(Projection),
}

impl LayerTensor {
    /// Every tensor a layer can hold, in the order of the module table.
    pub const ALL: [LayerTensor; 12] = [
        LayerTensor::InputNorm,
        LayerTensor::Weight(Projection::Q),
        LayerTensor::Weight(Projection::K),
        LayerTensor::Weight(Projection::V),
        LayerTensor::Weight(Projection::O),
        LayerTensor::Bias(Projection::Q),
        LayerTensor::Bias(Projection::K),
        LayerTensor::Bias(Projection::V),
        LayerTensor::PostAttentionNorm,
        LayerTensor::Weight(Projection::Gate),
        LayerTensor::Weight(Projection::Up),
        LayerTensor::Weight(Projection::Down),
    ];

    /// The part of the canonical name after `model.layers.{i}.`, e.g. `self_attn.q_proj.weight`.
    pub fn hf_suffix(self) -> String {
        match self {
            LayerTensor::InputNorm => "input_layernorm.weight".into(),
            LayerTensor::PostAttentionNorm => "post_attention_layernorm.weight".into(),
            LayerTensor::Weight(p) => format!("{}.{}.weight", p.block(), p.module()),
            LayerTensor::Bias(p) => format!("{}.{}.bias", p.block(), p.module()),
        }
    }

    /// The part of the GGUF name after `blk.{i}.`, e.g. `attn_q.weight`.
    pub fn gguf_suffix(self) -> String {
        match self {
            LayerTensor::InputNorm => "attn_norm.weight".into(),
            LayerTensor::PostAttentionNorm => "ffn_norm.weight".into(),
            LayerTensor::Weight(p) => format!("{}.weight", p.gguf_stem()),
            LayerTensor::Bias(p) => format!("{}.bias", p.gguf_stem()),
        }
    }

    /// The tensor whose canonical suffix is `suffix`; `None` for anything not in [`LayerTensor::ALL`]
    /// (e.g. `self_attn.o_proj.bias`).
    pub fn parse_hf_suffix(suffix: &str) -> Option<LayerTensor> {
        LayerTensor::ALL.into_iter().find(|t| t.hf_suffix() == suffix)
    }
}

/// A canonical (Hugging Face) tensor name of the model, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorName {
    /// `model.embed_tokens.weight` `[vocab, d_model]`.
    EmbedTokens,
    /// `model.norm.weight` `[d_model]`: the RMSNorm before the output projection.
    FinalNorm,
    /// `lm_head.weight` `[vocab, d_model]` (absent when tied to the embedding).
    LmHead,
    /// A tensor of decoder layer `.0` (0-based).
    Layer(usize, LayerTensor),
}

impl TensorName {
    /// Parses a canonical name; `None` for a name outside the table in the module documentation
    /// (including a layer index with a sign or a leading zero).
    pub fn parse(name: &str) -> Option<TensorName> {
        match name {
            "model.embed_tokens.weight" => return Some(TensorName::EmbedTokens),
            "model.norm.weight" => return Some(TensorName::FinalNorm),
            "lm_head.weight" => return Some(TensorName::LmHead),
            _ => {}
        }
        let (layer, suffix) = split_layer(name.strip_prefix(LAYER_PREFIX)?)?;
        Some(TensorName::Layer(layer, LayerTensor::parse_hf_suffix(suffix)?))
    }

    /// The canonical (Hugging Face) name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf_name(self) -> String {
        match self {
            TensorName::EmbedTokens => "model.embed_tokens.weight".into(),
            TensorName::FinalNorm => "model.norm.weight".into(),
            TensorName::LmHead => "lm_head.weight".into(),
            TensorName::Layer(i, t) => format!("{LAYER_PREFIX}{i}.{}", t.hf_suffix()),
        }
    }

    /// The GGUF (llama.cpp) name, e.g. `blk.3.attn_q.weight`.
    pub fn gguf_name(self) -> String {
        match self {
            TensorName::EmbedTokens => "token_embd.weight".into(),
            TensorName::FinalNorm => "output_norm.weight".into(),
            TensorName::LmHead => "output.weight".into(),
            TensorName::Layer(i, t) => format!("blk.{i}.{}", t.gguf_suffix()),
        }
    }
}

/// `{index}.{rest}` with a canonical decimal index (no sign, no leading zero).
pub fn split_layer(s: &str) -> Option<(usize, &str)> {
    let (index, rest) = s.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

/// Which factor of a LoRA pair `delta W = B A`: `A` `[r, in]` or `B` `[out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraFactor {
    /// `lora_A`: `[r, in]`, applied first.
    A,
    /// `lora_B`: `[out, r]`.
    B,
}

/// A PEFT LoRA tensor key, parsed:
/// `base_model.model.model.layers.{layer}.{block}.{module}.lora_{A,B}.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoraTensorName {
    /// Decoder layer, 0-based.
    pub layer: usize,
    /// The adapted projection.
    pub projection: Projection,
    /// `A` or `B`.
    pub factor: LoraFactor,
}

impl LoraTensorName {
    /// Parses a PEFT key; `None` for anything else (embedding adapters, biases, a module in the
    /// wrong block, a non-canonical layer index).
    pub fn parse(key: &str) -> Option<LoraTensorName> {
        let (layer, rest) = split_layer(key.strip_prefix(PEFT_PREFIX)?.strip_prefix(LAYER_PREFIX)?)?;
        let (block, rest) = rest.split_once('.')?;
        let (module, rest) = rest.split_once('.')?;
        let factor = match rest {
            "lora_A.weight" => LoraFactor::A,
            "lora_B.weight" => LoraFactor::B,
            _ => return None,
        };
        let projection = Projection::parse(module).filter(|p| p.block() == block)?;
        Some(LoraTensorName { layer, projection, factor })
    }

    /// The PEFT key, e.g. `base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight`.
    pub fn key(self) -> String {
        let p = self.projection;
        let factor = match self.factor {
            LoraFactor::A => "A",
            LoraFactor::B => "B",
        };
        format!("{PEFT_PREFIX}{LAYER_PREFIX}{}.{}.{}.lora_{factor}.weight", self.layer, p.block(), p.module())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_follow_llama_cpp() {
        let gguf = |n: &str| TensorName::parse(n).map(TensorName::gguf_name);
        assert_eq!(gguf("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf("model.norm.weight").as_deref(), Some("output_norm.weight"));
        assert_eq!(gguf("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf("model.layers.12.self_attn.o_proj.weight").as_deref(), Some("blk.12.attn_output.weight"));
        assert_eq!(gguf("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf("model.layers.3.self_attn.k_proj.bias").as_deref(), Some("blk.3.attn_k.bias"));
        for bad in ["model.layers..mlp.up_proj.weight", "model.layers.01.mlp.up_proj.weight", "model.layers.1.mlp.x", "x"] {
            assert_eq!(gguf(bad), None, "{bad}");
        }
        assert_eq!(gguf("model.layers.1.self_attn.o_proj.bias"), None, "o_proj has no bias");
    }

    #[test]
    fn every_name_round_trips() {
        for t in LayerTensor::ALL {
            let name = TensorName::Layer(7, t);
            assert_eq!(TensorName::parse(&name.hf_name()), Some(name));
        }
        for name in [TensorName::EmbedTokens, TensorName::FinalNorm, TensorName::LmHead] {
            assert_eq!(TensorName::parse(&name.hf_name()), Some(name));
        }
        assert_eq!(Projection::Down.weight_name(29), "model.layers.29.mlp.down_proj.weight");
    }

    #[test]
    fn lora_keys_round_trip_and_reject_other_names() {
        let key = "base_model.model.model.layers.5.self_attn.k_proj.lora_A.weight";
        let parsed = LoraTensorName::parse(key).unwrap();
        assert_eq!(parsed, LoraTensorName { layer: 5, projection: Projection::K, factor: LoraFactor::A });
        assert_eq!(parsed.key(), key);
        for bad in [
            "base_model.model.model.layers.5.mlp.k_proj.lora_A.weight",
            "base_model.model.model.layers.5.self_attn.k_proj.lora_A.bias",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "model.layers.5.self_attn.k_proj.lora_A.weight",
        ] {
            assert_eq!(LoraTensorName::parse(bad), None, "{bad}");
        }
    }
}
