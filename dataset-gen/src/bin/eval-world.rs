//! `eval-world`: how well a model edits the flower world. Edits held-out scenes (seeds no
//! training run draws) and judges each by its pixels: the pixels the edit should change must
//! take the class of the true edited scene, the others must keep their colour (mean absolute
//! error ≤ 10/255). Prints accuracy per edit type and overall, and one JSON line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dataset_gen::world::{evaluate, grid, EvalOptions};
use ip2p::device::DeviceChoice;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::edit::{DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE};
use ip2p::pipeline::EditPipeline;

#[derive(Parser, Debug)]
#[command(
    name = "eval-world",
    version,
    about = "Judge a model's edits of the flower world"
)]
struct Args {
    /// The model: a diffusers folder, a hub id, or flowers-ip2p (the shipped one).
    #[arg(long, env = "EVAL_WORLD_MODEL", default_value = ip2p::loader::BUILTIN_MODEL)]
    model: String,
    /// Held-out examples to edit.
    #[arg(long, env = "EVAL_WORLD_EXAMPLES", default_value_t = 200)]
    examples: usize,
    #[arg(long, env = "EVAL_WORLD_WIDTH", default_value_t = 256)]
    width: u32,
    #[arg(long, env = "EVAL_WORLD_HEIGHT", default_value_t = 192)]
    height: u32,
    #[arg(long, env = "EVAL_WORLD_STEPS", default_value_t = 20)]
    steps: usize,
    #[arg(long, env = "EVAL_WORLD_TEXT_GUIDANCE", default_value_t = DEFAULT_TEXT_GUIDANCE)]
    text_guidance: f64,
    #[arg(long, env = "EVAL_WORLD_IMAGE_GUIDANCE", default_value_t = DEFAULT_IMAGE_GUIDANCE)]
    image_guidance: f64,
    /// The edits' noise seed.
    #[arg(long, env = "EVAL_WORLD_SEED", default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "EVAL_WORLD_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Also write a PNG grid: one row per edit type (its first example), input | true edit |
    /// the model's edit, and the rows' instructions beside it (`<grid>.txt`).
    #[arg(long, env = "EVAL_WORLD_GRID")]
    grid: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    ip2p::device::tune_allocator();
    let a = Args::parse();
    ip2p::logging::init(ip2p::logging::LogFormat::Text, "warn");
    let dev = ip2p::device::open(a.device)?;
    let dir = ModelDir::open(&a.model, &Default::default()).context("opening the model")?;
    let pipe = EditPipeline::new(loader::load(&dir, &dev, &LoadOptions::default())?)?;
    let opts = EvalOptions {
        examples: a.examples,
        width: a.width,
        height: a.height,
        steps: a.steps,
        text_guidance: a.text_guidance,
        image_guidance: a.image_guidance,
        seed: a.seed,
    };
    let t = std::time::Instant::now();
    let report = evaluate(&pipe, &opts)?;
    println!(
        "{} held-out edits at {}x{}, {} steps, text guidance {}, image guidance {} ({:.1} s)",
        a.examples,
        a.width,
        a.height,
        a.steps,
        a.text_guidance,
        a.image_guidance,
        t.elapsed().as_secs_f64()
    );
    for (ty, tally) in report
        .by_type
        .iter()
        .chain([(&"overall".to_owned(), &report.overall)])
    {
        println!(
            "{ty:>15}: {:5.1} % correct ({}/{}), changed pixels right {:5.1} %, unchanged MAE {:5.1}",
            100.0 * tally.accuracy(),
            tally.correct,
            tally.examples,
            100.0 * tally.mean_changed_right,
            tally.mean_unchanged_mae
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    if let Some(path) = &a.grid {
        grid(&report).save(path).context("writing the grid")?;
        let lines: Vec<String> = report
            .firsts
            .iter()
            .map(|(ty, f)| format!("{ty}: {}", f.3))
            .collect();
        std::fs::write(path.with_extension("txt"), lines.join("\n") + "\n")?;
    }
    Ok(())
}
