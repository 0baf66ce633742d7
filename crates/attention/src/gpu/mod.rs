//! Fused CubeCL kernels for the GPU backends (wgpu and CUDA, with or without Burn's `Fusion`).
//!
//! [`PolysketchBackend`] is implemented for `CubeBackend<R, ..>`, generic over the CubeCL runtime,
//! so one implementation serves every GPU backend, and for `Fusion<B>`, which records each
//! operation as a custom operation of its stream and runs the inner backend's kernels. Shapes the
//! kernels do not cover (shared memory too small for the sketch or block size) fall back to the
//! plain-tensor bodies, which are also the reference the kernels are tested against.

mod fusion;
mod kernels;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::blockwise::{result_gradient, PolysketchSaved};
use crate::lean::CausalWeights;
use crate::ops::{
    composed_polysketch_backward, composed_polysketch_forward, with_ones, LocalExact,
    PolysketchBackend,
};

static NAN_OUTPUTS: AtomicBool = AtomicBool::new(false);
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// Makes every kernel output start filled with NaN instead of uninitialised memory, so a test
/// fails on any element a kernel forgets to write. Off by default (it costs one fill per output).
pub fn fill_outputs_with_nan(enabled: bool) {
    NAN_OUTPUTS.store(enabled, Ordering::SeqCst);
}

/// Number of fused attention kernels launched so far in this process: lets a test check that an
/// operation ran on the kernels rather than on the plain-tensor fallback.
pub fn kernel_launches() -> usize {
    LAUNCHES.load(Ordering::SeqCst)
}

/// Units per cube of the row kernels.
const UNITS: u32 = 64;
/// Keys (or queries) per shared-memory tile of the exact-attention kernels.
const TILE: usize = 256;

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn wrap<B: burn::tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `[batch, heads, seq, dim]` as a contiguous `[batch · heads, seq, dim]` kernel input.
fn rows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: Tensor<Cube<R, F, I, BT>, 4>,
) -> CubeTensor<R> {
    let [batch, heads, seq, dim] = t.dims();
    into_contiguous(prim(t.reshape([batch * heads, seq, dim])))
}

/// A `[batch · heads, seq, dim]` kernel output back as `[batch, heads, seq, dim]`.
fn unrows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: CubeTensor<R>,
    batch: usize,
    heads: usize,
) -> CubeTensor<R> {
    let [_, seq, dim] = t.meta.shape().dims::<3>();
    prim(wrap::<Cube<R, F, I, BT>, 3>(t).reshape([batch, heads, seq, dim]))
}

/// A kernel output of `shape`: uninitialised, or NaN when [`fill_outputs_with_nan`] is on.
fn output<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    shape: [usize; D],
    device: &R::Device,
) -> CubeTensor<R> {
    let t = if NAN_OUTPUTS.load(Ordering::SeqCst) {
        Tensor::<Cube<R, F, I, BT>, D>::full(shape, f32::NAN, device)
    } else {
        Tensor::<Cube<R, F, I, BT>, D>::empty(shape, device)
    };
    prim(t)
}

/// A 2-d grid of `cubes` cubes (each dimension of a grid is limited to 65 535).
fn grid(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65_535);
    CubeCount::Static(x as u32, cubes.div_ceil(x).max(1) as u32, 1)
}

/// Grid of 1-d cubes of [`UNITS`] units covering `elements` units.
fn element_grid(elements: usize) -> CubeCount {
    grid(elements.div_ceil(UNITS as usize))
}

fn launched(kernels: usize) {
    LAUNCHES.fetch_add(kernels, Ordering::SeqCst);
}

/// Whether `floats` values of shared memory fit in one cube on this device.
fn shared_fits<R: CubeRuntime>(tensor: &CubeTensor<R>, floats: usize) -> bool {
    floats * 4 <= tensor.client.properties().hardware.max_shared_memory_size
}

/// Shared memory of the largest polysketch row kernel (the key-side backward).
fn polysketch_shared(sketch_dim: usize, head_dim: usize, block_size: usize) -> usize {
    2 * sketch_dim * sketch_dim + 2 * block_size + head_dim + 1
}

