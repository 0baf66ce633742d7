//! CubeCL kernels of the polysketch block algorithm and of memory-lean exact attention.
//!
//! Every tensor is 3-d or 4-d with the batch and head dimensions merged into one `bh` index:
//! rows `[bh, seq, dim]` and block states `[bh, blocks, sketch_dim², width]`. Kernels index through
//! strides, read any float element type and accumulate in `f32`.
//!
//! Row kernels run one cube per query (or key) row: the units of the cube first compute the row's
//! weights against the other rows of its block (or of its key tile) into shared memory, then
//! split the output columns between them. Element kernels run one unit per output element.

use cubecl::prelude::*;

/// Index of the cube in a 2-d grid of cubes, read as one linear index.
#[cube]
fn cube_index() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// Index of the unit in a 2-d grid of 1-d cubes, read as one linear index.
#[cube]
fn unit_index() -> usize {
    cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize
}

/// Position of element `[a, b, c]` of a 3-d tensor.
#[cube]
fn at3<F: Float>(t: &Tensor<F>, a: usize, b: usize, c: usize) -> usize {
    a * t.stride(0) + b * t.stride(1) + c * t.stride(2)
}

/// Position of element `[a, b, c, d]` of a 4-d tensor.
#[cube]
fn at4<F: Float>(t: &Tensor<F>, a: usize, b: usize, c: usize, d: usize) -> usize {
    a * t.stride(0) + b * t.stride(1) + c * t.stride(2) + d * t.stride(3)
}

/// Dot product of row `i` of `x` with row `j` of `y` over their last dimension, both `[bh, seq, len]`.
#[cube]
fn row_dot<F: Float>(x: &Tensor<F>, y: &Tensor<F>, bh: usize, i: usize, j: usize) -> f32 {
    let mut sum = f32::new(0.0);
    for d in 0..x.shape(2) {
        sum += f32::cast_from(x[at3(x, bh, i, d)]) * f32::cast_from(y[at3(y, bh, j, d)]);
    }
    sum
}

/// `x^power` by repeated multiplication.
#[cube]
fn power(x: f32, #[comptime] exponent: u32) -> f32 {
    let mut result = f32::new(1.0);
    #[unroll]
    for _ in 0..exponent {
        result *= x;
    }
    result
}

/// Raw score between row `i` and row `j` of a block: `φ(q_i)·φ(k_j)` or, with exact local blocks,
/// `q̂_i·k̂_j`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn block_score<F: Float>(
    query_features: &Tensor<F>,
    key_features: &Tensor<F>,
    local_query: &Tensor<F>,
    local_key: &Tensor<F>,
    bh: usize,
    i: usize,
    j: usize,
    #[comptime] local: bool,
) -> f32 {
    if comptime!(local) {
        row_dot(local_query, local_key, bh, i, j)
    } else {
        row_dot(query_features, key_features, bh, i, j)
    }
}

/// `out[ab] = Σ_c vector[c] · state[bh, l, ab, c]` for every `ab < r²`, split between the units:
/// the gradient of a row's self tensor product from a block state.
#[cube]
#[allow(clippy::too_many_arguments)]
fn contract_state<F: Float>(
    vector: &SharedMemory<f32>,
    state: &Tensor<F>,
    bh: usize,
    l: usize,
    out: &mut SharedMemory<f32>,
) {
    let (r2, width) = (state.shape(2), state.shape(3));
    let units = CUBE_DIM_X as usize;
    let mut ab = UNIT_POS_X as usize;
    while ab < r2 {
        let mut sum = f32::new(0.0);
        for c in 0..width {
            sum += vector[c] * f32::cast_from(state[at4(state, bh, l, ab, c)]);
        }
        out[ab] = sum;
        ab += units;
    }
}

