//! A LoRA adapter on the GPU for the unmerged mode: the base weights stay as they are and each
//! adapted projection group adds two small products, `a = x · A^T` then `y += s · a · B^T`.
//!
//! The layout follows the stacked base weights: q, k and v share their input (the normalised
//! residual), so their A matrices are stacked into one `[n · r, d]` matrix and their B matrices
//! placed block-diagonally into one `[q + 2kv, n · r]` matrix whose rows line up with the columns
//! of the stacked `qkv` activation (zero rows for a projection the adapter does not target). Gate
//! and up likewise. A layer then costs at most 8 extra dispatches (2 per group: qkv, o, gate_up,
//! down) whatever the number of targets. `s` (user scale times alpha / r) is not baked into B: it
//! is a uniform of the B dispatch, so changing it rebuilds dispatches but uploads nothing.

use std::path::PathBuf;

use crate::gpu::{DType, GpuContext, GpuMatrix};
use crate::model::ModelConfig;
use crate::model::lora::{LoraAdapter, LoraConfig, LoraDims, LoraError, LoraPair, Projection};

use super::RuntimeError;

/// One projection group's adapter matrices (f32).
#[derive(Debug)]
pub struct GpuLoraPair {
    /// `[inner, in]`: the group's A matrices stacked (inner = targets in the group x r).
    pub a: GpuMatrix,
    /// `[out, inner]`: the group's B matrices, block-diagonal, rows = the group's output.
    pub b: GpuMatrix,
}

/// One layer's adapter; None where no projection of a group is targeted.
#[derive(Debug)]
pub struct GpuLoraLayer {
    /// Q, K, V (n of them targeted): A `[n r, d]`, B `[q_dim + 2 kv_dim, n r]`.
    pub qkv: Option<GpuLoraPair>,
    /// Attention output: A `[r, q_dim]`, B `[d, r]`.
    pub o: Option<GpuLoraPair>,
    /// Gate and up (n of them targeted): A `[n r, d]`, B `[2 d_ff, n r]`.
    pub gate_up: Option<GpuLoraPair>,
    /// MLP down: A `[r, d_ff]`, B `[d, r]`.
    pub down: Option<GpuLoraPair>,
}

/// One projection group of a layer: the projections stacked in it, each with its row offset
/// in the group's output and its rows; the group's output rows and input columns.
struct Group {
    name: &'static str,
    members: Vec<(Projection, usize, usize)>,
    out_total: usize,
    in_dim: usize,
}

/// The groups of one layer, in the order of [`GpuLoraLayer`]'s fields.
fn layer_groups(d: &LoraDims) -> [Group; 4] {
    let (q, kv, ff, dm) = (d.q_dim, d.kv_dim, d.d_ff, d.d_model);
    let group = |name, members, out_total, in_dim| Group { name, members, out_total, in_dim };
    [
        group("qkv", vec![(Projection::Q, 0, q), (Projection::K, q, kv), (Projection::V, q + kv, kv)], q + 2 * kv, dm),
        group("o", vec![(Projection::O, 0, dm)], dm, q),
        group("gate_up", vec![(Projection::Gate, 0, ff), (Projection::Up, ff, ff)], 2 * ff, dm),
        group("down", vec![(Projection::Down, 0, dm)], dm, ff),
    ]
}

/// A whole adapter uploaded; sessions share it (`Arc<GpuLora>`) and can swap it at any time.
#[derive(Debug)]
pub struct GpuLora {
    /// The adapter folder it was read from.
    pub dir: PathBuf,
    /// LoRA rank r.
    pub rank: usize,
    /// alpha / r (or alpha / sqrt(r)): the factor at user scale 1.
    pub scaling: f32,
    /// `lora_alpha` of the adapter's config (kept so that [`GpuLora::download`] rebuilds it).
    pub alpha: f32,
    /// `use_rslora` of the adapter's config (kept for [`GpuLora::download`]).
    pub use_rslora: bool,
    /// The model sizes it was uploaded for (checked against a session's model).
    pub dims: LoraDims,
    /// The projections the adapter targets.
    pub targets: Vec<Projection>,
    /// Layer l's matrices at index l.
    pub layers: Vec<GpuLoraLayer>,
}

