//! `polysketch sweep`: one training run per combination of config overrides, skipping finished
//! runs, with a summary table and charts.
//!
//! A grid file names variants (sets of overrides that go together) and axes (lists of values
//! for one key); every variant is combined with every combination of axis values:
//!
//! ```toml
//! [sweep]
//! token_budget = 2000000   # optional: steps = budget / tokens per step, for equal budgets
//! evaluations = 8          # with a budget: evaluations (and checkpoints) per run
//!
//! [variants.softmax]
//! "model.attention.kind" = "softmax"
//!
//! [variants.polysketch]
//! "model.attention.kind" = "polysketch"
//! "model.attention.sketch_dim" = 32
//!
//! [grid]
//! "run.seed" = [1, 2]
//! # a value may set several keys together; `name` names it in folder names and tables
//! context = [
//!   { name = "1k", "train.seq_len" = 1024, "train.batch_size" = 4 },
//!   { name = "4k", "train.seq_len" = 4096, "train.batch_size" = 1 },
//! ]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use crate::alloc;
use crate::config::RunConfig;
use crate::error::CliError;
use crate::plot::{plot, read_run};
use crate::report::Table;
use crate::run_dir::{write_atomic, RunDir};

/// The `[sweep]` section of a grid file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSection {
    /// Tokens every run trains on; sets `train.steps` from each run's tokens per step.
    pub token_budget: Option<u64>,
    /// With a token budget: validations and checkpoints per run (default 8).
    pub evaluations: Option<u64>,
}

/// A parsed grid file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Budget settings.
    #[serde(default)]
    pub sweep: SweepSection,
    /// Named sets of overrides; none means one unnamed variant.
    #[serde(default)]
    pub variants: BTreeMap<String, BTreeMap<String, toml::Value>>,
    /// Axes: `key = [values]`.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
}

/// One run of a sweep: its folder name and its overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRun {
    /// Folder name inside the sweep's output folder.
    pub name: String,
    /// Variant name (empty without variants).
    pub variant: String,
    /// `(key, value)` of every axis, in grid order.
    pub axes: Vec<(String, String)>,
    /// `--set` style overrides.
    pub overrides: Vec<String>,
}

/// The `--set` overrides of one axis value: `key=value`, or one per entry of a table value
/// (its `name` entry excepted).
fn axis_overrides(key: &str, value: &toml::Value) -> Vec<String> {
    match value {
        toml::Value::Table(t) => t
            .iter()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        other => vec![format!("{key}={other}")],
    }
}

/// A value for a folder name: strings without quotes, a table by its `name` (or its values),
/// anything unsafe replaced by `_`.
fn name_part(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(t) => match t.get("name") {
            Some(name) => return name_part(name),
            None => t.values().map(name_part).collect::<Vec<_>>().join("-"),
        },
        other => other.to_string(),
    };
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' })
        .collect()
}

