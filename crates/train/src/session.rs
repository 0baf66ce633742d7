//! What every command needs: the corpus with its tokenizer, and models built or restored from a
//! run.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use polysketch_data::{
    eval_batches, load_corpus_dir, load_or_build_tokens, split_documents, TaskSpec, TextTokenizer,
    TokenBatch, TokenSplits, WindowSampler,
};
use polysketch_model::{LanguageModel, ModelDims};

use crate::config::RunConfig;
use crate::error::CliError;
use crate::run_dir::{RunDir, TrainState};

/// The recorder of every checkpoint file.
pub type CheckpointRecorder = BinBytesRecorder<FullPrecisionSettings>;

/// Token streams of both splits and the tokenizer that made them.
pub struct Corpus {
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// Training and validation tokens.
    pub splits: TokenSplits,
}

/// Which tokenizer a command uses.
pub enum TokenizerSource<'a> {
    /// What the config says: a given `tokenizer.json`, or a BPE trained on the training split.
    FromConfig,
    /// The tokenizer saved in a run directory.
    File(&'a Path),
}

/// Loads and splits the corpus, obtains the tokenizer and the (cached) token streams.
pub fn prepare_corpus(
    config: &RunConfig,
    source: TokenizerSource<'_>,
    log: &dyn Fn(&str),
) -> Result<Corpus, CliError> {
    let started = Instant::now();
    let data = &config.data;
    let documents = load_corpus_dir(&data.dir)?;
    let bytes: usize = documents.iter().map(|d| d.text.len()).sum();
    let count = documents.len();
    let (train, val) = split_documents(documents, data.val_fraction, data.split_seed)?;
    let names: Vec<&str> = val.iter().map(|d| d.name.as_str()).collect();
    log(&format!(
        "corpus: {count} documents, {:.1} MB from `{}`; validation: {}",
        bytes as f64 / 1e6,
        data.dir.display(),
        names.join(", ")
    ));
    let tokenizer = match (source, &data.tokenizer) {
        (TokenizerSource::File(path), _) => TextTokenizer::from_file(path)?,
        (TokenizerSource::FromConfig, Some(path)) => TextTokenizer::from_file(path)?,
        (TokenizerSource::FromConfig, None) => {
            let t = Instant::now();
            let tok = TextTokenizer::train_bpe(&train, data.vocab_size)?;
            log(&format!(
                "tokenizer: trained a byte-level BPE of {} tokens in {:.1}s",
                tok.vocab_size(),
                t.elapsed().as_secs_f64()
            ));
            tok
        }
    };
    let (splits, path, hit) = load_or_build_tokens(&data.cache_dir, &tokenizer, &train, &val)?;
    log(&format!(
        "tokens: {} train, {} validation ({} `{}`) in {:.1}s",
        splits.train.len(),
        splits.val.len(),
        if hit { "cached in" } else { "written to" },
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Corpus { tokenizer, splits })
}

/// Where training batches come from.
pub enum Batches {
    /// Random windows of the training split.
    Text(WindowSampler),
    /// Fresh examples of a synthetic task.
    Task {
        /// The task.
        spec: TaskSpec,
        /// Tokens per example.
        seq_len: usize,
        /// The run's seed.
        seed: u64,
    },
}

impl Batches {
    /// Training batch number `index`: the same for the same seed, index and size.
    pub fn batch(&self, index: u64, batch_size: usize) -> TokenBatch {
        match self {
            Batches::Text(sampler) => sampler.batch(index, batch_size),
            Batches::Task { spec, seq_len, seed } => {
                spec.batch(*seq_len, *seed, index * batch_size as u64, batch_size)
            }
        }
    }
}

/// Everything a run trains and validates on.
pub struct TrainData {
    /// Text tokenizer, or the task's word-level one.
    pub tokenizer: TextTokenizer,
    /// Training batches.
    pub train: Batches,
    /// Validation batches.
    pub val: Vec<TokenBatch>,
}

/// Seed of every task run's validation examples, whatever the run's seed: runs that differ
/// only in seed are scored on the same examples, none of which they trained on.
const TASK_VALIDATION_SEED: u64 = 0x7A5C_5EED_0000_0001;

/// Loads (or generates) the data of a run. `val_batches` limits the validation batches (for
/// text, `None` means the whole validation split; for tasks, `train.eval_batches`).
pub fn prepare_data(
    config: &RunConfig,
    source: TokenizerSource<'_>,
    val_batches: Option<usize>,
    log: &dyn Fn(&str),
) -> Result<TrainData, CliError> {
    let t = &config.train;
    if let Some(spec) = config.data.task {
        let tokenizer = match source {
            TokenizerSource::File(path) => TextTokenizer::from_file(path)?,
            TokenizerSource::FromConfig => spec.tokenizer()?,
        };
        let count = val_batches.unwrap_or(t.eval_batches);
        let val = (0..count)
            .map(|i| {
                spec.batch(t.seq_len, TASK_VALIDATION_SEED, (i * t.batch_size) as u64, t.batch_size)
            })
            .collect();
        log(&format!(
            "task: {:?} with {} items over {} symbols, {} tokens per example",
            spec.kind, spec.items, spec.symbols, t.seq_len
        ));
        let train = Batches::Task { spec, seq_len: t.seq_len, seed: config.run.seed };
        return Ok(TrainData { tokenizer, train, val });
    }
    let corpus = prepare_corpus(config, source, log)?;
    let val = eval_batches(&corpus.splits.val, t.seq_len, t.batch_size, val_batches)?;
    let sampler = WindowSampler::new(Arc::new(corpus.splits.train), t.seq_len, config.run.seed)?;
    Ok(TrainData { tokenizer: corpus.tokenizer, train: Batches::Text(sampler), val })
}

/// Resolved model sizes for a tokenizer.
pub fn model_dims(config: &RunConfig, tokenizer: &TextTokenizer) -> Result<ModelDims, CliError> {
    Ok(config.model.resolve(tokenizer.vocab_size(), config.train.seq_len)?)
}

/// A fresh model of the run's config.
pub fn new_model<B: Backend>(
    config: &RunConfig,
    dims: &ModelDims,
    device: &B::Device,
) -> LanguageModel<B> {
    LanguageModel::new(dims, &config.model.attention, config.model.dropout, device)
}

/// Hex form of a tokenizer fingerprint, as stored in checkpoints.
pub fn fingerprint_hex(tokenizer: &TextTokenizer) -> String {
    format!("{:016x}", tokenizer.fingerprint())
}

/// Runs `f`, turning a panic into `Err` without printing it: Burn panics instead of returning
/// errors on some damaged records, and a damaged checkpoint is user input.
pub fn without_panics<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(previous_hook);
    result.map_err(|_| ())
}

