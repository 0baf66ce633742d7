//! `polysketch`: train, evaluate and sample GPT-style language models with PolySketch attention.

mod backend;
mod config;
mod error;
mod eval;
mod generate;
mod grads;
mod progress;
mod run_dir;
mod session;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use crate::backend::DeviceKind;
use crate::config::RunConfig;
use crate::error::CliError;
use crate::generate::SampleOptions;
use crate::run_dir::RunDir;
use crate::train::TrainOptions;

// Tensor ops allocate and free large buffers at a high rate; glibc returns them to the kernel and
// pays page faults on every reuse, mimalloc keeps them.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped: purging it makes the next step fault every page in again, which
/// cost about a third of a CPU training step.
fn keep_freed_memory() {
    // SAFETY: setting an option is a plain store inside mimalloc, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Train, evaluate and sample GPT-style language models with PolySketch attention.
#[derive(Parser, Debug)]
#[command(name = "polysketch", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model from a config file (or continue a run with --resume).
    Train {
        /// Run config (TOML), e.g. configs/tiny.toml.
        #[arg(long, value_name = "FILE", required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Override one setting, e.g. --set model.attention.kind=softmax; repeatable.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue the newest checkpoint of this run directory with its saved config.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "overrides"])]
        resume: Option<PathBuf>,
        /// Device to train on.
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Print validation loss and perplexity of a run's newest checkpoint.
    Eval {
        /// Run directory written by `polysketch train`.
        #[arg(long, value_name = "RUN_DIR")]
        run: PathBuf,
        /// Evaluate at most this many validation batches (default: the whole split).
        #[arg(long, value_name = "N")]
        max_batches: Option<usize>,
        /// Device to evaluate on.
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Sample text from a run's newest checkpoint.
    Generate {
        /// Run directory written by `polysketch train`.
        #[arg(long, value_name = "RUN_DIR")]
        run: PathBuf,
        /// Prompt text; read from standard input when absent.
        #[arg(long)]
        prompt: Option<String>,
        /// Number of tokens to generate.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// Sampling temperature; 0 always picks the most likely token.
        #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
        temperature: f64,
        /// Sample only among the k most likely tokens (0: no limit).
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// Sample only among the most likely tokens whose probabilities sum to p.
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Device to run on.
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
}

fn device_name(kind: DeviceKind) -> String {
    format!("{kind:?}").to_lowercase()
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Train { config, overrides, resume, device } => {
            let (config, resume) = match (resume, config) {
                (Some(dir), _) => (RunDir::new(dir).load_config()?, true),
                (None, Some(path)) => (RunConfig::load(&path, &overrides)?, false),
                (None, None) => unreachable!("clap requires --config or --resume"),
            };
            config.validate()?;
            let options = TrainOptions { resume, device_name: device_name(device) };
            on_device!(device, train::train, config, options)
        }
        Command::Eval { run, max_batches, device } => {
            on_device!(device, eval::eval, &run, max_batches)
        }
        Command::Generate { run, prompt, max_tokens, temperature, top_k, top_p, seed, device } => {
            if !(0.0..=1.0).contains(&top_p) || temperature < 0.0 {
                return Err(CliError::Config(
                    "--top-p must be in [0, 1] and --temperature at least 0".into(),
                ));
            }
            let options = SampleOptions { prompt, max_tokens, temperature, top_k, top_p, seed };
            on_device!(device, generate::generate, &run, options)
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                CliError::Interrupted(_) => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
