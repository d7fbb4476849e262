//! Memory checks before big allocations: a program that needs more than the machine has is an
//! error naming the sizes, never an allocation failure that aborts the process.

use crate::error::{Result, RuntimeError};

/// Bytes as a person reads them.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (b as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Memory the machine can still give this process: Linux's MemAvailable plus free swap (from
/// /proc/meminfo); `None` where that file is not there (then no check is made).
pub fn host_available() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((field("MemAvailable")? * 1024, field("SwapFree").unwrap_or(0) * 1024))
}

/// Refuses `need` bytes of host memory (`what` names them) when they exceed what the machine
/// has available (MemAvailable plus free swap).
pub fn check_host(what: &str, need: u64) -> Result<()> {
    let Some((avail, swap)) = host_available() else { return Ok(()) };
    if need > avail.saturating_add(swap) {
        return Err(RuntimeError::Memory(format!(
            "{what}: {} needed, more than this machine has available ({} of memory plus {} of free swap)",
            human(need),
            human(avail),
            human(swap)
        )));
    }
    Ok(())
}

/// A zeroed buffer of `len` elements, or an error naming `what` and the size when the
/// allocation cannot be met (instead of aborting).
pub fn try_zeroed<T: Copy + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| {
        let bytes = (len as u64).saturating_mul(std::mem::size_of::<T>() as u64);
        RuntimeError::Memory(format!("{what}: cannot allocate {} ({e})", human(bytes)))
    })?;
    v.resize(len, T::default());
    Ok(v)
}
