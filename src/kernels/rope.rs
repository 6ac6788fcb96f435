//! Rotary position embeddings (HF LLaMA rotate-half layout) fused with the KV-cache write.
//!
//! The cos/sin tables are computed on the CPU exactly as Hugging Face computes them (inv_freq in
//! f32, the llama3 rope-scaling rule applied to inv_freq, angle = pos * inv_freq in f32), so the
//! GPU needs no transcendental functions and matches HF to the last bit of the tables.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor};
use crate::kernels::attention::AttnShape;
use crate::kernels::checks::{cache_rows, check_f32, check_rows, invalid};
use crate::kernels::step::StepBuffer;

const SOURCE: &str = include_str!("../../shaders/rope.wgsl");

/// The llama3 rope-scaling parameters (`rope_scaling` with `rope_type: "llama3"` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScalingParams {
    /// `factor`: low frequencies are divided by it.
    pub factor: f32,
    /// `low_freq_factor`: wavelengths above `original_max_position / low_freq_factor` are scaled.
    pub low_freq_factor: f32,
    /// `high_freq_factor`: wavelengths below `original_max_position / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings` (tokens).
    pub original_max_position: u32,
}

/// `inv_freq[i] = 1 / theta^(2i / head_dim)` in f32 as HF computes it, then the llama3 rule when
/// `scaling` is given: wavelengths above `original_max_position / low_freq_factor` are divided by
/// `factor`, those below `original_max_position / high_freq_factor` are kept, and those between
/// are interpolated smoothly.
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<&RopeScalingParams>) -> Vec<f32> {
    let inv: Vec<f32> = (0..head_dim / 2).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    let Some(s) = scaling else { return inv };
    let old_len = s.original_max_position as f32;
    let low_freq_wavelen = old_len / s.low_freq_factor;
    let high_freq_wavelen = old_len / s.high_freq_factor;
    inv.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen { f / s.factor } else { f };
            let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
            if medium {
                let smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// cos and sin of `(pos as f32) * inv_freq[i]` (the angle in f32 as HF computes it, the cosine
/// correctly rounded from it).
fn cos_sin(pos: usize, f: f32) -> (f32, f32) {
    let angle = (pos as f32 * f) as f64;
    (angle.cos() as f32, angle.sin() as f32)
}

/// The CPU-side cos/sin tables, `[max_pos, head_dim / 2]` each.
pub fn rope_tables_ref(inv_freq: &[f32], max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0.0; max_pos * half];
    let mut sin = vec![0.0; max_pos * half];
    for pos in 0..max_pos {
        for (i, &f) in inv_freq.iter().enumerate() {
            let (c, s) = cos_sin(pos, f);
            cos[pos * half + i] = c;
            sin[pos * half + i] = s;
        }
    }
    (cos, sin)
}

/// RoPE tables on the GPU: cos and sin `[max_pos, head_dim / 2]` f32.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `cos(pos * inv_freq[i])`, `[max_pos, head_dim / 2]` f32.
    pub cos: GpuTensor,
    /// `sin(pos * inv_freq[i])`, `[max_pos, head_dim / 2]` f32.
    pub sin: GpuTensor,
    /// Positions covered (rows of the tables).
    pub max_pos: usize,
    /// Head size the tables are for (even).
    pub head_dim: usize,
}

impl RopeTables {
    /// Computes the tables on the CPU ([`rope_inv_freq`], [`rope_tables_ref`]) for positions
    /// `0..max_pos` and uploads them.
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] when head_dim is odd or 0 or max_pos is 0;
    /// [`GpuError::BufferTooLarge`] when one table (`max_pos * head_dim / 2 * 4` bytes) is over
    /// the device's storage-binding limit, checked before the tables are computed; a buffer
    /// error from the upload.
    pub fn new(
        ctx: &GpuContext,
        head_dim: usize,
        theta: f32,
        scaling: Option<&RopeScalingParams>,
        max_pos: usize,
    ) -> Result<RopeTables, GpuError> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || max_pos == 0 {
            return Err(GpuError::InvalidArgument(format!(
                "rope tables: head_dim {head_dim} must be even and non-zero, max_pos {max_pos} non-zero"
            )));
        }
        let half = head_dim / 2;
        crate::gpu::buffer::check_binding(ctx, &format!("rope.cos [{max_pos}, {half}] f32"), DType::F32, &[max_pos, half])?;
        let (cos, sin) = rope_tables_ref(&rope_inv_freq(head_dim, theta, scaling), max_pos);
        Ok(RopeTables {
            cos: GpuTensor::from_f32(ctx, "rope.cos", &[max_pos, half], &cos)?,
            sin: GpuTensor::from_f32(ctx, "rope.sin", &[max_pos, half], &sin)?,
            max_pos,
            head_dim,
        })
    }
}

