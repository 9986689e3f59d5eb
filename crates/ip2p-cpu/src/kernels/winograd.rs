//! Winograd F(2×2, 3×3) convolutions: weight transform at load, and per call the input
//! transform, 16 products on [`sgemm`] and the output transform (see
//! [`super::ConvAlgo::Winograd`]). Where the CPU has AVX-512 the transforms run 16 tiles at a
//! time in registers (bit for bit what the portable code computes; that code, compiled for
//! AVX2 or baseline x86-64, serves the other CPUs).

use super::add_residual;
use super::sgemm::{self, PackedA, Problem, Strided};
use crate::stored::WeightData;

/// `U_ξ[o][c] = (G g_oc Gᵀ)[ξ]` with `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`,
/// computed in f64 and rounded once; the 16 matrices are packed as they are computed.
pub(super) fn weights(w: WeightData, co: usize, ci: usize) -> Vec<PackedA> {
    let packed = PackedA::pack_rows(co, ci, |o, c0, out: &mut [[f32; sgemm::KC]; 16]| {
        let kc = sgemm::KC.min(ci - c0);
        let mut g = [0f32; 9 * sgemm::KC];
        w.read((o * ci + c0) * 9, &mut g[..9 * kc]);
        for (c, g) in g[..9 * kc].chunks_exact(9).enumerate() {
            let g: [f64; 9] = std::array::from_fn(|i| f64::from(g[i]));
            let gt = |r: [f64; 3]| {
                [
                    r[0],
                    (r[0] + r[1] + r[2]) / 2.0,
                    (r[0] - r[1] + r[2]) / 2.0,
                    r[2],
                ]
            };
            // t = G g (4 × 3), by columns.
            let cols: [[f64; 4]; 3] = std::array::from_fn(|b| gt([g[b], g[3 + b], g[6 + b]]));
            for i in 0..4 {
                let row = gt([cols[0][i], cols[1][i], cols[2][i]]);
                for j in 0..4 {
                    out[i * 4 + j][c] = row[j] as f32;
                }
            }
        }
    });
    packed.into()
}

/// A 3×3, padding-1 convolution by Winograd F(2×2, 3×3) (see [`super::ConvAlgo::Winograd`]).
///
/// The output is cut into 2×2 tiles, `th × tw` per image; a tile row is one image's row of
/// tiles. Tile rows are processed in chunks: for a chunk of `nt` tiles, the input transform
/// writes `V [in][16][nt]`, 16 products `M_ξ = U_ξ V_ξ` write `M [out][16][nt]`, and the output
/// transform adds the bias and writes the output rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    u: &[PackedA],
    bias: &[f32],
    x: &[f32],
    (b, ci, co, h, w): (usize, usize, usize, usize, usize),
    chunk_bytes: usize,
    res: Option<&[f32]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tile_rows = b * th;
    let row_bytes = 16 * tw * (ci + co) * std::mem::size_of::<f32>();
    let chunk = (chunk_bytes / row_bytes).clamp(1, tile_rows);
    // SAFETY: per chunk, the input transform writes V's ci × 16 × nt values and the products
    // M's co × 16 × nt before either is read; the output transforms write every plane's rows.
    let (mut out, mut v, mut m) = unsafe {
        (
            sgemm::output_buffer(b * co * h * w),
            sgemm::output_buffer(ci * 16 * chunk * tw),
            sgemm::output_buffer(co * 16 * chunk * tw),
        )
    };
    for r0 in (0..tile_rows).step_by(chunk) {
        let rows = chunk.min(tile_rows - r0);
        let nt = rows * tw;
        let ld = 16 * nt;
        let p = crate::profile::scope("winograd input");
        v[..ci * ld].par_chunks_mut(ld).enumerate().for_each_init(
            || vec![0f32; 24 * tw + 8],
            |scratch, (c, vc)| {
                for rl in 0..rows {
                    let (bi, ty) = ((r0 + rl) / th, (r0 + rl) % th);
                    let plane = &x[(bi * ci + c) * h * w..(bi * ci + c + 1) * h * w];
                    let r = TileRow {
                        h,
                        w,
                        tw,
                        nt,
                        ty,
                        off: rl * tw,
                    };
                    input_row(plane, r, scratch, vc);
                }
            },
        );
        drop(p);
        let p = crate::profile::scope("winograd products");
        let (vp, mp) = (v.as_ptr() as usize, m.as_mut_ptr() as usize);
        // SAFETY: item ξ reads V_ξ (c, t) at v[c·ld + ξ·nt + t] and writes M_ξ (o, t) at
        // m[o·ld + ξ·nt + t]: inside both buffers, disjoint between items.
        unsafe {
            sgemm::gemm_batch_independent(16, co, nt, ci, sgemm::Epilogue::default(), &|xi| {
                Problem {
                    a: sgemm::A::Packed(&u[xi]),
                    b: sgemm::B::Strided(Strided {
                        ptr: (vp as *const f32).add(xi * nt),
                        rs: ld,
                        cs: 1,
                    }),
                    c: (mp as *mut f32).add(xi * nt),
                    rs_c: ld,
                }
            })
        };
        drop(p);
        let _p = crate::profile::scope("winograd output");
        let (img0, img1) = (r0 / th, (r0 + rows - 1) / th);
        out[img0 * co * h * w..(img1 + 1) * co * h * w]
            .par_chunks_mut(h * w)
            .enumerate()
            .for_each_init(
                || vec![0f32; 12 * tw],
                |scratch, (idx, plane)| {
                    let (bi, o) = (img0 + idx / co, idx % co);
                    let mo = &m[o * ld..o * ld + 16 * nt];
                    let rp = res.map(|r| &r[(bi * co + o) * h * w..(bi * co + o + 1) * h * w]);
                    for rl in 0..rows {
                        if (r0 + rl) / th == bi {
                            let r = TileRow {
                                h,
                                w,
                                tw,
                                nt,
                                ty: (r0 + rl) % th,
                                off: rl * tw,
                            };
                            output_row(mo, r, bias[o], plane, rp, scratch);
                        }
                    }
                },
            );
    }
    out
}

