//! `firstrt tokenize` and `firstrt inspect`: no GPU needed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use firstrt::model::open_model;
use firstrt::runtime::{WeightDtype, estimate_matrix_bytes, load_tokenizer};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// Print `{"ids": [...]}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Context length to size the KV cache for (default: the model's, capped at 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&args.model)?;
    let ids = tok.encode_with_bos(&args.text, false).context("tokenizing")?;
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        for id in &ids {
            let piece = tok.id_to_token(*id).unwrap_or_default();
            println!("{id:>8}  {piece:?}");
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let source = open_model(&args.model)?;
    let c = source.config().clone();
    let tok = load_tokenizer(&args.model)?;
    let ctx_len = super::context_len(&c, args.ctx)?;
    println!("model:        {}", args.model.display());
    println!("name:         {}", c.name);
    println!("architecture: {:?}", c.arch);
    println!("layers:       {}", c.n_layers);
    println!("hidden:       {} (heads {}, kv heads {}, head dim {})", c.d_model, c.n_heads, c.n_kv_heads, c.head_dim);
    println!("ffn:          {}", c.d_ff);
    println!("vocab:        {}", c.vocab_size);
    println!("rope:         theta {} scaling {:?}", c.rope_theta, c.rope_scaling);
    println!("rms eps:      {}", c.rms_eps);
    println!("context:      {} (model maximum {})", ctx_len, c.max_position);
    println!("tied embed:   {}", c.tied_embeddings);
    println!("file dtypes:  {}", source.describe_dtypes());
    println!(
        "tokenizer:    {} tokens, bos {:?}, eos {:?}, add_bos {}, end ids {:?}, chat template {}",
        tok.vocab_size(),
        tok.bos_token(),
        tok.eos_token(),
        tok.add_bos(),
        tok.end_ids(),
        if tok.chat_template_source().is_some() { "yes" } else { "no" }
    );
    let params = c.parameter_count();
    let kv = c.kv_cache_bytes(ctx_len).with_context(|| format!("--ctx {ctx_len}: the KV cache's byte count overflows a u64"))?;
    let default = WeightDtype::default_for(source.as_ref());
    println!("default dtype: {default} (--dtype)");
    for name in WeightDtype::NAMES {
        let Some(dtype) = WeightDtype::parse(name) else { continue };
        // Only what this file can be loaded as: its own block types, or a quantiser firstrt has.
        let Some((matrices, matrix_params)) = estimate_matrix_bytes(source.as_ref(), dtype) else { continue };
        // Norms and biases stay f32.
        let vectors = params.saturating_sub(matrix_params).checked_mul(4);
        let total = vectors.and_then(|v| v.checked_add(matrices)).and_then(|w| w.checked_add(kv));
        let total = total.with_context(|| format!("the {dtype} weights' byte count overflows a u64"))?;
        println!(
            "GPU memory ({dtype}): weights {} ({:.2} bits per matrix weight) + KV cache {} (f32, {ctx_len} positions) = {}",
            mib(total - kv),
            matrices as f64 * 8.0 / matrix_params.max(1) as f64,
            mib(kv),
            mib(total)
        );
    }
    Ok(())
}
