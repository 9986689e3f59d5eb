//! 3×3 convolutions with few channels on one side ([`super::ConvAlgo::Narrow`]): the models'
//! first and last convolutions.
//!
//! One task per output row (image, y) accumulates every output channel's row over each input
//! channel's three rows: `acc = bias`, then per input channel and kernel row
//! `acc += (k0·p[x − 1] + k1·p[x]) + k2·p[x + 1]`, in that order — an InstructPix2Pix
//! `conv_in` extended with zero channels therefore adds exact zeros (see
//! [`super::NARROW_MAX_CHANNELS`]). The AVX-512 form keeps 16 columns of up to eight output
//! channels in registers and rounds exactly as the portable one does.

use super::add_residual;
use super::sgemm;

/// One output row `y` of image planes `x` (`ci × h × w`) for every output channel, written to
/// `out` (`co × h × w`, row `y` of each plane) plus the matching rows of `res`.
struct Row<'a> {
    wt: &'a [f32],
    bias: &'a [f32],
    x: &'a [f32],
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    y: usize,
}

#[inline(always)]
fn taps_body(acc: &mut [f32], prow: &[f32], k0: f32, k1: f32, k2: f32) {
    for (((a, &p0), &p1), &p2) in acc.iter_mut().zip(prow).zip(&prow[1..]).zip(&prow[2..]) {
        *a += k0 * p0 + k1 * p1 + k2 * p2;
    }
}

simd_dispatch! {
    /// `acc[x] += k0·prow[x] + k1·prow[x + 1] + k2·prow[x + 2]` (one row of taps).
    fn taps(acc: &mut [f32], prow: &[f32], k0: f32, k1: f32, k2: f32) => taps_body
}

thread_local! {
    /// One output row of every channel, and one zero-padded input row ([`row_portable`]).
    static NARROW: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The output row through one row buffer per output channel.
///
/// # Safety
/// `out` holds `co·h·w` floats, row `y` of each plane written by no one else meanwhile.
unsafe fn row_portable(r: &Row, out: *mut f32, res: Option<&[f32]>) {
    let Row {
        wt,
        bias,
        x,
        ci,
        co,
        h,
        w,
        y,
    } = *r;
    NARROW.with(|s| {
        let mut s = s.borrow_mut();
        let (acc, prow) = &mut *s;
        acc.clear();
        for &bv in bias {
            acc.extend(std::iter::repeat_n(bv, w));
        }
        // Zero padding at both ends (the buffer may hold a longer row from earlier).
        prow.resize(w + 2, 0.0);
        prow[0] = 0.0;
        prow[w + 1] = 0.0;
        for c in 0..ci {
            for dy in 0..3 {
                let iy = (y + dy).wrapping_sub(1);
                if iy >= h {
                    continue;
                }
                prow[1..=w].copy_from_slice(&x[(c * h + iy) * w..][..w]);
                for (o, a) in acc.chunks_exact_mut(w).enumerate() {
                    let k = &wt[(o * ci + c) * 9 + dy * 3..][..3];
                    taps(a, prow, k[0], k[1], k[2]);
                }
            }
        }
        for (o, a) in acc.chunks_exact(w).enumerate().take(co) {
            // SAFETY: row y of plane o lies inside out (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add((o * h + y) * w), w) };
            dst.copy_from_slice(a);
            add_residual(dst, res, (o * h + y) * w);
        }
    })
}

/// The output row, on the best path the CPU has.
///
/// # Safety
/// As [`row_portable`].
unsafe fn row(r: &Row, out: *mut f32, res: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the rest is the caller's contract.
        return unsafe { x86::row_avx512(r, out, res) };
    }
    // SAFETY: the caller's contract.
    unsafe { row_portable(r, out, res) }
}

