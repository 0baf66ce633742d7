//! GPT-style decoder for PolySketchFormer experiments.
//!
//! Pre-LN blocks of rotary multi-head attention (any kernel of `polysketch-attention`) and a
//! GLU feed-forward, sinusoidal absolute positions, and logits tied to the token embedding plus
//! a learned per-token bias (ALGORITHM.md §5). Shapes follow the vocabulary of
//! `polysketch_attention`.

mod config;
mod model;

pub use config::{ModelConfig, ModelConfigError, ModelDims, Preset};
pub use model::{DecoderBlock, GluFeedForward, LanguageModel, SelfAttention};
