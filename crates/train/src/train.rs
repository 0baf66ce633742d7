//! `polysketch train`: the training loop.

use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::Recorder;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use polysketch_attention::PolysketchBackend;
use polysketch_data::{eval_batches, TokenBatch, WindowSampler};
use polysketch_model::LanguageModel;
use serde_json::json;

use crate::config::{RunConfig, Schedule};
use crate::error::CliError;
use crate::eval::mean_loss;
use crate::progress::{format_duration, Progress};
use crate::run_dir::{write_atomic, RunDir, TrainState};
use crate::session::{
    fingerprint_hex, model_dims, new_model, prepare_corpus, CheckpointRecorder, TokenizerSource,
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

/// Collects `Σ ‖g‖²` over every parameter that has a gradient.
struct GradSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sums.push(g.powi_scalar(2).sum());
        }
    }
}

/// Multiplies every gradient by `factor`.
struct GradScale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// Global gradient norm over all parameters; scales the gradients down to `max_norm` when it is
/// larger (and `max_norm > 0`). Returns the norm before clipping.
fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut squares = GradSquares::<B> { grads, sums: Vec::new() };
    model.visit(&mut squares);
    if squares.sums.is_empty() {
        return 0.0;
    }
    let norm: f64 = Tensor::cat(squares.sums, 0).sum().sqrt().into_scalar().elem();
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        model.visit(&mut GradScale { grads, factor: max_norm / norm });
    }
    norm
}

/// Options of `polysketch train` beyond the config.
pub struct TrainOptions {
    /// Continue the newest checkpoint of the run directory.
    pub resume: bool,
    /// Name of the device, for the settings table.
    pub device_name: String,
}

