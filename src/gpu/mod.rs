//! The GPU backend: context, kernels, and the launch sequences of each operation.

pub(crate) mod context;
pub(crate) mod kernels;
pub(crate) mod ops;
pub(crate) mod pool;
pub(crate) mod timer;
