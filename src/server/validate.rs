//! Request validation, apart from inference: every field checked and decoded into a job the
//! worker can run without further questions. Errors name the field.

use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

use super::config::ServerConfig;
use super::proto;
use super::status::ServerError;
use crate::pipeline::edit::{DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE};
use crate::pipeline::image::{self as img, DecodeLimits, InputImage};
use crate::pipeline::{EditParams, ResizePolicy};
use crate::schedulers::SchedulerKind;

/// How results are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg(u8),
    Webp,
    RawRgba,
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub request_id: String,
    pub input: InputImage,
    /// Gray8 selection at the input's size.
    pub mask: Option<GrayImage>,
    /// Parameters of the first variation (its seed is the base seed).
    pub params: EditParams,
    pub variations: u32,
    pub output: OutputFormat,
    pub preview_every: u32,
    /// Preloaded LoRA files for this edit: `(name, scale)`, in the request's order.
    pub loras: Vec<(String, f64)>,
}

/// Most LoRA files one request may name.
const MAX_REQUEST_LORAS: usize = 8;

/// The request's LoRA: preloaded names, each once, with finite scales in −10..=10.
fn loras(req: &proto::EditRequest, cfg: &ServerConfig) -> Result<Vec<(String, f64)>, ServerError> {
    if req.loras.len() > MAX_REQUEST_LORAS {
        return Err(ServerError::invalid(
            "loras",
            format!(
                "{} LoRA files; at most {MAX_REQUEST_LORAS} per edit",
                req.loras.len()
            ),
        ));
    }
    let mut out: Vec<(String, f64)> = Vec::new();
    for l in &req.loras {
        if !cfg.request_loras.iter().any(|n| n.name == l.name) {
            let known: Vec<&str> = cfg.request_loras.iter().map(|n| n.name.as_str()).collect();
            let have = if known.is_empty() {
                "none are loaded (start the server with --request-lora NAME=FILE)".to_owned()
            } else {
                format!("this server has {}", known.join(", "))
            };
            return Err(ServerError::invalid(
                "loras",
                format!("no LoRA named `{}`: {have}", l.name),
            ));
        }
        let scale = f64::from(l.scale.unwrap_or(1.0));
        if !scale.is_finite() || scale.abs() > 10.0 {
            return Err(ServerError::invalid(
                "loras",
                format!("the scale of `{}` is {scale}, outside -10..=10", l.name),
            ));
        }
        if out.iter().any(|(n, _)| *n == l.name) {
            return Err(ServerError::invalid(
                "loras",
                format!("`{}` is named twice", l.name),
            ));
        }
        out.push((l.name.clone(), scale));
    }
    Ok(out)
}

fn limits(cfg: &ServerConfig) -> DecodeLimits {
    DecodeLimits {
        max_pixels: cfg.max_pixels,
        ..DecodeLimits::default()
    }
}

fn decode_image(
    field: &str,
    im: &proto::Image,
    cfg: &ServerConfig,
) -> Result<DynamicImage, ServerError> {
    let lim = limits(cfg);
    match &im.data {
        None => Err(ServerError::invalid(field, "no image data")),
        Some(proto::image::Data::Encoded(bytes)) => {
            if bytes.is_empty() {
                return Err(ServerError::invalid(field, "empty image data"));
            }
            img::decode_dynamic(bytes, &lim).map_err(|e| ServerError::invalid(field, e.to_string()))
        }
        Some(proto::image::Data::Raw(raw)) => {
            let (w, h) = (raw.width, raw.height);
            img::check_size(w, h, &lim).map_err(|e| ServerError::invalid(field, e.to_string()))?;
            let format =
                proto::PixelFormat::try_from(raw.format).unwrap_or(proto::PixelFormat::Unspecified);
            let bpp = match format {
                proto::PixelFormat::Rgba8 => 4,
                proto::PixelFormat::Rgb8 => 3,
                proto::PixelFormat::Gray8 => 1,
                proto::PixelFormat::Unspecified => {
                    return Err(ServerError::invalid(
                        format!("{field}.raw.format"),
                        "pixel format is unspecified",
                    ))
                }
            };
            let want = w as u64 * h as u64 * bpp;
            if raw.pixels.len() as u64 != want {
                return Err(ServerError::invalid(
                    format!("{field}.raw.pixels"),
                    format!(
                        "{}×{} {:?} needs {want} bytes, got {}",
                        w,
                        h,
                        format,
                        raw.pixels.len()
                    ),
                ));
            }
            let px = raw.pixels.clone();
            let bad = || ServerError::invalid(field, "pixel buffer does not match its size");
            Ok(match format {
                proto::PixelFormat::Rgba8 => {
                    DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, px).ok_or_else(bad)?)
                }
                proto::PixelFormat::Rgb8 => {
                    DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, px).ok_or_else(bad)?)
                }
                _ => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, px).ok_or_else(bad)?),
            })
        }
    }
}

fn finite_in(field: &str, v: f32, lo: f32, hi: f32) -> Result<f64, ServerError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(ServerError::invalid(
            field,
            format!("{v} is not a finite number in {lo}..={hi}"),
        ));
    }
    Ok(v as f64)
}

/// The text fields, within the configured length.
fn texts(req: &proto::EditRequest, cfg: &ServerConfig) -> Result<(), ServerError> {
    let chars = req.instruction.chars().count();
    if chars > cfg.max_instruction_chars as usize {
        return Err(ServerError::invalid(
            "instruction",
            format!(
                "{chars} characters; at most {} are accepted",
                cfg.max_instruction_chars
            ),
        ));
    }
    if let Some(n) = &req.negative_prompt {
        if n.chars().count() > cfg.max_instruction_chars as usize {
            return Err(ServerError::invalid("negative_prompt", "too long"));
        }
    }
    Ok(())
}

