//! `polysketch bench`: speed and peak memory of every attention variant against context length,
//! for one attention layer, a whole training step and token-by-token decoding. Every number is
//! also given as a ratio against softmax attention measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsAccumulator, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};
use clap::ValueEnum;
use polysketch_attention::{
    AttentionConfig, AttentionKernel, AttentionKind, DecodeCache, PolysketchBackend, SketchKind,
};
use polysketch_model::{LanguageModel, ModelConfig, Preset};

use crate::alloc;
use crate::error::CliError;
use crate::report::{draw_svg, Chart, Scale, Series, Table};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchKind {
    /// Forward and backward pass of one attention layer (kernel and sketch, no projections).
    Layer,
    /// One training step of a whole model: forward, backward and the AdamW update.
    Step,
    /// Decoding tokens one by one after a prompt of each length.
    Decode,
}

/// The attention variants a benchmark compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// Memory-lean exact softmax attention: the baseline of every ratio.
    Softmax,
    /// Memory-lean exact polynomial attention.
    Polynomial,
    /// Polysketch with a Gaussian sketch.
    PolysketchRandom,
    /// Polysketch with a Gaussian sketch and exact local blocks.
    PolysketchRandomLocal,
    /// Polysketch with a learned sketch.
    PolysketchLearned,
    /// Polysketch with a learned sketch and exact local blocks.
    PolysketchLearnedLocal,
}

impl Variant {
    fn name(self) -> String {
        self.to_possible_value().expect("no skipped variants").get_name().to_string()
    }

    fn attention(self, sketch_dim: usize, block_size: usize, degree: u32) -> AttentionConfig {
        let (kind, sketch, local_exact) = match self {
            Variant::Softmax => (AttentionKind::Softmax, SketchKind::Gaussian, false),
            Variant::Polynomial => (AttentionKind::Polynomial, SketchKind::Gaussian, false),
            Variant::PolysketchRandom => (AttentionKind::Polysketch, SketchKind::Gaussian, false),
            Variant::PolysketchRandomLocal => {
                (AttentionKind::Polysketch, SketchKind::Gaussian, true)
            }
            Variant::PolysketchLearned => (AttentionKind::Polysketch, SketchKind::Learned, false),
            Variant::PolysketchLearnedLocal => {
                (AttentionKind::Polysketch, SketchKind::Learned, true)
            }
        };
        AttentionConfig {
            kind,
            sketch,
            local_exact,
            sketch_dim,
            block_size,
            degree,
            ..Default::default()
        }
    }
}

/// Model sizes for the step and decode benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// 4 layers, width 128.
    Tiny,
    /// GPT-2 small.
    Small,
    /// GPT-2 medium.
    Medium,
    /// GPT-2 large.
    Large,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Small => Preset::Small,
            PresetArg::Medium => Preset::Medium,
            PresetArg::Large => Preset::Large,
        }
    }
}

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What to measure.
    pub kind: BenchKind,
    /// Context (or prompt) lengths.
    pub contexts: Vec<usize>,
    /// Variants to compare; softmax is the baseline of the ratios.
    pub variants: Vec<Variant>,
    /// Heads of the layer benchmark.
    pub heads: usize,
    /// Features per head of the layer benchmark.
    pub head_dim: usize,
    /// Model size of the step and decode benchmarks.
    pub preset: PresetArg,
    /// Vocabulary of the step and decode benchmarks.
    pub vocab: usize,
    /// Sequences per batch (layer and step).
    pub batch: usize,
    /// Sketch size `r`.
    pub sketch_dim: usize,
    /// Block size `b`.
    pub block_size: usize,
    /// Degree of polynomial and local exact weights.
    pub degree: u32,
    /// Tokens decoded per measurement (decode).
    pub decode_tokens: usize,
    /// Step: recompute every block in the backward pass, the token-wise work this many
    /// positions at a time (`train.recompute` and `train.recompute_chunk`).
    pub recompute_chunk: Option<usize>,
    /// Timed repetitions after the warm-up run stop once they add up to this many seconds; with
    /// 0 the warm-up run is the only one.
    pub min_seconds: f64,
    /// A variant whose warm-up run takes longer than this skips its longer contexts.
    pub max_seconds: f64,
    /// Folder for the table (markdown, CSV) and the chart (SVG).
    pub out: PathBuf,
    /// Name of the device, for the table's caption.
    pub device_name: String,
}

