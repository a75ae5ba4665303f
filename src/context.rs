//! [`Context`]: where tensors live and kernels run (one wgpu device, or the CPU), and
//! [`Tensor`], an f32 tensor resident there.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cpu::buffers::HostBuffer;
use crate::dtype::{DType, HalfFloat};
use crate::error::{Error, Result};
use crate::gpu::context::{candidate_adapters, ContextOptions, DeviceTuning, GpuContext};
use crate::gpu::pool::GpuBuffer;
use crate::shape::{Layout, Shape};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A compute backend: one wgpu device with the crate's pipelines built, or the CPU.
/// Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    backend: Backend,
}

pub(crate) enum Backend {
    Gpu(Arc<GpuContext>),
    Cpu,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Context(#{}, {})", self.inner.id, self.name())
    }
}

/// Runs `f` to completion on this thread. On wasm32, which cannot block, `f` is dropped
/// unpolled and the result is [`Error::WouldBlock`] naming `op` and what to call `instead`.
#[cfg(not(target_arch = "wasm32"))]
fn block_on<T>(_op: &'static str, _instead: &'static str, f: impl Future<Output = T>) -> Result<T> {
    Ok(pollster::block_on(f))
}

#[cfg(target_arch = "wasm32")]
fn block_on<T>(op: &'static str, instead: &'static str, f: impl Future<Output = T>) -> Result<T> {
    drop(f);
    Err(Error::WouldBlock { op, instead })
}

impl Context {
    /// The best adapter available: a real GPU before a software one. Honours
    /// `WGPU_BACKEND` (e.g. `vulkan`, `gl`) and `WGPU_ADAPTER_NAME` (substring match) like
    /// wgpu's own tools. Fails with [`Error::NoAdapter`] naming the backends tried;
    /// [`Context::cpu`] is the fallback that always works.
    ///
    /// Blocks on [`new_async`](Self::new_async); on wasm32, which cannot block, it returns
    /// [`Error::WouldBlock`]: await `new_async` there.
    pub fn new() -> Result<Self> {
        block_on(
            "Context::new",
            "await Context::new_async instead",
            Self::new_async(),
        )?
    }

