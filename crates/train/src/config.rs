//! Run configuration: TOML files, `--set` overrides, validation and the settings table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use polysketch_data::TaskSpec;
use polysketch_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::error::CliError;

/// Where a run lives and how it is seeded: the `[run]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Run directory: resolved config, tokenizer, checkpoints and metrics.
    pub dir: PathBuf,
    /// Seed of parameter initialisation and batch sampling.
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        Self { dir: PathBuf::from("runs/default"), seed: 42 }
    }
}

/// Corpus and tokenizer: the `[data]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Folder of `.txt` documents.
    pub dir: PathBuf,
    /// A `tokenizer.json` to use; when absent a byte-level BPE is trained on the training split.
    pub tokenizer: Option<PathBuf>,
    /// A synthetic retrieval task instead of text (`[data.task]`, `kind = "selective_copying"`
    /// or `"associative_recall"`, with `symbols` and `items`); the text settings are then unused.
    pub task: Option<TaskSpec>,
    /// Vocabulary size of a trained tokenizer.
    pub vocab_size: usize,
    /// Share of the corpus, in bytes of whole documents, held out for validation.
    pub val_fraction: f64,
    /// Seed of the document split.
    pub split_seed: u64,
    /// Folder of cached token files, shared between runs.
    pub cache_dir: PathBuf,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/gutenberg"),
            tokenizer: None,
            task: None,
            vocab_size: 8192,
            val_fraction: 0.05,
            split_seed: 0,
            cache_dir: PathBuf::from("runs/cache"),
        }
    }
}

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine from `lr` to `min_lr`.
    Cosine,
    /// Linear from `lr` to `min_lr`.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// Optimisation: the `[train]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Context length of training windows.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    /// Steps of linear warmup from zero.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// Largest global gradient norm over all parameters; 0 disables clipping.
    pub grad_clip: f64,
    /// Steps between log lines.
    pub log_every: u64,
    /// Steps between validations.
    pub eval_every: u64,
    /// Validation batches per evaluation during training.
    pub eval_batches: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk, newest first.
    pub keep_checkpoints: usize,
    /// Skip an optimizer step whose loss or gradient is not finite instead of stopping.
    pub skip_nonfinite_steps: bool,
    /// Recompute every decoder block during the backward pass, keeping only block inputs
    /// between the passes: activation memory of a few `seq × d_model` tensors per layer, for
    /// long contexts, at the cost of a second forward pass. Needs `model.dropout = 0`.
    pub recompute: bool,
    /// Positions per slice of the token-wise work (projections, sketch networks, feed-forward,
    /// logits) when `recompute` is on; smaller slices use less memory.
    pub recompute_chunk: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            seq_len: 256,
            batch_size: 16,
            grad_accum: 1,
            steps: 1000,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            skip_nonfinite_steps: false,
            recompute: false,
            recompute_chunk: 2048,
        }
    }
}

/// A whole run configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// `[run]`
    pub run: RunSection,
    /// `[data]`
    pub data: DataSection,
    /// `[model]`, with `[model.attention]`
    pub model: ModelConfig,
    /// `[train]`
    pub train: TrainSection,
}