/// Writes the gradients of row `row`'s own features and (with exact local blocks) local vector,
/// given `D`, the gradient of its self tensor product, and `dS_t`, the gradients of its in-block
/// scores against rows `first + t` of the other side (keys for a query row, queries for a key
/// row): `g_a = Σ_b (D_ab + D_ba) x_b + Σ_t dS_t y_{first+t, a}` without local blocks,
/// `g = Σ_b (D_ab + D_ba) x_b` and `ĝ = Σ_t dS_t ŷ_{first+t}` with them.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_row_gradients<F: Float>(
    own: &Tensor<F>,
    other: &Tensor<F>,
    other_local: &Tensor<F>,
    d_tensor: &SharedMemory<f32>,
    d_score: &SharedMemory<f32>,
    d_features: &mut Tensor<F>,
    d_local: &mut Tensor<F>,
    bh: usize,
    row: usize,
    first: usize,
    count: usize,
    #[comptime] local: bool,
) {
    let r = own.shape(2);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;
    let mut a = unit;
    while a < r {
        let mut sum = f32::new(0.0);
        for b in 0..r {
            let xb = f32::cast_from(own[at3(own, bh, row, b)]);
            sum += (d_tensor[a * r + b] + d_tensor[b * r + a]) * xb;
        }
        if comptime!(!local) {
            for t in 0..count {
                sum += d_score[t] * f32::cast_from(other[at3(other, bh, first + t, a)]);
            }
        }
        d_features[at3(d_features, bh, row, a)] = F::cast_from(sum);
        a += units;
    }
    if comptime!(local) {
        let mut d = unit;
        while d < other_local.shape(2) {
            let mut sum = f32::new(0.0);
            for t in 0..count {
                sum += d_score[t] * f32::cast_from(other_local[at3(other_local, bh, first + t, d)]);
            }
            d_local[at3(d_local, bh, row, d)] = F::cast_from(sum);
            d += units;
        }
    }
}

/// Block summaries `H[bh, l, a·r + b, c] = Σ_{s ∈ block l} x[s, a] x[s, b] y[s, c]`.
///
/// `x`: `[bh, seq, r]`, `y`: `[bh, seq, width]`, `out`: `[bh, blocks, r², width]`; one unit per
/// element of `out`.
#[cube(launch)]
pub fn block_summary<F: Float>(
    x: &Tensor<F>,
    y: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] block: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (blocks, r2, width) = (out.shape(1), out.shape(2), out.shape(3));
    let pos = unit_index();
    if pos >= out.shape(0) * blocks * r2 * width {
        terminate!();
    }
    let c = pos % width;
    let ab = (pos / width) % r2;
    let l = (pos / (width * r2)) % blocks;
    let bh = pos / (width * r2 * blocks);
    let r = x.shape(2);
    let (a, b) = (ab / r, ab % r);
    let start = l * block;
    let mut end = start + block;
    if end > x.shape(1) {
        end = x.shape(1);
    }
    let mut sum = f32::new(0.0);
    for s in start..end {
        let xa = f32::cast_from(x[at3(x, bh, s, a)]);
        let xb = f32::cast_from(x[at3(x, bh, s, b)]);
        sum += xa * xb * f32::cast_from(y[at3(y, bh, s, c)]);
    }
    out[at4(out, bh, l, ab, c)] = F::cast_from(sum);
}

/// Exclusive scan over blocks: `out[bh, l] = Σ_{j < l} h[bh, j]`, or `Σ_{j > l}` when
/// `reverse`. `h`, `out`: `[bh, blocks, e1, e2]`; one unit per `(bh, e1, e2)`.
#[cube(launch)]
pub fn block_scan<F: Float>(
    h: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] reverse: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (blocks, e1, e2) = (h.shape(1), h.shape(2), h.shape(3));
    let pos = unit_index();
    if pos >= h.shape(0) * e1 * e2 {
        terminate!();
    }
    let y = pos % e2;
    let x = (pos / e2) % e1;
    let bh = pos / (e1 * e2);
    let mut sum = f32::new(0.0);
    for step in 0..blocks {
        let mut l = step;
        if comptime!(reverse) {
            l = blocks - 1 - step;
        }
        out[at4(out, bh, l, x, y)] = F::cast_from(sum);
        sum += f32::cast_from(h[at4(h, bh, l, x, y)]);
    }
}

