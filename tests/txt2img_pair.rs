//! The dataset generator's pair renders: one seed for both captions, and Prompt-to-Prompt.

mod common;

use std::cell::RefCell;

use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff};
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::models::unet::Cond;
use ip2p::pipeline::{NoProgress, Txt2ImgParams, Txt2ImgPipeline};
use ip2p::schedulers::{SchedulerKind, SeededNoise};

type R = Result<(), Box<dyn std::error::Error>>;

fn pipe() -> Result<Txt2ImgPipeline, Box<dyn std::error::Error>> {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-sd"))?;
    let c = loader::load(&dir, &Device::Cpu, &LoadOptions::default())?;
    Ok(Txt2ImgPipeline::new(c)?)
}

fn params(p2p: f64) -> Txt2ImgParams {
    Txt2ImgParams {
        width: 64,
        height: 64,
        steps: 6,
        guidance_scale: 9.0,
        negative_prompt: String::new(),
        scheduler: Some(SchedulerKind::EulerAncestral),
        p2p_threshold: p2p,
    }
}

fn render(
    pipe: &Txt2ImgPipeline,
    prompts: &[&str],
    p: &Txt2ImgParams,
    seed: u64,
) -> Result<Vec<Tensor>, Box<dyn std::error::Error>> {
    let mut sched = pipe.scheduler(p.scheduler, p.steps)?;
    let mut noise = SeededNoise::new(seed);
    Ok(pipe.render_shared(prompts, p, sched.as_mut(), &mut noise, &mut NoProgress)?)
}

#[test]
fn both_images_of_a_pair_see_the_same_latents_and_noise() -> R {
    let pipe = pipe()?;
    // Same caption twice: any difference in starting latents or in any step's ancestral noise
    // would make the two images differ.
    for p2p in [0.0, 0.6] {
        let out = render(&pipe, &["a red barn", "a red barn"], &params(p2p), 11)?;
        assert_eq!(max_abs_diff(&out[0], &out[1])?, 0.0, "p2p {p2p}");
    }
    // And each image of a pair is the image its caption gets rendered alone from that seed.
    let pair = render(&pipe, &["a red barn", "a blue barn"], &params(0.0), 11)?;
    for (k, caption) in ["a red barn", "a blue barn"].iter().enumerate() {
        let alone = render(&pipe, &[caption], &params(0.0), 11)?;
        let d = max_abs_diff(&pair[k], &alone[0])?;
        assert!(d < 1e-5, "image {k} differs from its solo render by {d}");
    }
    // A different seed gives a different pair.
    let other = render(&pipe, &["a red barn", "a blue barn"], &params(0.0), 12)?;
    assert!(max_abs_diff(&pair[0], &other[0])? > 1e-2);
    Ok(())
}

#[test]
fn prompt_to_prompt_changes_only_the_second_image() -> R {
    let pipe = pipe()?;
    let prompts = ["a field of sunflowers", "a field of roses"];
    let plain = render(&pipe, &prompts, &params(0.0), 5)?;
    let p2p = render(&pipe, &prompts, &params(0.9), 5)?;
    // The first caption always attends with its own logits.
    let d0 = max_abs_diff(&plain[0], &p2p[0])?;
    assert!(d0 < 1e-6, "first image changed by {d0}");
    // The second took the first's self-attention logits for most steps (random weights give
    // no reason for it to move towards the first image, only that it moves).
    let moved = max_abs_diff(&plain[1], &p2p[1])?;
    assert!(moved > 1e-3, "Prompt-to-Prompt had no effect ({moved})");
    // p = 0 is exactly the plain render.
    let zero = render(&pipe, &prompts, &params(0.0), 5)?;
    assert_eq!(max_abs_diff(&zero[1], &plain[1])?, 0.0);
    Ok(())
}

#[test]
fn with_prompt_to_prompt_every_self_attention_layer_copies_the_first_captions_logits() -> R {
    let pipe = pipe()?;
    let c = pipe.components();
    let dev = Device::Cpu;
    // [uncond₁, uncond₂, cond₁, cond₂] with four different latents and contexts.
    let x = Tensor::randn(0f32, 1.0, (4, 4, 8, 8), &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (4, 77, 32), &dev)?;
    let t = Tensor::new(500f32, &dev)?;
    let from = Tensor::new(&[0u32, 0, 2, 2], &dev)?;
    let rec = RefCell::new(Vec::new());
    let mut cond = Cond::text(&ctx);
    cond.self_attn.logits_from = Some(&from);
    cond.self_attn.record = Some(&rec);
    let _ = c.unet.forward_cond(&x, &t, cond)?;
    let layers = rec.borrow();
    // tiny-sd: 2 + 2 + 2 down, 1 mid, 3 + 3 + 3 up transformer blocks.
    assert_eq!(layers.len(), 16);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(max_abs_diff(&l.get(1)?, &l.get(0)?)?, 0.0, "layer {i}");
        assert_eq!(max_abs_diff(&l.get(3)?, &l.get(2)?)?, 0.0, "layer {i}");
        assert!(max_abs_diff(&l.get(2)?, &l.get(0)?)? > 0.0, "layer {i}");
    }
    drop(layers);
    // Without the control each item keeps its own logits.
    let rec2 = RefCell::new(Vec::new());
    let mut cond = Cond::text(&ctx);
    cond.self_attn.record = Some(&rec2);
    let _ = c.unet.forward_cond(&x, &t, cond)?;
    assert!(max_abs_diff(&rec2.borrow()[0].get(1)?, &rec2.borrow()[0].get(0)?)? > 0.0);
    Ok(())
}
