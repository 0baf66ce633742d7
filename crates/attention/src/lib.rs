//! Attention kernels for PolySketchFormer training with Burn.
//!
//! Every variant of the paper's attention sits behind one module, [`AttentionKernel`], chosen by
//! an [`AttentionConfig`]: causal softmax, exact polynomial attention of any even degree, and
//! polysketch attention with a random (Gaussian or Hadamard) or learned sketch, each with or
//! without exact local blocks. The causal block algorithm that makes polysketch linear in the
//! sequence length is a backend operation, [`PolysketchBackend::polysketch_causal`], whose
//! default body is composed from Burn tensor ops so it runs and differentiates on every backend;
//! fused kernels can override it per backend.
//!
//! # Shapes
//!
//! One vocabulary is used across the whole project:
//!
//! | name         | meaning                                              |
//! |--------------|------------------------------------------------------|
//! | `batch`      | sequences in a batch                                 |
//! | `seq`        | tokens per sequence (context length)                 |
//! | `heads`      | attention heads                                      |
//! | `head_dim`   | features per head                                    |
//! | `d_model`    | model width, `heads * head_dim`                      |
//! | `vocab`      | tokenizer vocabulary size                            |
//! | `sketch_dim` | sketch size `r`: features per token after the sketch |
//! | `block_size` | block size `b` of the causal block algorithm         |
//! | `degree`     | degree `p` of the polynomial kernel                  |

mod blockwise;
mod config;
mod cpu;
mod decode;
#[cfg(feature = "kernels")]
pub mod gpu;
mod kernel;
pub mod lean;
mod ops;
pub mod reference;
mod sketch;
pub mod sketch_level;

pub use blockwise::PolysketchSaved;
pub use config::{AttentionConfig, AttentionKind, ConfigError, SketchKind, SketchScaling};
pub use decode::DecodeCache;
pub use kernel::{AttentionKernel, MixInputs};
pub use lean::CausalWeights;
pub use ops::{
    lean_attention, polysketch_causal, polysketch_causal_composed, LocalExact, PolysketchBackend,
};
pub use sketch::{LearnedSketch, RandomSketch};
