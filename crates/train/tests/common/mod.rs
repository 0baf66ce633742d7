//! Helpers shared by the binary's integration tests: scratch folders, running `polysketch`,
//! and checks on its answers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder under the system temp dir, removed when dropped.
pub struct Scratch {
    root: PathBuf,
}

impl Scratch {
    /// A fresh, empty folder named after the test.
    pub fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("polysketch-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Self { root }
    }

    /// A path inside the folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A path inside the folder, as a command-line argument.
    pub fn arg(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Writes `text` to `rel`, creating parent folders.
    pub fn write(&self, rel: &str, text: impl AsRef<[u8]>) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Runs `polysketch train --config config.toml` with `--set` overrides.
    pub fn train(&self, sets: &[&str]) -> Output {
        let mut args = vec!["train".to_string(), "--config".into(), self.arg("config.toml")];
        for set in sets {
            args.extend(["--set".to_string(), set.to_string()]);
        }
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The `polysketch` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_polysketch"))
}

/// Runs `polysketch` with `args` to completion.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run polysketch")
}

/// Bytes of an output stream as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success, showing stderr otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", text(&out.stderr));
}

/// Asserts a clean failure: non-zero exit, an `error:` line naming `needle`, no panic.
pub fn assert_fails(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.contains("error:") && err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
}

/// Every record of a run's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
