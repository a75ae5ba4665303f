//! The GPU backend: context (adapter, device, pipelines, error scopes, transfers), the
//! typed kernel registry, the plan that cuts a tensor into chunks and workgroups, and the
//! [`Backend`](crate::backend::Backend) implementation that records each kernel family's
//! launches.

pub(crate) mod backend;
pub(crate) mod context;
pub(crate) mod kernels;
pub(crate) mod plan;
pub(crate) mod pool;
pub(crate) mod timer;
