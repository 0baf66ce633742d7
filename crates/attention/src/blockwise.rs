//! The causal polysketch block algorithm one block at a time, with a hand-written backward pass.
//!
//! The batched form in [`crate::polysketch_causal_composed`] materialises `φ(q)⊗φ(q)` and
//! `φ(k)⊗φ(k)` for every token, `O(seq · r²)` values that autodiff keeps for the backward pass.
//! Here the forward pass walks the blocks in order and keeps only the output, the row
//! denominators and the exclusive prefix states `Z_l = Σ_{j<l} H_j` (`seq / b` states of
//! `r² × (head_dim + 1)`); the backward pass walks the blocks in reverse, recomputes each block's
//! tensor products and accumulates the suffix `G_l = Σ_{m>l} (φ(Q_m)⊗φ(Q_m))ᵀ dR_m`, which is the
//! gradient of the state `H_l` that block `l` adds.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::ops::{int_power, self_tensor, with_ones, LocalExact};

/// What the forward pass of the block algorithm keeps for its backward pass; `T` is a tensor
/// or a backend's tensor primitive, `P` the type of the prefix states.
#[derive(Debug, Clone)]
pub struct PolysketchSaved<T, P = T> {
    /// The output `[batch, heads, seq, head_dim]`.
    pub output: T,
    /// Row denominators `1 + Σ_j w_ij`, `[batch, heads, seq, 1]`.
    pub denominator: T,
    /// Exclusive prefix state `Z_l` before each block `l` (zero for the first block),
    /// `[batch, heads, blocks, sketch_dim², head_dim + 1]`.
    pub prefixes: P,
}

/// [`PolysketchSaved`] of Burn tensors.
pub type BlockwiseSaved<B> = PolysketchSaved<Tensor<B, 4>, Tensor<B, 5>>;

/// Positions `start..start + len` of dimension 2.
fn rows<B: Backend>(x: &Tensor<B, 4>, start: usize, len: usize) -> Tensor<B, 4> {
    x.clone().narrow(2, start, len)
}

/// Block boundaries `(start, len)`.
fn blocks(seq: usize, block_size: usize) -> Vec<(usize, usize)> {
    (0..seq).step_by(block_size).map(|s| (s, block_size.min(seq - s))).collect()
}

/// Causal weights inside one block and the scores they are a power of.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, m, sketch_dim]`
/// - `local`: `[batch, heads, m, head_dim]` each
/// - returns the masked weights `[batch, heads, m, m]` and the raw scores `[batch, heads, m, m]`
fn local_weights<B: Backend>(
    query_features: &Tensor<B, 4>,
    key_features: &Tensor<B, 4>,
    local: Option<&LocalExact<Tensor<B, 4>>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (scores, power) = match local {
        Some(l) => (l.query.clone().matmul(l.key.clone().swap_dims(2, 3)), l.degree),
        None => (query_features.clone().matmul(key_features.clone().swap_dims(2, 3)), 2),
    };
    let m = scores.dims()[2];
    let causal = Tensor::<B, 2>::ones([m, m], &scores.device()).tril(0).unsqueeze::<4>();
    (int_power(scores.clone(), power) * causal, scores)
}

/// Forward pass by blocks.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
/// - `value`: `[batch, heads, seq, head_dim]`
/// - `local`: queries and keys `[batch, heads, seq, head_dim]`
pub fn blockwise_forward<B: Backend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    value: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
) -> BlockwiseSaved<B> {
    let [_, _, seq, head_dim] = value.dims();
    assert!(block_size > 0, "polysketch_causal: block_size must be positive");
    let [batch, heads, _, sketch_dim] = query_features.dims();
    let mut state: Option<Tensor<B, 4>> = None;
    let (mut results, mut prefixes) = (Vec::new(), Vec::new());
    for (start, len) in blocks(seq, block_size) {
        let fq = rows(&query_features, start, len);
        let fk = rows(&key_features, start, len);
        let v1 = with_ones(rows(&value, start, len));
        let block_local = local.as_ref().map(|l| LocalExact {
            query: rows(&l.query, start, len),
            key: rows(&l.key, start, len),
            degree: l.degree,
        });
        let (weights, _) = local_weights(&fq, &fk, block_local.as_ref());
        let mut result = weights.matmul(v1.clone());
        if let Some(z) = &state {
            result = result + self_tensor(fq).matmul(z.clone());
        }
        let summary = self_tensor(fk).swap_dims(2, 3).matmul(v1);
        prefixes.push(state.clone().unwrap_or_else(|| {
            let zeros = [batch, heads, sketch_dim * sketch_dim, head_dim + 1];
            Tensor::zeros(zeros, &value.device())
        }));
        state = Some(match state {
            Some(z) => z + summary,
            None => summary,
        });
        results.push(result);
    }
    let result = Tensor::cat(results, 2);
    let denominator = result.clone().narrow(3, head_dim, 1) + 1.0;
    let output = result.narrow(3, 0, head_dim) / denominator.clone();
    PolysketchSaved { output, denominator, prefixes: Tensor::stack(prefixes, 2) }
}

