//! Global-norm gradient clipping on the GPU: `norm = sqrt(Σ_buffers Σ_i g_i²)` over every
//! trained parameter's gradient, and the scale `max_norm / norm` when `norm > max_norm`, else
//! exactly 1 (Pascanu et al. 2013; `torch.nn.utils.clip_grad_norm_` without its `+ 1e-6` in the
//! denominator). The scale is not applied here: [`adamw`](crate::kernels::adamw::adamw) reads it
//! from [`GradClip::sums`] and multiplies each gradient by it, so the gradients stay unscaled in
//! their buffers and no extra pass over them is made.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::checks::{check_f32, check_u32, invalid};

const SOURCE: &str = include_str!("../../shaders/grad_clip.wgsl");

/// Invocations per workgroup of both entry points.
const LANES: usize = 256;
/// Most workgroups (partial sums) per gradient buffer.
const MAX_GROUPS: usize = 64;

/// Uniform of `shaders/grad_clip.wgsl` (`struct ClipParams` there, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ClipParams {
    /// `grad_sumsq`: elements of the gradient buffer.
    pub n: u32,
    /// `grad_sumsq`: the slot of its first partial sum.
    pub first: u32,
    /// `grad_sumsq`: workgroups of the dispatch (partial sums it writes).
    pub groups: u32,
    /// `clip_scale`: partial sums of all buffers.
    pub slots: u32,
    /// `clip_scale`: the clipping threshold.
    pub max_norm: f32,
    /// `clip_scale`: the factor the buffers' gradients are taken times (1 / batch for a batch
    /// mean of summed gradients).
    pub grad_scale: f32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
    /// Padding to 32 bytes.
    pub _pad2: u32,
}

/// The global norm of a set of gradient buffers and its clipping scale, as read back by
/// [`GradClip::read`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipResult {
    /// `sqrt(Σ g²)` over every buffer.
    pub norm: f32,
    /// `max_norm / norm` when `norm > max_norm`, else 1.
    pub scale: f32,
}

/// The dispatches that compute the global norm of a fixed set of gradient buffers and the clip
/// scale, and the buffer they write. Prepared once; record [`GradClip::dispatches`] after the
/// backward pass and before the AdamW dispatches that read [`GradClip::sums`].
#[derive(Debug)]
pub struct GradClip {
    /// `[slots + 2]` f32: the partial sums of squares (`slots` of them), then the scale (at
    /// [`GradClip::scale_index`]), then the norm.
    pub sums: GpuTensor,
    /// Partial sums of all buffers.
    pub slots: usize,
    dispatches: Vec<Dispatch>,
}

