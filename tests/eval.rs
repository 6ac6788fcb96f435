//! `firstrt eval` as a user runs it, and the teacher-forced log-likelihood it computes.

mod common;

use std::process::Command;

use firstrt::eval::data::{TaskExample, load_task};
use firstrt::eval::rouge::rouge;
use firstrt::eval::run::{EvalConfig, ScoreMode, evaluate_example, negative_log_likelihood, prompt_ids};
use firstrt::gpu::DType;
use firstrt::runtime::{LayerPlan, PlanChoice, Session, SessionOptions};
use firstrt::testdata::{TempDir, data_dir, model_path};

fn firstrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firstrt"))
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("running firstrt");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn eval_cmd(data: &std::path::Path) -> Command {
    let mut cmd = firstrt();
    cmd.arg("eval").arg("-m").arg(model_path()).arg("--data").arg(data);
    cmd
}

#[test]
fn eval_greedy_outputs_equal_run_chat_and_files_are_written() {
    let data = data_dir().join("e2e_nlg/test.jsonl");
    let dir = TempDir::new("eval-cli");
    let out_dir = dir.join("out");
    let (ok, stdout, stderr) =
        output(eval_cmd(&data).args(["--limit", "3", "--max-tokens", "12", "--skip-layers", "14,13", "--json", "--out"]).arg(&out_dir));
    assert!(ok, "{stderr}");
    let results: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    let configs = results["configurations"].as_array().unwrap();
    assert_eq!(configs.iter().map(|c| c["label"].as_str().unwrap()).collect::<Vec<_>>(), ["full", "skip 13,14"]);
    assert_eq!(configs[1]["layers_skipped"]["mean"], 2.0);
    let examples = load_task(&data).unwrap();
    for (i, example) in examples.iter().take(3).enumerate() {
        // the same prompt through `run --chat`, greedy, the same budget
        let (ok, run_out, run_err) = output(firstrt().arg("run").arg("-m").arg(model_path()).args([
            "--chat",
            "-p",
            &example.prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
        ]));
        assert!(ok, "{run_err}");
        let run: serde_json::Value = serde_json::from_str(run_out.trim()).unwrap();
        let got = &configs[0]["per_example"][i];
        assert_eq!(got["id"], example.id.as_str());
        assert_eq!(got["text"], run["text"], "example {}", example.id);
        assert_eq!(got["tokens"], serde_json::json!(run["generated_ids"].as_array().unwrap().len()));
        let text = got["text"].as_str().unwrap();
        let want = rouge(text, &example.references, true);
        assert!((got["scores"]["rougeLsum"].as_f64().unwrap() - want.rouge_lsum).abs() < 1e-12);
        assert!((got["scores"]["rouge1"].as_f64().unwrap() - want.rouge1).abs() < 1e-12);
        assert_eq!(configs[1]["per_example"][i]["skipped_layers"], serde_json::json!([13, 14]));
    }
    let summary = &configs[0]["metrics"]["rougeLsum"];
    let (mean, low, high) = (summary["mean"].as_f64().unwrap(), summary["ci95"][0].as_f64().unwrap(), summary["ci95"][1].as_f64().unwrap());
    assert!(low <= mean && mean <= high, "{summary}");
    assert!(configs[0]["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(written, results);
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(md.contains("| skip 13,14 | 2.0 [2–2] |"), "{md}");
    assert!(std::fs::read_to_string(out_dir.join("plot.svg")).unwrap().contains("skip 13,14"));
    assert_eq!(&std::fs::read(out_dir.join("plot.png")).unwrap()[..4], b"\x89PNG");
    // nothing else (no temporary file) is left in the folder
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 4);
}

#[test]
fn bad_eval_input_is_one_clear_line_and_nothing_is_written() {
    let dir = TempDir::new("eval-bad");
    let out_dir = dir.join("out");
    let good = "{\"id\": \"a\", \"prompt\": \"Say hi.\", \"references\": [\"Hi.\"]}\n";
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        ("broken.jsonl", format!("{good}{{\"prompt\": \"x\"\n"), vec![], "broken.jsonl:2: not a JSON object"),
        ("noprompt.jsonl", format!("{good}{good}{{\"references\": [\"x\"]}}\n"), vec![], "noprompt.jsonl:3: the row has no \"prompt\""),
        ("norefs.jsonl", "{\"prompt\": \"x\"}\n".into(), vec![], "norefs.jsonl:1: the row has neither \"references\" nor \"completion\""),
        ("empty.jsonl", "\n".into(), vec![], "empty.jsonl: the file has no examples"),
        (
            "ok.jsonl",
            good.into(),
            vec!["--routers", "r.safetensors", "--thresholds", "0.5,1.5"],
            "--thresholds 1.5 is outside the allowed range 0..=1",
        ),
        ("ok.jsonl", good.into(), vec!["--limit", "0"], "--limit 0"),
        ("ok.jsonl", good.into(), vec!["--skip-layers", "30"], "--skip-layers 30: the model has 30 layers"),
        ("ok.jsonl", good.into(), vec!["--routers", "missing.safetensors"], "missing.safetensors"),
        ("ok.jsonl", good.into(), vec!["--static-skip", "29", "--calibration", "ok.jsonl"], "--static-skip 29 is more than the 28 layers"),
        ("ok.jsonl", good.into(), vec!["--static-skip", "2", "--calibration", "missing.jsonl"], "missing.jsonl"),
        ("ok.jsonl", good.into(), vec!["--static-skip", "2", "--calibration", "empty.jsonl"], "empty.jsonl: the file has no examples"),
        ("ok.jsonl", good.into(), vec!["--no-full"], "--no-full: no other plan"),
    ];
    for (name, text, flags, want) in cases {
        let data = dir.join(name);
        std::fs::write(&data, text).unwrap();
        let (ok, _, stderr) = output(eval_cmd(&data).current_dir(&dir.path).args(&flags).arg("--out").arg(&out_dir));
        assert!(!ok, "{name} {flags:?} should fail");
        assert!(stderr.contains(want), "{name} {flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "one error line: {stderr}");
        assert!(!out_dir.exists(), "{name} {flags:?} left {}", out_dir.display());
    }
    // --out naming a file
    let data = dir.join("ok.jsonl");
    let (ok, _, stderr) = output(eval_cmd(&data).arg("--out").arg(&data));
    assert!(!ok && stderr.contains("exists and is not a folder"), "{stderr}");
    let (ok, _, stderr) = output(eval_cmd(&data).arg("--out").arg(dir.join("no/such/dir")));
    assert!(!ok && stderr.contains("its folder does not exist"), "{stderr}");
}

/// The reference's tokens as `(prompt ++ reference)` prefilled at once predicts them, one
/// prefill per prefix: the definition that teacher forcing through decode steps must match.
fn nll_by_prefill(model: &firstrt::runtime::LoadedModel, prompt: &[u32], reference: &[u32]) -> f64 {
    let mut total = 0.0;
    for k in 0..reference.len() {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(&reference[..k]);
        let mut s = Session::new(&model.weights, SessionOptions { ctx_len: 256, candidates: 1 }, LayerPlan::full(30)).unwrap();
        s.prefill(&ids).unwrap();
        total += negative_log_likelihood(&s.read_logits().unwrap(), reference[k]);
    }
    total / reference.len() as f64
}

#[test]
fn teacher_forced_log_likelihood_matches_prefill_and_rewinds() {
    let model = common::model(DType::F32);
    let reference = "The Eagle is a cheap coffee shop.".to_string();
    let example = TaskExample { id: "x".into(), prompt: "Describe the Eagle.".into(), references: vec![reference.clone()], line: 1 };
    let config = EvalConfig { label: "full".into(), plan: PlanChoice::Static(LayerPlan::full(30)), lora: None };
    let one = evaluate_example(&model, &config, &example, ScoreMode::LogLik, 256).unwrap();
    let prompt = prompt_ids(&model, &example).unwrap();
    let ref_ids = model.text_ids(&reference).unwrap();
    let want = nll_by_prefill(&model, &prompt, &ref_ids);
    assert!((one.scores[0] - want).abs() < 2e-3, "decode {} vs prefill {want}", one.scores[0]);
    assert_eq!((one.tokens, one.decode_steps), (ref_ids.len(), ref_ids.len() - 1));
    // a second, different reference before it: the session rewinds to the prompt each time
    let two = TaskExample { references: vec!["Nothing at all here, really.".into(), reference], ..example.clone() };
    let r = evaluate_example(&model, &config, &two, ScoreMode::LogLik, 256).unwrap();
    let first =
        evaluate_example(&model, &config, &TaskExample { references: vec![two.references[0].clone()], ..example }, ScoreMode::LogLik, 256)
            .unwrap();
    assert!(
        (r.scores[0] - (first.scores[0] + one.scores[0]) / 2.0).abs() < 1e-4,
        "{} vs {} {}",
        r.scores[0],
        first.scores[0],
        one.scores[0]
    );
}

/// A `results.json` with one configuration per (label, skipped, decode ms, ROUGE-Lsum).
fn results_json(configs: &[(&str, f64, f64, f64)]) -> String {
    let configs: Vec<serde_json::Value> = configs
        .iter()
        .map(|&(label, skipped, ms, score)| {
            serde_json::json!({
                "label": label, "examples": 46, "tokens": 900, "prefill_ms": 800.0, "decode_ms_per_token": ms,
                "decode_probed": false, "layers_skipped": {"mean": skipped, "min": 0, "max": 4},
                "metrics": {"rougeLsum": {"mean": score, "ci95": [score - 0.02, score + 0.02]}},
            })
        })
        .collect();
    serde_json::json!({ "configurations": configs }).to_string()
}

#[test]
fn eval_merge_puts_several_runs_in_one_table_and_plot() {
    let dir = TempDir::new("eval-merge");
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    std::fs::write(&a, results_json(&[("full", 0.0, 55.0, 0.341), ("routers 0.5", 2.0, 50.0, 0.30)])).unwrap();
    std::fs::write(&b, results_json(&[("routers 0.5 + lora", 2.0, 51.0, 0.33)])).unwrap();
    let out = dir.join("merged");
    let (ok, stdout, err) = output(
        firstrt()
            .arg("eval-merge")
            .arg("--out")
            .arg(&out)
            .arg(format!("base={}", a.display()))
            .arg(format!("FiRST + LoRA={}", b.display())),
    );
    assert!(ok, "{err}");
    for row in ["| base: full | 0.0 [0–4] |", "| base: routers 0.5 | 2.0 [0–4] |", "| FiRST + LoRA | 2.0 [0–4] |"] {
        assert!(stdout.contains(row), "no row {row:?} in\n{stdout}");
    }
    for file in ["results.md", "plot.svg", "plot.png"] {
        assert!(out.join(file).is_file(), "{file} not written");
    }
    // --only keeps the configurations named; a missing file and a bad field are one clear line.
    let (ok, stdout, _) = output(firstrt().arg("eval-merge").args(["--only", "full"]).arg(&a));
    assert!(ok && stdout.contains("| full |") && !stdout.contains("routers"), "{stdout}");
    let (ok, _, err) = output(firstrt().arg("eval-merge").arg(dir.join("none.json")));
    assert!(!ok && err.contains("none.json") && !err.contains("panicked"), "{err}");
    std::fs::write(&b, results_json(&[("x", 1.0, 50.0, 0.3)]).replace("\"examples\":46", "\"examples\":\"many\"")).unwrap();
    let (ok, _, err) = output(firstrt().arg("eval-merge").arg(&b));
    assert!(!ok && err.contains("b.json") && err.contains("examples"), "{err}");
}

#[test]
fn no_full_and_lora_only_evaluate_just_the_plans_asked_for() {
    use firstrt::model::WeightSource;
    use firstrt::model::lora::{LoraAdapter, LoraConfig, LoraDims, Projection};
    let dir = TempDir::new("eval-lora-only");
    let data = dir.join("rows.jsonl");
    std::fs::write(&data, "{\"id\": \"a\", \"prompt\": \"Say hi.\", \"references\": [\"Hi.\"]}\n").unwrap();
    let source = firstrt::model::weights::GgufWeights::open(&model_path()).unwrap();
    let config = LoraConfig { rank: 2, alpha: 4.0, use_rslora: false, targets: vec![Projection::Q, Projection::V] };
    LoraAdapter::init(config, LoraDims::of(source.config()), 1).unwrap().save(&dir.join("adapter"), None).unwrap();
    let (ok, stdout, err) = output(
        eval_cmd(&data)
            .args(["--max-tokens", "4", "--skip-layers", "14", "--no-full", "--lora-only", "--json", "--lora"])
            .arg(dir.join("adapter")),
    );
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let labels: Vec<&str> = json["configurations"].as_array().unwrap().iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["skip 14 + lora"]);
}