/// Shared memory of the largest exact-attention row kernel (the key-side backward).
fn lean_shared(head_dim: usize) -> usize {
    2 * TILE + 2 * head_dim
}

/// Comptime parameters of the polysketch kernels: degree of the in-block weights and whether
/// they come from exact local queries and keys.
fn local_degree<T>(local: &Option<LocalExact<T>>) -> (bool, u32) {
    match local {
        Some(l) => (true, l.degree),
        None => (false, 2),
    }
}

/// Inputs of the polysketch kernels, flattened to `[batch · heads, seq, dim]`.
struct PolysketchInputs<R: CubeRuntime> {
    query_features: CubeTensor<R>,
    key_features: CubeTensor<R>,
    value1: CubeTensor<R>,
    local_query: CubeTensor<R>,
    local_key: CubeTensor<R>,
    local: bool,
    degree: u32,
    dims: [usize; 5],
}

impl<R: CubeRuntime> PolysketchInputs<R> {
    fn new<F: FloatElement, I: IntElement, BT: BoolElement>(
        query_features: FloatTensor<Cube<R, F, I, BT>>,
        key_features: FloatTensor<Cube<R, F, I, BT>>,
        value: FloatTensor<Cube<R, F, I, BT>>,
        local: Option<LocalExact<CubeTensor<R>>>,
    ) -> Self {
        let (is_local, degree) = local_degree(&local);
        let value = wrap::<Cube<R, F, I, BT>, 4>(value);
        let [batch, heads, seq, head_dim] = value.dims();
        let sketch_dim = query_features.meta.shape()[3];
        let query_features = rows::<R, F, I, BT>(wrap(query_features));
        let key_features = rows::<R, F, I, BT>(wrap(key_features));
        // without exact local blocks the kernels never read these two: pass the features
        let (local_query, local_key) = match local {
            Some(l) => (rows::<R, F, I, BT>(wrap(l.query)), rows::<R, F, I, BT>(wrap(l.key))),
            None => (query_features.clone(), key_features.clone()),
        };
        PolysketchInputs {
            query_features,
            key_features,
            value1: rows(with_ones(value)),
            local_query,
            local_key,
            local: is_local,
            degree,
            dims: [batch, heads, seq, head_dim, sketch_dim],
        }
    }
}

/// `Σ_{s ∈ block} x_s ⊗ x_s ⊗ y_s` for every block, followed by an exclusive scan over blocks
/// (forwards for prefixes, backwards for suffixes).
///
/// # Shapes
/// - `x`: `[bh, seq, r]`, `y`: `[bh, seq, width]`
/// - returns `[bh, blocks, r², width]`
fn scanned_summaries<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: &CubeTensor<R>,
    y: &CubeTensor<R>,
    block_size: usize,
    reverse: bool,
) -> CubeTensor<R> {
    let [bh, seq, r] = [x.meta.shape()[0], x.meta.shape()[1], x.meta.shape()[2]];
    let width = y.meta.shape()[2];
    let blocks = seq.div_ceil(block_size);
    let shape = [bh, blocks, r * r, width];
    let summaries = output::<R, F, I, BT, 4>(shape, &x.device);
    let client = x.client.clone();
    let dtype = x.dtype;
    kernels::block_summary::launch::<R>(
        &client,
        element_grid(shape.iter().product()),
        CubeDim::new_1d(UNITS),
        x.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        summaries.clone().into_tensor_arg(),
        block_size,
        dtype.into(),
    );
    let scanned = output::<R, F, I, BT, 4>(shape, &x.device);
    kernels::block_scan::launch::<R>(
        &client,
        element_grid(bh * r * r * width),
        CubeDim::new_1d(UNITS),
        summaries.into_tensor_arg(),
        scanned.clone().into_tensor_arg(),
        reverse,
        dtype.into(),
    );
    launched(2);
    scanned
}

