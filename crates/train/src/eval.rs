//! `polysketch eval`: validation loss and perplexity of a run's newest checkpoint.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use polysketch_attention::PolysketchBackend;
use polysketch_data::TokenBatch;
use polysketch_model::LanguageModel;

use crate::error::CliError;
use crate::report::Table;
use crate::run_dir::RunDir;
use crate::session::{load_checkpoint, prepare_data, TokenizerSource};

/// Mean next-token loss in nats over the weighted targets of `batches` (every target for
/// text), and for batches with weights the accuracy of the most likely token on them.
pub fn evaluate<B: PolysketchBackend>(
    model: &LanguageModel<B>,
    batches: &[TokenBatch],
    device: &B::Device,
) -> (f64, Option<f64>) {
    let (mut loss_sum, mut weight_sum, mut correct) = (0.0, 0.0, 0.0);
    let mut weighted = false;
    for batch in batches {
        let (inputs, targets) = batch.to_tensors::<B>(device);
        let [rows, seq] = inputs.dims();
        let weights =
            batch.weights_tensor::<B>(device).unwrap_or_else(|| Tensor::ones([rows, seq], device));
        weighted |= batch.weights.is_some();
        let (losses, hits) = model.token_losses_and_hits(inputs, targets);
        let sum = |t: Tensor<B, 2>| -> f64 { t.sum().into_scalar().elem() };
        loss_sum += sum(losses * weights.clone());
        correct += sum(hits * weights.clone());
        weight_sum += sum(weights);
    }
    let weight_sum = weight_sum.max(f64::MIN_POSITIVE);
    (loss_sum / weight_sum, weighted.then_some(correct / weight_sum))
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
    let source = TokenizerSource::File(&run.tokenizer_path());
    let data = prepare_data(&config, source, max_batches, &say)?;
    let (model, state, _) =
        load_checkpoint::<B::InnerBackend>(&run, &config, &data.tokenizer, &device)?;
    let t = &config.train;
    let batches = data.val;
    if config.data.task.is_some() {
        let (loss, accuracy) = evaluate(&model, &batches, &device);
        println!(
            "step {}: val_loss {loss:.4} | val_accuracy {:.4} on the answers of {} examples",
            state.step,
            accuracy.unwrap_or(0.0),
            batches.iter().map(|b| b.batch_size).sum::<usize>(),
        );
        return Ok(());
    }
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
