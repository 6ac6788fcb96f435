//! The model's weights on the GPU, in the layout the kernels want: Q, K and V stacked into one
//! matrix (one projection per layer), gate and up stacked likewise, norms in f32.

use std::sync::Arc;

use crate::gpu::{DType, GpuContext, GpuMatrix, GpuTensor};
use crate::model::lora::LoraAdapter;
use crate::model::names::{LayerTensor, Projection, TensorName};
use crate::model::{HostTensor, ModelConfig, WeightSource};

use super::RuntimeError;

/// One decoder layer's weights.
#[derive(Debug)]
pub struct LayerWeights {
    /// RMSNorm weight before attention `[d]` f32.
    pub attn_norm: GpuTensor,
    /// Q, K, V stacked `[(n_heads + 2 n_kv_heads) * head_dim, d]`: q rows, then k, then v.
    pub qkv: GpuMatrix,
    /// Q, K, V biases `[(n_heads + 2 n_kv_heads) * head_dim]` f32 (qwen2); None without.
    pub qkv_bias: Option<GpuTensor>,
    /// Attention output projection `[d, n_heads * head_dim]`.
    pub o: GpuMatrix,
    /// RMSNorm weight before the MLP `[d]` f32.
    pub ffn_norm: GpuTensor,
    /// Gate and up stacked `[2 d_ff, d]`: gate rows, then up.
    pub gate_up: GpuMatrix,
    /// MLP down projection `[d, d_ff]`.
    pub down: GpuMatrix,
}

/// Every weight of the model, uploaded once; sessions share it.
#[derive(Debug)]
pub struct GpuWeights {
    /// The device they live on.
    pub ctx: Arc<GpuContext>,
    /// The model's sizes and hyperparameters.
    pub config: ModelConfig,
    /// Dtype of the matrices (norms stay f32).
    pub dtype: DType,
    /// Token embedding `[vocab, d]`.
    pub embed: GpuMatrix,
    /// Final RMSNorm weight `[d]` f32.
    pub final_norm: GpuTensor,
    /// LM head `[vocab, d]`; None when tied to `embed`.
    pub lm_head: Option<GpuMatrix>,
    /// Decoder layer l's weights at index l.
    pub layers: Vec<LayerWeights>,
}

fn stack(parts: &[&HostTensor]) -> Vec<f32> {
    let mut out = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for p in parts {
        out.extend_from_slice(&p.data);
    }
    out
}

