//! Wall-clock time per kind of operation, for finding where a forward pass spends its time.
//!
//! Off unless `IP2P_PROFILE` is set (then a check of one atomic flag per operation); the bench
//! prints the table after each figure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn enabled() -> bool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| AtomicBool::new(std::env::var_os("IP2P_PROFILE").is_some()))
        .load(Ordering::Relaxed)
}

type Entry = (&'static str, AtomicU64, AtomicU64, AtomicU64);

fn table() -> &'static Mutex<Vec<Entry>> {
    static T: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(Vec::new()))
}

/// Times its scope under `name` when profiling is on.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
    flops: u64,
}

pub fn scope(name: &'static str) -> Scope {
    scope_flops(name, 0)
}

/// A scope that does `flops` floating-point operations (for GFLOP/s in the table).
pub(crate) fn scope_flops(name: &'static str, flops: u64) -> Scope {
    Scope {
        name,
        start: enabled().then(Instant::now),
        flops,
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some(t) = self.start else { return };
        let ns = t.elapsed().as_nanos() as u64;
        let mut tab = table().lock().unwrap_or_else(|e| e.into_inner());
        match tab.iter().find(|e| e.0 == self.name) {
            Some(e) => {
                e.1.fetch_add(ns, Ordering::Relaxed);
                e.2.fetch_add(1, Ordering::Relaxed);
                e.3.fetch_add(self.flops, Ordering::Relaxed);
            }
            None => tab.push((
                self.name,
                AtomicU64::new(ns),
                AtomicU64::new(1),
                AtomicU64::new(self.flops),
            )),
        }
    }
}

/// The accumulated `(name, seconds, calls, flops)` since the last call, which resets them
/// (empty when profiling is off).
pub fn take() -> Vec<(&'static str, f64, u64, u64)> {
    let mut tab = table().lock().unwrap_or_else(|e| e.into_inner());
    let out = tab
        .iter()
        .map(|e| {
            (
                e.0,
                e.1.load(Ordering::Relaxed) as f64 / 1e9,
                e.2.load(Ordering::Relaxed),
                e.3.load(Ordering::Relaxed),
            )
        })
        .collect();
    tab.clear();
    out
}
