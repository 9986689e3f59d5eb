//! Fused CPU kernels for inference (no gradients recorded).
//!
//! [`FastConv`]: convolutions (3×3 with padding 1, 1×1, and the downsamplers' 3×3 with
//! stride 2) as matrix products on [`crate::sgemm`], with the weights packed once at load.
//! The direct 3×3 form reads its right operand straight from a zero-padded copy of the input
//! (an implicit im2col: row `c·9 + tap` of the operand is channel `c`'s padded plane — or, with
//! stride 2, one of its four phase planes — shifted by the tap), so the 9×-larger column matrix
//! is never built; the output is computed on the padded row pitch (the extra columns dropped
//! when copied out). Most 3×3 convolutions go through Winograd F(2×2, 3×3) instead
//! ([`winograd`]); those with few channels on a side through a row loop ([`narrow`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use crate::sgemm::{self, PackedA, Problem, Strided};
use crate::stored::WeightData;

/// Defines `fn $name(args)` running `$body(args)` compiled for AVX-512F, for AVX2 + FMA or
/// portably, whichever is the best the CPU has (checked at run time).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod narrow;
mod winograd;

/// Lanes of the f64 partial sums in [`sum_f64`] and [`sum_sq_dev_f64`].
const SUM_LANES: usize = 16;

#[inline(always)]
fn sum_f64_body(x: &[f32]) -> f64 {
    let mut acc = [0f64; SUM_LANES];
    let mut chunks = x.chunks_exact(SUM_LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn sum_sq_dev_f64_body(x: &[f32], mean: f64) -> f64 {
    let mut acc = [0f64; SUM_LANES];
    let mut chunks = x.chunks_exact(SUM_LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = f64::from(v) - mean;
            *a += d * d;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| {
            let d = f64::from(v) - mean;
            d * d
        })
        .sum();
    acc.iter().sum::<f64>() + tail
}

simd_dispatch! {
    /// `Σ x` in f64 (16 partial sums: vectorised, and more accurate than one running sum).
    pub(crate) fn sum_f64(x: &[f32]) -> f64 => sum_f64_body
}

simd_dispatch! {
    /// `Σ (x − mean)²` in f64, as [`sum_f64`].
    pub(crate) fn sum_sq_dev_f64(x: &[f32], mean: f64) -> f64 => sum_sq_dev_f64_body
}

/// How a [`FastConv`] computes a 3×3 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgo {
    /// One product over the implicit im2col (9 multiply-adds per input, output and channel pair).
    Direct,
    /// Winograd F(2×2, 3×3): 16 products over 4×4 input tiles transformed by `Bᵀ d B`, each
    /// 2×2 output tile recovered by `Aᵀ m A`: 4 multiply-adds per output and channel pair
    /// instead of 9 (all transform coefficients are 0, ±1 and ±½, exact in binary). Its
    /// weights take 16/9 of the direct form's memory.
    Winograd,
    /// A plain loop over output rows, all output channels at once, each input row read three
    /// times per output row: for at most [`NARROW_MAX_CHANNELS`] channels on one side (the
    /// models' first and last convolutions), where a product with 3 to 8 rows or a depth of
    /// 27 to 72 spends its time packing rather than multiplying.
    Narrow,
}

impl ConvAlgo {
    /// Winograd for 3×3 kernels with at least 32 channels on each side whose weights stay
    /// small (≤ 1280 × 640 channel pairs: the VAE, and the UNet's two outer levels) or that run
    /// on `large_map`s (at least half the latent's side: the UNet's outer levels, including
    /// the 1280-channel upsampler into level 1 and level 1's 1920 → 640 convolution), direct
    /// otherwise: the UNet's inner levels hold most of its weights, and their 16/9 in memory
    /// would cost more than the products save on their maps of 4×4 to 16×16.
    pub fn auto(out_c: usize, in_c: usize, kernel: usize, large_map: bool) -> Self {
        if kernel == 3 && out_c.min(in_c) <= NARROW_MAX_CHANNELS {
            Self::Narrow
        } else if kernel == 3
            && out_c.min(in_c) >= WINOGRAD_MIN_CHANNELS
            && (large_map || out_c * in_c <= WINOGRAD_MAX_CHANNEL_PAIRS)
        {
            Self::Winograd
        } else {
            Self::Direct
        }
    }
}

/// See [`ConvAlgo::Narrow`]. Eight, not four, so that an InstructPix2Pix `conv_in` (8 input
/// channels) takes the same form as the Stable Diffusion one (4) it was extended from: the
/// loop adds channel after channel, so the four zero-initialised channels add exact zeros and
/// `ip2p extend` keeps the model's outputs bit for bit. (The product form would be faster on
/// 8 → 320 channels — 2.5–2.8 against 6.8–8.3 ms at 512 px, batch 3 — about 0.1 % of a UNet
/// step; the VAE encoder's `conv_out`, 512 → 8, gains: 7.7 → 4.1 ms at 512 px.)
const NARROW_MAX_CHANNELS: usize = 8;
/// See [`ConvAlgo::auto`].
const WINOGRAD_MAX_CHANNEL_PAIRS: usize = 1280 * 640;
/// Below this many input or output channels the transforms cost more than the products save
/// (the models' first and last convolutions: 3, 4 or 8 channels).
const WINOGRAD_MIN_CHANNELS: usize = 32;
/// Bytes of transformed input and output a Winograd convolution holds at once (its tile rows
/// are processed in chunks of about this size).
const WINOGRAD_CHUNK_BYTES: usize = 16 << 20;

#[derive(Debug)]
enum ConvWeights {
    /// `[out, in·k²]` packed.
    Direct(PackedA),
    /// `U_ξ = G g Gᵀ` for ξ = 0..16, each `[out, in]` packed.
    Winograd(Vec<PackedA>),
    /// `[out][in][3][3]` as given.
    Narrow(Vec<f32>),
}

/// A `k×k` convolution with packed weights: stride 1 with `k` = 1, or 3 with padding 1; or
/// 3×3 with stride 2 (the downsamplers) and zero padding `(before, after)` of at most 1.
#[derive(Debug)]
pub struct FastConv {
    weight: ConvWeights,
    bias: Vec<f32>,
    out_c: usize,
    in_c: usize,
    kernel: usize,
    stride: usize,
    /// Zero rows/columns before (top, left) and after (bottom, right) the input.
    pad: (usize, usize),
}

impl FastConv {
    /// `weight: [out, in, k, k]` (row-major), `bias: [out]`; `kernel` is 1 or 3; the algorithm
    /// is [`ConvAlgo::auto`].
    pub fn new<'a>(
        weight: impl Into<WeightData<'a>>,
        bias: &[f32],
        out_c: usize,
        in_c: usize,
        kernel: usize,
    ) -> Self {
        let algo = ConvAlgo::auto(out_c, in_c, kernel, false);
        Self::with_algo(weight, bias, out_c, in_c, kernel, algo)
    }

    /// As [`FastConv::new`] with the algorithm chosen by the caller (1×1 kernels are always
    /// direct).
    pub fn with_algo<'a>(
        weight: impl Into<WeightData<'a>>,
        bias: &[f32],
        out_c: usize,
        in_c: usize,
        kernel: usize,
        algo: ConvAlgo,
    ) -> Self {
        let weight = weight.into();
        assert!(kernel == 1 || kernel == 3, "FastConv: 1×1 or 3×3 only");
        assert_eq!(
            weight.len(),
            out_c * in_c * kernel * kernel,
            "FastConv: shape"
        );
        let weight = if kernel == 3 && algo == ConvAlgo::Winograd {
            ConvWeights::Winograd(winograd::weights(weight, out_c, in_c))
        } else if kernel == 3 && algo == ConvAlgo::Narrow {
            ConvWeights::Narrow(weight.to_f32_vec())
        } else {
            // Row o of [out, in·k·k] is exactly the weight's layout: column c·k² + tap.
            ConvWeights::Direct(PackedA::from_data(out_c, in_c * kernel * kernel, weight))
        };
        Self {
            weight,
            bias: bias.to_vec(),
            out_c,
            in_c,
            kernel,
            stride: 1,
            pad: (kernel / 2, kernel / 2),
        }
    }

    /// A 3×3, stride-2 convolution with `pad = (before, after)` zero rows and columns, each 0
    /// or 1 (`(1, 1)`: the UNet's downsamplers; `(0, 1)`: the VAE's, which pad only the bottom
    /// and right). Always the direct form.
    pub fn strided<'a>(
        weight: impl Into<WeightData<'a>>,
        bias: &[f32],
        out_c: usize,
        in_c: usize,
        pad: (usize, usize),
    ) -> Self {
        assert!(
            pad.0 <= 1 && pad.1 <= 1,
            "FastConv::strided: padding 0 or 1"
        );
        Self {
            stride: 2,
            pad,
            ..Self::with_algo(weight, bias, out_c, in_c, 3, ConvAlgo::Direct)
        }
    }

    /// Output height and width for an `h × w` input (`None` if the input is too small).
    fn out_dims(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let span = |n: usize| {
            (n + self.pad.0 + self.pad.1)
                .checked_sub(self.kernel)
                .map(|d| d / self.stride + 1)
        };
        Some((span(h)?, span(w)?))
    }

    pub fn algo(&self) -> ConvAlgo {
        match self.weight {
            ConvWeights::Direct(_) => ConvAlgo::Direct,
            ConvWeights::Winograd(_) => ConvAlgo::Winograd,
            ConvWeights::Narrow(_) => ConvAlgo::Narrow,
        }
    }
}

