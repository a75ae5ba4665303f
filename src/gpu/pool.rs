//! A caching allocator for storage buffers (as PyTorch's CUDA allocator caches blocks).
//!
//! Dropping a tensor returns its buffer here; the next allocation of the same size reuses
//! it. Besides saving allocation calls, this saves a whole pass over memory per output:
//! wgpu zero-fills a fresh buffer before its first use, a reused one is already initialized
//! (every kernel overwrites all of its outputs). Reuse is safe across submissions because
//! one queue executes them in order.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// Bytes of free buffers kept at most; beyond it a returned buffer is released.
const POOL_CAP_BYTES: u64 = 1 << 30;

#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
}

impl BufferPool {
    /// A free buffer of exactly `size` bytes, if one is cached.
    pub fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut guard = self.free.lock().ok()?;
        let (map, bytes) = &mut *guard;
        let b = map.get_mut(&size)?.pop()?;
        *bytes -= size;
        Some(b)
    }

    fn put(&self, buffer: wgpu::Buffer) {
        if let Ok(mut guard) = self.free.lock() {
            let (map, bytes) = &mut *guard;
            let size = buffer.size();
            if *bytes + size <= POOL_CAP_BYTES {
                *bytes += size;
                map.entry(size).or_default().push(buffer);
            }
        }
    }
}

/// A storage buffer that goes back to its pool when dropped.
pub(crate) struct GpuBuffer {
    buffer: wgpu::Buffer,
    pool: Arc<BufferPool>,
}

impl GpuBuffer {
    pub fn new(buffer: wgpu::Buffer, pool: Arc<BufferPool>) -> Self {
        Self { buffer, pool }
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
        self.pool.put(self.buffer.clone());
    }
}
