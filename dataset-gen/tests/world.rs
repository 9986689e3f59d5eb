//! A `--world flowers` run: no inputs, LLM or models; shards, parts and resume as any run.

mod common;

use common::{all_rows, part_bytes, run_config};
use dataset_gen::run::{run, RunConfig};
use dataset_gen::world::{example, example_seed, World};

fn world_config(out: &std::path::Path, examples: usize) -> RunConfig {
    let mut c = run_config(Vec::new(), out);
    c.world = Some((World::Flowers, examples));
    c.image.width = 64;
    c.image.height = 48;
    c.items_per_part = 2;
    c
}

#[tokio::test]
async fn a_world_run_writes_exact_pairs_and_resumes_without_redoing_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let cfg = world_config(&out, 5);
    let s = run(cfg.clone()).await.expect("run");
    assert_eq!(
        (s.items_total, s.images.parts_written, s.images.rows),
        (5, 3, 5)
    );
    assert_eq!(s.text.given, 5, "every example is its own triple: no LLM");
    let rows = all_rows(&out);
    assert_eq!(rows.len(), 5);
    for (i, r) in rows.iter().enumerate() {
        let ex = example(example_seed(cfg.image.seed, i));
        assert_eq!(r.original_prompt, ex.scene.caption());
        assert_eq!(r.edit_prompt, ex.instruction);
        assert_eq!(r.edited_prompt, ex.edited.caption());
        let a = image::load_from_memory(&r.original_image)
            .expect("png")
            .to_rgb8();
        let b = image::load_from_memory(&r.edited_image)
            .expect("png")
            .to_rgb8();
        assert_eq!(a, ex.scene.render(64, 48));
        assert_eq!(b, ex.edited.render(64, 48));
        assert_ne!(a, b, "row {i}: the edit changes the picture");
    }
    let files: Vec<Vec<u8>> = part_bytes(&out);
    let s2 = run(cfg.clone()).await.expect("rerun");
    assert_eq!(
        (s2.images.parts_already_done, s2.images.parts_written),
        (3, 0)
    );
    let again: Vec<Vec<u8>> = part_bytes(&out);
    assert_eq!(files, again);
    // Another world size is another dataset: refused in the same folder.
    let mut other = cfg.clone();
    other.world = None;
    other.inputs = vec![dir.path().join("none.txt")];
    std::fs::write(&other.inputs[0], "a cat\n").expect("write");
    assert!(run(other).await.is_err());
}

#[tokio::test]
async fn shards_split_a_world_between_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let mut total = 0;
    for shard in 0..2 {
        let mut cfg = world_config(&out, 7);
        cfg.shard = shard;
        cfg.num_shards = 2;
        total += run(cfg).await.expect("run").images.rows;
    }
    assert_eq!(total, 7);
    let mut prompts: Vec<String> = all_rows(&out).into_iter().map(|r| r.edit_prompt).collect();
    prompts.sort();
    let mut want: Vec<String> = (0..7)
        .map(|i| example(example_seed(42, i)).instruction)
        .collect();
    want.sort();
    assert_eq!(prompts, want);
}

#[test]
fn the_evaluator_edits_and_judges_held_out_scenes() {
    use dataset_gen::world::{evaluate, EvalOptions};
    let dir = common::fixtures().join("tiny-ip2p");
    let md = ip2p::loader::ModelDir::from_dir(&dir).expect("model");
    let c = ip2p::loader::load(&md, &candle_core::Device::Cpu, &Default::default()).expect("load");
    let pipe = ip2p::pipeline::EditPipeline::new(c).expect("pipeline");
    let opts = EvalOptions {
        examples: 4,
        width: 64,
        height: 48,
        steps: 2,
        text_guidance: 7.5,
        image_guidance: 1.5,
        seed: 0,
    };
    let r = evaluate(&pipe, &opts).expect("evaluate");
    assert_eq!(r.overall.examples, 4);
    assert_eq!(r.by_type.values().map(|t| t.examples).sum::<usize>(), 4);
    // Random weights edit nothing right.
    assert_eq!(r.overall.correct, 0);
    assert!(r.overall.mean_unchanged_mae > 10.0, "{:?}", r.overall);
    assert!((0.0..=1.0).contains(&r.overall.mean_changed_right));
}

fn tiny_vae_config(
    data: &std::path::Path,
    out: &std::path::Path,
    steps: u64,
) -> ip2p::training::vae::VaeTrainConfig {
    let vae: ip2p::models::VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 4,
    }))
    .expect("config");
    ip2p::training::vae::VaeTrainConfig {
        vae,
        data: vec![data.to_path_buf()],
        columns: Default::default(),
        out: out.to_path_buf(),
        crop: 32,
        batch_size: 4,
        steps,
        adam: ip2p::training::adamw::AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        kl_weight: 1e-6,
        max_grad_norm: 1.0,
        seed: 5,
        checkpoint_every: 4,
        resume: true,
        new_phase: false,
        holdout: 2,
        device: candle_core::Device::Cpu,
    }
}