impl CustomOp1 for FastConv {
    fn name(&self) -> &'static str {
        "fast-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.compute(contiguous_f32(storage, layout)?, layout.shape(), None)
    }
}

/// The contiguous f32 elements of a CPU tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fast conv: f32 only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fast conv: contiguous input only");
    };
    Ok(&data[start..end])
}

/// `dst[i] += res[off + i]` where there is a residual: a convolution's output plus a skip
/// connection, rounded as the unfused `conv(x) + skip` is (the convolution's value, bias
/// included, first).
#[inline(always)]
fn add_residual(dst: &mut [f32], res: Option<&[f32]>, off: usize) {
    if let Some(r) = res {
        let n = dst.len();
        for (d, &r) in dst.iter_mut().zip(&r[off..off + n]) {
            *d += r;
        }
    }
}

/// `conv(x) + skip` in one pass: the skip connection is added as the convolution's output
/// rows are written (a ResNet block's last convolution), instead of a separate pass over two
/// full-size tensors and a third allocated for the sum.
#[derive(Debug)]
pub struct ConvAdd<'a>(pub &'a FastConv);

impl candle_core::CustomOp2 for ConvAdd<'_> {
    fn name(&self) -> &'static str {
        "fast-conv-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, _, h, w) = l1.shape().dims4()?;
        let want = self
            .0
            .out_dims(h, w)
            .map(|(ho, wo)| (b, self.0.out_c, ho, wo));
        if want.map(Shape::from).as_ref() != Some(l2.shape()) {
            candle_core::bail!(
                "fast conv: a skip connection of shape {:?} for an output of {want:?}",
                l2.shape()
            );
        }
        self.0.compute(
            contiguous_f32(s1, l1)?,
            l1.shape(),
            Some(contiguous_f32(s2, l2)?),
        )
    }
}

impl FastConv {
    /// A 1×1 convolution's weight `[out, in]`, row-major, as it was given (`None` for other
    /// kernels: their packed forms are not kept invertibly).
    pub fn weight_1x1(&self) -> Option<Vec<f32>> {
        match (&self.weight, self.kernel, self.stride) {
            (ConvWeights::Direct(p), 1, 1) => Some(p.to_rows()),
            _ => None,
        }
    }

    /// `(out, in)` channels.
    pub fn channels(&self) -> (usize, usize) {
        (self.out_c, self.in_c)
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// The convolution of `x` (shape `shape`), plus `res` (of the output's shape) if given.
    fn compute(
        &self,
        x: &[f32],
        shape: &Shape,
        res: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (b, ci, h, w) = shape.dims4()?;
        if ci != self.in_c {
            candle_core::bail!(
                "fast conv: {ci} input channels, weights expect {}",
                self.in_c
            );
        }
        let Some((ho, wo)) = self.out_dims(h, w) else {
            candle_core::bail!("fast conv: a {h}×{w} input is smaller than the kernel");
        };
        // Winograd's figure counts the direct form's multiply-adds (an effective rate).
        let _p = crate::profile::scope_flops(
            match (self.kernel, self.stride, &self.weight) {
                (1, _, _) => "conv1x1",
                (_, 2, _) => "conv3x3 stride 2",
                (_, _, ConvWeights::Winograd(_)) => "conv3x3 winograd",
                (_, _, ConvWeights::Narrow(_)) => "conv3x3 narrow",
                _ => "conv3x3",
            },
            2 * (b * ho * wo * self.out_c * self.in_c * self.kernel * self.kernel) as u64,
        );
        let co = self.out_c;
        let weight = match &self.weight {
            ConvWeights::Winograd(u) => {
                let out = winograd::conv(
                    u,
                    &self.bias,
                    x,
                    (b, ci, co, h, w),
                    WINOGRAD_CHUNK_BYTES,
                    res,
                );
                return Ok((CpuStorage::F32(out), Shape::from((b, co, h, w))));
            }
            ConvWeights::Narrow(wt) => {
                let out = narrow::conv(wt, &self.bias, x, (b, ci, co, h, w), res);
                return Ok((CpuStorage::F32(out), Shape::from((b, co, h, w))));
            }
            ConvWeights::Direct(weight) => weight,
        };
        let g = ConvGeom {
            b,
            ci,
            co,
            h,
            w,
            stride: self.stride,
            pad: self.pad.0,
            ho,
            wo,
        };
        if self.kernel == 1 {
            // SAFETY: the product covers every item's co × hw.
            let mut out = unsafe { sgemm::output_buffer(b * co * h * w) };
            let epi = sgemm::Epilogue {
                row_bias: Some(&self.bias),
                ..Default::default()
            };
            let (xp, op) = (x.as_ptr() as usize, out.as_mut_ptr() as usize);
            let hw = h * w;
            // SAFETY: item bi reads x[bi·ci·hw..][ci × hw] and writes out[bi·co·hw..][co × hw],
            // disjoint per item, inside both buffers.
            unsafe {
                sgemm::gemm_batch(b, co, hw, ci, epi, &|bi| Problem {
                    a: sgemm::A::Packed(weight),
                    b: sgemm::B::Strided(Strided {
                        ptr: (xp as *const f32).add(bi * ci * hw),
                        rs: hw,
                        cs: 1,
                    }),
                    c: (op as *mut f32).add(bi * co * hw),
                    rs_c: hw,
                })
            };
            if let Some(r) = res {
                out.par_chunks_mut(hw)
                    .enumerate()
                    .for_each(|(i, o)| add_residual(o, Some(r), i * hw));
            }
            return Ok((CpuStorage::F32(out), Shape::from((b, co, h, w))));
        }
        // Shifted views compute on a padded row pitch: where that wastes more than an eighth
        // of the product (small maps), an explicit column matrix is cheaper.
        let views = Shifted::pitch(g);
        let dense = b * ho * wo;
        let out = if views.n > dense + dense / 8 && ci * 9 * dense <= IM2COL_MAX {
            im2col_conv(weight, &self.bias, x, g, IM2COL_MAX, res)
        } else {
            shifted_conv(weight, &self.bias, x, g, res)
        };
        Ok((CpuStorage::F32(out), Shape::from((b, co, ho, wo))))
    }
}

/// Where a 3×3 convolution's input taps lie as shifted views of one buffer (see
/// [`Shifted::build`]): output column `j = image·plane + y·wp + x` of the product (`n` of
/// them, a few per row past the output's width computed and dropped) reads tap row `r` at
/// `rows[r] + j`.
struct Shifted {
    wp: usize,
    plane: usize,
    n: usize,
}

impl Shifted {
    /// The pitch of `g`'s views: the output's rows and columns plus the taps' reach past them
    /// in a phase plane (`⌊2 / stride⌋`).
    fn pitch(g: ConvGeom) -> Self {
        let reach = 2 / g.stride;
        let wp = g.wo + reach;
        let plane = (g.ho + reach) * wp;
        Self {
            wp,
            plane,
            n: (g.b - 1) * plane + g.ho * wp,
        }
    }

