//! Gradient clipping by the global norm over all parameters (Burn's own clips per tensor).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

/// Collects `Σ ‖g‖²` over every parameter that has a gradient.
struct GradSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sums.push(g.powi_scalar(2).sum());
        }
    }
}

/// Multiplies every gradient by `factor`.
struct GradScale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// Global gradient norm over all parameters; scales the gradients down to `max_norm` when it is
/// larger (and `max_norm > 0`). Returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut squares = GradSquares::<B> { grads, sums: Vec::new() };
    model.visit(&mut squares);
    if squares.sums.is_empty() {
        return 0.0;
    }
    let norm: f64 = Tensor::cat(squares.sums, 0).sum().sqrt().into_scalar().elem();
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        model.visit(&mut GradScale { grads, factor: max_norm / norm });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_norm_clipping_scales_all_gradients_together() {
        use burn::backend::{Autodiff, NdArray};
        type AD = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let a = Param::from_tensor(Tensor::<AD, 1>::from_floats([3.0], &device));
        let b = Param::from_tensor(Tensor::<AD, 1>::from_floats([4.0], &device));
        let model = (a, b);
        // loss = 3a + 4b, so the gradients are 3 and 4: global norm 5
        let loss = model.0.val() * 3.0 + model.1.val() * 4.0;
        let mut grads = GradientsParams::from_grads(loss.sum().backward(), &model);
        let norm = clip_global_norm::<AD, _>(&model, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let ga: f32 = grads.get::<NdArray<f32>, 1>(model.0.id).unwrap().into_scalar();
        let gb: f32 = grads.get::<NdArray<f32>, 1>(model.1.id).unwrap().into_scalar();
        assert!((ga - 0.6).abs() < 1e-5 && (gb - 0.8).abs() < 1e-5, "{ga} {gb}");
    }
}
