//! One attention module for every variant, chosen by [`AttentionConfig`].

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::{AttentionConfig, AttentionKind, SketchKind};
use crate::lean::{default_chunk_rows, CausalWeights};
use crate::ops::{lean_attention, polysketch_causal, LocalExact, PolysketchBackend};
use crate::sketch::{LearnedSketch, RandomSketch};

/// The attention kernel of one layer: maps per-head queries, keys and values (after RoPE) to
/// per-head outputs, causally.
///
/// Which normalisations and sketches exist depends on the variant:
/// - softmax: none;
/// - polynomial, and polysketch with a random sketch without local blocks: one LayerNorm
///   shared by queries and keys;
/// - any polysketch with exact local blocks: separate LayerNorms for queries and keys;
/// - random sketch: fixed projections drawn from `(sketch_seed, layer)`;
/// - learned sketch: a trained network applied to the raw queries and keys.
#[derive(Module, Debug)]
pub struct AttentionKernel<B: Backend> {
    #[module(skip)]
    pub(crate) config: AttentionConfig,
    pub(crate) norm: Option<LayerNorm<B>>,
    pub(crate) norm_query: Option<LayerNorm<B>>,
    pub(crate) norm_key: Option<LayerNorm<B>>,
    pub(crate) random: Option<RandomSketch<B>>,
    pub(crate) learned: Option<LearnedSketch<B>>,
}

impl<B: Backend> AttentionKernel<B> {
    /// Builds the kernel of layer `layer`. The config must have passed
    /// [`AttentionConfig::validate`].
    pub fn new(
        config: &AttentionConfig,
        head_dim: usize,
        layer: usize,
        device: &B::Device,
    ) -> Self {
        let norm = || Some(LayerNormConfig::new(head_dim).with_epsilon(1e-5).init(device));
        let polysketch = config.kind == AttentionKind::Polysketch;
        let local = polysketch && config.local_exact;
        let learned = polysketch && config.sketch == SketchKind::Learned;
        let shared_norm =
            config.kind == AttentionKind::Polynomial || (polysketch && !learned && !local);
        Self {
            config: config.clone(),
            norm: if shared_norm { norm() } else { None },
            norm_query: if local { norm() } else { None },
            norm_key: if local { norm() } else { None },
            random: (polysketch && !learned)
                .then(|| RandomSketch::new(config, head_dim, layer, device)),
            learned: learned.then(|| LearnedSketch::new(head_dim, config.sketch_dim, device)),
        }
    }

    /// The settings this kernel was built from.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// The fixed random sketch, if this variant has one.
    pub fn random_sketch(&self) -> Option<&RandomSketch<B>> {
        self.random.as_ref()
    }

    /// Sketch features of (possibly normalised) head vectors; the same map for queries and
    /// keys.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, sketch_dim]`
    ///
    /// # Panics
    /// If this kernel has no sketch.
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match (&self.random, &self.learned) {
            (Some(random), _) => random.forward(x),
            (_, Some(learned)) => learned.forward(x),
            _ => {
                panic!("AttentionKernel::features: {:?} attention has no sketch", self.config.kind)
            }
        }
    }
}

impl<B: PolysketchBackend> AttentionKernel<B> {
    /// Causal attention of every head.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]`
    /// - returns `[batch, heads, seq, head_dim]`
    pub fn forward(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let config = &self.config;
        let chunk = default_chunk_rows(query.dims()[2]);
        match config.kind {
            AttentionKind::Softmax => {
                lean_attention(query, key, value, CausalWeights::Softmax, chunk)
            }
            AttentionKind::Polynomial => {
                let norm = self.norm.as_ref().expect("polynomial attention has a shared norm");
                let weights = CausalWeights::Polynomial { degree: config.degree };
                lean_attention(norm.forward(query), norm.forward(key), value, weights, chunk)
            }
            AttentionKind::Polysketch => self.polysketch(query, key, value),
        }
    }

    fn polysketch(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (query_features, key_features, local) = self.sketch_inputs(query, key);
        polysketch_causal(query_features, key_features, value, local, self.config.block_size)
    }
}

impl<B: Backend> AttentionKernel<B> {
    /// What the polysketch block algorithm consumes: sketch features of queries and keys, and
    /// with exact local blocks the normalised queries and keys with the degree.
    ///
    /// # Shapes
    /// - `query`, `key`: `[batch, heads, seq, head_dim]` (after RoPE)
    /// - returns features `[batch, heads, seq, sketch_dim]` twice, and local queries and keys
    ///   `[batch, heads, seq, head_dim]`
    pub(crate) fn sketch_inputs(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Option<LocalExact<Tensor<B, 4>>>) {
        match (&self.norm_query, &self.norm_key) {
            (Some(norm_query), Some(norm_key)) => {
                let query_hat = norm_query.forward(query.clone());
                let key_hat = norm_key.forward(key.clone());
                // the learned sketch normalises inside; the random one sketches q̂ and k̂
                let (query_features, key_features) = if self.learned.is_some() {
                    (self.features(query), self.features(key))
                } else {
                    (self.features(query_hat.clone()), self.features(key_hat.clone()))
                };
                let degree = self.config.degree;
                let local = LocalExact { query: query_hat, key: key_hat, degree };
                (query_features, key_features, Some(local))
            }
            _ => {
                let (query, key) = match &self.norm {
                    Some(norm) => (norm.forward(query), norm.forward(key)),
                    None => (query, key),
                };
                (self.features(query), self.features(key), None)
            }
        }
    }
}