    /// The views' buffer and each tap row's offset in it (row `c·9 + tap`, as the direct
    /// weights `[out, in·9]`). With stride `s`, each channel's padded input is split into `s²`
    /// phase planes `P_ab[i][j] = padded[s·i + a][s·j + b]` (stride 1: the padded plane itself),
    /// laid out `[channel][a][b][image][plane]`; tap `(dy, dx)` of output `(y, x)` is phase
    /// `(dy mod s, dx mod s)` at `(y + ⌊dy/s⌋, x + ⌊dx/s⌋)`. The last tap rows' reads run up to
    /// 2 floats past the planes (into dropped columns only): the buffer keeps that slack.
    fn build(&self, x: &[f32], g: ConvGeom) -> (Vec<f32>, Vec<usize>) {
        use rayon::prelude::*;
        let ConvGeom {
            b,
            ci,
            h,
            w,
            stride: s,
            pad,
            ..
        } = g;
        let (wp, plane) = (self.wp, self.plane);
        let len = ci * s * s * b * plane;
        // SAFETY: every plane is written in full below (zeros included); the slack is zeroed.
        let mut buf = unsafe { sgemm::output_buffer(len + 2) };
        buf[len..].fill(0.0);
        buf[..len]
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(idx, p)| {
                let (c, ph, bi) = (idx / (s * s * b), idx / b % (s * s), idx % b);
                let (a, bb) = (ph / s, ph % s);
                let src = &x[(bi * ci + c) * h * w..(bi * ci + c + 1) * h * w];
                // Columns j0..j1 of a phase row lie inside the input: s·j + bb − pad in 0..w.
                let j0 = pad.saturating_sub(bb).div_ceil(s);
                let j1 = (w + pad).saturating_sub(bb).div_ceil(s).clamp(j0, wp);
                for (i, prow) in p.chunks_exact_mut(wp).enumerate() {
                    let y = (s * i + a).wrapping_sub(pad);
                    if y >= h {
                        prow.fill(0.0);
                        continue;
                    }
                    let first = s * j0 + bb - pad;
                    let srow = src[y * w + first..(y + 1) * w].iter().step_by(s);
                    prow[..j0].fill(0.0);
                    for (d, &v) in prow[j0..j1].iter_mut().zip(srow) {
                        *d = v;
                    }
                    prow[j1..].fill(0.0);
                }
            });
        let rows = (0..ci * 9)
            .map(|r| {
                let (c, dy, dx) = (r / 9, r % 9 / 3, r % 3);
                (c * s * s + (dy % s) * s + dx % s) * b * plane + (dy / s) * wp + dx / s
            })
            .collect();
        (buf, rows)
    }
}

/// A direct 3×3 convolution (stride 1 with padding 1, or stride 2) as one product over
/// shifted views of the input ([`Shifted`]): the 9×-larger column matrix is never built, and
/// one product covers the whole batch.
fn shifted_conv(
    weight: &PackedA,
    bias: &[f32],
    x: &[f32],
    g: ConvGeom,
    res: Option<&[f32]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let ConvGeom {
        b, ci, co, ho, wo, ..
    } = g;
    let views = Shifted::pitch(g);
    let (buf, rows) = views.build(x, g);
    let (wp, plane, n) = (views.wp, views.plane, views.n);
    // SAFETY: the product writes all of acc's co × n (no accumulation).
    let mut acc = unsafe { sgemm::output_buffer(co * n) };
    // SAFETY: column j < n of tap row r reads buf[rows[r] + j], at most 2 floats past the
    // planes (see Shifted::build), inside the buffer's slack. acc holds co × n.
    unsafe {
        sgemm::gemm(
            co,
            n,
            ci * 9,
            sgemm::A::Packed(weight),
            sgemm::B::Rows {
                ptr: buf.as_ptr(),
                rows: &rows,
            },
            acc.as_mut_ptr(),
            n,
            sgemm::Epilogue {
                row_bias: Some(bias),
                ..Default::default()
            },
        )
    };
    drop(buf);
    // SAFETY: the copy-out below writes every plane's rows.
    let mut out = unsafe { sgemm::output_buffer(b * co * ho * wo) };
    out.par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(idx, o)| {
            let (bi, oc) = (idx / co, idx % co);
            let a = &acc[oc * n + bi * plane..];
            for y in 0..ho {
                let row = &mut o[y * wo..(y + 1) * wo];
                row.copy_from_slice(&a[y * wp..y * wp + wo]);
                add_residual(row, res, idx * ho * wo + y * wo);
            }
        });
    out
}

/// Largest column matrix (floats) [`im2col_conv`] builds at once (it works in chunks of
/// output columns beyond that).
const IM2COL_MAX: usize = 16 << 20;

/// Shape of a 3×3 convolution: `b` images of `ci × h × w` in, `co × ho × wo` out, input row
/// and column `o·stride + d − pad` for output `o` and tap `d` (zero outside the image, which
/// also covers any padding after the last row and column).
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

/// A direct 3×3 convolution over an explicit column matrix `[in·9, columns]` (columns are
/// `image·ho·wo + y·wo + x` across the batch). For small maps (the UNet's inner levels, 4×4 to
/// 16×16, and the downsamplers into them), where computing on the padded pitch of
/// [`shifted_conv`] would waste a fifth to half of the product on padding columns. Chunks of
/// output columns keep the column matrix within `col_max` floats ([`IM2COL_MAX`]).
fn im2col_conv(
    weight: &PackedA,
    bias: &[f32],
    x: &[f32],
    g: ConvGeom,
    col_max: usize,
    res: Option<&[f32]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let ConvGeom {
        b,
        ci,
        co,
        h,
        w,
        stride,
        pad,
        ho,
        wo,
    } = g;
    let howo = ho * wo;
    let n = b * howo;
    let chunk = n.min((col_max / (ci * 9)).max(1));
    // SAFETY: per chunk, the gather writes all ci·9 × nc column values (zeros included) and
    // the product all co × nc accumulators before either is read; the copies write every
    // output plane's columns once over the chunks.
    let (mut out, mut cols, mut acc) = unsafe {
        (
            sgemm::output_buffer(b * co * howo),
            sgemm::output_buffer(ci * 9 * chunk),
            sgemm::output_buffer(co * chunk),
        )
    };
    for j0 in (0..n).step_by(chunk) {
        let nc = chunk.min(n - j0);
        // Row c·9 + tap, column j = input (image, c, y·stride + dy − pad, x·stride + dx − pad).
        cols[..ci * 9 * nc]
            .par_chunks_mut(9 * nc)
            .enumerate()
            .for_each(|(c, rows)| {
                for (tap, row) in rows.chunks_exact_mut(nc).enumerate() {
                    let (dy, dx) = (tap / 3, tap % 3);
                    let mut j = j0;
                    while j < j0 + nc {
                        let (bi, pix) = (j / howo, j % howo);
                        let (oy, ox0) = (pix / wo, pix % wo);
                        let len = (wo - ox0).min(j0 + nc - j);
                        let dst = &mut row[j - j0..j - j0 + len];
                        let iy = (oy * stride + dy).wrapping_sub(pad);
                        if iy >= h {
                            dst.fill(0.0);
                        } else {
                            let src = &x[((bi * ci + c) * h + iy) * w..][..w];
                            for (k, d) in dst.iter_mut().enumerate() {
                                let ix = ((ox0 + k) * stride + dx).wrapping_sub(pad);
                                *d = if ix < w { src[ix] } else { 0.0 };
                            }
                        }
                        j += len;
                    }
                }
            });
        // SAFETY: cols is (ci·9) × nc row-major, acc co × nc; the weight is [co, ci·9].
        unsafe {
            sgemm::gemm(
                co,
                nc,
                ci * 9,
                sgemm::A::Packed(weight),
                sgemm::B::Strided(Strided {
                    ptr: cols.as_ptr(),
                    rs: nc,
                    cs: 1,
                }),
                acc.as_mut_ptr(),
                nc,
                sgemm::Epilogue {
                    row_bias: Some(bias),
                    ..Default::default()
                },
            )
        };
        let (img0, img1) = (j0 / howo, (j0 + nc - 1) / howo);
        out[img0 * co * howo..(img1 + 1) * co * howo]
            .par_chunks_mut(howo)
            .enumerate()
            .for_each(|(idx, o)| {
                let (bi, oc) = (img0 + idx / co, idx % co);
                let (lo, hi) = ((bi * howo).max(j0), ((bi + 1) * howo).min(j0 + nc));
                let dst = &mut o[lo - bi * howo..hi - bi * howo];
                dst.copy_from_slice(&acc[oc * nc + lo - j0..oc * nc + hi - j0]);
                add_residual(dst, res, (bi * co + oc) * howo + lo - bi * howo);
            });
    }
    out
}

