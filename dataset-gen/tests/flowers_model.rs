//! The shipped model (`models/flowers-ip2p`, made by `tools/flowers/make.sh`) edits
//! `assets/sunflowers.png` (held-out flower-world scene 40): judged by its pixels against the
//! true edit, as `eval-world` judges.

use dataset_gen::world::{classify, held_out_seed, judge, Edit, Kind, Label, Scene, Sky};
use ip2p::pipeline::{EditParams, EditPipeline, InputImage, NoProgress, ResizePolicy};

/// The steps and guidance the model's README section recommends.
fn params(instruction: &str) -> EditParams {
    EditParams {
        instruction: instruction.into(),
        steps: STEPS,
        text_guidance: TEXT_GUIDANCE,
        image_guidance: IMAGE_GUIDANCE,
        seed: 0,
        resolution: 256,
        resize: ResizePolicy::Native,
        keep_working_size: true,
        ..Default::default()
    }
}

const STEPS: usize = 20;
const TEXT_GUIDANCE: f64 = 7.5;
const IMAGE_GUIDANCE: f64 = 1.5;

fn pipeline() -> EditPipeline {
    let dir = ip2p::loader::ModelDir::open(ip2p::loader::BUILTIN_MODEL, &Default::default())
        .expect("the shipped model");
    let c = ip2p::loader::load(&dir, &candle_core::Device::Cpu, &Default::default()).expect("load");
    EditPipeline::new(c).expect("pipeline")
}

/// The fraction of `labels == from` pixels of `output` that classify as `to`.
fn share(
    labels: &[Label],
    from: impl Fn(Label) -> bool,
    output: &image::RgbImage,
    to: Label,
) -> f64 {
    let (mut n, mut hit) = (0usize, 0usize);
    for (l, p) in labels.iter().zip(output.pixels()) {
        if from(*l) {
            n += 1;
            hit += usize::from(classify(p.0) == to);
        }
    }
    hit as f64 / n.max(1) as f64
}

#[test]
#[ignore = "the shipped model is an early checkpoint that does not edit yet (docs/closed-loop.md); run with --ignored"]
fn the_shipped_model_turns_sunflowers_into_roses_and_day_into_night() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/sunflowers.png");
    let input = image::open(&path).expect("asset").to_rgb8();
    let scene = Scene::random(held_out_seed(40));
    assert_eq!(
        input,
        scene.render(256, 192),
        "the asset is held-out scene 40"
    );
    let labels = scene.labels(256, 192);
    let pipe = pipeline();
    let edit = |instruction: &str| {
        let image = InputImage::from_dynamic(input.clone().into());
        let out = pipe
            .edit(&image, &params(instruction), &mut NoProgress)
            .expect("edit");
        out.image.to_rgb8()
    };

    let roses = edit("turn the sunflowers into roses");
    let truth = Edit::Kind(Kind::Rose).apply(&scene).render(256, 192);
    let v = judge(&input, &truth, &roses);
    let rose_share = share(
        &labels,
        |l| l == Label::Flower(Kind::Sunflower),
        &roses,
        Label::Flower(Kind::Rose),
    );
    eprintln!("roses: {v:?}, sunflower pixels now rose {rose_share:.3}");
    assert!(
        rose_share >= ROSE_SHARE,
        "sunflower pixels now rose: {rose_share:.3}"
    );
    assert!(v.unchanged_mae <= 10.0, "sky and grass moved: {v:?}");

    let night = edit("make it night");
    let truth = Edit::Sky(Sky::Night).apply(&scene).render(256, 192);
    let v = judge(&input, &truth, &night);
    let night_share = share(
        &labels,
        |l| matches!(l, Label::Sky(_)),
        &night,
        Label::Sky(Sky::Night),
    );
    eprintln!("night: {v:?}, sky pixels now night {night_share:.3}");
    assert!(
        night_share >= NIGHT_SHARE,
        "sky pixels now night: {night_share:.3}"
    );
    assert!(
        v.unchanged_mae <= 10.0,
        "the ground and flowers moved: {v:?}"
    );
}

/// The bar for a model that edits: most flower pixels rose, the sky night.
const ROSE_SHARE: f64 = 0.8;
const NIGHT_SHARE: f64 = 0.8;
