//! Kernel-only timing with timestamp queries, where the adapter has `TIMESTAMP_QUERY`.
//!
//! When enabled, every operation's compute pass writes a timestamp at its start and end; the
//! pair is resolved into a small buffer in the same submission. [`KernelTimer::take`] waits
//! for the device, reads every pending pair and returns the sum of (end − start).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

pub(crate) struct KernelTimer {
    enabled: AtomicBool,
    /// Nanoseconds per timestamp tick.
    period: f32,
    /// Readback buffers of submitted passes, two u64 timestamps each.
    pending: Mutex<Vec<wgpu::Buffer>>,
}

/// The timestamp writes of one pass, and where they go.
pub(crate) struct PassTimestamps {
    pub query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
}

impl KernelTimer {
    pub fn new(queue: &wgpu::Queue) -> Self {
        Self {
            enabled: AtomicBool::new(false),
            period: queue.get_timestamp_period(),
            pending: Mutex::new(Vec::new()),
        }
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Query set and buffers for one pass, when timing is on.
    pub fn begin(&self, device: &wgpu::Device) -> Option<PassTimestamps> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let query_set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kernel timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel timer"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Some(PassTimestamps {
            query_set,
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
        })
    }

    /// Resolves a pass's timestamps (after the pass ended) and queues them for reading.
    pub fn end(&self, encoder: &mut wgpu::CommandEncoder, t: PassTimestamps) {
        encoder.resolve_query_set(&t.query_set, 0..2, &t.resolve, 0);
        encoder.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, 16);
        if let Ok(mut p) = self.pending.lock() {
            p.push(t.readback);
        }
    }

    /// Waits for the device and returns the kernel time of every pass since the last call.
    pub fn take(&self, device: &wgpu::Device) -> Result<Duration> {
        let pending = std::mem::take(
            &mut *self
                .pending
                .lock()
                .map_err(|_| Error::Readback("kernel timer state poisoned".into()))?,
        );
        for b in &pending {
            b.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        let mut ns = 0.0f64;
        for b in &pending {
            let view = b
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?;
            let t: &[u64] = bytemuck::cast_slice(&view);
            ns += t[1].saturating_sub(t[0]) as f64 * self.period as f64;
        }
        Ok(Duration::from_nanos(ns as u64))
    }
}