/// A dense layer `y = x Wᵀ + b` with `Wᵀ` packed once.
#[derive(Debug)]
pub struct FastLinear {
    weight: sgemm::PackedB,
    bias: Option<Vec<f32>>,
}

impl FastLinear {
    /// `weight: [out, in]` row-major, `bias: [out]`.
    pub fn new<'a>(
        weight: impl Into<WeightData<'a>>,
        bias: Option<&[f32]>,
        out_dim: usize,
        in_dim: usize,
    ) -> Self {
        Self {
            weight: sgemm::PackedB::from_transposed_data(out_dim, in_dim, weight.into()),
            bias: bias.map(<[f32]>::to_vec),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let (k, n) = self.weight.dims();
        (n, k)
    }

    /// The weight `[out, in]`, row-major.
    pub fn weight(&self) -> Vec<f32> {
        self.weight.to_transposed()
    }
}

impl CustomOp1 for FastLinear {
    fn name(&self) -> &'static str {
        "fast-linear"
    }

    /// `x: [rows, in]` → `[rows, out]`.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fast linear: f32 only");
        };
        let _p = crate::profile::scope_flops(
            "linear",
            2 * (layout.shape().elem_count() * self.dims().0) as u64,
        );
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fast linear: contiguous input only");
        };
        let (rows, in_dim) = layout.shape().dims2()?;
        let (out_dim, want_in) = self.dims();
        if in_dim != want_in {
            candle_core::bail!("fast linear: {in_dim} input features, weights expect {want_in}");
        }
        let x = &data[start..end];
        // SAFETY: the product writes all rows × out_dim outputs.
        let mut out = unsafe { sgemm::output_buffer(rows * out_dim) };
        // SAFETY: x is rows × in_dim row-major, out is rows × out_dim, and they do not alias.
        unsafe {
            sgemm::gemm(
                rows,
                out_dim,
                in_dim,
                sgemm::A::Strided(Strided {
                    ptr: x.as_ptr(),
                    rs: in_dim,
                    cs: 1,
                }),
                sgemm::B::Packed(&self.weight),
                out.as_mut_ptr(),
                out_dim,
                sgemm::Epilogue {
                    col_bias: self.bias.as_deref(),
                    ..Default::default()
                },
            )
        };
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }
}

/// Multi-head attention `softmax(Q Kᵀ / √d) V` read straight from the projections' `[B, N, H·d]`
/// layout and written straight into the output's (no head split/merge copies).
///
/// Computed transposed, one block of [`sgemm::nr`] queries at a time: `Sᵀ = K Qᵀ` (keys × 32
/// queries) lands in exactly the packed layout the second product reads, the softmax runs down
/// the key axis with one vector lane per query, and `Oᵀ = Vᵀ P` is scaled by each query's
/// `1 / Σ` while it is written out. Per batch item and head, `K` and `Vᵀ` are packed once. The
/// score matrix never exists beyond one block (`keys × 32`, in the core's L2 cache).
///
/// With `logits_from` (Prompt-to-Prompt), batch item `j` attends with the weights of item
/// `logits_from[j]` (its queries and keys) over its own values.
#[derive(Debug, Clone)]
pub struct FastAttention {
    pub heads: usize,
    pub logits_from: Option<Vec<usize>>,
    /// Query `i` sees keys `j ≤ i` only.
    pub causal: bool,
}

impl candle_core::CustomOp3 for FastAttention {
    fn name(&self) -> &'static str {
        "fast-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let view = |s: &'_ CpuStorage, l: &Layout| -> Result<(*const f32, usize, usize, usize)> {
            let CpuStorage::F32(d) = s else {
                candle_core::bail!("fast attention: f32 only");
            };
            let Some((a, e)) = l.contiguous_offsets() else {
                candle_core::bail!("fast attention: contiguous inputs only");
            };
            let (b, n, c) = l.shape().dims3()?;
            Ok((d[a..e].as_ptr(), b, n, c))
        };
        let (q, b, nq, inner) = view(s1, l1)?;
        let (k, bk, nk, ik) = view(s2, l2)?;
        let (v, bv, nv, iv) = view(s3, l3)?;
        if (bk, ik) != (b, inner) || (bv, nv, iv) != (b, nk, inner) {
            candle_core::bail!("fast attention: q, k, v shapes disagree");
        }
        let h = self.heads;
        if h == 0 || !inner.is_multiple_of(h) {
            candle_core::bail!("fast attention: {inner} features in {h} heads");
        }
        let d = inner / h;
        let _p = crate::profile::scope_flops("attention", 4 * (b * nq * nk * inner) as u64);
        let scale = 1.0 / (d as f32).sqrt();
        let (qa, ka, va) = (q as usize, k as usize, v as usize);
        // SAFETY (both packs): item bh = (bi, hi) reads rows j < nk of its batch item at
        // columns hi·d..hi·d+d, inside the b·nk·inner elements.
        let from = |bi: usize| self.logits_from.as_ref().map_or(bi, |f| f[bi]);
        if self
            .logits_from
            .as_ref()
            .is_some_and(|f| f.len() != b || f.iter().any(|&i| i >= b))
        {
            candle_core::bail!("fast attention: logits_from does not fit a batch of {b}");
        }
        let packs: Vec<(sgemm::PackedA, sgemm::PackedA)> = (0..b * h)
            .into_par_iter()
            .map(|bh| unsafe {
                let base = (bh / h) * nk * inner + (bh % h) * d;
                let kp = sgemm::PackedA::new(
                    nk,
                    d,
                    Strided {
                        ptr: (ka as *const f32).add(base),
                        rs: inner,
                        cs: 1,
                    },
                );
                let vt = sgemm::PackedA::new(
                    d,
                    nk,
                    Strided {
                        ptr: (va as *const f32).add(base),
                        rs: 1,
                        cs: inner,
                    },
                );
                (kp, vt)
            })
            .collect();
        let qb = sgemm::nr();
        let blocks = nq.div_ceil(qb);
        // SAFETY: the tasks below write every query row of every head.
        let mut out = unsafe { sgemm::output_buffer(b * nq * inner) };
        let oa = out.as_mut_ptr() as usize;
        (0..b * h * blocks).into_par_iter().for_each(|t| {
            let (bh, blk) = (t / blocks, t % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let q0 = blk * qb;
            let cols = qb.min(nq - q0);
            // Weights from item `from(bi)` (its queries and keys), values from bi.
            let (kp, _) = &packs[from(bi) * h + hi];
            let (_, vt) = &packs[bh];
            let qoff = (from(bi) * nq + q0) * inner + hi * d;
            SCORES.with(|s| {
                let mut s = s.borrow_mut();
                let (st, ot) = &mut *s;
                if st.len() < nk * qb {
                    st.resize(nk * qb, 0.0);
                }
                if ot.len() < d * qb {
                    ot.resize(d * qb, 0.0);
                }
                let off = (bi * nq + q0) * inner + hi * d;
                // SAFETY: Qᵀ's element (p < d, j < cols) is q[off + j·inner + p], inside q; the
                // score buffer holds nk·qb values and the Oᵀ buffer d·qb; this task alone writes
                // output rows q0..q0+cols of item bi at head hi's columns.
                unsafe {
                    sgemm::gemm_local(
                        nk,
                        cols,
                        d,
                        sgemm::A::Packed(kp),
                        sgemm::B::Strided(Strided {
                            ptr: (qa as *const f32).add(qoff),
                            rs: 1,
                            cs: inner,
                        }),
                        st.as_mut_ptr(),
                        qb,
                        sgemm::Epilogue {
                            alpha: scale,
                            ..Default::default()
                        },
                    );
                    if self.causal {
                        // Keys after the query get the column's visible maximum − 10⁴: their
                        // exp is exactly 0, as with −∞ (which the vector exp does not take).
                        for j in 0..cols {
                            let q = q0 + j;
                            if q + 1 < nk {
                                let m =
                                    (0..=q).map(|key| st[key * qb + j]).fold(f32::MIN, f32::max);
                                for key in q + 1..nk {
                                    st[key * qb + j] = m - 1e4;
                                }
                            }
                        }
                    }
                    let mut inv = [0f32; 64];
                    softmax_columns(&mut st[..nk * qb], qb, &mut inv[..qb]);
                    sgemm::gemm_local(
                        d,
                        cols,
                        nk,
                        sgemm::A::Packed(vt),
                        sgemm::B::Panel(st.as_ptr()),
                        ot.as_mut_ptr(),
                        qb,
                        sgemm::Epilogue::default(),
                    );
                    let o = (oa as *mut f32).add(off);
                    for j in 0..cols {
                        let row = o.add(j * inner);
                        for i in 0..d {
                            *row.add(i) = ot[i * qb + j] * inv[j];
                        }
                    }
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, nq, inner))))
    }
}