simd_dispatch! {
    /// `V = Bᵀ d B` for one channel's tile row `ty` (tiles `d` are the 4×4 windows at
    /// `(2ty − 1, 2tx − 1)`, zero outside the plane), `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0],
    /// [0, −1, 1, 0], [0, 1, 0, −1]]`. Writes `dst[ξ·nt + off + tx]`. `scratch` holds `24·tw + 8`.
    fn input_row_portable(
        plane: &[f32],
        r: TileRow,
        scratch: &mut [f32],
        dst: &mut [f32]
    ) => input_row_body
}

#[inline(always)]
fn input_row_body(plane: &[f32], r: TileRow, scratch: &mut [f32], dst: &mut [f32]) {
    let TileRow {
        h,
        w,
        tw,
        nt,
        ty,
        off,
    } = r;
    // Row i of the windows, split into even and odd padded columns: window column s of tile
    // tx is padded column 2tx + s, i.e. even[tx], odd[tx], even[tx + 1], odd[tx + 1].
    let (eo, e) = scratch.split_at_mut(8 * (tw + 1));
    for i in 0..4 {
        let base = i * 2 * (tw + 1);
        let (ev, od) = eo[base..base + 2 * (tw + 1)].split_at_mut(tw + 1);
        ev.fill(0.0);
        od.fill(0.0);
        let y = (2 * ty + i).wrapping_sub(1);
        if y < h {
            let src = &plane[y * w..(y + 1) * w];
            // Padded column p holds src[p − 1]: odd[k] = src[2k], even[k] = src[2k − 1].
            for (d, &v) in od.iter_mut().zip(src.iter().step_by(2)) {
                *d = v;
            }
            for (d, &v) in ev[1..].iter_mut().zip(src[1..].iter().step_by(2)) {
                *d = v;
            }
        }
        // Along the columns: e_i = d_i B (4 values per tile).
        let (e0, rest) = e[i * 4 * tw..(i + 1) * 4 * tw].split_at_mut(tw);
        let (e1, rest) = rest.split_at_mut(tw);
        let (e2, e3) = rest.split_at_mut(tw);
        for t in 0..tw {
            let (d0, d1, d2, d3) = (ev[t], od[t], ev[t + 1], od[t + 1]);
            e0[t] = d0 - d2;
            e1[t] = d1 + d2;
            e2[t] = d2 - d1;
            e3[t] = d1 - d3;
        }
    }
    // Along the rows: V = Bᵀ e.
    for j in 0..4 {
        let row = |i: usize| &e[(i * 4 + j) * tw..(i * 4 + j + 1) * tw];
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let out = |xi: usize| xi * nt + off..xi * nt + off + tw;
        for ((d, a), b) in dst[out(j)].iter_mut().zip(r0).zip(r2) {
            *d = a - b;
        }
        for ((d, a), b) in dst[out(4 + j)].iter_mut().zip(r1).zip(r2) {
            *d = a + b;
        }
        for ((d, a), b) in dst[out(8 + j)].iter_mut().zip(r2).zip(r1) {
            *d = a - b;
        }
        for ((d, a), b) in dst[out(12 + j)].iter_mut().zip(r1).zip(r3) {
            *d = a - b;
        }
    }
}

