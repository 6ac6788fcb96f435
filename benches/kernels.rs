//! Kernel bench: one table row per kernel / shape / variant / dtype with time, GFLOP/s, GB/s and,
//! for matvec, the fraction of the copy kernel's bandwidth measured in the same run.
//!
//! `cargo bench --bench kernels [-- FILTER...]`: rows whose name contains any FILTER (e.g.
//! `matvec`, `f16`, `49152`). Times are wall clock around `ctx.run` of N copies of the dispatches
//! recorded in one pass and submitted once (amortising the submit), divided by N; the median of
//! several repeats. To add a kernel family, prepare its dispatches and call `Bench::case`.
//!
//! Quantised weights (`q8_0`, `q4_0`, `q4_1`, `q4_k`, `q6_k` rows, built by
//! `kernels::testing::random_blocks`) run at the dense rows' shapes; the k-quants need K % 256 == 0,
//! so where the model's K is not (576) their row uses the next multiple (768) and its shape says
//! `3072x768 (for 3072x576)`. GB/s is always the dispatches' `Cost::bytes` (the quantised words as
//! stored on the GPU, x and y) over the time; the footnote gives bits per weight per kind.

use std::time::{Duration, Instant};

use firstrt::gpu::MatrixPart;
use firstrt::gpu::{DType, Dispatch, GpuContext, GpuMatrix, GpuOptions, GpuTensor};
use firstrt::kernels::attention::{AttnOp, AttnShape, AttnVariant, attention_variant, heads_per_invocation, split_count};
use firstrt::kernels::attention_backward::{AttnBackwardOp, attention_backward};
use firstrt::kernels::choice::{read_candidates, weight_kind};
use firstrt::kernels::copy::copy;
use firstrt::kernels::cross_entropy::{CrossEntropyOp, cross_entropy};
use firstrt::kernels::embedding::embedding;
use firstrt::kernels::linear::LinearOp;
use firstrt::kernels::matmul::{MatmulVariant, matmul};
use firstrt::kernels::matmul_tn::{MatmulTnOp, matmul_tn};
use firstrt::kernels::matvec::{MatvecEpilogue, MatvecVariant, NormEpilogue, matvec, matvec_with};
use firstrt::kernels::rmsnorm::{RmsNormOp, rmsnorm};
use firstrt::kernels::rope::{RopeQkvOp, RopeTables, rope_qkv_write};
use firstrt::kernels::step::{StepBuffer, StepParams};
use firstrt::kernels::swiglu::swiglu;
use firstrt::kernels::testing::random_blocks;
use firstrt::model::QuantType;
use firstrt::testdata::median;

/// Aim for about this much wall time per repeat.
const TARGET: Duration = Duration::from_millis(60);
const REPEATS: usize = 5;

struct Bench {
    ctx: std::sync::Arc<GpuContext>,
    filters: Vec<String>,
    /// Copy bandwidth (GB/s) of this run, once measured.
    copy_gbs: Option<f64>,
}

