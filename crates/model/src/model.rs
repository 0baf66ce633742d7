//! The GPT-style decoder of ALGORITHM.md §5.

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::tensor::activation::{gelu, log_softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use polysketch_attention::{
    AttentionConfig, AttentionKernel, DecodeCache, MixInputs, PolysketchBackend,
};

use crate::config::ModelDims;

mod recompute;

/// `(start, len)` of consecutive slices of at most `chunk` positions covering `0..seq`.
fn spans(seq: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..seq).step_by(chunk).map(|start| (start, chunk.min(seq - start))).collect()
}

fn layer_norm<B: Backend>(d_model: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d_model).with_epsilon(1e-5).init(device)
}

/// Sinusoidal position encodings `[positions, d_model]`: `sin(p·ω_i)` in even and `cos(p·ω_i)`
/// in odd columns, `ω_i = 10000^(-2i/d_model)`. Burn's own table refuses contexts above 10k.
fn sinusoids<B: Backend>(positions: usize, d_model: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut values = Vec::with_capacity(positions * d_model);
    for p in 0..positions {
        for c in 0..d_model {
            let omega = 10000f64.powf(-((c / 2 * 2) as f64) / d_model as f64);
            let angle = p as f64 * omega;
            values.push(if c % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    Tensor::from_data(TensorData::new(values, [positions, d_model]), device)
}

fn dense<B: Backend>(input: usize, output: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(input, output).with_bias(false).init(device)
}

/// Multi-head causal self-attention with rotary encodings and a configurable kernel.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    qkv: Linear<B>,
    out: Linear<B>,
    kernel: AttentionKernel<B>,
    dropout: Dropout,
    heads: usize,
}

impl<B: Backend> SelfAttention<B> {
    fn new(
        dims: &ModelDims,
        attention: &AttentionConfig,
        dropout: f64,
        layer: usize,
        device: &B::Device,
    ) -> Self {
        let head_dim = dims.head_dim();
        Self {
            qkv: dense(dims.d_model, 3 * dims.d_model, device),
            out: dense(dims.d_model, dims.d_model, device),
            kernel: AttentionKernel::new(attention, head_dim, layer, device),
            dropout: DropoutConfig::new(dropout).init(),
            heads: dims.heads,
        }
    }

    /// The attention kernel of this layer.
    pub fn kernel(&self) -> &AttentionKernel<B> {
        &self.kernel
    }
}

impl<B: PolysketchBackend> SelfAttention<B> {
    /// Per-head queries (rotated), keys (rotated) and values of `x`, starting at `position`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns three `[batch, heads, seq, head_dim]`
    fn project(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        position: usize,
    ) -> [Tensor<B, 4>; 3] {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.heads;
        let split = |t: Tensor<B, 3>| t.reshape([batch, seq, self.heads, head_dim]).swap_dims(1, 2);
        let qkv = self.qkv.forward(x);
        let q = rope.apply(split(qkv.clone().narrow(2, 0, d_model)), position);
        let k = rope.apply(split(qkv.clone().narrow(2, d_model, d_model)), position);
        [q, k, split(qkv.narrow(2, 2 * d_model, d_model))]
    }

    /// # Shapes
    /// - `heads`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, seq, d_model]`
    fn merge(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, n_heads, seq, head_dim] = heads.dims();
        let merged = heads.swap_dims(1, 2).reshape([batch, seq, n_heads * head_dim]);
        self.dropout.forward(self.out.forward(merged))
    }

    /// A whole prompt in parallel, returning the layer's decoding cache after it.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    fn prefill(&self, x: Tensor<B, 3>, rope: &RotaryEncoding<B>) -> (Tensor<B, 3>, DecodeCache<B>) {
        let [q, k, v] = self.project(x, rope, 0);
        let (out, cache) = self.kernel.prefill(q, k, v);
        (self.merge(out), cache)
    }

    /// One new token at `position`, with the layer's decoding cache.
    ///
    /// # Shapes
    /// - `x`: `[batch, 1, d_model]`
    /// - returns `[batch, 1, d_model]`
    fn forward_step(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        cache: &mut DecodeCache<B>,
        position: usize,
    ) -> Tensor<B, 3> {
        let [q, k, v] = self.project(x, rope, position);
        self.merge(self.kernel.forward_step(cache, position, q, k, v))
    }
}

