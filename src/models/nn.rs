//! Small building blocks shared by the models: norms, projections, activations, attention.
//!
//! Every model goes through these wrappers, so a faster kernel (or a differentiable form for
//! training) is swapped in at one place.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

use ip2p_cpu::{kernels, profile, rows, stored};

/// Runs `f` on the elements of a CPU f32 tensor in place (no copy when it is contiguous).
fn with_cpu_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Ok(f(&v[a..b]))
        }
        _ => candle_core::bail!("expected a contiguous CPU f32 tensor"),
    }
}

/// Calls `f` with the stored tensor `name` under `vb`'s prefix, if a source is set for this
/// thread, `vb` produces CPU f32 tensors and the stored one has the expected `shape`; `None`
/// means: take the weight from `vb`.
fn with_stored<T>(
    vb: &VarBuilder,
    name: &str,
    shape: &[usize],
    f: impl FnOnce(stored::WeightData) -> T,
) -> Option<T> {
    if vb.dtype() != DType::F32 || !vb.device().is_cpu() {
        return None;
    }
    let source = BuildMode::read(|m| m.source.clone())?;
    let prefix = vb.prefix();
    let full = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    };
    let t = source.tensor(&full)?;
    (t.shape == shape && t.data.len() == shape.iter().product::<usize>()).then(|| f(t.data))
}

/// A dense layer `y = x Wᵀ + b` that accepts inputs of any rank.
///
/// CPU f32 weights that are not being trained are kept only in packed form
/// ([`kernels::FastLinear`]); `weight` is then a zero-sized placeholder of the right shape.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    fast: Option<std::sync::Arc<kernels::FastLinear>>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        if let Some(l) = Self::from_stored(&vb, &[out_dim, in_dim], &bias) {
            return l;
        }
        Self::from_parts(vb.get((out_dim, in_dim), "weight")?, bias)
    }

    /// Loads a projection stored either as a linear weight `[out, in]` or as a 1×1 convolution
    /// weight `[out, in, 1, 1]` (old VAE attention checkpoints).
    pub fn new_maybe_conv(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let bias = Some(vb.get(out_dim, "bias")?);
        for shape in [&[out_dim, in_dim][..], &[out_dim, in_dim, 1, 1]] {
            if let Some(l) = Self::from_stored(&vb, shape, &bias) {
                return l;
            }
        }
        let weight = match vb.get((out_dim, in_dim), "weight") {
            Ok(w) => w,
            Err(_) => vb
                .get((out_dim, in_dim, 1, 1), "weight")?
                .reshape((out_dim, in_dim))?,
        };
        Self::from_parts(weight, bias)
    }

    /// The packed layer straight from the stored weight of `shape` (`[out, in]`, or a 1×1
    /// convolution's `[out, in, 1, 1]`), where a loader provides it ([`stored`]).
    fn from_stored(
        vb: &VarBuilder,
        shape: &[usize],
        bias: &Option<Tensor>,
    ) -> Option<Result<Self>> {
        if BuildMode::read(|m| m.differentiable)
            || bias.as_ref().is_some_and(|b| !Self::fastable(b))
        {
            return None;
        }
        let (out_dim, in_dim) = (shape[0], shape[1]);
        with_stored(vb, "weight", shape, |w| {
            let b = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            let fast = kernels::FastLinear::new(w, b.as_deref(), out_dim, in_dim);
            Self::packed(fast, bias.clone(), vb.device())
        })
    }

    fn fastable(t: &Tensor) -> bool {
        builds_fused(t)
    }

    fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if Self::fastable(&weight)
            && bias.as_ref().is_none_or(Self::fastable)
            && !BuildMode::read(|m| m.differentiable)
        {
            let (out_dim, in_dim) = weight.dims2()?;
            let b = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            let fast = with_cpu_f32(&weight, |w| {
                kernels::FastLinear::new(w, b.as_deref(), out_dim, in_dim)
            })?;
            return Self::packed(fast, bias, weight.device());
        }
        Ok(Self {
            weight,
            bias,
            lora: None,
            fast: None,
        })
    }

    /// A layer that keeps only its packed weight (`weight` is a zero-sized placeholder).
    fn packed(
        fast: kernels::FastLinear,
        bias: Option<Tensor>,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let (out_dim, in_dim) = fast.dims();
        let placeholder = Tensor::zeros((), DType::F32, dev)?.broadcast_as((out_dim, in_dim))?;
        Ok(Self {
            weight: placeholder,
            bias,
            lora: None,
            fast: Some(std::sync::Arc::new(fast)),
        })
    }

    pub fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    /// The weight `[out, in]` (unpacked from the inference kernel's copy when there is one).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.fast {
            Some(f) => {
                let (o, i) = f.dims();
                Tensor::from_vec(f.weight(), (o, i), self.weight.device())
            }
            None => Ok(self.weight.clone()),
        }
    }
}

/// A low-rank adapter on a [`Linear`]: `y += scale · (x Aᵀ) Bᵀ` (PEFT's `lora_A`, `lora_B`).
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

impl Linear {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }

    /// Attaches (or removes) a trainable adapter, kept apart from the weight.
    pub fn set_lora(&mut self, lora: Option<Lora>) {
        self.lora = lora;
    }

    /// Folds an adapter into the weight (`W += scale · B A`): no cost at inference.
    pub fn merge_lora(&mut self, lora: &Lora) -> Result<()> {
        self.add_delta(&(lora.b.matmul(&lora.a)? * lora.scale)?)
    }

    /// `W += delta` (`[out, in]`), the inference copy packed again.
    pub fn add_delta(&mut self, delta: &Tensor) -> Result<()> {
        let w = self.weight()?;
        let merged = (&w + delta.to_device(w.device())?.to_dtype(w.dtype())?)?;
        let lora = self.lora.take();
        *self = Self::from_parts(merged, self.bias.take())?;
        self.lora = lora;
        Ok(())
    }
}