thread_local! {
    /// One query block's `Sᵀ` (keys × nr) and `Oᵀ` (d × nr).
    static SCORES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Softmax down the columns of `s` (`rows × w`, row-major): `s` becomes the unnormalised
/// `exp(x − max)` and `inv` each column's `1 / Σ`.
#[inline(always)]
fn softmax_columns_body<const W: usize>(s: &mut [f32], inv: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; W];
    for row in s.chunks_exact(W) {
        for l in 0..W {
            m[l] = m[l].max(row[l]);
        }
    }
    let mut sum = [0f32; W];
    for row in s.chunks_exact_mut(W) {
        for l in 0..W {
            let e = exp_poly(row[l] - m[l]);
            row[l] = e;
            sum[l] += e;
        }
    }
    for l in 0..W {
        inv[l] = 1.0 / sum[l];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_columns_avx512<const W: usize>(s: &mut [f32], inv: &mut [f32]) {
    if W == 32 {
        // SAFETY: the CPU has AVX-512F (this function's target feature); w = 32.
        return unsafe { softmax_columns_32_avx512(s, inv) };
    }
    softmax_columns_body::<W>(s, inv)
}

/// [`exp_poly`] on 16 lanes with AVX-512's `roundscale` and `scalef` (no clamping or exponent
/// bit tricks: `scalef` underflows to 0 and overflows to ∞ by itself), same reduction and
/// polynomial, so the same accuracy in fewer instructions.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(e, n)
}

/// [`softmax_columns_body`] for 32 columns with [`exp_avx512`].
///
/// # Safety
/// The CPU has AVX-512F; `s.len()` is a multiple of 32 and `inv.len() ≥ 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_columns_32_avx512(s: &mut [f32], inv: &mut [f32]) {
    // SAFETY: the caller's contract (AVX-512F present, 32 columns, inv of ≥ 32).
    unsafe {
        use std::arch::x86_64::*;
        let rows = s.len() / 32;
        let p = s.as_mut_ptr();
        let (mut m0, mut m1) = (
            _mm512_set1_ps(f32::NEG_INFINITY),
            _mm512_set1_ps(f32::NEG_INFINITY),
        );
        for r in 0..rows {
            m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(r * 32)));
            m1 = _mm512_max_ps(m1, _mm512_loadu_ps(p.add(r * 32 + 16)));
        }
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for r in 0..rows {
            let q = p.add(r * 32);
            let e0 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(q), m0));
            let e1 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(q.add(16)), m1));
            _mm512_storeu_ps(q, e0);
            _mm512_storeu_ps(q.add(16), e1);
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
        }
        let one = _mm512_set1_ps(1.0);
        _mm512_storeu_ps(inv.as_mut_ptr(), _mm512_div_ps(one, s0));
        _mm512_storeu_ps(inv.as_mut_ptr().add(16), _mm512_div_ps(one, s1));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_columns_avx2<const W: usize>(s: &mut [f32], inv: &mut [f32]) {
    softmax_columns_body::<W>(s, inv)
}

/// [`softmax_columns_body`] for the panel width `w` (16 or 32) in use.
fn softmax_columns(s: &mut [f32], w: usize, inv: &mut [f32]) {
    macro_rules! go {
        ($w:literal) => {{
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { softmax_columns_avx512::<$w>(s, inv) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { softmax_columns_avx2::<$w>(s, inv) };
                }
            }
            softmax_columns_body::<$w>(s, inv)
        }};
    }
    match w {
        16 => go!(16),
        32 => go!(32),
        _ => {
            // Any other width (not produced by the kernels in use): plain loops.
            let rows = s.len() / w;
            for l in 0..w {
                let m = (0..rows)
                    .map(|r| s[r * w + l])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for r in 0..rows {
                    let e = exp_poly(s[r * w + l] - m);
                    s[r * w + l] = e;
                    sum += e;
                }
                inv[l] = 1.0 / sum;
            }
        }
    }
}

/// `exp(x)` for `x ≤ 0`-ish softmax arguments: Cody–Waite reduction to `r ∈ [−ln2/2, ln2/2]`
/// and Cephes' degree-6 polynomial (relative error ≈ 1e-7, as libm's `expf` to within an ulp or
/// two); written so the compiler vectorises it.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to nearest even for |t| < 2²²: adding and subtracting 1.5·2²³.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, read from the shifted sum's low mantissa bits: exact for |n| < 2²², and
    // it vectorises (`n as i32`, a saturating conversion, compiles to 16 scalar conversions
    // with NaN and range checks per vector, which made this function 4× slower).
    let ni = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `x · Φ(x)` (exact GELU, `0.5·x·(1 + erf(x/√2))`) as `0.5·x·erfc(−x/√2)`, with erfc from
/// Numerical Recipes' Chebyshev fit (fractional error < 1.2e-7 everywhere, so the negative tail
/// keeps its relative accuracy) and [`exp_poly`]; written so the compiler vectorises it.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let az = z.abs();
    let t = 1.0 / (1.0 + 0.5 * az);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    // The exponent −z² + p = −x²/2 + p carried exactly as a float plus a correction: x² as
    // hi + lo (an FMA recovers the product's rounding), the sum by Knuth's two-sum. exp(s + c)
    // = exp(s)·(1 + c) for the tiny c, so no error comes from rounding x/√2, its square or the
    // sum (which would cost up to half an ulp of |exponent| ≈ 14, i.e. 5e-7 relative).
    let hi = x * x;
    let lo = x.mul_add(x, -hi);
    let a = -0.5 * hi;
    let s = a + p;
    let bb = s - a;
    let c = (a - (s - bb)) + (p - bb) - 0.5 * lo;
    let ans = t * exp_poly(s) * (1.0 + c);
    let erfc = if z >= 0.0 { ans } else { 2.0 - ans };
    0.5 * x * erfc
}

#[inline(always)]
fn geglu_rows_body(x: &[f32], out: &mut [f32], n: usize) {
    for (o, xr) in out.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
        let (h, g) = xr.split_at(n);
        for ((o, &h), &g) in o.iter_mut().zip(h).zip(g) {
            *o = h * gelu_erf(g);
        }
    }
}

