// Scalar prelude: the fallback for spatial sizes that are not a multiple of 4.
alias V = f32;
const VW: u32 = 1u;
fn hsum(v: V) -> f32 { return v; }
// Sets lane l (always 0) of a V.
fn set_lane(v: ptr<function, V>, l: u32, value: f32) { *v = value; }
// Lane l (always 0) of a V.
fn get_lane(v: V, l: u32) -> f32 { return v; }
