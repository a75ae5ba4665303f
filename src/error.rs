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
    InvalidRank { shape: Vec<usize> },

    /// The input's channel count differs from the module's `num_features`.
    #[error("running_mean should contain {got} elements not {expected} (input shape {shape:?} has {got} channels, the module num_features = {expected})")]
    ChannelMismatch {
        expected: usize,
        got: usize,
        shape: Vec<usize>,
    },

    /// A per-channel parameter (γ, β, running mean or variance) has the wrong length.
    #[error("{name} should contain {expected} elements, got {got}")]
    ParameterLength {
        name: &'static str,
        expected: usize,
        got: usize,
    },

    /// Data handed to a tensor constructor does not match its shape.
    #[error("shape {shape:?} holds {expected} elements but {got} were given")]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },

    /// Training needs at least two values per channel (PyTorch's
    /// "Expected more than 1 value per channel when training").
    #[error("Expected more than 1 value per channel when training, got input size {shape:?}")]
    TooFewValuesPerChannel { shape: Vec<usize> },

    /// `eps` must be finite and > 0.
    #[error("eps must be finite and > 0, got {0}")]
    InvalidEps(f32),

    /// `momentum` must lie in [0, 1].
    #[error("momentum must lie in [0, 1], got {0}")]
    InvalidMomentum(f32),

    /// `num_features` must be at least 1.
    #[error("num_features must be at least 1, got {0}")]
    InvalidNumFeatures(usize),

    /// Two tensors (or a tensor and a module) that must agree in shape do not.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// Saved statistics handed to the backward were not produced for this input.
    #[error("saved statistics are for {expected_channels} channels of an input of shape {expected_shape:?}, not for shape {got:?}")]
    SavedStatsMismatch {
        expected_channels: usize,
        expected_shape: Vec<usize>,
        got: Vec<usize>,
    },

    /// A tensor or saved statistics from another [`Context`](crate::Context).
    #[error("{what} belongs to context #{got}, but this operation runs on context #{expected}")]
    ContextMismatch {
        what: &'static str,
        expected: u64,
        got: u64,
    },

    /// A parameter the module does not have (γ/β with `affine = false`, running statistics
    /// with `track_running_stats = false`).
    #[error("this module has no {name} ({because})")]
    NoSuchParameter {
        name: &'static str,
        because: &'static str,
    },

    /// The operation needs running statistics but the module does not track them.
    #[error("{op} needs running statistics, but this module has track_running_stats = false")]
    NoRunningStats { op: &'static str },

    /// No wgpu adapter could be found.
    #[error("no GPU adapter found (backends tried: {tried}{filter}); Context::cpu() runs the same API on the CPU")]
    NoAdapter { tried: String, filter: String },

    /// The adapter lacks something the crate needs.
    #[error("adapter {adapter:?} is unsuitable: {reason}")]
    UnsupportedAdapter { adapter: String, reason: String },

    /// The device could not be created.
    #[error("requesting a device from {adapter:?} failed: {message}")]
    RequestDevice { adapter: String, message: String },

    /// A tensor larger than the device can hold.
    #[error("tensor of {bytes} bytes exceeds the device limit {limit_name} = {limit} bytes")]
    TooLarge {
        bytes: u64,
        limit_name: &'static str,
        limit: u64,
    },

    /// The shape's element count does not fit the index arithmetic (u32 units on the GPU).
    #[error("shape {shape:?} has too many elements ({elements}) for one tensor")]
    TooManyElements { shape: Vec<usize>, elements: u128 },

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
    InvalidBuffer { reason: String },

    /// An argument combination the operation does not accept.
    #[error("{op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

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
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