/// Uniform of `shaders/rope.wgsl`, `rope_backward.wgsl` and the decode GEMV's RoPE epilogue (`struct
/// RopeParams` in `rope_write.wgsl` and `rope_backward.wgsl`, same fields in the same order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RopeParams {
    /// Rows the dispatch is sized for.
    pub rows: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// `head_dim / 2`: rotated pairs per head.
    pub half_dim: u32,
    /// Positions the caches and tables hold; later positions are skipped.
    pub max_pos: u32,
    /// First row of qkv and q_out that the step's rows use (0 but in a batched decode step;
    /// padding in the backward shader).
    pub row0: u32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
}

impl RopeParams {
    /// Checks what the forward and the backward RoPE dispatches share (valid shape, an even
    /// head_dim equal to the tables', at least one row, at most 2^32 invocations of one pair
    /// each) and returns the parameters (over the tables' positions) and the invocation count.
    /// Errors: [`GpuError::InvalidArgument`] naming `label`.
    pub(crate) fn checked(label: &str, shape: AttnShape, tables: &RopeTables, rows: usize) -> Result<(RopeParams, u32), GpuError> {
        shape.check(label)?;
        let hd = shape.head_dim;
        if !hd.is_multiple_of(2) || tables.head_dim != hd {
            return Err(invalid(
                label,
                format!("rope needs an even head_dim matching the tables (head_dim {hd}, tables {})", tables.head_dim),
            ));
        }
        check_rows(label, rows)?;
        let invocations = rows.checked_mul(shape.qkv_dim() / 2).filter(|&n| n <= u32::MAX as usize);
        let Some(invocations) = invocations else {
            return Err(invalid(label, format!("{rows} rows are too many for one dispatch")));
        };
        let params = RopeParams {
            rows: rows as u32,
            n_heads: shape.n_heads as u32,
            n_kv_heads: shape.n_kv_heads as u32,
            head_dim: hd as u32,
            half_dim: (hd / 2) as u32,
            max_pos: tables.max_pos as u32,
            row0: 0,
            _pad1: 0,
        };
        Ok((params, invocations as u32))
    }
}

/// `rope_write(..)` (`shaders/rope_write.wgsl`): one pair rotated and written, for the decode
/// GEMV's RoPE epilogue ([`crate::kernels::matvec::MatvecEpilogue::Rope`]); rope.wgsl gets it
/// through its `ROPE_WRITE` placeholder.
pub(crate) const ROPE_WRITE: &str = include_str!("../../shaders/rope_write.wgsl");

/// The operands of one fused RoPE + KV-cache write (see [`rope_qkv_write`]).
#[derive(Debug, Clone, Copy)]
pub struct RopeQkvOp<'a> {
    /// The QKV projection, `[row0 + rows, (n_heads + 2 n_kv_heads) head_dim]` f32 (q | k | v per
    /// row, Hugging Face order).
    pub qkv: &'a GpuTensor,
    /// Rows the dispatch is sized for (the step's `n_tokens` may be fewer); at least 1.
    pub rows: usize,
    /// First row of `qkv` and `q_out` the step's rows use: step row t is row `row0 + t` (0 but
    /// in a batched decode step, where each sequence has its row of the batch's tensors).
    pub row0: usize,
    /// Heads and head size (head_dim even, equal to the tables').
    pub shape: AttnShape,
    /// The cos/sin tables.
    pub tables: &'a RopeTables,
    /// The per-step uniform (`pos0`, `n_tokens`), read at run time.
    pub step: &'a StepBuffer,
    /// Rotated queries out, `[row0 + rows, n_heads head_dim]` f32.
    pub q_out: &'a GpuTensor,
    /// Key cache, `[max_pos, n_kv_heads head_dim]` f32: rotated keys are written at their positions.
    pub k_cache: &'a GpuTensor,
    /// Value cache, `[max_pos, n_kv_heads head_dim]` f32: values are written at their positions.
    pub v_cache: &'a GpuTensor,
}

