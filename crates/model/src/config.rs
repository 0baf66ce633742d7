//! Model settings and the named size presets.

use polysketch_attention::{AttentionConfig, ConfigError as AttentionConfigError};
use serde::{Deserialize, Serialize};

/// A named model size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 4 layers, width 128, 4 heads of 32: trains on a laptop CPU in minutes.
    Tiny,
    /// GPT-2 small: 12 layers, width 768, 12 heads of 64.
    Small,
    /// GPT-2 medium: 24 layers, width 1024, 16 heads of 64.
    Medium,
    /// GPT-2 large: 36 layers, width 1280, 20 heads of 64.
    Large,
}

impl Preset {
    /// `(layers, d_model, heads)` of the preset.
    pub fn sizes(self) -> (usize, usize, usize) {
        match self {
            Preset::Tiny => (4, 128, 4),
            Preset::Small => (12, 768, 12),
            Preset::Medium => (24, 1024, 16),
            Preset::Large => (36, 1280, 20),
        }
    }
}

/// The `[model]` table of a run config. Sizes left out come from the preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Size preset.
    pub preset: Preset,
    /// Decoder blocks; the preset's when absent.
    pub layers: Option<usize>,
    /// Model width; the preset's when absent.
    pub d_model: Option<usize>,
    /// Attention heads; the preset's when absent.
    pub heads: Option<usize>,
    /// Dropout after attention and feed-forward blocks.
    pub dropout: f64,
    /// The attention kernel.
    pub attention: AttentionConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Tiny,
            layers: None,
            d_model: None,
            heads: None,
            dropout: 0.0,
            attention: AttentionConfig::default(),
        }
    }
}

/// Fully resolved sizes of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Decoder blocks.
    pub layers: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Tokenizer vocabulary.
    pub vocab: usize,
    /// Longest context the position encodings cover.
    pub max_seq: usize,
}

impl ModelDims {
    /// Features per head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }

    /// Hidden width of the GLU feed-forward: `8·d_model/3` rounded down to a multiple of 8.
    pub fn glu_hidden(&self) -> usize {
        (8 * self.d_model / 3) / 8 * 8
    }
}

/// An impossible model setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelConfigError {
    /// A size that cannot work; the message says what to use.
    #[error("model.{key}: {message}")]
    Invalid {
        /// The key under `model`.
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// An invalid attention setting.
    #[error(transparent)]
    Attention(#[from] AttentionConfigError),
}

impl ModelConfig {
    /// Resolves the preset and checks every size, for a vocabulary and context length.
    pub fn resolve(&self, vocab: usize, max_seq: usize) -> Result<ModelDims, ModelConfigError> {
        let (layers, d_model, heads) = self.preset.sizes();
        let dims = ModelDims {
            layers: self.layers.unwrap_or(layers),
            d_model: self.d_model.unwrap_or(d_model),
            heads: self.heads.unwrap_or(heads),
            vocab,
            max_seq,
        };
        let invalid = |key, message: String| Err(ModelConfigError::Invalid { key, message });
        for (key, value) in
            [("layers", dims.layers), ("d_model", dims.d_model), ("heads", dims.heads)]
        {
            if value == 0 {
                return invalid(key, format!("must be at least 1, got {value}"));
            }
        }
        if !dims.d_model.is_multiple_of(dims.heads) {
            return invalid(
                "heads",
                format!(
                    "{} heads do not divide d_model = {}; pick a head count that divides it",
                    dims.heads, dims.d_model
                ),
            );
        }
        if !dims.head_dim().is_multiple_of(2) {
            return invalid(
                "heads",
                format!(
                    "head_dim = d_model / heads = {} is odd, but rotary encodings need it even",
                    dims.head_dim()
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid("dropout", format!("must be in [0, 1), got {}", self.dropout));
        }
        self.attention.validate(dims.head_dim(), max_seq)?;
        Ok(dims)
    }
}
