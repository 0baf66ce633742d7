//! Feature maps φ of polysketch attention: fixed random sketches and the learned sketch.

use burn::module::{Module, RunningState};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::{AttentionConfig, SketchKind, SketchScaling};
use crate::ops::PolysketchBackend;
use crate::sketch_level::{sketch_level, SketchLevelWeights, SKETCH_NORM_EPSILON};

/// SplitMix64 step: decorrelates nearby seeds such as `(seed, layer)` pairs.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Small deterministic generator, so a sketch depends on `(seed, layer)` alone and never on a
/// library's choice of algorithm.
struct SketchRng(u64);

impl SketchRng {
    fn new(seed: u64, layer: usize) -> Self {
        Self(splitmix64(seed ^ splitmix64(layer as u64 + 1)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal by the Box–Muller transform.
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn sign(&mut self) -> f64 {
        if self.next_u64() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// `tanh(z) = 1 - 2 / (e^{2z} + 1)`, from one single-precision exponential.
///
/// Burn's CPU backend evaluates `tanh` in double precision element by element, which dominated
/// the learned sketch's cost; this form is several times faster, saturates correctly, and is
/// accurate to about 1e-7 absolute. The clamp keeps `e^{2z}` and its derivative finite.
pub(crate) fn tanh<B: Backend, const D: usize>(z: Tensor<B, D>) -> Tensor<B, D> {
    let e = (z.clamp(-20.0, 20.0) * 2.0).exp();
    (e + 1.0).recip() * -2.0 + 1.0
}

/// Coefficient of the cubic term inside the tanh approximation of GELU.
pub const GELU_CUBIC: f64 = 0.044715;

/// The tanh approximation of GELU, `x/2 · (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
pub(crate) fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner = x.clone()
        * (x.clone() * x.clone() * GELU_CUBIC + 1.0)
        * (2.0 / std::f64::consts::PI).sqrt();
    x * (tanh(inner) + 1.0) * 0.5
}

/// One projection `[rows, cols]` with unit-variance entries.
fn projection(rng: &mut SketchRng, kind: SketchKind, rows: usize, cols: usize) -> Vec<f32> {
    match kind {
        SketchKind::Hadamard => {
            // column c of the Sylvester Hadamard matrix has entry (-1)^popcount(i & c) in row i
            let signs: Vec<f64> = (0..rows).map(|_| rng.sign()).collect();
            let picks: Vec<usize> =
                (0..cols).map(|_| (rng.next_u64() % rows as u64) as usize).collect();
            let mut out = Vec::with_capacity(rows * cols);
            for (i, sign) in signs.iter().enumerate() {
                for &c in &picks {
                    let h = if (i & c).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                    out.push((sign * h) as f32);
                }
            }
            out
        }
        SketchKind::Gaussian | SketchKind::Learned => {
            (0..rows * cols).map(|_| rng.normal() as f32).collect()
        }
    }
}

/// Fixed random polynomial sketch of one layer, shared by queries, keys and heads.
///
/// Level one maps `head_dim → sketch_dim` by `φ(x) = (x S1) ∘ (x S2)`, a degree-2 sketch; each
/// further level maps `sketch_dim → sketch_dim` the same way with Gaussian projections, doubling
/// the degree. Squaring `φ(q)·φ(k)` then gives the attention degree. The projections are
/// module state (saved with the model) and never receive gradients.
#[derive(Module, Debug)]
pub struct RandomSketch<B: Backend> {
    /// One `[2, in_dim, sketch_dim]` pair of projections per level.
    levels: Vec<RunningState<Tensor<B, 3>>>,
    /// Factor applied to the final features.
    scale: f64,
}

impl<B: Backend> RandomSketch<B> {
    /// Draws the sketch of layer `layer` from `config.sketch_seed`.
    ///
    /// `config.sketch` chooses the first level's projections (Gaussian or Hadamard); deeper
    /// levels are Gaussian. There are `log2(degree) - 1` levels.
    pub fn new(
        config: &AttentionConfig,
        head_dim: usize,
        layer: usize,
        device: &B::Device,
    ) -> Self {
        let (kind, sketch_dim) = (config.sketch, config.sketch_dim);
        let levels = config.sketch_levels();
        let mut rng = SketchRng::new(config.sketch_seed, layer);
        let norm = 1.0 / (sketch_dim as f32).sqrt();
        let levels_vec = (0..levels.max(1))
            .map(|level| {
                let (rows, level_kind) =
                    if level == 0 { (head_dim, kind) } else { (sketch_dim, SketchKind::Gaussian) };
                let mut values = projection(&mut rng, level_kind, rows, sketch_dim);
                values.extend(projection(&mut rng, level_kind, rows, sketch_dim));
                values.iter_mut().for_each(|v| *v *= norm);
                let data = TensorData::new(values, [2, rows, sketch_dim]);
                RunningState::new(Tensor::from_data(data, device))
            })
            .collect::<Vec<_>>();
        // with each projection scaled by 1/sqrt(r), φ(x)·φ(y) ≈ (x·y)^(2^L) / r^(2^L - 1)
        let scale = match config.scaling {
            SketchScaling::Code => 1.0,
            SketchScaling::Paper => {
                let exponent = (1u64 << levels_vec.len()) as f64 - 1.0;
                (sketch_dim as f64).powf(exponent / 2.0)
            }
        };
        Self { levels: levels_vec, scale }
    }

    /// The projections of every level, `[2, in_dim, sketch_dim]` each.
    pub fn projections(&self) -> Vec<Tensor<B, 3>> {
        self.levels.iter().map(|l| l.value()).collect()
    }

    /// Sketch features `φ(x)`.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, sketch_dim]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let mut u: Tensor<B, 2> = x.reshape([batch * heads * seq, head_dim]);
        for level in &self.levels {
            let pair = level.value();
            let [_, rows, cols] = pair.dims();
            let s1: Tensor<B, 2> = pair.clone().narrow(0, 0, 1).reshape([rows, cols]);
            let s2: Tensor<B, 2> = pair.narrow(0, 1, 1).reshape([rows, cols]);
            u = u.clone().matmul(s1) * u.matmul(s2);
        }
        let sketch_dim = u.dims()[1];
        let u = if self.scale == 1.0 { u } else { u * self.scale };
        u.reshape([batch, heads, seq, sketch_dim])
    }
}

/// `W2 · gelu_tanh(W1 · LN(x))`: one level of the learned sketch.
#[derive(Module, Debug)]
pub struct SketchFeedForward<B: Backend> {
    norm: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> SketchFeedForward<B> {
    fn new(input: usize, sketch_dim: usize, device: &B::Device) -> Self {
        let hidden = 8 * sketch_dim;
        Self {
            norm: LayerNormConfig::new(input).with_epsilon(SKETCH_NORM_EPSILON).init(device),
            up: LinearConfig::new(input, hidden).with_bias(false).init(device),
            down: LinearConfig::new(hidden, sketch_dim).with_bias(false).init(device),
        }
    }

    /// The level through Burn's own modules, differentiated op by op.
    fn forward_modules(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.down.forward(gelu_tanh(self.up.forward(self.norm.forward(x))))
    }

    /// The weights as the sketch-level operation takes them.
    fn weights(&self) -> SketchLevelWeights<Tensor<B, 2>> {
        let gamma = self.norm.gamma.val();
        let in_dim = gamma.dims()[0];
        let beta = self.norm.beta.as_ref().expect("sketch LayerNorms are built with a bias").val();
        SketchLevelWeights {
            gamma: gamma.reshape([1, in_dim]),
            beta: beta.reshape([1, in_dim]),
            up: self.up.weight.val(),
            down: self.down.weight.val(),
        }
    }
}

impl<B: PolysketchBackend> SketchFeedForward<B> {
    /// The level through the backend's sketch-level operation.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, in_dim] = x.dims();
        let rows = x.reshape([batch * heads * seq, in_dim]);
        let out = sketch_level(rows, self.weights());
        let sketch_dim = out.dims()[1];
        out.reshape([batch, heads, seq, sketch_dim])
    }
}

/// Learned sketch of one layer (ALGORITHM.md §3), shared by queries, keys and heads.
///
/// `φ(x) = sqrt(r) · tanh(a(x) ∘ b(x) / sqrt(r))` where `a` and `b` are two-level feed-forward
/// networks with separate weights.
#[derive(Module, Debug)]
pub struct LearnedSketch<B: Backend> {
    a1: SketchFeedForward<B>,
    a2: SketchFeedForward<B>,
    b1: SketchFeedForward<B>,
    b2: SketchFeedForward<B>,
    sketch_dim: usize,
}

impl<B: Backend> LearnedSketch<B> {
    /// A freshly initialised learned sketch.
    pub fn new(head_dim: usize, sketch_dim: usize, device: &B::Device) -> Self {
        Self {
            a1: SketchFeedForward::new(head_dim, sketch_dim, device),
            a2: SketchFeedForward::new(sketch_dim, sketch_dim, device),
            b1: SketchFeedForward::new(head_dim, sketch_dim, device),
            b2: SketchFeedForward::new(sketch_dim, sketch_dim, device),
            sketch_dim,
        }
    }

    /// `φ = sqrt(r) · tanh(a ∘ b / sqrt(r))` from the two networks' outputs.
    fn combine(&self, a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
        let root = (self.sketch_dim as f64).sqrt();
        tanh(a * b / root) * root
    }

    /// Sketch features `φ(x)` through Burn's own modules (LayerNorm, Linear) under ordinary
    /// autodiff: the reference that [`LearnedSketch::forward`] is tested against.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, sketch_dim]`
    pub fn forward_reference(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.a2.forward_modules(self.a1.forward_modules(x.clone()));
        let b = self.b2.forward_modules(self.b1.forward_modules(x));
        self.combine(a, b)
    }
}

impl<B: PolysketchBackend> LearnedSketch<B> {
    /// Sketch features `φ(x)`, each network level through the backend's sketch-level
    /// operation.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, sketch_dim]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.a2.forward(self.a1.forward(x.clone()));
        let b = self.b2.forward(self.b1.forward(x));
        self.combine(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn fast_tanh_and_gelu_match_the_library_functions() {
        let xs: Vec<f64> = (-400..=400).map(|i| i as f64 * 0.05).collect();
        let x = Tensor::<NdArray<f64>, 1>::from_floats(xs.as_slice(), &Default::default());
        let diff = |a: Tensor<NdArray<f64>, 1>, b: Tensor<NdArray<f64>, 1>| -> f64 {
            (a - b).abs().max().into_scalar()
        };
        assert!(diff(tanh(x.clone()), x.clone().tanh()) < 1e-12);
        let reference = burn::tensor::activation::gelu_approximate(x.clone());
        assert!(diff(gelu_tanh(x), reference) < 1e-12);
    }
}
