//! The learned sketch's levels on the CPU backend, written out over plain arrays.
//!
//! Composed from tensor operations, a sketch level spends most of its time outside its matrix
//! products: the GELU and the LayerNorm take dozens of passes, each allocating a fresh array,
//! and the CPU backend copies every transposed operand before a product (the weight gradients
//! have one each). Here each element-wise stage is one loop, the products read transposed
//! operands through strides, and slices of rows run on parallel threads.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Element, Tensor, TensorData, TensorPrimitive};
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, LinalgScalar, ScalarOperand};

use crate::sketch::GELU_CUBIC;
use crate::sketch_level::{SketchLevelWeights, SKETCH_NORM_EPSILON};

/// Floats of the CPU sketch level: `f32` and `f64`.
pub(crate) trait CpuFloat:
    Element + LinalgScalar + ScalarOperand + PartialOrd + Send + Sync + std::ops::AddAssign
{
    /// `gelu_tanh(u)` and its derivative at `u`.
    fn gelu_and_slope(self) -> (Self, Self);
    /// `1 / sqrt(variance + ε)` of the sketch LayerNorm.
    fn inv_std(variance: Self) -> Self;
    /// Conversion from a count or a constant.
    fn of(value: f64) -> Self;
}

macro_rules! cpu_float {
    ($float:ty) => {
        impl CpuFloat for $float {
            #[inline]
            fn gelu_and_slope(self) -> (Self, Self) {
                let u = self;
                let c = (2.0 / std::f64::consts::PI).sqrt() as $float;
                let a = GELU_CUBIC as $float;
                let u2 = u * u;
                // tanh(z) = 1 - 2 / (e^{2z} + 1), as the composed tensor version computes it
                let z = (c * u * (1.0 + a * u2)).clamp(-20.0, 20.0);
                let t = 1.0 - 2.0 / ((2.0 * z).exp() + 1.0);
                let half = 0.5 * (1.0 + t);
                let slope = half + 0.5 * u * (1.0 - t * t) * c * (1.0 + 3.0 * a * u2);
                (u * half, slope)
            }

            #[inline]
            fn inv_std(variance: Self) -> Self {
                1.0 / (variance + SKETCH_NORM_EPSILON as $float).sqrt()
            }

            #[inline]
            fn of(value: f64) -> Self {
                value as $float
            }
        }
    };
}

cpu_float!(f32);
cpu_float!(f64);

/// A matrix as a row-major array; no copy when the buffer is not shared.
fn into_matrix<B: Backend, E: CpuFloat>(t: FloatTensor<B>) -> Array2<E> {
    let t = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
    let [rows, cols] = t.dims();
    let values = t.into_data().convert::<E>().into_vec::<E>().expect("float values");
    Array2::from_shape_vec((rows, cols), values).expect("row-major values")
}

/// The inverse of [`into_matrix`].
fn from_matrix<B: Backend, E: CpuFloat>(m: Array2<E>, device: &B::Device) -> FloatTensor<B> {
    let dims = [m.nrows(), m.ncols()];
    let (values, offset) = m.into_raw_vec_and_offset();
    debug_assert!(offset.unwrap_or(0) == 0, "owned row-major matrix");
    Tensor::<B, 2>::from_data(TensorData::new(values, dims), device).into_primitive().tensor()
}

/// The level's weights as arrays: gain and bias as vectors.
struct Weights<E> {
    gamma: Array1<E>,
    beta: Array1<E>,
    up: Array2<E>,
    down: Array2<E>,
}

fn weights<B: Backend, E: CpuFloat>(w: SketchLevelWeights<FloatTensor<B>>) -> Weights<E> {
    let vector = |t| into_matrix::<B, E>(t).remove_axis(Axis(0));
    Weights {
        gamma: vector(w.gamma),
        beta: vector(w.beta),
        up: into_matrix::<B, E>(w.up),
        down: into_matrix::<B, E>(w.down),
    }
}

