//! How few denoising steps keep the picture: each scheduler at a few step counts against its
//! own result at many steps (the converged answer of that sampler), same seed, as PSNR of the
//! decoded pictures; and against the paper's default (Euler ancestral at the reference count).
//! The cheapest setting above a PSNR bound is the CPU recommendation.

use image::DynamicImage;

use crate::pipeline::{EditParams, EditPipeline, InputImage, NoProgress};
use crate::schedulers::SchedulerKind;
use crate::Result;

/// One setting's result, averaged over the seeds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepsRow {
    pub scheduler: &'static str,
    pub steps: usize,
    /// Mean PSNR (dB) against the same scheduler at the reference count.
    pub psnr_vs_own_reference: f64,
    /// Mean PSNR (dB) against Euler ancestral at the reference count (the paper's default).
    pub psnr_vs_paper_default: f64,
    /// Mean seconds per edit.
    pub seconds: f64,
}

/// PSNR (dB, 8-bit RGB) of two pictures of one size; infinite when identical.
pub fn psnr(a: &DynamicImage, b: &DynamicImage) -> f64 {
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    let n = a.as_raw().len().max(1) as f64;
    let se: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    if se == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64.powi(2) / (se / n)).log10()
}

/// Runs every scheduler at each of `counts` and at `reference` steps for each seed.
pub fn study(
    pipe: &EditPipeline,
    input: &InputImage,
    base: &EditParams,
    seeds: &[u64],
    counts: &[usize],
    reference: usize,
    on_row: &mut dyn FnMut(&StepsRow),
) -> Result<Vec<StepsRow>> {
    let run = |kind: SchedulerKind, steps: usize, seed: u64| -> Result<(DynamicImage, f64)> {
        let p = EditParams {
            scheduler: Some(kind),
            steps,
            seed,
            ..base.clone()
        };
        let t = std::time::Instant::now();
        let out = pipe.edit(input, &p, &mut NoProgress)?;
        Ok((out.image, t.elapsed().as_secs_f64()))
    };
    let mut paper = Vec::new();
    for &s in seeds {
        paper.push(run(SchedulerKind::EulerAncestral, reference, s)?.0);
    }
    let mut rows = Vec::new();
    for kind in SchedulerKind::ALL {
        let mut own = Vec::new();
        for &s in seeds {
            if kind != SchedulerKind::EulerAncestral {
                own.push(run(kind, reference, s)?.0);
            }
        }
        let own = if own.is_empty() { &paper } else { &own };
        for &steps in counts {
            let (mut vs_own, mut vs_paper, mut secs) = (0.0, 0.0, 0.0);
            for (i, &s) in seeds.iter().enumerate() {
                let (img, t) = run(kind, steps, s)?;
                vs_own += psnr(&img, &own[i]).min(99.0);
                vs_paper += psnr(&img, &paper[i]).min(99.0);
                secs += t;
            }
            let k = seeds.len().max(1) as f64;
            let row = StepsRow {
                scheduler: kind.name(),
                steps,
                psnr_vs_own_reference: vs_own / k,
                psnr_vs_paper_default: vs_paper / k,
                seconds: secs / k,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The fewest steps (then the fastest) whose picture stays within `min_psnr` dB of its own
/// scheduler's reference.
pub fn cheapest(rows: &[StepsRow], min_psnr: f64) -> Option<&StepsRow> {
    rows.iter()
        .filter(|r| r.psnr_vs_own_reference >= min_psnr)
        .min_by(|a, b| a.steps.cmp(&b.steps).then(a.seconds.total_cmp(&b.seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_a_known_difference() {
        let a = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            4,
            4,
            image::Rgb([100, 100, 100]),
        ));
        let b = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            4,
            4,
            image::Rgb([110, 100, 100]),
        ));
        // MSE = 100 / 3 → 10·log10(255² · 3 / 100).
        let want = 10.0 * (255.0f64 * 255.0 * 3.0 / 100.0).log10();
        assert!((psnr(&a, &b) - want).abs() < 1e-9);
        assert!(psnr(&a, &a).is_infinite());
    }

    #[test]
    fn the_cheapest_setting_keeps_the_bound() {
        let row = |scheduler, steps, p, seconds| StepsRow {
            scheduler,
            steps,
            psnr_vs_own_reference: p,
            psnr_vs_paper_default: 0.0,
            seconds,
        };
        let rows = [
            row("euler_a", 20, 14.0, 1.0),
            row("dpmpp_2m", 20, 31.0, 1.1),
            row("euler", 20, 32.0, 1.0),
            row("ddim", 10, 25.0, 0.5),
        ];
        let c = cheapest(&rows, 30.0).expect("one");
        assert_eq!((c.scheduler, c.steps), ("euler", 20));
        assert!(cheapest(&rows, 40.0).is_none());
    }
}
