//! Naive O(seq²) references: full weight matrices, explicit causal masks.
//!
//! They define what the fast paths must compute and are the baselines of the tests. The exact
//! polynomial kernel of the model uses [`polynomial_attention`] directly, since it is quadratic
//! by definition.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::ops::{int_power, LocalExact};

/// `[seq, seq]` mask with ones where `keep(i, j)` holds, broadcast to rank 4.
fn mask<B: Backend>(
    seq: usize,
    device: &B::Device,
    keep: impl Fn(usize, usize) -> bool,
) -> Tensor<B, 4> {
    let values: Vec<f32> =
        (0..seq * seq).map(|idx| if keep(idx / seq, idx % seq) { 1.0 } else { 0.0 }).collect();
    Tensor::<B, 2>::from_data(TensorData::new(values, [seq, seq]), device).reshape([1, 1, seq, seq])
}

/// `Σ_j w_ij v_j / (1 + Σ_j w_ij)` for non-negative, already masked weights.
///
/// # Shapes
/// - `weights`: `[batch, heads, seq, seq]`
/// - `value`: `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn normalise<B: Backend>(weights: Tensor<B, 4>, value: Tensor<B, 4>) -> Tensor<B, 4> {
    let denominator = weights.clone().sum_dim(3) + 1.0;
    weights.matmul(value) / denominator
}

/// Causal polynomial weights `(q̂_i·k̂_j)^degree` for `j ≤ i`, zero above the diagonal.
///
/// # Shapes
/// - `query`, `key`: `[batch, heads, seq, head_dim]` (already normalised)
/// - returns `[batch, heads, seq, seq]`
pub fn polynomial_weights<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    degree: u32,
) -> Tensor<B, 4> {
    let seq = query.dims()[2];
    let causal = mask(seq, &query.device(), |i, j| j <= i);
    int_power(query.matmul(key.swap_dims(2, 3)), degree) * causal
}

/// Exact causal polynomial attention of ALGORITHM.md §1, on normalised queries and keys.
///
/// # Shapes
/// - `query`, `key`: `[batch, heads, seq, head_dim]` (already normalised)
/// - `value`: `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn polynomial_attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    degree: u32,
) -> Tensor<B, 4> {
    normalise(polynomial_weights(query, key, degree), value)
}

/// The full weight matrix of causal polysketch attention.
///
/// Sketched weights `(φ(q_i)·φ(k_j))²` everywhere, replaced by `(q̂_i·k̂_j)^p` inside the
/// diagonal blocks of size `block_size` when `local` is given; zero above the diagonal.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
/// - `local`: queries and keys `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, seq]`
pub fn polysketch_weights<B: Backend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
) -> Tensor<B, 4> {
    let seq = query_features.dims()[2];
    let device = query_features.device();
    let sketched = int_power(query_features.matmul(key_features.swap_dims(2, 3)), 2);
    let weights = match local {
        None => sketched,
        Some(l) => {
            let same_block = mask(seq, &device, |i, j| i / block_size == j / block_size);
            let exact = int_power(l.query.matmul(l.key.swap_dims(2, 3)), l.degree);
            exact * same_block.clone() + sketched * (same_block.neg() + 1.0)
        }
    };
    weights * mask(seq, &device, |i, j| j <= i)
}

/// Causal polysketch attention through the full weight matrix.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
/// - `value`: `[batch, heads, seq, head_dim]`
/// - `local`: queries and keys `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn polysketch_attention<B: Backend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    value: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
) -> Tensor<B, 4> {
    normalise(polysketch_weights(query_features, key_features, local, block_size), value)
}

/// Causal softmax attention `softmax(q kᵀ / sqrt(head_dim)) v` with an explicit mask.
///
/// # Shapes
/// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn softmax_attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, seq, head_dim] = query.dims();
    let future = mask(seq, &query.device(), |i, j| j > i).equal_elem(1.0);
    let scores = query.matmul(key.swap_dims(2, 3)) / (head_dim as f64).sqrt();
    let dims = scores.dims();
    let scores = scores.mask_fill(future.expand(dims), f64::NEG_INFINITY);
    burn::tensor::activation::softmax(scores, 3).matmul(value)
}
