//! One level of the learned sketch, `W2 · gelu_tanh(W1 · LN(x))`, as a backend operation with a
//! hand-written backward pass.
//!
//! Under ordinary autodiff a level keeps every intermediate of its hidden layer, eight times the
//! sketch size per row and about a dozen of them (normalisation, projection, the pieces of the
//! GELU), which made the learned sketch the largest activation of a long-context attention
//! layer. The operation keeps only its input and weights; the backward pass recomputes the
//! hidden layer and differentiates it by hand. Both passes work on slices of rows so that their
//! temporaries stay small whatever the context length: [`SKETCH_LEVEL_ROWS`] at a time in the
//! composed passes every backend gets, smaller slices on parallel threads in the CPU backend's
//! own passes.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::ops::PolysketchBackend;
use crate::sketch::{gelu_tanh, tanh, GELU_CUBIC};

/// Epsilon of the LayerNorm that starts every sketch level.
pub const SKETCH_NORM_EPSILON: f64 = 1e-5;

/// Rows processed at a time by the composed sketch-level passes: bounds their temporaries to
/// `SKETCH_LEVEL_ROWS × hidden` values each.
pub const SKETCH_LEVEL_ROWS: usize = 16_384;

/// The weights of one sketch level, all as matrices so that one tensor rank fits them all.
#[derive(Debug, Clone)]
pub struct SketchLevelWeights<T> {
    /// LayerNorm gain, `[1, in_dim]`.
    pub gamma: T,
    /// LayerNorm bias, `[1, in_dim]`.
    pub beta: T,
    /// Up-projection `W1`, `[in_dim, hidden]`.
    pub up: T,
    /// Down-projection `W2`, `[hidden, sketch_dim]`.
    pub down: T,
}

impl<T> SketchLevelWeights<T> {
    /// The same weights converted by `f`, in the order gamma, beta, up, down.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> SketchLevelWeights<U> {
        SketchLevelWeights {
            gamma: f(self.gamma),
            beta: f(self.beta),
            up: f(self.up),
            down: f(self.down),
        }
    }

    /// The weights in the order of [`SketchLevelWeights::map`].
    pub fn into_array(self) -> [T; 4] {
        [self.gamma, self.beta, self.up, self.down]
    }

    /// The inverse of [`SketchLevelWeights::into_array`].
    pub fn from_array([gamma, beta, up, down]: [T; 4]) -> Self {
        Self { gamma, beta, up, down }
    }
}

/// `x̂ = (x - mean) / sqrt(var + ε)` per row, with `1 / sqrt(var + ε)`.
///
/// # Shapes
/// - `x`: `[rows, in_dim]`
/// - returns `[rows, in_dim]` and `[rows, 1]`
fn normalise<B: Backend>(x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let centred = x.clone() - x.mean_dim(1);
    let variance = (centred.clone() * centred.clone()).mean_dim(1);
    let inv_std = (variance + SKETCH_NORM_EPSILON).sqrt().recip();
    (centred * inv_std.clone(), inv_std)
}

/// `gelu_tanh(u)` and `grad ⊙ gelu_tanh'(u)`, sharing one tanh, composed from tensor
/// operations.
///
/// # Shapes
/// - `u`, `grad`: `[rows, hidden]`
/// - returns two `[rows, hidden]`
pub(crate) fn gelu_backward_composed<B: Backend>(
    u: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let u2 = u.clone() * u.clone();
    let t = tanh(u.clone() * (u2.clone() * GELU_CUBIC + 1.0) * c);
    let half_one_plus_t = (t.clone() + 1.0) * 0.5;
    let gelu = u.clone() * half_one_plus_t.clone();
    // d/du [u/2 (1 + t)] = (1 + t)/2 + u/2 · (1 - t²) · c (1 + 3A u²)
    let one_minus_t2 = (t.clone() * t).neg() + 1.0;
    let slope = half_one_plus_t + u * one_minus_t2 * (u2 * (3.0 * GELU_CUBIC) + 1.0) * (0.5 * c);
    (gelu, grad * slope)
}

/// Row ranges `start..end` of at most [`SKETCH_LEVEL_ROWS`] rows covering `rows`.
fn row_spans(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows.div_ceil(SKETCH_LEVEL_ROWS).max(1)).map(move |i| {
        let start = i * SKETCH_LEVEL_ROWS;
        (start, (start + SKETCH_LEVEL_ROWS).min(rows) - start)
    })
}

/// The sketch level composed from tensor operations: the reference of the operation and the
/// default body of [`PolysketchBackend::sketch_level`]; ordinary autodiff differentiates it.
///
/// # Shapes
/// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
/// - returns `[rows, sketch_dim]`
pub fn sketch_level_composed<B: Backend>(
    x: Tensor<B, 2>,
    weights: &SketchLevelWeights<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let rows = x.dims()[0];
    let parts: Vec<_> = row_spans(rows)
        .map(|(start, len)| {
            let (normalised, _) = normalise(x.clone().narrow(0, start, len));
            let y = normalised * weights.gamma.clone() + weights.beta.clone();
            let hidden = gelu_tanh(y.matmul(weights.up.clone()));
            hidden.matmul(weights.down.clone())
        })
        .collect();
    if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        Tensor::cat(parts, 0)
    }
}

