//! The causal block algorithm against the naive masked product (ALGORITHM.md §7.1, 7.2, 7.5).

mod common;

use burn::tensor::Tensor;
use common::*;
use polysketch_attention::reference::{polynomial_attention, polysketch_attention};
use polysketch_attention::{polysketch_causal, LocalExact};

/// One named shape of the test grid.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    batch: usize,
    heads: usize,
    seq: usize,
    sketch_dim: usize,
    head_dim: usize,
    block_size: usize,
}

const GRID: &[Case] = &[
    Case {
        name: "b1_h1_n8_r4_d3_bs4",
        batch: 1,
        heads: 1,
        seq: 8,
        sketch_dim: 4,
        head_dim: 3,
        block_size: 4,
    },
    Case {
        name: "b2_h3_n13_r5_d4_bs4",
        batch: 2,
        heads: 3,
        seq: 13,
        sketch_dim: 5,
        head_dim: 4,
        block_size: 4,
    },
    Case {
        name: "b1_h2_n33_r8_d8_bs16",
        batch: 1,
        heads: 2,
        seq: 33,
        sketch_dim: 8,
        head_dim: 8,
        block_size: 16,
    },
    Case {
        name: "b2_h2_n64_r4_d16_bs64",
        batch: 2,
        heads: 2,
        seq: 64,
        sketch_dim: 4,
        head_dim: 16,
        block_size: 64,
    },
    Case {
        name: "b1_h1_n50_r6_d5_bs7",
        batch: 1,
        heads: 1,
        seq: 50,
        sketch_dim: 6,
        head_dim: 5,
        block_size: 7,
    },
];

struct Inputs {
    qf: Tensor<B64, 4>,
    kf: Tensor<B64, 4>,
    v: Tensor<B64, 4>,
    lq: Tensor<B64, 4>,
    lk: Tensor<B64, 4>,
}

impl Inputs {
    fn new(c: Case, seed: u64) -> Self {
        let feat = [c.batch, c.heads, c.seq, c.sketch_dim];
        let head = [c.batch, c.heads, c.seq, c.head_dim];
        // features of the size the learned sketch produces; unit-size normalised vectors
        Self {
            qf: randn(feat, seed, 0.7).require_grad(),
            kf: randn(feat, seed + 1, 0.7).require_grad(),
            v: randn(head, seed + 2, 1.0).require_grad(),
            lq: randn(head, seed + 3, 0.6).require_grad(),
            lk: randn(head, seed + 4, 0.6).require_grad(),
        }
    }

    fn local(&self, degree: u32) -> LocalExact<Tensor<B64, 4>> {
        LocalExact { query: self.lq.clone(), key: self.lk.clone(), degree }
    }
}

/// Compares forward and every input gradient of the block op and the naive reference.
fn check_against_naive(c: Case, local_degree: Option<u32>, tol: f64) {
    let x = Inputs::new(c, 11);
    let local = local_degree.map(|d| x.local(d));
    let fast =
        polysketch_causal(x.qf.clone(), x.kf.clone(), x.v.clone(), local.clone(), c.block_size);
    let grads_fast = probe(fast.clone(), 99).backward();
    // a second graph only after the first backward pass: Burn frees a graph's nodes on backward
    let slow = polysketch_attention(x.qf.clone(), x.kf.clone(), x.v.clone(), local, c.block_size);
    let grads_slow = probe(slow.clone(), 99).backward();
    let what = format!("{} local={local_degree:?}", c.name);
    assert_close(&format!("{what} forward"), fast, slow, tol);
    let mut pairs = vec![("qf", &x.qf), ("kf", &x.kf), ("v", &x.v)];
    if local_degree.is_some() {
        pairs.extend([("lq", &x.lq), ("lk", &x.lk)]);
    }
    for (name, t) in pairs {
        // with a single block and exact local weights the keys' features reach no output
        let gf = t.grad(&grads_fast).unwrap_or_else(|| t.clone().inner().zeros_like());
        let gs = t.grad(&grads_slow).expect("gradient of the reference");
        assert_close(&format!("{what} grad {name}"), gf, gs, tol);
    }
}

#[test]
fn block_algorithm_matches_naive_over_grid() {
    for &c in GRID {
        check_against_naive(c, None, 1e-10);
        check_against_naive(c, Some(4), 1e-10);
        check_against_naive(c, Some(2), 1e-10);
    }
}

