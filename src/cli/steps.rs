//! `ip2p steps`: how few denoising steps keep the picture, per scheduler, on a real model
//! (`ip2p::pipeline::steps_study`). JSON lines, then a table and the cheapest setting.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ip2p::pipeline::steps_study::{cheapest, study};
use ip2p::pipeline::EditParams;

use super::model::ModelArgs;

#[derive(Args, Debug)]
pub struct StepsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The picture to edit.
    #[arg(env = "IP2P_INPUT")]
    pub input: PathBuf,
    /// The instruction.
    #[arg(env = "IP2P_INSTRUCTION")]
    pub instruction: String,
    /// Seeds to average over.
    #[arg(
        long,
        env = "IP2P_STEPS_SEEDS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    pub seeds: Vec<u64>,
    /// Step counts to try.
    #[arg(
        long,
        env = "IP2P_STEPS_COUNTS",
        value_delimiter = ',',
        default_value = "10,20,30,50"
    )]
    pub counts: Vec<usize>,
    /// The step count each scheduler is compared with (the paper's 100).
    #[arg(long, env = "IP2P_STEPS_REFERENCE", default_value_t = 100)]
    pub reference: usize,
    /// PSNR (dB) against the scheduler's own reference that counts as the same picture.
    #[arg(long, env = "IP2P_STEPS_MIN_PSNR", default_value_t = 30.0)]
    pub min_psnr: f64,
    /// Working resolution (long side).
    #[arg(long, env = "IP2P_RESOLUTION", default_value_t = 512)]
    pub resolution: u32,
}

pub fn run(a: StepsArgs) -> Result<()> {
    let pipe = a.model.load_pipeline()?;
    let input = ip2p::pipeline::image::open(&a.input, &Default::default())?;
    let base = EditParams {
        instruction: a.instruction.clone(),
        resolution: a.resolution,
        ..Default::default()
    };
    let cpu = ip2p_cpu::host::host().model_name.clone();
    let rows = study(
        &pipe,
        &input,
        &base,
        &a.seeds,
        &a.counts,
        a.reference,
        &mut |r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("cpu".into(), cpu.clone().into());
                o.insert("model".into(), a.model.model.clone().into());
            }
            println!("{v}");
        },
    )?;
    eprintln!(
        "\n{:16} {:>5} {:>12} {:>14} {:>8}",
        "scheduler", "steps", "dB vs own", "dB vs paper", "s/edit"
    );
    for r in &rows {
        eprintln!(
            "{:16} {:>5} {:>12.1} {:>14.1} {:>8.2}",
            r.scheduler, r.steps, r.psnr_vs_own_reference, r.psnr_vs_paper_default, r.seconds
        );
    }
    match cheapest(&rows, a.min_psnr) {
        Some(r) => eprintln!(
            "cheapest within {} dB of its {}-step picture: --scheduler {} --steps {} ({:.2} s per edit on {cpu})",
            a.min_psnr, a.reference, r.scheduler, r.steps, r.seconds
        ),
        None => eprintln!("no setting tried stays within {} dB of its {}-step picture", a.min_psnr, a.reference),
    }
    Ok(())
}