/// Forward rows of the block algorithm: `R_i = Σ_{j ∈ block, j ≤ i} w_ij v'_j + (φq_i⊗φq_i) Z_l`,
/// `o_i = R_i[..h] / (1 + R_i[h])`.
///
/// `value1` is `[bh, seq, h + 1]` with a last column of ones; `prefixes`: `[bh, blocks, r², h + 1]`;
/// `output`: `[bh, seq, h]`; `denominator`: `[bh, seq, 1]`. One cube per row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn polysketch_forward_rows<F: Float>(
    query_features: &Tensor<F>,
    key_features: &Tensor<F>,
    value1: &Tensor<F>,
    local_query: &Tensor<F>,
    local_key: &Tensor<F>,
    prefixes: &Tensor<F>,
    output: &mut Tensor<F>,
    denominator: &mut Tensor<F>,
    #[comptime] block: usize,
    #[comptime] r2: usize,
    #[comptime] width: usize,
    #[comptime] local: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = value1.shape(1);
    let row = cube_index();
    if row >= value1.shape(0) * seq {
        terminate!();
    }
    let (bh, i) = (row / seq, row % seq);
    let l = i / block;
    let start = l * block;
    let r = query_features.shape(2);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;

    let mut tensor = SharedMemory::<f32>::new(r2);
    let mut weight = SharedMemory::<f32>::new(block);
    let mut result = SharedMemory::<f32>::new(width);
    let mut ab = unit;
    while ab < r * r {
        let qa = f32::cast_from(query_features[at3(query_features, bh, i, ab / r)]);
        let qb = f32::cast_from(query_features[at3(query_features, bh, i, ab % r)]);
        tensor[ab] = qa * qb;
        ab += units;
    }
    let count = i - start + 1;
    let mut t = unit;
    while t < count {
        let s = block_score(
            query_features,
            key_features,
            local_query,
            local_key,
            bh,
            i,
            start + t,
            local,
        );
        weight[t] = power(s, degree);
        t += units;
    }
    sync_cube();

    let mut c = unit;
    while c < width {
        let mut sum = f32::new(0.0);
        for t in 0..count {
            sum += weight[t] * f32::cast_from(value1[at3(value1, bh, start + t, c)]);
        }
        for ab in 0..r * r {
            sum += tensor[ab] * f32::cast_from(prefixes[at4(prefixes, bh, l, ab, c)]);
        }
        result[c] = sum;
        c += units;
    }
    sync_cube();

    let den = f32::new(1.0) + result[width - 1];
    let mut c = unit;
    while c < width - 1 {
        output[at3(output, bh, i, c)] = F::cast_from(result[c] / den);
        c += units;
    }
    if unit == 0 {
        denominator[at3(denominator, bh, i, 0)] = F::cast_from(den);
    }
}

