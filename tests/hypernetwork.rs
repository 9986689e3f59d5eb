//! An A1111 hypernetwork on tiny-ip2p's UNet against the PyTorch implementation of A1111's
//! formulas (`tools/gen_hypernetwork.py`: h(x) = x + strength · MLP(x) on the context of k and
//! v in every attention layer whose context width the file has), within ten times the float32
//! reference's distance from float64.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, Case};
use ip2p::loader::hypernetwork::HypernetworkSpec;
use ip2p::loader::{self, LoadOptions, ModelDir};

#[test]
fn a_hypernetwork_changes_the_unet_as_a1111_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hypernetwork");
    let case = Case::load(&dir.join("tiny-style-case.safetensors")).expect("case");
    let strength = case.meta_f64("strength").expect("strength");
    let spec = HypernetworkSpec {
        path: dir.join("tiny-style.pt"),
        strength,
    };
    let h = loader::hypernetwork::read(&spec).expect("read");
    assert_eq!(h.widths(), [32, 64]);
    assert_eq!(h.name, "tiny-style");
    let model = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("dir");
    for kernels in [
        ip2p::models::nn::Kernels::Auto,
        ip2p::models::nn::Kernels::Generic,
    ] {
        let opts = LoadOptions {
            hypernetwork: Some(spec.clone()),
            kernels,
            ..Default::default()
        };
        let c = loader::load(&model, &Device::Cpu, &opts).expect("load");
        let t = Tensor::new(500f32, &Device::Cpu).expect("t");
        let out = c
            .unet
            .forward(
                case.t("unet_sample").expect("x"),
                &t,
                case.t("unet_ehs").expect("ehs"),
            )
            .expect("forward");
        let mut checks = common::Checks::default();
        checks.within(&case, "unet_out", &out).expect("compare");
        assert!(
            checks.failures.is_empty(),
            "{kernels:?}: {:?}",
            checks.failures
        );
    }
}