/// Stack the A matrices of `group`'s targeted projections and place their B matrices
/// block-diagonally: returns (A `[inner, in]`, B `[out_total, inner]`, inner).
fn group_matrices(
    adapter: &LoraAdapter,
    layer: usize,
    group: &[(Projection, usize, usize)],
    out_total: usize,
) -> Option<(Vec<f32>, Vec<f32>, usize)> {
    let r = adapter.rank();
    let present: Vec<_> = group.iter().filter_map(|&(p, off, out)| adapter.pair(layer, p).map(|pair| (pair, off, out))).collect();
    if present.is_empty() {
        return None;
    }
    let inner = present.len() * r;
    let mut a = Vec::with_capacity(present.iter().map(|(p, _, _)| p.a.len()).sum());
    let mut b = vec![0.0f32; out_total * inner];
    for (j, (pair, off, out)) in present.iter().enumerate() {
        a.extend_from_slice(&pair.a);
        for o in 0..*out {
            // B_p[o, :] -> B[off + o, j r .. (j + 1) r]
            b[(off + o) * inner + j * r..(off + o) * inner + (j + 1) * r].copy_from_slice(&pair.b[o * r..(o + 1) * r]);
        }
    }
    Some((a, b, inner))
}

/// Every value of the f32 matrix `m`, which must be `[rows, cols]`, read chunk by chunk.
/// Errors: [`LoraError::Invalid`] naming the matrix when its shape, dtype or chunks differ;
/// the read-back's [`RuntimeError::Gpu`].
fn read_matrix(ctx: &GpuContext, m: &GpuMatrix, rows: usize, cols: usize) -> Result<Vec<f32>, RuntimeError> {
    let invalid = |what: String| RuntimeError::Lora(LoraError::Invalid { what: format!("{}: {what}", m.label) });
    if (m.rows, m.cols, m.dtype) != (rows, cols, DType::F32) {
        return Err(invalid(format!("[{}, {}] {} on the GPU, expected [{rows}, {cols}] f32", m.rows, m.cols, m.format())));
    }
    let mut values = Vec::with_capacity(rows * cols);
    for chunk in &m.chunks {
        if chunk.row0 * cols != values.len() || !chunk.fits(cols, DType::F32) {
            return Err(invalid(format!("chunk of rows {}..{} is not the next f32 rows", chunk.row0, chunk.row0 + chunk.rows)));
        }
        values.extend(chunk.tensor.read_f32(ctx)?);
    }
    if values.len() != rows * cols {
        return Err(invalid(format!("its chunks hold {} values, expected {}", values.len(), rows * cols)));
    }
    Ok(values)
}

impl GpuLora {
    /// Upload `adapter` for a model of `config` (an error if it was checked against other sizes).
    pub fn upload(ctx: &GpuContext, adapter: &LoraAdapter, config: &ModelConfig) -> Result<GpuLora, RuntimeError> {
        adapter.check_model(config)?;
        let d = adapter.dims;
        let mut layers = Vec::with_capacity(d.n_layers);
        for l in 0..d.n_layers {
            let [qkv, o, gate_up, down] = layer_groups(&d).map(|Group { name, members, out_total, in_dim }| -> Result<_, RuntimeError> {
                let Some((a, b, inner)) = group_matrices(adapter, l, &members, out_total) else { return Ok(None) };
                Ok(Some(GpuLoraPair {
                    a: GpuMatrix::upload(ctx, &format!("lora.{l}.{name}.A"), inner, in_dim, &a, DType::F32)?,
                    b: GpuMatrix::upload(ctx, &format!("lora.{l}.{name}.B"), out_total, inner, &b, DType::F32)?,
                }))
            });
            layers.push(GpuLoraLayer { qkv: qkv?, o: o?, gate_up: gate_up?, down: down? });
        }
        Ok(GpuLora {
            dir: adapter.dir.clone(),
            rank: adapter.rank(),
            scaling: adapter.scaling(),
            alpha: adapter.config.alpha,
            use_rslora: adapter.config.use_rslora,
            dims: d,
            targets: adapter.config.targets.clone(),
            layers,
        })
    }

