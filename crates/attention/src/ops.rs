//! The causal polysketch block algorithm as a Burn backend operation.
//!
//! The operation receives sketch features, not raw queries and keys, so the sketch networks stay
//! ordinary modules and a fused kernel only has to implement the block algorithm itself.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::blockwise::{blockwise_backward, blockwise_forward, PolysketchSaved};
use crate::lean::{lean_attention_backward, lean_attention_forward, CausalWeights};
use crate::sketch_level::{
    sketch_level_backward_primitive, sketch_level_primitive, track_sketch_level, SketchLevelWeights,
};

/// Exact local blocks: normalised queries and keys whose `degree`-th power of the dot product
/// replaces the sketched weight inside each diagonal block.
#[derive(Debug, Clone)]
pub struct LocalExact<T> {
    /// Normalised queries `q̂`, `[batch, heads, seq, head_dim]`.
    pub query: T,
    /// Normalised keys `k̂`, `[batch, heads, seq, head_dim]`.
    pub key: T,
    /// Even degree `p` of the exact local weight `(q̂·k̂)^p`.
    pub degree: u32,
}

impl<T> LocalExact<T> {
    /// The same local blocks with both tensors converted by `f`.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> LocalExact<U> {
        LocalExact { query: f(self.query), key: f(self.key), degree: self.degree }
    }
}

/// Backend extension with the attention operations: the causal polysketch block algorithm and
/// memory-lean exact causal attention.
///
/// The provided body composes the algorithm from Burn tensor operations, so every backend gets a
/// correct implementation that autodiff differentiates; a backend with fused kernels overrides
/// it and falls back to [`polysketch_causal_composed`] for anything its kernels do not cover.
pub trait PolysketchBackend: Backend {
    /// Causal polysketch attention by blocks (ALGORITHM.md §4).
    ///
    /// Weights are `(φ(q_i)·φ(k_j))²` for `j ≤ i`, or `(q̂_i·k̂_j)^p` when `local` is given and
    /// `i`, `j` share a block; the output is `Σ_j w_ij v_j / (1 + Σ_j w_ij)`.
    ///
    /// # Shapes
    /// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
    /// - `value`: `[batch, heads, seq, head_dim]`
    /// - `local`: queries and keys `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, head_dim]`
    fn polysketch_causal(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let wrap = |t| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(t));
        let local =
            local.map(|l| LocalExact { query: wrap(l.query), key: wrap(l.key), degree: l.degree });
        polysketch_causal_composed(
            wrap(query_features),
            wrap(key_features),
            wrap(value),
            local,
            block_size,
        )
        .into_primitive()
        .tensor()
    }

    /// Forward pass of the block algorithm under autodiff: the output with what
    /// [`PolysketchBackend::polysketch_backward`] needs (denominators and one prefix state per
    /// block), so nothing of size `seq · sketch_dim²` is kept.
    ///
    /// # Shapes
    /// - inputs as for [`PolysketchBackend::polysketch_causal`]
    /// - returns output `[batch, heads, seq, head_dim]`, denominators `[batch, heads, seq, 1]`
    ///   and prefixes `[batch, heads, blocks, sketch_dim², head_dim + 1]`
    fn polysketch_forward(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> PolysketchSaved<FloatTensor<Self>> {
        composed_polysketch_forward::<Self>(query_features, key_features, value, local, block_size)
    }

    /// Gradients of the block algorithm from the saved forward state: those of the features and
    /// values, then of the local queries and keys when `local` is given.
    ///
    /// # Shapes
    /// - inputs as for [`PolysketchBackend::polysketch_forward`], `saved` as it returns
    /// - `grad_output`: `[batch, heads, seq, head_dim]`
    /// - returns one gradient per input, each of its input's shape
    fn polysketch_backward(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
        saved: PolysketchSaved<FloatTensor<Self>>,
        grad_output: FloatTensor<Self>,
    ) -> Vec<FloatTensor<Self>> {
        composed_polysketch_backward::<Self>(
            query_features,
            key_features,
            value,
            local,
            block_size,
            saved,
            grad_output,
        )
    }

    /// Exact causal attention that stores only its output and one statistic per row for the
    /// backward pass (see [`crate::lean`]); `chunk` query rows are processed at a time.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, head_dim]`
    fn lean_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> FloatTensor<Self> {
        Self::lean_attention_with_stat(query, key, value, weights, chunk).0
    }

    /// Forward pass of [`PolysketchBackend::lean_attention`] with its per-row statistic.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, head_dim]` and `[batch, heads, seq, 1]`
    fn lean_attention_with_stat(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, stat) =
            lean_attention_forward(wrap::<Self>(query), wrap(key), wrap(value), weights, chunk);
        (unwrap(out), unwrap(stat))
    }

    /// Gradients of [`PolysketchBackend::lean_attention`] with respect to its three inputs.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`, `output`, `grad_output`: `[batch, heads, seq, head_dim]`
    /// - `stat`: `[batch, heads, seq, 1]`
    /// - returns three `[batch, heads, seq, head_dim]`
    #[allow(clippy::too_many_arguments)]
    fn lean_attention_backward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        output: FloatTensor<Self>,
        stat: FloatTensor<Self>,
        grad_output: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> [FloatTensor<Self>; 3] {
        lean_attention_backward(
            wrap::<Self>(query),
            wrap(key),
            wrap(value),
            wrap(output),
            wrap(stat),
            wrap(grad_output),
            weights,
            chunk,
        )
        .map(unwrap)
    }

    /// One level of the learned sketch, `W2 · gelu_tanh(W1 · LN(x))` (ALGORITHM.md §3), which
    /// under autodiff keeps only its input and weights (see [`crate::sketch_level`]).
    ///
    /// # Shapes
    /// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
    /// - returns `[rows, sketch_dim]`
    fn sketch_level(
        x: FloatTensor<Self>,
        weights: SketchLevelWeights<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        sketch_level_primitive::<Self>(x, weights)
    }

    /// Gradients of [`PolysketchBackend::sketch_level`] with respect to its input and weights.
    ///
    /// # Shapes
    /// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
    /// - `grad_output`: `[rows, sketch_dim]`
    /// - returns `[rows, in_dim]` and one gradient per weight, each of its weight's shape
    fn sketch_level_backward(
        x: FloatTensor<Self>,
        weights: SketchLevelWeights<FloatTensor<Self>>,
        grad_output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, SketchLevelWeights<FloatTensor<Self>>) {
        sketch_level_backward_primitive::<Self>(x, weights, grad_output)
    }
}