/// A layer whose weight may change after loading (a LoRA named by one request), with the
/// parameter path the visitors give it.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl LayerMut<'_> {
    /// `W += delta`, `delta` shaped as the weight.
    pub fn add_delta(&mut self, delta: &Tensor) -> Result<()> {
        match self {
            Self::Linear(l) => l.add_delta(&delta.flatten_from(1)?),
            Self::Conv(c) => c.add_delta(delta),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x2 = x.reshape((rows, in_dim))?;
        let y = match &self.fast {
            Some(f) => {
                if x.track_op() {
                    candle_core::bail!(
                        "linear inference kernel: load trainable weights as variables"
                    );
                }
                x2.contiguous()?.apply_op1_no_bwd(f.as_ref())?
            }
            None => {
                let y = x2.matmul(&self.weight.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let y = match &self.lora {
            Some(l) => (y + (x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// Layer normalisation over the last dimension, two-pass (mean, then the centred variance) as
/// PyTorch computes it. Built from differentiable tensor ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    /// `(γ, β)` for the fused CPU kernel (f32 weights not being trained).
    fused: Option<std::sync::Arc<(Vec<f32>, Vec<f32>)>>,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = vb.get(dim, "bias")?;
        let fused = if builds_fused(&weight) {
            Some(std::sync::Arc::new((
                weight.to_vec1::<f32>()?,
                bias.to_vec1::<f32>()?,
            )))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            eps,
            fused,
        })
    }
}

/// LayerNorm over the last dimension on CPU f32 ([`rows::layer_norm`]).
struct FusedLayerNorm<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f64,
}

impl candle_core::CustomOp1 for FusedLayerNorm<'_> {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, "fused layer norm")?;
        let dim = self.gamma.len();
        if dim == 0 || layout.dims().last() != Some(&dim) {
            candle_core::bail!("fused layer norm: last dimension is not {dim}");
        }
        let out = rows::layer_norm(x, self.gamma, self.beta, self.eps);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The f32 elements of a contiguous CPU tensor, or an error naming `op`.
fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&data[start..end])
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = profile::scope("layer_norm");
        if let Some(f) = self.fused.as_deref() {
            if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
                return x.contiguous()?.apply_op1_no_bwd(&FusedLayerNorm {
                    gamma: &f.0,
                    beta: &f.1,
                    eps: self.eps,
                });
            }
        }
        // Half precision computes its statistics in f32, as PyTorch's layer_norm does: Σ(x−μ)²
        // in f16 overflows once a row's mean square passes 65504 / dim.
        let dtype = x.dtype();
        let x = x.to_dtype(stats_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let sd = xn.dtype();
        xn.broadcast_mul(&self.weight.to_dtype(sd)?)?
            .broadcast_add(&self.bias.to_dtype(sd)?)?
            .to_dtype(dtype)
    }
}

/// The dtype norms and softmax compute in for activations of `dtype`: f32 for half precision,
/// the dtype itself otherwise.
fn stats_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Group normalisation over `[B, C, ...]`.
///
/// On CPU in f32, when no gradient is being recorded, a fused kernel computes it (and the SiLU
/// that usually follows) in one parallel pass per group with f64 statistics; otherwise it is
/// built from differentiable tensor ops.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fused: Option<std::sync::Arc<FusedGroupNorm>>,
    /// Built with the fused kernels allowed: training on CPU f32 takes [`TrainGroupNorm`].
    train_fused: bool,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm: {channels} channels are not divisible by {groups} groups"
            );
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let fused = if builds_fused(&weight) {
            Some(std::sync::Arc::new(FusedGroupNorm {
                gamma: weight.to_vec1::<f32>()?,
                beta: bias.to_vec1::<f32>()?,
                groups,
                eps,
            }))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            fused,
            train_fused: Ops::current().fused,
        })
    }

    fn fused_for(&self, x: &Tensor) -> Option<&FusedGroupNorm> {
        self.fused
            .as_deref()
            .filter(|_| x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op())
    }

    /// GroupNorm followed by SiLU, the pair every ResNet block uses.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = self.fused_for(x) {
            return x.contiguous()?.apply_op1_no_bwd(&FusedOp {
                norm: f,
                silu: true,
            });
        }
        if let Some(y) = self.train_fused(x, true)? {
            return Ok(y);
        }
        candle_nn::ops::silu(&self.forward(x)?)
    }

    /// While training on CPU f32 (anything records gradients): the norm (and SiLU) as one op
    /// whose backward is `ip2p_cpu::grad::group_norm_backward`.
    fn train_fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let (w, b) = (&self.weight, &self.bias);
        let trains = x.track_op() || w.track_op() || b.track_op();
        let cpu_f32 = [x, w, b]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
        if !(self.train_fused && trains && cpu_f32 && x.rank() >= 2) {
            return Ok(None);
        }
        let op = TrainGroupNorm {
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        Ok(Some(x.contiguous()?.apply_op3(w, b, op)?))
    }
}

/// GroupNorm (+SiLU) for training on CPU f32: `(x, γ, β) → y`, f64 statistics.
#[derive(Debug, Clone, Copy)]
struct TrainGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl TrainGroupNorm {
    fn shape(self, dims: &[usize]) -> Result<ip2p_cpu::grad::NormShape> {
        if dims.len() < 2 || !dims[1].is_multiple_of(self.groups.max(1)) {
            candle_core::bail!("train group norm: {dims:?} in {} groups", self.groups);
        }
        Ok(ip2p_cpu::grad::NormShape {
            batch: dims[0],
            channels: dims[1],
            hw: dims[2..].iter().product(),
            groups: self.groups,
            eps: self.eps,
        })
    }
}

impl candle_core::CustomOp3 for TrainGroupNorm {
    fn name(&self) -> &'static str {
        "train-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let s = self.shape(xl.dims())?;
        let x = contiguous_f32(xs, xl, "train group norm")?;
        let params = rows::GroupNormParams {
            gamma: contiguous_f32(gs, gl, "train group norm")?.to_vec(),
            beta: contiguous_f32(bs, bl, "train group norm")?.to_vec(),
            groups: s.groups,
            eps: s.eps,
        };
        if params.gamma.len() != s.channels || params.beta.len() != s.channels {
            candle_core::bail!(
                "train group norm: {} channels, γ/β of another size",
                s.channels
            );
        }
        let y = rows::group_norm(x, s.hw, &params, self.silu);
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = TrainGroupNormGrad {
            norm: *self,
            gamma: gamma.to_vec1::<f32>()?,
            beta: beta.to_vec1::<f32>()?,
        };
        // One op writes [dx | dγ | dβ].
        let packed = x.apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let (n, c) = (x.elem_count(), gamma.elem_count());
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
        ))
    }
}

/// The gradients of a [`TrainGroupNorm`]: `(x, dy) → [dx | dγ | dβ]`.
struct TrainGroupNormGrad {
    norm: TrainGroupNorm,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl candle_core::CustomOp2 for TrainGroupNormGrad {
    fn name(&self) -> &'static str {
        "train-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        dys: &candle_core::CpuStorage,
        dyl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let s = self.norm.shape(xl.dims())?;
        let x = contiguous_f32(xs, xl, "train group norm gradient")?;
        let dy = contiguous_f32(dys, dyl, "train group norm gradient")?;
        if dy.len() != x.len() || self.gamma.len() != s.channels {
            candle_core::bail!("train group norm gradient: shapes differ");
        }
        let (mut dx, dg, db) =
            ip2p_cpu::grad::group_norm_backward(&s, x, &self.gamma, &self.beta, dy, self.norm.silu);
        dx.extend(dg);
        dx.extend(db);
        let len = dx.len();
        Ok((
            candle_core::CpuStorage::F32(dx),
            candle_core::Shape::from(len),
        ))
    }
}

/// The fused CPU GroupNorm kernel's parameters.
type FusedGroupNorm = rows::GroupNormParams;

struct FusedOp<'a> {
    norm: &'a FusedGroupNorm,
    silu: bool,
}

impl candle_core::CustomOp1 for FusedOp<'_> {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let _p = profile::scope("group_norm");
        let x = contiguous_f32(storage, layout, "fused group norm")?;
        let dims = layout.dims();
        if dims.len() < 2 || dims[1] != self.norm.gamma.len() {
            candle_core::bail!(
                "fused group norm: expected [B, {}, ...]",
                self.norm.gamma.len()
            );
        }
        let hw: usize = dims[2..].iter().product();
        let out = rows::group_norm(x, hw, self.norm, self.silu);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = self.fused_for(x) {
            return x.contiguous()?.apply_op1_no_bwd(&FusedOp {
                norm: f,
                silu: false,
            });
        }
        if let Some(y) = self.train_fused(x, false)? {
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let x = x.contiguous()?.reshape((b, self.groups, ()))?;
        // Half precision computes its statistics in f32 (as diffusers upcasts); f64 stays f64.
        let x = x.to_dtype(stats_dtype(dtype))?;
        let n = x.dim(2)? as f64;
        let mean = (x.sum_keepdim(2)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let sd = xn.dtype();
        let xn = xn.reshape(dims)?;
        xn.broadcast_mul(&self.weight.to_dtype(sd)?.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.to_dtype(sd)?.reshape(shape)?)?
            .to_dtype(dtype)
    }
}

