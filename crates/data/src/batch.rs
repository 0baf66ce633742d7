//! Training and evaluation batches cut from a token stream.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::DataError;

/// A batch of token windows: row `b` of `targets` is row `b` of `inputs` shifted by one token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Input tokens, row-major `[batch_size, seq_len]`.
    pub inputs: Vec<i64>,
    /// Target tokens, row-major `[batch_size, seq_len]`.
    pub targets: Vec<i64>,
    /// Number of rows.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Weight of each target in loss and accuracy, row-major `[batch_size, seq_len]`; `None`
    /// weighs every target equally.
    pub weights: Option<Vec<f32>>,
}

impl TokenBatch {
    /// Copies the batch onto `device`.
    ///
    /// # Shapes
    /// Returns `(inputs, targets)`, both `[batch_size, seq_len]` Int tensors.
    pub fn to_tensors<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let shape = [self.batch_size, self.seq_len];
        let to_tensor = |values: &Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(values.clone(), shape), device)
        };
        (to_tensor(&self.inputs), to_tensor(&self.targets))
    }

    /// The target weights on `device`, if the batch has them.
    ///
    /// # Shapes
    /// Returns `[batch_size, seq_len]`.
    pub fn weights_tensor<B: Backend>(&self, device: &B::Device) -> Option<Tensor<B, 2>> {
        let shape = [self.batch_size, self.seq_len];
        self.weights.as_ref().map(|w| Tensor::from_data(TensorData::new(w.clone(), shape), device))
    }

    /// Builds a batch from windows of `seq_len + 1` tokens each.
    fn from_windows<'a>(windows: impl Iterator<Item = &'a [u32]>, seq_len: usize) -> Self {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut batch_size = 0;
        for window in windows {
            debug_assert_eq!(window.len(), seq_len + 1);
            inputs.extend(window[..seq_len].iter().map(|&t| i64::from(t)));
            targets.extend(window[1..].iter().map(|&t| i64::from(t)));
            batch_size += 1;
        }
        Self { inputs, targets, batch_size, seq_len, weights: None }
    }
}

/// Samples training windows of `seq_len + 1` tokens at random positions of a token stream.
///
/// Batch `step` depends only on the seed, the step and the batch size, so a run resumed at step
/// `n` sees exactly the batches an uninterrupted run would have seen.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
    seed: u64,
}

impl WindowSampler {
    /// Creates a sampler over `tokens` for windows of `seq_len` inputs.
    ///
    /// # Errors
    /// [`DataError::InvalidParameter`] if `seq_len` is 0, [`DataError::CorpusTooShort`] if the
    /// stream holds fewer than `seq_len + 1` tokens.
    pub fn new(tokens: Arc<Vec<u32>>, seq_len: usize, seed: u64) -> Result<Self, DataError> {
        check_positive("train.seq_len", seq_len)?;
        let needed = seq_len.saturating_add(1);
        if tokens.len() < needed {
            return Err(DataError::CorpusTooShort { tokens: tokens.len(), needed });
        }
        Ok(Self { tokens, seq_len, seed })
    }

    /// Returns batch number `step`: `batch_size` windows whose starts are uniform in
    /// `0..=len - (seq_len + 1)`, drawn from an RNG seeded by mixing the seed and `step`.
    pub fn batch(&self, step: u64, batch_size: usize) -> TokenBatch {
        let mut rng = StdRng::seed_from_u64(splitmix64(self.seed ^ step));
        let window = self.seq_len + 1;
        let last_start = self.tokens.len() - window;
        let windows = (0..batch_size).map(|_| {
            let start = rng.random_range(0..=last_start);
            &self.tokens[start..start + window]
        });
        TokenBatch::from_windows(windows, self.seq_len)
    }

