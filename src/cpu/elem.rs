//! The storage types of CPU tensors, as the loops of [`fast`](super::fast) read and write
//! them: f32, and float16 / bfloat16 bit patterns two to a 32-bit word (the GPU's layout,
//! a little-endian half array), so that a half tensor moves half the bytes here too.
//! Arithmetic stays f32: [`Elem::get`] widens a value exactly and [`Elem::put`] rounds an
//! f32 result to nearest, ties to even, overflow to ±Inf, NaN kept quiet, bit for bit as
//! the shaders' stores (shaders/storage_half.wgsl). Both are branch-free, so the loops
//! that call them still vectorize.

use crate::dtype::DType;

/// The instruction set a loop was compiled for (see `fast::with_wide_clone`): what the
/// eight-value conversions may use.
pub(crate) trait Isa: 'static {
    /// Whether F16C's conversions (8 float16 values an instruction) are available.
    const F16C: bool;
}

/// The target's baseline (x86-64: SSE2).
pub(crate) struct Baseline;

impl Isa for Baseline {
    const F16C: bool = false;
}

/// AVX2 with FMA and F16C, checked at run time before any loop of this type runs.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    const F16C: bool = true;
}

/// One stored value of a CPU tensor.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The tensor dtype stored this way.
    const DTYPE: DType;
    /// Zero.
    const ZERO: Self;
    /// The value, exactly.
    fn get(self) -> f32;
    /// `v` rounded to this type.
    fn put(v: f32) -> Self;
    /// `v` rounded to this type, as an f32 (the identity for f32).
    fn round(v: f32) -> f32;
    /// [`get`](Self::get) of eight values.
    #[inline(always)]
    fn get8<I: Isa>(v: &[Self; 8]) -> [f32; 8] {
        get8_each(v)
    }
    /// [`put`](Self::put) of eight values.
    #[inline(always)]
    fn put8<I: Isa>(v: [f32; 8]) -> [Self; 8] {
        put8_each(v)
    }
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

/// Eight values widened one by one (plain loops over fixed arrays, which vectorize;
/// `array::from_fn` did not).
#[inline(always)]
fn get8_each<T: Elem>(v: &[T; 8]) -> [f32; 8] {
    let mut out = [0.0; 8];
    for l in 0..8 {
        out[l] = v[l].get();
    }
    out
}

/// Eight values rounded one by one.
#[inline(always)]
fn put8_each<T: Elem>(v: [f32; 8]) -> [T; 8] {
    let mut out = [T::ZERO; 8];
    for l in 0..8 {
        out[l] = T::put(v[l]);
    }
    out
}

/// A float16 bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct F16(pub u16);

/// A bfloat16 bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Bf16(pub u16);

impl Elem for F16 {
    const DTYPE: DType = DType::F16;
    const ZERO: Self = F16(0);
    #[inline(always)]
    fn get(self) -> f32 {
        let h = self.0 as u32;
        let sign = (h & 0x8000) << 16;
        let em = h & 0x7fff;
        // Normal: the exponent rebiased (15 → 127); Inf and NaN: the exponent all ones,
        // the payload kept; subnormal and zero: m · 2^-24, exact in f32.
        let normal = (em << 13) + (112 << 23);
        let special = (em << 13) | 0x7f80_0000;
        // (0.5 + m·2^-24 has the bits of 0.5 plus m: no integer-to-float conversion.)
        let sub = (f32::from_bits(0x3f00_0000 + em) - 0.5).to_bits();
        let r = if em < 0x400 { sub } else { normal };
        let r = if em >= 0x7c00 { special } else { r };
        f32::from_bits(sign | r)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        let b = v.to_bits();
        let sign = (b >> 16) & 0x8000;
        let a = b & 0x7fff_ffff;
        // A normal f16 (from 2^-14): round the mantissa at bit 13, ties to even, rebias.
        let normal = a
            .wrapping_add(0xfff + ((a >> 13) & 1))
            .wrapping_sub(0x3800_0000)
            >> 13;
        // Below 2^-14: adding 0.5 (whose ulp is 2^-24) rounds to a multiple k·2^-24, ties
        // to even, and the sum's bits are those of 0.5 plus k, the pattern.
        let sub = (f32::from_bits(a) + 0.5)
            .to_bits()
            .wrapping_sub(0x3f00_0000);
        let mut r = if a >= 0x3880_0000 { normal } else { sub };
        r = if a >= 0x477f_f000 { 0x7c00 } else { r }; // from 65520 up: Inf
        r = if a > 0x7f80_0000 {
            0x7e00 | ((a >> 13) & 0x3ff) // NaN, kept quiet
        } else {
            r
        };
        F16((sign | r) as u16)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        crate::dtype::round_f16(v)
    }
    #[inline(always)]
    fn get8<I: Isa>(v: &[Self; 8]) -> [f32; 8] {
        #[cfg(target_arch = "x86_64")]
        if I::F16C {
            // SAFETY: I::F16C only where the CPU has F16C (see `Avx2`).
            return unsafe { f16c::widen8(v) };
        }
        get8_each(v)
    }
    #[inline(always)]
    fn put8<I: Isa>(v: [f32; 8]) -> [Self; 8] {
        #[cfg(target_arch = "x86_64")]
        if I::F16C {
            // SAFETY: as in get8.
            return unsafe { f16c::narrow8(v) };
        }
        put8_each(v)
    }
}

