// Pair prelude: the narrow units of half-precision storage (two values per 32-bit word).
// The host picks it for float16 / bfloat16 tensors whose runs (or rows, or pairs of rows)
// hold an even number of values that is not a multiple of 4.
alias V = vec2<f32>;
const VW: u32 = 2u;
fn hsum(v: V) -> f32 { return v.x + v.y; }
// Sets lane l of a V.
fn set_lane(v: ptr<function, V>, l: u32, value: f32) { (*v)[l] = value; }
// Lane l of a V.
fn get_lane(v: V, l: u32) -> f32 { return v[l]; }
// Whether every lane is finite (not ±Inf or NaN), from the exponent bits.
fn finite_v(v: V) -> bool { return all((bitcast<vec2<u32>>(v) & vec2<u32>(0x7f800000u)) != vec2<u32>(0x7f800000u)); }
// Per lane: whether it is finite.
fn finite_lanes(v: V) -> vec2<bool> { return (bitcast<vec2<u32>>(v) & vec2<u32>(0x7f800000u)) != vec2<u32>(0x7f800000u); }