/// Query-side gradients of the block algorithm for one row `i`: `dφq_i` and, with exact local
/// blocks, `dq̂_i`.
///
/// `d_result` is `dR`, `[bh, seq, h + 1]`; `prefixes` the forward's `Z`. Outputs:
/// `d_query_features`: `[bh, seq, r]`, `d_local_query`: `[bh, seq, h]` (written only when
/// `local`). One cube per row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn polysketch_backward_query_rows<F: Float>(
    query_features: &Tensor<F>,
    key_features: &Tensor<F>,
    value1: &Tensor<F>,
    local_query: &Tensor<F>,
    local_key: &Tensor<F>,
    prefixes: &Tensor<F>,
    d_result: &Tensor<F>,
    d_query_features: &mut Tensor<F>,
    d_local_query: &mut Tensor<F>,
    degree_factor: f32,
    #[comptime] block: usize,
    #[comptime] r2: usize,
    #[comptime] width: usize,
    #[comptime] local: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = value1.shape(1);
    let row = cube_index();
    if row >= value1.shape(0) * seq {
        terminate!();
    }
    let (bh, i) = (row / seq, row % seq);
    let l = i / block;
    let start = l * block;
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;

    let mut d_row = SharedMemory::<f32>::new(width);
    let mut d_score = SharedMemory::<f32>::new(block);
    let mut d_tensor = SharedMemory::<f32>::new(r2);
    let mut c = unit;
    while c < width {
        d_row[c] = f32::cast_from(d_result[at3(d_result, bh, i, c)]);
        c += units;
    }
    sync_cube();

    // dS_ij = (dR_i · v'_j) · p · s_ij^(p-1) for the keys j ≤ i of the block
    let count = i - start + 1;
    let mut t = unit;
    while t < count {
        let j = start + t;
        let mut d_weight = f32::new(0.0);
        for c in 0..width {
            d_weight += d_row[c] * f32::cast_from(value1[at3(value1, bh, j, c)]);
        }
        let s = block_score(query_features, key_features, local_query, local_key, bh, i, j, local);
        d_score[t] = d_weight * degree_factor * power(s, degree - 1);
        t += units;
    }
    // D = dR_i Z_lᵀ, the gradient of φq_i⊗φq_i
    contract_state(&d_row, prefixes, bh, l, &mut d_tensor);
    sync_cube();

    write_row_gradients(
        query_features,
        key_features,
        local_key,
        &d_tensor,
        &d_score,
        d_query_features,
        d_local_query,
        bh,
        i,
        start,
        count,
        local,
    );
}

/// Key-side gradients of the block algorithm for one row `j`: `dv_j`, `dφk_j` and, with exact
/// local blocks, `dk̂_j`.
///
/// `suffixes` holds `G_l = Σ_{m > l} (φQ_m⊗φQ_m)ᵀ dR_m`, `[bh, blocks, r², h + 1]`. Outputs:
/// `d_key_features`: `[bh, seq, r]`, `d_value`: `[bh, seq, h]`, `d_local_key`: `[bh, seq, h]`
/// (written only when `local`). One cube per row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn polysketch_backward_key_rows<F: Float>(
    query_features: &Tensor<F>,
    key_features: &Tensor<F>,
    value1: &Tensor<F>,
    local_query: &Tensor<F>,
    local_key: &Tensor<F>,
    suffixes: &Tensor<F>,
    d_result: &Tensor<F>,
    d_key_features: &mut Tensor<F>,
    d_value: &mut Tensor<F>,
    d_local_key: &mut Tensor<F>,
    degree_factor: f32,
    #[comptime] block: usize,
    #[comptime] r2: usize,
    #[comptime] width: usize,
    #[comptime] local: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = value1.shape(1);
    let row = cube_index();
    if row >= value1.shape(0) * seq {
        terminate!();
    }
    let (bh, j) = (row / seq, row % seq);
    let l = j / block;
    let mut end = l * block + block;
    if end > seq {
        end = seq;
    }
    let r = key_features.shape(2);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;

    let mut value_row = SharedMemory::<f32>::new(width);
    let mut tensor = SharedMemory::<f32>::new(r2);
    let mut weight = SharedMemory::<f32>::new(block);
    let mut d_score = SharedMemory::<f32>::new(block);
    let mut d_tensor = SharedMemory::<f32>::new(r2);
    let mut c = unit;
    while c < width {
        value_row[c] = f32::cast_from(value1[at3(value1, bh, j, c)]);
        c += units;
    }
    let mut ab = unit;
    while ab < r * r {
        let ka = f32::cast_from(key_features[at3(key_features, bh, j, ab / r)]);
        let kb = f32::cast_from(key_features[at3(key_features, bh, j, ab % r)]);
        tensor[ab] = ka * kb;
        ab += units;
    }
    sync_cube();

    // w_ij and dS_ij for the queries i ≥ j of the block
    let count = end - j;
    let mut t = unit;
    while t < count {
        let i = j + t;
        let mut d_weight = f32::new(0.0);
        for c in 0..width {
            d_weight += f32::cast_from(d_result[at3(d_result, bh, i, c)]) * value_row[c];
        }
        let s = block_score(query_features, key_features, local_query, local_key, bh, i, j, local);
        let slope = power(s, degree - 1);
        weight[t] = slope * s;
        d_score[t] = d_weight * degree_factor * slope;
        t += units;
    }
    // D' = v'_j G_lᵀ, the gradient of φk_j⊗φk_j
    contract_state(&value_row, suffixes, bh, l, &mut d_tensor);
    sync_cube();

    let mut c = unit;
    while c < width - 1 {
        let mut sum = f32::new(0.0);
        for t in 0..count {
            sum += weight[t] * f32::cast_from(d_result[at3(d_result, bh, j + t, c)]);
        }
        for ab in 0..r * r {
            sum += tensor[ab] * f32::cast_from(suffixes[at4(suffixes, bh, l, ab, c)]);
        }
        d_value[at3(d_value, bh, j, c)] = F::cast_from(sum);
        c += units;
    }
    write_row_gradients(
        key_features,
        query_features,
        local_query,
        &d_tensor,
        &d_score,
        d_key_features,
        d_local_key,
        bh,
        j,
        j,
        count,
        local,
    );
}

