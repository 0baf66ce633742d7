//! The GPT-style decoder of ALGORITHM.md §5.

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig, PositionalEncoding, PositionalEncodingConfig, RotaryEncoding,
    RotaryEncodingConfig,
};
use burn::tensor::activation::{gelu, log_softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use polysketch_attention::{AttentionConfig, AttentionKernel, PolysketchBackend};

use crate::config::ModelDims;

fn layer_norm<B: Backend>(d_model: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d_model).with_epsilon(1e-5).init(device)
}

fn dense<B: Backend>(input: usize, output: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(input, output).with_bias(false).init(device)
}

/// Multi-head causal self-attention with rotary encodings and a configurable kernel.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    qkv: Linear<B>,
    out: Linear<B>,
    rope: RotaryEncoding<B>,
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
            rope: RotaryEncodingConfig::new(dims.max_seq, head_dim).init(device),
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
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - returns `[batch, seq, d_model]`
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.heads;
        let split = |t: Tensor<B, 3>| t.reshape([batch, seq, self.heads, head_dim]).swap_dims(1, 2);
        let qkv = self.qkv.forward(x);
        let q = self.rope.forward(split(qkv.clone().narrow(2, 0, d_model)));
        let k = self.rope.forward(split(qkv.clone().narrow(2, d_model, d_model)));
        let v = split(qkv.narrow(2, 2 * d_model, d_model));
        let heads = self.kernel.forward(q, k, v);
        let merged = heads.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.dropout.forward(self.out.forward(merged))
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

/// GPT-style language model with tied embeddings.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    embedding: Embedding<B>,
    positions: PositionalEncoding<B>,
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
            positions: PositionalEncodingConfig::new(dims.d_model)
                .with_max_sequence_size(dims.max_seq)
                .init(device),
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
        assert!(
            seq <= self.max_seq,
            "LanguageModel::forward: seq {seq} > max_seq {}",
            self.max_seq
        );
        let d_model = self.embedding.weight.dims()[1];
        let tokens = self.embedding.forward(tokens) * (d_model as f64).sqrt();
        let mut x = self.positions.forward(tokens);
        for block in &self.blocks {
            x = x.clone() + block.attention.forward(block.norm_attention.forward(x));
            x = x.clone() + block.feed_forward.forward(block.norm_feed_forward.forward(x));
        }
        let x = self.norm.forward(x);

        // logits = x Eᵀ + bias, with the embedding matrix tied
        let weight = self.embedding.weight.val();
        let [vocab, d_model] = weight.dims();
        let logits = x.reshape([batch * seq, d_model]).matmul(weight.transpose());
        let logits = logits + self.output_bias.val().reshape([1, vocab]);
        logits.reshape([batch, seq, vocab])
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
        let log_probs = log_softmax(self.forward(inputs), 2);
        let picked = log_probs.gather(2, targets.reshape([batch, seq, 1]));
        picked.reshape([batch, seq]).neg()
    }

    /// Mean cross-entropy over all tokens, in nats.
    ///
    /// # Shapes
    /// - `inputs`, `targets`: `[batch, seq]`
    /// - returns `[1]`
    pub fn loss(&self, inputs: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        self.token_losses(inputs, targets).mean()
    }
}
