//! `firstrt train` as a user runs it on the test model: a few steps lower the loss on a handful
//! of E2E rows, a seed repeats its loss curve, a resumed run equals an uninterrupted one, the
//! files load in `run`, Ctrl-C saves whole files and resumes exactly, the adapter means the same
//! in Hugging Face PEFT, and bad input is refused with one clear line.
//!
//! The PEFT test runs `scripts/check-peft.py` in the virtual environment that
//! `scripts/setup-peft.sh` makes (scripts/test.sh runs it first).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use firstrt::model::WeightSource;
use firstrt::model::lora::LoraAdapter;
use firstrt::model::routers::{RouterFile, model_identity};
use firstrt::model::weights::GgufWeights;
use firstrt::testdata::{TempDir, cache_dir, data_dir, fixtures_dir, model_path};
use firstrt::train::checkpoint::Checkpoint;

fn firstrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firstrt"))
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("running firstrt");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The first `n` rows of the E2E training file, in a file of their own.
fn rows(dir: &TempDir, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("e2e_nlg/train.jsonl")).unwrap();
    let path = dir.join("rows.jsonl");
    std::fs::write(&path, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path
}

/// `firstrt train -m MODEL --data DATA --out OUT`, to which a test adds the rest.
fn train_on(data: &Path, out: &Path) -> Command {
    let mut cmd = firstrt();
    cmd.arg("train").arg("-m").arg(model_path()).arg("--data").arg(data).arg("--out").arg(out);
    cmd
}

fn train(data: &Path, out: &Path, steps: usize) -> Command {
    let mut cmd = train_on(data, out);
    cmd.arg("--eval").arg(data);
    cmd.args(["--stage", "joint", "--steps", &steps.to_string(), "--batch", "2", "--lr", "1e-2", "--ctx", "48"]);
    cmd.args(["--checkpoint-every", "2", "--eval-every", "2", "--lora-r", "4", "--router-rank", "4", "--seed", "3", "--json"]);
    cmd
}

/// Runs `cmd` and sends it SIGINT, as Ctrl-C does, once its first `--json` step line is out
/// (the handler is installed before step 1); returns (exit status, stdout, stderr).
fn interrupt_after_first_step(cmd: &mut Command) -> (ExitStatus, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting firstrt");
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let (mut stdout, mut sent) = (String::new(), false);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.contains("\"loss\"") {
            let pid = libc::pid_t::try_from(child.id()).unwrap();
            // SAFETY: kill(2) with a live child's pid (not yet waited for) and a valid signal.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0, "kill -INT {pid}");
            sent = true;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().unwrap();
    (status, stdout, stderr.join().unwrap())
}

/// (step, value) pairs of one curve.
type Curve = Vec<(u64, f64)>;

/// (step losses, eval CE by step) from `--json` lines.
fn curves(stdout: &str) -> (Curve, Curve) {
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let step = v["step"].as_u64().unwrap();
        match v.get("eval_ce") {
            Some(ce) => evals.push((step, ce.as_f64().unwrap())),
            None => steps.push((step, v["loss"].as_f64().unwrap())),
        }
    }
    (steps, evals)
}