impl GradClip {
    /// Prepares the sum of squares of each of `grads` (all of each tensor's f32 values; one
    /// dispatch `{label}.sumsq[i]` per buffer, up to 64 workgroups each) and `{label}.scale`.
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] naming `label` when `grads` is empty, a gradient is not f32
    /// or empty or has more than 2^32 values, or `max_norm` is not finite and positive; a buffer
    /// error for `sums`.
    pub fn new(ctx: &GpuContext, label: &str, grads: &[&GpuTensor], max_norm: f32) -> Result<GradClip, GpuError> {
        GradClip::with_grad_scale(ctx, label, grads, max_norm, 1.0)
    }

    /// [`GradClip::new`] for the gradients `grad_scale · g` of the buffers' `g` (a batch's
    /// summed gradients and `1 / batch`): the norm is `grad_scale · sqrt(Σ g²)` and the scale
    /// AdamW reads is `grad_scale` times the clip factor, so AdamW steps on the clipped mean.
    ///
    /// # Errors
    /// As [`GradClip::new`], and `grad_scale` not finite and positive.
    pub fn with_grad_scale(
        ctx: &GpuContext,
        label: &str,
        grads: &[&GpuTensor],
        max_norm: f32,
        grad_scale: f32,
    ) -> Result<GradClip, GpuError> {
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(invalid(label, format!("grad_scale must be finite and positive, got {grad_scale}")));
        }
        if grads.is_empty() {
            return Err(invalid(label, "no gradient buffers to clip"));
        }
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(invalid(label, format!("max_norm must be finite and positive, got {max_norm}")));
        }
        let mut plan = Vec::with_capacity(grads.len());
        let mut slots = 0usize;
        for g in grads {
            let n = g.numel();
            check_f32(label, g, n.max(1), "gradient")?;
            check_u32(label, n, "gradient elements")?;
            let groups = n.div_ceil(LANES * 16).clamp(1, MAX_GROUPS);
            plan.push((g, n, slots, groups));
            slots += groups;
        }
        let sums = GpuTensor::zeros(ctx, &format!("{label}.sums"), DType::F32, &[slots + 2])?;
        let sumsq = ctx.pipeline(&super::snippet_variant("grad_clip", SOURCE, "grad_sumsq"))?;
        let mut dispatches = Vec::with_capacity(grads.len() + 1);
        for (i, (g, n, first, groups)) in plan.into_iter().enumerate() {
            let params = ClipParams {
                n: n as u32,
                first: first as u32,
                groups: groups as u32,
                slots: slots as u32,
                max_norm,
                grad_scale,
                ..Zeroable::zeroed()
            };
            let u = uniform(ctx, label, &params);
            dispatches.push(Dispatch::new(
                ctx,
                &sumsq,
                format!("{label}.sumsq[{i}]"),
                &[u.as_entire_binding(), sums.buffer.as_entire_binding(), g.buffer.as_entire_binding()],
                [groups as u32, 1, 1],
                Cost { flops: 2 * n as u64, bytes: 4 * (n + groups) as u64 },
            ));
        }
        let params = ClipParams { n: 0, first: 0, groups: 1, slots: slots as u32, max_norm, grad_scale, ..Zeroable::zeroed() };
        let u = uniform(ctx, label, &params);
        let scale = ctx.pipeline(&super::snippet_variant("grad_clip", SOURCE, "clip_scale"))?;
        dispatches.push(Dispatch::new(
            ctx,
            &scale,
            format!("{label}.scale"),
            &[u.as_entire_binding(), sums.buffer.as_entire_binding()],
            [1, 1, 1],
            Cost { flops: slots as u64 + 4, bytes: 4 * (slots + 2) as u64 },
        ));
        Ok(GradClip { sums, slots, dispatches })
    }

    /// The dispatches to record, in order.
    pub fn dispatches(&self) -> &[Dispatch] {
        &self.dispatches
    }

    /// The element of [`GradClip::sums`] holding the scale.
    pub fn scale_index(&self) -> usize {
        self.slots
    }

    /// Reads back the norm and the scale of the last run (for logging).
    ///
    /// # Errors
    /// A readback error.
    pub fn read(&self, ctx: &GpuContext) -> Result<ClipResult, GpuError> {
        let v = self.sums.read_f32(ctx)?;
        Ok(ClipResult { scale: v[self.slots], norm: v[self.slots + 1] })
    }
}

/// CPU reference: the global norm `sqrt(Σ g²)` of `grads`, in f64.
pub fn grad_norm_ref(grads: &[&[f32]]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&g| g as f64 * g as f64).sum::<f64>().sqrt()
}