/// One measured point.
#[derive(Debug, Clone)]
struct Measurement {
    variant: Variant,
    context: usize,
    /// Seconds per token (layer, step) or tokens per second (decode).
    value: f64,
    /// Bytes above the live size at the start of the measurement.
    peak_bytes: usize,
    /// Decode: prompt tokens per second of the parallel prefill.
    prefill_rate: Option<f64>,
    /// Decode: bytes of the decoding caches after the prompt.
    cache_bytes: Option<usize>,
    repetitions: usize,
}

impl Measurement {
    /// A layer or step measurement: seconds per token.
    fn per_token(
        variant: Variant,
        context: usize,
        seconds_per_token: f64,
        peak_bytes: usize,
        repetitions: usize,
    ) -> Self {
        let (prefill_rate, cache_bytes) = (None, None);
        Self {
            variant,
            context,
            value: seconds_per_token,
            peak_bytes,
            prefill_rate,
            cache_bytes,
            repetitions,
        }
    }
}

/// Runs the benchmark and writes `KIND.md`, `KIND.csv` and `KIND.svg` into the output folder.
pub fn bench<B>(device: B::Device, options: BenchOptions) -> Result<(), CliError>
where
    B: AutodiffBackend + PolysketchBackend,
    B::InnerBackend: PolysketchBackend,
{
    if options.contexts.is_empty() || options.contexts.contains(&0) {
        return Err(CliError::Config("--contexts needs positive lengths, e.g. 1024,2048".into()));
    }
    if options.variants.is_empty() {
        return Err(CliError::Config("--variants needs at least one variant".into()));
    }
    match options.recompute_chunk {
        Some(0) => return Err(CliError::Config("--recompute-chunk must be at least 1".into())),
        Some(_) if options.kind != BenchKind::Step => {
            return Err(CliError::Config(
                "--recompute applies to `bench step` only; drop it for layer and decode".into(),
            ))
        }
        _ => {}
    }
    for variant in &options.variants {
        let config = variant.attention(options.sketch_dim, options.block_size, options.degree);
        let max = *options.contexts.iter().max().expect("not empty");
        config
            .validate(options.head_dim, max)
            .map_err(|e| CliError::Config(format!("{}: {e}", variant.name())))?;
    }
    let stem = format!("{:?}", options.kind).to_lowercase();
    let mut results: Vec<Measurement> = Vec::new();
    for &variant in &options.variants {
        let mut too_slow = false;
        for &context in &options.contexts {
            if too_slow {
                eprintln!("{} at {context}: skipped (--max-seconds)", variant.name());
                continue;
            }
            // a measurement that would exhaust memory is skipped, not left to the OOM killer
            let previous = results.iter().rev().find(|m| m.variant == variant);
            if let (Some(m), Some(available)) = (previous, available_bytes()) {
                let needed = m.peak_bytes as f64 * context as f64 / m.context as f64;
                if needed > 0.85 * available as f64 {
                    eprintln!(
                        "{} at {context}: skipped, needs about {:.1} GiB (extrapolated from {}), \
                         {:.1} GiB available",
                        variant.name(),
                        needed / GIB,
                        m.context,
                        available as f64 / GIB
                    );
                    too_slow = true;
                    continue;
                }
            }
            eprint!("{} at {context}: ", variant.name());
            let m = match options.kind {
                BenchKind::Layer => measure_layer::<B>(&device, &options, variant, context),
                BenchKind::Step => measure_step::<B>(&device, &options, variant, context)?,
                BenchKind::Decode => {
                    measure_decode::<B::InnerBackend>(&device, &options, variant, context)?
                }
            };
            too_slow = m.1 > options.max_seconds;
            eprintln!("{}", describe(&options, &m.0));
            results.push(m.0);
            // partial results survive a crash or Ctrl-C of a long benchmark
            let table = table(&options, &results);
            table.save(&options.out, &stem)?;
        }
    }
    let table = table(&options, &results);
    let [markdown, csv] = table.save(&options.out, &stem)?;
    let svg = options.out.join(format!("{stem}.svg"));
    draw_svg(&chart(&options, &results), &svg)?;
    println!("{}", table.markdown());
    eprintln!("wrote {}, {} and {}", markdown.display(), csv.display(), svg.display());
    Ok(())
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Memory the system can still give this process (Linux `MemAvailable`), if known.
fn available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Times `run` once to warm up (and measure peak memory), then repeats it until the repetitions
/// add up to `min_seconds` (at least once, at most 20 times, never when the warm-up alone took
/// longer than `max_seconds` or `min_seconds` is 0, when the warm-up run is the measurement).
/// Returns the median seconds, the peak bytes above the starting live size, the repetitions and
/// the warm-up seconds.
fn time_it(options: &BenchOptions, mut run: impl FnMut()) -> (f64, usize, usize, f64) {
    let start_bytes = alloc::reset_peak();
    let started = Instant::now();
    run();
    let warm_up = started.elapsed().as_secs_f64();
    let peak = alloc::peak_bytes().saturating_sub(start_bytes);
    if warm_up > options.max_seconds || options.min_seconds == 0.0 {
        return (warm_up, peak, 1, warm_up);
    }
    let mut times = Vec::new();
    let mut total = 0.0;
    while times.is_empty() || (total < options.min_seconds && times.len() < 20) {
        let started = Instant::now();
        run();
        let t = started.elapsed().as_secs_f64();
        total += t;
        times.push(t);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], peak, times.len(), warm_up)
}

