//! Weights read where they are stored: the bytes of a memory-mapped safetensors file, in the
//! file's own precision, widened to f32 as the layer that keeps them reads them.
//!
//! Convolutions and linear layers on the CPU keep only a packed (or Winograd-transformed) copy
//! of their weights. Getting them as an f32 tensor first means one more fresh copy of every
//! weight — 3.4 GB for SD 1.5's UNet, whose every page the kernel must fault in and zero — that
//! lives only until it is packed. While a loader builds a model inside [`build_from`], those
//! layers pack from the mapped bytes instead; everywhere else they take their weights from the
//! `VarBuilder` as before.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::Result;

/// How the elements of a stored tensor are encoded (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
}

impl StoredDType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// The elements of a tensor as stored: `len` values of `dtype`, little-endian, at any
/// alignment (a safetensors file does not align its tensors). Widening half precision to f32
/// is exact, so packing from here gives the same bits as packing the widened tensor.
#[derive(Clone, Copy, Debug)]
pub struct WeightData<'a> {
    bytes: &'a [u8],
    dtype: StoredDType,
}

impl<'a> From<&'a [f32]> for WeightData<'a> {
    fn from(v: &'a [f32]) -> Self {
        Self {
            bytes: bytemuck::cast_slice(v),
            dtype: StoredDType::F32,
        }
    }
}

impl<'a> From<&'a Vec<f32>> for WeightData<'a> {
    fn from(v: &'a Vec<f32>) -> Self {
        v.as_slice().into()
    }
}

impl<'a> WeightData<'a> {
    /// `bytes` holds whole elements of `dtype`.
    pub fn new(bytes: &'a [u8], dtype: StoredDType) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            candle_core::bail!("{} bytes are not whole {dtype:?} elements", bytes.len());
        }
        Ok(Self { bytes, dtype })
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Elements `start..start + out.len()`, widened to f32.
    ///
    /// Panics if that range is outside the data.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let size = self.dtype.size();
        let src = &self.bytes[start * size..(start + out.len()) * size];
        match self.dtype {
            StoredDType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
                Ok(s) => out.copy_from_slice(s),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
            },
            StoredDType::F16 => widen::<half::f16>(src, out),
            StoredDType::BF16 => widen::<half::bf16>(src, out),
        }
    }

    /// Every element, widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.len()];
        self.read(0, &mut v);
        v
    }
}

/// Half-precision little-endian bytes to f32: the `half` crate's vectorised conversion (F16C on
/// x86) where the bytes are aligned for `H` on a little-endian machine, one element at a time
/// otherwise.
fn widen<H>(src: &[u8], out: &mut [f32])
where
    H: bytemuck::Pod + HalfBits,
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    if cfg!(target_endian = "little") {
        if let Ok(h) = bytemuck::try_cast_slice::<u8, H>(src) {
            h.convert_to_f32_slice(out);
            return;
        }
    }
    for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = H::widen(u16::from_le_bytes([c[0], c[1]]));
    }
}

trait HalfBits {
    fn widen(bits: u16) -> f32;
}

impl HalfBits for half::f16 {
    fn widen(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }
}

impl HalfBits for half::bf16 {
    fn widen(bits: u16) -> f32 {
        half::bf16::from_bits(bits).to_f32()
    }
}

/// A stored tensor: its shape and its elements.
#[derive(Clone, Debug)]
pub struct StoredTensor<'a> {
    pub shape: Vec<usize>,
    pub data: WeightData<'a>,
}

/// Tensors by full name (`down_blocks.0.resnets.0.conv1.weight`), as a checkpoint stores them.
pub trait StoredWeights: Send + Sync {
    /// The tensor `name`, if it is stored in a precision [`WeightData`] reads.
    fn tensor(&self, name: &str) -> Option<StoredTensor<'_>>;
}

/// A packed operand's values: computed here, or mapped from a cache of packed weights
/// ([`cached`]).
#[derive(Clone)]
pub(crate) enum Floats {
    Owned(Vec<f32>),
    Mapped {
        map: std::sync::Arc<memmap2::Mmap>,
        /// In floats from the start of the map (whose start is page-aligned).
        start: usize,
        len: usize,
    },
}

