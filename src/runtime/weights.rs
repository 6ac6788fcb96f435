//! The model's weights on the GPU, in the layout the kernels want: Q, K and V stacked into one
//! matrix (one projection per layer), gate and up stacked likewise, norms in f32.

use std::sync::Arc;

use crate::gpu::{DType, GpuContext, GpuMatrix, GpuTensor, MatrixPart};
use crate::model::lora::LoraAdapter;
use crate::model::names::{LayerTensor, Projection, TensorName};
use crate::model::quant::quantize;
use crate::model::{HostBlocks, HostTensor, ModelConfig, QuantType, WeightSource};

use super::RuntimeError;
use super::lora::GpuLora;

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
    /// Dtype of the matrices stored as values (norms stay f32); matrices of blocks say so in
    /// their chunks ([`crate::gpu::MatrixChunk::quant`]).
    pub dtype: DType,
    /// What `--dtype` asked for.
    pub requested: WeightDtype,
    /// Token embedding `[vocab, d]`.
    pub embed: GpuMatrix,
    /// Final RMSNorm weight `[d]` f32.
    pub final_norm: GpuTensor,
    /// LM head `[vocab, d]`; None when tied to `embed`.
    pub lm_head: Option<GpuMatrix>,
    /// Decoder layer l's weights at index l.
    pub layers: Vec<LayerWeights>,
}

/// How the weight matrices are stored on the GPU (`--dtype`); norms and biases stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// Every matrix as f32 or f16 values (quantised blocks dequantised at load).
    Dense(DType),
    /// Each matrix in the file's own block type where a kernel reads it (Q8_0, Q4_0, Q4_1,
    /// Q4_K, Q6_K); other matrices as values: f32 when every such matrix is stored as F32, else
    /// f16 (F16, BF16, and block types without a kernel such as Q5_K).
    Native,
    /// Every matrix in this block type: kept when the file stores it so, else dequantised and
    /// quantised again at load (possible for q8_0 and q4_0 only, [`crate::model::quant::quantize`]).
    Quant(QuantType),
}

impl WeightDtype {
    /// Every `--dtype` name: `f32`, `f16`, `native`, `q8_0`, `q4_0`, `q4_1`, `q4_k`, `q6_k`.
    pub const NAMES: [&'static str; 8] = ["f32", "f16", "native", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"];

    /// The dtype called `s` ([`WeightDtype::NAMES`]), if any.
    pub fn parse(s: &str) -> Option<WeightDtype> {
        match s {
            "native" => Some(WeightDtype::Native),
            _ => DType::parse(s).map(WeightDtype::Dense).or_else(|| QuantType::parse(s).map(WeightDtype::Quant)),
        }
    }

    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Dense(DType::F16) => "f16",
            WeightDtype::Dense(_) => "f32",
            WeightDtype::Native => "native",
            WeightDtype::Quant(q) => q.name(),
        }
    }

    /// The default for a model file: `native` when it stores any matrix in a block type a
    /// kernel reads (a quantised GGUF), else `f32`.
    pub fn default_for(source: &dyn WeightSource) -> WeightDtype {
        let quantised = matrix_names(source.config()).iter().any(|n| kernel_type(source, n).is_some());
        if quantised { WeightDtype::Native } else { WeightDtype::Dense(DType::F32) }
    }

    /// The dtype in which loading `source` this way stores the matrices it keeps as values: the
    /// asked one for f32/f16; f16 for a block type (only a merged LoRA's targets); for `native`,
    /// f32 when every matrix is stored as F32 or in a block type a kernel reads, else f16.
    pub fn dense_dtype(self, source: &dyn WeightSource) -> DType {
        match self {
            WeightDtype::Dense(d) => d,
            WeightDtype::Quant(_) => DType::F16,
            WeightDtype::Native => {
                let f32_only = matrix_names(source.config())
                    .iter()
                    .all(|n| kernel_type(source, n).is_some() || source.storage_type(n).is_none_or(|t| t == "F32"));
                if f32_only { DType::F32 } else { DType::F16 }
            }
        }
    }
}

/// The block type a kernel reads in which `source` stores matrix `name`, if any.
fn kernel_type(source: &dyn WeightSource, name: &str) -> Option<QuantType> {
    source.storage_type(name).and_then(|t| QuantType::parse(&t))
}

