//! Training gradients with every decoder block recomputed during the backward pass, so that
//! activation memory stays a few tensors of `seq × d_model` per layer at any context length.
//!
//! The forward pass runs without autodiff and keeps only each block's input. The backward pass
//! then visits the blocks from the last to the first and differentiates each one on its own,
//! splitting it where tokens meet:
//! - the token-wise halves (normalisations, projections, sketch networks, feed-forward, the
//!   logits and the loss) are rebuilt with autodiff one slice of the sequence at a time, so
//!   their intermediate tensors never exist for the whole sequence at once;
//! - the sequence-mixing half ([`AttentionKernel::mix`]) is differentiated over the whole
//!   sequence through the backend's attention operations, whose backward passes keep only their
//!   inputs and O(n/b · r²) block states (polysketch) or per-row statistics (exact attention).
//!
//! Each piece is differentiated by back-propagating `Σ piece_output · upstream_gradient`; the
//! parameter gradients of all pieces are summed in a [`GradientsAccumulator`]. The result
//! equals the gradient of the ordinary backward pass up to floating-point rounding, at the
//! price of a second forward pass (and a third of the token-wise halves of the attention).
//!
//! [`AttentionKernel::mix`]: polysketch_attention::AttentionKernel::mix

use burn::module::AutodiffModule;
use burn::nn::RotaryEncoding;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor};
use polysketch_attention::{MixInputs, PolysketchBackend};

use super::{spans, DecoderBlock, LanguageModel};

/// An autodiff leaf holding `x`, whose gradient the next backward pass returns.
fn leaf<B: AutodiffBackend, const D: usize>(x: Tensor<B::InnerBackend, D>) -> Tensor<B, D> {
    Tensor::from_inner(x).require_grad()
}

/// `Σ output · upstream`, whose gradient with respect to anything `output` depends on is the
/// vector-Jacobian product of `upstream` with it.
///
/// # Shapes
/// - `output`, `upstream`: the same shape
/// - returns `[1]`
fn pullback<B: AutodiffBackend, const D: usize>(
    output: Tensor<B, D>,
    upstream: Tensor<B::InnerBackend, D>,
) -> Tensor<B, 1> {
    (output * Tensor::from_inner(upstream)).sum()
}

impl<B: PolysketchBackend> DecoderBlock<B> {
    /// [`DecoderBlock::forward`] with the token-wise halves computed one span at a time.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    fn forward_in_slices(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        spans: &[(usize, usize)],
    ) -> Tensor<B, 3> {
        let slice = |(start, len): (usize, usize)| x.clone().narrow(1, start, len);
        let pieces = spans.iter().map(|&span| self.mix_inputs(slice(span), rope, span.0));
        let heads = self.attention.kernel().mix(MixInputs::cat(pieces.collect()));
        let out = spans
            .iter()
            .map(|&span| self.finish(slice(span), heads.clone().narrow(2, span.0, span.1)));
        Tensor::cat(out.collect(), 1)
    }
}