    /// [`new`](Self::new) as a future, without blocking: the way to a GPU context on
    /// wasm32 (WebGPU: the browser's adapter), and on every other target too.
    pub async fn new_async() -> Result<Self> {
        let (adapters, tried, filter) = candidate_adapters().await;
        let mut last_err = None;
        for adapter in &adapters {
            match Self::from_adapter_async(adapter).await {
                Ok(ctx) => return Ok(ctx),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(Error::NoAdapter { tried, filter }))
    }

    /// One context per usable adapter (same environment filters as [`Context::new`]),
    /// best first, with the error of each adapter that failed.
    ///
    /// On wasm32 the one entry is [`Error::WouldBlock`]: await
    /// [`all_gpus_async`](Self::all_gpus_async) there (likewise for
    /// [`all_gpus_with`](Self::all_gpus_with) and [`all_gpus_tuned`](Self::all_gpus_tuned)).
    pub fn all_gpus() -> Vec<Result<Self>> {
        Self::all_gpus_with(ContextOptions::default())
    }

    /// [`all_gpus`](Self::all_gpus) with options.
    pub fn all_gpus_with(options: ContextOptions) -> Vec<Result<Self>> {
        Self::all_gpus_tuned(options, DeviceTuning::default())
    }

    /// [`all_gpus_with`](Self::all_gpus_with) with performance knobs or emulated limits
    /// (e.g. the discrete-GPU work partitioning on a software adapter).
    pub fn all_gpus_tuned(options: ContextOptions, tuning: DeviceTuning) -> Vec<Result<Self>> {
        block_on(
            "Context::all_gpus",
            "await Context::all_gpus_async or all_gpus_tuned_async instead",
            Self::all_gpus_tuned_async(options, tuning),
        )
        .unwrap_or_else(|e| vec![Err(e)])
    }

    /// [`all_gpus`](Self::all_gpus) as a future, without blocking (every target).
    pub async fn all_gpus_async() -> Vec<Result<Self>> {
        Self::all_gpus_tuned_async(ContextOptions::default(), DeviceTuning::default()).await
    }

    /// [`all_gpus_tuned`](Self::all_gpus_tuned) as a future, without blocking (every target).
    pub async fn all_gpus_tuned_async(
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Vec<Result<Self>> {
        let (adapters, _, _) = candidate_adapters().await;
        let mut out = Vec::with_capacity(adapters.len());
        for a in &adapters {
            out.push(Self::from_adapter_tuned_async(a, options, tuning).await);
        }
        out
    }

    /// A context on a specific adapter. On wasm32 it returns [`Error::WouldBlock`] (as do
    /// [`from_adapter_with`](Self::from_adapter_with) and
    /// [`from_adapter_tuned`](Self::from_adapter_tuned)): await
    /// [`from_adapter_async`](Self::from_adapter_async) there.
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        Self::from_adapter_with(adapter, ContextOptions::default())
    }

    /// A context on a specific adapter, with options.
    pub fn from_adapter_with(adapter: &wgpu::Adapter, options: ContextOptions) -> Result<Self> {
        Self::from_adapter_tuned(adapter, options, DeviceTuning::default())
    }

    /// A context on a specific adapter, with options and tuning.
    pub fn from_adapter_tuned(
        adapter: &wgpu::Adapter,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        block_on(
            "Context::from_adapter",
            "await Context::from_adapter_async or from_adapter_tuned_async instead",
            Self::from_adapter_tuned_async(adapter, options, tuning),
        )?
    }

    /// [`from_adapter`](Self::from_adapter) as a future, without blocking (every target).
    pub async fn from_adapter_async(adapter: &wgpu::Adapter) -> Result<Self> {
        Self::from_adapter_tuned_async(adapter, ContextOptions::default(), DeviceTuning::default())
            .await
    }

    /// [`from_adapter_tuned`](Self::from_adapter_tuned) as a future, without blocking
    /// (every target).
    pub async fn from_adapter_tuned_async(
        adapter: &wgpu::Adapter,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        Ok(Self::with_backend(Backend::Gpu(Arc::new(
            GpuContext::from_adapter(adapter, options, tuning).await?,
        ))))
    }

    /// A context on a device the application already owns (its limits must meet
    /// [`REQUIRED_STORAGE_BUFFERS`](crate::REQUIRED_STORAGE_BUFFERS) storage buffers per
    /// stage and 256-invocation workgroups).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::from_device_tuned(
            device,
            queue,
            ContextOptions::default(),
            DeviceTuning::default(),
        )
    }

    /// [`from_device`](Self::from_device) with options and tuning.
    pub fn from_device_tuned(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: ContextOptions,
        tuning: DeviceTuning,
    ) -> Result<Self> {
        Ok(Self::with_backend(Backend::Gpu(Arc::new(
            GpuContext::from_device(device, queue, options, tuning)?,
        ))))
    }

    /// The caching allocator's counters (bytes cached and live, hits, misses, the cap), on a
    /// GPU context; `None` on the CPU, whose tensors are plain host memory.
    pub fn memory_stats(&self) -> Option<crate::MemoryStats> {
        match &self.inner.backend {
            Backend::Gpu(g) => Some(g.memory_stats()),
            Backend::Cpu => None,
        }
    }

    /// Releases the GPU buffers the caching allocator holds for reuse (PyTorch's
    /// `torch.cuda.empty_cache()`); buffers of live tensors stay. Returns the bytes
    /// released. On the CPU: the freed tensor buffers the CPU path keeps for its next
    /// outputs (a few, of at least 256 KiB each and 256 MiB in all, shared by every CPU
    /// context of the process).
    pub fn release_cached_buffers(&self) -> u64 {
        match &self.inner.backend {
            Backend::Gpu(g) => g.release_cached_buffers(),
            Backend::Cpu => crate::cpu::buffers::release(),
        }
    }

    /// The most values per channel for which a training forward on this context runs in
    /// one pass (one dispatch that holds each channel in workgroup memory, reading x
    /// once); a backward, half of it. `None` unless the context's tuning asks for them
    /// ([`DeviceTuning::one_pass`](crate::DeviceTuning::one_pass)), on the CPU, and on a
    /// device with fewer than 7 storage buffers per shader stage. Tensors past one storage
    /// binding always take the two-pass kernels.
    pub fn one_pass_capacity(&self) -> Option<usize> {
        match &self.inner.backend {
            Backend::Gpu(g) => g.one_pass_cap().map(|c| c as usize),
            Backend::Cpu => None,
        }
    }

    /// Compute dispatches this context has encoded so far (0 on the CPU): launch counts,
    /// for profiling and tests (a training forward is 1 dispatch in one pass, 3 in two).
    pub fn dispatch_count(&self) -> u64 {
        match &self.inner.backend {
            Backend::Gpu(g) => g.dispatches.load(std::sync::atomic::Ordering::Relaxed),
            Backend::Cpu => 0,
        }
    }

    /// The tuning in force on a GPU context (partitioning resolved for the device, the
    /// offset alignment chunks are bound at, whether subgroup reductions and native
    /// float16 run); `None` on the CPU.
    pub fn tuning(&self) -> Option<DeviceTuning> {
        match &self.inner.backend {
            Backend::Gpu(g) => Some(g.tuning),
            Backend::Cpu => None,
        }
    }

    /// The CPU backend: same API and semantics, multithreaded (single-threaded on wasm32),
    /// no GPU needed.
    pub fn cpu() -> Self {
        Self::with_backend(Backend::Cpu)
    }

    fn with_backend(backend: Backend) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                backend,
            }),
        }
    }

    /// A process-unique id (errors about mixed contexts name it).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// `"cpu"`, or `"<backend>: <adapter name>"`
    /// (e.g. `"vulkan: llvmpipe (LLVM 15.0.6, 256 bits)"`).
    pub fn name(&self) -> String {
        match &self.inner.backend {
            Backend::Cpu => "cpu".into(),
            Backend::Gpu(g) => format!("{}: {}", g.info.backend.to_str(), g.info.name),
        }
    }

    /// The wgpu backend ("vulkan", "gl", "metal", "dx12", ...) or "cpu".
    pub fn backend_kind(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Cpu => "cpu",
            Backend::Gpu(g) => g.info.backend.to_str(),
        }
    }

    /// The adapter's description, on a GPU context.
    pub fn adapter_info(&self) -> Option<&wgpu::AdapterInfo> {
        match &self.inner.backend {
            Backend::Gpu(g) => Some(&g.info),
            Backend::Cpu => None,
        }
    }

    /// The wgpu device and queue, on a GPU context (to share buffers with an application).
    pub fn wgpu(&self) -> Option<(&wgpu::Device, &wgpu::Queue)> {
        match &self.inner.backend {
            Backend::Gpu(g) => Some((&g.device, &g.queue)),
            Backend::Cpu => None,
        }
    }

    /// Blocks until every operation submitted so far has finished (a no-op on the CPU,
    /// whose operations are synchronous). For timing; readbacks wait on their own. On a GPU
    /// context on wasm32 it returns [`Error::WouldBlock`]: await
    /// [`synchronize_async`](Self::synchronize_async) there.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Gpu(g) => g.synchronize(),
            Backend::Cpu => Ok(()),
        }
    }

    /// [`synchronize`](Self::synchronize) as a future, without blocking and without a
    /// thread (every target): completes once every operation submitted so far has finished.
    pub async fn synchronize_async(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Gpu(g) => g.synchronize_async().await,
            Backend::Cpu => Ok(()),
        }
    }

    /// Whether kernel-only timing is available (a GPU with timestamp queries; never on
    /// wasm32, where reading the timestamps back would block).
    pub fn has_kernel_timing(&self) -> bool {
        matches!(&self.inner.backend, Backend::Gpu(g) if g.timer.is_some())
    }

    /// Switches kernel-only timing on or off (see [`take_kernel_time`](Self::take_kernel_time));
    /// returns whether it is available.
    pub fn set_kernel_timing(&self, on: bool) -> bool {
        match &self.inner.backend {
            Backend::Gpu(g) => g.timer.as_ref().map(|t| t.set_enabled(on)).is_some(),
            Backend::Cpu => false,
        }
    }

    /// Waits for the device, then returns the GPU time the compute passes of every
    /// operation since the last call took (timestamp queries at each pass's start and end),
    /// or `None` where kernel timing is unavailable.
    pub fn take_kernel_time(&self) -> Result<Option<std::time::Duration>> {
        match &self.inner.backend {
            Backend::Gpu(g) => match &g.timer {
                Some(t) => t.take(&g.device).map(Some),
                None => Ok(None),
            },
            Backend::Cpu => Ok(None),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The kernel families of this context's backend (the op layer's only way in).
    pub(crate) fn kernels(&self) -> &dyn crate::backend::Backend {
        match &self.inner.backend {
            Backend::Gpu(g) => g.as_ref(),
            Backend::Cpu => &crate::cpu::backend::CpuBackend,
        }
    }

    /// Fails unless `other` is this context.
    pub(crate) fn check_same(&self, what: &'static str, other: u64) -> Result<()> {
        if other == self.id() {
            Ok(())
        } else {
            Err(Error::ContextMismatch {
                what,
                expected: self.id(),
                got: other,
            })
        }
    }

    /// Runs `f`, in which every operation of this context on this thread — layer methods
    /// and the functional API alike — encodes its dispatches into `encoder` instead of
    /// submitting them; the caller submits the encoder when it likes. Outputs are tensors
    /// whose buffers the caller can bind in the same encoder, after the recorded work. The
    /// parameters of the recorded dispatches are written with `queue.write_buffer`, which
    /// lands before the caller's submission. Inside `f`, reading a tensor of this context
    /// back is refused ([`Error::InvalidArgument`]: its values exist only once the encoder
    /// is submitted), and recordings do not nest. Validation errors of the recorded commands
    /// surface when the caller finishes the encoder. On the CPU context `f` simply runs
    /// (its operations are synchronous) and the encoder stays empty.
    pub fn record<T>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        match &self.inner.backend {
            Backend::Gpu(g) => g.record(encoder, f),
            Backend::Cpu => f(),
        }
    }

    /// A tensor over a caller's buffer, without a copy: `dims` (logical (N, C, ...)) values
    /// in `layout` order, f32, starting `offset` bytes into `buffer`. The buffer must have
    /// `STORAGE` usage (and `COPY_SRC` for [`Tensor::to_vec`]), the offset must be a
    /// multiple of the device's `min_storage_buffer_offset_alignment`, the values must lie
    /// inside the buffer, and the buffer must come from this context's device; each failure
    /// is an [`Error::InvalidBuffer`] saying which (on wasm32, where errors surface
    /// asynchronously, another device's buffer is not caught here: its validation error
    /// comes from a later call). The crate only reads the tensor (ops
    /// that update running statistics in place write into it, as PyTorch does); the caller
    /// keeps ownership and must not write the buffer while work that reads it is pending.
    pub fn tensor_from_buffer(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        dims: &[usize],
        layout: Layout,
    ) -> Result<Tensor> {
        self.tensor_from_buffer_typed(buffer, offset, dims, layout, DType::F32)
    }

    /// [`tensor_from_buffer`](Self::tensor_from_buffer) over values of `dtype`: for the
    /// half types a native little-endian half array (two values per 32-bit word, the last
    /// word's upper half unused when the count is odd); the buffer must hold whole words.
    pub fn tensor_from_buffer_typed(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        dims: &[usize],
        layout: Layout,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = Shape::with_layout(dims, layout)?;
        let Backend::Gpu(g) = &self.inner.backend else {
            return Err(Error::InvalidBuffer {
                reason: "the CPU context holds its tensors in host memory".into(),
            });
        };
        g.check_external(buffer, offset, (dtype.words(shape.numel()) * 4) as u64)?;
        Ok(Tensor {
            ctx: self.clone(),
            shape,
            data: Data::Gpu(Arc::new(GpuBuffer::external(buffer.clone(), offset))),
            dtype,
        })
    }

    /// A channels-first (contiguous, PyTorch's default) tensor holding `data`.
    pub fn tensor_from_slice(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        self.tensor_with_layout(data, dims, Layout::ChannelsFirst)
    }

    /// A tensor whose `data` is in `layout` order; `dims` is the logical (N, C, ...) shape.
    pub fn tensor_with_layout(
        &self,
        data: &[f32],
        dims: &[usize],
        layout: Layout,
    ) -> Result<Tensor> {
        let shape = shape_for(dims, layout, data.len())?;
        let data = match &self.inner.backend {
            Backend::Cpu => {
                let mut v = crate::cpu::buffers::take(data.len());
                v.extend_from_slice(data);
                Data::cpu(v)
            }
            Backend::Gpu(g) => Data::Gpu(Arc::new(g.upload(data, "tensor")?)),
        };
        Ok(Tensor {
            ctx: self.clone(),
            shape,
            data,
            dtype: DType::F32,
        })
    }

    /// A tensor of half values (`half::f16` or `half::bf16`: dtype float16 or bfloat16) in
    /// `layout` order; `dims` is the logical (N, C, ...) shape. It is stored two values per
    /// 32-bit word, byte for byte a native half array (on a GPU and on the CPU).
    pub fn tensor_from_half<T: HalfFloat>(
        &self,
        data: &[T],
        dims: &[usize],
        layout: Layout,
    ) -> Result<Tensor> {
        let shape = shape_for(dims, layout, data.len())?;
        let dtype = T::DTYPE;
        let bits: Vec<u16> = data.iter().map(|h| h.to_bits()).collect();
        let words = crate::dtype::pack_words(&bits);
        let data = match &self.inner.backend {
            Backend::Cpu => {
                let mut v = crate::cpu::buffers::take(words.len());
                v.extend(words.iter().map(|&w| f32::from_bits(w)));
                Data::cpu(v)
            }
            Backend::Gpu(g) => {
                Data::Gpu(Arc::new(g.upload(bytemuck::cast_slice(&words), "tensor")?))
            }
        };
        Ok(Tensor {
            ctx: self.clone(),
            shape,
            data,
            dtype,
        })
    }
}

