//! Single-precision matrix products for inference on the CPU.
//!
//! BLIS-style: operands are packed into micro-panels (or were packed once at load, for weights),
//! the output is cut into cache-sized blocks that rayon spreads over the cores, and a
//! register-tiled micro-kernel does the arithmetic. The micro-kernel is picked once per process
//! from what the CPU offers: AVX-512 (12 × 32 tile, 24 accumulators in zmm registers), AVX2+FMA
//! (6 × 16), or portable code. The gemm crate's AVX-512 kernels need a nightly compiler, and
//! its AVX2 kernel reaches about half of this project's reference CPU's peak.
//!
//! `C[m×n] = α·A[m×k]·B[k×n] (+ C) (+ row bias) (+ column bias)`, C row-major with a row stride.
//! The k sum is blocked by [`KC`]; rounding therefore differs from a single long sum only as any
//! blocked BLAS differs.

// Raw-pointer arithmetic is the whole of this module; each `unsafe fn` states its contract.
#![allow(unsafe_op_in_unsafe_fn)]

use rayon::prelude::*;

use crate::stored::{Floats, WeightData};

/// A buffer of `len` floats with unspecified contents, for an output that is written in full
/// before anything reads it: it skips the zero fill that `vec![0.0; len]` does on one thread
/// (hundreds of megabytes per UNet step, while the other cores wait).
///
/// # Safety
/// Every element is written (through raw pointers or the slice) before it is read.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.set_len(len);
    v
}

/// Depth of one packed block (the k extent a micro-kernel call sums over).
pub const KC: usize = 256;
/// Output rows per task (a multiple of every kernel's `mr`).
const MC: usize = 96;
/// Output columns per task (a multiple of every kernel's `nr`).
const NC: usize = 256;

/// One output tile's destination and epilogue.
struct Tile {
    c: *mut f32,
    rs_c: usize,
    /// Valid rows / columns of the tile (≤ mr / nr).
    m: usize,
    n: usize,
    alpha: f32,
    /// Add the current contents of C.
    load_c: bool,
    /// Per-row bias (already offset to the tile's first row), or null.
    row_bias: *const f32,
    /// Per-column bias (already offset to the tile's first column), or null.
    col_bias: *const f32,
}

type KernelFn = unsafe fn(kc: usize, a: *const f32, b: *const f32, t: &Tile);

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    f: KernelFn,
    name: &'static str,
}

fn kernel() -> Kernel {
    static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("IP2P_NO_AVX512").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
            {
                return Kernel {
                    mr: 12,
                    nr: 32,
                    f: x86::k12x32_avx512,
                    name: "avx512 12x32",
                };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel {
                    mr: 6,
                    nr: 16,
                    f: x86::k6x16_avx2,
                    name: "avx2 6x16",
                };
            }
        }
        Kernel {
            mr: 4,
            nr: 16,
            f: generic_kernel::<4, 16>,
            name: "portable 4x16",
        }
    })
}

/// The block sizes of a product: rows and columns of C per task, depth of one packed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub mc: usize,
    pub nc: usize,
    pub kc: usize,
}

/// The blocks this process uses (for benchmark reports).
pub fn blocks() -> Blocks {
    Blocks {
        mc: MC,
        nc: NC,
        kc: KC,
    }
}

/// The micro-kernel this process uses (for benchmark reports).
pub fn kernel_name() -> &'static str {
    kernel().name
}