fn polysketch_forward_kernels<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    inputs: PolysketchInputs<R>,
    block_size: usize,
) -> PolysketchSaved<CubeTensor<R>> {
    let [batch, heads, seq, head_dim, sketch_dim] = inputs.dims;
    let bh = batch * heads;
    let device = inputs.value1.device.clone();
    let client = inputs.value1.client.clone();
    let dtype = inputs.value1.dtype;
    let prefixes =
        scanned_summaries::<R, F, I, BT>(&inputs.key_features, &inputs.value1, block_size, false);
    let out = output::<R, F, I, BT, 3>([bh, seq, head_dim], &device);
    let denominator = output::<R, F, I, BT, 3>([bh, seq, 1], &device);
    kernels::polysketch_forward_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        inputs.query_features.into_tensor_arg(),
        inputs.key_features.into_tensor_arg(),
        inputs.value1.into_tensor_arg(),
        inputs.local_query.into_tensor_arg(),
        inputs.local_key.into_tensor_arg(),
        prefixes.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        denominator.clone().into_tensor_arg(),
        block_size,
        sketch_dim * sketch_dim,
        head_dim + 1,
        inputs.local,
        inputs.degree,
        dtype.into(),
    );
    launched(1);
    let blocks = seq.div_ceil(block_size);
    let r2 = sketch_dim * sketch_dim;
    PolysketchSaved {
        output: unrows::<R, F, I, BT>(out, batch, heads),
        denominator: unrows::<R, F, I, BT>(denominator, batch, heads),
        prefixes: prim(wrap::<Cube<R, F, I, BT>, 4>(prefixes).reshape([
            batch,
            heads,
            blocks,
            r2,
            head_dim + 1,
        ])),
    }
}

fn polysketch_backward_kernels<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    inputs: PolysketchInputs<R>,
    block_size: usize,
    saved: PolysketchSaved<CubeTensor<R>>,
    grad_output: CubeTensor<R>,
) -> Vec<CubeTensor<R>> {
    type B<R, F, I, BT> = Cube<R, F, I, BT>;
    let [batch, heads, seq, head_dim, sketch_dim] = inputs.dims;
    let (bh, width, r2) = (batch * heads, head_dim + 1, sketch_dim * sketch_dim);
    let blocks = seq.div_ceil(block_size);
    let device = inputs.value1.device.clone();
    let client = inputs.value1.client.clone();
    let dtype = inputs.value1.dtype;

    let d_result = rows(result_gradient(
        wrap::<B<R, F, I, BT>, 4>(grad_output),
        wrap(saved.output),
        wrap(saved.denominator),
    ));
    let prefixes = into_contiguous(prim(
        wrap::<B<R, F, I, BT>, 5>(saved.prefixes).reshape([bh, blocks, r2, width]),
    ));
    let suffixes =
        scanned_summaries::<R, F, I, BT>(&inputs.query_features, &d_result, block_size, true);

    let d_query_features = output::<R, F, I, BT, 3>([bh, seq, sketch_dim], &device);
    let d_key_features = output::<R, F, I, BT, 3>([bh, seq, sketch_dim], &device);
    let d_value = output::<R, F, I, BT, 3>([bh, seq, head_dim], &device);
    let local_shape = if inputs.local { [bh, seq, head_dim] } else { [1, 1, 1] };
    let d_local_query = output::<R, F, I, BT, 3>(local_shape, &device);
    let d_local_key = output::<R, F, I, BT, 3>(local_shape, &device);
    let degree_factor = inputs.degree as f32;
    kernels::polysketch_backward_query_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        inputs.query_features.clone().into_tensor_arg(),
        inputs.key_features.clone().into_tensor_arg(),
        inputs.value1.clone().into_tensor_arg(),
        inputs.local_query.clone().into_tensor_arg(),
        inputs.local_key.clone().into_tensor_arg(),
        prefixes.into_tensor_arg(),
        d_result.clone().into_tensor_arg(),
        d_query_features.clone().into_tensor_arg(),
        d_local_query.clone().into_tensor_arg(),
        degree_factor,
        block_size,
        r2,
        width,
        inputs.local,
        inputs.degree,
        dtype.into(),
    );
    kernels::polysketch_backward_key_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        inputs.query_features.into_tensor_arg(),
        inputs.key_features.into_tensor_arg(),
        inputs.value1.into_tensor_arg(),
        inputs.local_query.into_tensor_arg(),
        inputs.local_key.into_tensor_arg(),
        suffixes.into_tensor_arg(),
        d_result.into_tensor_arg(),
        d_key_features.clone().into_tensor_arg(),
        d_value.clone().into_tensor_arg(),
        d_local_key.clone().into_tensor_arg(),
        degree_factor,
        block_size,
        r2,
        width,
        inputs.local,
        inputs.degree,
        dtype.into(),
    );
    launched(2);
    let mut grads = vec![d_query_features, d_key_features, d_value];
    if inputs.local {
        grads.extend([d_local_query, d_local_key]);
    }
    grads.into_iter().map(|t| unrows::<R, F, I, BT>(t, batch, heads)).collect()
}

