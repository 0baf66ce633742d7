//! On-disk cache of encoded token streams, so a corpus is tokenized once per tokenizer.
//!
//! A cache file is `tokens-{key:016x}.bin`, laid out as (all integers little-endian):
//!
//! | bytes        | content                                         |
//! |--------------|-------------------------------------------------|
//! | 8            | magic `PSKTOK01`                                |
//! | 8            | `u64` key, equal to the one in the file name    |
//! | 8            | `u64` number of training tokens                 |
//! | 8            | `u64` number of validation tokens               |
//! | 4 per token  | `u32` tokens, training then validation          |
//! | 8            | `u64` FNV-1a hash of the token bytes            |

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::corpus::{fnv1a64, fnv1a64_update, Document, FNV_OFFSET};
use crate::error::DataError;
use crate::tokenizer::{encode_documents, TextTokenizer};

/// First bytes of every token cache file; bump the digits when the layout changes.
const MAGIC: &[u8; 8] = b"PSKTOK01";

/// Bytes before the tokens: magic, key and the two lengths.
const HEADER_BYTES: usize = 32;

/// Token streams of both splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSplits {
    /// Training tokens, documents separated by the end-of-text token.
    pub train: Vec<u32>,
    /// Validation tokens, laid out like `train`.
    pub val: Vec<u32>,
}

/// Returns the token streams of `train` and `val` encoded with `tok`, from the cache in
/// `cache_dir` when a valid entry exists, otherwise encoding them and writing the entry.
///
/// The entry's key hashes the names and contents of the training documents, then those of the
/// validation documents, then the tokenizer's fingerprint, so changing any of them makes a new
/// entry. A cache file that fails any check (magic, key, length, checksum, token range) is
/// reported on stderr and rebuilt, never used.
///
/// Returns the splits, the cache file's path, and whether it was a cache hit.
///
/// # Errors
/// The cache directory or file cannot be written, or encoding fails.
pub fn load_or_build_tokens(
    cache_dir: &Path,
    tok: &TextTokenizer,
    train: &[Document],
    val: &[Document],
) -> Result<(TokenSplits, PathBuf, bool), DataError> {
    let key = cache_key(tok, train, val);
    let path = cache_dir.join(format!("tokens-{key:016x}.bin"));
    if path.exists() {
        match read_cache(&path, key, tok.vocab_size()) {
            Ok(splits) => return Ok((splits, path, true)),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let splits =
        TokenSplits { train: encode_documents(tok, train)?, val: encode_documents(tok, val)? };
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| DataError::io("create directory", cache_dir, e))?;
    write_cache(&path, key, &splits)?;
    Ok((splits, path, false))
}

/// Hashes everything the token streams depend on.
fn cache_key(tok: &TextTokenizer, train: &[Document], val: &[Document]) -> u64 {
    let mut hash = FNV_OFFSET;
    fnv1a64_update(&mut hash, MAGIC);
    for (tag, docs) in [(b"train", train), (b"valid", val)] {
        // Lengths before variable-size fields keep the encoding unambiguous.
        fnv1a64_update(&mut hash, tag);
        fnv1a64_update(&mut hash, &(docs.len() as u64).to_le_bytes());
        for doc in docs {
            fnv1a64_update(&mut hash, &(doc.name.len() as u64).to_le_bytes());
            fnv1a64_update(&mut hash, doc.name.as_bytes());
            fnv1a64_update(&mut hash, &(doc.text.len() as u64).to_le_bytes());
            fnv1a64_update(&mut hash, &fnv1a64(doc.text.as_bytes()).to_le_bytes());
        }
    }
    fnv1a64_update(&mut hash, &tok.fingerprint().to_le_bytes());
    hash
}

/// Reads and checks a cache file; any failed check is a [`DataError::CorruptCache`].
fn read_cache(path: &Path, key: u64, vocab_size: usize) -> Result<TokenSplits, DataError> {
    let corrupt = |reason: String| DataError::CorruptCache { path: path.into(), reason };
    let bytes = std::fs::read(path).map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    let word = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if bytes.len() < HEADER_BYTES + 8 {
        return Err(corrupt(format!("only {} bytes, shorter than a header", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("wrong magic bytes".into()));
    }
    if word(8) != key {
        return Err(corrupt(format!("header key {:016x}, expected {key:016x}", word(8))));
    }
    let (n_train, n_val) = (word(16), word(24));
    let expected = n_train
        .checked_add(n_val)
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add((HEADER_BYTES + 8) as u64));
    if expected != Some(bytes.len() as u64) {
        return Err(corrupt(format!(
            "{n_train} + {n_val} tokens do not match the file size of {} bytes",
            bytes.len()
        )));
    }
    let token_bytes = &bytes[HEADER_BYTES..bytes.len() - 8];
    if fnv1a64(token_bytes) != word(bytes.len() - 8) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut tokens: Vec<u32> =
        token_bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(corrupt(format!("token {bad} is outside the vocabulary of {vocab_size}")));
    }
    // The size check above bounds n_train by the file size, so it fits in usize.
    let val = tokens.split_off(n_train as usize);
    Ok(TokenSplits { train: tokens, val })
}

/// Writes a cache file atomically.
fn write_cache(path: &Path, key: u64, splits: &TokenSplits) -> Result<(), DataError> {
    write_atomically(path, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&key.to_le_bytes())?;
        w.write_all(&(splits.train.len() as u64).to_le_bytes())?;
        w.write_all(&(splits.val.len() as u64).to_le_bytes())?;
        let mut checksum = FNV_OFFSET;
        for &t in splits.train.iter().chain(&splits.val) {
            let b = t.to_le_bytes();
            fnv1a64_update(&mut checksum, &b);
            w.write_all(&b)?;
        }
        w.write_all(&checksum.to_le_bytes())
    })
}

