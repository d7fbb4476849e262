//! What the wgpu runtime (lavapipe on the CPU machines) supports in half precision, and the
//! fused elementwise kernel in f16 against an f64 reference where it does. CubeCL 0.10's wgpu
//! runtime emits WGSL: f16 needs the adapter's `SHADER_F16`; bf16 has no WGSL type at all
//! (CubeCL panics "bf16 is not a valid WgpuElement"), so bf16 stays a storage format that the
//! cube backend upcasts to f32 at load.
#![cfg(feature = "cube")]

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use half::{bf16, f16};
use kiln_kernels::cube::expr::{KBinary, KInstr, KUnary};
use kiln_kernels::cube::{fused, FusedCfg, Repr, Src};

fn client() -> ComputeClient<WgpuRuntime> {
    std::panic::catch_unwind(|| WgpuRuntime::client(&Default::default()))
        .expect("no wgpu adapter: install Mesa's lavapipe (apt-get install mesa-vulkan-drivers)")
}

#[test]
fn half_precision_support_on_wgpu() {
    let c = client();
    let props = c.properties();
    let has_f16 = props.supports_type(f16::as_type_native().expect("f16 is a native type"));
    let has_bf16 = props.supports_type(bf16::as_type_native().expect("bf16 is a native type"));
    eprintln!("wgpu adapter: f16 {has_f16}, bf16 {has_bf16}");
    assert!(!has_bf16, "the wgpu runtime reports bf16 support: extend the cube backend and this test");
    if !has_f16 {
        eprintln!("f16 unsupported on this adapter: the f16 kernel check does not run");
        return;
    }
    // y = gelu_tanh(x) * w + 0.5, 1000 elements, in f16 on the device.
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).fract() * 6.0 - 3.0).collect();
    let w: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.377).fract() * 2.0 - 1.0).collect();
    let code = vec![
        KInstr::Input(0),
        KInstr::Unary(KUnary::GeluTanh, 0),
        KInstr::Input(1),
        KInstr::Binary(KBinary::Mul, 1, 2),
        KInstr::Const(0.5f32.to_bits()),
        KInstr::Binary(KBinary::Add, 3, 4),
    ];
    let arena: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).chain((0..n).map(|_| f16::ZERO)).collect();
    let weights: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    // Meta: [n, out_off, shape, x (off, stride), w (off, stride)].
    let meta: Vec<u32> = vec![n as u32, n as u32, n as u32, 0, 1, 0, 1];
    let ah = c.create_from_slice(f16::as_bytes(&arena));
    let wh = c.create_from_slice(f16::as_bytes(&weights));
    let mh = c.create_from_slice(u32::as_bytes(&meta));
    let cfg = FusedCfg { code, srcs: vec![Src::float(true), Src::float(false)], rank: 1, out: Repr::Float, out_bool: false };
    // SAFETY: the buffers hold 2n, n and 7 elements, as the metadata says.
    unsafe {
        fused::launch_unchecked::<f16, WgpuRuntime>(
            &c,
            CubeCount::Static(n.div_ceil(128) as u32, 1, 1),
            CubeDim::new_1d(128),
            ArrayArg::from_raw_parts(ah.clone(), 2 * n),
            ArrayArg::from_raw_parts(wh, n),
            ArrayArg::from_raw_parts(mh, meta.len()),
            cfg,
        )
    };
    let bytes = c.read_one(ah).expect("read");
    let got = f16::from_bytes(&bytes);
    let mut err = 0f64;
    for i in 0..n {
        let (xv, wv) = (f16::from_f32(x[i]).to_f64(), f16::from_f32(w[i]).to_f64());
        let g = 0.5 * xv * (1.0 + (0.7978845608 * (xv + 0.044715 * xv * xv * xv)).tanh());
        err = err.max((got[n + i].to_f64() - (g * wv + 0.5)).abs());
    }
    eprintln!("f16 fused kernel: max abs error {err:.3e} (values up to ~3.5)");
    assert!(err < 2e-2, "f16 fused kernel error {err:.3e}");
}
