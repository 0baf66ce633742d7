//! `polysketch train`: the training loop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsAccumulator, Optimizer};
use burn::record::Recorder;
use burn::tensor::backend::AutodiffBackend;
use polysketch_attention::PolysketchBackend;
use polysketch_model::LanguageModel;
use serde_json::json;

use crate::config::{RunConfig, Schedule};
use crate::error::CliError;
use crate::eval::evaluate;
use crate::grads::clip_global_norm;
use crate::progress::{format_duration, Progress};
use crate::run_dir::{write_atomic, RunDir, TrainState};
use crate::session::{
    fingerprint_hex, load_checkpoint, load_record_bytes, model_dims, new_model, prepare_data,
    CheckpointRecorder, TokenizerSource,
};

/// Learning rate at `step`: linear warmup from zero, then the configured decay to `min_lr`.
pub fn learning_rate(config: &RunConfig, step: u64) -> f64 {
    let t = &config.train;
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
    match t.schedule {
        Schedule::Constant => t.lr,
        Schedule::Linear => t.lr - (t.lr - t.min_lr) * progress,
        Schedule::Cosine => {
            t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Options of `polysketch train` beyond the config.
pub struct TrainOptions {
    /// Continue the newest checkpoint of the run directory.
    pub resume: bool,
    /// Name of the device, for the settings table.
    pub device_name: String,
}

/// Set by Ctrl-C or SIGTERM: the loop saves a checkpoint after the current step and stops.
static STOP: AtomicBool = AtomicBool::new(false);

/// First signal: stop after the current step with a checkpoint. Second: exit at once.
fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (again to exit at once)");
    });
}