impl<B> LanguageModel<B>
where
    B: AutodiffBackend + PolysketchBackend,
    B::InnerBackend: PolysketchBackend,
{
    /// The gradient of `scale ×` [`LanguageModel::weighted_loss`], added into `accumulator`:
    /// with every block recomputed ([`LanguageModel::recomputed_gradients`], `chunk` positions
    /// at a time) when `recompute_chunk` is given, else by the ordinary backward pass. Returns
    /// `scale ×` the loss.
    ///
    /// # Shapes
    /// - `inputs`, `targets`, `weights`: `[batch, seq]`
    pub fn accumulate_gradients(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        weights: Option<Tensor<B, 2>>,
        scale: f64,
        recompute_chunk: Option<usize>,
        accumulator: &mut GradientsAccumulator<Self>,
    ) -> f64 {
        if let Some(chunk) = recompute_chunk {
            return self.recomputed_gradients(inputs, targets, weights, scale, chunk, accumulator);
        }
        let loss = self.weighted_loss(inputs, targets, weights) * scale;
        let value = loss.clone().into_scalar().elem::<f64>();
        accumulator.accumulate(self, GradientsParams::from_grads(loss.backward(), self));
        value
    }

    /// The gradient of `scale ×` the mean cross-entropy of `targets` after `inputs` (weighted
    /// by `weights` when given, as `Σ w·loss / Σ w`), added into `accumulator`, with every
    /// block recomputed during the backward pass (see the module documentation). Token-wise
    /// work is done `chunk` positions at a time. Returns `scale ×` the loss.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    /// - `weights`: `[batch, seq]`
    ///
    /// # Panics
    /// If `chunk` is 0 or the model has dropout: a recomputed block would draw new dropout
    /// masks, so its gradient would not be that of the forward pass.
    pub fn recomputed_gradients(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        weights: Option<Tensor<B, 2>>,
        scale: f64,
        chunk: usize,
        accumulator: &mut GradientsAccumulator<Self>,
    ) -> f64 {
        assert!(chunk > 0, "recomputed_gradients: chunk must be positive");
        assert!(
            self.blocks.iter().all(DecoderBlock::has_no_dropout),
            "recomputed_gradients: the model has dropout; recomputation needs dropout = 0"
        );
        let [batch, seq] = inputs.dims();
        let spans = spans(seq, chunk);
        let inner = self.valid();

        // forward without a graph, keeping every block's input
        let mut block_inputs = Vec::with_capacity(self.blocks.len());
        let mut x = inner.embed(inputs.clone().inner(), 0);
        for block in &inner.blocks {
            let next = block.forward_in_slices(x.clone(), &inner.rope, &spans);
            block_inputs.push(x);
            x = next;
        }

        // the loss, a slice at a time: logits never exist for the whole sequence
        let denominator = match &weights {
            Some(w) => w.clone().sum().into_scalar().elem::<f64>(),
            None => (batch * seq) as f64,
        };
        let mut loss = 0.0;
        let mut grad_slices = Vec::with_capacity(spans.len());
        for &(start, len) in &spans {
            let hidden = leaf::<B, 3>(x.clone().narrow(1, start, len));
            let targets = targets.clone().narrow(1, start, len);
            let picked = self.losses_from_hidden(hidden.clone(), targets);
            let total = match &weights {
                Some(w) => (picked * w.clone().narrow(1, start, len)).sum(),
                None => picked.sum(),
            };
            let slice_loss = total * (scale / denominator);
            loss += slice_loss.clone().into_scalar().elem::<f64>();
            let mut grads = slice_loss.backward();
            grad_slices.push(hidden.grad(&grads).expect("the loss depends on the hidden states"));
            accumulator.accumulate(self, GradientsParams::from_module(&mut grads, self));
        }
        drop(x);
        let mut grad = Tensor::cat(grad_slices, 1);

        for ((block, inner_block), x) in
            self.blocks.iter().zip(&inner.blocks).zip(block_inputs).rev()
        {
            grad =
                self.block_backward(block, inner_block, &inner.rope, x, grad, &spans, accumulator);
        }

        for &(start, len) in &spans {
            let embedded = self.embed(inputs.clone().narrow(1, start, len), start);
            let mut grads = pullback(embedded, grad.clone().narrow(1, start, len)).backward();
            accumulator.accumulate(self, GradientsParams::from_module(&mut grads, self));
        }
        loss
    }

    /// Adds the parameter gradients of one block to `accumulator` and returns the gradient
    /// with respect to its input, given the gradient `grad` with respect to its output.
    ///
    /// # Shapes
    /// - `x`, `grad`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        block: &DecoderBlock<B>,
        inner_block: &DecoderBlock<B::InnerBackend>,
        inner_rope: &RotaryEncoding<B::InnerBackend>,
        x: Tensor<B::InnerBackend, 3>,
        grad: Tensor<B::InnerBackend, 3>,
        spans: &[(usize, usize)],
        accumulator: &mut GradientsAccumulator<Self>,
    ) -> Tensor<B::InnerBackend, 3> {
        let slice = |t: &Tensor<B::InnerBackend, 3>, (start, len): (usize, usize)| {
            t.clone().narrow(1, start, len)
        };
        let kernel = block.attention.kernel();

        // the mixing's inputs without a graph, then the mixing with one: its backward keeps
        // only its inputs and its own compact statistics
        let pieces = spans
            .iter()
            .map(|&(start, len)| inner_block.mix_inputs(slice(&x, (start, len)), inner_rope, start))
            .collect();
        let mix_leaves = MixInputs::cat(pieces).map(leaf::<B, 4>);
        let heads = kernel.mix(mix_leaves.clone());
        let heads_inner = heads.clone().inner();

        // second half, a slice at a time
        let mut grad_x = Vec::with_capacity(spans.len());
        let mut grad_heads = Vec::with_capacity(spans.len());
        for &span in spans {
            let x_leaf = leaf::<B, 3>(slice(&x, span));
            let heads_leaf = leaf::<B, 4>(heads_inner.clone().narrow(2, span.0, span.1));
            let out = block.finish(x_leaf.clone(), heads_leaf.clone());
            let mut grads = pullback(out, slice(&grad, span)).backward();
            grad_x.push(x_leaf.grad(&grads).expect("the residual path reads x"));
            grad_heads.push(heads_leaf.grad(&grads).expect("the output projection reads heads"));
            accumulator.accumulate(self, GradientsParams::from_module(&mut grads, self));
        }
        drop(heads_inner);

        // the mixing, over the whole sequence
        let grads = pullback(heads, Tensor::cat(grad_heads, 2)).backward();
        let grad_mix = mix_leaves.map(|t| {
            let grad = t.grad(&grads);
            grad.unwrap_or_else(|| t.inner().zeros_like())
        });
        drop(grads);

        // first half, a slice at a time
        let upstream = grad_mix.into_tensors();
        for (i, &(start, len)) in spans.iter().enumerate() {
            let x_leaf = leaf::<B, 3>(slice(&x, (start, len)));
            let prepared = block.mix_inputs(x_leaf.clone(), &self.rope, start).into_tensors();
            let total = prepared
                .into_iter()
                .zip(&upstream)
                .map(|(t, g)| pullback(t, g.clone().narrow(2, start, len)))
                .reduce(|a, b| a + b)
                .expect("at least queries, keys and values");
            let mut grads = total.backward();
            let from_attention = x_leaf.grad(&grads).expect("the attention reads x");
            grad_x[i] = grad_x[i].clone() + from_attention;
            accumulator.accumulate(self, GradientsParams::from_module(&mut grads, self));
        }
        Tensor::cat(grad_x, 1)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::spans;

    #[test]
    fn spans_cover_the_sequence_once() {
        assert_eq!(spans(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(spans(8, 8), vec![(0, 8)]);
        assert_eq!(spans(3, 8), vec![(0, 3)]);
    }
}
