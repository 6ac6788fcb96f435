//! Profiling on the test model: every dispatch is timed once, the spans nest in order, the
//! tables add up to the kernel total and list every kernel family used, the Chrome trace nests
//! and is ordered, no query set exists without a profiler, and `firstrt bench --json` reports
//! its documented fields. Nothing here depends on how fast the machine is at the time: figures
//! that do (the kernel time over the GPU span) are printed, not checked.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::model;
use firstrt::gpu::DType;
use firstrt::kernels::choice::matvec_variant;
use firstrt::kernels::matvec::MatvecVariant;
use firstrt::runtime::{LayerPlan, ProfileMode, Profiler, Session, SessionOptions};
use firstrt::testdata::{TempDir, model_path};

/// The query-set count is per device and tests share one: run these one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A 16-token prefill and 3 decode steps under `profiler`; returns the session, the profiler
/// flushed, and how many dispatches the prefill recorded.
fn profiled_run(profiler: Option<Profiler>) -> (Session, Option<Profiler>, usize) {
    let m = model(DType::F32);
    let n = m.weights.config.n_layers;
    let mut s = Session::new(&m.weights, SessionOptions { ctx_len: 32, candidates: 1 }, LayerPlan::full(n)).unwrap();
    s.set_profiler(profiler);
    let ids: Vec<u32> = (1..=16).collect();
    let mut out = s.prefill(&ids).unwrap();
    let prefill_dispatches = s.last_dispatch_count;
    for _ in 0..3 {
        out = s.decode(out.candidates[0].0).unwrap();
    }
    let mut p = s.set_profiler(None);
    if let Some(p) = &mut p {
        p.flush().unwrap();
    }
    (s, p, prefill_dispatches)
}

/// Slack for comparing GPU clock readings, seconds: float rounding only (no timing noise).
const CLOCK_EPS: f64 = 1e-9;