/// Scale of the scores and comptime switches of the exact-attention kernels.
fn lean_params(weights: CausalWeights, head_dim: usize) -> (f32, bool, u32) {
    match weights {
        CausalWeights::Softmax => (1.0 / (head_dim as f32).sqrt(), true, 1),
        CausalWeights::Polynomial { degree } => (1.0, false, degree),
    }
}

fn lean_forward_kernel<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    query: FloatTensor<Cube<R, F, I, BT>>,
    key: FloatTensor<Cube<R, F, I, BT>>,
    value: FloatTensor<Cube<R, F, I, BT>>,
    weights: CausalWeights,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [batch, heads, seq, head_dim] = wrap::<Cube<R, F, I, BT>, 4>(query.clone()).dims();
    let bh = batch * heads;
    let (scale, softmax, degree) = lean_params(weights, head_dim);
    let (query, key, value) = (
        rows::<R, F, I, BT>(wrap(query)),
        rows::<R, F, I, BT>(wrap(key)),
        rows::<R, F, I, BT>(wrap(value)),
    );
    let out = output::<R, F, I, BT, 3>([bh, seq, head_dim], &query.device);
    let stat = output::<R, F, I, BT, 3>([bh, seq, 1], &query.device);
    let client = query.client.clone();
    let dtype = query.dtype;
    kernels::lean_forward_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        query.into_tensor_arg(),
        key.into_tensor_arg(),
        value.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        stat.clone().into_tensor_arg(),
        scale,
        TILE,
        head_dim,
        softmax,
        degree,
        dtype.into(),
    );
    launched(1);
    (unrows::<R, F, I, BT>(out, batch, heads), unrows::<R, F, I, BT>(stat, batch, heads))
}

#[allow(clippy::too_many_arguments)]
fn lean_backward_kernels<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    query: FloatTensor<Cube<R, F, I, BT>>,
    key: FloatTensor<Cube<R, F, I, BT>>,
    value: FloatTensor<Cube<R, F, I, BT>>,
    out: FloatTensor<Cube<R, F, I, BT>>,
    stat: FloatTensor<Cube<R, F, I, BT>>,
    grad_output: FloatTensor<Cube<R, F, I, BT>>,
    weights: CausalWeights,
) -> [CubeTensor<R>; 3] {
    type B<R, F, I, BT> = Cube<R, F, I, BT>;
    let grad_output = wrap::<B<R, F, I, BT>, 4>(grad_output);
    let [batch, heads, seq, head_dim] = grad_output.dims();
    let bh = batch * heads;
    let (scale, softmax, degree) = lean_params(weights, head_dim);
    let d_row = rows((grad_output.clone() * wrap::<B<R, F, I, BT>, 4>(out)).sum_dim(3));
    let (query, key, value) = (
        rows::<R, F, I, BT>(wrap(query)),
        rows::<R, F, I, BT>(wrap(key)),
        rows::<R, F, I, BT>(wrap(value)),
    );
    let (grad_output, stat) = (rows(grad_output), rows::<R, F, I, BT>(wrap(stat)));
    let device = query.device.clone();
    let client = query.client.clone();
    let dtype = query.dtype;
    let d_query = output::<R, F, I, BT, 3>([bh, seq, head_dim], &device);
    let d_key = output::<R, F, I, BT, 3>([bh, seq, head_dim], &device);
    let d_value = output::<R, F, I, BT, 3>([bh, seq, head_dim], &device);
    kernels::lean_backward_query_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        query.clone().into_tensor_arg(),
        key.clone().into_tensor_arg(),
        value.clone().into_tensor_arg(),
        grad_output.clone().into_tensor_arg(),
        stat.clone().into_tensor_arg(),
        d_row.clone().into_tensor_arg(),
        d_query.clone().into_tensor_arg(),
        scale,
        degree as f32,
        TILE,
        head_dim,
        softmax,
        degree,
        dtype.into(),
    );
    kernels::lean_backward_key_rows::launch::<R>(
        &client,
        grid(bh * seq),
        CubeDim::new_1d(UNITS),
        query.into_tensor_arg(),
        key.into_tensor_arg(),
        value.into_tensor_arg(),
        grad_output.into_tensor_arg(),
        stat.into_tensor_arg(),
        d_row.into_tensor_arg(),
        d_key.clone().into_tensor_arg(),
        d_value.clone().into_tensor_arg(),
        scale,
        degree as f32,
        TILE,
        head_dim,
        softmax,
        degree,
        dtype.into(),
    );
    launched(2);
    [d_query, d_key, d_value].map(|t| unrows::<R, F, I, BT>(t, batch, heads))
}

