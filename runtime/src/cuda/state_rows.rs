//! The device work that reorders the batch rows of a persistent state in place
//! ([`crate::Session::gather_state_rows`]): `data.cu`'s gather copies the chosen rows of the
//! state into a scratch buffer, then its strided copy writes the scratch back over the state.
//! Rows may repeat (a beam kept twice), so the copy cannot go straight from the state to itself.

use super::lower::{bytes_of, Launch};
use kiln_kernels::cuda::{self as kc, CopyParams, GatherParams};

/// The widest element (8, 4, 2 or 1 bytes) that divides `row_bytes`: each thread moves one.
fn element(row_bytes: usize) -> usize {
    [8, 4, 2, 1].into_iter().find(|e| row_bytes.is_multiple_of(*e)).unwrap_or(1)
}

fn grid(units: usize) -> (u32, u32, u32) {
    (units.div_ceil(kc::BLOCK as usize).clamp(1, 65535 * 8) as u32, 1, 1)
}

/// The two launches that make `state` (`rows` rows of `row_bytes` each, at device address
/// `state`) hold, in row `r`, what row `idx[r]` held: gather into `scratch` (as large as the
/// state), then copy back. `idx` is the device address of `rows` i64 indices, `err` the
/// executor's error flag (an index outside `[0, rows)` sets it). Addresses are absolute, so
/// the launches carry no relocations.
pub(crate) fn launches(state: u64, scratch: u64, idx: u64, err: u64, rows: usize, row_bytes: usize) -> [Launch; 2] {
    let e = element(row_bytes);
    let inner = row_bytes / e;
    let n = rows * inner;
    let g = GatherParams { x: state, idx, out: scratch, err, outer: 1, len: rows as i64, nidx: rows as i64, inner: inner as i64 };
    let mut c = CopyParams { src: scratch, dst: state, n: n as i64, rank: 1, ..Default::default() };
    (c.dims[0], c.src_st[0], c.dst_st[0]) = (n as i64, 1, 1);
    let gather = Launch {
        module: "data".into(),
        kernel: format!("gather_b{e}_i64"),
        grid: grid(n),
        block: kc::BLOCK,
        smem: 0,
        params: bytes_of(&g),
        relocs: vec![],
    };
    let copy = Launch {
        module: "data".into(),
        kernel: format!("copy_b{e}"),
        grid: grid(n),
        block: kc::BLOCK,
        smem: 0,
        params: bytes_of(&c),
        relocs: vec![],
    };
    [gather, copy]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_kernels::cuda::nvrtc;

    /// The launches name kernels of the `data` module with parameter blocks of their structs'
    /// sizes, and that module compiles with NVRTC (skipped without libnvrtc unless
    /// KILN_REQUIRE_NVRTC=1).
    #[test]
    fn launches_name_compiled_kernels() {
        let module = kc::modules().into_iter().find(|m| m.name == "data").expect("data module");
        for (row_bytes, e) in [(4096, 8), (12, 4), (6, 2), (3, 1)] {
            let [g, c] = launches(0x1000, 0x2000, 0x3000, 0x4000, 4, row_bytes);
            assert_eq!(g.kernel, format!("gather_b{e}_i64"));
            assert_eq!(c.kernel, format!("copy_b{e}"));
            for l in [&g, &c] {
                assert!(module.kernels.iter().any(|k| k.name == l.kernel), "{} not in the data module", l.kernel);
            }
            assert_eq!(g.params.len(), std::mem::size_of::<GatherParams>());
            assert_eq!(c.params.len(), std::mem::size_of::<CopyParams>());
            // SAFETY: `params` holds a GatherParams' bytes (its length checked above).
            let p: GatherParams = unsafe { std::ptr::read_unaligned(g.params.as_ptr() as *const GatherParams) };
            assert_eq!((p.x, p.out, p.idx, p.len, p.nidx, p.inner), (0x1000, 0x2000, 0x3000, 4, 4, (row_bytes / e) as i64));
        }
        if !nvrtc::available() {
            let required = std::env::var("KILN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
            assert!(!required, "KILN_REQUIRE_NVRTC=1 but {}", nvrtc::INSTALL_HINT);
            eprintln!("skipped the NVRTC compile: {}", nvrtc::INSTALL_HINT);
            return;
        }
        nvrtc::compile(&module.name, &module.source, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
    }
}
