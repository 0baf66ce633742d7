//! `polysketch eval`: validation loss and perplexity of a run's newest checkpoint.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use polysketch_attention::PolysketchBackend;
use polysketch_data::{eval_batches, TokenBatch};
use polysketch_model::LanguageModel;

use crate::error::CliError;
use crate::run_dir::RunDir;
use crate::session::{load_checkpoint, prepare_corpus, TokenizerSource};

/// Mean next-token loss in nats over every token of `batches`.
pub fn mean_loss<B: PolysketchBackend>(
    model: &LanguageModel<B>,
    batches: &[TokenBatch],
    device: &B::Device,
) -> f64 {
    let (mut total, mut count) = (0.0, 0usize);
    for batch in batches {
        let (inputs, targets) = batch.to_tensors::<B>(device);
        let loss: f64 = model.loss(inputs, targets).into_scalar().elem();
        let tokens = batch.batch_size * batch.seq_len;
        total += loss * tokens as f64;
        count += tokens;
    }
    total / count.max(1) as f64
}

/// Evaluates the newest checkpoint of `run_dir` on the validation split.
pub fn eval<B>(
    device: B::Device,
    run_dir: &Path,
    max_batches: Option<usize>,
) -> Result<(), CliError>
where
    B: AutodiffBackend,
    B::InnerBackend: PolysketchBackend,
{
    let run = RunDir::new(run_dir);
    let config = run.load_config()?;
    let say = |s: &str| eprintln!("{s}");
    let corpus = prepare_corpus(&config, TokenizerSource::File(&run.tokenizer_path()), &say)?;
    let (model, state, _) =
        load_checkpoint::<B::InnerBackend>(&run, &config, &corpus.tokenizer, &device)?;
    let t = &config.train;
    let batches = eval_batches(&corpus.splits.val, t.seq_len, t.batch_size, max_batches)?;
    let tokens: usize = batches.iter().map(|b| b.batch_size * b.seq_len).sum();
    let loss = mean_loss(&model, &batches, &device);
    println!(
        "step {}: val_loss {loss:.4} | val_ppl {:.2} | {tokens} tokens in {} windows of {}",
        state.step,
        loss.exp(),
        batches.iter().map(|b| b.batch_size).sum::<usize>(),
        t.seq_len
    );
    Ok(())
}
