//! The engine's gradients against finite differences of its own loss on a tiny random model,
//! and its forward against inference.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::gpu::test_context;
use crate::kernels::testing::random_vec;
use crate::model::WeightSource;
use crate::model::gguf_test_writer::{GgufBuilder, RandomLlama, TempFile};
use crate::model::lora::{LoraConfig, LoraDims, LoraPair};
use crate::model::routers::model_identity;
use crate::model::weights::GgufWeights;
use crate::runtime::{Session, SessionOptions};

const DIMS: RandomLlama = RandomLlama { n_layers: 3, d: 64, heads: 4, kv_heads: 2, ff: 96, vocab: 61 };

struct Tiny {
    _file: TempFile,
    weights: Arc<GpuWeights>,
    routers: RouterFile,
    adapter: LoraAdapter,
}

/// The tiny model, routers on every layer (`skip_first_last`, so all three are trained) with
/// random weights, and an adapter on all seven projections with random A and B.
fn tiny(seed: u64) -> Tiny {
    let ctx = test_context();
    let file = GgufBuilder::random_llama(DIMS, seed).write_temp("train-engine");
    let source = GgufWeights::open(&file.path).unwrap();
    let weights = Arc::new(GpuWeights::load(&ctx, &source, DType::F32, &mut |_, _| {}).unwrap());
    let cfg = source.config().clone();
    let mut routers = RouterFile::init(&model_identity(&source).unwrap(), 4, 0.0, 1e-5, 0.5);
    routers.skip_first_last = true;
    for (l, slot) in routers.layers.iter_mut().enumerate() {
        let r = slot.as_mut().unwrap();
        let s = seed + 100 * l as u64;
        r.norm = random_vec(r.norm.len(), s).iter().map(|v| 1.0 + 0.3 * v).collect();
        r.w1 = random_vec(r.w1.len(), s + 1).iter().map(|v| v * 0.5).collect();
        r.b1 = random_vec(r.b1.len(), s + 2);
        r.w2 = Some(random_vec(4, s + 3));
        r.b2 = Some(0.1);
    }
    let targets = Projection::ALL.to_vec();
    let layers = (0..cfg.n_layers)
        .map(|l| {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for p in &targets {
                let (out, inp) = p.dims(&cfg);
                let s = seed + 1000 + 10 * l as u64 + p.index() as u64;
                let a = random_vec(2 * inp, s).iter().map(|v| v * 0.3).collect();
                let b = random_vec(out * 2, s + 7).iter().map(|v| v * 0.3).collect();
                pairs[p.index()] = Some(LoraPair { a, b });
            }
            pairs
        })
        .collect();
    let adapter = LoraAdapter {
        dir: PathBuf::from("tiny-adapter"),
        config: LoraConfig { rank: 2, alpha: 4.0, use_rslora: false, targets },
        dims: LoraDims::of(&cfg),
        layers,
    };
    Tiny { _file: file, weights, routers, adapter }
}

fn options(gate: GateRule) -> EngineOptions {
    EngineOptions {
        ctx_len: 24,
        gate,
        train_routers: true,
        train_lora: true,
        lambda: 0.05,
        keep_target: Some((0.9, 0.2)),
        adamw: AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        max_grad_norm: 1.0,
    }
}

fn sequence(len: usize, seed: u64) -> Vec<u32> {
    random_vec(len, seed).iter().map(|v| ((v + 1.0) * 0.5 * (DIMS.vocab as f32 - 1.0)) as u32).collect()
}

fn write_at(ctx: &GpuContext, t: &GpuTensor, i: usize, v: f32) {
    ctx.queue.write_buffer(&t.buffer, 4 * i as u64, &v.to_le_bytes());
}

