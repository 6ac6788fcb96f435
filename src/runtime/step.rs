//! Building a step's dispatches apart from the session that owns the buffers.
//!
//! A [`StepBuilder`] borrows the weights, the optional unmerged LoRA adapter, a
//! [`StepBuffers`] set (KV cache, RoPE tables, step uniform, logits, picked candidates), the
//! layer plan and the activation sets, and returns the dispatches of the head (embedding), one
//! decoder layer, the tail (final norm, LM head, sampling) or a whole step, each with its
//! [`Tag`]. It records and submits nothing: the [`Session`](super::Session) does that.

use crate::gpu::{DType, Dispatch, GpuContext, GpuMatrix, GpuTensor, Phase, Tag};
use crate::kernels::attention::{AttnOp, AttnShape, attention};
use crate::kernels::choice::{matmul_variant_for, matvec_variant_for};
use crate::kernels::copy::copy;
use crate::kernels::embedding::embedding;
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::matmul;
use crate::kernels::matvec::{MatvecEpilogue, MatvecVariant, NormEpilogue, ROPE_EPILOGUE_STORAGE_BUFFERS, matvec, matvec_with};
use crate::kernels::rmsnorm::{RmsNormOp, rmsnorm};
use crate::kernels::rope::{RopeQkvOp, RopeTables, rope_qkv_write};
use crate::kernels::router::{RouterWeights, router_gate};
use crate::kernels::sample::{argmax, top_k};
use crate::kernels::step::StepBuffer;
use crate::kernels::swiglu::swiglu;

use super::kv_cache::KvCache;
use super::lora::{GpuLora, GpuLoraLayer, GpuLoraPair};
use super::weights::GpuWeights;
use super::{LayerPlan, RuntimeError};

/// Activation buffers for up to `rows` tokens at once (f32 unless said otherwise; `d` =
/// d_model, `hd` = head_dim).
#[derive(Debug)]
pub struct Activations {
    /// Rows the buffers hold: the most tokens one step may run.
    pub rows: usize,
    /// Token ids `[rows]` u32: the step's input.
    pub ids: GpuTensor,
    /// The residual stream `[rows, d]`: written by the embedding, updated in place by each block.
    pub x: GpuTensor,
    /// Normalised input of a block's attention or MLP half `[rows, d]`.
    pub xn: GpuTensor,
    /// Q, K and V projections side by side `[rows, (n_heads + 2 n_kv_heads) * hd]`.
    pub qkv: GpuTensor,
    /// Rotated queries `[rows, n_heads * hd]`.
    pub q: GpuTensor,
    /// Attention output, heads side by side `[rows, n_heads * hd]`.
    pub attn: GpuTensor,
    /// Gate and up projections side by side `[rows, 2 d_ff]`; after a decode step's gate_up with
    /// the SwiGLU epilogue (`StepBuilder::fuses_decode_epilogues`), SwiGLU's output in `[0..d_ff]`.
    pub gate_up: GpuTensor,
    /// SwiGLU output `silu(gate) * up` `[rows, d_ff]` (where SwiGLU is its own dispatch).
    pub act: GpuTensor,
}

impl Activations {
    /// Zeroed buffers for `rows` tokens of the model of `w`. Errors: a GPU allocation, or
    /// [`crate::gpu::GpuError::BufferTooLarge`] naming the first buffer (`[rows, cols]`) over the
    /// device's storage-binding limit, checked before that buffer is created.
    pub fn new(ctx: &GpuContext, w: &GpuWeights, rows: usize) -> Result<Activations, RuntimeError> {
        let c = &w.config;
        let q_dim = c.q_dim();
        let qkv_dim = q_dim + 2 * c.kv_dim();
        let f = |name: &str, cols: usize| GpuTensor::zeros_bound(ctx, name, DType::F32, &[rows, cols]);
        Ok(Activations {
            rows,
            ids: GpuTensor::zeros(ctx, "ids", DType::U32, &[rows])?,
            x: f("x", c.d_model)?,
            xn: f("xn", c.d_model)?,
            qkv: f("qkv", qkv_dim)?,
            q: f("q", q_dim)?,
            attn: f("attn", q_dim)?,
            gate_up: f("gate_up", 2 * c.d_ff)?,
            act: f("act", c.d_ff)?,
        })
    }
}

