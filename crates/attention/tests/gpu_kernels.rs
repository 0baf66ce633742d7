//! The fused CubeCL kernels against the plain references, forward and every gradient, on the raw
//! `CubeBackend` and through Burn's `Fusion` wrapper: on wgpu (`--features wgpu`; without a GPU,
//! Mesa's software Vulkan driver serves) and on CUDA (`--features cuda`, an NVIDIA GPU).
//!
//! Every kernel output starts filled with NaN, so an element a kernel does not write fails the
//! comparison, and each test checks that the kernels ran rather than the plain fallback.

#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use std::sync::Mutex;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::*;
use polysketch_attention::gpu::{fill_outputs_with_nan, kernel_launches};
use polysketch_attention::reference::{
    polynomial_attention, polysketch_attention, softmax_attention,
};
use polysketch_attention::PolysketchBackend;
use polysketch_attention::{lean_attention, polysketch_causal, CausalWeights, LocalExact};

/// One test at a time, so the kernel launch counter counts only the running test's kernels.
static SERIAL: Mutex<()> = Mutex::new(());

/// Forward outputs agree with the f64 reference to this relative error (f32 arithmetic).
const FORWARD_TOL: f64 = 2e-5;
/// Gradients agree to this relative error.
const GRAD_TOL: f64 = 2e-4;

/// The same standard normals (times `scale`) as an f32 tensor on `G` and an f64 tensor on the CPU.
fn pair<G: Backend>(shape: [usize; 4], seed: u64, scale: f64) -> (Tensor<G, 4>, Tensor<B64, 4>) {
    let values: Vec<f32> =
        normals(shape.iter().product(), seed).into_iter().map(|v| (v * scale) as f32).collect();
    let wide: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let gpu = Tensor::from_data(TensorData::new(values, shape), &G::Device::default());
    let cpu = Tensor::from_data(TensorData::new(wide, shape), &Default::default());
    (gpu.require_grad(), cpu.require_grad())
}

/// Relative difference of a tensor on one backend from one on another.
fn cross_diff<G: Backend, E: Backend>(actual: Tensor<G, 4>, expected: Tensor<E, 4>) -> f64 {
    let shape = expected.dims();
    let device = Default::default();
    let as_cpu = |v: Vec<f64>| Tensor::<B64, 4>::from_data(TensorData::new(v, shape), &device);
    rel_max_diff(as_cpu(values(actual)), as_cpu(values(expected)))
}

fn check<G: Backend, E: Backend>(
    what: &str,
    actual: Tensor<G, 4>,
    expected: Tensor<E, 4>,
    tol: f64,
) {
    let diff = cross_diff(actual, expected);
    assert!(diff <= tol, "{what}: relative difference {diff:e} exceeds {tol:e}");
}

/// A fixed weighting of an output on either device, so both losses see the same probe.
fn probe_pair<G: Backend>(
    out: Tensor<G, 4>,
    reference: Tensor<B64, 4>,
    seed: u64,
) -> (Tensor<G, 1>, Tensor<B64, 1>) {
    let (weights, weights_cpu) = pair::<G>(out.dims(), seed, 1.0);
    ((out * weights.detach()).sum(), (reference * weights_cpu.detach()).sum())
}

/// Polysketch shapes: `(batch, heads, seq, sketch_dim, head_dim, block_size)`.
const POLYSKETCH_CASES: &[(usize, usize, usize, usize, usize, usize)] =
    &[(1, 1, 1, 4, 3, 4), (2, 3, 19, 5, 8, 8), (1, 2, 32, 8, 16, 8), (1, 1, 70, 4, 6, 64)];

fn polysketch_matches_reference<G: AutodiffBackend + PolysketchBackend>() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fill_outputs_with_nan(true);
    for &(batch, heads, seq, sketch_dim, head_dim, block_size) in POLYSKETCH_CASES {
        for degree in [None, Some(2), Some(4)] {
            let what = format!(
                "b{batch} h{heads} n{seq} r{sketch_dim} d{head_dim} bs{block_size} local {degree:?}"
            );
            let features = [batch, heads, seq, sketch_dim];
            let rows = [batch, heads, seq, head_dim];
            let (fq, fq_cpu) = pair::<G>(features, 1, 0.5);
            let (fk, fk_cpu) = pair::<G>(features, 2, 0.5);
            let (v, v_cpu) = pair::<G>(rows, 3, 1.0);
            let (lq, lq_cpu) = pair::<G>(rows, 4, 0.4);
            let (lk, lk_cpu) = pair::<G>(rows, 5, 0.4);
            let local =
                degree.map(|degree| LocalExact { query: lq.clone(), key: lk.clone(), degree });
            let local_cpu = degree.map(|degree| LocalExact {
                query: lq_cpu.clone(),
                key: lk_cpu.clone(),
                degree,
            });

            let launches = kernel_launches();
            let out = polysketch_causal(fq.clone(), fk.clone(), v.clone(), local, block_size);
            let expected = polysketch_attention(
                fq_cpu.clone(),
                fk_cpu.clone(),
                v_cpu.clone(),
                local_cpu,
                block_size,
            );
            let (loss, loss_cpu) = probe_pair(out.clone(), expected.clone(), 9);
            check(&format!("{what} forward"), out, expected, FORWARD_TOL);
            let grads = loss.backward();
            let grads_cpu = loss_cpu.backward();

            let mut inputs = vec![("φq", &fq, &fq_cpu), ("φk", &fk, &fk_cpu), ("v", &v, &v_cpu)];
            if degree.is_some() {
                inputs.push(("q̂", &lq, &lq_cpu));
                inputs.push(("k̂", &lk, &lk_cpu));
            }
            for (name, gpu, cpu) in inputs {
                let g = gpu.grad(&grads).expect("gradient");
                let e = cpu.grad(&grads_cpu).expect("reference gradient");
                check(&format!("{what} grad {name}"), g, e, GRAD_TOL);
            }
            if degree.is_none() {
                for (name, t) in [("q̂", &lq), ("k̂", &lk)] {
                    assert!(t.grad(&grads).is_none(), "{what}: unused {name} got a gradient");
                }
            }
            // read last: fusion runs the kernels when the results are read
            assert_eq!(kernel_launches(), launches + 7, "{what}: not all kernels ran");
        }
    }
}