impl RopeQkvOp<'_> {
    /// Checks every operand (as [`rope_qkv_write`] documents) and returns the uniform parameters
    /// (`max_pos` the positions the tables and both caches hold) and the invocation count, one
    /// per rotated pair. Also the checks of the decode GEMV's RoPE epilogue
    /// ([`crate::kernels::matvec::MatvecEpilogue::Rope`]).
    pub(crate) fn checked(&self, label: &str) -> Result<(RopeParams, u32), GpuError> {
        let RopeQkvOp { qkv, rows, row0, shape, tables, q_out, k_cache, v_cache, .. } = *self;
        let (mut params, invocations) = RopeParams::checked(label, shape, tables, rows)?;
        let end = row0
            .checked_add(rows)
            .filter(|&e| e <= u32::MAX as usize)
            .ok_or_else(|| invalid(label, format!("row0 {row0} is too large")))?;
        check_f32(label, qkv, end * shape.qkv_dim(), "qkv")?;
        check_f32(label, q_out, end * shape.q_dim(), "q_out")?;
        params.row0 = row0 as u32;
        let k_rows = cache_rows(label, k_cache, shape.kv_dim(), "k_cache")?;
        let v_rows = cache_rows(label, v_cache, shape.kv_dim(), "v_cache")?;
        // Positions past either cache are skipped too.
        params.max_pos = k_rows.min(v_rows).min(tables.max_pos) as u32;
        Ok((params, invocations))
    }
}

/// Fused step after the QKV projection: for t < T (the step's `n_tokens`, at most `op.rows`) at
/// position `pos = pos0 + t`, from row `r = row0 + t` of qkv: `q_out[r] = rope(q)`,
/// `k_cache[pos] = rope(k)`, `v_cache[pos] = v`,
/// with rope the rotate-half rotation of Hugging Face's `apply_rotary_pos_emb`. Positions at or
/// beyond the caches' or tables' length are skipped.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the shape is invalid, head_dim is odd or
/// differs from the tables', rows is 0, qkv or q_out is not f32 or too small, a cache is not f32
/// or not a whole number of rows, or the dispatch would need more than 2^32 invocations.
pub fn rope_qkv_write(ctx: &GpuContext, label: &str, op: &RopeQkvOp) -> Result<Dispatch, GpuError> {
    let RopeQkvOp { qkv, rows, shape, tables, step, q_out, k_cache, v_cache, .. } = *op;
    let (params, invocations) = op.checked(label)?;
    let hd = shape.head_dim;
    let pipeline = ctx.pipeline(&super::snippet_variant("rope", SOURCE, "rope_qkv"))?;
    let u = uniform(ctx, label, &params);
    let cost = Cost {
        flops: (6 * rows * (shape.n_heads + shape.n_kv_heads) * hd / 2) as u64,
        bytes: (4 * rows * (2 * shape.qkv_dim() + (shape.n_heads + shape.n_kv_heads) * hd)) as u64,
    };
    Ok(Dispatch::new(
        ctx,
        &pipeline,
        label,
        &[
            u.as_entire_binding(),
            step.buffer.as_entire_binding(),
            qkv.buffer.as_entire_binding(),
            tables.cos.buffer.as_entire_binding(),
            tables.sin.buffer.as_entire_binding(),
            q_out.buffer.as_entire_binding(),
            k_cache.buffer.as_entire_binding(),
            v_cache.buffer.as_entire_binding(),
        ],
        grid(invocations.div_ceil(64)),
        cost,
    ))
}

