//! Cross-entropy loss of the LM head and its gradient with respect to the hidden rows, for
//! training: `loss = mean over counted rows t of (logsumexp(z[t]) − z[t, target_t])` with
//! `z = h · Wᵀ`, and `dh = (softmax(z) − onehot(target)) · W / count`, computed **without ever
//! holding `[T, vocab]` logits**: the vocabulary is processed in chunks of columns (default
//! [`DEFAULT_VOCAB_CHUNK`]) in one pass, keeping a running max and sum per row (the online
//! logsumexp of Milakov and Gimelshein 2018, "Online normalizer calculation for softmax") and,
//! for dh, the running sum `S[t] = Σ_v exp(z[t, v] − m_t) W[v]`, rescaled the same way when the
//! running max grows; at the end `dh[t] = (S[t] / l_t − W[target_t]) / count`, with the targets'
//! rows of W gathered by the embedding kernel. So each chunk's logits are computed once. See
//! `shaders/cross_entropy.wgsl` for the kernels.
//!
//! W is the LM head `[vocab, d]` (with tied embeddings, the embedding table) as a
//! [`GpuMatrix`]. The two products of a vocabulary chunk are the linear kernels' on that block
//! of W's rows ([`LinearOp::w_rows`]): the logits `h · W_chunkᵀ` by
//! [`crate::kernels::matmul::matmul`] (the adapter's prefill variant), the gradient
//! `grad · W_chunk` by its backward form ([`LinearForm::XW`](crate::kernels::linear::LinearForm),
//! `matmul_xw`). So W is read the way the forward reads it (dense chunks as a [`WeightKind`],
//! quantised chunks as their block type) and a vocabulary chunk may straddle two buffers of a
//! split matrix.
//!
//! Memory besides the operands: the scratch of one chunk's logits, `rows × chunk` f32
//! (T = 512, chunk 4096: 8 MiB), `(rows + 1) × 4` f32 of row statistics and, with dh, two
//! `[rows, d]` f32 tensors (S and the targets' rows of W) ([`cross_entropy_scratch_bytes`]).
//! The mask decides which rows count (completion tokens only); rows not counted get `dh = 0`
//! (or are left as they are with `accumulate`).

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, ShaderVariant, WeightKind};
use crate::kernels::checks::{check_f32, check_rows, check_u32, check_weight_kind, invalid};
use crate::kernels::choice::matmul_variant;
use crate::kernels::embedding::embedding_with_kind;
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::matmul;

const SOURCE: &str = include_str!("../../shaders/cross_entropy.wgsl");

/// Vocabulary columns per chunk that [`CrossEntropyOp::new`] sets: 4096 columns of T rows of
/// f32 logits are 16 KiB per row (8 MiB for T = 512), and SmolLM2's 49152 words are 12 chunks.
pub const DEFAULT_VOCAB_CHUNK: usize = 4096;

/// Uniform of `shaders/cross_entropy.wgsl` (`struct CeParams` there, same fields in the same
/// order), one per vocabulary chunk (and one for the finishing pass).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct CeParams {
    /// Rows T of h.
    pub rows: u32,
    /// Rows of the whole W (the vocabulary).
    pub vocab: u32,
    /// Vocabulary index of the chunk's first column.
    pub col0: u32,
    /// Columns in the chunk: also the row stride of the logits scratch.
    pub cols: u32,
    /// Columns d of h and W (the gradient passes).
    pub dim: u32,
    /// 1: add the gradient into dh (`ce_dh`).
    pub accumulate: u32,
    /// Padding to 32 bytes.
    pub _pad0: u32,
    /// Padding to 32 bytes.
    pub _pad1: u32,
}

