//! Row-wise kernels on plain slices: LayerNorm, GroupNorm (optionally with SiLU) and the batched
//! transpose of the last two dimensions, each one parallel pass with its statistics in f64.
//! Safe to call: the output is allocated here and written in full before it is returned.

use rayon::prelude::*;

use crate::kernels::{affine_silu, sum_f64, sum_sq_dev_f64};
use crate::sgemm::output_buffer;

/// LayerNorm of every row of width `gamma.len()` in `x`: `(x − μ) / √(σ² + eps) · γ + β`.
///
/// # Panics
/// If `beta` and `gamma` differ in length or `x` is not a whole number of rows.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f32> {
    let dim = gamma.len();
    assert!(beta.len() == dim && dim > 0 && x.len().is_multiple_of(dim));
    // SAFETY: every row is normalised into its output row below.
    let mut out = unsafe { output_buffer(x.len()) };
    // About 64 KiB of input per task.
    let rows = (16384 / dim).max(1);
    out.par_chunks_mut(rows * dim)
        .zip(x.par_chunks(rows * dim))
        .for_each(|(o, xi)| {
            for (o, xr) in o.chunks_exact_mut(dim).zip(xi.chunks_exact(dim)) {
                let mean = sum_f64(xr) / dim as f64;
                let var = sum_sq_dev_f64(xr, mean) / dim as f64;
                let rstd = (1.0 / (var + eps).sqrt()) as f32;
                let mean = mean as f32;
                for (((o, &v), &g), &b) in o.iter_mut().zip(xr).zip(gamma).zip(beta) {
                    *o = (v - mean) * rstd * g + b;
                }
            }
        });
    out
}

/// GroupNorm's parameters: one γ and β per channel, `groups` groups of equal width.
#[derive(Debug, Clone)]
pub struct GroupNormParams {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub groups: usize,
    pub eps: f64,
}

/// GroupNorm of `x` laid out `[B, C, HW]` with `C = gamma.len()`, followed by SiLU if `silu`.
///
/// # Panics
/// If the channels do not divide into the groups or `x` is not `B·C·hw` long.
pub fn group_norm(x: &[f32], hw: usize, p: &GroupNormParams, silu: bool) -> Vec<f32> {
    let c = p.gamma.len();
    let g = p.groups;
    assert!(g > 0 && c.is_multiple_of(g) && p.beta.len() == c);
    let per_group = c / g;
    let n = per_group * hw;
    assert!(n > 0 && x.len().is_multiple_of(c * hw));
    // SAFETY: every group's chunk is written below.
    let mut out = unsafe { output_buffer(x.len()) };
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(idx, (o, xi))| {
            let group = idx % g;
            let mean = sum_f64(xi) / n as f64;
            let var = sum_sq_dev_f64(xi, mean) / n as f64;
            let rstd = 1.0 / (var + p.eps).sqrt();
            for ch in 0..per_group {
                let ci = group * per_group + ch;
                let scale = p.gamma[ci] as f64 * rstd;
                let shift = (p.beta[ci] as f64 - mean * scale) as f32;
                let scale = scale as f32;
                let (oc, xc) = (&mut o[ch * hw..(ch + 1) * hw], &xi[ch * hw..(ch + 1) * hw]);
                if silu {
                    affine_silu(xc, oc, scale, shift);
                } else {
                    for (ov, &xv) in oc.iter_mut().zip(xc) {
                        *ov = xv * scale + shift;
                    }
                }
            }
        });
    out
}

/// `x` laid out `[B, M, N]` transposed to `[B, N, M]`, in bands of 32 output rows.
///
/// # Panics
/// If `x` is not `b·m·n` long.
pub fn transpose_last2(x: &[f32], b: usize, m: usize, n: usize) -> Vec<f32> {
    const T: usize = 32;
    assert_eq!(x.len(), b * m * n);
    if m == 0 || n == 0 {
        return Vec::new();
    }
    // SAFETY: every output row (one per input column) is written in full below.
    let mut out = unsafe { output_buffer(x.len()) };
    // Task: one image's band of T output rows (input columns j0..j0+T), all of m.
    out.par_chunks_mut(n * m)
        .zip(x.par_chunks(m * n))
        .for_each(|(o, src)| {
            o.par_chunks_mut(T * m).enumerate().for_each(|(band, ob)| {
                let j0 = band * T;
                let cols = T.min(n - j0);
                for i in 0..m {
                    let row = &src[i * n + j0..i * n + j0 + cols];
                    for (jj, &v) in row.iter().enumerate() {
                        ob[jj * m + i] = v;
                    }
                }
            })
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_f64() {
        let x: Vec<f32> = (0..24).map(|i| (i * 7 % 11) as f32 - 3.0).collect();
        let (g, b) = (vec![1.5f32; 8], vec![0.25f32; 8]);
        let out = layer_norm(&x, &g, &b, 1e-5);
        for (row, orow) in x.chunks(8).zip(out.chunks(8)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 8.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0;
            for (&v, &o) in row.iter().zip(orow) {
                let want = (v as f64 - mean) / (var + 1e-5).sqrt() * 1.5 + 0.25;
                assert!((o as f64 - want).abs() < 1e-5, "{o} vs {want}");
            }
        }
    }

    #[test]
    fn group_norm_matches_f64_with_and_without_silu() {
        let (c, hw) = (4, 5);
        let x: Vec<f32> = (0..2 * c * hw)
            .map(|i| (i * 13 % 17) as f32 * 0.3)
            .collect();
        let p = GroupNormParams {
            gamma: vec![0.5, 1.0, 1.5, 2.0],
            beta: vec![0.1, -0.1, 0.2, 0.0],
            groups: 2,
            eps: 1e-6,
        };
        for silu in [false, true] {
            let out = group_norm(&x, hw, &p, silu);
            for (gi, (xg, og)) in x.chunks(2 * hw).zip(out.chunks(2 * hw)).enumerate() {
                let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / (2 * hw) as f64;
                let var =
                    xg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (2 * hw) as f64;
                for (i, (&v, &o)) in xg.iter().zip(og).enumerate() {
                    let ch = (gi % 2) * 2 + i / hw;
                    let y = (v as f64 - mean) / (var + 1e-6).sqrt() * p.gamma[ch] as f64
                        + p.beta[ch] as f64;
                    let want = if silu { y / (1.0 + (-y).exp()) } else { y };
                    assert!((o as f64 - want).abs() < 1e-5, "{o} vs {want}");
                }
            }
        }
    }

    #[test]
    fn transpose_last2_swaps_rows_and_columns() {
        let (b, m, n) = (2, 3, 70);
        let x: Vec<f32> = (0..b * m * n).map(|i| i as f32).collect();
        let t = transpose_last2(&x, b, m, n);
        for bi in 0..b {
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(t[bi * m * n + j * m + i], x[bi * m * n + i * n + j]);
                }
            }
        }
    }
}