/// Decodes a checkpoint file's bytes into a record.
pub fn load_record_bytes<R: burn::record::Record<B>, B: Backend>(
    bytes: Vec<u8>,
    device: &B::Device,
) -> Result<R, String> {
    without_panics(|| CheckpointRecorder::default().load(bytes, device))
        .map_err(|_| "it is truncated or not a checkpoint".to_string())?
        .map_err(|e| e.to_string())
}

/// Shapes of every float parameter and state tensor, in visiting order.
struct Shapes(Vec<Vec<usize>>);

impl<B: Backend> ModuleVisitor<B> for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().dims().to_vec());
    }
}

fn shapes<B: Backend>(model: &LanguageModel<B>) -> Vec<Vec<usize>> {
    let mut shapes = Shapes(Vec::new());
    model.visit(&mut shapes);
    shapes.0
}

/// Restores the newest checkpoint of a run: the model, its progress and the checkpoint folder.
pub fn load_checkpoint<B: Backend>(
    run: &RunDir,
    config: &RunConfig,
    tokenizer: &TextTokenizer,
    device: &B::Device,
) -> Result<(LanguageModel<B>, TrainState, PathBuf), CliError> {
    let (state, bytes, dir) = run.latest_checkpoint()?;
    if state.tokenizer_fingerprint != fingerprint_hex(tokenizer)
        || state.vocab != tokenizer.vocab_size()
    {
        return Err(CliError::Run(format!(
            "the tokenizer `{}` ({} tokens) is not the one checkpoint `{}` was trained with \
             ({} tokens); restore the run's original tokenizer.json",
            run.tokenizer_path().display(),
            tokenizer.vocab_size(),
            dir.display(),
            state.vocab
        )));
    }
    let dims = model_dims(config, tokenizer)?;
    let damaged = |what: String| {
        CliError::Run(format!(
            "cannot load `{}`: {what}; the file is damaged or from another model, delete that \
             checkpoint folder to fall back to the previous one",
            dir.join("model.bin").display()
        ))
    };
    let record = load_record_bytes(bytes, device).map_err(damaged)?;
    let fresh = new_model(config, &dims, device);
    let expected = shapes(&fresh);
    let model = without_panics(|| fresh.load_record(record))
        .map_err(|_| damaged("its contents do not fit this model".into()))?;
    let found = shapes(&model);
    if found != expected {
        return Err(CliError::Run(format!(
            "checkpoint `{}` holds a model of another shape than `{}` describes \
             ({} tensors, first difference {:?} vs {:?}); evaluate it with the config it was \
             trained with",
            dir.display(),
            run.config_path().display(),
            found.len(),
            found.iter().zip(&expected).find(|(a, b)| a != b).map(|(a, _)| a),
            found.iter().zip(&expected).find(|(a, b)| a != b).map(|(_, b)| b),
        )));
    }
    Ok((model, state, dir))
}