struct Row {
    #[allow(dead_code)]
    time_us: f64,
    gbs: f64,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }

    /// Time `dispatches` (one logical kernel call, possibly several chunks) and print a row.
    /// `shape` is free text; flops and bytes come from the dispatches' costs.
    fn case(&mut self, name: &str, shape: &str, dispatches: &[Dispatch], vs_copy: bool) -> Option<Row> {
        let full = format!("{name} {shape}");
        if !self.wanted(&full) {
            return None;
        }
        let flops: u64 = dispatches.iter().map(|d| d.cost.flops).sum();
        let bytes: u64 = dispatches.iter().map(|d| d.cost.bytes).sum();
        let once: Vec<&Dispatch> = dispatches.iter().collect();
        if let Err(e) = self.ctx.run("bench warm-up", &once) {
            println!("| {name} | {shape} | error: {e} |");
            return None;
        }
        // Estimate the per-call time from one run, then repeat N calls per submit.
        let t = Instant::now();
        self.ctx.run("bench estimate", &once).ok()?;
        let est = t.elapsed().max(Duration::from_micros(20));
        let n = ((TARGET.as_secs_f64() / est.as_secs_f64()) as usize).clamp(1, 200);
        let list: Vec<&Dispatch> = dispatches.iter().cycle().take(n * dispatches.len()).collect();
        let mut times = Vec::with_capacity(REPEATS);
        for _ in 0..REPEATS {
            let t = Instant::now();
            self.ctx.run("bench", &list).ok()?;
            times.push(t.elapsed().as_secs_f64() / n as f64);
        }
        let secs = median(&mut times);
        let gflops = flops as f64 / secs / 1e9;
        let gbs = bytes as f64 / secs / 1e9;
        let frac = match (vs_copy, self.copy_gbs) {
            (true, Some(c)) => format!("{:.0}%", 100.0 * gbs / c),
            _ => String::new(),
        };
        println!("| {name} | {shape} | {:.1} | {:.2} | {:.2} | {frac} | {n} |", secs * 1e6, gflops, gbs);
        Some(Row { time_us: secs * 1e6, gbs })
    }
}

fn pseudo_random(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + seed) * 7919) % 2003) as f32 / 2003.0 - 0.5).collect()
}

/// K' = `k` rounded up to `q`'s block size (576 -> 768 for the k-quants' 256-value
/// super-blocks) and the shape text of a quantised `[n, k]` row: `{n}x{k}`, or
/// `{n}x{k'} (for {n}x{k})` when padded, so that filtering on the dense rows' shape selects it too.
fn quant_shape(q: QuantType, n: usize, k: usize) -> (usize, String) {
    let kq = k.next_multiple_of(q.block_elems());
    (kq, if kq == k { format!("{n}x{k}") } else { format!("{n}x{kq} (for {n}x{k})") })
}