/// Gated feed-forward `W_out (x1 ∘ gelu(x2))` with `[x1 | x2] = W_in x`.
#[derive(Module, Debug)]
pub struct GluFeedForward<B: Backend> {
    input: Linear<B>,
    output: Linear<B>,
    dropout: Dropout,
    hidden: usize,
}

impl<B: Backend> GluFeedForward<B> {
    fn new(dims: &ModelDims, dropout: f64, device: &B::Device) -> Self {
        let hidden = dims.glu_hidden();
        Self {
            input: dense(dims.d_model, 2 * hidden, device),
            output: dense(hidden, dims.d_model, device),
            dropout: DropoutConfig::new(dropout).init(),
            hidden,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let both = self.input.forward(x);
        let gate =
            both.clone().narrow(2, 0, self.hidden) * gelu(both.narrow(2, self.hidden, self.hidden));
        self.dropout.forward(self.output.forward(gate))
    }
}

/// One pre-LN decoder block.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    norm_attention: LayerNorm<B>,
    attention: SelfAttention<B>,
    norm_feed_forward: LayerNorm<B>,
    feed_forward: GluFeedForward<B>,
}

impl<B: Backend> DecoderBlock<B> {
    /// Whether neither dropout of the block is active.
    fn has_no_dropout(&self) -> bool {
        self.attention.dropout.prob == 0.0 && self.feed_forward.dropout.prob == 0.0
    }
}

impl<B: PolysketchBackend> DecoderBlock<B> {
    /// The token-wise first half of the block: normalisation, projections, rotary encodings
    /// and the attention kernel's preparation, for tokens starting at position `start`.
    ///
    /// # Shapes
    /// - `x`: `[batch, len, d_model]`
    /// - returns [`MixInputs`] over `len` tokens
    fn mix_inputs(&self, x: Tensor<B, 3>, rope: &RotaryEncoding<B>, start: usize) -> MixInputs<B> {
        let [q, k, v] = self.attention.project(self.norm_attention.forward(x), rope, start);
        self.attention.kernel.prepare(q, k, v)
    }

    /// The token-wise second half: output projection, both residual additions and the
    /// feed-forward network, from the block's input and the attention heads.
    ///
    /// # Shapes
    /// - `x`: `[batch, len, d_model]`
    /// - `heads`: `[batch, heads, len, head_dim]`
    /// - returns `[batch, len, d_model]`
    fn finish(&self, x: Tensor<B, 3>, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = x + self.attention.merge(heads);
        x.clone() + self.feed_forward.forward(self.norm_feed_forward.forward(x))
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    fn forward(&self, x: Tensor<B, 3>, rope: &RotaryEncoding<B>) -> Tensor<B, 3> {
        let heads = self.attention.kernel.mix(self.mix_inputs(x.clone(), rope, 0));
        self.finish(x, heads)
    }
}

/// GPT-style language model with tied embeddings.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    embedding: Embedding<B>,
    positions: Tensor<B, 2>,
    rope: RotaryEncoding<B>,
    blocks: Vec<DecoderBlock<B>>,
    norm: LayerNorm<B>,
    output_bias: Param<Tensor<B, 1>>,
    max_seq: usize,
}

