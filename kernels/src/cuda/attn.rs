//! Variants of the tensor-core prefill attention kernel (`attention_mma.cuh`, issue 15): each
//! changes one thing of the default `attn_mma_<t>_d<D>` and is named by suffixes in a fixed
//! order, `attn_mma_bf16_d72_q128_s3`. They live in modules of their own
//! (`attention_var_<t>`, from `attention_var.cu`), compiled only where a program needs them: a
//! tuning table names one, or a load measures them (`KILN_CUDA_TUNE=attention`).

/// One variant's flags (all off: the default kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AttnVariant {
    /// 128 query rows per block, 32 per warp as two m16 tiles (`_q128`).
    pub q128: bool,
    /// K and V of a key tile in separate cp.async groups through a ring of three tile slots
    /// (`_s3`), instead of both into the other of two buffers.
    pub s3: bool,
    /// The head dim unpadded: a k8 tail for QK and D/8 n-tiles for PV (`_np`; D % 16 == 8).
    pub np: bool,
    /// The output staged in shared memory and stored as 16-byte vectors (`_vs`).
    pub vs: bool,
    /// Key tiles of 32 rows instead of 64 (`_k32`; fewer score registers).
    pub k32: bool,
}

/// The flags' names in suffix order.
pub const ATTN_FLAGS: [&str; 5] = ["q128", "s3", "np", "vs", "k32"];

/// The variants `attention_var.cu` instantiates, per head dim (for bf16 and f16 alike): the
/// four single changes, and combinations of them that compile without spilling (the two m16
/// tiles per warp with two K+V buffers spill at 64-row key tiles, hence `_k32` there).
pub const ATTN_VARIANTS: &[(usize, &str)] = &[
    (72, "s3"),
    (72, "np"),
    (72, "vs"),
    (72, "q128_k32"),
    (72, "q128_s3"),
    (72, "s3_np_vs"),
    (72, "q128_np_vs_k32"),
    (72, "q128_s3_np_vs"),
];

impl AttnVariant {
    fn flags(self) -> [bool; 5] {
        [self.q128, self.s3, self.np, self.vs, self.k32]
    }

    /// Whether this is the default kernel.
    pub fn is_default(self) -> bool {
        self == AttnVariant::default()
    }

    /// The flags joined by `_` in suffix order (`q128_s3`), or `default`: a tuning table's choice.
    pub fn tag(self) -> String {
        let on: Vec<&str> = ATTN_FLAGS.iter().zip(self.flags()).filter(|(_, f)| *f).map(|(n, _)| *n).collect();
        if on.is_empty() {
            "default".into()
        } else {
            on.join("_")
        }
    }

    /// Reads a tag (`default`, or flags in suffix order, each once).
    pub fn parse(tag: &str) -> Option<AttnVariant> {
        if tag == "default" {
            return Some(AttnVariant::default());
        }
        let mut f = [false; 5];
        let mut next = 0;
        for part in tag.split('_') {
            let i = ATTN_FLAGS.iter().position(|n| *n == part)?;
            if i < next {
                return None; // out of order or repeated
            }
            f[i] = true;
            next = i + 1;
        }
        Some(AttnVariant { q128: f[0], s3: f[1], np: f[2], vs: f[3], k32: f[4] })
    }

    /// The kernel's name for dtype suffix `t` and head dim `d`.
    pub fn kernel(self, t: &str, d: usize) -> String {
        match self.is_default() {
            true => format!("attn_mma_{t}_d{d}"),
            false => format!("attn_mma_{t}_d{d}_{}", self.tag()),
        }
    }

    /// Reads a prefill kernel's name: (dtype suffix, head dim, variant).
    pub fn of_kernel(name: &str) -> Option<(&str, usize, AttnVariant)> {
        let rest = name.strip_prefix("attn_mma_")?;
        let (t, rest) = rest.split_once("_d")?;
        let (d, tag) = match rest.split_once('_') {
            Some((d, tag)) => (d, AttnVariant::parse(tag).filter(|v| !v.is_default())?),
            None => (rest, AttnVariant::default()),
        };
        matches!(t, "bf16" | "f16").then_some(())?;
        Some((t, d.parse().ok()?, tag))
    }