/// What must hold whatever the timing (the machine's load moves the figures, never these):
/// every dispatch timed exactly once, each kernel span inside its step's GPU span and the steps
/// in order on the GPU clock, the tables per family, operation and layer adding up to the kernel
/// total, and every figure finite and >= 0. The ratio of kernel time to GPU span is printed,
/// not checked: gaps between dispatches (and between passes, in PassPerDispatch mode) vary run
/// to run; `--profile` prints it too.
fn check_profile(mode: ProfileMode) {
    let ctx = model(DType::F32).weights.ctx.clone();
    let (session, p, prefill_dispatches) = profiled_run(Some(Profiler::with_mode(&ctx, mode).unwrap()));
    let p = p.unwrap();
    assert_eq!(p.lost_frames, 0);
    assert_eq!(p.steps.len(), 4, "one prefill and three decode steps");
    assert_eq!(p.steps.iter().map(|s| s.phase.as_str()).collect::<Vec<_>>(), ["prefill", "decode", "decode", "decode"]);

    // Every dispatch timed exactly once: a decode step's kernels are its program's dispatches,
    // in order; the prefill's are as many as it recorded, each label once.
    let decode: Vec<&str> = session.decode_labels().expect("decode ran");
    let step_labels = |i: usize| p.kernels.iter().filter(|k| k.step == i).map(|k| k.label.as_str()).collect::<Vec<_>>();
    for i in 1..4 {
        assert_eq!(step_labels(i), decode, "{mode:?}: decode step {i} timed every dispatch once, in order");
    }
    let prefill = step_labels(0);
    assert_eq!(prefill.len(), prefill_dispatches, "{mode:?}: prefill dispatches timed");
    let mut unique = prefill.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), prefill.len(), "{mode:?}: a prefill dispatch was timed twice: {prefill:?}");
    assert!(prefill.iter().all(|l| l.starts_with("prefill/")), "{mode:?}: {prefill:?}");
    assert_eq!(p.kernels.len(), prefill_dispatches + 3 * decode.len());

    // Spans nested and ordered on the GPU clock, every figure finite and >= 0.
    let mut previous_end = f64::NEG_INFINITY;
    for (i, s) in p.steps.iter().enumerate() {
        assert!(s.resolved, "step {i} was read back");
        for v in [s.host_start_s, s.submit_host_s, s.gpu_span_s, s.kernel_s, s.gpu_start_s] {
            assert!(v.is_finite() && v >= 0.0, "{mode:?}: step {i}: {s:?}");
        }
        assert!(s.submit_host_s >= s.host_start_s, "{mode:?}: step {i} submitted before it began encoding: {s:?}");
        assert!(s.gpu_span_s > 0.0, "{mode:?}: step {i} took no GPU time: {s:?}");
        let end = s.gpu_start_s + s.gpu_span_s;
        assert!(
            s.gpu_start_s >= previous_end - CLOCK_EPS,
            "{mode:?}: step {i} starts at {} before the previous ends at {previous_end}",
            s.gpu_start_s
        );
        previous_end = end;
        let kernels: Vec<_> = p.kernels.iter().filter(|k| k.step == i).collect();
        for k in &kernels {
            assert!(k.start_s.is_finite() && k.end_s.is_finite() && k.end_s >= k.start_s, "{mode:?}: {k:?}");
            assert!(
                k.start_s >= s.gpu_start_s - CLOCK_EPS && k.end_s <= end + CLOCK_EPS,
                "{mode:?}: {} [{}, {}] outside its step [{}, {end}]",
                k.label,
                k.start_s,
                k.end_s,
                s.gpu_start_s
            );
        }
        let sum: f64 = kernels.iter().map(|k| k.seconds()).sum();
        assert!((sum - s.kernel_s).abs() <= 1e-9 * s.kernel_s.max(1.0), "{mode:?}: step {i} kernel_s {} != sum {sum}", s.kernel_s);
    }

    // The tables add up: per family, per operation and per layer, the same calls and time.
    let summary = p.summary();
    assert_eq!(summary.iter().map(|s| s.phase.as_str()).collect::<Vec<_>>(), ["prefill", "decode"]);
    let n_layers = model(DType::F32).weights.config.n_layers;
    for phase in &summary {
        let steps: Vec<_> = p.steps.iter().filter(|s| s.phase == phase.phase).collect();
        assert_eq!(phase.steps, steps.len());
        let kernel_s: f64 = steps.iter().map(|s| s.kernel_s).sum();
        let span_s: f64 = steps.iter().map(|s| s.gpu_span_s).sum();
        assert!((phase.kernel_s - kernel_s).abs() <= 1e-9 * kernel_s.max(1.0), "{mode:?} {}: kernel total", phase.phase);
        assert!((phase.gpu_span_s - span_s).abs() <= 1e-9 * span_s.max(1.0), "{mode:?} {}: span total", phase.phase);
        let calls = p.kernels.iter().filter(|k| p.steps[k.step].phase == phase.phase).count();
        for (title, rows) in [("family", &phase.families), ("operation", &phase.ops), ("layer", &phase.layers)] {
            let table: f64 = rows.iter().map(|g| g.total_s).sum();
            assert!(
                (table - phase.kernel_s).abs() <= 1e-9 * phase.kernel_s.max(1.0),
                "{mode:?} {}: per-{title} total {table} != kernel total {}",
                phase.phase,
                phase.kernel_s
            );
            assert_eq!(rows.iter().map(|g| g.calls).sum::<usize>(), calls, "{mode:?} {}: per-{title} calls", phase.phase);
            for g in rows.iter() {
                for v in [g.total_s, g.gb_s(), g.gflop_s()] {
                    assert!(v.is_finite() && v >= 0.0, "{mode:?} {}: {g:?}", phase.phase);
                }
            }
        }
        eprintln!(
            "{mode:?} {}: kernels {:.3} ms, around them {:.3} ms, ratio {:.3} (printed, not checked)",
            phase.phase,
            1e3 * phase.kernel_s,
            1e3 * phase.gpu_span_s,
            phase.kernel_s / phase.gpu_span_s
        );
        let families: Vec<&str> = phase.families.iter().map(|g| g.name.as_str()).collect();
        // The GEMV's shader family: `matvec_windows` where the adapter's variant is `windows`
        // (which reads this f32 model's products through windows), else `matvec`.
        let linear = if phase.phase == "prefill" {
            "matmul"
        } else if matvec_variant(&ctx) == MatvecVariant::Windows {
            "matvec_windows"
        } else {
            "matvec"
        };
        // Decode through the rows or windows GEMV runs RoPE as qkv's epilogue and SwiGLU as gate_up's: no
        // rope or swiglu dispatch.
        let fused = phase.phase == "decode" && matches!(matvec_variant(&ctx), MatvecVariant::Rows | MatvecVariant::Windows);
        for f in ["embedding", "rmsnorm", linear, "rope", "attention", "swiglu", "sample"] {
            if fused && (f == "swiglu" || f == "rope") {
                assert!(!families.contains(&f), "{mode:?} decode: an epilogue left a {f} dispatch: {families:?}");
                assert!(phase.ops.iter().all(|g| g.name != "mlp.act" && g.name != "attn.rope"), "{mode:?} decode: {:?}", phase.ops);
                continue;
            }
            assert!(families.contains(&f), "{mode:?} {}: family {f} missing from {families:?}", phase.phase);
        }
        assert!(phase.families.iter().all(|g| g.calls > 0 && g.total_s > 0.0), "{families:?}");
        let layers = phase.layers.iter().filter(|g| g.name.starts_with("layer.")).count();
        assert_eq!(layers, n_layers);
    }
    let report = p.report();
    assert!(report.contains("== prefill") && report.contains("== decode") && report.contains("GFLOP/s"), "{report}");
}

#[test]
fn profile_times_every_dispatch_once_inside_passes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    check_profile(ProfileMode::InsidePasses);
}

#[test]
fn profile_times_every_dispatch_once_pass_per_dispatch() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    check_profile(ProfileMode::PassPerDispatch);
}

#[test]
fn no_query_set_without_a_profiler() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = model(DType::F32).weights.ctx.clone();
    ctx.wait().unwrap();
    let before = ctx.query_sets_alive();
    let (s, p, _) = profiled_run(None);
    assert!(p.is_none() && s.profiler().is_none());
    assert!(ctx.query_sets_alive() <= before, "query sets went from {before} to {}", ctx.query_sets_alive());
    // The counter does count: a profiled run holds query sets while its profiler lives.
    let (_, p, _) = profiled_run(Some(Profiler::new(&ctx).unwrap()));
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
    // A quantised GGUF (the test model's Q4_1 layers) loads `native` by default.
    assert!(v["adapter"].is_string() && v["dtype"] == "native", "{}", v["dtype"]);
}
