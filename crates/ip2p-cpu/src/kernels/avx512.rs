//! AVX-512 helpers shared by the hand-vectorised kernels: rows of a plane 16 floats at a time,
//! with masks for a row's last, partial group and for the zero padding around it.

// Raw-pointer loads are the point of these helpers; each `unsafe fn` states its contract.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

/// Lanes `0..n` set.
#[inline(always)]
pub(super) fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// `src[c..c + 16]`, zero past `src.len()`.
///
/// # Safety
/// AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn load_upto(src: &[f32], c: usize) -> __m512 {
    let n = src.len().saturating_sub(c);
    if n == 0 {
        _mm512_setzero_ps()
    } else {
        _mm512_maskz_loadu_ps(lanes(n), src.as_ptr().add(c))
    }
}

/// `[src[i], v[0..15]]`: `v` one lane up, `src[i]` (zero outside `src`) shifted in.
///
/// # Safety
/// AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn shift_in_first(v: __m512, src: &[f32], i: usize) -> __m512 {
    let first = _mm512_set1_ps(src.get(i).copied().unwrap_or(0.0));
    _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
        _mm512_castps_si512(v),
        _mm512_castps_si512(first),
    ))
}

/// `[v[1..16], src[i]]`: `v` one lane down, `src[i]` (zero outside `src`) shifted in.
///
/// # Safety
/// AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn shift_in_last(v: __m512, src: &[f32], i: usize) -> __m512 {
    let last = _mm512_set1_ps(src.get(i).copied().unwrap_or(0.0));
    _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
        _mm512_castps_si512(last),
        _mm512_castps_si512(v),
    ))
}
