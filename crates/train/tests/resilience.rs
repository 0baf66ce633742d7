//! Checkpoints, exact resume, interruption and damaged files: the binary must never lose a
//! run or answer with a panic.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TEXT: &str = "the king said to his son that a ship sailed over the sea and every man on \
board was glad of the light when morning came slowly across the hills where an old woman \
lived with three cats and a dog who barked at the moon ";

/// A scratch folder with a small corpus and a tiny config (dropout on, so resuming must
/// reproduce the random masks too).
fn scratch(name: &str) -> Scratch {
    let s = Scratch::new(name);
    let words: Vec<&str> = TEXT.split(' ').collect();
    for doc in 0..3 {
        let text: String = (0..4000)
            .map(|i| words[(i * 7 + doc * 3 + i / 13) % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        s.write(&format!("texts/doc{doc}.txt"), text);
    }
    let config = format!(
        "[run]\ndir = \"{run}\"\n[data]\ndir = \"{texts}\"\nvocab_size = 280\n\
         val_fraction = 0.3\ncache_dir = \"{cache}\"\n[model]\nlayers = 1\nd_model = 32\n\
         heads = 2\ndropout = 0.1\n[model.attention]\nsketch_dim = 4\nblock_size = 8\n\
         [train]\nseq_len = 32\nbatch_size = 4\nsteps = 8\nwarmup_steps = 2\nlog_every = 1\n\
         eval_every = 4\neval_batches = 1\ncheckpoint_every = 4\nkeep_checkpoints = 5\n",
        run = s.path("run").display(),
        texts = s.path("texts").display(),
        cache = s.path("cache").display(),
    );
    s.write("config.toml", config);
    s
}

/// `(step, loss)` of every logging record.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn resumed_losses_equal_the_uninterrupted_run_step_for_step() {
    let s = scratch("exact");
    assert_ok(&s.train(&[]), "train");
    let full = losses(&s.path("run"));
    assert_eq!(full.len(), 8);

    // the same run as if it had stopped right after its step-4 checkpoint
    let cut = s.path("cut");
    copy_dir(&s.path("run"), &cut);
    std::fs::remove_dir_all(cut.join("checkpoints/step-00000008")).unwrap();
    std::fs::remove_file(cut.join("DONE")).unwrap();
    let config = std::fs::read_to_string(cut.join("config.toml")).unwrap();
    let config = config.replace(&s.arg("run"), &cut.display().to_string());
    std::fs::write(cut.join("config.toml"), config).unwrap();

    assert_ok(&run(&["train", "--resume", &cut.display().to_string()]), "resume");
    assert_eq!(losses(&cut), full, "resumed losses differ from the uninterrupted run");
}

#[test]
fn recomputed_blocks_train_like_the_ordinary_backward_pass() {
    let s = scratch("recompute");
    let plain_dir = format!("run.dir=\"{}\"", s.path("plain").display());
    assert_ok(&s.train(&[&plain_dir, "model.dropout=0"]), "plain");
    // slices of 12 positions: the 32-token windows split unevenly and across sketch blocks
    let recomputed_dir = format!("run.dir=\"{}\"", s.path("recomputed").display());
    let sets =
        [&recomputed_dir, "model.dropout=0", "train.recompute=true", "train.recompute_chunk=12"];
    assert_ok(&s.train(&sets), "recomputed");
    let (plain, recomputed) = (losses(&s.path("plain")), losses(&s.path("recomputed")));
    assert_eq!(plain.len(), 8);
    assert_eq!(plain.len(), recomputed.len());
    for ((step, a), (_, b)) in plain.iter().zip(&recomputed) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "step {step}: loss {a} vs {b} recomputed");
    }
    // sums taken in another order round differently: equal losses would mean the setting
    // was ignored
    assert_ne!(plain, recomputed, "train.recompute changed nothing");
    // a recomputed block would draw new dropout masks: refused before anything is written
    let refused_dir = format!("run.dir=\"{}\"", s.path("refused").display());
    assert_fails(&s.train(&[&refused_dir, "train.recompute=true"]), "model.dropout");
    assert!(!s.path("refused").exists());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let s = scratch("sigint");
    let child = bin()
        .args(["train", "--config", &s.arg("config.toml"), "--set", "train.steps=1000000"])
        .args(["--set", "train.checkpoint_every=1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = s.path("run/metrics.jsonl");
    let started = Instant::now();
    while !metrics.exists() || std::fs::read_to_string(&metrics).unwrap().lines().count() < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--resume"), "{}", text(&out.stderr));
    let checkpoints: Vec<_> = std::fs::read_dir(s.path("run/checkpoints")).unwrap().collect();
    assert_eq!(checkpoints.len(), 1, "no checkpoint written on interrupt");
    assert_ok(&run(&["eval", "--run", &s.arg("run"), "--max-batches", "1"]), "eval");
}

#[test]
fn sigkill_at_random_moments_never_costs_the_run() {
    let s = scratch("sigkill");
    let sets = ["train.steps=60", "train.checkpoint_every=3", "train.eval_every=20"];
    let mut args = vec!["train".to_string(), "--config".into(), s.arg("config.toml")];
    for set in sets {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    let resume = ["train".to_string(), "--resume".into(), s.arg("run")];
    // a fixed pseudo-random schedule of kill delays, so failures reproduce
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for attempt in 0..5 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = Duration::from_millis(150 + state % 900);
        let command =
            if attempt == 0 || !s.path("run/config.toml").exists() { &args } else { &resume[..] };
        let mut child =
            bin().args(command).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
    }
    // then resume until the run completes
    for _ in 0..5 {
        if s.path("run/DONE").exists() {
            break;
        }
        let command = if s.path("run/config.toml").exists() { &resume[..] } else { &args };
        let out = bin().args(command).output().unwrap();
        assert_ok(&out, "resume after kills");
    }
    assert!(s.path("run/DONE").exists(), "the run never finished");
    let steps: Vec<u64> = losses(&s.path("run")).iter().map(|(step, _)| *step).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>(), "the metrics log has gaps or repeats");
    assert_ok(&run(&["eval", "--run", &s.arg("run"), "--max-batches", "1"]), "eval");
}

