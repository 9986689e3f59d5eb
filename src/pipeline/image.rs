//! Image decoding, resizing and conversion to and from tensors.
//!
//! Decoding applies the EXIF orientation and checks the declared size before any pixel buffer
//! is allocated. The alpha channel is set aside and restored on output.

use std::io::Cursor;

use candle_core::{DType, Device, Tensor};
use image::{
    imageops::FilterType, DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage, RgbaImage,
};

use crate::{Error, Result};

/// Decoder limits applied to every image.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted `width × height` (checked from the header before decoding).
    pub max_pixels: u64,
    /// Largest side in pixels.
    pub max_side: u32,
    /// Cap on the decoder's own allocations, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 16_000_000,
            max_side: 16_384,
            max_alloc: 512 << 20,
        }
    }
}

/// A decoded input image: RGB pixels, and the alpha channel if it had one.
#[derive(Debug, Clone)]
pub struct InputImage {
    pub rgb: RgbImage,
    pub alpha: Option<GrayImage>,
}

impl InputImage {
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }
    pub fn height(&self) -> u32 {
        self.rgb.height()
    }

    /// Splits an RGBA image; an alpha channel that is fully opaque is dropped.
    pub fn from_dynamic(img: DynamicImage) -> Self {
        if img.color().has_alpha() {
            let rgba = img.to_rgba8();
            let alpha = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([rgba.get_pixel(x, y)[3]])
            });
            let opaque = alpha.pixels().all(|p| p[0] == 255);
            Self {
                rgb: DynamicImage::ImageRgba8(rgba).to_rgb8(),
                alpha: (!opaque).then_some(alpha),
            }
        } else {
            Self {
                rgb: img.to_rgb8(),
                alpha: None,
            }
        }
    }

    /// Joins RGB pixels with this image's alpha (resized to fit) into a `DynamicImage`.
    pub fn restore_alpha(&self, rgb: RgbImage) -> DynamicImage {
        match &self.alpha {
            None => DynamicImage::ImageRgb8(rgb),
            Some(a) => {
                let a = if a.dimensions() == rgb.dimensions() {
                    a.clone()
                } else {
                    image::imageops::resize(a, rgb.width(), rgb.height(), FilterType::Lanczos3)
                };
                let rgba = RgbaImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                    let p = rgb.get_pixel(x, y);
                    image::Rgba([p[0], p[1], p[2], a.get_pixel(x, y)[0]])
                });
                DynamicImage::ImageRgba8(rgba)
            }
        }
    }
}

/// Decodes encoded bytes (PNG, JPEG, WebP, ...), applying EXIF orientation and `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<InputImage> {
    Ok(InputImage::from_dynamic(decode_dynamic(bytes, limits)?))
}

/// [`decode`] without splitting off the alpha channel.
pub fn decode_dynamic(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image("empty image data".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(format!("reading image: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::Image("unrecognised image format".into()));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::Image(format!("not a readable image: {e}")))?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, limits)?;
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_alloc);
    decoder
        .set_limits(lim)
        .map_err(|e| Error::Image(format!("image exceeds decoder limits: {e}")))?;
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| Error::Image(format!("corrupt image: {e}")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img)
}

/// Rejects sizes outside the limits (zero, too many pixels, a side too long).
pub fn check_size(w: u32, h: u32, limits: &DecodeLimits) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("image has no pixels ({w}×{h})")));
    }
    if w > limits.max_side || h > limits.max_side {
        return Err(Error::Image(format!(
            "image is {w}×{h}; the longest side allowed is {}",
            limits.max_side
        )));
    }
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(Error::Image(format!(
            "image is {w}×{h} = {} pixels; at most {} are allowed",
            w as u64 * h as u64,
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Reads and decodes an image file.
pub fn open(path: &std::path::Path, limits: &DecodeLimits) -> Result<InputImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, limits).map_err(|e| match e {
        Error::Image(m) => Error::Image(format!("{}: {m}", path.display())),
        o => o,
    })
}

/// How the input is brought to a size the model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizePolicy {
    /// As the paper's `edit_cli.py`: the long side about `resolution`, the short side rounded
    /// up to a multiple of 64, both multiples of 64; centre-cropped to that aspect (Lanczos).
    #[default]
    Paper,
    /// As diffusers: each side floored to a multiple of 8, no other scaling.
    Native,
}