#[test]
fn every_block_size_from_one_to_seq() {
    let base = Case {
        name: "b1_h2_n11_r3_d2",
        batch: 1,
        heads: 2,
        seq: 11,
        sketch_dim: 3,
        head_dim: 2,
        block_size: 1,
    };
    for block_size in 1..=base.seq {
        let c = Case { block_size, ..base };
        check_against_naive(c, None, 1e-10);
        check_against_naive(c, Some(4), 1e-10);
    }
}

/// vec(q̂⊗q̂) as features: `(φ(q)·φ(k))² = ((q·k)²)² = (q·k)⁴`.
fn exact_features(x: Tensor<B64, 4>) -> Tensor<B64, 4> {
    let [batch, heads, seq, dim] = x.dims();
    let outer = x.clone().unsqueeze_dim::<5>(4) * x.unsqueeze_dim::<5>(3);
    outer.reshape([batch, heads, seq, dim * dim])
}

#[test]
fn exact_features_reproduce_degree_four_polynomial_attention() {
    let shape = [2, 2, 21, 4];
    let q = randn::<B64>(shape, 1, 0.8).require_grad();
    let k = randn::<B64>(shape, 2, 0.8).require_grad();
    let v = randn::<B64>(shape, 3, 1.0).require_grad();
    let exact = polynomial_attention(q.clone(), k.clone(), v.clone(), 4);
    let grads_exact = probe(exact.clone(), 5).backward();
    for block_size in [1, 4, 8, 21] {
        let out = polysketch_causal(
            exact_features(q.clone()),
            exact_features(k.clone()),
            v.clone(),
            None,
            block_size,
        );
        assert_close(&format!("bs{block_size} forward"), out.clone(), exact.clone(), 1e-10);
        let grads = probe(out, 5).backward();
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let g = t.grad(&grads).unwrap();
            let ge = t.grad(&grads_exact).unwrap();
            assert_close(&format!("bs{block_size} grad {name}"), g, ge, 1e-10);
        }
    }
}

/// Replaces rows after `t` (along `seq`) by other values.
fn perturb_after(x: Tensor<B64, 4>, t: usize, seed: u64) -> Tensor<B64, 4> {
    let [batch, heads, seq, dim] = x.dims();
    let head = x.narrow(2, 0, t + 1);
    let tail = randn::<B64>([batch, heads, seq - t - 1, dim], seed, 3.0);
    Tensor::cat(vec![head, tail], 2)
}

#[test]
fn outputs_never_depend_on_later_tokens() {
    let (seq, block_size) = (24, 8);
    let x = Inputs::new(
        Case { name: "causal", batch: 1, heads: 2, seq, sketch_dim: 4, head_dim: 3, block_size },
        21,
    );
    for local in [false, true] {
        for t in [block_size - 1, block_size, block_size + 1, 2 * block_size - 1] {
            let run = |qf, kf, v, lq, lk| {
                let l = local.then(|| LocalExact { query: lq, key: lk, degree: 4 });
                polysketch_causal(qf, kf, v, l, block_size)
            };
            let base = run(x.qf.clone(), x.kf.clone(), x.v.clone(), x.lq.clone(), x.lk.clone());
            let moved = run(
                perturb_after(x.qf.clone(), t, 1),
                perturb_after(x.kf.clone(), t, 2),
                perturb_after(x.v.clone(), t, 3),
                perturb_after(x.lq.clone(), t, 4),
                perturb_after(x.lk.clone(), t, 5),
            );
            let early = |o: Tensor<B64, 4>| values(o.narrow(2, 0, t + 1));
            assert_eq!(early(base.clone()), early(moved), "local={local} t={t}: outputs changed");

            // the gradient of early outputs with respect to later inputs is exactly zero
            let grads = base.narrow(2, 0, t + 1).sum().backward();
            let mut inputs = vec![&x.qf, &x.kf, &x.v];
            if local {
                inputs.extend([&x.lq, &x.lk]);
            }
            for input in inputs {
                let g = input.grad(&grads).unwrap();
                let later = values(g.narrow(2, t + 1, seq - t - 1));
                assert!(later.iter().all(|&v| v == 0.0), "local={local} t={t}: gradient leaks");
            }
        }
    }
}
