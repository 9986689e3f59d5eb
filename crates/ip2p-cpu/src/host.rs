//! What this CPU is: vendor, model, SIMD features and cache sizes, read once per process.
//!
//! Every speed figure belongs to the CPU it was measured on, so `ip2p bench` prints this with
//! each line set; the matrix product sizes its blocks from the caches found here.

use std::sync::OnceLock;

/// The host CPU as the operating system describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `GenuineIntel`, `AuthenticAMD`, … (`unknown` when not found).
    pub vendor: String,
    /// The marketing name, e.g. `Intel(R) Xeon(R) Processor` (`unknown` when not found).
    pub model_name: String,
    /// CPUID family and model (0 when not found).
    pub family: u32,
    pub model: u32,
    /// Logical CPUs this process may run on.
    pub cpus: usize,
    /// Per-core level-1 data and level-2 cache, and the shared level-3 cache, in bytes (0 when
    /// not found).
    pub l1d: usize,
    pub l2: usize,
    pub l3: usize,
    /// The SIMD features the kernels care about that this CPU has.
    pub features: Vec<&'static str>,
}

/// The host, read on first use.
pub fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(Host::read)
}

impl Host {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_owned())
                })
        };
        let number = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let (l1d, l2, l3) = caches("/sys/devices/system/cpu/cpu0/cache");
        Self {
            vendor: field("vendor_id").unwrap_or_else(|| "unknown".into()),
            model_name: field("model name").unwrap_or_else(|| "unknown".into()),
            family: number("cpu family"),
            model: number("model"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            l1d,
            l2,
            l3,
            features: features(&field("flags").unwrap_or_default()),
        }
    }

    /// The vendor family in words: `intel`, `amd` or `other`.
    pub fn family_name(&self) -> &'static str {
        match self.vendor.as_str() {
            "GenuineIntel" => "intel",
            "AuthenticAMD" => "amd",
            _ => "other",
        }
    }
}

/// `(l1d, l2, l3)` in bytes from a sysfs `cache` folder (`index*/level`, `type`, `size`).
fn caches(dir: &str) -> (usize, usize, usize) {
    let (mut l1d, mut l2, mut l3) = (0, 0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0, 0);
    };
    for e in entries.flatten() {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        let size = parse_size(read("size").trim());
        match (read("level").trim(), read("type").trim()) {
            ("1", "Data" | "Unified") => l1d = size,
            ("2", _) => l2 = size,
            ("3", _) => l3 = size,
            _ => {}
        }
    }
    (l1d, l2, l3)
}

/// `48K`, `2048K`, `105M` → bytes (0 when unreadable).
fn parse_size(s: &str) -> usize {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = digits.parse().unwrap_or(0);
    match unit {
        "K" | "KB" | "KiB" => n << 10,
        "M" | "MB" | "MiB" => n << 20,
        "G" | "GB" | "GiB" => n << 30,
        _ => n,
    }
}

/// The SIMD features of interest; `flags` is `/proc/cpuinfo`'s flag list.
fn features(flags: &str) -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($name:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($name) {
                    f.push($name);
                })*
            };
        }
        check!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16"
        );
    }
    // AMX detection is unstable in std; the kernel's flag list says whether it is exposed.
    for (flag, name) in [("amx_tile", "amx-tile"), ("amx_bf16", "amx-bf16")] {
        if flags.split_whitespace().any(|x| x == flag) {
            f.push(name);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_size("48K"), 48 << 10);
        assert_eq!(parse_size("2048K"), 2 << 20);
        assert_eq!(parse_size("105M"), 105 << 20);
        assert_eq!(parse_size("512"), 512);
        assert_eq!(parse_size(""), 0);
        assert_eq!(parse_size("x"), 0);
    }

    #[test]
    fn the_host_is_described() {
        let h = host();
        assert!(h.cpus >= 1);
        assert!(!h.vendor.is_empty() && !h.model_name.is_empty());
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // Every x86-64 Linux host this project runs on reports its caches and AVX2.
            assert!(h.l1d >= 16 << 10 && h.l2 >= 256 << 10, "{h:?}");
            assert!(h.features.contains(&"avx2"), "{h:?}");
        }
    }
}