/// What a backward pass needs from a layer's forward beyond [`Activations`] (see
/// [`StepBuilder::layer_keeping`]); f32, `d` = d_model.
#[derive(Debug)]
pub struct KeptActivations {
    /// The attention half's normalised input `[rows, d]`.
    pub xn_attn: GpuTensor,
    /// The residual stream after the attention half `[rows, d]`.
    pub x_mid: GpuTensor,
}

impl KeptActivations {
    /// Zeroed buffers for `rows` tokens of a model with hidden size `d`. Errors: a GPU
    /// allocation, or a buffer over the storage-binding limit.
    pub fn new(ctx: &GpuContext, rows: usize, d: usize) -> Result<KeptActivations, RuntimeError> {
        let f = |name: &str| GpuTensor::zeros_bound(ctx, name, DType::F32, &[rows, d]);
        Ok(KeptActivations { xn_attn: f("xn_attn")?, x_mid: f("x_mid")? })
    }
}

/// The buffers of one sequence that every step reads or writes besides the activations; the
/// session owns them, the builder borrows them.
#[derive(Debug)]
pub struct StepBuffers {
    /// Keys and values of every position so far, per kept layer.
    pub kv: KvCache,
    /// RoPE cos/sin tables `[ctx_len, head_dim / 2]` f32.
    pub rope: RopeTables,
    /// The step uniform: first position, token count and KV length of the step.
    pub step: StepBuffer,
    /// Normalised last row `[1, d_model]` f32: the LM head's input.
    pub final_row: GpuTensor,
    /// Logits of the step's last position `[vocab]` f32.
    pub logits: GpuTensor,
    /// Candidates read back per token: 1 = greedy (argmax), else top-k.
    pub candidates: usize,
    /// The sampled candidates `[2 * candidates]` u32: (token id, f32 bits of its logit) pairs.
    pub picked: GpuTensor,
    /// Router outputs `[n_layers]` f32: layer l's probability at index l (routed prefill).
    pub router_probs: GpuTensor,
    /// LoRA scratch `a = x · Aᵀ`, `[ctx_len, max_inner]` f32 (prefill rows never exceed
    /// ctx_len); None until an adapter is attached.
    pub lora_tmp: Option<GpuTensor>,
}

/// A projection of a decoder block: its op name and its LoRA group.
#[derive(Debug, Clone, Copy)]
enum Proj {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Proj {
    /// The op of the base product (and of the LoRA delta's, whose label parts are `.lora_a`,
    /// `.lora_b`).
    fn op(self) -> &'static str {
        match self {
            Proj::Qkv => "attn.qkv",
            Proj::O => "attn.o",
            Proj::GateUp => "mlp.gate_up",
            Proj::Down => "mlp.down",
        }
    }

    /// The adapter's matrices for this projection in one layer.
    fn lora(self, ll: &GpuLoraLayer) -> Option<&GpuLoraPair> {
        match self {
            Proj::Qkv => ll.qkv.as_ref(),
            Proj::O => ll.o.as_ref(),
            Proj::GateUp => ll.gate_up.as_ref(),
            Proj::Down => ll.down.as_ref(),
        }
    }
}

/// Call `build` with `tag`'s label and tag every dispatch it returns.
fn tagged<D, E>(tag: Tag, build: impl FnOnce(&str) -> Result<D, E>) -> Result<Vec<Dispatch>, RuntimeError>
where
    D: IntoIterator<Item = Dispatch>,
    RuntimeError: From<E>,
{
    let label = tag.label();
    Ok(build(&label)?.into_iter().map(|d| d.tagged(tag)).collect())
}

