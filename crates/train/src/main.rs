//! `polysketch`: train, evaluate and sample GPT-style language models with PolySketch attention.

mod alloc;
mod backend;
mod bench;
mod config;
mod error;
mod eval;
mod generate;
mod grads;
mod plot;
mod progress;
mod report;
mod run_dir;
mod session;
mod sweep;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend::DeviceKind;
use crate::bench::{BenchKind, BenchOptions, PresetArg, Variant};
use crate::config::RunConfig;
use crate::error::CliError;
use crate::generate::SampleOptions;
use crate::run_dir::RunDir;
use crate::train::TrainOptions;

// Tensor ops allocate and free large buffers at a high rate; glibc returns them to the kernel and
// pays page faults on every reuse, mimalloc keeps them. The wrapper counts live bytes for the
// peak-memory column of `polysketch bench`.
#[global_allocator]
static GLOBAL: alloc::CountingAllocator = alloc::CountingAllocator;

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
    /// Measure speed and peak memory of the attention variants against context length.
    Bench(BenchArgs),
    /// Train one run per combination of a grid file's overrides, then summarise and plot them.
    Sweep {
        /// Base run config (TOML), e.g. configs/tiny.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Grid file: [variants.NAME] override sets and [grid] axes (see configs/ablation.toml).
        #[arg(long, value_name = "FILE")]
        grid: PathBuf,
        /// Override a setting of every run, e.g. --set train.eval_batches=2; repeatable.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Folder for the runs, summary.md, summary.csv and the charts.
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
        /// Train nothing: summarise and plot the runs that exist so far.
        #[arg(long)]
        summary_only: bool,
        /// Device to train on.
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Draw validation loss against tokens seen, and tokens/s against context length, for runs.
    Plot {
        /// Run directories written by `polysketch train`.
        #[arg(required_unless_present = "bench", value_name = "RUN_DIR")]
        runs: Vec<PathBuf>,
        /// Instead of runs: redraw the chart of a `polysketch bench` table (KIND.csv) as
        /// KIND.svg beside it.
        #[arg(long, value_name = "CSV", conflicts_with = "runs")]
        bench: Option<PathBuf>,
        /// Folder for val_loss.svg and tokens_per_sec.svg.
        #[arg(long, default_value = "plots")]
        out: PathBuf,
    },
}

/// Arguments of `polysketch bench`.
#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// layer: one attention layer, forward + backward; step: a whole training step; decode:
    /// tokens/s of token-by-token generation after a prompt.
    #[arg(value_enum)]
    kind: BenchKind,
    /// Context (prompt) lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192,16384,32768")]
    contexts: Vec<usize>,
    /// Attention variants, comma-separated; softmax is the baseline of every ratio.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "softmax,polynomial,polysketch-random,polysketch-learned-local"
    )]
    variants: Vec<Variant>,
    /// Heads (layer benchmark).
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Features per head (layer benchmark).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Model size (step and decode benchmarks).
    #[arg(long, value_enum, default_value = "tiny")]
    preset: PresetArg,
    /// Vocabulary size (step and decode benchmarks).
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Sequences per batch (layer and step benchmarks).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Sketch size r.
    #[arg(long, default_value_t = 32)]
    sketch_dim: usize,
    /// Block size b.
    #[arg(long, default_value_t = 256)]
    block_size: usize,
    /// Degree of polynomial and exact local weights.
    #[arg(long, default_value_t = 4)]
    degree: u32,
    /// Tokens decoded per timed run (decode benchmark).
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Step benchmark: recompute every block during the backward pass, as `train.recompute`
    /// does (activation memory of a few `seq × d_model` tensors per layer).
    #[arg(long)]
    recompute: bool,
    /// Positions per slice of the token-wise work when recomputing.
    #[arg(long, default_value_t = 2048, requires = "recompute")]
    recompute_chunk: usize,
    /// Repeat timed runs after the warm-up run until they add up to this many seconds (at least
    /// one); 0 times the warm-up run alone, for long contexts where one run takes minutes.
    #[arg(long, default_value_t = 3.0)]
    min_seconds: f64,
    /// Skip a variant's longer contexts once its warm-up run takes longer than this.
    #[arg(long, default_value_t = 600.0)]
    max_seconds: f64,
    /// Folder for KIND.md, KIND.csv and KIND.svg.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Device to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
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
        Command::Sweep { config, grid, overrides, out, summary_only, device } => {
            sweep::sweep(&config, &grid, &overrides, &out, summary_only, |config, resume| {
                let options = TrainOptions { resume, device_name: device_name(device) };
                on_device!(device, train::train, config, options)
            })
        }
        Command::Plot { bench: Some(csv), .. } => {
            println!("wrote {}", bench::redraw(&csv)?.display());
            Ok(())
        }
        Command::Plot { runs, out, bench: None } => {
            for path in plot::plot(&runs, &out)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench(a) => {
            let options = BenchOptions {
                kind: a.kind,
                contexts: a.contexts,
                variants: a.variants,
                heads: a.heads,
                head_dim: a.head_dim,
                preset: a.preset,
                vocab: a.vocab,
                batch: a.batch,
                sketch_dim: a.sketch_dim,
                block_size: a.block_size,
                degree: a.degree,
                decode_tokens: a.decode_tokens,
                recompute_chunk: a.recompute.then_some(a.recompute_chunk),
                min_seconds: a.min_seconds,
                max_seconds: a.max_seconds,
                out: a.out,
                device_name: device_name(a.device),
            };
            on_device!(a.device, bench::bench, options)
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
