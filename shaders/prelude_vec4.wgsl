// Vector prelude: kernels that include it move four floats per load/store.
// The host picks it when the innermost run of a channel (its spatial size) is a multiple of 4.
alias V = vec4<f32>;
const VW: u32 = 4u;
fn hsum(v: V) -> f32 { return v.x + v.y + v.z + v.w; }
// Sets lane l of a V.
fn set_lane(v: ptr<function, V>, l: u32, value: f32) { (*v)[l] = value; }
// Lane l of a V.
fn get_lane(v: V, l: u32) -> f32 { return v[l]; }
// Whether every lane is finite (not ±Inf or NaN), from the exponent bits.
fn finite_v(v: V) -> bool { return all((bitcast<vec4<u32>>(v) & vec4<u32>(0x7f800000u)) != vec4<u32>(0x7f800000u)); }
// Per lane: whether it is finite.
fn finite_lanes(v: V) -> vec4<bool> { return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7f800000u)) != vec4<u32>(0x7f800000u); }
