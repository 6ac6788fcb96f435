//! The FiRST training engine: one sequence's forward and backward pass on the GPU with the
//! model's own kernels, gradients summed over a batch, and the AdamW step (FiRST, arXiv
//! 2410.12513, as ARCHITECTURE.md "Training" states it).
//!
//! For a sequence of T tokens whose first P are the prompt:
//!
//! ```text
//! h_0 = embed(ids)                                           [T, d]
//! p_l = router_l(h_{l-1}[0..P])                              (routed layers)
//! g_l = z_l ~ Bernoulli(p_l) (hard, straight-through | score) | p_l (soft) | plan_l in {0, 1} (plan)
//! h_l = h_{l-1} + g_l · (layer_l(h_{l-1}) − h_{l-1})         (g_l = 1 for unrouted layers)
//! L   = CE(final_norm(h_L) · W_headᵀ, completion targets) + λ · mean_l p_l
//!       [+ μ · |mean_l p_l − keep_target|]
//! ```
//!
//! The forward keeps each layer's input `h_{l-1}` only (`[T, d]` per layer). The backward walks
//! the layers from the last: it recomputes layer l from `h_{l-1}` (every intermediate kept in
//! one shared set), adds `∂L/∂p_l = <∂L/∂h_l, layer_l(h_{l-1}) − h_{l-1}>` to the router's
//! gradient buffer (the straight-through estimator: the gate's value is `z_l` and its gradient
//! that of `p_l`), and back-propagates `g_l · ∂L/∂h_l` through the layer (skipped when
//! `g_l = 0`) and `(1 − g_l) · ∂L/∂h_l` past it. The router's own backward adds its share to
//! `∂L/∂h_{l-1}` on the prompt rows.
//!
//! With the score gate ([`GateRule::Score`]) there is no backward through the model: the routers
//! get the score-function gradient of the drawn plan, with the full model's cross-entropy as the
//! baseline.
//!
//! LoRA groups (the stacked q|k|v, o, gate|up, down of [`GpuLora`]) get `dA = s · (dY B)ᵀ x`
//! and `dB = s · dYᵀ (x Aᵀ)` on the diagonal blocks of the stacked B only, so the zero blocks
//! stay zero under AdamW (their gradient and moments are zero).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use crate::gpu::{DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, Phase};
use crate::kernels::adamw::{AdamWBuffer, AdamWConfig, AdamWOp, AdamWParams, adamw};
use crate::kernels::add::add_inplace;
use crate::kernels::attention::AttnShape;
use crate::kernels::attention_backward::{AttnBackwardOp, attention_backward};
use crate::kernels::choice::matmul_variant;
use crate::kernels::copy::copy;
use crate::kernels::cross_entropy::{CrossEntropyOp, cross_entropy};
use crate::kernels::gate::{GateBackwardOp, gate_backward, gate_mix};
use crate::kernels::grad_clip::{ClipResult, GradClip};
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::matmul;
use crate::kernels::matmul_tn::{MatmulTnOp, matmul_tn};
use crate::kernels::rmsnorm::{RmsNormOp, rmsnorm};
use crate::kernels::rmsnorm_backward::{RmsNormBackwardOp, rmsnorm_backward};
use crate::kernels::rope::RopeTables;
use crate::kernels::rope_backward::{RopeBackwardOp, rope_qkv_backward};
use crate::kernels::router::{RouterWeights, router_gate};
use crate::kernels::router_backward::{RouterBackwardOp, RouterGrads, router_backward};
use crate::kernels::step::{StepBuffer, StepParams};
use crate::kernels::swiglu::swiglu_backward;
use crate::model::lora::{LoraAdapter, Projection};
use crate::model::routers::{RouterFile, RouterLayer};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::lora::{GpuLora, GpuLoraPair};
use crate::runtime::plan::{PlanDecider, PlanPolicy};
use crate::runtime::routed::GpuRouters;
use crate::runtime::step::{Activations, KeptActivations, StepBuffers, StepBuilder};
use crate::runtime::{GpuWeights, LayerPlan, RuntimeError};

use super::checkpoint::CheckpointTensor;

/// How a routed layer's gate `g_l` follows from its router's probability `p_l`.
#[derive(Debug, Clone, PartialEq)]
pub enum GateRule {
    /// `z_l ~ Bernoulli(p_l)`, drawn once per sequence; the forward uses `z_l`, the backward
    /// the straight-through gradient of `p_l` (`--gate hard`, the default).
    Hard,
    /// `g_l = p_l` (`--gate soft`): every layer is mixed in by its probability.
    Soft,
    /// `z_l ~ Bernoulli(p_l)` as [`GateRule::Hard`], with the score-function (REINFORCE)
    /// gradient instead of the straight-through one (`--gate score`, routers only): the pass is
    /// a forward only, and each routed layer gets `∂L/∂p_l = ∂R/∂p_l + (L(z) − b) · (z_l − p_l)
    /// / (p_l (1 − p_l))`, where `L(z) = CE(z) + R` is the sequence's loss under the drawn plan
    /// and the baseline `b` is its cross-entropy with every layer run (a forward of its own;
    /// any baseline that does not depend on z leaves the estimate unbiased). Its mean is the
    /// gradient of the expected loss over the draws (Williams 1992, "Simple statistical
    /// gradient-following algorithms"): it prices removing the whole layer, where the
    /// straight-through gradient is a first-order slope at the drawn plan.
    Score,
    /// The inference plan: layers run or are skipped as `run` would decide with this policy
    /// (routers frozen; `--stage lora`).
    Plan(PlanPolicy),
    /// A fixed plan `[n_layers]` (true: the layer runs), whatever the routers say: a static plan,
    /// or the full model (`--stage lora` without routers or with a static plan's file).
    Fixed(Vec<bool>),
}

