//! Training speed on the test model (`firstrt train`'s hot path): one sequence's forward and
//! backward (`Engine::accumulate`), its forward alone (`Engine::evaluate`: the loss without the
//! cross-entropy's gradient pass) and the AdamW step, medians of repeats after a warm-up, for
//! the three stages' settings: routers (hard gates, every layer kept: `p = sigmoid(2)` makes
//! skips rare), lora (rank 8 on q, k, v, o, full plan) and joint.
//!
//! `cargo bench --bench train [-- --len T] [--repeat N] [--dtype f32|f16|native]`.

use std::sync::Arc;
use std::time::Instant;

use firstrt::gpu::{GpuContext, GpuOptions};
use firstrt::kernels::adamw::AdamWConfig;
use firstrt::model::lora::{LoraAdapter, LoraConfig, LoraDims, Projection};
use firstrt::model::routers::{RouterFile, model_identity};
use firstrt::runtime::{LoadedModel, WeightDtype};
use firstrt::testdata::{median, model_path};
use firstrt::train::engine::{Engine, EngineOptions, GateRule};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let len: usize = arg("--len", 128);
    let repeat: usize = arg("--repeat", 3);
    let dtype_name: String = arg("--dtype", "f32".to_string());
    let dtype = WeightDtype::parse(&dtype_name).expect("--dtype f32, f16 or native");
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let model = LoadedModel::load(&ctx, &model_path(), dtype, &mut |_, _| {}).expect("the test model");
    let cfg = model.weights.config.clone();
    let identity = model_identity(model.source.as_ref()).unwrap();
    let routers = RouterFile::init(&identity, 16, 2.0, cfg.rms_eps, 0.5);
    let lora_config =
        LoraConfig { rank: 8, alpha: 16.0, use_rslora: false, targets: vec![Projection::Q, Projection::K, Projection::V, Projection::O] };
    let adapter = LoraAdapter::init(lora_config, LoraDims::of(&cfg), 0).unwrap();
    let ids: Vec<u32> = (0..len as u32).map(|i| 100 + (i * 37) % 5000).collect();
    let prompt = len / 2;
    println!("training on {}, {len} tokens per sequence ({prompt} prompt), {dtype_name} weights, median of {repeat}", ctx.info.name);
    println!("{:<8} {:>12} {:>12} {:>12} {:>10} {:>14}", "stage", "forward ms", "seq ms", "tokens/s", "step ms", "peak GPU MiB");
    for (stage, train_routers, train_lora) in [("routers", true, false), ("lora", false, true), ("joint", true, true)] {
        let gate = if train_routers { GateRule::Hard } else { GateRule::Fixed(vec![true; cfg.n_layers]) };
        let options = EngineOptions {
            ctx_len: len,
            gate,
            train_routers,
            train_lora,
            lambda: 0.01,
            keep_target: None,
            adamw: AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            max_grad_norm: 1.0,
        };
        let lora = train_lora.then_some(&adapter);
        let mut engine = Engine::new(Arc::clone(&model.weights), Some(routers.clone()), lora, options).unwrap();
        engine.accumulate(&ids, prompt, 0).unwrap();
        engine.step(1, 1e-4, 1).unwrap();
        let (mut fwd, mut seq, mut step) = (Vec::new(), Vec::new(), Vec::new());
        let rule = engine.options().gate.clone();
        for r in 0..repeat {
            let t0 = Instant::now();
            engine.evaluate(&ids, prompt, r as u64 + 1, &rule).unwrap();
            fwd.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            engine.accumulate(&ids, prompt, r as u64 + 1).unwrap();
            seq.push(t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            engine.step(r as u32 + 2, 1e-4, 1).unwrap();
            step.push(t1.elapsed().as_secs_f64());
        }
        let s = median(&mut seq);
        println!(
            "{stage:<8} {:>12.0} {:>12.0} {:>12.1} {:>10.1} {:>14}",
            median(&mut fwd) * 1e3,
            s * 1e3,
            len as f64 / s,
            median(&mut step) * 1e3,
            engine.peak_bytes() / (1 << 20)
        );
    }
}