/// A very negative score standing in for `-∞` (shader languages have no infinite literal).
const MINUS_LARGE: f32 = -1.0e30;

/// Weight of one scaled score: `exp(s - shift)` for softmax, `s^degree` for polynomial weights.
#[cube]
fn exact_weight(score: f32, shift: f32, #[comptime] softmax: bool, #[comptime] degree: u32) -> f32 {
    if comptime!(softmax) {
        f32::exp(score - shift)
    } else {
        power(score, degree)
    }
}

/// Memory-lean exact attention, forward rows: one cube per query row walks the keys `j ≤ i` in
/// tiles with an online softmax (or a running polynomial sum), and writes the output row and the
/// row statistic (log-sum-exp, or the denominator `1 + Σ w`).
///
/// `query`, `key`, `value`, `output`: `[bh, seq, h]`; `stat`: `[bh, seq, 1]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn lean_forward_rows<F: Float>(
    query: &Tensor<F>,
    key: &Tensor<F>,
    value: &Tensor<F>,
    output: &mut Tensor<F>,
    stat: &mut Tensor<F>,
    scale: f32,
    #[comptime] tile: usize,
    #[comptime] head_dim: usize,
    #[comptime] softmax: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = query.shape(1);
    let row = cube_index();
    if row >= query.shape(0) * seq {
        terminate!();
    }
    let (bh, i) = (row / seq, row % seq);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;

    let mut scores = SharedMemory::<f32>::new(tile);
    let mut weights = SharedMemory::<f32>::new(tile);
    let mut acc = SharedMemory::<f32>::new(head_dim);
    let mut d = unit;
    while d < head_dim {
        acc[d] = f32::new(0.0);
        d += units;
    }
    let mut run_max = f32::new(MINUS_LARGE);
    let mut run_sum = f32::new(0.0);
    let mut tile_start = 0;
    while tile_start <= i {
        let mut count = i + 1 - tile_start;
        if count > tile {
            count = tile;
        }
        let mut t = unit;
        while t < count {
            scores[t] = row_dot(query, key, bh, i, tile_start + t) * scale;
            t += units;
        }
        sync_cube();
        let mut shift = f32::new(0.0);
        if comptime!(softmax) {
            let mut tile_max = run_max;
            for t in 0..count {
                tile_max = f32::max(tile_max, scores[t]);
            }
            shift = tile_max;
        }
        let mut t = unit;
        while t < count {
            weights[t] = exact_weight(scores[t], shift, softmax, degree);
            t += units;
        }
        sync_cube();
        let mut correction = f32::new(1.0);
        if comptime!(softmax) {
            correction = f32::exp(run_max - shift);
            run_max = shift;
        }
        let mut tile_sum = f32::new(0.0);
        for t in 0..count {
            tile_sum += weights[t];
        }
        run_sum = run_sum * correction + tile_sum;
        let mut d = unit;
        while d < head_dim {
            let mut sum = acc[d] * correction;
            for t in 0..count {
                sum += weights[t] * f32::cast_from(value[at3(value, bh, tile_start + t, d)]);
            }
            acc[d] = sum;
            d += units;
        }
        sync_cube();
        tile_start += tile;
    }

    let mut den = run_sum;
    if comptime!(!softmax) {
        den = f32::new(1.0) + run_sum;
    }
    let mut d = unit;
    while d < head_dim {
        output[at3(output, bh, i, d)] = F::cast_from(acc[d] / den);
        d += units;
    }
    if unit == 0 {
        let mut s = den;
        if comptime!(softmax) {
            s = run_max + f32::ln(run_sum);
        }
        stat[at3(stat, bh, i, 0)] = F::cast_from(s);
    }
}