/// What one training run trains and how (the parts of `firstrt train`'s options the engine uses).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Longest sequence (tokens) the buffers hold: `--ctx`.
    pub ctx_len: usize,
    /// How gates follow from probabilities.
    pub gate: GateRule,
    /// Train the routers (their gradients are computed and AdamW updates them).
    pub train_routers: bool,
    /// Train the LoRA adapter.
    pub train_lora: bool,
    /// λ: weight of `mean_l p_l` in the loss (FiRST uses 0.01).
    pub lambda: f32,
    /// `(keep_target, μ)`: adds `μ · |mean_l p_l − keep_target|` to the loss.
    pub keep_target: Option<(f32, f32)>,
    /// AdamW's hyperparameters (the learning rate may be changed per step).
    pub adamw: AdamWConfig,
    /// Global gradient-norm clipping threshold (of the batch-mean gradient).
    pub max_grad_norm: f32,
}

/// What one sequence's pass measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceStats {
    /// Mean cross-entropy over the completion targets (nats).
    pub ce: f32,
    /// Router probabilities `[n_layers]` (None: no router).
    pub probs: Vec<Option<f32>>,
    /// Gates used `[n_layers]` (1 for unrouted layers).
    pub gates: Vec<f32>,
    /// Layers whose gate was 0 (skipped).
    pub skipped: usize,
    /// The regulariser's value `λ · mean p (+ μ |mean p − target|)`; 0 without routers.
    pub reg: f32,
}

impl SequenceStats {
    /// The sequence's loss: cross-entropy plus the router regulariser.
    pub fn loss(&self) -> f32 {
        self.ce + self.reg
    }

    /// Mean router probability over routed layers, if any.
    pub fn mean_p(&self) -> Option<f32> {
        let ps: Vec<f32> = self.probs.iter().flatten().copied().collect();
        (!ps.is_empty()).then(|| ps.iter().sum::<f32>() / ps.len() as f32)
    }
}

/// One trained tensor (f32) with its gradient (summed over the batch) and AdamW moments.
#[derive(Debug)]
pub struct Param {
    /// Stable name, used by checkpoints: `router.{l}.{norm|w1|b1|w2|b2}`,
    /// `lora.{l}.{qkv|o|gate_up|down}.{A|B}`.
    pub name: String,
    /// The parameter, updated in place (shares its buffer with the model's router or adapter).
    pub value: GpuTensor,
    /// Its gradient, same size.
    pub grad: GpuTensor,
    /// AdamW's first moment.
    pub m: GpuTensor,
    /// AdamW's second moment.
    pub v: GpuTensor,
}

impl Param {
    fn new(ctx: &GpuContext, name: String, value: GpuTensor, grad: GpuTensor) -> Result<Param, GpuError> {
        let shape = value.shape.clone();
        let m = GpuTensor::zeros(ctx, &format!("{name}.m"), DType::F32, &shape)?;
        let v = GpuTensor::zeros(ctx, &format!("{name}.v"), DType::F32, &shape)?;
        Ok(Param { name, value, grad, m, v })
    }
}

/// One LoRA group's gradient buffers and where its projections sit in the stacked matrices.
#[derive(Debug)]
struct LoraGroupGrads {
    /// `[inner, in]`.
    a: GpuTensor,
    /// `[out_total, inner]`; only the diagonal blocks are ever written.
    b: GpuTensor,
    /// Per targeted projection: (first row in the group's output, its rows); its columns of B
    /// are `j r .. (j + 1) r` for the j-th entry.
    blocks: Vec<(usize, usize)>,
}

/// The four LoRA groups of a layer, in [`GpuLora`]'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Group {
    const ALL: [Group; 4] = [Group::Qkv, Group::O, Group::GateUp, Group::Down];

    fn name(self) -> &'static str {
        match self {
            Group::Qkv => "qkv",
            Group::O => "o",
            Group::GateUp => "gate_up",
            Group::Down => "down",
        }
    }

    /// The group's projections with (first output row, rows) in a model of `c`.
    fn members(self, c: &crate::model::ModelConfig) -> Vec<(Projection, usize, usize)> {
        let (q, kv, ff, d) = (c.q_dim(), c.kv_dim(), c.d_ff, c.d_model);
        match self {
            Group::Qkv => vec![(Projection::Q, 0, q), (Projection::K, q, kv), (Projection::V, q + kv, kv)],
            Group::O => vec![(Projection::O, 0, d)],
            Group::GateUp => vec![(Projection::Gate, 0, ff), (Projection::Up, ff, ff)],
            Group::Down => vec![(Projection::Down, 0, d)],
        }
    }

    fn pair(self, layer: &crate::runtime::lora::GpuLoraLayer) -> Option<&GpuLoraPair> {
        match self {
            Group::Qkv => layer.qkv.as_ref(),
            Group::O => layer.o.as_ref(),
            Group::GateUp => layer.gate_up.as_ref(),
            Group::Down => layer.down.as_ref(),
        }
    }
}

/// A single-chunk f32 matrix's tensor: what AdamW updates in place.
fn dense_tensor(m: &GpuMatrix) -> Result<GpuTensor, RuntimeError> {
    match m.chunks.as_slice() {
        [c] if c.quant.is_none() && m.dtype == DType::F32 => Ok(c.tensor.clone()),
        _ => Err(RuntimeError::Internal(format!("{}: a trained matrix must be one f32 chunk", m.label))),
    }
}

/// Buffers of the backward pass, `[ctx_len, ·]` f32.
#[derive(Debug)]
struct Grads {
    /// ∂L/∂h of the current layer boundary `[T, d]`, and its swap partner.
    dh: GpuTensor,
    dh_alt: GpuTensor,
    /// The gated gradient entering a layer's output `[T, d]`.
    dy: GpuTensor,
    /// ∂L/∂(residual between the halves) `[T, d]`.
    d_mid: GpuTensor,
    /// ∂L/∂(a norm's output) `[T, d]`.
    d_xn: GpuTensor,
    /// `[T, d_ff]`, `[T, 2 d_ff]`.
    d_act: GpuTensor,
    d_gate_up: GpuTensor,
    /// `[T, q_dim]` each.
    d_attn: GpuTensor,
    dq: GpuTensor,
    /// `[T, kv_dim]` each.
    dk: GpuTensor,
    dv: GpuTensor,
    /// `[T, q_dim + 2 kv_dim]`.
    d_qkv: GpuTensor,
    /// LoRA `dY · B` `[T, max_inner]`.
    lora_t: GpuTensor,
    /// The final norm's output and its gradient `[T, d]`.
    hn: GpuTensor,
    d_hn: GpuTensor,
}