/// Gradients of the sketch level with respect to its input and weights, recomputing the hidden
/// layer one slice of rows at a time; the default body of
/// [`PolysketchBackend::sketch_level_backward`].
///
/// # Shapes
/// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
/// - `grad_output`: `[rows, sketch_dim]`
/// - returns the input gradient `[rows, in_dim]` and the weight gradients, each of its weight's
///   shape
pub fn sketch_level_backward_composed<B: Backend>(
    x: Tensor<B, 2>,
    weights: &SketchLevelWeights<Tensor<B, 2>>,
    grad_output: Tensor<B, 2>,
) -> (Tensor<B, 2>, SketchLevelWeights<Tensor<B, 2>>) {
    let rows = x.dims()[0];
    let zeros = |t: &Tensor<B, 2>| t.zeros_like();
    let mut grads = SketchLevelWeights {
        gamma: zeros(&weights.gamma),
        beta: zeros(&weights.beta),
        up: zeros(&weights.up),
        down: zeros(&weights.down),
    };
    let mut grad_x = Vec::new();
    for (start, len) in row_spans(rows) {
        let (normalised, inv_std) = normalise(x.clone().narrow(0, start, len));
        let grad_out = grad_output.clone().narrow(0, start, len);
        let y = normalised.clone() * weights.gamma.clone() + weights.beta.clone();
        let grad_hidden = grad_out.clone().matmul(weights.down.clone().transpose());
        let (hidden, grad_pre) =
            gelu_backward_composed(y.clone().matmul(weights.up.clone()), grad_hidden);
        grads.down = grads.down + hidden.transpose().matmul(grad_out);
        grads.up = grads.up + y.transpose().matmul(grad_pre.clone());
        let grad_y = grad_pre.matmul(weights.up.clone().transpose());
        grads.gamma = grads.gamma + (grad_y.clone() * normalised.clone()).sum_dim(0);
        grads.beta = grads.beta + grad_y.clone().sum_dim(0);
        // through x̂ = (x - mean) · inv_std: subtract the mean and the projection on x̂
        let grad_norm = grad_y * weights.gamma.clone();
        let along = (grad_norm.clone() * normalised.clone()).mean_dim(1);
        let grad_in = (grad_norm.clone() - grad_norm.mean_dim(1) - normalised * along) * inv_std;
        grad_x.push(grad_in);
    }
    let grad_x = if grad_x.len() == 1 {
        grad_x.into_iter().next().expect("one part")
    } else {
        Tensor::cat(grad_x, 0)
    };
    (grad_x, grads)
}

fn wrap<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn unwrap<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// [`sketch_level_composed`] on primitives.
pub(crate) fn sketch_level_primitive<B: Backend>(
    x: FloatTensor<B>,
    weights: SketchLevelWeights<FloatTensor<B>>,
) -> FloatTensor<B> {
    unwrap(sketch_level_composed(wrap::<B>(x), &weights.map(wrap::<B>)))
}

/// [`sketch_level_backward_composed`] on primitives.
pub(crate) fn sketch_level_backward_primitive<B: Backend>(
    x: FloatTensor<B>,
    weights: SketchLevelWeights<FloatTensor<B>>,
    grad_output: FloatTensor<B>,
) -> (FloatTensor<B>, SketchLevelWeights<FloatTensor<B>>) {
    let (grad_x, grads) =
        sketch_level_backward_composed(wrap::<B>(x), &weights.map(wrap::<B>), wrap(grad_output));
    (unwrap(grad_x), grads.map(unwrap))
}

/// Backward step of a sketch level: keeps the input and the weights only.
#[derive(Debug)]
struct SketchLevelBackward;

impl<B: PolysketchBackend> Backward<B, 5> for SketchLevelBackward {
    type State = [NodeId; 5];

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, saved: &mut Checkpointer) {
        let [x, gamma, beta, up, down] =
            ops.state.map(|id| saved.retrieve_node_output::<FloatTensor<B>>(id));
        let grad_output = grads.consume::<B>(&ops.node);
        let weights = SketchLevelWeights { gamma, beta, up, down };
        let (grad_x, grad_weights) = B::sketch_level_backward(x, weights, grad_output);
        let gradients = std::iter::once(grad_x).chain(grad_weights.into_array());
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// Records a sketch level on the autodiff graph with its hand-written backward.
pub(crate) fn track_sketch_level<B: PolysketchBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weights: SketchLevelWeights<FloatTensor<Autodiff<B, C>>>,
) -> FloatTensor<Autodiff<B, C>> {
    let [gamma, beta, up, down] = weights.into_array();
    let inputs = [x, gamma, beta, up, down];
    let nodes = inputs.clone().map(|t| t.node);
    let inner = |i: usize| inputs[i].primitive.clone();
    let inner_weights = || SketchLevelWeights::from_array([inner(1), inner(2), inner(3), inner(4)]);
    match SketchLevelBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let ids = [
                prep.checkpoint(&inputs[0]),
                prep.checkpoint(&inputs[1]),
                prep.checkpoint(&inputs[2]),
                prep.checkpoint(&inputs[3]),
                prep.checkpoint(&inputs[4]),
            ];
            prep.finish(ids, B::sketch_level(inner(0), inner_weights()))
        }
        OpsKind::UnTracked(prep) => prep.finish(B::sketch_level(inner(0), inner_weights())),
    }
}

/// One sketch level, `W2 · gelu_tanh(W1 · LN(x))`, through the backend's implementation.
///
/// # Shapes
/// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
/// - returns `[rows, sketch_dim]`
pub fn sketch_level<B: PolysketchBackend>(
    x: Tensor<B, 2>,
    weights: SketchLevelWeights<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    wrap(B::sketch_level(unwrap(x), weights.map(unwrap)))
}