/// A 3×3, stride-1, padding-1 convolution by [`super::ConvAlgo::Narrow`].
pub(super) fn conv(
    wt: &[f32],
    bias: &[f32],
    x: &[f32],
    (b, ci, co, h, w): (usize, usize, usize, usize, usize),
    res: Option<&[f32]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(wt.len() >= co * ci * 9 && bias.len() >= co && x.len() >= b * ci * h * w);
    assert!(res.is_none_or(|r| r.len() >= b * co * h * w));
    let hw = h * w;
    // SAFETY: task (bi, y) writes row y of every output plane of image bi: all rows once.
    let mut out = unsafe { sgemm::output_buffer(b * co * hw) };
    let op = out.as_mut_ptr() as usize;
    (0..b * h).into_par_iter().for_each(|t| {
        let (bi, y) = (t / h, t % h);
        let r = Row {
            wt,
            bias,
            x: &x[bi * ci * hw..(bi + 1) * ci * hw],
            ci,
            co,
            h,
            w,
            y,
        };
        let res = res.map(|r| &r[bi * co * hw..(bi + 1) * co * hw]);
        // SAFETY: image bi's planes lie inside out; only this task writes their row y.
        unsafe { row(&r, (op as *mut f32).add(bi * co * hw), res) };
    });
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // Raw-pointer loads and stores are the whole of this module; each `unsafe fn` states its
    // contract.
    #![allow(unsafe_op_in_unsafe_fn)]

    use std::arch::x86_64::*;

    use super::super::avx512::{lanes, shift_in_first, shift_in_last};
    use super::Row;

    /// Output channels per register block.
    const OB: usize = 8;

    /// See [`super::row_portable`].
    ///
    /// # Safety
    /// AVX-512F, and as [`super::row_portable`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_avx512(r: &Row, out: *mut f32, res: Option<&[f32]>) {
        let mut o0 = 0;
        while o0 < r.co {
            let n = OB.min(r.co - o0);
            match n {
                8 => block::<8>(r, o0, out, res),
                7 => block::<7>(r, o0, out, res),
                6 => block::<6>(r, o0, out, res),
                5 => block::<5>(r, o0, out, res),
                4 => block::<4>(r, o0, out, res),
                3 => block::<3>(r, o0, out, res),
                2 => block::<2>(r, o0, out, res),
                _ => block::<1>(r, o0, out, res),
            }
            o0 += n;
        }
    }

    /// Output channels `o0..o0 + N`, 16 columns at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const N: usize>(r: &Row, o0: usize, out: *mut f32, res: Option<&[f32]>) {
        let Row {
            wt,
            bias,
            x,
            ci,
            h,
            w,
            y,
            ..
        } = *r;
        for x0 in (0..w).step_by(16) {
            let mask = lanes(w - x0);
            let mut acc: [__m512; N] = std::array::from_fn(|o| _mm512_set1_ps(bias[o0 + o]));
            for c in 0..ci {
                for dy in 0..3 {
                    let iy = (y + dy).wrapping_sub(1);
                    if iy >= h {
                        continue;
                    }
                    let src = &x[(c * h + iy) * w..(c * h + iy + 1) * w];
                    // Columns x − 1, x and x + 1 (zero outside the row).
                    let p1 = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(x0));
                    let p0 = shift_in_first(p1, src, x0.wrapping_sub(1));
                    let p2 = shift_in_last(p1, src, x0 + 16);
                    for (o, a) in acc.iter_mut().enumerate() {
                        let k = wt.as_ptr().add(((o0 + o) * ci + c) * 9 + dy * 3);
                        let t = _mm512_add_ps(
                            _mm512_mul_ps(_mm512_set1_ps(*k), p0),
                            _mm512_mul_ps(_mm512_set1_ps(*k.add(1)), p1),
                        );
                        let t = _mm512_add_ps(t, _mm512_mul_ps(_mm512_set1_ps(*k.add(2)), p2));
                        *a = _mm512_add_ps(*a, t);
                    }
                }
            }
            for (o, mut v) in acc.into_iter().enumerate() {
                let at = ((o0 + o) * h + y) * w + x0;
                if let Some(res) = res {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.as_ptr().add(at)));
                }
                _mm512_mask_storeu_ps(out.add(at), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched row (AVX-512 where the CPU has it) gives exactly what the portable code
    /// gives: widths that end a 16-column group anywhere, channel counts that leave partial
    /// register blocks, with and without a residual.
    #[test]
    fn rows_match_the_portable_code_bit_for_bit() {
        let val = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 250.0;
        for (ci, co, h, w) in [(3, 13, 3, 1), (8, 4, 4, 17), (4, 9, 2, 33), (2, 3, 5, 48)] {
            let wt: Vec<f32> = (0..co * ci * 9).map(|i| val(i + 3)).collect();
            let bias: Vec<f32> = (0..co).map(|i| val(i + 11)).collect();
            let x: Vec<f32> = (0..ci * h * w).map(val).collect();
            let res: Vec<f32> = (0..co * h * w).map(|i| val(i + 5)).collect();
            for res in [None, Some(&res[..])] {
                let mut want = vec![f32::NAN; co * h * w];
                let mut got = want.clone();
                for y in 0..h {
                    let r = Row {
                        wt: &wt,
                        bias: &bias,
                        x: &x,
                        ci,
                        co,
                        h,
                        w,
                        y,
                    };
                    // SAFETY: both buffers hold co·h·w floats.
                    unsafe {
                        row_portable(&r, want.as_mut_ptr(), res);
                        row(&r, got.as_mut_ptr(), res);
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ci} -> {co}, {h}x{w}");
            }
        }
    }
}
