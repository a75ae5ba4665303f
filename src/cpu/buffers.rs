//! The CPU path's tensor memory: a [`HostBuffer`] per tensor, and a small process-wide cache
//! of freed large buffers that the next outputs reuse.
//!
//! Why: glibc returns freed memory at the top of its heap to the system once more than its
//! trim threshold is free there. A step that frees two tensor-sized outputs together (the
//! fused backward's dx and dz, say) crosses it and gives the pages back, and the next step
//! faults them in again at about 0.3 ms per MiB. That made the fused backward of a 3.2 MB
//! tensor 9× the plain one's time (benches/NOTES.md, "Fused add + ReLU"). PyTorch's CPU
//! tensors pay the same (it is why jemalloc or tcmalloc is often preloaded under it). The
//! GPU side has its own caching allocator (`gpu::pool`); this is the host counterpart, much
//! smaller: only buffers of at least [`MIN_CACHED_BYTES`], at most [`MAX_CACHED_BUFFERS`] of
//! them and [`MAX_CACHED_BYTES`] in all.

use std::sync::Mutex;

/// Buffers below this size are left to the allocator (which serves them from its bins).
pub const MIN_CACHED_BYTES: usize = 256 << 10;
/// Most free buffers kept.
pub const MAX_CACHED_BUFFERS: usize = 8;
/// Most bytes of free buffers kept.
pub const MAX_CACHED_BYTES: usize = 256 << 20;

struct Cache {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: Vec::new(),
    bytes: 0,
});

fn bytes_of(v: &Vec<f32>) -> usize {
    v.capacity() * std::mem::size_of::<f32>()
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// An empty vector with room for at least `n` values: a cached buffer of `n` to `2n`
/// values where there is one (the smallest), else a new allocation.
pub fn take(n: usize) -> Vec<f32> {
    if n * std::mem::size_of::<f32>() >= MIN_CACHED_BYTES {
        let mut cache = lock();
        let best = cache
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() / 2 <= n)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let v = cache.free.swap_remove(i);
            cache.bytes -= bytes_of(&v);
            return v;
        }
    }
    Vec::with_capacity(n)
}

/// Keeps `v`'s memory for a later [`take`] if it is large and the cache has room (the
/// oldest buffers make room for it), else frees it.
fn give_back(mut v: Vec<f32>) {
    let bytes = bytes_of(&v);
    if !(MIN_CACHED_BYTES..=MAX_CACHED_BYTES).contains(&bytes) {
        return;
    }
    v.clear();
    let mut cache = lock();
    while !cache.free.is_empty()
        && (cache.free.len() >= MAX_CACHED_BUFFERS || cache.bytes + bytes > MAX_CACHED_BYTES)
    {
        let old = cache.free.remove(0);
        cache.bytes -= bytes_of(&old);
    }
    cache.bytes += bytes;
    cache.free.push(v);
}

/// Frees every cached buffer; returns the bytes freed.
pub fn release() -> u64 {
    let mut cache = lock();
    let bytes = cache.bytes;
    cache.free.clear();
    cache.bytes = 0;
    bytes as u64
}

/// Bytes of free buffers the cache holds.
#[cfg(test)]
fn cached_bytes() -> u64 {
    lock().bytes as u64
}

/// The values of one CPU tensor; its memory goes back to the cache when it is dropped.
#[derive(Debug, Default)]
pub struct HostBuffer(Vec<f32>);

impl HostBuffer {
    pub fn new(v: Vec<f32>) -> Self {
        Self(v)
    }
}

impl From<Vec<f32>> for HostBuffer {
    fn from(v: Vec<f32>) -> Self {
        Self(v)
    }
}

impl Clone for HostBuffer {
    fn clone(&self) -> Self {
        let mut v = take(self.0.len());
        v.extend_from_slice(&self.0);
        Self(v)
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_and_bounded() {
        // One test touches the process-wide cache, so the counts below are its own.
        release();
        let n = MIN_CACHED_BYTES / 4;
        let a = HostBuffer::new(take(n));
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(cached_bytes(), (n * 4) as u64);
        let b = take(n);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is handed out again");
        assert!(b.is_empty() && b.capacity() >= n);
        assert_eq!(cached_bytes(), 0);
        // Too small to cache; and a request of less than half a cached buffer allocates.
        drop(HostBuffer::new(vec![0.0; 16]));
        assert_eq!(cached_bytes(), 0);
        drop(HostBuffer::new(b));
        assert_ne!(
            take(n / 3).capacity(),
            n,
            "a buffer over twice the request is kept"
        );
        // At most MAX_CACHED_BUFFERS buffers.
        for _ in 0..MAX_CACHED_BUFFERS + 3 {
            drop(HostBuffer::new(Vec::with_capacity(n)));
        }
        assert_eq!(cached_bytes(), (MAX_CACHED_BUFFERS * n * 4) as u64);
        assert_eq!(release(), (MAX_CACHED_BUFFERS * n * 4) as u64);
        assert_eq!(cached_bytes(), 0);
    }
}
