//! The `polysketch` binary end to end on a small generated corpus, and its answers to bad input.

mod common;

use common::*;

const WORDS: &[&str] = &[
    "the", "king", "said", "to", "his", "son", "that", "a", "ship", "sailed", "over", "sea", "and",
    "every", "man", "on", "board", "was", "glad", "of", "light", "morning", "came", "slowly",
    "across", "hills", "where", "old", "woman", "lived", "with", "three", "cats",
];

/// A scratch folder with three generated documents, an empty folder and a tiny config.
fn scratch(name: &str) -> Scratch {
    let s = Scratch::new(name);
    // three documents of pseudo-random sentences, so both splits have text
    let mut state = 7u64;
    for doc in 0..3 {
        let mut text = String::new();
        for _ in 0..1500 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
            text.push(if (state >> 20).is_multiple_of(11) { '\n' } else { ' ' });
        }
        s.write(&format!("texts/doc{doc}.txt"), text);
    }
    std::fs::create_dir_all(s.path("empty")).unwrap();
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
        run = s.path("run").display(),
        texts = s.path("texts").display(),
        cache = s.path("cache").display(),
    );
    s.write("config.toml", config);
    s
}

#[test]
fn train_eval_generate_and_resume() {
    let s = scratch("e2e");
    let out = run(&["train", "--config", &s.arg("config.toml")]);
    assert!(out.status.success(), "train failed: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("parameters:") && stdout.contains("model.attention.kind"), "{stdout}");

    let run_dir = s.path("run");
    for file in ["config.toml", "tokenizer.json", "metrics.jsonl", "DONE"] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    let records = metrics(&run_dir);
    let steps: Vec<_> = records.iter().filter(|r| r.get("loss").is_some()).collect();
    let evals: Vec<_> = records.iter().filter(|r| r.get("val_loss").is_some()).collect();
    assert_eq!(steps.len(), 2, "{records:?}");
    assert_eq!(evals.len(), 2, "{records:?}");
    for key in ["step", "loss", "lr", "tokens_per_sec"] {
        assert!(steps[0][key].is_number(), "{key} missing in {:?}", steps[0]);
    }
    let ppl = evals[1]["val_ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");

    let run_arg = run_dir.display().to_string();
    let out = run(&["eval", "--run", &run_arg]);
    assert!(out.status.success(), "eval failed: {}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("val_ppl"), "{report}");
    // seq_len 32: buckets of 4, 4, 8 and 16 positions
    for bucket in ["| 0-3 ", "| 4-7 ", "| 8-15 ", "| 16-31 "] {
        assert!(report.contains(bucket), "{bucket} missing in {report}");
    }

    let out = run(&["generate", "--run", &run_arg, "--prompt", "the king", "--max-tokens", "12"]);
    assert!(out.status.success(), "generate failed: {}", text(&out.stderr));
    let sample = text(&out.stdout);
    assert!(sample.starts_with("the king") && sample.trim().len() > "the king".len(), "{sample}");
    assert!(text(&out.stderr).contains("tokens/s"));

    // a second run into the same directory is refused; resuming is the way on
    assert_fails(&run(&["train", "--config", &s.arg("config.toml")]), "already holds a run");
    let out = run(&["train", "--resume", &run_arg]);
    assert!(out.status.success(), "resume failed: {}", text(&out.stderr));
}

#[test]
fn attention_is_switched_by_config_alone_and_runs_are_plotted() {
    let s = scratch("switch");
    for kind in ["softmax", "polynomial"] {
        let dir = format!("run.dir=\"{}\"", s.path(kind).display());
        let out = run(&[
            "train",
            "--config",
            &s.arg("config.toml"),
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
    let (softmax, polynomial) = (s.arg("softmax"), s.arg("polynomial"));
    let out = run(&["plot", &softmax, &polynomial, "--out", &s.arg("plots")]);
    assert_ok(&out, "plot");
    // one loss line per run, named by its folder; one speed line per attention variant
    for (chart, names) in [
        ("val_loss.svg", ["softmax", "polynomial"]),
        ("tokens_per_sec.svg", ["softmax", "polynomial-p4"]),
    ] {
        let svg = std::fs::read_to_string(s.path("plots").join(chart)).unwrap();
        assert!(names.iter().all(|n| svg.contains(n)), "{chart}: {svg}");
    }
    assert_fails(&run(&["plot", &s.arg("nothing")]), "does not exist");
}

#[test]
fn a_sweep_trains_every_combination_once_and_summarises_them() {
    let s = scratch("sweep");
    s.write(
        "grid.toml",
        r#"[sweep]
token_budget = 512
evaluations = 2
[variants.soft]
"model.attention.kind" = "softmax"
[variants.sketch]
"model.attention.kind" = "polysketch"
[grid]
context = [{ name = "short", "train.seq_len" = 16, "train.batch_size" = 2 }, { name = "long", "train.seq_len" = 32, "train.batch_size" = 1 }]
"#,
    );
    let args = ["sweep", "--config", &s.arg("config.toml"), "--grid", &s.arg("grid.toml")];
    let out_dir = s.arg("sweep");
    let mut args = args.to_vec();
    args.extend(["--out", &out_dir, "--set", "train.eval_batches=1"]);
    // before anything ran, a summary lists every planned run as not run
    let mut summary_only = args.clone();
    summary_only.push("--summary-only");
    assert_ok(&run(&summary_only), "summary before any run");
    let rows = csv_rows(&s.path("sweep/summary.csv"));
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows[1..].iter().all(|r| r[3] == "not run"), "{rows:?}");
    let out = run(&args);
    assert_ok(&out, "sweep");
    let rows = csv_rows(&s.path("sweep/summary.csv"));
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(rows[0][..3], ["run", "variant", "context"]);
    for row in &rows[1..] {
        let loss: f64 = row[3].parse().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{row:?}");
        // 512 tokens: 16 steps of 32 tokens at both lengths
        assert_eq!(row[6], "512", "{row:?}");
    }
    for chart in ["val_loss.svg", "tokens_per_sec.svg"] {
        assert!(s.path("sweep").join(chart).is_file(), "{chart}");
    }
    // a second call finds every run finished and only rewrites the summary
    let again = run(&args);
    assert_ok(&again, "sweep again");
    assert_eq!(text(&again.stderr).matches("finished earlier").count(), 4);
    s.write("bad-grid.toml", "[grid]\n\"run.dir\" = [\"x\"]\n");
    let bad = ["sweep", "--config", &s.arg("config.toml"), "--grid", &s.arg("bad-grid.toml")];
    assert_fails(&run(&bad), "chosen by the sweep");
}

#[test]
fn synthetic_tasks_train_and_report_accuracy_on_the_answers() {
    let s = scratch("task");
    for kind in ["selective_copying", "associative_recall"] {
        let dir = format!("run.dir=\"{}\"", s.path(kind).display());
        let task = format!("data.task.kind=\"{kind}\"");
        let out = s.train(&[&dir, &task, "data.task.items=3", "data.task.symbols=6"]);
        assert_ok(&out, kind);
        let records = metrics(&s.path(kind));
        let evals: Vec<_> = records.iter().filter(|r| r.get("val_accuracy").is_some()).collect();
        assert_eq!(evals.len(), 2, "{kind}: {records:?}");
        let accuracy = evals[1]["val_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{kind}: {accuracy}");
        // the run's tokenizer is the task's word-level one: symbols decode by name
        let tokenizer = std::fs::read_to_string(s.path(kind).join("tokenizer.json")).unwrap();
        assert!(tokenizer.contains("WordLevel") && tokenizer.contains("<sep>"), "{tokenizer}");
        let out = run(&["eval", "--run", &s.arg(kind)]);
        assert_ok(&out, "eval");
        assert!(text(&out.stdout).contains("val_accuracy"), "{}", text(&out.stdout));
    }
    let dir = format!("run.dir=\"{}\"", s.path("too-long").display());
    let too_many = s.train(&[&dir, "data.task.kind=\"associative_recall\"", "data.task.items=9"]);
    assert_fails(&too_many, "4 * data.task.items");
}

/// Rows of a CSV file, header first.
fn csv_rows(path: &std::path::Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| l.split(',').map(String::from).collect()).collect()
}

#[test]
fn benchmarks_write_tables_with_softmax_ratios_and_charts() {
    let s = scratch("bench");
    let small = [
        "--contexts",
        "32,64",
        "--variants",
        "softmax,polysketch-learned-local,polynomial",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--sketch-dim",
        "4",
        "--block-size",
        "16",
        "--vocab",
        "64",
        "--min-seconds",
        "0",
        "--decode-tokens",
        "3",
    ];
    for kind in ["layer", "step", "decode"] {
        let out_dir = s.arg(kind);
        let mut args = vec!["bench", kind, "--out", &out_dir];
        args.extend(small);
        let out = run(&args);
        assert_ok(&out, kind);
        let rows = csv_rows(&s.path(kind).join(format!("{kind}.csv")));
        assert_eq!(rows.len(), 1 + 3 * 2, "{kind}: {rows:?}");
        for row in &rows[1..] {
            // the baseline's own ratio is 1; every measurement is a positive number
            if row[0] == "softmax" {
                assert_eq!(row[3], "1.00", "{kind}: {row:?}");
            }
            let value: f64 = row[2].parse().unwrap();
            assert!(value > 0.0 && value.is_finite(), "{kind}: {row:?}");
        }
        assert!(s.path(kind).join(format!("{kind}.md")).is_file());
        assert!(s.path(kind).join(format!("{kind}.svg")).is_file());
    }
    // decoding keeps a polysketch state of fixed size: the cache does not grow with the prompt
    let rows = csv_rows(&s.path("decode").join("decode.csv"));
    let cache = |variant: &str, prompt: &str| {
        rows.iter().find(|r| r[0] == variant && r[1] == prompt).unwrap()[5].clone()
    };
    assert_eq!(cache("polysketch-learned-local", "32"), cache("polysketch-learned-local", "64"));
    assert_ne!(cache("softmax", "32"), cache("softmax", "64"));
    // a table's chart can be redrawn from its CSV alone
    std::fs::remove_file(s.path("layer/layer.svg")).unwrap();
    assert_ok(&run(&["plot", "--bench", &s.arg("layer/layer.csv")]), "redraw");
    assert!(s.path("layer/layer.svg").is_file());
    assert_fails(&run(&["plot", "--bench", &s.arg("config.toml")]), "not a table");
    // a training step with recomputed blocks is measured like any other
    let out_dir = s.arg("recompute");
    let mut args = vec!["bench", "step", "--recompute", "--recompute-chunk", "24"];
    args.extend(["--out", &out_dir]);
    args.extend(small);
    assert_ok(&run(&args), "step --recompute");
    let rows = csv_rows(&s.path("recompute/step.csv"));
    assert_eq!(rows.len(), 1 + 3 * 2, "{rows:?}");
    let svg = std::fs::read_to_string(s.path("recompute/step.svg")).unwrap();
    assert!(svg.contains("recomputed"), "the chart does not say the blocks were recomputed");
    assert_fails(&run(&["bench", "layer", "--recompute", "--contexts", "8"]), "step");
    assert_fails(&run(&["bench", "layer", "--contexts", "0"]), "positive");
    assert_fails(&run(&["bench", "layer", "--sketch-dim", "0", "--contexts", "8"]), "sketch_dim");
}

#[test]
fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let s = scratch("bad");
    let cfg = s.arg("config.toml");
    let train = |sets: &[&str]| s.train(sets);
    assert_fails(&run(&["train", "--config", "no/such/config.toml"]), "cannot read config");
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
    assert_fails(&run(&["train", "--config", &cfg, "--device", "cuda"]), "--features cuda");
    #[cfg(not(feature = "wgpu"))]
    assert_fails(&run(&["train", "--config", &cfg, "--device", "wgpu"]), "--features wgpu");

    std::fs::write(s.path("broken.toml"), "[train]\nsteps = \n").unwrap();
    let broken = s.path("broken.toml").display().to_string();
    assert_fails(&run(&["train", "--config", &broken]), "line 2");
    std::fs::write(s.path("typo.toml"), "[model.atention]\nkind = \"softmax\"\n").unwrap();
    let typo = s.path("typo.toml").display().to_string();
    assert_fails(&run(&["train", "--config", &typo]), "atention");

    assert_fails(
        &run(&["eval", "--run", &s.path("nothing").display().to_string()]),
        "does not exist",
    );
    let bad_device = run(&["train", "--config", &cfg, "--device", "tpu"]);
    assert!(!bad_device.status.success() && text(&bad_device.stderr).contains("tpu"));
    // config errors are caught before the run directory is created
    assert!(!s.path("run").exists(), "a failed start left a run directory behind");
}
