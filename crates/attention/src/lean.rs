//! Memory-lean exact causal attention, for softmax and polynomial weights.
//!
//! The forward pass walks the queries in chunks of rows; each chunk sees only the keys up to
//! its last row, so no `[seq, seq]` matrix ever exists. It keeps the output and one statistic
//! per row (the log-sum-exp of the scaled scores for softmax, the denominator `1 + Σ w` for
//! polynomial weights). The backward pass recomputes the weights from those statistics, chunk
//! by chunk, as FlashAttention does: once by query rows for the query gradient and once by key
//! columns for the key and value gradients, so nothing is accumulated into slices.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use crate::ops::int_power;

/// How scores become attention weights in exact causal attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalWeights {
    /// `softmax(q·k / sqrt(head_dim))` over the keys `j ≤ i`.
    Softmax,
    /// `w = (q·k)^degree` and output `Σ w v / (1 + Σ w)` over the keys `j ≤ i`.
    Polynomial {
        /// Even degree of the weights.
        degree: u32,
    },
}

/// Rows per chunk for a sequence of `seq` tokens: a chunk's score matrix holds about 4M entries
/// per batch element and head, and a short sequence is a single chunk.
pub fn default_chunk_rows(seq: usize) -> usize {
    ((1usize << 22) / seq.max(1)).clamp(16, 1024)
}

/// The first `len` positions of dimension 2 starting at `start`.
fn rows<B: Backend>(x: &Tensor<B, 4>, start: usize, len: usize) -> Tensor<B, 4> {
    x.clone().narrow(2, start, len)
}

/// Scores of queries at positions `row0..` against keys at positions `col0..`, and the mask of
/// keys that lie in a query's future.
///
/// # Shapes
/// - `query`: `[batch, heads, rows, head_dim]`, `key`: `[batch, heads, cols, head_dim]`
/// - returns scores `[batch, heads, rows, cols]` and the mask `[batch, heads, rows, cols]`
fn scores<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    row0: usize,
    col0: usize,
    weights: CausalWeights,
) -> (Tensor<B, 4>, Tensor<B, 4, Bool>) {
    let [batch, heads, n_rows, head_dim] = query.dims();
    let n_cols = key.dims()[2];
    let raw = query.matmul(key.swap_dims(2, 3));
    let scores = match weights {
        CausalWeights::Softmax => raw * (1.0 / (head_dim as f64).sqrt()),
        CausalWeights::Polynomial { .. } => raw,
    };
    // key col0 + b lies in the future of query row0 + a iff b - a > row0 - col0
    let offset = row0 as i64 - col0 as i64;
    let future = Tensor::<B, 2, Bool>::tril_mask([n_rows, n_cols], offset, &scores.device())
        .unsqueeze::<4>()
        .expand([batch, heads, n_rows, n_cols]);
    (scores, future)
}

/// Normalised weights from scores, given each row's statistic.
///
/// # Shapes
/// - `scores`, `future`: `[batch, heads, rows, cols]`; `stat`: `[batch, heads, rows, 1]`
/// - returns `[batch, heads, rows, cols]`
fn weights_from_stat<B: Backend>(
    scores: Tensor<B, 4>,
    future: Tensor<B, 4, Bool>,
    stat: Tensor<B, 4>,
    weights: CausalWeights,
) -> Tensor<B, 4> {
    match weights {
        CausalWeights::Softmax => (scores.mask_fill(future, f64::NEG_INFINITY) - stat).exp(),
        CausalWeights::Polynomial { degree } => {
            int_power(scores, degree).mask_fill(future, 0.0) / stat
        }
    }
}

/// Exact causal attention by chunks of query rows, with the per-row statistic the backward
/// pass needs.
///
/// # Shapes
/// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
/// - returns the output `[batch, heads, seq, head_dim]` and the statistic
///   `[batch, heads, seq, 1]` (log-sum-exp for softmax, the denominator for polynomial weights)
///
/// # Panics
/// If `chunk` is zero or the shapes disagree.
pub fn lean_attention_forward<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    weights: CausalWeights,
    chunk: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let seq = query.dims()[2];
    assert!(chunk > 0, "lean attention: chunk must be positive");
    assert_eq!(key.dims(), query.dims(), "lean attention: keys and queries differ in shape");
    assert_eq!(value.dims()[..3], query.dims()[..3], "lean attention: values");
    let (mut outputs, mut stats) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < seq {
        let end = (start + chunk).min(seq);
        let (s, future) =
            scores(rows(&query, start, end - start), rows(&key, 0, end), start, 0, weights);
        let (w, stat) = match weights {
            CausalWeights::Softmax => {
                let s = s.mask_fill(future, f64::NEG_INFINITY);
                let max = s.clone().max_dim(3);
                let e = (s - max.clone()).exp();
                let sum = e.clone().sum_dim(3);
                (e / sum.clone(), max + sum.log())
            }
            CausalWeights::Polynomial { degree } => {
                let w = int_power(s, degree).mask_fill(future, 0.0);
                let denominator = w.clone().sum_dim(3) + 1.0;
                (w / denominator.clone(), denominator)
            }
        };
        outputs.push(w.matmul(rows(&value, 0, end)));
        stats.push(stat);
        start = end;
    }
    (Tensor::cat(outputs, 2), Tensor::cat(stats, 2))
}

