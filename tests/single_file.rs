//! Single-file checkpoints: tiny-ip2p written in the original LDM layout (the key manifest
//! `tests/fixtures/single-file/ldm_keys.json` was checked against diffusers' own converters by
//! `tools/gen_single_file.py`) converts back to exactly the folder's tensors, with the EMA copy
//! preferred and the configurations inferred from the shapes, and edits as the folder does.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use ip2p::loader::single_file::{self, ConvertOptions};
use ip2p::loader::{self, LoadOptions, ModelDir};

fn manifest() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file/ldm_keys.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("manifest")).expect("json")
}

fn folder_tensors(part: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("tiny-ip2p").join(part).join(file),
        &Device::Cpu,
    )
    .expect("folder weights")
}

/// tiny-ip2p as an LDM single file: the UNet's training copy perturbed, its EMA copy exact.
fn write_ldm(path: &Path) {
    let m = manifest();
    let mut sd: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in folder_tensors("unet", "diffusion_pytorch_model.safetensors") {
        let ldm = format!(
            "diffusion_model.{}",
            m["unet"][&k].as_str().expect("unet key")
        );
        sd.insert(format!("model.{ldm}"), (&t + 0.01).expect("perturbed"));
        sd.insert(format!("model_ema.{}", ldm.replace('.', "")), t);
    }
    for (k, t) in folder_tensors("vae", "diffusion_pytorch_model.safetensors") {
        let ldm = m["vae"][&k].as_str().expect("vae key").to_owned();
        let conv = ["q.weight", "k.weight", "v.weight", "proj_out.weight"]
            .iter()
            .any(|s| ldm.contains("mid.attn_1.") && ldm.ends_with(s));
        let t = if conv {
            t.unsqueeze(2)
                .and_then(|t| t.unsqueeze(3))
                .expect("1×1 conv")
        } else {
            t
        };
        sd.insert(format!("first_stage_model.{ldm}"), t);
    }
    for (k, t) in folder_tensors("text_encoder", "model.safetensors") {
        let ldm = m["text_encoder"][&k].as_str().expect("te key");
        sd.insert(format!("cond_stage_model.transformer.{ldm}"), t);
    }
    candle_core::safetensors::save(&sd, path).expect("save");
}

/// A folder with only `model_index.json`, the tokenizer, the scheduler and the text encoder's
/// configuration (the tiny CLIP's 8-wide heads are not in its shapes; SD 1.x's 64-wide ones are
/// what inference assumes): the UNet's and the VAE's configurations are inferred.
fn tokenizer_only(dir: &Path) -> String {
    let src = fixtures().join("tiny-ip2p");
    std::fs::create_dir_all(dir.join("tokenizer")).expect("mkdir");
    for f in [
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
    ] {
        let to = dir.join(f);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src.join(f), to).expect("config");
    }
    std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).expect("index");
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join("tokenizer").join(f), dir.join("tokenizer").join(f)).expect("tok");
    }
    dir.display().to_string()
}

