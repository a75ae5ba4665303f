//! The crate's one error type. Every variant carries the offending values, so a message
//! says what was wrong without a debugger.

use thiserror::Error;

/// Everything that can go wrong in this crate. Bad input is reported here, never by a panic,
/// and an operation that returns an error has changed nothing the caller owns (running
/// statistics, `num_batches_tracked`, parameters).
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Batch norm needs (N, C, ...) input: rank 2 to 5.
    #[error("expected a 2D to 5D input (N, C, ...), got shape {shape:?} of rank {}", shape.len())]
    InvalidRank {
        /// The input's dims.
        shape: Vec<usize>,
    },

    /// The input's channel count differs from the module's `num_features`.
    #[error("running_mean should contain {got} elements not {expected} (input shape {shape:?} has {got} channels, the module num_features = {expected})")]
    ChannelMismatch {
        /// The channel count the module or operation expects.
        expected: usize,
        /// The channel count the input has.
        got: usize,
        /// The input's dims (N, C, ...); `[count, C]` for moments being gathered.
        shape: Vec<usize>,
    },

    /// A per-channel parameter (γ, β, running mean or variance) has the wrong length.
    #[error("{name} should contain {expected} elements, got {got}")]
    ParameterLength {
        /// The parameter's name (`weight`, `bias`, `running_mean`, ...).
        name: &'static str,
        /// The number of elements it must have: one per channel.
        expected: usize,
        /// The number of elements it has.
        got: usize,
    },

    /// Data handed to a tensor constructor does not match its shape.
    #[error("shape {shape:?} holds {expected} elements but {got} were given")]
    DataLength {
        /// The tensor's dims.
        shape: Vec<usize>,
        /// The element count of `shape`.
        expected: usize,
        /// The number of values given.
        got: usize,
    },

    /// Training needs at least two values per channel (PyTorch's
    /// "Expected more than 1 value per channel when training").
    #[error("Expected more than 1 value per channel when training, got input size {shape:?}")]
    TooFewValuesPerChannel {
        /// The input's dims (N, C, ...); `[1, C]` for a batch merged across parts or ranks.
        shape: Vec<usize>,
    },

    /// `eps` must be finite and > 0.
    #[error("eps must be finite and > 0, got {0}")]
    InvalidEps(f32),

    /// `momentum` must lie in [0, 1].
    #[error("momentum must lie in [0, 1], got {0}")]
    InvalidMomentum(f32),

    /// `num_features` must be at least 1.
    #[error("num_features must be at least 1, got {0}")]
    InvalidNumFeatures(usize),

    /// Tensors that must share a storage type do not (x, dy, the residual z, the fused
    /// forward's y), or a tensor that must be float32 (γ, β, running statistics) is not.
    #[error("{what}: expected dtype {expected}, got {got}")]
    DTypeMismatch {
        /// Which tensor, and the rule it breaks.
        what: &'static str,
        /// The dtype it must have.
        expected: crate::DType,
        /// The dtype it has.
        got: crate::DType,
    },

    /// A storage type this context cannot serve for this tensor. (No shape gives it since
    /// half rows of odd length are served too; kept for contexts that cannot serve one.)
    #[error("dtype {dtype} is not supported here: {reason}")]
    UnsupportedDType {
        /// The storage type asked for.
        dtype: crate::DType,
        /// Why not, and what works instead.
        reason: String,
    },

    /// Two tensors (or a tensor and a module) that must agree in shape do not.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which tensor, and the rule it breaks.
        what: &'static str,
        /// The dims it must have.
        expected: Vec<usize>,
        /// The dims it has.
        got: Vec<usize>,
    },

    /// Saved statistics handed to the backward were not produced for this input.
    #[error("saved statistics are for {expected_channels} channels of an input of shape {expected_shape:?}, not for shape {got:?}")]
    SavedStatsMismatch {
        /// The channel count the statistics were saved for.
        expected_channels: usize,
        /// The dims of the input they were saved for (`[0, C]` when they record none).
        expected_shape: Vec<usize>,
        /// The dims of the input handed to the backward.
        got: Vec<usize>,
    },

    /// A tensor or saved statistics from another [`Context`](crate::Context).
    #[error("{what} belongs to context #{got}, but this operation runs on context #{expected}")]
    ContextMismatch {
        /// What came from the other context.
        what: &'static str,
        /// The id ([`Context::id`](crate::Context::id)) of the context the operation runs on.
        expected: u64,
        /// The id of the context it belongs to.
        got: u64,
    },

    /// A parameter the module does not have (γ/β with `affine = false`, running statistics
    /// with `track_running_stats = false`).
    #[error("this module has no {name} ({because})")]
    NoSuchParameter {
        /// The parameter asked for.
        name: &'static str,
        /// The configuration that leaves it out (`affine = false` or
        /// `track_running_stats = false`).
        because: &'static str,
    },

    /// The operation needs running statistics but the module does not track them.
    #[error("{op} needs running statistics, but this module has track_running_stats = false")]
    NoRunningStats {
        /// The operation that needs them.
        op: &'static str,
    },

    /// No wgpu adapter could be found.
    #[error("no GPU adapter found (backends tried: {tried}{filter}); Context::cpu() runs the same API on the CPU")]
    NoAdapter {
        /// The wgpu backends searched (from `WGPU_BACKEND`, all when unset).
        tried: String,
        /// The `WGPU_ADAPTER_NAME` filter applied, as `, WGPU_ADAPTER_NAME="..."`; empty when
        /// unset.
        filter: String,
    },

    /// The adapter lacks something the crate needs.
    #[error("adapter {adapter:?} is unsuitable: {reason}")]
    UnsupportedAdapter {
        /// The adapter's name.
        adapter: String,
        /// What it lacks.
        reason: String,
    },

    /// The device could not be created.
    #[error("requesting a device from {adapter:?} failed: {message}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's error message.
        message: String,
    },

    /// A tensor larger than the device can hold, or a part of the work that must fit one
    /// buffer or binding (an outer row of the tensor, the reductions' scratch) larger than
    /// the device allows.
    #[error("{bytes} bytes exceed the device limit {limit_name} = {limit} bytes")]
    TooLarge {
        /// The bytes needed.
        bytes: u64,
        /// The device limit exceeded (a `wgpu::Limits` field, with what must fit it).
        limit_name: &'static str,
        /// The limit's value, in bytes.
        limit: u64,
    },

    /// The shape's element count does not fit the index arithmetic (u32 units on the GPU).
    #[error("shape {shape:?} has too many elements ({elements}) for one tensor")]
    TooManyElements {
        /// The dims asked for.
        shape: Vec<usize>,
        /// Their product.
        elements: u128,
    },

    /// wgpu reported a validation error (a bug in this crate, or a device in a bad state).
    #[error("GPU validation error: {0}")]
    GpuValidation(String),

    /// wgpu ran out of memory.
    #[error("GPU out of memory: {0}")]
    GpuOutOfMemory(String),

    /// The device was lost or failed internally; make a new [`Context`](crate::Context).
    #[error("GPU device lost or failed: {0}; create a new Context to recover")]
    DeviceLost(String),

    /// A caller's `wgpu::Buffer` that cannot hold the tensor asked for (usage, offset
    /// alignment, size, or another device).
    #[error("this buffer cannot back the tensor: {reason}")]
    InvalidBuffer {
        /// What about the buffer does not fit.
        reason: String,
    },

    /// An argument combination the operation does not accept.
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// The operation called.
        op: &'static str,
        /// What is wrong with its arguments.
        reason: String,
    },

    /// Reading a buffer back failed.
    #[error("reading GPU buffer back failed: {0}")]
    Readback(String),

    /// Another rank of a synchronized layer's group failed its part of a collective step
    /// (bad input there, or its device failed); the step changed nothing on this rank. `rank`
    /// is the lowest failing rank; `reason` says what went wrong there (and which other ranks
    /// failed).
    #[error("rank {rank} of the group failed: {reason}; nothing changed on this rank")]
    PeerFailed {
        /// The lowest failing rank.
        rank: usize,
        /// What failed there, and which other ranks failed.
        reason: String,
    },

    /// The communicator failed: a rank left the group (its thread panicked or it dropped its
    /// communicator), a collective timed out, the ranks called mismatched collectives, or
    /// what arrived cannot be what a rank sent.
    #[error("communication failed: {0}")]
    Communication(String),

    /// A call that waits for the GPU, made where the thread cannot block: on wasm32 the
    /// browser's event loop must run for the GPU's work to complete, so blocking calls on a
    /// GPU context (`Context::new`, `Tensor::to_vec`, `Context::synchronize`, ...) return
    /// this, naming the async form to call instead (where there is one). Never returned on
    /// native targets.
    #[error(
        "{op} would block waiting for the GPU, which this target cannot do (wasm32); {instead}"
    )]
    WouldBlock {
        /// The blocking call.
        op: &'static str,
        /// What to call instead.
        instead: &'static str,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
