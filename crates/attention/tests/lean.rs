//! Memory-lean exact attention against the plain references, forward and gradients, for every
//! chunk size: one row, chunks that do not divide the sequence, and one chunk for everything.

mod common;

use burn::tensor::Tensor;
use common::*;
use polysketch_attention::reference::{polynomial_attention, softmax_attention};
use polysketch_attention::{lean_attention, CausalWeights};

#[test]
fn lean_attention_matches_the_reference_for_every_chunk_size() {
    let cases = [
        CausalWeights::Softmax,
        CausalWeights::Polynomial { degree: 2 },
        CausalWeights::Polynomial { degree: 4 },
    ];
    for weights in cases {
        for (seq, seed) in [(1, 1), (7, 2), (19, 3)] {
            let shape = [2, 3, seq, 8];
            // polynomial weights of unnormalised inputs grow fast: keep scores moderate
            let scale = if weights == CausalWeights::Softmax { 1.0 } else { 0.4 };
            let q = randn::<B64>(shape, seed, scale).require_grad();
            let k = randn::<B64>(shape, seed + 10, scale).require_grad();
            let v = randn::<B64>(shape, seed + 20, 1.0).require_grad();
            let expected = match weights {
                CausalWeights::Softmax => softmax_attention(q.clone(), k.clone(), v.clone()),
                CausalWeights::Polynomial { degree } => {
                    polynomial_attention(q.clone(), k.clone(), v.clone(), degree)
                }
            };
            let grads_expected = probe(expected.clone(), 4).backward();
            // Burn's softmax backward, used by the reference, loses ~1e-8 relative in f64
            let grad_tol = if weights == CausalWeights::Softmax { 1e-7 } else { 1e-9 };
            let mut first_grads: Option<Vec<Tensor<burn::backend::NdArray<f64>, 4>>> = None;
            for chunk in [1, 3, 5, seq, seq + 4] {
                let what = format!("{weights:?} seq={seq} chunk={chunk}");
                let out = lean_attention(q.clone(), k.clone(), v.clone(), weights, chunk);
                let grads = probe(out.clone(), 4).backward();
                assert_close(&format!("{what} forward"), out, expected.clone(), 1e-12);
                let mut these = Vec::new();
                for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                    let g = t.grad(&grads).expect("gradient");
                    let ge = t.grad(&grads_expected).expect("reference gradient");
                    assert_close(&format!("{what} grad {name}"), g.clone(), ge, grad_tol);
                    these.push(g);
                }
                // every chunking computes the same gradients up to rounding
                match &first_grads {
                    Some(first) => {
                        for (g, f) in these.into_iter().zip(first) {
                            assert_close(&format!("{what} vs one row"), g, f.clone(), 1e-12);
                        }
                    }
                    None => first_grads = Some(these),
                }
            }
        }
    }
}

#[test]
fn lean_attention_is_causal_in_every_input() {
    // changing token t's query, key or value must leave every output before t unchanged
    let shape = [1, 2, 12, 4];
    for weights in [CausalWeights::Softmax, CausalWeights::Polynomial { degree: 4 }] {
        let (q, k, v) =
            (randn::<B64>(shape, 5, 0.5), randn::<B64>(shape, 6, 0.5), randn::<B64>(shape, 7, 1.0));
        let base = lean_attention(q.clone(), k.clone(), v.clone(), weights, 5);
        let t = 7;
        let bump = |x: &Tensor<B64, 4>| {
            let delta = randn::<B64>([1, 2, 1, 4], 8, 3.0);
            let mut parts = vec![x.clone().narrow(2, 0, t)];
            parts.push(x.clone().narrow(2, t, 1) + delta);
            parts.push(x.clone().narrow(2, t + 1, shape[2] - t - 1));
            Tensor::cat(parts, 2)
        };
        for changed in 0..3 {
            let (q2, k2, v2) = match changed {
                0 => (bump(&q), k.clone(), v.clone()),
                1 => (q.clone(), bump(&k), v.clone()),
                _ => (q.clone(), k.clone(), bump(&v)),
            };
            let out = lean_attention(q2, k2, v2, weights, 5);
            let before = |x: Tensor<B64, 4>| x.narrow(2, 0, t);
            assert_close(
                &format!("{weights:?} input {changed}"),
                before(out),
                before(base.clone()),
                0.0,
            );
        }
    }
}
