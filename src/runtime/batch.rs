//! One decode step of several sessions at once (continuous batching, as vLLM and llama.cpp's
//! server do it): sessions over the same weights and the same layer plan each feed back one
//! token, and the step runs their rows together where rows are independent, so each weight is
//! read once per step instead of once per sequence.
//!
//! Per kept layer, over the batch's own activations `[B, ...]`: RMSNorm and the QKV product
//! (a matrix-matrix product over B rows, the prefill kernels); then per sequence, on its row i
//! of the batch's `qkv`, `q` and `attn` (the kernels' `row0`), RoPE writes its key and value
//! into the session's own KV cache at its own position and attention reads that cache (the
//! session's own decode-step kernels and step uniform); then the O product, RMSNorm, gate/up,
//! SwiGLU and down over B rows. The tail normalises all B
//! rows and runs the LM head as one product `[B, vocab]`; each row's logits go to its session,
//! whose sampling kernel picks its candidates. One submission, one read-back per session.
//!
//! [`DecodeBatch::prefill`] runs the prompts of several new sessions the same way, their rows
//! one after another (RoPE and attention per sequence over its own rows: `row0` and `rows`),
//! and the LM head over each sequence's last row.
//!
//! Every row computes what the session's own decode step computes, with the matrix-matrix
//! kernels instead of the matrix-vector ones (the same sums in another order: logits agree to
//! rounding, as a prefill's do with a decode's). Sessions with a LoRA adapter, a profiler or an
//! undecided (routed) plan are not batched: [`DecodeBatch::can_join`] says so and their owner
//! steps them alone. The projections' dispatches carry the `prefill` phase in their labels, as
//! they run the prefill kernels.

use std::sync::Arc;

use crate::gpu::dispatch::record_grouped;
use crate::gpu::{DType, Dispatch, GpuContext, GpuTensor, Phase};
use crate::kernels::copy::copy_words;
use crate::kernels::linear::LinearOp;
use crate::kernels::rmsnorm::{RmsNormOp, rmsnorm};
use crate::kernels::step::StepParams;

use super::session::{StepId, StepOutput};
use super::step::{Activations, StepBuilder};
use super::{GpuWeights, RuntimeError, Session};

/// The most rows (prompt tokens of all its sequences) one batched prefill takes.
pub const MAX_PREFILL_ROWS: usize = 512;

/// Buffers and the cached program of batched decode steps of up to `capacity` sessions.
pub struct DecodeBatch {
    ctx: Arc<GpuContext>,
    weights: Arc<GpuWeights>,
    capacity: usize,
    /// The batch's activations `[capacity, ...]`: row i is the i-th session's token.
    acts: Activations,
    /// Each sequence's last row of a batched prefill `[capacity, d_model]`.
    last_rows: GpuTensor,
    /// Normalised rows `[capacity, d_model]`: the LM head's input.
    final_rows: GpuTensor,
    /// Logits `[capacity, vocab]`.
    logits: GpuTensor,
    /// The program of the last step and the session ids (in order) it was built for.
    program: Option<(Vec<u64>, Vec<Dispatch>)>,
}

impl DecodeBatch {
    /// Buffers for batched steps of up to `capacity` sessions over `weights`. Errors: a GPU
    /// allocation, or a buffer over the device's binding limit (named).
    pub fn new(weights: &Arc<GpuWeights>, capacity: usize) -> Result<DecodeBatch, RuntimeError> {
        let ctx = weights.ctx.clone();
        let c = &weights.config;
        let capacity = capacity.max(1);
        Ok(DecodeBatch {
            acts: Activations::new(&ctx, weights, capacity)?,
            last_rows: GpuTensor::zeros_bound(&ctx, "batch.last_rows", DType::F32, &[capacity, c.d_model])?,
            final_rows: GpuTensor::zeros_bound(&ctx, "batch.final_rows", DType::F32, &[capacity, c.d_model])?,
            logits: GpuTensor::zeros_bound(&ctx, "batch.logits", DType::F32, &[capacity, c.vocab_size])?,
            ctx,
            weights: weights.clone(),
            capacity,
            program: None,
        })
    }

