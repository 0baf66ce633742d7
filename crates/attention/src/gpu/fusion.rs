//! [`PolysketchBackend`] for Burn's `Fusion` wrapper: each operation is registered on the fusion
//! stream as a custom operation that runs the inner backend's implementation (the kernels) when
//! the stream executes.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::tensor::ops::FloatTensor;
use burn::tensor::Shape;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::blockwise::PolysketchSaved;
use crate::lean::CausalWeights;
use crate::ops::{unpack_inputs, LocalExact, PolysketchBackend};

/// What a custom operation computes from its inputs on the inner backend.
type Body<B> = Arc<dyn Fn(Vec<FloatTensor<B>>) -> Vec<FloatTensor<B>> + Send + Sync>;

/// A custom operation on the fusion stream.
struct CustomOp<B: FusionBackend> {
    desc: CustomOpIr,
    body: Body<B>,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend> fmt::Debug for CustomOp<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomOp").field("desc", &self.desc).finish_non_exhaustive()
    }
}

impl<B: FusionBackend> Operation<B::FusionRuntime> for CustomOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self.desc.inputs.iter().map(|t| handles.get_float_tensor::<B>(t)).collect();
        let outputs = (self.body)(inputs);
        assert_eq!(outputs.len(), self.desc.outputs.len(), "{}: output count", self.desc.id);
        for (ir, tensor) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}

/// Registers `body` as a custom operation named `name` with float outputs of `shapes`, and
/// returns those outputs.
fn custom<B: FusionBackend>(
    name: &'static str,
    inputs: Vec<FloatTensor<Fusion<B>>>,
    shapes: Vec<Shape>,
    body: impl Fn(Vec<FloatTensor<B>>) -> Vec<FloatTensor<B>> + Send + Sync + 'static,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = inputs[0].client.clone();
    let dtype = inputs[0].dtype;
    let streams = OperationStreams::with_inputs(&inputs);
    let outputs: Vec<TensorIr> = shapes
        .into_iter()
        .map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = CustomOp::<B> { desc: desc.clone(), body: Arc::new(body), _backend: PhantomData };
    client.register(streams, OperationIr::Custom(desc), op)
}

fn shape<B: FusionBackend>(t: &FloatTensor<Fusion<B>>) -> Vec<usize> {
    t.shape.to_vec()
}

/// Features, values and (when present) local queries and keys as one input list.
fn pack_inputs<T>(
    query_features: T,
    key_features: T,
    value: T,
    local: Option<LocalExact<T>>,
) -> (Vec<T>, Option<u32>) {
    let mut inputs = vec![query_features, key_features, value];
    let degree = local.map(|l| {
        inputs.push(l.query);
        inputs.push(l.key);
        l.degree
    });
    (inputs, degree)
}

/// Splits an input list made by [`pack_inputs`] (with `extra` tensors after it).
fn split_inputs<T>(mut inputs: Vec<T>, degree: Option<u32>, extra: usize) -> (Vec<T>, Vec<T>) {
    let rest = inputs.split_off(if degree.is_some() { 5 } else { 3 });
    assert_eq!(rest.len(), extra, "custom operation input count");
    (inputs, rest)
}

impl<B: FusionBackend + PolysketchBackend> PolysketchBackend for Fusion<B> {
    fn polysketch_causal(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> FloatTensor<Self> {
        let out_shape = Shape::from(shape::<B>(&value));
        let (inputs, degree) = pack_inputs(query_features, key_features, value, local);
        let body = move |inputs: Vec<FloatTensor<B>>| {
            let (q, k, v, local) = unpack_inputs(inputs, degree);
            vec![B::polysketch_causal(q, k, v, local, block_size)]
        };
        custom::<B>("polysketch_causal", inputs, vec![out_shape], body).remove(0)
    }

    fn polysketch_forward(
        query_features: FloatTensor<Self>,
        key_features: FloatTensor<Self>,
        value: FloatTensor<Self>,
        local: Option<LocalExact<FloatTensor<Self>>>,
        block_size: usize,
    ) -> PolysketchSaved<FloatTensor<Self>> {
        let [batch, heads, seq, head_dim]: [usize; 4] =
            shape::<B>(&value).try_into().expect("4-d values");
        let sketch_dim = shape::<B>(&query_features)[3];
        let blocks = seq.div_ceil(block_size.max(1));
        let shapes = vec![
            Shape::new([batch, heads, seq, head_dim]),
            Shape::new([batch, heads, seq, 1]),
            Shape::new([batch, heads, blocks, sketch_dim * sketch_dim, head_dim + 1]),
        ];
        let (inputs, degree) = pack_inputs(query_features, key_features, value, local);
        let body = move |inputs: Vec<FloatTensor<B>>| {
            let (q, k, v, local) = unpack_inputs(inputs, degree);
            let saved = B::polysketch_forward(q, k, v, local, block_size);
            vec![saved.output, saved.denominator, saved.prefixes]
        };
        let mut outputs = custom::<B>("polysketch_forward", inputs, shapes, body).into_iter();
        let mut next = || outputs.next().expect("three outputs");
        PolysketchSaved { output: next(), denominator: next(), prefixes: next() }
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
        let (mut inputs, degree) = pack_inputs(query_features, key_features, value, local);
        let shapes = inputs.iter().map(|t| Shape::from(shape::<B>(t))).collect();
        inputs.extend([saved.output, saved.denominator, saved.prefixes, grad_output]);
        let body = move |inputs: Vec<FloatTensor<B>>| {
            let (inputs, rest) = split_inputs(inputs, degree, 4);
            let (q, k, v, local) = unpack_inputs(inputs, degree);
            let [output, denominator, prefixes, grad_output]: [FloatTensor<B>; 4] =
                rest.try_into().unwrap_or_else(|_| unreachable!("four saved tensors"));
            let saved = PolysketchSaved { output, denominator, prefixes };
            B::polysketch_backward(q, k, v, local, block_size, saved, grad_output)
        };
        custom::<B>("polysketch_backward", inputs, shapes, body)
    }

    fn lean_attention_with_stat(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        weights: CausalWeights,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let dims = shape::<B>(&query);
        let mut stat_dims = dims.clone();
        stat_dims[3] = 1;
        let shapes = vec![Shape::from(dims), Shape::from(stat_dims)];
        let body = move |inputs: Vec<FloatTensor<B>>| {
            let [q, k, v]: [FloatTensor<B>; 3] =
                inputs.try_into().unwrap_or_else(|_| unreachable!("three inputs"));
            let (out, stat) = B::lean_attention_with_stat(q, k, v, weights, chunk);
            vec![out, stat]
        };
        let mut outputs =
            custom::<B>("lean_attention", vec![query, key, value], shapes, body).into_iter();
        let out = outputs.next().expect("two outputs");
        (out, outputs.next().expect("two outputs"))
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
        let shapes = vec![Shape::from(shape::<B>(&query)); 3];
        let body = move |inputs: Vec<FloatTensor<B>>| {
            let [q, k, v, o, s, g]: [FloatTensor<B>; 6] =
                inputs.try_into().unwrap_or_else(|_| unreachable!("six inputs"));
            B::lean_attention_backward(q, k, v, o, s, g, weights, chunk).to_vec()
        };
        let inputs = vec![query, key, value, output, stat, grad_output];
        custom::<B>("lean_attention_backward", inputs, shapes, body)
            .try_into()
            .unwrap_or_else(|_| unreachable!("three gradients"))
    }
}
