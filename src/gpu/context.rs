//! The GPU side of a [`Context`](crate::Context): adapter choice, device, pipelines, error
//! scopes, upload and readback.

use std::future::Future;
use std::sync::{Arc, Mutex};

use super::kernels::{subgroups_usable, Family, Kernels};
use super::plan::{Partitioning, Plan};
use super::pool::{size_class, BufferPool, GpuBuffer, MemoryStats};
use super::timer::KernelTimer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::View;

/// Options of a GPU [`Context`](crate::Context).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextOptions {
    /// Caps the size of one storage binding below the device's
    /// `max_storage_buffer_binding_size` (at least 256 bytes). Tensors larger than a binding
    /// are processed in chunks of whole rows; a small cap exercises that path on small data.
    pub max_binding_size: Option<u64>,
}

/// Performance knobs and emulated device limits of a GPU [`Context`](crate::Context),
/// beside [`ContextOptions`]: `DeviceTuning::default().partitioning(...)`. The defaults are
/// the device's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceTuning {
    /// How reductions cut their work into workgroups (default: per device type).
    pub partitioning: Partitioning,
    /// Chunks of tensors past one binding are bound at multiples of this many bytes: at
    /// least the device's `min_storage_buffer_offset_alignment` (a power of two); a larger
    /// value emulates a device with a coarser alignment (real GPUs report 32 to 256).
    pub offset_alignment: Option<u64>,
    /// Bytes of free buffers the context's caching allocator keeps for reuse (default:
    /// twice the device's `max_storage_buffer_binding_size`, at least 256 MiB). 0 caches
    /// nothing.
    pub cache_limit: Option<u64>,
    /// Use the one-pass kernels wherever a channel fits in workgroup memory (one launch
    /// per training forward or backward instead of three, x read once). Default false:
    /// on the software adapters they measured about 2× slower than the two-pass kernels
    /// (benches/NOTES.md); they are meant for launch-bound small tensors on GPUs.
    pub one_pass: bool,
    /// Reduce with subgroup operations (a shuffle-based Chan merge within each subgroup
    /// instead of workgroup-memory tree levels) in the reductions of long runs and in the
    /// finalize passes. None (the default): wherever the device has `Features::SUBGROUP`
    /// and subgroups of a power of two up to [`WORKGROUP_SIZE`](crate::WORKGROUP_SIZE)
    /// invocations; `Some(false)`: never. A context opened on an adapter requests the
    /// feature itself; one wrapping the caller's device uses it where the device has it.
    /// [`Context::tuning`](crate::Context::tuning) reports what the context uses.
    pub subgroups: Option<bool>,
    /// Store float16 tensors as WGSL's own `f16` (`enable f16`: the device's conversion
    /// instructions) rather than two per 32-bit word converted in integer arithmetic
    /// (which every device runs, GL included). None (the default): where the device has
    /// `Features::SHADER_F16` and is not a CPU (on lavapipe the native kernels took
    /// more time than the packed ones in 19 of 21 shapes, 1.15× in the median,
    /// benches/NOTES.md); `Some(true)`: wherever
    /// the device has the feature; `Some(false)`: never. The bytes are the same either way.
    /// [`Context::tuning`](crate::Context::tuning) reports what the context uses.
    pub native_f16: Option<bool>,
}

impl DeviceTuning {
    /// Sets the work partitioning.
    pub fn partitioning(mut self, partitioning: Partitioning) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// Sets the caching allocator's cap on free buffers kept for reuse, in bytes.
    pub fn cache_limit(mut self, bytes: u64) -> Self {
        self.cache_limit = Some(bytes);
        self
    }

    /// Switches the one-pass kernels on or off (see [`one_pass`](Self::one_pass)).
    pub fn one_pass(mut self, on: bool) -> Self {
        self.one_pass = on;
        self
    }

    /// Switches the subgroup reductions on (where the device has them) or off (see
    /// [`subgroups`](Self::subgroups)).
    pub fn subgroups(mut self, on: bool) -> Self {
        self.subgroups = Some(on);
        self
    }

    /// Switches native float16 storage on (where the device has it) or off (see
    /// [`native_f16`](Self::native_f16)).
    pub fn native_f16(mut self, on: bool) -> Self {
        self.native_f16 = Some(on);
        self
    }