fn normal<B: Backend>(shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn measure_layer<B>(
    device: &B::Device,
    options: &BenchOptions,
    variant: Variant,
    context: usize,
) -> (Measurement, f64)
where
    B: AutodiffBackend + PolysketchBackend,
{
    B::seed(device, 7);
    let config = variant.attention(options.sketch_dim, options.block_size, options.degree);
    let kernel = AttentionKernel::<B>::new(&config, options.head_dim, 0, device);
    let shape = [options.batch, options.heads, context, options.head_dim];
    let (q, k, v) = (normal::<B>(shape, device), normal(shape, device), normal(shape, device));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let (seconds, peak, reps, warm_up) = time_it(options, || {
        let out = kernel.forward(q.clone(), k.clone(), v.clone());
        let grads = out.sum().backward();
        // reading a gradient waits for asynchronous backends to finish
        let g = q.grad(&grads).expect("query gradient");
        let _: f32 = g.sum().into_scalar().elem();
    });
    let m = Measurement::per_token(
        variant,
        context,
        seconds / (options.batch * context) as f64,
        peak,
        reps,
    );
    (m, warm_up)
}

fn model_config(options: &BenchOptions, variant: Variant) -> ModelConfig {
    let attention = variant.attention(options.sketch_dim, options.block_size, options.degree);
    ModelConfig { preset: options.preset.into(), attention, ..Default::default() }
}

fn random_tokens<B: Backend>(
    batch: usize,
    len: usize,
    vocab: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 2>::random([batch, len], Distribution::Uniform(0.0, vocab as f64), device)
        .int()
        .clamp(0, vocab as i64 - 1)
}

fn measure_step<B>(
    device: &B::Device,
    options: &BenchOptions,
    variant: Variant,
    context: usize,
) -> Result<(Measurement, f64), CliError>
where
    B: AutodiffBackend + PolysketchBackend,
    B::InnerBackend: PolysketchBackend,
{
    B::seed(device, 7);
    let config = model_config(options, variant);
    let dims = config.resolve(options.vocab, context)?;
    let mut model = Some(LanguageModel::<B>::new(&dims, &config.attention, 0.0, device));
    let mut optim = AdamWConfig::new().init::<B, LanguageModel<B>>();
    let inputs = random_tokens::<B>(options.batch, context, options.vocab, device);
    let targets = random_tokens::<B>(options.batch, context, options.vocab, device);
    let (seconds, peak, reps, warm_up) = time_it(options, || {
        let m = model.take().expect("model between steps");
        let mut accumulator = GradientsAccumulator::new();
        let (inputs, targets) = (inputs.clone(), targets.clone());
        let chunk = options.recompute_chunk;
        m.accumulate_gradients(inputs, targets, None, 1.0, chunk, &mut accumulator);
        model = Some(optim.step(1e-4, m, accumulator.grads()));
        // asynchronous backends finish the step before the clock stops
        let _ = B::sync(device);
    });
    let m = Measurement::per_token(
        variant,
        context,
        seconds / (options.batch * context) as f64,
        peak,
        reps,
    );
    Ok((m, warm_up))
}

fn measure_decode<B>(
    device: &B::Device,
    options: &BenchOptions,
    variant: Variant,
    context: usize,
) -> Result<(Measurement, f64), CliError>
where
    B: PolysketchBackend,
{
    B::seed(device, 7);
    let config = model_config(options, variant);
    let dims = config.resolve(options.vocab, context + options.decode_tokens)?;
    let model = LanguageModel::<B>::new(&dims, &config.attention, 0.0, device);
    let prompt = random_tokens::<B>(1, context, options.vocab, device);
    let next = random_tokens::<B>(1, options.decode_tokens, options.vocab, device);
    let start_bytes = alloc::reset_peak();
    let started = Instant::now();
    let (logits, caches) = model.prefill(prompt);
    let _: f32 = logits.sum().into_scalar().elem();
    let prefill = started.elapsed().as_secs_f64();
    let cache_bytes: usize = caches.iter().map(DecodeCache::elements).sum::<usize>() * 4;
    let (seconds, peak, reps, _) = time_it(options, || {
        let mut caches = caches.clone();
        for i in 0..options.decode_tokens {
            let token = next.clone().narrow(1, i, 1);
            let logits = model.forward_step(token, context + i, &mut caches);
            let _: f32 = logits.sum().into_scalar().elem();
        }
    });
    let m = Measurement {
        variant,
        context,
        value: options.decode_tokens as f64 / seconds,
        peak_bytes: peak.max(alloc::peak_bytes().saturating_sub(start_bytes)),
        prefill_rate: Some(context as f64 / prefill),
        cache_bytes: Some(cache_bytes),
        repetitions: reps,
    };
    Ok((m, prefill + seconds))
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

fn describe(options: &BenchOptions, m: &Measurement) -> String {
    match options.kind {
        BenchKind::Decode => format!(
            "{:.1} tokens/s after a prompt read at {:.0} tokens/s; cache {} MiB",
            m.value,
            m.prefill_rate.unwrap_or(0.0),
            mib(m.cache_bytes.unwrap_or(0))
        ),
        _ => format!(
            "{:.2} µs/token, peak {} MiB ({} timed runs)",
            m.value * 1e6,
            mib(m.peak_bytes),
            m.repetitions
        ),
    }
}

fn ratio(value: f64, baseline: Option<f64>) -> String {
    match baseline {
        Some(b) if b > 0.0 => format!("{:.2}", value / b),
        _ => "-".into(),
    }
}

fn table(options: &BenchOptions, results: &[Measurement]) -> Table {
    let baseline = |context: usize| {
        results.iter().find(|m| m.variant == Variant::Softmax && m.context == context)
    };
    // the allocator sees host memory only: on a GPU the column is not the device's memory
    let peak = if options.device_name == "cpu" { "peak MiB" } else { "peak host MiB" };
    match options.kind {
        BenchKind::Decode => {
            let mut t = Table::new(&[
                "variant",
                "prompt",
                "decode tokens/s",
                "vs softmax",
                "prefill tokens/s",
                "cache MiB",
                peak,
            ]);
            for m in results {
                let base = baseline(m.context).map(|b| b.value);
                t.push(vec![
                    m.variant.name(),
                    m.context.to_string(),
                    format!("{:.1}", m.value),
                    ratio(m.value, base),
                    format!("{:.0}", m.prefill_rate.unwrap_or(0.0)),
                    mib(m.cache_bytes.unwrap_or(0)),
                    mib(m.peak_bytes),
                ]);
            }
            t
        }
        _ => {
            let mut t = Table::new(&[
                "variant",
                "context",
                "µs/token",
                "time vs softmax",
                peak,
                "memory vs softmax",
                "timed runs",
            ]);
            for m in results {
                let base = baseline(m.context);
                t.push(vec![
                    m.variant.name(),
                    m.context.to_string(),
                    format!("{:.3}", m.value * 1e6),
                    ratio(m.value, base.map(|b| b.value)),
                    mib(m.peak_bytes),
                    ratio(m.peak_bytes as f64, base.map(|b| b.peak_bytes as f64)),
                    m.repetitions.to_string(),
                ]);
            }
            t
        }
    }
}

fn chart(options: &BenchOptions, results: &[Measurement]) -> Chart {
    let points: Vec<(String, f64, f64)> = results
        .iter()
        .map(|m| {
            let y = if options.kind == BenchKind::Decode { m.value } else { m.value * 1e6 };
            (m.variant.name(), m.context as f64, y)
        })
        .collect();
    let title = match options.kind {
        BenchKind::Layer => format!(
            "One attention layer, forward + backward ({} heads of {}, r = {}, b = {}, {})",
            options.heads,
            options.head_dim,
            options.sketch_dim,
            options.block_size,
            options.device_name
        ),
        BenchKind::Step => {
            let recompute = match options.recompute_chunk {
                Some(chunk) => format!(", blocks recomputed in slices of {chunk}"),
                None => String::new(),
            };
            format!(
                "Training step, {:?} model ({}{recompute})",
                options.preset, options.device_name
            )
            .to_lowercase()
        }
        BenchKind::Decode => {
            format!("Decoding, {:?} model ({})", options.preset, options.device_name).to_lowercase()
        }
    };
    chart_of(options.kind, title, &points)
}

/// A benchmark chart: one line per variant through `(variant, context, value)` points, value
/// in µs per token (layer, step) or tokens per second (decode).
fn chart_of(kind: BenchKind, title: String, points: &[(String, f64, f64)]) -> Chart {
    let mut names: Vec<&String> = Vec::new();
    for (name, _, _) in points {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let series = names
        .into_iter()
        .map(|name| Series {
            name: name.clone(),
            points: points.iter().filter(|p| &p.0 == name).map(|p| (p.1, p.2)).collect(),
        })
        .collect();
    let (x_label, y_label) = match kind {
        BenchKind::Decode => ("prompt length", "tokens per second"),
        _ => ("context length", "µs per token"),
    };
    Chart {
        title,
        x_label: x_label.into(),
        y_label: y_label.into(),
        x_scale: Scale::Log2,
        y_scale: Scale::Log10,
        series,
    }
}

/// Draws the chart of a benchmark table written by `polysketch bench` (`KIND.csv`) as
/// `KIND.svg` beside it, e.g. for the part of a long benchmark that finished; returns its path.
pub fn redraw(csv: &std::path::Path) -> Result<PathBuf, CliError> {
    let bad = |why: String| CliError::Run(format!("`{}`: {why}", csv.display()));
    let text = std::fs::read_to_string(csv).map_err(|e| CliError::io("read", csv, e))?;
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| bad("empty file".into()))?;
    let kind = match header.split(',').nth(2) {
        Some("decode tokens/s") => BenchKind::Decode,
        Some("µs/token") => BenchKind::Layer,
        _ => return Err(bad("not a table written by polysketch bench".into())),
    };
    let mut points = Vec::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        let number = |i: usize| -> Result<f64, CliError> {
            cells
                .get(i)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad(format!("bad row `{line}`")))
        };
        points.push((cells[0].to_string(), number(1)?, number(2)?));
    }
    let stem = csv.file_stem().map_or("bench".into(), |s| s.to_string_lossy().to_string());
    let title = match kind {
        BenchKind::Decode => "Decoding speed against prompt length".to_string(),
        _ => format!("{stem}: forward + backward time per token"),
    };
    let svg = csv.with_extension("svg");
    draw_svg(&chart_of(kind, title, &points), &svg)?;
    Ok(svg)
}