/// Seed of step `step`: dropout and any other randomness of a step depend on the run's seed
/// and the step alone, so a resumed run draws what the uninterrupted one would have.
fn step_seed(seed: u64, step: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

/// Everything the loop carries between steps.
struct Trainer<B: AutodiffBackend, O> {
    model: LanguageModel<B>,
    optim: O,
    state: TrainState,
}

/// Writes model, optimizer state and progress as the run's newest checkpoint.
fn save<B, O>(run: &RunDir, trainer: &Trainer<B, O>, keep: usize) -> Result<PathBuf, CliError>
where
    B: AutodiffBackend,
    O: Optimizer<LanguageModel<B>, B>,
{
    let recorder = CheckpointRecorder::default();
    let model = recorder
        .record(trainer.model.clone().into_record(), ())
        .map_err(|e| CliError::Run(format!("cannot encode the model: {e}")))?;
    let optimizer = recorder
        .record(trainer.optim.to_record(), ())
        .map_err(|e| CliError::Run(format!("cannot encode the optimizer: {e}")))?;
    run.save_checkpoint(&trainer.state, &model, &optimizer, keep)
}

/// Trains a model as `config` says, in its run directory.
pub fn train<B>(device: B::Device, config: RunConfig, options: TrainOptions) -> Result<(), CliError>
where
    B: AutodiffBackend + PolysketchBackend,
    B::InnerBackend: PolysketchBackend,
{
    let run = RunDir::new(&config.run.dir);
    let say = |s: &str| println!("{s}");
    let resume = options.resume;
    let has_tokenizer = resume && run.tokenizer_path().is_file();
    let source = if has_tokenizer {
        TokenizerSource::File(&run.tokenizer_path())
    } else {
        TokenizerSource::FromConfig
    };
    if !resume {
        run.check_free()?;
    }
    let t = &config.train;
    // data problems (a split shorter than one window) surface before anything is written
    let data = prepare_data(&config, source, Some(t.eval_batches), &say)?;
    let (tokenizer, train_batches, val_batches) = (data.tokenizer, data.train, data.val);
    if !resume {
        run.create(&config)?;
    }
    if !has_tokenizer {
        tokenizer.save(&run.tokenizer_path())?;
    }
    run.remove_partial_checkpoints()?;
    let dims = model_dims(&config, &tokenizer)?;
    B::seed(&device, config.run.seed);

    let optim = AdamWConfig::new()
        .with_beta_1(t.beta1 as f32)
        .with_beta_2(t.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(t.weight_decay as f32)
        .init::<B, LanguageModel<B>>();
    let fresh_state = TrainState {
        step: 0,
        tokens_seen: 0,
        tokenizer_fingerprint: fingerprint_hex(&tokenizer),
        vocab: tokenizer.vocab_size(),
    };
    let mut trainer = if resume && !run.checkpoint_steps()?.is_empty() {
        let (model, state, dir) = load_checkpoint::<B>(&run, &config, &tokenizer, &device)?;
        let path = dir.join("optimizer.bin");
        let bytes = std::fs::read(&path).map_err(|e| CliError::io("read", &path, e))?;
        let record = load_record_bytes(bytes, &device).map_err(|e| {
            CliError::Run(format!(
                "cannot read `{}`: {e}; the checkpoint is damaged, delete `{}` to fall back to \
                 the previous one",
                path.display(),
                dir.display()
            ))
        })?;
        say(&format!("resuming from `{}` at step {}", dir.display(), state.step));
        Trainer { model, optim: optim.load_record(record), state }
    } else {
        if resume {
            say("no checkpoint yet: starting the run from step 0");
        }
        Trainer { model: new_model::<B>(&config, &dims, &device), optim, state: fresh_state }
    };
    run.truncate_metrics(trainer.state.step)?;

    let params = trainer.model.num_params();
    let tokens_per_step = (t.batch_size * t.seq_len * t.grad_accum) as u64;
    println!("settings:");
    print!(
        "{}",
        config.settings_table(&[
            ("device", options.device_name.clone()),
            ("model.parameters", format!("{params} ({:.2}M)", params as f64 / 1e6)),
            ("model.head_dim", dims.head_dim().to_string()),
            ("model.vocab", dims.vocab.to_string()),
            ("train.tokens_per_step", tokens_per_step.to_string()),
        ])
    );
    println!("parameters: {params}");

    let mut metrics = run.metrics()?;
    let progress = Progress::new(trainer.state.step, t.steps);
    install_signal_handler();
    let mut window_start = Instant::now();
    let (mut window_tokens, mut window_loss, mut window_steps) = (0u64, 0.0, 0u64);
    let mut last_val = None;
    let mut skipped_in_a_row = 0;
    while trainer.state.step < t.steps {
        let step = trainer.state.step;
        let lr = learning_rate(&config, step);
        B::seed(&device, step_seed(config.run.seed, step));

        // gradients of grad_accum micro-batches, summed, each loss scaled by 1/grad_accum
        let mut accumulator = GradientsAccumulator::new();
        let mut step_loss = 0.0;
        for micro in 0..t.grad_accum {
            let index = step * t.grad_accum as u64 + micro as u64;
            let batch = train_batches.batch(index, t.batch_size);
            let (inputs, targets) = batch.to_tensors::<B>(&device);
            step_loss += trainer.model.accumulate_gradients(
                inputs,
                targets,
                batch.weights_tensor::<B>(&device),
                1.0 / t.grad_accum as f64,
                t.recompute.then_some(t.recompute_chunk),
                &mut accumulator,
            );
        }
        let mut grads = accumulator.grads();
        let grad_norm = clip_global_norm::<B, _>(&trainer.model, &mut grads, t.grad_clip);
        let finite = step_loss.is_finite() && grad_norm.is_finite();
        if !finite && !t.skip_nonfinite_steps {
            return Err(CliError::Diverged(format!(
                "the loss ({step_loss}) or gradient norm ({grad_norm}) is not finite at step {}; \
                 the last checkpoint in `{}` is intact; lower train.lr or raise \
                 train.warmup_steps and resume, or set train.skip_nonfinite_steps = true",
                step + 1,
                run.checkpoints_dir().display()
            )));
        }
        if finite {
            skipped_in_a_row = 0;
            trainer.model = trainer.optim.step(lr, trainer.model, grads);
        } else {
            skipped_in_a_row += 1;
            progress
                .line(&format!("step {}: non-finite loss or gradient, update skipped", step + 1));
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW {
                return Err(CliError::Diverged(format!(
                    "{MAX_SKIPPED_IN_A_ROW} steps in a row had a non-finite loss or gradient \
                     (last: step {}); lower train.lr and resume from `{}`",
                    step + 1,
                    run.checkpoints_dir().display()
                )));
            }
        }
        trainer.state.step += 1;
        trainer.state.tokens_seen += tokens_per_step;
        window_tokens += tokens_per_step;
        window_loss += step_loss;
        window_steps += 1;

        let done = trainer.state.step;
        if done % t.log_every == 0 || done == t.steps {
            let elapsed = window_start.elapsed().as_secs_f64();
            let tokens_per_sec = window_tokens as f64 / elapsed.max(1e-9);
            let loss = window_loss / window_steps as f64;
            metrics.write(&json!({
                "step": done, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                "grad_norm": grad_norm, "tokens": trainer.state.tokens_seen,
            }))?;
            let summary = format!("loss {loss:.4} | {tokens_per_sec:.0} tok/s");
            let line = format!(
                "step {done:>6}/{} | loss {loss:.4} | lr {lr:.2e} | grad {grad_norm:.2} | \
                 {tokens_per_sec:.0} tok/s | eta {}",
                t.steps,
                format_duration(progress.eta(done))
            );
            progress.step(done, &summary, Some(&line));
            (window_start, window_tokens, window_loss, window_steps) = (Instant::now(), 0, 0.0, 0);
        } else {
            progress.step(done, &format!("loss {step_loss:.4}"), None);
        }

        if done % t.eval_every == 0 || done == t.steps {
            let (val_loss, accuracy) = evaluate(&trainer.model.valid(), &val_batches, &device);
            let val_ppl = val_loss.exp();
            let mut record = json!({"step": done, "val_loss": val_loss, "val_ppl": val_ppl});
            if let Some(a) = accuracy {
                record["val_accuracy"] = json!(a);
            }
            metrics.write(&record)?;
            let trend = match last_val {
                Some(prev) if val_loss < prev => " (falling)",
                Some(_) => " (not falling)",
                None => "",
            };
            let accuracy = accuracy.map_or(String::new(), |a| format!(" | accuracy {a:.3}"));
            progress.line(&format!(
                "eval step {done}: val_loss {val_loss:.4} | val_ppl {val_ppl:.1}{accuracy}{trend}"
            ));
            last_val = Some(val_loss);
        }
        let stop = STOP.load(Ordering::SeqCst);
        if done % t.checkpoint_every == 0 || done == t.steps || stop {
            let path = save(&run, &trainer, t.keep_checkpoints)?;
            progress.line(&format!("checkpoint: {}", path.display()));
        }
        if stop {
            progress.finish();
            return Err(CliError::Interrupted(format!(
                "stopped at step {done}; continue with `polysketch train --resume {}`",
                run.root().display()
            )));
        }
    }
    progress.finish();
    let done = serde_json::json!({
        "step": trainer.state.step,
        "tokens_seen": trainer.state.tokens_seen,
        "parameters": params,
    });
    write_atomic(&run.root().join("DONE"), format!("{done}\n").as_bytes())?;
    println!(
        "done: {} steps, {} tokens; run directory `{}`",
        trainer.state.step,
        trainer.state.tokens_seen,
        run.root().display()
    );
    Ok(())
}

/// Non-finite steps skipped in a row before a run with `skip_nonfinite_steps` gives up.
const MAX_SKIPPED_IN_A_ROW: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min_lr() {
        let mut config = RunConfig::default();
        config.train.steps = 110;
        config.train.warmup_steps = 10;
        config.train.lr = 1.0;
        config.train.min_lr = 0.1;
        assert!((learning_rate(&config, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&config, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&config, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&config, 60) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&config, 110) - 0.1).abs() < 1e-12);
        config.train.schedule = Schedule::Linear;
        assert!((learning_rate(&config, 35) - 0.775).abs() < 1e-12);
    }
}
