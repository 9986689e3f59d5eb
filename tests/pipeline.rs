//! Library behaviour on the tiny fixture models: fp16 variants, alpha, sizes, bad input.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, Case};
use ip2p::loader::{self, LoadOptions, ModelDir, Variant};
use ip2p::models::{UNet2DConditionModel, UNetConfig};
use ip2p::pipeline::{image as img, EditParams, EditPipeline, NoProgress};
use ip2p::Error;

type R = Result<(), Box<dyn std::error::Error>>;

fn tiny(name: &str, opts: &LoadOptions) -> Result<loader::Components, Error> {
    let dir = ModelDir::from_dir(&fixtures().join(name))?;
    loader::load(&dir, &Device::Cpu, opts)
}

fn unet_out(
    unet: &UNet2DConditionModel,
    case: &Case,
) -> Result<Tensor, Box<dyn std::error::Error>> {
    let t = case.meta_f64("unet_timestep").ok_or("timestep")? as f32;
    Ok(unet.forward(
        case.t("unet_sample")?,
        &Tensor::new(t, &Device::Cpu)?,
        case.t("unet_ehs")?,
    )?)
}

#[test]
fn fp16_unet_variant_matches_fp32_within_half_rounding() -> R {
    let case = Case::load(&fixtures().join("parity/components_64x64.safetensors"))?;
    let full = tiny("tiny-ip2p", &LoadOptions::default())?;
    let half = tiny(
        "tiny-ip2p",
        &LoadOptions {
            unet_variant: Some(Variant::Fp16),
            ..Default::default()
        },
    )?;
    let want = unet_out(&full.unet, &case)?;
    let got = unet_out(&half.unet, &case)?;
    let diff = max_abs_diff(&got, &want)?;
    let scale = max_abs_diff(&want, &want.zeros_like()?)?;
    // The fp16 file really was used (its weights differ) ...
    assert!(
        diff > 0.0,
        "fp16 variant gave bit-identical output: was it loaded?"
    );
    // ... and it is the fp32 model up to half-precision rounding of the weights (2^-11 relative).
    assert!(
        diff < 1e-2 * scale,
        "fp16 variant differs by {diff:e} (output scale {scale:e})"
    );

    // Stronger: the fp16 file is the fp32 weights rounded to half. Rounding them ourselves
    // reproduces the variant's output to float32 accuracy.
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p"))?;
    let cfg: UNetConfig = dir.config("unet", "config.json")?;
    let files = dir.weights("unet", "diffusion_pytorch_model", Variant::Full)?;
    let tensors = candle_core::safetensors::load(&files[0], &Device::Cpu)?;
    let rounded = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(rounded, DType::F32, &Device::Cpu);
    let ours = unet_out(&UNet2DConditionModel::new(vb, &cfg)?, &case)?;
    let d2 = max_abs_diff(&ours, &got)?;
    assert!(
        d2 <= case.tol("unet_out")?,
        "rounded-weights UNet differs from the fp16 variant by {d2:e}"
    );
    Ok(())
}

/// The widened tensors of a component's weights file, as a plain `VarBuilder` (no packing
/// from the mapped bytes).
fn widened_vb(
    dir: &ModelDir,
    component: &str,
    stem: &str,
    v: Variant,
) -> Result<candle_nn::VarBuilder<'static>, Box<dyn std::error::Error>> {
    let files = dir.weights(component, stem, v)?;
    let tensors = candle_core::safetensors::load(&files[0], &Device::Cpu)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    Ok(candle_nn::VarBuilder::from_tensors(
        tensors,
        DType::F32,
        &Device::Cpu,
    ))
}

