//! Token selection with only a few bytes read back per token.
//!
//! On the GPU: [`argmax`] (greedy decoding: one `(index, value)` pair) and [`top_k`] (the `k <=
//! 256` largest logits, sorted). [`argmax`] and [`top_k_sort`] are reductions in passes: every
//! workgroup reduces a tile of entries to one pair (argmax, 4096 entries per workgroup) or to its
//! `k` best (a bitonic sort of 1024 entries per workgroup), and passes repeat until one workgroup
//! is left. [`top_k`] first runs one workgroup that finds a threshold from 256 subset maxima,
//! keeps only the entries not below it and ranks those (no full sort; ~the cost of reading the
//! logits twice); only when more than 1024 entries pass the threshold does it fall back to the
//! [`top_k_sort`] passes, dispatched indirectly (zero workgroups otherwise).
//! Order: larger value first, equal values by lower index (as `torch.argmax` and a stable sort
//! do). NaN logits count as `-inf`.
//!
//! Both also report whether any of the `n` logits is NaN or infinite, at no extra read-back: the
//! index word of every pair they write carries [`NON_FINITE_FLAG`] (bit 31; indices are below
//! 2^31) when a non-finite logit was seen. [`decode_pairs`] strips it; [`saw_non_finite`] reads it.
//!
//! The CPU sampler that picks one token among these candidates is `generate::Sampler`.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuTensor, ShaderVariant};
use crate::kernels::checks::{check_f32, invalid};

const SOURCE: &str = include_str!("../../shaders/sample.wgsl");

/// Entries one argmax workgroup reduces (256 invocations x 16).
pub const ARGMAX_TILE: usize = 256 * 16;
/// Entries one top-k workgroup sorts.
pub const TOPK_TILE: usize = 1024;
/// The largest k that [`top_k`] supports.
pub const MAX_TOP_K: usize = 256;
/// Bit of a read-back pair's index word set when a logit was NaN or infinite (`NON_FINITE` in
/// `shaders/sample.wgsl`).
pub const NON_FINITE_FLAG: u32 = 1 << 31;

/// Uniform of `shaders/sample.wgsl` (`struct Params` there), one per pass.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SampleParams {
    /// Entries this pass reads (logits, or pairs of the previous pass).
    pub n: u32,
    /// Pairs each workgroup keeps (1 for argmax, k for top-k).
    pub k: u32,
    /// 1: read the f32 logits; 0: read the (index, value) pairs of the previous pass.
    pub from_logits: u32,
    /// `top_k_select`: u32 words of fallback dispatch arguments; else 0.
    pub aux: u32,
}

/// One kind of reduction pass: the entry point, and how many (index, value) pairs each
/// workgroup turns its `tile` entries into.
struct Reduction {
    entry: &'static str,
    tile: usize,
    per_group: usize,
}

/// Chain reduction passes over the first `n` logits: each workgroup of a pass turns `tile`
/// entries into `per_group` pairs, until one workgroup writes the result into `out`.
fn reduce_passes(
    ctx: &GpuContext,
    label: &str,
    r: Reduction,
    logits: &GpuTensor,
    n: usize,
    out: &GpuTensor,
) -> Result<Vec<Dispatch>, GpuError> {
    let Reduction { entry, tile, per_group } = r;
    let pipeline = ctx.pipeline(&ShaderVariant::new("sample", SOURCE, entry))?;
    let mut dispatches = Vec::new();
    let mut src: Option<GpuTensor> = None; // None: the logits
    let mut m = n;
    loop {
        let groups = m.div_ceil(tile);
        let last = groups == 1;
        let dst = if last {
            out.clone()
        } else {
            GpuTensor::zeros(ctx, &format!("{label}.pass{}", dispatches.len()), DType::U32, &[groups * per_group, 2])?
        };
        let params = SampleParams { n: m as u32, k: per_group as u32, from_logits: u32::from(src.is_none()), aux: 0 };
        let u = uniform(ctx, label, &params);
        // When reading the logits, `src` is not read: bind the (read-only) logits in its place.
        let src_buf = src.as_ref().map_or(&logits.buffer, |s| &s.buffer);
        let in_bytes = if src.is_none() { 4 * m } else { 8 * m };
        dispatches.push(Dispatch::new(
            ctx,
            &pipeline,
            format!("{label}.pass{}", dispatches.len()),
            &[u.as_entire_binding(), logits.buffer.as_entire_binding(), src_buf.as_entire_binding(), dst.buffer.as_entire_binding()],
            grid(groups as u32),
            Cost { flops: m as u64, bytes: (in_bytes + 8 * groups * per_group) as u64 },
        ));
        if last {
            return Ok(dispatches);
        }
        m = groups * per_group;
        src = Some(dst);
    }
}

