//! `firstrt routers ...`: router files (no GPU needed).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use firstrt::model::open_model;
use firstrt::model::routers::{MAX_RANK, RouterFile, model_identity};

#[derive(Args, Debug)]
pub struct RoutersArgs {
    #[command(subcommand)]
    pub command: RoutersCommand,
}

#[derive(Subcommand, Debug)]
pub enum RoutersCommand {
    /// Write a starting router file for a model: every layer gets a router with p = sigmoid(bias).
    Init(InitArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A .gguf file or a Hugging Face folder.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Where to write the router file (safetensors).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Router rank r (hidden units); 0 for a linear router.
    #[arg(long = "r", default_value_t = 64)]
    pub rank: usize,
    /// Output bias: every layer starts with p = sigmoid(bias) (3: p = 0.95, every layer kept).
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    pub bias: f32,
    /// Default threshold tau stored in the file: a layer runs iff p >= tau.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// RMSNorm epsilon of the routers (default: the model's).
    #[arg(long)]
    pub eps: Option<f32>,
    /// Allow layer 0 and the last layer to be skipped.
    #[arg(long)]
    pub skip_first_last: bool,
}

pub fn run(args: RoutersArgs) -> Result<()> {
    match args.command {
        RoutersCommand::Init(a) => init(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    anyhow::ensure!(a.bias.is_finite(), "--bias {} must be a finite number", a.bias);
    // Checked before init allocates r x d weights per layer.
    anyhow::ensure!(a.rank <= MAX_RANK, "--r {} is over the limit of {MAX_RANK}", a.rank);
    let source = open_model(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let identity = model_identity(source.as_ref()).with_context(|| format!("identifying {}", a.model.display()))?;
    let eps = a.eps.unwrap_or(source.config().rms_eps);
    let mut file = RouterFile::init(&identity, a.rank, a.bias, eps, a.threshold);
    file.skip_first_last = a.skip_first_last;
    // save() checks rank, eps and threshold and names what is wrong.
    file.save(&a.out)?;
    println!(
        "wrote {}: {} routers of rank {} for {} (arch {}, hidden {}, vocab {}, weight hash {}), p = {:.4} at start, threshold {}",
        a.out.display(),
        file.layers.len(),
        a.rank,
        a.model.display(),
        identity.arch,
        identity.d_model,
        identity.vocab_size,
        identity.weight_hash,
        1.0 / (1.0 + (-a.bias).exp()),
        a.threshold
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        command: RoutersCommand,
    }

    #[test]
    fn routers_init_writes_a_file_that_loads_back() {
        let model = firstrt::testdata::model_path();
        let dir = firstrt::testdata::TempDir::new("cli-routers");
        let out = dir.join("r.safetensors");
        let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
        let cli = TestCli::try_parse_from(["routers", "init", "--model", m, "--out", o, "--r", "8", "--bias", "-1", "--threshold", "0.4"])
            .unwrap();
        run(RoutersArgs { command: cli.command }).unwrap();
        let source = open_model(&model).unwrap();
        let id = model_identity(source.as_ref()).unwrap();
        let f = RouterFile::load(&out, &id).unwrap();
        assert_eq!((f.rank, f.hidden, f.layers.len(), f.threshold, f.skip_first_last), (8, 576, 30, 0.4, false));
        assert_eq!(f.eps, source.config().rms_eps);
        let h = vec![0.5f32; 2 * 576];
        let p = f.probability_ref(7, &h, 2).unwrap().unwrap();
        assert!((p - 1.0 / (1.0 + 1.0f32.exp())).abs() < 1e-6, "{p}");
        // a bad threshold is refused before anything is written
        let bad = dir.join("bad.safetensors");
        let cli = TestCli::try_parse_from(["routers", "init", "-m", m, "-o", bad.to_str().unwrap(), "--threshold", "2"]).unwrap();
        let err = run(RoutersArgs { command: cli.command }).unwrap_err();
        assert!(format!("{err:#}").contains("threshold"), "{err:#}");
        assert!(!bad.exists());
        let cli = TestCli::try_parse_from(["routers", "init", "-m", m, "-o", bad.to_str().unwrap(), "--r", "70000"]).unwrap();
        let err = run(RoutersArgs { command: cli.command }).unwrap_err();
        assert!(format!("{err:#}").contains("--r 70000"), "{err:#}");
        assert!(!bad.exists());
    }
}
