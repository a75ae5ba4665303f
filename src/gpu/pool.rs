//! A caching allocator for storage buffers (as PyTorch's CUDA allocator caches blocks).
//!
//! Dropping a tensor returns its buffer here; the next allocation of the same size class
//! reuses it. Besides saving allocation calls, this saves a whole pass over memory per
//! output: wgpu zero-fills a fresh buffer before its first use, a reused one is already
//! initialized (every kernel overwrites all of its outputs). Reuse is safe across
//! submissions because one queue executes them in order.
//!
//! Sizes are rounded up to classes, four per power of two (at most 25 % slack; 256 bytes at
//! the least), so that batches of varying size reuse each other's buffers. Free buffers are
//! kept up to a cap (the [`DeviceTuning::cache_limit`](crate::DeviceTuning), by default
//! twice the device's largest storage binding, at least 256 MiB); a buffer returned past it
//! is released, and [`Context::release_cached_buffers`](crate::Context) releases them all.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The allocator's counters ([`Context::memory_stats`](crate::Context::memory_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of free buffers held for reuse.
    pub cached_bytes: u64,
    /// Bytes of buffers in use (held by tensors or in flight), at their class sizes.
    pub live_bytes: u64,
    /// Allocations served from the cache.
    pub hits: u64,
    /// Allocations that created a buffer.
    pub misses: u64,
    /// The cap on `cached_bytes`.
    pub cache_limit: u64,
}

/// The size class of a request of `bytes` bytes.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let step = 1u64 << (63 - bytes.leading_zeros()).saturating_sub(2);
    bytes.next_multiple_of(step)
}

#[derive(Default)]
struct State {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: MemoryStats,
}

pub(crate) struct BufferPool {
    state: Mutex<State>,
}

impl BufferPool {
    pub fn new(cache_limit: u64) -> Self {
        let mut state = State::default();
        state.stats.cache_limit = cache_limit;
        Self {
            state: Mutex::new(state),
        }
    }

    /// A free buffer of class `size`, if one is cached; counts a hit or a miss, and the
    /// buffer the caller then holds as live.
    pub fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut guard = self.state.lock().ok()?;
        let s = &mut *guard;
        s.stats.live_bytes += size;
        match s.free.get_mut(&size).and_then(Vec::pop) {
            Some(b) => {
                s.stats.cached_bytes -= size;
                s.stats.hits += 1;
                Some(b)
            }
            None => {
                s.stats.misses += 1;
                None
            }
        }
    }

    /// A live buffer that will not come back (see [`GpuBuffer::detach`]).
    fn forget(&self, size: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.stats.live_bytes = s.stats.live_bytes.saturating_sub(size);
        }
    }

    fn put(&self, buffer: wgpu::Buffer) {
        if let Ok(mut guard) = self.state.lock() {
            let s = &mut *guard;
            let size = buffer.size();
            s.stats.live_bytes = s.stats.live_bytes.saturating_sub(size);
            if s.stats.cached_bytes + size <= s.stats.cache_limit {
                s.stats.cached_bytes += size;
                s.free.entry(size).or_default().push(buffer);
            }
        }
    }

    /// Releases every cached buffer (PyTorch's `empty_cache`); returns the bytes released.
    pub fn release(&self) -> u64 {
        match self.state.lock() {
            Ok(mut s) => {
                s.free.clear();
                std::mem::take(&mut s.stats.cached_bytes)
            }
            Err(_) => 0,
        }
    }

    pub fn stats(&self) -> MemoryStats {
        self.state.lock().map(|s| s.stats).unwrap_or_default()
    }
}

/// A storage buffer that goes back to its pool when dropped, or a caller's buffer (with
/// the byte offset where the tensor starts), which is only borrowed.
pub(crate) struct GpuBuffer {
    buffer: wgpu::Buffer,
    pool: Option<Arc<BufferPool>>,
    /// Set when the buffer must not be reused (see [`detach`](Self::detach)).
    detached: AtomicBool,
    /// Bytes from the buffer's start to the tensor's first value (0 for pooled buffers).
    pub offset: u64,
}

impl GpuBuffer {
    pub fn new(buffer: wgpu::Buffer, pool: Arc<BufferPool>) -> Self {
        Self {
            buffer,
            pool: Some(pool),
            detached: AtomicBool::new(false),
            offset: 0,
        }
    }

    /// A caller's buffer: never pooled.
    pub fn external(buffer: wgpu::Buffer, offset: u64) -> Self {
        Self {
            buffer,
            pool: None,
            detached: AtomicBool::new(false),
            offset,
        }
    }

    /// Keeps the buffer out of the pool when it is dropped: for buffers bound by work
    /// recorded into a caller's encoder, which runs whenever the caller submits it, so
    /// that no later operation can be handed the buffer first. wgpu keeps the memory
    /// alive until that work has run.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Relaxed);
    }
}

impl Deref for GpuBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            if self.detached.load(Ordering::Relaxed) {
                pool.forget(self.buffer.size());
            } else {
                pool.put(self.buffer.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_are_four_per_power_of_two_with_at_most_a_quarter_slack() {
        assert_eq!(size_class(0), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 320);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
        for bytes in (1..100_000u64)
            .step_by(97)
            .chain([u32::MAX as u64, 1 << 40])
        {
            let c = size_class(bytes);
            assert!(c >= bytes && c >= 256, "{bytes} -> {c}");
            assert!(c <= (bytes.max(256) * 5).div_ceil(4) + 1, "{bytes} -> {c}");
            assert_eq!(c % 4, 0);
        }
    }
}
