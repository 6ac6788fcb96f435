//! A session: one sequence's KV cache, activations, position and layer plan over shared weights.
//!
//! Prefill runs all prompt tokens through the matmul kernels in one command encoding. Decode runs
//! one token per step through the matrix-vector kernels; its dispatches (pipelines, bind groups,
//! workgroup counts) are prepared once and re-recorded every step, with only the step uniform
//! (position) and the token id written by `queue.write_buffer`: no buffer or bind group is
//! created per token. A layer that the plan skips contributes no dispatch and holds no KV cache.

use std::sync::Arc;

use crate::gpu::{DType, Dispatch, GpuContext, GpuTensor};
use crate::kernels::attention::{AttnOp, AttnShape, attention};
use crate::kernels::choice::{matmul_variant, matvec_variant};
use crate::kernels::embedding::embedding;
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::matmul;
use crate::kernels::matvec::matvec;
use crate::kernels::rmsnorm::{RmsNormOp, rmsnorm};
use crate::kernels::rope::{RopeQkvOp, RopeScalingParams, RopeTables, rope_qkv_write};
use crate::kernels::router::router_gate;
use crate::kernels::sample::{argmax, decode_pairs, top_k};
use crate::kernels::step::{StepBuffer, StepParams};
use crate::kernels::swiglu::swiglu;

use super::lora::{GpuLora, GpuLoraPair};
use super::plan::{PlanDecider, PlanPolicy, decide_plan};
use super::profile::Profiler;
use super::routed::Routing;
use super::weights::GpuWeights;
use super::{LayerPlan, RuntimeError};

/// The most candidates the sampler sees per token (GPU top-k, then the CPU samples).
pub const MAX_CANDIDATES: usize = 256;

/// Per-sequence options.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context length: KV-cache rows per kept layer.
    pub ctx_len: usize,
    /// Candidates read back per token: 1 = greedy (argmax), else top-k (at most MAX_CANDIDATES).
    pub candidates: usize,
}

/// A layer's KV cache: `[ctx_len, n_kv_heads * head_dim]` f32 each.
#[derive(Debug)]
pub struct LayerCache {
    pub k: GpuTensor,
    pub v: GpuTensor,
}

/// Activation buffers for up to `rows` tokens at once.
#[derive(Debug)]
struct Activations {
    rows: usize,
    ids: GpuTensor,     // [rows] u32
    x: GpuTensor,       // [rows, d] f32: the residual stream
    xn: GpuTensor,      // [rows, d] f32: normalised input of a block
    qkv: GpuTensor,     // [rows, (n_heads + 2 n_kv) * head_dim] f32
    q: GpuTensor,       // [rows, n_heads * head_dim] f32: rotated queries
    attn: GpuTensor,    // [rows, n_heads * head_dim] f32: attention output
    gate_up: GpuTensor, // [rows, 2 d_ff] f32
    act: GpuTensor,     // [rows, d_ff] f32
}