/// LayerNorm of each row of `x` into `y = x̂ γ + β`, keeping `x̂` and `1/σ` when asked.
///
/// # Shapes
/// - `x`, `y`, `normalised`: `[rows, in_dim]`; `inv_std`: `[rows]`
fn layer_norm<E: CpuFloat>(
    x: ArrayView2<E>,
    w: &Weights<E>,
    mut y: ArrayViewMut2<E>,
    mut keep: Option<(ArrayViewMut2<E>, &mut [E])>,
) {
    let width = E::of(x.ncols() as f64);
    for (i, (row, mut out)) in x.outer_iter().zip(y.outer_iter_mut()).enumerate() {
        let mean = row.iter().fold(E::zero(), |acc, &v| acc + v) / width;
        let variance = row.iter().fold(E::zero(), |acc, &v| acc + (v - mean) * (v - mean)) / width;
        let inv_std = E::inv_std(variance);
        for (j, (o, &v)) in out.iter_mut().zip(row.iter()).enumerate() {
            let normalised = (v - mean) * inv_std;
            *o = normalised * w.gamma[j] + w.beta[j];
            if let Some((kept, _)) = keep.as_mut() {
                kept[[i, j]] = normalised;
            }
        }
        if let Some((_, inv)) = keep.as_mut() {
            inv[i] = inv_std;
        }
    }
}

/// Rows per task of the parallel passes: large enough for efficient matrix products, small
/// enough that a few tasks keep every core busy at short contexts.
const TASK_ROWS: usize = 4096;

/// One sketch level, `W2 · gelu_tanh(W1 · LN(x))`, with slices of rows on parallel threads.
///
/// # Shapes
/// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
/// - returns `[rows, sketch_dim]`
pub(crate) fn sketch_level<B: Backend, E: CpuFloat>(
    x: FloatTensor<B>,
    weights_in: SketchLevelWeights<FloatTensor<B>>,
) -> FloatTensor<B> {
    let device = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.clone())).device();
    let x = into_matrix::<B, E>(x);
    let w = weights::<B, E>(weights_in);
    let (rows, in_dim) = x.dim();
    let (hidden, sketch_dim) = w.down.dim();
    let mut out = Array2::<E>::zeros((rows, sketch_dim));
    let chunk = TASK_ROWS;
    out.axis_chunks_iter_mut(Axis(0), chunk)
        .into_par_iter()
        .zip(x.axis_chunks_iter(Axis(0), chunk).into_par_iter())
        .for_each(|(mut out, x)| {
            let len = x.nrows();
            let mut y = Array2::<E>::zeros((len, in_dim));
            let mut u = Array2::<E>::zeros((len, hidden));
            layer_norm(x, &w, y.view_mut(), None);
            general_mat_mul(E::one(), &y, &w.up, E::zero(), &mut u);
            u.mapv_inplace(|v| v.gelu_and_slope().0);
            general_mat_mul(E::one(), &u, &w.down, E::zero(), &mut out);
        });
    from_matrix::<B, E>(out, &device)
}

/// Weight gradients of one slice of rows.
struct Partial<E> {
    gamma: Array1<E>,
    beta: Array1<E>,
    up: Array2<E>,
    down: Array2<E>,
}

