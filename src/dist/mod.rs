//! Communicators: how the ranks of a data-parallel group exchange what
//! [`SyncBatchNorm`](crate::SyncBatchNorm) needs, the per-channel statistics of each rank's
//! part of the global batch and the sums of its backward.
//!
//! A [`Communicator`] is a rank's handle on its group: its rank, the world size, and two
//! collectives on f64 slices, all-gather and all-reduce (sum). Two implementations:
//!
//! - [`LocalComm`]: an in-process group, ranks on threads, each rank with its own
//!   [`Context`](crate::Context) (so the CPU path and several adapters of one machine can be
//!   ranks of one group). A rank that drops out — its thread panics, or it drops its
//!   communicator — or that does not arrive within the group's timeout makes every other
//!   rank's collective return [`Error::Communication`](crate::Error::Communication) instead
//!   of waiting forever. Not on wasm32, which has no threads (nor clocks for the timeout):
//!   implement [`Communicator`] there.
//! - `MpiComm` (module `mpi`, cargo feature `mpi`): MPI through the `mpi` crate, for
//!   processes on one machine or many. What happens when a process dies is MPI's: see the
//!   module's docs.
//!
//! A collective is called by every rank of the group, in the same order on every rank, with
//! slices of the same length. The in-process group computes each result once, summing in
//! rank order, so every rank gets the same bits; MPI's all-gather copies, and its all-reduce
//! is the same on every rank as far as the MPI standard's advice to implementations goes.
//! [`SyncBatchNorm`](crate::SyncBatchNorm) relies on this only through the all-gather: the
//! statistics every rank normalizes with and the running statistics it stores are merged
//! from the gathered values in rank order, the same on every rank.

// Threads and timeouts: not on wasm32.
#[cfg(not(target_arch = "wasm32"))]
mod local;
#[cfg(feature = "mpi")]
pub mod mpi;

#[cfg(not(target_arch = "wasm32"))]
pub use local::{LocalComm, DEFAULT_TIMEOUT};

use crate::error::Result;

/// One rank's handle on a group of `world_size` ranks, numbered 0 to `world_size − 1`.
///
/// Every method that communicates is a collective: all ranks call it, in the same order,
/// with slices of the same length. An error (a rank gone, a timeout, mismatched calls) is
/// [`Error::Communication`](crate::Error::Communication).
pub trait Communicator {
    /// This rank, in 0..world_size.
    fn rank(&self) -> usize;

    /// The number of ranks in the group (at least 1).
    fn world_size(&self) -> usize;

    /// All-gather: every rank contributes `send` (the same length on every rank); every
    /// rank gets all contributions concatenated in rank order, `world_size · send.len()`
    /// values.
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>>;

    /// All-reduce: the element-wise sum of every rank's `send` (the same length on every
    /// rank), on every rank.
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>>;
}

impl<T: Communicator + ?Sized> Communicator for &T {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_gather(send)
    }
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_reduce_sum(send)
    }
}

impl<T: Communicator + ?Sized> Communicator for std::sync::Arc<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_gather(send)
    }
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_reduce_sum(send)
    }
}

impl<T: Communicator + ?Sized> Communicator for std::rc::Rc<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_gather(send)
    }
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_reduce_sum(send)
    }
}

impl<T: Communicator + ?Sized> Communicator for Box<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_gather(send)
    }
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        (**self).all_reduce_sum(send)
    }
}
