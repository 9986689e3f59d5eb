//! The whole loop on the tiny models: dataset-gen's Parquet → `extend` → `train` (the loss
//! falls) → the checkpoint edits images; an interrupted and resumed run ends with the same
//! weights as an uninterrupted one.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{fixtures, run_config, write};
use dataset_gen::run::run;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::{EditParams, EditPipeline, NoProgress};
use ip2p::training::adamw::AdamWConfig;
use ip2p::training::extend::extend;
use ip2p::training::trainer::{train, TrainConfig};

async fn dataset(dir: &Path) -> PathBuf {
    let input = dir.join("triples.jsonl");
    let text: String = [
        (
            "a red barn in a field",
            "make it snowy",
            "a red barn in a snowy field",
        ),
        (
            "a bowl of apples",
            "turn them into pears",
            "a bowl of pears",
        ),
        (
            "a sailing boat at sea",
            "add a storm",
            "a sailing boat in a storm",
        ),
        (
            "a city street at noon",
            "make it night",
            "a city street at night",
        ),
        ("a cat on a sofa", "make it a dog", "a dog on a sofa"),
        ("a forest path", "make it autumn", "a forest path in autumn"),
    ]
    .iter()
    .map(|(i, e, o)| format!("{{\"input\": \"{i}\", \"edit\": \"{e}\", \"output\": \"{o}\"}}\n"))
    .collect();
    write(&input, &text);
    let out = dir.join("data");
    let mut cfg = run_config(vec![input], &out);
    cfg.image.samples = 2;
    let s = run(cfg).await.expect("dataset-gen");
    assert_eq!(s.dataset_rows, 12);
    out.join("data")
}

/// tiny-sd extended to 8 input channels.
fn extended(dir: &Path) -> PathBuf {
    let model = dir.join("ip2p-init");
    extend(
        &ModelDir::from_dir(&fixtures().join("tiny-sd")).expect("tiny-sd"),
        &model,
    )
    .expect("extend");
    model
}

fn config(model: &Path, data: &Path, out: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: vec![data.to_path_buf()],
        out: out.to_path_buf(),
        resolution: 64,
        batch_size: 2,
        steps,
        adam: AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
        ema: Some(0.99),
        checkpoint_every: 20,
        seed: 3,
        ..Default::default()
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("weights")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_pairs_train_a_model_that_edits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = dataset(tmp.path()).await;
    let model = extended(tmp.path());

    // Training: the loss falls.
    let out = tmp.path().join("run");
    let mut cfg = config(&model, &data, &out, 200);
    cfg.checkpoint_every = 100;
    let mut losses = Vec::new();
    let s =
        tokio::task::block_in_place(|| train(&cfg, &mut |l| losses.push(l.loss))).expect("train");
    assert_eq!(s.end_step, 200);
    assert_eq!(losses.len(), 200);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..20]), mean(&losses[180..]));
    assert!(
        last < 0.5 * first,
        "the loss did not fall enough: first 20 steps {first:.4}, last 20 {last:.4}"
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 200);

    // The final model and a checkpoint load and edit.
    for dir in [s.final_model.clone(), out.join("checkpoint-00000100")] {
        let md = ModelDir::from_dir(&dir).expect("model dir");
        let c = loader::load(&md, &Device::Cpu, &LoadOptions::default()).expect("load");
        let pipe = EditPipeline::new(c).expect("pipeline");
        let input = ip2p::pipeline::image::open(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/sunflowers.png"),
            &Default::default(),
        )
        .expect("image");
        let params = EditParams {
            instruction: "make it snowy".into(),
            steps: 3,
            resolution: 64,
            seed: 1,
            ..Default::default()
        };
        let r = pipe.edit(&input, &params, &mut NoProgress).expect("edit");
        assert_eq!(r.image.width(), input.width());
    }
    // The served weights are the EMA's, which differ from the raw ones.
    let raw = candle_core::safetensors::load(
        out.join("checkpoint-00000200/training_state/unet.safetensors"),
        &Device::Cpu,
    )
    .expect("raw");
    let served = weights(&out.join("checkpoint-00000200"));
    let d = (&raw["conv_in.weight"] - &served["conv_in.weight"])
        .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff");
    assert!(d > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = dataset(tmp.path()).await;
    let model = extended(tmp.path());

    let whole = tmp.path().join("whole");
    tokio::task::block_in_place(|| train(&config(&model, &data, &whole, 40), &mut |_| {}))
        .expect("uninterrupted");

    let cut = tmp.path().join("cut");
    // Stopped after 20 steps (its checkpoint), then resumed to 40.
    tokio::task::block_in_place(|| train(&config(&model, &data, &cut, 20), &mut |_| {}))
        .expect("first half");
    let mut resumed = config(&model, &data, &cut, 40);
    resumed.resume = true;
    let s = tokio::task::block_in_place(|| train(&resumed, &mut |_| {})).expect("resumed");
    assert_eq!(s.start_step, 20);

    for sub in ["final", "checkpoint-00000040"] {
        let a = weights(&whole.join(sub));
        let b = weights(&cut.join(sub));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let d = (t - &b[k])
                .and_then(|x| x.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(d, 0.0, "{sub}/{k} differs by {d}");
        }
    }
    let la = std::fs::read_to_string(whole.join("train_log.jsonl")).expect("log");
    let lb = std::fs::read_to_string(cut.join("train_log.jsonl")).expect("log");
    let steps = |s: &str| -> Vec<(u64, String)> {
        s.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                (v["step"].as_u64().unwrap_or(0), v["loss"].to_string())
            })
            .collect()
    };
    assert_eq!(steps(&la), steps(&lb), "the loss logs differ");
}

