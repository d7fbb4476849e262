//! Non-f32 element types in the f32 arena. The arena keeps every tensor in the byte layout the
//! memory plan gave it (so inputs upload and outputs read back as raw bytes): an `i32` is one
//! 32-bit word, an `i64` two (low word first, the high word its sign), a `bool` or `u8` one
//! byte of a word. Kernels compute in `F` and reinterpret the words they read and write.
//! Integers are exact while they fit in `F`'s mantissa (2^24 for f32): indices, masks,
//! positions and counts, which is what graphs hold in them.

use cubecl::prelude::*;

/// How a tensor's elements are stored.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Repr {
    /// One `F` per element (every tensor in the weights buffer, whatever its dtype).
    Float,
    /// One `i32` word per element.
    I32,
    /// Two words per element (low, high); offsets count elements, so word `2 i`.
    I64,
    /// One byte per element (bool, u8); offsets count bytes.
    Byte,
}

/// Where an operand lives and how it is stored.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Src {
    pub in_arena: bool,
    pub repr: Repr,
}

impl Src {
    /// An f32 operand.
    pub fn float(in_arena: bool) -> Src {
        Src { in_arena, repr: Repr::Float }
    }
}

/// Element `i` (in the operand's own element units) as an `F`.
#[allow(unused_assignments)]
#[cube]
pub fn read<F: Float>(arena: &Array<F>, weights: &Array<F>, i: usize, #[comptime] src: Src) -> F {
    let mut v = F::new(0.0);
    if comptime!(src.in_arena) {
        match comptime!(src.repr) {
            Repr::Float => {
                v = arena[i];
            }
            Repr::I32 => {
                v = F::cast_from(i32::reinterpret(arena[i]));
            }
            Repr::I64 => {
                v = F::cast_from(i32::reinterpret(arena[2 * i]));
            }
            Repr::Byte => {
                let w = u32::reinterpret(arena[i / 4]);
                v = F::cast_from((w >> (((i % 4) * 8) as u32)) & 255u32);
            }
        }
    } else {
        v = weights[i];
    }
    v
}

/// Stores `v` as element `i` of a word-sized representation (bytes go through [`write_bytes`]).
#[cube]
pub fn write<F: Float>(arena: &mut Array<F>, i: usize, v: F, #[comptime] repr: Repr) {
    match comptime!(repr) {
        Repr::Float => {
            arena[i] = v;
        }
        Repr::I32 => {
            arena[i] = F::reinterpret(i32::cast_from(v));
        }
        Repr::I64 => {
            let x = i32::cast_from(v);
            arena[2 * i] = F::reinterpret(x);
            arena[2 * i + 1] = F::reinterpret(select(x < 0i32, -1i32, 0i32));
        }
        Repr::Byte => {
            // Unreachable by construction: byte outputs are packed a word at a time.
            arena[i / 4] = v;
        }
    }
}

/// A byte value as the low 8 bits of a word (bool: any non-zero value is 1).
#[allow(unused_assignments)]
#[cube]
pub fn byte_of<F: Float>(v: F, #[comptime] is_bool: bool) -> u32 {
    let mut b = 0u32;
    if comptime!(is_bool) {
        b = select(v != F::new(0.0), 1u32, 0u32);
    } else {
        b = u32::cast_from(i32::cast_from(v)) & 255u32;
    }
    b
}

/// Stores a packed word of four bytes at byte offset `byte` (a multiple of 4).
#[cube]
pub fn write_bytes<F: Float>(arena: &mut Array<F>, byte: usize, word: u32) {
    arena[byte / 4] = F::reinterpret(word);
}