impl From<DType> for WeightDtype {
    fn from(d: DType) -> WeightDtype {
        WeightDtype::Dense(d)
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Canonical names of every weight matrix of a model: the embedding table, the LM head when
/// not tied, then each layer's seven projections.
pub fn matrix_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec![TensorName::EmbedTokens.hf_name()];
    if !cfg.tied_embeddings {
        names.push(TensorName::LmHead.hf_name());
    }
    for i in 0..cfg.n_layers {
        for p in Projection::ALL {
            names.push(p.weight_name(i));
        }
    }
    names
}

/// What loading `source` as `dtype` will put on the GPU for its matrices, without reading
/// them: (bytes, matrix weights). Blocks count in their GPU layout
/// ([`QuantType::gpu_words_len`]), values in the dense dtype of [`WeightDtype`]; the chunk
/// padding of small buffers is left out. `None` when a count overflows or a matrix cannot be
/// made as asked (a block type that is not stored and cannot be quantised at load, or rows
/// that are not whole blocks).
pub fn estimate_matrix_bytes(source: &dyn WeightSource, dtype: WeightDtype) -> Option<(u64, u64)> {
    let cfg = source.config();
    let dense = dtype.dense_dtype(source);
    let blocks = |q: QuantType, rows: u64, cols: u64| -> Option<u64> {
        let be = q.block_elems() as u64;
        let n = usize::try_from(rows.checked_mul(cols / be)?).ok()?;
        cols.is_multiple_of(be).then(|| (q.gpu_words_len(n) as u64).checked_mul(4))?
    };
    let (mut bytes, mut params) = (0u64, 0u64);
    for name in matrix_names(cfg) {
        let shape = crate::model::weights::expected_shape(cfg, &name)?;
        let (rows, cols) = (*shape.first()? as u64, *shape.get(1)? as u64);
        let values = rows.checked_mul(cols)?;
        let b = match (dtype, kernel_type(source, &name)) {
            (WeightDtype::Dense(_), _) | (WeightDtype::Native, None) => values.checked_mul(dense.size() as u64)?,
            (WeightDtype::Native, Some(q)) => blocks(q, rows, cols)?,
            (WeightDtype::Quant(q), stored) if stored == Some(q) || matches!(q, QuantType::Q8_0 | QuantType::Q4_0) => {
                blocks(q, rows, cols)?
            }
            (WeightDtype::Quant(_), _) => return None,
        };
        bytes = bytes.checked_add(b)?;
        params = params.checked_add(values)?;
    }
    Some((bytes, params))
}

/// One matrix read from the source in the form it is uploaded in.
enum HostMatrix {
    Dense(HostTensor),
    Blocks(HostBlocks),
}

impl HostMatrix {
    fn part(&self) -> MatrixPart<'_> {
        match self {
            HostMatrix::Dense(t) => MatrixPart::Dense { rows: t.shape[0], data: &t.data },
            HostMatrix::Blocks(b) => MatrixPart::Blocks(b),
        }
    }

    fn cols(&self) -> usize {
        match self {
            HostMatrix::Dense(t) => t.shape.get(1).copied().unwrap_or(1),
            HostMatrix::Blocks(b) => b.cols,
        }
    }
}