#[test]
fn layers_packed_from_the_mapped_files_compute_what_the_widened_weights_do() -> R {
    // The loader packs convolution and linear weights straight from the mapped bytes (fp16
    // widened as read); a model built from the widened tensors must give the same bits.
    let case = Case::load(&fixtures().join("parity/components_64x64.safetensors"))?;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p"))?;
    let cfg: UNetConfig = dir.config("unet", "config.json")?;
    for v in [Variant::Fp16, Variant::Full] {
        let loaded = tiny(
            "tiny-ip2p",
            &LoadOptions {
                unet_variant: Some(v),
                ..Default::default()
            },
        )?;
        let plain = UNet2DConditionModel::new(
            widened_vb(&dir, "unet", "diffusion_pytorch_model", v)?,
            &cfg,
        )?;
        let want = unet_out(&plain, &case)?;
        assert_eq!(
            max_abs_diff(&unet_out(&loaded.unet, &case)?, &want)?,
            0.0,
            "unet {v:?}"
        );
    }

    // The VAE and the text encoder (f32 files only in the fixture).
    let loaded = tiny("tiny-ip2p", &LoadOptions::default())?;
    let vae = ip2p::models::AutoencoderKL::new(
        widened_vb(&dir, "vae", "diffusion_pytorch_model", Variant::Full)?,
        &dir.config("vae", "config.json")?,
    )?;
    let x = case.t("vae_in")?;
    let (a, b) = (loaded.vae.encode(x)?, vae.encode(x)?);
    assert_eq!(max_abs_diff(&a.mean, &b.mean)?, 0.0, "vae encode");
    let z = case.t("vae_z")?;
    assert_eq!(
        max_abs_diff(&loaded.vae.decode(z)?, &vae.decode(z)?)?,
        0.0,
        "vae decode"
    );

    let te = ip2p::models::ClipTextModel::new(
        widened_vb(&dir, "text_encoder", "model", Variant::Full)?,
        &dir.config("text_encoder", "config.json")?,
    )?;
    let ids = case.t("input_ids")?;
    let (a, b) = (loaded.text_encoder.forward(ids)?, te.forward(ids)?);
    assert_eq!(max_abs_diff(&a, &b)?, 0.0, "text encoder");
    Ok(())
}

