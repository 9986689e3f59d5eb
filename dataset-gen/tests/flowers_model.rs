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

/// An instruction, its true edit, which pixels must change, the class they must take, and the
/// share of them that must take it.
type Check = (&'static str, Edit, fn(Label) -> bool, Label, f64);

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

    let checks: [Check; 2] = [
        (
            "turn the sunflowers into roses",
            Edit::Kind(Kind::Rose),
            |l| l == Label::Flower(Kind::Sunflower),
            Label::Flower(Kind::Rose),
            ROSE_SHARE,
        ),
        (
            "make it night",
            Edit::Sky(Sky::Night),
            |l| matches!(l, Label::Sky(_)),
            Label::Sky(Sky::Night),
            NIGHT_SHARE,
        ),
    ];
    for (instruction, e, from, to, bar) in checks {
        let out = edit(instruction);
        let truth = e.apply(&scene).render(256, 192);
        let v = judge(&input, &truth, &out);
        let got = share(&labels, from, &out, to);
        eprintln!("{instruction}: {v:?}, pixels now {to:?}: {got:.3}");
        assert!(got >= bar, "{instruction}: pixels now {to:?}: {got:.3}");
        assert!(
            v.unchanged_mae <= 10.0,
            "{instruction}: the rest moved: {v:?}"
        );
    }
}

/// The bar for a model that edits: most flower pixels rose, the sky night.
const ROSE_SHARE: f64 = 0.8;
const NIGHT_SHARE: f64 = 0.8;
