//! Token embedding lookup: `out[t, :] = table[ids[t], :]`, with the table (`[vocab, d]`, f32 or
//! f16) possibly split by rows over several buffers ([`GpuMatrix`] chunks): one dispatch per
//! chunk, each writing the rows of the tokens whose ids fall in it.
//!
//! Ids outside `0..vocab` leave their output row untouched (the runtime validates ids on the
//! CPU); the bound check on the GPU keeps them from reading outside the table.

use bytemuck::{Pod, Zeroable};

use crate::gpu::buffer::uniform;
use crate::gpu::dispatch::grid;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, ShaderVariant, WeightKind};
use crate::kernels::checks::{check_f32, check_weight_kind, invalid};

const SOURCE: &str = include_str!("../../shaders/embedding.wgsl");

/// Uniform of `shaders/embedding.wgsl` (`struct Params` there), one per chunk of the table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct EmbeddingParams {
    /// Tokens to look up.
    pub rows: u32,
    /// Row width d of the table and the output.
    pub dim: u32,
    /// Token id of the chunk's first row.
    pub row0: u32,
    /// Rows (token ids) in the chunk.
    pub chunk_rows: u32,
}

/// Look up `rows` token ids (`ids`: `[T]` u32) in `table` (`[vocab, d]`) into `out` (`[T, d]`
/// f32), reading f16 tables the way [`crate::kernels::choice::weight_kind`] chooses. One
/// dispatch per chunk of the table, named `label` (`label[chunk c]` when it is split).
///
/// # Errors
/// As [`embedding_with_kind`].
pub fn embedding(
    ctx: &GpuContext,
    label: &str,
    ids: &GpuTensor,
    rows: usize,
    table: &GpuMatrix,
    out: &GpuTensor,
) -> Result<Vec<Dispatch>, GpuError> {
    embedding_with_kind(ctx, label, ids, rows, table, out, crate::kernels::choice::dense_kind(ctx, table))
}

/// [`embedding`] with an explicit way of reading the table (tests use every kind).
///
/// # Errors
/// [`GpuError::InvalidArgument`] naming `label` when `kind` cannot read the table's dtype or
/// needs SHADER_F16 that the adapter lacks, ids is not u32 or has fewer than `rows` values, out
/// is not f32 or smaller than `[rows, d]`, or an index does not fit in u32.
pub fn embedding_with_kind(
    ctx: &GpuContext,
    label: &str,
    ids: &GpuTensor,
    rows: usize,
    table: &GpuMatrix,
    out: &GpuTensor,
    kind: WeightKind,
) -> Result<Vec<Dispatch>, GpuError> {
    let d = table.cols;
    check_weight_kind(ctx, label, kind, table.dtype)?;
    let kind = kind.for_k(d);
    if ids.dtype != DType::U32 || ids.numel() < rows {
        return Err(invalid(label, format!("ids ({}) needs at least {rows} u32 values, has {} {}", ids.label, ids.numel(), ids.dtype)));
    }
    check_f32(label, out, rows * d, "out")?;
    if rows * d > u32::MAX as usize / 2 || table.rows > u32::MAX as usize {
        return Err(invalid(label, format!("embedding of [{rows}, {d}] is too large")));
    }
    let pipeline = |kind: WeightKind| ctx.pipeline(&ShaderVariant::new("embedding", SOURCE, "embedding").weights("W_DECL", kind, 2, "w"));
    let n = rows * d;
    let mut dispatches = Vec::with_capacity(table.chunks.len());
    for (c, chunk) in table.chunks.iter().enumerate() {
        if chunk.rows * d > u32::MAX as usize {
            return Err(invalid(label, format!("table chunk {c} is too large")));
        }
        if !chunk.fits(d, table.dtype) {
            return Err(invalid(label, format!("table chunk {c} does not match the table")));
        }
        let pipeline = pipeline(chunk.kind(kind))?;
        let params = EmbeddingParams { rows: rows as u32, dim: d as u32, row0: chunk.row0 as u32, chunk_rows: chunk.rows as u32 };
        let name = if table.chunks.len() == 1 { label.to_string() } else { format!("{label}[chunk {c}]") };
        let u = uniform(ctx, &name, &params);
        // Every chunk checks every output element; only the rows of its own ids are copied
        // (counted here as if each chunk copied its share).
        let share = (n as u64 * chunk.rows as u64).div_ceil(table.rows.max(1) as u64);
        // Bytes read per value copied: the dtype's, or a block's bytes shared by its values.
        let read = match chunk.quant {
            None => share * table.dtype.size() as u64,
            Some(q) => (share as f64 * q.gpu_bits_per_weight() / 8.0).ceil() as u64,
        };
        let cost = Cost { flops: 0, bytes: 4 * rows as u64 + read + 4 * share };
        dispatches.push(Dispatch::new(
            ctx,
            &pipeline,
            name,
            &[
                u.as_entire_binding(),
                ids.buffer.as_entire_binding(),
                chunk.tensor.buffer.as_entire_binding(),
                out.buffer.as_entire_binding(),
            ],
            grid((n as u32).div_ceil(256)),
            cost,
        ));
    }
    Ok(dispatches)
}

