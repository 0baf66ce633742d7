//! Every attention variant against a plain reference, forward and gradients, and the sketch
//! properties of ALGORITHM.md §7.3, 7.4 and 7.6.

mod common;

use burn::nn::LayerNormConfig;
use burn::tensor::Tensor;
use common::*;
use polysketch_attention::reference::{
    polynomial_attention, polynomial_weights, polysketch_attention, polysketch_weights,
    softmax_attention,
};
use polysketch_attention::{
    AttentionConfig, AttentionKernel, AttentionKind, DecodeCache, LocalExact, RandomSketch,
    SketchKind,
};

const SHAPE: [usize; 4] = [2, 3, 19, 8];

fn config(kind: AttentionKind, sketch: SketchKind, local_exact: bool) -> AttentionConfig {
    AttentionConfig {
        kind,
        sketch,
        local_exact,
        sketch_dim: 6,
        block_size: 5,
        ..Default::default()
    }
}

/// Every variant the config can express.
fn all_variants() -> Vec<AttentionConfig> {
    let mut out = vec![
        config(AttentionKind::Softmax, SketchKind::Gaussian, false),
        config(AttentionKind::Polynomial, SketchKind::Gaussian, false),
        AttentionConfig {
            degree: 2,
            ..config(AttentionKind::Polynomial, SketchKind::Gaussian, false)
        },
    ];
    for sketch in [SketchKind::Gaussian, SketchKind::Hadamard, SketchKind::Learned] {
        for local in [false, true] {
            out.push(config(AttentionKind::Polysketch, sketch, local));
        }
    }
    out.push(AttentionConfig {
        degree: 8,
        ..config(AttentionKind::Polysketch, SketchKind::Gaussian, true)
    });
    out
}

/// The same attention written out with full weight matrices from the kernel's own parts.
fn reference(
    kernel: &AttentionKernel<B64>,
    q: Tensor<B64, 4>,
    k: Tensor<B64, 4>,
    v: Tensor<B64, 4>,
) -> Tensor<B64, 4> {
    let c = kernel.config();
    let head_dim = q.dims()[3];
    // LayerNorms of a fresh kernel have unit gain and zero bias: a new one computes the same
    let ln = LayerNormConfig::new(head_dim).with_epsilon(1e-5).init::<B64>(&Default::default());
    match c.kind {
        AttentionKind::Softmax => softmax_attention(q, k, v),
        AttentionKind::Polynomial => {
            polynomial_attention(ln.forward(q), ln.forward(k), v, c.degree)
        }
        AttentionKind::Polysketch => {
            let (qh, kh) = (ln.forward(q.clone()), ln.forward(k.clone()));
            let learned = c.sketch == SketchKind::Learned;
            let (fq, fk) = if learned {
                (kernel.features(q), kernel.features(k))
            } else {
                (kernel.features(qh.clone()), kernel.features(kh.clone()))
            };
            let local = c.local_exact.then(|| LocalExact { query: qh, key: kh, degree: c.degree });
            polysketch_attention(fq, fk, v, local, c.block_size)
        }
    }
}

#[test]
fn every_variant_matches_its_reference_forward_and_backward() {
    for c in all_variants() {
        c.validate(SHAPE[3], SHAPE[2]).unwrap();
        let kernel = AttentionKernel::<B64>::new(&c, SHAPE[3], 0, &Default::default());
        let q = randn::<B64>(SHAPE, 1, 1.0).require_grad();
        let k = randn::<B64>(SHAPE, 2, 1.0).require_grad();
        let v = randn::<B64>(SHAPE, 3, 1.0).require_grad();
        let out = kernel.forward(q.clone(), k.clone(), v.clone());
        let grads = probe(out.clone(), 4).backward();
        let expected = reference(&kernel, q.clone(), k.clone(), v.clone());
        let grads_expected = probe(expected.clone(), 4).backward();
        let what = format!("{:?}/{:?}/local={}/p={}", c.kind, c.sketch, c.local_exact, c.degree);
        let tol = 1e-9;
        // Burn's softmax attention backward loses about 1e-8 relative in f64 to cancellation
        let grad_tol = if c.kind == AttentionKind::Softmax { 1e-7 } else { 1e-8 };
        assert_close(&format!("{what} forward"), out, expected, tol);
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let g = t.grad(&grads).expect("gradient");
            let ge = t.grad(&grads_expected).expect("reference gradient");
            assert_close(&format!("{what} grad {name}"), g, ge, grad_tol);
        }
    }
}