/// Portable micro-kernel: the compiler vectorises the fixed-size accumulator.
///
/// # Safety
/// `a` holds `kc·MR` packed values, `b` holds `kc·NR`; the tile's `m × n` C elements (and the
/// biases it points to) are valid.
#[inline(always)]
unsafe fn generic_kernel<const MR: usize, const NR: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    t: &Tile,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        let ap = std::slice::from_raw_parts(a.add(p * MR), MR);
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] = ap[i].mul_add(bp[j], acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(t.m) {
        let c = t.c.add(i * t.rs_c);
        let rb = if t.row_bias.is_null() {
            0.0
        } else {
            *t.row_bias.add(i)
        };
        for (j, &v) in row.iter().enumerate().take(t.n) {
            let mut v = v * t.alpha + rb;
            if !t.col_bias.is_null() {
                v += *t.col_bias.add(j);
            }
            if t.load_c {
                v += *c.add(j);
            }
            *c.add(j) = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::generic_kernel`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn k6x16_avx2(kc: usize, a: *const f32, b: *const f32, t: &Tile) {
        super::generic_kernel::<6, 16>(kc, a, b, t)
    }

    /// 12 × 32 tile: 24 zmm accumulators, two B vectors and one broadcast per step.
    ///
    /// # Safety
    /// As [`super::generic_kernel`] with MR = 12, NR = 32; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn k12x32_avx512(kc: usize, a: *const f32, b: *const f32, t: &Tile) {
        if t.load_c {
            // The tile's rows are far apart: start fetching them now, not at the end.
            for i in 0..12 {
                if i < t.m {
                    let p = t.c.add(i * t.rs_c) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(p);
                    _mm_prefetch::<_MM_HINT_T0>(p.add(64));
                }
            }
        }
        let mut c0 = [_mm512_setzero_ps(); 12];
        let mut c1 = [_mm512_setzero_ps(); 12];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for i in 0..12 {
                let ai = _mm512_set1_ps(*a.add(i));
                c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
                c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
            }
            a = a.add(12);
            b = b.add(32);
        }
        let n = t.n;
        let m0: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
        let m1: __mmask16 = if n >= 32 {
            0xffff
        } else if n > 16 {
            (1u16 << (n - 16)) - 1
        } else {
            0
        };
        let alpha = _mm512_set1_ps(t.alpha);
        let (cb0, cb1) = if t.col_bias.is_null() {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            (
                _mm512_maskz_loadu_ps(m0, t.col_bias),
                _mm512_maskz_loadu_ps(m1, t.col_bias.add(16)),
            )
        };
        for i in 0..12 {
            if i < t.m {
                let p = t.c.add(i * t.rs_c);
                let mut v0 = _mm512_fmadd_ps(c0[i], alpha, cb0);
                let mut v1 = _mm512_fmadd_ps(c1[i], alpha, cb1);
                if !t.row_bias.is_null() {
                    let rb = _mm512_set1_ps(*t.row_bias.add(i));
                    v0 = _mm512_add_ps(v0, rb);
                    v1 = _mm512_add_ps(v1, rb);
                }
                if t.load_c {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
                }
                _mm512_mask_storeu_ps(p, m0, v0);
                _mm512_mask_storeu_ps(p.add(16), m1, v1);
            }
        }
    }
}

/// A matrix operand read in place: element `(i, j)` is at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// The left operand A `[m × k]`.
#[derive(Clone, Copy)]
pub(crate) enum A<'a> {
    Strided(Strided),
    Packed(&'a PackedA),
}

/// The right operand B `[k × n]`.
#[derive(Clone, Copy)]
pub(crate) enum B<'a> {
    Strided(Strided),
    /// Row `p` starts at `ptr + rows[p]` and is contiguous (an implicit im2col: a convolution's
    /// shifted input planes).
    Rows {
        ptr: *const f32,
        rows: &'a [usize],
    },
    Packed(&'a PackedB),
    /// One panel already in packed layout: `[k][nr]` row-major, `n ≤ nr` (see [`nr`]).
    Panel(*const f32),
}

/// What packed operands' layout depends on (the micro-kernel's panel sizes, the depth block),
/// for caches of packed weights.
pub fn layout_key() -> (usize, usize, usize) {
    let k = kernel();
    (k.mr, k.nr, KC)
}

/// The column width of a packed panel (the micro-kernel's `nr`).
pub fn nr() -> usize {
    kernel().nr
}

/// Operands at least this large are packed in parallel.
const PARALLEL_PACK: usize = 1 << 18;
/// Panels per parallel packing task.
const PACK_GROUP: usize = 8;

/// A left operand packed once (weights): per k block, `mr`-row panels.
#[derive(Debug, Clone)]
pub struct PackedA {
    m: usize,
    k: usize,
    mr: usize,
    data: Floats,
}

/// A right operand packed once (weights): per k block, `nr`-column panels.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    nr: usize,
    data: Floats,
}

impl PackedA {
    /// Packs `A[m×k]` read through `s`.
    ///
    /// # Safety
    /// Every element `(i < m, p < k)` of `s` is readable.
    pub(crate) unsafe fn new(m: usize, k: usize, s: Strided) -> Self {
        let mr = kernel().mr;
        let data = pack_whole(k, m, mr, |p0, kc, i0, rows, dst| {
            pack_a(s, i0, rows, p0, kc, mr, dst)
        });
        Self {
            m,
            k,
            mr,
            data: Floats::Owned(data),
        }
    }

    /// From a row-major `[m, k]` slice.
    pub fn from_rows(m: usize, k: usize, a: &[f32]) -> Self {
        Self::from_data(m, k, a.into())
    }

    /// From row-major `[m, k]` elements as stored (a weight, widened as it is packed).
    pub(crate) fn from_data(m: usize, k: usize, a: WeightData) -> Self {
        assert_eq!(a.len(), m * k, "PackedA::from_data: shape");
        let [p] = Self::pack_rows(m, k, |i, p0, out: &mut [[f32; KC]; 1]| {
            let kc = KC.min(k - p0);
            a.read(i * k + p0, &mut out[0][..kc]);
        });
        p
    }

    /// Packs `N` matrices `[m, k]` that are computed together, row segment by row segment:
    /// `rows(i, p0, out)` writes elements `p0..p0 + min(KC, k − p0)` of row `i` of matrix `ξ`
    /// to `out[ξ]` (Winograd's 16 transformed weights come from one 3×3 kernel each; N = 1
    /// packs a weight read from its stored form). Each packed matrix is written once, in
    /// parallel, with no intermediate copy.
    pub(crate) fn pack_rows<const N: usize>(
        m: usize,
        k: usize,
        rows: impl Fn(usize, usize, &mut [[f32; KC]; N]) + Sync,
    ) -> [Self; N] {
        let mr = kernel().mr;
        let len = m.div_ceil(mr) * mr * k;
        crate::stored::cached(len, || pack_panels(m, k, mr, rows)).map(|data| Self {
            m,
            k,
            mr,
            data,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// The row-major `A [m, k]` this was packed from.
    pub(crate) fn to_rows(&self) -> Vec<f32> {
        let mut a = vec![0f32; self.m * self.k];
        for p0 in (0..self.k).step_by(KC) {
            let kc = KC.min(self.k - p0);
            for i in 0..self.m {
                let panel = self.panel(p0, kc, i / self.mr);
                for p in 0..kc {
                    // SAFETY: the panel holds kc·mr values.
                    a[i * self.k + p0 + p] = unsafe { *panel.add(p * self.mr + i % self.mr) };
                }
            }
        }
        a
    }

    /// The panel of rows `ip·mr..` in the block starting at `p0`.
    fn panel(&self, p0: usize, kc: usize, ip: usize) -> *const f32 {
        let mpad = self.m.div_ceil(self.mr) * self.mr;
        self.data[p0 * mpad + ip * self.mr * kc..].as_ptr()
    }
}

impl PackedB {
    /// Packs `B[k×n]` read through `s`.
    ///
    /// # Safety
    /// Every element `(p < k, j < n)` of `s` is readable.
    #[cfg(test)]
    pub(crate) unsafe fn new(k: usize, n: usize, s: Strided) -> Self {
        let nr = kernel().nr;
        let data = pack_whole(k, n, nr, |p0, kc, j0, cols, dst| {
            pack_b(B::Strided(s), p0, kc, j0, cols, nr, dst)
        });
        Self {
            k,
            n,
            nr,
            data: Floats::Owned(data),
        }
    }

    /// `Wᵀ` of a row-major weight `W [n, k]` (a linear layer's `[out, in]`).
    pub fn from_transposed(n: usize, k: usize, w: &[f32]) -> Self {
        Self::from_transposed_data(n, k, w.into())
    }

    /// `Wᵀ` of a row-major weight `W [n, k]` as stored (widened as it is packed).
    pub(crate) fn from_transposed_data(n: usize, k: usize, w: WeightData) -> Self {
        assert_eq!(w.len(), n * k, "PackedB::from_transposed_data: shape");
        let nr = kernel().nr;
        // Column j of Wᵀ is row j of W, and a B panel [kc][nr] of Wᵀ is an A panel of W.
        let len = n.div_ceil(nr) * nr * k;
        let [data] = crate::stored::cached(len, || {
            pack_panels(n, k, nr, |j, p0, out: &mut [[f32; KC]; 1]| {
                let kc = KC.min(k - p0);
                w.read(j * k + p0, &mut out[0][..kc]);
            })
        });
        Self { k, n, nr, data }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The row-major `W [n, k]` that [`PackedB::from_transposed`] was given.
    pub(crate) fn to_transposed(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for p0 in (0..self.k).step_by(KC) {
            let kc = KC.min(self.k - p0);
            for j in 0..self.n {
                let panel = self.panel(p0, kc, j / self.nr);
                for p in 0..kc {
                    // SAFETY: the panel holds kc·nr values.
                    w[j * self.k + p0 + p] = unsafe { *panel.add(p * self.nr + j % self.nr) };
                }
            }
        }
        w
    }

    fn panel(&self, p0: usize, kc: usize, jp: usize) -> *const f32 {
        let npad = self.n.div_ceil(self.nr) * self.nr;
        self.data[p0 * npad + jp * self.nr * kc..].as_ptr()
    }
}

/// A whole operand packed once: per depth block, `extent` rows (A) or columns (B) in panels of
/// `width`, groups of panels filled in parallel for large operands. `fill(p0, kc, start, len,
/// dst)` packs `len` rows/columns from `start` of the block at depth `p0`.
fn pack_whole(
    k: usize,
    extent: usize,
    width: usize,
    fill: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let pad = extent.div_ceil(width) * width;
    let mut data = vec![0f32; pad * k];
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        let block = &mut data[p0 * pad..(p0 + kc) * pad];
        if extent * k >= PARALLEL_PACK {
            block
                .par_chunks_mut(PACK_GROUP * width * kc)
                .enumerate()
                .for_each(|(g, dst)| {
                    let start = g * PACK_GROUP * width;
                    fill(p0, kc, start, (PACK_GROUP * width).min(extent - start), dst)
                });
        } else {
            fill(p0, kc, 0, extent, block);
        }
    }
    data
}

/// A buffer's pointer shared by parallel tasks (packers, the blocks of a product), each
/// writing its own disjoint part; nothing reads a part before its writer finished.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user hands each task a disjoint range to write (`pack_panels`: its panels;
// `run_item`: its panels of A and B) and waits for all of them before reading.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `N` operands packed together from their rows: per depth block of [`KC`], `extent` rows in
/// panels of `width` (`[kc][width]`, rows past `extent` zero) — `PackedA`'s layout, and
/// `PackedB`'s for the transpose. `rows(i, p0, out)` gives elements `p0..p0 + kc` of row `i` of
/// each operand. Tasks of [`PACK_GROUP`] panels of one depth block run in parallel; every
/// element is written exactly once (no zero fill first).
fn pack_panels<const N: usize>(
    extent: usize,
    k: usize,
    width: usize,
    rows: impl Fn(usize, usize, &mut [[f32; KC]; N]) + Sync,
) -> [Vec<f32>; N] {
    let pad = extent.div_ceil(width) * width;
    let len = pad * k;
    let mut bufs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::with_capacity(len));
    let outs: [SharedOut; N] = std::array::from_fn(|x| SharedOut(bufs[x].as_mut_ptr()));
    let panels = pad / width;
    let groups = panels.div_ceil(PACK_GROUP);
    let task = |t: usize| {
        let (blk, g) = (t / groups, t % groups);
        let p0 = blk * KC;
        let kc = KC.min(k - p0);
        let mut seg = [[0f32; KC]; N];
        for ip in g * PACK_GROUP..panels.min((g + 1) * PACK_GROUP) {
            // Panel ip of block blk: [kc][width] at p0·pad + ip·width·kc.
            let base = p0 * pad + ip * width * kc;
            for r in 0..width {
                let i = ip * width + r;
                if i < extent {
                    rows(i, p0, &mut seg);
                } else {
                    seg.iter_mut().for_each(|s| s[..kc].fill(0.0));
                }
                for (out, s) in outs.iter().zip(&seg) {
                    for (p, &v) in s[..kc].iter().enumerate() {
                        // SAFETY: base + p·width + r < (p0 + kc)·pad ≤ len; each (block,
                        // panel, p, r) is written by this task only.
                        unsafe { *out.0.add(base + p * width + r) = v };
                    }
                }
            }
        }
    };
    let tasks = k.div_ceil(KC) * groups;
    if len * N >= PARALLEL_PACK {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    for b in &mut bufs {
        // SAFETY: the tasks above wrote all `len` elements (every row of every panel of every
        // depth block, padding rows as zeros).
        unsafe { b.set_len(len) };
    }
    bufs
}

/// Packs rows `i0..i0+mc`, depth `p0..p0+kc` of A into `mr`-row panels `[kc][mr]`
/// (rows past `mc` are zero).
unsafe fn pack_a(
    s: Strided,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    for (ip, panel) in dst.chunks_mut(mr * kc).take(mc.div_ceil(mr)).enumerate() {
        let rows = mr.min(mc - ip * mr);
        for r in 0..rows {
            let src = s.ptr.add((i0 + ip * mr + r) * s.rs + p0 * s.cs);
            if s.cs == 1 {
                for p in 0..kc {
                    panel[p * mr + r] = *src.add(p);
                }
            } else {
                for p in 0..kc {
                    panel[p * mr + r] = *src.add(p * s.cs);
                }
            }
        }
        for r in rows..mr {
            for p in 0..kc {
                panel[p * mr + r] = 0.0;
            }
        }
    }
}

/// `out[..n] = src[..n]`: whole panel rows (16 or 32 floats) by fixed-size copies the compiler
/// inlines as vector moves, instead of a `memcpy` call per row (7 % of a VAE encode went to
/// those calls' overhead when the Winograd products packed their operands).
///
/// # Safety
/// `src` holds `n` readable floats.
#[inline(always)]
unsafe fn copy_row(src: *const f32, out: &mut [f32], n: usize) {
    match (n, out.len()) {
        (32, 32) => *(out.as_mut_ptr() as *mut [f32; 32]) = *(src as *const [f32; 32]),
        (16, 16) => *(out.as_mut_ptr() as *mut [f32; 16]) = *(src as *const [f32; 16]),
        _ => out[..n].copy_from_slice(std::slice::from_raw_parts(src, n)),
    }
}

/// Packs depth `p0..p0+kc`, columns `j0..j0+nc` of B into `nr`-column panels `[kc][nr]`
/// (columns past `nc` are zero).
unsafe fn pack_b(b: B, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
    for (jp, panel) in dst.chunks_mut(nr * kc).take(nc.div_ceil(nr)).enumerate() {
        let cols = nr.min(nc - jp * nr);
        let jj = j0 + jp * nr;
        for p in 0..kc {
            let out = &mut panel[p * nr..(p + 1) * nr];
            match b {
                B::Strided(s) if s.cs == 1 => {
                    let src = s.ptr.add((p0 + p) * s.rs + jj);
                    copy_row(src, out, cols);
                }
                B::Strided(s) => {
                    let src = s.ptr.add((p0 + p) * s.rs + jj * s.cs);
                    for (j, o) in out[..cols].iter_mut().enumerate() {
                        *o = *src.add(j * s.cs);
                    }
                }
                B::Rows { ptr, rows } => copy_row(ptr.add(rows[p0 + p] + jj), out, cols),
                B::Packed(_) | B::Panel(_) => unreachable!("packed operands are not repacked"),
            }
            out[cols..].fill(0.0);
        }
    }
}

/// What to do with the product besides storing it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<'a> {
    pub alpha: f32,
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    /// `[m]`, added to every row.
    pub row_bias: Option<&'a [f32]>,
    /// `[n]`, added to every column.
    pub col_bias: Option<&'a [f32]>,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            accumulate: false,
            row_bias: None,
            col_bias: None,
        }
    }
}

