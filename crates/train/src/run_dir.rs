//! The run directory: resolved config, tokenizer, checkpoints and metrics, written atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::CliError;

/// Progress recorded with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Fingerprint of the run's tokenizer.
    pub tokenizer_fingerprint: String,
    /// Vocabulary size the model was built with.
    pub vocab: usize,
}

/// Paths of one run.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| CliError::io("rename into", path, e))
}

/// Writes `bytes` to `path` and waits until they are on disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let mut file = File::create(path).map_err(|e| CliError::io("create", path, e))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| CliError::io("write", path, e))
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl RunDir {
    /// The run at `root`, which need not exist yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The run's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.toml`: the resolved config of the run.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// `tokenizer.json`: the run's tokenizer.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    /// `metrics.jsonl`: one JSON object per log step and per evaluation.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// `checkpoints/`
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Refuses a folder that already holds a run.
    pub fn check_free(&self) -> Result<(), CliError> {
        if self.config_path().exists() {
            return Err(CliError::Run(format!(
                "`{}` already holds a run; continue it with `polysketch train --resume {0}`, or \
                 start a new one elsewhere with --set run.dir=runs/NEW_NAME",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Starts a fresh run; refuses a folder that already holds one.
    pub fn create(&self, config: &RunConfig) -> Result<(), CliError> {
        self.check_free()?;
        fs::create_dir_all(self.checkpoints_dir())
            .map_err(|e| CliError::io("create the run directory", &self.root, e))?;
        write_atomic(&self.config_path(), config.to_toml().as_bytes())
    }

    /// Reads the resolved config of an existing run.
    pub fn load_config(&self) -> Result<RunConfig, CliError> {
        if !self.root.is_dir() {
            return Err(CliError::Run(format!(
                "run directory `{}` does not exist; pass the run.dir of a training run",
                self.root.display()
            )));
        }
        let path = self.config_path();
        if !path.is_file() {
            return Err(CliError::Run(format!(
                "`{}` holds no config.toml, so it is not a run directory; pass the run.dir of a \
                 training run",
                self.root.display()
            )));
        }
        RunConfig::load(&path, &[])
    }

    /// Saves a checkpoint as one directory renamed into place, then prunes old ones.
    pub fn save_checkpoint(
        &self,
        state: &TrainState,
        model: &[u8],
        optimizer: &[u8],
        keep: usize,
    ) -> Result<PathBuf, CliError> {
        let dir = self.checkpoints_dir();
        let final_path = dir.join(step_dir_name(state.step));
        let tmp = dir.join(format!(".tmp-{}", step_dir_name(state.step)));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| CliError::io("remove", &tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| CliError::io("create", &tmp, e))?;
        let state_json = serde_json::to_vec_pretty(state).expect("state serialises");
        for (name, bytes) in
            [("model.bin", model), ("optimizer.bin", optimizer), ("state.json", &state_json[..])]
        {
            write_synced(&tmp.join(name), bytes)?;
        }
        if final_path.exists() {
            fs::remove_dir_all(&final_path).map_err(|e| CliError::io("replace", &final_path, e))?;
        }
        fs::rename(&tmp, &final_path).map_err(|e| CliError::io("rename into", &final_path, e))?;
        let mut steps = self.checkpoint_steps()?;
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for old in steps.into_iter().skip(keep.max(1)) {
            let path = dir.join(step_dir_name(old));
            fs::remove_dir_all(&path)
                .map_err(|e| CliError::io("remove old checkpoint", &path, e))?;
        }
        Ok(final_path)
    }

    /// Steps of the complete checkpoints on disk.
    pub fn checkpoint_steps(&self) -> Result<Vec<u64>, CliError> {
        let dir = self.checkpoints_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CliError::io("list", &dir, e)),
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .collect())
    }

    /// The newest checkpoint: its state and the bytes of model and optimizer.
    pub fn latest_checkpoint(&self) -> Result<(TrainState, Vec<u8>, PathBuf), CliError> {
        let step = self.checkpoint_steps()?.into_iter().max().ok_or_else(|| {
            CliError::Run(format!(
                "`{}` holds no checkpoint yet; train longer (train.checkpoint_every) first",
                self.root.display()
            ))
        })?;
        let dir = self.checkpoints_dir().join(step_dir_name(step));
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|e| CliError::io("read checkpoint file", &path, e))
        };
        let state: TrainState = serde_json::from_slice(&read("state.json")?).map_err(|e| {
            CliError::Run(format!(
                "checkpoint `{}` has a damaged state.json ({e}); delete that folder to fall back \
                 to the previous checkpoint",
                dir.display()
            ))
        })?;
        Ok((state, read("model.bin")?, dir))
    }

    /// Removes checkpoint folders that a crash left half written.
    pub fn remove_partial_checkpoints(&self) -> Result<(), CliError> {
        let dir = self.checkpoints_dir();
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(()) };
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|e| CliError::io("remove", &path, e))?;
            }
        }
        Ok(())
    }

    /// Drops records after `step` (and any line a crash cut short) from `metrics.jsonl`, so a
    /// resumed run continues the log without duplicates.
    pub fn truncate_metrics(&self, step: u64) -> Result<(), CliError> {
        let path = self.metrics_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CliError::io("read", &path, e)),
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        if kept.len() != text.len() {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Opens `metrics.jsonl` for appending.
    pub fn metrics(&self) -> Result<MetricsLog, CliError> {
        let path = self.metrics_path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CliError::io("open", &path, e))?;
        Ok(MetricsLog { file, path })
    }
}

/// Append-only JSON-lines log.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Appends one JSON object as a line and flushes it.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<(), CliError> {
        let mut line = record.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| CliError::io("append to", &self.path, e))
    }
}