/// The training engine of one model: weights frozen, routers and/or a LoRA adapter trained.
#[derive(Debug)]
pub struct Engine {
    ctx: Arc<GpuContext>,
    weights: Arc<GpuWeights>,
    options: EngineOptions,
    /// The router file being trained (its tensors are read back from `routers`).
    router_file: Option<RouterFile>,
    routers: Option<GpuRouters>,
    /// `[n_layers]`: router gradients of routed layers (when training routers).
    router_grads: Vec<Option<RouterGrads>>,
    lora: Option<GpuLora>,
    /// `[n_layers][group]` (when training LoRA).
    lora_grads: Vec<[Option<LoraGroupGrads>; 4]>,
    /// The trained tensors, in a fixed order: routers by layer, then LoRA by layer and group.
    params: Vec<Param>,
    bufs: StepBuffers,
    acts: Activations,
    kept: KeptActivations,
    /// `h_0 .. h_L`, `[ctx_len, d]` each.
    saved: Vec<GpuTensor>,
    grads: Grads,
    /// Targets `[ctx_len]` u32: the scored rows' next tokens. The cross-entropy's row mask
    /// `[ctx_len]` u32 is all ones (written once): only completion rows are ever scored.
    targets: GpuTensor,
    mask: GpuTensor,
    /// `[1]` f32.
    loss: GpuTensor,
    /// ∂L/∂p_l `[n_layers]` f32.
    dp: GpuTensor,
    adamw: AdamWBuffer,
    clip: Option<GradClip>,
    /// Batch size the clip's scale was prepared for.
    clip_batch: usize,
}

impl Engine {
    /// Prepares training on `weights` with `routers` (required when training routers or when
    /// the gate rule uses them) and `lora` (required when training LoRA; an adapter that is not
    /// trained is applied frozen). Allocates every buffer for sequences of up to
    /// `options.ctx_len` tokens.
    ///
    /// # Errors
    /// [`RuntimeError::Internal`] when what is trained is missing or the adapter's matrices are
    /// not single f32 chunks; [`RuntimeError::Lora`] when its targets differ between layers; GPU
    /// allocation errors (a buffer
    /// over the binding limit names its size).
    pub fn new(
        weights: Arc<GpuWeights>,
        routers: Option<RouterFile>,
        lora: Option<&LoraAdapter>,
        options: EngineOptions,
    ) -> Result<Engine, RuntimeError> {
        let ctx = weights.ctx.clone();
        let c = weights.config.clone();
        let (n, d, t) = (c.n_layers, c.d_model, options.ctx_len);
        if t < 2 {
            return Err(RuntimeError::Internal(format!("training needs --ctx of at least 2 tokens, got {t}")));
        }
        if options.train_routers && routers.is_none() {
            return Err(RuntimeError::Internal("training routers needs a router file".into()));
        }
        if options.train_routers && matches!(options.gate, GateRule::Fixed(_)) {
            return Err(RuntimeError::Internal("routers cannot be trained under a fixed plan".into()));
        }
        if options.gate == GateRule::Score && (options.train_lora || !options.train_routers) {
            return Err(RuntimeError::Internal("the score-function gate trains routers alone (the routers stage)".into()));
        }
        if options.train_lora && lora.is_none() {
            return Err(RuntimeError::Internal("training LoRA needs an adapter".into()));
        }
        let gpu_routers = routers.as_ref().map(|f| GpuRouters::upload(&ctx, f)).transpose()?;
        let gpu_lora = lora.map(|a| GpuLora::upload(&ctx, a, &c)).transpose()?;
        let mut params = Vec::new();
        let mut router_grads: Vec<Option<RouterGrads>> = (0..n).map(|_| None).collect();
        if options.train_routers
            && let Some(r) = &gpu_routers
        {
            let file = routers.as_ref().expect("checked above");
            for (l, w) in r.layers.iter().enumerate() {
                let protected = !file.skip_first_last && (l == 0 || l + 1 == n);
                let Some(w) = w.as_ref().filter(|_| !protected) else { continue };
                let g = RouterGrads::zeros(&ctx, &format!("router.{l}.grad"), w)?;
                let names = ["norm", "w1", "b1", "w2", "b2"];
                for ((what, value), grad) in names.into_iter().zip(w.tensors()).zip(g.tensors()) {
                    params.push(Param::new(&ctx, format!("router.{l}.{what}"), value.clone(), grad.clone())?);
                }
                router_grads[l] = Some(g);
            }
        }
        let mut lora_grads: Vec<[Option<LoraGroupGrads>; 4]> = (0..n).map(|_| Default::default()).collect();
        if options.train_lora
            && let Some(g) = &gpu_lora
        {
            for (l, layer) in g.layers.iter().enumerate() {
                for (gi, group) in Group::ALL.into_iter().enumerate() {
                    let Some(pair) = group.pair(layer) else { continue };
                    let blocks: Vec<(usize, usize)> =
                        group.members(&c).into_iter().filter(|(p, _, _)| g.targets.contains(p)).map(|(_, off, out)| (off, out)).collect();
                    if pair.a.rows != blocks.len() * g.rank {
                        return Err(RuntimeError::Lora(crate::model::lora::LoraError::Invalid {
                            what: format!(
                                "layer {l} {}: the targets differ between layers; such an adapter cannot be trained",
                                group.name()
                            ),
                        }));
                    }
                    let name = format!("lora.{l}.{}", group.name());
                    let ga = GpuTensor::zeros(&ctx, &format!("{name}.A.grad"), DType::F32, &[pair.a.rows, pair.a.cols])?;
                    let gb = GpuTensor::zeros(&ctx, &format!("{name}.B.grad"), DType::F32, &[pair.b.rows, pair.b.cols])?;
                    params.push(Param::new(&ctx, format!("{name}.A"), dense_tensor(&pair.a)?, ga.clone())?);
                    params.push(Param::new(&ctx, format!("{name}.B"), dense_tensor(&pair.b)?, gb.clone())?);
                    lora_grads[l][gi] = Some(LoraGroupGrads { a: ga, b: gb, blocks });
                }
            }
        }
        let mut kv = KvCache::empty(&ctx, n, t, c.kv_dim())?;
        kv.fit(&ctx, &LayerPlan::full(n))?;
        let scaling = c.rope_scaling.as_ref().map(|s| crate::kernels::rope::RopeScalingParams {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position: s.original_max_position_embeddings,
        });
        let max_inner = gpu_lora.as_ref().map_or(1, GpuLora::max_inner);
        let f32_buf = |name: &str, cols: usize| GpuTensor::zeros_bound(&ctx, name, DType::F32, &[t, cols]);
        let bufs = StepBuffers {
            kv,
            rope: RopeTables::new(&ctx, c.head_dim, c.rope_theta, scaling.as_ref(), t)?,
            step: StepBuffer::new(&ctx),
            final_row: GpuTensor::zeros(&ctx, "final_row", DType::F32, &[1, d])?,
            logits: GpuTensor::zeros(&ctx, "logits", DType::F32, &[1])?,
            candidates: 1,
            picked: GpuTensor::zeros(&ctx, "picked", DType::U32, &[2])?,
            router_probs: GpuTensor::zeros(&ctx, "router_probs", DType::F32, &[n])?,
            lora_tmp: Some(f32_buf("lora_a", max_inner)?),
        };
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let grads = Grads {
            dh: f32_buf("dh", d)?,
            dh_alt: f32_buf("dh_alt", d)?,
            dy: f32_buf("dy", d)?,
            d_mid: f32_buf("d_mid", d)?,
            d_xn: f32_buf("d_xn", d)?,
            d_act: f32_buf("d_act", c.d_ff)?,
            d_gate_up: f32_buf("d_gate_up", 2 * c.d_ff)?,
            d_attn: f32_buf("d_attn", qd)?,
            dq: f32_buf("dq", qd)?,
            dk: f32_buf("dk", kvd)?,
            dv: f32_buf("dv", kvd)?,
            d_qkv: f32_buf("d_qkv", qd + 2 * kvd)?,
            lora_t: f32_buf("lora_t", max_inner)?,
            hn: f32_buf("hn", d)?,
            d_hn: f32_buf("d_hn", d)?,
        };
        let saved = (0..=n).map(|l| f32_buf(&format!("h{l}"), d)).collect::<Result<Vec<_>, _>>()?;
        let adamw = AdamWBuffer::new(&ctx, &AdamWParams::new(&options.adamw, 1)?);
        Ok(Engine {
            acts: Activations::new(&ctx, &weights, t)?,
            kept: KeptActivations::new(&ctx, t, d)?,
            targets: GpuTensor::zeros(&ctx, "targets", DType::U32, &[t])?,
            mask: GpuTensor::from_u32(&ctx, "mask", &[t], &vec![1; t])?,
            loss: GpuTensor::zeros(&ctx, "loss", DType::F32, &[1])?,
            dp: GpuTensor::zeros(&ctx, "dp", DType::F32, &[n])?,
            ctx,
            weights,
            options,
            router_file: routers,
            routers: gpu_routers,
            router_grads,
            lora: gpu_lora,
            lora_grads,
            params,
            bufs,
            saved,
            grads,
            adamw,
            clip: None,
            clip_batch: 0,
        })
    }