/// One product of a batch: operands and output of item `bi`.
pub(crate) struct Problem<'a> {
    pub a: A<'a>,
    pub b: B<'a>,
    pub c: *mut f32,
    pub rs_c: usize,
}

// SAFETY: operands are only read, and tasks write disjoint tiles of C; the callers of
// `gemm`/`gemm_batch` vouch for the pointers (see their contracts).
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}
unsafe impl Send for B<'_> {}
unsafe impl Sync for B<'_> {}
unsafe impl Send for Problem<'_> {}
unsafe impl Sync for Problem<'_> {}

thread_local! {
    /// Packing buffers of the thread that runs a product (reused: no page faults per call).
    static PACK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Below this many multiply-adds per item, a batch runs its items in parallel (each on one
/// core) instead of spreading each item over the cores.
const SMALL_ITEM: usize = 1 << 24;

/// `C = A · B` on row-major slices (`A` is `m × k`, `B` is `k × n`, `C` is `m × n` and is
/// overwritten): the safe form of [`gemm`].
///
/// # Panics
/// If a slice is shorter than its dimensions say.
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let st = |p: &[f32], rs: usize| Strided {
        ptr: p.as_ptr(),
        rs,
        cs: 1,
    };
    // SAFETY: the asserts above bound every element read or written; `c` is a unique borrow, so
    // it aliases neither operand.
    unsafe {
        gemm(
            m,
            n,
            k,
            A::Strided(st(a, k)),
            B::Strided(st(b, n)),
            c.as_mut_ptr(),
            n,
            Epilogue::default(),
        )
    };
}

/// `C = A · B` with both operands packed (`C` is `m × n`, row-major, overwritten).
///
/// # Panics
/// If the operands' inner dimensions differ or `c` is shorter than `m × n`.
pub fn matmul_packed(a: &PackedA, b: &PackedB, c: &mut [f32]) {
    assert!(a.k == b.k && c.len() >= a.m * b.n);
    // SAFETY: packed operands of dimensions (m, k) and (k, n); `c` holds m × n elements and is
    // a unique borrow.
    unsafe {
        gemm(
            a.m,
            b.n,
            a.k,
            A::Packed(a),
            B::Packed(b),
            c.as_mut_ptr(),
            b.n,
            Epilogue::default(),
        )
    };
}

/// `C = A · B` on row-major square `n × n` slices by the `gemm` crate (the comparison
/// `ip2p bench --only gemm` prints beside ours).
///
/// # Panics
/// If a slice is shorter than `n × n`.
pub fn matmul_gemm_crate(n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= n * n && b.len() >= n * n && c.len() >= n * n);
    let s = n as isize;
    // SAFETY: the asserts bound every access; row strides n, column strides 1; `c` is unique.
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            s,
            false,
            a.as_ptr(),
            1,
            s,
            b.as_ptr(),
            1,
            s,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    };
}

