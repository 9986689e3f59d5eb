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
    let s2 = train_vae(&tiny_vae_config(&data.join("data"), &b, 40), &mut |_| {}).expect("resumed");
    assert_eq!(
        s2.start_step, 6,
        "from the newest checkpoint: the first run's last step"
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