/// [`PolysketchBackend::polysketch_forward`] composed from tensor operations, one block at a time.
pub(crate) fn composed_polysketch_forward<B: Backend>(
    query_features: FloatTensor<B>,
    key_features: FloatTensor<B>,
    value: FloatTensor<B>,
    local: Option<LocalExact<FloatTensor<B>>>,
    block_size: usize,
) -> PolysketchSaved<FloatTensor<B>> {
    let saved = blockwise_forward(
        wrap::<B>(query_features),
        wrap(key_features),
        wrap(value),
        local.map(|l| l.map(wrap::<B>)),
        block_size,
    );
    PolysketchSaved {
        output: unwrap(saved.output),
        denominator: unwrap(saved.denominator),
        prefixes: saved.prefixes.into_primitive().tensor(),
    }
}

/// [`PolysketchBackend::polysketch_backward`] composed from tensor operations.
pub(crate) fn composed_polysketch_backward<B: Backend>(
    query_features: FloatTensor<B>,
    key_features: FloatTensor<B>,
    value: FloatTensor<B>,
    local: Option<LocalExact<FloatTensor<B>>>,
    block_size: usize,
    saved: PolysketchSaved<FloatTensor<B>>,
    grad_output: FloatTensor<B>,
) -> Vec<FloatTensor<B>> {
    let saved: PolysketchSaved<_, Tensor<B, 5>> = PolysketchSaved {
        output: wrap::<B>(saved.output),
        denominator: wrap(saved.denominator),
        prefixes: Tensor::from_primitive(TensorPrimitive::Float(saved.prefixes)),
    };
    blockwise_backward(
        wrap::<B>(query_features),
        wrap(key_features),
        wrap(value),
        local.map(|l| l.map(wrap::<B>)),
        block_size,
        saved,
        wrap(grad_output),
    )
    .into_iter()
    .map(unwrap)
    .collect()
}