/// `batch` products of the same shape.
///
/// # Safety
/// For every `bi < batch`, `item(bi)` returns operands whose elements `(i < m, p < k)` /
/// `(p < k, j < n)` are readable and a C whose `m × n` elements (row stride `rs_c`) are writable
/// and disjoint from every other item's C and from every operand. Packed operands have
/// dimensions `(m, k)` / `(k, n)`.
pub(crate) unsafe fn gemm_batch<'a>(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
    item: &(dyn Fn(usize) -> Problem<'a> + Sync),
) {
    batch_items(batch, m, n, k, epi, item, false)
}

/// As [`gemm_batch`], but the items always run in parallel, each on one core, when there are
/// at least two per core (no synchronisation inside an item; for batches of many similar
/// items, e.g. a Winograd convolution's 16 products).
///
/// # Safety
/// As [`gemm_batch`].
pub(crate) unsafe fn gemm_batch_independent<'a>(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
    item: &(dyn Fn(usize) -> Problem<'a> + Sync),
) {
    batch_items(batch, m, n, k, epi, item, true)
}

unsafe fn batch_items<'a>(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
    item: &(dyn Fn(usize) -> Problem<'a> + Sync),
    independent: bool,
) {
    if m == 0 || n == 0 || batch == 0 {
        return;
    }
    let kern = kernel();
    let work = m * n * k;
    let threads = rayon::current_num_threads();
    let one = |bi: usize, parallel: bool| {
        PACK.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let (abuf, bbuf) = &mut *bufs;
            run_item(&kern, &item(bi), m, n, k, &epi, abuf, bbuf, parallel);
        })
    };
    if threads > 1 && batch >= 2 * threads && (work < SMALL_ITEM || independent) {
        (0..batch).into_par_iter().for_each(|bi| one(bi, false));
    } else {
        let parallel = threads > 1 && work >= 1 << 16;
        (0..batch).for_each(|bi| one(bi, parallel));
    }
}

