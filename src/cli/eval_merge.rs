//! `firstrt eval-merge`: one table and one plot from the `results.json` of several `eval` runs
//! (each configuration a row, labelled by its run), e.g. plans that each have their own adapter.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use firstrt::eval::plot::{PlotPoint, write_plot};
use firstrt::eval::report::{ConfigSummary, markdown_table};

use super::eval::{OutFiles, check_out_dir};

#[derive(Args, Debug)]
pub struct EvalMergeArgs {
    /// `LABEL=DIR/results.json` (or just the file): every configuration of each file becomes a
    /// row labelled `LABEL: its label` (`LABEL` alone when the file has one configuration).
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// The metric plotted against decode ms/token (a ROUGE metric is shown in %).
    #[arg(long, default_value = "rougeLsum")]
    pub metric: String,
    /// Only configurations whose label (in their own file) is one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The plot's title.
    #[arg(long, default_value = "firstrt eval")]
    pub title: String,
    /// Write results.md, plot.svg and plot.png into this folder (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: EvalMergeArgs) -> Result<()> {
    if let Some(dir) = &args.out {
        check_out_dir(dir)?;
    }
    let mut rows: Vec<ConfigSummary> = Vec::new();
    for input in &args.inputs {
        let (label, path) = match input.split_once('=') {
            Some((label, path)) => (Some(label.to_string()), PathBuf::from(path)),
            None => (None, PathBuf::from(input)),
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let configs = json["configurations"].as_array().with_context(|| format!("{}: no \"configurations\" list", path.display()))?;
        let picked: Vec<&serde_json::Value> = configs
            .iter()
            .filter(|c| args.only.is_empty() || c["label"].as_str().is_some_and(|l| args.only.iter().any(|o| o == l)))
            .collect();
        let single = picked.len() == 1;
        for (i, config) in picked.into_iter().enumerate() {
            let mut summary =
                ConfigSummary::from_json(config).map_err(|e| anyhow::anyhow!("{}: configuration {i}: {e}", path.display()))?;
            summary.label = match (&label, single) {
                (Some(l), true) => l.clone(),
                (Some(l), false) => format!("{l}: {}", summary.label),
                (None, _) => summary.label,
            };
            rows.push(summary);
        }
    }
    if rows.is_empty() {
        bail!("no configuration to show (check --only)");
    }
    let table = markdown_table(&rows);
    print!("{table}");
    if let Some(dir) = &args.out {
        let scale = if args.metric.starts_with("rouge") { 100.0 } else { 1.0 };
        let points: Vec<PlotPoint> = rows.iter().filter_map(|s| PlotPoint::of(s, &args.metric, scale)).collect();
        if points.is_empty() {
            bail!("--metric {}: no configuration has it", args.metric);
        }
        let y_label = if scale == 100.0 { format!("{} F (%)", args.metric) } else { args.metric.clone() };
        let mut out = OutFiles::new(dir)?;
        let (svg, png) = (out.stage("plot.svg"), out.stage("plot.png"));
        write_plot(&points, &args.title, &y_label, &svg, &png)?;
        out.write("results.md", format!("# {}\n\n{table}", args.title).as_bytes())?;
        out.commit()?;
        eprintln!("wrote results.md, plot.svg and plot.png into {}", dir.display());
    }
    Ok(())
}
