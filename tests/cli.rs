//! The `firstrt` binary as a user runs it: tokenize, run with --prompt-ids/--json/--logits-out,
//! streaming with --chat, inspect, and clear one-line errors for bad input.

mod common;

use std::process::Command;

use common::{cases, fixture_tensor};
use firstrt::kernels::testing::max_abs_diff;
use firstrt::testdata::{TempDir, fixtures_dir, model_path};

fn firstrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_firstrt"))
}

fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("running firstrt");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "firstrt failed: {stderr}");
    (stdout, stderr)
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running firstrt");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "firstrt should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "a panic reached the user: {stderr}");
    stderr
}

#[test]
fn tokenize_json_matches_transformers() {
    let text = std::fs::read_to_string(fixtures_dir().join("tokenizer_cases.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for case in cases.iter().take(6) {
        let text = case["text"].as_str().unwrap();
        let (stdout, _) = run_ok(firstrt().args(["tokenize", "--json", "--text", text]).arg("--model").arg(model_path()));
        let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["ids"], case["ids"], "tokenize {text:?}");
    }
}

#[test]
fn run_prompt_ids_json_and_logits_out() {
    let case = cases().into_iter().find(|c| c.name == "one_token_raw").unwrap();
    let dir = TempDir::new("cli-logits");
    let logits_path = dir.join("logits.safetensors");
    let ids = case.prompt_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let (stdout, stderr) = run_ok(
        firstrt()
            .arg("run")
            .arg("--model")
            .arg(model_path())
            .args(["--prompt-ids", &ids, "--temperature", "0", "--max-tokens", "8", "--json", "--logits-out"])
            .arg(&logits_path),
    );
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    assert_eq!(out["prompt_ids"], serde_json::json!(case.prompt_ids));
    let generated: Vec<u32> = serde_json::from_value(out["generated_ids"].clone()).unwrap();
    assert_eq!(generated, case.greedy_ids[..8]);
    assert!(out["text"].is_string() && out["timings"]["decode_tok_s"].is_number());
    assert!(stderr.contains("decode:"), "timing summary on stderr: {stderr}");

    let bytes = std::fs::read(&logits_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[49152]);
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
    let (_, want) = fixture_tensor(&case.logits_key);
    assert!(max_abs_diff(&got, &want) < 1e-3);
}

#[test]
fn run_chat_streams_text_to_stdout_only() {
    let (stdout, stderr) = run_ok(firstrt().arg("run").arg("--model").arg(model_path()).args([
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ]));
    assert!(stdout.contains("Paris"), "answer: {stdout}");
    assert!(!stdout.contains("prefill:"), "timings must go to stderr");
    assert!(stderr.contains("prefill:"));
}

/// Issue 10 §5: the first run on an adapter (no kernel choice cached, no pipeline recorded as
/// compiled) says so once on stderr while it prepares its kernels; a later run says nothing of
/// it. Both report their prefill and decode timings.
#[test]
fn only_the_first_run_on_an_adapter_announces_its_preparation() {
    let cache = TempDir::new("cli-first-run");
    let run = || {
        let (stdout, stderr) =
            run_ok(
                firstrt()
                    .env("FIRSTRT_CACHE", &cache.path)
                    .env_remove("FIRSTRT_KERNEL")
                    .arg("run")
                    .arg("--model")
                    .arg(model_path())
                    .args(["--prompt-ids", "1,2,3", "--temperature", "0", "--max-tokens", "3", "--json"]),
            );
        let out: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
        let t = &out["timings"];
        assert!(t["prefill_s"].as_f64().is_some_and(|s| s > 0.0) && t["decode_s"].as_f64().is_some_and(|s| s > 0.0), "{t}");
        stderr
    };
    let first = run();
    assert_eq!(first.matches("firstrt: first run on").count(), 1, "one notice: {first}");
    // How long it may take: a CPU driver such as lavapipe (where the tests run) needs a minute.
    let cpu_driver = first.contains("llvmpipe");
    assert!(first.contains(if cpu_driver { "up to a minute on a CPU driver" } else { "a few seconds" }), "{first}");
    assert!(cache.join("compiled-pipelines.json").is_file(), "the compiled pipelines are recorded");
    let later = run();
    assert!(!later.contains("first run on"), "a later run is quiet: {later}");
}

