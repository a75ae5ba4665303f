//! Batch norm on the caller's own wgpu objects: this program creates its device, its
//! buffers and a kernel of its own that writes x and dy on the GPU, then records a
//! batch-norm training forward and backward into its own command encoder, after its own
//! kernel, and submits once. x never exists on the host; the f64 oracle recomputes it from
//! the same formula to check y and dx. Prints PASS or FAIL against a stated tolerance.
//!
//! cargo run --release --example interop        (WGPU_BACKEND=vulkan|gl picks the adapter)

use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Layout, Shape};

/// The caller's kernel: x[i] and dy[i] from i, exactly representable in f32 (multiples of
/// 2^-7 in [-8, 8)), so the host can recompute them bit for bit.
const FILL: &str = "
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> dy: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i < arrayLength(&x)) {
        x[i] = f32((i * 7919u + 13u) % 2048u) * 0.0078125 - 8.0;
        dy[i] = f32((i * 104729u + 7u) % 256u) * 0.0078125 - 1.0;
    }
}";

fn value(i: usize, mul: usize, add: usize, modulus: usize, shift: f32) -> f32 {
    ((i * mul + add) % modulus) as f32 * 0.0078125 - shift
}

fn main() {
    std::process::exit(match run() {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    });
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    // The application's own device.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("application"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    println!(
        "adapter: {:?} ({:?})",
        adapter.get_info().name,
        adapter.get_info().backend
    );
    let ctx = Context::from_device(device.clone(), queue.clone())?;

    // Its buffers, written only by its kernel.
    let dims = [16usize, 24, 20, 20];
    let n: usize = dims.iter().product();
    let storage = |label| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (n * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let (xb, dyb) = (storage("x"), storage("dy"));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("fill"),
        source: wgpu::ShaderSource::Wgsl(FILL.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("fill"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("fill"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: xb.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: dyb.as_entire_binding(),
            },
        ],
    });

    // The library's tensors over those buffers: no copy.
    let x = ctx.tensor_from_buffer(&xb, 0, &dims, Layout::ChannelsFirst)?;
    let dy = ctx.tensor_from_buffer(&dyb, 0, &dims, Layout::ChannelsFirst)?;
    let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(dims[1]))?;

    // One encoder: the application's kernel, then the recorded forward and backward.
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("step"),
    });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        let groups = n.div_ceil(64) as u32;
        pass.dispatch_workgroups(groups.min(65535), groups.div_ceil(65535), 1);
    }
    let (out, grads) = ctx.record(&mut encoder, || {
        let out = bn.forward_train(&x)?;
        let grads = bn.backward(&dy, &x, &out.saved)?;
        Ok((out, grads))
    })?;
    queue.submit(Some(encoder.finish()));

    // Check against the oracle, which recomputes x and dy from the kernel's formula.
    let xs: Vec<f32> = (0..n).map(|i| value(i, 7919, 13, 2048, 8.0)).collect();
    let dys: Vec<f32> = (0..n).map(|i| value(i, 104729, 7, 256, 1.0)).collect();
    let shape = Shape::new(&dims)?;
    let mut reference = ReferenceBatchNorm::new(*bn.config());
    let want = reference.forward_train(&xs, &shape)?;
    let want_grads = reference.backward(&dys, &xs, &shape, &want);
    let max_err = |got: &[f32], want: &[f64]| {
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
    };
    let dx = grads.dx.expect("dx was asked for").to_vec()?;
    let dw = grads.dweight.expect("affine").to_vec()?;
    let rm = bn.running_mean()?.expect("tracked");
    // O(1) data in f32: y and dx to 1e-4; dγ sums 6400 terms of O(1): 1e-2.
    let checks = [
        ("y", max_err(&out.y.to_vec()?, &want.y), 1e-4),
        ("dx", max_err(&dx, &want_grads.dx), 1e-4),
        ("dweight", max_err(&dw, &want_grads.dweight), 1e-2),
        ("running_mean", max_err(&rm, &reference.running_mean), 1e-5),
    ];
    let mut ok = true;
    for (name, err, tol) in checks {
        let pass = err <= tol;
        ok &= pass;
        println!(
            "{name:>12}: max |err| vs f64 oracle {err:.2e} (tolerance {tol:.0e}) {}",
            if pass { "PASS" } else { "FAIL" }
        );
    }
    Ok(ok)
}