simd_dispatch! {
    fn geglu_rows(x: &[f32], out: &mut [f32], n: usize) => geglu_rows_body
}

/// GEGLU's gate: `[.., 2n]` → `[.., n]`, `h · GELU(g)` for the halves `h`, `g` of the last
/// dimension (diffusers' `GEGLU` after its projection), in one parallel pass.
#[derive(Debug, Clone, Copy)]
pub struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let _p = crate::profile::scope("geglu");
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("geglu: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("geglu: contiguous input only");
        };
        let dims = layout.dims();
        let Some(&two_n) = dims.last() else {
            candle_core::bail!("geglu: scalar input");
        };
        if two_n % 2 != 0 {
            candle_core::bail!("geglu: odd last dimension {two_n}");
        }
        let n = two_n / 2;
        let x = &data[start..end];
        let rows = x.len() / two_n.max(1);
        // SAFETY: geglu_rows writes every output of its rows.
        let mut out = unsafe { sgemm::output_buffer(rows * n) };
        // ~32 K outputs per task.
        let per = (32 * 1024 / n.max(1)).max(1);
        out.par_chunks_mut(per * n)
            .zip(x.par_chunks(per * two_n))
            .for_each(|(o, x)| geglu_rows(x, o, n));
        let mut shape = dims.to_vec();
        if let Some(l) = shape.last_mut() {
            *l = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[inline(always)]
fn affine_silu_body(x: &[f32], out: &mut [f32], scale: f32, shift: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        let y = v * scale + shift;
        let r = y / (1.0 + exp_poly(-y));
        // Below −88, exp(−y) overflows f32 and the reference's SiLU is −0 (|SiLU| < 1e-36).
        *o = if y < -88.0 { -0.0 } else { r };
    }
}

simd_dispatch! {
    /// `out = SiLU(x·scale + shift)`, vectorised (GroupNorm's fused SiLU).
    pub(crate) fn affine_silu(x: &[f32], out: &mut [f32], scale: f32, shift: f32) => affine_silu_body
}

#[inline(always)]
fn quick_gelu_body(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        let y = v * 1.702;
        let r = v / (1.0 + exp_poly(-y));
        // Below −88, exp(−y) overflows f32 and the reference's x·σ(1.702x) is −0.
        *o = if y < -88.0 { -0.0 } else { r };
    }
}

simd_dispatch! {
    /// `out = x·σ(1.702·x)` (CLIP's quick GELU), vectorised.
    pub fn quick_gelu(x: &[f32], out: &mut [f32]) => quick_gelu_body
}

