//! Per-configuration summaries of an evaluation, and its files: `results.json` (everything,
//! per example) and `results.md` (the table).

use serde_json::json;

use super::run::{DECODE_PROBE_STEPS, ExampleResult};
use super::stats::{bootstrap_ci, mean};

/// Bootstrap resamples for every 95% interval.
pub const BOOTSTRAP_RESAMPLES: usize = 1000;

/// Seed of the bootstrap resampling (fixed, so that a rerun prints the same intervals).
pub const BOOTSTRAP_SEED: u64 = 0x5eed;

/// One metric over the examples: the mean and its 95% percentile-bootstrap interval.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    /// Metric name (`rougeLsum`, `nll`, ...).
    pub name: String,
    /// Mean over the examples.
    pub mean: f64,
    /// 2.5th percentile of the bootstrap means.
    pub ci_low: f64,
    /// 97.5th percentile of the bootstrap means.
    pub ci_high: f64,
}

/// What one configuration did over all examples.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSummary {
    /// The configuration's label.
    pub label: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Mean, minimum and maximum number of layers skipped per example.
    pub skipped_mean: f64,
    /// Fewest layers skipped for an example.
    pub skipped_min: usize,
    /// Most layers skipped for an example.
    pub skipped_max: usize,
    /// Mean prefill wall time per example, in ms.
    pub prefill_ms: f64,
    /// Decode wall time per step, in ms: all decode time over all decode steps.
    pub decode_ms_per_token: f64,
    /// True when `decode_ms_per_token` comes from [`ConfigSummary::set_probe`] (no example
    /// ran a decode step).
    pub decode_probed: bool,
    /// Tokens generated (or, for log-likelihood, scored) over all examples.
    pub tokens: usize,
    /// One entry per metric, in the mode's order.
    pub metrics: Vec<MetricSummary>,
}