    /// Sets the storage-offset alignment chunks are bound at (rounded up to a power of two,
    /// never below the device's).
    pub fn offset_alignment(mut self, bytes: u64) -> Self {
        self.offset_alignment = Some(bytes);
        self
    }
}

/// Limits the crate needs at minimum (the WebGPU defaults satisfy them): up to 6 storage
/// buffers and one uniform per kernel, 256-invocation workgroups, 16 KiB of workgroup memory.
pub const REQUIRED_STORAGE_BUFFERS: u32 = 6;
const REQUIRED_WORKGROUP_STORAGE: u32 = 16 << 10;

pub(crate) struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub kernels: Kernels,
    /// Bound where a kernel's optional input (γ, β, partials) or output (running
    /// statistics, dγ, dβ) is absent; its flag tells the kernel not to touch it. Two, so
    /// that a dispatch never binds one buffer as both read-only and read-write.
    pub dummy_read: wgpu::Buffer,
    pub dummy_write: wgpu::Buffer,
    /// One read-only storage binding: binding a caller's buffer to it tells whether the
    /// buffer belongs to this device.
    probe_layout: wgpu::BindGroupLayout,
    pool: Arc<BufferPool>,
    /// Kernel-only timing, where the device has timestamp queries.
    pub timer: Option<KernelTimer>,
    options: ContextOptions,
    /// With `partitioning` resolved for this device and the alignment made the device's at
    /// least.
    pub tuning: DeviceTuning,
    /// Compute dispatches encoded so far (see `Context::dispatch_count`).
    pub dispatches: std::sync::atomic::AtomicU64,
    lost: Arc<Mutex<Option<String>>>,
    /// The first error wgpu raised outside our scopes (only on devices we created; on wasm32,
    /// where no scope is pushed, every error of our work: see [`Scope`]); reported by the
    /// next call.
    uncaptured: Arc<Mutex<Option<Error>>>,
}

/// Orders adapters: real GPUs first, then virtual, then software rasterizers.
fn preference(info: &wgpu::AdapterInfo) -> u8 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Every adapter of the backends in `WGPU_BACKEND` (all when unset) whose name contains
/// `WGPU_ADAPTER_NAME` (case-insensitive, when set) and that can run compute shaders,
/// best first. Returns the adapters and a description of what was searched. (On wasm32 the
/// environment is empty and WebGPU offers the browser's one adapter.)
pub(crate) async fn candidate_adapters() -> (Vec<wgpu::Adapter>, String, String) {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = instance.enumerate_adapters(backends).await;
    let filter = std::env::var("WGPU_ADAPTER_NAME").ok();
    if let Some(name) = &filter {
        let name = name.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&name));
    }
    adapters.retain(|a| {
        a.get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
    });
    adapters.sort_by_key(|a| preference(&a.get_info()));
    let tried = format!("{backends:?}");
    let filter = filter
        .map(|f| format!(", WGPU_ADAPTER_NAME={f:?}"))
        .unwrap_or_default();
    (adapters, tried, filter)
}