/// Gradient with respect to the scores, from normalised weights `p`, `dP = dO Vᵀ` and the
/// per-row `D = Σ dO ∘ O`.
///
/// # Shapes
/// all `[batch, heads, rows, cols]` but `d_row` and `stat`, `[batch, heads, rows, 1]`
fn score_gradient<B: Backend>(
    scores: Tensor<B, 4>,
    future: Tensor<B, 4, Bool>,
    p: Tensor<B, 4>,
    d_p: Tensor<B, 4>,
    d_row: Tensor<B, 4>,
    stat: Tensor<B, 4>,
    weights: CausalWeights,
) -> Tensor<B, 4> {
    match weights {
        // ∂o/∂s_ij = p_ij (v_j - o_i)
        CausalWeights::Softmax => p * (d_p - d_row),
        // ∂o/∂w_ij = (v_j - o_i) / den_i and ∂w/∂s = p s^(p-1)
        CausalWeights::Polynomial { degree } => {
            let slope = int_power(scores, degree - 1) * degree as f64;
            ((d_p - d_row) / stat * slope).mask_fill(future, 0.0)
        }
    }
}

/// Gradients of [`lean_attention_forward`] recomputed chunk by chunk from its output and
/// statistic.
///
/// # Shapes
/// - `query`, `key`, `value`, `output`, `grad_output`: `[batch, heads, seq, head_dim]`
/// - `stat`: `[batch, heads, seq, 1]`
/// - returns the gradients of `query`, `key` and `value`, each `[batch, heads, seq, head_dim]`
#[allow(clippy::too_many_arguments)]
pub fn lean_attention_backward<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    output: Tensor<B, 4>,
    stat: Tensor<B, 4>,
    grad_output: Tensor<B, 4>,
    weights: CausalWeights,
    chunk: usize,
) -> [Tensor<B, 4>; 3] {
    let [_, _, seq, head_dim] = query.dims();
    assert!(chunk > 0, "lean attention: chunk must be positive");
    let scale = match weights {
        CausalWeights::Softmax => 1.0 / (head_dim as f64).sqrt(),
        CausalWeights::Polynomial { .. } => 1.0,
    };
    let d_row = (grad_output.clone() * output).sum_dim(3);

    // query gradient: query rows start..end against keys 0..end
    let mut d_query = Vec::new();
    let mut start = 0;
    while start < seq {
        let end = (start + chunk).min(seq);
        let len = end - start;
        let (s, future) = scores(rows(&query, start, len), rows(&key, 0, end), start, 0, weights);
        let stat_i = rows(&stat, start, len);
        let p = weights_from_stat(s.clone(), future.clone(), stat_i.clone(), weights);
        let d_p = rows(&grad_output, start, len).matmul(rows(&value, 0, end).swap_dims(2, 3));
        let d_s = score_gradient(s, future, p, d_p, rows(&d_row, start, len), stat_i, weights);
        d_query.push(d_s.matmul(rows(&key, 0, end)) * scale);
        start = end;
    }

    // key and value gradients: keys start..end against query rows start..seq
    let (mut d_key, mut d_value) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < seq {
        let end = (start + chunk).min(seq);
        let later = seq - start;
        let query_later = rows(&query, start, later);
        let grad_later = rows(&grad_output, start, later);
        let (s, future) =
            scores(query_later.clone(), rows(&key, start, end - start), start, start, weights);
        let stat_j = rows(&stat, start, later);
        let p = weights_from_stat(s.clone(), future.clone(), stat_j.clone(), weights);
        let d_p = grad_later.clone().matmul(rows(&value, start, end - start).swap_dims(2, 3));
        d_value.push(p.clone().swap_dims(2, 3).matmul(grad_later));
        let d_s = score_gradient(s, future, p, d_p, rows(&d_row, start, later), stat_j, weights);
        d_key.push(d_s.swap_dims(2, 3).matmul(query_later) * scale);
        start = end;
    }
    [Tensor::cat(d_query, 2), Tensor::cat(d_key, 2), Tensor::cat(d_value, 2)]
}
