//! `polysketch eval`: validation loss and perplexity of a run's newest checkpoint.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use polysketch_attention::PolysketchBackend;
use polysketch_data::{eval_batches, TokenBatch};
use polysketch_model::LanguageModel;

use crate::error::CliError;
use crate::report::Table;
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

/// Mean next-token loss of every position in the window, in nats.
pub fn loss_by_position<B: PolysketchBackend>(
    model: &LanguageModel<B>,
    batches: &[TokenBatch],
    device: &B::Device,
) -> Vec<f64> {
    let seq = batches.first().map_or(0, |b| b.seq_len);
    let (mut totals, mut count) = (vec![0.0; seq], 0usize);
    for batch in batches {
        let (inputs, targets) = batch.to_tensors::<B>(device);
        let losses = model.token_losses(inputs, targets).sum_dim(0);
        let values = losses.into_data().convert::<f64>().to_vec::<f64>().expect("float losses");
        totals.iter_mut().zip(values).for_each(|(t, v)| *t += v);
        count += batch.batch_size;
    }
    totals.into_iter().map(|t| t / count.max(1) as f64).collect()
}

/// Position buckets `[start, end)` for a context of `seq` tokens: 0–511, 512–1023, 1k–2k and
/// so on, doubling up to the context length; contexts of 512 tokens or fewer are cut at an
/// eighth, a quarter and a half instead.
pub fn position_buckets(seq: usize) -> Vec<(usize, usize)> {
    let mut edges = vec![0];
    let mut edge = if seq > 512 { 512 } else { (seq / 8).max(1) };
    while edge < seq {
        if edge > *edges.last().expect("starts with 0") {
            edges.push(edge);
        }
        edge *= 2;
    }
    edges.push(seq);
    edges.windows(2).map(|w| (w[0], w[1])).collect()
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
    let by_position = loss_by_position(&model, &batches, &device);
    let loss = by_position.iter().sum::<f64>() / by_position.len().max(1) as f64;
    println!(
        "step {}: val_loss {loss:.4} | val_ppl {:.2} | {tokens} tokens in {} windows of {}",
        state.step,
        loss.exp(),
        batches.iter().map(|b| b.batch_size).sum::<usize>(),
        t.seq_len
    );
    // does far context help? later positions see more of the window
    let mut table = Table::new(&["positions", "val loss", "val ppl"]);
    for (start, end) in position_buckets(t.seq_len) {
        let bucket = &by_position[start..end];
        let mean = bucket.iter().sum::<f64>() / bucket.len() as f64;
        table.push(vec![
            format!("{start}-{}", end - 1),
            format!("{mean:.4}"),
            format!("{:.2}", mean.exp()),
        ]);
    }
    println!("{}", table.markdown());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::position_buckets;

    #[test]
    fn buckets_double_up_to_the_context() {
        assert_eq!(position_buckets(4096), [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]);
        assert_eq!(position_buckets(3000), [(0, 512), (512, 1024), (1024, 2048), (2048, 3000)]);
        assert_eq!(position_buckets(256), [(0, 32), (32, 64), (64, 128), (128, 256)]);
        assert_eq!(position_buckets(3), [(0, 1), (1, 2), (2, 3)]);
        assert_eq!(position_buckets(1), [(0, 1)]);
    }
}
