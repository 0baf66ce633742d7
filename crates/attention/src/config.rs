//! Typed, validated configuration of the attention kernel.

use serde::{Deserialize, Serialize};

/// Which attention the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Causal scaled dot-product softmax attention, scale `1/sqrt(head_dim)`.
    Softmax,
    /// Exact polynomial attention `(q̂·k̂)^degree` with a `+1` denominator, quadratic in `seq`.
    Polynomial,
    /// Polynomial attention approximated by a polynomial sketch, linear in `seq`.
    Polysketch,
}

/// How polysketch attention maps a head vector to `sketch_dim` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SketchKind {
    /// Fixed Gaussian projections, `N(0, 1)` entries.
    Gaussian,
    /// Fixed columns of a ±1 Hadamard matrix with random signs (`head_dim` a power of two).
    Hadamard,
    /// Small trained networks, one per layer, shared by queries and keys.
    Learned,
}

/// Scaling of the random sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SketchScaling {
    /// Each projection divided by `sqrt(sketch_dim)`, as the authors' code does: the sketched
    /// weight approximates `(q̂·k̂)^4 / sketch_dim²`.
    Code,
    /// The paper's unbiased scaling: the sketched weight approximates `(q̂·k̂)^4`.
    Paper,
}

/// Attention settings: the `[model.attention]` table of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionConfig {
    /// Which attention to use.
    pub kind: AttentionKind,
    /// Degree `p` of the polynomial kernel; even, at least 2. Polysketch needs a power of two
    /// of at least 4 (the sketch approximates degree `p/2`, then squares).
    pub degree: u32,
    /// Sketch type for `kind = "polysketch"`.
    pub sketch: SketchKind,
    /// Sketch size `r`.
    pub sketch_dim: usize,
    /// Block size `b` of the causal block algorithm.
    pub block_size: usize,
    /// Use exact polynomial weights inside the diagonal blocks.
    pub local_exact: bool,
    /// Seed of the random sketch; layer `l` draws its projections from `(seed, l)`.
    pub sketch_seed: u64,
    /// Scaling of the random sketch.
    pub scaling: SketchScaling,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self {
            kind: AttentionKind::Polysketch,
            degree: 4,
            sketch: SketchKind::Learned,
            sketch_dim: 32,
            block_size: 256,
            local_exact: true,
            sketch_seed: 0,
            scaling: SketchScaling::Code,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// An invalid attention setting; the message names the key and what to use.
    #[error("model.attention.{key}: {message}")]
    Invalid {
        /// The key under `model.attention`.
        key: &'static str,
        /// What is wrong and what to use instead.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl AttentionConfig {
    /// Checks the settings against a head size and context length.
    pub fn validate(&self, head_dim: usize, seq: usize) -> Result<(), ConfigError> {
        if self.kind == AttentionKind::Softmax {
            return Ok(());
        }
        if self.degree < 2 || !self.degree.is_multiple_of(2) {
            return Err(invalid(
                "degree",
                format!(
                    "degree {} is not allowed: polynomial attention needs an even degree (2, 4, \
                     8, ...) so that every weight is non-negative; use 4",
                    self.degree
                ),
            ));
        }
        if self.kind == AttentionKind::Polynomial {
            return Ok(());
        }
        if self.degree < 4 || !self.degree.is_power_of_two() {
            return Err(invalid(
                "degree",
                format!(
                    "polysketch needs a power-of-two degree of at least 4 (4, 8, 16), got {}",
                    self.degree
                ),
            ));
        }
        if self.sketch_dim == 0 {
            return Err(invalid("sketch_dim", "must be at least 1; typical values are 32 or 64"));
        }
        if self.block_size == 0 {
            return Err(invalid("block_size", "must be at least 1; typical values are 64 to 1024"));
        }
        if self.block_size > seq.max(1) {
            return Err(invalid(
                "block_size",
                format!(
                    "block size {} is larger than the context length {seq}; use at most {seq}",
                    self.block_size
                ),
            ));
        }
        if self.sketch == SketchKind::Hadamard && !head_dim.is_power_of_two() {
            return Err(invalid(
                "sketch",
                format!(
                    "the Hadamard sketch needs head_dim to be a power of two, got {head_dim}; \
                     use sketch = \"gaussian\""
                ),
            ));
        }
        Ok(())
    }

    /// Number of product levels of the random sketch: `log2(degree) - 1`.
    pub fn sketch_levels(&self) -> usize {
        (self.degree.max(4).trailing_zeros() - 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketched() -> AttentionConfig {
        AttentionConfig::default()
    }

    #[test]
    fn default_is_valid() {
        assert_eq!(sketched().validate(64, 1024), Ok(()));
    }

    #[test]
    fn odd_and_zero_values_are_rejected() {
        for degree in [0, 1, 3, 5] {
            let cfg = AttentionConfig { degree, kind: AttentionKind::Polynomial, ..sketched() };
            assert!(cfg.validate(64, 1024).is_err(), "degree {degree}");
        }
        let cfg = AttentionConfig { degree: 6, ..sketched() };
        assert!(cfg.validate(64, 1024).is_err(), "polysketch degree 6");
        let cfg = AttentionConfig { sketch_dim: 0, ..sketched() };
        assert!(cfg.validate(64, 1024).unwrap_err().to_string().contains("sketch_dim"));
        let cfg = AttentionConfig { block_size: 0, ..sketched() };
        assert!(cfg.validate(64, 1024).unwrap_err().to_string().contains("block_size"));
        let cfg = AttentionConfig { block_size: 2048, ..sketched() };
        assert!(cfg.validate(64, 1024).is_err());
        let cfg = AttentionConfig { sketch: SketchKind::Hadamard, ..sketched() };
        assert!(cfg.validate(48, 1024).is_err());
        assert!(cfg.validate(64, 1024).is_ok());
    }

    #[test]
    fn softmax_ignores_polynomial_settings() {
        let cfg = AttentionConfig { kind: AttentionKind::Softmax, degree: 3, ..sketched() };
        assert_eq!(cfg.validate(64, 1024), Ok(()));
    }

    #[test]
    fn sketch_levels_follow_degree() {
        assert_eq!(AttentionConfig { degree: 4, ..sketched() }.sketch_levels(), 1);
        assert_eq!(AttentionConfig { degree: 8, ..sketched() }.sketch_levels(), 2);
    }
}