/// `[query_features, key_features, value]`, followed by the local queries and keys when `degree`
/// is given, back into the block algorithm's arguments.
pub(crate) fn unpack_inputs<T>(
    inputs: Vec<T>,
    degree: Option<u32>,
) -> (T, T, T, Option<LocalExact<T>>) {
    let mut it = inputs.into_iter();
    let mut next = || it.next().expect("polysketch inputs");
    let (q, k, v) = (next(), next(), next());
    let local = degree.map(|degree| LocalExact { query: next(), key: next(), degree });
    (q, k, v, local)
}

fn wrap<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn unwrap<B: Backend>(t: Tensor<B, 4>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The CPU backend: the composed operations, except the learned sketch's levels, which run over
/// plain arrays (see [`crate::cpu`]).
macro_rules! cpu_backend {
    ($float:ty) => {
        impl PolysketchBackend for NdArray<$float> {
            fn sketch_level(
                x: FloatTensor<Self>,
                weights: SketchLevelWeights<FloatTensor<Self>>,
            ) -> FloatTensor<Self> {
                crate::cpu::sketch_level::<Self, $float>(x, weights)
            }

            fn sketch_level_backward(
                x: FloatTensor<Self>,
                weights: SketchLevelWeights<FloatTensor<Self>>,
                grad_output: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, SketchLevelWeights<FloatTensor<Self>>) {
                crate::cpu::sketch_level_backward::<Self, $float>(x, weights, grad_output)
            }
        }
    };
}

cpu_backend!(f32);
cpu_backend!(f64);

/// Backward step of lean attention: keeps the inputs, the output and the row statistic.
#[derive(Debug)]
struct LeanAttentionBackward {
    weights: CausalWeights,
    chunk: usize,
}

impl<B: PolysketchBackend> Backward<B, 3> for LeanAttentionBackward {
    type State = (NodeId, NodeId, NodeId, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, saved: &mut Checkpointer) {
        let (query, key, value, output, stat) = ops.state;
        let grad_output = grads.consume::<B>(&ops.node);
        let query = saved.retrieve_node_output::<FloatTensor<B>>(query);
        let key = saved.retrieve_node_output::<FloatTensor<B>>(key);
        let value = saved.retrieve_node_output::<FloatTensor<B>>(value);
        let gradients = B::lean_attention_backward(
            query,
            key,
            value,
            output,
            stat,
            grad_output,
            self.weights,
            self.chunk,
        );
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// Backward step of the polysketch block algorithm over `N` inputs (features and values, plus
/// local queries and keys when `N = 5`): keeps the output, the row denominators and one prefix
/// state per block, and recomputes the rest block by block.
#[derive(Debug)]
struct PolysketchBackward<const N: usize> {
    block_size: usize,
    degree: u32,
}

/// Saved inputs and forward state of [`PolysketchBackward`].
type PolysketchState<B> = (Vec<NodeId>, PolysketchSaved<FloatTensor<B>>);

impl<B: PolysketchBackend, const N: usize> Backward<B, N> for PolysketchBackward<N> {
    type State = PolysketchState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, saved: &mut Checkpointer) {
        let (ids, forward) = ops.state;
        let grad_output = grads.consume::<B>(&ops.node);
        let inputs =
            ids.into_iter().map(|id| saved.retrieve_node_output::<FloatTensor<B>>(id)).collect();
        let (query_features, key_features, value, local) =
            unpack_inputs(inputs, (N == 5).then_some(self.degree));
        let gradients = B::polysketch_backward(
            query_features,
            key_features,
            value,
            local,
            self.block_size,
            forward,
            grad_output,
        );
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// Records the block algorithm on the autodiff graph with its hand-written backward.
fn track_polysketch<B: PolysketchBackend, C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    degree: u32,
    block_size: usize,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = inputs.clone().map(|t| t.node);
    let step = PolysketchBackward::<N> { block_size, degree };
    let inner = |i: usize| inputs[i].primitive.clone();
    let local = (N == 5).then(|| LocalExact { query: inner(3), key: inner(4), degree });
    match step.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let ids = inputs.iter().map(|t| prep.checkpoint(t)).collect();
            let saved = B::polysketch_forward(inner(0), inner(1), inner(2), local, block_size);
            let output = saved.output.clone();
            prep.finish((ids, saved), output)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(B::polysketch_causal(inner(0), inner(1), inner(2), local, block_size))
        }
    }
}

impl<B: PolysketchBackend, C: CheckpointStrategy> PolysketchBackend for Autodiff<B, C> {
    fn polysketch_causal(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> FloatTensor<Self> {
        match local {
            None => {
                track_polysketch::<B, C, 3>([query_features, key_features, value], 2, block_size)
            }
            Some(l) => track_polysketch::<B, C, 5>(
                [query_features, key_features, value, l.query, l.key],
                l.degree,
                block_size,
            ),
        }
    }

    fn lean_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let nodes = [query.node.clone(), key.node.clone(), value.node.clone()];
        let step = LeanAttentionBackward { weights, chunk };
        match step.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let saved =
                    (prep.checkpoint(&query), prep.checkpoint(&key), prep.checkpoint(&value));
                let (out, stat) = B::lean_attention_with_stat(
                    query.primitive,
                    key.primitive,
                    value.primitive,
                    weights,
                    chunk,
                );
                prep.finish((saved.0, saved.1, saved.2, out.clone(), stat), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lean_attention(
                query.primitive,
                key.primitive,
                value.primitive,
                weights,
                chunk,
            )),
        }
    }

    fn sketch_level(
        x: FloatTensor<Self>,
        weights: SketchLevelWeights<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        track_sketch_level::<B, C>(x, weights)
    }
}