fn check_logits(label: &str, logits: &GpuTensor, n: usize) -> Result<(), GpuError> {
    check_f32(label, logits, n, "logits")?;
    if n == 0 || n > (u32::MAX / 2) as usize {
        return Err(invalid(label, format!("{n} logits: need 1 to 2^31 - 1")));
    }
    Ok(())
}

/// Index and value of the largest of the first `n` logits (`[V]` f32), written to `out` as two
/// u32 words: the index, then the f32 bits of the value. Ties go to the lowest index (as
/// `torch.argmax`). One dispatch per reduction pass, named `label.passN`.
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the logits are not f32 or fewer than `n`,
/// `n` is 0 or 2^31 or more, or `out` holds fewer than 2 u32 words.
pub fn argmax(ctx: &GpuContext, label: &str, logits: &GpuTensor, n: usize, out: &GpuTensor) -> Result<Vec<Dispatch>, GpuError> {
    check_logits(label, logits, n)?;
    if out.dtype == DType::F16 || out.byte_len() < 8 {
        return Err(invalid(label, "argmax needs an output of 2 u32 words"));
    }
    reduce_passes(ctx, label, Reduction { entry: "argmax", tile: ARGMAX_TILE, per_group: 1 }, logits, n, out)
}

fn check_top_k(label: &str, logits: &GpuTensor, n: usize, k: usize, out: &GpuTensor) -> Result<(), GpuError> {
    check_logits(label, logits, n)?;
    if k == 0 || k > MAX_TOP_K || k > n {
        return Err(invalid(label, format!("top_k with k = {k} of {n} (1 <= k <= min(n, {MAX_TOP_K}))")));
    }
    if out.dtype == DType::F16 || out.byte_len() < 8 * k {
        return Err(invalid(label, format!("top_k needs an output of {} u32 words", 2 * k)));
    }
    Ok(())
}

/// The `k` (1..=256, <= n) largest of the first `n` logits, written to `out` as `k` pairs of u32
/// words (index, f32 bits of the value), sorted by value descending, ties lowest index first.
/// Read back `2 * k` words and turn them into pairs with [`decode_pairs`].
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when the logits are not f32 or fewer than `n`,
/// `n` is 0 or 2^31 or more, `k` is not in `1..=min(n, 256)`, or `out` holds fewer than `2 * k`
/// u32 words.
///
/// One selection workgroup (threshold from subset maxima, then ranking of the few entries above
/// it), plus the [`top_k_sort`] passes as an exact fallback, dispatched indirectly with zero
/// workgroups unless more than [`SELECT_CAP`] entries pass the threshold.
pub fn top_k(ctx: &GpuContext, label: &str, logits: &GpuTensor, n: usize, k: usize, out: &GpuTensor) -> Result<Vec<Dispatch>, GpuError> {
    check_top_k(label, logits, n, k, out)?;
    let fallback =
        reduce_passes(ctx, &format!("{label}.fallback"), Reduction { entry: "top_k", tile: TOPK_TILE, per_group: k }, logits, n, out)?;
    // The fallback's workgroup counts, as reduce_passes chains them.
    let mut full: Vec<u32> = Vec::with_capacity(3 * fallback.len());
    let mut m = n;
    loop {
        let groups = m.div_ceil(TOPK_TILE);
        full.extend_from_slice(&grid(groups as u32));
        if groups == 1 {
            break;
        }
        m = groups * k;
    }
    debug_assert_eq!(full.len(), 3 * fallback.len());
    let full_t = GpuTensor::from_u32(ctx, &format!("{label}.fallback_full"), &[full.len()], &full)?;
    let args = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(&format!("{label}.fallback_args")),
        size: (4 * full.len() as u64).max(16),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let pipeline = ctx.pipeline(&ShaderVariant::new("sample", SOURCE, "top_k_select"))?;
    let params = SampleParams { n: n as u32, k: k as u32, from_logits: 1, aux: full.len() as u32 };
    let u = uniform(ctx, label, &params);
    let mut out_list = vec![Dispatch::new(
        ctx,
        &pipeline,
        format!("{label}.select"),
        &[
            u.as_entire_binding(),
            logits.buffer.as_entire_binding(),
            logits.buffer.as_entire_binding(), // src: not read (from_logits = 1)
            out.buffer.as_entire_binding(),
            full_t.buffer.as_entire_binding(),
            args.as_entire_binding(),
        ],
        [1, 1, 1],
        Cost { flops: 2 * n as u64, bytes: (8 * n + 8 * k) as u64 },
    )];
    for (j, d) in fallback.into_iter().enumerate() {
        out_list.push(d.with_indirect(&args, 12 * j as u64));
    }
    Ok(out_list)
}

