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
use crate::model::lora::{LoraAdapter, LoraDims, Projection};

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

/// A whole adapter uploaded; sessions share it (`Arc<GpuLora>`) and can swap it at any time.
#[derive(Debug)]
pub struct GpuLora {
    /// The adapter folder it was read from.
    pub dir: PathBuf,
    /// LoRA rank r.
    pub rank: usize,
    /// alpha / r (or alpha / sqrt(r)): the factor at user scale 1.
    pub scaling: f32,
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

impl GpuLora {
    /// Upload `adapter` for a model of `config` (an error if it was checked against other sizes).
    pub fn upload(ctx: &GpuContext, adapter: &LoraAdapter, config: &ModelConfig) -> Result<GpuLora, RuntimeError> {
        adapter.check_model(config)?;
        let d = adapter.dims;
        let (q, kv, ff, dm) = (d.q_dim, d.kv_dim, d.d_ff, d.d_model);
        let qkv_group = [(Projection::Q, 0, q), (Projection::K, q, kv), (Projection::V, q + kv, kv)];
        let gate_up_group = [(Projection::Gate, 0, ff), (Projection::Up, ff, ff)];
        let mut layers = Vec::with_capacity(d.n_layers);
        for l in 0..d.n_layers {
            let upload = |name: &str,
                          group: &[(Projection, usize, usize)],
                          out_total: usize,
                          in_dim: usize|
             -> Result<Option<GpuLoraPair>, RuntimeError> {
                let Some((a, b, inner)) = group_matrices(adapter, l, group, out_total) else { return Ok(None) };
                Ok(Some(GpuLoraPair {
                    a: GpuMatrix::upload(ctx, &format!("lora.{l}.{name}.A"), inner, in_dim, &a, DType::F32)?,
                    b: GpuMatrix::upload(ctx, &format!("lora.{l}.{name}.B"), out_total, inner, &b, DType::F32)?,
                }))
            };
            layers.push(GpuLoraLayer {
                qkv: upload("qkv", &qkv_group, q + 2 * kv, dm)?,
                o: upload("o", &[(Projection::O, 0, dm)], dm, q)?,
                gate_up: upload("gate_up", &gate_up_group, 2 * ff, dm)?,
                down: upload("down", &[(Projection::Down, 0, dm)], dm, ff)?,
            });
        }
        Ok(GpuLora {
            dir: adapter.dir.clone(),
            rank: adapter.rank(),
            scaling: adapter.scaling(),
            dims: d,
            targets: adapter.config.targets.clone(),
            layers,
        })
    }

    /// Columns of the widest intermediate `a` (3 r when q, k and v are all targeted).
    pub fn max_inner(&self) -> usize {
        self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).flatten().map(|p| p.a.rows).max().unwrap_or(1)
    }

    /// Bytes of all adapter matrices on the GPU.
    pub fn byte_len(&self) -> u64 {
        self.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).flatten().map(|p| p.a.byte_len() + p.b.byte_len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{LoraConfig, LoraPair};

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