impl Activations {
    fn new(ctx: &GpuContext, w: &GpuWeights, rows: usize) -> Result<Activations, RuntimeError> {
        let c = &w.config;
        let q_dim = c.n_heads * c.head_dim;
        let qkv_dim = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
        let f = |name: &str, cols: usize| GpuTensor::zeros(ctx, name, DType::F32, &[rows, cols]);
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

/// What one step hands back: the sampling candidates of the last position.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// (token id, logit), best first; one entry when greedy.
    pub candidates: Vec<(u32, f32)>,
}

pub struct Session {
    pub weights: Arc<GpuWeights>,
    ctx: Arc<GpuContext>,
    options: SessionOptions,
    plan: LayerPlan,
    /// Tokens in the cache.
    pos: usize,
    caches: Vec<Option<LayerCache>>,
    rope: RopeTables,
    step: StepBuffer,
    final_row: GpuTensor,  // [1, d] f32: normalised last row
    logits: GpuTensor,     // [vocab] f32: logits of the last position of the last step
    picked: GpuTensor,     // [2 * candidates] u32: (id, f32 bits) pairs
    staging: wgpu::Buffer, // MAP_READ copy of `picked`
    prefill_acts: Option<Activations>,
    decode_acts: Activations,
    /// The prepared decode step, built on the first decode after the plan is fixed.
    decode_program: Option<Vec<Dispatch>>,
    /// Dispatches recorded by the last step (for tests and profiling).
    pub last_dispatch_count: usize,
    /// Routers that decide the plan during the first prefill; None once the plan is fixed.
    routing: Option<Routing>,
    /// Each layer's router probability from the routed prefill (None: no router, or static plan).
    probs: Vec<Option<f32>>,
    probs_buf: GpuTensor, // [n_layers] f32: router outputs
    /// Times every step when set (`--profile`, `--trace`); None costs nothing.
    profiler: Option<Profiler>,
    /// The unmerged LoRA adapter and its user scale S (the B products use S · alpha / r).
    lora: Option<(Arc<GpuLora>, f32)>,
    lora_tmp: Option<GpuTensor>, // [ctx_len, max_inner] f32: a = x · A^T (prefill rows never exceed ctx_len)
}

impl Session {
    pub fn new(weights: &Arc<GpuWeights>, options: SessionOptions, plan: LayerPlan) -> Result<Session, RuntimeError> {
        let ctx = weights.ctx.clone();
        let c = &weights.config;
        if plan.len() != c.n_layers {
            return Err(RuntimeError::Plan(format!("plan has {} layers, the model {}", plan.len(), c.n_layers)));
        }
        if options.ctx_len == 0 {
            return Err(RuntimeError::Plan("context length must be at least 1".into()));
        }
        let candidates = options.candidates.clamp(1, MAX_CANDIDATES);
        let options = SessionOptions { candidates, ..options };
        let kv_dim = c.n_kv_heads * c.head_dim;
        let mut caches = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            caches.push(if plan.runs(l) {
                Some(LayerCache {
                    k: GpuTensor::zeros(&ctx, &format!("layer.{l}.k_cache"), DType::F32, &[options.ctx_len, kv_dim])?,
                    v: GpuTensor::zeros(&ctx, &format!("layer.{l}.v_cache"), DType::F32, &[options.ctx_len, kv_dim])?,
                })
            } else {
                None
            });
        }
        let scaling = c.rope_scaling.as_ref().map(|s| RopeScalingParams {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position: s.original_max_position_embeddings,
        });
        let rope = RopeTables::new(&ctx, c.head_dim, c.rope_theta, scaling.as_ref(), options.ctx_len)?;
        let picked = GpuTensor::zeros(&ctx, "picked", DType::U32, &[2 * candidates])?;
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("picked.readback"),
            size: (8 * candidates).max(16) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Session {
            weights: weights.clone(),
            step: StepBuffer::new(&ctx),
            final_row: GpuTensor::zeros(&ctx, "final_row", DType::F32, &[1, c.d_model])?,
            logits: GpuTensor::zeros(&ctx, "logits", DType::F32, &[c.vocab_size])?,
            decode_acts: Activations::new(&ctx, weights, 1)?,
            ctx,
            options,
            plan,
            pos: 0,
            caches,
            rope,
            picked,
            staging,
            prefill_acts: None,
            decode_program: None,
            last_dispatch_count: 0,
            routing: None,
            probs: vec![None; c.n_layers],
            probs_buf: GpuTensor::zeros(&weights.ctx, "router.probs", DType::F32, &[c.n_layers])?,
            profiler: None,
            lora: None,
            lora_tmp: None,
        })
    }

    /// A session whose plan the routers decide during its first prefill. No KV cache is
    /// allocated until a layer is known to run.
    pub fn with_routers(weights: &Arc<GpuWeights>, options: SessionOptions, routing: Routing) -> Result<Session, RuntimeError> {
        let n = weights.config.n_layers;
        if routing.routers.layers.len() != n {
            return Err(RuntimeError::Plan(format!("routers for {} layers, the model has {n}", routing.routers.layers.len())));
        }
        routing.policy.validate().map_err(|e| RuntimeError::Plan(e.to_string()))?;
        let mut s = Session::new(weights, options, LayerPlan::full(n))?;
        s.caches.iter_mut().for_each(|c| *c = None);
        s.routing = Some(routing);
        Ok(s)
    }

    /// Resolve the kernel choices and build every pipeline a step uses (and, for a fixed plan,
    /// the decode program), so that the first prefill's time is the prefill's own.
    pub fn prepare(&mut self) -> Result<(), RuntimeError> {
        let ctx = &*self.ctx;
        matmul_variant(ctx);
        matvec_variant(ctx);
        if self.routing.is_some() {
            return Ok(());
        }
        self.build_program(&self.decode_acts, 1, "prefill")?;
        if self.decode_program.is_none() {
            self.decode_program = Some(self.build_program(&self.decode_acts, 1, "decode")?);
        }
        Ok(())
    }

    /// Attach a LoRA adapter (unmerged: the base weights are untouched) at user scale `scale`,
    /// replace the current one, or detach it with `None`. Steps after this call use it; the
    /// prepared decode program is rebuilt on the next decode. Tokens already in the KV cache keep
    /// what the previous adapter computed: for a clean switch mid-conversation start a new
    /// `Session` over the same weights (cheap: the weights are shared) and prefill again.
    pub fn set_lora(&mut self, lora: Option<Arc<GpuLora>>, scale: f32) -> Result<(), RuntimeError> {
        super::loaded::check_scale(scale)?;
        if let Some(g) = &lora {
            if g.dims != crate::model::lora::LoraDims::of(&self.weights.config) {
                return Err(crate::model::lora::LoraError::WrongModel {
                    dir: g.dir.clone(),
                    what: format!("uploaded for sizes {:?}, this session's model {} has others", g.dims, self.weights.config.name),
                }
                .into());
            }
            let inner = g.max_inner();
            if self.lora_tmp.as_ref().is_none_or(|t| t.shape[1] < inner) {
                self.lora_tmp = Some(GpuTensor::zeros(&self.ctx, "lora.a", DType::F32, &[self.options.ctx_len, inner])?);
            }
        }
        self.lora = lora.map(|g| (g, scale));
        self.decode_program = None;
        Ok(())
    }

    /// The attached (unmerged) LoRA adapter and its user scale.
    pub fn lora(&self) -> Option<(&Arc<GpuLora>, f32)> {
        self.lora.as_ref().map(|(g, s)| (g, *s))
    }

    /// Each layer's router probability, once the routed prefill has run.
    pub fn router_probs(&self) -> &[Option<f32>] {
        &self.probs
    }

    /// True once the plan can no longer change (after the first prefill of a routed session).
    pub fn plan_fixed(&self) -> bool {
        self.routing.is_none()
    }

    fn ensure_cache(&mut self, l: usize) -> Result<(), RuntimeError> {
        if self.caches[l].is_none() {
            let c = &self.weights.config;
            let kv_dim = c.n_kv_heads * c.head_dim;
            let n = self.options.ctx_len;
            self.caches[l] = Some(LayerCache {
                k: GpuTensor::zeros(&self.ctx, &format!("layer.{l}.k_cache"), DType::F32, &[n, kv_dim])?,
                v: GpuTensor::zeros(&self.ctx, &format!("layer.{l}.v_cache"), DType::F32, &[n, kv_dim])?,
            });
        }
        Ok(())
    }

    /// The routed prefill: router l reads the hidden states that reach layer l (after the
    /// earlier decisions) and its probability is read back before layer l is encoded. With a
    /// budget (--max-skip/--min-skip) the probabilities of this pass pick the final plan; when
    /// that differs from the threshold-only plan, the prompt is prefilled again under it so that
    /// the cache only holds what the final plan computes.
    fn prefill_routed(&mut self, ids: &[u32], routing: Routing) -> Result<StepOutput, RuntimeError> {
        let t = ids.len();
        let n = self.weights.config.n_layers;
        let tau_only = PlanPolicy { max_skip: None, min_skip: None, ..routing.policy.clone() };
        let mut decider = PlanDecider::new(routing.routers.has_router(), tau_only);
        let mut run = vec![true; n];
        let acts = self.prefill_acts.take().expect("allocated by prefill");
        let mut segment = self.head(&acts, t, "prefill")?;
        for l in 0..n {
            if let Some(rw) = &routing.routers.layers[l] {
                segment.extend(router_gate(&self.ctx, &format!("prefill/layer.{l}/router"), &acts.x, t, rw, &self.probs_buf, l)?);
                self.submit(&segment);
                segment.clear();
                let raw = crate::gpu::buffer::read_buffer(&self.ctx, &self.probs_buf.buffer, 4 * l as u64, 4, "router.probs")?;
                self.probs[l] = Some(f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
            }
            run[l] = decider.decide(l, self.probs[l]).map_err(|e| RuntimeError::Plan(e.to_string()))?;
            if run[l] {
                self.ensure_cache(l)?;
                segment.extend(self.layer(&acts, t, "prefill", l)?);
            }
        }
        let budgeted = decide_plan(&self.probs, &routing.policy);
        let result = if budgeted == run {
            self.plan = LayerPlan::from_flags(run);
            segment.extend(self.tail(&acts, t, "prefill")?);
            self.execute(&segment)
        } else {
            log::info!("router budget changes the plan: prefilling again");
            self.plan = LayerPlan::from_flags(budgeted);
            for l in 0..n {
                if self.plan.runs(l) {
                    self.ensure_cache(l)?;
                } else {
                    self.caches[l] = None;
                }
            }
            let program = self.build_program(&acts, t, "prefill")?;
            self.execute(&program)
        };
        for l in 0..n {
            if !self.plan.runs(l) {
                self.caches[l] = None;
            }
        }
        self.prefill_acts = Some(acts);
        result
    }

    /// Record `program` into one pass and submit it without waiting (a segment of the routed
    /// prefill; the step ends in `execute`).
    fn submit(&mut self, program: &[Dispatch]) {
        let ctx = &*self.ctx;
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("prefill.segment") });
        match self.profiler.as_mut() {
            None => {
                let mut pass =
                    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("prefill.segment"), timestamp_writes: None });
                record_grouped(&mut pass, program, |pass, d| d.record(pass));
            }
            Some(p) => {
                let t0 = std::time::Instant::now();
                p.record(&mut encoder, "prefill", "prefill.segment", program, t0);
                let clock = p.host_clock();
                let t1 = std::time::Instant::now();
                clock.span_between("encode", t0, t1);
                p.mark_submit(t1);
                ctx.queue.submit([encoder.finish()]);
                clock.span("submit", t1);
                return;
            }
        }
        ctx.queue.submit([encoder.finish()]);
    }

    /// Profile every following step with `profiler` (None: stop); returns the previous one.
    pub fn set_profiler(&mut self, profiler: Option<Profiler>) -> Option<Profiler> {
        std::mem::replace(&mut self.profiler, profiler)
    }

    pub fn profiler(&self) -> Option<&Profiler> {
        self.profiler.as_ref()
    }

    pub fn profiler_mut(&mut self) -> Option<&mut Profiler> {
        self.profiler.as_mut()
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn ctx_len(&self) -> usize {
        self.options.ctx_len
    }

    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Bytes held by this session's KV caches.
    pub fn kv_bytes(&self) -> u64 {
        self.caches.iter().flatten().map(|c| (c.k.byte_len() + c.v.byte_len()) as u64).sum()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), RuntimeError> {
        let vocab = self.weights.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::BadToken { id: bad, vocab });
        }
        if self.pos + ids.len() > self.options.ctx_len {
            return Err(RuntimeError::ContextFull { needed: self.pos + ids.len(), ctx_len: self.options.ctx_len });
        }
        Ok(())
    }

    /// Run `ids` (the prompt, or a further turn of it) through every kept layer and return the
    /// candidates for the next token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<StepOutput, RuntimeError> {
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        self.check_ids(ids)?;
        let t = ids.len();
        if self.prefill_acts.as_ref().is_none_or(|a| a.rows < t) {
            self.prefill_acts = Some(Activations::new(&self.ctx, &self.weights, t)?);
        }
        if let Some(acts) = &self.prefill_acts {
            acts.ids.write_u32(&self.ctx, ids);
        }
        self.step.write(&self.ctx, &StepParams { pos0: self.pos as u32, n_tokens: t as u32, kv_len: (self.pos + t) as u32, _pad: 0 });
        let out = if let Some(routing) = self.routing.take() {
            self.prefill_routed(ids, routing)?
        } else {
            let acts = self.prefill_acts.as_ref().expect("allocated above");
            let program = self.build_program(acts, t, "prefill")?;
            self.execute(&program)?
        };
        self.pos += t;
        Ok(out)
    }

    /// Run one generated token and return the candidates for the next.
    pub fn decode(&mut self, id: u32) -> Result<StepOutput, RuntimeError> {
        self.check_ids(&[id])?;
        if self.decode_program.is_none() {
            let program = self.build_program(&self.decode_acts, 1, "decode")?;
            self.decode_program = Some(program);
        }
        self.decode_acts.ids.write_u32(&self.ctx, &[id]);
        self.step.write(&self.ctx, &StepParams { pos0: self.pos as u32, n_tokens: 1, kv_len: self.pos as u32 + 1, _pad: 0 });
        let program = self.decode_program.take().expect("built above");
        let out = self.execute(&program);
        self.decode_program = Some(program);
        self.pos += 1;
        out
    }

    /// The logits of the last position of the last step (a full `[vocab]` read-back).
    pub fn read_logits(&self) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.logits.read_f32(&self.ctx)?)
    }

    /// Labels of the dispatches that one decode step records (after the first decode): the
    /// fixed part plus the per-layer part of each kept layer.
    pub fn decode_labels(&self) -> Option<Vec<&str>> {
        self.decode_program.as_ref().map(|p| p.iter().map(|d| d.label.as_str()).collect())
    }

    /// The linear product `op` as matvec (decode, one row) or matmul (prefill), each with the
    /// adapter's variant.
    fn linear(&self, label: &str, op: &LinearOp, decode: bool) -> Result<Vec<Dispatch>, RuntimeError> {
        Ok(if decode {
            matvec(&self.ctx, label, op, matvec_variant(&self.ctx))?
        } else {
            matmul(&self.ctx, label, op, matmul_variant(&self.ctx))?
        })
    }

    /// A LoRA group's delta on the base product `base` (its x, rows, y and y stride):
    /// `a = x · A^T` (`[rows, inner]` in `lora_tmp`), then `y[:, 0..out] += s · a · B^T`.
    fn lora_delta(&self, label: &str, base: &LinearOp, pair: &GpuLoraPair, s: f32, decode: bool) -> Result<Vec<Dispatch>, RuntimeError> {
        let tmp = self.lora_tmp.as_ref().ok_or_else(|| RuntimeError::Plan("LoRA attached without its buffer".into()))?;
        let mut p = self.linear(&format!("{label}.lora_a"), &LinearOp::new(base.x, base.rows, &pair.a, tmp), decode)?;
        let b = LinearOp::new(tmp, base.rows, &pair.b, base.y).y_stride(base.y_row_stride()).accumulate(true).scale(s);
        p.extend(self.linear(&format!("{label}.lora_b"), &b, decode)?);
        Ok(p)
    }

    /// Dispatches that turn token ids into the residual stream.
    fn head(&self, a: &Activations, rows: usize, phase: &str) -> Result<Vec<Dispatch>, RuntimeError> {
        Ok(embedding(&self.ctx, &format!("{phase}/embed"), &a.ids, rows, &self.weights.embed, &a.x)?)
    }

    /// Layer `l`'s dispatches over `rows` tokens (the layer must have a cache).
    fn layer(&self, a: &Activations, rows: usize, phase: &str, l: usize) -> Result<Vec<Dispatch>, RuntimeError> {
        let ctx = &*self.ctx;
        let c = &self.weights.config;
        let lw = &self.weights.layers[l];
        let cache = self.caches[l].as_ref().ok_or_else(|| RuntimeError::Plan(format!("layer {l} runs but has no KV cache")))?;
        let decode = phase == "decode";
        let shape = AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let at = |name: &str| format!("{phase}/layer.{l}/{name}");
        // The unmerged adapter's matrices for this layer and s = S · alpha / r.
        let lora = self.lora.as_ref().map(|(g, scale)| (&g.layers[l], scale * g.scaling));
        let group =
            |pick: fn(&super::lora::GpuLoraLayer) -> &Option<GpuLoraPair>| lora.and_then(|(ll, s)| pick(ll).as_ref().map(|p| (p, s)));
        let mut p: Vec<Dispatch> = Vec::new();
        p.push(rmsnorm(ctx, &at("attn.norm"), &RmsNormOp { x: &a.x, x_row0: 0, rows, weight: &lw.attn_norm, y: &a.xn, eps: c.rms_eps })?);
        let qkv = LinearOp::new(&a.xn, rows, &lw.qkv, &a.qkv).bias(lw.qkv_bias.as_ref());
        p.extend(self.linear(&at("attn.qkv"), &qkv, decode)?);
        if let Some((pair, s)) = group(|ll| &ll.qkv) {
            p.extend(self.lora_delta(&at("attn.qkv"), &qkv, pair, s, decode)?);
        }
        let (k_cache, v_cache, step) = (&cache.k, &cache.v, &self.step);
        let rope = RopeQkvOp { qkv: &a.qkv, rows, shape, tables: &self.rope, step, q_out: &a.q, k_cache, v_cache };
        p.push(rope_qkv_write(ctx, &at("attn.rope"), &rope)?);
        p.extend(attention(ctx, &at("attn.core"), &AttnOp { q: &a.q, rows, k_cache, v_cache, shape, step, out: &a.attn })?);
        let o = LinearOp::new(&a.attn, rows, &lw.o, &a.x).accumulate(true);
        p.extend(self.linear(&at("attn.o"), &o, decode)?);
        if let Some((pair, s)) = group(|ll| &ll.o) {
            // Accumulates into the residual x, as the base o projection does.
            p.extend(self.lora_delta(&at("attn.o"), &o, pair, s, decode)?);
        }
        p.push(rmsnorm(ctx, &at("mlp.norm"), &RmsNormOp { x: &a.x, x_row0: 0, rows, weight: &lw.ffn_norm, y: &a.xn, eps: c.rms_eps })?);
        let gate_up = LinearOp::new(&a.xn, rows, &lw.gate_up, &a.gate_up);
        p.extend(self.linear(&at("mlp.gate_up"), &gate_up, decode)?);
        if let Some((pair, s)) = group(|ll| &ll.gate_up) {
            p.extend(self.lora_delta(&at("mlp.gate_up"), &gate_up, pair, s, decode)?);
        }
        p.push(swiglu(ctx, &at("mlp.act"), &a.gate_up, rows, c.d_ff, &a.act)?);
        let down = LinearOp::new(&a.act, rows, &lw.down, &a.x).accumulate(true);
        p.extend(self.linear(&at("mlp.down"), &down, decode)?);
        if let Some((pair, s)) = group(|ll| &ll.down) {
            p.extend(self.lora_delta(&at("mlp.down"), &down, pair, s, decode)?);
        }
        Ok(p)
    }

    /// Final norm of the last row, LM head and the sampling kernel.
    fn tail(&self, a: &Activations, rows: usize, phase: &str) -> Result<Vec<Dispatch>, RuntimeError> {
        let ctx = &*self.ctx;
        let w = &*self.weights;
        let c = &w.config;
        let norm = RmsNormOp { x: &a.x, x_row0: rows - 1, rows: 1, weight: &w.final_norm, y: &self.final_row, eps: c.rms_eps };
        let mut p = vec![rmsnorm(ctx, &format!("{phase}/final_norm"), &norm)?];
        p.extend(matvec(
            ctx,
            &format!("{phase}/lm_head"),
            &LinearOp::new(&self.final_row, 1, w.output(), &self.logits),
            matvec_variant(ctx),
        )?);
        let n = c.vocab_size;
        if self.options.candidates == 1 {
            p.extend(argmax(ctx, &format!("{phase}/sample"), &self.logits, n, &self.picked)?);
        } else {
            p.extend(top_k(ctx, &format!("{phase}/sample"), &self.logits, n, self.options.candidates, &self.picked)?);
        }
        Ok(p)
    }

    /// Every dispatch of one step over `rows` tokens under the current plan, in order.
    fn build_program(&self, a: &Activations, rows: usize, phase: &str) -> Result<Vec<Dispatch>, RuntimeError> {
        let mut p = self.head(a, rows, phase)?;
        for l in 0..self.weights.layers.len() {
            if self.plan.runs(l) {
                p.extend(self.layer(a, rows, phase, l)?);
            }
        }
        p.extend(self.tail(a, rows, phase)?);
        Ok(p)
    }

    /// Record `program` into one pass (a debug group per layer), copy the picked candidates to
    /// the staging buffer, submit and read them back. With a profiler, the dispatches are timed
    /// and the step's host spans recorded; without one, nothing else happens.
    fn execute(&mut self, program: &[Dispatch]) -> Result<StepOutput, RuntimeError> {
        let ctx = &*self.ctx;
        // The pass says where it sits: `prefill` or `decode` (from the labels, `prefill/...`).
        let phase = program.first().and_then(|d| d.label.split('/').next()).unwrap_or("step");
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(phase) });
        let t0 = self.profiler.as_ref().map(|_| std::time::Instant::now());
        match (self.profiler.as_mut(), t0) {
            (Some(p), Some(t0)) => {
                p.record(&mut encoder, phase, phase, program, t0);
                p.resolve(&mut encoder);
            }
            _ => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(phase), timestamp_writes: None });
                record_grouped(&mut pass, program, |pass, d| d.record(pass));
            }
        }
        let bytes = 8 * self.options.candidates;
        encoder.copy_buffer_to_buffer(&self.picked.buffer, 0, &self.staging, 0, bytes as u64);
        let t1 = t0.map(|_| std::time::Instant::now());
        if let (Some(p), Some(t1)) = (self.profiler.as_mut(), t1) {
            p.mark_submit(t1);
        }
        ctx.queue.submit([encoder.finish()]);
        let t2 = t0.map(|_| std::time::Instant::now());
        if let Some(p) = self.profiler.as_mut() {
            p.end_step().map_err(|e| RuntimeError::Output(e.to_string()))?;
        }
        self.last_dispatch_count = program.len();
        let raw = crate::gpu::buffer::map_and_read(ctx, &self.staging, bytes, "picked")?;
        if let (Some(p), Some(t0), Some(t1), Some(t2)) = (self.profiler.as_ref(), t0, t1, t2) {
            p.host_step(phase, t0, t1, t2, std::time::Instant::now());
        }
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&raw);
        Ok(StepOutput { candidates: decode_pairs(&words) })
    }
}

/// Record `program` into `pass` through `each`, inside a debug group per layer.
pub(crate) fn record_grouped<'p>(
    pass: &mut wgpu::ComputePass<'_>,
    program: &'p [Dispatch],
    mut each: impl FnMut(&mut wgpu::ComputePass<'_>, &'p Dispatch),
) {
    let mut group: Option<&str> = None;
    for d in program {
        let layer = layer_of(&d.label);
        if layer != group {
            if group.is_some() {
                pass.pop_debug_group();
            }
            if let Some(name) = layer {
                pass.push_debug_group(name);
            }
            group = layer;
        }
        each(pass, d);
    }
    if group.is_some() {
        pass.pop_debug_group();
    }
}

/// `prefill/layer.12/attn.qkv` -> `Some("prefill/layer.12")`.
pub(crate) fn layer_of(label: &str) -> Option<&str> {
    let start = label.find("/layer.")?;
    let rest = &label[start + 1..];
    let end = rest.find('/').map_or(label.len(), |e| start + 1 + e);
    Some(&label[..end])
}
