//! Device selection: CPU everywhere, CUDA when the crate is built with the `cuda` feature.

use candle_core::{DType, Device};

use crate::Result;

/// Which device to compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if compiled in and available, otherwise CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (auto, cpu, cuda, cuda:N)")),
        }
    }
}

/// Opens the chosen device. `Auto` takes the first CUDA device when the build has CUDA and
/// one can be opened, and otherwise the CPU, saying why in the log.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n)?,
        DeviceChoice::Auto => auto(),
    })
}

fn auto() -> Device {
    // `cuda_is_available` only says whether CUDA was compiled in: opening the device says
    // whether there is one (and a driver).
    if !candle_core::utils::cuda_is_available() {
        return Device::Cpu;
    }
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "no usable CUDA device: running on the CPU");
            Device::Cpu
        }
    }
}

/// One or more devices (`cpu`, `cuda:0,cuda:1`, …): the server runs one model worker on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceChoice>);

impl Default for DeviceList {
    fn default() -> Self {
        Self(vec![DeviceChoice::Auto])
    }
}

impl DeviceList {
    /// The first device (a single-device command's).
    pub fn first(&self) -> DeviceChoice {
        self.0.first().copied().unwrap_or_default()
    }
}

impl std::str::FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let v = s
            .split(',')
            .map(|d| d.trim().parse())
            .collect::<std::result::Result<Vec<DeviceChoice>, _>>()?;
        if v.is_empty() {
            return Err("no device named".into());
        }
        Ok(Self(v))
    }
}

/// A short label for metrics and logs: `cpu`, `cuda:0`.
pub fn label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The dtype models compute in on a device: f32 on CPU (f16 weights are widened at load), f16 on CUDA.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

/// Makes glibc's `malloc` keep freed memory for reuse instead of handing it back to the kernel.
///
/// Inference allocates and frees tens of megabytes per layer. By default glibc serves each
/// large block with a fresh `mmap` and unmaps it when freed, so every layer pays a page fault
/// (and the kernel's zeroing) per 4 KiB of its outputs: about 250 000 faults per UNet step at
/// 256 px, a tenth of the step's time. With `mmap` off and trimming off, a freed block is
/// reused by the next layer; the peak resident size does not change (it is set by what is
/// live at once). No effect on other C libraries. Call once, before the first allocation
/// worth keeping (binaries do it first thing in `main`).
#[allow(unsafe_code)] // named exception: allocator tuning (see lib.rs)
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