/// The operands of one cross-entropy (see [`cross_entropy`]).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyOp<'a> {
    /// Hidden rows after the final norm, `[rows, d]` f32.
    pub h: &'a GpuTensor,
    /// Rows T; at least 1.
    pub rows: usize,
    /// The LM head, `[vocab, d]` (Hugging Face's `[out, in]`; the embedding table when tied).
    pub w: &'a GpuMatrix,
    /// How dense chunks of W are read ([`LinearOp::kind`]); `None`: the adapter's choice for
    /// `w.dtype` ([`crate::kernels::choice::weight_kind`]). Quantised chunks are read as their
    /// block type.
    pub kind: Option<WeightKind>,
    /// Target token of each row, `[rows]` u32; a counted row's target must be below vocab.
    pub targets: &'a GpuTensor,
    /// Which rows count, `[rows]` u32: non-zero counts (completion tokens), 0 does not.
    pub mask: &'a GpuTensor,
    /// Vocabulary columns per chunk; at least 1.
    pub chunk: usize,
    /// Output: the mean loss over counted rows, `[1]` f32 (0 when no row counts, NaN when a
    /// counted row's target is not below vocab).
    pub loss: &'a GpuTensor,
    /// Output: the gradient with respect to h, `[rows, d]` f32; `None`: loss only (one pass).
    pub dh: Option<&'a GpuTensor>,
    /// Add the gradient into dh instead of overwriting it.
    pub accumulate: bool,
}

impl<'a> CrossEntropyOp<'a> {
    /// The loss of `rows` rows of `h` against `targets` where `mask` is non-zero, into `loss`,
    /// with chunks of [`DEFAULT_VOCAB_CHUNK`] columns, the adapter's weight kind, no gradient.
    pub fn new(h: &'a GpuTensor, rows: usize, w: &'a GpuMatrix, targets: &'a GpuTensor, mask: &'a GpuTensor, loss: &'a GpuTensor) -> Self {
        CrossEntropyOp { h, rows, w, kind: None, targets, mask, chunk: DEFAULT_VOCAB_CHUNK, loss, dh: None, accumulate: false }
    }
}

/// Bytes of GPU scratch that [`cross_entropy`] allocates for `rows` rows of width `dim` and
/// chunks of `chunk` columns: one chunk's logits (`rows × chunk` f32), the row statistics
/// (`(rows + 1) × 4` f32) and, with the gradient, its running sum and the targets' rows of W
/// (`2 × rows × dim` f32).
pub fn cross_entropy_scratch_bytes(rows: usize, chunk: usize, dim: usize, with_grad: bool) -> usize {
    4 * (rows * chunk + 4 * (rows + 1) + if with_grad { 2 * rows * dim } else { 0 })
}

fn pipeline_variant(entry: &'static str) -> ShaderVariant {
    ShaderVariant::new("cross_entropy", SOURCE, entry)
}