#[test]
fn weights_are_non_negative_and_denominators_at_least_one_for_adversarial_inputs() {
    let adversarial: Vec<(f64, u64)> = vec![(1e-6, 1), (1.0, 2), (30.0, 3), (1e3, 4)];
    for (scale, seed) in adversarial {
        let q = randn::<B64>(SHAPE, seed, scale);
        let k = randn::<B64>(SHAPE, seed + 10, scale).neg();
        for c in all_variants().into_iter().filter(|c| c.kind != AttentionKind::Softmax) {
            let kernel = AttentionKernel::<B64>::new(&c, SHAPE[3], 1, &Default::default());
            // with v = 1 every output equals D/(1+D), D the sum of weights: in [0, 1) iff D ≥ 0
            let ones = Tensor::<B64, 4>::ones(SHAPE, &Default::default());
            let out = values(kernel.forward(q.clone(), k.clone(), ones));
            let what = format!("{:?}/{:?}/local={} scale={scale}", c.kind, c.sketch, c.local_exact);
            assert!(out.iter().all(|&o| (0.0..1.0).contains(&o)), "{what}: denominator below 1");
            if c.kind == AttentionKind::Polysketch {
                let fq = kernel.features(q.clone());
                let fk = kernel.features(k.clone());
                let w = values(polysketch_weights(fq, fk, None, c.block_size));
                let bad: Vec<_> = w.iter().filter(|&&x| x < 0.0 || x.is_nan()).take(3).collect();
                assert!(bad.is_empty(), "{what}: negative sketched weight {bad:?}");
            } else {
                let w = values(polynomial_weights(q.clone(), k.clone(), c.degree));
                assert!(w.iter().all(|&x| x >= 0.0), "{what}: negative weight");
            }
        }
    }
}

/// Relative Frobenius error of the sketched weights against `(q̂·k̂)⁴ / r²`, averaged over seeds.
fn sketch_error(sketch: SketchKind, sketch_dim: usize) -> f64 {
    let shape = [1, 1, 64, 16];
    let seeds = 6;
    let mut total = 0.0;
    for seed in 0..seeds {
        let c = AttentionConfig { sketch, sketch_dim, sketch_seed: seed, ..Default::default() };
        let s = RandomSketch::<B64>::new(&c, shape[3], 0, &Default::default());
        let q = randn::<B64>(shape, 100 + seed, 1.0);
        let k = randn::<B64>(shape, 200 + seed, 1.0);
        let exact = q.clone().matmul(k.clone().swap_dims(2, 3)).powi_scalar(4)
            / (sketch_dim as f64).powi(2);
        let approx = s.forward(q).matmul(s.forward(k).swap_dims(2, 3)).powi_scalar(2);
        let err = (approx - exact.clone()).powi_scalar(2).sum().sqrt();
        total += values(err)[0] / values(exact.powi_scalar(2).sum().sqrt())[0];
    }
    total / seeds as f64
}

#[test]
fn sketch_error_falls_like_one_over_sqrt_r() {
    for sketch in [SketchKind::Gaussian, SketchKind::Hadamard] {
        let errors: Vec<f64> = [256, 1024, 4096].iter().map(|&r| sketch_error(sketch, r)).collect();
        for pair in errors.windows(2) {
            let ratio = pair[1] / pair[0];
            assert!(
                (0.35..0.65).contains(&ratio),
                "{sketch:?}: quadrupling r changed the error by {ratio:.3} (errors {errors:?})"
            );
        }
    }
}

