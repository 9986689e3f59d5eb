//! The image stage: for each triple, draw samples (seed, guidance, Prompt-to-Prompt threshold),
//! render both captions from one seed, score each pair with CLIP, filter, keep the best.

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::RgbImage;
use ip2p::pipeline::clip_score::{ClipScorer, Similarities};
use ip2p::pipeline::{image as img, NoProgress, Txt2ImgParams, Txt2ImgPipeline};
use ip2p::schedulers::noise::{rng_for, unit};
use ip2p::schedulers::{SchedulerKind, SeededNoise};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::input::Triple;

/// CLIP thresholds (the paper's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FilterConfig {
    /// Minimum cos(image₀, image₁).
    pub min_image_image: f32,
    /// Minimum cos(image₁ − image₀, caption₁ − caption₀).
    pub min_direction: f32,
    /// Minimum cos(imageₖ, captionₖ) for both images.
    pub min_image_text: f32,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            min_image_image: 0.75,
            min_direction: 0.2,
            min_image_text: 0.2,
        }
    }
}

/// Why a sample was dropped by the filter (the first criterion it fails, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterReason {
    ImageImage,
    Direction,
    Image0Caption0,
    Image1Caption1,
}

impl FilterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ImageImage => "image_image",
            Self::Direction => "direction",
            Self::Image0Caption0 => "image0_caption0",
            Self::Image1Caption1 => "image1_caption1",
        }
    }
}

impl FilterConfig {
    pub fn check(&self, s: &Similarities) -> std::result::Result<(), FilterReason> {
        if s.image0_image1 < self.min_image_image || s.image0_image1.is_nan() {
            return Err(FilterReason::ImageImage);
        }
        if s.direction < self.min_direction || s.direction.is_nan() {
            return Err(FilterReason::Direction);
        }
        if s.image0_caption0 < self.min_image_text || s.image0_caption0.is_nan() {
            return Err(FilterReason::Image0Caption0);
        }
        if s.image1_caption1 < self.min_image_text || s.image1_caption1.is_nan() {
            return Err(FilterReason::Image1Caption1);
        }
        Ok(())
    }
}

/// Settings of the image stage. Part of a run's identity: a resumed run must use the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    /// Samples drawn per triple (the paper: 100).
    pub samples: usize,
    /// Samples kept per triple, best directional similarity first (the paper: 4).
    pub keep: usize,
    pub guidance_min: f64,
    pub guidance_max: f64,
    pub p2p_min: f64,
    pub p2p_max: f64,
    pub negative_prompt: String,
    pub filter: FilterConfig,
    /// Seeds every draw; with the item's index it fixes each sample.
    pub seed: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            width: 512,
            height: 512,
            steps: 100,
            samples: 100,
            keep: 4,
            guidance_min: 7.5,
            guidance_max: 15.0,
            p2p_min: 0.1,
            p2p_max: 0.9,
            negative_prompt: String::new(),
            filter: FilterConfig::default(),
            seed: 0,
        }
    }
}

/// One sample's random choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    pub seed: u32,
    pub guidance_scale: f64,
    pub p2p_threshold: f64,
}

/// The samples of item `index`: a function of the run seed and the index only, so any shard,
/// rerun or resume draws the same ones.
pub fn draw_samples(cfg: &ImageConfig, index: usize) -> Vec<SampleSpec> {
    let mut rng = rng_for(cfg.seed, b"samples_", index as u64);
    (0..cfg.samples)
        .map(|_| {
            let seed = rng.next_u32();
            let g = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * unit(&mut rng);
            let p = cfg.p2p_min + (cfg.p2p_max - cfg.p2p_min) * unit(&mut rng);
            SampleSpec {
                seed,
                guidance_scale: g,
                p2p_threshold: p,
            }
        })
        .collect()
}

/// A kept pair: one dataset row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub item: usize,
    pub sample: usize,
    pub triple: Triple,
    pub original_png: Vec<u8>,
    pub edited_png: Vec<u8>,
    pub spec: SampleSpec,
    pub sims: Similarities,
}

/// What happened to the samples of one triple.
#[derive(Debug, Clone, Default)]
pub struct ItemResult {
    pub rows: Vec<Row>,
    pub rendered: usize,
    pub passed: usize,
    pub filtered: Vec<FilterReason>,
    pub render_time: Duration,
    pub clip_time: Duration,
    pub encode_time: Duration,
}

/// Renders and filters pairs; owns the models (one thread uses it).
#[derive(Debug)]
pub struct PairGenerator {
    pipe: Txt2ImgPipeline,
    clip: ClipScorer,
    cfg: ImageConfig,
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| crate::error::Error::Model(ip2p::Error::Image(e.to_string())))?;
    Ok(out.into_inner())
}