/// An `[n, kq]` matrix of random `q` blocks on the GPU, one chunk per binding limit.
fn quant_weights(ctx: &GpuContext, q: QuantType, n: usize, kq: usize, seed: u64) -> GpuMatrix {
    let blocks = random_blocks(q, n, kq, seed);
    GpuMatrix::upload_parts(ctx, "w", kq, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap()
}

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let _ = env_logger::builder().try_init();
    let ctx = GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    println!("adapter: {} ({:?}, {} {})", ctx.info.name, ctx.info.backend, ctx.info.driver, ctx.info.driver_info);
    println!();
    println!("| kernel | shape | time (us) | GFLOP/s | GB/s | of copy | calls/submit |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut b = Bench { ctx: ctx.clone(), filters, copy_gbs: None };

    // Copy: the bandwidth reference (always measured when matvec rows are wanted).
    {
        let n = 8 << 20; // 32 MiB of f32
        let src = GpuTensor::from_f32(&ctx, "src", &[n], &pseudo_random(n, 1)).unwrap();
        let dst = GpuTensor::zeros(&ctx, "dst", DType::F32, &[n]).unwrap();
        let d = copy(&ctx, "copy", &src, &dst).unwrap();
        let keep = std::mem::take(&mut b.filters);
        let row = b.case("copy", "32 MiB f32", &[d], false);
        b.filters = keep;
        b.copy_gbs = row.map(|r| r.gbs);
    }

    // Matvec: decode shapes of the model (N x K) and a square-ish large one.
    let matvec_shapes = [(576, 576), (3072, 576), (576, 1536), (49152, 576), (2048, 8192)];
    for (n, k) in matvec_shapes {
        for dtype in [DType::F32, DType::F16] {
            let wanted_any = MatvecVariant::ALL.iter().any(|v| b.wanted(&format!("matvec {} {dtype} {n}x{k}", v.name())));
            if !wanted_any {
                continue;
            }
            let w = GpuMatrix::upload(&ctx, "w", n, k, &pseudo_random(n * k, 2), dtype).unwrap();
            let x = GpuTensor::from_f32(&ctx, "x", &[k], &pseudo_random(k, 3)).unwrap();
            let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
            for v in MatvecVariant::available(&ctx) {
                let ds = matvec(&ctx, "matvec", &LinearOp::new(&x, 1, &w, &y), v).unwrap();
                b.case(&format!("matvec {} {}", v.name(), weight_kind(&ctx, dtype).for_k(k).name()), &format!("{n}x{k}"), &ds, true);
                // The other ways of reading these weights (the row above used the adapter's choice).
                for kind in read_candidates(&ctx, dtype).into_iter().filter(|&k| k != weight_kind(&ctx, dtype)) {
                    let ds = matvec(&ctx, "matvec", &LinearOp::new(&x, 1, &w, &y).kind(kind), v).unwrap();
                    b.case(&format!("matvec {} {}", v.name(), kind.name()), &format!("{n}x{k}"), &ds, true);
                }
            }
        }
        for q in QuantType::ALL {
            let (kq, shape) = quant_shape(q, n, k);
            if !MatvecVariant::ALL.iter().any(|v| b.wanted(&format!("matvec {} {q} {shape}", v.name()))) {
                continue;
            }
            let w = quant_weights(&ctx, q, n, kq, 2);
            let x = GpuTensor::from_f32(&ctx, "x", &[kq], &pseudo_random(kq, 3)).unwrap();
            let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[n]).unwrap();
            for v in MatvecVariant::available(&ctx) {
                let ds = matvec(&ctx, "matvec", &LinearOp::new(&x, 1, &w, &y), v).unwrap();
                b.case(&format!("matvec {} {q}", v.name()), &shape, &ds, true);
            }
        }
    }

    // The decode step's small kernels, one token of SmolLM2-135M (d 576, ff 1536, 9/3 heads of
    // 64, a 4096-row KV cache at position 128): each call is mostly its dispatch's fixed cost,
    // paid about 5 times per layer. The embedding row is the cheapest dispatch of a step.
    // The GEMV rows with the epilogues that replace SwiGLU's and RoPE's dispatches live here too:
    // `epilogue_row(dtype, "swiglu" | "rope" | "norm" | "unfused norm")` is such a row's name and
    // shape; "norm" (the o projection's GEMV writing the MLP half's RMSNorm, CPU adapters only)
    // is to be compared with "unfused norm", the same GEMV then an rmsnorm dispatch.
    let (d, ff, max_pos, pos) = (576, 1536, 4096, 128);
    let heads = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
    // The GEMV variants with the epilogues: `rows`, and `windows` where the adapter runs it.
    let epilogue_variants: Vec<MatvecVariant> =
        MatvecVariant::available(&ctx).into_iter().filter(|v| matches!(v, MatvecVariant::Rows | MatvecVariant::Windows)).collect();
    let epilogue_row = |variant: MatvecVariant, dtype: DType, what: &str| {
        let n = match what {
            "swiglu" => 2 * ff,
            "rope" => heads.qkv_dim(),
            _ => d,
        };
        (format!("matvec {} {} {what} epilogue decode", variant.name(), weight_kind(&ctx, dtype).for_k(d).name()), format!("{n}x{d}"))
    };
    let epilogue_wanted = epilogue_variants.iter().any(|&v| {
        [DType::F32, DType::F16].into_iter().any(|dtype| {
            ["swiglu", "rope", "norm", "unfused norm"].iter().any(|what| {
                let (name, shape) = epilogue_row(v, dtype, what);
                b.wanted(&format!("{name} {shape}"))
            })
        })
    });
    let rand = |name: &str, n: usize, seed: usize| GpuTensor::from_f32(&ctx, name, &[n], &pseudo_random(n, seed)).unwrap();
    if ["embedding", "rmsnorm", "swiglu", "rope", "attention"].iter().any(|f| b.wanted(&format!("{f} decode"))) || epilogue_wanted {
        let (x, w, y) = (rand("x", d, 1), rand("w", d, 2), rand("y", d, 0));
        let table = GpuMatrix::upload(&ctx, "table", 1024, d, &pseudo_random(1024 * d, 3), DType::F32).unwrap();
        let ids = GpuTensor::from_u32(&ctx, "ids", &[1], &[7]).unwrap();
        let ds = embedding(&ctx, "embedding", &ids, 1, &table, &y).unwrap();
        b.case("embedding decode", &format!("1x{d}"), &ds, false);
        let d1 = rmsnorm(&ctx, "rmsnorm", &RmsNormOp { x: &x, x_row0: 0, rows: 1, weight: &w, y: &y, eps: 1e-5 }).unwrap();
        b.case("rmsnorm decode", &format!("1x{d}"), &[d1], false);
        let (gate_up, act) = (rand("gate_up", 2 * ff, 4), rand("act", ff, 0));
        let d1 = swiglu(&ctx, "swiglu", &gate_up, 1, ff, &act).unwrap();
        b.case("swiglu decode", &format!("1x{ff}"), &[d1], false);
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(pos, 1));
        let tables = RopeTables::new(&ctx, heads.head_dim, 10000.0, None, max_pos).unwrap();
        let (qkv, q) = (rand("qkv", heads.qkv_dim(), 5), rand("q", heads.q_dim(), 0));
        let (k_cache, v_cache) = (rand("k_cache", max_pos * heads.kv_dim(), 6), rand("v_cache", max_pos * heads.kv_dim(), 7));
        let out = rand("out", heads.q_dim(), 0);
        let rope = RopeQkvOp {
            qkv: &qkv,
            rows: 1,
            row0: 0,
            shape: heads,
            tables: &tables,
            step: &step,
            q_out: &q,
            k_cache: &k_cache,
            v_cache: &v_cache,
        };
        let d1 = rope_qkv_write(&ctx, "rope", &rope).unwrap();
        b.case("rope decode", "1 row 9/3/64", &[d1], false);
        // The decode GEMVs with the epilogues that replace the SwiGLU and RoPE dispatches (rows
        // and windows variants): compare with the plain matvec rows of the same shapes and the
        // kernels above.
        let x = rand("x", d, 8);
        for (variant, dtype) in epilogue_variants.iter().flat_map(|&v| [(v, DType::F32), (v, DType::F16)]) {
            let w_gate_up = GpuMatrix::upload(&ctx, "w", 2 * ff, d, &pseudo_random(2 * ff * d, 9), dtype).unwrap();
            let op = LinearOp::new(&x, 1, &w_gate_up, &gate_up);
            let ds = matvec_with(&ctx, "matvec", &op, variant, MatvecEpilogue::SwiGlu).unwrap();
            let (name, shape) = epilogue_row(variant, dtype, "swiglu");
            b.case(&name, &shape, &ds, true);
            let w_qkv = GpuMatrix::upload(&ctx, "w", heads.qkv_dim(), d, &pseudo_random(heads.qkv_dim() * d, 10), dtype).unwrap();
            let op = LinearOp::new(&x, 1, &w_qkv, &qkv);
            let ds = matvec_with(&ctx, "matvec", &op, variant, MatvecEpilogue::Rope(&rope)).unwrap();
            let (name, shape) = epilogue_row(variant, dtype, "rope");
            b.case(&name, &shape, &ds, true);
            if ctx.is_cpu() {
                let w_o = GpuMatrix::upload(&ctx, "w", d, d, &pseudo_random(d * d, 11), dtype).unwrap();
                let (resid, xn) = (rand("resid", d, 12), rand("xn", d, 0));
                let op = LinearOp::new(&x, 1, &w_o, &resid).accumulate(true);
                let ne = NormEpilogue { weight: &w, out: &xn, eps: 1e-5 };
                let ds = matvec_with(&ctx, "matvec", &op, variant, MatvecEpilogue::Norm(&ne)).unwrap();
                let (name, shape) = epilogue_row(variant, dtype, "norm");
                b.case(&name, &shape, &ds, true);
                let mut ds = matvec(&ctx, "matvec", &op, variant).unwrap();
                ds.push(rmsnorm(&ctx, "rmsnorm", &RmsNormOp { x: &resid, x_row0: 0, rows: 1, weight: &w, y: &xn, eps: 1e-5 }).unwrap());
                let (name, shape) = epilogue_row(variant, dtype, "unfused norm");
                b.case(&name, &shape, &ds, true);
            }
        }
        // Attention: the split and combine dispatches at a few positions and split sizes (the
        // step uniform is written before each case; the dispatches read it at run time).
        let op = AttnOp { q: &q, rows: 1, row0: 0, k_cache: &k_cache, v_cache: &v_cache, shape: heads, step: &step, out: &out };
        for at in [128, 1024] {
            step.write(&ctx, &StepParams::new(at, 1));
            for keys_per_split in [8, 16, 32, 64] {
                let ds = attention_variant(&ctx, "attention", &op, AttnVariant::Split { keys_per_split }).unwrap();
                let splits = split_count(&ctx, max_pos, keys_per_split, heads.n_heads / heads_per_invocation(&ctx, heads));
                let shape = format!("9/3/64 pos {at} of {max_pos}, at least {keys_per_split} keys in each of {splits} splits");
                b.case("attention decode split", &shape, &ds[..1], false);
                b.case("attention decode combine", &shape, &ds[1..], false);
                b.case("attention decode split+combine", &shape, &ds, false);
            }
        }
    }

    // Prefill attention (`attn_rows`): a prompt of T tokens from position 0 over a cache of T rows
    // (the profiler's cost: every row against the whole cache, twice the causal work).
    for t in [128, 512] {
        let shape = format!("9/3/64 T={t} pos 0");
        if !b.wanted(&format!("attention prefill rows {shape}")) {
            continue;
        }
        let (q, out) = (rand("q", t * heads.q_dim(), 11), rand("out", t * heads.q_dim(), 0));
        let (k_cache, v_cache) = (rand("k_cache", t * heads.kv_dim(), 12), rand("v_cache", t * heads.kv_dim(), 13));
        let step = StepBuffer::new(&ctx);
        step.write(&ctx, &StepParams::new(0, t));
        let op = AttnOp { q: &q, rows: t, row0: 0, k_cache: &k_cache, v_cache: &v_cache, shape: heads, step: &step, out: &out };
        let ds = attention_variant(&ctx, "attention", &op, AttnVariant::Rows).unwrap();
        b.case("attention prefill rows", &shape, &ds, false);
    }

    // Matmul: prefill T = 128 on the model's shapes, short prompts (T = 1, 4, 16) on gate_up, and 1024^3.
    let matmul_shapes =
        [(1, 3072, 576), (4, 3072, 576), (16, 3072, 576), (128, 576, 576), (128, 3072, 576), (128, 576, 1536), (1024, 1024, 1024)];
    for (t, n, k) in matmul_shapes {
        for dtype in [DType::F32, DType::F16] {
            let wanted_any = MatmulVariant::ALL.iter().any(|v| b.wanted(&format!("matmul {} {dtype} T={t} {n}x{k}", v.name())));
            if !wanted_any {
                continue;
            }
            let w = GpuMatrix::upload(&ctx, "w", n, k, &pseudo_random(n * k, 4), dtype).unwrap();
            let x = GpuTensor::from_f32(&ctx, "x", &[t, k], &pseudo_random(t * k, 5)).unwrap();
            let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[t, n]).unwrap();
            for v in MatmulVariant::available(&ctx) {
                for kind in read_candidates(&ctx, dtype) {
                    let ds = matmul(&ctx, "matmul", &LinearOp::new(&x, t, &w, &y).kind(kind), v).unwrap();
                    b.case(&format!("matmul {} {}", v.name(), kind.name()), &format!("T={t} {n}x{k}"), &ds, false);
                }
            }
        }
        for q in QuantType::ALL {
            let (kq, shape) = quant_shape(q, n, k);
            let shape = format!("T={t} {shape}");
            if !MatmulVariant::ALL.iter().any(|v| b.wanted(&format!("matmul {} {q} {shape}", v.name()))) {
                continue;
            }
            let w = quant_weights(&ctx, q, n, kq, 4);
            let x = GpuTensor::from_f32(&ctx, "x", &[t, kq], &pseudo_random(t * kq, 5)).unwrap();
            let y = GpuTensor::zeros(&ctx, "y", DType::F32, &[t, n]).unwrap();
            for v in MatmulVariant::available(&ctx) {
                let ds = matmul(&ctx, "matmul", &LinearOp::new(&x, t, &w, &y), v).unwrap();
                b.case(&format!("matmul {} {q}", v.name()), &shape, &ds, false);
            }
        }
    }

    // Backward products of training at prefill T = 128: the input gradient dX = dY · W
    // (`LinearOp::new_xw`, one kernel whatever the matmul variant) of gate_up (W 3072x576) and
    // down (576x1536), and LoRA's weight gradients dB = s · dYᵀ · a ([3072, 16]) and dA = daᵀ · x
    // ([16, 576]) of gate_up at rank 8.
    for (t, n, k) in [(128, 3072, 576), (128, 576, 1536)] {
        let dy = GpuTensor::from_f32(&ctx, "dy", &[t, n], &pseudo_random(t * n, 6)).unwrap();
        for dtype in [DType::F32, DType::F16] {
            if !b.wanted(&format!("linear_xw {dtype} T={t} {n}x{k}")) && !b.wanted(&format!("linear_xw f16packed T={t} {n}x{k}")) {
                continue;
            }
            let w = GpuMatrix::upload(&ctx, "w", n, k, &pseudo_random(n * k, 4), dtype).unwrap();
            let dx = GpuTensor::zeros(&ctx, "dx", DType::F32, &[t, k]).unwrap();
            for kind in read_candidates(&ctx, dtype) {
                let ds = matmul(&ctx, "dx", &LinearOp::new_xw(&dy, t, &w, &dx).kind(kind), MatmulVariant::RegBlock).unwrap();
                b.case(&format!("linear_xw {}", kind.name()), &format!("T={t} {n}x{k}"), &ds, false);
            }
        }
        for q in QuantType::ALL {
            let (kq, shape) = quant_shape(q, n, k);
            let shape = format!("T={t} {shape}");
            if !b.wanted(&format!("linear_xw {q} {shape}")) {
                continue;
            }
            let w = quant_weights(&ctx, q, n, kq, 4);
            let dx = GpuTensor::zeros(&ctx, "dx", DType::F32, &[t, kq]).unwrap();
            let ds = matmul(&ctx, "dx", &LinearOp::new_xw(&dy, t, &w, &dx), MatmulVariant::RegBlock).unwrap();
            b.case(&format!("linear_xw {q}"), &shape, &ds, false);
        }
    }
    let (t, n, k, r) = (128, 3072, 576, 16);
    if b.wanted(&format!("matmul_tn T={t} {n}x{r}")) || b.wanted(&format!("matmul_tn T={t} {r}x{k}")) {
        let dy = GpuTensor::from_f32(&ctx, "dy", &[t, n], &pseudo_random(t * n, 6)).unwrap();
        let a = GpuTensor::from_f32(&ctx, "a", &[t, r], &pseudo_random(t * r, 7)).unwrap();
        let x = GpuTensor::from_f32(&ctx, "x", &[t, k], &pseudo_random(t * k, 5)).unwrap();
        let db = GpuTensor::zeros(&ctx, "db", DType::F32, &[n, r]).unwrap();
        let da = GpuTensor::zeros(&ctx, "da", DType::F32, &[r, k]).unwrap();
        let d = matmul_tn(&ctx, "db", &MatmulTnOp::new(&dy, &a, t, n, r, &db).scale(2.0)).unwrap();
        b.case("matmul_tn", &format!("T={t} {n}x{r}"), &[d], false);
        let d = matmul_tn(&ctx, "da", &MatmulTnOp::new(&a, &x, t, r, k, &da)).unwrap();
        b.case("matmul_tn", &format!("T={t} {r}x{k}"), &[d], false);
    }

    // Training's backward kernels: attention on the model's heads (9 query, 3 kv, head_dim 64)
    // from position 0, and the LM-head cross-entropy with dh over the model's vocabulary in
    // chunks of 4096 columns (every row counted).
    let heads = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
    for t in [128, 512] {
        let shape = format!("T={t} 9/3/64");
        if !b.wanted(&format!("attention_backward {shape}")) {
            continue;
        }
        let (qd, kvd) = (heads.q_dim(), heads.kv_dim());
        let rand =
            |name: &str, cols: usize, seed: usize| GpuTensor::from_f32(&ctx, name, &[t, cols], &pseudo_random(t * cols, seed)).unwrap();
        let (q, k, v, out, d_out) = (rand("q", qd, 6), rand("k", kvd, 7), rand("v", kvd, 8), rand("out", qd, 9), rand("d_out", qd, 10));
        let (dq, dk, dv) = (rand("dq", qd, 0), rand("dk", kvd, 0), rand("dv", kvd, 0));
        let op = AttnBackwardOp { q: &q, k: &k, v: &v, out: &out, d_out: &d_out, rows: t, shape: heads, dq: &dq, dk: &dk, dv: &dv };
        let ds = attention_backward(&ctx, "attention_backward", &op).unwrap();
        b.case("attention_backward", &shape, &ds, false);
    }
    // The LM head as f16 values and as Q8_0 blocks (SmolLM2's Q4_1 file stores it so).
    let (t, vocab, d) = (128, 49152, 576);
    for head in [None, Some(QuantType::Q8_0)] {
        let name = match head {
            None => format!("cross_entropy+dh {}", weight_kind(&ctx, DType::F16).for_k(d).name()),
            Some(q) => format!("cross_entropy+dh {q}"),
        };
        let shape = format!("T={t} {vocab}x{d}");
        if !b.wanted(&format!("{name} {shape}")) {
            continue;
        }
        let w = match head {
            None => GpuMatrix::upload(&ctx, "w", vocab, d, &pseudo_random(vocab * d, 11), DType::F16).unwrap(),
            Some(q) => quant_weights(&ctx, q, vocab, d, 11),
        };
        let h = GpuTensor::from_f32(&ctx, "h", &[t, d], &pseudo_random(t * d, 12)).unwrap();
        let ids: Vec<u32> = (0..t as u32).map(|i| i * 383 % vocab as u32).collect();
        let targets = GpuTensor::from_u32(&ctx, "targets", &[t], &ids).unwrap();
        let mask = GpuTensor::from_u32(&ctx, "mask", &[t], &vec![1; t]).unwrap();
        let loss = GpuTensor::zeros(&ctx, "loss", DType::F32, &[1]).unwrap();
        let dh = GpuTensor::zeros(&ctx, "dh", DType::F32, &[t, d]).unwrap();
        let op = CrossEntropyOp { dh: Some(&dh), ..CrossEntropyOp::new(&h, t, &w, &targets, &mask, &loss) };
        let ds = cross_entropy(&ctx, "cross_entropy", &op).unwrap();
        b.case(&name, &shape, &ds, false);
    }

    // Footnote: what a weight costs in bytes read, to compare the quantised rows' GB/s with the
    // dense ones (equal times mean equal weights per second only at equal bits per weight).
    println!();
    let bits: Vec<String> = QuantType::ALL
        .iter()
        .map(|q| format!("{q} {} ({} in the file)", q.gpu_bits_per_weight(), q.block_bytes() as f64 * 8.0 / q.block_elems() as f64))
        .collect();
    println!("bits per weight read (GPU layout): f32 32, f16 16, {}.", bits.join(", "));
    println!(
        "GB/s counts the bytes read (Cost::bytes: the weights as stored on the GPU, x and y); f32 weights read in the same time would be about GB/s x 32 / bits."
    );
}