impl std::ops::Deref for Floats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Owned(v) => v,
            // The cache reader checked that the entry lies inside the map; the map's start is
            // page-aligned and entries start at multiples of 64 bytes, so the floats are aligned.
            Self::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[start * 4..(start + len) * 4])
            }
        }
    }
}

impl std::fmt::Debug for Floats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Owned(v) => write!(f, "Owned({} floats)", v.len()),
            Self::Mapped { start, len, .. } => write!(f, "Mapped({len} floats at {start})"),
        }
    }
}

/// Runs `f` with the thread-local `key` set to `value`, then restores it (also on panic).
fn with_local<V: 'static, T>(
    key: &'static std::thread::LocalKey<RefCell<Option<V>>>,
    value: Option<V>,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: 'static>(
        &'static std::thread::LocalKey<RefCell<Option<V>>>,
        Option<V>,
    );
    impl<V: 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            let prev = self.1.take();
            self.0.with(|s| *s.borrow_mut() = prev);
        }
    }
    let _restore = Restore(key, key.with(|s| s.replace(value)));
    f()
}

/// Packed weights kept in a file, so that a later start maps them instead of computing them
/// into fresh memory (which, on a virtual machine that hands freed memory back to its host, is
/// the slowest part of a start). One file per model, written in the order its constructor packs
/// (deterministic: constructors run on one thread), each entry a 64-byte header with its length
/// in floats, then the floats, padded to 64 bytes.
pub struct PackCache {
    mode: std::sync::Mutex<CacheMode>,
}

enum CacheMode {
    /// Entries are read from `map` at byte `at`.
    Replay {
        map: Arc<memmap2::Mmap>,
        at: usize,
        failed: bool,
    },
    /// Entries are appended to `out` (`Err` once a write failed).
    Record {
        out: std::io::Result<std::io::BufWriter<std::fs::File>>,
    },
}

const CACHE_MAGIC: &[u8; 16] = b"ip2p-packed-v1\0\0";
const CACHE_ALIGN: usize = 64;

impl PackCache {
    /// Replays the packed weights in `file`, if it starts as one of ours.
    pub fn open(file: &std::path::Path) -> Option<Self> {
        let f = std::fs::File::open(file).ok()?;
        // SAFETY: read-only; a cache file modified while mapped is undefined behaviour, as for
        // every memory-mapped checkpoint. Every entry's bounds are checked before use.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }.ok()?;
        (map.len() >= CACHE_ALIGN && &map[..16] == CACHE_MAGIC).then(|| Self {
            mode: std::sync::Mutex::new(CacheMode::Replay {
                map: Arc::new(map),
                at: CACHE_ALIGN,
                failed: false,
            }),
        })
    }