impl Grid {
    /// Reads and checks a grid file.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::Config(format!("cannot read grid file `{}`: {e}", path.display()))
        })?;
        let grid: Grid = toml::from_str(&text)
            .map_err(|e| CliError::Config(format!("{}: {e}", path.display())))?;
        if let Some((key, _)) = grid.grid.iter().find(|(_, values)| values.is_empty()) {
            return Err(CliError::Config(format!(
                "{}: grid axis `{key}` has no values",
                path.display()
            )));
        }
        let sets_dir = |t: &toml::Table| t.contains_key("run.dir");
        let in_axes = grid.grid.iter().any(|(k, values)| {
            k == "run.dir" || values.iter().any(|v| v.as_table().is_some_and(sets_dir))
        });
        if in_axes || grid.variants.values().any(|v| v.contains_key("run.dir")) {
            return Err(CliError::Config(format!(
                "{}: run.dir is chosen by the sweep (--out/NAME); remove it from the grid",
                path.display()
            )));
        }
        Ok(grid)
    }

    /// Every run: variants × the cartesian product of the axes, in a fixed order.
    pub fn plan(&self) -> Vec<PlannedRun> {
        let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        for (key, values) in &self.grid {
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    values.iter().map(move |v| {
                        let mut c = combo.clone();
                        c.push((key.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let variants: Vec<(String, Vec<String>)> = if self.variants.is_empty() {
            vec![(String::new(), Vec::new())]
        } else {
            self.variants
                .iter()
                .map(|(name, sets)| {
                    let overrides = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    (name.clone(), overrides)
                })
                .collect()
        };
        let mut runs = Vec::new();
        for (variant, variant_sets) in &variants {
            for combo in &combos {
                let mut parts: Vec<String> =
                    if variant.is_empty() { Vec::new() } else { vec![variant.clone()] };
                for (key, value) in combo {
                    let short = key.rsplit('.').next().unwrap_or(key);
                    parts.push(format!("{short}-{}", name_part(value)));
                }
                let mut overrides = variant_sets.clone();
                overrides.extend(combo.iter().flat_map(|(k, v)| axis_overrides(k, v)));
                runs.push(PlannedRun {
                    name: if parts.is_empty() { "run".into() } else { parts.join("_") },
                    variant: variant.clone(),
                    axes: combo.iter().map(|(k, v)| (k.clone(), name_part(v))).collect(),
                    overrides,
                });
            }
        }
        runs
    }
}

/// What the sweep records in a finished run's folder (`sweep.json`).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct RunRecord {
    parameters: u64,
    peak_bytes: u64,
    wall_seconds: f64,
}

/// The config of one planned run: the base file, the command-line overrides, the run's own
/// overrides, its folder and, with a token budget, its steps and intervals.
fn run_config(
    base: &Path,
    extra: &[String],
    grid: &Grid,
    planned: &PlannedRun,
    out: &Path,
) -> Result<RunConfig, CliError> {
    let mut overrides: Vec<String> = extra.to_vec();
    overrides.extend(planned.overrides.iter().cloned());
    let dir = out.join(&planned.name);
    overrides.push(format!("run.dir={}", toml::Value::String(dir.display().to_string())));
    let mut config = RunConfig::load(base, &overrides)?;
    if let Some(budget) = grid.sweep.token_budget {
        let t = &mut config.train;
        let per_step = (t.batch_size * t.seq_len * t.grad_accum) as u64;
        t.steps = (budget / per_step.max(1)).max(1);
        let every = (t.steps / grid.sweep.evaluations.unwrap_or(8).max(1)).max(1);
        t.eval_every = every;
        t.checkpoint_every = every;
        t.log_every = t.log_every.min(every);
        t.warmup_steps = t.warmup_steps.min(t.steps / 10);
    }
    config.validate().map_err(|e| CliError::Config(format!("run {}: {e}", planned.name)))?;
    Ok(config)
}

/// Runs every planned run that has not finished (resuming interrupted ones), then writes
/// `summary.md`, `summary.csv`, `val_loss.svg` and `tokens_per_sec.svg` into `out`. With
/// `summary_only`, nothing is trained: the summary covers the runs that exist.
pub fn sweep(
    base: &Path,
    grid_path: &Path,
    extra: &[String],
    out: &Path,
    summary_only: bool,
    mut train_one: impl FnMut(RunConfig, bool) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let grid = Grid::load(grid_path)?;
    let plan = grid.plan();
    // every config is checked before the first run starts
    let configs = plan
        .iter()
        .map(|p| run_config(base, extra, &grid, p, out))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(out).map_err(|e| CliError::io("create", out, e))?;
    eprintln!("sweep: {} runs into `{}`", plan.len(), out.display());
    let to_train = if summary_only { Vec::new() } else { configs };
    for (i, (planned, config)) in plan.iter().zip(to_train).enumerate() {
        let run = RunDir::new(&config.run.dir);
        let record_path = run.root().join("sweep.json");
        if run.root().join("DONE").is_file() && record_path.is_file() {
            eprintln!("[{}/{}] {}: finished earlier, skipped", i + 1, plan.len(), planned.name);
            continue;
        }
        let resume = run.config_path().is_file();
        eprintln!(
            "[{}/{}] {}: {}",
            i + 1,
            plan.len(),
            planned.name,
            if resume { "resuming" } else { "starting" }
        );
        let started = Instant::now();
        let start_bytes = alloc::reset_peak();
        if !run.root().join("DONE").is_file() {
            train_one(config.clone(), resume)?;
        }
        let done: serde_json::Value = std::fs::read_to_string(run.root().join("DONE"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let record = RunRecord {
            parameters: done["parameters"].as_u64().unwrap_or(0),
            peak_bytes: alloc::peak_bytes().saturating_sub(start_bytes) as u64,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_string_pretty(&record).expect("plain numbers serialise");
        write_atomic(&record_path, json.as_bytes())?;
    }
    let table = summary(&plan, &grid, out)?;
    let [markdown, csv] = table.save(out, "summary")?;
    let dirs: Vec<PathBuf> = plan
        .iter()
        .map(|p| out.join(&p.name))
        .filter(|d| RunDir::new(d).metrics_path().is_file())
        .collect();
    let charts = if dirs.is_empty() {
        eprintln!("no run has logged metrics yet: no charts");
        Vec::new()
    } else {
        plot(&dirs, out)?
    };
    println!("{}", table.markdown());
    eprintln!("wrote {}, {}", markdown.display(), csv.display());
    for chart in charts {
        eprintln!("wrote {}", chart.display());
    }
    Ok(())
}

/// One row per run: variant, axes, final validation loss and perplexity, tokens/s, peak
/// memory, parameters and wall time.
fn summary(plan: &[PlannedRun], grid: &Grid, out: &Path) -> Result<Table, CliError> {
    let mut columns = vec!["run".to_string(), "variant".to_string()];
    columns.extend(grid.grid.keys().cloned());
    columns.extend(
        [
            "val loss",
            "val ppl",
            "val accuracy",
            "tokens seen",
            "tokens/s",
            "peak MiB",
            "parameters",
            "wall s",
        ]
        .map(String::from),
    );
    let mut table = Table { columns, rows: Vec::new() };
    for planned in plan {
        let dir = out.join(&planned.name);
        let mut row = vec![planned.name.clone(), planned.variant.clone()];
        row.extend(planned.axes.iter().map(|(_, v)| v.clone()));
        if !RunDir::new(&dir).metrics_path().is_file() {
            row.resize(table.columns.len(), "not run".into());
            table.rows.push(row);
            continue;
        }
        let metrics = read_run(&dir)?;
        let record: Option<RunRecord> = std::fs::read_to_string(dir.join("sweep.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let (tokens, loss) = metrics.val_loss.last().copied().unwrap_or((0.0, f64::NAN));
        row.extend([
            format!("{loss:.4}"),
            format!("{:.2}", loss.exp()),
            metrics.val_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
            format!("{tokens:.0}"),
            metrics.tokens_per_sec.map_or("-".into(), |r| format!("{r:.0}")),
            record
                .as_ref()
                .map_or("-".into(), |r| format!("{:.0}", r.peak_bytes as f64 / 1048576.0)),
            record.as_ref().map_or("-".into(), |r| r.parameters.to_string()),
            record.as_ref().map_or("-".into(), |r| format!("{:.0}", r.wall_seconds)),
        ]);
        table.rows.push(row);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_times_axes_in_a_fixed_order() {
        let grid: Grid = toml::from_str(
            r#"
            [variants.soft]
            "model.attention.kind" = "softmax"
            [variants.sketch]
            "model.attention.kind" = "polysketch"
            "model.attention.sketch_dim" = 8
            [grid]
            "run.seed" = [1, 2]
            context = [
                { name = "short", "train.seq_len" = 64, "train.batch_size" = 4 },
                { "train.seq_len" = 128, "train.batch_size" = 2 },
            ]
            "#,
        )
        .unwrap();
        let plan = grid.plan();
        assert_eq!(plan.len(), 8);
        assert_eq!(plan[0].name, "sketch_context-short_seed-1");
        assert_eq!(
            plan[0].overrides,
            [
                "model.attention.kind=\"polysketch\"",
                "model.attention.sketch_dim=8",
                "train.batch_size=4",
                "train.seq_len=64",
                "run.seed=1",
            ]
        );
        assert_eq!(plan[2].name, "sketch_context-2-128_seed-1");
        let names: std::collections::HashSet<_> = plan.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), 8, "run names must be unique");
    }

    #[test]
    fn an_empty_grid_is_one_run() {
        let plan = Grid::default().plan();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].name, "run");
    }
}
