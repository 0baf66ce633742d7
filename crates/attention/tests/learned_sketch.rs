//! The learned sketch's levels run as a backend operation with a hand-written backward pass;
//! here they are checked, forward and every gradient, against the same sketch built from Burn's
//! own modules under ordinary autodiff.

mod common;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use common::*;
use polysketch_attention::sketch_level::{
    sketch_level, sketch_level_backward_composed, sketch_level_composed, SketchLevelWeights,
    SKETCH_LEVEL_ROWS,
};
use polysketch_attention::{LearnedSketch, PolysketchBackend};

type Plain = NdArray<f64>;

/// Any tensor as a plain double-precision one, so that different backends can be compared.
fn plain<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<Plain, D> {
    Tensor::from_data(t.into_data().convert::<f64>(), &Default::default())
}

/// The gradient of every float parameter of a module, flattened, in visiting order.
struct ParameterGradients<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    found: Vec<Tensor<Plain, 2>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ParameterGradients<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = param.val().grad(self.grads).expect("every parameter has a gradient");
        let count = grad.shape().num_elements();
        self.found.push(plain(grad).reshape([1, count]));
    }
}

fn parameter_gradients<B: AutodiffBackend>(
    sketch: &LearnedSketch<B>,
    grads: &B::Gradients,
) -> Vec<Tensor<Plain, 2>> {
    let mut visitor = ParameterGradients { grads, found: Vec::new() };
    sketch.visit(&mut visitor);
    visitor.found
}

/// Replaces every float parameter by fixed normal values (`0.7` standard deviation), one seed
/// per parameter in visiting order, keeping it trainable.
struct FixedValues {
    seed: u64,
}

impl<B: Backend> ModuleMapper<B> for FixedValues {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        self.seed += 1;
        let shape = tensor.shape();
        let values: Vec<f64> =
            normals(shape.num_elements(), self.seed).into_iter().map(|v| 0.7 * v).collect();
        let fixed = Tensor::from_data(TensorData::new(values, shape), &tensor.device())
            .set_require_grad(tensor.is_require_grad());
        Param::from_mapped_value(id, fixed, mapper)
    }
}

/// A learned sketch whose weights are all replaced by fixed normal values: the same on every
/// backend, and far from the initial unit gains and zero biases, which would hide a wrong
/// LayerNorm gradient.
fn fixed_sketch<B: Backend>(head_dim: usize, sketch_dim: usize) -> LearnedSketch<B> {
    LearnedSketch::<B>::new(head_dim, sketch_dim, &Default::default())
        .map(&mut FixedValues { seed: 100 })
}

/// Loss, input gradient and parameter gradients of one sketch.
type Outcome = (Tensor<Plain, 4>, Tensor<Plain, 4>, Vec<Tensor<Plain, 2>>);

fn run<B: AutodiffBackend>(
    shape: [usize; 4],
    sketch_dim: usize,
    forward: impl Fn(&LearnedSketch<B>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Outcome {
    let sketch = fixed_sketch::<B>(shape[3], sketch_dim);
    let x = randn::<B>(shape, 1, 1.5).require_grad();
    let out = forward(&sketch, x.clone());
    let grads = probe(out.clone(), 2).backward();
    let grad_x = plain(x.grad(&grads).expect("input gradient"));
    (plain(out), grad_x, parameter_gradients(&sketch, &grads))
}

/// Checks the operation on backend `B`, forward and the gradients of the input and of every
/// parameter, against the module reference under plain autodiff.
fn check<B: AutodiffBackend + PolysketchBackend>(shape: [usize; 4], sketch_dim: usize, what: &str) {
    let (out, grad_x, params) = run::<B>(shape, sketch_dim, |s, x| s.forward(x));
    let (out_ref, grad_x_ref, params_ref) =
        run::<B64>(shape, sketch_dim, |s, x| s.forward_reference(x));
    assert_close(&format!("{what}: forward"), out, out_ref, 1e-10);
    assert_close(&format!("{what}: input gradient"), grad_x, grad_x_ref, 1e-9);
    assert_eq!(params.len(), 4 * 4, "four levels of gain, bias, up and down");
    for (i, (g, ge)) in params.into_iter().zip(params_ref).enumerate() {
        assert_close(&format!("{what}: gradient of parameter {i}"), g, ge, 1e-9);
    }
}

#[test]
fn learned_sketch_operation_matches_the_module_reference() {
    check::<B64>([2, 3, 11, 8], 4, "small");
    // more rows than one slice of the operation: the passes join several slices
    let seq = SKETCH_LEVEL_ROWS / 2 + 7;
    check::<B64>([1, 2, seq, 4], 2, "two slices");
}

#[test]
fn learned_sketch_operation_under_balanced_checkpointing() {
    check::<Autodiff<NdArray<f64>, BalancedCheckpointing>>([1, 2, 13, 8], 4, "checkpointed");
}

#[test]
fn learned_sketch_without_autodiff_equals_the_reference() {
    let sketch = fixed_sketch::<Plain>(8, 4);
    let x = randn::<Plain>([2, 1, 9, 8], 3, 1.0);
    let out = sketch.forward(x.clone());
    assert_close("no autodiff", out, sketch.forward_reference(x), 1e-10);
}

/// A `[rows, cols]` matrix of normals times `scale`.
fn matrix(rows: usize, cols: usize, seed: u64, scale: f64) -> Tensor<Plain, 2> {
    let values = normals(rows * cols, seed).into_iter().map(|v| v * scale).collect::<Vec<_>>();
    Tensor::from_data(TensorData::new(values, [rows, cols]), &Default::default())
}

#[test]
fn composed_sketch_level_equals_the_cpu_one_forward_and_backward() {
    // the composed passes are what GPU backends run; the CPU ones are checked above
    let (in_dim, sketch_dim) = (8, 4);
    let hidden = 8 * sketch_dim;
    for rows in [1, 37, SKETCH_LEVEL_ROWS + 5] {
        let x = matrix(rows, in_dim, 1, 1.5);
        let weights = SketchLevelWeights {
            gamma: matrix(1, in_dim, 2, 0.7),
            beta: matrix(1, in_dim, 3, 0.7),
            up: matrix(in_dim, hidden, 4, 0.7),
            down: matrix(hidden, sketch_dim, 5, 0.7),
        };
        let grad_output = matrix(rows, sketch_dim, 6, 1.0);
        let composed = sketch_level_composed(x.clone(), &weights);
        let cpu = sketch_level(x.clone(), weights.clone());
        assert_close(&format!("{rows} rows: forward"), composed, cpu, 1e-12);

        let (grad_x, grads) =
            sketch_level_backward_composed(x.clone(), &weights, grad_output.clone());
        let prim = |t: Tensor<Plain, 2>| t.into_primitive().tensor();
        let wrap = |t| Tensor::<Plain, 2>::from_primitive(TensorPrimitive::Float(t));
        let (cpu_grad_x, cpu_grads) =
            Plain::sketch_level_backward(prim(x), weights.map(prim), prim(grad_output));
        assert_close(&format!("{rows} rows: input gradient"), grad_x, wrap(cpu_grad_x), 1e-12);
        let names = ["gamma", "beta", "up", "down"];
        for ((name, g), cpu) in names.iter().zip(grads.into_array()).zip(cpu_grads.into_array()) {
            assert_close(&format!("{rows} rows: gradient of {name}"), g, wrap(cpu), 1e-12);
        }
    }
}
