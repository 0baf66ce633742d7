//! `polysketch plot`: charts of training runs from their `metrics.jsonl` files.

use std::path::{Path, PathBuf};

use polysketch_attention::{AttentionConfig, AttentionKind};

use crate::error::CliError;
use crate::report::{draw_svg, Chart, Scale, Series};
use crate::run_dir::RunDir;

/// What one run's metrics say.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    /// Folder name of the run.
    pub name: String,
    /// Attention variant, for grouping.
    pub attention: String,
    /// Context length the run trained at.
    pub context: usize,
    /// `(tokens seen, validation loss)` after each evaluation.
    pub val_loss: Vec<(f64, f64)>,
    /// Mean training tokens/s over the logged windows.
    pub tokens_per_sec: Option<f64>,
    /// Accuracy on the answers at the last evaluation (synthetic tasks only).
    pub val_accuracy: Option<f64>,
}

/// A short name for an attention setup: `softmax`, `polynomial-p4`,
/// `polysketch-learned-r32-local`.
pub fn attention_label(a: &AttentionConfig) -> String {
    match a.kind {
        AttentionKind::Softmax => "softmax".into(),
        AttentionKind::Polynomial => format!("polynomial-p{}", a.degree),
        AttentionKind::Polysketch => format!(
            "polysketch-{}-r{}{}",
            format!("{:?}", a.sketch).to_lowercase(),
            a.sketch_dim,
            if a.local_exact { "-local" } else { "" }
        ),
    }
}

/// Reads the config and metrics of the run in `dir`.
pub fn read_run(dir: &Path) -> Result<RunMetrics, CliError> {
    let run = RunDir::new(dir);
    let config = run.load_config()?;
    let path = run.metrics_path();
    let text = std::fs::read_to_string(&path).map_err(|e| CliError::io("read", &path, e))?;
    let t = &config.train;
    let tokens_per_step = (t.batch_size * t.seq_len * t.grad_accum) as f64;
    let (mut val_loss, mut rates, mut val_accuracy) = (Vec::new(), Vec::new(), None);
    // a line cut short by a crash is skipped: everything before it is intact
    for record in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let step = record["step"].as_f64();
        if let (Some(step), Some(loss)) = (step, record["val_loss"].as_f64()) {
            val_loss.push((step * tokens_per_step, loss));
        }
        if let Some(accuracy) = record["val_accuracy"].as_f64() {
            val_accuracy = Some(accuracy);
        }
        if let Some(rate) = record["tokens_per_sec"].as_f64() {
            rates.push(rate);
        }
    }
    let tokens_per_sec =
        (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64);
    Ok(RunMetrics {
        name: dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        attention: attention_label(&config.model.attention),
        context: t.seq_len,
        val_loss,
        tokens_per_sec,
        val_accuracy,
    })
}

/// Draws `val_loss.svg` (validation loss against tokens seen, one line per run) and
/// `tokens_per_sec.svg` (training tokens/s against context length, one line per attention
/// variant) into `out`; returns the files written.
pub fn plot(runs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>, CliError> {
    if runs.is_empty() {
        return Err(CliError::Config("give at least one run directory to plot".into()));
    }
    let metrics = runs.iter().map(|r| read_run(r)).collect::<Result<Vec<_>, _>>()?;
    let mut written = Vec::new();
    let losses: Vec<Series> = metrics
        .iter()
        .filter(|m| !m.val_loss.is_empty())
        .map(|m| Series { name: m.name.clone(), points: m.val_loss.clone() })
        .collect();
    if !losses.is_empty() {
        let path = out.join("val_loss.svg");
        let chart = Chart {
            title: "Validation loss".into(),
            x_label: "tokens seen".into(),
            y_label: "loss (nats/token)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
            series: losses,
        };
        draw_svg(&chart, &path)?;
        written.push(path);
    }
    let mut labels: Vec<String> = metrics.iter().map(|m| m.attention.clone()).collect();
    labels.sort();
    labels.dedup();
    let speeds: Vec<Series> = labels
        .into_iter()
        .map(|label| {
            let mut points: Vec<(f64, f64)> = metrics
                .iter()
                .filter(|m| m.attention == label)
                .filter_map(|m| m.tokens_per_sec.map(|r| (m.context as f64, r)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { name: label, points }
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !speeds.is_empty() {
        let path = out.join("tokens_per_sec.svg");
        let chart = Chart {
            title: "Training speed".into(),
            x_label: "context length".into(),
            y_label: "tokens/s".into(),
            x_scale: Scale::Log2,
            y_scale: Scale::Log10,
            series: speeds,
        };
        draw_svg(&chart, &path)?;
        written.push(path);
    }
    if written.is_empty() {
        return Err(CliError::Run(
            "none of these runs has logged metrics yet; train for at least one logging interval"
                .into(),
        ));
    }
    Ok(written)
}
