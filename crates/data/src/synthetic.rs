//! Synthetic retrieval tasks: selective copying and multi-query associative recall.
//!
//! Each example is a sequence of `seq_len + 1` tokens over a small vocabulary, with a weight per
//! target position: 1 where the target is an answer the model has to retrieve from earlier in
//! the sequence, 0 elsewhere. Loss and accuracy are taken over the answers only.
//!
//! - **Selective copying**: `items` symbols scattered among blanks over most of the sequence,
//!   then a separator, then the same symbols in order (the answers).
//! - **Associative recall**: `items` key-value pairs at the start, blanks, then `items` queries
//!   at the end, each a key from the pairs followed by its value (the answers). The blanks put
//!   the whole context between a pair and its query.

use serde::{Deserialize, Serialize};

use crate::batch::TokenBatch;
use crate::error::DataError;
use crate::tokenizer::TextTokenizer;

/// Filler token.
pub const BLANK: &str = "<blank>";
/// Separator between the copying region and the answers.
pub const SEPARATOR: &str = "<sep>";
/// Unknown word, needed by the word-level tokenizer.
pub const UNKNOWN: &str = "<unk>";
/// Tokens before the first symbol.
const SPECIAL: u32 = 3;

/// Which task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Copy the non-blank symbols, in order, after a separator.
    SelectiveCopying,
    /// Answer each query key with the value it was paired with.
    AssociativeRecall,
}

/// A task and its sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Which task.
    pub kind: TaskKind,
    /// Distinct content symbols.
    #[serde(default = "default_symbols")]
    pub symbols: usize,
    /// Symbols to copy, or key-value pairs (and queries) to recall.
    #[serde(default = "default_items")]
    pub items: usize,
}

fn default_symbols() -> usize {
    16
}

fn default_items() -> usize {
    8
}

/// Deterministic stream of numbers for one example.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Self {
        Self(
            seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
                ^ 0xA076_1D64_78BD_642F,
        )
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `count` distinct values from `0..n`, in random order.
    fn distinct(&mut self, count: usize, n: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below(n - i);
            pool.swap(i, j);
        }
        pool.truncate(count);
        pool
    }
}

impl TaskSpec {
    /// Checks that examples of `seq_len` tokens fit the sizes.
    ///
    /// # Errors
    /// [`DataError::InvalidParameter`] naming the setting to change.
    pub fn validate(&self, seq_len: usize) -> Result<(), DataError> {
        let bad = |name, value, fix| Err(DataError::InvalidParameter { name, value, fix });
        if self.items == 0 {
            return bad("data.task.items", 0, "set it to at least 1");
        }
        if self.symbols < 2 {
            return bad("data.task.symbols", self.symbols, "set it to at least 2");
        }
        match self.kind {
            TaskKind::SelectiveCopying if seq_len < 2 * self.items + 1 => bad(
                "train.seq_len",
                seq_len,
                "selective copying needs at least 2 * data.task.items + 1 tokens",
            ),
            TaskKind::AssociativeRecall if self.symbols < self.items => bad(
                "data.task.symbols",
                self.symbols,
                "associative recall needs at least data.task.items distinct keys",
            ),
            TaskKind::AssociativeRecall if seq_len + 1 < 4 * self.items => bad(
                "train.seq_len",
                seq_len,
                "associative recall needs at least 4 * data.task.items - 1 tokens",
            ),
            _ => Ok(()),
        }
    }

    /// The task's word-level tokenizer: `<blank> <sep> <unk>` then `s0 … s{symbols-1}`.
    ///
    /// # Errors
    /// The tokenizer cannot be built.
    pub fn tokenizer(&self) -> Result<TextTokenizer, DataError> {
        let mut words: Vec<String> = [BLANK, SEPARATOR, UNKNOWN].map(String::from).to_vec();
        words.extend((0..self.symbols).map(|s| format!("s{s}")));
        TextTokenizer::word_level(&words, UNKNOWN)
    }

