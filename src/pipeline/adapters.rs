//! LoRA named by one request: a copy of the pipeline whose adapted layers carry `W + ΔW`, the
//! other layers shared with the original (the copy is shallow: weights are reference-counted),
//! so the original stays exact for the next request and nothing is ever subtracted back.

use std::collections::HashMap;

use crate::loader::lora::{LoraLibrary, Net};
use crate::loader::Components;
use crate::models::nn::LayerMut;
use crate::pipeline::EditPipeline;
use crate::{Error, Result};

/// The weights (`….weight`) a request's LoRA may change, by network.
pub fn adaptable_weights(c: &Components) -> HashMap<Net, Vec<String>> {
    let mut unet = c.unet.clone();
    let mut text = c.text_encoder.clone();
    let mut u = Vec::new();
    unet.visit_layers(&mut |p, _| u.push(format!("{p}.weight")));
    let mut t = Vec::new();
    text.visit_layers(&mut |p, _| t.push(format!("{p}.weight")));
    HashMap::from([(Net::Unet, u), (Net::TextEncoder, t)])
}

impl EditPipeline {
    /// This pipeline with the LoRA files of `set` (`(name, scale)` from `library`) folded into
    /// the layers they change; the result is as if they had been given at load (`--lora`).
    pub fn with_loras(&self, library: &LoraLibrary, set: &[(String, f64)]) -> Result<Self> {
        let mut deltas = library.deltas(set)?;
        let mut c = self.components().clone();
        let mut fail: Option<Error> = None;
        let mut unet = deltas.remove(&Net::Unet).unwrap_or_default();
        c.unet
            .visit_layers(&mut |p, l| apply(&mut unet, p, l, &mut fail));
        let mut text = deltas.remove(&Net::TextEncoder).unwrap_or_default();
        c.text_encoder
            .visit_layers(&mut |p, l| apply(&mut text, p, l, &mut fail));
        match fail {
            Some(e) => Err(e),
            None => EditPipeline::new(c),
        }
    }
}

/// Adds the delta of layer `path` (if `deltas` has one), keeping the first failure.
fn apply(
    deltas: &mut HashMap<String, candle_core::Tensor>,
    path: &str,
    mut layer: LayerMut,
    fail: &mut Option<Error>,
) {
    if let Some(delta) = deltas.remove(&format!("{path}.weight")) {
        if let Err(e) = layer.add_delta(&delta) {
            fail.get_or_insert(Error::IncompatibleModel(format!("LoRA on {path}: {e}")));
        }
    }
}
