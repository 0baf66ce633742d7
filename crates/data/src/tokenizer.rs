//! Byte-level BPE tokenizers: training, loading, saving, encoding and decoding.

use std::io::Write;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::cache::write_atomically;
use crate::corpus::{fnv1a64, Document};
use crate::error::DataError;

/// The special token that ends every document; a freshly trained tokenizer gives it id 0.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Smallest vocabulary [`TextTokenizer::train_bpe`] accepts: 256 bytes, the special token and one
/// merge.
pub const MIN_VOCAB_SIZE: usize = 258;

/// Largest vocabulary [`TextTokenizer::train_bpe`] accepts.
pub const MAX_VOCAB_SIZE: usize = 1 << 20;

/// Texts are cut into pieces of about this many bytes so that encoding runs in parallel.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks encoded per `encode_batch` call; bounds the memory held by intermediate encodings.
const CHUNKS_PER_BATCH: usize = 64;

/// A text tokenizer: a HuggingFace `tokenizers` tokenizer plus its fingerprint.
///
/// Tokenizers trained here are byte-level BPEs, GPT-2 style: a ByteLevel pre-tokenizer (no prefix
/// space, GPT-2 regex), a ByteLevel decoder and the special token [`END_OF_TEXT`]. They encode
/// any UTF-8 text and decode it back exactly. Any tokenizer.json can also be loaded.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    fingerprint: u64,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The full vocabulary would drown any log line, so show only what identifies it.
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