/// `train --lora --embedding`: the run trains from the model with the LoRA baked in (its edits
/// are the bytes `--lora` at load gives, and the final model carries the text encoder's part),
/// the trigger word reaches the encodings (another cache key), and a resume with other LoRA
/// files is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_takes_loras_and_embeddings_as_edit_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("toy.jsonl");
    write(
        &input,
        "{\"input\": \"a toy on a table\", \"edit\": \"turn it into <cat-toy>\", \"output\": \"a cat toy on a table\"}\n\
         {\"input\": \"a chair\", \"edit\": \"put <cat-toy> on it\", \"output\": \"a cat toy on a chair\"}\n",
    );
    let mut rc = run_config(vec![input], &tmp.path().join("gen"));
    rc.image.samples = 2;
    run(rc).await.expect("dataset-gen");
    let data = tmp.path().join("gen/data");
    let tiny = fixtures().join("tiny-ip2p");
    let personal = fixtures().join("personal");
    let lora = ip2p::loader::lora::LoraSpec {
        path: personal.join("tiny-lora-kohya.safetensors"),
        scale: 0.7,
    };
    let embedding = ip2p::loader::embeddings::EmbeddingSpec {
        path: personal.join("cat-toy.pt"),
        token: Some("<cat-toy>".into()),
    };
    let encodings = tmp.path().join("encodings");
    let run_with = |out: &str, loras: Vec<_>, embeddings: Vec<_>| {
        let mut cfg = config(&tiny, &data, &tmp.path().join(out), 2);
        cfg.loras = loras;
        cfg.embeddings = embeddings;
        cfg.cache_encodings = true;
        cfg.encodings_dir = Some(encodings.clone());
        tokio::task::block_in_place(|| train(&cfg, &mut |_| {}))
    };
    let s = run_with("run", vec![lora.clone()], vec![embedding.clone()]).expect("train");

    // The baked base edits as the model with --lora at load; the final model's text encoder is
    // the baked one.
    let edit = |dir: &Path, loras: Vec<ip2p::loader::lora::LoraSpec>| {
        let opts = LoadOptions {
            loras,
            ..Default::default()
        };
        let c = loader::load(&ModelDir::from_dir(dir).expect("dir"), &Device::Cpu, &opts)
            .expect("load");
        let input = ip2p::pipeline::image::open(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/sunflowers.png"),
            &Default::default(),
        )
        .expect("image");
        let params = EditParams {
            instruction: "make it snowy".into(),
            steps: 2,
            resolution: 64,
            seed: 1,
            ..Default::default()
        };
        let p = EditPipeline::new(c).expect("pipeline");
        p.edit(&input, &params, &mut NoProgress)
            .expect("edit")
            .image
            .into_bytes()
    };
    let base = tmp.path().join("run/base");
    assert_eq!(edit(&base, vec![]), edit(&tiny, vec![lora.clone()]));
    let te = |d: &Path| std::fs::read(d.join("text_encoder/model.safetensors")).expect("te");
    assert_eq!(te(&s.final_model), te(&base));
    assert_ne!(te(&base), te(&tiny));

    // The same data without the embedding is encoded under another key.
    run_with("plain", vec![lora.clone()], vec![]).expect("train");
    let keys = std::fs::read_dir(&encodings)
        .expect("encodings")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        })
        .count();
    assert_eq!(keys, 2, "the embedding did not change the encodings' key");

    // Resuming with other LoRA files is refused.
    let other = ip2p::loader::lora::LoraSpec { scale: 0.2, ..lora };
    let e = run_with("run", vec![other], vec![embedding]).expect_err("another LoRA");
    assert!(e.to_string().contains("other LoRA files"), "{e}");

    // A hypernetwork is in place while the UNet trains: the same first step sees another loss.
    let spec = ip2p::loader::hypernetwork::HypernetworkSpec {
        path: Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hypernetwork/tiny-style.pt"),
        strength: 1.0,
    };
    let first_loss = |out: &str, h: Option<ip2p::loader::hypernetwork::HypernetworkSpec>| {
        let mut cfg = config(&tiny, &data, &tmp.path().join(out), 1);
        cfg.hypernetwork = h;
        let mut l = Vec::new();
        tokio::task::block_in_place(|| train(&cfg, &mut |s| l.push(s.loss))).expect("train");
        l[0]
    };
    let (without, with) = (first_loss("h0", None), first_loss("h1", Some(spec)));
    assert!(with.is_finite() && with != without, "{with} vs {without}");
}