/// Gradient of the unnormalised result `R = [o·den, den - 1]` from that of the output:
/// `dR = [dO / den, -(dO·o) / den]`.
///
/// # Shapes
/// - `grad_output`, `output`: `[batch, heads, seq, head_dim]`; `denominator`: `[batch, heads, seq, 1]`
/// - returns `[batch, heads, seq, head_dim + 1]`
pub(crate) fn result_gradient<B: Backend>(
    grad_output: Tensor<B, 4>,
    output: Tensor<B, 4>,
    denominator: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let last = (grad_output.clone() * output).sum_dim(3).neg() / denominator.clone();
    Tensor::cat(vec![grad_output / denominator, last], 3)
}

/// Gradient of `x ⊗ x` (flattened) back to `x`: `dx_a = Σ_b (D_ab + D_ba) x_b`.
///
/// # Shapes
/// - `grad`: `[batch, heads, m, sketch_dim²]`, `x`: `[batch, heads, m, sketch_dim]`
/// - returns `[batch, heads, m, sketch_dim]`
fn self_tensor_backward<B: Backend>(grad: Tensor<B, 4>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, m, r] = x.dims();
    let d = grad.reshape([batch, heads, m, r, r]);
    let symmetric = d.clone() + d.swap_dims(3, 4);
    symmetric.matmul(x.unsqueeze_dim::<5>(4)).reshape([batch, heads, m, r])
}

/// Gradients of [`blockwise_forward`]: `[query_features, key_features, value]` and, with exact
/// local blocks, `[local query, local key]` after them.
///
/// # Shapes
/// - inputs as for [`blockwise_forward`]; `grad_output`: `[batch, heads, seq, head_dim]`
/// - returns one gradient per input, each of its input's shape
pub fn blockwise_backward<B: Backend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    value: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
    saved: BlockwiseSaved<B>,
    grad_output: Tensor<B, 4>,
) -> Vec<Tensor<B, 4>> {
    let [_, _, seq, _] = value.dims();
    let PolysketchSaved { output, denominator, prefixes } = saved;
    let d_result = result_gradient(grad_output, output, denominator);
    let mut suffix: Option<Tensor<B, 4>> = None;
    let mut grads: Vec<Vec<Tensor<B, 4>>> = Vec::new();
    for (index, (start, len)) in blocks(seq, block_size).into_iter().enumerate().rev() {
        let fq = rows(&query_features, start, len);
        let fk = rows(&key_features, start, len);
        let v1 = with_ones(rows(&value, start, len));
        let d_r = rows(&d_result, start, len);
        let block_local = local.as_ref().map(|l| LocalExact {
            query: rows(&l.query, start, len),
            key: rows(&l.key, start, len),
            degree: l.degree,
        });
        let (weights, scores) = local_weights(&fq, &fk, block_local.as_ref());
        let q_tensor = self_tensor(fq.clone());

        // R_l = tril(A_l) V'_l + (φq⊗φq) Z_l and H_l = (φk⊗φk)ᵀ V'_l feeds every later block
        let mut d_v1 = weights.swap_dims(2, 3).matmul(d_r.clone());
        let mut d_fq = Tensor::zeros(fq.dims(), &fq.device());
        let mut d_fk = Tensor::zeros(fk.dims(), &fk.device());
        if let Some(g) = &suffix {
            let k_tensor = self_tensor(fk.clone());
            d_v1 = d_v1 + k_tensor.matmul(g.clone());
            let d_k_tensor = v1.clone().matmul(g.clone().swap_dims(2, 3));
            d_fk = d_fk + self_tensor_backward(d_k_tensor, fk.clone());
        }
        if index > 0 {
            let z = prefixes.clone().narrow(2, index, 1).squeeze_dim::<4>(2);
            let d_q_tensor = d_r.clone().matmul(z.swap_dims(2, 3));
            d_fq = d_fq + self_tensor_backward(d_q_tensor, fq.clone());
        }
        let contribution = q_tensor.swap_dims(2, 3).matmul(d_r.clone());
        suffix = Some(match suffix {
            Some(g) => g + contribution,
            None => contribution,
        });

        // weights inside the block: w = s^p on and below the diagonal
        let m = len;
        let causal = Tensor::<B, 2>::ones([m, m], &fq.device()).tril(0).unsqueeze::<4>();
        let d_weights = d_r.matmul(v1.swap_dims(2, 3)) * causal;
        let head_dim = d_v1.dims()[3] - 1;
        let d_v = d_v1.narrow(3, 0, head_dim);
        grads.push(match &block_local {
            Some(l) => {
                let slope = int_power(scores, l.degree - 1) * l.degree as f64;
                let d_s = d_weights * slope;
                let d_lq = d_s.clone().matmul(l.key.clone());
                let d_lk = d_s.swap_dims(2, 3).matmul(l.query.clone());
                vec![d_fq, d_fk, d_v, d_lq, d_lk]
            }
            None => {
                let d_s = d_weights * scores * 2.0;
                d_fq = d_fq + d_s.clone().matmul(fk.clone());
                d_fk = d_fk + d_s.swap_dims(2, 3).matmul(fq.clone());
                vec![d_fq, d_fk, d_v]
            }
        });
    }
    grads.reverse();
    let inputs = if local.is_some() { 5 } else { 3 };
    (0..inputs).map(|i| Tensor::cat(grads.iter().map(|g| g[i].clone()).collect(), 2)).collect()
}
