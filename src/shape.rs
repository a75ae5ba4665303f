//! Shapes and memory layouts of batch-norm inputs.
//!
//! A shape is always given in PyTorch's logical order (N, C, spatial...). The layout says how
//! the values are laid out in memory: channels-first (NCHW, PyTorch's contiguous format) or
//! channels-last (NHWC, PyTorch's `channels_last`). Both reduce to one canonical view
//! (outer, channels, inner): value (o, c, s) lives at `(o·channels + c)·inner + s`.

use crate::error::{Error, Result};

/// Memory order of a tensor's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// (N, C, D, H, W) in memory: PyTorch's contiguous format.
    #[default]
    ChannelsFirst,
    /// (N, D, H, W, C) in memory: PyTorch's `channels_last` / `channels_last_3d`.
    /// For rank 2, (N, C), both layouts are the same memory.
    ChannelsLast,
}

/// A logical shape (N, C, spatial...) plus the memory layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: Vec<usize>,
    layout: Layout,
}

/// The (outer, channels, inner) view the kernels work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl View {
    pub fn numel(&self) -> usize {
        self.outer * self.channels * self.inner
    }
    /// Values per channel: N·spatial.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }
}

impl Shape {
    /// A channels-first shape. Any rank ≥ 1 is accepted here; operations check rank 2 to 5.
    pub fn new(dims: &[usize]) -> Result<Self> {
        Self::with_layout(dims, Layout::ChannelsFirst)
    }

    /// A shape with an explicit layout.
    pub fn with_layout(dims: &[usize], layout: Layout) -> Result<Self> {
        let elements = dims.iter().map(|&d| d as u128).product::<u128>();
        if dims.is_empty() || elements > u32::MAX as u128 {
            // The kernels index in u32; rank 0 has no channel axis.
            return Err(if dims.is_empty() {
                Error::InvalidRank {
                    shape: dims.to_vec(),
                }
            } else {
                Error::TooManyElements {
                    shape: dims.to_vec(),
                    elements,
                }
            });
        }
        Ok(Self {
            dims: dims.to_vec(),
            layout,
        })
    }

    /// Logical dimensions (N, C, spatial...).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Batch size N (dim 0).
    pub fn batch(&self) -> usize {
        self.dims[0]
    }

    /// Channels C (dim 1); 1 for rank-1 shapes, which batch norm rejects anyway.
    pub fn channels(&self) -> usize {
        self.dims.get(1).copied().unwrap_or(1)
    }

    /// Product of the spatial dims (1 for rank 2).
    pub fn spatial(&self) -> usize {
        self.dims.iter().skip(2).product()
    }

    /// Checks the rank batch norm accepts: 2 to 5.
    pub(crate) fn check_rank(&self) -> Result<()> {
        if (2..=5).contains(&self.dims.len()) {
            Ok(())
        } else {
            Err(Error::InvalidRank {
                shape: self.dims.clone(),
            })
        }
    }

    pub(crate) fn view(&self) -> View {
        let (n, c, s) = (self.batch(), self.channels(), self.spatial());
        match self.layout {
            Layout::ChannelsFirst => View {
                outer: n,
                channels: c,
                inner: s,
            },
            Layout::ChannelsLast => View {
                outer: n * s,
                channels: c,
                inner: 1,
            },
        }
    }
}
