//! Layers: state and mode only. Each runs its forward and backward through the functional
//! API ([`crate::ops`]), as PyTorch's modules run through `torch.nn.functional`.

mod batch_norm;
mod state;
mod sync_batch_norm;

pub use batch_norm::{BatchNorm, BatchNormState};
pub use sync_batch_norm::SyncBatchNorm;
