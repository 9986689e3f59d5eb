//! CLIP similarity of generated image pairs: InstructPix2Pix keeps a pair only if the two
//! images look alike, each matches its caption, and the change between them follows the change
//! between the captions.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::loader::{build_from_files, hub, read_json, HubOptions};
use crate::models::clip::{ClipConfig, ClipModel};
use crate::models::ClipTokenizer;
use crate::{Error, Result};

/// The four numbers a pair is filtered by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Similarities {
    /// cos(image₀, caption₀).
    pub image0_caption0: f32,
    /// cos(image₁, caption₁).
    pub image1_caption1: f32,
    /// cos(image₁ − image₀, caption₁ − caption₀).
    pub direction: f32,
    /// cos(image₀, image₁).
    pub image0_image1: f32,
}

impl Similarities {
    /// In the order of the reference fixtures.
    pub fn to_array(&self) -> [f32; 4] {
        [
            self.image0_caption0,
            self.image1_caption1,
            self.direction,
            self.image0_image1,
        ]
    }

    /// From L2-normalised embeddings `[2, D]` of the two images and the two captions.
    pub fn from_embeds(image: &Tensor, text: &Tensor) -> Result<Self> {
        let img = image.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let txt = text.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if img.len() != 2 || txt.len() != 2 {
            return Err(Error::invalid(
                "embeddings",
                "two images and two captions are needed",
            ));
        }
        let di: Vec<f32> = img[1].iter().zip(&img[0]).map(|(a, b)| a - b).collect();
        let dt: Vec<f32> = txt[1].iter().zip(&txt[0]).map(|(a, b)| a - b).collect();
        Ok(Self {
            image0_caption0: cosine(&img[0], &txt[0]),
            image1_caption1: cosine(&img[1], &txt[1]),
            direction: cosine(&di, &dt),
            image0_image1: cosine(&img[0], &img[1]),
        })
    }
}

/// Cosine similarity (as `torch.nn.functional.cosine_similarity`, eps 1e-8 per norm).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
    dot / (na * nb)
}

/// `preprocessor_config.json` of a CLIP repository (`CLIPImageProcessor`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipPreprocess {
    #[serde(default = "default_size")]
    size: SizeSpec,
    #[serde(default = "default_size")]
    crop_size: SizeSpec,
    #[serde(default = "yes")]
    do_center_crop: bool,
    #[serde(default = "default_mean")]
    image_mean: [f32; 3],
    #[serde(default = "default_std")]
    image_std: [f32; 3],
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(u32),
    Shortest { shortest_edge: u32 },
    Hw { height: u32, width: u32 },
}

fn default_size() -> SizeSpec {
    SizeSpec::Square(224)
}
fn yes() -> bool {
    true
}
fn default_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

impl Default for ClipPreprocess {
    fn default() -> Self {
        Self {
            size: SizeSpec::Shortest { shortest_edge: 224 },
            crop_size: SizeSpec::Square(224),
            do_center_crop: true,
            image_mean: default_mean(),
            image_std: default_std(),
        }
    }
}

impl ClipPreprocess {
    /// Resizes the shortest edge (Pillow's bicubic, bit for bit), centre-crops, scales to
    /// `[0, 1]` and normalises: `[3, S, S]` f32.
    pub fn apply(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::invalid("image", "empty image"));
        }
        // An integer `size` means the shortest edge for CLIP (transformers'
        // `get_size_dict(default_to_square=False)`); the long side becomes int(s · long / short).
        let (rw, rh) = match self.size {
            SizeSpec::Shortest { shortest_edge: s } | SizeSpec::Square(s) => {
                if w <= h {
                    (s, ((s as u64 * h as u64) / w as u64).max(1) as u32)
                } else {
                    (((s as u64 * w as u64) / h as u64).max(1) as u32, s)
                }
            }
            SizeSpec::Hw { height, width } => (width, height),
        };
        let resized = super::pil::resize_bicubic(img, rw, rh);
        let (cw, ch) = match self.crop_size {
            SizeSpec::Square(s) | SizeSpec::Shortest { shortest_edge: s } => (s, s),
            SizeSpec::Hw { height, width } => (width, height),
        };
        let cropped = if self.do_center_crop && (cw, ch) != (rw, rh) {
            let left = rw.saturating_sub(cw) / 2;
            let top = rh.saturating_sub(ch) / 2;
            image::imageops::crop_imm(&resized, left, top, cw.min(rw), ch.min(rh)).to_image()
        } else {
            resized
        };
        let (ow, oh) = cropped.dimensions();
        let (ow, oh) = (ow as usize, oh as usize);
        let mut data = vec![0f32; 3 * ow * oh];
        for (x, y, p) in cropped.enumerate_pixels() {
            for c in 0..3 {
                // As transformers: × rescale_factor (1/255 as float32), then (x − mean) / std.
                let v = p.0[c] as f32 * (1.0f64 / 255.0) as f32;
                data[c * ow * oh + y as usize * ow + x as usize] =
                    (v - self.image_mean[c]) / self.image_std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, oh, ow), device)?)
    }
}

