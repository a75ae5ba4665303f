//! CPU implementations: [`reference`](mod@reference) is the f64 oracle the tests trust;
//! `fast` is the production path behind [`Context::cpu`](crate::Context::cpu), and [`pool`]
//! the parallel loop it runs on; `elem` the storage types its loops read and write (f32,
//! and half values two to a word); `buffers` keeps its tensors' memory for reuse.

pub(crate) mod backend;
pub(crate) mod buffers;
pub(crate) mod elem;
pub(crate) mod fast;
pub mod pool;
pub mod reference;
