//! Convolution for training: the forward and both gradients as matrix products on [`sgemm`]
//! over an explicit im2col, for weights that change every step (nothing is packed ahead).
//! candle's CPU convolution backward runs at a tenth of the forward's speed; these run all
//! three at the GEMM's.
//!
//! Shapes: input `[B, Ci, H, W]`, weight `[Co, Ci, K, K]`, output `[B, Co, Ho, Wo]` with
//! `Ho = (H + 2p − K) / s + 1`; row-major, contiguous.

use rayon::prelude::*;

use crate::sgemm;

/// A convolution's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_c: usize,
    pub out_c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    /// Rows of the im2col matrix (`Ci·K·K`).
    fn depth(&self) -> usize {
        self.in_c * self.kernel * self.kernel
    }

    /// Whether the geometry is usable (the kernel fits the padded input).
    pub fn is_valid(&self) -> bool {
        self.kernel > 0
            && self.stride > 0
            && self.h + 2 * self.padding >= self.kernel
            && self.w + 2 * self.padding >= self.kernel
    }

    /// The input pixel `(y, x)` that tap `(ky, kx)` of output pixel `(oy, ox)` reads, if inside.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.stride + ky).checked_sub(self.padding)?;
        let x = (ox * self.stride + kx).checked_sub(self.padding)?;
        (y < self.h && x < self.w).then_some((y, x))
    }
}

/// `[Ci·K·K, Ho·Wo]` columns of one image `[Ci, H, W]` (zero where the padding is read).
fn im2col(s: &ConvShape, x: &[f32], cols: &mut [f32]) {
    let (ho, wo) = s.out_hw();
    let l = ho * wo;
    cols.par_chunks_mut(l).enumerate().for_each(|(row, out)| {
        let (c, ky, kx) = (
            row / (s.kernel * s.kernel),
            (row / s.kernel) % s.kernel,
            row % s.kernel,
        );
        let plane = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
        for oy in 0..ho {
            for ox in 0..wo {
                out[oy * wo + ox] = match s.source(oy, ox, ky, kx) {
                    Some((y, xx)) => plane[y * s.w + xx],
                    None => 0.0,
                };
            }
        }
    });
}

/// Adds columns `[Ci·K·K, Ho·Wo]` back into one image's gradient `[Ci, H, W]`.
fn col2im(s: &ConvShape, cols: &[f32], dx: &mut [f32]) {
    let (ho, wo) = s.out_hw();
    let l = ho * wo;
    let kk = s.kernel * s.kernel;
    dx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(c, plane)| {
            plane.fill(0.0);
            for t in 0..kk {
                let (ky, kx) = (t / s.kernel, t % s.kernel);
                let row = &cols[(c * kk + t) * l..(c * kk + t + 1) * l];
                for oy in 0..ho {
                    for ox in 0..wo {
                        if let Some((y, x)) = s.source(oy, ox, ky, kx) {
                            plane[y * s.w + x] += row[oy * wo + ox];
                        }
                    }
                }
            }
        });
}

/// `[rows, cols]` transposed.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    crate::rows::transpose_last2(a, 1, rows, cols)
}

/// The convolution `y = w ⋆ x` (no bias).
///
/// # Panics
/// If the slices do not match `s` or the geometry is invalid.
pub fn conv2d(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    assert!(s.is_valid());
    let (ho, wo) = s.out_hw();
    let (l, d) = (ho * wo, s.depth());
    assert_eq!(x.len(), s.batch * s.in_c * s.h * s.w);
    assert_eq!(w.len(), s.out_c * d);
    let mut y = vec![0f32; s.batch * s.out_c * l];
    let mut cols = vec![0f32; d * l];
    for b in 0..s.batch {
        im2col(
            s,
            &x[b * s.in_c * s.h * s.w..(b + 1) * s.in_c * s.h * s.w],
            &mut cols,
        );
        sgemm::matmul(
            s.out_c,
            l,
            d,
            w,
            &cols,
            &mut y[b * s.out_c * l..(b + 1) * s.out_c * l],
        );
    }
    y
}

/// The input's gradient from the output's `dy`.
///
/// # Panics
/// If the slices do not match `s` or the geometry is invalid.
pub fn conv2d_grad_input(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
    assert!(s.is_valid());
    let (ho, wo) = s.out_hw();
    let (l, d) = (ho * wo, s.depth());
    assert_eq!(dy.len(), s.batch * s.out_c * l);
    assert_eq!(w.len(), s.out_c * d);
    let wt = transpose(w, s.out_c, d);
    let mut dx = vec![0f32; s.batch * s.in_c * s.h * s.w];
    let mut cols = vec![0f32; d * l];
    for b in 0..s.batch {
        sgemm::matmul(
            d,
            l,
            s.out_c,
            &wt,
            &dy[b * s.out_c * l..(b + 1) * s.out_c * l],
            &mut cols,
        );
        col2im(
            s,
            &cols,
            &mut dx[b * s.in_c * s.h * s.w..(b + 1) * s.in_c * s.h * s.w],
        );
    }
    dx
}