/// Whether the polysketch kernels cover these inputs on this device.
fn polysketch_supported<R: CubeRuntime>(
    query_features: &CubeTensor<R>,
    value: &CubeTensor<R>,
    block_size: usize,
) -> bool {
    let shape = value.meta.shape();
    let sketch_dim = query_features.meta.shape()[3];
    block_size > 0
        && shape[2] > 0
        && shared_fits(value, polysketch_shared(sketch_dim, shape[3], block_size))
}

/// Whether the exact-attention kernels cover these inputs on this device.
fn lean_supported<R: CubeRuntime>(query: &CubeTensor<R>, weights: CausalWeights) -> bool {
    let degree_ok = match weights {
        CausalWeights::Softmax => true,
        CausalWeights::Polynomial { degree } => degree >= 1,
    };
    let shape = query.meta.shape();
    degree_ok && shape[2] > 0 && shared_fits(query, lean_shared(shape[3]))
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> PolysketchBackend
    for CubeBackend<R, F, I, BT>
{
    fn polysketch_causal(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> FloatTensor<Self> {
        Self::polysketch_forward(query_features, key_features, value, local, block_size).output
    }

    fn polysketch_forward(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> PolysketchSaved<FloatTensor<Self>> {
        if !polysketch_supported(&query_features, &value, block_size) {
            return composed_polysketch_forward::<Self>(
                query_features,
                key_features,
                value,
                local,
                block_size,
            );
        }
        let inputs = PolysketchInputs::new::<F, I, BT>(query_features, key_features, value, local);
        polysketch_forward_kernels::<R, F, I, BT>(inputs, block_size)
    }

    fn polysketch_backward(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
        saved: PolysketchSaved<FloatTensor<Self>>,
        grad_output: FloatTensor<Self>,
    ) -> Vec<FloatTensor<Self>> {
        if !polysketch_supported(&query_features, &value, block_size) {
            return composed_polysketch_backward::<Self>(
                query_features,
                key_features,
                value,
                local,
                block_size,
                saved,
                grad_output,
            );
        }
        let inputs = PolysketchInputs::new::<F, I, BT>(query_features, key_features, value, local);
        polysketch_backward_kernels::<R, F, I, BT>(inputs, block_size, saved, grad_output)
    }

    fn lean_attention_with_stat(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !lean_supported(&query, weights) {
            let (out, stat) = crate::lean::lean_attention_forward(
                wrap::<Self, 4>(query),
                wrap(key),
                wrap(value),
                weights,
                chunk,
            );
            return (prim(out), prim(stat));
        }
        lean_forward_kernel::<R, F, I, BT>(query, key, value, weights)
    }

    fn lean_attention_backward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        output: FloatTensor<Self>,
        stat: FloatTensor<Self>,
        grad_output: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> [FloatTensor<Self>; 3] {
        if !lean_supported(&query, weights) {
            return crate::lean::lean_attention_backward(
                wrap::<Self, 4>(query),
                wrap(key),
                wrap(value),
                wrap(output),
                wrap(stat),
                wrap(grad_output),
                weights,
                chunk,
            )
            .map(prim);
        }
        lean_backward_kernels::<R, F, I, BT>(query, key, value, output, stat, grad_output, weights)
    }
}
