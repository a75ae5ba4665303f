//! Batch normalization on the GPU through wgpu, with PyTorch's semantics.
//!
//! For each channel c of an (N, C, ...) input, over its n = N·spatial values:
//!
//! ```text
//! y = (x − μ_c) / sqrt(σ²_c + eps) · γ_c + β_c
//! ```
//!
//! Training normalizes with the batch mean μ and the biased variance σ², and updates
//! `running = (1 − m)·running + m·batch` with the unbiased variance n/(n−1)·σ². Inference
//! uses the running statistics. The backward returns dx, dγ and dβ. WGSL kernels do the work:
//! a stable (shifted-sum + Chan-merge) parallel reduction, a normalize-scale-shift pass, and
//! a fused backward that reads x and dy twice in total. The same API runs on the CPU
//! ([`Context::cpu`]), and [`cpu::reference`] is the f64 oracle every path is tested against.
//!
//! ```no_run
//! use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context};
//!
//! # fn main() -> Result<(), wgpu_batchnorm::Error> {
//! let ctx = Context::new().or_else(|_| Ok::<_, wgpu_batchnorm::Error>(Context::cpu()))?;
//! let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3))?; // PyTorch defaults
//! let data: Vec<f32> = (0..2 * 3 * 4 * 4).map(|i| (i % 7) as f32).collect();
//! let x = ctx.tensor_from_slice(&data, &[2, 3, 4, 4])?;
//! let out = bn.forward_train(&x)?; // y + saved mean/invstd; running stats updated
//! let y = out.y.to_vec()?;
//! let dy = ctx.tensor_from_slice(&vec![1.0; data.len()], &[2, 3, 4, 4])?;
//! let grads = bn.backward(&dy, &x, &out.saved)?; // dx, dγ, dβ
//! bn.eval();
//! let y_eval = bn.forward(&x)?.y.to_vec()?; // running statistics
//! # let _ = (y, grads, y_eval);
//! # Ok(())
//! # }
//! ```
//!
//! # On the web
//!
//! The crate builds for `wasm32-unknown-unknown`, where wgpu runs on the browser's WebGPU.
//! A thread there cannot block while the GPU works (the browser's event loop must run), so
//! the GPU context comes from [`Context::new_async`] (or
//! [`all_gpus_async`](Context::all_gpus_async),
//! [`from_adapter_async`](Context::from_adapter_async), or [`Context::from_device`] on the
//! application's device), results come back with [`Tensor::to_vec_async`], and
//! [`Context::synchronize_async`] waits for the device. The blocking forms (`Context::new`,
//! `Tensor::to_vec` of a GPU tensor, `Moments::to_host`, ...) return [`Error::WouldBlock`]
//! there instead of blocking. wgpu's errors surface one call late there (no synchronous
//! error scopes in WebGPU), kernel-only timing is off, the CPU path runs single-threaded,
//! and [`LocalComm`] (threads) is not compiled.

#![warn(missing_docs)]

mod backend;
mod config;
mod context;
pub mod cpu;
pub mod dist;
mod dtype;
mod error;
mod gpu;
mod nn;
pub mod ops;
mod shape;

pub use config::{BatchNormConfig, Momentum};
pub use context::{Context, Tensor};
pub use dist::Communicator;
#[cfg(not(target_arch = "wasm32"))]
pub use dist::LocalComm;
pub use dtype::{DType, HalfFloat};
pub use error::{Error, Result};
pub use gpu::context::{ContextOptions, DeviceTuning, REQUIRED_STORAGE_BUFFERS};
pub use gpu::kernels::{shader_sources, WORKGROUP_SIZE};
pub use gpu::plan::Partitioning;
pub use gpu::pool::MemoryStats;
pub use half;
pub use nn::SyncBatchNorm;
pub use nn::{BatchNorm, BatchNormState};
pub use ops::{
    ForwardOutput, GradMask, GradSums, GradSumsHost, Gradients, Moments, MomentsHost,
    ReluGradients, RunningStats, SavedStats,
};
pub use shape::{Layout, Shape};
pub use wgpu;
