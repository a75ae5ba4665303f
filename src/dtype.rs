//! Storage types of tensors: float32, and the half types float16 and bfloat16 for x, y, dy,
//! dx and the residual z (PyTorch's mixed type: a half input to a module whose parameters,
//! running statistics and saved statistics are float32). Arithmetic is f32 throughout;
//! only storage is half.
//!
//! A half tensor is stored two values per 32-bit word, byte for byte a native
//! little-endian `f16` / `bf16` array (the last word padded), on a GPU and on the CPU
//! path alike (`cpu::elem`); every output is rounded to it once, from the f32 result, so
//! both paths store the same values.

use std::fmt;

/// The storage type of a [`Tensor`](crate::Tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32 (PyTorch's `torch.float32`).
    #[default]
    F32,
    /// IEEE binary16 (`torch.float16`): 10 mantissa bits, finite up to ±65504.
    F16,
    /// bfloat16 (`torch.bfloat16`): the upper half of an f32, 7 mantissa bits.
    BF16,
}

impl DType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// PyTorch's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// 32-bit words that hold `n` values (the storage of a tensor, GPU or CPU).
    pub(crate) fn words(self, n: usize) -> usize {
        match self {
            DType::F32 => n,
            DType::F16 | DType::BF16 => n.div_ceil(2),
        }
    }

    /// `v` rounded to the nearest value of this type (ties to even; past the largest
    /// finite value ±Inf; NaN stays NaN), as an f32: the bit arithmetic of
    /// shaders/storage_half.wgsl (`round_f16`, `round_bf16`, which the CPU path's
    /// `Elem::round` calls directly), checked against the `half` crate's conversions below.
    #[cfg(test)]
    fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => round_f16(v),
            DType::BF16 => round_bf16(v),
        }
    }

    /// The value of a 16-bit pattern of this half type (a NaN keeps its payload, signalling
    /// or not, as the shaders' decode does).
    pub(crate) fn value_of_bits(self, b: u16) -> f32 {
        let b32 = b as u32;
        match self {
            DType::F16 if b & 0x7c00 == 0x7c00 && b & 0x3ff != 0 => {
                f32::from_bits((b32 & 0x8000) << 16 | 0x7f80_0000 | (b32 & 0x3ff) << 13)
            }
            DType::F16 => half::f16::from_bits(b).to_f32(),
            _ => f32::from_bits(b32 << 16),
        }
    }
}

/// `v` rounded to the nearest f16 value, as an f32. Branch-free, so that the CPU path's
/// loops vectorize: every case is computed and the right one selected.
#[inline]
pub(crate) fn round_f16(v: f32) -> f32 {
    let b = v.to_bits();
    let a = b & 0x7fff_ffff;
    let sign = b ^ a;
    // A normal f16 (from 2^-14): round the f32 mantissa at bit 13, ties to even.
    let normal = (a.wrapping_add(0xfff + ((a >> 13) & 1))) & !0x1fff;
    // Below 2^-14, a multiple of 2^-24: adding 0.5 (whose ulp is 2^-24) rounds to it,
    // ties to even, in the FPU's own rounding; subtracting 0.5 back is exact.
    let sub = ((f32::from_bits(a) + 0.5) - 0.5).to_bits();
    let mut r = if a >= 0x3880_0000 { normal } else { sub };
    r = if a >= 0x477f_f000 { 0x7f80_0000 } else { r }; // from 65520 up: Inf
    r = if a > 0x7f80_0000 { a } else { r }; // NaN stays
    f32::from_bits(sign | r)
}

/// `v` rounded to the nearest bf16 value (the upper half of its bits), as an f32.
#[inline]
pub(crate) fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    f32::from_bits(if nan { b } else { r })
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The half types a tensor can be made from and read back to: [`half::f16`] and
/// [`half::bf16`] (the `half` crate, re-exported as `wgpu_batchnorm::half`).
pub trait HalfFloat: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The tensor dtype of this type.
    const DTYPE: DType;
    /// Its bit pattern.
    fn to_bits(self) -> u16;
    /// The value of a bit pattern.
    fn from_bits(bits: u16) -> Self;
}

impl HalfFloat for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_bits(self) -> u16 {
        half::f16::to_bits(self)
    }
    fn from_bits(bits: u16) -> Self {
        half::f16::from_bits(bits)
    }
}

impl HalfFloat for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_bits(self) -> u16 {
        half::bf16::to_bits(self)
    }
    fn from_bits(bits: u16) -> Self {
        half::bf16::from_bits(bits)
    }
}

/// Half bit patterns packed two per word, low half first (a little-endian half array),
/// the last word's upper half zero when `bits` has an odd length.
pub(crate) fn pack_words(bits: &[u16]) -> Vec<u32> {
    bits.chunks(2)
        .map(|p| p[0] as u32 | (p.get(1).copied().unwrap_or(0) as u32) << 16)
        .collect()
}

/// The first `n` half bit patterns of packed words.
pub(crate) fn unpack_words(words: &[u32], n: usize) -> Vec<u16> {
    words
        .iter()
        .flat_map(|w| [*w as u16, (*w >> 16) as u16])
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_packing_are_the_half_types() {
        // The bit arithmetic against the half crate, over a spread of f32 patterns (every
        // exponent, mantissas near the rounding points, signs) and the specials.
        let mut s = 0x9e37_79b9u32;
        for i in 0..2_000_000u32 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let bits = if i % 4 == 0 {
                (s & 0xffff_e000) | 0x1000
            } else {
                s
            };
            let v = f32::from_bits(bits);
            for (d, want) in [
                (DType::F16, half::f16::from_f32(v).to_f32()),
                (DType::BF16, half::bf16::from_f32(v).to_f32()),
            ] {
                let got = d.round(v);
                assert!(
                    got.to_bits() == want.to_bits() || got.is_nan() && want.is_nan(),
                    "{d}: {v:e} ({bits:#x}) rounded to {got:e}, want {want:e}"
                );
            }
        }
        assert_eq!(DType::F16.round(65504.0), 65504.0);
        assert_eq!(DType::F16.round(65520.0), f32::INFINITY);
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0); // tie to even
        assert!(DType::BF16.round(f32::NAN).is_nan());
        let bits = [0x3c00u16, 0xc000, 0x7bff];
        let words = pack_words(&bits);
        assert_eq!(words, [0xc000_3c00, 0x0000_7bff]);
        assert_eq!(unpack_words(&words, 3), bits);
        assert_eq!(DType::F16.value_of_bits(0x3c00), 1.0);
        assert_eq!(DType::F16.words(3), 2);
    }
}