impl TextTokenizer {
    /// Trains a byte-level BPE with `vocab_size` tokens in total, counting the 256 byte symbols
    /// and [`END_OF_TEXT`] (id 0). The result has fewer tokens if the texts run out of pairs to
    /// merge, so size the model from [`TextTokenizer::vocab_size`].
    ///
    /// # Errors
    /// `vocab_size` is outside [`MIN_VOCAB_SIZE`]..=[`MAX_VOCAB_SIZE`], or training fails.
    pub fn train_bpe(docs: &[Document], vocab_size: usize) -> Result<Self, DataError> {
        if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
            return Err(DataError::InvalidVocabSize {
                vocab_size,
                min: MIN_VOCAB_SIZE,
                max: MAX_VOCAB_SIZE,
            });
        }
        let byte_level = ByteLevel::new(false, true, true);
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(|e| DataError::tokenizer("build an empty BPE tokenizer", e))?;
        // Chunks end where the pre-tokenizer splits anyway, so the word counts are the same as
        // for whole documents, while the trainer counts them in parallel.
        let chunks = docs.iter().flat_map(|d| text_chunks(&d.text, CHUNK_BYTES));
        tokenizer
            .train(&mut trainer, chunks)
            .map_err(|e| DataError::tokenizer("train a BPE", e))?;
        Self::new(Tokenizer::from(tokenizer))
    }

    /// A word-level tokenizer over a fixed vocabulary: words are split at whitespace, word `i`
    /// of `words` gets id `i`, anything else maps to `unknown` (which must be one of `words`);
    /// decoding joins words with spaces.
    ///
    /// # Errors
    /// The vocabulary is empty, `unknown` is not in it, or the tokenizer cannot be built.
    pub fn word_level(words: &[String], unknown: &str) -> Result<Self, DataError> {
        let vocab: serde_json::Map<String, serde_json::Value> =
            words.iter().enumerate().map(|(i, w)| (w.clone(), i.into())).collect();
        // the tokenizer.json form; the builder API would need the hash map type of its own
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": { "type": "WhitespaceSplit" },
            "post_processor": null,
            "decoder": null,
            "model": { "type": "WordLevel", "vocab": vocab, "unk_token": unknown },
        });
        let inner: Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| DataError::tokenizer("build a word-level tokenizer", e))?;
        if inner.token_to_id(unknown).is_none() {
            return Err(DataError::tokenizer(
                "build a word-level tokenizer",
                format!("the unknown token {unknown} is not in the vocabulary").into(),
            ));
        }
        Self::new(inner)
    }

    /// Loads a tokenizer from a HuggingFace `tokenizer.json` file.
    ///
    /// # Errors
    /// [`DataError::TokenizerFile`] if the file is missing or is not a valid tokenizer.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let file_error = |reason: String| DataError::TokenizerFile { path: path.into(), reason };
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => file_error("the file does not exist".into()),
            _ => file_error(format!("it cannot be read ({e})")),
        })?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| file_error(format!("it is not a valid tokenizer.json ({e})")))?;
        if inner.get_vocab_size(true) == 0 {
            return Err(file_error("its vocabulary is empty".into()));
        }
        Self::new(inner)
    }

    /// Writes the tokenizer as `tokenizer.json` to `path` atomically: it goes to `<path>.tmp`
    /// first, is flushed and synced, then renamed over `path`. Missing parent directories are
    /// created.
    ///
    /// # Errors
    /// Serialisation or any file operation fails.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| DataError::tokenizer("serialise the tokenizer", e))?;
        write_atomically(path, |w| w.write_all(json.as_bytes()))
    }

    /// Number of tokens, including added tokens such as [`END_OF_TEXT`].
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text` without adding any special token.
    ///
    /// # Errors
    /// The tokenizer fails on the text, which a byte-level BPE never does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::tokenizer("encode text", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids back to text, keeping special tokens such as [`END_OF_TEXT`].
    ///
    /// # Errors
    /// The tokenizer's decoder fails, e.g. because an id is not in the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner.decode(ids, false).map_err(|e| DataError::tokenizer("decode token ids", e))
    }

    /// Id of [`END_OF_TEXT`], or `None` if the tokenizer has no such token.
    pub fn end_of_text_id(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    /// Stable hash of the tokenizer's compact JSON serialisation.
    ///
    /// Equal tokenizers have equal fingerprints across processes and machines, so it keys token
    /// caches and lets a resumed run check that it still has the same tokenizer.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Borrows the underlying HuggingFace tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    fn new(inner: Tokenizer) -> Result<Self, DataError> {
        let json = inner
            .to_string(false)
            .map_err(|e| DataError::tokenizer("serialise the tokenizer", e))?;
        Ok(Self { fingerprint: fnv1a64(json.as_bytes()), inner })
    }
}

/// Encodes documents into one token stream: each document's tokens followed by [`END_OF_TEXT`]
/// when the tokenizer has it.
///
/// Documents are cut into chunks of about 64 KiB at line starts and encoded in parallel; the cuts
/// fall where the byte-level pre-tokenizer splits anyway, so the tokens are the same as for the
/// whole document.
///
/// # Errors
/// The tokenizer fails on some text.
pub fn encode_documents(tok: &TextTokenizer, docs: &[Document]) -> Result<Vec<u32>, DataError> {
    let eot = tok.end_of_text_id();
    let total_bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    // Byte-level BPE on English prose averages well over three bytes per token.
    let mut out = Vec::with_capacity(total_bytes / 3 + docs.len());
    for doc in docs {
        let chunks: Vec<&str> = text_chunks(&doc.text, CHUNK_BYTES).collect();
        for group in chunks.chunks(CHUNKS_PER_BATCH) {
            let encodings = tok
                .inner
                .encode_batch_fast(group.to_vec(), false)
                .map_err(|e| DataError::tokenizer("encode text", e))?;
            for encoding in &encodings {
                out.extend_from_slice(encoding.get_ids());
            }
        }
        out.extend(eot);
    }
    Ok(out)
}

/// Cuts `text` into pieces of at least `target` bytes (the last may be shorter).
///
/// Each cut is just after a lone `\n` with a solid character on both sides, as in `a\nb`. The
/// GPT-2 pre-tokenizer regex makes that newline a pre-token of its own whether or not the text
/// goes on after it, and neither neighbouring pre-token depends on what lies beyond the newline,
/// so encoding the pieces separately gives the same tokens as the whole text. (A run such as
/// `\n\n` is not a safe cut: `\s+(?!\S)` splits it before a word but not at the end of a text.)
/// A text without such a line break stays in one piece.
fn text_chunks(text: &str, target: usize) -> impl Iterator<Item = &str> + Send {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len();
        let mut from = target.min(rest.len());
        // `\n` is a single byte that never occurs inside a multi-byte character.
        while let Some(pos) = rest.as_bytes()[from..].iter().position(|&b| b == b'\n') {
            let newline = from + pos;
            let before = rest[..newline].chars().next_back();
            let after = rest[newline + 1..].chars().next();
            if before.is_some_and(is_solid) && after.is_some_and(is_solid) {
                cut = newline + 1;
                break;
            }
            from = newline + 1;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Whether `c` is certainly not matched by `\s` in the pre-tokenizer's regex engine.
fn is_solid(c: char) -> bool {
    c.is_ascii_graphic() || c.is_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    const SAMPLE: &str = "The quick brown fox jumps over the lazy dog.\n\
        The lazy dog sleeps; the quick fox runs away!\n\n  Indented line, café and naïve.\n\
        Numbers 12345 and 67890, symbols #@$%^&*().\n";

    fn sample_docs() -> Vec<Document> {
        (0..4).map(|i| Document { name: format!("d{i}"), text: SAMPLE.repeat(i + 1) }).collect()
    }

    fn small_tokenizer() -> TextTokenizer {
        TextTokenizer::train_bpe(&sample_docs(), 300).unwrap()
    }

    #[test]
    fn trains_and_round_trips_arbitrary_text() {
        let tok = small_tokenizer();
        assert_eq!(tok.end_of_text_id(), Some(0));
        assert!(tok.vocab_size() > 257 && tok.vocab_size() <= 300, "{}", tok.vocab_size());
        let texts = [
            SAMPLE,
            "café 😀 naïve\n\nZürich\r\n\ttabs  and  spaces ",
            "日本語のテキスト and ελληνικά",
            "",
            " leading space",
        ];
        for text in texts {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        let common = tok.encode("The quick brown fox").unwrap();
        assert!(common.len() < "The quick brown fox".len(), "merges should shorten text");
    }

    #[test]
    fn training_is_deterministic() {
        assert_eq!(small_tokenizer().fingerprint(), small_tokenizer().fingerprint());
    }

    #[test]
    fn rejects_bad_vocab_sizes() {
        for size in [0, 257, MAX_VOCAB_SIZE + 1] {
            let r = TextTokenizer::train_bpe(&sample_docs(), size);
            assert!(matches!(r, Err(DataError::InvalidVocabSize { .. })), "{size}");
        }
    }

    #[test]
    fn save_and_load_keep_the_fingerprint() {
        let dir = TempDir::new("tok_save");
        let tok = small_tokenizer();
        let path = dir.path().join("nested/tokenizer.json");
        tok.save(&path).unwrap();
        assert!(!dir.path().join("nested/tokenizer.json.tmp").exists());
        let loaded = TextTokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.fingerprint(), tok.fingerprint());
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.encode(SAMPLE).unwrap(), tok.encode(SAMPLE).unwrap());
    }

    #[test]
    fn bad_tokenizer_files_give_errors() {
        let dir = TempDir::new("tok_bad");
        let missing = TextTokenizer::from_file(&dir.path().join("nope.json")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");

        let good = small_tokenizer().inner().to_string(false).unwrap();
        let broken_merges = good.replace("\"merges\":[", "\"merges\":[[\"zzz\",\"qqq\"],");
        assert_ne!(broken_merges, good);
        let cases = [
            b"".to_vec(),
            b"\xff\xfe garbage".to_vec(),
            b"{}".to_vec(),
            b"[1, 2, 3]".to_vec(),
            good.as_bytes()[..good.len() / 2].to_vec(),
            broken_merges.into_bytes(),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            let path = dir.write(&format!("bad{i}.json"), bytes);
            let err = TextTokenizer::from_file(&path).unwrap_err();
            assert!(matches!(err, DataError::TokenizerFile { .. }), "case {i}: {err}");
        }
    }

    #[test]
    fn encode_documents_appends_end_of_text_and_matches_plain_encoding() {
        let tok = small_tokenizer();
        let docs = sample_docs();
        let stream = encode_documents(&tok, &docs).unwrap();
        let mut expected = Vec::new();
        for doc in &docs {
            expected.extend(tok.encode(&doc.text).unwrap());
            expected.push(0);
        }
        assert_eq!(stream, expected);
    }

    #[test]
    fn chunks_cover_the_text_and_keep_tokens_identical() {
        // Pseudo-random mix of words, punctuation and awkward whitespace runs.
        let pieces = [
            "word",
            "Caf\u{e9}",
            " ",
            "  ",
            "\n",
            "\n\n",
            " \n",
            "\n ",
            "\t",
            "\"",
            ".",
            "42",
            "\u{1F600}",
            "'s",
            "\u{a0}",
            "\u{3000}",
            "x\ny",
            "\n\n\n",
            "-",
        ];
        let mut state = 12345u64;
        let text: String = (0..5000)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                pieces[(state >> 33) as usize % pieces.len()]
            })
            .collect();
        // Trained on the same text, so runs such as `\n\n` become tokens of their own.
        let doc = Document { name: "mix".into(), text: text.clone() };
        let tok = TextTokenizer::train_bpe(&[doc], 400).unwrap();
        assert!(tok.encode("\n\n").unwrap().len() == 1, "needs a `\n\n` token");
        let whole = tok.encode(&text).unwrap();
        for target in [1, 7, 64, 1000] {
            let chunks: Vec<&str> = text_chunks(&text, target).collect();
            assert!(chunks.len() > 5, "target {target}");
            assert_eq!(chunks.concat(), text);
            for pair in chunks.windows(2) {
                assert!(pair[0].ends_with('\n') && !pair[1].starts_with(char::is_whitespace));
            }
            let joined: Vec<u32> = chunks.iter().flat_map(|c| tok.encode(c).unwrap()).collect();
            let first_diff = joined.iter().zip(&whole).position(|(a, b)| a != b);
            assert!(joined == whole, "target {target}: tokens differ from index {first_diff:?}");
        }
        assert_eq!(text_chunks("no line breaks at all", 4).count(), 1);
        assert_eq!(text_chunks("para one.\n\nPara two.\n\nThree", 1).count(), 1);
        assert_eq!(text_chunks("", 4).count(), 0);
    }
}
