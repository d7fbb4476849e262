//! The deterministic random values of `kiln synth`: one xoshiro256++ stream per chunk of a
//! tensor, seeded through splitmix64 from the seed, the tensor name's FNV-1a hash and the
//! chunk index, so the output does not depend on the thread count.

use crate::synth::Init;

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256++.
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn new(seed: u64, stream: u64, chunk: u64) -> Self {
        let mut sm = seed;
        let a = splitmix64(&mut sm);
        let mut sm = a ^ stream;
        let b = splitmix64(&mut sm);
        let mut sm = b ^ chunk.wrapping_mul(0xd6e8_feb8_6659_fd93);
        Xoshiro([splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)])
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
}

/// Fills `out` (chunk `chunk` of tensor with name hash `stream`) per `init`.
pub(crate) fn fill(out: &mut [f32], init: Init, seed: u64, stream: u64, chunk: u64) {
    match init {
        Init::Constant(c) => out.fill(c),
        Init::Normal { mean, std } => {
            // Approximate normal: Irwin-Hall sum of four 16-bit uniforms from
            // one u64, standardized (mean 0, variance 1, support ±3.46). Much
            // cheaper than Box-Muller, so generation keeps up with the disk;
            // the tails don't matter for random benchmark weights.
            const CENTER: f32 = 4.0 * 32767.5;
            // Var of one discrete uniform on [0, 65535] is (65536² - 1) / 12.
            const INV_SD: f32 = 1.0 / 37_837.23; // sqrt(4 * (65536² - 1) / 12)
            let mut rng = Xoshiro::new(seed, stream, chunk);
            let scale = std * INV_SD;
            for o in out.iter_mut() {
                let x = rng.next();
                let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
                *o = (s as i32 as f32 - CENTER) * scale + mean;
            }
        }
    }
}
