//! Kernel bench: one table row per kernel / shape / variant / dtype with time, GFLOP/s, GB/s and,
//! for matvec, the fraction of the copy kernel's bandwidth measured in the same run.
//!
//! `cargo bench --bench kernels [-- FILTER...]`: rows whose name contains any FILTER (e.g.
//! `matvec`, `f16`, `49152`). Times are wall clock around `ctx.run` of N copies of the dispatches
//! recorded in one pass and submitted once (amortising the submit), divided by N; the median of
//! several repeats. To add a kernel family, prepare its dispatches and call `Bench::case`.

use std::time::{Duration, Instant};

use firstrt::gpu::{DType, Dispatch, GpuContext, GpuMatrix, GpuOptions, GpuTensor};
use firstrt::kernels::choice::{read_candidates, weight_kind};
use firstrt::kernels::copy::copy;
use firstrt::kernels::linear::LinearOp;
use firstrt::kernels::matmul::{MatmulVariant, matmul};
use firstrt::kernels::matvec::{MatvecVariant, matvec};
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
            for v in MatvecVariant::ALL {
                let ds = matvec(&ctx, "matvec", &LinearOp::new(&x, 1, &w, &y), v).unwrap();
                b.case(&format!("matvec {} {}", v.name(), weight_kind(&ctx, dtype).for_k(k).name()), &format!("{n}x{k}"), &ds, true);
                // The other ways of reading these weights (the row above used the adapter's choice).
                for kind in read_candidates(&ctx, dtype).into_iter().filter(|&k| k != weight_kind(&ctx, dtype)) {
                    let ds = matvec(&ctx, "matvec", &LinearOp::new(&x, 1, &w, &y).kind(kind), v).unwrap();
                    b.case(&format!("matvec {} {}", v.name(), kind.name()), &format!("{n}x{k}"), &ds, true);
                }
            }
        }
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
            for v in MatmulVariant::ALL {
                for kind in read_candidates(&ctx, dtype) {
                    let ds = matmul(&ctx, "matmul", &LinearOp::new(&x, t, &w, &y).kind(kind), v).unwrap();
                    b.case(&format!("matmul {} {}", v.name(), kind.name()), &format!("T={t} {n}x{k}"), &ds, false);
                }
            }
        }
    }
}