/// The sampling parameters (steps, guidances, scheduler, resolution, resize), defaults filled
/// in; the instruction, negative prompt and seed are the caller's to set.
fn sampling(req: &proto::EditRequest, cfg: &ServerConfig) -> Result<EditParams, ServerError> {
    let steps = req.steps.unwrap_or(cfg.default_steps);
    if steps == 0 || steps > cfg.max_steps {
        return Err(ServerError::invalid(
            "steps",
            format!("{steps} is outside 1..={}", cfg.max_steps),
        ));
    }
    let guidance = |field, v: Option<f32>, default: f64| {
        finite_in(field, v.unwrap_or(default as f32), 0.0, 50.0)
    };
    let text_guidance = guidance("text_guidance", req.text_guidance, DEFAULT_TEXT_GUIDANCE)?;
    let image_guidance = guidance("image_guidance", req.image_guidance, DEFAULT_IMAGE_GUIDANCE)?;
    let scheduler = match req.scheduler.trim() {
        "" => None,
        s => Some(
            s.parse::<SchedulerKind>()
                .map_err(|e| ServerError::invalid("scheduler", e.to_string()))?,
        ),
    };
    let resolution = req.resolution.unwrap_or(cfg.default_resolution);
    if !(64..=cfg.max_resolution).contains(&resolution) {
        return Err(ServerError::invalid(
            "resolution",
            format!("{resolution} is outside 64..={}", cfg.max_resolution),
        ));
    }
    let resize = match proto::ResizePolicy::try_from(req.resize) {
        Ok(proto::ResizePolicy::Native) => ResizePolicy::Native,
        Ok(_) => ResizePolicy::Paper,
        Err(_) => {
            return Err(ServerError::invalid(
                "resize",
                format!("unknown resize policy {}", req.resize),
            ))
        }
    };
    Ok(EditParams {
        steps: steps as usize,
        text_guidance,
        image_guidance,
        scheduler,
        resolution,
        resize,
        ..EditParams::default()
    })
}

/// The number of variations and the output format.
fn outputs(
    req: &proto::EditRequest,
    cfg: &ServerConfig,
) -> Result<(u32, OutputFormat), ServerError> {
    let variations = req.variations.unwrap_or(1);
    if variations == 0 || variations > cfg.max_variations {
        return Err(ServerError::invalid(
            "variations",
            format!("{variations} is outside 1..={}", cfg.max_variations),
        ));
    }
    let output = match proto::OutputFormat::try_from(req.output_format) {
        Ok(proto::OutputFormat::Jpeg) => {
            let q = req.jpeg_quality.unwrap_or(92);
            if !(1..=100).contains(&q) {
                return Err(ServerError::invalid(
                    "jpeg_quality",
                    format!("{q} is outside 1..=100"),
                ));
            }
            OutputFormat::Jpeg(q as u8)
        }
        Ok(proto::OutputFormat::Webp) => OutputFormat::Webp,
        Ok(proto::OutputFormat::RawRgba) => OutputFormat::RawRgba,
        Ok(_) => OutputFormat::Png,
        Err(_) => {
            return Err(ServerError::invalid(
                "output_format",
                format!("unknown format {}", req.output_format),
            ))
        }
    };
    Ok((variations, output))
}

/// The decoded image (whose working size must exist under `params`) and the optional mask of
/// the same size.
fn images(
    req: &proto::EditRequest,
    cfg: &ServerConfig,
    params: &EditParams,
) -> Result<(InputImage, Option<GrayImage>), ServerError> {
    let image = req
        .image
        .as_ref()
        .ok_or_else(|| ServerError::invalid("image", "no image given"))?;
    let input = InputImage::from_dynamic(decode_image("image", image, cfg)?);
    img::target_size(
        input.width(),
        input.height(),
        params.resolution,
        params.resize,
    )
    .map_err(|e| ServerError::invalid("image", e.to_string()))?;
    let Some(m) = req.mask.as_ref().filter(|m| m.data.is_some()) else {
        return Ok((input, None));
    };
    let g = decode_image("mask", m, cfg)?.to_luma8();
    if g.dimensions() != input.rgb.dimensions() {
        return Err(ServerError::invalid(
            "mask",
            format!(
                "mask is {}×{}, the image is {}×{}",
                g.width(),
                g.height(),
                input.width(),
                input.height()
            ),
        ));
    }
    Ok((input, Some(g)))
}

/// Checks every field and decodes the images (CPU work: call it off the async runtime).
pub fn validate(req: &proto::EditRequest, cfg: &ServerConfig) -> Result<ValidJob, ServerError> {
    let request_id: String = req
        .request_id
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    texts(req, cfg)?;
    let sampled = sampling(req, cfg)?;
    let (variations, output) = outputs(req, cfg)?;
    let loras = loras(req, cfg)?;
    let (input, mask) = images(req, cfg, &sampled)?;
    let params = EditParams {
        instruction: req.instruction.clone(),
        negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
        seed: req.seed.unwrap_or_else(crate::pipeline::random_seed),
        keep_working_size: false,
        ..sampled
    };
    params.validate().map_err(ServerError::from)?;
    Ok(ValidJob {
        request_id,
        input,
        mask,
        params,
        variations,
        output,
        preview_every: req.preview_every,
        loras,
    })
}