/// F16C's conversions: exact widening, and rounding to nearest even with overflow to ±Inf
/// and NaN kept quiet (the payload's upper bits kept), as `F16::put`; the tests check both
/// against the one-value versions on every pattern.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::F16;
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    #[target_feature(enable = "avx,f16c")]
    pub fn widen8(v: &[F16; 8]) -> [f32; 8] {
        let mut out = [0.0f32; 8];
        // SAFETY: unaligned loads and stores of 16 bytes from and 32 into arrays of
        // that size (F16 is a repr(transparent) u16).
        unsafe {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast()));
            _mm256_storeu_ps(out.as_mut_ptr(), w);
        }
        out
    }

    #[target_feature(enable = "avx,f16c")]
    pub fn narrow8(v: [f32; 8]) -> [F16; 8] {
        let mut out = [F16(0); 8];
        // SAFETY: as in widen8.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(v.as_ptr()));
            _mm_storeu_si128(out.as_mut_ptr().cast(), h);
        }
        out
    }
}

impl Elem for Bf16 {
    const DTYPE: DType = DType::BF16;
    const ZERO: Self = Bf16(0);
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        let b = v.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
        Bf16(if nan { (b >> 16) | 0x40 } else { rounded } as u16)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        crate::dtype::round_bf16(v)
    }
}

/// The first `n` values of `T` in the storage words `w`.
pub(crate) fn view<T: Elem>(w: &[f32], n: usize) -> &[T] {
    assert!(
        T::DTYPE.words(n) <= w.len(),
        "{n} values in {} words",
        w.len()
    );
    // SAFETY: T is f32 or a repr(transparent) u16, every bit pattern of which is valid;
    // f32 slots are aligned for both, and the n values lie within the words' bytes.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<T>(), n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pattern of both half types: `get` against the `half` crate (NaNs keep their
    /// payload), and `put` of every value back to its own pattern.
    #[test]
    fn every_half_pattern_widens_exactly_and_rounds_back() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let v = F16(bits).get();
            if h.is_nan() {
                assert!(v.is_nan(), "{bits:#06x}");
                assert_eq!(
                    v.to_bits() >> 13 & 0x3ff,
                    bits as u32 & 0x3ff,
                    "{bits:#06x}"
                );
                assert_eq!(F16::put(v).0, bits | 0x200, "{bits:#06x}: quieted");
            } else {
                assert_eq!(v.to_bits(), h.to_f32().to_bits(), "{bits:#06x}");
                assert_eq!(F16::put(v).0, bits, "{bits:#06x}");
            }
            let b = half::bf16::from_bits(bits);
            let v = Bf16(bits).get();
            assert_eq!(v.to_bits(), (bits as u32) << 16, "{bits:#06x}");
            if b.is_nan() {
                assert_eq!(Bf16::put(v).0, bits | 0x40, "{bits:#06x}: quieted");
            } else {
                assert_eq!(Bf16::put(v).0, bits, "{bits:#06x}");
            }
        }
    }

    /// The eight-value conversions of every instruction set this CPU has, against the
    /// one-value ones: every pattern widened, every pattern's value and 2 million others
    /// rounded (NaNs compared as NaNs with their payload's upper bits).
    #[test]
    fn eight_value_conversions_match_the_one_value_ones() {
        fn check<I: Isa>() {
            let patterns: Vec<u16> = (0..=u16::MAX).collect();
            for p in patterns.chunks_exact(8) {
                let h: [F16; 8] = std::array::from_fn(|l| F16(p[l]));
                let b: [Bf16; 8] = std::array::from_fn(|l| Bf16(p[l]));
                let (wh, wb) = (F16::get8::<I>(&h), Bf16::get8::<I>(&b));
                for l in 0..8 {
                    let (a, e) = (wh[l], h[l].get());
                    assert!(
                        a.to_bits() == e.to_bits() || a.is_nan() && e.is_nan(),
                        "{:#06x}",
                        p[l]
                    );
                    assert_eq!(wb[l].to_bits(), b[l].get().to_bits());
                }
                assert_eq!(F16::put8::<I>(wh).map(|h| h.0), wh.map(|v| F16::put(v).0));
                assert_eq!(Bf16::put8::<I>(wb).map(|h| h.0), wb.map(|v| Bf16::put(v).0));
            }
            let mut state = 0x2545_f491_4f6c_dd1du64;
            for _ in 0..250_000 {
                let v: [f32; 8] = std::array::from_fn(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    f32::from_bits(state as u32)
                });
                assert_eq!(
                    F16::put8::<I>(v).map(|h| h.0),
                    v.map(|x| F16::put(x).0),
                    "{v:?}"
                );
                assert_eq!(Bf16::put8::<I>(v).map(|h| h.0), v.map(|x| Bf16::put(x).0));
            }
        }
        check::<Baseline>();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
            check::<Avx2>();
        } else {
            eprintln!(
                "!!! this CPU has no F16C: its eight-value float16 conversions are not checked"
            );
        }
    }

    /// `put` of values between the patterns against the `half` crate's round-to-nearest-
    /// even conversions (overflow to ±Inf included), and against `round`.
    #[test]
    fn put_rounds_to_nearest_even() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = vec![65504.0, 65519.99, 65520.0, -65520.0, 1e-8, 2.98e-8, 5.97e-8];
        for _ in 0..2_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push(f32::from_bits(state as u32));
        }
        for v in values.into_iter().filter(|v| !v.is_nan()) {
            let (h, b) = (F16::put(v), Bf16::put(v));
            assert_eq!(h.0, half::f16::from_f32(v).to_bits(), "{v:e}");
            assert_eq!(b.0, half::bf16::from_f32(v).to_bits(), "{v:e}");
            assert_eq!(h.get().to_bits(), F16::round(v).to_bits(), "{v:e}");
            assert_eq!(b.get().to_bits(), Bf16::round(v).to_bits(), "{v:e}");
        }
    }
}