/// CPU reference: rows of `table` (`[vocab, d]`) for `ids`; an id outside the table leaves its
/// row as it is in `out_before` (`[T, d]`).
pub fn embedding_ref(ids: &[u32], table: &[f32], d: usize, out_before: &[f32]) -> Vec<f32> {
    let vocab = table.len() / d.max(1);
    let mut out = out_before.to_vec();
    for (t, &id) in ids.iter().enumerate() {
        if (id as usize) < vocab {
            out[t * d..(t + 1) * d].copy_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuOptions, test_context};
    use crate::kernels::testing::{assert_close, random_vec, round_f16, weight_kinds};
    use rand::{Rng, SeedableRng};

    fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
    }

    /// Runs one lookup and checks it; returns the number of chunks of the table.
    fn check(ctx: &GpuContext, vocab: usize, d: usize, ids: &[u32], kind: WeightKind, seed: u64) -> usize {
        let data = random_vec(vocab * d, seed);
        let table = GpuMatrix::upload(ctx, "table", vocab, d, &data, kind.dtype()).unwrap();
        let want_table = if kind.dtype() == DType::F32 { data.clone() } else { round_f16(&data) };
        let rows = ids.len();
        let before = vec![-7.5f32; rows * d];
        let gids = GpuTensor::from_u32(ctx, "ids", &[rows], ids).unwrap();
        let out = GpuTensor::from_f32(ctx, "out", &[rows, d], &before).unwrap();
        let ds = embedding_with_kind(ctx, "embedding", &gids, rows, &table, &out, kind).unwrap();
        assert_eq!(ds.len(), table.chunks.len());
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let what = format!("embedding vocab={vocab} d={d} T={rows} {}", kind.name());
        assert_close(&out.read_f32(ctx).unwrap(), &embedding_ref(ids, &want_table, d, &before), 0.0, 0.0, &what);
        table.chunks.len()
    }

    #[test]
    fn embedding_matches_reference() {
        let ctx = test_context();
        for kind in weight_kinds(&ctx) {
            for (i, (vocab, d, t)) in [(1, 1, 1), (7, 7, 7), (257, 33, 257), (1757, 13, 5), (4000, 576, 1757)].into_iter().enumerate() {
                let ids = random_ids(t, vocab, 50 + i as u64);
                check(&ctx, vocab, d, &ids, kind, 60 + i as u64);
            }
        }
    }

    #[test]
    fn embedding_skips_out_of_range_ids() {
        let ctx = test_context();
        for kind in weight_kinds(&ctx) {
            let ids = [3u32, 257, 0, u32::MAX, 256, 1 << 31];
            check(&ctx, 257, 9, &ids, kind, 7);
        }
    }

    #[test]
    fn embedding_of_a_split_table() {
        // d odd, rows of 13 f16 (26 bytes) or f32 (52 bytes): a 600-byte binding splits a
        // 103-row table into >= 3 chunks.
        let ctx = GpuContext::new(&GpuOptions { max_binding_override: Some(600), ..Default::default() }).unwrap();
        for kind in weight_kinds(&ctx) {
            let mut ids = random_ids(300, 103, 9);
            ids.extend([0, 102, 103, 51, u32::MAX]);
            let chunks = check(&ctx, 103, 13, &ids, kind, 11);
            assert!(chunks >= 3, "{} chunks", chunks);
        }
    }

    #[test]
    fn embedding_rejects_mismatched_kind_and_short_output() {
        let ctx = test_context();
        let table = GpuMatrix::upload(&ctx, "table", 4, 3, &random_vec(12, 1), DType::F16).unwrap();
        let ids = GpuTensor::from_u32(&ctx, "ids", &[2], &[0, 1]).unwrap();
        let out = GpuTensor::zeros(&ctx, "out", DType::F32, &[2, 3]).unwrap();
        assert!(embedding_with_kind(&ctx, "e", &ids, 2, &table, &out, WeightKind::F32).is_err());
        let short = GpuTensor::zeros(&ctx, "out", DType::F32, &[1, 3]).unwrap();
        assert!(embedding(&ctx, "e", &ids, 2, &table, &short).is_err());
        assert!(embedding(&ctx, "e", &ids, 2, &table, &out).is_ok());
    }
}