impl<B: Backend> LanguageModel<B> {
    /// A freshly initialised model.
    pub fn new(
        dims: &ModelDims,
        attention: &AttentionConfig,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        let blocks = (0..dims.layers)
            .map(|layer| DecoderBlock {
                norm_attention: layer_norm(dims.d_model, device),
                attention: SelfAttention::new(dims, attention, dropout, layer, device),
                norm_feed_forward: layer_norm(dims.d_model, device),
                feed_forward: GluFeedForward::new(dims, dropout, device),
            })
            .collect();
        // N(0, 1/d_model) embeddings, scaled by sqrt(d_model) on input (as in the original
        // Transformer): token vectors then match the unit-size sinusoids they are added to,
        // and the tied logits start with unit variance
        let std = 1.0 / (dims.d_model as f64).sqrt();
        let embedding = EmbeddingConfig::new(dims.vocab, dims.d_model)
            .with_initializer(burn::nn::Initializer::Normal { mean: 0.0, std })
            .init(device);
        Self {
            embedding,
            positions: sinusoids(dims.max_seq, dims.d_model, device),
            rope: RotaryEncodingConfig::new(dims.max_seq, dims.head_dim()).init(device),
            blocks,
            norm: layer_norm(dims.d_model, device),
            output_bias: Param::from_tensor(Tensor::zeros([dims.vocab], device)),
            max_seq: dims.max_seq,
        }
    }

    /// Longest context the model was built for.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// The attention kernels, one per layer.
    pub fn kernels(&self) -> Vec<&AttentionKernel<B>> {
        self.blocks.iter().map(|b| b.attention.kernel()).collect()
    }
}

