//! Encoding results in the format a client asked for.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};

use super::proto;
use super::status::ServerError;
use super::validate::OutputFormat;

/// Encodes `img` (RGB or RGBA) as asked.
pub fn encode(
    img: &DynamicImage,
    fmt: OutputFormat,
    seed: u64,
) -> Result<proto::EditedImage, ServerError> {
    let mut data = Vec::new();
    let err = |e: image::ImageError| ServerError::Internal(format!("encoding the result: {e}"));
    let mime = match fmt {
        OutputFormat::Png => {
            img.write_to(&mut Cursor::new(&mut data), ImageFormat::Png)
                .map_err(err)?;
            "image/png"
        }
        OutputFormat::Webp => {
            let rgba = DynamicImage::ImageRgba8(img.to_rgba8());
            rgba.write_to(&mut Cursor::new(&mut data), ImageFormat::WebP)
                .map_err(err)?;
            "image/webp"
        }
        OutputFormat::Jpeg(q) => {
            let rgb = img.to_rgb8();
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut data, q);
            rgb.write_with_encoder(enc).map_err(err)?;
            "image/jpeg"
        }
        OutputFormat::RawRgba => {
            data = img.to_rgba8().into_raw();
            "application/octet-stream"
        }
    };
    Ok(proto::EditedImage {
        data,
        width: img.width(),
        height: img.height(),
        mime_type: mime.into(),
        seed,
    })
}

/// A small PNG preview of the latents (no VAE decode), longest side `size`.
pub fn preview_png(latents: &candle_core::Tensor, size: u32) -> Option<Vec<u8>> {
    let rgb = crate::pipeline::latent_preview(latents).ok()?;
    let (w, h) = rgb.dimensions();
    let scale = size as f32 / w.max(h) as f32;
    let (pw, ph) = (
        ((w as f32 * scale) as u32).max(1),
        ((h as f32 * scale) as u32).max(1),
    );
    let small = image::imageops::resize(&rgb, pw, ph, image::imageops::FilterType::Triangle);
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(small)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .ok()?;
    Some(out)
}