    /// Example `index` of the stream `seed`: `seq_len + 1` tokens and the weight of each of the
    /// `seq_len` targets (1 for answers).
    pub fn example(&self, seq_len: usize, seed: u64, index: u64) -> (Vec<u32>, Vec<f32>) {
        let mut rng = Rng::new(seed, index);
        let total = seq_len + 1;
        let symbol = |s: usize| SPECIAL + s as u32;
        let mut tokens = vec![0u32; total];
        let mut weights = vec![0f32; seq_len];
        let k = self.items;
        match self.kind {
            TaskKind::SelectiveCopying => {
                let region = total - 1 - k;
                let mut positions = rng.distinct(k, region);
                positions.sort_unstable();
                let content: Vec<u32> = (0..k).map(|_| symbol(rng.below(self.symbols))).collect();
                for (&p, &c) in positions.iter().zip(&content) {
                    tokens[p] = c;
                }
                tokens[region] = 1;
                for (i, &c) in content.iter().enumerate() {
                    tokens[region + 1 + i] = c;
                    weights[region + i] = 1.0;
                }
            }
            TaskKind::AssociativeRecall => {
                let keys = rng.distinct(k, self.symbols);
                let values: Vec<usize> = (0..k).map(|_| rng.below(self.symbols)).collect();
                for i in 0..k {
                    tokens[2 * i] = symbol(keys[i]);
                    tokens[2 * i + 1] = symbol(values[i]);
                }
                let queries = rng.distinct(k, k);
                let start = total - 2 * k;
                for (j, &q) in queries.iter().enumerate() {
                    tokens[start + 2 * j] = symbol(keys[q]);
                    tokens[start + 2 * j + 1] = symbol(values[q]);
                    weights[start + 2 * j] = 1.0;
                }
            }
        }
        (tokens, weights)
    }

    /// Examples `first .. first + batch_size` of the stream `seed` as one batch.
    pub fn batch(&self, seq_len: usize, seed: u64, first: u64, batch_size: usize) -> TokenBatch {
        let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for row in 0..batch_size as u64 {
            let (tokens, w) = self.example(seq_len, seed, first + row);
            inputs.extend(tokens[..seq_len].iter().map(|&t| i64::from(t)));
            targets.extend(tokens[1..].iter().map(|&t| i64::from(t)));
            weights.extend(w);
        }
        TokenBatch { inputs, targets, batch_size, seq_len, weights: Some(weights) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: TaskKind) -> TaskSpec {
        TaskSpec { kind, symbols: 10, items: 4 }
    }

    #[test]
    fn copying_answers_repeat_the_scattered_symbols_in_order() {
        let s = spec(TaskKind::SelectiveCopying);
        let (tokens, weights) = s.example(20, 3, 7);
        assert_eq!(tokens.len(), 21);
        let region = 21 - 1 - 4;
        let scattered: Vec<u32> = tokens[..region].iter().copied().filter(|&t| t != 0).collect();
        assert_eq!(tokens[region], 1);
        // a scattered symbol may equal blank only if it were id 0, which symbols never are
        assert_eq!(scattered, tokens[region + 1..].to_vec());
        let answers: Vec<usize> = (0..20).filter(|&t| weights[t] == 1.0).collect();
        assert_eq!(answers, (region..region + 4).collect::<Vec<_>>());
        assert_eq!(s.example(20, 3, 7), (tokens, weights), "examples are deterministic");
    }

    #[test]
    fn recall_answers_are_the_paired_values() {
        let s = spec(TaskKind::AssociativeRecall);
        let (tokens, weights) = s.example(31, 1, 2);
        let pairs: std::collections::HashMap<u32, u32> =
            (0..4).map(|i| (tokens[2 * i], tokens[2 * i + 1])).collect();
        assert_eq!(pairs.len(), 4, "keys are distinct");
        let mut answered = 0;
        for t in 0..31 {
            if weights[t] == 1.0 {
                // target t is token t + 1: the value after the query key at t
                assert_eq!(pairs[&tokens[t]], tokens[t + 1]);
                answered += 1;
            }
        }
        assert_eq!(answered, 4);
        assert!(tokens[8..24].iter().all(|&t| t == 0), "blanks between pairs and queries");
    }

    #[test]
    fn sizes_that_do_not_fit_are_rejected() {
        assert!(spec(TaskKind::SelectiveCopying).validate(8).is_err());
        assert!(spec(TaskKind::SelectiveCopying).validate(9).is_ok());
        assert!(spec(TaskKind::AssociativeRecall).validate(14).is_err());
        assert!(spec(TaskKind::AssociativeRecall).validate(15).is_ok());
        let many_keys = TaskSpec { items: 11, ..spec(TaskKind::AssociativeRecall) };
        assert!(many_keys.validate(100).is_err());
    }

    #[test]
    fn the_tokenizer_names_every_symbol() {
        let s = spec(TaskKind::AssociativeRecall);
        let tok = s.tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), 13);
        let (tokens, _) = s.example(31, 1, 2);
        let text = tok.decode(&tokens).unwrap();
        assert_eq!(tok.encode(&text).unwrap(), tokens);
    }
}
