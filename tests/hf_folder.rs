//! The Hugging Face folder path end to end: the test model rewritten as a Hugging Face folder
//! (config.json, model.safetensors in HF layout — q/k rows in rotate-half order — tokenizer.json,
//! tokenizer_config.json with the chat template) gives the transformers fixture's logits and
//! greedy ids, and the same tokens and chat rendering as the GGUF.

mod common;

use std::path::Path;

use common::{cases, fixture_tensor, greedy_with_logits};
use firstrt::gpu::{DType, test_context};
use firstrt::kernels::testing::max_abs_diff;
use firstrt::model::QuantType;
use firstrt::model::chat::ChatMessage;
use firstrt::model::open_model;
use firstrt::runtime::{LayerPlan, LoadedModel, Session, SessionOptions, WeightDtype};
use firstrt::testdata::{TempDir, model_path};

/// Write the GGUF's weights, config and tokenizer as a Hugging Face folder.
fn write_hf_folder(dir: &Path) {
    let gguf = open_model(&model_path()).unwrap();
    let c = gguf.config().clone();
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    for i in 0..c.n_layers {
        for t in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{t}.weight"));
        }
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let t = gguf.get(n).unwrap();
            (n.clone(), t.shape.clone(), bytemuck::cast_slice(&t.data).to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, bytes)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": true, "vocab_size": c.vocab_size, "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = firstrt::runtime::load_tokenizer(&model_path()).unwrap();
    tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
    let tcfg = serde_json::json!({
        "chat_template": tok.chat_template_source().unwrap(),
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
}

#[test]
fn hugging_face_folder_matches_transformers() {
    let dir = TempDir::new("hf-folder");
    write_hf_folder(&dir.path);

    let ctx = test_context();
    let hf = LoadedModel::load(&ctx, &dir.path, DType::F32, &mut |_, _| {}).unwrap();
    assert!(hf.file_dtypes.contains("F32"), "{}", hf.file_dtypes);
    let case = cases().into_iter().find(|c| c.name == "chat_user_only").unwrap();
    let mut session = Session::new(&hf.weights, SessionOptions { ctx_len: 128, candidates: 1 }, LayerPlan::full(30)).unwrap();
    let (logits, greedy) = greedy_with_logits(&mut session, &case.prompt_ids, 12);
    let (_, want) = fixture_tensor(&case.logits_key);
    let diff = max_abs_diff(&logits, &want);
    assert!(diff < 1e-3, "HF folder: max |logit diff| {diff}");
    assert_eq!(greedy, case.greedy_ids[..12]);

    // Tokenizer and chat template from tokenizer.json / tokenizer_config.json.
    let gguf_tok = firstrt::runtime::load_tokenizer(&model_path()).unwrap();
    for text in ["Hello, world!", "  12 apples <|im_end|> x² ½"] {
        assert_eq!(hf.tokenizer.encode(text).unwrap(), gguf_tok.encode(text).unwrap(), "{text:?}");
    }
    let msgs = [ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }];
    let want_ids = {
        let text = gguf_tok.chat_template().unwrap().render(&msgs, true).unwrap();
        gguf_tok.encode(&text).unwrap()
    };
    assert_eq!(hf.chat_ids(&msgs).unwrap(), want_ids);
    assert_eq!(hf.tokenizer.end_ids(), gguf_tok.end_ids());

    // Issue 11: an f32 safetensors folder quantised to Q8_0 at load (tests/quantised.rs checks
    // the values against its own dequantised weights); f32 is the folder's default.
    assert_eq!(WeightDtype::default_for(open_model(&dir.path).unwrap().as_ref()), WeightDtype::Dense(DType::F32));
    let q8 = LoadedModel::load(&ctx, &dir.path, WeightDtype::Quant(QuantType::Q8_0), &mut |_, _| {}).unwrap();
    assert_eq!(q8.weights.format_summary(), "q8_0 x121");
    let mut session = Session::new(&q8.weights, SessionOptions { ctx_len: 128, candidates: 1 }, LayerPlan::full(30)).unwrap();
    let (q8_logits, _) = greedy_with_logits(&mut session, &case.prompt_ids, 2);
    let rel = max_abs_diff(&q8_logits, &logits) / logits.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(rel < 0.05, "q8_0 of the folder: relative logit diff {rel} against its f32 weights");
}
