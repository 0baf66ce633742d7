//! Token-by-token decoding: a key-value cache for softmax and polynomial attention, and the
//! recurrent form of polysketch attention (ALGORITHM.md §4), whose state does not grow with the
//! context.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::AttentionKind;
use crate::kernel::AttentionKernel;
use crate::ops::{
    int_power, normalise_last, self_tensor, with_ones, LocalExact, PolysketchBackend,
};

/// What one attention layer remembers between decoding steps.
#[derive(Debug, Clone)]
pub enum DecodeCache<B: Backend> {
    /// Nothing seen yet.
    Empty,
    /// Keys (normalised for polynomial attention) and values of every past token, each
    /// `[batch, heads, tokens, head_dim]`.
    KeyValue {
        /// Past keys.
        keys: Tensor<B, 4>,
        /// Past values.
        values: Tensor<B, 4>,
    },
    /// Polysketch state.
    Sketch {
        /// `Σ φ(k)⊗φ(k)⊗[v, 1]` over folded tokens, `[batch, heads, sketch_dim², head_dim + 1]`.
        state: Tensor<B, 4>,
        /// Exact local variant: the current block's normalised keys `[batch, heads, m, head_dim]`,
        /// values with a column of ones `[.., m, head_dim + 1]` and key features
        /// `[.., m, sketch_dim]`, not yet folded into `state`.
        block: Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)>,
    },
}

impl<B: Backend> DecodeCache<B> {
    /// Number of values the cache holds: what decoding remembers about the tokens so far.
    pub fn elements(&self) -> usize {
        let count = |t: &Tensor<B, 4>| t.shape().num_elements();
        match self {
            DecodeCache::Empty => 0,
            DecodeCache::KeyValue { keys, values } => count(keys) + count(values),
            DecodeCache::Sketch { state, block } => {
                count(state) + block.as_ref().map_or(0, |(k, v, f)| count(k) + count(v) + count(f))
            }
        }
    }
}

/// `Σ φ(k)⊗φ(k)⊗v'` of some tokens: `[.., r², head_dim + 1]`.
fn summary<B: Backend>(key_features: Tensor<B, 4>, value1: Tensor<B, 4>) -> Tensor<B, 4> {
    self_tensor(key_features).swap_dims(2, 3).matmul(value1)
}

/// The state before any token: zeros `[batch, heads, sketch_dim², head_dim + 1]`, sized from
/// key features `[batch, heads, .., sketch_dim]` and values with ones `[.., head_dim + 1]`.
fn empty_state<B: Backend>(key_features: &Tensor<B, 4>, value1: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, _, sketch_dim] = key_features.dims();
    let width = value1.dims()[3];
    Tensor::zeros([batch, heads, sketch_dim * sketch_dim, width], &value1.device())
}

fn append<B: Backend>(past: Tensor<B, 4>, new: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::cat(vec![past, new], 2)
}

impl<B: PolysketchBackend> AttentionKernel<B> {
    /// The parallel pass over a prompt, with the cache that decoding the prompt token by token
    /// would leave behind: [`AttentionKernel::forward_step`] continues from position `seq`.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]` (after RoPE)
    /// - returns `[batch, heads, seq, head_dim]`
    pub fn prefill(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, DecodeCache<B>) {
        let cache = self.prompt_cache(query.clone(), key.clone(), value.clone());
        (self.forward(query, key, value), cache)
    }
}