#[test]
fn training_lowers_the_loss_repeats_for_a_seed_resumes_exactly_and_its_files_load() {
    let dir = TempDir::new("train");
    let data = rows(&dir, 4);
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    let (ok, out_a, err) = output(&mut train(&data, &a, 4));
    assert!(ok, "{err}");
    let (steps_a, evals_a) = curves(&out_a);
    assert_eq!(steps_a.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{out_a}");
    assert_eq!(evals_a.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 2, 4], "{out_a}");
    assert!(evals_a[2].1 < evals_a[0].1, "eval CE did not go down: {evals_a:?}");

    // The same seed gives the same curve.
    let (ok, out_b, err) = output(&mut train(&data, &b, 4));
    assert!(ok, "{err}");
    assert_eq!(curves(&out_b), curves(&out_a));

    // Two steps, then two more with --resume: the same steps and the same files.
    let (ok, out_c1, err) = output(&mut train(&data, &c, 2));
    assert!(ok, "{err}");
    let (ok, out_c2, err) = output(train(&data, &c, 4).arg("--resume"));
    assert!(ok, "{err}");
    assert!(err.contains("resuming"), "{err}");
    let (mut steps_c, _) = curves(&out_c1);
    steps_c.extend(curves(&out_c2).0);
    assert_eq!(steps_c, steps_a);
    // The same routers and adapter (compared as loaded: the files' metadata order may differ).
    let source = GgufWeights::open(&model_path()).unwrap();
    let identity = model_identity(&source).unwrap();
    let routers = |dir: &Path| RouterFile::load(&dir.join("routers.safetensors"), &identity).unwrap();
    assert!(routers(&a) == routers(&c), "routers differ after --resume");
    let adapter = |dir: &Path| LoraAdapter::load(&dir.join("adapter"), source.config()).unwrap().layers;
    assert!(adapter(&a) == adapter(&c), "adapters differ after --resume");

    // Ctrl-C after a step: exit status 1 and one line saying where the checkpoint is; the
    // checkpoint, routers and adapter are whole (they load, no temporary file is left), and
    // `--resume` continues to the same steps and files as the uninterrupted run.
    let d = dir.join("d");
    let (status, out_d1, err) = interrupt_after_first_step(&mut train(&data, &d, 4));
    let ckpt_path = d.join("checkpoint.safetensors");
    let interrupted = err
        .lines()
        .find_map(|l| l.strip_prefix("error: interrupted after step "))
        .and_then(|rest| rest.strip_suffix(&format!(": saved {}; continue with --resume", ckpt_path.display())))
        .unwrap_or_else(|| panic!("no interruption line: {err}"));
    let done: usize = interrupted.parse().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    let (steps_d, _) = curves(&out_d1);
    assert!((1..4).contains(&done) && steps_d == steps_a[..done], "stopped at {done}: {steps_d:?}, uninterrupted {steps_a:?}");
    let mut names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["adapter", "checkpoint.safetensors", "routers.safetensors"]);
    let ckpt = Checkpoint::load(&ckpt_path).unwrap();
    assert_eq!(ckpt.step, done as u64);
    assert_eq!(ckpt.losses.iter().map(|&l| l as f32).collect::<Vec<_>>(), steps_d.iter().map(|s| s.1 as f32).collect::<Vec<_>>());
    routers(&d);
    adapter(&d);
    let (ok, out_d2, err) = output(train(&data, &d, 4).arg("--resume"));
    assert!(ok && err.contains(&format!("resuming {} at step {done}", ckpt_path.display())), "{err}");
    let mut steps_d = steps_d;
    steps_d.extend(curves(&out_d2).0);
    assert_eq!(steps_d, steps_a);
    assert!(routers(&a) == routers(&d), "routers differ after Ctrl-C and --resume");
    assert!(adapter(&a) == adapter(&d), "adapters differ after Ctrl-C and --resume");

    // The trained files load in `run`, which prints the plan the routers chose.
    let (ok, stdout, err) = output(
        firstrt()
            .arg("run")
            .arg("-m")
            .arg(model_path())
            .arg("--routers")
            .arg(a.join("routers.safetensors"))
            .arg("--lora")
            .arg(a.join("adapter"))
            .args(["--chat", "--prompt", "Describe a pub.", "--max-tokens", "4", "--temperature", "0", "--show-plan"]),
    );
    assert!(ok, "{err}");
    assert!(err.contains("plan") || stdout.contains("plan"), "no plan printed: {stdout} {err}");
}

/// The virtual environment's python with torch, transformers and PEFT.
fn peft_python() -> PathBuf {
    let python = std::env::var_os("FIRSTRT_PEFT_PYTHON").map_or_else(|| cache_dir().join("venv-peft/bin/python"), PathBuf::from);
    assert!(python.exists(), "{} is missing: run scripts/setup-peft.sh (scripts/test.sh does) to install PEFT", python.display());
    python
}