    /// The most sessions one step takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `session` can be in a batched step of this batch at all: over these weights,
    /// its plan fixed (not waiting for its routers), no LoRA adapter and no profiler.
    pub fn can_join(&self, session: &Session) -> bool {
        Arc::ptr_eq(&session.weights, &self.weights) && session.routing.is_none() && session.lora.is_none() && session.profiler.is_none()
    }

    /// Whether two sessions can share a step: both [`DecodeBatch::can_join`] and the same plan.
    pub fn same_step(&self, a: &Session, b: &Session) -> bool {
        self.can_join(a) && self.can_join(b) && a.plan == b.plan
    }

    /// Drop the cached program (and with it the references it holds to sessions' buffers, so
    /// the GPU memory of sessions that have ended is given back).
    pub fn forget(&mut self) {
        self.program = None;
    }

    /// Feed `ids[i]` to `sessions[i]` in one step and return each session's candidates, as
    /// [`Session::decode`] would. Errors: `RuntimeError::Internal` for more sessions than the
    /// capacity, none, a count other than `ids`', or sessions that cannot share a step
    /// ([`DecodeBatch::same_step`]); `BadToken` and `ContextFull` as [`Session::decode`]; a GPU
    /// error; `NonFinite` when a session's logits are not finite. After an error no session has
    /// advanced (KV-cache rows at their positions may have been written; the next step there
    /// writes them again).
    pub fn step(&mut self, sessions: &mut [&mut Session], ids: &[u32]) -> Result<Vec<StepOutput>, RuntimeError> {
        let tokens: Vec<&[u32]> = ids.iter().map(std::slice::from_ref).collect();
        self.check(sessions, &tokens)?;
        self.write_inputs(&self.acts, sessions, &tokens);
        let key: Vec<u64> = sessions.iter().map(|s| s.id).collect();
        let program = match self.program.take() {
            Some((k, p)) if k == key => p,
            _ => self.build(sessions, &vec![1; sessions.len()], &self.acts)?,
        };
        let result = self.execute(&program, sessions, true);
        self.program = Some((key, program));
        let outputs = result?;
        for s in sessions.iter_mut() {
            s.pos += 1;
            s.decode_steps += 1;
        }
        Ok(outputs)
    }