/// `(f(θ + ε) − f(θ − ε)) / 2ε` in entry i of trained tensor `param` (whose value there is
/// `value`; restored after), ε = 1e-2.
fn central_difference(engine: &mut Engine, param: usize, i: usize, value: f32, f: impl Fn(&mut Engine) -> f64) -> f64 {
    let (ctx, eps) = (test_context(), 1e-2f32);
    let t = engine.params()[param].value.clone();
    write_at(&ctx, &t, i, value + eps);
    let plus = f(engine);
    write_at(&ctx, &t, i, value - eps);
    let minus = f(engine);
    write_at(&ctx, &t, i, value);
    (plus - minus) / (2.0 * eps as f64)
}

/// Every trained tensor's gradient at three entries against central differences of the loss
/// (evaluated with `rule`, which must be deterministic); returns the tensors' names.
fn check_gradients(tiny: &Tiny, routers: RouterFile, options: EngineOptions) -> Vec<String> {
    let ctx = test_context();
    let rule = options.gate.clone();
    let mut engine = Engine::new(tiny.weights.clone(), Some(routers), Some(&tiny.adapter), options).unwrap();
    let ids = sequence(13, 5);
    let prompt = 5;
    let stats = engine.accumulate(&ids, prompt, 0).unwrap();
    assert!(stats.ce.is_finite(), "{stats:?}");
    let loss = |e: &mut Engine| e.evaluate(&ids, prompt, 0, &rule).unwrap().loss() as f64;
    let base = loss(&mut engine);
    assert!((base - stats.loss() as f64).abs() < 1e-5, "evaluate {base} vs accumulate {}", stats.loss());
    let names: Vec<String> = engine.params().iter().map(|p| p.name.clone()).collect();
    for (pi, name) in names.iter().enumerate() {
        let (value, grad) = (engine.params()[pi].value.read_f32(&ctx).unwrap(), engine.params()[pi].grad.read_f32(&ctx).unwrap());
        // Three entries per tensor: the largest gradient and two spread over the tensor. The
        // stacked B of a LoRA group holds zeros outside its diagonal blocks: not parameters.
        let live = |i: usize| !name.ends_with(".B") || value[i] != 0.0;
        let largest = (0..grad.len()).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
        let middle = (grad.len() / 3..grad.len()).find(|&i| live(i)).unwrap();
        let last = (0..grad.len()).rev().find(|&i| live(i)).unwrap();
        for i in [largest, middle, last] {
            let fd = central_difference(&mut engine, pi, i, value[i], loss);
            let got = grad[i] as f64;
            assert!(
                (fd - got).abs() <= 0.03 * fd.abs().max(got.abs()) + 3e-4,
                "{}[{i}]: gradient {got}, finite differences {fd}",
                names[pi]
            );
        }
    }
    names
}

#[test]
fn gradients_match_finite_differences_of_the_loss() {
    let tiny = tiny(11);
    // Every layer routed (soft gates): each router and both matrices of every LoRA group.
    let names = check_gradients(&tiny, tiny.routers.clone(), options(GateRule::Soft));
    assert_eq!(names.len(), 3 * 5 + 3 * 4 * 2, "{names:?}");
    // Layer 0 and the last one protected: they run unrouted, only layer 1's router trains.
    let mut protected = tiny.routers.clone();
    protected.skip_first_last = false;
    let names = check_gradients(&tiny, protected, options(GateRule::Soft));
    assert_eq!(names.iter().filter(|n| n.starts_with("router.")).count(), 5, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with("router.") || n.starts_with("router.1.")), "{names:?}");
    // The adapter alone under a fixed plan that skips layer 1 (its matrices get no gradient).
    let fixed = EngineOptions { train_routers: false, ..options(GateRule::Fixed(vec![true, false, true])) };
    let names = check_gradients(&tiny, tiny.routers.clone(), fixed);
    assert_eq!(names.len(), 3 * 4 * 2, "{names:?}");
}

