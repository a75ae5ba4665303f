//! [`MpiComm`]: a [`Communicator`] on MPI, through the `mpi` crate (cargo feature `mpi`;
//! built and tested against Open MPI). Start the ranks with `mpirun -np N program`.
//!
//! ```no_run
//! use std::rc::Rc;
//! use wgpu_batchnorm::dist::mpi::MpiComm;
//! use wgpu_batchnorm::{BatchNormConfig, Context, SyncBatchNorm};
//!
//! # fn main() -> Result<(), wgpu_batchnorm::Error> {
//! let universe = mpi::initialize().expect("MPI initializes once");
//! MpiComm::abort_on_panic();
//! let comm = Rc::new(MpiComm::new(universe.world())); // shared by the model's layers
//! let ctx = Context::new().unwrap_or_else(|_| Context::cpu());
//! let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(16), comm.clone())?;
//! # let _ = &mut bn;
//! # Ok(())
//! # }
//! ```
//!
//! What happens when things go wrong:
//!
//! - **Bad input on a rank** (wrong channel count or rank, a tensor of another context, a
//!   dy of another shape, a device failure before the exchange, a globally too-small
//!   batch): as in every group, the ranks' statuses travel with their statistics and every
//!   rank returns a typed error with nothing changed. No MPI error occurs.
//! - **A process that dies** (a signal, `exit`, an abort): Open MPI's `mpirun` sees it and
//!   terminates the other processes of the job, which exits non-zero; no rank is left
//!   waiting in a collective.
//! - **A rank that panics**: a panic unwinds, and dropping the `Universe` on the way calls
//!   `MPI_Finalize`, which waits for ranks that wait for this one in a collective: with Open
//!   MPI 4.1, `mpirun -np 3 sync_bn --drop-out --no-abort-on-panic` (rank 1 panics between
//!   a forward and its backward) hangs until killed. Call [`MpiComm::abort_on_panic`] after
//!   `mpi::initialize`: a panic then calls `MPI_Abort`, which ends every process of the job;
//!   the same run then ends in about a second with status 101 (`.ci/mpi` checks that it
//!   ends, non-zero, within a deadline).
//! - **A rank that never arrives** (stuck, or calling other collectives): MPI has no
//!   timeout, and the others wait. Bound the job from outside (`mpirun --timeout SECONDS`,
//!   or the scheduler's limit).
//! - **Mismatched calls** (layers of different `num_features`, a forward on one rank
//!   against a backward on another): an erroneous MPI program; Open MPI usually aborts with
//!   a truncation error, but nothing guarantees it. Every rank must make the same calls on
//!   layers of the same configuration.
//! - **MPI errors** are fatal under MPI's default error handler (`MPI_ERRORS_ARE_FATAL`):
//!   the job aborts rather than returning an error here.

use ::mpi::collective::SystemOperation;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator as _, CommunicatorCollectives as _};

use super::Communicator;
use crate::error::{Error, Result};

/// One rank of an MPI communicator (see the [module docs](self)).
pub struct MpiComm {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiComm(rank {} of {})", self.rank, self.size)
    }
}

impl MpiComm {
    /// Wraps an MPI communicator, e.g. `universe.world()`, or a duplicate of it
    /// (`world.duplicate()`) so that these collectives never interleave with the
    /// application's own on the same communicator.
    pub fn new(comm: SimpleCommunicator) -> Self {
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        Self { comm, rank, size }
    }

    /// The wrapped MPI communicator.
    pub fn inner(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// Makes a panic on this process end the whole MPI job (`MPI_Abort` on the world
    /// communicator, after the usual panic message) instead of unwinding into
    /// `MPI_Finalize` while other ranks wait for this one. Call it once, after
    /// `mpi::initialize`.
    pub fn abort_on_panic() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            eprintln!("wgpu-batchnorm: a rank panicked; aborting the MPI job");
            SimpleCommunicator::world().abort(101)
        }));
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        let want = send
            .len()
            .checked_mul(self.size)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::Communication(format!(
                    "all_gather of {} values over {} ranks exceeds MPI's count",
                    send.len(),
                    self.size
                ))
            })?;
        let mut recv = vec![0.0f64; want];
        self.comm.all_gather_into(send, &mut recv[..]);
        Ok(recv)
    }

    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        if send.len() > i32::MAX as usize {
            return Err(Error::Communication(format!(
                "all_reduce_sum of {} values exceeds MPI's count",
                send.len()
            )));
        }
        let mut recv = vec![0.0f64; send.len()];
        self.comm
            .all_reduce_into(send, &mut recv[..], SystemOperation::sum());
        Ok(recv)
    }
}