/// One product (see [`gemm_batch`] for the contract).
///
/// # Safety
/// As [`gemm_batch`] with one item.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: A,
    b: B,
    c: *mut f32,
    rs_c: usize,
    epi: Epilogue,
) {
    let pr = &Problem { a, b, c, rs_c };
    gemm_batch(1, m, n, k, epi, &move |_| Problem { ..*pr });
}

/// One product computed entirely on the calling thread (for callers that parallelise
/// themselves, e.g. over attention heads and query blocks).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_local(
    m: usize,
    n: usize,
    k: usize,
    a: A,
    b: B,
    c: *mut f32,
    rs_c: usize,
    epi: Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    let kern = kernel();
    let pr = Problem { a, b, c, rs_c };
    PACK.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (abuf, bbuf) = &mut *bufs;
        run_item(&kern, &pr, m, n, k, &epi, abuf, bbuf, false);
    })
}

/// One product: per depth block, A and B are packed once (in parallel), then the output's
/// `MC × NC` blocks are computed (in parallel).
#[allow(clippy::too_many_arguments)]
unsafe fn run_item(
    kern: &Kernel,
    pr: &Problem,
    m: usize,
    n: usize,
    k: usize,
    epi: &Epilogue,
    abuf: &mut Vec<f32>,
    bbuf: &mut Vec<f32>,
    parallel: bool,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
    if k == 0 {
        // Nothing to sum: the epilogue alone.
        for i in 0..m {
            for j in 0..n {
                let c = pr.c.add(i * pr.rs_c + j);
                let mut v = if epi.accumulate { *c } else { 0.0 };
                v += epi.row_bias.map_or(0.0, |b| b[i]);
                v += epi.col_bias.map_or(0.0, |b| b[j]);
                *c = v;
            }
        }
        return;
    }
    let b_packed = matches!(pr.b, B::Packed(_) | B::Panel(_));
    if parallel && (b_packed || (m * n <= BY_BLOCKS_MAX_OUTPUT && np * nr * k <= WHOLE_B_MAX)) {
        run_item_by_blocks(kern, pr, m, n, k, epi, bbuf);
        return;
    }
    let kcmax = KC.min(k);
    // Depth blocks packed together in one round: each C block is then carried over all of
    // them while it is in cache (a C too large for L2 otherwise makes one round trip to
    // memory per depth block), with a fraction of the parallel rounds.
    let group = if b_packed {
        1
    } else {
        (GROUP_B_MAX / (np * nr * kcmax)).clamp(1, k.div_ceil(KC))
    };
    if matches!(pr.a, A::Strided(_)) && abuf.len() < mp * mr * kcmax * group {
        abuf.resize(mp * mr * kcmax * group, 0.0);
    }
    if let B::Panel(_) = pr.b {
        assert!(n <= nr, "sgemm: a single panel holds at most {nr} columns");
    }
    if !b_packed && bbuf.len() < np * nr * kcmax * group {
        bbuf.resize(np * nr * kcmax * group, 0.0);
    }
    let (ab, bb) = (SharedOut(abuf.as_mut_ptr()), SharedOut(bbuf.as_mut_ptr()));
    // Panels per packing task.
    const PACK_PANELS: usize = 8;
    let (mb, nb) = (m.div_ceil(MC), n.div_ceil(NC));
    let (ta, tb) = (mp.div_ceil(PACK_PANELS), np.div_ceil(PACK_PANELS));
    // Depth block `d` of a group is packed at `d·mp·mr·KC` (A) and `d·np·nr·KC` (B).
    let (a_stride, b_stride) = (mp * mr * KC, np * nr * KC);
    let depth: Vec<(usize, usize)> = (0..k).step_by(KC).map(|p0| (p0, KC.min(k - p0))).collect();
    for blocks in depth.chunks(group) {
        let pack_a_task = |t: usize| {
            if let A::Strided(s) = pr.a {
                let (d, t) = (t / ta, t % ta);
                let (p0, kc) = blocks[d];
                let ip0 = t * PACK_PANELS;
                let rows0 = ip0 * mr;
                let rows = (PACK_PANELS * mr).min(m - rows0);
                let dst = std::slice::from_raw_parts_mut(
                    { ab }.0.add(d * a_stride + ip0 * mr * kc),
                    rows.div_ceil(mr) * mr * kc,
                );
                pack_a(s, rows0, rows, p0, kc, mr, dst);
            }
        };
        let pack_b_task = |t: usize| {
            if !b_packed {
                let (d, t) = (t / tb, t % tb);
                let (p0, kc) = blocks[d];
                let jp0 = t * PACK_PANELS;
                let cols0 = jp0 * nr;
                let cols = (PACK_PANELS * nr).min(n - cols0);
                let dst = std::slice::from_raw_parts_mut(
                    { bb }.0.add(d * b_stride + jp0 * nr * kc),
                    cols.div_ceil(nr) * nr * kc,
                );
                pack_b(pr.b, p0, kc, cols0, cols, nr, dst);
            }
        };
        let block = |t: usize| {
            let (ib, jb) = (t / nb, t % nb);
            let (i0, j0) = (ib * MC, jb * NC);
            let (mc, nc) = (MC.min(m - i0), NC.min(n - j0));
            for (d, &(p0, kc)) in blocks.iter().enumerate() {
                let first = p0 == 0;
                for ip in i0 / mr..(i0 + mc).div_ceil(mr) {
                    let ap = match pr.a {
                        A::Packed(pa) => pa.panel(p0, kc, ip),
                        A::Strided(_) => { ab }.0.add(d * a_stride + ip * mr * kc) as *const f32,
                    };
                    let gi = ip * mr;
                    let rows = mr.min(m - gi);
                    for jp in j0 / nr..(j0 + nc).div_ceil(nr) {
                        let bp = match pr.b {
                            B::Packed(pb) => pb.panel(p0, kc, jp),
                            B::Panel(ptr) => ptr.add(p0 * nr),
                            _ => { bb }.0.add(d * b_stride + jp * nr * kc) as *const f32,
                        };
                        let gj = jp * nr;
                        let tile = Tile {
                            c: pr.c.add(gi * pr.rs_c + gj),
                            rs_c: pr.rs_c,
                            m: rows,
                            n: nr.min(n - gj),
                            alpha: epi.alpha,
                            load_c: !first || epi.accumulate,
                            row_bias: match epi.row_bias {
                                Some(b) if first => b.as_ptr().add(gi),
                                _ => std::ptr::null(),
                            },
                            col_bias: match epi.col_bias {
                                Some(b) if first => b.as_ptr().add(gj),
                                _ => std::ptr::null(),
                            },
                        };
                        (kern.f)(kc, ap, bp, &tile);
                    }
                }
            }
        };
        let (pa, pb) = (ta * blocks.len(), tb * blocks.len());
        if parallel {
            (0..pa + pb).into_par_iter().for_each(|t| {
                if t < pa {
                    pack_a_task(t)
                } else {
                    pack_b_task(t - pa)
                }
            });
            (0..mb * nb).into_par_iter().for_each(block);
        } else {
            (0..pa).for_each(pack_a_task);
            (0..pb).for_each(pack_b_task);
            (0..mb * nb).for_each(block);
        }
    }
}