/// Prepares the cross-entropy of `op` (see the module docs): with `z = h · Wᵀ` over the rows t
/// whose mask is non-zero (`count` of them),
/// `loss = (1 / count) Σ_t (log Σ_v exp(z[t, v]) − z[t, target_t])` and, when `op.dh` is set,
/// `dh[t] = (1 / count) Σ_v (softmax(z[t])_v − [v = target_t]) W[v]` (0 for rows not counted),
/// overwritten or, with `op.accumulate`, added.
///
/// Dispatches, in order: per vocabulary chunk c the logits product `label.logits[c]` (one
/// dispatch per buffer of W the chunk reads, as [`matmul`] names them), `label.lse[c]` and,
/// with dh, `label.prob[c]` and the product `label.dh[c]` into the running sum; then
/// `label.finish`; then, with dh, the gather `label.w_target` and `label.dh`. Scratch:
/// [`cross_entropy_scratch_bytes`] (the logits scratch is checked against the binding limit).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when rows, d, vocab or the chunk size is 0; h,
/// loss or dh is not f32 or too small; targets or mask is not u32 or has fewer than `rows`
/// values; the products reject W ([`LinearOp::check`]: a weight kind that cannot read W's
/// dtype or needs a feature the adapter lacks, a chunk of W that does not match the matrix); an
/// index does not fit in u32. A scratch larger than a binding is [`GpuError::BufferTooLarge`].
pub fn cross_entropy(ctx: &GpuContext, label: &str, op: &CrossEntropyOp) -> Result<Vec<Dispatch>, GpuError> {
    let CrossEntropyOp { h, rows, w, kind, targets, mask, chunk, loss, dh, accumulate } = *op;
    let (vocab, dim) = (w.rows, w.cols);
    check_rows(label, rows)?;
    if dim == 0 || vocab == 0 || chunk == 0 {
        return Err(invalid(label, format!("empty cross-entropy: W is [{vocab}, {dim}], chunk {chunk}")));
    }
    check_f32(label, h, rows * dim, "h")?;
    check_f32(label, loss, 1, "loss")?;
    if let Some(dh) = dh {
        check_f32(label, dh, rows * dim, "dh")?;
    }
    for (t, what) in [(targets, "targets"), (mask, "mask")] {
        if t.dtype != DType::U32 || t.numel() < rows {
            return Err(invalid(label, format!("{what} ({}) needs at least {rows} u32 values, has {} {}", t.label, t.numel(), t.dtype)));
        }
    }
    // The products check W too, under their own labels; a kind that cannot read W is the
    // cross-entropy's argument, so it is named here.
    let dense_kind = kind.unwrap_or_else(|| crate::kernels::choice::dense_kind(ctx, w));
    check_weight_kind(ctx, label, dense_kind, w.dtype)?;
    let chunk = chunk.min(vocab);
    check_u32(label, rows * chunk.max(dim), "rows x chunk columns")?;
    check_u32(label, vocab, "vocab")?;

    let logits = GpuTensor::zeros_bound(ctx, &format!("{label}.logits"), DType::F32, &[rows, chunk])?;
    let stats = GpuTensor::zeros(ctx, &format!("{label}.stats"), DType::F32, &[rows + 1, 4])?;
    let (update, finish) = (ctx.pipeline(&pipeline_variant("ce_update"))?, ctx.pipeline(&pipeline_variant("ce_finish"))?);
    let variant = matmul_variant(ctx, rows);
    // With the gradient: its running sum `S[t] = Σ_v exp(z[t, v] − m_t) W[v]` (`dh_sum`) over
    // the chunks seen (rescaled when a row's running max m_t grows), and the targets' rows of W.
    let grad_scratch = match dh {
        Some(_) => Some((
            GpuTensor::zeros(ctx, &format!("{label}.dh_sum"), DType::F32, &[rows, dim])?,
            GpuTensor::zeros(ctx, &format!("{label}.w_target"), DType::F32, &[rows, dim])?,
            ctx.pipeline(&pipeline_variant("ce_prob"))?,
        )),
        None => None,
    };
    // (uniform, first column, columns) of every vocabulary chunk, in vocabulary order.
    let chunks: Vec<(wgpu::Buffer, usize, usize)> = (0..vocab)
        .step_by(chunk)
        .map(|col0| {
            let cols = chunk.min(vocab - col0);
            let params = CeParams {
                rows: rows as u32,
                vocab: vocab as u32,
                col0: col0 as u32,
                cols: cols as u32,
                dim: dim as u32,
                ..Zeroable::zeroed()
            };
            (uniform(ctx, label, &params), col0, cols)
        })
        .collect();
    let row_groups = grid(rows.div_ceil(64) as u32);
    let mut out = Vec::new();
    for (c, (u, col0, cols)) in chunks.iter().enumerate() {
        // The chunk's logits `[rows, cols]` into the scratch, then the running logsumexp.
        let product = LinearOp { kind, ..LinearOp::new(h, rows, w, &logits).w_rows(*col0, *cols) };
        out.extend(matmul(ctx, &format!("{label}.logits[{c}]"), &product, variant)?);
        out.push(Dispatch::new(
            ctx,
            &update,
            format!("{label}.lse[{c}]"),
            &[
                u.as_entire_binding(),
                targets.buffer.as_entire_binding(),
                mask.buffer.as_entire_binding(),
                stats.buffer.as_entire_binding(),
                logits.buffer.as_entire_binding(),
            ],
            row_groups,
            Cost { flops: (4 * rows * cols) as u64, bytes: (4 * rows * (cols + 10)) as u64 },
        ));
        let Some((dh_sum, _, prob)) = &grad_scratch else { continue };
        // The logits become exp(z − m_t) in place and the running sum is rescaled; then the sum
        // gains the chunk's share, the scratch times the chunk's rows of W.
        out.push(Dispatch::new(
            ctx,
            prob,
            format!("{label}.prob[{c}]"),
            &[
                u.as_entire_binding(),
                targets.buffer.as_entire_binding(),
                mask.buffer.as_entire_binding(),
                stats.buffer.as_entire_binding(),
                logits.buffer.as_entire_binding(),
                dh_sum.buffer.as_entire_binding(),
            ],
            grid((rows * cols.max(&dim)).div_ceil(64) as u32),
            Cost { flops: (2 * rows * (cols + dim)) as u64, bytes: (8 * rows * (cols + dim)) as u64 },
        ));
        let product = LinearOp { kind, ..LinearOp::new_xw(&logits, rows, w, dh_sum).w_rows(*col0, *cols).accumulate(true) };
        out.extend(matmul(ctx, &format!("{label}.dh[{c}]"), &product, variant)?);
    }
    let finish_params = uniform(
        ctx,
        label,
        &CeParams { rows: rows as u32, vocab: vocab as u32, dim: dim as u32, accumulate: accumulate as u32, ..Zeroable::zeroed() },
    );
    out.push(Dispatch::new(
        ctx,
        &finish,
        format!("{label}.finish"),
        &[
            finish_params.as_entire_binding(),
            targets.buffer.as_entire_binding(),
            mask.buffer.as_entire_binding(),
            stats.buffer.as_entire_binding(),
            loss.buffer.as_entire_binding(),
        ],
        [1, 1, 1],
        Cost { flops: (4 * rows) as u64, bytes: (4 * 12 * rows) as u64 },
    ));
    let (Some(dh), Some((dh_sum, w_target, _))) = (dh, &grad_scratch) else { return Ok(out) };
    // dh[t] (+)= (dh_sum[t] / l_t − W[target_t]) / count for counted rows.
    out.extend(embedding_with_kind(ctx, &format!("{label}.w_target"), targets, rows, w, w_target, dense_kind)?);
    out.push(Dispatch::new(
        ctx,
        &ctx.pipeline(&pipeline_variant("ce_dh"))?,
        format!("{label}.dh"),
        &[
            finish_params.as_entire_binding(),
            targets.buffer.as_entire_binding(),
            mask.buffer.as_entire_binding(),
            stats.buffer.as_entire_binding(),
            dh.buffer.as_entire_binding(),
            dh_sum.buffer.as_entire_binding(),
            w_target.buffer.as_entire_binding(),
        ],
        grid((rows * dim).div_ceil(64) as u32),
        Cost { flops: (3 * rows * dim) as u64, bytes: (4 * 4 * rows * dim) as u64 },
    ));
    Ok(out)
}

