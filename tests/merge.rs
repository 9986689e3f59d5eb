//! `ip2p merge`: A1111's weighted sum and add difference on diffusers folders, including the
//! InstructPix2Pix recipe where A's UNet takes 8 input channels and B's and C's take 4.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use ip2p::loader::ModelDir;
use ip2p::training::merge::{merge, MergeMode, MergeOptions};

const PARTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
];

fn load(dir: &Path, part: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(part).join(file), &Device::Cpu).expect("weights")
}

/// tiny-ip2p with every float weight times `k`; `four` cuts the UNet's conv_in to 4 channels.
fn scaled(dir: &Path, k: f64, four: bool) -> ModelDir {
    let src = fixtures().join("tiny-ip2p");
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ] {
        std::fs::create_dir_all(dir.join(f).parent().expect("p")).expect("mkdir");
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    for (part, file) in PARTS {
        std::fs::create_dir_all(dir.join(part)).expect("mkdir");
        std::fs::copy(
            src.join(part).join("config.json"),
            dir.join(part).join("config.json"),
        )
        .expect("cfg");
        let t: HashMap<String, Tensor> = load(&src, part, file)
            .into_iter()
            .map(|(n, t)| {
                let t = if t.dtype().is_float() {
                    (t * k).expect("scale")
                } else {
                    t
                };
                let t = if four && n == "conv_in.weight" {
                    t.narrow(1, 0, 4).expect("4")
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        candle_core::safetensors::save(&t, dir.join(part).join(file)).expect("save");
    }
    ModelDir::from_dir(dir).expect("dir")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

#[test]
fn weighted_sum_and_add_difference_follow_a1111s_formulas() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = scaled(&tmp.path().join("a"), 1.0, false);
    let b = scaled(&tmp.path().join("b"), 3.0, false);
    let orig = fixtures().join("tiny-ip2p");
    let check = |out: &Path, factor: f64| {
        for (part, file) in PARTS {
            let (want, got) = (load(&orig, part, file), load(out, part, file));
            assert_eq!(want.len(), got.len(), "{part}");
            for (k, w) in &want {
                if w.dtype().is_float() {
                    let w = (w * factor).expect("scale");
                    let bound = 1e-5 * max_diff(&w, &w.zeros_like().expect("z")).max(1.0);
                    assert!(max_diff(&w, &got[k]) <= bound, "{part}/{k}");
                }
            }
        }
    };
    // A·(1 − ¼) + 3A·¼ = 1.5 A.
    let ws = tmp.path().join("ws");
    let opts = MergeOptions {
        mode: MergeMode::WeightedSum,
        alpha: 0.25,
        half: false,
    };
    let r = merge(&a, &b, None, opts, &ws).expect("weighted sum");
    assert!(
        r.merged > 900 && r.kept_from_a == 0 && !r.partial_conv_in,
        "{r:?}"
    );
    check(&ws, 1.5);
    // A + 0.5·(3A − A) = 2A.
    let ad = tmp.path().join("ad");
    let opts = MergeOptions {
        mode: MergeMode::AddDifference,
        alpha: 0.5,
        half: false,
    };
    merge(&a, &b, Some(&a), opts, &ad).expect("add difference");
    check(&ad, 2.0);
    // The merged folder loads and edits.
    ip2p::loader::load(
        &ModelDir::from_dir(&ad).expect("dir"),
        &Device::Cpu,
        &Default::default(),
    )
    .expect("loads");
    // A third model with a weighted sum, or none with add difference, is refused.
    let bad = merge(
        &a,
        &b,
        Some(&a),
        MergeOptions {
            mode: MergeMode::WeightedSum,
            alpha: 0.5,
            half: false,
        },
        &tmp.path().join("x"),
    );
    assert!(bad.is_err());
}

#[test]
fn an_8_channel_conv_in_merges_its_first_4_channels_with_a_4_channel_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = scaled(&tmp.path().join("ip2p"), 1.0, false);
    let b = scaled(&tmp.path().join("dreambooth"), 2.0, true);
    let c = scaled(&tmp.path().join("sd15"), 1.0, true);
    let out = tmp.path().join("merged");
    let opts = MergeOptions {
        mode: MergeMode::AddDifference,
        alpha: 1.0,
        half: true,
    };
    let r = merge(&a, &b, Some(&c), opts, &out).expect("merge");
    assert!(r.partial_conv_in);
    let want = &load(
        &fixtures().join("tiny-ip2p"),
        "unet",
        "diffusion_pytorch_model.safetensors",
    )["conv_in.weight"];
    let got = load(&out, "unet", "diffusion_pytorch_model.safetensors")["conv_in.weight"]
        .to_dtype(DType::F32)
        .expect("f32");
    assert_eq!(got.dims(), want.dims());
    // First 4 channels: A + (2A − A) = 2A; the image channels stay A's (fp16 rounding).
    let first = (want.narrow(1, 0, 4).expect("n") * 2.0).expect("x2");
    let bound = 2e-3 * max_diff(&first, &first.zeros_like().expect("z"));
    assert!(max_diff(&got.narrow(1, 0, 4).expect("n"), &first) <= bound);
    assert!(
        max_diff(
            &got.narrow(1, 4, 4).expect("n"),
            &want.narrow(1, 4, 4).expect("n")
        ) <= bound
    );
    // A shape that differs elsewhere names the tensor.
    let d = tmp.path().join("odd");
    let odd = scaled(&d, 1.0, false);
    let f = d.join("vae/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&f, &Device::Cpu).expect("vae");
    t.insert(
        "decoder.conv_out.bias".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).expect("z"),
    );
    candle_core::safetensors::save(&t, &f).expect("save");
    let err = merge(
        &a,
        &odd,
        None,
        MergeOptions {
            mode: MergeMode::WeightedSum,
            alpha: 0.5,
            half: false,
        },
        &tmp.path().join("y"),
    )
    .expect_err("shape")
    .to_string();
    assert!(err.contains("vae/decoder.conv_out.bias"), "{err}");
}