    /// Tokens of input per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Length of the token stream sampled from.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Cuts non-overlapping evaluation windows of `seq_len + 1` tokens (stride `seq_len`) from
/// `tokens` and groups them into batches of `batch_size` windows; the last batch may be smaller.
/// With `max_batches`, at most that many batches are returned, of windows spread evenly over the
/// whole stream so that every document is represented; with `None`, every window is used.
///
/// # Errors
/// [`DataError::InvalidParameter`] if `seq_len`, `batch_size` or `max_batches` is 0,
/// [`DataError::CorpusTooShort`] if not even one window fits.
pub fn eval_batches(
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: Option<usize>,
) -> Result<Vec<TokenBatch>, DataError> {
    check_positive("train.seq_len", seq_len)?;
    check_positive("eval batch size", batch_size)?;
    if let Some(max) = max_batches {
        check_positive("eval max batches", max)?;
    }
    let needed = seq_len.saturating_add(1);
    if tokens.len() < needed {
        return Err(DataError::CorpusTooShort { tokens: tokens.len(), needed });
    }
    // Window `i` covers tokens[i * seq_len ..= (i + 1) * seq_len].
    let n_windows = (tokens.len() - 1) / seq_len;
    let take = n_windows.min(max_batches.map_or(usize::MAX, |m| m.saturating_mul(batch_size)));
    let starts: Vec<usize> = (0..take).map(|j| j * n_windows / take * seq_len).collect();
    let batches = starts
        .chunks(batch_size)
        .map(|chunk| {
            let windows = chunk.iter().map(|&s| &tokens[s..s + seq_len + 1]);
            TokenBatch::from_windows(windows, seq_len)
        })
        .collect();
    Ok(batches)
}

fn check_positive(name: &'static str, value: usize) -> Result<(), DataError> {
    if value == 0 {
        return Err(DataError::InvalidParameter { name, value, fix: "set it to at least 1" });
    }
    Ok(())
}

/// SplitMix64 finaliser: spreads nearby inputs (consecutive steps) over unrelated seeds.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn stream(n: u32) -> Arc<Vec<u32>> {
        Arc::new((0..n).collect())
    }

    #[test]
    fn sampler_is_deterministic_per_step() {
        let sampler = WindowSampler::new(stream(1000), 16, 42).unwrap();
        let a = sampler.batch(5, 8);
        assert_eq!(a, sampler.batch(5, 8));
        let resumed = WindowSampler::new(stream(1000), 16, 42).unwrap();
        assert_eq!(a, resumed.batch(5, 8));
        assert_ne!(a, sampler.batch(6, 8));
        assert_ne!(a, WindowSampler::new(stream(1000), 16, 43).unwrap().batch(5, 8));
        assert_eq!((a.batch_size, a.seq_len, a.inputs.len()), (8, 16, 128));
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        // Token i has value i, so a window is a run of consecutive numbers.
        let sampler = WindowSampler::new(stream(100), 10, 1).unwrap();
        for step in 0..50 {
            let batch = sampler.batch(step, 4);
            for (inp, tgt) in batch.inputs.chunks(10).zip(batch.targets.chunks(10)) {
                for j in 0..10 {
                    assert_eq!(tgt[j], inp[j] + 1);
                    assert_eq!(inp[j], inp[0] + j as i64);
                }
                assert!(inp[0] >= 0 && tgt[9] <= 99);
            }
        }
    }

    #[test]
    fn sampler_reaches_both_ends_of_the_stream() {
        let sampler = WindowSampler::new(stream(12), 10, 9).unwrap();
        let starts: Vec<i64> = (0..64).map(|s| sampler.batch(s, 1).inputs[0]).collect();
        assert!(starts.contains(&0) && starts.contains(&1));
        assert!(starts.iter().all(|&s| (0..=1).contains(&s)));
        assert!(WindowSampler::new(stream(11), 10, 0).is_ok());
    }

    #[test]
    fn too_short_streams_are_rejected() {
        let err = WindowSampler::new(stream(10), 10, 0).unwrap_err();
        assert!(matches!(err, DataError::CorpusTooShort { tokens: 10, needed: 11 }));
        assert!(err.to_string().contains("lower train.seq_len or add text"), "{err}");
        let err = eval_batches(&[1, 2, 3], 3, 2, None).unwrap_err();
        assert!(matches!(err, DataError::CorpusTooShort { tokens: 3, needed: 4 }));
        assert!(matches!(
            WindowSampler::new(stream(10), 0, 0),
            Err(DataError::InvalidParameter { .. })
        ));
        assert!(eval_batches(&[1, 2, 3], 1, 0, None).is_err());
        assert!(eval_batches(&[1, 2, 3], 1, 1, Some(0)).is_err());
    }

    #[test]
    fn eval_batches_cover_the_stream_without_overlap() {
        let tokens: Vec<u32> = (0..101).collect();
        // (101 - 1) / 10 = 10 windows: 4 + 4 + 2.
        let batches = eval_batches(&tokens, 10, 4, None).unwrap();
        let sizes: Vec<usize> = batches.iter().map(|b| b.batch_size).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        assert_eq!(batches[2].inputs.len(), 20);
        assert_eq!(batches[0].inputs[..3], [0, 1, 2]);
        assert_eq!(batches[0].inputs[10], 10);
        assert_eq!(*batches[2].targets.last().unwrap(), 100);
        assert_eq!(eval_batches(&tokens, 10, 4, Some(2)).unwrap().len(), 2);
        // a limited evaluation spreads its windows over the whole stream
        let spread = eval_batches(&tokens, 10, 4, Some(1)).unwrap();
        let starts: Vec<i64> = (0..4).map(|w| spread[0].inputs[w * 10]).collect();
        assert_eq!(starts, [0, 20, 50, 70]);
        assert_eq!(eval_batches(&tokens[..100], 10, 4, None).unwrap().len(), 3);
        let one = eval_batches(&tokens[..11], 10, 4, None).unwrap();
        assert_eq!((one.len(), one[0].batch_size), (1, 1));
    }

    #[test]
    fn batches_become_int_tensors_of_the_right_shape() {
        let batch = WindowSampler::new(stream(50), 5, 3).unwrap().batch(0, 3);
        let device = Default::default();
        let (inputs, targets) = batch.to_tensors::<NdArray>(&device);
        assert_eq!(inputs.dims(), [3, 5]);
        assert_eq!(targets.dims(), [3, 5]);
        let values: Vec<i64> = inputs.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(values, batch.inputs);
    }
}
