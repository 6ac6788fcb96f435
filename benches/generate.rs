//! End-to-end speed on the test model, medians of repeats after a warm-up, f32 and f16:
//! 1. the full model: prefill tok/s for a 128-token prompt and decode over 64 greedy tokens, and
//!    the routers' share of prefill time;
//! 2. static skip plans of 0, 3, 6, 9, 12 and 15 of the 30 layers: decode ms/token (prompt 16,
//!    32 tokens) against the ideal saving;
//! 3. batched decode (`runtime::batch`, what `firstrt serve` does for sequences that share a
//!    plan): B = 1, 2, 4, 8, 16 sequences, ms per round of one token each, batched against each
//!    sequence stepping alone, and the aggregate tokens/s of both.
//!
//! `cargo bench --bench generate [-- FILTER] [--repeat N]`. Rows are printed as they finish.

use std::sync::Arc;
use std::time::Instant;

use firstrt::gpu::{DType, GpuContext, GpuOptions};
use firstrt::runtime::batch::DecodeBatch;
use firstrt::runtime::{LayerPlan, LoadedModel, Session, SessionOptions};
use firstrt::testdata::{TempDir, load_model, median};

const PROMPT_LEN: usize = 128;
const GEN: usize = 64;
/// The skip-plan rows measure decode only: a short prompt keeps them quick.
const SKIP_PROMPT_LEN: usize = 16;
const SKIP_GEN: usize = 32;

/// `len` prompt ids: a fixed story, tokenized, repeated and cut to length.
fn prompt_ids(model: &LoadedModel, len: usize) -> Vec<u32> {
    let text = "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker \
                who repaired every clock in the valley. Each morning he opened his shop, wound the tall clock by the \
                door, and listened to the town wake up. Children came to watch him work, because his hands moved \
                faster than anyone could follow, and he told stories about the gears as if they were alive. One \
                winter, a stranger arrived with a broken pocket watch that no one else could fix, and asked him to \
                mend it before the first snow melted. The clockmaker turned the watch over in his hands for a long time.";
    let mut ids = model.text_ids(text).expect("tokenizing the bench prompt");
    while ids.len() < len {
        ids.extend_from_within(..);
    }
    ids.truncate(len);
    ids
}

/// Prefill seconds of `ids` in a fresh session: static full plan, or routed with routers that
/// keep every layer (the same work plus the routers and their read-backs).
fn prefill_seconds(model: &LoadedModel, routers: Option<&std::path::Path>, ids: &[u32]) -> f64 {
    let options = SessionOptions { ctx_len: PROMPT_LEN + 1, candidates: 1 };
    let n = model.weights.config.n_layers;
    let mut s = match routers {
        Some(path) => {
            let (_, plan) = model.load_routers(path, &Default::default()).expect("router file");
            plan.session(&model.weights, options).expect("session")
        }
        None => Session::new(&model.weights, options, LayerPlan::full(n)).expect("session"),
    };
    let t0 = Instant::now();
    s.prefill(ids).expect("prefill");
    t0.elapsed().as_secs_f64()
}

struct Run {
    prefill_tok_s: f64,
    decode_ms: f64,
}

fn one_run(model: &LoadedModel, plan: &LayerPlan, ids: &[u32], n_gen: usize) -> Run {
    let mut s =
        Session::new(&model.weights, SessionOptions { ctx_len: ids.len() + n_gen + 1, candidates: 1 }, plan.clone()).expect("session");
    s.prepare_prefill(ids.len()).expect("prepare");
    let t0 = Instant::now();
    let mut out = s.prefill(ids).expect("prefill");
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n_gen {
        let next = out.candidates[0].0;
        out = s.decode(next).expect("decode");
    }
    let decode = t1.elapsed().as_secs_f64();
    Run { prefill_tok_s: ids.len() as f64 / prefill, decode_ms: 1000.0 * decode / n_gen as f64 }
}

/// The routers' share of prefill time: routed (every layer kept, r = 64) vs static full plan,
/// alternated run by run.
fn routers_share(model: &LoadedModel, ids: &[u32], repeat: usize) {
    let identity = firstrt::model::routers::model_identity(model.source.as_ref()).expect("identity");
    let file = firstrt::model::routers::RouterFile::init(&identity, 64, 8.0, 1e-5, 0.5);
    let dir = TempDir::new("bench-routers");
    let path = dir.join("routers.safetensors");
    file.save(&path).expect("writing routers");
    prefill_seconds(model, Some(&path), ids);
    let (mut routed, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        routed.push(prefill_seconds(model, Some(&path), ids));
        plain.push(prefill_seconds(model, None, ids));
    }
    let (r, p) = (median(&mut routed), median(&mut plain));
    println!(
        "  routers (r = 64, all kept): prefill {:.1} ms vs {:.1} ms without: routers' share {:.2}% of prefill",
        1000.0 * r,
        1000.0 * p,
        100.0 * (r - p) / r
    );
}

/// Rounds timed per batched-decode measurement.
const BATCH_ROUNDS: usize = 8;