impl GpuContext {
    /// Opens a device on `adapter` with the adapter's own limits (larger storage bindings
    /// than the WebGPU defaults where the hardware has them).
    pub async fn from_adapter(
        adapter: &wgpu::Adapter,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        check_limits(&info, &limits)?;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-batchnorm"),
                // Timestamp queries cost nothing until kernel timing is switched on (which
                // reads them back blocking: not on wasm32).
                required_features: (if KERNEL_TIMING {
                    adapter.features() & wgpu::Features::TIMESTAMP_QUERY
                } else {
                    wgpu::Features::empty()
                }) | if tuning.subgroups != Some(false) {
                    adapter.features() & wgpu::Features::SUBGROUP
                } else {
                    wgpu::Features::empty()
                } | if tuning
                    .native_f16
                    .unwrap_or(info.device_type != wgpu::DeviceType::Cpu)
                {
                    adapter.features() & wgpu::Features::SHADER_F16
                } else {
                    wgpu::Features::empty()
                },
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                message: e.to_string(),
            })?;
        // Our own device: errors outside a scope are recorded rather than panicking. The
        // first one is kept (later ones tend to follow from it).
        let uncaptured = Arc::new(Mutex::new(None));
        let slot = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut s) = slot.lock() {
                s.get_or_insert(match e {
                    wgpu::Error::OutOfMemory { .. } => Error::GpuOutOfMemory(e.to_string()),
                    _ => Error::GpuValidation(e.to_string()),
                });
            }
        }));
        Self::build(device, queue, info, uncaptured, options, tuning)
    }

    /// Wraps a device the application already owns. Its uncaptured-error handler stays the
    /// application's.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        let info = device.adapter_info();
        check_limits(&info, &device.limits())?;
        Self::build(
            device,
            queue,
            info,
            Arc::new(Mutex::new(None)),
            options,
            tuning,
        )
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        uncaptured: Arc<Mutex<Option<Error>>>,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        let lost = Arc::new(Mutex::new(None));
        let lost_flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost_flag.lock() {
                *l = Some(format!("{reason:?}: {message}"));
            }
        });
        let limits = device.limits();
        let device_align = limits.min_storage_buffer_offset_alignment as u64;
        let cache_limit = tuning
            .cache_limit
            .unwrap_or((2 * limits.max_storage_buffer_binding_size).max(256 << 20));
        let mut tuning = DeviceTuning {
            cache_limit: Some(cache_limit),
            partitioning: tuning.partitioning.resolve(info.device_type),
            offset_alignment: Some(
                tuning
                    .offset_alignment
                    .map_or(device_align, |a| a.max(device_align).next_power_of_two()),
            ),
            one_pass: tuning.one_pass,
            subgroups: Some(
                tuning.subgroups != Some(false)
                    && subgroups_usable(
                        device.features(),
                        info.subgroup_min_size,
                        info.subgroup_max_size,
                    ),
            ),
            native_f16: Some(
                tuning
                    .native_f16
                    .unwrap_or(info.device_type != wgpu::DeviceType::Cpu)
                    && device.features().contains(wgpu::Features::SHADER_F16),
            ),
        };
        // A driver that offers subgroups or f16 but fails to build the kernels that use
        // them: without either, then without both. The probe builds every reducing kernel
        // (built here anyway) and one native float16 kernel; the other float16 variants
        // are built on first use, and a driver that rejected only one of those would give
        // that op `Error::GpuValidation` (none is known to).
        let (subgroups, native_f16) = (
            tuning.subgroups == Some(true),
            tuning.native_f16 == Some(true),
        );
        let mut attempts = vec![(subgroups, native_f16)];
        if native_f16 {
            attempts.push((subgroups, false));
        }
        if subgroups {
            attempts.push((false, native_f16));
        }
        if subgroups && native_f16 {
            attempts.push((false, false));
        }
        let mut built = None;
        for (i, &(subgroups, native_f16)) in attempts.iter().enumerate() {
            let scope = Scope::push(&device);
            let kernels = Kernels::new(&device, tuning.one_pass, subgroups, native_f16);
            if native_f16 {
                // Half variants are built on first use: one now, so that a failure shows.
                kernels.get(Family::Apply, false, DType::F16, 0);
            }
            match scope.pop() {
                Ok(()) => {
                    built = Some(kernels);
                    tuning.subgroups = Some(subgroups);
                    tuning.native_f16 = Some(native_f16);
                    break;
                }
                Err(e) if i + 1 == attempts.len() => return Err(e),
                Err(_) => {}
            }
        }
        let kernels = built.expect("the last attempt returns its error");
        let timer = (KERNEL_TIMING && device.features().contains(wgpu::Features::TIMESTAMP_QUERY))
            .then(|| KernelTimer::new(&queue));
        let dummy = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: storage_usage(),
                mapped_at_creation: false,
            })
        };
        let (dummy_read, dummy_write) = (dummy("unused input"), dummy("unused output"));
        // Written once, so that wgpu never lazily zero-fills these buffers, which every
        // thread's work binds.
        for d in [&dummy_read, &dummy_write] {
            queue.write_buffer(d, 0, &[0u8; 16]);
        }
        let probe_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("buffer probe"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: true },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        Ok(Self {
            timer,
            dummy_read,
            dummy_write,
            probe_layout,
            pool: Arc::new(BufferPool::new(cache_limit)),
            device,
            queue,
            info,
            limits,
            kernels,
            options,
            tuning,
            dispatches: Default::default(),
            lost,
            uncaptured,
        })
    }

    /// Fails when the device has been lost (the next call after a loss reports it).
    pub fn check_alive(&self) -> Result<()> {
        // A non-blocking poll runs the device-lost callback if the device has gone.
        let _ = self.device.poll(wgpu::PollType::Poll);
        if let Some(e) = self.uncaptured.lock().ok().and_then(|mut s| s.take()) {
            return Err(e);
        }
        match self.lost.lock() {
            Ok(l) => match &*l {
                Some(msg) => Err(Error::DeviceLost(msg.clone())),
                None => Ok(()),
            },
            Err(_) => Err(Error::DeviceLost("device-lost state poisoned".into())),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns a captured wgpu
    /// error into an [`Error`]. Scopes are per thread, so concurrent callers don't mix. (On
    /// wasm32 there are no scopes: `f`'s errors surface on a later call; see [`Scope`].)
    pub fn guarded<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let scope = Scope::push(&self.device);
        let out = f();
        scope.pop()?;
        Ok(out)
    }

    /// Largest range one storage binding may cover (the device limit, or the cap set in
    /// [`ContextOptions`]); larger tensors are processed in chunks.
    pub fn max_binding(&self) -> u64 {
        let device = self.limits.max_storage_buffer_binding_size;
        self.options
            .max_binding_size
            .map_or(device, |cap| cap.clamp(256, device))
    }

    /// How `view` of `dtype` values is cut into chunks and workgroups on this device.
    pub fn plan(&self, view: View, dtype: DType) -> Result<Plan> {
        self.check_size((dtype.words(view.numel()) * 4) as u64)?;
        Plan::new(
            view,
            dtype,
            self.max_binding(),
            self.limits.max_storage_buffer_binding_size,
            self.tuning
                .offset_alignment
                .expect("resolved when the context is built"),
            self.tuning.partitioning.numbers(self.info.device_type),
        )
    }

    /// Floats of workgroup memory the one-pass kernels may hold values in (None: the
    /// device cannot run them, or the tuning does not ask for them).
    pub fn one_pass_cap(&self) -> Option<u32> {
        self.kernels.one_pass_cap
    }

    /// Fails for a buffer larger than the device can allocate.
    pub fn check_size(&self, bytes: u64) -> Result<()> {
        if bytes > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                bytes,
                limit_name: "max_buffer_size",
                limit: self.limits.max_buffer_size,
            });
        }
        Ok(())
    }

    /// A storage buffer holding `data` (padded to at least 16 bytes, so that empty tensors
    /// bind too). Written through the queue rather than mapped at creation: on a lost
    /// device a mapping panics inside wgpu, a queue write just fails.
    pub fn upload(&self, data: &[f32], label: &str) -> Result<GpuBuffer> {
        let bytes = (data.len() * 4) as u64;
        self.check_size(bytes)?;
        self.guarded(|| {
            let buffer = self.alloc(data.len(), label);
            if !data.is_empty() {
                self.queue
                    .write_buffer(&buffer, 0, bytemuck::cast_slice(data));
            }
            buffer
        })
    }

    /// A storage buffer for `len` floats from the pool (contents unspecified: the caller
    /// overwrites what it reads), or a new one.
    pub fn alloc(&self, len: usize, label: &str) -> GpuBuffer {
        // The size class, unless it would pass the device's largest buffer.
        let exact = (len.max(4) * 4).next_multiple_of(16) as u64;
        let size = size_class(exact).min(self.limits.max_buffer_size.max(exact));
        let buffer = self.pool.take(size).unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: storage_usage(),
                mapped_at_creation: false,
            })
        });
        GpuBuffer::new(buffer, self.pool.clone())
    }

    /// Checks that `buffer` can hold `bytes` bytes of a tensor from byte `offset`: STORAGE
    /// usage, an offset at the device's storage-offset alignment, the range inside the
    /// buffer, and the buffer made by this device.
    pub fn check_external(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidBuffer { reason });
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return bad(format!("its usage {:?} lacks STORAGE", buffer.usage()));
        }
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        if !offset.is_multiple_of(align) {
            return bad(format!(
                "offset {offset} is not a multiple of the device's storage-offset alignment {align}"
            ));
        }
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > buffer.size())
        {
            return bad(format!(
                "{bytes} bytes from offset {offset} pass the buffer's end ({} bytes)",
                buffer.size()
            ));
        }
        // Another device's buffer fails validation when bound here (and, from another
        // wgpu instance, panics inside wgpu: caught, and reported like the validation error).
        let size = bytes.clamp(4, self.max_binding().max(4));
        if offset + size <= buffer.size() {
            let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.guarded(|| {
                    self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("buffer probe"),
                        layout: &self.probe_layout,
                        entries: &[wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer,
                                offset,
                                size: wgpu::BufferSize::new(size),
                            }),
                        }],
                    })
                })
            }));
            let failed = match probe {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("wgpu rejected it as a resource of another device".into()),
            };
            if let Some(e) = failed {
                return bad(format!("binding it on this context's device failed: {e}"));
            }
        }
        Ok(())
    }

    /// The allocator's counters.
    pub fn memory_stats(&self) -> MemoryStats {
        self.pool.stats()
    }

    /// Releases the cached free buffers; returns the bytes released.
    pub fn release_cached_buffers(&self) -> u64 {
        self.pool.release()
    }

    /// Writes `len` zeros at the start of `buffer` (ordered before the next submission).
    pub fn fill_zero(&self, buffer: &wgpu::Buffer, len: usize) {
        if len > 0 {
            self.queue
                .write_buffer(buffer, 0, bytemuck::cast_slice(&vec![0f32; len]));
        }
    }

    /// Waits until the device has finished all submitted work ([`Error::WouldBlock`] on
    /// wasm32: see [`synchronize_async`](Self::synchronize_async)).
    pub fn synchronize(&self) -> Result<()> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::WouldBlock {
                op: "Context::synchronize",
                instead: "await Context::synchronize_async instead",
            });
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        self.check_alive()
    }

    /// [`synchronize`](Self::synchronize) without blocking: completes once the work
    /// submitted so far has finished (see [`callback`](Self::callback) for how it waits).
    pub async fn synchronize_async(&self) -> Result<()> {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.callback(rx, Error::DeviceLost).await?;
        self.check_alive()
    }

    /// Copies `len` floats of `buffer` from byte `offset` back to the host and waits for
    /// them ([`Error::WouldBlock`] on wasm32, where only [`read_async`](Self::read_async)
    /// reads back).
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<Vec<f32>> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::WouldBlock {
                op: "reading a GPU buffer back synchronously",
                instead: "Tensor::to_vec_async reads a tensor back without blocking",
            });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        self.refuse_while_recording()?;
        let (staging, bytes) = self.stage(buffer, offset, len)?;
        let slice = staging.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        self.check_alive()?;
        rx.recv()
            .map_err(|e| Error::Readback(e.to_string()))?
            .map_err(|e| Error::Readback(e.to_string()))?;
        Self::copy_out(&staging, bytes, len)
    }

    /// Like [`read`](Self::read), without blocking and without a helper thread (see
    /// [`callback`](Self::callback) for how it waits).
    pub async fn read_async(
        self: Arc<Self>,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: usize,
    ) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.refuse_while_recording()?;
        let (staging, bytes) = self.stage(buffer, offset, len)?;
        let (tx, rx) = futures::channel::oneshot::channel();
        staging
            .slice(..bytes)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        let mapped = self
            .callback(rx, Error::Readback)
            .await
            .and_then(|r| r.map_err(|e| Error::Readback(e.to_string())));
        self.check_alive()?;
        mapped?;
        Self::copy_out(&staging, bytes, len)
    }

    /// Waits, without blocking, for what a wgpu callback sends on `rx` (`fail` wraps the
    /// message if the callback is dropped unrun; a failed device poll is
    /// [`Error::DeviceLost`]). Natively, wgpu runs callbacks when the device is polled:
    /// each time the future is polled it polls the device (non-blocking) and, until the
    /// callback has run, asks to be polled again; under a single-threaded executor that is
    /// a busy wait that keeps yielding. On wasm32 the browser runs the callback from its
    /// event loop, and the future simply waits to be woken (asking to be polled again there
    /// would starve the event loop).
    async fn callback<T>(
        &self,
        mut rx: futures::channel::oneshot::Receiver<T>,
        fail: fn(String) -> Error,
    ) -> Result<T> {
        futures::future::poll_fn(|cx| {
            if !cfg!(target_arch = "wasm32") {
                if let Err(e) = self.device.poll(wgpu::PollType::Poll) {
                    return std::task::Poll::Ready(Err(Error::DeviceLost(e.to_string())));
                }
            }
            match std::pin::Pin::new(&mut rx).poll(cx) {
                std::task::Poll::Ready(r) => {
                    std::task::Poll::Ready(r.map_err(|e| fail(e.to_string())))
                }
                std::task::Poll::Pending => {
                    if !cfg!(target_arch = "wasm32") {
                        cx.waker().wake_by_ref();
                    }
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    fn refuse_while_recording(&self) -> Result<()> {
        if self.is_recording() {
            return Err(Error::InvalidArgument {
                op: "to_vec",
                reason: "reading back inside Context::record: the values exist once the \
                         caller's encoder is submitted"
                    .into(),
            });
        }
        Ok(())
    }

    fn stage(&self, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<(wgpu::Buffer, u64)> {
        let bytes = (len * 4) as u64;
        self.guarded(|| {
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, bytes);
            self.queue.submit(Some(encoder.finish()));
            (staging, bytes)
        })
    }

    fn copy_out(staging: &wgpu::Buffer, bytes: u64, len: usize) -> Result<Vec<f32>> {
        let out = {
            let view = staging
                .slice(..bytes)
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?;
            bytemuck::cast_slice::<u8, f32>(&view)[..len].to_vec()
        };
        staging.unmap();
        Ok(out)
    }
}

pub(crate) fn storage_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}

fn check_limits(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Result<()> {
    let mut missing = Vec::new();
    if limits.max_storage_buffers_per_shader_stage < REQUIRED_STORAGE_BUFFERS {
        missing.push(format!(
            "max_storage_buffers_per_shader_stage = {} < {REQUIRED_STORAGE_BUFFERS}",
            limits.max_storage_buffers_per_shader_stage
        ));
    }
    let wg = super::kernels::WORKGROUP_SIZE;
    if limits.max_compute_invocations_per_workgroup < wg || limits.max_compute_workgroup_size_x < wg
    {
        missing.push(format!(
            "max_compute_invocations_per_workgroup = {} < {wg}",
            limits.max_compute_invocations_per_workgroup
        ));
    }
    if limits.max_compute_workgroup_storage_size < REQUIRED_WORKGROUP_STORAGE {
        missing.push(format!(
            "max_compute_workgroup_storage_size = {} < {REQUIRED_WORKGROUP_STORAGE}",
            limits.max_compute_workgroup_storage_size
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::UnsupportedAdapter {
            adapter: info.name.clone(),
            reason: missing.join(", "),
        })
    }
}

/// Whether kernel-only timing is offered: not on wasm32, where reading the timestamps back
/// would block.
const KERNEL_TIMING: bool = !cfg!(target_arch = "wasm32");

/// Validation + out-of-memory error scopes, popped together (dropped unpopped, they pop
/// and discard what they caught).
///
/// On wasm32 no scope is pushed and `pop` reports nothing: WebGPU settles a popped scope
/// only once the browser's event loop runs, which a synchronous call cannot wait for. The
/// errors go to the device's uncaptured-error handler instead, which a context on its own
/// device (`Context::new_async`, `from_adapter_async`) records for its next call to report
/// ([`GpuContext::check_alive`], at the start of every operation and after each readback);
/// on a device from `Context::from_device` they go to the application's own handler.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) struct Scope {
    validation: wgpu::ErrorScopeGuard,
    oom: wgpu::ErrorScopeGuard,
}

#[cfg(not(target_arch = "wasm32"))]
impl Scope {
    pub fn push(device: &wgpu::Device) -> Self {
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        Self { validation, oom }
    }

    pub fn pop(self) -> Result<()> {
        let validation = pollster::block_on(self.validation.pop());
        let oom = pollster::block_on(self.oom.pop());
        if let Some(e) = oom {
            return Err(Error::GpuOutOfMemory(e.to_string()));
        }
        if let Some(e) = validation {
            return Err(Error::GpuValidation(e.to_string()));
        }
        Ok(())
    }
}

/// See the native `Scope`: on wasm32, nothing to push or pop.
#[cfg(target_arch = "wasm32")]
pub(crate) struct Scope;

#[cfg(target_arch = "wasm32")]
impl Scope {
    pub fn push(_device: &wgpu::Device) -> Self {
        Scope
    }

    pub fn pop(self) -> Result<()> {
        Ok(())
    }
}