impl std::str::FromStr for ResizePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "paper" => Ok(Self::Paper),
            "native" => Ok(Self::Native),
            o => Err(format!("unknown resize policy `{o}` (paper, native)")),
        }
    }
}

impl std::fmt::Display for ResizePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Paper => "paper",
            Self::Native => "native",
        })
    }
}

/// The working size for an input of `w × h`.
pub fn target_size(w: u32, h: u32, resolution: u32, policy: ResizePolicy) -> Result<(u32, u32)> {
    let (tw, th) = match policy {
        ResizePolicy::Paper => {
            let (w, h) = (w as f64, h as f64);
            let factor = resolution as f64 / w.max(h);
            let factor = ((w.min(h) * factor) / 64.0).ceil() * 64.0 / w.min(h);
            (
                (((w * factor) / 64.0).floor() * 64.0) as u32,
                (((h * factor) / 64.0).floor() * 64.0) as u32,
            )
        }
        ResizePolicy::Native => (w - w % 8, h - h % 8),
    };
    if tw == 0 || th == 0 {
        return Err(Error::Image(format!(
            "a {w}×{h} image is too small for the {policy} resize policy at resolution {resolution}"
        )));
    }
    Ok((tw, th))
}

/// Resizes to `(tw, th)`: centre-crop to the target aspect, then Lanczos (the paper's
/// `ImageOps.fit`), or a plain resize for `Native`.
pub fn fit(img: &RgbImage, tw: u32, th: u32, policy: ResizePolicy) -> RgbImage {
    if img.dimensions() == (tw, th) {
        return img.clone();
    }
    match policy {
        ResizePolicy::Native => image::imageops::resize(img, tw, th, FilterType::Lanczos3),
        ResizePolicy::Paper => {
            let (w, h) = img.dimensions();
            let target_aspect = tw as f64 / th as f64;
            let (cw, ch) = if (w as f64 / h as f64) > target_aspect {
                (((h as f64) * target_aspect).round().max(1.0) as u32, h)
            } else {
                (w, ((w as f64) / target_aspect).round().max(1.0) as u32)
            };
            let x = (w - cw.min(w)) / 2;
            let y = (h - ch.min(h)) / 2;
            let crop = image::imageops::crop_imm(img, x, y, cw.min(w), ch.min(h)).to_image();
            image::imageops::resize(&crop, tw, th, FilterType::Lanczos3)
        }
    }
}

/// RGB8 → `[1, 3, H, W]` in `[-1, 1]`, computed as diffusers' `VaeImageProcessor` does
/// (`x / 255` then `2x − 1`, in f32).
pub fn to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| 2.0f32 * (v as f32 / 255.0f32) - 1.0f32)
        .collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?;
    Ok(t.to_device(device)?)
}

/// Decoder output `[1, 3, H, W]` (about `[-1, 1]`) → `[H, W, 3]` f32 in `[0, 1]` (`x/2 + 0.5`,
/// clamped), as diffusers' postprocess.
pub fn to_unit_hwc(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(x.squeeze(0)?.permute((1, 2, 0))?.contiguous()?)
}

/// `[H, W, 3]` in `[0, 1]` → RGB8 with `round(x · 255)`.
pub fn unit_hwc_to_rgb(x: &Tensor) -> Result<RgbImage> {
    let (h, w, _) = x.dims3()?;
    let v: Vec<u8> = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|f| (f * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, v)
        .ok_or_else(|| Error::Image("bad output buffer".into()))
}

