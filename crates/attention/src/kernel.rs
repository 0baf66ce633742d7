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
}

impl<B: PolysketchBackend> AttentionKernel<B> {
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

/// What the sequence-mixing half of an attention kernel reads: everything it needs, computed
/// from each token's query, key and value alone by [`AttentionKernel::prepare`]. Splitting a
/// kernel there lets a training step recompute the token-wise half in slices of the sequence
/// while only the mixing half ([`AttentionKernel::mix`]) sees the whole sequence at once.
#[derive(Debug, Clone)]
pub struct MixInputs<B: Backend> {
    /// Queries as the mixing reads them: raw (softmax), normalised (polynomial) or sketch
    /// features (polysketch), `[batch, heads, seq, head_dim or sketch_dim]`.
    pub query: Tensor<B, 4>,
    /// Keys in the same form as `query`.
    pub key: Tensor<B, 4>,
    /// Values, `[batch, heads, seq, head_dim]`.
    pub value: Tensor<B, 4>,
    /// Normalised queries and keys of the exact local blocks, `[batch, heads, seq, head_dim]`
    /// each.
    pub local: Option<[Tensor<B, 4>; 2]>,
}

impl<B: Backend> MixInputs<B> {
    /// The same inputs with every tensor converted by `f` (to another backend, a slice of the
    /// sequence, a gradient...), in the order query, key, value, local query, local key.
    pub fn map<C: Backend>(self, mut f: impl FnMut(Tensor<B, 4>) -> Tensor<C, 4>) -> MixInputs<C> {
        MixInputs {
            query: f(self.query),
            key: f(self.key),
            value: f(self.value),
            local: self.local.map(|[q, k]| [f(q), f(k)]),
        }
    }

    /// The tensors in the order of [`MixInputs::map`]: three, or five with local blocks.
    pub fn into_tensors(self) -> Vec<Tensor<B, 4>> {
        let mut all = vec![self.query, self.key, self.value];
        all.extend(self.local.into_iter().flatten());
        all
    }

    /// The inverse of [`MixInputs::into_tensors`].
    ///
    /// # Panics
    /// If there are not three or five tensors.
    pub fn from_tensors(tensors: Vec<Tensor<B, 4>>) -> Self {
        let count = tensors.len();
        assert!(count == 3 || count == 5, "MixInputs: 3 or 5 tensors, got {count}");
        let mut all = tensors.into_iter();
        let mut next = || all.next().expect("counted above");
        let (query, key, value) = (next(), next(), next());
        let local = (count == 5).then(|| [next(), next()]);
        Self { query, key, value, local }
    }

    /// Pieces of one sequence, in order, joined along the sequence.
    ///
    /// # Shapes
    /// - every piece's tensors: `[batch, heads, piece_len, _]`
    /// - returns `[batch, heads, Σ piece_len, _]`
    ///
    /// # Panics
    /// If `pieces` is empty or mixes inputs with and without local blocks.
    pub fn cat(pieces: Vec<Self>) -> Self {
        let mut columns: Vec<Vec<Tensor<B, 4>>> = Vec::new();
        for piece in pieces {
            let tensors = piece.into_tensors();
            if columns.is_empty() {
                columns = tensors.iter().map(|_| Vec::new()).collect();
            }
            assert_eq!(tensors.len(), columns.len(), "MixInputs::cat: pieces differ");
            for (column, t) in columns.iter_mut().zip(tensors) {
                column.push(t);
            }
        }
        assert!(!columns.is_empty(), "MixInputs::cat: no pieces");
        Self::from_tensors(columns.into_iter().map(|c| Tensor::cat(c, 2)).collect())
    }
}

impl<B: PolysketchBackend> AttentionKernel<B> {
    /// Causal attention of every head: [`AttentionKernel::mix`] of
    /// [`AttentionKernel::prepare`].
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
        self.mix(self.prepare(query, key, value))
    }

    /// The sequence-mixing half: causal attention over the prepared inputs, through the
    /// backend's memory-lean operations (no parameters are read here).
    ///
    /// # Shapes
    /// - `inputs`: as [`MixInputs`], over `seq` tokens
    /// - returns `[batch, heads, seq, head_dim]`
    pub fn mix(&self, inputs: MixInputs<B>) -> Tensor<B, 4> {
        let config = &self.config;
        let chunk = default_chunk_rows(inputs.query.dims()[2]);
        let MixInputs { query, key, value, local } = inputs;
        match config.kind {
            AttentionKind::Softmax => {
                lean_attention(query, key, value, CausalWeights::Softmax, chunk)
            }
            AttentionKind::Polynomial => {
                let weights = CausalWeights::Polynomial { degree: config.degree };
                lean_attention(query, key, value, weights, chunk)
            }
            AttentionKind::Polysketch => {
                let degree = config.degree;
                let local = local.map(|[query, key]| LocalExact { query, key, degree });
                polysketch_causal(query, key, value, local, config.block_size)
            }
        }
    }
}

impl<B: PolysketchBackend> AttentionKernel<B> {
    /// The token-wise half: normalisations and sketches of each token's query and key, with
    /// nothing mixed across tokens.
    ///
    /// # Shapes
    /// - `query`, `key`, `value`: `[batch, heads, seq, head_dim]` (after RoPE)
    /// - returns the [`MixInputs`] of those `seq` tokens
    pub fn prepare(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> MixInputs<B> {
        match self.config.kind {
            AttentionKind::Softmax => MixInputs { query, key, value, local: None },
            AttentionKind::Polynomial => {
                let norm = self.norm.as_ref().expect("polynomial attention has a shared norm");
                MixInputs { query: norm.forward(query), key: norm.forward(key), value, local: None }
            }
            AttentionKind::Polysketch => {
                let (query, key, local) = self.sketch_inputs(query, key);
                let local = local.map(|l| [l.query, l.key]);
                MixInputs { query, key, value, local }
            }
        }
    }
}

impl<B: PolysketchBackend> AttentionKernel<B> {
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
