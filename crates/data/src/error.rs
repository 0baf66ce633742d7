//! The error type shared by every part of the data pipeline.
//!
//! Each message says what went wrong and what the user can do about it, because these errors end
//! up in front of someone who edited a config file, not someone reading this code.

use std::path::PathBuf;

/// Everything that can go wrong while loading text, tokenizing it, caching tokens or batching.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file system operation failed.
    #[error("could not {action} `{path}`: {source}; check that the path exists and is accessible")]
    Io {
        /// What was being attempted, e.g. "read" or "create directory".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The data directory does not exist.
    #[error(
        "data directory `{path}` does not exist: point data.dir at a folder of UTF-8 or Latin-1 \
         .txt files"
    )]
    MissingDir {
        /// The directory that was asked for.
        path: PathBuf,
    },

    /// The data directory path names something that is not a directory.
    #[error(
        "data directory `{path}` is not a directory: point data.dir at a folder of UTF-8 or \
         Latin-1 .txt files"
    )]
    NotADirectory {
        /// The path that was asked for.
        path: PathBuf,
    },

    /// The data directory holds no `.txt` files at all.
    #[error(
        "data directory `{path}` holds no .txt files: point data.dir at a folder of UTF-8 or \
         Latin-1 .txt files"
    )]
    NoTextFiles {
        /// The directory that was searched.
        path: PathBuf,
    },

    /// Every `.txt` file in the data directory is empty or whitespace only.
    #[error(
        "every .txt file in data directory `{path}` is empty: add text to them or point data.dir \
         at another folder"
    )]
    EmptyCorpus {
        /// The directory that was searched.
        path: PathBuf,
    },

    /// A `.txt` file contains NUL bytes, so it is not text.
    #[error(
        "`{path}` contains NUL bytes and looks like a binary file: remove it from the data \
         directory or convert it to UTF-8 text"
    )]
    BinaryFile {
        /// The offending file.
        path: PathBuf,
    },

    /// The validation fraction is not strictly between 0 and 1.
    #[error(
        "validation fraction {value} is invalid: set data.val_fraction between 0 and 1, e.g. 0.05"
    )]
    InvalidValFraction {
        /// The rejected value.
        value: f64,
    },

    /// The documents cannot be divided into non-empty training and validation parts.
    #[error("cannot split the corpus into training and validation text: {reason}; add more text")]
    CannotSplit {
        /// Why the split is impossible.
        reason: String,
    },

    /// The requested vocabulary size is outside the supported range.
    #[error(
        "vocabulary size {vocab_size} is invalid: set tokenizer.vocab_size between {min} and {max} \
         (256 byte symbols, the end-of-text token and at least one merge)"
    )]
    InvalidVocabSize {
        /// The rejected size.
        vocab_size: usize,
        /// Smallest accepted size.
        min: usize,
        /// Largest accepted size.
        max: usize,
    },

    /// The tokenizer library reported an error while training, encoding or decoding.
    #[error("tokenizer failed to {action}: {source}; check the tokenizer file and the input text")]
    Tokenizer {
        /// What was being attempted, e.g. "encode text".
        action: &'static str,
        /// The error from the `tokenizers` crate.
        #[source]
        source: tokenizers::Error,
    },

    /// A tokenizer file is missing or cannot be parsed.
    #[error(
        "cannot load tokenizer `{path}`: {reason}; point at a HuggingFace tokenizer.json, or \
         delete the file so that a new tokenizer is trained"
    )]
    TokenizerFile {
        /// The file that was asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The token stream is too short for even one window.
    #[error(
        "the token stream holds {tokens} tokens but one window needs {needed}: lower \
         train.seq_len or add text"
    )]
    CorpusTooShort {
        /// Tokens available.
        tokens: usize,
        /// Tokens needed for a single window (`seq_len + 1`).
        needed: usize,
    },

    /// A token cache file failed verification. It is rebuilt rather than used.
    #[error(
        "token cache `{path}` is corrupt ({reason}); it will be rebuilt, and if this keeps \
         happening delete the cache directory and check the disk"
    )]
    CorruptCache {
        /// The cache file.
        path: PathBuf,
        /// The check that failed.
        reason: String,
    },

    /// A batching parameter is out of range.
    #[error("{name} = {value} is invalid: {fix}")]
    InvalidParameter {
        /// The parameter's name as the user knows it, e.g. "train.seq_len".
        name: &'static str,
        /// The rejected value.
        value: usize,
        /// What to set instead.
        fix: &'static str,
    },
}

impl DataError {
    /// Wraps an I/O error with the action and path it concerns.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io { action, path: path.into(), source }
    }

    /// Wraps an error from the `tokenizers` crate.
    pub(crate) fn tokenizer(action: &'static str, source: tokenizers::Error) -> Self {
        Self::Tokenizer { action, source }
    }
}
