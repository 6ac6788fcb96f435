//! The backward pass of a linear layer with an unmerged LoRA adapter,
//! `y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ` (x `[T, K]`, W `[N, K]`, A `[r, K]`, B `[N, r]`): for
//! `L = <G, y>` the gradients are (chain rule through `a = x · Aᵀ`, Hu et al. 2021's LoRA)
//!
//! ```text
//! da = s · G · B                   [T, r]   LinearForm::XW of B, scaled
//! dX = G · W + da · A              [T, K]   LinearForm::XW of W, then of A accumulated
//! dB = s · Gᵀ · a                  [N, r]   matmul_tn
//! dA = daᵀ · x                     [r, K]   matmul_tn
//! ```
//!
//! The CPU references of those products ([`matmul_xw_ref`], [`matmul_tn_ref`]) are checked
//! against central finite differences of an f64 forward, and the GPU products against the CPU
//! references for every weight kind of W the forward reads (dense kinds and every block type).

use crate::gpu::{DType, GpuContext, GpuMatrix, GpuTensor, MatrixPart, WeightKind, test_context};
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::{MatmulVariant, matmul, matmul_ref};
use crate::kernels::matmul_tn::{MatmulTnOp, matmul_tn, matmul_tn_ref};
use crate::kernels::matmul_xw::matmul_xw_ref;
use crate::kernels::testing::{
    assert_close, assert_close_f64, central_differences, random_blocks, random_vec, round_f16, to_f64, weight_kinds,
};
use crate::model::QuantType;

/// A linear layer with a LoRA adapter and its input, host values (W as the GPU reads it).
struct Layer {
    t: usize,
    k: usize,
    n: usize,
    r: usize,
    s: f32,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Layer {
    /// Random x, A and B (seeded by the sizes) around the weight values `w` (`[n, k]`).
    fn new(t: usize, k: usize, n: usize, r: usize, w: Vec<f32>) -> Layer {
        let seed = (t * 7 + k * 3 + n) as u64;
        Layer { t, k, n, r, s: 1.75, x: random_vec(t * k, seed), w, a: random_vec(r * k, seed + 1), b: random_vec(n * r, seed + 2) }
    }

    /// `L = <G, y>` with `y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ`, all in f64.
    fn loss(&self, g: &[f64], x: &[f64], a: &[f64], b: &[f64]) -> f64 {
        let (k, n, r) = (self.k, self.n, self.r);
        let dot = |u: &[f64], v: &[f32]| u.iter().zip(v).map(|(&p, &q)| p * q as f64).sum::<f64>();
        let mut l = 0.0;
        for t in 0..self.t {
            let xr = &x[t * k..(t + 1) * k];
            let act: Vec<f64> = (0..r).map(|i| a[i * k..(i + 1) * k].iter().zip(xr).map(|(p, q)| p * q).sum()).collect();
            for j in 0..n {
                let lora: f64 = (0..r).map(|i| act[i] * b[j * r + i]).sum();
                let y = dot(xr, &self.w[j * k..(j + 1) * k]) + self.s as f64 * lora;
                l += g[t * n + j] * y;
            }
        }
        l
    }

    /// The CPU backward of `L = <G, y>`: (dX, dA, dB) from the reference products.
    fn backward(&self, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, k, n, r, s) = (self.t, self.k, self.n, self.r, self.s);
        let act = matmul_ref(&self.x, t, &self.a, r, k, None);
        let da: Vec<f32> = matmul_xw_ref(g, t, &self.b, n, r).iter().map(|v| s * v).collect();
        let dx: Vec<f32> =
            matmul_xw_ref(g, t, &self.w, n, k).iter().zip(matmul_xw_ref(&da, t, &self.a, r, k)).map(|(p, q)| p + q).collect();
        let db = matmul_tn_ref(g, &act, t, n, r).iter().map(|v| s * v).collect();
        let d_a = matmul_tn_ref(&da, &self.x, t, r, k);
        (dx, d_a, db)
    }
}

/// Central differences of `L` in every element of x, A and B against the CPU backward.
fn check_finite_differences(l: &Layer) {
    let g32 = random_vec(l.t * l.n, 99);
    let (dx, d_a, db) = l.backward(&g32);
    let (g, x, a, b) = (to_f64(&g32), to_f64(&l.x), to_f64(&l.a), to_f64(&l.b));
    let what = |name: &str| format!("{name} t={} k={}", l.t, l.k);
    let fd = central_differences(&x, 1e-5, |v| l.loss(&g, v, &a, &b));
    assert_close_f64(&to_f64(&dx), &fd, 1e-5, &what("dX"));
    let fd = central_differences(&a, 1e-5, |v| l.loss(&g, &x, v, &b));
    assert_close_f64(&to_f64(&d_a), &fd, 1e-5, &what("dA"));
    let fd = central_differences(&b, 1e-5, |v| l.loss(&g, &x, &a, v));
    assert_close_f64(&to_f64(&db), &fd, 1e-5, &what("dB"));
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (n, r) = (41, 5);
    for (t, k) in [(3, 37), (17, 37), (4, 64)] {
        check_finite_differences(&Layer::new(t, k, n, r, random_vec(n * k, 7)));
    }
}