#[test]
fn an_ldm_single_file_converts_to_the_folders_exact_tensors_and_edits_alike() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("tiny-ip2p-ldm.safetensors");
    write_ldm(&file);
    let out = tmp.path().join("converted");
    let opts = ConvertOptions {
        config_from: Some(tokenizer_only(&tmp.path().join("tok"))),
        ..Default::default()
    };
    single_file::convert(&file, &out, &opts).expect("convert");
    for (part, f) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        // Older folders name the VAE's attention query/key/value/proj_attn; the converter
        // writes today's names, as diffusers' does.
        let want: HashMap<String, Tensor> = folder_tensors(part, f)
            .into_iter()
            .map(|(k, t)| {
                let k = k
                    .replace("attentions.0.query.", "attentions.0.to_q.")
                    .replace("attentions.0.key.", "attentions.0.to_k.")
                    .replace("attentions.0.value.", "attentions.0.to_v.")
                    .replace("attentions.0.proj_attn.", "attentions.0.to_out.0.");
                (k, t)
            })
            .filter(|(k, _)| !k.ends_with("position_ids"))
            .collect();
        let got =
            candle_core::safetensors::load(out.join(part).join(f), &Device::Cpu).expect("got");
        assert_eq!(got.len(), want.len(), "{part}: tensor count");
        for (k, w) in &want {
            let g = got.get(k).unwrap_or_else(|| panic!("{part}: no {k}"));
            assert_eq!(g.dims(), w.dims(), "{part}/{k}");
            let d = (g - w)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(d, 0.0, "{part}/{k}: the EMA copy, exactly");
        }
    }
    // The inferred configurations are the folder's where they matter.
    let cfg = |dir: &Path, part: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join(part).join("config.json")).expect("cfg"),
        )
        .expect("json")
    };
    let tiny = fixtures().join("tiny-ip2p");
    for (part, keys) in [
        (
            "unet",
            &[
                "in_channels",
                "out_channels",
                "block_out_channels",
                "layers_per_block",
                "down_block_types",
                "up_block_types",
                "cross_attention_dim",
                "attention_head_dim",
            ][..],
        ),
        (
            "vae",
            &[
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "scaling_factor",
            ][..],
        ),
        (
            "text_encoder",
            &[
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "vocab_size",
            ][..],
        ),
    ] {
        let (a, b) = (cfg(&out, part), cfg(&tiny, part));
        for k in keys {
            assert_eq!(a[k], b[k], "{part}.{k}");
        }
    }
    // The same edit from both folders, bit for bit.
    let edit = |dir: &Path| {
        let c = loader::load(
            &ModelDir::from_dir(dir).expect("dir"),
            &Device::Cpu,
            &LoadOptions::default(),
        )
        .expect("load");
        let pipe = ip2p::pipeline::EditPipeline::new(c).expect("pipe");
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 90])
        });
        let params = ip2p::pipeline::EditParams {
            instruction: "make it snowy".into(),
            steps: 2,
            resolution: 64,
            seed: 5,
            scheduler: Some(ip2p::schedulers::SchedulerKind::EulerAncestral),
            ..Default::default()
        };
        pipe.edit(
            &ip2p::pipeline::InputImage::from_dynamic(img.into()),
            &params,
            &mut ip2p::pipeline::NoProgress,
        )
        .expect("edit")
        .image
        .to_rgb8()
        .into_raw()
    };
    let (a, b) = (edit(&out), edit(&tiny));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "the converted model edits exactly as the folder");
}

#[test]
fn a_ckpt_is_read_without_running_it() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/single-file/tiny-vae-ldm-fp16.ckpt");
    let state = single_file::read_state(&p).expect("ckpt");
    let m = manifest();
    let want = folder_tensors("vae", "diffusion_pytorch_model.safetensors");
    assert_eq!(state.len(), want.len());
    for (k, w) in &want {
        let ldm = format!("first_stage_model.{}", m["vae"][k].as_str().expect("key"));
        let g = &state[&ldm];
        assert_eq!(g.dtype(), DType::F16, "{ldm}");
        let g = g
            .to_dtype(DType::F32)
            .and_then(|g| g.reshape(w.dims()))
            .expect("f32");
        let bound = w
            .abs()
            .and_then(|a| a.flatten_all())
            .and_then(|a| a.max(0))
            .and_then(|a| a.to_scalar::<f32>())
            .expect("max")
            * 1e-3;
        let d = (g - w)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("d");
        assert!(d <= bound.max(1e-7), "{ldm}: {d}");
    }
    // Without a UNet it is not a Stable Diffusion checkpoint, and says so.
    let err = single_file::convert_state(&p, &state)
        .expect_err("no unet")
        .to_string();
    assert!(err.contains("model.diffusion_model."), "{err}");
}
