//! Fused CPU kernels for inference (no gradients recorded).
//!
//! `conv3x3`: a 3×3, stride-1, padding-1 convolution computed as nine shifted matrix products
//! read straight from a zero-padded copy of the input, instead of materialising the 9×-larger
//! im2col matrix. The output is computed on the padded row pitch (two garbage columns per row),
//! so every tap's input is one contiguous, strided matrix.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

/// Weights repacked per tap: `[9][out][in]`, plus the bias.
#[derive(Debug)]
pub struct Conv3x3 {
    taps: Vec<f32>,
    bias: Vec<f32>,
    out_c: usize,
    in_c: usize,
}

impl Conv3x3 {
    /// `weight: [out, in, 3, 3]` (row-major), `bias: [out]`.
    pub fn new(weight: &[f32], bias: &[f32], out_c: usize, in_c: usize) -> Self {
        let mut taps = vec![0f32; 9 * out_c * in_c];
        for o in 0..out_c {
            for i in 0..in_c {
                for k in 0..9 {
                    taps[(k * out_c + o) * in_c + i] = weight[(o * in_c + i) * 9 + k];
                }
            }
        }
        Self {
            taps,
            bias: bias.to_vec(),
            out_c,
            in_c,
        }
    }
}

impl CustomOp1 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3-shifted-gemm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("conv3x3: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv3x3: contiguous input only");
        };
        let x = &data[start..end];
        let (b, ci, h, w) = layout.shape().dims4()?;
        if ci != self.in_c {
            candle_core::bail!("conv3x3: {ci} input channels, weights expect {}", self.in_c);
        }
        let co = self.out_c;
        let (hp, wp) = (h + 2, w + 2);
        let plane = hp * wp;
        let n = h * wp;
        let mut out = vec![0f32; b * co * h * w];
        // The last channel's shifted reads run up to 2 elements past its plane (into garbage
        // columns only): keep that slack allocated.
        let mut padded = vec![0f32; ci * plane + 2];
        let mut acc = vec![0f32; co * n];
        for bi in 0..b {
            let xb = &x[bi * ci * h * w..(bi + 1) * ci * h * w];
            padded[..ci * plane]
                .par_chunks_mut(plane)
                .zip(xb.par_chunks(h * w))
                .for_each(|(p, src)| {
                    for y in 0..h {
                        p[(y + 1) * wp + 1..(y + 1) * wp + 1 + w]
                            .copy_from_slice(&src[y * w..(y + 1) * w]);
                    }
                });
            for k in 0..9 {
                let (ky, kx) = (k / 3, k % 3);
                let offset = ky * wp + kx;
                // SAFETY: dst is `acc`, `co × n` with row stride n. lhs is tap k of `taps`,
                // `co × ci` with row stride ci, inside the `9·co·ci` buffer. rhs element (c, p)
                // is `padded[c·plane + offset + p]` with p < n = h·wp, so the largest index is
                // (ci−1)·plane + 2·wp + 2 + h·wp − 1 = ci·plane + 1, inside the buffer of
                // ci·plane + 2. No two of the pointers alias mutably.
                unsafe {
                    gemm::gemm(
                        co,
                        n,
                        ci,
                        acc.as_mut_ptr(),
                        1,
                        n as isize,
                        k > 0,
                        self.taps.as_ptr().add(k * co * ci),
                        1,
                        ci as isize,
                        padded.as_ptr().add(offset),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    );
                }
            }
            let ob = &mut out[bi * co * h * w..(bi + 1) * co * h * w];
            ob.par_chunks_mut(h * w)
                .zip(acc.par_chunks(n))
                .zip(self.bias.par_iter())
                .for_each(|((o, a), &bias)| {
                    for y in 0..h {
                        for (ov, &av) in
                            o[y * w..(y + 1) * w].iter_mut().zip(&a[y * wp..y * wp + w])
                        {
                            *ov = av + bias;
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, co, h, w))))
    }
}