/// The shape of `dims` in `layout`, checked against the `len` values given for it.
fn shape_for(dims: &[usize], layout: Layout, len: usize) -> Result<Shape> {
    let shape = Shape::with_layout(dims, layout)?;
    if len != shape.numel() {
        return Err(Error::DataLength {
            shape: dims.to_vec(),
            expected: shape.numel(),
            got: len,
        });
    }
    Ok(shape)
}

/// Where a tensor's values are.
#[derive(Clone)]
pub(crate) enum Data {
    Gpu(Arc<GpuBuffer>),
    Cpu(Arc<HostBuffer>),
}

impl Data {
    /// Host values as CPU tensor data.
    pub(crate) fn cpu(v: Vec<f32>) -> Self {
        Data::Cpu(Arc::new(HostBuffer::new(v)))
    }
}

/// A tensor resident in its [`Context`] (GPU memory, or host memory for the CPU backend),
/// of float32 values or of a half type ([`DType`]). Immutable; operations return new
/// tensors. Cheap to clone.
#[derive(Clone)]
pub struct Tensor {
    ctx: Context,
    shape: Shape,
    pub(crate) data: Data,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {}, {:?})",
            self.shape.dims(),
            self.shape.layout(),
            self.dtype,
            self.ctx
        )
    }
}