/// How the layers built on this thread choose their implementations: the one scoped switch
/// for everything a model's constructor does not take as an argument.
#[derive(Clone, Default)]
pub struct BuildMode {
    /// Fused CPU kernels where they apply, or candle's generic ops only.
    pub kernels: Kernels,
    /// Every layer passes gradients to its input even where its own weights are frozen plain
    /// tensors (LoRA training): the 3×3 inference kernel, which has no backward, is not chosen.
    pub differentiable: bool,
    /// The layers run on large maps (at least half the latent's side, the UNet's two outer
    /// levels): their 3×3 convolutions take Winograd's form whatever their channel counts (see
    /// [`kernels::ConvAlgo::auto`]), since there its smaller products save more than its
    /// larger weights cost.
    pub large_maps: bool,
    /// Layers pack straight from these stored weights where the `VarBuilder` they are given
    /// asks for CPU f32 weights of a name the source has (it must hold the same tensors).
    pub source: Option<Arc<dyn stored::StoredWeights>>,
    /// Packed weights are replayed from or recorded into this cache.
    pub cache: Option<Arc<stored::PackCache>>,
}

impl std::fmt::Debug for BuildMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildMode")
            .field("kernels", &self.kernels)
            .field("differentiable", &self.differentiable)
            .field("large_maps", &self.large_maps)
            .field("source", &self.source.is_some())
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

thread_local! {
    static MODE: std::cell::RefCell<BuildMode> = std::cell::RefCell::new(BuildMode::default());
}

impl BuildMode {
    /// The mode models are being built under on this thread.
    pub fn current() -> Self {
        Self::read(Self::clone)
    }

    /// `f` of the current mode, without copying it.
    fn read<R>(f: impl FnOnce(&Self) -> R) -> R {
        MODE.with(|m| f(&m.borrow()))
    }

    /// Runs `f` (model constructors) under this mode, then restores the previous one, also on
    /// panic, so constructors run by a rayon worker while it waits inside another one (work
    /// stealing) see their own.
    pub fn scope<T>(self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<BuildMode>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(prev) = self.0.take() {
                    MODE.with(|m| *m.borrow_mut() = prev);
                }
            }
        }
        let cache = self.cache.clone();
        let _restore = Restore(Some(MODE.with(|m| m.replace(self))));
        stored::with_pack_cache(cache, f)
    }
}

/// Which implementations a model's layers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused CPU kernels (packed GEMM, Winograd, fused norms, attention and activations)
    /// wherever the tensors are CPU f32 and record no gradient; candle's ops everywhere else.
    #[default]
    Auto,
    /// candle's generic ops only: exactly the graph a CUDA (or f16) tensor takes, on any device.
    Generic,
}

impl Kernels {
    /// The setting models are being built under on this thread ([`build_with_kernels`]).
    pub fn current() -> Self {
        BuildMode::read(|m| m.kernels)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Generic => "generic",
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" | "fused" => Ok(Self::Auto),
            "generic" => Ok(Self::Generic),
            _ => Err(format!("unknown kernels `{s}` (auto, generic)")),
        }
    }
}

/// Builds models (inside `f`) whose layers take the implementations `kernels` names.
pub fn build_with_kernels<T>(kernels: Kernels, f: impl FnOnce() -> T) -> T {
    BuildMode {
        kernels,
        ..BuildMode::current()
    }
    .scope(f)
}

/// Whether a layer being built with weight `t` takes a fused CPU kernel.
fn builds_fused(t: &Tensor) -> bool {
    Ops::current().fused && t.device().is_cpu() && t.dtype() == DType::F32 && !t.is_variable()
}

/// The weightless operations (attention, activations, layout changes) as a layer built under
/// a [`Kernels`] setting runs them: the fused CPU kernel where it is allowed and the tensors
/// are CPU f32 without gradients, candle's ops otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ops {
    fused: bool,
}

impl Default for Ops {
    fn default() -> Self {
        Self::AUTO
    }
}

impl Ops {
    /// Fused kernels where they apply.
    pub const AUTO: Self = Self { fused: true };
    /// candle's ops only.
    pub const GENERIC: Self = Self { fused: false };

    /// The setting models are being built under ([`build_with_kernels`]).
    pub fn current() -> Self {
        Self {
            fused: Kernels::current() == Kernels::Auto,
        }
    }

    fn fuses(self, ts: &[&Tensor]) -> bool {
        self.fused
            && ts
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
    }
}

/// Builds models whose every layer can pass gradients to its input ([`BuildMode::differentiable`]).
pub fn build_differentiable<T>(f: impl FnOnce() -> T) -> T {
    BuildMode {
        differentiable: true,
        ..BuildMode::current()
    }
    .scope(f)
}

/// Builds layers that run on large maps or not ([`BuildMode::large_maps`]).
pub fn build_for_large_maps<T>(large: bool, f: impl FnOnce() -> T) -> T {
    BuildMode {
        large_maps: large,
        ..BuildMode::current()
    }
    .scope(f)
}

/// A 2-D convolution with optional stride and padding.
///
/// With CPU f32 weights that are not being trained, stride-1 3×3 (padding 1) and 1×1
/// convolutions and stride-2 3×3 ones (padding at most 1) use the packed-GEMM kernel in
/// [`super::kernels`], which keeps only its packed copy of the weights (inputs always share the
/// weights' device and dtype, and inference inputs record no gradient).
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// candle's convolution, after `pad_end` more zero rows and columns at the bottom and right.
    Candle {
        conv: candle_nn::Conv2d,
        pad_end: usize,
        /// Built with the fused kernels allowed: training on CPU f32 takes `ip2p_cpu::grad`.
        fused: bool,
    },
    Fast(std::sync::Arc<kernels::FastConv>),
}

