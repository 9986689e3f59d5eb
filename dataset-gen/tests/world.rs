//! A `--world flowers` run: no inputs, LLM or models; shards, parts and resume as any run.

mod common;

use common::{all_rows, part_files, run_config};
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
    let files: Vec<Vec<u8>> = part_files(&out)
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    let s2 = run(cfg.clone()).await.expect("rerun");
    assert_eq!(
        (s2.images.parts_already_done, s2.images.parts_written),
        (3, 0)
    );
    let again: Vec<Vec<u8>> = part_files(&out)
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
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
