//! Loading a directory of text files and splitting it into training and validation documents.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::DataError;

/// One text of the corpus, usually one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Where the text came from: the file name, or `<name>#train` / `<name>#val` for the two
    /// halves of a document that was cut in two.
    pub name: String,
    /// The decoded text, with `\n` line endings.
    pub text: String,
}

/// Loads every `*.txt` file directly in `dir` (not recursive), sorted by file name.
///
/// The extension is matched case-insensitively, other files are ignored, and files that are empty
/// or whitespace only are skipped. Each file is decoded by [`decode_text`].
///
/// # Errors
/// The directory is missing or not a directory, holds no `.txt` file, or every `.txt` file is
/// empty; a file cannot be read or contains NUL bytes ([`DataError::BinaryFile`]).
pub fn load_corpus_dir(dir: &Path) -> Result<Vec<Document>, DataError> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingDir { path: dir.to_path_buf() })
        }
        Err(e) => return Err(DataError::io("read directory", dir, e)),
    };
    if !meta.is_dir() {
        return Err(DataError::NotADirectory { path: dir.to_path_buf() });
    }

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io("read directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io("read directory", dir, e))?;
        let path = entry.path();
        let is_txt = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| ext.eq_ignore_ascii_case("txt"));
        // `metadata` follows symbolic links, so a link to a text file counts as a text file.
        if !is_txt || !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        files.push((entry.file_name().to_string_lossy().into_owned(), path));
    }
    if files.is_empty() {
        return Err(DataError::NoTextFiles { path: dir.to_path_buf() });
    }
    files.sort();

    let mut docs = Vec::with_capacity(files.len());
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| DataError::io("read", &path, e))?;
        let text = decode_text(&bytes).ok_or(DataError::BinaryFile { path })?;
        if !text.trim().is_empty() {
            docs.push(Document { name, text });
        }
    }
    if docs.is_empty() {
        return Err(DataError::EmptyCorpus { path: dir.to_path_buf() });
    }
    Ok(docs)
}

/// Decodes the bytes of a text file, or returns `None` if they contain a NUL byte.
///
/// A leading UTF-8 byte order mark is dropped. Valid UTF-8 is kept as is; anything else is read
/// as Latin-1, where byte `b` becomes the character `U+00bb`, which cannot fail. Line endings are
/// normalised to `\n` (`\r\n` and a lone `\r` both become `\n`).
pub fn decode_text(bytes: &[u8]) -> Option<String> {
    if bytes.contains(&0) {
        return None;
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    Some(normalize_line_endings(text))
}

/// Turns `\r\n` and lone `\r` into `\n`.
fn normalize_line_endings(text: String) -> String {
    if !text.contains('\r') {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits documents into `(train, val)` by whole documents, deterministically in `seed`.
///
/// Documents are visited in an order shuffled by `seed`; one goes to validation if the validation
/// bytes so far plus its own bytes stay within `val_fraction` of the total. If none fits, the
/// smallest document is used. The corpus is never given entirely to validation. Blank documents
/// are dropped. A single document is instead cut at the line boundary nearest to
/// `1 - val_fraction` of its length into `<name>#train` and `<name>#val`. Both outputs keep the
/// input order.
///
/// # Errors
/// `val_fraction` is not strictly between 0 and 1, there is no non-blank document, or a single
/// document cannot be cut into two non-blank parts.
pub fn split_documents(
    docs: Vec<Document>,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<Document>, Vec<Document>), DataError> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(DataError::InvalidValFraction { value: val_fraction });
    }
    let mut docs: Vec<Document> = docs.into_iter().filter(|d| !d.text.trim().is_empty()).collect();
    match docs.len() {
        0 => Err(DataError::CannotSplit { reason: "there are no non-empty documents".into() }),
        1 => split_single(docs.remove(0), val_fraction),
        _ => Ok(split_many(docs, val_fraction, seed)),
    }
}

/// Greedy split of two or more non-blank documents.
fn split_many(docs: Vec<Document>, val_fraction: f64, seed: u64) -> (Vec<Document>, Vec<Document>) {
    let total: usize = docs.iter().map(|d| d.text.len()).sum();
    let budget = val_fraction * total as f64;
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));

    let mut in_val = vec![false; docs.len()];
    let mut val_bytes = 0usize;
    for &i in &order {
        let len = docs[i].text.len();
        if (val_bytes + len) as f64 <= budget {
            in_val[i] = true;
            val_bytes += len;
        }
    }
    if val_bytes == 0 {
        // Nothing fits the budget: take the smallest document (the first one on ties). With at
        // least two non-blank documents it is at most half the corpus, so training keeps text.
        let smallest = (0..docs.len()).min_by_key(|&i| (docs[i].text.len(), i)).unwrap_or(0);
        in_val[smallest] = true;
    }

    let mut train = Vec::new();
    let mut val = Vec::new();
    for (doc, to_val) in docs.into_iter().zip(in_val) {
        if to_val {
            val.push(doc);
        } else {
            train.push(doc);
        }
    }
    (train, val)
}