simd_dispatch! {
    /// `Y = Aᵀ m A + bias` for one output channel's tile row `ty`, `Aᵀ = [[1, 1, 1, 0],
    /// [0, 1, −1, −1]]`, reading `m[ξ·nt + off + tx]`, writing output rows `2ty` and `2ty + 1`
    /// (those inside the plane). `scratch` holds `12·tw`.
    fn output_row_portable(
        m: &[f32],
        r: TileRow,
        bias: f32,
        plane: &mut [f32],
        res: Option<&[f32]>,
        scratch: &mut [f32]
    ) => output_row_body
}

#[inline(always)]
fn output_row_body(
    m: &[f32],
    r: TileRow,
    bias: f32,
    plane: &mut [f32],
    res: Option<&[f32]>,
    scratch: &mut [f32],
) {
    let TileRow {
        h,
        w,
        tw,
        nt,
        ty,
        off,
    } = r;
    let mrow = |xi: usize| &m[xi * nt + off..xi * nt + off + tw];
    // Along the columns: f_i = m_i A (2 values per tile).
    let (f, y) = scratch.split_at_mut(8 * tw);
    for i in 0..4 {
        let (m0, m1, m2, m3) = (
            mrow(4 * i),
            mrow(4 * i + 1),
            mrow(4 * i + 2),
            mrow(4 * i + 3),
        );
        let (f0, f1) = f[i * 2 * tw..(i + 1) * 2 * tw].split_at_mut(tw);
        for t in 0..tw {
            f0[t] = m0[t] + m1[t] + m2[t];
            f1[t] = m1[t] - m2[t] - m3[t];
        }
    }
    // Along the rows: Y = Aᵀ f, then interleaved into the output rows.
    for k in 0..2 {
        let frow = |i: usize| &f[(i * 2 + k) * tw..(i * 2 + k + 1) * tw];
        let (f0, f1, f2, f3) = (frow(0), frow(1), frow(2), frow(3));
        let (y0, y1) = y[k * 2 * tw..(k + 1) * 2 * tw].split_at_mut(tw);
        for t in 0..tw {
            y0[t] = f0[t] + f1[t] + f2[t] + bias;
            y1[t] = f1[t] - f2[t] - f3[t] + bias;
        }
    }
    for a in 0..2 {
        let yy = 2 * ty + a;
        if yy >= h {
            break;
        }
        // y holds [k][a][tx]: output column 2tx + k of row a.
        let (ya0, ya1) = (&y[a * tw..(a + 1) * tw], &y[(2 + a) * tw..(2 + a + 1) * tw]);
        let row = &mut plane[yy * w..(yy + 1) * w];
        let mut pairs = row.chunks_exact_mut(2);
        for ((p, &v0), &v1) in (&mut pairs).zip(ya0).zip(ya1) {
            p[0] = v0;
            p[1] = v1;
        }
        if let [last] = pairs.into_remainder() {
            *last = ya0[tw - 1];
        }
        add_residual(row, res, yy * w);
    }
}

/// [`input_row_portable`], or its AVX-512 form where the CPU has one (the same operations in the
/// same order, so the same values to the bit).
fn input_row(plane: &[f32], r: TileRow, scratch: &mut [f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(plane.len() >= r.h * r.w && r.fits(dst.len()));
        // SAFETY: the CPU has AVX-512F; the bounds are checked above.
        return unsafe { x86::input_row_avx512(plane, r, dst) };
    }
    input_row_portable(plane, r, scratch, dst)
}