/// `b` sessions over `ids`, prefilled (with their first token), ready to decode.
fn prefilled(model: &LoadedModel, ids: &[u32], b: usize) -> (Vec<Session>, Vec<u32>) {
    let n = model.weights.config.n_layers;
    (0..b)
        .map(|_| {
            let options = SessionOptions { ctx_len: ids.len() + BATCH_ROUNDS + 2, candidates: 1 };
            let mut s = Session::new(&model.weights, options, LayerPlan::full(n)).expect("session");
            let first = s.prefill(ids).expect("prefill").candidates[0].0;
            (s, first)
        })
        .unzip()
}

/// Seconds per round of one decode step for each of `b` sessions: batched, or one at a time.
fn round_seconds(model: &LoadedModel, batch: &mut DecodeBatch, ids: &[u32], b: usize, batched: bool) -> f64 {
    let (mut sessions, mut next) = prefilled(model, ids, b);
    batch.forget();
    let mut times = Vec::new();
    for _ in 0..BATCH_ROUNDS {
        let t0 = Instant::now();
        if batched {
            let mut members: Vec<&mut Session> = sessions.iter_mut().collect();
            let outs = batch.step(&mut members, &next).expect("batched step");
            next = outs.iter().map(|o| o.candidates[0].0).collect();
        } else {
            for (s, id) in sessions.iter_mut().zip(next.iter_mut()) {
                *id = s.decode(*id).expect("decode").candidates[0].0;
            }
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    // The first round builds the batch's program (or each session's decode program).
    median(&mut times[1..].to_vec())
}

fn batched_decode(model: &LoadedModel, name: &str, repeat: usize) {
    let ids = prompt_ids(model, SKIP_PROMPT_LEN);
    println!(
        "{:<6} {:<4} {:>18} {:>18} {:>8} {:>14} {:>14}",
        "dtype", "B", "batched ms/round", "alone ms/round", "ratio", "batched tok/s", "alone tok/s"
    );
    for b in [1usize, 2, 4, 8, 16] {
        let mut batch = DecodeBatch::new(&model.weights, b).expect("batch buffers");
        round_seconds(model, &mut batch, &ids, b, true);
        let (mut batched, mut alone) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            batched.push(round_seconds(model, &mut batch, &ids, b, true));
            alone.push(round_seconds(model, &mut batch, &ids, b, false));
        }
        let (tb, ta) = (median(&mut batched), median(&mut alone));
        println!(
            "{:<6} {:<4} {:>18.1} {:>18.1} {:>8.2} {:>14.1} {:>14.1}",
            name,
            b,
            1000.0 * tb,
            1000.0 * ta,
            ta / tb,
            b as f64 / tb,
            b as f64 / ta
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let repeat = args.iter().position(|a| a == "--repeat").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(5usize);
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).collect();
    let ctx = GpuContext::new(&GpuOptions::default()).expect("GPU adapter");
    println!("adapter: {} ({:?}, {} {})", ctx.info.name, ctx.info.backend, ctx.info.driver, ctx.info.driver_info);
    println!("model: {}, median of {repeat} runs after a warm-up", firstrt::testdata::MODEL_FILE);
    for dtype in [DType::F32, DType::F16] {
        let name = format!("{dtype}");
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let model = Arc::new(load_model(&ctx, dtype));
        let n_layers = model.weights.config.n_layers;
        let ids = prompt_ids(&model, PROMPT_LEN);
        let full = LayerPlan::full(n_layers);
        one_run(&model, &full, &ids, GEN);
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            let r = one_run(&model, &full, &ids, GEN);
            prefill.push(r.prefill_tok_s);
            decode.push(r.decode_ms);
        }
        let ms = median(&mut decode);
        println!(
            "{name}: prompt {PROMPT_LEN}, {GEN} tokens: prefill {:.1} tok/s, decode {:.1} ms/token ({:.2} tok/s); weights {:.1} MiB",
            median(&mut prefill),
            ms,
            1000.0 / ms,
            model.weights.byte_len() as f64 / (1 << 20) as f64
        );
        routers_share(&model, &ids, repeat);
        batched_decode(&model, &name, repeat);

        println!("{:<6} {:<8} {:>12} {:>10} {:>16}", "dtype", "skipped", "decode ms", "vs full", "ideal 1-k/L");
        let ids = prompt_ids(&model, SKIP_PROMPT_LEN);
        let mut full_ms = None;
        for k in [0usize, 3, 6, 9, 12, 15] {
            // Skip k layers from the middle of the stack, keeping the first and the last.
            let start = (n_layers - k) / 2;
            let skip: Vec<usize> = (start..start + k).collect();
            let plan = LayerPlan::skipping(n_layers, &skip).expect("plan");
            one_run(&model, &plan, &ids, SKIP_GEN);
            let mut decode = Vec::new();
            for _ in 0..repeat {
                decode.push(one_run(&model, &plan, &ids, SKIP_GEN).decode_ms);
            }
            let ms = median(&mut decode);
            let full = *full_ms.get_or_insert(ms);
            println!(
                "{:<6} {:<8} {:>12.2} {:>10.3} {:>16.3}",
                name,
                format!("{k}/{n_layers}"),
                ms,
                ms / full,
                1.0 - k as f64 / n_layers as f64
            );
        }
    }
}
