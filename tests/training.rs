//! Training on the tiny models: `extend` preserves the model, gradients reach every parameter
//! and agree with finite differences.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{fixtures, max_abs_diff};
use ip2p::loader::{self, LoadOptions, ModelDir, Variant};
use ip2p::models::{UNet2DConditionModel, UNetConfig};
use ip2p::training::{self, extend};

type R = Result<(), Box<dyn std::error::Error>>;

#[test]
fn extend_keeps_the_model_computing_what_it_did() -> R {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("ip2p-from-sd");
    let src = ModelDir::from_dir(&fixtures().join("tiny-sd"))?;
    extend::extend(&src, &out)?;

    let ext = ModelDir::from_dir(&out)?;
    assert_eq!(
        ext.pipeline_class()?,
        "StableDiffusionInstructPix2PixPipeline"
    );
    let sched: serde_json::Value = ext.config("scheduler", "scheduler_config.json")?;
    assert_eq!(sched["_class_name"], "EulerAncestralDiscreteScheduler");
    assert_eq!(sched["beta_schedule"], "scaled_linear");
    let cfg: UNetConfig = ext.config("unet", "config.json")?;
    assert_eq!(cfg.in_channels, 8);

    let dev = Device::Cpu;
    let a = loader::load(&src, &dev, &LoadOptions::default())?;
    let b = loader::load(&ext, &dev, &LoadOptions::default())?;
    // conv_in: first 4 channels copied, new 4 zero, bias kept.
    let read = |d: &ModelDir| -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
        let f = d.weights("unet", "diffusion_pytorch_model", Variant::Full)?;
        Ok(candle_core::safetensors::load(&f[0], &dev)?)
    };
    let (wa, wb) = (read(&src)?, read(&ext)?);
    assert_eq!(wb["conv_in.weight"].dims(), &[32, 8, 3, 3]);
    assert_eq!(
        max_abs_diff(
            &wb["conv_in.weight"].narrow(1, 0, 4)?,
            &wa["conv_in.weight"]
        )?,
        0.0
    );
    assert_eq!(
        wb["conv_in.weight"]
            .narrow(1, 4, 4)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    assert_eq!(max_abs_diff(&wb["conv_in.bias"], &wa["conv_in.bias"])?, 0.0);
    assert!(wa["conv_in.bias"].abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    // Every other tensor is untouched.
    for (k, t) in &wa {
        if k != "conv_in.weight" {
            assert_eq!(max_abs_diff(t, &wb[k])?, 0.0, "{k}");
        }
    }
    // The half-precision variant was widened too.
    let half = ext.weights("unet", "diffusion_pytorch_model", Variant::Fp16)?;
    let h = candle_core::safetensors::load(&half[0], &dev)?;
    assert_eq!(h["conv_in.weight"].dims(), &[32, 8, 3, 3]);
    assert_eq!(h["conv_in.weight"].dtype(), DType::F16);

    // For any image latents, the extended UNet computes what the original did.
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev)?;
    let t = Tensor::new(&[10f32, 700.0], &dev)?;
    let want = a.unet.forward(&x, &t, &ctx)?;
    for scale in [0.0, 1.0, 50.0] {
        let img = (Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)? * scale)?;
        let got = b.unet.forward(&Tensor::cat(&[&x, &img], 1)?, &t, &ctx)?;
        // Exactly: the new channels add zeros to sums that are otherwise unchanged.
        let d = max_abs_diff(&got, &want)?;
        assert_eq!(d, 0.0, "image latents × {scale}: differs by {d}");
    }

    // Refusals: an already extended model, and a non-empty target.
    assert!(extend::extend(&ext, &tmp.path().join("again")).is_err());
    assert!(extend::extend(&src, &out).is_err());
    Ok(())
}

struct Tiny {
    vars: VarMap,
    unet: UNet2DConditionModel,
}

fn tiny_unet(dtype: DType) -> Result<Tiny, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p"))?;
    let cfg: UNetConfig = dir.config("unet", "config.json")?;
    let vars = training::load_vars(
        &dir.weights("unet", "diffusion_pytorch_model", Variant::Full)?,
        &dev,
    )?;
    let vars = if dtype == DType::F32 {
        vars
    } else {
        let wide = VarMap::new();
        {
            let src = vars.data().lock().map_err(|_| "poisoned")?;
            let mut dst = wide.data().lock().map_err(|_| "poisoned")?;
            for (k, v) in src.iter() {
                dst.insert(
                    k.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?,
                );
            }
        }
        wide
    };
    let unet =
        UNet2DConditionModel::new(candle_nn::VarBuilder::from_varmap(&vars, dtype, &dev), &cfg)?;
    Ok(Tiny { vars, unet })
}

/// Noisy latents, image latents, text, timesteps.
type Inputs = (Tensor, Tensor, Tensor, Vec<u32>);