/// Memory-lean exact causal attention through the backend's implementation.
///
/// # Shapes
/// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn lean_attention<B: PolysketchBackend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    weights: CausalWeights,
    chunk: usize,
) -> Tensor<B, 4> {
    wrap(B::lean_attention(unwrap(query), unwrap(key), unwrap(value), weights, chunk))
}

/// Causal polysketch attention through the backend's implementation.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
/// - `value`: `[batch, heads, seq, head_dim]`
/// - `local`: queries and keys `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
pub fn polysketch_causal<B: PolysketchBackend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    value: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
) -> Tensor<B, 4> {
    let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let local =
        local.map(|l| LocalExact { query: prim(l.query), key: prim(l.key), degree: l.degree });
    let out = B::polysketch_causal(
        prim(query_features),
        prim(key_features),
        prim(value),
        local,
        block_size,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x^power` for a positive integer power by repeated squaring: plain multiplications, which
/// are cheaper than a general power on every backend and differentiate exactly.
pub(crate) fn int_power<B: Backend, const D: usize>(x: Tensor<B, D>, power: u32) -> Tensor<B, D> {
    assert!(power > 0, "int_power: power must be positive");
    let (mut result, mut base, mut rest) = (None::<Tensor<B, D>>, x, power);
    loop {
        if rest & 1 == 1 {
            result = Some(match result {
                Some(r) => r * base.clone(),
                None => base.clone(),
            });
        }
        rest >>= 1;
        if rest == 0 {
            return result.expect("power > 0 sets a bit");
        }
        base = base.clone() * base;
    }
}

/// Right-pads dimension 2 (`seq`) with zeros to `padded` rows.
fn pad_seq<B: Backend>(x: Tensor<B, 4>, padded: usize) -> Tensor<B, 4> {
    let [batch, heads, seq, dim] = x.dims();
    if padded == seq {
        return x;
    }
    let zeros = Tensor::zeros([batch, heads, padded - seq, dim], &x.device());
    Tensor::cat(vec![x, zeros], 2)
}

/// Splits `[batch, heads, seq, dim]` into `[batch, heads, blocks, block_size, dim]`.
fn into_blocks<B: Backend>(x: Tensor<B, 4>, block_size: usize) -> Tensor<B, 5> {
    let [batch, heads, seq, dim] = x.dims();
    x.reshape([batch, heads, seq / block_size, block_size, dim])
}

/// Row-wise self tensor product `x ⊗ x`, flattened.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, sketch_dim]`
/// - returns `[batch, heads, seq, sketch_dim²]`
pub(crate) fn self_tensor<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, seq, r] = x.dims();
    let outer = x.clone().unsqueeze_dim::<5>(4) * x.unsqueeze_dim::<5>(3);
    outer.reshape([batch, heads, seq, r * r])
}