/// Keeps `edited` inside the selection and `original` outside it: per pixel
/// `m·edited + (1 − m)·original` with `m = mask / 255`, at the original's full resolution.
/// Alpha (if any) comes from the original.
pub fn blend_masked(
    original: &DynamicImage,
    edited: &DynamicImage,
    mask: &GrayImage,
) -> DynamicImage {
    let (w, h) = (original.width(), original.height());
    let edited = if (edited.width(), edited.height()) == (w, h) {
        edited.to_rgba8()
    } else {
        image::imageops::resize(&edited.to_rgba8(), w, h, FilterType::Lanczos3)
    };
    let orig = original.to_rgba8();
    let out = RgbaImage::from_fn(w, h, |x, y| {
        let m = mask.get_pixel(x, y)[0] as u32;
        let (o, e) = (orig.get_pixel(x, y), edited.get_pixel(x, y));
        let mix = |a: u8, b: u8| ((b as u32 * m + a as u32 * (255 - m) + 127) / 255) as u8;
        image::Rgba([mix(o[0], e[0]), mix(o[1], e[1]), mix(o[2], e[2]), o[3]])
    });
    if original.color().has_alpha() {
        DynamicImage::ImageRgba8(out)
    } else {
        DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(out).to_rgb8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_resize_rule() -> Result<()> {
        let p = ResizePolicy::Paper;
        assert_eq!(target_size(1024, 768, 512, p)?, (512, 384));
        assert_eq!(target_size(1000, 333, 512, p)?, (576, 192));
        assert_eq!(target_size(300, 200, 512, p)?, (576, 384));
        assert_eq!(target_size(512, 512, 512, p)?, (512, 512));
        assert_eq!(target_size(768, 1024, 512, p)?, (384, 512));
        Ok(())
    }

    #[test]
    fn native_resize_rule() -> Result<()> {
        let p = ResizePolicy::Native;
        assert_eq!(target_size(1001, 333, 512, p)?, (1000, 328));
        assert_eq!(target_size(64, 48, 512, p)?, (64, 48));
        assert!(target_size(7, 100, 512, p).is_err());
        Ok(())
    }

    #[test]
    fn rejects_bad_bytes_and_huge_headers() {
        let limits = DecodeLimits::default();
        assert!(matches!(decode(b"", &limits), Err(Error::Image(_))));
        assert!(matches!(
            decode(b"definitely not an image", &limits),
            Err(Error::Image(_))
        ));
        // A PNG header claiming 50 000 × 50 000 pixels.
        let mut png = Vec::new();
        png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&50_000u32.to_be_bytes());
        ihdr.extend_from_slice(&50_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // A small compressed data chunk: a real file would carry gigabytes here.
        for chunk in [&b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01"[..], &b"IEND"[..]] {
            png.extend_from_slice(&((chunk.len() - 4) as u32).to_be_bytes());
            png.extend_from_slice(chunk);
            png.extend_from_slice(&crc32(chunk).to_be_bytes());
        }
        let err = decode(&png, &limits).expect_err("must be rejected");
        assert!(err.to_string().contains("50000"), "{err}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn alpha_round_trip() -> Result<()> {
        let rgba = RgbaImage::from_fn(10, 6, |x, y| {
            image::Rgba([x as u8, y as u8, 7, (x * 20) as u8])
        });
        let mut bytes = Vec::new();
        DynamicImage::ImageRgba8(rgba.clone())
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .map_err(|e| Error::Image(e.to_string()))?;
        let inp = decode(&bytes, &DecodeLimits::default())?;
        assert!(inp.alpha.is_some());
        let out = inp.restore_alpha(inp.rgb.clone());
        assert_eq!(out.to_rgba8(), rgba);
        Ok(())
    }

    #[test]
    fn mask_blend_keeps_the_outside() {
        let orig = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30])));
        let edited = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, image::Rgb([200, 100, 0])));
        let mask = GrayImage::from_fn(4, 2, |x, _| image::Luma([if x < 2 { 0 } else { 255 }]));
        let out = blend_masked(&orig, &edited, &mask).to_rgb8();
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(3, 1).0, [200, 100, 0]);
    }

    #[test]
    fn tensor_round_trip() -> Result<()> {
        let img = RgbImage::from_fn(5, 3, |x, y| {
            image::Rgb([(x * 50) as u8, (y * 100) as u8, 255])
        });
        let t = to_tensor(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        let back = unit_hwc_to_rgb(&to_unit_hwc(&t)?)?;
        assert_eq!(back, img);
        Ok(())
    }
}