impl GpuWeights {
    /// Read every tensor from `source`, convert to `dtype` and upload. `progress` is called with
    /// (tensors done, tensors in all) after each layer.
    pub fn load(
        ctx: &Arc<GpuContext>,
        source: &dyn WeightSource,
        dtype: DType,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GpuWeights, RuntimeError> {
        Self::load_merged(ctx, source, dtype, None, progress)
    }

    /// [`GpuWeights::load`] with a LoRA adapter merged in: every targeted projection becomes
    /// `W + scale · (alpha / r) · B A`, computed in f32 on the host before conversion to `dtype`
    /// and stacking, so decoding costs exactly what the base model costs.
    pub fn load_merged(
        ctx: &Arc<GpuContext>,
        source: &dyn WeightSource,
        dtype: DType,
        lora: Option<(&LoraAdapter, f32)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GpuWeights, RuntimeError> {
        let cfg = source.config().clone();
        if let Some((adapter, _)) = lora {
            adapter.check_model(&cfg)?;
        }
        // The base weight of projection `p` in layer `i`, with the adapter's delta added.
        let projection = |i: usize, p: Projection| -> Result<HostTensor, RuntimeError> {
            let mut t = source.get(&p.weight_name(i))?;
            if let Some((adapter, scale)) = lora {
                adapter.merge_into(i, p, &mut t, scale)?;
            }
            Ok(t)
        };
        let d = cfg.d_model;
        let total = cfg.n_layers + 2;
        let vector = |name: TensorName| -> Result<GpuTensor, RuntimeError> {
            let name = name.hf_name();
            let t = source.get(&name)?;
            Ok(GpuTensor::from_f32(ctx, &name, &[t.data.len()], &t.data)?)
        };
        let matrix = |label: &str, parts: &[&HostTensor]| -> Result<GpuMatrix, RuntimeError> {
            let rows: usize = parts.iter().map(|t| t.shape[0]).sum();
            let cols = parts[0].shape[1];
            Ok(GpuMatrix::upload(ctx, label, rows, cols, &stack(parts), dtype)?)
        };

        let embed_host = source.get(&TensorName::EmbedTokens.hf_name())?;
        let embed = matrix("embed_tokens", &[&embed_host])?;
        drop(embed_host);
        let final_norm = vector(TensorName::FinalNorm)?;
        let lm_head = if cfg.tied_embeddings {
            None
        } else {
            let t = source.get(&TensorName::LmHead.hf_name())?;
            Some(matrix("lm_head", &[&t])?)
        };
        progress(2, total);

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let q = projection(i, Projection::Q)?;
            let k = projection(i, Projection::K)?;
            let v = projection(i, Projection::V)?;
            let qkv = matrix(&format!("layer.{i}.attn.qkv"), &[&q, &k, &v])?;
            drop((q, k, v));
            let qkv_bias = if cfg.qkv_bias {
                let bias = |p| source.get(&TensorName::Layer(i, LayerTensor::Bias(p)).hf_name());
                let (bq, bk, bv) = (bias(Projection::Q)?, bias(Projection::K)?, bias(Projection::V)?);
                let b = stack(&[&bq, &bk, &bv]);
                Some(GpuTensor::from_f32(ctx, &format!("layer.{i}.attn.qkv_bias"), &[b.len()], &b)?)
            } else {
                None
            };
            let o = projection(i, Projection::O)?;
            let o = matrix(&format!("layer.{i}.attn.o"), &[&o])?;
            let gate = projection(i, Projection::Gate)?;
            let up = projection(i, Projection::Up)?;
            let gate_up = matrix(&format!("layer.{i}.mlp.gate_up"), &[&gate, &up])?;
            drop((gate, up));
            let down = projection(i, Projection::Down)?;
            let down = matrix(&format!("layer.{i}.mlp.down"), &[&down])?;
            layers.push(LayerWeights {
                attn_norm: vector(TensorName::Layer(i, LayerTensor::InputNorm))?,
                qkv,
                qkv_bias,
                o,
                ffn_norm: vector(TensorName::Layer(i, LayerTensor::PostAttentionNorm))?,
                gate_up,
                down,
            });
            progress(i + 3, total);
        }
        debug_assert_eq!(embed.cols, d);
        Ok(GpuWeights { ctx: ctx.clone(), config: cfg, dtype, embed, final_norm, lm_head, layers })
    }

    /// The output projection: `lm_head`, or the embedding table when tied.
    pub fn output(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of all matrices and vectors on the GPU.
    pub fn byte_len(&self) -> u64 {
        let mut total = self.embed.byte_len() + self.final_norm.byte_len() as u64;
        total += self.lm_head.as_ref().map_or(0, |m| m.byte_len());
        for l in &self.layers {
            total += l.qkv.byte_len() + l.o.byte_len() + l.gate_up.byte_len() + l.down.byte_len();
            total += (l.attn_norm.byte_len() + l.ffn_norm.byte_len()) as u64;
            total += l.qkv_bias.as_ref().map_or(0, |b| b.byte_len() as u64);
        }
        total
    }

    /// Bytes of weights that one decode step reads for layer `i` (its four matrices).
    pub fn layer_bytes(&self, i: usize) -> u64 {
        let l = &self.layers[i];
        l.qkv.byte_len() + l.o.byte_len() + l.gate_up.byte_len() + l.down.byte_len()
    }
}
