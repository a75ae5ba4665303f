// Scalar prelude: the fallback for spatial sizes that are not a multiple of 4.
alias V = f32;
const VW: u32 = 1u;
fn hsum(v: V) -> f32 { return v; }
// Sets lane l (always 0) of a V.
fn set_lane(v: ptr<function, V>, l: u32, value: f32) { *v = value; }
// Lane l (always 0) of a V.
fn get_lane(v: V, l: u32) -> f32 { return v; }
// Whether v is finite (not ±Inf or NaN), from the exponent bits.
fn finite_v(v: V) -> bool { return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u; }
// Per lane (one): whether it is finite.
fn finite_lanes(v: V) -> bool { return finite_v(v); }
