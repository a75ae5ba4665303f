//! CPU implementations: [`reference`] is the f64 oracle the tests trust; `fast` is the
//! production path behind [`Context::cpu`](crate::Context::cpu).

pub(crate) mod fast;
mod pool;
pub mod reference;