    /// Query rows per block.
    pub fn bq(self) -> usize {
        if self.q128 {
            128
        } else {
            64
        }
    }

    /// Key-tile rows for head dim `d`.
    pub fn bk(self, d: usize) -> usize {
        if self.k32 {
            32
        } else {
            super::mma_bk(d)
        }
    }

    /// Dynamic shared memory for head dim `d`, bytes: the query tile, then two buffers of K and
    /// V tiles, or a ring of three tiles (`attention_mma.cuh`); rows of the padded head dim + 8.
    pub fn smem(self, d: usize) -> usize {
        let ld = d.div_ceil(16) * 16 + 8;
        let tiles = if self.s3 { 3 } else { 4 };
        (self.bq() + tiles * self.bk(d)) * ld * 2
    }

    /// The module that defines the kernel for dtype suffix `t`.
    pub fn module(self, t: &str) -> String {
        match self.is_default() {
            true => "attention".into(),
            false => format!("attention_var_{t}"),
        }
    }
}

/// The variants instantiated for head dim `d` (the default not included).
pub fn attn_variants(d: usize) -> Vec<AttnVariant> {
    ATTN_VARIANTS.iter().filter(|(vd, _)| *vd == d).filter_map(|(_, tag)| AttnVariant::parse(tag)).collect()
}

/// Whether kernel `name` exists: a default prefill kernel or an instantiated variant.
pub fn attn_kernel_exists(name: &str) -> bool {
    AttnVariant::of_kernel(name)
        .is_some_and(|(_, d, v)| super::MMA_HEAD_DIMS.contains(&d) && (v.is_default() || attn_variants(d).contains(&v)))
}