/// An adapter that `train` wrote, on all seven projections, gives in PEFT (transformers on the
/// same GGUF weights) the logits that `run --lora` gives, as close as the base model's logits
/// are without an adapter; so does the fixture adapter that PEFT itself wrote.
#[test]
fn a_trained_adapter_means_the_same_in_hugging_face_peft() {
    let dir = TempDir::new("train-peft");
    let data = rows(&dir, 2);
    let out = dir.join("lora");
    let (ok, _, err) = output(train_on(&data, &out).args([
        "--stage",
        "lora",
        "--steps",
        "2",
        "--batch",
        "1",
        "--ctx",
        "48",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    ]));
    assert!(ok, "{err}");
    let (ok, stdout, err) = output(
        Command::new(peft_python())
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check-peft.py"))
            .arg("--firstrt")
            .arg(env!("CARGO_BIN_EXE_firstrt"))
            .arg("--model")
            .arg(model_path())
            .arg(out.join("adapter"))
            .arg(fixtures_dir().join("lora")),
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("check-peft.py printed no JSON ({e}): {stdout}\n{err}"));
    assert!(ok, "check-peft.py found a difference: {report}\n{err}");
    let adapters = report["adapters"].as_array().unwrap();
    assert!(adapters.len() == 2 && adapters.iter().all(|a| a["ok"] == true), "{report}");
}

#[test]
fn bad_training_input_is_one_clear_line() {
    let dir = TempDir::new("train-bad");
    let data = rows(&dir, 2);
    let empty = dir.join("empty_completion.jsonl");
    std::fs::write(&empty, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \"  \"}\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--data".into(), empty.display().to_string(), "--stage".into(), "routers".into()], "empty_completion.jsonl:2"),
        (vec!["--data".into(), data.display().to_string(), "--stage".into(), "lora".into(), "--batch".into(), "0".into()], "--batch"),
        (
            vec!["--data".into(), data.display().to_string(), "--stage".into(), "joint".into(), "--lora-targets".into(), "qq_proj".into()],
            "qq_proj",
        ),
        (
            vec!["--data".into(), data.display().to_string(), "--stage".into(), "routers".into(), "--threshold".into(), "1.5".into()],
            "--threshold",
        ),
        (vec!["--data".into(), data.display().to_string(), "--stage".into(), "lora".into(), "--max-skip".into(), "2".into()], "--max-skip"),
        (
            vec!["--data".into(), data.display().to_string(), "--stage".into(), "joint".into(), "--gate".into(), "score".into()],
            "--gate score",
        ),
    ];
    for (args, want) in cases {
        let out = dir.join("out");
        let (ok, _, err) = output(
            firstrt().arg("train").arg("-m").arg(model_path()).args(["--steps", "1", "--ctx", "48"]).arg("--out").arg(&out).args(&args),
        );
        assert!(!ok && err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!out.join("checkpoint.safetensors").exists(), "{args:?} left a checkpoint");
    }
    // A learning rate that blows the adapter up: the run stops at the first non-finite loss and
    // keeps the last good checkpoint.
    let out = dir.join("nan");
    let (ok, _, err) = output(train_on(&data, &out).args([
        "--stage",
        "lora",
        "--steps",
        "3",
        "--batch",
        "1",
        "--ctx",
        "48",
        "--lr",
        "1e30",
        "--checkpoint-every",
        "1",
    ]));
    assert!(!ok && err.contains("step 2: ") && err.contains("stopping. The last good checkpoint is") && err.contains("(step 1)"), "{err}");
    assert!(out.join("checkpoint.safetensors").is_file());
    // A checkpoint refuses a resumed run with other options, naming what differs.
    let out = dir.join("resume");
    let base = || {
        let mut cmd = train_on(&data, &out);
        cmd.args(["--stage", "routers", "--batch", "1", "--ctx", "48"]);
        cmd
    };
    let (ok, _, err) = output(base().args(["--steps", "1"]));
    assert!(ok, "{err}");
    let (ok, _, err) = output(base().args(["--steps", "1"]));
    assert!(!ok && err.contains("--resume"), "{err}");
    let (ok, _, err) = output(base().args(["--resume", "--lr", "0.5", "--steps", "2"]));
    assert!(!ok && err.contains("lr"), "{err}");
}