impl<B: PolysketchBackend> LanguageModel<B> {
    /// Next-token logits.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` with `seq ≤ max_seq`
    /// - returns `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        self.logits(self.hidden(tokens)).reshape([batch, seq, self.output_bias.dims()[0]])
    }

    /// Token embeddings scaled by `sqrt(d_model)` plus the encodings of positions
    /// `start..start + seq`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`
    /// - returns `[batch, seq, d_model]`
    fn embed(&self, tokens: Tensor<B, 2, Int>, start: usize) -> Tensor<B, 3> {
        let [_, seq] = tokens.dims();
        let d_model = self.embedding.weight.dims()[1];
        let positions = self.positions.clone().narrow(0, start, seq).unsqueeze_dim(0);
        self.embedding.forward(tokens) * (d_model as f64).sqrt() + positions
    }

    /// `LN(x) Eᵀ + bias`, with the embedding matrix tied.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch * seq, vocab]`
    fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, seq, d_model] = x.dims();
        let x = self.norm.forward(x).reshape([batch * seq, d_model]);
        let weight = self.embedding.weight.val();
        let vocab = weight.dims()[0];
        x.matmul(weight.transpose()) + self.output_bias.val().reshape([1, vocab])
    }

    /// Logits of the next token after one more token at `position`, updating one decoding
    /// cache per layer (start with [`LanguageModel::new_caches`] and position 0). Equal to the
    /// matching row of [`LanguageModel::forward`]; polysketch layers keep a state whose size
    /// does not depend on `position`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, 1]`
    /// - returns `[batch, vocab]`
    ///
    /// # Panics
    /// If `position ≥ max_seq` or `caches` does not hold one cache per layer.
    pub fn forward_step(
        &self,
        tokens: Tensor<B, 2, Int>,
        position: usize,
        caches: &mut [DecodeCache<B>],
    ) -> Tensor<B, 2> {
        assert!(position < self.max_seq, "forward_step: position {position} ≥ max_seq");
        assert_eq!(caches.len(), self.blocks.len(), "forward_step: one cache per layer");
        let mut x = self.embed(tokens, position);
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            let normed = block.norm_attention.forward(x.clone());
            x = x + block.attention.forward_step(normed, &self.rope, cache, position);
            x = x.clone() + block.feed_forward.forward(block.norm_feed_forward.forward(x));
        }
        self.logits(x)
    }

    /// Reads a whole prompt in one parallel pass: the logits of the token after it, and the
    /// decoding caches to continue with [`LanguageModel::forward_step`] at position `seq`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` with `1 ≤ seq ≤ max_seq`
    /// - returns `[batch, vocab]`
    pub fn prefill(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Vec<DecodeCache<B>>) {
        let [_, seq] = tokens.dims();
        assert!(
            (1..=self.max_seq).contains(&seq),
            "LanguageModel::prefill: seq {seq} outside 1..={}",
            self.max_seq
        );
        let mut x = self.embed(tokens, 0);
        let mut caches = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let normed = block.norm_attention.forward(x.clone());
            let (attention, cache) = block.attention.prefill(normed, &self.rope);
            caches.push(cache);
            x = x + attention;
            x = x.clone() + block.feed_forward.forward(block.norm_feed_forward.forward(x));
        }
        (self.logits(x.narrow(1, seq - 1, 1)), caches)
    }

    /// Empty decoding caches, one per layer.
    pub fn new_caches(&self) -> Vec<DecodeCache<B>> {
        self.blocks.iter().map(|_| DecodeCache::Empty).collect()
    }

    /// Hidden states after the last block, before the final normalisation.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` with `seq ≤ max_seq`
    /// - returns `[batch, seq, d_model]`
    fn hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let seq = tokens.dims()[1];
        assert!(seq <= self.max_seq, "LanguageModel: seq {seq} > max_seq {}", self.max_seq);
        let mut x = self.embed(tokens, 0);
        for block in &self.blocks {
            x = block.forward(x, &self.rope);
        }
        x
    }

    /// `(start, len)` slices of the positions such that one slice's logits, over `batch`
    /// sequences, hold at most 2²⁵ values (128 MiB in f32): logits of a long context never
    /// exist whole.
    fn logit_slices(&self, batch: usize, seq: usize) -> Vec<(usize, usize)> {
        let vocab = self.output_bias.dims()[0];
        spans(seq, ((1usize << 25) / (batch * vocab).max(1)).max(1))
    }

    /// Cross-entropy of the next-token predictions made from `hidden`.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, len, d_model]`; `targets`: `[batch, len]`
    /// - returns `[batch, len]`
    fn losses_from_hidden(&self, hidden: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, len] = targets.dims();
        let log_probs = log_softmax(self.logits(hidden), 1);
        log_probs.gather(1, targets.reshape([batch * len, 1])).reshape([batch, len]).neg()
    }

    /// Cross-entropy of every next-token prediction, in nats.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    /// - returns `[batch, seq]`
    pub fn token_losses(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = inputs.dims();
        let hidden = self.hidden(inputs);
        let slices = self.logit_slices(batch, seq).into_iter().map(|(start, len)| {
            let targets = targets.clone().narrow(1, start, len);
            self.losses_from_hidden(hidden.clone().narrow(1, start, len), targets)
        });
        Tensor::cat(slices.collect(), 1)
    }

    /// Cross-entropy of every next-token prediction, in nats, and whether the most likely
    /// token is the target (1) or not (0).
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    /// - returns two `[batch, seq]`
    pub fn token_losses_and_hits(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [batch, seq] = inputs.dims();
        let hidden = self.hidden(inputs);
        let (mut losses, mut hits) = (Vec::new(), Vec::new());
        for (start, len) in self.logit_slices(batch, seq) {
            let hidden = hidden.clone().narrow(1, start, len);
            let targets = targets.clone().narrow(1, start, len);
            let best = self.logits(hidden.clone()).argmax(1).reshape([batch, len]);
            hits.push(best.equal(targets.clone()).float());
            losses.push(self.losses_from_hidden(hidden, targets));
        }
        (Tensor::cat(losses, 1), Tensor::cat(hits, 1))
    }

    /// Mean cross-entropy over all tokens, in nats.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    /// - returns `[1]`
    pub fn loss(&self, inputs: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        self.token_losses(inputs, targets).mean()
    }

    /// Cross-entropy over the weighted targets, `Σ w·loss / Σ w`, in nats; the plain mean
    /// ([`LanguageModel::loss`]) without weights.
    ///
    /// # Shapes
    /// - `inputs`, `targets`, `weights`: `[batch, seq]`
    /// - returns `[1]`
    pub fn weighted_loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        weights: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 1> {
        match weights {
            None => self.loss(inputs, targets),
            Some(weights) => {
                let total = weights.clone().sum();
                (self.token_losses(inputs, targets) * weights).sum() / total
            }
        }
    }
}