    /// Records packed weights into `file` (created or truncated).
    pub fn create(file: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Write;
        let mut out = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(file)?);
        out.write_all(CACHE_MAGIC)?;
        out.write_all(&[0u8; CACHE_ALIGN - 16])?;
        Ok(Self {
            mode: std::sync::Mutex::new(CacheMode::Record { out: Ok(out) }),
        })
    }

    /// Whether every entry was replayed from a cache that held exactly them, or written in full.
    pub fn finish(self) -> std::io::Result<()> {
        match self.mode.into_inner().unwrap_or_else(|e| e.into_inner()) {
            CacheMode::Replay { map, at, failed } => {
                if failed || at != map.len() {
                    return Err(std::io::Error::other("the cache does not match the model"));
                }
                Ok(())
            }
            CacheMode::Record { out } => out?.into_inner().map_err(|e| e.into_error())?.sync_all(),
        }
    }

    fn take<const N: usize>(
        &self,
        len: usize,
        make: impl FnOnce() -> [Vec<f32>; N],
    ) -> [Floats; N] {
        use std::io::Write;
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *mode {
            CacheMode::Replay { map, at, failed } => {
                let bytes = (len * 4).next_multiple_of(CACHE_ALIGN);
                let mut out = Vec::with_capacity(N);
                for _ in 0..N {
                    let ok = !*failed
                        && *at + CACHE_ALIGN + bytes <= map.len()
                        && map[*at..*at + 8] == (len as u64).to_le_bytes();
                    if !ok {
                        *failed = true;
                        break;
                    }
                    out.push(Floats::Mapped {
                        map: map.clone(),
                        start: (*at + CACHE_ALIGN) / 4,
                        len,
                    });
                    *at += CACHE_ALIGN + bytes;
                }
                match out.try_into() {
                    Ok(all) => all,
                    Err(_) => make().map(Floats::Owned),
                }
            }
            CacheMode::Record { out } => {
                let data = make();
                if let Ok(w) = out {
                    let mut write = || -> std::io::Result<()> {
                        for d in &data {
                            let mut header = [0u8; CACHE_ALIGN];
                            header[..8].copy_from_slice(&(d.len() as u64).to_le_bytes());
                            w.write_all(&header)?;
                            w.write_all(bytemuck::cast_slice(d))?;
                            let pad = (d.len() * 4).next_multiple_of(CACHE_ALIGN) - d.len() * 4;
                            w.write_all(&[0u8; CACHE_ALIGN][..pad])?;
                        }
                        Ok(())
                    };
                    if let Err(e) = write() {
                        *out = Err(e);
                    }
                }
                data.map(Floats::Owned)
            }
        }
    }
}

thread_local! {
    static CACHE: RefCell<Option<Arc<PackCache>>> = const { RefCell::new(None) };
}

/// Runs `f` (a model's constructor) with its packed weights replayed from or recorded into
/// `cache` (`None`: computed as usual); the previous cache is restored afterwards.
pub fn with_pack_cache<T>(cache: Option<Arc<PackCache>>, f: impl FnOnce() -> T) -> T {
    with_local(&CACHE, cache, f)
}

/// `N` packed operands of `len` floats each: from the cache of the model being built if it has
/// them, else `make()` (recorded into the cache if one is being written).
pub(crate) fn cached<const N: usize>(
    len: usize,
    make: impl FnOnce() -> [Vec<f32>; N],
) -> [Floats; N] {
    match CACHE.with(|s| s.borrow().clone()) {
        Some(c) => c.take(len, make),
        None => make().map(Floats::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly_at_any_alignment() {
        let vals = [0.0f32, -1.5, 65504.0, 6.1e-5, 3.0e-8, -0.333_251_95];
        for dtype in [StoredDType::F16, StoredDType::BF16, StoredDType::F32] {
            let mut bytes = vec![0u8];
            for &v in &vals {
                match dtype {
                    StoredDType::F16 => {
                        bytes.extend(half::f16::from_f32(v).to_bits().to_le_bytes())
                    }
                    StoredDType::BF16 => {
                        bytes.extend(half::bf16::from_f32(v).to_bits().to_le_bytes())
                    }
                    StoredDType::F32 => bytes.extend(v.to_le_bytes()),
                }
            }
            let want: Vec<f32> = vals
                .iter()
                .map(|&v| match dtype {
                    StoredDType::F16 => half::f16::from_f32(v).to_f32(),
                    StoredDType::BF16 => half::bf16::from_f32(v).to_f32(),
                    StoredDType::F32 => v,
                })
                .collect();
            // Offset 1: unaligned; offset 0 of a copy: aligned (the vectorised path).
            let unaligned = WeightData::new(&bytes[1..], dtype).expect("whole elements");
            let mut words = vec![0u32; bytes.len() / 4 + 1];
            let aligned_bytes =
                &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len() - 1];
            aligned_bytes.copy_from_slice(&bytes[1..]);
            let aligned = WeightData::new(aligned_bytes, dtype).expect("whole elements");
            for d in [unaligned, aligned] {
                assert_eq!(d.len(), vals.len());
                assert_eq!(d.to_f32_vec(), want, "{dtype:?}");
                let mut mid = [0f32; 3];
                d.read(2, &mut mid);
                assert_eq!(mid, want[2..5], "{dtype:?}");
            }
        }
        assert!(WeightData::new(&[0u8; 3], StoredDType::F16).is_err());
    }
}
