//! The operations of the example's network that are not batch norm — dense layers, the
//! sigmoid, softmax with cross-entropy, SGD — behind one trait, with two implementations:
//! plain Rust loops beside the library's CPU context ([`crate::cpu::CpuEngine`]) and WGSL
//! kernels on the library's wgpu device ([`crate::gpu::GpuEngine`]). Batch norm itself is
//! always the library's: a [`Tensor`] crosses over with [`upload`](Engine::upload) of a
//! host copy, and comes back with [`wrap_tensor`](Engine::wrap_tensor) (on a GPU, the
//! tensor's own buffer, read in place).

use wgpu_batchnorm::{Context, Tensor};

/// Every fallible step of the example returns this: library errors, I/O and plain messages.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What a [`Gemm`] does to each output after the product (and the bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Nothing.
    None,
    /// σ(v) = 1 / (1 + e^(−v)).
    Sigmoid,
    /// v · h · (1 − h), with h the matching element of `aux`: the backward of a sigmoid
    /// whose output was h.
    SigmoidGrad,
}

/// C (m × n) = op(A) · op(B), row-major, with op(A) m × k and op(B) k × n. With `a_t`, A is
/// stored k × m (op transposes it); with `b_t`, B is stored n × k.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// A is stored transposed.
    pub a_t: bool,
    /// B is stored transposed.
    pub b_t: bool,
}

/// The example's dense-network operations on one backend. Buffers are flat f32 arrays.
pub trait Engine {
    /// A flat f32 array resident where this engine computes.
    type Buf;

    /// The library context batch norm runs in (the same device as this engine).
    fn context(&self) -> &Context;

    /// A buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;

    /// The buffer's values on the host.
    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>>;

    /// `act(op(a) · op(b) + bias)`, the bias (length n) added to every row. `aux` (m × n)
    /// is read by [`Act::SigmoidGrad`] only.
    fn gemm(
        &self,
        g: Gemm,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        act: Act,
        aux: Option<&Self::Buf>,
    ) -> Result<Self::Buf>;

    /// σ elementwise.
    fn sigmoid(&self, x: &Self::Buf) -> Result<Self::Buf>;

    /// Softmax cross-entropy of `rows` rows of [`crate::data::CLASSES`] logits against
    /// labels (class numbers as f32): returns d(mean loss)/d(logits) (rows × classes) and,
    /// per row, [loss, 1 if the arg-max is the label else 0].
    fn softmax_xent(
        &self,
        logits: &Self::Buf,
        labels: &Self::Buf,
        rows: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// y += alpha · x.
    fn axpy(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf) -> Result<()>;

    /// A copy of x.
    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf>;

    /// A library tensor's values as a buffer of this engine (no copy on a GPU).
    fn wrap_tensor(&self, t: Tensor) -> Result<Self::Buf>;
}
