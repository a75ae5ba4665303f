//! The seam between the op layer and the two backends. [`crate::ops`] validates every input
//! and then calls one method per kernel family of a [`Backend`]: the CPU path
//! ([`crate::cpu::backend`]) and the wgpu path ([`crate::gpu::backend`]) implement it, each
//! with its arithmetic next to its kernels. Nothing above the op layer knows which backend
//! runs.
//!
//! The GPU records an operation's dispatches into a [`Batch`] and submits them together
//! (one submission per public op, as before the seam); the CPU runs each method at once
//! and leaves the batch empty.

use std::sync::Arc;

use crate::context::{Data, Tensor};
use crate::error::Result;
use crate::gpu::context::Scope;
use crate::gpu::kernels::Launch;
use crate::gpu::pool::GpuBuffer;

/// Per-channel pairs in a backend's own form: the summaries of [`Moments`](crate::Moments)
/// (GPU: (n, k, mean − k, sd) as f32 vec4; CPU: (mean, M2) in f64) or the sums of
/// [`GradSums`](crate::GradSums) (GPU: (Σ dy, Σ dy·(x − μ), 0, 0) as f32 vec4; CPU: f64).
#[derive(Clone)]
pub(crate) enum Summaries {
    Gpu(Arc<GpuBuffer>),
    Cpu(Arc<Vec<[f64; 2]>>),
}

/// Running statistics to update in place (the public [`RunningStats`](crate::ops::RunningStats)).
pub(crate) use crate::ops::RunningStats as Running;

/// What a backward reduction returns: the per-channel sums and, when asked, dγ and dβ.
pub(crate) struct Reduced {
    pub sums: Summaries,
    pub dweight: Option<Data>,
    pub dbias: Option<Data>,
}

/// What a forward applies after the affine transform, in its elementwise pass:
/// y = relu(bn(x) + z), the add with a residual z of x's shape and layout, each part
/// optional.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Plain batch norm.
    pub const NONE: Epilogue<'static> = Epilogue {
        residual: None,
        relu: false,
    };

    pub fn is_none(&self) -> bool {
        self.residual.is_none() && !self.relu
    }
}

/// The backward of an [`Epilogue`]: the gradient reaching the batch norm is
/// g = dy·\[y > 0\] with the ReLU (`relu_y` is the fused forward's output), dy without; with a
/// residual, dz = g as well.
#[derive(Clone, Copy, Default)]
pub(crate) struct EpilogueGrad<'a> {
    pub relu_y: Option<&'a Tensor>,
    pub dz: bool,
}

impl EpilogueGrad<'_> {
    /// Plain batch norm.
    pub const NONE: EpilogueGrad<'static> = EpilogueGrad {
        relu_y: None,
        dz: false,
    };

    pub fn is_none(&self) -> bool {
        self.relu_y.is_none() && !self.dz
    }
}

/// What a whole backward returns, each where asked.
#[derive(Default)]
pub(crate) struct Grads {
    pub dx: Option<Data>,
    pub dweight: Option<Data>,
    pub dbias: Option<Data>,
    pub dz: Option<Data>,
}

/// One step of a GPU batch, in order.
pub(crate) enum Step {
    Launch(Launch),
    /// Copy `bytes` bytes from `src` at `src_offset` to `dst` at `dst_offset`.
    Copy {
        src: Arc<GpuBuffer>,
        src_offset: u64,
        dst: Arc<GpuBuffer>,
        dst_offset: u64,
        bytes: u64,
    },
}

impl Step {
    /// The pooled buffers this step holds.
    pub fn owners(&self) -> Vec<&Arc<GpuBuffer>> {
        match self {
            Step::Launch(l) => l.buffers.iter().filter_map(|b| b.owner.as_ref()).collect(),
            Step::Copy { src, dst, .. } => vec![src, dst],
        }
    }
}

/// An operation's GPU work, submitted at once by [`Backend::submit`]. Its steps hold every
/// pooled buffer they bind (scratch, outputs, inputs) until the work is submitted; on a
/// GPU, one error scope covers everything from [`Backend::begin`] to the submission (its
/// allocations included).
#[derive(Default)]
pub(crate) struct Batch {
    pub steps: Vec<Step>,
    pub scope: Option<Scope>,
}