    /// Read the adapter back from the GPU: the inverse of [`GpuLora::upload`] (each group's
    /// stacked A cut back into the `[r, in]` matrices of its targeted projections, the diagonal
    /// blocks of its block-diagonal B taken as their `[out, r]` matrices), with the config
    /// rebuilt from `rank`, `alpha`, `use_rslora` and `targets`. After training updated the
    /// f32 matrices in place, this is the trained adapter, ready for
    /// [`LoraAdapter::save`]. The off-diagonal blocks of B are not read (training keeps them 0).
    ///
    /// Errors: [`RuntimeError::Gpu`] when a read-back fails; [`RuntimeError::Lora`]
    /// ([`LoraError::Invalid`]) when a layer's matrices are not the f32 group matrices that
    /// `upload` makes for `dims`, `rank` and `targets`, or hold a value that is not finite.
    pub fn download(&self, ctx: &GpuContext) -> Result<LoraAdapter, RuntimeError> {
        let r = self.rank;
        let config = LoraConfig { rank: r, alpha: self.alpha, use_rslora: self.use_rslora, targets: self.targets.clone() };
        let invalid = |what: String| RuntimeError::Lora(LoraError::Invalid { what });
        if self.layers.len() != self.dims.n_layers {
            return Err(invalid(format!(
                "{}: {} layers on the GPU for a model of {}",
                self.dir.display(),
                self.layers.len(),
                self.dims.n_layers
            )));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, gpu) in self.layers.iter().enumerate() {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for (Group { name, members, out_total, in_dim }, matrices) in
                layer_groups(&self.dims).into_iter().zip([&gpu.qkv, &gpu.o, &gpu.gate_up, &gpu.down])
            {
                let present: Vec<_> = members.into_iter().filter(|(p, _, _)| self.targets.contains(p)).collect();
                let inner = present.len() * r;
                let pair = match (matrices, inner) {
                    (None, 0) => continue,
                    (Some(pair), _) if inner > 0 => pair,
                    _ => return Err(invalid(format!("layer {l} {name}: the GPU matrices do not match targets {:?}", self.targets))),
                };
                let a = read_matrix(ctx, &pair.a, inner, in_dim)?;
                let b = read_matrix(ctx, &pair.b, out_total, inner)?;
                for (j, (p, off, out)) in present.into_iter().enumerate() {
                    let b_p = (0..out).flat_map(|o| &b[(off + o) * inner + j * r..(off + o) * inner + (j + 1) * r]).copied().collect();
                    pairs[p.index()] = Some(LoraPair { a: a[j * r * in_dim..(j + 1) * r * in_dim].to_vec(), b: b_p });
                }
            }
            layers.push(pairs);
        }
        let adapter = LoraAdapter { dir: self.dir.clone(), config, dims: self.dims, layers };
        adapter.validate()?;
        Ok(adapter)
    }

