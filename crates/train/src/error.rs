//! One error type for the command line: every message says what is wrong and what to do.

use polysketch_data::DataError;
use polysketch_model::ModelConfigError;

/// Anything that stops a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A config file or `--set` value that cannot be used.
    #[error("config error: {0}")]
    Config(String),
    /// An impossible model size or attention setting.
    #[error("config error: {0}")]
    Model(#[from] ModelConfigError),
    /// Corpus, tokenizer or token cache trouble.
    #[error("data error: {0}")]
    Data(#[from] DataError),
    /// A run directory or checkpoint that cannot be used.
    #[error("run error: {0}")]
    Run(String),
    /// A device that this binary or this machine cannot provide.
    #[error("device error: {0}")]
    Device(String),
    /// Stopped by Ctrl-C or SIGTERM after saving a checkpoint.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// Training went numerically wrong.
    #[error("training stopped: {0}")]
    Diverged(String),
}

impl CliError {
    /// An I/O failure on `path` while doing `action`.
    pub fn io(action: &str, path: &std::path::Path, err: std::io::Error) -> Self {
        CliError::Run(format!("cannot {action} `{}`: {err}", path.display()))
    }
}
