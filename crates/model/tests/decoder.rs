//! The whole decoder: causality for every attention variant (ALGORITHM.md §7.5), learning, and
//! config validation.

use burn::backend::{Autodiff, NdArray};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use polysketch_attention::{AttentionConfig, AttentionKind, SketchKind};
use polysketch_model::{LanguageModel, ModelConfig, ModelConfigError, Preset};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

const VOCAB: usize = 50;
const SEQ: usize = 24;

fn variants() -> Vec<AttentionConfig> {
    let base = AttentionConfig { sketch_dim: 4, block_size: 8, ..Default::default() };
    let mut out = vec![
        AttentionConfig { kind: AttentionKind::Softmax, ..base.clone() },
        AttentionConfig { kind: AttentionKind::Polynomial, ..base.clone() },
    ];
    for sketch in [SketchKind::Gaussian, SketchKind::Hadamard, SketchKind::Learned] {
        for local_exact in [false, true] {
            out.push(AttentionConfig { sketch, local_exact, ..base.clone() });
        }
    }
    out
}

fn model_config(attention: AttentionConfig) -> ModelConfig {
    ModelConfig {
        preset: Preset::Tiny,
        layers: Some(2),
        d_model: Some(32),
        heads: Some(2),
        attention,
        ..Default::default()
    }
}

fn tokens<Bk: burn::tensor::backend::Backend>(ids: &[i64]) -> Tensor<Bk, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &Default::default())
}

fn sequence(seed: i64) -> Vec<i64> {
    (0..SEQ as i64).map(|i| (i * 7 + seed * 13 + i * i) % VOCAB as i64).collect()
}

#[test]
fn logits_never_depend_on_later_tokens_for_any_variant() {
    for attention in variants() {
        let cfg = model_config(attention.clone());
        let dims = cfg.resolve(VOCAB, SEQ).unwrap();
        let model = LanguageModel::<B>::new(&dims, &cfg.attention, 0.0, &Default::default());
        let base = sequence(1);
        let full: Vec<f32> = model.forward(tokens(&base)).into_data().to_vec().unwrap();
        for t in [7, 8, 9, 15] {
            let mut changed = base.clone();
            for (i, id) in changed.iter_mut().enumerate().skip(t + 1) {
                *id = (*id + 1 + i as i64) % VOCAB as i64;
            }
            let moved: Vec<f32> = model.forward(tokens(&changed)).into_data().to_vec().unwrap();
            let early = (t + 1) * VOCAB;
            assert_eq!(full[..early], moved[..early], "{attention:?}: t={t} saw the future");
            assert_ne!(full[early..], moved[early..], "{attention:?}: the change had no effect");
        }
    }
}

#[test]
fn a_few_optimizer_steps_lower_the_loss_for_every_variant() {
    for attention in variants() {
        let cfg = model_config(attention.clone());
        let dims = cfg.resolve(VOCAB, SEQ).unwrap();
        let mut model = LanguageModel::<AD>::new(&dims, &cfg.attention, 0.0, &Default::default());
        let mut optim = AdamWConfig::new().init();
        let ids = sequence(3);
        let inputs = tokens::<AD>(&ids[..SEQ - 1]);
        let targets = tokens::<AD>(&ids[1..]);
        let loss_of = |m: &LanguageModel<AD>| -> f32 {
            m.loss(inputs.clone(), targets.clone()).into_scalar()
        };
        let first = loss_of(&model);
        for _ in 0..5 {
            let loss = model.loss(inputs.clone(), targets.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(3e-3, model, grads);
        }
        let last = loss_of(&model);
        assert!(first.is_finite() && last < first, "{attention:?}: loss {first} -> {last}");
    }
}

#[test]
fn presets_and_bad_sizes() {
    let cfg = ModelConfig { preset: Preset::Small, ..Default::default() };
    let dims = cfg.resolve(8192, 4096).unwrap();
    assert_eq!((dims.layers, dims.d_model, dims.heads, dims.head_dim()), (12, 768, 12, 64));
    assert_eq!(dims.glu_hidden(), 2048);

    let bad = ModelConfig { heads: Some(3), ..Default::default() };
    let err = bad.resolve(100, 256).unwrap_err();
    assert!(matches!(err, ModelConfigError::Invalid { key: "heads", .. }), "{err}");

    let odd = ModelConfig {
        attention: AttentionConfig { degree: 3, ..Default::default() },
        ..Default::default()
    };
    assert!(odd.resolve(100, 256).unwrap_err().to_string().contains("degree"));
}

#[test]
fn decoding_token_by_token_gives_the_logits_of_the_parallel_pass() {
    for attention in variants() {
        let cfg = model_config(attention.clone());
        let dims = cfg.resolve(VOCAB, SEQ).unwrap();
        let model = LanguageModel::<B>::new(&dims, &cfg.attention, 0.0, &Default::default());
        let ids = sequence(5);
        let full: Vec<f32> = model.forward(tokens(&ids)).into_data().to_vec().unwrap();
        let mut caches = model.new_caches();
        // SEQ = 24 positions cross the block boundaries at 8 and 16
        for (position, &id) in ids.iter().enumerate() {
            let step: Vec<f32> = model
                .forward_step(tokens(&[id]), position, &mut caches)
                .into_data()
                .to_vec()
                .unwrap();
            let expected = &full[position * VOCAB..(position + 1) * VOCAB];
            let diff = step.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "{attention:?}: position {position} differs by {diff}");
        }
    }
}

