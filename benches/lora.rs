//! LoRA decode cost on the test model (f32): decode ms/token over 64 greedy tokens after a
//! 128-token prompt for the base model, the fixture adapter merged into the weights, and the
//! same adapter unmerged (2 extra small products per projection group per layer); medians of
//! repeats. The adapter is `$FIRSTRT_FIXTURES/smollm2-135m-instruct/lora` (r = 8, 7 projections).
//!
//! `cargo bench --bench lora [-- --repeat N]`.

use std::sync::Arc;
use std::time::Instant;

use firstrt::gpu::{DType, GpuContext, GpuOptions};
use firstrt::runtime::{GpuLora, GpuWeights, LayerPlan, LoadedModel, MergedLora, Session, SessionOptions};
use firstrt::testdata::{load_model, median};

const PROMPT_LEN: usize = 128;
const GEN: usize = 64;

/// (prefill tok/s, decode ms/token) of one sequence.
fn one_run(weights: &Arc<GpuWeights>, lora: Option<&Arc<GpuLora>>, ids: &[u32]) -> (f64, f64) {
    let n = weights.config.n_layers;
    let mut s =
        Session::new(weights, SessionOptions { ctx_len: PROMPT_LEN + GEN + 1, candidates: 1 }, LayerPlan::full(n)).expect("session");
    if let Some(g) = lora {
        s.set_lora(Some(g.clone()), 1.0).expect("set_lora");
    }
    let t0 = Instant::now();
    let mut out = s.prefill(ids).expect("prefill");
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..GEN {
        out = s.decode(out.candidates[0].0).expect("decode");
    }
    (ids.len() as f64 / prefill, 1000.0 * t1.elapsed().as_secs_f64() / GEN as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let repeat = args.iter().position(|a| a == "--repeat").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(5usize);
    let ctx = GpuContext::new(&GpuOptions::default()).expect("GPU adapter");
    let adapter = firstrt::testdata::fixtures_dir().join("lora");
    println!("adapter: {} ({:?}, {} {})", ctx.info.name, ctx.info.backend, ctx.info.driver, ctx.info.driver_info);
    println!(
        "model: {}, LoRA {}, f32, prompt {PROMPT_LEN} tokens, {GEN} greedy tokens, median of {repeat} runs after a warm-up",
        firstrt::testdata::MODEL_FILE,
        adapter.display()
    );
    let path = firstrt::testdata::model_path();
    let base = load_model(&ctx, DType::F32);
    let t = Instant::now();
    let merged = LoadedModel::load_merged(&ctx, &path, DType::F32, Some(&MergedLora { dir: adapter.clone(), scale: 1.0 }), &mut |_, _| {})
        .expect("loading the merged model");
    let merged_load = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let lora = base.load_lora(&adapter).expect("uploading the adapter");
    let upload = t.elapsed().as_secs_f64();
    println!("merged load {merged_load:.2} s; unmerged adapter read + upload {:.3} s, {} KiB", upload, lora.byte_len() / 1024);
    let mut ids =
        base.text_ids("Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker.").unwrap();
    while ids.len() < PROMPT_LEN {
        ids.extend_from_within(..);
    }
    ids.truncate(PROMPT_LEN);

    /// A configuration: its name, the weights, and the adapter applied unmerged (if any).
    type Row<'a> = (&'a str, &'a Arc<GpuWeights>, Option<&'a Arc<GpuLora>>);
    let rows: [Row; 3] = [("base", &base.weights, None), ("merged", &merged.weights, None), ("unmerged", &base.weights, Some(&lora))];
    for (_, w, l) in &rows {
        one_run(w, *l, &ids); // warm-up: pipelines, kernel choice
    }
    // Interleave the configurations so that a change in machine load hits all of them alike.
    let mut prefill = vec![Vec::new(); rows.len()];
    let mut decode = vec![Vec::new(); rows.len()];
    for _ in 0..repeat {
        for (i, (_, w, l)) in rows.iter().enumerate() {
            let (p, d) = one_run(w, *l, &ids);
            prefill[i].push(p);
            decode[i].push(d);
        }
    }
    println!("{:<9} {:>14} {:>12} {:>10}", "mode", "prefill tok/s", "decode ms", "vs base");
    let base_ms = median(&mut decode[0].clone());
    for (i, (name, _, _)) in rows.iter().enumerate() {
        let ms = median(&mut decode[i]);
        println!("{:<9} {:>14.1} {:>12.2} {:>10.3}", name, median(&mut prefill[i]), ms, ms / base_ms);
    }
}