#[test]
fn a_packed_weight_cache_is_written_then_mapped_and_survives_damage() -> R {
    let case = Case::load(&fixtures().join("parity/components_64x64.safetensors"))?;
    let tmp = tempfile::tempdir()?;
    let cached = |fp16: bool| LoadOptions {
        unet_variant: fp16.then_some(Variant::Fp16),
        packed_cache: Some(tmp.path().join("packed")),
        ..Default::default()
    };
    let outputs = |c: &loader::Components| -> Result<Vec<Tensor>, Box<dyn std::error::Error>> {
        Ok(vec![
            unet_out(&c.unet, &case)?,
            c.vae.encode(case.t("vae_in")?)?.mean,
            c.vae.decode(case.t("vae_z")?)?,
            c.text_encoder.forward(case.t("input_ids")?)?,
        ])
    };
    let same = |a: &[Tensor], b: &[Tensor], what: &str| -> R {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(max_abs_diff(x, y)?, 0.0, "{what}");
        }
        Ok(())
    };
    let files = || -> std::io::Result<Vec<std::path::PathBuf>> {
        let mut v: Vec<_> = std::fs::read_dir(tmp.path().join("packed"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    };
    let want = outputs(&tiny("tiny-ip2p", &LoadOptions::default())?)?;

    // First load: computed, and one cache file per network written.
    same(
        &outputs(&tiny("tiny-ip2p", &cached(false))?)?,
        &want,
        "writing load",
    )?;
    let written = files()?;
    assert_eq!(written.len(), 3, "{written:?}");
    let stamp = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified());
    let stamps = written
        .iter()
        .map(|f| stamp(f))
        .collect::<Result<Vec<_>, _>>()?;
    // Second load: mapped, bit for bit the same model, and the files left as they were.
    same(
        &outputs(&tiny("tiny-ip2p", &cached(false))?)?,
        &want,
        "mapped load",
    )?;
    assert_eq!(files()?, written);
    for (f, t) in written.iter().zip(&stamps) {
        assert_eq!(&stamp(f)?, t, "{} rewritten", f.display());
    }
    // Other weight files (the fp16 UNet) get a cache of their own.
    let want16 = outputs(&tiny(
        "tiny-ip2p",
        &LoadOptions {
            unet_variant: Some(Variant::Fp16),
            ..Default::default()
        },
    )?)?;
    same(
        &outputs(&tiny("tiny-ip2p", &cached(true))?)?,
        &want16,
        "fp16 writing load",
    )?;
    assert_eq!(files()?.len(), 4);
    same(
        &outputs(&tiny("tiny-ip2p", &cached(true))?)?,
        &want16,
        "fp16 mapped load",
    )?;

    // Damaged caches (cut short, emptied, garbage) are noticed: the model is packed anew
    // and the cache written again.
    for (i, damage) in [
        &|f: &Path| -> std::io::Result<()> {
            let len = std::fs::metadata(f)?.len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)?
                .set_len(len / 2)
        } as &dyn Fn(&Path) -> std::io::Result<()>,
        // Cut at an odd length: no whole number of floats.
        &|f: &Path| {
            let len = std::fs::metadata(f)?.len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)?
                .set_len(len / 2 + 1)
        },
        &|f: &Path| std::fs::write(f, b""),
        &|f: &Path| std::fs::write(f, vec![7u8; 4096]),
    ]
    .into_iter()
    .enumerate()
    {
        for f in &written {
            damage(f)?;
        }
        same(
            &outputs(&tiny("tiny-ip2p", &cached(false))?)?,
            &want,
            &format!("damage {i}"),
        )?;
        for f in &written {
            assert!(
                std::fs::metadata(f)?.len() > 4096,
                "{} not rewritten",
                f.display()
            );
        }
        same(
            &outputs(&tiny("tiny-ip2p", &cached(false))?)?,
            &want,
            &format!("after damage {i}"),
        )?;
    }
    // New weights (a rewritten file) get a new cache, which replaces the old one.
    let model = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-ip2p"), &model)?;
    let cache = tmp.path().join("cache2");
    let opts = LoadOptions {
        packed_cache: Some(cache.clone()),
        ..Default::default()
    };
    let load = || loader::load(&ModelDir::from_dir(&model)?, &Device::Cpu, &opts);
    let names = || -> std::io::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&cache)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    };
    same(&outputs(&load()?)?, &want, "copied model")?;
    let before = names()?;
    // Temporary files of writers that were killed (a process id that cannot be running) are
    // removed when the cache is written next; a running writer's (this process) are left.
    let stem = before
        .iter()
        .find(|n| n.starts_with("unet-"))
        .and_then(|n| n.strip_suffix(".ip2p-packed")?.rsplit_once('-'))
        .map(|(stem, _)| stem.to_owned())
        .ok_or("no unet cache")?;
    let orphan = cache.join(format!("{stem}-0123456789abcdef.tmp4294967295"));
    let running = cache.join(format!("{stem}-0123456789abcdef.tmp{}", std::process::id()));
    for f in [&orphan, &running] {
        std::fs::write(f, b"partial")?;
    }
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet)?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&unet, bytes)?;
    same(&outputs(&load()?)?, &want, "rewritten weights")?;
    assert!(!orphan.exists() && running.exists());
    std::fs::remove_file(&running)?;
    let after = names()?;
    assert_eq!(after.len(), 3, "{after:?}");
    let changed: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(
        changed.len() == 1 && changed[0].starts_with("unet-"),
        "{before:?} -> {after:?}"
    );

    // A cache folder that cannot be created costs only the cache.
    let blocked = tmp.path().join("a-file");
    std::fs::write(&blocked, b"")?;
    let opts = LoadOptions {
        packed_cache: Some(blocked.join("packed")),
        ..Default::default()
    };
    same(
        &outputs(&tiny("tiny-ip2p", &opts)?)?,
        &want,
        "unwritable cache",
    )?;
    Ok(())
}

fn pipeline() -> Result<EditPipeline, Error> {
    EditPipeline::new(tiny("tiny-ip2p", &LoadOptions::default())?)
}

fn quick(instruction: &str, seed: u64) -> EditParams {
    EditParams {
        instruction: instruction.into(),
        steps: 3,
        seed,
        resolution: 64,
        ..Default::default()
    }
}

#[test]
fn rgba_input_comes_back_rgba_at_its_own_size() -> R {
    let pipe = pipeline()?;
    let rgba = image::RgbaImage::from_fn(50, 30, |x, y| {
        image::Rgba([(x * 5) as u8, (y * 8) as u8, 90, (x * 5) as u8])
    });
    let input = img::InputImage::from_dynamic(image::DynamicImage::ImageRgba8(rgba.clone()));
    let out = pipe.edit(&input, &quick("make it blue", 1), &mut NoProgress)?;
    assert_eq!((out.image.width(), out.image.height()), (50, 30));
    assert!(out.image.color().has_alpha());
    let alpha: Vec<u8> = out.image.to_rgba8().pixels().map(|p| p[3]).collect();
    let want: Vec<u8> = rgba.pixels().map(|p| p[3]).collect();
    assert_eq!(alpha, want, "alpha must be restored exactly");
    // The paper policy: long side about 64, both sides multiples of 64.
    assert_eq!(out.working_size, (64, 64));
    assert_eq!(
        out.working_size,
        img::target_size(50, 30, 64, img::ResizePolicy::Paper)?
    );
    Ok(())
}