    /// The trained tensors (routers by layer, then LoRA by layer and group), for checkpoints.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The device.
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The options the engine was made with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Forward and backward of one sequence: `ids` `[T]` (2 <= T <= ctx_len) whose first
    /// `prompt_len` tokens (>= 1, < T) are the prompt; the targets are `ids[t + 1]` for
    /// `t` in `prompt_len - 1 .. T - 1`. Gradients are added to the trained tensors' gradient
    /// buffers (call [`Engine::step`] after the batch). `seed` draws the hard gates.
    ///
    /// # Errors
    /// [`RuntimeError::Internal`] for sizes out of range; GPU errors.
    pub fn accumulate(&mut self, ids: &[u32], prompt_len: usize, seed: u64) -> Result<SequenceStats, RuntimeError> {
        let rule = self.options.gate.clone();
        let baseline = if rule == GateRule::Score {
            let full = GateRule::Fixed(vec![true; self.weights.config.n_layers]);
            Some(self.forward(ids, prompt_len, seed, &full, false, None)?.ce)
        } else {
            None
        };
        self.forward(ids, prompt_len, seed, &rule, true, baseline)
    }

    /// The forward pass only (no gradient) of one sequence with gates chosen by `rule` (as
    /// [`Engine::accumulate`] would with the same `seed` when it is the training rule; with
    /// [`GateRule::Plan`], the loss under the inference plan). Errors: as [`Engine::accumulate`],
    /// and a plan rule without routers.
    pub fn evaluate(&mut self, ids: &[u32], prompt_len: usize, seed: u64, rule: &GateRule) -> Result<SequenceStats, RuntimeError> {
        self.forward(ids, prompt_len, seed, rule, false, None)
    }

    /// Whether layer l's router decides its gate: it has one and the file does not protect it
    /// (layer 0 and the last layer run unless the file's `skip_first_last`).
    fn routed(&self, l: usize) -> Option<&RouterWeights> {
        let file = self.router_file.as_ref()?;
        let n = self.weights.config.n_layers;
        let protected = !file.skip_first_last && (l == 0 || l + 1 == n);
        if protected { None } else { self.routers.as_ref()?.layers[l].as_ref() }
    }