impl ConfigSummary {
    /// Summarise `results` (one per example, all with the metrics `names`).
    pub fn new(label: &str, names: &[&str], results: &[ExampleResult]) -> ConfigSummary {
        let skipped: Vec<usize> = results.iter().map(|r| r.skipped_layers.len()).collect();
        let steps: usize = results.iter().map(|r| r.decode_steps).sum();
        let decode_s: f64 = results.iter().map(|r| r.decode_s).sum();
        let metrics = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let values: Vec<f64> = results.iter().map(|r| r.scores[i]).filter(|v| v.is_finite()).collect();
                let (ci_low, ci_high) = bootstrap_ci(&values, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap_or((f64::NAN, f64::NAN));
                MetricSummary { name: name.to_string(), mean: mean(&values).unwrap_or(f64::NAN), ci_low, ci_high }
            })
            .collect();
        ConfigSummary {
            label: label.to_string(),
            examples: results.len(),
            skipped_mean: skipped.iter().sum::<usize>() as f64 / results.len().max(1) as f64,
            skipped_min: skipped.iter().copied().min().unwrap_or(0),
            skipped_max: skipped.iter().copied().max().unwrap_or(0),
            prefill_ms: 1e3 * results.iter().map(|r| r.prefill_s).sum::<f64>() / results.len().max(1) as f64,
            decode_ms_per_token: if steps == 0 { f64::NAN } else { 1e3 * decode_s / steps as f64 },
            decode_probed: false,
            tokens: results.iter().map(|r| r.tokens).sum(),
            metrics,
        }
    }

    /// Decode ms/token from a timing probe ([`decode_probe`](super::run::decode_probe)) of
    /// `steps` steps taking `seconds`, for a configuration whose examples ran no decode step.
    pub fn set_probe(&mut self, seconds: f64, steps: usize) {
        if steps > 0 {
            self.decode_ms_per_token = 1e3 * seconds / steps as f64;
            self.decode_probed = true;
        }
    }

    /// True when no example ran a decode step (and no probe has been set).
    pub fn needs_probe(&self) -> bool {
        !self.decode_ms_per_token.is_finite()
    }

    /// The metric called `name`, if this summary has it.
    pub fn metric(&self, name: &str) -> Option<&MetricSummary> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// The summary as JSON (non-finite numbers become null).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "label": self.label,
            "examples": self.examples,
            "layers_skipped": {"mean": finite(self.skipped_mean), "min": self.skipped_min, "max": self.skipped_max},
            "prefill_ms": finite(self.prefill_ms),
            "decode_ms_per_token": finite(self.decode_ms_per_token),
            "decode_probed": self.decode_probed,
            "tokens": self.tokens,
            "metrics": self.metrics.iter().map(|m| (m.name.clone(), json!({
                "mean": finite(m.mean), "ci95": [finite(m.ci_low), finite(m.ci_high)],
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

impl ConfigSummary {
    /// Reads back what [`ConfigSummary::to_json`] wrote (a configuration of `results.json`);
    /// null numbers become NaN. Errors: the first missing or mistyped field, named.
    pub fn from_json(v: &serde_json::Value) -> Result<ConfigSummary, String> {
        let num = |v: &serde_json::Value, what: &str| -> Result<f64, String> {
            match v {
                serde_json::Value::Null => Ok(f64::NAN),
                v => v.as_f64().ok_or_else(|| format!("{what} is not a number")),
            }
        };
        let count = |v: &serde_json::Value, what: &str| -> Result<usize, String> {
            v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| format!("{what} is not a count"))
        };
        let skipped = &v["layers_skipped"];
        let metrics = v["metrics"]
            .as_object()
            .ok_or("metrics is not an object")?
            .iter()
            .map(|(name, m)| {
                let ci = m["ci95"].as_array().filter(|a| a.len() == 2).ok_or_else(|| format!("metrics.{name}.ci95 is not a pair"))?;
                Ok(MetricSummary {
                    name: name.clone(),
                    mean: num(&m["mean"], &format!("metrics.{name}.mean"))?,
                    ci_low: num(&ci[0], &format!("metrics.{name}.ci95"))?,
                    ci_high: num(&ci[1], &format!("metrics.{name}.ci95"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ConfigSummary {
            label: v["label"].as_str().ok_or("label is not a string")?.to_string(),
            examples: count(&v["examples"], "examples")?,
            skipped_mean: num(&skipped["mean"], "layers_skipped.mean")?,
            skipped_min: count(&skipped["min"], "layers_skipped.min")?,
            skipped_max: count(&skipped["max"], "layers_skipped.max")?,
            prefill_ms: num(&v["prefill_ms"], "prefill_ms")?,
            decode_ms_per_token: num(&v["decode_ms_per_token"], "decode_ms_per_token")?,
            decode_probed: v["decode_probed"].as_bool().ok_or("decode_probed is not a boolean")?,
            tokens: count(&v["tokens"], "tokens")?,
            metrics,
        })
    }
}

/// `v` as a JSON number, or null when it is not finite (JSON has no NaN).
fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() { json!(v) } else { serde_json::Value::Null }
}

/// One example's record for `results.json`.
pub fn example_json(names: &[&str], r: &ExampleResult) -> serde_json::Value {
    json!({
        "id": r.id,
        "text": r.text,
        "prompt_tokens": r.prompt_tokens,
        "tokens": r.tokens,
        "skipped_layers": r.skipped_layers,
        "prefill_ms": 1e3 * r.prefill_s,
        "decode_ms_per_token": if r.decode_steps == 0 { serde_json::Value::Null } else { finite(1e3 * r.decode_s / r.decode_steps as f64) },
        "scores": names.iter().zip(&r.scores).map(|(n, v)| (n.to_string(), finite(*v))).collect::<serde_json::Map<_, _>>(),
    })
}

/// `mean [low, high]` with `digits` decimals, or `-` when not finite.
fn with_ci(m: &MetricSummary, scale: f64, digits: usize) -> String {
    if !m.mean.is_finite() {
        return "-".into();
    }
    format!("{:.digits$} [{:.digits$}, {:.digits$}]", scale * m.mean, scale * m.ci_low, scale * m.ci_high)
}

/// The Markdown table: one row per configuration with the layers skipped (mean and range),
/// prefill ms, decode ms/token, tokens and each metric with its 95% interval. ROUGE and
/// exact match are shown as percentages. A decode time from a probe is marked `*` and
/// explained under the table.
pub fn markdown_table(summaries: &[ConfigSummary]) -> String {
    let Some(first) = summaries.first() else { return String::new() };
    let mut out = String::from("| configuration | layers skipped (mean [min–max]) | prefill ms | decode ms/token | tokens |");
    let mut rule = String::from("|---|---|---:|---:|---:|");
    for m in &first.metrics {
        out.push_str(&format!(" {}{} |", m.name, if m.name == "nll" { " (nats/token)" } else { " (%)" }));
        rule.push_str("---:|");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for s in summaries {
        let decode = if s.decode_ms_per_token.is_finite() { format!("{:.1}", s.decode_ms_per_token) } else { "-".into() };
        out.push_str(&format!(
            "| {} | {:.1} [{}–{}] | {:.1} | {decode}{} | {} |",
            s.label,
            s.skipped_mean,
            s.skipped_min,
            s.skipped_max,
            s.prefill_ms,
            if s.decode_probed { "*" } else { "" },
            s.tokens
        ));
        for m in &s.metrics {
            let (scale, digits) = if m.name == "nll" { (1.0, 3) } else { (100.0, 1) };
            out.push_str(&format!(" {} |", with_ci(m, scale, digits)));
        }
        out.push('\n');
    }
    if summaries.iter().any(|s| s.decode_probed) {
        out.push_str(&format!(
            "\n\\* every example ended at its first token, so no decode step was timed; the decode time is that of a probe: the first example's prompt and {DECODE_PROBE_STEPS} decode steps with no end token.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, skipped: Vec<usize>, decode: (f64, usize), scores: Vec<f64>) -> ExampleResult {
        ExampleResult {
            id: id.into(),
            text: String::new(),
            prompt_tokens: 10,
            tokens: decode.1 + 1,
            skipped_layers: skipped,
            prefill_s: 0.5,
            decode_s: decode.0,
            decode_steps: decode.1,
            scores,
        }
    }

    #[test]
    fn summaries_read_back_from_their_json() {
        let rs = [result("a", vec![2], (1.0, 10), vec![0.5]), result("b", vec![3, 4], (3.0, 10), vec![0.25])];
        let s = ConfigSummary::new("routers 0.5", &["rougeLsum"], &rs);
        assert_eq!(ConfigSummary::from_json(&s.to_json()).unwrap(), s);
        // A probe-less configuration without decode steps: its null time reads back as NaN.
        let none = ConfigSummary::new("y", &["nll"], &[result("c", vec![], (0.0, 0), vec![1.0])]);
        assert!(ConfigSummary::from_json(&none.to_json()).unwrap().decode_ms_per_token.is_nan());
        let mut bad = s.to_json();
        bad["layers_skipped"]["min"] = serde_json::json!("x");
        assert_eq!(ConfigSummary::from_json(&bad).unwrap_err(), "layers_skipped.min is not a count");
    }

    #[test]
    fn summary_weights_decode_time_by_steps() {
        let rs = [result("a", vec![], (1.0, 10), vec![0.5]), result("b", vec![3, 4], (3.0, 10), vec![f64::NAN])];
        let s = ConfigSummary::new("x", &["nll"], &rs);
        assert_eq!((s.skipped_min, s.skipped_max, s.skipped_mean, s.tokens), (0, 2, 1.0, 22));
        assert!((s.decode_ms_per_token - 200.0).abs() < 1e-9);
        assert!((s.prefill_ms - 500.0).abs() < 1e-9);
        // the NaN of example b is left out of the mean
        assert_eq!(s.metric("nll").unwrap().mean, 0.5);
        let table = markdown_table(std::slice::from_ref(&s));
        assert!(table.contains("| x | 1.0 [0–2] | 500.0 | 200.0 | 22 | 0.500 [0.500, 0.500] |"), "{table}");
        assert_eq!(s.to_json()["metrics"]["nll"]["mean"], 0.5);
        let mut none = ConfigSummary::new("y", &["nll"], &[result("c", vec![], (0.0, 0), vec![f64::NAN])]);
        assert!(none.to_json()["decode_ms_per_token"].is_null() && none.needs_probe());
        let table = markdown_table(std::slice::from_ref(&none));
        assert!(table.contains("| 500.0 | - | 1 | - |"), "{table}");
        none.set_probe(0.64, 32);
        assert!(!none.needs_probe() && none.to_json()["decode_probed"] == true);
        let table = markdown_table(&[none]);
        assert!(table.contains("| 20.0* |") && table.contains("\\* every example ended"), "{table}");
    }
}