/// Largest packed B (floats) of one depth group in [`run_item`] (4 MiB).
const GROUP_B_MAX: usize = 1 << 20;

/// Largest right operand (in floats, padded) that [`run_item_by_blocks`] packs whole.
const WHOLE_B_MAX: usize = 4 << 20;
/// At most this many rows of A make one row block in [`run_item_by_blocks`].
const FEW_ROWS: usize = 2 * MC;
/// Largest A (floats, padded) taken as one row block of [`FEW_ROWS`]: measured on the text
/// encoder's shapes (154 × 768 → 3072: 247 → 285 GFLOP/s; 154 × 3072 → 768: 265 → 292) and the
/// UNet's innermost (48 × 1280 → 1280: 215 → 250), unchanged within noise at 192 × 1280.
const FEW_ROWS_A_MAX: usize = 1 << 19;
/// Widest column block (in panels) of a [`FEW_ROWS`] product.
const WIDE_PANELS: usize = 12;
/// Largest packed block of A (floats) that [`run_item_by_blocks`] keeps for the whole depth
/// (a quarter of a 2 MiB L2, beside a depth block of B's columns and the C tiles).
const A_WHOLE_MAX: usize = 1 << 17;
/// Largest output computed by [`run_item_by_blocks`] when B has to be packed whole first (not
/// packed at load): measured on the models' shapes (`linear_shapes` below), it wins where a
/// depth block holds little work (the text encoder's 154 × 768 outputs, cross-attention's
/// 231 × 320, 48 × 1280) and loses a little on larger outputs, where sharing A's packing
/// between column blocks matters more. With B packed at load (every linear layer) it is always
/// taken: A's rows then stay in L2 for the whole depth, and it measured 10–40 % faster on every
/// UNet shape at 512 px (12288 × 320 → 320: 200 → 250 GFLOP/s; 768 × 2560 → 640: 215 → 296).
const BY_BLOCKS_MAX_OUTPUT: usize = 1 << 17;