fn inputs(dtype: DType) -> Result<Inputs, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // 16 × 16 latents: the middle block still sees 2 × 2 tokens (at 1 × 1, self-attention over
    // one token has an exactly constant softmax and no gradient for its queries and keys).
    let noisy = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev)?.to_dtype(dtype)?;
    let image = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev)?.to_dtype(dtype)?;
    let text = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev)?.to_dtype(dtype)?;
    Ok((noisy, image, text, vec![17, 803]))
}

#[test]
fn every_trainable_parameter_gets_a_gradient() -> R {
    let m = tiny_unet(DType::F32)?;
    let (noisy, image, text, ts) = inputs(DType::F32)?;
    let noise = Tensor::randn(0f32, 1.0, noisy.dims(), &Device::Cpu)?;
    let loss = training::ip2p_loss(&m.unet, &noisy, &image, &ts, &text, &noise)?;
    let grads = loss.backward()?;
    let vars = training::named_vars(&m.vars)?;
    assert!(vars.len() > 300, "{} parameters", vars.len());
    let mut missing = Vec::new();
    for (name, v) in &vars {
        match grads.get(v.as_tensor()) {
            Some(g) if g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0 => {}
            _ => missing.push(name.clone()),
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    Ok(())
}

#[test]
fn gradients_agree_with_finite_differences() -> R {
    // In float64, where a central difference is accurate to ~1e-9.
    let m = tiny_unet(DType::F64)?;
    let dev = Device::Cpu;
    let (noisy, image, text, ts) = inputs(DType::F64)?;
    let noise = Tensor::randn(0f32, 1.0, noisy.dims(), &dev)?.to_dtype(DType::F64)?;
    let loss_of = |m: &Tiny| -> Result<f64, Box<dyn std::error::Error>> {
        Ok(training::ip2p_loss(&m.unet, &noisy, &image, &ts, &text, &noise)?.to_scalar::<f64>()?)
    };
    let loss = training::ip2p_loss(&m.unet, &noisy, &image, &ts, &text, &noise)?;
    let grads = loss.backward()?;
    let vars = training::named_vars(&m.vars)?;
    let probes = [
        ("conv_in.weight", 5usize),
        ("conv_in.weight", 32 * 9 * 4 + 3), // an image-latent channel
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            17,
        ),
        (
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight",
            3,
        ),
        ("mid_block.resnets.0.norm1.weight", 2),
        (
            "up_blocks.2.attentions.0.transformer_blocks.0.norm2.bias",
            9,
        ),
        ("time_embedding.linear_1.weight", 40),
        ("conv_out.bias", 1),
    ];
    for (name, idx) in probes {
        let v: &Var = vars.get(name).ok_or(name)?;
        let g = grads.get(v.as_tensor()).ok_or(name)?;
        let analytic = g.flatten_all()?.to_vec1::<f64>()?[idx];
        let orig = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-5;
        let at = |delta: f64| -> Result<f64, Box<dyn std::error::Error>> {
            let mut p = orig.clone();
            p[idx] += delta;
            v.set(&Tensor::from_vec(p, v.as_tensor().dims(), &dev)?)?;
            loss_of(&m)
        };
        let numeric = (at(h)? - at(-h)?) / (2.0 * h);
        at(0.0)?;
        let err = (numeric - analytic).abs();
        assert!(
            err <= 1e-6 + 1e-4 * analytic.abs(),
            "{name}[{idx}]: autograd {analytic:e}, finite difference {numeric:e}"
        );
    }
    Ok(())
}

#[test]
fn lora_adapters_train_alone_and_fold_into_the_weights() -> R {
    use ip2p::training::lora::{self, LoraConfig};
    let dev = Device::Cpu;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p"))?;
    let cfg: UNetConfig = dir.config("unet", "config.json")?;
    let files = dir.weights("unet", "diffusion_pytorch_model", Variant::Full)?;
    let vb = loader::var_builder(&files, DType::F32, &dev)?;
    let mut unet = ip2p::models::nn::build_differentiable(|| UNet2DConditionModel::new(vb, &cfg))?;
    let lc = LoraConfig {
        rank: 4,
        alpha: 8.0,
    };
    let fresh = lora::attach(&mut unet, lc, 1, &dev, None)?;
    // 4 projections × 2 attentions × 16 transformer blocks, A and B each.
    assert_eq!(fresh.len(), 4 * 2 * 16 * 2);
    // Fresh adapters (B = 0) leave the model unchanged.
    let (noisy, image, text, ts) = inputs(DType::F32)?;
    let x = Tensor::cat(&[&noisy, &image], 1)?;
    let t = Tensor::new(&[17f32, 803.0], &dev)?;
    let plain = loader::load(&dir, &dev, &LoadOptions::default())?;
    let base_out = plain.unet.forward(&x, &t, &text)?;
    assert!(max_abs_diff(&unet.forward(&x, &t, &text)?, &base_out)? < 1e-5);

    // Non-zero adapters: every one gets a gradient, and nothing else is trainable.
    let mut state = HashMap::new();
    for (k, v) in &fresh {
        state.insert(
            k.clone(),
            Tensor::randn(0f32, 0.05, v.as_tensor().dims(), &dev)?,
        );
    }
    let vb = loader::var_builder(&files, DType::F32, &dev)?;
    let mut unet = ip2p::models::nn::build_differentiable(|| UNet2DConditionModel::new(vb, &cfg))?;
    let vars = lora::attach(&mut unet, lc, 1, &dev, Some(&state))?;
    let noise = Tensor::randn(0f32, 1.0, noisy.dims(), &dev)?;
    let loss = training::ip2p_loss(&unet, &noisy, &image, &ts, &text, &noise)?;
    let grads = loss.backward()?;
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or(format!("no gradient for {k}"))?;
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "zero gradient for {k}"
        );
    }
    let with_lora = unet.forward(&x, &t, &text)?;
    assert!(max_abs_diff(&with_lora, &base_out)? > 1e-4);

    // Saved in the PEFT layout and folded into a plain model, it computes the same.
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join(lora::LORA_FILE);
    lora::save(&state, lc, &file)?;
    let saved = candle_core::safetensors::load(&file, &dev)?;
    assert!(saved.contains_key(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    ));
    assert!(saved.contains_key(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"
    ));
    let mut merged = loader::load(&dir, &dev, &LoadOptions::default())?;
    assert_eq!(lora::merge_file(&mut merged.unet, &file)?, 4 * 2 * 16);
    let d = max_abs_diff(&merged.unet.forward(&x, &t, &text)?, &with_lora)?;
    assert!(
        d < 1e-5,
        "merged model differs from the adapter model by {d}"
    );
    // An adapter for a module the model lacks is refused.
    let mut bad = state.clone();
    bad.insert(
        "down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight".into(),
        Tensor::zeros((4, 32), DType::F32, &dev)?,
    );
    bad.insert(
        "down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight".into(),
        Tensor::zeros((32, 4), DType::F32, &dev)?,
    );
    let bad_file = tmp.path().join("bad.safetensors");
    lora::save(&bad, lc, &bad_file)?;
    let mut m2 = loader::load(&dir, &dev, &LoadOptions::default())?;
    assert!(lora::merge_file(&mut m2.unet, &bad_file).is_err());
    Ok(())
}