/// The weight's gradient from the input `x` and the output's `dy` (summed over the batch).
///
/// # Panics
/// If the slices do not match `s` or the geometry is invalid.
pub fn conv2d_grad_weight(s: &ConvShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(s.is_valid());
    let (ho, wo) = s.out_hw();
    let (l, d) = (ho * wo, s.depth());
    assert_eq!(x.len(), s.batch * s.in_c * s.h * s.w);
    assert_eq!(dy.len(), s.batch * s.out_c * l);
    let mut dw = vec![0f32; s.out_c * d];
    let mut cols = vec![0f32; d * l];
    for b in 0..s.batch {
        im2col(
            s,
            &x[b * s.in_c * s.h * s.w..(b + 1) * s.in_c * s.h * s.w],
            &mut cols,
        );
        let dyb = &dy[b * s.out_c * l..(b + 1) * s.out_c * l];
        // dW (+)= dy_b [Co × L] · colsᵀ [L × D]: colsᵀ read in place (row stride 1, column
        // stride L), each image's product added to the sum so far.
        let epi = sgemm::Epilogue {
            accumulate: b > 0,
            ..Default::default()
        };
        let a = sgemm::Strided {
            ptr: dyb.as_ptr(),
            rs: l,
            cs: 1,
        };
        let bt = sgemm::Strided {
            ptr: cols.as_ptr(),
            rs: 1,
            cs: l,
        };
        // SAFETY: `a` reads dy_b's Co × L elements and `bt` cols' L × D, both in bounds by the
        // asserts above; `dw` holds Co × D elements (row stride D) and aliases neither.
        unsafe {
            sgemm::gemm(
                s.out_c,
                d,
                l,
                sgemm::A::Strided(a),
                sgemm::B::Strided(bt),
                dw.as_mut_ptr(),
                d,
                epi,
            )
        };
    }
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution and its gradients in f64, by definition.
    fn reference(
        s: &ConvShape,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (ho, wo) = s.out_hw();
        let k = s.kernel;
        let mut y = vec![0f64; s.batch * s.out_c * ho * wo];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for b in 0..s.batch {
            for o in 0..s.out_c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let yi = ((b * s.out_c + o) * ho + oy) * wo + ox;
                        for c in 0..s.in_c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    if let Some((iy, ix)) = s.source(oy, ox, ky, kx) {
                                        let xi = ((b * s.in_c + c) * s.h + iy) * s.w + ix;
                                        let wi = ((o * s.in_c + c) * k + ky) * k + kx;
                                        y[yi] += f64::from(x[xi]) * f64::from(w[wi]);
                                        dx[xi] += f64::from(dy[yi]) * f64::from(w[wi]);
                                        dw[wi] += f64::from(dy[yi]) * f64::from(x[xi]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        let shapes = [
            (2, 3, 5, 9, 7, 3, 1, 1),
            (1, 4, 2, 8, 8, 3, 2, 0),
            (2, 2, 3, 7, 6, 3, 2, 1),
            (1, 5, 4, 6, 5, 1, 1, 0),
        ];
        for (batch, in_c, out_c, h, w, kernel, stride, padding) in shapes {
            let s = ConvShape {
                batch,
                in_c,
                out_c,
                h,
                w,
                kernel,
                stride,
                padding,
            };
            let (ho, wo) = s.out_hw();
            let x = values(batch * in_c * h * w, 1);
            let wt = values(out_c * in_c * kernel * kernel, 2);
            let dy = values(batch * out_c * ho * wo, 3);
            let (y, dx, dw) = reference(&s, &x, &wt, &dy);
            let close = |got: &[f32], want: &[f64], what: &str| {
                assert_eq!(got.len(), want.len(), "{what} {s:?}");
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{what} {s:?}: {g} vs {w}"
                    );
                }
            };
            close(&conv2d(&s, &x, &wt), &y, "forward");
            close(&conv2d_grad_input(&s, &dy, &wt), &dx, "input gradient");
            close(&conv2d_grad_weight(&s, &x, &dy), &dw, "weight gradient");
        }
    }
}

/// A GroupNorm's geometry: `[B, C, HW]` in `groups` groups of `C / groups` channels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub hw: usize,
    pub groups: usize,
    pub eps: f64,
}