/// Writes a file so that readers see either the old content or the complete new content.
///
/// `write` fills `<path>.tmp`, which is then flushed, synced to disk and renamed over `path`.
/// Missing parent directories are created; the temporary file is removed on failure.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), DataError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent)
            .map_err(|e| DataError::io("create directory", parent, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);

    let result = (|| {
        let mut writer = BufWriter::new(File::create(&tmp)?);
        write(&mut writer)?;
        writer.flush()?;
        writer.get_ref().sync_all()
    })();
    let result = result
        .map_err(|e| DataError::io("write", &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename", &tmp, e)));
    match result {
        Ok(()) => {
            // Persisting the rename needs the directory synced; it is only a best effort.
            if let Some(dir) = parent.map(File::open) {
                let _ = dir.and_then(|d| d.sync_all());
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    fn docs(prefix: &str, n: usize) -> Vec<Document> {
        (0..n)
            .map(|i| Document {
                name: format!("{prefix}{i}"),
                text: format!("Document {i} of {prefix}.\nIt says hello {i} times.\n")
                    .repeat(i + 2),
            })
            .collect()
    }

    fn tokenizer() -> TextTokenizer {
        TextTokenizer::train_bpe(&docs("t", 5), 280).unwrap()
    }

    #[test]
    fn second_call_hits_the_cache() {
        let dir = TempDir::new("cache_hit");
        let (tok, train, val) = (tokenizer(), docs("t", 4), docs("v", 2));
        let (first, path, hit) = load_or_build_tokens(dir.path(), &tok, &train, &val).unwrap();
        assert!(!hit);
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("tokens-"));
        assert_eq!(first.train, encode_documents(&tok, &train).unwrap());
        assert_eq!(first.val, encode_documents(&tok, &val).unwrap());
        let (second, path2, hit) = load_or_build_tokens(dir.path(), &tok, &train, &val).unwrap();
        assert!(hit);
        assert_eq!((second, path2), (first, path));
    }

    #[test]
    fn corrupt_or_truncated_cache_is_rebuilt() {
        let dir = TempDir::new("cache_corrupt");
        let (tok, train, val) = (tokenizer(), docs("t", 3), docs("v", 1));
        let (good, path, _) = load_or_build_tokens(dir.path(), &tok, &train, &val).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 5] ^= 0x10;
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'X';
        for broken in [bytes[..bytes.len() - 3].to_vec(), flipped, bad_magic, Vec::new()] {
            std::fs::write(&path, &broken).unwrap();
            assert!(read_cache(&path, cache_key(&tok, &train, &val), tok.vocab_size()).is_err());
            let (splits, _, hit) = load_or_build_tokens(dir.path(), &tok, &train, &val).unwrap();
            assert!(!hit, "a broken cache must not count as a hit");
            assert_eq!(splits, good);
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file should be rewritten");
        }
    }

    #[test]
    fn key_changes_with_documents_and_tokenizer() {
        let (tok, train, val) = (tokenizer(), docs("t", 3), docs("v", 2));
        let base = cache_key(&tok, &train, &val);
        assert_eq!(base, cache_key(&tok, &train, &val));

        let mut edited = train.clone();
        edited[1].text.push('!');
        assert_ne!(base, cache_key(&tok, &edited, &val));
        let mut renamed = val.clone();
        renamed[0].name.push('x');
        assert_ne!(base, cache_key(&tok, &train, &renamed));
        // Moving a document from one split to the other changes the key too.
        let mut moved_train = train.clone();
        let mut moved_val = val.clone();
        moved_val.insert(0, moved_train.pop().unwrap());
        assert_ne!(base, cache_key(&tok, &moved_train, &moved_val));

        let other_tok = TextTokenizer::train_bpe(&docs("t", 5), 270).unwrap();
        assert_ne!(tok.fingerprint(), other_tok.fingerprint());
        assert_ne!(base, cache_key(&other_tok, &train, &val));
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = TempDir::new("cache_atomic");
        let path = dir.path().join("a/b/file.bin");
        write_atomically(&path, |w| w.write_all(b"one")).unwrap();
        write_atomically(&path, |w| w.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("a/b/file.bin.tmp").exists());
        let failed = write_atomically(&path, |_| Err(std::io::Error::other("disk full")));
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("a/b/file.bin.tmp").exists());
    }
}
