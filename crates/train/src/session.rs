//! What every command needs: the corpus with its tokenizer, and models built or restored from a
//! run.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use polysketch_data::{
    load_corpus_dir, load_or_build_tokens, split_documents, TextTokenizer, TokenSplits,
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

/// Restores the newest checkpoint of a run.
pub fn load_checkpoint<B: Backend>(
    run: &RunDir,
    config: &RunConfig,
    tokenizer: &TextTokenizer,
    device: &B::Device,
) -> Result<(LanguageModel<B>, TrainState), CliError> {
    let (state, bytes, dir) = run.latest_checkpoint()?;
    if state.tokenizer_fingerprint != fingerprint_hex(tokenizer)
        || state.vocab != tokenizer.vocab_size()
    {
        return Err(CliError::Run(format!(
            "the tokenizer `{}` is not the one checkpoint `{}` was trained with; restore the \
             run's original tokenizer.json",
            run.tokenizer_path().display(),
            dir.display()
        )));
    }
    let dims = model_dims(config, tokenizer)?;
    let record = CheckpointRecorder::default().load(bytes, device).map_err(|e| {
        CliError::Run(format!(
            "cannot read `{}`: {e}; the file is damaged, delete that checkpoint folder to fall \
             back to the previous one",
            dir.join("model.bin").display()
        ))
    })?;
    Ok((new_model(config, &dims, device).load_record(record), state))
}