/// Cuts one document in two at the line boundary nearest `1 - val_fraction` of its length.
fn split_single(
    doc: Document,
    val_fraction: f64,
) -> Result<(Vec<Document>, Vec<Document>), DataError> {
    let text = &doc.text;
    let target = ((1.0 - val_fraction) * text.len() as f64).round() as usize;
    // A cut `c` leaves non-blank text on both sides iff first_solid < c <= last_solid.
    let first_solid = text.find(|c: char| !c.is_whitespace());
    let last_solid = text.rfind(|c: char| !c.is_whitespace());
    let (Some(first_solid), Some(last_solid)) = (first_solid, last_solid) else {
        return Err(DataError::CannotSplit { reason: format!("document `{}` is blank", doc.name) });
    };
    let valid = |c: usize| c > first_solid && c <= last_solid;

    let line_cut = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .filter(|&c| valid(c))
        .min_by_key(|&c| c.abs_diff(target));
    // Text without a usable line break is cut at the character boundary nearest the target.
    let cut = line_cut.or_else(|| {
        text.char_indices()
            .map(|(i, _)| i)
            .filter(|&c| valid(c))
            .min_by_key(|&c| c.abs_diff(target))
    });
    let Some(cut) = cut else {
        return Err(DataError::CannotSplit {
            reason: format!(
                "the only document, `{}`, is too short to cut into training and validation parts",
                doc.name
            ),
        });
    };
    let train = Document { name: format!("{}#train", doc.name), text: text[..cut].to_owned() };
    let val = Document { name: format!("{}#val", doc.name), text: text[cut..].to_owned() };
    Ok((vec![train], vec![val]))
}

/// Stable 64-bit FNV-1a hash of `bytes`.
///
/// Unlike `std`'s `DefaultHasher`, its value never changes between Rust releases, so it can key
/// files on disk.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET;
    fnv1a64_update(&mut hash, bytes);
    hash
}