/// CPU reference of [`cross_entropy`] in f64, from the definition (one row's logits at a time):
/// `h` `[T, d]`, `w` `[vocab, d]`, `targets` `[T]`, `mask` `[T]`; returns the mean over counted
/// rows of `log Σ_v exp(z_v) − z_target` with `z = h[t] · Wᵀ`, and
/// `dh[t] = (softmax(z) − onehot(target)) · W / count` (0 for rows not counted). No counted row:
/// loss 0 and dh 0. A counted row whose target is not below vocab makes the loss NaN.
pub fn cross_entropy_ref(h: &[f64], w: &[f64], d: usize, targets: &[u32], mask: &[bool]) -> (f64, Vec<f64>) {
    let vocab = w.len() / d;
    let count = mask.iter().filter(|&&m| m).count();
    let mut dh = vec![0.0; h.len()];
    if count == 0 {
        return (0.0, dh);
    }
    let mut sum = 0.0;
    for (t, (hr, dhr)) in h.chunks(d).zip(dh.chunks_mut(d)).enumerate() {
        if !mask[t] {
            continue;
        }
        let z: Vec<f64> = w.chunks(d).map(|wr| wr.iter().zip(hr).map(|(a, b)| a * b).sum()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        let target = targets[t] as usize;
        sum += lse - z.get(target).copied().unwrap_or(f64::NAN);
        for (v, wr) in w.chunks(d).enumerate() {
            let g = ((z[v] - lse).exp() - if v == target { 1.0 } else { 0.0 }) / count as f64;
            for (o, &x) in dhr.iter_mut().zip(wr) {
                *o += g * x;
            }
        }
    }
    debug_assert_eq!(vocab * d, w.len());
    (sum / count as f64, dh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuOptions, MatrixPart, test_context};
    use crate::kernels::testing::{
        assert_close, assert_close_f64, central_differences, random_blocks, random_vec, round_f16, to_f64, weight_kinds,
    };
    use crate::model::QuantType;
    use rand::{Rng, SeedableRng};

    fn random_targets(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
    }

    #[test]
    fn cross_entropy_reference_matches_finite_differences() {
        // T = 5, d = 37, vocab 1000; rows 1 and 3 are not counted (their dh must be 0).
        let (rows, d, vocab) = (5, 37, 1000);
        let h: Vec<f64> = random_vec(rows * d, 1).iter().map(|&x| 3.0 * x as f64).collect();
        let w = to_f64(&random_vec(vocab * d, 2));
        let targets = random_targets(rows, vocab, 3);
        let mask = [true, false, true, false, true];
        let (loss, dh) = cross_entropy_ref(&h, &w, d, &targets, &mask);
        assert!(loss.is_finite() && loss > 0.0);
        let numeric = central_differences(&h, 1e-5, |x| cross_entropy_ref(x, &w, d, &targets, &mask).0);
        assert_close_f64(&dh, &numeric, 1e-7, "dh: backward vs finite differences");
        assert!(dh[d..2 * d].iter().chain(&dh[3 * d..4 * d]).all(|&g| g == 0.0));
    }

    #[test]
    fn cross_entropy_reference_edge_cases() {
        // One row, two words: loss = log(1 + e^(z1 - z0)) for target 0.
        let (loss, dh) = cross_entropy_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 2, &[0], &[true]);
        assert!((loss - (1.0f64 + 1.0f64.exp()).ln()).abs() < 1e-12);
        let p1 = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((dh[0] - (-p1)).abs() < 1e-12 && (dh[1] - p1).abs() < 1e-12);
        assert_eq!(cross_entropy_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 2, &[0], &[false]), (0.0, vec![0.0, 0.0]));
        assert!(cross_entropy_ref(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 2, &[2], &[true]).0.is_nan());
    }

    /// One GPU run: returns (loss, dh) read back. `dh0` is dh's content before (garbage unless
    /// accumulating).
    #[allow(clippy::too_many_arguments)]
    fn run_gpu(
        ctx: &GpuContext,
        w: &GpuMatrix,
        kind: WeightKind,
        h: &[f32],
        targets: &[u32],
        mask: &[bool],
        chunk: usize,
        dh0: Option<&[f32]>,
        accumulate: bool,
    ) -> (f32, Option<Vec<f32>>) {
        let (rows, d) = (targets.len(), w.cols);
        let gh = GpuTensor::from_f32(ctx, "h", &[rows, d], h).unwrap();
        let gt = GpuTensor::from_u32(ctx, "targets", &[rows], targets).unwrap();
        let mask_u: Vec<u32> = mask.iter().map(|&m| u32::from(m)).collect();
        let gm = GpuTensor::from_u32(ctx, "mask", &[rows], &mask_u).unwrap();
        let loss = GpuTensor::from_f32(ctx, "loss", &[1], &[-5.0]).unwrap();
        let gdh = dh0.map(|v| GpuTensor::from_f32(ctx, "dh", &[rows, d], v).unwrap());
        let op =
            CrossEntropyOp { kind: Some(kind), chunk, dh: gdh.as_ref(), accumulate, ..CrossEntropyOp::new(&gh, rows, w, &gt, &gm, &loss) };
        let ds = cross_entropy(ctx, "ce", &op).unwrap();
        ctx.run("ce", &ds.iter().collect::<Vec<_>>()).unwrap();
        (loss.read_f32(ctx).unwrap()[0], gdh.map(|t| t.read_f32(ctx).unwrap()))
    }

    /// An LM head on the GPU, the values the kernel reads from it and the kind it reads dense
    /// chunks as.
    struct Head {
        w: GpuMatrix,
        wv: Vec<f32>,
        kind: WeightKind,
    }

    /// The GPU loss and dh (overwritten, and accumulated onto random values) against the f64
    /// reference, for `rows` random rows of h scaled by `h_scale`.
    fn check(ctx: &GpuContext, head: &Head, rows: usize, chunk: usize, h_scale: f32, seed: u64) {
        let Head { w, wv, kind } = head;
        let (d, kind) = (w.cols, *kind);
        let h: Vec<f32> = random_vec(rows * d, seed).iter().map(|x| x * h_scale).collect();
        let targets = random_targets(rows, w.rows, seed + 1);
        let mask: Vec<bool> = (0..rows).map(|t| t % 3 != 1).collect();
        let (want_loss, want_dh) = cross_entropy_ref(&to_f64(&h), &to_f64(wv), d, &targets, &mask);
        let what = format!("{} vocab={} d={d} T={rows} chunk={chunk} h_scale={h_scale} chunks={}", kind.name(), w.rows, w.chunks.len());
        let garbage = random_vec(rows * d, seed + 2);
        let (loss, dh) = run_gpu(ctx, w, kind, &h, &targets, &mask, chunk, Some(&garbage), false);
        let max_w = wv.iter().fold(0f32, |a, v| a.max(v.abs()));
        let loss_tol = 1e-5 * (d as f32).sqrt() * h_scale * max_w * 4.0;
        assert!((loss as f64 - want_loss).abs() <= loss_tol as f64 + 1e-5 * want_loss.abs(), "{what}: loss {loss}, want {want_loss}");
        let want_dh: Vec<f32> = want_dh.iter().map(|&x| x as f32).collect();
        assert_close(&dh.unwrap(), &want_dh, 2e-6 * max_w, 1e-4, &format!("dh {what}"));
        let (loss2, dh2) = run_gpu(ctx, w, kind, &h, &targets, &mask, chunk, Some(&garbage), true);
        assert_eq!(loss2, loss, "{what}: accumulate must not change the loss");
        let want_acc: Vec<f32> = want_dh.iter().zip(&garbage).map(|(a, b)| a + b).collect();
        assert_close(&dh2.unwrap(), &want_acc, 2e-6 * max_w, 1e-4, &format!("dh accumulated {what}"));
        let (loss3, none) = run_gpu(ctx, w, kind, &h, &targets, &mask, chunk, None, false);
        assert_eq!((loss3, none), (loss, None), "{what}: the loss without dh");
    }

    fn dense(ctx: &GpuContext, vocab: usize, d: usize, kind: WeightKind, seed: u64) -> Head {
        let wv = random_vec(vocab * d, seed);
        let w = GpuMatrix::upload(ctx, "w", vocab, d, &wv, kind.dtype()).unwrap();
        Head { w, wv: if kind.dtype() == DType::F16 { round_f16(&wv) } else { wv }, kind }
    }

    #[test]
    fn cross_entropy_matches_reference() {
        let ctx = test_context();
        // vocab 1000 in chunks of 256 (the last one partial), d odd (scalar reads) and d % 4 == 0
        // (vec4 reads), every dense weight kind; one chunk as large as the vocabulary.
        for kind in weight_kinds(&ctx) {
            for (i, &(vocab, d, rows, chunk)) in
                [(1000, 37, 5, 256), (1000, 64, 7, 256), (301, 40, 3, 4096), (1, 5, 2, 1)].iter().enumerate()
            {
                check(&ctx, &dense(&ctx, vocab, d, kind, 20 + i as u64), rows, chunk, 1.0, 30 + i as u64);
            }
        }
    }

    #[test]
    fn cross_entropy_is_stable_for_large_logits() {
        // Logits up to ~|h| |w| ~ 300: exp overflows f32 without the running max.
        let ctx = test_context();
        check(&ctx, &dense(&ctx, 1000, 37, WeightKind::F32, 40), 6, 256, 30.0, 41);
    }

    #[test]
    fn cross_entropy_over_a_split_matrix() {
        // A binding of 4 KiB splits a [1000, 37] f32 matrix into chunks of ~27 rows, so the
        // vocabulary chunks follow the buffers (and a chunk size of 10 cuts them further).
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(4096), ..Default::default() }).unwrap();
        for kind in [WeightKind::F32, WeightKind::F16Packed] {
            let head = dense(&ctx, 1000, 37, kind, 50);
            assert!(head.w.chunks.len() > 10);
            check(&ctx, &head, 5, 10, 1.0, 51);
            check(&ctx, &head, 3, 256, 1.0, 52);
        }
    }

    #[test]
    fn cross_entropy_of_quantised_weights() {
        let ctx = test_context();
        for q in QuantType::ALL {
            let d = q.block_elems() * 2;
            let blocks = random_blocks(q, 300, d, 60);
            let wv = blocks.dequantize().unwrap();
            let w = GpuMatrix::upload_parts(&ctx, "w", d, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
            check(&ctx, &Head { w, wv, kind: WeightKind::F32 }, 5, 128, 0.2, 61);
        }
    }

    #[test]
    fn cross_entropy_counts_only_masked_rows() {
        let ctx = test_context();
        let w = dense(&ctx, 100, 8, WeightKind::F32, 70).w;
        let h = random_vec(3 * 8, 71);
        // No row counted: loss 0 and dh 0.
        let (loss, dh) = run_gpu(&ctx, &w, WeightKind::F32, &h, &[1, 2, 3], &[false; 3], 16, Some(&[9.0f32; 24][..]), false);
        assert_eq!((loss, dh.unwrap()), (0.0, vec![0.0; 24]));
        // A counted row with a target outside the vocabulary: NaN, not a silent number.
        let (loss, _) = run_gpu(&ctx, &w, WeightKind::F32, &h, &[1, 100, 3], &[true, true, false], 16, None, false);
        assert!(loss.is_nan());
        // The same target on a row that does not count is ignored.
        let (loss, _) = run_gpu(&ctx, &w, WeightKind::F32, &h, &[1, 100, 3], &[true, false, true], 16, None, false);
        assert!(loss.is_finite());
    }

    #[test]
    fn cross_entropy_rejects_bad_arguments() {
        let ctx = test_context();
        let w = dense(&ctx, 50, 8, WeightKind::F32, 80).w;
        let h = GpuTensor::zeros(&ctx, "h", DType::F32, &[4, 8]).unwrap();
        let ids = GpuTensor::zeros(&ctx, "ids", DType::U32, &[4]).unwrap();
        let loss = GpuTensor::zeros(&ctx, "loss", DType::F32, &[1]).unwrap();
        let op = CrossEntropyOp { kind: Some(WeightKind::F32), dh: Some(&h), ..CrossEntropyOp::new(&h, 4, &w, &ids, &ids, &loss) };
        assert!(cross_entropy(&ctx, "ce", &op).is_ok());
        let bad = |op: CrossEntropyOp, what: &str| match cross_entropy(&ctx, "ce", &op) {
            Err(GpuError::InvalidArgument(m)) => assert!(m.starts_with("ce: "), "{what}: {m}"),
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        };
        bad(CrossEntropyOp { rows: 0, ..op }, "zero rows");
        bad(CrossEntropyOp { rows: 5, ..op }, "h too small for 5 rows");
        bad(CrossEntropyOp { chunk: 0, ..op }, "zero chunk");
        bad(CrossEntropyOp { targets: &h, ..op }, "targets not u32");
        bad(CrossEntropyOp { mask: &loss, ..op }, "mask not u32");
        bad(CrossEntropyOp { loss: &ids, ..op }, "loss not f32");
        bad(CrossEntropyOp { dh: Some(&loss), ..op }, "dh too small");
        bad(CrossEntropyOp { kind: Some(WeightKind::F16Packed), ..op }, "f16 kind on f32 weights");
    }
}