/// Gradients of [`sketch_level`] with respect to its input and weights, recomputing the hidden
/// layer one slice of rows at a time on parallel threads; the slices' weight gradients are
/// summed in order, so the result does not depend on the scheduling.
///
/// # Shapes
/// - `x`: `[rows, in_dim]`, weights as in [`SketchLevelWeights`]
/// - `grad_output`: `[rows, sketch_dim]`
/// - returns `[rows, in_dim]` and one gradient per weight, each of its weight's shape
pub(crate) fn sketch_level_backward<B: Backend, E: CpuFloat>(
    x: FloatTensor<B>,
    weights_in: SketchLevelWeights<FloatTensor<B>>,
    grad_output: FloatTensor<B>,
) -> (FloatTensor<B>, SketchLevelWeights<FloatTensor<B>>) {
    let device = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.clone())).device();
    let x = into_matrix::<B, E>(x);
    let grad_output = into_matrix::<B, E>(grad_output);
    let w = weights::<B, E>(weights_in);
    let (rows, in_dim) = x.dim();
    let mut grad_x = Array2::<E>::zeros((rows, in_dim));
    let chunk = TASK_ROWS;
    let partials: Vec<Partial<E>> = grad_x
        .axis_chunks_iter_mut(Axis(0), chunk)
        .into_par_iter()
        .zip(x.axis_chunks_iter(Axis(0), chunk).into_par_iter())
        .zip(grad_output.axis_chunks_iter(Axis(0), chunk).into_par_iter())
        .map(|((grad_in, x), grad_out)| slice_backward(x, &w, grad_out, grad_in))
        .collect();
    let mut total = Partial {
        gamma: Array1::<E>::zeros(in_dim),
        beta: Array1::<E>::zeros(in_dim),
        up: Array2::<E>::zeros(w.up.dim()),
        down: Array2::<E>::zeros(w.down.dim()),
    };
    for p in partials {
        total.gamma += &p.gamma;
        total.beta += &p.beta;
        total.up += &p.up;
        total.down += &p.down;
    }
    let vector = |v: Array1<E>| v.insert_axis(Axis(0));
    let grads = SketchLevelWeights {
        gamma: from_matrix::<B, E>(vector(total.gamma), &device),
        beta: from_matrix::<B, E>(vector(total.beta), &device),
        up: from_matrix::<B, E>(total.up, &device),
        down: from_matrix::<B, E>(total.down, &device),
    };
    (from_matrix::<B, E>(grad_x, &device), grads)
}

/// The backward pass over one slice of rows: writes the input gradient into `grad_in` and
/// returns the slice's weight gradients.
///
/// # Shapes
/// - `x`, `grad_in`: `[len, in_dim]`; `grad_out`: `[len, sketch_dim]`
fn slice_backward<E: CpuFloat>(
    x: ArrayView2<E>,
    w: &Weights<E>,
    grad_out: ArrayView2<E>,
    mut grad_in: ArrayViewMut2<E>,
) -> Partial<E> {
    let (len, in_dim) = x.dim();
    let hidden = w.down.nrows();
    let mut y = Array2::<E>::zeros((len, in_dim));
    let mut normalised = Array2::<E>::zeros((len, in_dim));
    let mut inv_std = vec![E::zero(); len];
    let mut u = Array2::<E>::zeros((len, hidden));
    let mut grad_u = Array2::<E>::zeros((len, hidden));
    let mut grad_y = Array2::<E>::zeros((len, in_dim));
    let mut partial = Partial {
        gamma: Array1::<E>::zeros(in_dim),
        beta: Array1::<E>::zeros(in_dim),
        up: Array2::<E>::zeros(w.up.dim()),
        down: Array2::<E>::zeros(w.down.dim()),
    };
    layer_norm(x, w, y.view_mut(), Some((normalised.view_mut(), &mut inv_std)));
    general_mat_mul(E::one(), &y, &w.up, E::zero(), &mut u);
    // gradient at the GELU's output, then through it; u becomes gelu(u)
    general_mat_mul(E::one(), &grad_out, &w.down.t(), E::zero(), &mut grad_u);
    for (v, g) in u.iter_mut().zip(grad_u.iter_mut()) {
        let (gelu, slope) = v.gelu_and_slope();
        *v = gelu;
        *g = *g * slope;
    }
    general_mat_mul(E::one(), &u.t(), &grad_out, E::zero(), &mut partial.down);
    general_mat_mul(E::one(), &y.t(), &grad_u, E::zero(), &mut partial.up);
    general_mat_mul(E::one(), &grad_u, &w.up.t(), E::zero(), &mut grad_y);
    // through y = x̂ γ + β and x̂ = (x - mean) / σ
    let width = E::of(in_dim as f64);
    for i in 0..len {
        let (gy, xh) = (grad_y.row(i), normalised.row(i));
        let (mut sum, mut along) = (E::zero(), E::zero());
        for j in 0..in_dim {
            partial.gamma[j] += gy[j] * xh[j];
            partial.beta[j] += gy[j];
            let g = gy[j] * w.gamma[j];
            sum += g;
            along += g * xh[j];
        }
        let (mean, along) = (sum / width, along / width);
        for j in 0..in_dim {
            let g = gy[j] * w.gamma[j];
            grad_in[[i, j]] = (g - mean - xh[j] * along) * inv_std[i];
        }
    }
    partial
}