/// Gradient of one scaled score from `dP = dO_i·v_j`, the row's `D_i = dO_i·o_i` and its
/// statistic: `p (dP - D)` for softmax, `(dP - D) / den · p s^(p-1)` for polynomial weights.
#[cube]
fn exact_score_gradient(
    score: f32,
    d_p: f32,
    d_row: f32,
    stat: f32,
    degree_factor: f32,
    #[comptime] softmax: bool,
    #[comptime] degree: u32,
) -> f32 {
    if comptime!(softmax) {
        f32::exp(score - stat) * (d_p - d_row)
    } else {
        (d_p - d_row) / stat * degree_factor * power(score, degree - 1)
    }
}

/// Normalised weight of one scaled score given the row statistic.
#[cube]
fn exact_probability(
    score: f32,
    stat: f32,
    #[comptime] softmax: bool,
    #[comptime] degree: u32,
) -> f32 {
    if comptime!(softmax) {
        f32::exp(score - stat)
    } else {
        power(score, degree) / stat
    }
}

/// Memory-lean exact attention, query gradient: one cube per query row recomputes its weights
/// against the keys `j ≤ i` tile by tile. `d_row`, `stat`: `[bh, seq, 1]`; `d_query`: `[bh, seq, h]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn lean_backward_query_rows<F: Float>(
    query: &Tensor<F>,
    key: &Tensor<F>,
    value: &Tensor<F>,
    grad_output: &Tensor<F>,
    stat: &Tensor<F>,
    d_row: &Tensor<F>,
    d_query: &mut Tensor<F>,
    scale: f32,
    degree_factor: f32,
    #[comptime] tile: usize,
    #[comptime] head_dim: usize,
    #[comptime] softmax: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = query.shape(1);
    let row = cube_index();
    if row >= query.shape(0) * seq {
        terminate!();
    }
    let (bh, i) = (row / seq, row % seq);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;
    let row_stat = f32::cast_from(stat[at3(stat, bh, i, 0)]);
    let row_d = f32::cast_from(d_row[at3(d_row, bh, i, 0)]);

    let mut d_scores = SharedMemory::<f32>::new(tile);
    let mut acc = SharedMemory::<f32>::new(head_dim);
    let mut d = unit;
    while d < head_dim {
        acc[d] = f32::new(0.0);
        d += units;
    }
    let mut tile_start = 0;
    while tile_start <= i {
        let mut count = i + 1 - tile_start;
        if count > tile {
            count = tile;
        }
        let mut t = unit;
        while t < count {
            let j = tile_start + t;
            let score = row_dot(query, key, bh, i, j) * scale;
            let d_p = row_dot(grad_output, value, bh, i, j);
            d_scores[t] =
                exact_score_gradient(score, d_p, row_d, row_stat, degree_factor, softmax, degree);
            t += units;
        }
        sync_cube();
        let mut d = unit;
        while d < head_dim {
            let mut sum = acc[d];
            for t in 0..count {
                sum += d_scores[t] * f32::cast_from(key[at3(key, bh, tile_start + t, d)]);
            }
            acc[d] = sum;
            d += units;
        }
        sync_cube();
        tile_start += tile;
    }
    let mut d = unit;
    while d < head_dim {
        d_query[at3(d_query, bh, i, d)] = F::cast_from(acc[d] * scale);
        d += units;
    }
}