#[test]
fn the_hard_gate_forward_is_inference_with_the_drawn_plan() {
    let tiny = tiny(12);
    let ctx = test_context();
    let mut engine = Engine::new(tiny.weights.clone(), Some(tiny.routers.clone()), Some(&tiny.adapter), options(GateRule::Hard)).unwrap();
    let ids = sequence(12, 9);
    let prompt = 4;
    // Seeds until one draws a plan that skips a layer and runs another.
    let stats = (0..64)
        .map(|seed| engine.evaluate(&ids, prompt, seed, &GateRule::Hard).unwrap())
        .find(|s| s.skipped > 0 && s.skipped < 3)
        .expect("some seed skips between one and two layers");
    let plan = LayerPlan::from_flags(stats.gates.iter().map(|&g| g == 1.0).collect());
    let mut session = Session::new(&tiny.weights, SessionOptions { ctx_len: 24, candidates: 1 }, plan).unwrap();
    session.set_lora(Some(Arc::new(GpuLora::upload(&ctx, &tiny.adapter, &tiny.weights.config).unwrap())), 1.0).unwrap();
    session.prefill(&ids[..prompt]).unwrap();
    let mut nll = 0.0;
    for t in prompt..ids.len() {
        nll += crate::eval::run::negative_log_likelihood(&session.read_logits().unwrap(), ids[t]);
        if t + 1 < ids.len() {
            session.decode(ids[t]).unwrap();
        }
    }
    let ce = nll / (ids.len() - prompt) as f64;
    assert!((ce - stats.ce as f64).abs() < 1e-4 * ce.abs().max(1.0), "engine CE {} vs inference {ce}", stats.ce);
}

#[test]
fn a_step_moves_trained_tensors_and_zeroes_gradients() {
    let tiny = tiny(13);
    let ctx = test_context();
    // Soft gates: every layer, and so every adapter matrix, gets a gradient.
    let mut engine = Engine::new(tiny.weights.clone(), Some(tiny.routers.clone()), Some(&tiny.adapter), options(GateRule::Soft)).unwrap();
    let before: Vec<Vec<f32>> = engine.params().iter().map(|p| p.value.read_f32(&ctx).unwrap()).collect();
    for seed in 0..2 {
        engine.accumulate(&sequence(10, seed), 3, seed).unwrap();
    }
    let clip = engine.step(1, 1e-2, 2).unwrap();
    assert!(clip.norm > 0.0 && clip.scale > 0.0, "{clip:?}");
    for (p, old) in engine.params().iter().zip(&before) {
        assert!(p.grad.read_f32(&ctx).unwrap().iter().all(|&g| g == 0.0), "{} gradient not zeroed", p.name);
        let new = p.value.read_f32(&ctx).unwrap();
        assert_ne!(&new, old, "{} did not move", p.name);
    }
    // The routers read back into a file that holds the new values.
    let file = engine.router_file().unwrap().unwrap();
    let w1 = engine.params().iter().find(|p| p.name == "router.1.w1").unwrap().value.read_f32(&ctx).unwrap();
    assert_eq!(file.layers[1].as_ref().unwrap().w1, w1);
}

#[test]
fn the_regulariser_and_its_derivative() {
    // λ · mean p, and ∂/∂p_l = λ / n.
    let (r, d) = regulariser(&[0.2, 0.6], 0.01, None);
    assert!((r - 0.004).abs() < 1e-7 && (d - 0.005).abs() < 1e-7, "{r} {d}");
    // + μ |mean p − target|: above the target it pushes down, below it pushes up.
    let (r, d) = regulariser(&[0.9, 0.7], 0.0, Some((0.5, 2.0)));
    assert!((r - 0.6).abs() < 1e-6 && (d - 1.0).abs() < 1e-6, "{r} {d}");
    let (_, d) = regulariser(&[0.1, 0.3], 0.0, Some((0.5, 2.0)));
    assert!((d + 1.0).abs() < 1e-6, "{d}");
    assert_eq!(regulariser(&[], 0.01, Some((0.5, 1.0))), (0.0, 0.0));
}