/// `V' = [V, 1]`: the extra column accumulates the denominator.
///
/// # Shapes
/// - `value`: `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim + 1]`
pub(crate) fn with_ones<B: Backend>(value: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, seq, _] = value.dims();
    let ones = Tensor::ones([batch, heads, seq, 1], &value.device());
    Tensor::cat(vec![value, ones], 3)
}

/// `o = R[:, :h] / (1 + R[:, h])`.
///
/// # Shapes
/// - `result`: `[batch, heads, seq, head_dim + 1]`
/// - returns `[batch, heads, seq, head_dim]`
pub(crate) fn normalise_last<B: Backend>(result: Tensor<B, 4>) -> Tensor<B, 4> {
    let head_dim = result.dims()[3] - 1;
    result.clone().narrow(3, 0, head_dim) / (result.narrow(3, head_dim, 1) + 1.0)
}

/// The block algorithm composed from tensor operations: the reference every fused kernel is
/// tested against, and the fallback of every backend.
///
/// # Shapes
/// - `query_features`, `key_features`: `[batch, heads, seq, sketch_dim]`
/// - `value`: `[batch, heads, seq, head_dim]`
/// - `local`: queries and keys `[batch, heads, seq, head_dim]`
/// - returns `[batch, heads, seq, head_dim]`
///
/// # Panics
/// If `block_size` is zero or the shapes disagree.
pub fn polysketch_causal_composed<B: Backend>(
    query_features: Tensor<B, 4>,
    key_features: Tensor<B, 4>,
    value: Tensor<B, 4>,
    local: Option<LocalExact<Tensor<B, 4>>>,
    block_size: usize,
) -> Tensor<B, 4> {
    let [batch, heads, seq, sketch_dim] = query_features.dims();
    let head_dim = value.dims()[3];
    assert!(block_size > 0, "polysketch_causal: block_size must be positive");
    assert_eq!(key_features.dims(), [batch, heads, seq, sketch_dim], "polysketch_causal: keys");
    assert_eq!(value.dims()[..3], [batch, heads, seq], "polysketch_causal: values");
    let device = value.device();
    let block_size = block_size.min(seq.max(1));
    let blocks = seq.div_ceil(block_size);
    let padded = blocks * block_size;

    let q = into_blocks(pad_seq(query_features.clone(), padded), block_size);
    let k = into_blocks(pad_seq(key_features.clone(), padded), block_size);
    let v = into_blocks(pad_seq(with_ones(value), padded), block_size);
    let qq = into_blocks(pad_seq(self_tensor(query_features), padded), block_size);
    let kk = into_blocks(pad_seq(self_tensor(key_features), padded), block_size);

    // local part P_l = tril(W_l) V'_l, with sketched or exact weights inside the block
    let weights = match &local {
        Some(l) => {
            let lq = into_blocks(pad_seq(l.query.clone(), padded), block_size);
            let lk = into_blocks(pad_seq(l.key.clone(), padded), block_size);
            int_power(lq.matmul(lk.swap_dims(3, 4)), l.degree)
        }
        None => int_power(q.clone().matmul(k.clone().swap_dims(3, 4)), 2),
    };
    let causal = Tensor::<B, 2>::ones([block_size, block_size], &device)
        .tril(0)
        .reshape([1, 1, 1, block_size, block_size]);
    let local_part = (weights * causal).matmul(v.clone());

    // block summaries H_l = Σ_{s∈l} φ(k_s)⊗φ(k_s)⊗v'_s
    let summaries = kk.swap_dims(3, 4).matmul(v);

    // exclusive prefix Z_l = Σ_{j<l} H_j
    let zero = Tensor::zeros([batch, heads, 1, sketch_dim * sketch_dim, head_dim + 1], &device);
    let prefix = if blocks > 1 {
        let earlier = summaries.narrow(2, 0, blocks - 1).cumsum(2);
        Tensor::cat(vec![zero, earlier], 2)
    } else {
        zero
    };

    // R_l = P_l + (φ(Q_l)⊗φ(Q_l)) Z_l, then o = R[:, :h] / (1 + R[:, h])
    let result = local_part + qq.matmul(prefix);
    normalise_last(result.reshape([batch, heads, padded, head_dim + 1]).narrow(2, 0, seq))
}