#[test]
fn seeds_are_reproducible_and_distinct() -> R {
    let pipe = pipeline()?;
    let input = img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 30])
        }),
    ));
    let a = pipe
        .edit(&input, &quick("add snow", 7), &mut NoProgress)?
        .image
        .to_rgb8();
    let b = pipe
        .edit(&input, &quick("add snow", 7), &mut NoProgress)?
        .image
        .to_rgb8();
    let c = pipe
        .edit(&input, &quick("add snow", 8), &mut NoProgress)?
        .image
        .to_rgb8();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(
        a, input.rgb,
        "an edit with an instruction changes the image"
    );
    Ok(())
}

#[test]
fn empty_instruction_returns_the_input_unchanged() -> R {
    let pipe = pipeline()?;
    let rgb = image::RgbImage::from_fn(37, 21, |x, y| image::Rgb([x as u8, y as u8, 200]));
    let input = img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(rgb.clone()));
    let out = pipe.edit(&input, &quick("   ", 3), &mut NoProgress)?;
    assert_eq!(out.image.to_rgb8(), rgb);
    Ok(())
}

#[test]
fn cancellation_stops_within_a_step() -> R {
    let pipe = pipeline()?;
    let input =
        img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)));
    let mut seen = 0;
    let mut stop_after_two = |i: &ip2p::pipeline::StepInfo<'_>| {
        seen = i.step;
        if i.step == 2 {
            ip2p::pipeline::Control::Stop
        } else {
            ip2p::pipeline::Control::Continue
        }
    };
    let r = pipe.edit(
        &input,
        &EditParams {
            steps: 10,
            ..quick("x", 1)
        },
        &mut stop_after_two,
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(seen, 2);
    Ok(())
}

#[test]
fn invalid_parameters_are_rejected_by_name() -> R {
    let pipe = pipeline()?;
    let input =
        img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)));
    for (p, field) in [
        (
            EditParams {
                steps: 0,
                ..quick("x", 1)
            },
            "steps",
        ),
        (
            EditParams {
                steps: 100_000,
                ..quick("x", 1)
            },
            "steps",
        ),
        (
            EditParams {
                text_guidance: f64::NAN,
                ..quick("x", 1)
            },
            "text_guidance",
        ),
        (
            EditParams {
                image_guidance: -1.0,
                ..quick("x", 1)
            },
            "image_guidance",
        ),
    ] {
        match pipe.edit(&input, &p, &mut NoProgress) {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidArgument, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn long_instructions_are_truncated_and_reported() -> R {
    let pipe = pipeline()?;
    let input =
        img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)));
    let long = "make it a painting ".repeat(600);
    let out = pipe.edit(
        &input,
        &EditParams {
            steps: 1,
            ..quick(&long, 1)
        },
        &mut NoProgress,
    )?;
    assert!(out.truncated_tokens > 2000, "{}", out.truncated_tokens);
    Ok(())
}

#[test]
fn an_sd_unet_is_refused_for_editing() -> R {
    let c = tiny("tiny-sd", &LoadOptions::default())?;
    let err = EditPipeline::new(c).expect_err("4-channel UNet must be refused");
    assert!(matches!(err, Error::IncompatibleModel(_)));
    assert!(err.to_string().contains("8 input channels"), "{err}");
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), to)?;
        }
    }
    Ok(())
}

#[test]
fn missing_files_and_paths_are_named() -> R {
    let tmp = tempfile::tempdir()?;
    let m = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-ip2p"), &m)?;
    std::fs::remove_file(m.join("vae/diffusion_pytorch_model.safetensors"))?;
    let err = tiny_at(&m).expect_err("vae weights are missing");
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    assert!(
        err.to_string().contains("vae/diffusion_pytorch_model"),
        "{err}"
    );

    std::fs::remove_file(m.join("tokenizer/merges.txt"))?;
    let err = tiny_at(&m).expect_err("merges are missing");
    assert!(err.to_string().contains("merges.txt"), "{err}");

    let err = ModelDir::open(
        tmp.path().join("nope").to_str().ok_or("utf8")?,
        &Default::default(),
    )
    .expect_err("no such folder");
    assert!(matches!(err, Error::ModelNotFound(_)));

    let err = ModelDir::from_dir(tmp.path()).expect_err("no model_index.json");
    assert!(err.to_string().contains("model_index.json"), "{err}");
    Ok(())
}