/// One group's mean and `1/√(σ² + eps)`, in f64.
fn group_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The gradients of `y = act(γ·x̂ + β)` (GroupNorm, then SiLU if `silu`) for the output's `dy`:
/// `(dx, dγ, dβ)`.
///
/// # Panics
/// If the slices do not match `s` or the channels do not divide into the groups.
pub fn group_norm_backward(
    s: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    silu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (c, g) = (s.channels, s.groups);
    assert!(g > 0 && c.is_multiple_of(g) && gamma.len() == c && beta.len() == c);
    assert!(x.len() == s.batch * c * s.hw && dy.len() == x.len());
    let per = c / g;
    let n = per * s.hw;
    let mut dx = vec![0f32; x.len()];
    // Per group: its channels' (dγ, dβ) partial sums.
    let mut partial = vec![(0f64, 0f64); s.batch * c];
    dx.par_chunks_mut(n.max(1))
        .zip(partial.par_chunks_mut(per.max(1)))
        .enumerate()
        .for_each(|(idx, (dxg, part))| {
            let first = (idx % g) * per;
            let xg = &x[idx * n..(idx + 1) * n];
            let dyg = &dy[idx * n..(idx + 1) * n];
            let (mean, rstd) = group_stats(xg, s.eps);
            let (mut s1, mut s2) = (0f64, 0f64);
            for ch in 0..per {
                let (gm, bt) = (f64::from(gamma[first + ch]), f64::from(beta[first + ch]));
                let (mut dg, mut db) = (0f64, 0f64);
                for i in ch * s.hw..(ch + 1) * s.hw {
                    let xhat = (f64::from(xg[i]) - mean) * rstd;
                    let mut dz = f64::from(dyg[i]);
                    if silu {
                        let z = gm * xhat + bt;
                        let sg = 1.0 / (1.0 + (-z).exp());
                        dz *= sg * (1.0 + z * (1.0 - sg));
                    }
                    dg += dz * xhat;
                    db += dz;
                    let dxhat = dz * gm;
                    s1 += dxhat;
                    s2 += dxhat * xhat;
                    // Held for the second pass.
                    dxg[i] = dxhat as f32;
                }
                part[ch] = (dg, db);
            }
            let (m1, m2) = (s1 / n as f64, s2 / n as f64);
            for (i, d) in dxg.iter_mut().enumerate() {
                let xhat = (f64::from(xg[i]) - mean) * rstd;
                *d = (rstd * (f64::from(*d) - m1 - xhat * m2)) as f32;
            }
        });
    let mut dgamma = vec![0f64; c];
    let mut dbeta = vec![0f64; c];
    for (k, &(dg, db)) in partial.iter().enumerate() {
        dgamma[k % c] += dg;
        dbeta[k % c] += db;
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (dx, f(dgamma), f(dbeta))
}

#[cfg(test)]
mod norm_tests {
    use super::*;

    #[test]
    fn group_norm_gradients_match_finite_differences() {
        let s = NormShape {
            batch: 2,
            channels: 4,
            hw: 5,
            groups: 2,
            eps: 1e-5,
        };
        let n = s.batch * s.channels * s.hw;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.2)
            .collect();
        let gamma = vec![0.5f32, 1.5, -0.7, 1.1];
        let beta = vec![0.1f32, -0.3, 0.2, 0.0];
        let dy: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1).collect();
        for silu in [false, true] {
            // loss = Σ dy · f(x, γ, β), in f64.
            let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
                let per = s.channels / s.groups;
                let m = per * s.hw;
                let mut total = 0.0;
                for grp in 0..s.batch * s.groups {
                    let xs = &x[grp * m..(grp + 1) * m];
                    let mean = xs.iter().sum::<f64>() / m as f64;
                    let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m as f64;
                    for (i, v) in xs.iter().enumerate() {
                        let ch = (grp % s.groups) * per + i / s.hw;
                        let z = g[ch] * (v - mean) / (var + s.eps).sqrt() + b[ch];
                        let y = if silu { z / (1.0 + (-z).exp()) } else { z };
                        total += f64::from(dy[grp * m + i]) * y;
                    }
                }
                total
            };
            let to64 = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
            let (x64, g64, b64) = (to64(&x), to64(&gamma), to64(&beta));
            let (dx, dg, db) = group_norm_backward(&s, &x, &gamma, &beta, &dy, silu);
            let h = 1e-6;
            let numeric = |which: usize, i: usize| {
                let (mut xp, mut gp, mut bp) = (x64.clone(), g64.clone(), b64.clone());
                let (mut xm, mut gm, mut bm) = (x64.clone(), g64.clone(), b64.clone());
                match which {
                    0 => (xp[i] += h, xm[i] -= h),
                    1 => (gp[i] += h, gm[i] -= h),
                    _ => (bp[i] += h, bm[i] -= h),
                };
                (loss(&xp, &gp, &bp) - loss(&xm, &gm, &bm)) / (2.0 * h)
            };
            for (which, got) in [(0, &dx), (1, &dg), (2, &db)] {
                for (i, &v) in got.iter().enumerate() {
                    let want = numeric(which, i);
                    assert!(
                        (f64::from(v) - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "silu {silu} grad {which}[{i}]: {v} vs {want}"
                    );
                }
            }
        }
    }
}
