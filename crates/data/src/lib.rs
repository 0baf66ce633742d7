//! Data pipeline for polysketch language-model training.
//!
//! The steps, in the order a training run takes them:
//!
//! 1. [`load_corpus_dir`] reads a folder of `.txt` files (UTF-8 or Latin-1, any line endings)
//!    into [`Document`]s, and [`split_documents`] divides them into training and validation sets.
//! 2. [`TextTokenizer::train_bpe`] trains a byte-level BPE on the training documents, or
//!    [`TextTokenizer::from_file`] loads any HuggingFace `tokenizer.json`.
//! 3. [`load_or_build_tokens`] encodes both splits into token streams with [`encode_documents`]
//!    and caches them on disk, keyed by the documents and the tokenizer.
//! 4. [`WindowSampler`] draws reproducible random training batches from the training stream, and
//!    [`eval_batches`] cuts the validation stream into fixed evaluation batches; both produce
//!    [`TokenBatch`]es that turn into Burn tensors with [`TokenBatch::to_tensors`].
//!
//! Every fallible function returns a [`DataError`] whose message says what is wrong and how to
//! fix it.

mod batch;
mod cache;
mod corpus;
mod error;
mod synthetic;
mod tokenizer;

pub use batch::{eval_batches, TokenBatch, WindowSampler};
pub use cache::{load_or_build_tokens, TokenSplits};
pub use corpus::{decode_text, fnv1a64, load_corpus_dir, split_documents, Document};
pub use error::DataError;
pub use synthetic::{TaskKind, TaskSpec};
pub use tokenizer::{encode_documents, TextTokenizer, END_OF_TEXT, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};

#[cfg(test)]
mod test_util {
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system temp dir, removed when dropped.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("polysketch-data-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }

        /// Writes `bytes` to `name` inside the directory and returns the file's path.
        pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).expect("write temp file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod gutenberg {
    use std::time::Instant;

    use super::*;

    /// Full pipeline on the bundled Gutenberg corpus, with timings. Run with
    /// `cargo test --release -p polysketch-data -- --ignored --nocapture`.
    #[test]
    #[ignore = "takes tens of seconds; run by hand for timings"]
    fn gutenberg_bpe_8192_timings() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gutenberg");
        let start = Instant::now();
        let docs = load_corpus_dir(&dir).unwrap();
        let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
        println!("loaded {} documents, {bytes} bytes in {:.2?}", docs.len(), start.elapsed());
        assert_eq!(docs.len(), 18);
        assert!(docs.iter().all(|d| !d.text.contains('\r')));
        let caesar = docs.iter().find(|d| d.name == "shakespeare-caesar.txt").unwrap();
        assert!(caesar.text.contains('\u{e6}'), "Latin-1 byte 0xE6 should decode to 'æ'");

        let start = Instant::now();
        let tok = TextTokenizer::train_bpe(&docs, 8192).unwrap();
        let train_s = start.elapsed().as_secs_f64();
        println!("trained BPE with {} tokens in {train_s:.2} s", tok.vocab_size());
        assert_eq!(tok.vocab_size(), 8192);
        assert_eq!(tok.end_of_text_id(), Some(0));
        println!("tokenizer fingerprint {:016x}", tok.fingerprint());
        let again = TextTokenizer::train_bpe(&docs, 8192).unwrap();
        assert_eq!(again.fingerprint(), tok.fingerprint(), "BPE training must be deterministic");

        let start = Instant::now();
        let tokens = encode_documents(&tok, &docs).unwrap();
        let encode_s = start.elapsed().as_secs_f64();
        println!(
            "encoded {} tokens in {encode_s:.2} s ({:.2} bytes per token)",
            tokens.len(),
            bytes as f64 / tokens.len() as f64
        );

        // Chunked parallel encoding must give exactly the tokens of whole-document encoding.
        let start = Instant::now();
        let mut whole = Vec::new();
        for doc in &docs {
            whole.extend(tok.encode(&doc.text).unwrap());
            whole.push(0);
        }
        println!("sequential whole-document encoding took {:.2?}", start.elapsed());
        assert!(whole == tokens, "chunked encoding differs from whole-document encoding");

        let start = Instant::now();
        let decoded = tok.decode(&tokens).unwrap();
        println!("decoded everything in {:.2?}", start.elapsed());
        let expected: String = docs.iter().map(|d| format!("{}{END_OF_TEXT}", d.text)).collect();
        assert!(decoded == expected, "decoding the corpus must give it back exactly");
    }
}