    /// Prefill `prompts[i]` into `sessions[i]`, all in one step (the prompts' rows one after
    /// another, at most [`MAX_PREFILL_ROWS`] in all), and return each session's candidates for
    /// its first generated token, as [`Session::prefill`] would. Errors: as
    /// [`DecodeBatch::step`]; `EmptyPrompt` for an empty prompt; `RuntimeError::Internal` for
    /// more rows than [`MAX_PREFILL_ROWS`].
    pub fn prefill(&mut self, sessions: &mut [&mut Session], prompts: &[&[u32]]) -> Result<Vec<StepOutput>, RuntimeError> {
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(RuntimeError::EmptyPrompt);
        }
        let rows: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let total: usize = rows.iter().sum();
        if total > MAX_PREFILL_ROWS {
            return Err(RuntimeError::Internal(format!("a batched prefill of {total} rows (at most {MAX_PREFILL_ROWS})")));
        }
        self.check(sessions, prompts)?;
        // Allocated for this prefill and given back after it: an idle server holds nothing of it.
        let acts = Activations::new(&self.ctx, &self.weights, total)?;
        self.write_inputs(&acts, sessions, prompts);
        let program = self.build(sessions, &rows, &acts)?;
        let outputs = self.execute(&program, sessions, false)?;
        for (s, r) in sessions.iter_mut().zip(rows) {
            s.pos += r;
        }
        Ok(outputs)
    }

    /// The checks every batched step makes: a session count within the capacity and equal to
    /// the token lists', sessions that can share a step, and each one's tokens valid for it.
    fn check(&self, sessions: &[&mut Session], tokens: &[&[u32]]) -> Result<(), RuntimeError> {
        let b = sessions.len();
        if b == 0 || b > self.capacity || tokens.len() != b {
            return Err(RuntimeError::Internal(format!(
                "a batched step of {b} sessions and {} inputs (capacity {})",
                tokens.len(),
                self.capacity
            )));
        }
        if let Some(s) = sessions.iter().find(|s| !self.same_step(sessions[0], s)) {
            return Err(RuntimeError::Internal(format!("session {} cannot share a batched step with session {}", s.id, sessions[0].id)));
        }
        for (s, t) in sessions.iter().zip(tokens) {
            s.check_ids(t)?;
        }
        Ok(())
    }

    /// Write the step's token ids (one list after another) and each session's step uniform.
    fn write_inputs(&self, acts: &Activations, sessions: &[&mut Session], tokens: &[&[u32]]) {
        acts.ids.write_u32(&self.ctx, &tokens.concat());
        for (s, t) in sessions.iter().zip(tokens) {
            let (pos0, n) = (s.pos as u32, t.len() as u32);
            s.bufs.step.write(&self.ctx, &StepParams { pos0, n_tokens: n, kv_len: pos0 + n, _pad: 0 });
        }
    }

    /// The dispatches of one batched step over `sessions` (see the module docs).
    /// `rows[i]` are sequence i's rows (1 in a decode step), in `a` from the sum of the earlier
    /// ones on.
    fn build(&self, sessions: &[&mut Session], rows: &[usize], a: &Activations) -> Result<Vec<Dispatch>, RuntimeError> {
        // Once per program, not per step: a decode step reuses the program it built.
        self.weights.choose_kernels(None);
        let (ctx, w, b) = (&*self.ctx, &*self.weights, sessions.len());
        let total: usize = rows.iter().sum();
        let row0: Vec<usize> = rows.iter().scan(0, |acc, &r| Some(std::mem::replace(acc, *acc + r))).collect();
        let c = &w.config;
        let first = &sessions[0];
        // The batch's rows run the prefill kernels; the builder's own buffers serve nothing but
        // the plan (the attention core and the sampling come from each session's builder).
        let batch = StepBuilder { ctx, weights: w, lora: None, bufs: &first.bufs, plan: &first.plan, phase: Phase::Prefill };
        let mut p = batch.head(a, total)?;
        for l in (0..c.n_layers).filter(|&l| first.plan.runs(l)) {
            p.extend(batch.layer_with_core(
                a,
                total,
                l,
                None,
                false,
                None,
                Some(|| {
                    let mut core = Vec::new();
                    for (i, s) in sessions.iter().enumerate() {
                        core.extend(s.builder(Phase::Decode).attention_core(a, row0[i], rows[i], l)?);
                    }
                    Ok(core)
                }),
            )?);
        }
        // The LM head's input: each sequence's last row (in a decode step, the rows themselves).
        let last = if total == b {
            &a.x
        } else {
            let d = c.d_model;
            for i in 0..b {
                let src = (row0[i] + rows[i] - 1) * d;
                p.push(copy_words(ctx, &format!("batch/row.{i}/last"), &a.x, src, &self.last_rows, i * d, d)?);
            }
            &self.last_rows
        };
        let norm = RmsNormOp { x: last, x_row0: 0, rows: b, weight: &w.final_norm, y: &self.final_rows, eps: c.rms_eps };
        p.push(rmsnorm(ctx, "batch/final_norm", &norm)?);
        p.extend(batch.linear("batch/lm_head", &LinearOp::new(&self.final_rows, b, w.output(), &self.logits))?);
        let vocab = c.vocab_size;
        for (i, s) in sessions.iter().enumerate() {
            p.push(copy_words(ctx, &format!("batch/row.{i}/logits"), &self.logits, i * vocab, &s.bufs.logits, 0, vocab)?);
            p.extend(s.builder(Phase::Decode).sample()?);
        }
        Ok(p)
    }

    /// Record, submit, and read each session's candidates back.
    fn execute(&self, program: &[Dispatch], sessions: &[&mut Session], decode: bool) -> Result<Vec<StepOutput>, RuntimeError> {
        let ctx = &*self.ctx;
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("decode-batch") });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("decode-batch"), timestamp_writes: None });
            record_grouped(&mut pass, program, |pass, d| d.record(pass));
        }
        for s in sessions {
            s.copy_picked(&mut encoder);
        }
        ctx.queue.submit([encoder.finish()]);
        sessions
            .iter()
            .map(|s| {
                let step = if decode { StepId::Decode { n: s.decode_steps + 1, pos: s.pos } } else { StepId::Prefill { pos0: s.pos } };
                s.read_picked(step)
            })
            .collect()
    }
}