#[test]
fn stop_string_ends_generation_before_it() {
    let (stdout, _) = run_ok(
        firstrt()
            .arg("run")
            .arg("--model")
            .arg(model_path())
            .args(["--chat", "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24"])
            .args(["--stop", "Paris"]),
    );
    assert!(!stdout.contains("Paris"), "the stop string and what follows are not printed: {stdout}");
}

#[test]
fn inspect_reports_the_model() {
    let (stdout, _) = run_ok(firstrt().arg("inspect").arg("--model").arg(model_path()));
    assert!(stdout.contains("layers:       30"), "{stdout}");
    assert!(stdout.contains("vocab:        49152"), "{stdout}");
    assert!(stdout.contains("Q4_1"), "{stdout}");
    // Issue 11: the default dtype and the weights' memory per possible --dtype.
    assert!(stdout.contains("default dtype: native"), "{stdout}");
    for dtype in ["f32", "f16", "native", "q8_0", "q4_0"] {
        assert!(stdout.contains(&format!("GPU memory ({dtype}): weights")), "{dtype}: {stdout}");
    }
    assert!(!stdout.contains("GPU memory (q4_k)"), "{stdout}");
}

/// Issue 11: `bench --json` says how the weights are stored; a block type that cannot be made at
/// load is a one-line error naming the tensor.
#[test]
fn quantised_weights_from_the_cli() {
    let (stdout, _) = run_ok(firstrt().arg("bench").arg("--model").arg(model_path()).args([
        "--prompt-len",
        "4",
        "--gen",
        "2",
        "--repeat",
        "1",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["dtype"], "native", "{stdout}");
    assert_eq!(v["weights"]["formats"], "q4_1 x120, q8_0 x1", "{stdout}");
    let bits = v["weights"]["bits_per_weight"].as_f64().unwrap();
    assert!((5.0..6.5).contains(&bits), "{bits} bits per weight");
    let err = run_err(firstrt().arg("run").arg("--model").arg(model_path()).args(["--dtype", "q4_k", "-p", "hi"]));
    assert!(err.contains("model.embed_tokens.weight") && err.contains("q4_k") && err.contains("--dtype native"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let ids = vec!["1"; 40].join(",");
    let err = run_err(firstrt().arg("run").arg("--model").arg(model_path()).args(["--prompt-ids", &ids, "--ctx", "16"]));
    assert!(err.contains("40 tokens") && err.contains("16"), "{err}");
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = TempDir::new("cli-bad-model");
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_err(firstrt().arg("run").arg("--model").arg(&truncated).args(["--prompt", "hi"]));
    assert!(err.contains("truncated.gguf"), "{err}");

    let missing = dir.join("nope.gguf");
    let err = run_err(firstrt().arg("inspect").arg("--model").arg(&missing));
    assert!(err.contains("nope.gguf"), "{err}");

    let err = run_err(firstrt().arg("run").arg("--model").arg(model_path()).args(["--prompt-ids", "99999999"]));
    assert!(err.contains("99999999"), "{err}");
}

/// `--lora` in both modes and with a skip mask gives the fixture's greedy ids; a bad adapter is
/// one line naming the problem.
#[test]
fn run_with_lora_both_modes() {
    let case = cases().into_iter().find(|c| c.name == "lora_raw_skip_12_13_14").unwrap();
    let ids = case.prompt_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let skip = case.skip_layers.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let lora = fixtures_dir().join("lora");
    for mode in ["merged", "unmerged"] {
        let (stdout, _) = run_ok(
            firstrt()
                .arg("run")
                .arg("--model")
                .arg(model_path())
                .args(["--prompt-ids", &ids, "--skip-layers", &skip, "--temperature", "0", "--max-tokens", "6", "--json"])
                .arg("--lora")
                .arg(&lora)
                .args(["--lora-mode", mode]),
        );
        let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let generated: Vec<u32> = serde_json::from_value(out["generated_ids"].clone()).unwrap();
        assert_eq!(generated, case.greedy_ids[..6], "--lora-mode {mode}");
        assert_eq!(out["lora"]["mode"], mode);
    }
    let stderr = run_err(firstrt().arg("run").arg("--model").arg(model_path()).args(["--prompt-ids", "1,2", "--lora"]).arg(fixtures_dir()));
    assert!(stderr.contains("adapter_config.json"), "{stderr}");
}

/// `chat --ctx 64 --system ...` with a second question too long for the conversation so far:
/// the oldest exchange is dropped (not the system prompt) and the question is answered.
#[test]
fn chat_drops_old_exchanges_when_the_context_is_full() {
    use std::io::Write;
    let mut child = firstrt()
        .arg("chat")
        .arg("--model")
        .arg(model_path())
        .args(["--ctx", "64", "--system", "You are a pirate.", "--temperature", "0", "--max-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running firstrt chat");
    let input = "Hi!\nTell me, in a few short words, where a clever old pirate would hide the golden treasure that he found on the small island last summer\n\n";
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("dropped the oldest 1 exchange"), "{stderr}");
    assert_eq!(stderr.matches("prefill:").count(), 2, "both questions are answered: {stderr}");
}

/// A refusal: exit status 1 and exactly one line on stderr (`error: ...`), no panic, no abort.
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running firstrt");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit status {:?} (an abort or a signal?); stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "a panic reached the user: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line of error: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// A copy of the test model whose `llama.block_count` (a u32 in the file) reads `value`.
fn model_with_block_count(dir: &TempDir, value: u32) -> std::path::PathBuf {
    patched_model(dir, &format!("blocks-{value}.gguf"), |bytes| {
        let key = b"llama.block_count";
        let at = bytes.windows(key.len()).position(|w| w == key).expect("block_count key") + key.len();
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "stored as u32");
        bytes[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
    })
}

/// Issue 15 §1: a context of 2^58 positions is refused before anything is allocated, naming
/// --ctx and the limit (it used to panic building the RoPE tables: the KV byte count wrapped).
#[test]
fn a_huge_context_is_refused_naming_ctx_and_the_limit() {
    let err = refused(firstrt().arg("run").arg("-m").arg(model_path()).args(["--ctx", "288230376151711744", "-p", "hi"]));
    assert!(err.contains("--ctx") && err.contains("288230376151711744") && err.contains("limit"), "{err}");
}

/// Issue 15 §5: a context whose per-layer KV cache is over the device's binding limit (a few
/// layers kept, so that the total would fit) is refused before any buffer is created: one
/// line naming --ctx, the per-layer size and the limit, no wgpu validation errors.
#[test]
fn a_context_over_the_binding_limit_is_one_clear_line() {
    let limit = firstrt::gpu::test_context().max_binding;
    // SmolLM2-135M: 3 kv heads of 64, so one layer's K is ctx * 192 * 4 bytes.
    let ctx = limit / (192 * 4) + 1;
    let skip = (1..29).map(|l| l.to_string()).collect::<Vec<_>>().join(",");
    let err =
        refused(firstrt().arg("run").arg("-m").arg(model_path()).args(["--ctx", &ctx.to_string(), "--skip-layers", &skip, "-p", "hi"]));
    let per_layer = ctx * 192 * 4;
    assert!(err.contains("--ctx") && err.contains(&per_layer.to_string()) && err.contains(&limit.to_string()), "{err}");
}

/// Issue 15 §1: a layer count the tensor table cannot hold is refused by run, inspect and
/// routers init, naming the key and what the file has (they used to abort allocating).
#[test]
fn an_impossible_layer_count_is_refused_by_every_command() {
    let dir = TempDir::new("cli-blocks");
    let model = model_with_block_count(&dir, 0xFFFF_FFFE);
    let check = |err: String| assert!(err.contains("llama.block_count") && err.contains("4294967294") && err.contains("30"), "{err}");
    check(refused(firstrt().arg("run").arg("-m").arg(&model).args(["-p", "hi", "--max-tokens", "1"])));
    check(refused(firstrt().arg("inspect").arg("-m").arg(&model)));
    let out = dir.join("r.safetensors");
    check(refused(firstrt().args(["routers", "init", "--r", "0"]).arg("-m").arg(&model).arg("-o").arg(&out)));
    assert!(!out.exists());
}

/// Issue 15 §1: the same for a Hugging Face config.json with `num_hidden_layers: 2^40`.
#[test]
fn an_impossible_hf_layer_count_is_refused() {
    let dir = TempDir::new("cli-hf-layers");
    let config = serde_json::json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
        "num_attention_heads": 2, "num_hidden_layers": 1_099_511_627_776u64, "max_position_embeddings": 64, "vocab_size": 4});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let embed: Vec<u8> = vec![0; 4 * 8 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 8], &embed).unwrap();
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &dir.join("model.safetensors")).unwrap();
    let tok = firstrt::runtime::load_tokenizer(&model_path()).unwrap();
    tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
    for args in [&["run", "-p", "hi"][..], &["inspect"]] {
        let err = refused(firstrt().args(args).arg("-m").arg(&dir.path));
        assert!(err.contains("num_hidden_layers") && err.contains("1099511627776"), "{err}");
    }
}