    fn builder<'a>(&'a self, plan: &'a LayerPlan, lora: Option<&'a GpuLora>) -> StepBuilder<'a> {
        StepBuilder { ctx: &self.ctx, weights: &self.weights, lora: lora.map(|g| (g, 1.0)), bufs: &self.bufs, plan, phase: Phase::Prefill }
    }

    /// The activations with the residual stream `x` replaced by `x` (the layer updates it in place).
    fn acts_on(&self, x: &GpuTensor) -> Activations {
        let a = &self.acts;
        Activations {
            rows: a.rows,
            ids: a.ids.clone(),
            x: x.clone(),
            xn: a.xn.clone(),
            qkv: a.qkv.clone(),
            q: a.q.clone(),
            attn: a.attn.clone(),
            gate_up: a.gate_up.clone(),
            act: a.act.clone(),
        }
    }

    fn forward(
        &mut self,
        ids: &[u32],
        prompt_len: usize,
        seed: u64,
        rule: &GateRule,
        backward: bool,
        baseline: Option<f32>,
    ) -> Result<SequenceStats, RuntimeError> {
        let t = ids.len();
        let c = self.weights.config.clone();
        let n = c.n_layers;
        if t < 2 || t > self.options.ctx_len || prompt_len == 0 || prompt_len >= t {
            return Err(RuntimeError::Internal(format!(
                "a training sequence needs 2..={} tokens and a prompt of 1..{t} (got {t} tokens, prompt {prompt_len})",
                self.options.ctx_len
            )));
        }
        // Inputs: ids, the step uniform, and the tail's rows: only positions c0 = P - 1 .. T - 2
        // predict a completion token (ids[c0 + 1 ..]), so the final norm and the cross-entropy
        // run over those `scored` rows alone, all counted.
        self.acts.ids.write_u32(&self.ctx, ids);
        self.bufs.step.write(&self.ctx, &StepParams::new(0, t));
        let (c0, scored) = (prompt_len - 1, t - prompt_len);
        self.targets.write_u32(&self.ctx, &ids[prompt_len..]);

        let plan = LayerPlan::full(n);
        let lora = self.lora.as_ref();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut decider = match rule {
            GateRule::Plan(policy) => {
                let has: Vec<bool> = (0..n).map(|l| self.routed(l).is_some()).collect();
                if !has.contains(&true) {
                    return Err(RuntimeError::Internal("the plan gate needs routers".into()));
                }
                Some(PlanDecider::new(has, policy.clone()))
            }
            _ => None,
        };
        let mut probs: Vec<Option<f32>> = vec![None; n];
        let mut gates = vec![1.0f32; n];
        if let GateRule::Fixed(run) = rule {
            if run.len() != n {
                return Err(RuntimeError::Internal(format!("a fixed plan of {} layers for a model of {n}", run.len())));
            }
            gates = run.iter().map(|&r| f32::from(u8::from(r))).collect();
        }
        let mut segment: Vec<Dispatch> = Vec::new();
        {
            let b = self.builder(&plan, lora);
            segment.extend(b.head(&self.acts_on(&self.saved[0]), t)?);
        }
        let fixed = matches!(rule, GateRule::Fixed(_));
        for l in 0..n {
            if let Some(rw) = self.routed(l).filter(|_| !fixed) {
                segment.extend(router_gate(
                    &self.ctx,
                    &format!("train.{l}.router"),
                    &self.saved[l],
                    prompt_len,
                    rw,
                    &self.bufs.router_probs,
                    l,
                )?);
                self.run(&segment, "train.forward")?;
                segment.clear();
                let raw = crate::gpu::buffer::read_buffer(&self.ctx, &self.bufs.router_probs.buffer, 4 * l as u64, 4, "router.probs")?;
                let p = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                probs[l] = Some(p);
                // One uniform draw per routed layer whatever the rule, so that runs with other
                // rules see the same stream.
                let u: f32 = rng.random();
                gates[l] = match rule {
                    GateRule::Hard | GateRule::Score => f32::from(u8::from(u < p)),
                    GateRule::Soft => p,
                    GateRule::Plan(_) => f32::from(u8::from(decider.as_mut().expect("plan rule has a decider").decide(l, Some(p))?)),
                    GateRule::Fixed(_) => gates[l],
                };
            } else if let Some(dec) = decider.as_mut() {
                dec.decide(l, None)?;
            }
            let (h, y) = (&self.saved[l], &self.saved[l + 1]);
            segment.push(copy(&self.ctx, &format!("train.{l}.carry"), h, y)?);
            if gates[l] != 0.0 {
                let b = self.builder(&plan, lora);
                segment.extend(b.layer(&self.acts_on(y), t, l)?);
                if gates[l] != 1.0 {
                    segment.push(gate_mix(&self.ctx, &format!("train.{l}.gate"), h, y, t * c.d_model, gates[l])?);
                }
            }
        }
        // Tail: final norm and the cross-entropy (with ∂L/∂hn when training).
        let norm =
            RmsNormOp { x: &self.saved[n], x_row0: c0, rows: scored, weight: &self.weights.final_norm, y: &self.grads.hn, eps: c.rms_eps };
        segment.push(rmsnorm(&self.ctx, "train.final_norm", &norm)?);
        let ce = CrossEntropyOp {
            dh: backward.then_some(&self.grads.d_hn),
            ..CrossEntropyOp::new(&self.grads.hn, scored, self.weights.output(), &self.targets, &self.mask, &self.loss)
        };
        segment.extend(cross_entropy(&self.ctx, "train.cross_entropy", &ce)?);

        let routed: Vec<f32> = probs.iter().flatten().copied().collect();
        let (reg, dreg) = regulariser(&routed, self.options.lambda, self.options.keep_target);
        if backward && *rule == GateRule::Score {
            let baseline = baseline.ok_or_else(|| RuntimeError::Internal("the score-function gate needs a baseline".into()))?;
            return self.score_backward(segment, prompt_len, probs, gates, reg, dreg, baseline);
        }
        if backward {
            // ∂L/∂h_L is zero on the rows the loss does not read.
            self.ctx.queue.write_buffer(&self.grads.dh.buffer, 0, &vec![0u8; 4 * t * c.d_model]);
            let bw = RmsNormBackwardOp {
                x: &self.saved[n],
                x_row0: c0,
                dy: &self.grads.d_hn,
                weight: &self.weights.final_norm,
                rows: scored,
                dx: &self.grads.dh,
                accumulate_dx: false,
                dw: None,
                accumulate_dw: false,
                eps: c.rms_eps,
            };
            segment.extend(rmsnorm_backward(&self.ctx, "train.final_norm.backward", &bw)?);
            // ∂(regulariser)/∂p_l for routed layers; the gates add <∂L/∂h_l, Δ_l>.
            let dp_init: Vec<f32> = probs.iter().map(|p| if p.is_some() { dreg } else { 0.0 }).collect();
            self.dp.write_f32(&self.ctx, &dp_init);
            self.backward(&mut segment, t, prompt_len, &gates)?;
        }
        self.run(&segment, "train.backward")?;
        let ce = self.loss.read_f32(&self.ctx)?[0];
        let skipped = gates.iter().filter(|&&g| g == 0.0).count();
        Ok(SequenceStats { ce, probs, gates, skipped, reg })
    }

    /// The score-function gradient ([`GateRule::Score`]) of one sequence whose forward is
    /// recorded in `segment`: runs it, reads the cross-entropy, and adds each routed layer's
    /// `∂R/∂p_l + (CE + R − baseline) · (z_l − p_l) / (p_l (1 − p_l))` through its router's
    /// backward (the router's input `h_{l-1}` is still in `saved[l]`; nothing flows into h).
    #[allow(clippy::too_many_arguments)]
    fn score_backward(
        &mut self,
        mut segment: Vec<Dispatch>,
        prompt_len: usize,
        probs: Vec<Option<f32>>,
        gates: Vec<f32>,
        reg: f32,
        dreg: f32,
        baseline: f32,
    ) -> Result<SequenceStats, RuntimeError> {
        self.run(&segment, "train.forward")?;
        segment.clear();
        let ce = self.loss.read_f32(&self.ctx)?[0];
        let advantage = ce + reg - baseline;
        let dp: Vec<f32> = probs
            .iter()
            .zip(&gates)
            // A saturated router (p(1 − p) below f32's reach) has no gradient through its sigmoid.
            .map(|(p, &z)| p.map_or(0.0, |p| dreg + advantage * (z - p) / (p * (1.0 - p)).max(1e-20)))
            .collect();
        self.dp.write_f32(&self.ctx, &dp);
        for l in 0..self.weights.config.n_layers {
            if let (Some(rw), Some(rg)) = (self.routed(l), self.router_grads[l].as_ref()) {
                let op = RouterBackwardOp { h: &self.saved[l], rows: prompt_len, weights: rw, dp: &self.dp, slot: l, grads: rg, dh: None };
                segment.extend(router_backward(&self.ctx, &format!("train.{l}.router.backward"), &op)?);
            }
        }
        self.run(&segment, "train.router_backward")?;
        let skipped = gates.iter().filter(|&&g| g == 0.0).count();
        Ok(SequenceStats { ce, probs, gates, skipped, reg })
    }

    /// Records the backward pass of every layer, last first, after the tail's backward left
    /// ∂L/∂h_L in `grads.dh`.
    fn backward(&mut self, segment: &mut Vec<Dispatch>, t: usize, prompt_len: usize, gates: &[f32]) -> Result<(), RuntimeError> {
        let c = self.weights.config.clone();
        let n = c.n_layers;
        let plan = LayerPlan::full(n);
        for l in (0..n).rev() {
            let g = gates[l];
            let router = self.routed(l);
            let router_grads = self.router_grads[l].as_ref().filter(|_| router.is_some());
            // A layer needs recomputing when its gradient flows through it or its router learns.
            if g == 0.0 && router_grads.is_none() {
                continue;
            }
            let (h, y) = (&self.saved[l], &self.saved[l + 1]);
            // Recompute the layer from its input, keeping every intermediate; y is free again (its
            // value was only needed as the next layer's input, whose backward is done).
            segment.push(copy(&self.ctx, &format!("train.{l}.recompute.carry"), h, y)?);
            {
                let b = self.builder(&plan, self.lora.as_ref());
                segment.extend(b.layer_keeping(&self.acts_on(y), t, l, Some(&self.kept))?);
            }
            let mut swapped = false;
            if let Some(rg) = router_grads {
                let op = GateBackwardOp { dh: &self.grads.dh, h, y, n: t * c.d_model, g, dy: &self.grads.dy, dp: &self.dp, slot: l };
                segment.extend(gate_backward(&self.ctx, &format!("train.{l}.gate.backward"), &op)?);
                if g != 0.0 {
                    self.layer_backward(segment, l, t, &self.grads.dy, &self.grads.dh, true)?;
                }
                let rw = router.expect("router gradients exist only for routed layers");
                let op = RouterBackwardOp { h, rows: prompt_len, weights: rw, dp: &self.dp, slot: l, grads: rg, dh: Some(&self.grads.dh) };
                segment.extend(router_backward(&self.ctx, &format!("train.{l}.router.backward"), &op)?);
            } else if g == 1.0 {
                self.layer_backward(segment, l, t, &self.grads.dh, &self.grads.dh_alt, false)?;
                swapped = true;
            } else {
                // A fractional gate with a frozen router: ∂L/∂h_{l-1} = (1 − g) dh + J^T (g dh).
                let op = GateBackwardOp { dh: &self.grads.dh, h, y, n: t * c.d_model, g, dy: &self.grads.dy, dp: &self.dp, slot: l };
                segment.extend(gate_backward(&self.ctx, &format!("train.{l}.gate.backward"), &op)?);
                self.layer_backward(segment, l, t, &self.grads.dy, &self.grads.dh, true)?;
            }
            if swapped {
                std::mem::swap(&mut self.grads.dh, &mut self.grads.dh_alt);
            }
        }
        Ok(())
    }

    /// Records layer l's backward after its recomputation (`self.acts`/`self.kept` hold its
    /// intermediates, `saved[l]` its input): from `dy` (∂L/∂ its output) into `out` (∂L/∂ its
    /// input, residual path included), overwritten or accumulated; adds the adapter's gradients.
    fn layer_backward(
        &self,
        p: &mut Vec<Dispatch>,
        l: usize,
        t: usize,
        dy: &GpuTensor,
        out: &GpuTensor,
        accumulate: bool,
    ) -> Result<(), RuntimeError> {
        let (ctx, c, lw, a, k, g) = (&*self.ctx, &self.weights.config, &self.weights.layers[l], &self.acts, &self.kept, &self.grads);
        let at = |what: &str| format!("train.{l}.{what}");
        let h = &self.saved[l];
        // MLP half: y = x_mid + down(swiglu(gate_up(norm(x_mid)))).
        p.push(copy(ctx, &at("mlp.residual"), dy, &g.d_mid)?);
        self.project_backward(p, l, Group::Down, &lw.down, &a.act, dy, &g.d_act, t)?;
        p.push(swiglu_backward(ctx, &at("mlp.act.backward"), &a.gate_up, &g.d_act, t, c.d_ff, &g.d_gate_up)?);
        self.project_backward(p, l, Group::GateUp, &lw.gate_up, &a.xn, &g.d_gate_up, &g.d_xn, t)?;
        let norm = |x, dy, weight, dx| RmsNormBackwardOp {
            x,
            x_row0: 0,
            dy,
            weight,
            rows: t,
            dx,
            accumulate_dx: true,
            dw: None,
            accumulate_dw: false,
            eps: c.rms_eps,
        };
        p.extend(rmsnorm_backward(ctx, &at("mlp.norm.backward"), &norm(&k.x_mid, &g.d_xn, &lw.ffn_norm, &g.d_mid))?);
        // Attention half: x_mid = h + o(attention(rope(qkv(norm(h))))).
        if accumulate {
            p.push(add_inplace(ctx, &at("attn.residual"), out, &g.d_mid, t * c.d_model)?);
        } else {
            p.push(copy(ctx, &at("attn.residual"), &g.d_mid, out)?);
        }
        self.project_backward(p, l, Group::O, &lw.o, &a.attn, &g.d_mid, &g.d_attn, t)?;
        let kv = self.bufs.kv.layer(l).ok_or_else(|| RuntimeError::Internal(format!("layer {l} has no K/V buffers")))?;
        let shape = AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let op =
            AttnBackwardOp { q: &a.q, k: &kv.k, v: &kv.v, out: &a.attn, d_out: &g.d_attn, rows: t, shape, dq: &g.dq, dk: &g.dk, dv: &g.dv };
        p.extend(attention_backward(ctx, &at("attn.core.backward"), &op)?);
        let op = RopeBackwardOp {
            dq: &g.dq,
            dk: &g.dk,
            dv: &g.dv,
            rows: t,
            shape,
            tables: &self.bufs.rope,
            step: &self.bufs.step,
            d_qkv: &g.d_qkv,
        };
        p.push(rope_qkv_backward(ctx, &at("attn.rope.backward"), &op)?);
        self.project_backward(p, l, Group::Qkv, &lw.qkv, &k.xn_attn, &g.d_qkv, &g.d_xn, t)?;
        p.extend(rmsnorm_backward(ctx, &at("attn.norm.backward"), &norm(h, &g.d_xn, &lw.attn_norm, out))?);
        Ok(())
    }

    /// Backward of projection group `group` of layer l, `y = x Wᵀ (+ s (x Aᵀ) Bᵀ)`: writes
    /// `dx = dy W (+ s (dy B) A)` and, when the adapter is trained, adds `dA` and `dB`.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        p: &mut Vec<Dispatch>,
        l: usize,
        group: Group,
        w: &GpuMatrix,
        x: &GpuTensor,
        dy: &GpuTensor,
        dx: &GpuTensor,
        t: usize,
    ) -> Result<(), RuntimeError> {
        let ctx = &*self.ctx;
        let label = format!("train.{l}.{}.backward", group.name());
        let variant = matmul_variant(ctx, t);
        p.extend(matmul(ctx, &format!("{label}.dx"), &LinearOp::new_xw(dy, t, w, dx), variant)?);
        let Some(lora) = &self.lora else { return Ok(()) };
        let Some(pair) = group.pair(&lora.layers[l]) else { return Ok(()) };
        let s = lora.scaling;
        let inner = pair.a.rows;
        let lora_t = &self.grads.lora_t;
        // t = dy · B `[T, inner]`; dx += s · t · A.
        p.extend(matmul(ctx, &format!("{label}.lora_t"), &LinearOp::new_xw(dy, t, &pair.b, lora_t), variant)?);
        p.extend(matmul(ctx, &format!("{label}.lora_dx"), &LinearOp::new_xw(lora_t, t, &pair.a, dx).accumulate(true).scale(s), variant)?);
        let Some(gg) = &self.lora_grads[l][Group::ALL.iter().position(|&g| g == group).expect("group in ALL")] else { return Ok(()) };
        // dA += s · tᵀ x `[inner, in]`.
        let d_in = pair.a.cols;
        p.push(matmul_tn(ctx, &format!("{label}.lora_dA"), &MatmulTnOp::new(lora_t, x, t, inner, d_in, &gg.a).accumulate(true).scale(s))?);
        // a = x Aᵀ `[T, inner]`; dB block j += s · dy[:, off..off + out]ᵀ a[:, j r..(j + 1) r].
        let a_tmp = self.bufs.lora_tmp.as_ref().expect("allocated with the engine");
        p.extend(matmul(ctx, &format!("{label}.lora_a"), &LinearOp::new(x, t, &pair.a, a_tmp), variant)?);
        let out_total = pair.b.rows;
        for (j, &(off, out)) in gg.blocks.iter().enumerate() {
            let r = lora.rank;
            let op = MatmulTnOp::new(dy, a_tmp, t, out, r, &gg.b)
                .p_layout(out_total, off)
                .q_layout(inner, j * r)
                .c_layout(inner, off * inner + j * r)
                .accumulate(true)
                .scale(s);
            p.push(matmul_tn(ctx, &format!("{label}.lora_dB[{j}]"), &op)?);
        }
        Ok(())
    }

    fn run(&self, dispatches: &[Dispatch], label: &str) -> Result<(), RuntimeError> {
        self.ctx.run(label, &dispatches.iter().collect::<Vec<_>>())?;
        Ok(())
    }

    /// One optimizer step over the gradients summed since the last step: AdamW at step `t`
    /// (from 1) with learning rate `lr` on the clipped batch mean (`1 / batch` of the sums),
    /// then the gradients are zeroed. Returns the gradient norm and clip scale.
    ///
    /// # Errors
    /// [`RuntimeError::Internal`] when nothing is trained or `batch` is 0; GPU errors.
    pub fn step(&mut self, t: u32, lr: f32, batch: usize) -> Result<ClipResult, RuntimeError> {
        if self.params.is_empty() || batch == 0 {
            return Err(RuntimeError::Internal(format!("an optimizer step needs trained tensors and a batch (batch {batch})")));
        }
        if self.clip.is_none() || self.clip_batch != batch {
            let grads: Vec<&GpuTensor> = self.params.iter().map(|p| &p.grad).collect();
            self.clip = Some(GradClip::with_grad_scale(&self.ctx, "train.clip", &grads, self.options.max_grad_norm, 1.0 / batch as f32)?);
            self.clip_batch = batch;
        }
        let clip = self.clip.as_ref().expect("made above");
        self.adamw.write(&self.ctx, &AdamWParams::new(&AdamWConfig { lr, ..self.options.adamw }, t)?);
        let mut p: Vec<Dispatch> = clip.dispatches().to_vec();
        for param in &self.params {
            let op = AdamWOp { params: &param.value, grads: &param.grad, m: &param.m, v: &param.v, hyper: &self.adamw, clip: Some(clip) };
            p.push(adamw(&self.ctx, &format!("train.adamw.{}", param.name), &op)?);
        }
        self.run(&p, "train.step")?;
        let result = clip.read(&self.ctx)?;
        self.zero_grads();
        Ok(result)
    }

    /// Every trained tensor and its AdamW moments by name, for a checkpoint: `{name}`,
    /// `adam.m.{name}`, `adam.v.{name}` per [`Param`]. Errors: read-back errors.
    pub fn state(&self) -> Result<BTreeMap<String, CheckpointTensor>, RuntimeError> {
        let mut out = BTreeMap::new();
        for (name, t) in self.state_tensors() {
            out.insert(name, CheckpointTensor { shape: t.shape.clone(), data: t.read_f32(&self.ctx)? });
        }
        Ok(out)
    }

    /// The names and shapes [`Engine::state`] returns, without reading anything.
    pub fn state_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.state_tensors().into_iter().map(|(name, t)| (name, t.shape.clone())).collect()
    }

    fn state_tensors(&self) -> Vec<(String, &GpuTensor)> {
        let mut v = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            v.push((p.name.clone(), &p.value));
            v.push((format!("adam.m.{}", p.name), &p.m));
            v.push((format!("adam.v.{}", p.name), &p.v));
        }
        v
    }

    /// Restores what [`Engine::state`] saved (a resumed run; check the layout first with
    /// `Checkpoint::check_tensors`). Errors: [`RuntimeError::Internal`] naming the first tensor
    /// that is missing or whose size differs.
    pub fn load_state(&mut self, state: &BTreeMap<String, CheckpointTensor>) -> Result<(), RuntimeError> {
        for (name, t) in self.state_tensors() {
            let s = state.get(&name).ok_or_else(|| RuntimeError::Internal(format!("the saved state has no tensor {name}")))?;
            if s.data.len() != t.numel() {
                return Err(RuntimeError::Internal(format!("saved tensor {name} has {} values, expected {}", s.data.len(), t.numel())));
            }
            t.write_f32(&self.ctx, &s.data);
        }
        Ok(())
    }

    /// Sets every gradient buffer to zero.
    pub fn zero_grads(&self) {
        for p in &self.params {
            self.ctx.queue.write_buffer(&p.grad.buffer, 0, &vec![0u8; p.grad.byte_len()]);
        }
    }

    /// The routers as they are now, as a router file (the file the engine was made with, its
    /// tensors read back). None without routers. Errors: read-back errors.
    pub fn router_file(&self) -> Result<Option<RouterFile>, RuntimeError> {
        let (Some(file), Some(gpu)) = (&self.router_file, &self.routers) else { return Ok(None) };
        let mut out = file.clone();
        for (slot, w) in out.layers.iter_mut().zip(&gpu.layers) {
            if let (Some(layer), Some(w)) = (slot.as_mut(), w) {
                *layer = RouterLayer {
                    norm: w.norm.read_f32(&self.ctx)?,
                    w1: w.w1.read_f32(&self.ctx)?,
                    b1: w.b1.read_f32(&self.ctx)?,
                    w2: w.w2.as_ref().map(|t| t.read_f32(&self.ctx)).transpose()?,
                    b2: w.b2.as_ref().map(|t| t.read_f32(&self.ctx).map(|v| v[0])).transpose()?,
                };
            }
        }
        Ok(Some(out))
    }

    /// The adapter on the GPU (trained in place; `GpuLora::download` reads it back). None
    /// without an adapter.
    pub fn lora(&self) -> Option<&GpuLora> {
        self.lora.as_ref()
    }

    /// Peak GPU memory the context has seen (bytes).
    pub fn peak_bytes(&self) -> u64 {
        self.ctx.memory.peak_bytes()
    }
}

/// The router regulariser of one sequence and its derivative with respect to each routed
/// probability: `R = λ · mean p (+ μ · |mean p − target|)`, `∂R/∂p_l = (λ + μ · sign(mean p −
/// target)) / n` over the n routed probabilities. (0, 0) without routers.
pub fn regulariser(probs: &[f32], lambda: f32, keep_target: Option<(f32, f32)>) -> (f32, f32) {
    if probs.is_empty() {
        return (0.0, 0.0);
    }
    let n = probs.len() as f32;
    let mean = probs.iter().sum::<f32>() / n;
    let mut r = lambda * mean;
    let mut d = lambda;
    if let Some((target, mu)) = keep_target {
        r += mu * (mean - target).abs();
        d += mu
            * if mean > target {
                1.0
            } else if mean < target {
                -1.0
            } else {
                0.0
            };
    }
    (r, d / n)
}

#[cfg(test)]
mod tests;