impl Tensor {
    pub(crate) fn new(ctx: &Context, shape: Shape, data: Data) -> Self {
        Self::typed(ctx, shape, data, DType::F32)
    }

    /// A tensor of `dtype` over `data` (its storage words: f32 values, or half values two
    /// to a word).
    pub(crate) fn typed(ctx: &Context, shape: Shape, data: Data, dtype: DType) -> Self {
        Self {
            ctx: ctx.clone(),
            shape,
            data,
            dtype,
        }
    }

    /// The storage type of the values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// 32-bit words of storage the values take.
    pub(crate) fn words(&self) -> usize {
        self.dtype.words(self.numel())
    }

    /// f32 values from `words` of this tensor's storage.
    fn widen_words(&self, words: Vec<f32>) -> Vec<f32> {
        if self.dtype == DType::F32 {
            return words;
        }
        let bits = crate::dtype::unpack_words(bytemuck::cast_slice(&words), self.numel());
        bits.into_iter()
            .map(|b| self.dtype.value_of_bits(b))
            .collect()
    }

    /// The values as `T` (the tensor's own half type, else [`Error::DTypeMismatch`]), in
    /// memory (layout) order. Blocks like [`to_vec`](Self::to_vec).
    pub fn to_half_vec<T: HalfFloat>(&self) -> Result<Vec<T>> {
        if self.dtype != T::DTYPE {
            return Err(Error::DTypeMismatch {
                what: "Tensor::to_half_vec: the element type must be the tensor's dtype",
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        // The stored words themselves: bit for bit what was uploaded or computed.
        let words = match (&self.data, self.ctx.backend()) {
            (Data::Cpu(v), _) => v[..self.words()].to_vec(),
            (Data::Gpu(b), Backend::Gpu(g)) => g.read(b, b.offset, self.words())?,
            (Data::Gpu(_), Backend::Cpu) => unreachable!("GPU data in a CPU context"),
        };
        let bits = crate::dtype::unpack_words(bytemuck::cast_slice(&words), self.numel());
        Ok(bits.into_iter().map(T::from_bits).collect())
    }

    /// The logical shape (N, C, ...).
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Shape and layout.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.shape.layout()
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// The context this tensor lives in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The values in memory (layout) order, as f32 (half values widen exactly). Blocks
    /// until the GPU has finished the work that produces them. On wasm32, which cannot block, a GPU tensor's `to_vec` returns
    /// [`Error::WouldBlock`]: await [`to_vec_async`](Self::to_vec_async) there.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.data {
            Data::Cpu(v) => Ok(self.widen_words(v.to_vec())),
            Data::Gpu(_) if cfg!(target_arch = "wasm32") => Err(Error::WouldBlock {
                op: "Tensor::to_vec",
                instead: "await Tensor::to_vec_async instead",
            }),
            Data::Gpu(b) => match self.ctx.backend() {
                Backend::Gpu(g) => Ok(self.widen_words(g.read(b, b.offset, self.words())?)),
                Backend::Cpu => unreachable!("GPU data in a CPU context"),
            },
        }
    }

    /// [`to_vec`](Self::to_vec) without blocking the calling task and without a thread:
    /// natively the future polls the device (non-blocking) each time it is polled; on
    /// wasm32 the browser's event loop completes the mapping and wakes it. It completes when
    /// the data is on the host (every target).
    pub async fn to_vec_async(&self) -> Result<Vec<f32>> {
        match &self.data {
            Data::Cpu(v) => Ok(self.widen_words(v.to_vec())),
            Data::Gpu(b) => match self.ctx.backend() {
                Backend::Gpu(g) => {
                    let words = g.clone().read_async(b, b.offset, self.words()).await?;
                    Ok(self.widen_words(words))
                }
                Backend::Cpu => unreachable!("GPU data in a CPU context"),
            },
        }
    }

    /// The GPU buffer behind this tensor, for interop with wgpu code. The values start at
    /// [`wgpu_offset`](Self::wgpu_offset) (0 for the crate's own buffers, which may be
    /// larger than the tensor: their sizes are rounded to a class).
    pub fn wgpu_buffer(&self) -> Option<&wgpu::Buffer> {
        match &self.data {
            Data::Gpu(b) => Some(&**b),
            Data::Cpu(_) => None,
        }
    }

    /// The byte offset of the tensor's first value in [`wgpu_buffer`](Self::wgpu_buffer).
    pub fn wgpu_offset(&self) -> Option<u64> {
        match &self.data {
            Data::Gpu(b) => Some(b.offset),
            Data::Cpu(_) => None,
        }
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Gpu(_) => f.write_str("gpu"),
            Data::Cpu(_) => f.write_str("cpu"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn the_async_forms_are_send_futures_and_work_on_the_cpu() {
        assert_send(&Context::new_async());
        assert_send(&Context::all_gpus_async());
        let ctx = Context::cpu();
        assert_send(&ctx.synchronize_async());
        futures::executor::block_on(ctx.synchronize_async()).unwrap();
        let x = ctx.tensor_from_slice(&[1.0, 2.0], &[1, 2]).unwrap();
        assert_send(&x.to_vec_async());
        let v = futures::executor::block_on(x.to_vec_async()).unwrap();
        assert_eq!(v, [1.0, 2.0]);
    }
}