/// `--max-skip` and `--min-skip` bound the lora stage's plan exactly as they bound `run`'s: init
/// routers give p = sigmoid(2) ≈ 0.88 everywhere, so at τ 0.99 every routed layer is below the
/// threshold and the budget alone decides how many are skipped.
#[test]
fn the_lora_stage_trains_under_the_skip_budget_run_would_use() {
    let dir = TempDir::new("train-budget");
    let data = rows(&dir, 2);
    let routers = dir.join("init.safetensors");
    let (ok, _, err) = output(firstrt().args(["routers", "init", "-m"]).arg(model_path()).arg("-o").arg(&routers));
    assert!(ok, "{err}");
    for (budget, want) in [(vec!["--max-skip", "2"], 2.0), (vec!["--max-skip", "5", "--min-skip", "5"], 5.0)] {
        let out = dir.join(format!("out{want}"));
        let mut cmd = train_on(&data, &out);
        cmd.arg("--routers").arg(&routers);
        cmd.args(["--stage", "lora", "--steps", "1", "--batch", "1", "--ctx", "48", "--threshold", "0.99", "--json"]).args(&budget);
        let (ok, stdout, err) = output(&mut cmd);
        assert!(ok, "{budget:?}: {err}");
        let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        assert_eq!(line["skipped"].as_f64(), Some(want), "{budget:?}: {stdout}");
    }
    // The budget is checked before anything is trained.
    let out = dir.join("bad");
    let (ok, _, err) = output(train_on(&data, &out).arg("--routers").arg(&routers).args([
        "--stage",
        "lora",
        "--steps",
        "1",
        "--min-skip",
        "4",
        "--max-skip",
        "2",
    ]));
    assert!(!ok && err.contains("--max-skip") && !err.contains("panicked"), "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

/// `--gate score` trains the routers from forward passes alone (the engine's unit test checks its
/// gradient): the routers move, and the file they are saved in routes `run`.
#[test]
fn the_score_gate_trains_routers_that_run_loads() {
    let dir = TempDir::new("train-score");
    let data = rows(&dir, 4);
    let out = dir.join("out");
    let mut cmd = train_on(&data, &out);
    cmd.args(["--stage", "routers", "--gate", "score", "--steps", "2", "--batch", "2", "--lr", "5e-2", "--ctx", "48", "--json"]);
    let (ok, stdout, err) = output(&mut cmd);
    assert!(ok, "{err}");
    let steps: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 2, "{stdout}");
    for s in &steps {
        assert!(s["ce"].as_f64().is_some_and(f64::is_finite) && s["grad_norm"].as_f64().is_some_and(|g| g > 0.0), "{s}");
    }
    let routers = out.join("routers.safetensors");
    let (ok, _, err) = output(firstrt().args(["run", "-m"]).arg(model_path()).arg("--routers").arg(&routers).args([
        "--show-plan",
        "--max-tokens",
        "1",
        "-p",
        "Hi",
    ]));
    assert!(ok && err.contains("layer  14: p = "), "{err}");
    // Init routers give every layer p = sigmoid(2) = 0.881; trained ones no longer do.
    let ps: Vec<&str> = err.lines().filter_map(|l| l.split("p = ").nth(1)).map(|r| &r[..5]).collect();
    assert!(ps.len() >= 28 && ps.iter().any(|p| *p != "0.881"), "{err}");
}
