//! `polysketch generate`: sample text from a run's newest checkpoint.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use polysketch_attention::{DecodeCache, PolysketchBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::CliError;
use crate::run_dir::RunDir;
use crate::session::load_checkpoint;

/// Sampling settings.
pub struct SampleOptions {
    /// Prompt text; read from stdin when absent.
    pub prompt: Option<String>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

/// Draws one token id from `logits` as `options` says.
pub fn sample(logits: &[f32], options: &SampleOptions, rng: &mut StdRng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if options.temperature <= 0.0 {
        return order[0] as u32;
    }
    if options.top_k > 0 {
        order.truncate(options.top_k);
    }
    let top = logits[order[0]] as f64;
    let mut probs: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - top) / options.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if options.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= options.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let mut draw = rng.random::<f64>() * probs.iter().sum::<f64>();
    for (p, &id) in probs.iter().zip(&order) {
        if draw < *p {
            return id as u32;
        }
        draw -= p;
    }
    order[probs.len() - 1] as u32
}

/// Streams sampled text to stdout; a summary with tokens/s goes to stderr.
pub fn generate<B>(
    device: B::Device,
    run_dir: &Path,
    options: SampleOptions,
) -> Result<(), CliError>
where
    B: AutodiffBackend,
    B::InnerBackend: PolysketchBackend,
{
    let run = RunDir::new(run_dir);
    let config = run.load_config()?;
    let tokenizer = polysketch_data::TextTokenizer::from_file(&run.tokenizer_path())?;
    let (model, _, _) = load_checkpoint::<B::InnerBackend>(&run, &config, &tokenizer, &device)?;
    let prompt = match &options.prompt {
        Some(p) => p.clone(),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Run(format!("cannot read the prompt from stdin: {e}")))?;
            text
        }
    };
    let mut ids = tokenizer.encode(&prompt)?;
    if ids.is_empty() {
        ids.push(tokenizer.end_of_text_id().unwrap_or(0));
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{prompt}");
    let started = Instant::now();
    let first_new = ids.len();
    let max_seq = model.max_seq();

    // one token through every layer's decoding cache: constant cost for polysketch layers,
    // one pass over the cache for softmax and polynomial ones
    let step = |id: u32, position: usize, caches: &mut Vec<DecodeCache<B::InnerBackend>>| {
        let data = TensorData::new(vec![id as i64], [1, 1]);
        let token = Tensor::<B::InnerBackend, 2, Int>::from_data(data, &device);
        let logits = model.forward_step(token, position, caches);
        logits.into_data().convert::<f32>().to_vec::<f32>().expect("float logits")
    };
    // reads ids[from..] in one parallel pass; returns the caches, the next position and logits
    let prefill = |from: usize, ids: &[u32]| {
        let prompt: Vec<i64> = ids[from..].iter().map(|&id| id as i64).collect();
        let len = prompt.len();
        let tokens = Tensor::<B::InnerBackend, 2, Int>::from_data(
            TensorData::new(prompt, [1, len]),
            &device,
        );
        let (logits, caches) = model.prefill(tokens);
        let logits = logits.into_data().convert::<f32>().to_vec::<f32>().expect("float logits");
        (caches, len, logits)
    };
    let (mut caches, mut position, mut logits) = prefill(ids.len().saturating_sub(max_seq), &ids);
    let mut printed = 0;
    for _ in 0..options.max_tokens {
        let id = sample(&logits, &options, &mut rng);
        ids.push(id);
        if position == max_seq {
            // the position encodings end at the trained context: restart on its last half
            (caches, position, logits) = prefill(ids.len() - max_seq / 2, &ids);
        } else {
            logits = step(id, position, &mut caches);
            position += 1;
        }
        // print whole characters only: a byte-level token can end inside one
        let text = tokenizer.decode(&ids[first_new..])?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            let _ = write!(out, "{}", &text[printed..]);
            let _ = out.flush();
            printed = text.len();
        }
    }
    let _ = writeln!(out);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "generated {} tokens in {secs:.2}s ({:.1} tokens/s)",
        options.max_tokens,
        options.max_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(temperature: f64, top_k: usize, top_p: f64) -> SampleOptions {
        SampleOptions { prompt: None, max_tokens: 1, temperature, top_k, top_p, seed: 0 }
    }

    #[test]
    fn greedy_top_k_and_top_p_restrict_the_choice() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample(&logits, &options(0.0, 0, 1.0), &mut rng), 1);
        for _ in 0..50 {
            let id = sample(&logits, &options(1.0, 2, 1.0), &mut rng);
            assert!(id == 1 || id == 2);
            assert_eq!(sample(&logits, &options(1.0, 0, 0.3), &mut rng), 1);
        }
    }
}