/// Builds the dispatches of one phase of a step from borrowed weights and buffers; see the
/// module docs. Cheap to make (references only): make one per build.
#[derive(Debug, Clone, Copy)]
pub struct StepBuilder<'a> {
    /// The device the dispatches are built on.
    pub ctx: &'a GpuContext,
    /// The model's weights.
    pub weights: &'a GpuWeights,
    /// The unmerged LoRA adapter and its user scale S (the B products use S · alpha / r).
    pub lora: Option<(&'a GpuLora, f32)>,
    /// KV cache, RoPE tables, step uniform and the tail's outputs.
    pub bufs: &'a StepBuffers,
    /// Which layers run.
    pub plan: &'a LayerPlan,
    /// The phase: prefill uses the matmul kernels over `rows` tokens, decode the matrix-vector
    /// kernels over one.
    pub phase: Phase,
}

impl StepBuilder<'_> {
    /// Every dispatch of one step over `rows` tokens under the plan, in order: head, each kept
    /// layer, tail. `acts` holds the step's token ids and the residual stream that the head
    /// writes and the tail reads; `layer_acts(l)` is the set layer `l` computes in. Inference
    /// passes `|_| acts` (one set reused by every layer, the cheapest); a backward pass needs
    /// each block's input and intermediates kept, which it gets by passing one set per layer
    /// (and copying the residual stream `x` between them). Errors: as [`StepBuilder::layer`].
    pub fn step<'s>(
        &self,
        rows: usize,
        acts: &Activations,
        layer_acts: impl Fn(usize) -> &'s Activations,
    ) -> Result<Vec<Dispatch>, RuntimeError> {
        let mut p = self.head(acts, rows)?;
        let kept: Vec<usize> = (0..self.weights.layers.len()).filter(|&l| self.plan.runs(l)).collect();
        // Whether the layer's input norm is already written (by the layer before's down GEMV).
        let mut normed_in = false;
        for (i, &l) in kept.iter().enumerate() {
            let after = self.norm_after(rows, l, kept.get(i + 1).map(|&next| (next, layer_acts(next))));
            p.extend(self.layer_with_core(
                layer_acts(l),
                rows,
                l,
                None,
                normed_in,
                after,
                None::<fn() -> Result<Vec<Dispatch>, RuntimeError>>,
            )?);
            normed_in = after.is_some();
        }
        p.extend(self.tail_normed(acts, rows, normed_in)?);
        Ok(p)
    }

    /// The embedding: token ids `a.ids` `[rows]` to the residual stream `a.x` `[rows, d]`.
    pub fn head(&self, a: &Activations, rows: usize) -> Result<Vec<Dispatch>, RuntimeError> {
        tagged(Tag::step(self.phase, "embed"), |n| embedding(self.ctx, n, &a.ids, rows, &self.weights.embed, &a.x))
    }

    /// Decoder layer `l` over `rows` tokens of `a`, the pre-norm block of Llama
    /// (`LlamaDecoderLayer.forward` in Hugging Face transformers):
    /// `x += o(attention(rope(qkv(norm(x)))))`, then `x += down(swiglu(gate_up(norm(x))))`,
    /// each projection plus the adapter's delta when one is attached. The rotated keys and the
    /// values of the step's positions are written to layer `l`'s KV cache.
    /// Errors: `RuntimeError::Internal` when layer `l` has no KV cache (a skipped layer);
    /// `RuntimeError::Gpu` when a kernel rejects its arguments.
    pub fn layer(&self, a: &Activations, rows: usize, l: usize) -> Result<Vec<Dispatch>, RuntimeError> {
        self.layer_keeping(a, rows, l, None)
    }

    /// [`StepBuilder::layer`], and with `kept` the two values a backward pass needs that the
    /// in-place layer overwrites: the attention half's normalised input goes to `kept.xn_attn`
    /// (instead of `a.xn`, which then holds only the MLP half's) and the residual stream between
    /// the halves is copied to `kept.x_mid` (one extra dispatch). Errors: as [`StepBuilder::layer`].
    pub fn layer_keeping(
        &self,
        a: &Activations,
        rows: usize,
        l: usize,
        kept: Option<&KeptActivations>,
    ) -> Result<Vec<Dispatch>, RuntimeError> {
        self.layer_with_core(a, rows, l, kept, false, None, None::<fn() -> Result<Vec<Dispatch>, RuntimeError>>)
    }

    /// The norm that layer `l`'s down GEMV writes as its epilogue in a step of [`StepBuilder::step`]
    /// ([`MatvecEpilogue::Norm`]), saving the dispatch of the norm after it: the input norm of
    /// the next kept layer `next` (into its activations' `xn`), or after the last kept layer the
    /// final norm (into `bufs.final_row`). None where the down GEMV cannot take the epilogue
    /// ([`StepBuilder::fuses_norm_epilogue`]).
    fn norm_after<'b>(&'b self, rows: usize, l: usize, next: Option<(usize, &'b Activations)>) -> Option<NormEpilogue<'b>> {
        let lw = &self.weights.layers[l];
        if !self.fuses_norm_epilogue(rows, l, None, |ll| ll.down.is_some(), &lw.down) {
            return None;
        }
        let eps = self.weights.config.rms_eps;
        Some(match next {
            Some((next, a)) => NormEpilogue { weight: &self.weights.layers[next].attn_norm, out: &a.xn, eps },
            None => NormEpilogue { weight: &self.weights.final_norm, out: &self.bufs.final_row, eps },
        })
    }

    /// [`StepBuilder::layer_keeping`] with the attention core (`a.qkv` to `a.attn`) given by
    /// `core`: `None` for [`StepBuilder::attention_core`] over this builder's cache (whose RoPE a
    /// one-token decode step may run as the qkv GEMV's epilogue), or, for a batched step
    /// (`runtime::batch`), one core per sequence over that sequence's own cache. With
    /// `normed_in` the attention half's norm of `a.x` is already in `a.xn` (written by the layer
    /// before, [`StepBuilder::norm_after`]) and is not dispatched; with `norm_after` the down GEMV
    /// writes that norm (the caller has checked that it can).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_with_core(
        &self,
        a: &Activations,
        rows: usize,
        l: usize,
        kept: Option<&KeptActivations>,
        normed_in: bool,
        norm_after: Option<NormEpilogue<'_>>,
        core: Option<impl FnOnce() -> Result<Vec<Dispatch>, RuntimeError>>,
    ) -> Result<Vec<Dispatch>, RuntimeError> {
        let (ctx, c, lw) = (self.ctx, &self.weights.config, &self.weights.layers[l]);
        let at = |op| Tag::layer(self.phase, l, op);
        let norm = |x, weight, y| RmsNormOp { x, x_row0: 0, rows, weight, y, eps: c.rms_eps };
        // Attention half: x += o(attention(rope(qkv(norm(x))))).
        let xn_attn = kept.map_or(&a.xn, |k| &k.xn_attn);
        let mut p = Vec::new();
        if !normed_in {
            p.extend(tagged(at("attn.norm"), |n| rmsnorm(ctx, n, &norm(&a.x, &lw.attn_norm, xn_attn)).map(|d| [d]))?);
        }
        let qkv = LinearOp::new(xn_attn, rows, &lw.qkv, &a.qkv).bias(lw.qkv_bias.as_ref());
        if core.is_none() && self.fuses_decode_epilogues(rows, l, kept, |ll| ll.qkv.is_some(), &lw.qkv) {
            // One dispatch instead of two: the qkv GEMV rotates q and k and writes the KV cache
            // (the core of this builder's own cache, whose RoPE the epilogue does).
            let (rope, attn) = self.core_ops(a, 0, rows, l)?;
            let epilogue = MatvecEpilogue::Rope(&rope);
            p.extend(tagged(at("attn.qkv"), |n| matvec_with(ctx, n, &qkv, matvec_variant_for(ctx, qkv.w), epilogue))?);
            p.extend(tagged(at("attn.core"), |n| attention(ctx, n, &attn))?);
        } else {
            p.extend(self.project(l, Proj::Qkv, &qkv)?);
            p.extend(match core {
                Some(core) => core()?,
                None => self.attention_core(a, 0, rows, l)?,
            });
        }
        let o = LinearOp::new(&a.attn, rows, &lw.o, &a.x).accumulate(true);
        if self.fuses_norm_epilogue(rows, l, kept, |ll| ll.o.is_some(), &lw.o) {
            // One dispatch instead of two: the o GEMV's last invocation writes the MLP half's
            // norm of the residual stream it has just updated (on a CPU adapter only).
            let ne = NormEpilogue { weight: &lw.ffn_norm, out: &a.xn, eps: c.rms_eps };
            p.extend(tagged(at("attn.o"), |n| matvec_with(ctx, n, &o, matvec_variant_for(ctx, o.w), MatvecEpilogue::Norm(&ne)))?);
        } else {
            p.extend(self.project(l, Proj::O, &o)?);
            if let Some(k) = kept {
                p.extend(tagged(at("attn.keep"), |n| copy(ctx, n, &a.x, &k.x_mid).map(|d| [d]))?);
            }
            p.extend(tagged(at("mlp.norm"), |n| rmsnorm(ctx, n, &norm(&a.x, &lw.ffn_norm, &a.xn)).map(|d| [d]))?);
        }
        // MLP half: x += down(swiglu(gate_up(norm(x)))).
        let gate_up = LinearOp::new(&a.xn, rows, &lw.gate_up, &a.gate_up);
        let fused_swiglu = self.fuses_decode_epilogues(rows, l, kept, |ll| ll.gate_up.is_some(), &lw.gate_up);
        if fused_swiglu {
            // One dispatch instead of two: gate_up writes silu(gate) · up to gate_up[0..d_ff].
            p.extend(tagged(at("mlp.gate_up"), |n| {
                matvec_with(ctx, n, &gate_up, matvec_variant_for(ctx, gate_up.w), MatvecEpilogue::SwiGlu)
            })?);
        } else {
            p.extend(self.project(l, Proj::GateUp, &gate_up)?);
            p.extend(tagged(at("mlp.act"), |n| swiglu(ctx, n, &a.gate_up, rows, c.d_ff, &a.act).map(|d| [d]))?);
        }
        let act = if fused_swiglu { &a.gate_up } else { &a.act };
        let down = LinearOp::new(act, rows, &lw.down, &a.x).accumulate(true);
        match norm_after {
            // One dispatch instead of two: the down GEMV's last invocation writes the next norm.
            Some(ne) => p.extend(tagged(at("mlp.down"), |n| {
                matvec_with(ctx, n, &down, matvec_variant_for(ctx, down.w), MatvecEpilogue::Norm(&ne))
            })?),
            None => p.extend(self.project(l, Proj::Down, &down)?),
        }
        Ok(p)
    }

    /// Whether layer `l`'s product by `w` over `rows` tokens runs the epilogue of the decode GEMV
    /// that saves the next dispatch ([`MatvecEpilogue`]: RoPE and the KV-cache write after qkv,
    /// SwiGLU after gate_up, and on a CPU adapter the RMSNorms after o and down,
    /// [`StepBuilder::fuses_norm_epilogue`]): in a one-token decode step of a single sequence,
    /// where the
    /// adapter's matvec variant is `Rows` or `Windows` (the kernels with the epilogues), no unmerged adapter
    /// adds a delta to this projection (`adapted`; it would land after the epilogue), nothing is
    /// kept for a backward pass, W is one chunk and the adapter allows
    /// [`ROPE_EPILOGUE_STORAGE_BUFFERS`] storage buffers per stage (for both epilogues, though
    /// SwiGLU binds fewer). RoPE's caller also asks for this builder's own attention core
    /// (`layer_with_core`'s `None`).
    fn fuses_decode_epilogues(
        &self,
        rows: usize,
        l: usize,
        kept: Option<&KeptActivations>,
        adapted: impl Fn(&GpuLoraLayer) -> bool,
        w: &GpuMatrix,
    ) -> bool {
        self.phase == Phase::Decode
            && rows == 1
            && kept.is_none()
            && self.lora.is_none_or(|(g, _)| !adapted(&g.layers[l]))
            && w.chunks.len() == 1
            && self.ctx.limits.max_storage_buffers_per_shader_stage >= ROPE_EPILOGUE_STORAGE_BUFFERS
            && matches!(matvec_variant_for(self.ctx, w), MatvecVariant::Rows | MatvecVariant::Windows)
    }

    /// Whether layer `l`'s product by `w` can write an RMSNorm as its epilogue
    /// ([`MatvecEpilogue::Norm`]: the MLP half's after o, the next one after down): where
    /// [`StepBuilder::fuses_decode_epilogues`] holds and the adapter is a CPU, the only kind on
    /// which the epilogue's hand-off between workgroups holds.
    fn fuses_norm_epilogue(
        &self,
        rows: usize,
        l: usize,
        kept: Option<&KeptActivations>,
        adapted: impl Fn(&GpuLoraLayer) -> bool,
        w: &GpuMatrix,
    ) -> bool {
        self.ctx.is_cpu() && self.fuses_decode_epilogues(rows, l, kept, adapted, w)
    }

    /// Layer `l`'s attention core over rows `row0..row0 + rows` of `a`: RoPE on the queries and
    /// keys of `a.qkv` `[.., (n_heads + 2 n_kv_heads) hd]` (rotated queries to `a.q`, keys and
    /// values written to layer `l`'s KV cache at the step's positions), then attention over the
    /// cache into `a.attn` `[.., n_heads hd]`. `row0` is 0 but in a batched step, where each
    /// sequence's core runs on its rows of the batch's activations over its own cache.
    /// Errors: `RuntimeError::Internal` when layer `l` has no KV cache; `RuntimeError::Gpu`
    /// when a kernel rejects its arguments.
    pub(super) fn attention_core(&self, a: &Activations, row0: usize, rows: usize, l: usize) -> Result<Vec<Dispatch>, RuntimeError> {
        let at = |op| Tag::layer(self.phase, l, op);
        let (rope, attn) = self.core_ops(a, row0, rows, l)?;
        let mut p = tagged(at("attn.rope"), |n| rope_qkv_write(self.ctx, n, &rope).map(|d| [d]))?;
        p.extend(tagged(at("attn.core"), |n| attention(self.ctx, n, &attn))?);
        Ok(p)
    }

    /// The two ops of [`StepBuilder::attention_core`]: RoPE with the KV-cache write, and
    /// attention. Errors: `RuntimeError::Internal` when layer `l` has no KV cache.
    fn core_ops<'b>(&'b self, a: &'b Activations, row0: usize, rows: usize, l: usize) -> Result<(RopeQkvOp<'b>, AttnOp<'b>), RuntimeError> {
        let c = &self.weights.config;
        let kv = self.bufs.kv.layer(l).ok_or_else(|| RuntimeError::Internal(format!("layer {l} runs but has no KV cache")))?;
        let (k_cache, v_cache, step) = (&kv.k, &kv.v, &self.bufs.step);
        let shape = AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let rope = RopeQkvOp { qkv: &a.qkv, rows, row0, shape, tables: &self.bufs.rope, step, q_out: &a.q, k_cache, v_cache };
        Ok((rope, AttnOp { q: &a.q, rows, row0, k_cache, v_cache, shape, step, out: &a.attn }))
    }

    /// The tail: final norm of the last row `a.x[rows - 1]`, LM head into the logits `[vocab]`,
    /// and the sampling kernel (argmax, or top-k of `bufs.candidates`) into `bufs.picked`.
    pub fn tail(&self, a: &Activations, rows: usize) -> Result<Vec<Dispatch>, RuntimeError> {
        self.tail_normed(a, rows, false)
    }

    /// [`StepBuilder::tail`], without the final norm's dispatch where `normed` (the last layer's
    /// down GEMV wrote it, [`StepBuilder::norm_after`]).
    fn tail_normed(&self, a: &Activations, rows: usize, normed: bool) -> Result<Vec<Dispatch>, RuntimeError> {
        let (ctx, w, b) = (self.ctx, self.weights, self.bufs);
        let c = &w.config;
        let at = |op| Tag::step(self.phase, op);
        let norm = RmsNormOp { x: &a.x, x_row0: rows - 1, rows: 1, weight: &w.final_norm, y: &b.final_row, eps: c.rms_eps };
        let mut p = Vec::new();
        if !normed {
            p.extend(tagged(at("final_norm"), |n| rmsnorm(ctx, n, &norm).map(|d| [d]))?);
        }
        let lm_head = LinearOp::new(&b.final_row, 1, w.output(), &b.logits);
        p.extend(tagged(at("lm_head"), |n| matvec(ctx, n, &lm_head, matvec_variant_for(ctx, lm_head.w)))?);
        p.extend(self.sample()?);
        Ok(p)
    }

    /// The sampling kernel over the logits `bufs.logits` `[vocab]`: argmax when one candidate is
    /// read back, else the top `bufs.candidates`, into `bufs.picked`.
    pub(super) fn sample(&self) -> Result<Vec<Dispatch>, RuntimeError> {
        let (ctx, b, n) = (self.ctx, self.bufs, self.weights.config.vocab_size);
        tagged(Tag::step(self.phase, "sample"), |label| {
            if b.candidates == 1 {
                argmax(ctx, label, &b.logits, n, &b.picked)
            } else {
                top_k(ctx, label, &b.logits, n, b.candidates, &b.picked)
            }
        })
    }

    /// Layer `l`'s FiRST router over the hidden states `a.x` `[rows, d]` that reach the layer:
    /// its probability goes to `bufs.router_probs[l]`.
    pub fn router(&self, a: &Activations, rows: usize, l: usize, router: &RouterWeights) -> Result<Vec<Dispatch>, RuntimeError> {
        let probs = &self.bufs.router_probs;
        tagged(Tag::layer(self.phase, l, "router"), |n| router_gate(self.ctx, n, &a.x, rows, router, probs, l))
    }

    /// Projection `proj` of layer `l` (the product `op`), then the adapter's delta for it, if
    /// any: it lands where the base product does (into the residual stream for o and down).
    fn project(&self, l: usize, proj: Proj, op: &LinearOp) -> Result<Vec<Dispatch>, RuntimeError> {
        let tag = Tag::layer(self.phase, l, proj.op());
        let mut p = tagged(tag, |n| self.linear(n, op))?;
        // The unmerged adapter's matrices for this projection and s = S · alpha / r.
        if let Some((pair, s)) = self.lora.and_then(|(g, scale)| proj.lora(&g.layers[l]).map(|pair| (pair, scale * g.scaling))) {
            p.extend(tagged(tag, |n| self.lora_delta(n, op, pair, s))?);
        }
        Ok(p)
    }

    /// The linear product `op` as matvec (decode, one row) or matmul (prefill), each with the
    /// adapter's variant (for matmul, the one chosen for prefills of `op.rows` tokens).
    pub(super) fn linear(&self, label: &str, op: &LinearOp) -> Result<Vec<Dispatch>, RuntimeError> {
        Ok(if self.phase == Phase::Decode {
            matvec(self.ctx, label, op, matvec_variant_for(self.ctx, op.w))?
        } else {
            matmul(self.ctx, label, op, matmul_variant_for(self.ctx, op.rows, op.w))?
        })
    }

    /// A LoRA group's delta on the base product `base` (its x, rows, y and y stride):
    /// `a = x · A^T` (`[rows, inner]` in `lora_tmp`), then `y[:, 0..out] += s · a · B^T`.
    fn lora_delta(&self, label: &str, base: &LinearOp, pair: &GpuLoraPair, s: f32) -> Result<Vec<Dispatch>, RuntimeError> {
        let tmp = self.bufs.lora_tmp.as_ref().ok_or_else(|| RuntimeError::Internal("LoRA attached without its buffer".into()))?;
        let mut p = self.linear(&format!("{label}.lora_a"), &LinearOp::new(base.x, base.rows, &pair.a, tmp))?;
        let b = LinearOp::new(tmp, base.rows, &pair.b, base.y).y_stride(base.y_row_stride()).accumulate(true).scale(s);
        p.extend(self.linear(&format!("{label}.lora_b"), &b)?);
        Ok(p)
    }
}