#[test]
fn damaged_or_foreign_files_get_clear_errors() {
    let s = scratch("damaged");
    assert_ok(&s.train(&[]), "train");
    let run_dir = s.arg("run");
    let eval = || run(&["eval", "--run", &run_dir, "--max-batches", "1"]);
    assert_ok(&eval(), "eval");

    // a checkpoint truncated in the middle
    let model = s.path("run/checkpoints/step-00000008/model.bin");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&eval(), "step-00000008");
    std::fs::write(&model, &bytes).unwrap();

    // a config that describes another model than the checkpoint holds
    let config_path = s.path("run/config.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, config.replace("d_model = 32", "d_model = 64")).unwrap();
    assert_fails(&eval(), "another shape");
    std::fs::write(&config_path, &config).unwrap();

    // a corrupt tokenizer, then a valid tokenizer of another run
    let tokenizer = s.path("run/tokenizer.json");
    let original = std::fs::read(&tokenizer).unwrap();
    std::fs::write(&tokenizer, b"{ not json").unwrap();
    assert_fails(&eval(), "tokenizer");
    assert_ok(
        &s.train(&["data.vocab_size=300", &format!("run.dir=\"{}\"", s.arg("other"))]),
        "other",
    );
    std::fs::copy(s.path("other/tokenizer.json"), &tokenizer).unwrap();
    assert_fails(&eval(), "not the one");
    std::fs::write(&tokenizer, original).unwrap();
    assert_ok(&eval(), "eval after repair");

    // a missing checkpoint
    std::fs::remove_dir_all(s.path("run/checkpoints")).unwrap();
    assert_fails(&eval(), "no checkpoint");
}

#[test]
fn divergence_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let s = scratch("diverge");
    let out =
        s.train(&["train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0", "train.min_lr=0"]);
    assert_fails(&out, "not finite at step");
    let out = s.train(&[
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        "train.min_lr=0",
        "train.skip_nonfinite_steps=true",
        &format!("run.dir=\"{}\"", s.arg("skip")),
        "train.steps=30",
    ]);
    assert_fails(&out, "in a row");
}

#[test]
fn bad_corpora_are_reported() {
    let s = scratch("corpus");
    std::fs::create_dir_all(s.path("short")).unwrap();
    std::fs::write(s.path("short/a.txt"), "a few words only").unwrap();
    std::fs::write(s.path("short/b.txt"), "and a few more").unwrap();
    let short = format!("data.dir=\"{}\"", s.arg("short"));
    assert_fails(&s.train(&[&short, "data.vocab_size=260"]), "seq_len");
    std::fs::create_dir_all(s.path("binary")).unwrap();
    std::fs::write(s.path("binary/a.txt"), b"text\0\x01\x02binary").unwrap();
    let binary = format!("data.dir=\"{}\"", s.arg("binary"));
    assert_fails(&s.train(&[&binary]), "a.txt");
    assert!(!s.path("run").exists(), "a failed start left a run directory behind");
}