/// The entry of the default prefill kernel `kernel` (`attn_mma_<t>_d<D>`) that also stores
/// the launch's keys and values into the caches (`attn_mma_new_<t>_d<D>`, `attention_mma.cuh`),
/// for the head dims with no variant: a load may run a variant in the default kernel's place
/// (`KILN_CUDA_TUNE=attention`, a tuning table), and no variant has such an entry.
pub fn mma_new_kernel(kernel: &str) -> Option<String> {
    let (t, d, v) = AttnVariant::of_kernel(kernel)?;
    let plain = v.is_default() && super::MMA_HEAD_DIMS.contains(&d) && attn_variants(d).is_empty();
    plain.then(|| format!("attn_mma_new_{t}_d{d}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_names_read_back() {
        for &(d, tag) in ATTN_VARIANTS {
            let v = AttnVariant::parse(tag).unwrap();
            assert_eq!(v.tag(), tag);
            assert!(!v.is_default());
            let name = v.kernel("bf16", d);
            assert_eq!(AttnVariant::of_kernel(&name), Some(("bf16", d, v)));
            assert!(attn_kernel_exists(&name) && attn_kernel_exists(&v.kernel("f16", d)), "{name}");
            assert_eq!(v.module("f16"), "attention_var_f16");
        }
        assert_eq!(AttnVariant::parse("default"), Some(AttnVariant::default()));
        assert_eq!(AttnVariant::of_kernel("attn_mma_bf16_d72"), Some(("bf16", 72, AttnVariant::default())));
        assert_eq!(AttnVariant::default().kernel("f16", 256), "attn_mma_f16_d256");
        assert_eq!(AttnVariant::parse("q128_s3").unwrap().kernel("bf16", 72), "attn_mma_bf16_d72_q128_s3");
        for bad in ["", "s3_q128", "q128_q128", "fast", "q128_", "default_s3"] {
            assert_eq!(AttnVariant::parse(bad), None, "{bad}");
        }
        for bad in ["attn_mma_bf16_d72_default", "attn_mma_f32_d72", "attn_mma_bf16_dx", "attn_rows_bf16"] {
            assert_eq!(AttnVariant::of_kernel(bad), None, "{bad}");
        }
        // Parsed, but not instantiated.
        assert!(!attn_kernel_exists("attn_mma_bf16_d64_s3") && !attn_kernel_exists("attn_mma_bf16_d72_k32"));
        assert!(!attn_kernel_exists("attn_mma_bf16_d80"));
    }

    #[test]
    fn the_storing_entries_are_the_head_dims_without_variants() {
        let att = super::super::modules().into_iter().find(|m| m.name == "attention").unwrap();
        let listed: Vec<&str> = att.kernels.iter().map(|k| k.name.as_str()).filter(|k| k.starts_with("attn_mma_new_")).collect();
        let mut want = Vec::new();
        for t in ["bf16", "f16"] {
            for d in super::super::MMA_HEAD_DIMS {
                let has = mma_new_kernel(&format!("attn_mma_{t}_d{d}"));
                assert_eq!(has.is_some(), attn_variants(d).is_empty(), "{t} d{d}");
                want.extend(has);
            }
        }
        assert_eq!(listed, want);
        assert_eq!(mma_new_kernel("attn_mma_bf16_d256").as_deref(), Some("attn_mma_new_bf16_d256"));
        assert!(att.kernels.iter().filter(|k| k.name.starts_with("attn_mma_new_")).all(|k| k.hot));
        for k in ["attn_mma_bf16_d72", "attn_mma_bf16_d72_s3", "attn_mma_new_bf16_d256", "attn_rows_bf16", "attn_mma_f32_d64"] {
            assert_eq!(mma_new_kernel(k), None, "{k}");
        }
    }

    /// Each storing entry compiles for sm_90a with no spill and no stack, and with no more
    /// registers than its default kernel (the same blocks per SM).
    #[cfg(feature = "cuda")]
    #[test]
    fn the_storing_entries_cost_no_registers() {
        use super::super::nvrtc;
        if !nvrtc::available() {
            assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "{}", nvrtc::INSTALL_HINT);
            return;
        }
        let att = super::super::modules().into_iter().find(|m| m.name == "attention").unwrap();
        let c = nvrtc::compile("attention", &att.source, "sm_90a").unwrap();
        let report =
            |k: &str| c.kernels.iter().find(|(n, _)| n == k).map(|(_, r)| r.clone()).unwrap_or_else(|| panic!("no {k} in\n{}", c.log));
        let new: Vec<&str> = att.kernels.iter().map(|k| k.name.as_str()).filter(|k| k.starts_with("attn_mma_new_")).collect();
        assert_eq!(new.len(), 6, "{new:?}");
        for k in new {
            let (r, base) = (report(k), report(&k.replacen("attn_mma_new_", "attn_mma_", 1)));
            assert!(r.spill_stores == 0 && r.spill_loads == 0 && r.stack == 0, "{k}: {r:?}");
            assert!(r.registers <= base.registers, "{k}: {r:?} against {base:?}");
        }
    }

    #[test]
    fn shared_memory_follows_the_kernel_layout() {
        let v = |t: &str| AttnVariant::parse(t).unwrap();
        // Default: (64 + 4 * 64) rows of 88 halves, as mma_smem.
        assert_eq!(AttnVariant::default().smem(72), super::super::mma_smem(72));
        assert_eq!(v("s3").smem(72), (64 + 3 * 64) * 88 * 2);
        assert_eq!(v("q128_s3").smem(72), (128 + 3 * 64) * 88 * 2);
        assert_eq!(v("q128_np_vs_k32").smem(72), (128 + 4 * 32) * 88 * 2);
        assert_eq!(v("np").smem(72), AttnVariant::default().smem(72), "the unpadded variant keeps the padded pitch");
        for &(d, tag) in ATTN_VARIANTS {
            assert!(v(tag).smem(d) <= 227 * 1024);
        }
    }
}