thread_local! {
    /// A task's packed block of A in [`run_item_by_blocks`].
    static A_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One product as independent output blocks: B is packed whole first (unless it already is),
/// then each task computes one block of C over the whole depth, packing its own rows of A: two
/// parallel rounds in all, instead of two per depth block. For products whose B is small or
/// packed at load (linear layers, convolutions on small maps), where the per-block rounds'
/// synchronisation costs more than sharing A's packing saves. Blocks are balanced: the rows
/// (columns) are cut into as few blocks of at most `MC` (`NC`) as cover them, of equal size
/// up to a panel.
#[allow(clippy::too_many_arguments)]
unsafe fn run_item_by_blocks(
    kern: &Kernel,
    pr: &Problem,
    m: usize,
    n: usize,
    k: usize,
    epi: &Epilogue,
    bbuf: &mut Vec<f32>,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let npad = n.div_ceil(nr) * nr;
    let depth: Vec<(usize, usize)> = (0..k).step_by(KC).map(|p0| (p0, KC.min(k - p0))).collect();
    if !matches!(pr.b, B::Packed(_) | B::Panel(_)) {
        if bbuf.len() < npad * k {
            bbuf.resize(npad * k, 0.0);
        }
        // Laid out as a PackedB: block p0 at p0·npad, panel jp of it at jp·nr·kc.
        let groups = n.div_ceil(nr * PACK_GROUP);
        let bb = SharedOut(bbuf.as_mut_ptr());
        (0..depth.len() * groups).into_par_iter().for_each(|t| {
            let (p0, kc) = depth[t / groups];
            let j0 = (t % groups) * nr * PACK_GROUP;
            let cols = (nr * PACK_GROUP).min(n - j0);
            let dst = std::slice::from_raw_parts_mut(
                { bb }.0.add(p0 * npad + j0 * kc),
                cols.div_ceil(nr) * nr * kc,
            );
            pack_b(pr.b, p0, kc, j0, cols, nr, dst);
        });
    }
    let bb = SharedOut(bbuf.as_mut_ptr());
    let balanced = |len: usize, max: usize, unit: usize| {
        let blocks = len.div_ceil(max);
        (
            len.div_ceil(blocks).div_ceil(unit) * unit,
            len.div_ceil(len.div_ceil(blocks).div_ceil(unit) * unit),
        )
    };
    let threads = rayon::current_num_threads();
    let (mc, mb, ncb, nbb) = if m <= FEW_ROWS && m.div_ceil(mr) * mr * k <= FEW_ROWS_A_MAX {
        // Few rows (the text encoder's 154 tokens, the UNet's innermost maps): one row block,
        // so B, streamed from memory, is read once; its columns are cut into a multiple of the
        // thread count of blocks at most `WIDE_PANELS` panels wide.
        let panels = n.div_ceil(nr);
        let mut nb = threads;
        while panels.div_ceil(nb) > WIDE_PANELS {
            nb += threads;
        }
        let ncb = panels.div_ceil(nb) * nr;
        (m.div_ceil(mr) * mr, 1, ncb, n.div_ceil(ncb))
    } else {
        let (mc, mb) = balanced(m, MC, mr);
        let (ncb, nbb) = balanced(n, NC, nr);
        (mc, mb, ncb, nbb)
    };
    // With enough row blocks to share out, a task takes all columns of its rows (A is packed
    // once per depth block); otherwise the column blocks are tasks of their own too.
    let nb = if mb >= 2 * threads { 1 } else { nbb };
    let task_cols = if nb == 1 { n } else { ncb };
    (0..mb * nb).into_par_iter().for_each(|t| {
        let (i0, j0) = ((t / nb) * mc, (t % nb) * ncb);
        let (rows, cols) = (mc.min(m - i0), task_cols.min(n - j0));
        A_BLOCK.with(|abuf| {
            let mut abuf = abuf.borrow_mut();
            let apad = rows.div_ceil(mr) * mr;
            // A's rows for the whole depth stay in L2 when they fit: then each column block's
            // C tiles are finished over every depth block while they are still in cache.
            let whole_a = match pr.a {
                A::Packed(_) => true,
                A::Strided(_) => apad * k <= A_WHOLE_MAX,
            };
            if let A::Strided(s) = pr.a {
                let need = if whole_a { apad * k } else { apad * KC.min(k) };
                if abuf.len() < need {
                    abuf.resize(need, 0.0);
                }
                if whole_a {
                    for &(p0, kc) in &depth {
                        pack_a(s, i0, rows, p0, kc, mr, &mut abuf[p0 * apad..]);
                    }
                }
            }
            let tiles = |abuf: &[f32], first: bool, p0: usize, kc: usize, jb0: usize| {
                let row_panels = rows.div_ceil(mr);
                for ip in 0..row_panels {
                    let ap = match pr.a {
                        A::Packed(pa) => pa.panel(p0, kc, i0 / mr + ip),
                        A::Strided(_) if whole_a => abuf.as_ptr().add(p0 * apad + ip * mr * kc),
                        A::Strided(_) => abuf.as_ptr().add(ip * mr * kc),
                    };
                    let gi = i0 + ip * mr;
                    for jp in jb0 / nr..(jb0 + ncb).min(j0 + cols).div_ceil(nr) {
                        let bp = match pr.b {
                            B::Packed(pb) => pb.panel(p0, kc, jp),
                            B::Panel(ptr) => ptr.add(p0 * nr),
                            _ => { bb }.0.add(p0 * npad + jp * nr * kc) as *const f32,
                        };
                        let gj = jp * nr;
                        let tile = Tile {
                            c: pr.c.add(gi * pr.rs_c + gj),
                            rs_c: pr.rs_c,
                            m: mr.min(m - gi),
                            n: nr.min(n - gj),
                            alpha: epi.alpha,
                            load_c: !first || epi.accumulate,
                            row_bias: match epi.row_bias {
                                Some(b) if first => b.as_ptr().add(gi),
                                _ => std::ptr::null(),
                            },
                            col_bias: match epi.col_bias {
                                Some(b) if first => b.as_ptr().add(gj),
                                _ => std::ptr::null(),
                            },
                        };
                        (kern.f)(kc, ap, bp, &tile);
                    }
                }
            };
            if whole_a {
                for jb0 in (j0..j0 + cols).step_by(ncb) {
                    for (d, &(p0, kc)) in depth.iter().enumerate() {
                        tiles(&abuf, d == 0, p0, kc, jb0);
                    }
                }
            } else {
                for (d, &(p0, kc)) in depth.iter().enumerate() {
                    if let A::Strided(s) = pr.a {
                        pack_a(s, i0, rows, p0, kc, mr, &mut abuf[..]);
                    }
                    for jb0 in (j0..j0 + cols).step_by(ncb) {
                        tiles(&abuf, d == 0, p0, kc, jb0);
                    }
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize) {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let rb = data(m, 3);
        let cb = data(n, 4);
        let want = reference(m, n, k, &a, &b);
        let tol = |w: f64| 1e-6 * (1.0 + 10.0 * (k as f64).sqrt()) * (1.0 + w.abs());
        let pa = PackedA::from_rows(m, k, &a);
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        let pb = PackedB::from_transposed(n, k, &bt);
        let sa = A::Strided(Strided {
            ptr: a.as_ptr(),
            rs: k,
            cs: 1,
        });
        let sb = B::Strided(Strided {
            ptr: b.as_ptr(),
            rs: n,
            cs: 1,
        });
        // Bᵀ read with strides: element (p, j) at bt[j·k + p].
        let tb = B::Strided(Strided {
            ptr: bt.as_ptr(),
            rs: 1,
            cs: k,
        });
        let rows: Vec<usize> = (0..k).map(|p| p * n).collect();
        let rb_b = B::Rows {
            ptr: b.as_ptr(),
            rows: &rows,
        };
        for (ai, av) in [sa, A::Packed(&pa)].into_iter().enumerate() {
            for (bi, bv) in [sb, B::Packed(&pb), tb, rb_b].into_iter().enumerate() {
                let mut c = vec![0.5f32; m * n];
                let epi = Epilogue {
                    alpha: 0.5,
                    accumulate: true,
                    row_bias: Some(&rb),
                    col_bias: Some(&cb),
                };
                unsafe { gemm(m, n, k, av, bv, c.as_mut_ptr(), n, epi) };
                for i in 0..m {
                    for j in 0..n {
                        let w = 0.5 + 0.5 * want[i * n + j] + rb[i] as f64 + cb[j] as f64;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - w).abs() <= tol(w),
                            "{m}x{n}x{k} a{ai} b{bi} ({i},{j}): {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 256),
            (13, 33, 257),
            (200, 400, 300),
            (37, 1000, 40),
            (400, 17, 600),
            (3, 5, 0),
            // B too large to pack whole: the per-depth-block rounds.
            (30, 4200, 1100),
            // Depth blocks packed in groups (three blocks of 1000 columns in one round).
            (150, 1000, 700),
        ] {
            check(m, n, k);
        }
    }

    #[test]
    fn weights_pack_alike_from_every_stored_form() {
        use crate::stored::StoredDType;
        // Ragged edges, several depth blocks, and one large enough to pack in parallel.
        for &(rows, k) in &[(1, 1), (13, 257), (37, 600), (700, 530)] {
            let w = data(rows * k, 7);
            let halves: Vec<u8> = w
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                .collect();
            let widened: Vec<f32> = w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let stored = WeightData::new(&halves, StoredDType::F16).expect("whole elements");
            // Through strided reads (the runtime path) and through the row packer.
            let a_strided = unsafe {
                PackedA::new(
                    rows,
                    k,
                    Strided {
                        ptr: widened.as_ptr(),
                        rs: k,
                        cs: 1,
                    },
                )
            };
            let b_strided = unsafe {
                PackedB::new(
                    k,
                    rows,
                    Strided {
                        ptr: widened.as_ptr(),
                        rs: 1,
                        cs: k,
                    },
                )
            };
            for a in [
                PackedA::from_rows(rows, k, &widened),
                PackedA::from_data(rows, k, stored),
            ] {
                assert_eq!(a.data[..], a_strided.data[..], "A {rows}x{k}");
            }
            for b in [
                PackedB::from_transposed(rows, k, &widened),
                PackedB::from_transposed_data(rows, k, stored),
            ] {
                assert_eq!(b.data[..], b_strided.data[..], "B {rows}x{k}");
                assert_eq!(b.to_transposed(), widened);
            }
        }
    }

    #[test]
    fn every_kernel_agrees() {
        // The dispatcher picks one kernel; the portable one must agree with it too.
        let (m, n, k) = (4, 16, 70);
        let a = data(m * k, 5);
        let b = data(k * n, 6);
        let mut pa = vec![0f32; k * 4];
        let mut pb = vec![0f32; k * 16];
        for p in 0..k {
            for i in 0..4 {
                pa[p * 4 + i] = a[i * k + p];
            }
            pb[p * 16..(p + 1) * 16].copy_from_slice(&b[p * n..(p + 1) * n]);
        }
        let mut c = vec![0f32; m * n];
        let t = Tile {
            c: c.as_mut_ptr(),
            rs_c: n,
            m,
            n,
            alpha: 1.0,
            load_c: false,
            row_bias: std::ptr::null(),
            col_bias: std::ptr::null(),
        };
        unsafe { generic_kernel::<4, 16>(k, pa.as_ptr(), pb.as_ptr(), &t) };
        let want = reference(m, n, k, &a, &b);
        for (g, w) in c.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
        }
    }
}

#[cfg(test)]
mod peak {
    #[test]
    #[ignore]
    fn kernel_peak_single_thread() {
        let k = super::kernel();
        let kc = 64;
        let a = vec![0.01f32; kc * k.mr];
        let b = vec![0.02f32; kc * k.nr];
        let mut c = vec![0f32; k.mr * k.nr];
        let t = super::Tile {
            c: c.as_mut_ptr(),
            rs_c: k.nr,
            m: k.mr,
            n: k.nr,
            alpha: 1.0,
            load_c: true,
            row_bias: std::ptr::null(),
            col_bias: std::ptr::null(),
        };
        let iters = 200_000;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            unsafe { (k.f)(kc, a.as_ptr(), b.as_ptr(), &t) };
        }
        let s = t0.elapsed().as_secs_f64();
        let flop = 2.0 * (kc * k.mr * k.nr) as f64 * iters as f64;
        eprintln!("{}: {:.1} GFLOP/s on one thread", k.name, flop / s / 1e9);
    }

    /// Linear-layer shapes of the text encoder and the UNet at 256 px (`x [m, k] · Wᵀ`, W
    /// packed): `cargo test --release -- --ignored linear_shapes --nocapture`.
    #[test]
    #[ignore]
    fn linear_shapes() {
        use super::*;
        for (m, k, n) in [
            (154, 768, 768),
            (154, 768, 3072),
            (154, 3072, 768),
            (3072, 320, 320),
            (3072, 320, 2560),
            (3072, 1280, 320),
            (231, 768, 320),
            (768, 640, 640),
            (768, 640, 5120),
            (768, 2560, 640),
            (192, 1280, 1280),
            (192, 5120, 1280),
            (48, 1280, 1280),
            (12288, 320, 320),
            (12288, 320, 2560),
            (12288, 1280, 320),
            (3072, 640, 640),
            (3072, 640, 5120),
            (3072, 2560, 640),
            (768, 1280, 1280),
            (768, 1280, 10240),
            (768, 5120, 1280),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
            // Several copies of the weight, used in turn, when IP2P_COLD_WEIGHTS is set: each
            // product then reads its weight from memory, as in a model, not from cache.
            let copies = if std::env::var_os("IP2P_COLD_WEIGHTS").is_some() {
                (256 << 20) / (4 * n * k) + 1
            } else {
                1
            };
            let pbs: Vec<PackedB> = (0..copies)
                .map(|_| PackedB::from_transposed(n, k, &w))
                .collect();
            let turn = std::cell::Cell::new(0usize);
            let c = vec![0f32; m * n];
            let run = || unsafe {
                let pb = &pbs[turn.get() % copies];
                turn.set(turn.get() + 1);
                gemm(
                    m,
                    n,
                    k,
                    A::Strided(Strided {
                        ptr: a.as_ptr(),
                        rs: k,
                        cs: 1,
                    }),
                    B::Packed(pb),
                    c.as_ptr() as *mut f32,
                    n,
                    Epilogue::default(),
                )
            };
            run();
            let reps = (2e9 / (2 * m * n * k) as f64).ceil() as usize;
            // The best of five rounds (this machine's neighbours add ±15 % noise).
            let s = (0..5)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps {
                        run();
                    }
                    t0.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            eprintln!(
                "{m}x{k}x{n}: {:.0} GFLOP/s",
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