/// [`Backend::train_forward`] in two steps: the statistics, then y.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stats_then_elemt<B: Backend + ?Sized>(
    k: &B,
    batch: &mut Batch,
    x: &Tensor,
    eps: f32,
    running: Option<Running<'_>>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    epi: Epilogue<'_>,
) -> Result<(Data, Data)> {
    let saved = k.batch_stats(batch, x, eps, running)?;
    let y = k.elemt(batch, x, &saved, weight, bias, epi)?;
    Ok((saved, y))
}

/// One method per kernel family. Inputs are validated by the caller: shapes agree, every
/// tensor belongs to this backend's context, per-channel tensors have C values.
pub(crate) trait Backend: Send + Sync {
    /// A batch for one operation (on a GPU: fails if the device is lost, and opens the
    /// operation's error scope).
    fn begin(&self) -> Result<Batch>;

    /// Per-channel summaries of x (statistics partials, merged per channel).
    fn moments(&self, batch: &mut Batch, x: &Tensor) -> Result<Summaries>;

    /// Merges parts' summaries (with their counts) in the given order, then saves
    /// (mean, invstd) and updates the running statistics with the unbiased variance of
    /// the merged count. An empty total saves zeros and updates nothing.
    fn gather(
        &self,
        batch: &mut Batch,
        parts: &[(&Summaries, u64)],
        channels: usize,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data>;

    /// [`moments`](Self::moments) of x and [`gather`](Self::gather) of that one part, fused
    /// (the statistics partials and one finalize pass).
    fn batch_stats(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data>;

    /// The inference statistics (running_mean, 1/sqrt(running_var + eps)) as saved stats.
    fn running_stats(
        &self,
        batch: &mut Batch,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Result<Data>;

    /// y = (x − mean)·γ·invstd + β (γ = 1, β = 0 where absent), then the epilogue.
    fn elemt(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        epi: Epilogue<'_>,
    ) -> Result<Data>;

    /// A training forward: [`batch_stats`](Self::batch_stats) then
    /// [`elemt`](Self::elemt), fused where the backend can (the GPU's one-pass kernel);
    /// returns (saved, y).
    #[allow(clippy::too_many_arguments)]
    fn train_forward(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        eps: f32,
        running: Option<Running<'_>>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        epi: Epilogue<'_>,
    ) -> Result<(Data, Data)> {
        stats_then_elemt(self, batch, x, eps, running, weight, bias, epi)
    }

    /// (Σ dy, Σ dy·(x − μ)) per channel, and dγ, dβ when asked.
    fn backward_reduce(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        dweight: bool,
        dbias: bool,
    ) -> Result<Reduced>;

    /// dx from the sums of the whole batch (`sums`, over `count` values per channel), or,
    /// without sums, the inference dx = dy·γ·invstd.
    fn backward_elemt(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        sums: Option<(&Summaries, u64)>,
    ) -> Result<Data>;

    /// A whole backward over one batch: reduction (when needed), dγ/dβ as asked, and dx
    /// when asked (training formula when `training`), with dy first masked by the ReLU of
    /// `epi` and dz returned where it asks; fused where the backend can.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        training: bool,
        want: (bool, bool, bool),
        epi: EpilogueGrad<'_>,
    ) -> Result<Grads>;

    /// Submits the batch's work.
    fn submit(&self, batch: Batch) -> Result<()>;

    /// Summaries to the host: per channel (a, b) in f64 — (mean, M2) for moments of
    /// `count` values, or the two sums. `moments` says which form the device holds.
    fn download_summaries(
        &self,
        s: &Summaries,
        channels: usize,
        count: u64,
        moments: bool,
    ) -> Result<Vec<[f64; 2]>>;

    /// The inverse of [`download_summaries`](Self::download_summaries).
    fn upload_summaries(&self, pairs: &[[f64; 2]], count: u64, moments: bool) -> Result<Summaries>;
}