/// CPU reference: the clip scale of a global norm, `max_norm / norm` when `norm > max_norm`,
/// else 1.
pub fn clip_scale_ref(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm { max_norm / norm } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::random_vec;

    fn run(sizes: &[usize], max_norm: f32, seed: u64) -> (ClipResult, f64) {
        let ctx = test_context();
        let host: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| random_vec(n, seed + i as u64)).collect();
        let grads: Vec<GpuTensor> = host.iter().map(|g| GpuTensor::from_f32(&ctx, "g", &[g.len()], g).unwrap()).collect();
        let clip = GradClip::new(&ctx, "clip", &grads.iter().collect::<Vec<_>>(), max_norm).unwrap();
        ctx.run("test", &clip.dispatches().iter().collect::<Vec<_>>()).unwrap();
        let norm = grad_norm_ref(&host.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
        (clip.read(&ctx).unwrap(), norm)
    }

    #[test]
    fn grad_norm_matches_reference_over_several_buffers() {
        // Sizes below one workgroup, odd, and large enough for many partial sums per buffer.
        for (i, sizes) in [&[1usize][..], &[37, 1, 4099], &[70001, 3], &[300_007]].iter().enumerate() {
            let (got, norm) = run(sizes, 1e30, 10 * i as u64);
            assert!(((got.norm as f64 - norm) / norm).abs() < 1e-5, "{sizes:?}: norm {} vs CPU {norm}", got.norm);
            assert_eq!(got.scale, 1.0, "{sizes:?}");
        }
    }

    #[test]
    fn clipping_scales_exactly_when_the_norm_exceeds_max_norm() {
        let sizes = [37, 4099, 70001];
        let (_, norm) = run(&sizes, 1.0, 7);
        for factor in [0.01, 0.5, 0.999, 1.001, 2.0] {
            let max_norm = (norm * factor) as f32;
            let (got, _) = run(&sizes, max_norm, 7);
            if norm > max_norm as f64 {
                let want = clip_scale_ref(got.norm as f64, max_norm as f64);
                assert!(got.scale < 1.0 && ((got.scale as f64 - want) / want).abs() < 1e-6, "factor {factor}: {got:?}, want {want}");
                // The clipped gradient has norm max_norm.
                assert!(((got.norm * got.scale) as f64 / max_norm as f64 - 1.0).abs() < 1e-6, "factor {factor}: {got:?}");
            } else {
                assert_eq!(got.scale, 1.0, "factor {factor}: {got:?}");
            }
        }
        assert_eq!(clip_scale_ref(2.0, 1.0), 0.5);
        assert_eq!(clip_scale_ref(1.0, 1.0), 1.0);
    }

    #[test]
    fn grad_scale_clips_the_scaled_gradient_and_folds_the_factor_into_the_scale() {
        let ctx = test_context();
        let host = random_vec(4099, 3);
        let g = GpuTensor::from_f32(&ctx, "g", &[host.len()], &host).unwrap();
        let raw = grad_norm_ref(&[&host]);
        for (grad_scale, max_norm) in [(0.25f32, 1e30f32), (0.25, (raw * 0.1) as f32), (3.0, (raw * 2.0) as f32)] {
            let clip = GradClip::with_grad_scale(&ctx, "clip", &[&g], max_norm, grad_scale).unwrap();
            ctx.run("test", &clip.dispatches().iter().collect::<Vec<_>>()).unwrap();
            let got = clip.read(&ctx).unwrap();
            let norm = grad_scale as f64 * raw;
            let want = grad_scale as f64 * clip_scale_ref(norm, max_norm as f64);
            assert!((got.norm as f64 / norm - 1.0).abs() < 1e-5, "{grad_scale} {max_norm}: {got:?} vs norm {norm}");
            assert!((got.scale as f64 / want - 1.0).abs() < 1e-5, "{grad_scale} {max_norm}: {got:?} vs scale {want}");
        }
        for bad in [0.0, -1.0, f32::NAN] {
            let err = GradClip::with_grad_scale(&ctx, "train/clip", &[&g], 1.0, bad).err().unwrap().to_string();
            assert!(err.contains("train/clip: ") && err.contains("grad_scale"), "{err}");
        }
    }

    #[test]
    fn a_zero_gradient_is_not_scaled() {
        let ctx = test_context();
        let g = GpuTensor::zeros(&ctx, "g", DType::F32, &[100]).unwrap();
        let clip = GradClip::new(&ctx, "clip", &[&g], 1.0).unwrap();
        ctx.run("test", &clip.dispatches().iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(clip.read(&ctx).unwrap(), ClipResult { norm: 0.0, scale: 1.0 });
    }

    #[test]
    fn grad_clip_rejects_bad_arguments() {
        let ctx = test_context();
        let g = GpuTensor::zeros(&ctx, "g", DType::F32, &[4]).unwrap();
        let empty = GpuTensor::zeros(&ctx, "e", DType::F32, &[0]).unwrap();
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[4]).unwrap();
        for (grads, max_norm, what) in [
            (vec![], 1.0, "no gradient"),
            (vec![&g], 0.0, "max_norm"),
            (vec![&g], f32::INFINITY, "max_norm"),
            (vec![&g], f32::NAN, "max_norm"),
            (vec![&g, &ids], 1.0, "gradient ("),
            (vec![&empty], 1.0, "gradient ("),
        ] {
            let err = GradClip::new(&ctx, "train/clip", &grads, max_norm).err().unwrap().to_string();
            assert!(err.contains("train/clip: ") && err.contains(what), "{err}");
        }
    }
}
