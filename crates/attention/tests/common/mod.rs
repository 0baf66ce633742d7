//! Helpers shared by the attention tests: deterministic inputs and closeness checks.

#![allow(dead_code)]

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Double precision, so references and fast paths can be compared tightly. Never mix with
/// [`B32`] in one test binary: both share the CPU device and its default float type.
pub type B64 = Autodiff<NdArray<f64>>;
/// Single precision, as training runs.
pub type B32 = Autodiff<NdArray<f32>>;

/// Deterministic standard-normal values from a seed (SplitMix64 and Box–Muller).
pub fn normals(count: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    (0..count)
        .map(|_| {
            let (u1, u2) = (next(), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// A `[batch, heads, seq, dim]` tensor of standard normals times `scale`.
pub fn randn<B: Backend>(shape: [usize; 4], seed: u64, scale: f64) -> Tensor<B, 4> {
    let values: Vec<f64> =
        normals(shape.iter().product(), seed).into_iter().map(|v| v * scale).collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// Values of any tensor as `f64`.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

/// Largest absolute difference relative to the largest magnitude of `expected` (at least 1).
pub fn rel_max_diff<B: Backend, const D: usize>(
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let (a, e) = (values(actual), values(expected));
    let scale = e.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    // f64::max ignores NaN: count a NaN difference (an unwritten or broken element) explicitly
    let diff = a.iter().zip(&e).fold(0.0f64, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    assert!(diff.is_finite(), "non-finite difference");
    diff / scale
}

/// Panics with `what` when `actual` and `expected` differ by more than `tol` relatively.
pub fn assert_close<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tol: f64,
) {
    let diff = rel_max_diff(actual, expected);
    assert!(diff <= tol, "{what}: relative difference {diff:e} exceeds {tol:e}");
}

/// A fixed random weighting of an output, so a scalar loss exercises every element's gradient.
pub fn probe<B: Backend>(out: Tensor<B, 4>, seed: u64) -> Tensor<B, 1> {
    let weights = randn::<B>(out.dims(), seed, 1.0);
    (out * weights).sum()
}
