//! Personalisation files on a real model folder: what a user gets wrong gets a clear error;
//! a LoRA at scale 0 is no LoRA, at another scale it changes the text encoder's output.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use ip2p::loader::embeddings::EmbeddingSpec;
use ip2p::loader::lora::LoraSpec;
use ip2p::loader::{self, LoadOptions, ModelDir};

fn tiny() -> ModelDir {
    ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("tiny-ip2p")
}

fn load(opts: LoadOptions) -> ip2p::Result<loader::Components> {
    loader::load(&tiny(), &Device::Cpu, &opts)
}

fn hidden(c: &loader::Components, prompt: &str) -> Vec<f32> {
    let ids = c.tokenizer.encode(prompt).expect("ids").ids;
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    c.text_encoder
        .forward(&ids)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("hidden")
}

#[test]
fn an_embedding_of_another_width_or_a_taken_token_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let wide = dir.path().join("sd2-style.safetensors");
    let t = Tensor::ones(1024, DType::F32, &Device::Cpu).expect("t");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("<sd2-style>".to_owned(), t)]),
        &wide,
    )
    .expect("save");
    let err = load(LoadOptions {
        embeddings: vec![EmbeddingSpec {
            path: wide.clone(),
            token: None,
        }],
        ..Default::default()
    })
    .expect_err("width")
    .to_string();
    assert!(
        err.contains("sd2-style.safetensors") && err.contains("1024") && err.contains("32"),
        "{err}"
    );
    // A trigger word the tokenizer already has ("cat") would change what "cat" means.
    let err = load(LoadOptions {
        embeddings: vec![EmbeddingSpec {
            path: fixtures().join("personal/watercolor-style.safetensors"),
            token: Some("cat".into()),
        }],
        ..Default::default()
    })
    .expect_err("taken")
    .to_string();
    assert!(err.contains("`cat` is already in the tokenizer"), "{err}");
}

#[test]
fn a_lora_scale_of_zero_changes_nothing_and_the_trigger_word_is_used() {
    let lora = |scale| LoraSpec {
        path: fixtures().join("personal/tiny-lora-kohya.safetensors"),
        scale,
    };
    let plain = load(LoadOptions::default()).expect("plain");
    let zero = load(LoadOptions {
        loras: vec![lora(0.0)],
        ..Default::default()
    })
    .expect("zero");
    let some = load(LoadOptions {
        loras: vec![lora(0.8)],
        embeddings: vec![EmbeddingSpec {
            path: fixtures().join("personal/cat-toy.pt"),
            token: Some("<cat-toy>".into()),
        }],
        ..Default::default()
    })
    .expect("lora");
    let p = "make it snowy";
    assert_eq!(hidden(&plain, p), hidden(&zero, p));
    let d = hidden(&plain, p)
        .iter()
        .zip(hidden(&some, p))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d > 1e-3, "the text encoder's LoRA changed nothing ({d})");
    // The two-vector trigger takes two positions: BOS, <cat-toy>, <cat-toy>_1, EOS.
    let ids = some.tokenizer.encode("<cat-toy>").expect("ids").ids;
    assert_eq!(&ids[..4], &[49406, 49408, 49409, 49407]);
}