/// The UNet as `ip2p train` builds it (weights as variables, candle's differentiable ops)
/// computes what the inference UNet (packed weights, fused kernels) computes on the same
/// weights: a model trained in one graph must behave the same in the other. On tiny-ip2p and
/// on the shipped flower-world model (its own configuration).
#[test]
fn the_training_graph_computes_the_inference_graph() -> R {
    let dev = Device::Cpu;
    let flowers = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/flowers-ip2p");
    for root in [fixtures().join("tiny-ip2p"), flowers] {
        let dir = ModelDir::from_dir(&root)?;
        let cfg: UNetConfig = dir.config("unet", "config.json")?;
        let files = dir.weights("unet", "diffusion_pytorch_model", Variant::Auto)?;
        let vars = training::load_vars(&files, &dev)?;
        let train = UNet2DConditionModel::new(training::var_builder(&vars, &dev), &cfg)?;
        let opts = loader::LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        let infer = loader::load(&dir, &dev, &opts)?.unet;
        let ctx = loader::load(&dir, &dev, &opts)?
            .text_encoder
            .config()
            .hidden_size;
        let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 16, 24), &dev)?;
        let text = Tensor::randn(0f32, 1.0, (2, 77, ctx), &dev)?;
        let t = Tensor::new(&[17f32, 803.0], &dev)?;
        let a = train.forward(&x, &t, &text)?;
        let b = infer.forward(&x, &t, &text)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{}: the graphs differ by {d} (outputs up to {scale})",
            root.display()
        );
    }
    Ok(())
}

/// Min-SNR-γ: weight 1 at high noise, γ/SNR at low noise; with a huge γ the weighted loss is
/// the plain one.
#[test]
fn min_snr_weights_and_the_weighted_loss() -> R {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p"))?;
    let sched = training::NoiseSchedule::new(&dir.config("scheduler", "scheduler_config.json")?)?;
    let w = sched
        .min_snr_weights(&[5, 999], 5.0, &Device::Cpu)?
        .to_vec1::<f32>()?;
    assert!(w[0] < 0.1 && w[0] > 0.0, "{w:?}");
    assert_eq!(w[1], 1.0);
    let m = tiny_unet(DType::F32)?;
    let (noisy, image, text, ts) = inputs(DType::F32)?;
    let noise = Tensor::randn(0f32, 1.0, noisy.dims(), &Device::Cpu)?;
    let plain = training::ip2p_loss(&m.unet, &noisy, &image, &ts, &text, &noise)?;
    let ones = sched.min_snr_weights(&ts, 1e12, &Device::Cpu)?;
    let weighted =
        training::ip2p_loss_weighted(&m.unet, &noisy, &image, &ts, &text, &noise, Some(&ones))?;
    let (a, b) = (plain.to_scalar::<f32>()?, weighted.to_scalar::<f32>()?);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    Ok(())
}