fn lean_matches_reference<G: AutodiffBackend + PolysketchBackend>() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fill_outputs_with_nan(true);
    let cases = [
        CausalWeights::Softmax,
        CausalWeights::Polynomial { degree: 2 },
        CausalWeights::Polynomial { degree: 4 },
    ];
    // 300 rows cross the kernels' 256-key tiles
    for (seq, head_dim) in [(1, 8), (19, 8), (300, 16)] {
        for weights in cases {
            let what = format!("{weights:?} n{seq} d{head_dim}");
            let shape = [2, 2, seq, head_dim];
            let scale = if weights == CausalWeights::Softmax { 1.0 } else { 0.3 };
            let (q, q_cpu) = pair::<G>(shape, 11, scale);
            let (k, k_cpu) = pair::<G>(shape, 12, scale);
            let (v, v_cpu) = pair::<G>(shape, 13, 1.0);
            let launches = kernel_launches();
            let out = lean_attention(q.clone(), k.clone(), v.clone(), weights, 64);
            let expected = match weights {
                CausalWeights::Softmax => {
                    softmax_attention(q_cpu.clone(), k_cpu.clone(), v_cpu.clone())
                }
                CausalWeights::Polynomial { degree } => {
                    polynomial_attention(q_cpu.clone(), k_cpu.clone(), v_cpu.clone(), degree)
                }
            };
            let (loss, loss_cpu) = probe_pair(out.clone(), expected.clone(), 19);
            check(&format!("{what} forward"), out, expected, FORWARD_TOL);
            let grads = loss.backward();
            let grads_cpu = loss_cpu.backward();
            for (name, gpu, cpu) in [("q", &q, &q_cpu), ("k", &k, &k_cpu), ("v", &v, &v_cpu)] {
                let g = gpu.grad(&grads).expect("gradient");
                let e = cpu.grad(&grads_cpu).expect("reference gradient");
                check(&format!("{what} grad {name}"), g, e, GRAD_TOL);
            }
            assert_eq!(kernel_launches(), launches + 3, "{what}: not all kernels ran");
        }
    }
}

/// The kernel tests for one CubeCL runtime: `$raw` is its `CubeBackend`, `$fused` the backend
/// Burn builds by default, `Fusion` around it.
macro_rules! kernel_tests {
    ($name:ident, $raw:ty, $fused:ty) => {
        mod $name {
            use super::*;

            type Raw = burn::backend::Autodiff<$raw>;
            type Fused = burn::backend::Autodiff<$fused>;

            #[test]
            fn polysketch_kernels_match_the_reference() {
                polysketch_matches_reference::<Raw>();
            }

            #[test]
            fn polysketch_kernels_match_the_reference_through_fusion() {
                polysketch_matches_reference::<Fused>();
            }

            #[test]
            fn lean_attention_kernels_match_the_reference() {
                lean_matches_reference::<Raw>();
            }

            #[test]
            fn lean_attention_kernels_match_the_reference_through_fusion() {
                lean_matches_reference::<Fused>();
            }

            /// A shape the kernels cannot hold in shared memory takes the plain-tensor path,
            /// and agrees.
            #[test]
            fn shapes_beyond_the_kernels_fall_back_to_the_plain_tensor_path() {
                falls_back::<Raw>();
            }
        }
    };
}

fn falls_back<G: AutodiffBackend + PolysketchBackend>() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let launches = kernel_launches();
    let (fq, fq_cpu) = pair::<G>([1, 1, 6, 128], 21, 0.1);
    let (fk, fk_cpu) = pair::<G>([1, 1, 6, 128], 22, 0.1);
    let (v, v_cpu) = pair::<G>([1, 1, 6, 4], 23, 1.0);
    let out = polysketch_causal(fq, fk, v, None, 4);
    let expected = polysketch_attention(fq_cpu, fk_cpu, v_cpu, None, 4);
    check("r=128 fallback", out, expected, FORWARD_TOL);
    assert_eq!(kernel_launches(), launches, "r=128 should not fit the kernels' shared memory");
}

#[cfg(feature = "wgpu")]
kernel_tests!(
    wgpu,
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::wgpu::WgpuRuntime, f32, i32, u32>,
    burn::backend::Wgpu
);

#[cfg(feature = "cuda")]
kernel_tests!(
    cuda,
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>,
    burn::backend::Cuda
);
