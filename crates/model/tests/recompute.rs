//! Training gradients with recomputed blocks equal those of the ordinary backward pass, for
//! every attention variant, with and without per-token weights.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use polysketch_attention::{AttentionConfig, AttentionKind, SketchKind};
use polysketch_model::{LanguageModel, ModelConfig, Preset};

type AD = Autodiff<NdArray<f64>>;

const VOCAB: usize = 40;
const BATCH: usize = 2;
const SEQ: usize = 21;

fn variants() -> Vec<AttentionConfig> {
    let base = AttentionConfig { sketch_dim: 4, block_size: 8, ..Default::default() };
    let mut out = vec![
        AttentionConfig { kind: AttentionKind::Softmax, ..base.clone() },
        AttentionConfig { kind: AttentionKind::Polynomial, ..base.clone() },
    ];
    for sketch in [SketchKind::Gaussian, SketchKind::Learned] {
        for local_exact in [false, true] {
            out.push(AttentionConfig { sketch, local_exact, ..base.clone() });
        }
    }
    out
}

fn model(attention: AttentionConfig) -> LanguageModel<AD> {
    let cfg = ModelConfig {
        preset: Preset::Tiny,
        layers: Some(2),
        d_model: Some(16),
        heads: Some(2),
        attention,
        ..Default::default()
    };
    let dims = cfg.resolve(VOCAB, SEQ).unwrap();
    LanguageModel::new(&dims, &cfg.attention, 0.0, &Default::default())
}

fn ids(offset: i64) -> Tensor<AD, 2, Int> {
    let values: Vec<i64> =
        (0..(BATCH * SEQ) as i64).map(|i| (i * i * 3 + i * 5 + offset) % VOCAB as i64).collect();
    Tensor::from_data(TensorData::new(values, [BATCH, SEQ]), &Default::default())
}

/// Compares every parameter's gradient in two sets, recording the largest relative difference.
struct Compare<'a> {
    expected: &'a GradientsParams,
    actual: &'a GradientsParams,
    compared: usize,
    worst: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let expected = self.expected.get::<B::InnerBackend, D>(param.id);
        let actual = self.actual.get::<B::InnerBackend, D>(param.id);
        let (Some(expected), Some(actual)) = (expected, actual) else {
            // a parameter without a gradient in both sets is fine (the random sketch's
            // projections are constants); in one set only, it is a missing piece
            assert!(
                self.expected.get::<B::InnerBackend, D>(param.id).is_none()
                    && self.actual.get::<B::InnerBackend, D>(param.id).is_none(),
                "a gradient of shape {:?} is missing from one of the sets",
                param.dims()
            );
            return;
        };
        let e: Vec<f64> = expected.into_data().convert::<f64>().to_vec().unwrap();
        let a: Vec<f64> = actual.into_data().convert::<f64>().to_vec().unwrap();
        let scale = e.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        for (x, y) in e.iter().zip(&a) {
            let diff = (x - y).abs() / scale;
            // NaN counts as a failure
            self.worst = if diff.is_nan() { f64::INFINITY } else { self.worst.max(diff) };
        }
        self.compared += 1;
    }
}

fn check(weighted: bool) {
    for attention in variants() {
        let model = model(attention.clone());
        let (inputs, targets) = (ids(1), ids(2));
        let weights: Option<Tensor<AD, 2>> = weighted.then(|| {
            let w: Vec<f64> = (0..BATCH * SEQ).map(|i| (i % 3) as f64 * 0.5).collect();
            Tensor::from_data(TensorData::new(w, [BATCH, SEQ]), &Default::default())
        });
        let scale = 0.25;

        let losses = model.token_losses(inputs.clone(), targets.clone());
        let loss = match &weights {
            Some(w) => (losses * w.clone()).sum() / w.clone().sum(),
            None => losses.mean(),
        } * scale;
        let expected_loss: f64 = loss.clone().into_scalar();
        let expected = GradientsParams::from_grads(loss.backward(), &model);

        let mut accumulator = GradientsAccumulator::new();
        // 8 positions per slice: three slices, the last one partial, none aligned to blocks
        let actual_loss =
            model.recomputed_gradients(inputs, targets, weights, scale, 8, &mut accumulator);
        let actual = accumulator.grads();

        assert!(
            (actual_loss - expected_loss).abs() < 1e-12,
            "{attention:?}: loss {actual_loss} vs {expected_loss}"
        );
        let mut compare = Compare { expected: &expected, actual: &actual, compared: 0, worst: 0.0 };
        model.visit(&mut compare);
        assert!(compare.compared >= 10, "{attention:?}: only {} gradients", compare.compared);
        assert!(compare.worst < 1e-9, "{attention:?}: gradients differ by {:e}", compare.worst);
    }
}

#[test]
fn recomputed_gradients_equal_the_ordinary_backward_pass() {
    check(false);
}

#[test]
fn recomputed_gradients_equal_the_ordinary_backward_pass_with_token_weights() {
    check(true);
}

#[test]
#[should_panic(expected = "dropout")]
fn recomputation_refuses_a_model_with_dropout() {
    let cfg = ModelConfig {
        layers: Some(1),
        d_model: Some(16),
        heads: Some(2),
        dropout: 0.1,
        attention: AttentionConfig { kind: AttentionKind::Softmax, ..Default::default() },
        ..Default::default()
    };
    let dims = cfg.resolve(VOCAB, SEQ).unwrap();
    let model = LanguageModel::<AD>::new(&dims, &cfg.attention, 0.1, &Default::default());
    let mut accumulator = GradientsAccumulator::new();
    model.recomputed_gradients(ids(1), ids(2), None, 1.0, 8, &mut accumulator);
}
