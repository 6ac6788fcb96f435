//! AdamW on the GPU: Adam with decoupled weight decay (Loshchilov and Hutter 2019, "Decoupled
//! Weight Decay Regularization", Algorithm 2), with the update and bias correction of PyTorch's
//! `torch.optim.AdamW` (`amsgrad = False`), in place on a flat f32 parameter buffer and its two
//! moment buffers:
//!
//! ```text
//! g      = grad · c                              (c: the global-norm clip scale, 1 without clipping)
//! m      = β1 m + (1 - β1) g
//! v      = β2 v + (1 - β2) g²
//! param  = param (1 - lr λ) - lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)
//! ```
//!
//! at step t = 1, 2, ... One [`AdamWBuffer`] (the step's hyperparameters and t, written once per
//! step) serves the dispatches of every parameter buffer; the clip scale comes from a
//! [`GradClip`] recorded before them.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, check_u32, invalid};
use crate::kernels::grad_clip::GradClip;

const SOURCE: &str = include_str!("../../shaders/adamw.wgsl");

/// AdamW's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (may change from step to step: a schedule rewrites the [`AdamWBuffer`]).
    pub lr: f32,
    /// Decay of the first moment, in [0, 1).
    pub beta1: f32,
    /// Decay of the second moment, in [0, 1).
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)`; positive.
    pub eps: f32,
    /// Decoupled weight decay λ (the parameter shrinks by `lr λ` per step); 0 for none.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Uniform of `shaders/adamw.wgsl` (`struct AdamWParams` there, same fields in the same order):
/// the hyperparameters of one step and its bias corrections.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
    /// The step t, from 1.
    pub t: u32,
    /// `lr / (1 - β1^t)`, computed in f64.
    pub step_size: f32,
    /// `sqrt(1 - β2^t)`, computed in f64.
    pub bias2_sqrt: f32,
}

impl AdamWParams {
    /// The uniform of step `t` (from 1) under `cfg`.
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] (`adamw: ...`) when t is 0, a β is outside [0, 1), ε is not
    /// positive, or lr or λ is negative or not finite.
    pub fn new(cfg: &AdamWConfig, t: u32) -> Result<AdamWParams, GpuError> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = *cfg;
        let problem = if t == 0 {
            Some("the step t counts from 1".to_string())
        } else if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            Some(format!("betas ({beta1}, {beta2}) must be in [0, 1)"))
        } else if !(eps.is_finite() && eps > 0.0) {
            Some(format!("eps {eps} must be finite and positive"))
        } else if !(lr.is_finite() && lr >= 0.0 && weight_decay.is_finite() && weight_decay >= 0.0) {
            Some(format!("lr {lr} and weight decay {weight_decay} must be finite and non-negative"))
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(invalid("adamw", p));
        }
        let (bias1, bias2) = bias_corrections(cfg, t);
        Ok(AdamWParams { lr, beta1, beta2, eps, weight_decay, t, step_size: (lr as f64 / bias1) as f32, bias2_sqrt: bias2.sqrt() as f32 })
    }
}

/// `(1 - β1^t, 1 - β2^t)` in f64.
fn bias_corrections(cfg: &AdamWConfig, t: u32) -> (f64, f64) {
    let t = t as i32;
    (1.0 - (cfg.beta1 as f64).powi(t), 1.0 - (cfg.beta2 as f64).powi(t))
}

/// The 32-byte `UNIFORM | COPY_DST` buffer holding one [`AdamWParams`], written once per step
/// and bound by every [`adamw`] dispatch.
#[derive(Debug, Clone)]
pub struct AdamWBuffer {
    /// The uniform buffer.
    pub buffer: wgpu::Buffer,
}

impl AdamWBuffer {
    /// A buffer holding `params`.
    pub fn new(ctx: &GpuContext, params: &AdamWParams) -> AdamWBuffer {
        AdamWBuffer { buffer: uniform(ctx, "adamw.params", params) }
    }

    /// Queue a write of `params` (the next step's); it is visible to the next submission.
    pub fn write(&self, ctx: &GpuContext, params: &AdamWParams) {
        ctx.queue.write_buffer(&self.buffer, 0, bytemuck::bytes_of(params));
    }
}

/// Uniform of `shaders/adamw.wgsl` (`struct AdamWSize` there): what differs per dispatch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AdamWSize {
    /// Parameters updated.
    pub n: u32,
    /// Element of the clip buffer holding the gradient scale.
    pub scale_index: u32,
    /// Padding to 16 bytes.
    pub _pad0: u32,
    /// Padding to 16 bytes.
    pub _pad1: u32,
}

/// The operands of one AdamW update (see [`adamw`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWOp<'a> {
    /// The parameters, f32, updated in place; all `n = params.numel()` values are updated.
    pub params: &'a GpuTensor,
    /// Their gradient, at least n f32 values (read; not changed by clipping).
    pub grads: &'a GpuTensor,
    /// First moment, at least n f32 values (zeros before step 1), updated in place.
    pub m: &'a GpuTensor,
    /// Second moment, at least n f32 values (zeros before step 1), updated in place.
    pub v: &'a GpuTensor,
    /// The step's hyperparameters.
    pub hyper: &'a AdamWBuffer,
    /// The global-norm clipping whose scale multiplies the gradient; None: no clipping.
    pub clip: Option<&'a GradClip>,
}

/// Prepares one AdamW step of `op.params` (the module's formulas), one invocation per parameter.
/// Re-recorded every step after [`AdamWBuffer::write`] of that step's parameters.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when params is empty, an operand is not f32 or
/// too small, or n does not fit in u32; a buffer error (the unit scale when `clip` is None).
pub fn adamw(ctx: &GpuContext, label: &str, op: &AdamWOp) -> Result<Dispatch, GpuError> {
    let AdamWOp { params, grads, m, v, hyper, clip } = *op;
    let n = params.numel();
    if n == 0 {
        return Err(invalid(label, format!("params ({}) is empty", params.label)));
    }
    check_u32(label, n, "params elements")?;
    check_f32(label, params, n, "params")?;
    check_f32(label, grads, n, "grads")?;
    check_f32(label, m, n, "m")?;
    check_f32(label, v, n, "v")?;
    let unit;
    let (scale, scale_index) = match clip {
        Some(c) => (&c.sums, c.scale_index()),
        None => {
            unit = GpuTensor::from_f32(ctx, &format!("{label}.unit_scale"), &[1], &[1.0])?;
            (&unit, 0)
        }
    };
    let size = AdamWSize { n: n as u32, scale_index: scale_index as u32, _pad0: 0, _pad1: 0 };
    let u = uniform(ctx, label, &size);
    let pipeline = ctx.pipeline(&ShaderVariant::new("adamw", SOURCE, "adamw"))?;
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[
            hyper.buffer.as_entire_binding(),
            u.as_entire_binding(),
            scale.buffer.as_entire_binding(),
            grads.buffer.as_entire_binding(),
            params.buffer.as_entire_binding(),
            m.buffer.as_entire_binding(),
            v.buffer.as_entire_binding(),
        ],
        grid((n as u32).div_ceil(256)),
        Cost { flops: (16 * n) as u64, bytes: (28 * n) as u64 },
    ))
}

/// CPU reference of one AdamW step (the module's formulas in f64, the state stored in f32 as on
/// the GPU): updates `params`, `m` and `v` in place from `grads` scaled by `grad_scale`, at step
/// `t` (from 1).
pub fn adamw_step_ref(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], cfg: &AdamWConfig, t: u32, grad_scale: f64) {
    let (bias1, bias2) = bias_corrections(cfg, t);
    let (b1, b2, lr) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.lr as f64);
    for i in 0..params.len() {
        let g = grads[i] as f64 * grad_scale;
        let mi = b1 * m[i] as f64 + (1.0 - b1) * g;
        let vi = b2 * v[i] as f64 + (1.0 - b2) * g * g;
        let p = params[i] as f64 * (1.0 - lr * cfg.weight_decay as f64) - lr / bias1 * mi / (vi.sqrt() / bias2.sqrt() + cfg.eps as f64);
        (params[i], m[i], v[i]) = (p as f32, mi as f32, vi as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DType, test_context};
    use crate::kernels::testing::{assert_close, random_vec};

    #[test]
    fn adamw_ref_follows_the_formula() {
        // Two steps of one parameter, written out: Algorithm 2 of Loshchilov and Hutter with
        // PyTorch's ε placement.
        let cfg = AdamWConfig { lr: 0.1, beta1: 0.8, beta2: 0.9, eps: 1e-3, weight_decay: 0.5 };
        let (p0, g1, g2) = (2.0f64, 0.5f64, -0.25f64);
        let (mut p, mut m, mut v) = ([p0 as f32], [0.0f32], [0.0f32]);
        adamw_step_ref(&mut p, &[g1 as f32], &mut m, &mut v, &cfg, 1, 1.0);
        // Step 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + ε).
        let p1 = p0 * (1.0 - 0.1 * 0.5) - 0.1 * g1 / (g1.abs() + 1e-3);
        assert!((p[0] as f64 - p1).abs() < 1e-6, "step 1: {} vs {p1}", p[0]);
        assert!((m[0] as f64 - 0.2 * g1).abs() < 1e-7 && (v[0] as f64 - 0.1 * g1 * g1).abs() < 1e-7);
        adamw_step_ref(&mut p, &[g2 as f32], &mut m, &mut v, &cfg, 2, 1.0);
        let m2 = 0.8 * 0.2 * g1 + 0.2 * g2;
        let v2 = 0.9 * 0.1 * g1 * g1 + 0.1 * g2 * g2;
        let p2 = p1 * (1.0 - 0.05) - 0.1 * (m2 / (1.0 - 0.64)) / ((v2 / (1.0 - 0.81)).sqrt() + 1e-3);
        assert!((p[0] as f64 - p2).abs() < 1e-6, "step 2: {} vs {p2}", p[0]);
        // The clip scale multiplies the gradient before both moments.
        let (mut p, mut m, mut v) = ([p0 as f32], [0.0f32], [0.0f32]);
        adamw_step_ref(&mut p, &[2.0 * g1 as f32], &mut m, &mut v, &cfg, 1, 0.5);
        assert!((p[0] as f64 - p1).abs() < 1e-6 && (m[0] as f64 - 0.2 * g1).abs() < 1e-7);
    }

    /// `steps` AdamW steps on the GPU (lr changing per step, optionally clipped over two buffers)
    /// against the CPU reference.
    fn check_steps(n: usize, steps: u32, max_norm: Option<f32>, seed: u64) {
        let ctx = test_context();
        let base = AdamWConfig { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 };
        let (mut p, mut m, mut v) = (random_vec(n, seed), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut p2, mut m2, mut v2) = (random_vec(7, seed + 1), vec![0.0f32; 7], vec![0.0f32; 7]);
        let t = |name: &str, x: &[f32]| GpuTensor::from_f32(&ctx, name, &[x.len()], x).unwrap();
        let (gp, gm, gv, gg) = (t("p", &p), t("m", &m), t("v", &v), t("g", &vec![0.0; n]));
        let (gp2, gm2, gv2, gg2) = (t("p2", &p2), t("m2", &m2), t("v2", &v2), t("g2", &[0.0; 7]));
        let hyper = AdamWBuffer::new(&ctx, &AdamWParams::new(&base, 1).unwrap());
        let clip = max_norm.map(|mn| GradClip::new(&ctx, "clip", &[&gg, &gg2], mn).unwrap());
        let op = AdamWOp { params: &gp, grads: &gg, m: &gm, v: &gv, hyper: &hyper, clip: clip.as_ref() };
        let d1 = adamw(&ctx, "adamw", &op).unwrap();
        let op2 = AdamWOp { params: &gp2, grads: &gg2, m: &gm2, v: &gv2, ..op };
        let d2 = adamw(&ctx, "adamw2", &op2).unwrap();
        let mut clipped = 0;
        for step in 1..=steps {
            // g has norm about step / sqrt(3), g2 about sqrt(7 / 3).
            let g: Vec<f32> = random_vec(n, seed + 10 * step as u64).iter().map(|x| x * step as f32 / (n as f32).sqrt()).collect();
            let g2 = random_vec(7, seed + 10 * step as u64 + 1);
            gg.write_f32(&ctx, &g);
            gg2.write_f32(&ctx, &g2);
            let cfg = AdamWConfig { lr: base.lr / step as f32, ..base };
            hyper.write(&ctx, &AdamWParams::new(&cfg, step).unwrap());
            let mut ds: Vec<&Dispatch> = clip.iter().flat_map(|c| c.dispatches()).collect();
            ds.extend([&d1, &d2]);
            ctx.run("adamw", &ds).unwrap();
            let scale = match max_norm {
                Some(mn) => crate::kernels::grad_clip::clip_scale_ref(crate::kernels::grad_clip::grad_norm_ref(&[&g, &g2]), mn as f64),
                None => 1.0,
            };
            clipped += (scale < 1.0) as usize;
            adamw_step_ref(&mut p, &g, &mut m, &mut v, &cfg, step, scale);
            adamw_step_ref(&mut p2, &g2, &mut m2, &mut v2, &cfg, step, scale);
            let what = format!("n {n} step {step} max_norm {max_norm:?}");
            for (gpu, cpu, name) in
                [(&gp, &p, "params"), (&gm, &m, "m"), (&gv, &v, "v"), (&gp2, &p2, "params2"), (&gm2, &m2, "m2"), (&gv2, &v2, "v2")]
            {
                assert_close(&gpu.read_f32(&ctx).unwrap(), cpu, 1e-6, 1e-5, &format!("{name} {what}"));
            }
        }
        if max_norm.is_some() {
            assert!(clipped > 0 && clipped < steps as usize, "clipping should act on some steps only: {clipped} of {steps}");
        }
    }

    #[test]
    fn adamw_steps_match_reference() {
        for (i, n) in [1usize, 37, 4099, 70001].into_iter().enumerate() {
            check_steps(n, 5, None, 100 * i as u64);
        }
    }

    #[test]
    fn adamw_with_clipping_matches_reference() {
        // Global norms grow with the step, sqrt(step² / 3 + 7 / 3) in expectation (about 1.6 to
        // 3.2): the first steps are not clipped at max_norm 2.5, the last ones are.
        for (i, n) in [37usize, 4099].into_iter().enumerate() {
            check_steps(n, 5, Some(2.5), 1000 + 100 * i as u64);
        }
    }

    #[test]
    fn adamw_rejects_bad_arguments() {
        let ctx = test_context();
        let cfg = AdamWConfig::default();
        for bad in [
            (AdamWConfig { beta1: 1.0, ..cfg }, 1, "betas"),
            (AdamWConfig { beta2: -0.1, ..cfg }, 1, "betas"),
            (AdamWConfig { eps: 0.0, ..cfg }, 1, "eps"),
            (AdamWConfig { lr: f32::NAN, ..cfg }, 1, "lr"),
            (AdamWConfig { weight_decay: -1.0, ..cfg }, 1, "weight decay"),
            (cfg, 0, "step t"),
        ] {
            let err = AdamWParams::new(&bad.0, bad.1).err().unwrap().to_string();
            assert!(err.contains("adamw: ") && err.contains(bad.2), "{err}");
        }
        let hyper = AdamWBuffer::new(&ctx, &AdamWParams::new(&cfg, 1).unwrap());
        let z = |n: usize| GpuTensor::zeros(&ctx, "t", DType::F32, &[n]).unwrap();
        let (p, g, m, v, small, empty) = (z(8), z(8), z(8), z(8), z(7), z(0));
        let op = AdamWOp { params: &p, grads: &g, m: &m, v: &v, hyper: &hyper, clip: None };
        assert!(adamw(&ctx, "opt", &op).is_ok());
        for (bad, what) in [
            (AdamWOp { params: &empty, ..op }, "empty"),
            (AdamWOp { grads: &small, ..op }, "grads ("),
            (AdamWOp { m: &small, ..op }, "m ("),
            (AdamWOp { v: &small, ..op }, "v ("),
        ] {
            let err = adamw(&ctx, "opt", &bad).err().unwrap().to_string();
            assert!(err.contains("opt: ") && err.contains(what), "{err}");
        }
    }
}