impl PairGenerator {
    pub fn new(pipe: Txt2ImgPipeline, clip: ClipScorer, cfg: ImageConfig) -> Self {
        Self { pipe, clip, cfg }
    }

    pub fn config(&self) -> &ImageConfig {
        &self.cfg
    }

    /// Renders one sample's pair: `[image of input caption, image of edited caption]`.
    pub fn render_pair(&self, t: &Triple, s: &SampleSpec) -> Result<[RgbImage; 2]> {
        let p = Txt2ImgParams {
            width: self.cfg.width,
            height: self.cfg.height,
            steps: self.cfg.steps,
            guidance_scale: s.guidance_scale,
            negative_prompt: self.cfg.negative_prompt.clone(),
            scheduler: Some(SchedulerKind::EulerAncestral),
            p2p_threshold: s.p2p_threshold,
        };
        let mut sched = self.pipe.scheduler(p.scheduler, p.steps)?;
        let mut noise = SeededNoise::new(u64::from(s.seed));
        let out = self.pipe.render_shared(
            &[&t.input, &t.output],
            &p,
            sched.as_mut(),
            &mut noise,
            &mut NoProgress,
        )?;
        Ok([
            img::unit_hwc_to_rgb(&out[0])?,
            img::unit_hwc_to_rgb(&out[1])?,
        ])
    }

    /// All samples of one triple, filtered; the best `keep` become rows.
    pub fn generate(&self, index: usize, t: &Triple) -> Result<ItemResult> {
        let mut res = ItemResult::default();
        let mut passing: Vec<(usize, SampleSpec, [RgbImage; 2], Similarities)> = Vec::new();
        for (j, s) in draw_samples(&self.cfg, index).into_iter().enumerate() {
            let t0 = Instant::now();
            let pair = self.render_pair(t, &s)?;
            res.render_time += t0.elapsed();
            res.rendered += 1;
            let t1 = Instant::now();
            let sims = self
                .clip
                .score_pair([&pair[0], &pair[1]], [&t.input, &t.output])?;
            res.clip_time += t1.elapsed();
            match self.cfg.filter.check(&sims) {
                Ok(()) => passing.push((j, s, pair, sims)),
                Err(r) => res.filtered.push(r),
            }
        }
        res.passed = passing.len();
        // Best direction first; ties by sample order (stable sort keeps draws deterministic).
        passing.sort_by(|a, b| b.3.direction.total_cmp(&a.3.direction));
        passing.truncate(self.cfg.keep);
        passing.sort_by_key(|p| p.0);
        let t2 = Instant::now();
        for (j, s, pair, sims) in passing {
            res.rows.push(Row {
                item: index,
                sample: j,
                triple: t.clone(),
                original_png: png(&pair[0])?,
                edited_png: png(&pair[1])?,
                spec: s,
                sims,
            });
        }
        res.encode_time += t2.elapsed();
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_a_function_of_seed_and_index() {
        let cfg = ImageConfig {
            samples: 50,
            ..Default::default()
        };
        let a = draw_samples(&cfg, 7);
        assert_eq!(a, draw_samples(&cfg, 7));
        assert_ne!(a, draw_samples(&cfg, 8));
        assert_ne!(
            a,
            draw_samples(
                &ImageConfig {
                    seed: 1,
                    ..cfg.clone()
                },
                7
            )
        );
        for s in &a {
            assert!((7.5..15.0).contains(&s.guidance_scale));
            assert!((0.1..0.9).contains(&s.p2p_threshold));
        }
        let seeds: std::collections::HashSet<u32> = a.iter().map(|s| s.seed).collect();
        assert_eq!(seeds.len(), 50);
    }

    #[test]
    fn the_filter_checks_every_threshold() {
        let f = FilterConfig::default();
        let good = Similarities {
            image0_caption0: 0.3,
            image1_caption1: 0.3,
            direction: 0.25,
            image0_image1: 0.8,
        };
        assert_eq!(f.check(&good), Ok(()));
        let bad = |m: fn(&mut Similarities)| {
            let mut s = good;
            m(&mut s);
            f.check(&s)
        };
        assert_eq!(
            bad(|s| s.image0_image1 = 0.7),
            Err(FilterReason::ImageImage)
        );
        assert_eq!(bad(|s| s.direction = 0.1), Err(FilterReason::Direction));
        assert_eq!(
            bad(|s| s.image0_caption0 = 0.1),
            Err(FilterReason::Image0Caption0)
        );
        assert_eq!(
            bad(|s| s.image1_caption1 = f32::NAN),
            Err(FilterReason::Image1Caption1)
        );
    }
}