/// [`quick_gelu`] as a parallel tensor op.
pub struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("quick gelu: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quick gelu: contiguous input only");
        };
        let x = &data[start..end];
        // SAFETY: quick_gelu writes every element of its chunk.
        let mut out = unsafe { sgemm::output_buffer(x.len()) };
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| quick_gelu(x, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-wise kernels' speed on L1-resident rows (`cargo test --release -- --ignored
    /// elementwise_speed --nocapture`): nanoseconds per element on one thread.
    #[test]
    #[ignore = "timing; run by hand"]
    fn elementwise_speed() {
        let n = 1024;
        let x: Vec<f32> = (0..2 * n)
            .map(|i| ((i % 1000) as f32 - 500.0) * 0.01)
            .collect();
        let mut out = vec![0f32; n];
        let time = |f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            for _ in 0..10_000 {
                f();
            }
            t.elapsed().as_secs_f64() * 1e9 / (10_000 * n) as f64
        };
        let g = time(&mut || geglu_rows(std::hint::black_box(&x), &mut out, n));
        let s = time(&mut || affine_silu(std::hint::black_box(&x[..n]), &mut out, 1.0, 0.0));
        let q = time(&mut || quick_gelu(std::hint::black_box(&x[..n]), &mut out));
        eprintln!("ns per element: geglu {g:.3}, silu {s:.3}, quick gelu {q:.3}");
    }

    #[test]
    fn a_1x1_convolution_gives_its_weight_back_exactly() {
        // Sizes around the panel widths and past one depth block.
        for (o, i) in [(3, 5), (17, 300), (64, 33)] {
            let w: Vec<f32> = (0..o * i).map(|k| (k as f32 * 0.37).sin()).collect();
            let c = FastConv::new(&w[..], &vec![0.5; o], o, i, 1);
            assert_eq!(c.weight_1x1().as_deref(), Some(&w[..]));
            assert_eq!(c.channels(), (o, i));
        }
        let w3 = [1f32; 2 * 2 * 9];
        assert_eq!(
            FastConv::new(&w3[..], &[0.0; 2], 2, 2, 3).weight_1x1(),
            None
        );
    }

    #[test]
    fn f64_sums_match_a_running_sum() {
        // Every length around the lane count, and a long offset row.
        for n in (0..40).chain([1000, 4099]) {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37 + 3.0)
                .collect();
            let want: f64 = x.iter().map(|&v| f64::from(v)).sum();
            let got = sum_f64(&x);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "Σ of {n}: {got} vs {want}"
            );
            let mean = want / n.max(1) as f64;
            let want: f64 = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
            let got = sum_sq_dev_f64(&x, mean);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "Σd² of {n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn quick_gelu_matches_f64() {
        let x: Vec<f32> = (0..20_001).map(|i| -100.0 + i as f32 * 0.01).collect();
        let mut out = vec![0f32; x.len()];
        quick_gelu(&x, &mut out);
        for (&v, &o) in x.iter().zip(&out) {
            let v64 = f64::from(v);
            let want = v64 / (1.0 + (-(f64::from(v * 1.702))).exp());
            let err = (f64::from(o) - want).abs();
            assert!(
                err <= 4e-7 * want.abs() + 1e-36,
                "quick_gelu({v}) = {o}, want {want}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_avx512_matches_exp_poly() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        use std::arch::x86_64::*;
        let mut worst = 0f64;
        for i in 0..20_000 {
            let x: [f32; 16] =
                std::array::from_fn(|l| -100.0 + (i * 16 + l) as f32 * 100.0 / 320_000.0);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F is present (checked above).
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp_avx512(_mm512_loadu_ps(x.as_ptr()))) };
            for (g, &x) in got.iter().zip(&x) {
                let want = (x as f64).exp();
                if want > 1e-37 {
                    worst = worst.max(((*g as f64 - want) / want).abs());
                } else {
                    assert!((*g as f64) < 2e-37, "exp({x}) = {g}");
                }
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_poly_is_as_accurate_as_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_poly(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_erf_matches_f64() {
        // Relative error where the output matters (x ≥ −5), absolute error in the far negative
        // tail, where exp(−x²/2) of an f32 argument cannot be more exact (|GELU(x)| < 1.5e-6
        // there; PyTorch's own f32 `1 + erf` loses all relative accuracy in that tail).
        let (mut worst_rel, mut worst_tail) = (0f64, 0f64);
        for i in 0..=400_000 {
            let x = -12.0 + 24.0 * i as f32 / 400_000.0;
            let xd = x as f64;
            let want = 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2);
            let got = gelu_erf(x) as f64;
            if x >= -5.0 {
                if want != 0.0 {
                    worst_rel = worst_rel.max(((got - want) / want).abs());
                }
            } else {
                worst_tail = worst_tail.max((got - want).abs());
            }
        }
        eprintln!("gelu: relative {worst_rel:.3e}, tail absolute {worst_tail:.3e}");
        assert!(worst_rel < 1e-6, "worst relative error {worst_rel:.3e}");
        assert!(worst_tail < 1e-10, "worst tail error {worst_tail:.3e}");
    }

    #[test]
    fn affine_silu_matches_f64() {
        let x: Vec<f32> = (0..20_001).map(|i| -100.0 + i as f32 * 0.01).collect();
        let mut out = vec![0f32; x.len()];
        affine_silu(&x, &mut out, 1.0, 0.0);
        for (&v, &o) in x.iter().zip(&out) {
            let want = v as f64 / (1.0 + (-(v as f64)).exp());
            let err = (o as f64 - want).abs();
            assert!(
                err <= 4e-7 * want.abs() + 1e-36,
                "silu({v}) = {o}, want {want}"
            );
        }
    }

    #[test]
    fn softmax_columns_match_reference() {
        for w in [16usize, 32, 5] {
            let rows = 77;
            let s0: Vec<f32> = (0..rows * w)
                .map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0 + (i % w) as f32)
                .collect();
            let mut s = s0.clone();
            let mut inv = vec![0f32; w];
            softmax_columns(&mut s, w, &mut inv);
            for l in 0..w {
                let col: Vec<f64> = (0..rows).map(|r| s0[r * w + l] as f64).collect();
                let max = col.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = col.iter().map(|x| (x - max).exp()).sum();
                for r in 0..rows {
                    let want = (col[r] - max).exp() / sum;
                    let got = s[r * w + l] as f64 * inv[l] as f64;
                    assert!(
                        (got - want).abs() < 1e-7,
                        "w {w} ({r},{l}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// `conv(x)` for `x` of shape `(b, c, h, w)`, through the op's CPU entry point.
    fn forward(conv: &FastConv, x: &[f32], shape: (usize, usize, usize, usize)) -> Vec<f32> {
        let layout = Layout::contiguous(shape);
        let (CpuStorage::F32(y), _) = conv
            .cpu_fwd(&CpuStorage::F32(x.to_vec()), &layout)
            .expect("conv")
        else {
            unreachable!()
        };
        y
    }

    /// `(max |y − y64| / (|bias| + Σ|w·x|))` of a 3×3 padding-1 convolution computed by `algo`.
    fn conv_error(
        b: usize,
        ci: usize,
        co: usize,
        h: usize,
        w: usize,
        algo: ConvAlgo,
        chunk_bytes: usize,
    ) -> f64 {
        let mut seed = 0x2545_f491u32 ^ (b * 131 + ci * 31 + co * 7 + h * 3 + w) as u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..b * ci * h * w).map(|_| rnd()).collect();
        let wt: Vec<f32> = (0..co * ci * 9).map(|_| rnd() * 0.3).collect();
        let bias: Vec<f32> = (0..co).map(|_| rnd()).collect();
        let conv = FastConv::with_algo(&wt, &bias, co, ci, 3, algo);
        assert_eq!(conv.algo(), algo);
        let got = match &conv.weight {
            ConvWeights::Winograd(u) => {
                winograd::conv(u, &bias, &x, (b, ci, co, h, w), chunk_bytes, None)
            }
            ConvWeights::Direct(_) | ConvWeights::Narrow(_) => forward(&conv, &x, (b, ci, h, w)),
        };
        let mut worst = 0f64;
        for bi in 0..b {
            for o in 0..co {
                for y in 0..h {
                    for xx in 0..w {
                        let (mut sum, mut scale) = (f64::from(bias[o]), f64::from(bias[o]).abs());
                        for c in 0..ci {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (sy, sx) =
                                        ((y + ky).wrapping_sub(1), (xx + kx).wrapping_sub(1));
                                    if sy < h && sx < w {
                                        let p = f64::from(wt[((o * ci + c) * 3 + ky) * 3 + kx])
                                            * f64::from(x[((bi * ci + c) * h + sy) * w + sx]);
                                        sum += p;
                                        scale += p.abs();
                                    }
                                }
                            }
                        }
                        let g = f64::from(got[((bi * co + o) * h + y) * w + xx]);
                        worst = worst.max((g - sum).abs() / scale.max(1e-30));
                    }
                }
            }
        }
        worst
    }

    #[test]
    fn convolutions_packed_from_stored_half_bytes_match_the_widened_weights() {
        use crate::stored::StoredDType;
        // Deeper than one depth block (300 > KC) and more rows than one panel group.
        let (b, ci, co, h, w) = (1, 300, 100, 6, 5);
        let x: Vec<f32> = (0..b * ci * h * w)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let bias: Vec<f32> = (0..co).map(|i| i as f32 / co as f32).collect();
        let run = |conv: &FastConv| forward(conv, &x, (b, ci, h, w));
        for (k, algo, strided) in [
            (3, ConvAlgo::Winograd, false),
            (3, ConvAlgo::Direct, false),
            (3, ConvAlgo::Narrow, false),
            (3, ConvAlgo::Direct, true),
            (1, ConvAlgo::Direct, false),
        ] {
            let n = co * ci * k * k;
            // Odd byte offset: the unaligned read path, as a safetensors file may store it.
            let mut bytes = vec![0u8];
            let mut widened = Vec::with_capacity(n);
            for i in 0..n {
                let v = half::f16::from_f32(((i * 7919) % 1999) as f32 / 3000.0 - 0.33);
                bytes.extend(v.to_bits().to_le_bytes());
                widened.push(v.to_f32());
            }
            let stored = WeightData::new(&bytes[1..], StoredDType::F16).expect("whole elements");
            let make = |wt: WeightData| {
                if strided {
                    FastConv::strided(wt, &bias, co, ci, (0, 1))
                } else {
                    FastConv::with_algo(wt, &bias, co, ci, k, algo)
                }
            };
            let (a, c) = (make(stored), make((&widened).into()));
            assert_eq!(a.algo(), c.algo());
            assert_eq!(run(&a), run(&c), "k {k} {algo:?} strided {strided}");
        }
    }

    #[test]
    fn winograd_and_direct_convolutions_match_f64() {
        // (b, ci, co, h, w, chunk bytes): odd and even sides, one-pixel maps, a batch split
        // across chunks (tiny chunks: one tile row each), deep enough for several depth blocks.
        let cases = [
            (1, 3, 5, 7, 9, 1 << 24),
            (2, 16, 24, 8, 8, 1 << 24),
            (3, 40, 33, 5, 1, 1),
            (1, 1, 1, 1, 1, 1 << 24),
            (2, 300, 20, 6, 11, 1),
            (3, 20, 70, 9, 4, 20_000),
            // Wide enough for the direct form's padded pitch (the others use its im2col).
            (1, 8, 6, 4, 40, 1 << 24),
        ];
        for (b, ci, co, h, w, chunk) in cases {
            let direct = conv_error(b, ci, co, h, w, ConvAlgo::Direct, chunk);
            let wino = conv_error(b, ci, co, h, w, ConvAlgo::Winograd, chunk);
            let narrow = conv_error(b, ci, co, h, w, ConvAlgo::Narrow, chunk);
            eprintln!(
                "{b}x{ci}->{co} {h}x{w}: direct {direct:.2e}, winograd {wino:.2e}, narrow {narrow:.2e}"
            );
            assert!(direct < 5e-7, "direct {direct}");
            assert!(wino < 5e-7, "winograd {wino}");
            assert!(narrow < 5e-7, "narrow {narrow}");
        }
    }

    #[test]
    fn conv_with_a_skip_connection_equals_the_separate_sum_bit_for_bit() {
        use candle_core::CustomOp2;
        // (b, ci, co, h, w, kernel, algo, stride-2 padding): every form and both copy-outs of
        // the direct form (padded pitch on one wide map, im2col on a batch of small ones).
        let cases = [
            (1, 6, 5, 4, 40, 3, ConvAlgo::Direct, None),
            (3, 6, 5, 5, 4, 3, ConvAlgo::Direct, None),
            (2, 33, 40, 7, 9, 3, ConvAlgo::Winograd, None),
            (2, 3, 8, 6, 5, 3, ConvAlgo::Narrow, None),
            (2, 7, 9, 5, 6, 1, ConvAlgo::Direct, None),
            (2, 6, 5, 9, 8, 3, ConvAlgo::Direct, Some((0, 1))),
        ];
        let mut seed = 0x2545_f491u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 * 2.0 - 1.0
        };
        for (b, ci, co, h, w, k, algo, strided) in cases {
            let x: Vec<f32> = (0..b * ci * h * w).map(|_| rnd()).collect();
            let wt: Vec<f32> = (0..co * ci * k * k).map(|_| rnd() * 0.3).collect();
            let bias: Vec<f32> = (0..co).map(|_| rnd()).collect();
            let conv = match strided {
                Some(pad) => FastConv::strided(&wt, &bias, co, ci, pad),
                None => FastConv::with_algo(&wt, &bias, co, ci, k, algo),
            };
            assert_eq!(conv.algo(), algo);
            let (ho, wo) = conv.out_dims(h, w).expect("large enough");
            let skip: Vec<f32> = (0..b * co * ho * wo).map(|_| rnd() * 10.0).collect();
            let lx = Layout::contiguous((b, ci, h, w));
            let ls = Layout::contiguous((b, co, ho, wo));
            let (CpuStorage::F32(plain), _) = conv
                .cpu_fwd(&CpuStorage::F32(x.clone()), &lx)
                .expect("conv")
            else {
                unreachable!()
            };
            let (CpuStorage::F32(fused), shape) = ConvAdd(&conv)
                .cpu_fwd(
                    &CpuStorage::F32(x.clone()),
                    &lx,
                    &CpuStorage::F32(skip.clone()),
                    &ls,
                )
                .expect("conv + skip")
            else {
                unreachable!()
            };
            assert_eq!(shape.dims(), &[b, co, ho, wo]);
            let want: Vec<f32> = skip.iter().zip(&plain).map(|(s, p)| s + p).collect();
            assert_eq!(
                fused, want,
                "{b}x{ci}->{co} {h}x{w} k{k} {algo:?} {strided:?}"
            );
            // A skip connection of another shape is refused.
            let bad = Layout::contiguous((b, co + 1, ho, wo));
            let more = vec![0f32; b * (co + 1) * ho * wo];
            assert!(ConvAdd(&conv)
                .cpu_fwd(&CpuStorage::F32(x), &lx, &CpuStorage::F32(more), &bad)
                .is_err());
        }
    }

    #[test]
    fn strided_convolutions_match_f64() {
        // (b, ci, co, h, w, padding, column-matrix floats): odd and even sides, the UNet's
        // (1, 1) and the VAE's (0, 1) padding, one chunk or many (chunks splitting images).
        let cases = [
            (2, 5, 7, 9, 8, (1, 1), 1 << 24),
            (1, 4, 3, 8, 11, (0, 1), 1 << 24),
            (3, 6, 5, 7, 7, (1, 1), 6 * 9 * 5),
            (2, 3, 4, 6, 6, (0, 1), 3 * 9 * 7),
            (1, 2, 2, 3, 3, (0, 0), 1 << 24),
            (1, 300, 9, 5, 4, (1, 1), 1 << 24),
            (2, 3, 4, 1, 2, (1, 1), 1 << 24),
            (1, 7, 5, 40, 34, (0, 1), 1 << 24),
        ];
        let mut seed = 0x9e37_79b9u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 * 2.0 - 1.0
        };
        for (b, ci, co, h, w, pad, col_max) in cases {
            let x: Vec<f32> = (0..b * ci * h * w).map(|_| rnd()).collect();
            let wt: Vec<f32> = (0..co * ci * 9).map(|_| rnd() * 0.3).collect();
            let bias: Vec<f32> = (0..co).map(|_| rnd()).collect();
            let conv = FastConv::strided(&wt, &bias, co, ci, pad);
            let (ho, wo) = conv.out_dims(h, w).expect("large enough");
            let (pl, ph) = pad;
            assert_eq!(ho, (h + pl + ph - 3) / 2 + 1);
            let ConvWeights::Direct(pw) = &conv.weight else {
                unreachable!("strided convolutions are direct")
            };
            let g = ConvGeom {
                b,
                ci,
                co,
                h,
                w,
                stride: 2,
                pad: pl,
                ho,
                wo,
            };
            let got = im2col_conv(pw, &bias, &x, g, col_max, None);
            // The shifted views read the same values in the same order: the same sums.
            let shifted = shifted_conv(pw, &bias, &x, g, None);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&shifted),
                bits(&got),
                "{b}x{ci}->{co} {h}x{w} pad {pad:?}"
            );
            // Through the op as well (the full column budget).
            let (CpuStorage::F32(via_op), shape) = conv
                .cpu_fwd(
                    &CpuStorage::F32(x.clone()),
                    &Layout::contiguous((b, ci, h, w)),
                )
                .expect("conv")
            else {
                unreachable!()
            };
            assert_eq!(shape.dims(), &[b, co, ho, wo]);
            let mut worst = 0f64;
            for bi in 0..b {
                for o in 0..co {
                    for y in 0..ho {
                        for xx in 0..wo {
                            let (mut sum, mut scale) =
                                (f64::from(bias[o]), f64::from(bias[o]).abs());
                            for c in 0..ci {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let sy = (2 * y + ky).wrapping_sub(pl);
                                        let sx = (2 * xx + kx).wrapping_sub(pl);
                                        if sy < h && sx < w {
                                            let p = f64::from(wt[((o * ci + c) * 3 + ky) * 3 + kx])
                                                * f64::from(x[((bi * ci + c) * h + sy) * w + sx]);
                                            sum += p;
                                            scale += p.abs();
                                        }
                                    }
                                }
                            }
                            let i = ((bi * co + o) * ho + y) * wo + xx;
                            for v in [got[i], via_op[i]] {
                                worst = worst.max((f64::from(v) - sum).abs() / scale.max(1e-30));
                            }
                        }
                    }
                }
            }
            assert!(
                worst < 5e-7,
                "{b}x{ci}->{co} {h}x{w} pad {pad:?}: error {worst:.2e}"
            );
        }
    }

    /// Direct vs Winograd on the full-size models' convolution shapes (`cargo test --release
    /// -- --ignored conv_shapes --nocapture`).
    #[test]
    #[ignore = "timing; run by hand"]
    fn conv_shapes_direct_vs_winograd() {
        let shapes = [
            (1, 3, 128, 256, 256),
            (1, 128, 128, 256, 256),
            (1, 128, 3, 256, 256),
            (1, 256, 256, 128, 128),
            (1, 512, 512, 64, 64),
            (1, 512, 512, 32, 32),
            (1, 4, 512, 32, 32),
            (1, 512, 8, 32, 32),
            (1, 512, 8, 64, 64),
            (3, 8, 320, 32, 32),
            (3, 8, 320, 64, 64),
            (3, 320, 320, 32, 32),
            (3, 320, 4, 32, 32),
            (3, 640, 640, 16, 16),
            (3, 1280, 640, 16, 16),
            (3, 1280, 1280, 8, 8),
            (3, 1280, 1280, 4, 4),
        ];
        for (b, ci, co, h, w) in shapes {
            let x: Vec<f32> = (0..b * ci * h * w)
                .map(|i| (i % 97) as f32 * 0.01)
                .collect();
            let wt: Vec<f32> = (0..co * ci * 9).map(|i| (i % 89) as f32 * 0.001).collect();
            let bias = vec![0.1f32; co];
            let layout = Layout::contiguous((b, ci, h, w));
            let input = CpuStorage::F32(x);
            let mut line = format!("{b}x{ci}->{co} {h}x{w}:");
            crate::profile::take();
            for algo in [ConvAlgo::Direct, ConvAlgo::Winograd, ConvAlgo::Narrow] {
                if algo == ConvAlgo::Narrow && ci.min(co) > 8 {
                    continue;
                }
                let conv = FastConv::with_algo(&wt, &bias, co, ci, 3, algo);
                conv.cpu_fwd(&input, &layout).expect("conv");
                let t = std::time::Instant::now();
                let reps = 3;
                for _ in 0..reps {
                    conv.cpu_fwd(&input, &layout).expect("conv");
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let gf = 2.0 * (b * ci * co * h * w * 9) as f64 / s / 1e9;
                line += &format!(" {algo:?} {:.1} ms ({gf:.0} GFLOP/s)", s * 1e3);
            }
            eprintln!("{line}");
            for (name, secs, calls, _) in crate::profile::take() {
                eprintln!("   {name} {:.1} ms/run in {calls} calls", secs * 1e3 / 4.0);
            }
        }
    }
}