    /// Columns of the widest intermediate `a` (3 r when q, k and v are all targeted).
    pub fn max_inner(&self) -> usize {
        self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).flatten().map(|p| p.a.rows).max().unwrap_or(1)
    }

    /// Bytes of all adapter matrices on the GPU.
    pub fn byte_len(&self) -> u64 {
        self.matrices().map(GpuMatrix::byte_len).sum()
    }

    /// Every adapter matrix, each pair's A then its B, layer by layer.
    pub fn matrices(&self) -> impl Iterator<Item = &GpuMatrix> {
        self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).flatten().flat_map(|p| [&p.a, &p.b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{LoraConfig, LoraPair};

    #[test]
    fn download_inverts_upload() {
        let ctx = crate::gpu::test_context();
        let cfg = crate::testdata::tiny_llama_config();
        for (targets, rslora) in [
            (vec![Projection::Q, Projection::V, Projection::Up, Projection::Down], false),
            (Projection::ALL.to_vec(), true),
            (vec![Projection::K, Projection::O], false),
        ] {
            let config = LoraConfig { rank: 3, alpha: 7.5, use_rslora: rslora, targets };
            let mut adapter = LoraAdapter::init(config, LoraDims::of(&cfg), 11).unwrap();
            for (l, pairs) in adapter.layers.iter_mut().enumerate() {
                for (p, pair) in pairs.iter_mut().enumerate() {
                    if let Some(pair) = pair {
                        pair.b.iter_mut().enumerate().for_each(|(i, b)| *b = (l * 100 + p * 10) as f32 + i as f32 * 0.25);
                    }
                }
            }
            adapter.dir = PathBuf::from("adapter-dir");
            let gpu = GpuLora::upload(&ctx, &adapter, &cfg).unwrap();
            assert_eq!(gpu.download(&ctx).unwrap(), adapter);
        }
    }

    #[test]
    fn download_refuses_matrices_of_other_shapes() {
        let ctx = crate::gpu::test_context();
        let cfg = crate::testdata::tiny_llama_config();
        let config = LoraConfig { rank: 2, alpha: 4.0, use_rslora: false, targets: vec![Projection::Q, Projection::O] };
        let adapter = LoraAdapter::init(config, LoraDims::of(&cfg), 1).unwrap();
        let mut gpu = GpuLora::upload(&ctx, &adapter, &cfg).unwrap();
        gpu.rank = 1;
        let e = gpu.download(&ctx).unwrap_err().to_string();
        assert!(e.contains("lora.0.qkv.A: [2, 8] f32 on the GPU, expected [1, 8] f32"), "{e}");
        gpu.rank = 2;
        gpu.targets = vec![Projection::Q, Projection::O, Projection::Down];
        let e = gpu.download(&ctx).unwrap_err().to_string();
        assert!(e.contains("layer 0 down: the GPU matrices do not match targets"), "{e}");
    }

    #[test]
    fn group_b_is_block_diagonal_over_targets() {
        // q (out 3) and v (out 2) targeted, k (out 2) not: rows of k stay zero.
        let r = 2;
        let pair = |out: usize, inp: usize, base: f32| LoraPair {
            a: (0..r * inp).map(|i| base + i as f32).collect(),
            b: (0..out * r).map(|i| -(base + i as f32)).collect(),
        };
        let mut layer: [Option<LoraPair>; 7] = Default::default();
        layer[Projection::Q.index()] = Some(pair(3, 4, 10.0));
        layer[Projection::V.index()] = Some(pair(2, 4, 100.0));
        let adapter = LoraAdapter {
            dir: PathBuf::from("x"),
            config: LoraConfig { rank: r, alpha: 2.0, use_rslora: false, targets: vec![Projection::Q, Projection::V] },
            dims: LoraDims { n_layers: 1, d_model: 4, q_dim: 3, kv_dim: 2, d_ff: 5 },
            layers: vec![layer],
        };
        let group = [(Projection::Q, 0, 3), (Projection::K, 3, 2), (Projection::V, 5, 2)];
        let (a, b, inner) = group_matrices(&adapter, 0, &group, 7).unwrap();
        assert_eq!(inner, 4);
        assert_eq!(a.len(), 4 * 4);
        assert_eq!(&a[..8], &adapter.pair(0, Projection::Q).unwrap().a[..]);
        assert_eq!(&a[8..], &adapter.pair(0, Projection::V).unwrap().a[..]);
        // row 1 (q): [B_q[1, :], 0, 0]; row 4 (k): zeros; row 6 (v row 1): [0, 0, B_v[1, :]]
        assert_eq!(&b[4..8], &[-12.0, -13.0, 0.0, 0.0]);
        assert_eq!(&b[16..20], &[0.0; 4]);
        assert_eq!(&b[24..28], &[0.0, 0.0, -102.0, -103.0]);
        assert!(group_matrices(&adapter, 0, &[(Projection::Gate, 0, 5)], 5).is_none());
    }
}