impl<B: PolysketchBackend> AttentionKernel<B> {
    /// The decoding cache after the tokens of a whole prompt.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]` (after RoPE)
    fn prompt_cache(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> DecodeCache<B> {
        let seq = value.dims()[2];
        if seq == 0 {
            return DecodeCache::Empty;
        }
        if self.config.kind != AttentionKind::Polysketch {
            let keys = match &self.norm {
                Some(norm) => norm.forward(key),
                None => key,
            };
            return DecodeCache::KeyValue { keys, values: value };
        }
        let value1 = with_ones(value);
        let (_, key_features, local) = self.sketch_inputs(query, key);
        let Some(LocalExact { key: key_hat, .. }) = local else {
            return DecodeCache::Sketch { state: summary(key_features, value1), block: None };
        };
        // decoding folds a block when the next one starts: the last block stays open, even
        // when it is full
        let folded = (seq - 1) / self.config.block_size * self.config.block_size;
        let state = if folded > 0 {
            summary(key_features.clone().narrow(2, 0, folded), value1.clone().narrow(2, 0, folded))
        } else {
            empty_state(&key_features, &value1)
        };
        let open = seq - folded;
        let block = (
            key_hat.narrow(2, folded, open),
            value1.narrow(2, folded, open),
            key_features.narrow(2, folded, open),
        );
        DecodeCache::Sketch { state, block: Some(block) }
    }

    /// Attention of one new token given everything before it; updates `cache`. `position` is
    /// the number of tokens already in the cache. Equal, position by position, to
    /// [`AttentionKernel::forward`] over the whole sequence.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, 1, head_dim]` (after RoPE)
    /// - returns `[batch, heads, 1, head_dim]`
    pub fn forward_step(
        &self,
        cache: &mut DecodeCache<B>,
        position: usize,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let config = &self.config;
        match config.kind {
            AttentionKind::Softmax | AttentionKind::Polynomial => {
                let (query, key) = match &self.norm {
                    Some(norm) => (norm.forward(query), norm.forward(key)),
                    None => (query, key),
                };
                let (keys, values) = match std::mem::replace(cache, DecodeCache::Empty) {
                    DecodeCache::KeyValue { keys, values } => {
                        (append(keys, key), append(values, value))
                    }
                    _ => (key, value),
                };
                let scores = query.matmul(keys.clone().swap_dims(2, 3));
                let out = if config.kind == AttentionKind::Softmax {
                    let head_dim = keys.dims()[3] as f64;
                    softmax(scores / head_dim.sqrt(), 3).matmul(values.clone())
                } else {
                    let weights = int_power(scores, config.degree);
                    let denominator = weights.clone().sum_dim(3) + 1.0;
                    weights.matmul(values.clone()) / denominator
                };
                *cache = DecodeCache::KeyValue { keys, values };
                out
            }
            AttentionKind::Polysketch => self.sketch_step(cache, position, query, key, value),
        }
    }

    fn sketch_step(
        &self,
        cache: &mut DecodeCache<B>,
        position: usize,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let value1 = with_ones(value);
        let (query_features, key_features, local) = self.sketch_inputs(query, key);
        let (mut state, mut block) = match std::mem::replace(cache, DecodeCache::Empty) {
            DecodeCache::Sketch { state, block } => (state, block),
            _ => (empty_state(&key_features, &value1), None),
        };
        let q_tensor = self_tensor(query_features);

        let result = match local {
            // sketched weights everywhere: fold every token into the state at once
            None => {
                state = state + summary(key_features, value1);
                q_tensor.matmul(state.clone())
            }
            // exact weights inside the current block, sketched across earlier blocks
            Some(LocalExact { query: q_hat, key: k_hat, degree }) => {
                if position.is_multiple_of(self.config.block_size) {
                    if let Some((_, values, features)) = block.take() {
                        state = state + summary(features, values);
                    }
                }
                let (keys, values, features) = match block {
                    Some((k, v, f)) => {
                        (append(k, k_hat), append(v, value1), append(f, key_features))
                    }
                    None => (k_hat, value1, key_features),
                };
                let weights = int_power(q_hat.matmul(keys.clone().swap_dims(2, 3)), degree);
                let out = weights.matmul(values.clone()) + q_tensor.matmul(state.clone());
                block = Some((keys, values, features));
                out
            }
        };
        *cache = DecodeCache::Sketch { state, block };
        normalise_last(result)
    }
}