/// Trains a model as `config` says, in its run directory.
pub fn train<B>(device: B::Device, config: RunConfig, options: TrainOptions) -> Result<(), CliError>
where
    B: AutodiffBackend + PolysketchBackend,
    B::InnerBackend: PolysketchBackend,
{
    let run = RunDir::new(&config.run.dir);
    let say = |s: &str| println!("{s}");
    let corpus = if options.resume {
        prepare_corpus(&config, TokenizerSource::File(&run.tokenizer_path()), &say)?
    } else {
        // data problems surface before anything is written into the run directory
        run.check_free()?;
        let corpus = prepare_corpus(&config, TokenizerSource::FromConfig, &say)?;
        run.create(&config)?;
        corpus.tokenizer.save(&run.tokenizer_path())?;
        corpus
    };
    let t = &config.train;
    let dims = model_dims(&config, &corpus.tokenizer)?;
    B::seed(&device, config.run.seed);

    let mut optim = AdamWConfig::new()
        .with_beta_1(t.beta1 as f32)
        .with_beta_2(t.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(t.weight_decay as f32)
        .init::<B, LanguageModel<B>>();
    let recorder = CheckpointRecorder::default();
    let (mut model, mut state) = if options.resume {
        let (model, state) =
            crate::session::load_checkpoint::<B>(&run, &config, &corpus.tokenizer, &device)?;
        let (_, _, dir) = run.latest_checkpoint()?;
        let path = dir.join("optimizer.bin");
        let bytes = std::fs::read(&path).map_err(|e| CliError::io("read", &path, e))?;
        let record = recorder.load(bytes, &device).map_err(|e| {
            CliError::Run(format!("cannot read `{}`: {e}; the file is damaged", path.display()))
        })?;
        optim = optim.load_record(record);
        (model, state)
    } else {
        let state = TrainState {
            step: 0,
            tokens_seen: 0,
            tokenizer_fingerprint: fingerprint_hex(&corpus.tokenizer),
            vocab: corpus.tokenizer.vocab_size(),
        };
        (new_model::<B>(&config, &dims, &device), state)
    };

    let params = model.num_params();
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

    let sampler = WindowSampler::new(Arc::new(corpus.splits.train), t.seq_len, config.run.seed)?;
    let val_batches =
        eval_batches(&corpus.splits.val, t.seq_len, t.batch_size, Some(t.eval_batches))?;
    let mut metrics = run.metrics()?;
    let progress = Progress::new(state.step, t.steps);
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let mut window_loss = 0.0;
    let mut window_steps = 0u64;
    let mut last_val = None;

    while state.step < t.steps {
        let step = state.step;
        let lr = learning_rate(&config, step);

        // gradients of grad_accum micro-batches, summed, each loss scaled by 1/grad_accum
        let mut accumulator = GradientsAccumulator::new();
        let mut step_loss = 0.0;
        for micro in 0..t.grad_accum {
            let batch = sampler.batch(step * t.grad_accum as u64 + micro as u64, t.batch_size);
            let (inputs, targets) = batch.to_tensors::<B>(&device);
            let loss = model.loss(inputs, targets) / t.grad_accum as f64;
            step_loss += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        let grad_norm = clip_global_norm::<B, _>(&model, &mut grads, t.grad_clip);
        if !step_loss.is_finite() || !grad_norm.is_finite() {
            return Err(CliError::Diverged(format!(
                "the loss ({step_loss}) or gradient norm ({grad_norm}) is not finite at step {}; \
                 the last checkpoint in `{}` is intact; lower train.lr or raise \
                 train.warmup_steps and resume",
                step + 1,
                run.checkpoints_dir().display()
            )));
        }
        model = optim.step(lr, model, grads);
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        window_tokens += tokens_per_step;
        window_loss += step_loss;
        window_steps += 1;

        let done = state.step;
        if done % t.log_every == 0 || done == t.steps {
            let elapsed = window_start.elapsed().as_secs_f64();
            let tokens_per_sec = window_tokens as f64 / elapsed.max(1e-9);
            let loss = window_loss / window_steps as f64;
            metrics.write(&json!({
                "step": done, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                "grad_norm": grad_norm, "tokens": state.tokens_seen,
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
            let val_loss = validate(&model, &val_batches, &device);
            let val_ppl = val_loss.exp();
            metrics.write(&json!({"step": done, "val_loss": val_loss, "val_ppl": val_ppl}))?;
            let trend = match last_val {
                Some(prev) if val_loss < prev => " (falling)",
                Some(_) => " (not falling)",
                None => "",
            };
            progress.line(&format!(
                "eval step {done}: val_loss {val_loss:.4} | val_ppl {val_ppl:.1}{trend}"
            ));
            last_val = Some(val_loss);
        }
        if done % t.checkpoint_every == 0 || done == t.steps {
            let model_bytes = recorder
                .record(model.clone().into_record(), ())
                .map_err(|e| CliError::Run(format!("cannot encode the model: {e}")))?;
            let optim_bytes = recorder
                .record(optim.to_record(), ())
                .map_err(|e| CliError::Run(format!("cannot encode the optimizer: {e}")))?;
            let path =
                run.save_checkpoint(&state, &model_bytes, &optim_bytes, t.keep_checkpoints)?;
            progress.line(&format!("checkpoint: {}", path.display()));
        }
    }
    progress.finish();
    write_atomic(&run.root().join("DONE"), format!("{}\n", state.step).as_bytes())?;
    println!(
        "done: {} steps, {} tokens; run directory `{}`",
        state.step,
        state.tokens_seen,
        run.root().display()
    );
    Ok(())
}

/// Mean validation loss of the model without autodiff.
fn validate<B>(model: &LanguageModel<B>, batches: &[TokenBatch], device: &B::Device) -> f64
where
    B: AutodiffBackend,
    B::InnerBackend: PolysketchBackend,
{
    mean_loss(&model.valid(), batches, device)
}

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

    #[test]
    fn global_norm_clipping_scales_all_gradients_together() {
        use burn::backend::{Autodiff, NdArray};
        type AD = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let a = Param::from_tensor(Tensor::<AD, 1>::from_floats([3.0], &device));
        let b = Param::from_tensor(Tensor::<AD, 1>::from_floats([4.0], &device));
        let model = (a, b);
        // loss = 3a + 4b, so the gradients are 3 and 4: global norm 5
        let loss = model.0.val() * 3.0 + model.1.val() * 4.0;
        let mut grads = GradientsParams::from_grads(loss.sum().backward(), &model);
        let norm = clip_global_norm::<AD, _>(&model, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let ga: f32 = grads.get::<NdArray<f32>, 1>(model.0.id).unwrap().into_scalar();
        let gb: f32 = grads.get::<NdArray<f32>, 1>(model.1.id).unwrap().into_scalar();
        assert!((ga - 0.6).abs() < 1e-5 && (gb - 0.8).abs() < 1e-5, "{ga} {gb}");
    }
}