/// Memory-lean exact attention, key and value gradients: one cube per key row recomputes the
/// weights of the queries `i ≥ j` tile by tile. `d_key`, `d_value`: `[bh, seq, h]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn lean_backward_key_rows<F: Float>(
    query: &Tensor<F>,
    key: &Tensor<F>,
    value: &Tensor<F>,
    grad_output: &Tensor<F>,
    stat: &Tensor<F>,
    d_row: &Tensor<F>,
    d_key: &mut Tensor<F>,
    d_value: &mut Tensor<F>,
    scale: f32,
    degree_factor: f32,
    #[comptime] tile: usize,
    #[comptime] head_dim: usize,
    #[comptime] softmax: bool,
    #[comptime] degree: u32,
    #[define(F)] _dtype: StorageType,
) {
    let seq = query.shape(1);
    let row = cube_index();
    if row >= query.shape(0) * seq {
        terminate!();
    }
    let (bh, j) = (row / seq, row % seq);
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;

    let mut probabilities = SharedMemory::<f32>::new(tile);
    let mut d_scores = SharedMemory::<f32>::new(tile);
    let mut acc_key = SharedMemory::<f32>::new(head_dim);
    let mut acc_value = SharedMemory::<f32>::new(head_dim);
    let mut d = unit;
    while d < head_dim {
        acc_key[d] = f32::new(0.0);
        acc_value[d] = f32::new(0.0);
        d += units;
    }
    let mut tile_start = j;
    while tile_start < seq {
        let mut count = seq - tile_start;
        if count > tile {
            count = tile;
        }
        let mut t = unit;
        while t < count {
            let i = tile_start + t;
            let score = row_dot(query, key, bh, i, j) * scale;
            let d_p = row_dot(grad_output, value, bh, i, j);
            let row_stat = f32::cast_from(stat[at3(stat, bh, i, 0)]);
            let row_d = f32::cast_from(d_row[at3(d_row, bh, i, 0)]);
            probabilities[t] = exact_probability(score, row_stat, softmax, degree);
            d_scores[t] =
                exact_score_gradient(score, d_p, row_d, row_stat, degree_factor, softmax, degree);
            t += units;
        }
        sync_cube();
        let mut d = unit;
        while d < head_dim {
            let (mut sum_key, mut sum_value) = (acc_key[d], acc_value[d]);
            for t in 0..count {
                let i = tile_start + t;
                sum_key += d_scores[t] * f32::cast_from(query[at3(query, bh, i, d)]);
                sum_value +=
                    probabilities[t] * f32::cast_from(grad_output[at3(grad_output, bh, i, d)]);
            }
            acc_key[d] = sum_key;
            acc_value[d] = sum_value;
            d += units;
        }
        sync_cube();
        tile_start += tile;
    }
    let mut d = unit;
    while d < head_dim {
        d_key[at3(d_key, bh, j, d)] = F::cast_from(acc_key[d] * scale);
        d_value[at3(d_value, bh, j, d)] = F::cast_from(acc_value[d]);
        d += units;
    }
}
