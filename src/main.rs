//! The `firstrt` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

use firstrt::gpu::{GpuOptions, list_adapters};

#[derive(Parser, Debug)]
#[command(name = "firstrt", version, about = "LLM inference on wgpu compute shaders with FiRST layer skipping")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// GPU backend: vulkan, metal, dx12 or gl (default: WGPU_BACKEND, else all).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Use the adapter whose name contains this text (default: WGPU_ADAPTER_NAME).
    #[arg(long, global = true)]
    adapter: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every GPU adapter with its backend, driver, features and limits.
    Devices,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let gpu = GpuOptions { backend: cli.backend.clone(), adapter: cli.adapter.clone(), max_binding_override: None };
    match cli.command {
        Command::Devices => {
            let adapters = list_adapters(&gpu)?;
            if adapters.is_empty() {
                anyhow::bail!("{}", firstrt::gpu::DRIVER_HINT);
            }
            for (i, a) in adapters.iter().enumerate() {
                println!("[{i}] {a}");
            }
            Ok(())
        }
    }
}
