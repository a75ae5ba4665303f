// Half-precision storage: float16 and bfloat16 values two per 32-bit word, the lower half
// first (a little-endian half array). The data kernels read a storage word (or a vec2 of
// words) with `load_unit` and write one with `store_unit`; the host composes those two from the pair
// conversions below, so arithmetic stays f32 and only loads and stores change. Both
// directions are written out in integer arithmetic rather than with pack2x16float /
// unpack2x16float: WGSL leaves pack2x16float's result indeterminate past f16's range and
// does not pin down its rounding, and naga allows either only on devices with
// SHADER_FLOAT16_IN_FLOAT32. Here
// every value rounds to nearest, ties to even, overflow gives ±Inf and NaN stays NaN
// (as PyTorch's float → half conversions).

// f16 bits of v.
fn f16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u | ((a >> 13u) & 0x3ffu); // NaN, kept quiet
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u; // from 65520 up (and Inf): ±Inf
    }
    if (a >= 0x38800000u) {
        // A normal f16 (from 2^-14): rebias the exponent, round the mantissa at bit 13.
        let r = a + 0xfffu + ((a >> 13u) & 1u);
        return sign | ((r - 0x38000000u) >> 13u);
    }
    // Subnormal or zero: the nearest multiple of 2^-24 (round() is ties-to-even).
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

// The value of f16 bits h (exact: every f16 is an f32). Written out rather than with
// unpack2x16float, which naga only allows where the device has SHADER_FLOAT16_IN_FLOAT32
// (not every GL ES one), and which may flush f16 subnormals.
fn f16_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // Zero or subnormal: m · 2^-24.
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u)); // ±Inf, NaN
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn f16_ld2(w: u32) -> vec2<f32> {
    return vec2<f32>(f16_value(w & 0xffffu), f16_value(w >> 16u));
}

fn f16_st2(v: vec2<f32>) -> u32 {
    return f16_bits(v.x) | (f16_bits(v.y) << 16u);
}

// bf16 bits of v: the upper half of its f32 bits, rounded to nearest even.
fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u; // NaN, kept quiet
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn bf16_ld2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn bf16_st2(v: vec2<f32>) -> u32 {
    return bf16_bits(v.x) | (bf16_bits(v.y) << 16u);
}
