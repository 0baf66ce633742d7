//! Single-precision tests, in their own binary: Burn keys a device's default float type on
//! the device alone, so `NdArray<f32>` and `NdArray<f64>` must not share a test process.
//! ALGORITHM.md §7.6 (the sketch survives a checkpoint, untouched by training) and §7.8.

mod common;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use common::*;
use polysketch_attention::{
    polysketch_causal, AttentionConfig, AttentionKernel, LocalExact, SketchKind,
};

#[test]
fn no_overflow_at_32k_tokens_in_f32() {
    let (seq, head_dim, sketch_dim, block_size) = (32 * 1024, 64, 32, 256);
    let feat = [1, 1, seq, sketch_dim];
    let head = [1, 1, seq, head_dim];
    // largest features the learned sketch can emit: |φ| ≤ sqrt(r); unit-variance q̂, k̂ as after LN
    let root = (sketch_dim as f64).sqrt();
    let qf = (randn::<B32>(feat, 1, 1.0).tanh() * root).require_grad();
    let kf = (randn::<B32>(feat, 2, 1.0).tanh() * root).require_grad();
    let v = randn::<B32>(head, 3, 1.0).require_grad();
    let lq = randn::<B32>(head, 4, 1.0).require_grad();
    let lk = randn::<B32>(head, 5, 1.0).require_grad();
    let local = LocalExact { query: lq.clone(), key: lk.clone(), degree: 4 };
    let out = polysketch_causal(qf.clone(), kf.clone(), v.clone(), Some(local), block_size);
    assert!(values(out.clone()).iter().all(|v| v.is_finite()), "non-finite output");
    let grads = out.sum().backward();
    for (name, t) in [("qf", qf), ("kf", kf), ("v", v), ("lq", lq), ("lk", lk)] {
        let g = values(t.grad(&grads).unwrap());
        assert!(g.iter().all(|v| v.is_finite()), "non-finite gradient of {name}");
    }
}

#[test]
fn random_sketch_survives_save_and_load_bit_for_bit_and_is_never_trained() {
    let device = Default::default();
    let c =
        AttentionConfig { sketch: SketchKind::Gaussian, local_exact: true, ..Default::default() };
    let kernel = AttentionKernel::<B32>::new(&c, 8, 0, &device);
    let before = kernel.random_sketch().unwrap().projections();

    // one optimizer step with a non-zero gradient on everything trainable
    let q = randn::<B32>([1, 2, 40, 8], 1, 1.0);
    let k = randn::<B32>([1, 2, 40, 8], 2, 1.0);
    let v = randn::<B32>([1, 2, 40, 8], 3, 1.0);
    let loss = probe(kernel.forward(q, k, v), 4);
    let grads = GradientsParams::from_grads(loss.backward(), &kernel);
    let mut optim = AdamWConfig::new().init();
    let kernel = optim.step(1e-2, kernel, grads);
    let after = kernel.random_sketch().unwrap().projections();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(values(b.clone()), values(a.clone()), "the optimizer changed the sketch");
    }

    // a kernel drawn from another seed takes the saved sketch exactly
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(kernel.clone().into_record(), ()).unwrap();
    let other = AttentionConfig { sketch_seed: 99, ..c };
    let fresh = AttentionKernel::<B32>::new(&other, 8, 0, &device);
    let loaded = fresh.load_record(recorder.load(bytes, &device).unwrap());
    let restored = loaded.random_sketch().unwrap().projections();
    for (a, r) in after.iter().zip(&restored) {
        assert_eq!(values(a.clone()), values(r.clone()), "the sketch did not survive a reload");
    }
}