#[test]
fn sketch_is_symmetric_deterministic_and_shared_by_queries_and_keys() {
    let shape = [1, 2, 9, 8];
    let device = Default::default();
    for sketch in [SketchKind::Gaussian, SketchKind::Hadamard, SketchKind::Learned] {
        let c = AttentionConfig { sketch, sketch_dim: 8, local_exact: false, ..Default::default() };
        let kernel = AttentionKernel::<B64>::new(&c, 8, 3, &device);
        let x = randn::<B64>(shape, 7, 1.0);
        let y = randn::<B64>(shape, 8, 1.0);
        let k_xy = kernel.features(x.clone()).matmul(kernel.features(y.clone()).swap_dims(2, 3));
        let k_yx = kernel.features(y).matmul(kernel.features(x.clone()).swap_dims(2, 3));
        assert_close(&format!("{sketch:?} symmetric"), k_xy, k_yx.swap_dims(2, 3), 1e-12);
        let fx = kernel.features(x);
        let diag = values((fx.clone() * fx).sum_dim(3));
        assert!(diag.iter().all(|&d| d >= 0.0), "{sketch:?}: K(x, x) < 0");
    }
    let c = AttentionConfig { sketch: SketchKind::Gaussian, ..Default::default() };
    let proj = |layer, seed| {
        let c = AttentionConfig { sketch_seed: seed, ..c.clone() };
        RandomSketch::<B64>::new(&c, 16, layer, &device).projections()
    };
    let same = |a: Vec<Tensor<B64, 3>>, b: Vec<Tensor<B64, 3>>| {
        a.into_iter().zip(b).all(|(x, y)| values(x) == values(y))
    };
    assert!(same(proj(2, 5), proj(2, 5)), "same (seed, layer) must give the same sketch");
    assert!(!same(proj(2, 5), proj(3, 5)), "another layer must give another sketch");
    assert!(!same(proj(2, 5), proj(2, 6)), "another seed must give another sketch");
}

#[test]
fn token_by_token_decoding_equals_the_parallel_pass() {
    for c in all_variants() {
        let kernel = AttentionKernel::<B64>::new(&c, SHAPE[3], 0, &Default::default());
        let q = randn::<B64>(SHAPE, 11, 1.0);
        let k = randn::<B64>(SHAPE, 12, 1.0);
        let v = randn::<B64>(SHAPE, 13, 1.0);
        let parallel = kernel.forward(q.clone(), k.clone(), v.clone());
        let mut cache = DecodeCache::Empty;
        // SHAPE[2] = 19 positions cross the block boundaries at 5, 10 and 15
        for position in 0..SHAPE[2] {
            let at = |x: &Tensor<B64, 4>| x.clone().narrow(2, position, 1);
            let step = kernel.forward_step(&mut cache, position, at(&q), at(&k), at(&v));
            let what =
                format!("{:?}/{:?}/local={} position {position}", c.kind, c.sketch, c.local_exact);
            assert_close(&what, step, at(&parallel), 1e-9);
        }
    }
}

#[test]
fn decoding_after_a_parallel_prefill_equals_the_parallel_pass() {
    // prompts that end before, on and after block boundaries (blocks of 5)
    for c in all_variants() {
        let kernel = AttentionKernel::<B64>::new(&c, SHAPE[3], 0, &Default::default());
        let q = randn::<B64>(SHAPE, 21, 1.0);
        let k = randn::<B64>(SHAPE, 22, 1.0);
        let v = randn::<B64>(SHAPE, 23, 1.0);
        let parallel = kernel.forward(q.clone(), k.clone(), v.clone());
        for prompt in [1, 4, 5, 6, 10, 13] {
            let head = |x: &Tensor<B64, 4>| x.clone().narrow(2, 0, prompt);
            let (out, mut cache) = kernel.prefill(head(&q), head(&k), head(&v));
            let what =
                format!("{:?}/{:?}/local={} prompt {prompt}", c.kind, c.sketch, c.local_exact);
            assert_close(&format!("{what} prefill"), out, head(&parallel), 1e-9);
            for position in prompt..SHAPE[2] {
                let at = |x: &Tensor<B64, 4>| x.clone().narrow(2, position, 1);
                let step = kernel.forward_step(&mut cache, position, at(&q), at(&k), at(&v));
                assert_close(&format!("{what} at {position}"), step, at(&parallel), 1e-9);
            }
        }
    }
}