/// Every plan of the tiny model's three routed layers, each with a seed whose draws give it and
/// that draw's stats (probabilities, gates, loss).
fn every_plan(engine: &mut Engine, ids: &[u32], prompt: usize) -> Vec<(u64, SequenceStats)> {
    let mut found: Vec<Option<(u64, SequenceStats)>> = vec![None; 1 << DIMS.n_layers];
    for seed in 0..4096 {
        if found.iter().all(Option::is_some) {
            break;
        }
        let s = engine.evaluate(ids, prompt, seed, &GateRule::Hard).unwrap();
        let plan = s.gates.iter().enumerate().map(|(l, &g)| usize::from(g == 1.0) << l).sum::<usize>();
        found[plan].get_or_insert((seed, s));
    }
    found.into_iter().enumerate().map(|(k, f)| f.unwrap_or_else(|| panic!("plan {k:03b} never drawn"))).collect()
}

/// The probability of the plan a draw made: `prod_l p_l` over run layers times `1 − p_l` over
/// skipped ones.
fn plan_probability(s: &SequenceStats) -> f64 {
    s.probs.iter().zip(&s.gates).map(|(p, &g)| if g == 1.0 { p.unwrap() as f64 } else { 1.0 - p.unwrap() as f64 }).product()
}

#[test]
fn the_score_gate_gradient_averages_to_the_expected_loss_gradient() {
    let tiny = tiny(14);
    let ctx = test_context();
    let score = EngineOptions { train_lora: false, ..options(GateRule::Score) };
    let mut engine = Engine::new(tiny.weights.clone(), Some(tiny.routers.clone()), None, score).unwrap();
    let ids = sequence(12, 3);
    let prompt = 4;
    // E_z[L(z)] over the 8 plans, exactly: L does not depend on the routers given the plan,
    // except through the regulariser, which the stats include.
    let expected = |e: &mut Engine| every_plan(e, &ids, prompt).iter().map(|(_, s)| plan_probability(s) * s.loss() as f64).sum::<f64>();
    // The estimator's mean: each plan's gradient (drawn by its seed) weighted by its probability.
    let plans = every_plan(&mut engine, &ids, prompt);
    let names: Vec<String> = engine.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names.len(), 3 * 5, "{names:?}");
    let mut mean: Vec<Vec<f64>> = engine.params().iter().map(|p| vec![0.0; p.value.numel()]).collect();
    for (seed, drawn) in &plans {
        let stats = engine.accumulate(&ids, prompt, *seed).unwrap();
        assert_eq!((&stats.gates, stats.ce), (&drawn.gates, drawn.ce), "seed {seed} draws the same plan and loss");
        let weight = plan_probability(&stats);
        for (m, p) in mean.iter_mut().zip(engine.params()) {
            for (mi, g) in m.iter_mut().zip(p.grad.read_f32(&ctx).unwrap()) {
                *mi += weight * g as f64;
            }
        }
        engine.zero_grads();
    }
    for (pi, name) in names.iter().enumerate() {
        let value = engine.params()[pi].value.read_f32(&ctx).unwrap();
        let largest = (0..value.len()).max_by(|&a, &b| mean[pi][a].abs().total_cmp(&mean[pi][b].abs())).unwrap();
        for i in [largest, value.len() - 1] {
            let fd = central_difference(&mut engine, pi, i, value[i], expected);
            let got = mean[pi][i];
            assert!((fd - got).abs() <= 0.03 * fd.abs().max(got.abs()) + 3e-4, "{name}[{i}]: mean gradient {got}, finite differences {fd}");
        }
    }
    // The score gate trains routers alone.
    let joint = EngineOptions { train_lora: true, ..options(GateRule::Score) };
    let err = Engine::new(tiny.weights.clone(), Some(tiny.routers.clone()), Some(&tiny.adapter), joint).unwrap_err();
    assert!(err.to_string().contains("routers alone"), "{err}");
}
