//! Profiling on the test model: the per-kernel totals agree with the GPU time around the same
//! work and list every kernel family used, the Chrome trace nests and is ordered, no query set
//! exists without a profiler, and `firstrt bench --json` reports its documented fields.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::model;
use firstrt::gpu::DType;
use firstrt::runtime::{LayerPlan, ProfileMode, Profiler, Session, SessionOptions};
use firstrt::testdata::{TempDir, model_path};

/// The query-set count is per device and tests share one: run these one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A 16-token prefill and 3 decode steps under `profiler`; returns it flushed.
fn profiled_run(profiler: Option<Profiler>) -> (Session, Option<Profiler>) {
    let m = model(DType::F32);
    let n = m.weights.config.n_layers;
    let mut s = Session::new(&m.weights, SessionOptions { ctx_len: 32, candidates: 1 }, LayerPlan::full(n)).unwrap();
    s.set_profiler(profiler);
    let ids: Vec<u32> = (1..=16).collect();
    let mut out = s.prefill(&ids).unwrap();
    for _ in 0..3 {
        out = s.decode(out.candidates[0].0).unwrap();
    }
    let mut p = s.set_profiler(None);
    if let Some(p) = &mut p {
        p.flush().unwrap();
    }
    (s, p)
}

fn check_totals(mode: ProfileMode) {
    let ctx = model(DType::F32).weights.ctx.clone();
    let (_, p) = profiled_run(Some(Profiler::with_mode(&ctx, mode).unwrap()));
    let p = p.unwrap();
    assert_eq!(p.lost_frames, 0);
    assert_eq!(p.steps.len(), 4, "one prefill and three decode steps");
    let summary = p.summary();
    assert_eq!(summary.iter().map(|s| s.phase.as_str()).collect::<Vec<_>>(), ["prefill", "decode"]);
    for phase in &summary {
        let table: f64 = phase.families.iter().map(|g| g.total_s).sum();
        assert!((table - phase.kernel_s).abs() <= 1e-9 * phase.kernel_s.max(1.0), "table total = kernel total");
        let ratio = table / phase.gpu_span_s;
        eprintln!(
            "{mode:?} {}: kernels {:.3} ms, around them {:.3} ms, ratio {ratio:.3}",
            phase.phase,
            1e3 * table,
            1e3 * phase.gpu_span_s
        );
        assert!((0.8..=1.2).contains(&ratio), "{mode:?} {}: per-kernel total / GPU span = {ratio}", phase.phase);
        let families: Vec<&str> = phase.families.iter().map(|g| g.name.as_str()).collect();
        let linear = if phase.phase == "prefill" { "matmul" } else { "matvec" };
        for f in ["embedding", "rmsnorm", linear, "rope", "attention", "swiglu", "sample"] {
            assert!(families.contains(&f), "{mode:?} {}: family {f} missing from {families:?}", phase.phase);
        }
        assert!(phase.families.iter().all(|g| g.calls > 0 && g.total_s > 0.0), "{families:?}");
        let layers = phase.layers.iter().filter(|g| g.name.starts_with("layer.")).count();
        assert_eq!(layers, model(DType::F32).weights.config.n_layers);
    }
    let report = p.report();
    assert!(report.contains("== prefill") && report.contains("== decode") && report.contains("GFLOP/s"), "{report}");
}

#[test]
fn kernel_totals_match_the_gpu_time_around_them_inside_passes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    check_totals(ProfileMode::InsidePasses);
}

#[test]
fn kernel_totals_match_the_gpu_time_around_them_pass_per_dispatch() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    check_totals(ProfileMode::PassPerDispatch);
}

#[test]
fn no_query_set_without_a_profiler() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = model(DType::F32).weights.ctx.clone();
    ctx.wait().unwrap();
    let before = ctx.query_sets_alive();
    let (s, p) = profiled_run(None);
    assert!(p.is_none() && s.profiler().is_none());
    assert!(ctx.query_sets_alive() <= before, "query sets went from {before} to {}", ctx.query_sets_alive());
    // The counter does count: a profiled run holds query sets while its profiler lives.
    let (_, p) = profiled_run(Some(Profiler::new(&ctx).unwrap()));
    assert!(ctx.query_sets_alive() > before, "a profiler's query sets are counted");
    drop(p);
}

#[test]
fn trace_is_json_whose_spans_nest_in_time_order() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("trace");
    let path = dir.join("trace.json");
    let out = Command::new(env!("CARGO_BIN_EXE_firstrt"))
        .arg("run")
        .arg("--model")
        .arg(model_path())
        .args(["--prompt-ids", "1,2,3,4,5,6,7,8", "--temperature", "0", "--max-tokens", "4", "--trace"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let spans: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let mut names = std::collections::HashSet::new();
    for tid in [1, 2] {
        let track: Vec<(f64, f64, &str)> = spans
            .iter()
            .filter(|e| e["tid"] == tid)
            .map(|e| (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap(), e["name"].as_str().unwrap()))
            .collect();
        assert!(!track.is_empty(), "track {tid} is empty");
        let mut open: Vec<(f64, &str)> = Vec::new(); // ends of the enclosing spans
        let mut last_ts = f64::NEG_INFINITY;
        for &(ts, dur, name) in &track {
            names.insert(name.to_string());
            assert!(dur >= 0.0 && ts >= last_ts, "track {tid}: {name} at {ts} after {last_ts}");
            last_ts = ts;
            let eps = 1e-3; // us
            while open.last().is_some_and(|&(end, _)| end <= ts + eps) {
                open.pop();
            }
            if let Some(&(end, parent)) = open.last() {
                assert!(ts + dur <= end + eps, "track {tid}: {name} [{ts}, {}] overlaps the end of {parent} at {end}", ts + dur);
            }
            open.push((ts + dur, name));
        }
    }
    for n in ["prefill", "decode", "encode", "submit", "wait", "sample", "detokenise", "decode/lm_head", "prefill/layer.0"] {
        assert!(names.contains(n), "span {n} missing");
    }
}

#[test]
fn bench_json_has_the_documented_fields() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_firstrt"))
        .arg("bench")
        .arg("--model")
        .arg(model_path())
        .args(["--json", "--repeat", "2", "--prompt-len", "16", "--gen", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("one JSON object");
    assert_eq!(v["prompt_len"], 16);
    assert_eq!(v["gen"], 4);
    assert_eq!(v["repeat"], 2);
    assert_eq!(v["layers_run"], 30);
    for key in ["prefill_tok_s", "decode_tok_s", "ms_per_token", "ttft_ms"] {
        let s = &v[key];
        let (med, min, max) = (s["median"].as_f64().unwrap(), s["min"].as_f64().unwrap(), s["max"].as_f64().unwrap());
        assert!(min > 0.0 && min <= med && med <= max, "{key}: {s}");
    }
    let mem = &v["memory"];
    let (peak, weights, kv) =
        (mem["peak_gpu_bytes"].as_u64().unwrap(), mem["weights_bytes"].as_u64().unwrap(), mem["kv_bytes"].as_u64().unwrap());
    // KV: 30 layers x K and V x 21 rows (16 + 4 + 1) x 192 (3 kv heads x 64) x 4 bytes.
    assert_eq!(kv, 30 * 2 * 21 * 192 * 4);
    assert!(peak >= weights + kv, "peak {peak} < weights {weights} + kv {kv}");
    assert_eq!(v["profiled"], false);
    assert!(v["profile"].is_null());
    assert!(v["adapter"].is_string() && v["dtype"] == "f32");
}