/// [`output_row_portable`], or its AVX-512 form where the CPU has one (the same operations in
/// the same order, so the same values to the bit).
fn output_row(
    m: &[f32],
    r: TileRow,
    bias: f32,
    plane: &mut [f32],
    res: Option<&[f32]>,
    scratch: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let hw = r.h * r.w;
        assert!(r.fits(m.len()) && plane.len() >= hw && res.is_none_or(|s| s.len() >= hw));
        // SAFETY: the CPU has AVX-512F; the bounds are checked above.
        return unsafe { x86::output_row_avx512(m, r, bias, plane, res) };
    }
    output_row_portable(m, r, bias, plane, res, scratch)
}

/// One tile row in a chunk: tile row `ty` of an `h × w` plane (`tw` tiles per row), at tiles
/// `off..off + tw` of the chunk's `nt` (the transformed values of tile `t` for ξ at `ξ·nt + t`).
#[derive(Debug, Clone, Copy)]
struct TileRow {
    h: usize,
    w: usize,
    tw: usize,
    nt: usize,
    ty: usize,
    off: usize,
}

impl TileRow {
    /// Whether a buffer of `len` floats holds this row's tiles for all 16 ξ.
    fn fits(&self, len: usize) -> bool {
        self.off + self.tw <= self.nt && len >= 15 * self.nt + self.off + self.tw
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The transforms 16 tiles at a time in zmm registers: the input's even and odd columns
    //! split by two permutes, the output's two columns per tile merged by two more; partial
    //! groups (a row's last tiles, columns past the plane) by masked loads and stores.

    // Raw-pointer loads and stores are the whole of this module; each `unsafe fn` states its
    // contract.
    #![allow(unsafe_op_in_unsafe_fn)]

    use std::arch::x86_64::*;

    use super::super::avx512::{lanes, load_upto, shift_in_first, shift_in_last};
    use super::TileRow;

    /// See [`super::input_row_body`].
    ///
    /// # Safety
    /// AVX-512F; `plane` holds `h·w` values; `r.fits(dst.len())`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_row_avx512(plane: &[f32], r: TileRow, dst: &mut [f32]) {
        let TileRow {
            h,
            w,
            tw,
            nt,
            ty,
            off,
        } = r;
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let rows: [Option<&[f32]>; 4] = std::array::from_fn(|i| {
            let y = (2 * ty + i).wrapping_sub(1);
            (y < h).then(|| &plane[y * w..(y + 1) * w])
        });
        let zero = _mm512_setzero_ps();
        for t0 in (0..tw).step_by(16) {
            // Tile t's window columns are 2t − 1 ..= 2t + 2 (d0..d3; zero outside the plane).
            let c0 = 2 * t0;
            let mut e = [[zero; 4]; 4];
            for (ei, src) in e.iter_mut().zip(rows) {
                let Some(src) = src else { continue };
                let (lo, hi) = (load_upto(src, c0), load_upto(src, c0 + 16));
                let d1 = _mm512_permutex2var_ps(lo, even, hi);
                let d2 = _mm512_permutex2var_ps(lo, odd, hi);
                // d0 = [src[c0 − 1], d2[0..15]], d3 = [d1[1..16], src[c0 + 32]].
                let d0 = shift_in_first(d2, src, c0.wrapping_sub(1));
                let d3 = shift_in_last(d1, src, c0 + 32);
                *ei = [
                    _mm512_sub_ps(d0, d2),
                    _mm512_add_ps(d1, d2),
                    _mm512_sub_ps(d2, d1),
                    _mm512_sub_ps(d1, d3),
                ];
            }
            let mask = lanes(tw - t0);
            let out = dst.as_mut_ptr().add(off + t0);
            let [e0, e1, e2, e3] = e;
            for (j, (((r0, r1), r2), r3)) in e0.into_iter().zip(e1).zip(e2).zip(e3).enumerate() {
                _mm512_mask_storeu_ps(out.add(j * nt), mask, _mm512_sub_ps(r0, r2));
                _mm512_mask_storeu_ps(out.add((4 + j) * nt), mask, _mm512_add_ps(r1, r2));
                _mm512_mask_storeu_ps(out.add((8 + j) * nt), mask, _mm512_sub_ps(r2, r1));
                _mm512_mask_storeu_ps(out.add((12 + j) * nt), mask, _mm512_sub_ps(r1, r3));
            }
        }
    }