#[tokio::test]
async fn a_vae_trains_on_world_pictures_and_resumes_exactly() {
    use ip2p::training::vae::train_vae;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    run(world_config(&data, 10)).await.expect("world data");
    let weights = |p: &std::path::Path| {
        candle_core::safetensors::load(
            p.join("diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .expect("weights")
    };
    // Straight to 40 steps, and 6 then on to 40 in a second run: the same weights.
    let a = dir.path().join("a");
    let mut losses = Vec::new();
    let s = train_vae(&tiny_vae_config(&data.join("data"), &a, 40), &mut |l| {
        losses.push(l.loss)
    })
    .expect("train");
    assert_eq!((s.start_step, s.end_step, losses.len()), (0, 40, 40));
    let early: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let late: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(late < 0.5 * early, "loss {early} -> {late}");
    assert!(
        s.psnr_db.is_finite() && s.psnr_db > 12.0,
        "PSNR {}",
        s.psnr_db
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.final_model.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(cfg["_class_name"], "AutoencoderKL");
    assert_eq!(cfg["down_block_types"].as_array().map(Vec::len), Some(2));
    let b = dir.path().join("b");
    train_vae(&tiny_vae_config(&data.join("data"), &b, 6), &mut |_| {}).expect("first part");
    // A crash after step 6's checkpoint leaves a logged step 7 that the resumed run redoes.
    let log = b.join("train_log.jsonl");
    let mut text = std::fs::read_to_string(&log).expect("log");
    text.push_str("{\"step\":7,\"loss\":1.0,\"mse\":1.0,\"kl\":0.0,\"seconds\":0.1}\n");
    std::fs::write(&log, text).expect("write log");
    let s2 = train_vae(&tiny_vae_config(&data.join("data"), &b, 40), &mut |_| {}).expect("resumed");
    assert_eq!(
        s2.start_step, 6,
        "from the newest checkpoint: the first run's last step"
    );
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                .as_u64()
                .expect("step")
        })
        .collect();
    assert_eq!(
        steps,
        (1..=40).collect::<Vec<u64>>(),
        "one line per step, none twice"
    );
    let (wa, wb) = (weights(&s.final_model), weights(&s2.final_model));
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        let d = (t - &wb[k])
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>());
        assert_eq!(d.expect("diff"), 0.0, "{k}");
    }
    // The folder loads as the pipeline's VAE.
    let vae_cfg: ip2p::models::VaeConfig =
        ip2p::loader::read_json(&s.final_model.join("config.json")).expect("cfg");
    assert_eq!(vae_cfg.block_out_channels, vec![8, 16]);
}