impl Conv2d {
    /// `W += delta` (`[out, in, k, k]`). A packed convolution keeps its weight invertibly only
    /// for 1×1 kernels; other packed kernels refuse (fold their adapters at load instead).
    pub fn add_delta(&mut self, delta: &Tensor) -> Result<()> {
        match self {
            Self::Candle { conv, .. } => {
                let w = conv.weight();
                let merged = (w + delta
                    .to_device(w.device())?
                    .to_dtype(w.dtype())?
                    .reshape(w.shape())?)?;
                *conv = candle_nn::Conv2d::new(merged, conv.bias().cloned(), *conv.config());
            }
            Self::Fast(f) => {
                let Some(mut w) = f.weight_1x1() else {
                    candle_core::bail!(
                        "a packed k×k convolution cannot change after loading (only 1×1 ones)"
                    );
                };
                let d = delta
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                if d.len() != w.len() {
                    candle_core::bail!(
                        "a delta of {} values for a 1×1 convolution of {}",
                        d.len(),
                        w.len()
                    );
                }
                w.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
                let (o, i) = f.channels();
                *f = std::sync::Arc::new(kernels::FastConv::new(&w[..], f.bias(), o, i, 1));
            }
        }
        Ok(())
    }

    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::with_padding(vb, in_c, out_c, kernel, stride, (padding, padding))
    }

    /// `padding = (before, after)`: zero rows and columns added before the first (top, left)
    /// and after the last (bottom, right) of each spatial axis; `after ≥ before`.
    pub fn with_padding(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Self> {
        if padding.1 < padding.0 {
            candle_core::bail!(
                "conv2d: padding after ({}) below before ({})",
                padding.1,
                padding.0
            );
        }
        let bias = vb.get(out_c, "bias")?;
        let fast_shape = match (kernel, stride, padding) {
            (3, 1, (1, 1)) | (1, 1, (0, 0)) => true,
            (3, 2, (lo, hi)) => lo <= 1 && hi <= 1,
            _ => false,
        };
        let fast_ok =
            |t: &Tensor| fast_shape && builds_fused(t) && !BuildMode::read(|m| m.differentiable);
        let fast = |w: stored::WeightData| -> Result<Self> {
            let bias = bias.to_vec1::<f32>()?;
            let fast = if stride == 2 {
                kernels::FastConv::strided(w, &bias, out_c, in_c, padding)
            } else {
                let large = BuildMode::read(|m| m.large_maps);
                let algo = kernels::ConvAlgo::auto(out_c, in_c, kernel, large);
                kernels::FastConv::with_algo(w, &bias, out_c, in_c, kernel, algo)
            };
            Ok(Self::Fast(std::sync::Arc::new(fast)))
        };
        let shape = [out_c, in_c, kernel, kernel];
        if fast_ok(&bias) {
            if let Some(conv) = with_stored(&vb, "weight", &shape, fast) {
                return conv;
            }
        }
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        if fast_ok(&weight) {
            return with_cpu_f32(&weight, |w| fast(w.into()))?;
        }
        let cfg = candle_nn::Conv2dConfig {
            padding: padding.0,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Self::Candle {
            conv: candle_nn::Conv2d::new(weight, Some(bias), cfg),
            pad_end: padding.1 - padding.0,
            fused: Ops::current().fused,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle {
                conv,
                pad_end,
                fused,
            } => {
                let x = if *pad_end == 0 {
                    x.clone()
                } else {
                    x.pad_with_zeros(3, 0, *pad_end)?
                        .pad_with_zeros(2, 0, *pad_end)?
                };
                train_conv(conv, &x, *fused)
            }
            Self::Fast(k) => {
                if x.track_op() {
                    candle_core::bail!(
                        "conv inference kernel: load trainable weights as variables"
                    );
                }
                x.contiguous()?.apply_op1_no_bwd(k.as_ref())
            }
        }
    }
}

/// candle's convolution, except while training on CPU f32 (the input or the weight records
/// gradients) with the fused kernels allowed (`fused`): then the forward and both gradients run
/// on the GEMM ([`TrainConv`]).
fn train_conv(conv: &candle_nn::Conv2d, x: &Tensor, fused: bool) -> Result<Tensor> {
    let w = conv.weight();
    let c = conv.config();
    let square = w.rank() == 4 && w.dim(2)? == w.dim(3)?;
    let trains = x.track_op() || w.track_op();
    let cpu_f32 = [x, w]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    let fits = square && c.dilation == 1 && c.groups == 1 && x.rank() == 4;
    if !(fused && trains && cpu_f32 && fits) {
        return conv.forward(x);
    }
    let op = TrainConv {
        stride: c.stride,
        padding: c.padding,
    };
    let y = x.contiguous()?.apply_op2(&w.contiguous()?, op)?;
    match conv.bias() {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// A convolution whose forward and gradients are `ip2p_cpu::grad`'s (CPU f32, contiguous).
#[derive(Debug, Clone, Copy)]
struct TrainConv {
    stride: usize,
    padding: usize,
}

impl TrainConv {
    /// The geometry of input `x` (`[B, Ci, H, W]`) and weight `w` (`[Co, Ci, K, K]`).
    fn shape(self, x: &[usize], w: &[usize]) -> Result<ip2p_cpu::grad::ConvShape> {
        let (&[batch, in_c, h, wd], &[out_c, wc, k, _]) = (x, w) else {
            candle_core::bail!("train conv: expected 4-D input and weight");
        };
        let s = ip2p_cpu::grad::ConvShape {
            batch,
            in_c,
            out_c,
            h,
            w: wd,
            kernel: k,
            stride: self.stride,
            padding: self.padding,
        };
        if wc != in_c || !s.is_valid() {
            candle_core::bail!("train conv: input {x:?} and weight {w:?} do not fit");
        }
        Ok(s)
    }
}

impl candle_core::CustomOp2 for TrainConv {
    fn name(&self) -> &'static str {
        "train-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let s = self.shape(xl.dims(), wl.dims())?;
        let x = contiguous_f32(xs, xl, "train conv")?;
        let w = contiguous_f32(ws, wl, "train conv")?;
        let (ho, wo) = s.out_hw();
        let y = ip2p_cpu::grad::conv2d(&s, x, w);
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from((s.batch, s.out_c, ho, wo)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only what records gradients needs one (frozen weights in LoRA training do not).
        let dy = dy.contiguous()?;
        let grad = |of: ConvGradOf| -> Result<Option<Tensor>> {
            let op = TrainConvGrad { op: *self, of };
            Ok(Some(match of {
                ConvGradOf::Input(_) => dy.apply_op2_no_bwd(w, &op)?,
                ConvGradOf::Weight(_) => x.apply_op2_no_bwd(&dy, &op)?,
            }))
        };
        let dx = if x.track_op() {
            grad(ConvGradOf::Input(x.dims4()?))?
        } else {
            None
        };
        let dw = if w.track_op() {
            grad(ConvGradOf::Weight(w.dims4()?))?
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Which gradient of a [`TrainConv`], with the shape of what it is taken with respect to.
#[derive(Debug, Clone, Copy)]
enum ConvGradOf {
    /// `(dy, w) → dx`, the input being `[B, Ci, H, W]`.
    Input((usize, usize, usize, usize)),
    /// `(x, dy) → dw`, the weight being `[Co, Ci, K, K]`.
    Weight((usize, usize, usize, usize)),
}

/// A gradient of a [`TrainConv`].
#[derive(Debug, Clone, Copy)]
struct TrainConvGrad {
    op: TrainConv,
    of: ConvGradOf,
}

impl candle_core::CustomOp2 for TrainConvGrad {
    fn name(&self) -> &'static str {
        "train-conv-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let first = contiguous_f32(s1, l1, "train conv gradient")?;
        let second = contiguous_f32(s2, l2, "train conv gradient")?;
        let (out, dims) = match self.of {
            ConvGradOf::Input(d @ (b, c, h, w)) => {
                let s = self.op.shape(&[b, c, h, w], l2.dims())?;
                (ip2p_cpu::grad::conv2d_grad_input(&s, first, second), d)
            }
            ConvGradOf::Weight(d @ (o, c, k, k2)) => {
                let s = self.op.shape(l1.dims(), &[o, c, k, k2])?;
                (ip2p_cpu::grad::conv2d_grad_weight(&s, first, second), d)
            }
        };
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(dims),
        ))
    }
}

impl Conv2d {
    /// `self(x) + skip`, the skip connection added as the output is written where the fast
    /// kernel runs (the same rounding as the separate sum: the convolution's value first).
    pub fn forward_add(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        match self {
            Self::Fast(k) if !x.track_op() && !skip.track_op() => x
                .contiguous()?
                .apply_op2_no_bwd(&skip.contiguous()?, &kernels::ConvAdd(k.as_ref())),
            _ => self.forward(x)? + skip,
        }
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` computes by default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// GEGLU's gate on a projection `[.., 2n]`: `h · GELU(g)` for its halves `h`, `g` (the fused
/// kernel on CPU f32 without gradients).
impl Ops {
    pub fn geglu(self, x: &Tensor) -> Result<Tensor> {
        if self.fuses(&[x]) {
            return x.contiguous()?.apply_op1_no_bwd(&kernels::Geglu);
        }
        let (h, gate) = chunk2_last(x)?;
        h * gelu(&gate)?
    }

    /// CLIP's quick GELU: `x · σ(1.702 x)`.
    pub fn quick_gelu(self, x: &Tensor) -> Result<Tensor> {
        if self.fuses(&[x]) {
            return x.contiguous()?.apply_op1_no_bwd(&kernels::QuickGelu);
        }
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }
}

/// Softmax over the last dimension.
///
/// candle's fused kernel records no backward, so when gradients are being recorded the softmax is
/// built from differentiable ops instead (the subtracted maximum only guards against overflow and
/// carries no gradient).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// What may be done to the attention logits (before the softmax) of one attention call.
///
/// Prompt-to-Prompt uses this to keep two renders' layouts aligned: batch item `j` attends with
/// the logits of item `logits_from[j]` (and its own values).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogitControl<'a> {
    /// `u32 [B]`: for every batch item, the item whose logits it uses.
    pub logits_from: Option<&'a Tensor>,
    /// Inspection hook: the final logits `[B, H, Nq, Nk]` of every call are pushed here.
    pub record: Option<&'a std::cell::RefCell<Vec<Tensor>>>,
}

impl LogitControl<'_> {
    pub fn is_active(&self) -> bool {
        self.logits_from.is_some() || self.record.is_some()
    }
}

impl Ops {
    /// Multi-head scaled dot-product attention (on CPU in f32 without gradients, the fused kernel
    /// [`kernels::FastAttention`]; otherwise [`attention_blocked`]).
    ///
    /// `q: [B, Nq, H·d]`, `k, v: [B, Nk, H·d]` → `[B, Nq, H·d]`. `mask`, when given, is added to
    /// the logits (broadcast over batch and heads).
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        match mask {
            None => self.attention_with(q, k, v, heads, LogitControl::default()),
            Some(_) => attention_blocked(
                q,
                k,
                v,
                heads,
                mask,
                attention_block_elems(q, heads)?,
                LogitControl::default(),
            ),
        }
    }

    /// Causal [`Ops::attention`]: query `i` sees keys `j ≤ i` (CLIP's text encoder).
    pub fn attention_causal(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        if let Some(o) = self.flash(q, k, v, heads, true)? {
            return Ok(o);
        }
        if self.fuses(&[q, k, v]) {
            return q.contiguous()?.apply_op3_no_bwd(
                &k.contiguous()?,
                &v.contiguous()?,
                &kernels::FastAttention {
                    heads,
                    logits_from: None,
                    causal: true,
                },
            );
        }
        let (nq, nk) = (q.dim(1)?, k.dim(1)?);
        let mask: Vec<f32> = (0..nq)
            .flat_map(|i| (0..nk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (nq, nk), q.device())?;
        attention_blocked(
            q,
            k,
            v,
            heads,
            Some(&mask),
            attention_block_elems(q, heads)?,
            LogitControl::default(),
        )
    }

    /// [`Ops::attention`] with the logits steered by `ctl`.
    pub fn attention_with(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        ctl: LogitControl,
    ) -> Result<Tensor> {
        if !ctl.is_active() {
            if let Some(o) = self.flash(q, k, v, heads, false)? {
                return Ok(o);
            }
        }
        if ctl.record.is_none() && self.fuses(&[q, k, v]) {
            let logits_from = match ctl.logits_from {
                Some(f) => Some(logits_from_indices(f, q.dim(0)?)?),
                None => None,
            };
            return q.contiguous()?.apply_op3_no_bwd(
                &k.contiguous()?,
                &v.contiguous()?,
                &kernels::FastAttention {
                    heads,
                    logits_from,
                    causal: false,
                },
            );
        }
        let block = attention_block_elems(q, heads)?;
        attention_blocked(q, k, v, heads, None, block, ctl)
    }
}

impl Ops {
    /// Flash attention v2 (the `flash-attn` feature) where it applies: CUDA, f16 or bf16, a
    /// head width that is a multiple of 8 up to 512, no gradient, and kernels not restricted
    /// to candle's generic ops. `None` elsewhere.
    #[cfg(feature = "flash-attn")]
    fn flash(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Option<Tensor>> {
        let (b, nq, inner) = q.dims3()?;
        let d = inner / heads.max(1);
        let applies = self.fused
            && q.device().is_cuda()
            && matches!(q.dtype(), DType::F16 | DType::BF16)
            && d.is_multiple_of(8)
            && d <= 512
            && ![q, k, v].iter().any(|t| t.track_op());
        if !applies {
            return Ok(None);
        }
        let nk = k.dim(1)?;
        let split = |t: &Tensor, n: usize| t.contiguous()?.reshape((b, n, heads, d));
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let o = candle_flash_attn::flash_attn(
            &split(q, nq)?,
            &split(k, nk)?,
            &split(v, nk)?,
            scale,
            causal,
        )?;
        Ok(Some(o.reshape((b, nq, inner))?))
    }

    #[cfg(not(feature = "flash-attn"))]
    fn flash(
        self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _heads: usize,
        _causal: bool,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// `logits_from` as indices, checked against the batch size `b`.
fn logits_from_indices(f: &Tensor, b: usize) -> Result<Vec<usize>> {
    let f: Vec<usize> = f
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    if f.len() != b || f.iter().any(|&i| i >= b) {
        candle_core::bail!("attention: logits_from {f:?} for a batch of {b}");
    }
    Ok(f)
}

/// Score elements per batch·head that [`attention_blocked`] materialises at once on `q`'s
/// device: 1 M on the CPU (1024 × 1024, cache-sized blocks); on a GPU, blocks of about 2²⁹
/// elements over all batch·heads together (1 GiB in f16, 2 GiB as the f32 softmax), so a 2048 px map takes a few large
/// launches instead of thousands of small serial ones.
pub fn attention_block_elems(q: &Tensor, heads: usize) -> Result<usize> {
    if q.device().is_cpu() {
        return Ok(ATTENTION_BLOCK_ELEMS);
    }
    let bh = (q.dim(0)? * heads).max(1);
    Ok(((1usize << 29) / bh).max(ATTENTION_BLOCK_ELEMS))
}

/// [`attention`] with scores materialised `block_elems` per batch·head at a time.
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    block_elems: usize,
    ctl: LogitControl,
) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |t: &Tensor, n: usize| -> Result<Tensor> {
        t.reshape((b, n, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, n, d))
    };
    // The scale goes on q before the product: in f16 the unscaled logits of a 512-wide head
    // (the VAE's) overflow where the scaled ones do not.
    let q = (split(q, nq)? * scale)?;
    let k = split(k, nk)?;
    let v = split(v, nk)?;
    let kt = k.t()?;
    if let Some(from) = ctl.logits_from {
        if from.dims1()? != b {
            candle_core::bail!(
                "attention: logits_from has {} entries for a batch of {b}",
                from.dims1()?
            );
        }
    }
    // Scores are materialised a block of queries at a time (each row's softmax is complete
    // within its block, so only rounding differs): at 512 px the full [B·H, 4096, 4096] matrix would be
    // 1.6 GB per call.
    let rows = (block_elems / nk.max(1)).max(1);
    let block = |q: &Tensor| -> Result<Tensor> {
        // Half-precision logits are taken to f32 for the mask and the softmax.
        let mut logits = q.matmul(&kt)?.to_dtype(stats_dtype(q.dtype()))?;
        if let Some(mask) = mask {
            logits = logits.broadcast_add(&mask.to_dtype(logits.dtype())?)?;
        }
        if let Some(from) = ctl.logits_from {
            let (_, n, m) = logits.dims3()?;
            logits = logits
                .reshape((b, heads * n * m))?
                .index_select(from, 0)?
                .reshape((b * heads, n, m))?;
        }
        if let Some(rec) = ctl.record {
            let (_, n, m) = logits.dims3()?;
            rec.borrow_mut().push(logits.reshape((b, heads, n, m))?);
        }
        softmax_last_dim(&logits)?.to_dtype(v.dtype())?.matmul(&v)
    };
    let out = if nq <= rows || mask.is_some() || ctl.record.is_some() {
        block(&q)?
    } else {
        let mut parts = Vec::with_capacity(nq.div_ceil(rows));
        let mut start = 0;
        while start < nq {
            let len = rows.min(nq - start);
            parts.push(block(&q.narrow(1, start, len)?)?);
            start += len;
        }
        Tensor::cat(&parts, 1)?
    };
    out.reshape((b, heads, nq, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, nq, inner))
}

/// Score elements per batch·head materialised at once on the CPU (1024 × 1024).
const ATTENTION_BLOCK_ELEMS: usize = 1 << 20;

/// Splits the last dimension in two equal halves.
pub fn chunk2_last(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}

/// `[B, M, N]` → `[B, N, M]`, contiguous (a parallel, cache-blocked copy on CPU f32 without
/// gradients: the strided copy behind `transpose(1, 2)?.contiguous()` runs at about a tenth
/// of memory speed on the transformers' token maps).
impl Ops {
    pub fn transpose_last2(self, x: &Tensor) -> Result<Tensor> {
        if self.fuses(&[x]) {
            return x.contiguous()?.apply_op1_no_bwd(&TransposeLast2);
        }
        x.transpose(1, 2)?.contiguous()
    }
}

struct TransposeLast2;

impl candle_core::CustomOp1 for TransposeLast2 {
    fn name(&self) -> &'static str {
        "transpose-last-2"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, "transpose")?;
        let (b, m, n) = layout.shape().dims3()?;
        let out = rows::transpose_last2(x, b, m, n);
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, n, m)),
        ))
    }
}

/// Nearest-neighbour resize of `[B, C, H, W]` to `(h, w)` with PyTorch's `nearest` rule
/// (`src = floor(dst · in / out)`).
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if h == 2 * ih && w == 2 * iw {
        return x.upsample_nearest2d(h, w);
    }
    let idx = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let v: Vec<u32> = (0..out)
            .map(|o| (((o as f32) * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Tensor::new(v, x.device())
    };
    let x = x.index_select(&idx(h, ih)?, 2)?;
    x.index_select(&idx(w, iw)?, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn training_convolutions_take_the_gemm_unless_kernels_are_generic() -> Result<()> {
        let dev = Device::Cpu;
        let build = |kernels| -> Result<(Conv2d, candle_nn::VarMap)> {
            let map = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let conv = build_with_kernels(kernels, || Conv2d::new(vb, 3, 4, 3, 1, 1))?;
            Ok((conv, map))
        };
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 9, 7), &dev)?)?;
        for kernels in [Kernels::Auto, Kernels::Generic] {
            let (conv, map) = build(kernels)?;
            for v in map.all_vars() {
                v.set(&Tensor::randn(0f32, 0.5, v.dims(), &dev)?)?;
            }
            let Conv2d::Candle { conv: inner, .. } = &conv else {
                candle_core::bail!("variables take candle's layer");
            };
            let ours = conv.forward(x.as_tensor())?;
            let candle = inner.forward(x.as_tensor())?;
            let d = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // The generic graph is candle's to the bit; the GEMM sums in another order.
            match kernels {
                Kernels::Generic => assert_eq!(d, 0.0),
                Kernels::Auto => assert!(d > 0.0 && d < 1e-5, "{d}"),
            }
            let g = ours.sqr()?.sum_all()?.backward()?;
            assert!(g.get(x.as_tensor()).is_some());
        }
        Ok(())
    }

    struct One(Vec<usize>, Vec<f32>);
    impl stored::StoredWeights for One {
        fn tensor(&self, name: &str) -> Option<stored::StoredTensor<'_>> {
            (name == "a.b.weight").then(|| stored::StoredTensor {
                shape: self.0.clone(),
                data: self.1.as_slice().into(),
            })
        }
    }

    #[test]
    fn stored_weights_are_found_by_prefix_and_shape_only_inside_build_from() {
        let dev = candle_core::Device::Cpu;
        let vb = VarBuilder::zeros(DType::F32, &dev).pp("a").pp("b");
        let src: std::sync::Arc<dyn stored::StoredWeights> =
            std::sync::Arc::new(One(vec![2, 3], vec![1.0; 6]));
        let sum = |vb: &VarBuilder, shape: &[usize]| {
            with_stored(vb, "weight", shape, |d| d.to_f32_vec().iter().sum::<f32>())
        };
        assert_eq!(sum(&vb, &[2, 3]), None, "no source outside build_from");
        let with = |source: Option<std::sync::Arc<dyn stored::StoredWeights>>| BuildMode {
            source,
            ..BuildMode::default()
        };
        with(Some(src.clone())).scope(|| {
            assert_eq!(sum(&vb, &[2, 3]), Some(6.0));
            assert_eq!(sum(&vb, &[3, 2]), None, "shape differs");
            assert_eq!(sum(&vb.pp("c"), &[2, 3]), None, "other name");
            assert_eq!(sum(&vb.to_dtype(DType::F16), &[2, 3]), None, "f16 wanted");
            with(None).scope(|| assert_eq!(sum(&vb, &[2, 3]), None, "turned off"));
            assert_eq!(sum(&vb, &[2, 3]), Some(6.0), "restored");
        });
        assert_eq!(sum(&vb, &[2, 3]), None, "restored after");
    }

    /// Max |error| of `out` against attention computed in f64.
    fn attention_error(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        out: &Tensor,
        causal: bool,
    ) -> Result<f64> {
        let (b, nq, inner) = q.dims3()?;
        let nk = k.dim(1)?;
        let d = inner / heads;
        let (q, k, v, o) = (
            q.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
            v.flatten_all()?.to_vec1::<f32>()?,
            out.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut worst = 0f64;
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    // Causal: keys after the query are left out.
                    let visible = if causal { (i + 1).min(nk) } else { nk };
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[(bi * nq + i) * inner + h * d + c] as f64
                                        * k[(bi * nk + j) * inner + h * d + c] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..d {
                        let want: f64 = (0..visible)
                            .map(|j| {
                                (s[j] - m).exp() / z * v[(bi * nk + j) * inner + h * d + c] as f64
                            })
                            .sum();
                        let got = o[(bi * nq + i) * inner + h * d + c] as f64;
                        worst = worst.max((got - want).abs());
                    }
                }
            }
        }
        Ok(worst)
    }

    /// Standard normal values from a fixed seed (candle's CPU `randn` cannot be seeded).
    fn seeded_normal(shape: (usize, usize, usize), seed: u64) -> Result<Tensor> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (uniform(), uniform());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// Mean over `draws` seeded draws of the fused and the composed attention's max error
    /// against f64 (one draw's maximum is too noisy to compare).
    fn mean_attention_errors(
        (b, nq, nk, heads, d): (usize, usize, usize, usize, usize),
        causal: bool,
        draws: u64,
    ) -> Result<(f64, f64)> {
        let (mut ef, mut ec) = (0.0, 0.0);
        for s in 0..draws {
            let seed = 1000 * s + (b * 7 + nq * 5 + nk * 3 + heads + d) as u64;
            let q = (seeded_normal((b, nq, heads * d), seed)? * 2.0)?;
            let k = (seeded_normal((b, nk, heads * d), seed + 1)? * 2.0)?;
            let v = seeded_normal((b, nk, heads * d), seed + 2)?;
            let (fused, composed) = if causal {
                // A variable records gradients: the composed form with an explicit −∞ mask.
                let qv = candle_core::Var::from_tensor(&q)?;
                (
                    Ops::AUTO.attention_causal(&q, &k, &v, heads)?,
                    Ops::AUTO
                        .attention_causal(qv.as_tensor(), &k, &v, heads)?
                        .detach(),
                )
            } else {
                (
                    Ops::AUTO.attention(&q, &k, &v, heads, None)?,
                    attention_blocked(
                        &q,
                        &k,
                        &v,
                        heads,
                        None,
                        usize::MAX,
                        LogitControl::default(),
                    )?,
                )
            };
            ef += attention_error(&q, &k, &v, heads, &fused, causal)? / draws as f64;
            ec += attention_error(&q, &k, &v, heads, &composed, causal)? / draws as f64;
        }
        Ok((ef, ec))
    }

    #[test]
    fn fused_attention_is_as_accurate_as_the_composed_one() -> Result<()> {
        // Ragged sizes: a partial query block, head dims that are not a panel multiple.
        for shape in [(2, 37, 29, 4, 4), (1, 70, 300, 2, 40), (3, 64, 77, 8, 10)] {
            let (ef, ec) = mean_attention_errors(shape, false, 8)?;
            eprintln!("{shape:?}: fused {ef:.3e}, composed {ec:.3e}");
            assert!(
                ef <= 2.0 * ec.max(1e-7),
                "{shape:?}: fused error {ef:.3e}, composed {ec:.3e} (means of 8 draws)"
            );
        }
        Ok(())
    }

    #[test]
    fn causal_attention_sees_only_earlier_keys() -> Result<()> {
        // CLIP's text shape (77 tokens: a full and a partial query block), and a ragged one.
        for (b, n, heads, d) in [(2, 77, 12, 64), (1, 37, 3, 5)] {
            let (ef, ec) = mean_attention_errors((b, n, n, heads, d), true, 4)?;
            eprintln!("causal {n}, {heads}×{d}: fused {ef:.3e}, composed {ec:.3e}");
            assert!(
                ef <= 2.0 * ec.max(1e-7),
                "causal {n} tokens, heads {heads}×{d}: fused error {ef:.3e}, composed {ec:.3e} \
                 (means of 4 draws)"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_attention_follows_logits_from() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 40, 16), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 33, 16), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (3, 33, 16), &dev)?;
        let from = Tensor::new(&[0u32, 0, 1], &dev)?;
        let ctl = LogitControl {
            logits_from: Some(&from),
            record: None,
        };
        let fused = Ops::AUTO.attention_with(&q, &k, &v, 2, ctl)?;
        let composed = attention_blocked(&q, &k, &v, 2, None, usize::MAX, ctl)?;
        let d = (fused - composed)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            d < 1e-5,
            "fused and composed Prompt-to-Prompt attention differ by {d}"
        );
        let bad = Tensor::new(&[0u32, 0, 3], &dev)?;
        let ctl = LogitControl {
            logits_from: Some(&bad),
            record: None,
        };
        assert!(Ops::AUTO.attention_with(&q, &k, &v, 2, ctl).is_err());
        Ok(())
    }

    #[test]
    fn blocked_attention_matches_the_whole_computation() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 37, 16), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 29, 16), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 29, 16), &dev)?;
        let whole = attention_blocked(&q, &k, &v, 4, None, usize::MAX, LogitControl::default())?;
        for block in [29, 100, 29 * 5] {
            let parts = attention_blocked(&q, &k, &v, 4, None, block, LogitControl::default())?;
            let d = (parts - &whole)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            // Only rounding: gemm tiles a different row count differently.
            assert!(d < 1e-6, "block {block}: differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn logits_from_gives_an_item_the_attention_weights_of_another() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 9, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 7, 8), &dev)?;
        let from = Tensor::new(&[0u32, 0], &dev)?;
        let rec = std::cell::RefCell::new(Vec::new());
        let ctl = LogitControl {
            logits_from: Some(&from),
            record: Some(&rec),
        };
        let out = attention_blocked(&q, &k, &v, 2, None, 3 * 7, ctl)?;
        let logits = rec.borrow()[0].clone();
        let d0 = (logits.get(0)? - logits.get(1)?)?
            .abs()?
            .flatten_all()?
            .max(0)?;
        assert_eq!(d0.to_scalar::<f32>()?, 0.0);
        // Item 1 = softmax(q0 k0ᵀ) v1, computed by hand per head.
        let (qh, kh, vh) = (
            q.get(0)?.reshape((9, 2, 4))?,
            k.get(0)?.reshape((7, 2, 4))?,
            v.get(1)?.reshape((7, 2, 4))?,
        );
        for h in 0..2 {
            let qh = qh.narrow(1, h, 1)?.squeeze(1)?;
            let kh = kh.narrow(1, h, 1)?.squeeze(1)?;
            let vh = vh.narrow(1, h, 1)?.squeeze(1)?;
            let p = candle_nn::ops::softmax_last_dim(&(qh.matmul(&kh.t()?)? * 0.5)?)?;
            let want = p.matmul(&vh)?;
            let got = out
                .get(1)?
                .reshape((9, 2, 4))?
                .narrow(1, h, 1)?
                .squeeze(1)?;
            let d = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "head {h}: {d}");
        }
        // Without the control item 1 attends with its own logits.
        let plain = Ops::AUTO.attention(&q, &k, &v, 2, None)?;
        let d = (plain.get(1)? - out.get(1)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d > 1e-3);
        let d = (plain.get(0)? - out.get(0)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6);
        Ok(())
    }

    #[test]
    fn softmax_has_a_gradient_when_one_is_recorded() -> Result<()> {
        let dev = Device::Cpu;
        let v = candle_core::Var::from_tensor(&Tensor::new(&[[1f32, 2.0, 0.5]], &dev)?)?;
        let fused = softmax_last_dim(&v.as_tensor().detach())?;
        let p = softmax_last_dim(v.as_tensor())?;
        let d = (&p - &fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-7, "{d}");
        // d/dx of p₀: p₀(δ₀ⱼ − pⱼ).
        let g = p.narrow(1, 0, 1)?.sum_all()?.backward()?;
        let g = g
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no grad".into()))?;
        let pv = fused.to_vec2::<f32>()?[0].clone();
        let want = [pv[0] * (1.0 - pv[0]), -pv[0] * pv[1], -pv[0] * pv[2]];
        for (a, b) in g.to_vec2::<f32>()?[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn fused_group_norm_matches_the_tensor_op_form() -> Result<()> {
        let dev = Device::Cpu;
        let c = 64;
        let mut m = std::collections::HashMap::new();
        m.insert("weight".to_owned(), Tensor::randn(1f32, 0.3, c, &dev)?);
        m.insert("bias".to_owned(), Tensor::randn(0f32, 0.3, c, &dev)?);
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let gn = GroupNorm::new(vb, 32, c, 1e-6)?;
        assert!(gn.fused.is_some());
        let plain = GroupNorm {
            fused: None,
            ..gn.clone()
        };
        let x = (Tensor::randn(0f32, 2.0, (2, c, 9, 7), &dev)? + 3.0)?;
        for (a, b) in [
            (gn.forward(&x)?, plain.forward(&x)?),
            (gn.forward_silu(&x)?, plain.forward_silu(&x)?),
        ] {
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "fused and plain group norm differ by {d}");
        }
        Ok(())
    }

    #[test]
    fn transpose_last2_matches_candle() -> Result<()> {
        for (b, m, n) in [(2, 33, 70), (1, 1, 5), (3, 64, 32), (2, 5, 1)] {
            let x = seeded_normal((b, m, n), (b * m * n) as u64)?;
            let want = x
                .transpose(1, 2)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got = Ops::AUTO.transpose_last2(&x)?;
            assert_eq!(got.dims(), &[b, n, m]);
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want, "{b}x{m}x{n}");
        }
        Ok(())
    }

    #[test]
    fn fused_layer_norm_matches_the_tensor_op_form() -> Result<()> {
        let dev = Device::Cpu;
        let dim = 96;
        let mut m = std::collections::HashMap::new();
        m.insert("weight".to_owned(), Tensor::randn(1f32, 0.3, dim, &dev)?);
        m.insert("bias".to_owned(), Tensor::randn(0f32, 0.3, dim, &dev)?);
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let ln = LayerNorm::new(vb, dim, 1e-5)?;
        assert!(ln.fused.is_some());
        let plain = LayerNorm {
            fused: None,
            ..ln.clone()
        };
        // Enough rows for several parallel blocks, and an offset mean.
        let x = (Tensor::randn(0f32, 2.0, (3, 401, dim), &dev)? + 3.0)?;
        let d = (ln.forward(&x)? - plain.forward(&x)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "fused and plain layer norm differ by {d}");
        Ok(())
    }

    /// The largest |a − b| relative to the largest |b| (both taken to f64), and whether `a`
    /// holds an infinity or a NaN.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<(f64, bool)> {
        let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let bad = a.iter().any(|v| !v.is_finite());
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let err = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        Ok((err / scale, bad))
    }

    /// A norm's weights `[dim]` (γ around 1, β around 0) in `dtype`.
    fn norm_vb(dim: usize, dtype: DType, seed: u64) -> Result<VarBuilder<'static>> {
        let mut m = std::collections::HashMap::new();
        let w = ((seeded_normal((1, 1, dim), seed)?.reshape(dim)? * 0.2)? + 1.0)?;
        let b = (seeded_normal((1, 1, dim), seed + 1)?.reshape(dim)? * 0.2)?;
        m.insert("weight".to_owned(), w);
        m.insert("bias".to_owned(), b);
        Ok(VarBuilder::from_tensors(m, dtype, &Device::Cpu))
    }

    /// f16's unit roundoff.
    const EPS16: f64 = 9.765625e-4;

    #[test]
    fn f16_layer_norm_statistics_do_not_overflow() -> Result<()> {
        // A 1280-wide row of standard deviation 100 has Σ(x−μ)² ≈ 1.3e7, far past f16's 65504:
        // held in f16, the variance is +inf and every output collapses to β.
        let dim = 1280;
        let x = (seeded_normal((2, 7, dim), 11)? * 100.0)?;
        let ln16 = LayerNorm::new(norm_vb(dim, DType::F16, 5)?, dim, 1e-5)?;
        let ln64 = LayerNorm::new(norm_vb(dim, DType::F64, 5)?, dim, 1e-5)?;
        let got = ln16.forward(&x.to_dtype(DType::F16)?)?;
        let want = ln64.forward(&x.to_dtype(DType::F16)?.to_dtype(DType::F64)?)?;
        let (err, bad) = rel_err(&got, &want)?;
        assert!(!bad, "f16 layer norm produced inf or NaN");
        assert!(
            err < 4.0 * EPS16,
            "f16 layer norm: relative error {err:.3e}"
        );
        Ok(())
    }

    #[test]
    fn f16_attention_scales_before_the_product() -> Result<()> {
        // The VAE's single 512-wide head: with q = k of standard deviation 12, the unscaled
        // diagonal logits are ≈ 512 · 144 = 73 728 > 65 504 (inf in f16, NaN after the
        // softmax); scaled first they are ≈ 3 260.
        let (n, d) = (24, 512);
        let q = (seeded_normal((1, n, d), 21)? * 12.0)?.to_dtype(DType::F16)?;
        let v = seeded_normal((1, n, d), 22)?.to_dtype(DType::F16)?;
        let got = Ops::GENERIC.attention(&q, &q, &v, 1, None)?;
        let (q64, v64) = (q.to_dtype(DType::F64)?, v.to_dtype(DType::F64)?);
        let want = Ops::GENERIC.attention(&q64, &q64, &v64, 1, None)?;
        let (err, bad) = rel_err(&got, &want)?;
        assert!(!bad, "f16 attention produced inf or NaN");
        assert!(err < 4.0 * EPS16, "f16 attention: relative error {err:.3e}");
        Ok(())
    }

    /// x (standard deviation `s`, offset mean) → LayerNorm → q, k, v projections → attention
    /// → + x, in `dtype`, with the weights of `seed`.
    fn attention_block(x: &Tensor, dtype: DType, heads: usize, causal: bool) -> Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        let ln = LayerNorm::new(norm_vb(c, dtype, 31)?, c, 1e-5)?;
        let proj = |seed: u64| -> Result<Tensor> {
            (seeded_normal((1, c, c), seed)?.reshape((c, c))? / (c as f64).sqrt())?.to_dtype(dtype)
        };
        let h = ln.forward(&x.to_dtype(dtype)?)?;
        let (q, k, v) = (
            h.broadcast_matmul(&proj(41)?)?,
            h.broadcast_matmul(&proj(42)?)?,
            h.broadcast_matmul(&proj(43)?)?,
        );
        let o = if causal {
            Ops::GENERIC.attention_causal(&q, &k, &v, heads)?
        } else {
            Ops::GENERIC.attention(&q, &k, &v, heads, None)?
        };
        o + x.to_dtype(dtype)?
    }

    #[test]
    fn f16_norms_and_attention_hold_large_activations() -> Result<()> {
        for s in [10.0, 100.0] {
            let x = ((seeded_normal((2, 40, 512), 51)? * s)? + s / 2.0)?;
            let x = x.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
            for dim in [64, 1280] {
                let x = ((seeded_normal((2, 9, dim), 52)? * s)? - s)?;
                let ln16 = LayerNorm::new(norm_vb(dim, DType::F16, 5)?, dim, 1e-5)?;
                let ln64 = LayerNorm::new(norm_vb(dim, DType::F64, 5)?, dim, 1e-5)?;
                let got = ln16.forward(&x.to_dtype(DType::F16)?)?;
                let want = ln64.forward(&x.to_dtype(DType::F16)?.to_dtype(DType::F64)?)?;
                let (err, bad) = rel_err(&got, &want)?;
                assert!(
                    !bad && err < 4.0 * EPS16,
                    "layer norm {dim}, std {s}: {err:.3e}"
                );
            }
            let xg = ((seeded_normal((2, 64, 96), 53)? * s)? + s)?.reshape((2, 64, 8, 12))?;
            let gn16 = GroupNorm::new(norm_vb(64, DType::F16, 7)?, 32, 64, 1e-6)?;
            let gn64 = GroupNorm::new(norm_vb(64, DType::F64, 7)?, 32, 64, 1e-6)?;
            let x16 = xg.to_dtype(DType::F16)?;
            let x64 = x16.to_dtype(DType::F64)?;
            for (silu, got, want) in [
                (false, gn16.forward(&x16)?, gn64.forward(&x64)?),
                (true, gn16.forward_silu(&x16)?, gn64.forward_silu(&x64)?),
            ] {
                let (err, bad) = rel_err(&got, &want)?;
                assert!(
                    !bad && err < 4.0 * EPS16,
                    "group norm (silu {silu}), std {s}: {err:.3e}"
                );
            }
            // Attention blocks: one 512-wide head (the VAE), 8 heads of 64, causal (CLIP).
            for (heads, causal) in [(1, false), (8, false), (8, true)] {
                let got = attention_block(&x, DType::F16, heads, causal)?;
                let want = attention_block(&x.to_dtype(DType::F64)?, DType::F64, heads, causal)?;
                let (err, bad) = rel_err(&got, &want)?;
                assert!(
                    !bad && err < 8.0 * EPS16,
                    "attention block ({heads} heads, causal {causal}), std {s}: {err:.3e}"
                );
            }
        }
        Ok(())
    }
}