    /// See [`super::output_row_body`].
    ///
    /// # Safety
    /// AVX-512F; `r.fits(m.len())`; `plane` (and `res`) hold `h·w`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_row_avx512(
        m: &[f32],
        r: TileRow,
        bias: f32,
        plane: &mut [f32],
        res: Option<&[f32]>,
    ) {
        let TileRow {
            h,
            w,
            tw,
            nt,
            ty,
            off,
        } = r;
        let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi_idx =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let b = _mm512_set1_ps(bias);
        for t0 in (0..tw).step_by(16) {
            let mask = lanes(tw - t0);
            let ld = |xi: usize| _mm512_maskz_loadu_ps(mask, m.as_ptr().add(xi * nt + off + t0));
            // f[i] = (m_i A): two values per tile.
            let f: [[__m512; 2]; 4] = std::array::from_fn(|i| {
                let (m0, m1, m2, m3) = (ld(4 * i), ld(4 * i + 1), ld(4 * i + 2), ld(4 * i + 3));
                [
                    _mm512_add_ps(_mm512_add_ps(m0, m1), m2),
                    _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3),
                ]
            });
            for a in 0..2 {
                let yy = 2 * ty + a;
                if yy >= h {
                    break;
                }
                // Output columns 2t (k = 0) and 2t + 1 (k = 1) of row a.
                let y: [__m512; 2] = std::array::from_fn(|k| {
                    let v = if a == 0 {
                        _mm512_add_ps(_mm512_add_ps(f[0][k], f[1][k]), f[2][k])
                    } else {
                        _mm512_sub_ps(_mm512_sub_ps(f[1][k], f[2][k]), f[3][k])
                    };
                    _mm512_add_ps(v, b)
                });
                let row = yy * w;
                for (half, idx) in [lo_idx, hi_idx].into_iter().enumerate() {
                    let c = 2 * t0 + 16 * half;
                    if c >= w {
                        break;
                    }
                    let cm = lanes(w - c);
                    let mut v = _mm512_permutex2var_ps(y[0], idx, y[1]);
                    if let Some(r) = res {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(cm, r.as_ptr().add(row + c)));
                    }
                    _mm512_mask_storeu_ps(plane.as_mut_ptr().add(row + c), cm, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [−1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The dispatched transforms (AVX-512 where the CPU has it) give exactly what the portable
    /// code gives, on planes whose widths cut the 16-tile groups anywhere (odd widths, a
    /// partial last group, planes narrower than one group) and at every tile row.
    #[test]
    fn transforms_match_the_portable_code_bit_for_bit() {
        for (h, w) in [
            (1usize, 1usize),
            (2, 3),
            (3, 2),
            (5, 7),
            (4, 32),
            (7, 33),
            (6, 63),
            (9, 64),
            (3, 97),
        ] {
            let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
            let plane = values(h * w, (h * 131 + w) as u64);
            let res = values(h * w, (h * 17 + w) as u64);
            // Two tile rows' worth of columns, this row's at an offset, as in a chunk.
            let (nt, off) = (2 * tw + 3, tw + 1);
            let mut scratch = vec![0f32; 24 * tw + 8];
            for ty in 0..th {
                let mut want = vec![f32::NAN; 16 * nt];
                let mut got = want.clone();
                let r = TileRow {
                    h,
                    w,
                    tw,
                    nt,
                    ty,
                    off,
                };
                input_row_body(&plane, r, &mut scratch, &mut want);
                input_row(&plane, r, &mut scratch, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "input {h}x{w} row {ty}");
                let m = values(16 * nt, (ty * 7 + w) as u64);
                for res in [None, Some(&res[..])] {
                    let mut want = vec![f32::NAN; h * w];
                    let mut got = want.clone();
                    output_row_body(&m, r, 0.25, &mut want, res, &mut scratch);
                    output_row(&m, r, 0.25, &mut got, res, &mut scratch);
                    assert_eq!(bits(&got), bits(&want), "output {h}x{w} row {ty}");
                }
            }
        }
    }
}