/// The six dispatches of the backward pass on the GPU (W read as `kind`, or by its chunks' block
/// type when `None`) against the CPU backward.
fn check_gpu(ctx: &GpuContext, l: &Layer, w: &GpuMatrix, kind: Option<WeightKind>, what: &str) {
    let (t, k, n, r, s) = (l.t, l.k, l.n, l.r, l.s);
    let up = |label: &str, rows: usize, cols: usize, v: &[f32]| GpuMatrix::upload(ctx, label, rows, cols, v, DType::F32).unwrap();
    let (ga, gb) = (up("A", r, k, &l.a), up("B", n, r, &l.b));
    let tensor = |label: &str, v: &[f32]| GpuTensor::from_f32(ctx, label, &[v.len()], v).unwrap();
    let g = random_vec(t * n, 99);
    let (gx, gg) = (tensor("x", &l.x), tensor("G", &g));
    // Outputs start as garbage: every product must overwrite (or add to what it overwrote).
    let (act, da, dx) = (tensor("a", &random_vec(t * r, 1)), tensor("da", &random_vec(t * r, 2)), tensor("dx", &random_vec(t * k, 3)));
    let (d_a, db) = (tensor("dA", &random_vec(r * k, 4)), tensor("dB", &random_vec(n * r, 5)));
    let mut base = LinearOp::new_xw(&gg, t, w, &dx);
    if let Some(kind) = kind {
        base = base.kind(kind);
    }
    let mm = |op: LinearOp| matmul(ctx, "grad", &op, MatmulVariant::RegBlock).unwrap();
    let mut ds = mm(LinearOp::new(&gx, t, &ga, &act));
    ds.extend(mm(LinearOp::new_xw(&gg, t, &gb, &da).scale(s)));
    ds.extend(mm(base));
    ds.extend(mm(LinearOp::new_xw(&da, t, &ga, &dx).accumulate(true)));
    ds.push(matmul_tn(ctx, "grad.db", &MatmulTnOp::new(&gg, &act, t, n, r, &db).scale(s)).unwrap());
    ds.push(matmul_tn(ctx, "grad.da", &MatmulTnOp::new(&da, &gx, t, r, k, &d_a)).unwrap());
    ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
    let (want_dx, want_da, want_db) = l.backward(&g);
    let wmax = l.w.iter().fold(1f32, |m, v| m.max(v.abs()));
    let atol = |reduction: usize, scale: f32| 4e-5 * (reduction as f32).sqrt() * scale;
    let sr = s * (r as f32).sqrt();
    assert_close(&dx.read_f32(ctx).unwrap(), &want_dx, atol(n, wmax) + atol(r, sr), 1e-5, &format!("{what} dX t={t} k={k}"));
    assert_close(&db.read_f32(ctx).unwrap(), &want_db, atol(t, s * (k as f32).sqrt()), 1e-5, &format!("{what} dB t={t} k={k}"));
    assert_close(&d_a.read_f32(ctx).unwrap(), &want_da, atol(t, s * (n as f32).sqrt()), 1e-5, &format!("{what} dA t={t} k={k}"));
}

#[test]
fn gpu_backward_matches_cpu_every_dense_kind() {
    let ctx = test_context();
    let (n, r) = (41, 5);
    for kind in weight_kinds(&ctx) {
        for (t, k) in [(3, 37), (17, 576), (8, 37)] {
            let wv = random_vec(n * k, 11);
            let w = GpuMatrix::upload(&ctx, "w", n, k, &wv, kind.dtype()).unwrap();
            let wv = if kind.dtype() == DType::F16 { round_f16(&wv) } else { wv };
            check_gpu(&ctx, &Layer::new(t, k, n, r, wv), &w, Some(kind), kind.name());
        }
    }
}

#[test]
fn gpu_backward_matches_cpu_every_block_type() {
    let ctx = test_context();
    let (n, r) = (41, 5);
    for q in QuantType::ALL {
        let k = if q.block_elems() == 256 { 768 } else { 576 };
        let blocks = random_blocks(q, n, k, 12);
        let w = GpuMatrix::upload_parts(&ctx, "w", k, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        for t in [3, 17] {
            check_gpu(&ctx, &Layer::new(t, k, n, r, blocks.dequantize().unwrap()), &w, Some(WeightKind::Quant(q)), q.name());
        }
    }
}