/// CPU reference: rotate `x` (`[T, heads * head_dim]`) in place, row t at `positions[t]`.
pub fn rope_ref(x: &mut [f32], positions: &[usize], heads: usize, head_dim: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    for (row, &pos) in x.chunks_mut(heads * head_dim).zip(positions) {
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (c, s) = cos_sin(pos, inv_freq[i]);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c - x2 * s;
                head[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::step::StepParams;
    use crate::kernels::testing::{assert_close, random_vec};

    /// Issue 15 §1: 2^58 positions used to panic (`capacity overflow`) computing the tables.
    #[test]
    fn tables_over_the_binding_limit_are_refused_before_computing() {
        let ctx = test_context();
        for max_pos in [1usize << 58, usize::MAX / 2, (ctx.max_binding / 128) as usize + 1] {
            let err = RopeTables::new(&ctx, 64, 10_000.0, None, max_pos).expect_err("too large");
            assert!(matches!(err, GpuError::BufferTooLarge { limit, .. } if limit == ctx.max_binding), "{err}");
            assert!(err.to_string().contains("max_storage_buffer_binding_size"), "{err}");
        }
    }

    #[test]
    fn rope_tables_match_cpu_and_known_values() {
        let ctx = test_context();
        for (hd, theta, max_pos) in [(64, 100000.0f32, 300), (6, 10000.0, 7), (2, 10000.0, 1)] {
            let t = RopeTables::new(&ctx, hd, theta, None, max_pos).unwrap();
            let (cos, sin) = (t.cos.read_f32(&ctx).unwrap(), t.sin.read_f32(&ctx).unwrap());
            let half = hd / 2;
            assert_eq!(cos.len(), max_pos * half);
            // Independent f64 recomputation (the f32 angle rounding allows ~pos * 2^-24 rad).
            let mut want_c = vec![0.0; max_pos * half];
            let mut want_s = vec![0.0; max_pos * half];
            for pos in 0..max_pos {
                for i in 0..half {
                    let a = pos as f64 / (theta as f64).powf(2.0 * i as f64 / hd as f64);
                    want_c[pos * half + i] = a.cos() as f32;
                    want_s[pos * half + i] = a.sin() as f32;
                }
            }
            assert_close(&cos, &want_c, 1e-4, 0.0, "rope cos");
            assert_close(&sin, &want_s, 1e-4, 0.0, "rope sin");
            // Position 0 is the identity, exactly.
            assert!(cos[..half].iter().all(|&c| c == 1.0) && sin[..half].iter().all(|&s| s == 0.0));
            if max_pos > 1 {
                // inv_freq[0] = 1: position 1 rotates the first pair by one radian.
                assert_eq!(cos[half], 1.0f64.cos() as f32);
                assert_eq!(sin[half], 1.0f64.sin() as f32);
            }
        }
        assert!(matches!(RopeTables::new(&ctx, 7, 10000.0, None, 8), Err(GpuError::InvalidArgument(_))));
    }

    #[test]
    fn llama3_scaling_changes_only_low_frequencies() {
        // Llama-3.1's parameters.
        let s = RopeScalingParams { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 };
        let plain = rope_inv_freq(128, 500000.0, None);
        let scaled = rope_inv_freq(128, 500000.0, Some(&s));
        assert_eq!(plain.len(), 64);
        let (mut high, mut low, mut medium) = (0, 0, 0);
        for (i, (&f, &g)) in plain.iter().zip(&scaled).enumerate() {
            let wavelen = 2.0 * std::f64::consts::PI / f as f64;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(g, f, "entry {i} (wavelength {wavelen}) is high-frequency and must not change");
                high += 1;
            } else if wavelen > 8192.0 {
                assert_eq!(g, f / 8.0, "entry {i} (wavelength {wavelen}) is low-frequency: divided by the factor");
                low += 1;
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                let want = (1.0 - smooth) * f as f64 / 8.0 + smooth * f as f64;
                assert!(((g as f64 - want) / want).abs() < 1e-5, "entry {i}: {g} vs {want}");
                assert!(g < f && g > f / 8.0, "entry {i}: smoothed value between f/8 and f");
                medium += 1;
            }
        }
        assert!(high > 0 && low > 0 && medium > 0, "high {high} medium {medium} low {low}");
        // The unscaled frequencies themselves: theta^(-2i/d).
        assert_eq!(plain[0], 1.0);
        assert!((plain[1] as f64 - 500000f64.powf(-2.0 / 128.0)).abs() < 1e-7);
        // Tables built with scaling use the scaled frequencies.
        let ctx = test_context();
        let t = RopeTables::new(&ctx, 128, 500000.0, Some(&s), 3).unwrap();
        let (cos, _) = rope_tables_ref(&scaled, 3);
        assert_eq!(t.cos.read_f32(&ctx).unwrap(), cos);
    }

    /// Runs rope_qkv_write for `t_rows` rows at `pos0` and checks q_out and both caches (rows
    /// outside the step must keep their old contents).
    fn check_rope_write(shape: AttnShape, t_rows: usize, pos0: usize, max_pos: usize, seed: u64) {
        check_rope_write_at(shape, 0, t_rows, pos0, max_pos, seed);
    }

    /// [`check_rope_write`] with the step's rows at `row0..row0 + t_rows` of qkv and q_out
    /// (earlier rows of q_out must stay as they were).
    fn check_rope_write_at(shape: AttnShape, row0: usize, t_rows: usize, pos0: usize, max_pos: usize, seed: u64) {
        let ctx = test_context();
        let (qd, kvd, qkvd, hd) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim(), shape.head_dim);
        let qkv = random_vec(t_rows * qkvd, seed);
        let k_old = random_vec(max_pos * kvd, seed + 1);
        let v_old = random_vec(max_pos * kvd, seed + 2);
        let tables = RopeTables::new(&ctx, hd, 10000.0, None, max_pos).unwrap();
        let mut padded = random_vec(row0 * qkvd, seed + 3);
        padded.extend_from_slice(&qkv);
        let g_qkv = GpuTensor::from_f32(&ctx, "qkv", &[row0 + t_rows, qkvd], &padded).unwrap();
        let g_q = GpuTensor::zeros(&ctx, "q", DType::F32, &[row0 + t_rows, qd]).unwrap();
        let g_k = GpuTensor::from_f32(&ctx, "k", &[max_pos, kvd], &k_old).unwrap();
        let g_v = GpuTensor::from_f32(&ctx, "v", &[max_pos, kvd], &v_old).unwrap();
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(pos0, t_rows));
        let d = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &g_qkv, rows: t_rows, row0, shape, tables: &tables, step: &step, q_out: &g_q, k_cache: &g_k, v_cache: &g_v },
        )
        .unwrap();
        ctx.run("rope", &[&d]).unwrap();

        let inv = rope_inv_freq(hd, 10000.0, None);
        let positions: Vec<usize> = (pos0..pos0 + t_rows).collect();
        let mut q_want = vec![0.0; row0 * qd];
        let mut k_want = k_old.clone();
        let mut v_want = v_old.clone();
        for t in 0..t_rows {
            let row = &qkv[t * qkvd..][..qkvd];
            q_want.extend_from_slice(&row[..qd]);
            k_want[(pos0 + t) * kvd..][..kvd].copy_from_slice(&row[qd..qd + kvd]);
            v_want[(pos0 + t) * kvd..][..kvd].copy_from_slice(&row[qd + kvd..]);
        }
        rope_ref(&mut q_want[row0 * qd..], &positions, shape.n_heads, hd, &inv);
        rope_ref(&mut k_want[pos0 * kvd..(pos0 + t_rows) * kvd], &positions, shape.n_kv_heads, hd, &inv);
        let what = format!("{shape:?} T={t_rows} pos0={pos0} row0={row0}");
        assert_close(&g_q.read_f32(&ctx).unwrap(), &q_want, 1e-6, 1e-5, &format!("q {what}"));
        assert_close(&g_k.read_f32(&ctx).unwrap(), &k_want, 1e-6, 1e-5, &format!("k cache {what}"));
        assert_eq!(g_v.read_f32(&ctx).unwrap(), v_want, "v cache {what}");
    }

    #[test]
    fn rope_qkv_write_matches_reference() {
        let gqa = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
        let mha = AttnShape { n_heads: 4, n_kv_heads: 4, head_dim: 10 };
        let tiny = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 2 };
        for (i, &(t_rows, pos0)) in [(1, 0), (1, 399), (7, 0), (7, 100), (300, 0), (300, 57)].iter().enumerate() {
            check_rope_write(gqa, t_rows, pos0, 400, 10 + i as u64);
            check_rope_write(mha, t_rows, pos0, 400, 20 + i as u64);
            check_rope_write_at(gqa, 3, t_rows, pos0, 400, 30 + i as u64);
        }
        check_rope_write(tiny, 7, 3, 10, 30);
    }

    #[test]
    fn rope_qkv_write_follows_the_step_uniform() {
        // One dispatch prepared for 7 rows, run with steps of 7, 3 and 1 tokens at other positions.
        let ctx = test_context();
        let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8 };
        let (qd, kvd, qkvd, max_pos) = (shape.q_dim(), shape.kv_dim(), shape.qkv_dim(), 32);
        let tables = RopeTables::new(&ctx, 8, 10000.0, None, max_pos).unwrap();
        let inv = rope_inv_freq(8, 10000.0, None);
        let g_qkv = GpuTensor::zeros(&ctx, "qkv", DType::F32, &[7, qkvd]).unwrap();
        let g_q = GpuTensor::zeros(&ctx, "q", DType::F32, &[7, qd]).unwrap();
        let g_k = GpuTensor::zeros(&ctx, "k", DType::F32, &[max_pos, kvd]).unwrap();
        let g_v = GpuTensor::zeros(&ctx, "v", DType::F32, &[max_pos, kvd]).unwrap();
        let step = StepBuffer::new(&ctx);
        let d = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &g_qkv, rows: 7, row0: 0, shape, tables: &tables, step: &step, q_out: &g_q, k_cache: &g_k, v_cache: &g_v },
        )
        .unwrap();
        let mut k_want = vec![0.0; max_pos * kvd];
        let mut v_want = vec![0.0; max_pos * kvd];
        for (i, &(pos0, n)) in [(0usize, 7usize), (7, 3), (10, 1), (30, 7)].iter().enumerate() {
            let qkv = random_vec(7 * qkvd, 40 + i as u64);
            g_qkv.write_f32(&ctx, &qkv);
            g_q.write_f32(&ctx, &vec![5.0; 7 * qd]);
            step.write(&ctx, &StepParams::new(pos0, n));
            ctx.run("rope", &[&d]).unwrap();
            // Rows past n_tokens are untouched; rows at positions past max_pos (32..) are skipped whole.
            let n_cached = n.min(max_pos - pos0);
            let positions: Vec<usize> = (pos0..pos0 + n_cached).collect();
            let mut q_want: Vec<f32> = (0..n_cached).flat_map(|t| qkv[t * qkvd..][..qd].to_vec()).collect();
            rope_ref(&mut q_want, &positions, 4, 8, &inv);
            q_want.resize(7 * qd, 5.0);
            for t in 0..n_cached {
                let row = &qkv[t * qkvd..][..qkvd];
                let mut k = row[qd..qd + kvd].to_vec();
                rope_ref(&mut k, &[pos0 + t], 2, 8, &inv);
                k_want[(pos0 + t) * kvd..][..kvd].copy_from_slice(&k);
                v_want[(pos0 + t) * kvd..][..kvd].copy_from_slice(&row[qd + kvd..]);
            }
            assert_close(&g_q.read_f32(&ctx).unwrap(), &q_want, 1e-6, 1e-5, "q");
            assert_close(&g_k.read_f32(&ctx).unwrap(), &k_want, 1e-6, 1e-5, "k cache");
            assert_eq!(g_v.read_f32(&ctx).unwrap(), v_want, "v cache");
        }
    }

    #[test]
    fn rope_qkv_write_rejects_bad_shapes() {
        let ctx = test_context();
        let step = StepBuffer::new(&ctx);
        let odd = AttnShape { n_heads: 4, n_kv_heads: 4, head_dim: 7 };
        let qkv = GpuTensor::zeros(&ctx, "qkv", DType::F32, &[2, odd.qkv_dim()]).unwrap();
        let q = GpuTensor::zeros(&ctx, "q", DType::F32, &[2, odd.q_dim()]).unwrap();
        let k = GpuTensor::zeros(&ctx, "k", DType::F32, &[8, odd.kv_dim()]).unwrap();
        let tables = RopeTables::new(&ctx, 8, 10000.0, None, 8).unwrap();
        let r = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &qkv, rows: 2, row0: 0, shape: odd, tables: &tables, step: &step, q_out: &q, k_cache: &k, v_cache: &k },
        );
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "odd head_dim: {r:?}");
        // GQA needs n_heads to be a multiple of n_kv_heads.
        let bad = AttnShape { n_heads: 4, n_kv_heads: 3, head_dim: 8 };
        let r = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &qkv, rows: 2, row0: 0, shape: bad, tables: &tables, step: &step, q_out: &q, k_cache: &k, v_cache: &k },
        );
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "4/3 heads: {r:?}");
        // qkv too small for the rows.
        let ok = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 8 };
        let small = GpuTensor::zeros(&ctx, "qkv", DType::F32, &[1, ok.qkv_dim()]).unwrap();
        let q = GpuTensor::zeros(&ctx, "q", DType::F32, &[2, ok.q_dim()]).unwrap();
        let k = GpuTensor::zeros(&ctx, "k", DType::F32, &[8, ok.kv_dim()]).unwrap();
        let r = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &small, rows: 2, row0: 0, shape: ok, tables: &tables, step: &step, q_out: &q, k_cache: &k, v_cache: &k },
        );
        assert!(matches!(r, Err(GpuError::InvalidArgument(_))), "small qkv: {r:?}");
        let r = rope_qkv_write(
            &ctx,
            "rope",
            &RopeQkvOp { qkv: &small, rows: 1, row0: 0, shape: ok, tables: &tables, step: &step, q_out: &q, k_cache: &k, v_cache: &k },
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
