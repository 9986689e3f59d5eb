//! Where a trained InstructPix2Pix model's loss lives, timestep by timestep: for 16 rows of a
//! dataset, the ε-MSE at a few timesteps, the same with the image latents dropped (does the
//! condition matter there?), and the RMS error of the implied clean latents (what the sampler
//! sees). `docs/closed-loop.md` has what it showed on the flower model.
//!
//!   cargo run --release --example timestep_loss -- MODEL_FOLDER PARQUET_FOLDER

use candle_core::{DType, Device, Tensor};
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::image::to_tensor;
use ip2p::training::{
    data::{Columns, PairDataset},
    NoiseSchedule,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        return Err("usage: timestep_loss MODEL_FOLDER PARQUET_FOLDER".into());
    }
    let dev = Device::Cpu;
    let dir = ModelDir::from_dir(std::path::Path::new(&args[1]))?;
    let c = loader::load(
        &dir,
        &dev,
        &LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )?;
    let sched = NoiseSchedule::new(&c.scheduler)?;
    let data = PairDataset::open(&[args[2].clone().into()], Columns::default())?;
    let sf = c.vae.config().scaling_factor;
    let n = 16.min(data.len());
    let (mut ims, mut tgs, mut txs) = (vec![], vec![], vec![]);
    for r in 0..n {
        let p = data.get(r * 37 % data.len())?;
        ims.push(c.vae.encode(&to_tensor(&p.original, &dev)?)?.mean);
        tgs.push((c.vae.encode(&to_tensor(&p.edited, &dev)?)?.mean * sf)?);
        let ids = c.tokenizer.encode(&p.instruction)?.ids;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &dev)?;
        txs.push(c.text_encoder.forward(&ids)?);
    }
    let (im, tg, tx) = (
        Tensor::cat(&ims, 0)?,
        Tensor::cat(&tgs, 0)?,
        Tensor::cat(&txs, 0)?,
    );
    println!(
        "target std {:.3}, image-latent std {:.3}",
        tg.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?,
        im.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?
    );
    for t in [20u32, 100, 300, 500, 700, 850, 950, 999] {
        let noise = Tensor::randn(0f32, 1.0, tg.dims(), &dev)?;
        let ts = vec![t; n];
        let noisy = sched.add_noise(&tg, &noise, &ts)?;
        let x = Tensor::cat(&[&noisy, &im], 1)?;
        let tt = Tensor::new(vec![t as f32; n].as_slice(), &dev)?;
        let pred = c.unet.forward(&x, &tt, &tx)?;
        let mse = (&pred - &noise)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        // x0 error: what the predicted picture latent is off by.
        let ac = f64::from(sched.alpha_cumprod(t).ok_or("timestep out of range")?);
        let x0err = ((&pred - &noise)? * ((1.0 - ac) / ac).sqrt() as f64)?
            .sqr()?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        // With the image latents zeroed: does the condition matter?
        let x0 = Tensor::cat(&[&noisy, &im.zeros_like()?], 1)?;
        let mse0 = (c.unet.forward(&x0, &tt, &tx)? - &noise)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()?;
        println!("t={t:4} eps-mse {mse:.4} (image dropped {mse0:.4}) x0-rms-error {x0err:.3}");
    }
    Ok(())
}