/// `eval --routers --max-skip/--min-skip` evaluates each threshold under that budget, says so in
/// its label, records it in results.json, and skips exactly that many layers where the budget
/// decides (init routers: p ≈ 0.88 everywhere, below τ 0.99).
#[test]
fn eval_bounds_the_routers_plans_by_the_skip_budget() {
    let dir = TempDir::new("eval-budget");
    let data = dir.join("rows.jsonl");
    std::fs::write(&data, "{\"id\": \"a\", \"prompt\": \"Say hi.\", \"references\": [\"Hi.\"]}\n").unwrap();
    let routers = dir.join("init.safetensors");
    let (ok, _, err) = output(firstrt().args(["routers", "init", "-m"]).arg(model_path()).arg("-o").arg(&routers));
    assert!(ok, "{err}");
    let (ok, stdout, err) = output(
        eval_cmd(&data)
            .args([
                "--max-tokens",
                "2",
                "--no-full",
                "--json",
                "--thresholds",
                "0.99,0.5",
                "--max-skip",
                "3",
                "--min-skip",
                "1",
                "--routers",
            ])
            .arg(&routers),
    );
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let configs = json["configurations"].as_array().unwrap();
    let got: Vec<(&str, f64, u64, u64)> = configs
        .iter()
        .map(|c| {
            let plan = &c["plan"];
            (
                c["label"].as_str().unwrap(),
                c["layers_skipped"]["mean"].as_f64().unwrap(),
                plan["max_skip"].as_u64().unwrap(),
                plan["min_skip"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("routers 0.99 skip≥1 skip≤3", 3.0, 3, 1), ("routers 0.5 skip≥1 skip≤3", 1.0, 3, 1)]);
}
