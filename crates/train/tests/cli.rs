//! The `polysketch` binary end to end on a small generated corpus, and its answers to bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder with a small corpus and a tiny config, removed when dropped.
struct Scratch {
    root: PathBuf,
}

const WORDS: &[&str] = &[
    "the", "king", "said", "to", "his", "son", "that", "a", "ship", "sailed", "over", "sea", "and",
    "every", "man", "on", "board", "was", "glad", "of", "light", "morning", "came", "slowly",
    "across", "hills", "where", "old", "woman", "lived", "with", "three", "cats",
];

impl Scratch {
    fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("polysketch-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("texts")).unwrap();
        // three documents of pseudo-random sentences, so both splits have text
        let mut state = 7u64;
        for doc in 0..3 {
            let mut text = String::new();
            for _ in 0..1500 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
                text.push(if (state >> 20).is_multiple_of(11) { '\n' } else { ' ' });
            }
            std::fs::write(root.join("texts").join(format!("doc{doc}.txt")), text).unwrap();
        }
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let config = format!(
            r#"[run]
dir = "{run}"
[data]
dir = "{texts}"
vocab_size = 300
val_fraction = 0.3
cache_dir = "{cache}"
[model]
layers = 1
d_model = 32
heads = 2
[model.attention]
kind = "polysketch"
sketch = "learned"
local_exact = true
sketch_dim = 4
block_size = 8
[train]
seq_len = 32
batch_size = 4
steps = 4
warmup_steps = 1
log_every = 2
eval_every = 2
eval_batches = 2
checkpoint_every = 2
"#,
            run = root.join("run").display(),
            texts = root.join("texts").display(),
            cache = root.join("cache").display(),
        );
        std::fs::write(root.join("config.toml"), config).unwrap();
        Self { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn config(&self) -> String {
        self.path("config.toml").display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn polysketch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_polysketch")).args(args).output().expect("run polysketch")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_fails(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.contains("error:") && err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_eval_generate_and_resume() {
    let s = Scratch::new("e2e");
    let out = polysketch(&["train", "--config", &s.config()]);
    assert!(out.status.success(), "train failed: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("parameters:") && stdout.contains("model.attention.kind"), "{stdout}");

    let run = s.path("run");
    for file in ["config.toml", "tokenizer.json", "metrics.jsonl", "DONE"] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let records = jsonl(&run.join("metrics.jsonl"));
    let steps: Vec<_> = records.iter().filter(|r| r.get("loss").is_some()).collect();
    let evals: Vec<_> = records.iter().filter(|r| r.get("val_loss").is_some()).collect();
    assert_eq!(steps.len(), 2, "{records:?}");
    assert_eq!(evals.len(), 2, "{records:?}");
    for key in ["step", "loss", "lr", "tokens_per_sec"] {
        assert!(steps[0][key].is_number(), "{key} missing in {:?}", steps[0]);
    }
    let ppl = evals[1]["val_ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");

    let run_arg = run.display().to_string();
    let out = polysketch(&["eval", "--run", &run_arg]);
    assert!(out.status.success(), "eval failed: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("val_ppl"), "{}", text(&out.stdout));

    let out =
        polysketch(&["generate", "--run", &run_arg, "--prompt", "the king", "--max-tokens", "12"]);
    assert!(out.status.success(), "generate failed: {}", text(&out.stderr));
    let sample = text(&out.stdout);
    assert!(sample.starts_with("the king") && sample.trim().len() > "the king".len(), "{sample}");
    assert!(text(&out.stderr).contains("tokens/s"));

    // a second run into the same directory is refused; resuming is the way on
    assert_fails(&polysketch(&["train", "--config", &s.config()]), "already holds a run");
    let out = polysketch(&["train", "--resume", &run_arg]);
    assert!(out.status.success(), "resume failed: {}", text(&out.stderr));
}

#[test]
fn attention_is_switched_by_config_alone() {
    let s = Scratch::new("switch");
    for kind in ["softmax", "polynomial"] {
        let dir = format!("run.dir=\"{}\"", s.path(kind).display());
        let out = polysketch(&[
            "train",
            "--config",
            &s.config(),
            "--set",
            &format!("model.attention.kind={kind}"),
            "--set",
            &dir,
            "--set",
            "train.steps=2",
        ]);
        assert!(out.status.success(), "{kind}: {}", text(&out.stderr));
        let config = std::fs::read_to_string(s.path(kind).join("config.toml")).unwrap();
        assert!(config.contains(&format!("kind = \"{kind}\"")), "{config}");
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let s = Scratch::new("bad");
    let cfg = s.config();
    let train = |sets: &[&str]| {
        let mut args = vec!["train", "--config", &cfg];
        for set in sets {
            args.extend(["--set", set]);
        }
        polysketch(&args)
    };
    assert_fails(&polysketch(&["train", "--config", "no/such/config.toml"]), "cannot read config");
    assert_fails(&train(&["train.nope=1"]), "nope");
    assert_fails(&train(&["model.attention.degree=3"]), "degree");
    assert_fails(&train(&["model.attention.sketch_dim=0"]), "sketch_dim");
    assert_fails(&train(&["model.attention.block_size=0"]), "block_size");
    assert_fails(&train(&["model.heads=3"]), "heads");
    assert_fails(&train(&["train.steps"]), "missing `=`");
    let empty = format!("data.dir=\"{}\"", s.path("empty").display());
    assert_fails(&train(&[&empty]), "no .txt files");
    let missing = format!("data.dir=\"{}\"", s.path("missing").display());
    assert_fails(&train(&[&missing]), "missing");
    #[cfg(not(feature = "cuda"))]
    assert_fails(&polysketch(&["train", "--config", &cfg, "--device", "cuda"]), "--features cuda");
    #[cfg(not(feature = "wgpu"))]
    assert_fails(&polysketch(&["train", "--config", &cfg, "--device", "wgpu"]), "--features wgpu");

    std::fs::write(s.path("broken.toml"), "[train]\nsteps = \n").unwrap();
    let broken = s.path("broken.toml").display().to_string();
    assert_fails(&polysketch(&["train", "--config", &broken]), "line 2");
    std::fs::write(s.path("typo.toml"), "[model.atention]\nkind = \"softmax\"\n").unwrap();
    let typo = s.path("typo.toml").display().to_string();
    assert_fails(&polysketch(&["train", "--config", &typo]), "atention");

    assert_fails(
        &polysketch(&["eval", "--run", &s.path("nothing").display().to_string()]),
        "does not exist",
    );
    let bad_device = polysketch(&["train", "--config", &cfg, "--device", "tpu"]);
    assert!(!bad_device.status.success() && text(&bad_device.stderr).contains("tpu"));
    // config errors are caught before the run directory is created
    assert!(!s.path("run").exists(), "a failed start left a run directory behind");
}