/// Entries above the threshold that [`top_k`] ranks in one workgroup (more: the fallback runs).
pub const SELECT_CAP: usize = 1024;

/// [`top_k`] by bitonic sorts of 1024-entry tiles in passes (its fallback; also usable alone).
///
/// # Errors
/// As [`top_k`].
pub fn top_k_sort(
    ctx: &GpuContext,
    label: &str,
    logits: &GpuTensor,
    n: usize,
    k: usize,
    out: &GpuTensor,
) -> Result<Vec<Dispatch>, GpuError> {
    check_top_k(label, logits, n, k, out)?;
    reduce_passes(ctx, label, Reduction { entry: "top_k", tile: TOPK_TILE, per_group: k }, logits, n, out)
}

/// Read-back words `[index, f32 bits, index, f32 bits, ..]` as `(index, value)` pairs, without
/// the [`NON_FINITE_FLAG`] bit.
pub fn decode_pairs(raw: &[u32]) -> Vec<(u32, f32)> {
    raw.chunks_exact(2).map(|w| (w[0] & !NON_FINITE_FLAG, f32::from_bits(w[1]))).collect()
}

/// True when the read-back words of [`argmax`] or [`top_k`] say that a logit was NaN or
/// infinite ([`NON_FINITE_FLAG`] on the first pair's index word: one workgroup writes them all).
pub fn saw_non_finite(raw: &[u32]) -> bool {
    raw.first().is_some_and(|&index| index & NON_FINITE_FLAG != 0)
}

/// CPU reference of the GPU order: value descending (NaN as -inf, -0 equal to +0), ties by
/// lower index.
pub fn sorted_ref(logits: &[f32]) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &x)| (i as u32, if x.is_nan() { f32::NEG_INFINITY } else { x })).collect();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
    v
}

/// CPU reference of [`argmax`].
pub fn argmax_ref(logits: &[f32]) -> (u32, f32) {
    sorted_ref(logits)[0]
}

