//! Classifier-free guidance, as pure functions of the noise predictions.

use candle_core::Tensor;

use crate::schedulers::mul_s;
use crate::Result;

/// The two guidance scales of an edit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// `s_T`: how strongly to follow the instruction.
    pub text: f64,
    /// `s_I`: how strongly to stay close to the input image.
    pub image: f64,
}

impl Guidance {
    /// Whether the UNet runs on (text + image, image, neither) or on the conditioned input only.
    pub fn enabled(self) -> bool {
        dual_guidance_enabled(self.text, self.image)
    }

    /// The guided noise prediction from the batch `[ε_TI, ε_I, ε∅]`.
    pub fn apply(self, eps: &Tensor) -> Result<Tensor> {
        let part = |i| eps.narrow(0, i, 1);
        dual_guidance(&part(0)?, &part(1)?, &part(2)?, self.text, self.image)
    }
}

/// The text conditioning of a guided run: the prompt's encoding and the unconditional (empty or
/// negative) prompt's, each `[1, 77, D]`.
#[derive(Debug, Clone)]
pub struct TextCond {
    pub cond: Tensor,
    pub uncond: Tensor,
}

/// Whether dual guidance is on, as diffusers decides it: `s_T > 1` and `s_I ≥ 1`.
pub fn dual_guidance_enabled(text_scale: f64, image_scale: f64) -> bool {
    text_scale > 1.0 && image_scale >= 1.0
}

/// InstructPix2Pix's dual classifier-free guidance:
/// `ε = ε∅ + s_T·(ε_TI − ε_I) + s_I·(ε_I − ε∅)`, evaluated in the reference's order.
pub fn dual_guidance(
    eps_text_image: &Tensor,
    eps_image: &Tensor,
    eps_uncond: &Tensor,
    text_scale: f64,
    image_scale: f64,
) -> Result<Tensor> {
    let t = mul_s(&(eps_text_image - eps_image)?, text_scale as f32)?;
    let i = mul_s(&(eps_image - eps_uncond)?, image_scale as f32)?;
    Ok(((eps_uncond + t)? + i)?)
}

/// Ordinary classifier-free guidance `ε∅ + s·(ε_c − ε∅)`.
pub fn cfg(eps_cond: &Tensor, eps_uncond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((eps_uncond + mul_s(&(eps_cond - eps_uncond)?, scale as f32)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).expect("tensor")
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        let d = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        d < 1e-6
    }

    #[test]
    fn image_scale_one_is_plain_cfg_between_text_image_and_image() -> Result<()> {
        let (ti, i, u) = (
            t(&[1.0, -2.0, 0.5]),
            t(&[0.2, 0.3, -0.7]),
            t(&[-1.1, 0.9, 2.0]),
        );
        let dual = dual_guidance(&ti, &i, &u, 7.5, 1.0)?;
        assert!(close(&dual, &cfg(&ti, &i, 7.5)?));
        Ok(())
    }

    #[test]
    fn unit_scales_give_the_conditional_branch() -> Result<()> {
        let (ti, i, u) = (
            t(&[1.0, -2.0, 0.5]),
            t(&[0.2, 0.3, -0.7]),
            t(&[-1.1, 0.9, 2.0]),
        );
        assert!(close(&dual_guidance(&ti, &i, &u, 1.0, 1.0)?, &ti));
        Ok(())
    }

    #[test]
    fn hand_computed_value() -> Result<()> {
        // u + 7.5 (ti - i) + 1.5 (i - u) = 1 + 7.5·2 + 1.5·(−1) = 14.5
        let r = dual_guidance(&t(&[2.0]), &t(&[0.0]), &t(&[1.0]), 7.5, 1.5)?;
        assert!(close(&r, &t(&[14.5])));
        Ok(())
    }

    #[test]
    fn enabled_rule_matches_diffusers() {
        assert!(dual_guidance_enabled(7.5, 1.5));
        assert!(dual_guidance_enabled(1.01, 1.0));
        assert!(!dual_guidance_enabled(1.0, 1.5));
        assert!(!dual_guidance_enabled(7.5, 0.99));
    }
}