impl GpuWeights {
    /// Read every tensor from `source`, store the matrices as `dtype` asks
    /// ([`WeightDtype`]; a plain [`DType`] converts to `WeightDtype::Dense`) and upload.
    /// `progress` is called with (tensors done, tensors in all) after each layer. What each
    /// matrix became is logged at info level (`RUST_LOG=info`).
    pub fn load(
        ctx: &Arc<GpuContext>,
        source: &dyn WeightSource,
        dtype: impl Into<WeightDtype>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GpuWeights, RuntimeError> {
        Self::load_merged(ctx, source, dtype, None, progress)
    }

    /// [`GpuWeights::load`] with a LoRA adapter merged in: every targeted projection becomes
    /// `W + scale · (alpha / r) · B A`, computed in f32 on the host before conversion and
    /// stacking, so decoding costs exactly what the base model costs. On a quantised base
    /// (`native`, a block type) only the targeted projections are dequantised, merged and
    /// stored as values (the dense dtype of [`WeightDtype`]); the others keep their blocks.
    ///
    /// # Errors
    /// A missing or malformed tensor ([`RuntimeError::Model`], naming it), an adapter that does
    /// not fit the model, a block type that cannot be made at load (`--dtype q4_k` for a matrix
    /// stored otherwise), GPU buffer errors.
    pub fn load_merged(
        ctx: &Arc<GpuContext>,
        source: &dyn WeightSource,
        dtype: impl Into<WeightDtype>,
        lora: Option<(&LoraAdapter, f32)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GpuWeights, RuntimeError> {
        let request: WeightDtype = dtype.into();
        let cfg = source.config().clone();
        if let Some((adapter, _)) = lora {
            adapter.check_model(&cfg)?;
        }
        let dense = request.dense_dtype(source);
        // Matrix `name` (projection `p` of layer `i` when given), in the form `request` asks
        // for, with the adapter's delta added to a targeted projection.
        let read = |name: &str, proj: Option<(usize, Projection)>| -> Result<HostMatrix, RuntimeError> {
            let stored = source.storage_type(name).unwrap_or_else(|| "?".into());
            let merge = proj.and_then(|(i, p)| lora.filter(|(a, _)| a.pair(i, p).is_some()).map(|l| (i, p, l)));
            let as_values = |why: &str| -> Result<HostMatrix, RuntimeError> {
                let mut t = source.get(name)?;
                if let Some((i, p, (adapter, scale))) = merge {
                    adapter.merge_into(i, p, &mut t, scale)?;
                }
                log::info!("{name}: {stored} -> {dense}{why}");
                Ok(HostMatrix::Dense(t))
            };
            if merge.is_some() && request != WeightDtype::Dense(dense) {
                return as_values(" (dequantised for the merged LoRA)");
            }
            match request {
                WeightDtype::Dense(_) => as_values(""),
                WeightDtype::Native => match source.get_blocks(name)? {
                    Some(b) => {
                        log::info!("{name}: {stored} kept");
                        Ok(HostMatrix::Blocks(b))
                    }
                    None => as_values(" (no kernel reads it as stored)"),
                },
                WeightDtype::Quant(q) => match source.get_blocks(name)? {
                    Some(b) if b.ty == q => {
                        log::info!("{name}: {stored} kept");
                        Ok(HostMatrix::Blocks(b))
                    }
                    _ => {
                        let t = source.get(name)?;
                        let (rows, cols) = (t.shape[0], t.shape.get(1).copied().unwrap_or(1));
                        let b = quantize(name, q, &t.data, rows, cols)?;
                        log::info!("{name}: {stored} -> {q} (quantised at load)");
                        Ok(HostMatrix::Blocks(b))
                    }
                },
            }
        };
        let d = cfg.d_model;
        let total = cfg.n_layers + 2;
        let vector = |name: TensorName| -> Result<GpuTensor, RuntimeError> {
            let name = name.hf_name();
            let t = source.get(&name)?;
            Ok(GpuTensor::from_f32(ctx, &name, &[t.data.len()], &t.data)?)
        };
        let matrix = |label: &str, parts: &[&HostMatrix]| -> Result<GpuMatrix, RuntimeError> {
            Ok(GpuMatrix::upload_parts(ctx, label, parts[0].cols(), &parts.iter().map(|m| m.part()).collect::<Vec<_>>(), dense)?)
        };

        let embed_host = read(&TensorName::EmbedTokens.hf_name(), None)?;
        debug_assert_eq!(embed_host.cols(), d);
        let embed = matrix("embed_tokens", &[&embed_host])?;
        drop(embed_host);
        let final_norm = vector(TensorName::FinalNorm)?;
        let lm_head = if cfg.tied_embeddings {
            None
        } else {
            let t = read(&TensorName::LmHead.hf_name(), None)?;
            Some(matrix("lm_head", &[&t])?)
        };
        progress(2, total);

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let projection = |p: Projection| read(&p.weight_name(i), Some((i, p)));
            let q = projection(Projection::Q)?;
            let k = projection(Projection::K)?;
            let v = projection(Projection::V)?;
            let qkv = matrix(&format!("layer.{i}.attn.qkv"), &[&q, &k, &v])?;
            drop((q, k, v));
            let qkv_bias = if cfg.qkv_bias {
                let bias = |p| source.get(&TensorName::Layer(i, LayerTensor::Bias(p)).hf_name());
                let (bq, bk, bv) = (bias(Projection::Q)?, bias(Projection::K)?, bias(Projection::V)?);
                let b: Vec<f32> = [bq.data, bk.data, bv.data].concat();
                Some(GpuTensor::from_f32(ctx, &format!("layer.{i}.attn.qkv_bias"), &[b.len()], &b)?)
            } else {
                None
            };
            let o = projection(Projection::O)?;
            let o = matrix(&format!("layer.{i}.attn.o"), &[&o])?;
            let gate = projection(Projection::Gate)?;
            let up = projection(Projection::Up)?;
            let gate_up = matrix(&format!("layer.{i}.mlp.gate_up"), &[&gate, &up])?;
            drop((gate, up));
            let down = projection(Projection::Down)?;
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
        let weights = GpuWeights { ctx: ctx.clone(), config: cfg, dtype: dense, requested: request, embed, final_norm, lm_head, layers };
        log::info!(
            "weights ({request}): {} matrices, {} bytes, {:.2} bits per weight",
            weights.format_summary(),
            weights.matrix_bytes(),
            weights.bits_per_weight()
        );
        Ok(weights)
    }

    /// Every matrix: the embedding table, the LM head when not tied, each layer's four stacks.
    pub fn matrices(&self) -> impl Iterator<Item = &GpuMatrix> {
        std::iter::once(&self.embed).chain(self.lm_head.as_ref()).chain(self.prefill_products())
    }

    /// Every matrix a prefill multiplies by: each layer's four stacks (the embedding table is
    /// gathered, and the LM head runs on the last row only, as a GEMV).
    pub fn prefill_products(&self) -> impl Iterator<Item = &GpuMatrix> {
        self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
    }

    /// Decide every kernel choice that steps over these weights and `lora` (unmerged) use
    /// ([`crate::kernels::choice::choose_all`]), measuring what is not cached.
    pub fn choose_kernels(&self, lora: Option<&GpuLora>) {
        let adapter = || lora.into_iter().flat_map(GpuLora::matrices);
        let read: Vec<&GpuMatrix> = self.matrices().chain(adapter()).collect();
        let multiplied: Vec<&GpuMatrix> = self.prefill_products().chain(adapter()).collect();
        crate::kernels::choice::choose_all(&self.ctx, &read, &multiplied);
    }

    /// How the matrices are stored, most common first: e.g. `q4_1 x120, q8_0 x1`
    /// ([`GpuMatrix::format`] per matrix).
    pub fn format_summary(&self) -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for m in self.matrices() {
            let f = m.format();
            match counts.iter_mut().find(|(k, _)| *k == f) {
                Some((_, n)) => *n += 1,
                None => counts.push((f, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts.iter().map(|(f, n)| format!("{f} x{n}")).collect::<Vec<_>>().join(", ")
    }

    /// Bytes of all matrices on the GPU (blocks in their GPU layout, values in their dtype).
    pub fn matrix_bytes(&self) -> u64 {
        self.matrices().map(GpuMatrix::byte_len).sum()
    }

    /// Weights (values) in all matrices.
    pub fn matrix_params(&self) -> u64 {
        self.matrices().map(|m| (m.rows * m.cols) as u64).sum()
    }

    /// GPU bits per matrix weight: [`GpuWeights::matrix_bytes`] · 8 / [`GpuWeights::matrix_params`].
    pub fn bits_per_weight(&self) -> f64 {
        self.matrix_bytes() as f64 * 8.0 / self.matrix_params().max(1) as f64
    }

    /// The output projection: `lm_head`, or the embedding table when tied.
    pub fn output(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of the interleaved copies of matrices that the windows GEMV built so far
    /// ([`GpuMatrix::interleaved_bytes`]; a tied embedding table counted once).
    pub fn interleaved_bytes(&self) -> u64 {
        self.matrices().map(GpuMatrix::interleaved_bytes).sum()
    }

    /// Bytes of all matrices and vectors on the GPU, the interleaved copies built so far included.
    pub fn byte_len(&self) -> u64 {
        let mut total = self.matrix_bytes() + self.interleaved_bytes() + self.final_norm.byte_len() as u64;
        for l in &self.layers {
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