/// FNV-1a offset basis: the hash of no bytes.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a hash over more bytes, so that a hash can be built up piece by piece.
pub(crate) fn fnv1a64_update(hash: &mut u64, bytes: &[u8]) {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(PRIME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    fn doc(name: &str, text: &str) -> Document {
        Document { name: name.into(), text: text.into() }
    }

    #[test]
    fn decoding_handles_bom_line_endings_latin1_and_nul() {
        assert_eq!(decode_text(b"\xEF\xBB\xBFhello").unwrap(), "hello");
        assert_eq!(decode_text(b"a\r\nb\r\n").unwrap(), "a\nb\n");
        assert_eq!(decode_text(b"a\rb\r\r\nc").unwrap(), "a\nb\n\nc");
        assert_eq!(decode_text(b"caf\xE9\r\n").unwrap(), "caf\u{e9}\n");
        assert_eq!(decode_text("caf\u{e9} \u{1F600}".as_bytes()).unwrap(), "caf\u{e9} \u{1F600}");
        assert!(decode_text(b"ab\0cd").is_none());
    }

    #[test]
    fn fnv1a64_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn loads_sorted_txt_files_and_ignores_others() {
        let dir = TempDir::new("corpus_load");
        dir.write("b.txt", b"second\r\nfile");
        dir.write("a.TXT", b"first caf\xE9");
        dir.write("empty.txt", b"  \n\n");
        dir.write("README.md", b"not text for training");
        dir.write("LICENSE", b"nope");
        std::fs::create_dir(dir.path().join("sub.txt")).unwrap();
        let docs = load_corpus_dir(dir.path()).unwrap();
        assert_eq!(docs, vec![doc("a.TXT", "first caf\u{e9}"), doc("b.txt", "second\nfile")]);
    }

    #[test]
    fn directory_errors_are_reported() {
        let dir = TempDir::new("corpus_errors");
        let missing = dir.path().join("missing");
        assert!(matches!(load_corpus_dir(&missing), Err(DataError::MissingDir { .. })));

        dir.write("file.txt", b"text");
        let file = dir.path().join("file.txt");
        assert!(matches!(load_corpus_dir(&file), Err(DataError::NotADirectory { .. })));

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("notes.md"), "x").unwrap();
        let err = load_corpus_dir(&empty).unwrap_err();
        assert!(matches!(err, DataError::NoTextFiles { .. }));
        assert!(err.to_string().contains("point data.dir at"), "{err}");

        std::fs::write(empty.join("blank.txt"), " \r\n ").unwrap();
        assert!(matches!(load_corpus_dir(&empty), Err(DataError::EmptyCorpus { .. })));

        std::fs::write(empty.join("bin.txt"), b"ELF\0\x01").unwrap();
        let err = load_corpus_dir(&empty).unwrap_err();
        assert!(matches!(&err, DataError::BinaryFile { path } if path.ends_with("bin.txt")));
    }

    #[test]
    fn split_is_deterministic_and_keeps_both_sides() {
        let docs: Vec<Document> =
            (0..20).map(|i| doc(&format!("d{i:02}"), &"word ".repeat(10 + i * 7))).collect();
        let total: usize = docs.iter().map(|d| d.text.len()).sum();
        let (train, val) = split_documents(docs.clone(), 0.1, 7).unwrap();
        assert_eq!(split_documents(docs.clone(), 0.1, 7).unwrap(), (train.clone(), val.clone()));
        assert!(!train.is_empty() && !val.is_empty());
        assert_eq!(train.len() + val.len(), docs.len());
        let val_bytes: usize = val.iter().map(|d| d.text.len()).sum();
        assert!(val_bytes as f64 <= 0.1 * total as f64);
        let other_seeds = (8..16).map(|s| split_documents(docs.clone(), 0.1, s).unwrap().1);
        assert!(other_seeds.into_iter().any(|v| v != val), "seed should change the split");
    }

    #[test]
    fn split_takes_smallest_document_when_nothing_fits() {
        let docs = vec![doc("big", &"x".repeat(100)), doc("small", "tiny"), doc("mid", "medium")];
        let (train, val) = split_documents(docs, 0.01, 1).unwrap();
        assert_eq!(val, vec![doc("small", "tiny")]);
        assert_eq!(train.len(), 2);
    }

    #[test]
    fn single_document_is_cut_at_a_line_boundary() {
        let text: String = (0..10).map(|i| format!("line {i}\n")).collect();
        let (train, val) = split_documents(vec![doc("only", &text)], 0.2, 3).unwrap();
        assert_eq!(train[0].name, "only#train");
        assert_eq!(val[0].name, "only#val");
        assert_eq!(format!("{}{}", train[0].text, val[0].text), text);
        assert!(train[0].text.ends_with('\n'));
        assert_eq!(val[0].text, "line 8\nline 9\n");

        let (train, val) = split_documents(vec![doc("one", "abcdefghij")], 0.3, 0).unwrap();
        assert_eq!((train[0].text.as_str(), val[0].text.as_str()), ("abcdefg", "hij"));
        assert!(matches!(
            split_documents(vec![doc("x", " a ")], 0.5, 0),
            Err(DataError::CannotSplit { .. })
        ));
    }

    #[test]
    fn split_rejects_bad_fractions_and_empty_input() {
        for f in [0.0, 1.0, -0.5, f64::NAN] {
            let r = split_documents(vec![doc("a", "x\ny"), doc("b", "z")], f, 0);
            assert!(matches!(r, Err(DataError::InvalidValFraction { .. })), "{f}");
        }
        let r = split_documents(vec![doc("a", "  ")], 0.1, 0);
        assert!(matches!(r, Err(DataError::CannotSplit { .. })));
    }
}