/// CPU reference of [`top_k`].
pub fn top_k_ref(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v = sorted_ref(logits);
    v.truncate(k);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::kernels::testing::random_vec;

    fn gpu_argmax(ctx: &GpuContext, logits: &[f32]) -> (u32, f32) {
        let n = logits.len();
        let g = GpuTensor::from_f32(ctx, "logits", &[n], logits).unwrap();
        let out = GpuTensor::zeros(ctx, "out", DType::U32, &[2]).unwrap();
        let ds = argmax(ctx, "argmax", &g, n, &out).unwrap();
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        decode_pairs(&out.read_u32(ctx).unwrap())[0]
    }

    /// Both top-k paths: the selection (with its fallback) and the sort passes alone; they must agree.
    fn gpu_top_k(ctx: &GpuContext, logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let n = logits.len();
        let g = GpuTensor::from_f32(ctx, "logits", &[n], logits).unwrap();
        let mut results = Vec::new();
        for f in [top_k, top_k_sort] {
            // Garbage in the output: every pair must be written.
            let out = GpuTensor::from_u32(ctx, "out", &[k, 2], &vec![0xdead_beef; 2 * k]).unwrap();
            let ds = f(ctx, "top_k", &g, n, k, &out).unwrap();
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            results.push(decode_pairs(&out.read_u32(ctx).unwrap()));
        }
        assert_eq!(results[0], results[1], "top_k (select) vs top_k_sort, n={n} k={k}");
        results.pop().unwrap()
    }

    /// Entries that the selection keeps (the same threshold as the shader), to know which path ran.
    fn candidates_ref(logits: &[f32], k: usize) -> usize {
        let key = |i: usize| (if logits[i].is_nan() { f32::NEG_INFINITY } else { logits[i] }, i);
        let before = |a: (f32, usize), b: (f32, usize)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
        let mut maxima: Vec<(f32, usize)> = (0..256.min(logits.len()))
            .map(|t| (t..logits.len()).step_by(256).map(key).fold(key(t), |m, e| if before(e, m) { e } else { m }))
            .collect();
        maxima.sort_by(|a, b| if before(*a, *b) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater });
        let thr = maxima[k - 1];
        (0..logits.len()).filter(|&i| !before(thr, key(i))).count()
    }

    #[test]
    fn top_k_fallback_when_many_entries_pass_the_threshold() {
        let ctx = test_context();
        // Entry i has value -(i mod 256): subset t is constant, so the threshold keeps whole
        // subsets: 39 * 192 entries for k = 40, more than SELECT_CAP.
        let n = 49152;
        let logits: Vec<f32> = (0..n).map(|i| -((i % 256) as f32)).collect();
        assert!(candidates_ref(&logits, 40) > SELECT_CAP);
        assert_eq!(gpu_top_k(&ctx, &logits, 40), top_k_ref(&logits, 40));
        // The common case (k = 40 over random logits) stays on the fast path; k = 256 takes the
        // smallest of the 256 subset maxima as threshold and usually falls back.
        let fine: Vec<f32> = random_vec(n, 78).iter().map(|v| v * 10.0).collect();
        assert!(candidates_ref(&fine, 40) <= SELECT_CAP);
    }

    #[test]
    fn argmax_matches_reference() {
        let ctx = test_context();
        for (i, n) in [1usize, 7, 257, 1757, 4096, 4097, 49152, 128256].into_iter().enumerate() {
            let logits: Vec<f32> = random_vec(n, 300 + i as u64).iter().map(|v| v * 20.0).collect();
            assert_eq!(gpu_argmax(&ctx, &logits), argmax_ref(&logits), "argmax n={n}");
        }
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index() {
        let ctx = test_context();
        let n = 128256;
        let mut logits = random_vec(n, 5);
        // The maximum appears in several workgroups' tiles and within one tile.
        for i in [100_000usize, 70_001, 70_000, 9_000, 8_999, 127_000] {
            logits[i] = 3.5;
        }
        assert_eq!(gpu_argmax(&ctx, &logits), (8_999, 3.5));
        assert_eq!(gpu_argmax(&ctx, &vec![-2.0; 5000]), (0, -2.0));
        assert_eq!(gpu_argmax(&ctx, &vec![f32::NEG_INFINITY; 300]), (0, f32::NEG_INFINITY));
        // -0 and +0 are equal: the lower index wins whatever the sign.
        let mut zeros = vec![-1.0f32; 600];
        zeros[400] = 0.0;
        zeros[300] = -0.0;
        assert_eq!(gpu_argmax(&ctx, &zeros).0, 300);
        let mut with_nan = random_vec(777, 6);
        with_nan[3] = f32::NAN;
        with_nan[600] = 7.0;
        assert_eq!(gpu_argmax(&ctx, &with_nan), (600, 7.0));
    }

    #[test]
    fn top_k_matches_a_sort() {
        let ctx = test_context();
        let n = 49152;
        // Few distinct values so that ties cross tile and pass boundaries.
        let coarse: Vec<f32> = random_vec(n, 77).iter().map(|v| (v * 300.0).round()).collect();
        let fine: Vec<f32> = random_vec(n, 78).iter().map(|v| v * 10.0).collect();
        for logits in [&fine, &coarse] {
            for k in [1usize, 40, 256] {
                assert_eq!(gpu_top_k(&ctx, logits, k), top_k_ref(logits, k), "top_k k={k}");
            }
        }
    }

    #[test]
    fn top_k_on_odd_sizes() {
        let ctx = test_context();
        for (i, (n, k)) in [(1usize, 1usize), (7, 7), (257, 40), (1757, 256), (128256, 50)].into_iter().enumerate() {
            let logits: Vec<f32> = random_vec(n, 400 + i as u64).iter().map(|v| (v * 50.0).round() / 4.0).collect();
            assert_eq!(gpu_top_k(&ctx, &logits, k), top_k_ref(&logits, k), "top_k n={n} k={k}");
        }
        let mut masked = vec![f32::NEG_INFINITY; 2000];
        masked[1500] = 1.0;
        masked[7] = f32::NAN;
        assert_eq!(gpu_top_k(&ctx, &masked, 5), top_k_ref(&masked, 5));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let ctx = test_context();
        let g = GpuTensor::from_f32(&ctx, "logits", &[10], &random_vec(10, 1)).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::U32, &[8, 2]).unwrap();
        assert!(top_k(&ctx, "t", &g, 10, 0, &out).is_err());
        assert!(top_k(&ctx, "t", &g, 10, 11, &out).is_err());
        assert!(top_k(&ctx, "t", &g, 10, 9, &out).is_err(), "output too small");
        assert!(top_k(&ctx, "t", &g, 11, 1, &out).is_err(), "logits too short");
        assert!(argmax(&ctx, "a", &g, 0, &out).is_err());
        assert!(top_k(&ctx, "t", &g, 10, 8, &out).is_ok());
        assert!(top_k_sort(&ctx, "t", &g, 10, 11, &out).is_err());
        assert!(top_k_sort(&ctx, "t", &g, 10, 8, &out).is_ok());
    }

    /// The read-back words of argmax and of both top-k paths over `logits`.
    fn raw_outputs(ctx: &GpuContext, logits: &[f32], k: usize) -> Vec<(&'static str, Vec<u32>)> {
        let n = logits.len();
        let g = GpuTensor::from_f32(ctx, "logits", &[n], logits).unwrap();
        let mut outputs = Vec::new();
        let out = GpuTensor::zeros(ctx, "out", DType::U32, &[2]).unwrap();
        ctx.run("test", &argmax(ctx, "argmax", &g, n, &out).unwrap().iter().collect::<Vec<_>>()).unwrap();
        outputs.push(("argmax", out.read_u32(ctx).unwrap()));
        for (name, sort) in [("top_k", false), ("top_k_sort", true)] {
            let out = GpuTensor::zeros(ctx, "out", DType::U32, &[k, 2]).unwrap();
            let ds = if sort { top_k_sort(ctx, name, &g, n, k, &out) } else { top_k(ctx, name, &g, n, k, &out) };
            ctx.run("test", &ds.unwrap().iter().collect::<Vec<_>>()).unwrap();
            outputs.push((name, out.read_u32(ctx).unwrap()));
        }
        outputs
    }

    #[test]
    fn a_non_finite_logit_is_flagged_in_the_read_back() {
        // issue 15: NaN logits used to sample token 0 (an end token): an empty answer, exit 0.
        let ctx = test_context();
        // One workgroup and several passes; the top-k fallback (constant subsets) and the fast path.
        let fine = |n: usize, seed| random_vec(n, seed).iter().map(|v| v * 10.0).collect::<Vec<f32>>();
        let banded = |n: usize| (0..n).map(|i| -((i % 256) as f32)).collect::<Vec<f32>>();
        for (name, logits, k) in [("small", fine(700, 1), 8), ("vocab", fine(49152, 2), 40), ("fallback", banded(49152), 40)] {
            for (kernel, raw) in raw_outputs(&ctx, &logits, k) {
                assert!(!saw_non_finite(&raw), "{kernel} {name}: finite logits flagged");
            }
            let n = logits.len();
            for (at, bad) in [(0, f32::NAN), (n - 1, f32::INFINITY), (n / 2, f32::NEG_INFINITY), (4097 % n, -f32::NAN)] {
                let mut with_bad = logits.clone();
                with_bad[at] = bad;
                for (kernel, raw) in raw_outputs(&ctx, &with_bad, k) {
                    assert!(saw_non_finite(&raw), "{kernel} {name}: {bad} at {at} not flagged");
                    // The candidates themselves are as before, the flag stripped.
                    let want = top_k_ref(&with_bad, if kernel == "argmax" { 1 } else { k });
                    assert_eq!(decode_pairs(&raw), want, "{kernel} {name}: {bad} at {at}");
                }
            }
        }
        let all_nan = vec![f32::NAN; 5000];
        for (kernel, raw) in raw_outputs(&ctx, &all_nan, 4) {
            assert!(saw_non_finite(&raw), "{kernel}: all NaN");
        }
    }

    #[test]
    fn decode_pairs_reads_index_and_bits() {
        assert_eq!(decode_pairs(&[3, 1.5f32.to_bits(), 9, (-2.0f32).to_bits(), 77]), vec![(3, 1.5), (9, -2.0)]);
        let flagged = [3 | NON_FINITE_FLAG, 1.5f32.to_bits()];
        assert_eq!(decode_pairs(&flagged), vec![(3, 1.5)]);
        assert!(saw_non_finite(&flagged) && !saw_non_finite(&[3, 0]) && !saw_non_finite(&[]));
    }
}