fn tiny_at(p: &Path) -> Result<loader::Components, Error> {
    loader::load(
        &ModelDir::from_dir(p)?,
        &Device::Cpu,
        &LoadOptions::default(),
    )
}

#[test]
fn corrupt_weights_give_an_error_not_a_panic() -> R {
    let tmp = tempfile::tempdir()?;
    let m = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-ip2p"), &m)?;
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.safetensors"),
        b"garbage",
    )?;
    assert!(tiny_at(&m).is_err());
    // A config that does not match the weights names the component.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("vae/config.json"))?)?;
    cfg["block_out_channels"] = serde_json::json!([32, 32, 64, 128]);
    std::fs::write(m.join("vae/config.json"), cfg.to_string())?;
    std::fs::copy(
        fixtures().join("tiny-ip2p/unet/diffusion_pytorch_model.safetensors"),
        m.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    let err = tiny_at(&m).expect_err("vae shapes do not match");
    assert!(err.to_string().contains("vae"), "{err}");
    Ok(())
}

#[test]
fn unreadable_images_are_clear_errors() {
    let limits = img::DecodeLimits::default();
    let e = img::decode(&[0x89, b'P', b'N', b'G', 0, 0, 0, 0], &limits).expect_err("corrupt");
    assert!(matches!(e, Error::Image(_)));
    let e = img::open(Path::new("/definitely/not/here.png"), &limits).expect_err("missing");
    assert!(e.to_string().contains("/definitely/not/here.png"));
}

/// The steps study on the tiny model: a row per scheduler and count; a count equal to the
/// reference reproduces the reference exactly (deterministic seeds), fewer steps do not.
#[test]
fn the_steps_study_compares_each_scheduler_with_its_own_reference() -> R {
    use ip2p::pipeline::steps_study::{cheapest, study};
    let pipe = EditPipeline::new(tiny("tiny-ip2p", &LoadOptions::default())?)?;
    let input = img::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(
        image::RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, 90])
        }),
    ));
    let base = EditParams {
        instruction: "make it snowy".into(),
        resolution: 64,
        ..Default::default()
    };
    let mut seen = 0;
    let rows = study(&pipe, &input, &base, &[3], &[2, 4], 4, &mut |_| seen += 1)?;
    assert_eq!((rows.len(), seen), (10, 10));
    for r in &rows {
        if r.steps == 4 {
            assert_eq!(r.psnr_vs_own_reference, 99.0, "{r:?}");
        } else {
            assert!(
                r.psnr_vs_own_reference.is_finite() && r.psnr_vs_own_reference < 99.0,
                "{r:?}"
            );
        }
    }
    let euler_a_4 = rows
        .iter()
        .find(|r| r.scheduler == "euler_a" && r.steps == 4)
        .expect("row");
    assert_eq!(euler_a_4.psnr_vs_paper_default, 99.0);
    assert_eq!(cheapest(&rows, 99.0).map(|r| r.steps), Some(4));
    Ok(())
}

/// The VAE encodes each picture of a batch as it encodes it alone (the training caches encode
/// 16 pictures at once; the pipeline one): GroupNorm's statistics are per sample.
#[test]
fn a_batched_vae_encode_equals_each_picture_alone() -> R {
    let flowers = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/flowers-ip2p");
    for dir in [fixtures().join("tiny-ip2p"), flowers] {
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        let c = loader::load(&ModelDir::from_dir(&dir)?, &Device::Cpu, &opts)?;
        let model = dir.display();
        let pics: Vec<Tensor> = (0..3)
            .map(|k| {
                let img = image::RgbImage::from_fn(64, 48, |x, y| {
                    image::Rgb([
                        (x * 3 + k * 70) as u8,
                        (y * 5 + k * 40) as u8,
                        (k * 90) as u8,
                    ])
                });
                img::to_tensor(&img, &Device::Cpu)
            })
            .collect::<Result<_, _>>()?;
        let batch = c.vae.encode(&Tensor::cat(&pics, 0)?)?.mean;
        for (k, p) in pics.iter().enumerate() {
            let alone = c.vae.encode(p)?.mean;
            let d = max_abs_diff(&batch.narrow(0, k, 1)?, &alone)?;
            assert!(d < 1e-4, "{model}: picture {k} differs by {d} in a batch");
        }
    }
    Ok(())
}
