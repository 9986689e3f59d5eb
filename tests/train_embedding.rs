//! `ip2p train-embedding` against diffusers' `textual_inversion.py`: one step's loss and the
//! gradient on the new row of the embedding table on tiny-sd (`tools/gen_ti_step.py`, within ten
//! times the float32 reference's distance from float64), and a short run whose two files read
//! back as embeddings that bind and change the text encoding.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, Case};
use ip2p::loader::embeddings::{self, EmbeddingSpec};
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::training::embedding::{train_embedding, EmbeddingTrainConfig, Property, TiModel};

fn case() -> Case {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/textual-inversion/tiny-sd-step.safetensors");
    Case::load(&p).expect("case")
}

#[test]
fn one_step_matches_diffusers_textual_inversion() {
    let case = case();
    let dev = Device::Cpu;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-sd")).expect("dir");
    let token = case.meta_str("token").expect("token");
    let init = case.meta_str("initializer").expect("initializer");
    let m = TiModel::new(&dir, &token, &init, 1, &dev).expect("model");
    let new_id = case.meta_f64("new_id").expect("id") as u32;
    assert_eq!(m.ids, [new_id]);
    let init_row = case.t("init_row").expect("init").unsqueeze(0).expect("row");
    assert_eq!(
        max_abs_diff(m.rows.as_tensor(), &init_row).expect("diff"),
        0.0
    );

    let prompt = case.meta_str("prompt").expect("prompt");
    let ids = m.tokenize(&[prompt], &dev).expect("ids");
    let want: Vec<i64> = case
        .t("input_ids")
        .expect("ids")
        .flatten_all()
        .expect("value")
        .to_vec1()
        .expect("value");
    let got: Vec<u32> = ids.flatten_all().expect("value").to_vec1().expect("value");
    assert_eq!(got.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), want);

    let t = case.meta_f64("timestep").expect("t") as u32;
    let latents = case.t("latents").expect("latents");
    let noise = case.t("noise").expect("noise");
    let loss = m.loss(&ids, latents, noise, &[t]).expect("loss");
    let grads = loss.backward().expect("backward");
    let grad = grads
        .get(m.rows.as_tensor())
        .expect("grad")
        .squeeze(0)
        .expect("row");
    let l = f64::from(loss.to_scalar::<f32>().expect("value"));
    let want_l = f64::from(
        case.t("loss")
            .expect("value")
            .to_vec1::<f32>()
            .expect("value")[0],
    );
    let (tol_l, tol_g) = (
        case.tol("loss").expect("value"),
        case.tol("grad_row").expect("value"),
    );
    assert!(
        (l - want_l).abs() <= tol_l,
        "loss {l} vs {want_l} (tol {tol_l})"
    );
    let d = max_abs_diff(&grad, case.t("grad_row").expect("value")).expect("diff");
    assert!(d <= tol_g, "gradient off by {d:.3e} (tol {tol_g:.3e})");
}

#[test]
fn an_initializer_of_several_tokens_is_refused() {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-sd")).expect("dir");
    let err = TiModel::new(&dir, "<x>", "teddy bear", 1, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("initializer") && err.contains("must be one"),
        "{err}"
    );
}

fn write_pictures(dir: &Path) {
    for k in 0..2u8 {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([x as u8 * 5, y as u8 * 6, 120 + k * 60])
        });
        img.save(dir.join(format!("toy-{k}.png"))).expect("png");
    }
}

#[test]
fn a_short_run_writes_both_formats_and_they_bind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (pics, out) = (tmp.path().join("pics"), tmp.path().join("out"));
    std::fs::create_dir_all(&pics).expect("value");
    write_pictures(&pics);
    let cfg = EmbeddingTrainConfig {
        model: fixtures().join("tiny-sd").to_string_lossy().into_owned(),
        images: pics,
        token: "<my-toy>".into(),
        initializer: "toy".into(),
        vectors: 2,
        property: Property::Object,
        resolution: 64,
        steps: 4,
        batch_size: 2,
        optimizer: ip2p::training::adamw::AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        flip: true,
        seed: 3,
        out: out.clone(),
        save_every: 2,
        device: Device::Cpu,
    };
    let mut seen = Vec::new();
    let losses = train_embedding(&cfg, &mut |s| seen.push(s.step)).expect("train");
    assert_eq!(seen, [1, 2, 3, 4]);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert!(out.join("step-2/learned_embeds.safetensors").is_file());

    let diffusers = embeddings::read(&EmbeddingSpec {
        path: out.join("learned_embeds.safetensors"),
        token: None,
    })
    .expect("diffusers file");
    let a1111 = embeddings::read(&EmbeddingSpec {
        path: out.join("my-toy.safetensors"),
        token: None,
    })
    .expect("A1111 file");
    assert_eq!(diffusers.token, "<my-toy>");
    assert_eq!(a1111.token, "my-toy");
    assert_eq!(diffusers.vectors.dims(), [2, 32]);
    assert_eq!(
        max_abs_diff(&diffusers.vectors, &a1111.vectors).expect("value"),
        0.0
    );

    // Trained: the rows moved away from "toy"'s (AdamW's first steps move each element by
    // about the learning rate).
    let dir = ModelDir::from_dir(&fixtures().join("tiny-sd")).expect("dir");
    let start = TiModel::new(&dir, "<t>", "toy", 2, &Device::Cpu).expect("model");
    let moved = max_abs_diff(&diffusers.vectors, start.rows.as_tensor()).expect("value");
    assert!(moved > 1e-3, "rows moved by {moved}");

    // Bound through the loader, the trigger's encoding differs from the initializer's.
    let opts = LoadOptions {
        embeddings: vec![EmbeddingSpec {
            path: out.join("learned_embeds.safetensors"),
            token: None,
        }],
        ..Default::default()
    };
    let c = loader::load(&dir, &Device::Cpu, &opts).expect("load");
    let enc = |p: &str| -> Tensor {
        let ids = c.tokenizer.encode(p).expect("ids").ids;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).expect("value");
        c.text_encoder
            .forward(&ids)
            .expect("value")
            .to_dtype(DType::F32)
            .expect("value")
    };
    let d = max_abs_diff(&enc("a photo of a <my-toy>"), &enc("a photo of a toy")).expect("value");
    assert!(
        d > 1e-3,
        "the trigger encodes as its initializer (diff {d})"
    );
}