/// A two-level 8-channel UNet small enough for a test.
fn tiny_unet_config(path: &std::path::Path) {
    let cfg = serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "attention_head_dim": 2,
        "block_out_channels": [16, 32],
        "cross_attention_dim": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "in_channels": 8,
        "out_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    });
    std::fs::write(path, serde_json::to_vec(&cfg).expect("json")).expect("write");
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a.to_dtype(candle_core::DType::F32).expect("f32")
        - b.to_dtype(candle_core::DType::F32).expect("f32"))
    .and_then(|d| d.abs())
    .and_then(|d| d.max_all())
    .and_then(|d| d.to_scalar::<f32>())
    .expect("diff")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_model_is_assembled_trained_on_cached_encodings_and_packaged() {
    use ip2p::training::assemble::{assemble, package_half, AssembleConfig};
    use ip2p::training::trainer::{train, TrainConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut wc = world_config(&data, 10);
    (wc.image.width, wc.image.height) = (32, 32);
    run(wc).await.expect("world data");
    let data = data.join("data");
    let vae = dir.path().join("vae");
    let vs =
        ip2p::training::vae::train_vae(&tiny_vae_config(&data, &vae, 2), &mut |_| {}).expect("vae");

    // Assemble: the fixture's text encoder, the VAE with a measured scale, a fresh UNet.
    let unet_json = dir.path().join("unet.json");
    tiny_unet_config(&unet_json);
    let model = dir.path().join("model");
    let acfg = AssembleConfig {
        text_from: common::fixtures().join("tiny-ip2p"),
        vae: vs.final_model.clone(),
        unet_config: unet_json,
        data: vec![data.clone()],
        columns: Default::default(),
        scale_rows: 10,
        seed: 1,
        out: model.clone(),
    };
    let scale = tokio::task::block_in_place(|| assemble(&acfg)).expect("assemble");
    let md = ip2p::loader::ModelDir::from_dir(&model).expect("model dir");
    let vae_cfg: ip2p::models::VaeConfig = md.config("vae", "config.json").expect("vae cfg");
    assert_eq!(vae_cfg.scaling_factor, scale);
    // The scale makes the latents of the measured pictures unit-variance.
    let c = ip2p::loader::load(&md, &candle_core::Device::Cpu, &Default::default()).expect("load");
    let ds =
        ip2p::training::data::PairDataset::open(std::slice::from_ref(&data), Default::default())
            .expect("data");
    let mut all = Vec::new();
    for row in 0..ds.len() {
        let p = ds.get(row).expect("row");
        for img in [&p.original, &p.edited] {
            let x = ip2p::pipeline::image::to_tensor(img, &candle_core::Device::Cpu).expect("x");
            let z = c.vae.encode(&x).expect("encode").mean;
            all.extend(
                z.flatten_all()
                    .expect("flat")
                    .to_vec1::<f32>()
                    .expect("vec"),
            );
        }
    }
    let n = all.len() as f64;
    let mean = all.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = all
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(
        (var.sqrt() * scale - 1.0).abs() < 1e-3,
        "std × scale = {}",
        var.sqrt() * scale
    );

    // Training on cached encodings computes the loss the pixel path computes (whole pictures,
    // no flip), and resumes exactly.
    let tcfg = |out: &str, steps: u64, cache: bool| TrainConfig {
        model: model.display().to_string(),
        data: vec![data.clone()],
        out: dir.path().join(out),
        resolution: 32,
        batch_size: 2,
        steps,
        ema: None,
        checkpoint_every: 2,
        seed: 9,
        center_crop: true,
        random_flip: false,
        cache_encodings: cache,
        resume: true,
        ..Default::default()
    };
    let losses = |cfg: &TrainConfig| {
        let mut l = Vec::new();
        tokio::task::block_in_place(|| train(cfg, &mut |s| l.push(s.loss))).expect("train");
        l
    };
    let pixels = losses(&tcfg("pixels", 1, false));
    let cached = losses(&tcfg("cached", 4, true));
    assert_eq!(cached.len(), 4);
    assert!(
        (pixels[0] - cached[0]).abs() <= 1e-5 * pixels[0],
        "pixels {} cached {}",
        pixels[0],
        cached[0]
    );
    losses(&tcfg("resumed", 2, true));
    let again = losses(&tcfg("resumed", 4, true));
    assert_eq!(
        again,
        cached[2..].to_vec(),
        "a resumed run continues the same losses"
    );
    // The resumed run read the encodings its first part kept: with their targets zeroed on
    // disk, a run that reuses them sees another loss.
    let kept = dir.path().join("resumed/encodings");
    let files: Vec<_> = std::fs::read_dir(&kept)
        .expect("kept encodings")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let st = files
        .iter()
        .find(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .expect("tensors");
    let mut ts = candle_core::safetensors::load(st, &candle_core::Device::Cpu).expect("load");
    for name in ["mean", "std"] {
        let z = ts[name].zeros_like().expect("zeros");
        ts.insert(name.to_owned(), z);
    }
    candle_core::safetensors::save(&ts, st).expect("save");
    let zeroed = losses(&TrainConfig {
        encodings_dir: Some(kept),
        ..tcfg("zeroed", 1, true)
    });
    assert!(
        (zeroed[0] - cached[0]).abs() > 1e-3 * cached[0],
        "zeroed {} cached {}",
        zeroed[0],
        cached[0]
    );

    // The package: every weight file in fp16, equal to the original within fp16 rounding, and
    // a working model.
    let final_dir = dir.path().join("cached/final");
    let packed = dir.path().join("packed");
    package_half(&final_dir, &packed).expect("package");
    for part in ["unet", "vae", "text_encoder"] {
        let files: Vec<_> = std::fs::read_dir(packed.join(part))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        assert_eq!(files.len(), 1, "{part}: {files:?}");
        assert!(files[0].ends_with(".fp16.safetensors"), "{part}: {files:?}");
        let stem = files[0].trim_end_matches(".fp16.safetensors");
        let dev = candle_core::Device::Cpu;
        let half =
            candle_core::safetensors::load(packed.join(part).join(&files[0]), &dev).expect("half");
        let full = candle_core::safetensors::load(
            final_dir.join(part).join(format!("{stem}.safetensors")),
            &dev,
        )
        .expect("full");
        assert_eq!(half.len(), full.len());
        for (k, t) in &full {
            let want = if t.dtype().is_float() {
                candle_core::DType::F16
            } else {
                t.dtype()
            };
            assert_eq!(half[k].dtype(), want, "{part}/{k}");
            let bound = max_abs_diff(t, &t.zeros_like().expect("zeros")) * 1e-3;
            assert!(max_abs_diff(t, &half[k]) <= bound.max(1e-7), "{part}/{k}");
        }
    }
    let md = ip2p::loader::ModelDir::from_dir(&packed).expect("packed dir");
    let c = ip2p::loader::load(&md, &candle_core::Device::Cpu, &Default::default()).expect("load");
    let pipe = ip2p::pipeline::EditPipeline::new(c).expect("pipeline");
    let input = ip2p::pipeline::InputImage::from_dynamic(
        dataset_gen::world::Scene::random(3).render(64, 64).into(),
    );
    let params = ip2p::pipeline::EditParams {
        instruction: "make it night".into(),
        steps: 2,
        resolution: 64,
        ..Default::default()
    };
    let out = pipe
        .edit(&input, &params, &mut ip2p::pipeline::NoProgress)
        .expect("edit");
    assert_eq!((out.image.width(), out.image.height()), (64, 64));
}
