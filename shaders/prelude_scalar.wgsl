// Scalar prelude: the fallback for spatial sizes that are not a multiple of 4.
alias V = f32;
const VW: u32 = 1u;
fn hsum(v: V) -> f32 { return v; }