#[test]
fn a_parallel_prefill_then_decoding_gives_the_logits_of_the_parallel_pass() {
    for attention in variants() {
        let cfg = model_config(attention.clone());
        let dims = cfg.resolve(VOCAB, SEQ).unwrap();
        let model = LanguageModel::<B>::new(&dims, &cfg.attention, 0.0, &Default::default());
        let ids = sequence(6);
        let full: Vec<f32> = model.forward(tokens(&ids)).into_data().to_vec().unwrap();
        let row = |position: usize| &full[position * VOCAB..(position + 1) * VOCAB];
        let close =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        // prompts ending inside a block, on its last token and on the first of the next
        for prompt in [5, 8, 9, 16] {
            let (logits, mut caches) = model.prefill(tokens(&ids[..prompt]));
            let logits: Vec<f32> = logits.into_data().to_vec().unwrap();
            let diff = close(&logits, row(prompt - 1));
            assert!(diff < 1e-4, "{attention:?}: prompt {prompt} differs by {diff}");
            for (position, &id) in ids.iter().enumerate().skip(prompt) {
                let step: Vec<f32> = model
                    .forward_step(tokens(&[id]), position, &mut caches)
                    .into_data()
                    .to_vec()
                    .unwrap();
                let diff = close(&step, row(position));
                assert!(
                    diff < 1e-4,
                    "{attention:?}: prompt {prompt}, {position} differs by {diff}"
                );
            }
        }
    }
}

#[test]
fn losses_and_hits_over_a_large_vocabulary_match_the_whole_logits() {
    // 2^20 tokens: the logits of 40 positions exceed the 2^25 values of one slice, so the
    // losses are computed in two slices (32 + 8 positions)
    let vocab = 1 << 20;
    let seq = 40;
    let cfg = model_config(AttentionConfig { kind: AttentionKind::Softmax, ..Default::default() });
    let dims = cfg.resolve(vocab, seq).unwrap();
    let model = LanguageModel::<B>::new(&dims, &cfg.attention, 0.0, &Default::default());
    let ids: Vec<i64> = (0..seq as i64 + 1).map(|i| (i * 104_729 + 17) % vocab as i64).collect();
    let inputs = tokens::<B>(&ids[..seq]);
    let logits = model.forward(inputs.clone());
    // every third target is the model's own best guess, in both slices, so hits are 1 there
    let best: Vec<i64> = logits.clone().argmax(2).into_data().convert::<i64>().to_vec().unwrap();
    let chosen: Vec<i64> =
        (0..seq).map(|t| if t % 3 == 0 { best[t] } else { ids[t + 1] }).collect();
    let targets = tokens::<B>(&chosen);

    let expected = burn::tensor::activation::log_softmax(logits.clone(), 2)
        .gather(2, targets.clone().reshape([1, seq, 1]))
        .reshape([1, seq])
        .neg();
    let expected_hits = logits.argmax(2).reshape([1, seq]).equal(targets.clone()).float();
    let (losses, hits) = model.token_losses_and_hits(inputs.clone(), targets.clone());
    let plain = model.token_losses(inputs, targets);
    let values = |t: Tensor<B, 2>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
    let expected = values(expected);
    assert_eq!(expected.len(), seq);
    for (name, actual) in [("token_losses", values(plain)), ("with hits", values(losses))] {
        for (e, a) in expected.iter().zip(&actual) {
            assert!((e - a).abs() < 1e-5 * e.abs().max(1.0), "{name}: {a} vs {e}");
        }
    }
    let (hits, expected_hits) = (values(hits), values(expected_hits));
    assert_eq!(hits, expected_hits);
    assert!(hits.iter().step_by(3).all(|&h| h == 1.0), "{hits:?}");
    assert!(hits.contains(&0.0), "{hits:?}");
}