/// Parses `text` as a TOML value, or keeps it as a string when it is not one (`kind=softmax`).
fn parse_value(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").unwrap_or_else(|| toml::Value::String(text.into())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies one `section.key=value` override to a parsed config.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), CliError> {
    let bad = |why: &str| {
        CliError::Config(format!(
            "--set {assignment}: {why}; write --set section.key=value, e.g. \
             --set model.attention.kind=softmax"
        ))
    };
    let (path, value) = assignment.split_once('=').ok_or_else(|| bad("missing `=`"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        return Err(bad("the key needs a section and a name"));
    }
    let mut node = table;
    for key in &keys[..keys.len() - 1] {
        let entry =
            node.entry(key.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| bad(&format!("`{key}` is not a table")))?;
    }
    node.insert(keys[keys.len() - 1].to_string(), parse_value(value.trim()));
    Ok(())
}

impl RunConfig {
    /// Reads a config file and applies `--set` overrides. Errors name the file, the line and
    /// the key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::Config(format!(
                "cannot read config file `{}`: {e}; pass an existing file, e.g. \
                 --config configs/tiny.toml",
                path.display()
            ))
        })?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// Parses config text (named `origin` in errors) and applies overrides.
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self, CliError> {
        let file_error = |e: toml::de::Error| CliError::Config(format!("{origin}: {e}"));
        // the typed parse first, so mistakes in the file come with line and column
        toml::from_str::<RunConfig>(text).map_err(file_error)?;
        if overrides.is_empty() {
            return toml::from_str(text).map_err(file_error);
        }
        let mut table: toml::Table = text.parse().map_err(file_error)?;
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let message = e.to_string().trim().replace('\n', " ");
            CliError::Config(format!(
                "{origin} with --set {}: {message}",
                overrides.join(" --set ")
            ))
        })
    }

    /// Checks every value that the typed parse cannot.
    pub fn validate(&self) -> Result<(), CliError> {
        let t = &self.train;
        let bad = |key: &str, why: String| Err(CliError::Config(format!("{key}: {why}")));
        for (key, value) in [
            ("train.seq_len", t.seq_len as u64),
            ("train.batch_size", t.batch_size as u64),
            ("train.grad_accum", t.grad_accum as u64),
            ("train.steps", t.steps),
            ("train.log_every", t.log_every),
            ("train.eval_every", t.eval_every),
            ("train.eval_batches", t.eval_batches as u64),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep_checkpoints", t.keep_checkpoints as u64),
            ("train.recompute_chunk", t.recompute_chunk as u64),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", format!("must be a positive number, got {}", t.lr));
        }
        if !(t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return bad("train.min_lr", format!("must be in [0, lr = {}], got {}", t.lr, t.min_lr));
        }
        for (key, beta) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, format!("must be in [0, 1), got {beta}"));
            }
        }
        if !(t.weight_decay >= 0.0 && t.grad_clip >= 0.0) {
            return bad("train.weight_decay / train.grad_clip", "must not be negative".into());
        }
        if t.recompute && self.model.dropout != 0.0 {
            return bad(
                "train.recompute",
                format!(
                    "recomputed blocks would draw new dropout masks, so model.dropout must be 0 \
                     (got {}); set model.dropout = 0 or train.recompute = false",
                    self.model.dropout
                ),
            );
        }
        let f = self.data.val_fraction;
        if !(f > 0.0 && f < 1.0) {
            return bad("data.val_fraction", format!("must be between 0 and 1, got {f}"));
        }
        if self.data.tokenizer.is_none() && self.data.vocab_size < polysketch_data::MIN_VOCAB_SIZE {
            return bad(
                "data.vocab_size",
                format!(
                    "must be at least {} for a byte-level BPE, got {}",
                    polysketch_data::MIN_VOCAB_SIZE,
                    self.data.vocab_size
                ),
            );
        }
        if let Some(task) = &self.data.task {
            task.validate(t.seq_len)?;
        }
        // sizes that need no vocabulary are checked before any data is read
        self.model.resolve(polysketch_data::MIN_VOCAB_SIZE, t.seq_len)?;
        Ok(())
    }

    /// The config as TOML, as written into the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a run config always serialises")
    }

    /// `key = value` lines of every resolved setting, for the start-of-run table.
    pub fn settings_table(&self, extra: &[(&str, String)]) -> String {
        let value = toml::Value::try_from(self).expect("a run config always serialises");
        let mut rows = Vec::new();
        flatten("", &value, &mut rows);
        rows.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in rows {
            let _ = writeln!(out, "  {key:<width$}  {value}");
        }
        out
    }
}

fn flatten(prefix: &str, value: &toml::Value, rows: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&name, v, rows);
            }
        }
        other => rows.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<RunConfig, CliError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::from_toml(text, "test.toml", &sets)
    }

    #[test]
    fn overrides_reach_nested_keys_and_parse_values() {
        let cfg = load(
            "[train]\nsteps = 5\n",
            &["model.attention.kind=softmax", "train.lr=1e-4", "run.dir=runs/x"],
        )
        .unwrap();
        assert_eq!(cfg.model.attention.kind, polysketch_attention::AttentionKind::Softmax);
        assert_eq!(cfg.train.lr, 1e-4);
        assert_eq!(cfg.train.steps, 5);
        assert_eq!(cfg.run.dir, PathBuf::from("runs/x"));
    }

    #[test]
    fn unknown_keys_and_syntax_errors_are_reported_with_their_place() {
        let err = load("[train]\nstepz = 5\n", &[]).unwrap_err().to_string();
        assert!(err.contains("stepz") && err.contains("line 2"), "{err}");
        let err = load("[train\n", &[]).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = load("", &["train.nope=1"]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let err = load("", &["train.steps"]).unwrap_err().to_string();
        assert!(err.contains("missing `=`"), "{err}");
        let err = load("[train]\nsteps = \"many\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        for set in [
            "model.attention.degree=3",
            "model.attention.sketch_dim=0",
            "model.attention.block_size=0",
            "model.attention.block_size=100000",
            "model.heads=3",
            "train.batch_size=0",
            "train.lr=-1",
            "data.val_fraction=1.5",
        ] {
            let cfg = load("", &[set]).unwrap();
            assert!(cfg.validate().is_err(), "{set} was accepted");
        }
        assert!(load("", &[]).unwrap().validate().is_ok());
    }

    #[test]
    fn every_run_config_of_the_repository_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            // grid files of `polysketch sweep` are not run configs
            if path.extension().is_none_or(|e| e != "toml") || text.contains("\n[grid]") {
                continue;
            }
            let cfg = RunConfig::load(&path, &[]).unwrap();
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
        assert!(checked >= 5, "only {checked} configs found in {}", dir.display());
    }

    #[test]
    fn recomputation_needs_dropout_off_and_a_positive_chunk() {
        let cfg = load("", &["train.recompute=true", "model.dropout=0.1"]).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("train.recompute") && err.contains("model.dropout"), "{err}");
        let cfg = load("", &["train.recompute=true", "train.recompute_chunk=0"]).unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("recompute_chunk"));
        let cfg = load("", &["train.recompute=true", "train.recompute_chunk=64"]).unwrap();
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn resolved_config_round_trips_through_toml() {
        let cfg = load("", &["model.attention.sketch=gaussian"]).unwrap();
        let again = load(&cfg.to_toml(), &[]).unwrap();
        assert_eq!(cfg, again);
    }
}