/// Issue 15 §1: bench checks --prompt-len against the context before building the prompt.
#[test]
fn bench_refuses_a_prompt_length_before_building_it() {
    let err = refused(firstrt().arg("bench").arg("-m").arg(model_path()).args(["--prompt-len", "100000000000", "--gen", "1"]));
    assert!(err.contains("--prompt-len") && err.contains("100000000000"), "{err}");
}

/// Issue 15 §1: inspect refuses the contexts run refuses.
#[test]
fn inspect_refuses_a_zero_context_like_run() {
    for args in [&["inspect", "--ctx", "0"][..], &["run", "--ctx", "0", "-p", "hi"]] {
        let err = refused(firstrt().args(args).arg("-m").arg(model_path()));
        assert!(err.contains("--ctx") && err.contains("at least 1"), "{args:?}: {err}");
    }
}

/// A copy of the test model in `dir` with `patch` applied to its bytes.
fn patched_model(dir: &TempDir, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let mut bytes = std::fs::read(model_path()).unwrap();
    patch(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// Where the f32 tensor `name` of the test model starts in the file, in bytes.
fn f32_tensor_offset(name: &str) -> usize {
    let gguf = firstrt::model::GgufFile::open(&model_path()).unwrap();
    let info = gguf.tensor_info(name).unwrap_or_else(|| panic!("{name} in the test model"));
    assert_eq!(info.ggml_type, firstrt::model::GgmlType::F32, "{name} is f32");
    (gguf.data_offset() + info.offset) as usize
}

/// issue 15: one NaN in a weight made every logit NaN; the sampler picked token 0, an end token,
/// and the run printed nothing and exited 0. Now it is an error that names the step and where
/// the hidden states stop being finite, for greedy (argmax) and sampled (top-k) runs.
#[test]
fn a_nan_weight_is_an_error_naming_the_step_and_layer() {
    let dir = TempDir::new("cli-nan");
    let nan = |name: &'static str| {
        move |bytes: &mut Vec<u8>| {
            let at = f32_tensor_offset(name);
            bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    };
    let norm = patched_model(&dir, "nan-output-norm.gguf", nan("output_norm.weight"));
    let err = run_err(firstrt().arg("run").arg("--model").arg(&norm).args(["--prompt", "hi", "--temperature", "0", "--max-tokens", "4"]));
    let line = err.lines().find(|l| l.contains("not finite")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains("prefill") && line.contains("final norm"), "every layer's output is finite, the final norm is not: {err}");

    let layer = patched_model(&dir, "nan-layer-3.gguf", nan("blk.3.ffn_norm.weight"));
    let sampled = ["--prompt", "hi", "--temperature", "0.8", "--top-k", "40", "--max-tokens", "4"];
    let err = run_err(firstrt().arg("run").arg("--model").arg(&layer).args(sampled));
    let line = err.lines().find(|l| l.contains("not finite")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains("prefill") && line.contains("layer 3"), "{err}");
}

/// issue 15: a chat template that does not compile made the model fail to load even for a
/// plain `run`; now only what needs the template (`--chat`, `chat`) fails.
#[test]
fn a_template_that_does_not_compile_fails_only_chat() {
    let dir = TempDir::new("cli-bad-template");
    let broken = patched_model(&dir, "bad-template.gguf", |bytes| {
        let (from, to) = (b"{% endfor %}", b"{% endfxr %}");
        let at = bytes.windows(from.len()).position(|w| w == from).expect("the chat template ends a loop");
        bytes[at..at + to.len()].copy_from_slice(to);
    });
    run_ok(firstrt().arg("run").arg("--model").arg(&broken).args(["--prompt", "Hello", "--temperature", "0", "--max-tokens", "3"]));
    run_ok(firstrt().arg("inspect").arg("--model").arg(&broken));
    let err = run_err(firstrt().arg("run").arg("--model").arg(&broken).args(["--chat", "--prompt", "Hello", "--max-tokens", "3"]));
    assert!(err.contains("chat template") && err.contains("endfxr"), "{err}");
    let chat = firstrt().arg("chat").arg("--model").arg(&broken).stdin(std::process::Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&chat.stderr).into_owned();
    assert!(!chat.status.success() && err.contains("endfxr"), "chat refuses to start: {err}");
}

/// Issue 15 §5: plan and adapter flags outside their domain are refused with the allowed range,
/// before the model loads.
#[test]
fn plan_and_adapter_flags_outside_their_range_are_refused() {
    let cases: [(&[&str], &str); 4] = [
        (&["--routers", "/nonexistent/r.safetensors", "--max-skip", "1", "--min-skip", "2"], "--min-skip"),
        (&["--routers", "/nonexistent/r.safetensors", "--router-threshold", "2"], "--router-threshold"),
        (&["--routers", "/nonexistent/r.safetensors", "--router-threshold", "nan"], "--router-threshold"),
        (&["--lora", "/nonexistent/adapter", "--lora-scale", "nan"], "--lora-scale"),
    ];
    for (flags, name) in cases {
        let err = refused(firstrt().arg("run").arg("-m").arg(model_path()).args(["-p", "hi"]).args(flags));
        assert!(err.contains(name) && !err.contains("loading"), "{flags:?}: {err}");
    }
}

/// Issue 15: a router file that cannot be read or parsed is named once in the one-line error,
/// with the flag (`run` used to say "loading PATH: router file PATH: ...").
#[test]
fn router_file_errors_name_the_file_once() {
    let dir = TempDir::new("cli-router-file-errors");
    let junk = dir.path.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    for path in [junk, dir.path.join("missing.safetensors")] {
        let err = refused(firstrt().arg("run").arg("-m").arg(model_path()).args(["-p", "hi", "--routers"]).arg(&path));
        let named = path.display().to_string();
        assert_eq!(err.matches(&named).count(), 1, "{err}");
        assert!(err.contains("--routers") && err.contains("router file"), "{err}");
    }
}

/// Issue 15 §5: sampling flags outside their range (negative or NaN temperature, top-p outside
/// 0..=1 or NaN, top-k over the candidates read back) are refused before the model loads, naming
/// the flag and the allowed range, in `run` and `chat` alike (they were clamped or made greedy).
#[test]
fn sampling_flags_outside_their_range_are_refused() {
    let cases: [(&[&str], &str); 6] = [
        (&["--temperature=-1"], "--temperature"),
        (&["--temperature", "nan"], "--temperature"),
        (&["--top-p", "2"], "--top-p"),
        (&["--top-p=-1"], "--top-p"),
        (&["--top-p", "nan"], "--top-p"),
        (&["--top-k", "1000"], "--top-k"),
    ];
    for (flags, name) in cases {
        for command in [&["run", "-p", "hi"][..], &["chat"]] {
            let err = refused(firstrt().args(command).arg("-m").arg(model_path()).args(flags));
            assert!(err.contains(name) && err.contains("allowed range") && !err.contains("loading"), "{command:?} {flags:?}: {err}");
        }
    }
}

/// Issue 15 §5: an output file in a folder that does not exist is refused before the work
/// starts (no generation, no timings), and the cause is said once.
#[test]
fn outputs_into_a_missing_folder_are_refused_before_generating() {
    for flag in ["--logits-out", "--trace"] {
        let err = refused(firstrt().arg("run").arg("-m").arg(model_path()).args([
            "-p",
            "hi",
            "--max-tokens",
            "2",
            flag,
            "/nonexistent-dir/out.file",
        ]));
        assert!(err.contains(flag) && err.contains("/nonexistent-dir"), "{flag}: {err}");
        assert_eq!(err.matches("/nonexistent-dir").count(), 1, "the cause once: {err}");
    }
}

/// Issue 15 §5: `/lora` with a folder that does not exist, in chat: one line naming it once,
/// and the chat goes on.
#[test]
fn chat_lora_command_with_a_missing_folder_says_so_once() {
    use std::io::Write;
    let mut child = firstrt()
        .arg("chat")
        .arg("-m")
        .arg(model_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"/lora /nonexistent-adapter\n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("/nonexistent-adapter")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert_eq!(lines[0].matches("/nonexistent-adapter").count(), 1, "the cause once: {stderr}");
}

/// `static-plan` over two calibration rows: per-layer BI, the skipped layers (never the first
/// or last) and a router file that `run --routers` runs as the same plan as `--skip-layers`.
#[test]
fn static_plan_writes_a_router_file_that_run_takes() {
    let dir = TempDir::new("cli-static-plan");
    let out = dir.join("plan.safetensors");
    let train = firstrt::testdata::data_dir().join("e2e_nlg/train.jsonl");
    let (stdout, _) = run_ok(
        firstrt()
            .arg("static-plan")
            .arg("-m")
            .arg(model_path())
            .arg("--calibration")
            .arg(&train)
            .args(["--skip", "3", "--limit", "2", "--json", "--out"])
            .arg(&out),
    );
    let plan: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object on stdout");
    let bi: Vec<f64> = serde_json::from_value(plan["block_influence"].clone()).unwrap();
    let skipped: Vec<usize> = serde_json::from_value(plan["skipped_layers"].clone()).unwrap();
    assert_eq!((bi.len(), plan["rows"].as_u64(), skipped.len()), (30, Some(2), 3), "{plan}");
    assert!(plan["tokens"].as_u64().unwrap() > 40 && bi.iter().all(|b| b.is_finite()), "{plan}");
    assert!(skipped.iter().all(|&l| l > 0 && l < 29), "first and last kept: {skipped:?}");
    let lowest = (1..29).filter(|l| !skipped.contains(l)).map(|l| bi[l]).fold(f64::INFINITY, f64::min);
    assert!(skipped.iter().all(|&l| bi[l] <= lowest), "the lowest BI are skipped: {plan}");
    let list = plan["skip_layers"].as_str().unwrap().to_string();
    assert_eq!(list, skipped.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","));

    let generate = |plan_flags: &[&str]| -> serde_json::Value {
        let (stdout, _) = run_ok(
            firstrt()
                .arg("run")
                .arg("-m")
                .arg(model_path())
                .args(["--prompt-ids", "1,9690,25,1352,314,253", "--temperature", "0", "--max-tokens", "6", "--json"])
                .args(plan_flags),
        );
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let from_file = generate(&["--routers", out.to_str().unwrap()]);
    let from_list = generate(&["--skip-layers", &list]);
    assert_eq!(from_file["generated_ids"], from_list["generated_ids"]);
    assert_eq!(from_file["skipped_layers"], serde_json::json!(skipped));
    assert_eq!((from_file["plan"].as_str(), from_list["plan"].as_str()), (Some("static"), Some("static")));

    let err = refused(firstrt().arg("run").arg("-m").arg(model_path()).args(["-p", "hi", "--min-skip", "2", "--routers"]).arg(&out));
    assert!(err.contains("static plan") && err.contains("--min-skip") && err.contains(&list), "{err}");
}

/// `static-plan` refuses what it cannot do before the model loads: too many layers to skip
/// (naming --skip and the limit), an output folder that does not exist, no rows, a broken
/// calibration file (naming file and line).
#[test]
fn static_plan_refuses_bad_input() {
    let dir = TempDir::new("cli-static-plan-bad");
    let train = firstrt::testdata::data_dir().join("e2e_nlg/train.jsonl");
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, "{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n").unwrap();
    let cases: [(&[&str], &std::path::Path, &[&str]); 5] = [
        (&["--skip", "29"], &train, &["--skip 29", "28", "--skip-first-last"]),
        (&["--skip", "31", "--skip-first-last"], &train, &["--skip 31", "30"]),
        (&["--skip", "3", "--out", "/nonexistent-dir/p.safetensors"], &train, &["--out", "/nonexistent-dir"]),
        (&["--skip", "3", "--limit", "0"], &train, &["--limit"]),
        (&["--skip", "3"], &broken, &["broken.jsonl:2"]),
    ];
    for (flags, calibration, wants) in cases {
        let err = refused(
            firstrt().arg("static-plan").arg("-m").arg(model_path()).arg("--calibration").arg(calibration).args(flags).arg("--json"),
        );
        assert!(wants.iter().all(|w| err.contains(w)), "{flags:?}: {err}");
    }
}