/// CLIP image and text towers with their tokenizer and preprocessing.
#[derive(Debug, Clone)]
pub struct ClipScorer {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocess: ClipPreprocess,
    device: Device,
}

/// Files of a transformers CLIP repository.
const CLIP_REQUIRED: &[&str] = &["config.json", "model.safetensors"];
const CLIP_OPTIONAL: &[&str] = &[
    "preprocessor_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

impl ClipScorer {
    /// Loads a transformers CLIP folder (`config.json`, `model.safetensors`, tokenizer files,
    /// `preprocessor_config.json`) or a hub id such as `openai/clip-vit-large-patch14`.
    pub fn open(spec: &str, hub_opts: &HubOptions, device: &Device) -> Result<Self> {
        let p = Path::new(spec);
        let root: PathBuf = if p.is_dir() {
            p.to_path_buf()
        } else if hub::looks_like_hub_id(spec) {
            hub::resolve_hub_files(spec, hub_opts, CLIP_REQUIRED, CLIP_OPTIONAL)?
        } else {
            return Err(Error::ModelNotFound(format!(
                "{spec}: no such folder, and not a hub id of the form owner/name"
            )));
        };
        Self::from_dir(&root, device)
    }

    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config: ClipConfig = read_json(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors".into(),
            });
        }
        let model = build_from_files(&[weights], DType::F32, device, |vb| {
            ClipModel::new(vb, &config)
        })?
        .map_err(|e| Error::IncompatibleModel(format!("CLIP in {}: {e}", dir.display())))?;
        let pp = dir.join("preprocessor_config.json");
        let preprocess = if pp.is_file() {
            read_json(&pp)?
        } else {
            ClipPreprocess::default()
        };
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        Ok(Self {
            model,
            tokenizer,
            preprocess,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// Preprocessed pixels `[B, 3, S, S]` of the images.
    pub fn pixel_values(&self, images: &[&RgbImage]) -> Result<Tensor> {
        let t = images
            .iter()
            .map(|im| self.preprocess.apply(im, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&t, 0)?)
    }

    /// Token ids `[B, 77]` of the captions (truncated to the model's length).
    pub fn input_ids(&self, captions: &[&str]) -> Result<Tensor> {
        let rows = captions
            .iter()
            .map(|c| Ok(self.tokenizer.encode(c)?.ids))
            .collect::<Result<Vec<Vec<u32>>>>()?;
        let t = rows.first().map(Vec::len).unwrap_or(0);
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (captions.len(), t), &self.device)?)
    }

    /// The four similarities of an image pair and its captions.
    pub fn score_pair(&self, images: [&RgbImage; 2], captions: [&str; 2]) -> Result<Similarities> {
        let image = self.model.image_embeds(&self.pixel_values(&images)?)?;
        let text = self.model.text_embeds(&self.input_ids(&captions)?)?;
        Similarities::from_embeds(&image, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn preprocessing_resizes_the_short_side_and_centre_crops() -> Result<()> {
        let pp: ClipPreprocess = serde_json::from_str(
            r#"{"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}"#,
        )
        .map_err(|e| Error::Internal(format!("preprocessor config: {e}")))?;
        // A 112×56 image whose right half is white: after resizing to 56×28 and cropping the
        // middle 28 columns, the left half of the crop is black and the right half white.
        let img = RgbImage::from_fn(112, 56, |x, _| {
            if x >= 56 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            }
        });
        let t = pp.apply(&img, &Device::Cpu)?;
        assert_eq!(t.dims(), &[3, 28, 28]);
        let red = t.get(0)?.to_vec2::<f32>()?;
        let black = (0.0 - 0.481_454_66) / 0.268_629_54;
        let white = (1.0 - 0.481_454_66) / 0.268_629_54;
        assert!((red[5][2] - black).abs() < 1e-5);
        assert!((red[5][25] - white).abs() < 1e-5);
        Ok(())
    }
}
