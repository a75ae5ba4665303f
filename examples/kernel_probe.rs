//! Isolated-kernel probes behind benches/NOTES.md: how close can an element-wise pass or a
//! read-only reduction get to a plain copy on each adapter, and what costs the difference?
//!
//! cargo run --release --example kernel_probe -- [--rounds N]
//!
//! Every kernel runs over resnet_early's x (32×64×56×56 f32 = 25.7 MB, as vec4 units) and
//! is timed alone (submit + wait, data resident). Rounds alternate the kernels so that noise
//! from other work on the machine hits all of them alike; the table shows each kernel's
//! fastest round and its ratio to the grid-stride copy. The half-storage probes run the
//! crate's apply loop over the same values as float16 or bfloat16 (half the bytes), with the
//! crate's conversions (shaders/storage_half.wgsl) four or eight values a load, and, where
//! the adapter has SHADER_F16, with the device's own conversions.

use std::time::Instant;

use wgpu::util::DeviceExt;

const OUTER: u32 = 32;
const CHANNELS: u32 = 64;
/// vec4 units per (sample, channel) run: 56·56/4.
const INNER: u32 = 784;
const UNITS: u32 = OUTER * CHANNELS * INNER;
/// Units per workgroup in the chunked kernels: 8 per invocation.
const CHUNK: u32 = 2048;

/// Shared declarations: x, y, per-channel (mean, scale, shift) and a uniform copy of the
/// shape, so that a kernel can take each number as a constant or from the uniform.
fn header() -> String {
    declarations(
        "",
        "vec4<f32>",
        &format!("const INNER: u32 = {INNER}u;\nconst C: u32 = {CHANNELS}u;\nconst UNITS: u32 = {UNITS}u;\n"),
    )
}

/// A probe's declarations: `enable` directives, then x and y as arrays of `elem` (vec4<f32>;
/// for half values vec2<u32>: four a load, as the crate's vec4 units; vec4<u32>: eight;
/// vec4<f16>: four as f16), coef and u, then `extra`.
fn declarations(enable: &str, elem: &str, extra: &str) -> String {
    format!(
        "{enable}
@group(0) @binding(0) var<storage, read> x: array<{elem}>;
@group(0) @binding(1) var<storage, read_write> y: array<{elem}>;
@group(0) @binding(2) var<storage, read> coef: array<vec4<f32>>;
struct Shape {{ inner: u32, channels: u32, chunk: u32, units: u32 }}
@group(0) @binding(3) var<uniform> u: Shape;
{extra}"
    )
}

/// [`declarations`] over words, `unit` of them a load, with the crate's conversions for
/// float16 (`ty` = "f16") or bfloat16 ("bf16") as 4-value loads and stores.
fn crate_declarations(unit: u32, ty: &str) -> String {
    let conversions = format!(
        "{}
fn ld4(w: vec2<u32>) -> vec4<f32> {{ return vec4<f32>({ty}_ld2(w.x), {ty}_ld2(w.y)); }}
fn st4(v: vec4<f32>) -> vec2<u32> {{ return vec2<u32>({ty}_st2(v.xy), {ty}_st2(v.zw)); }}
",
        include_str!("../shaders/storage_half.wgsl")
    );
    declarations("", &format!("vec{unit}<u32>"), &conversions)
}

/// The half-storage probes: (name, what it shows, header, WGSL body, workgroups). Half
/// the bytes of the f32 kernels; the crate's apply loop with four or eight values a load.
fn half_kernels(native_f16: bool) -> Vec<(&'static str, &'static str, String, String, u32)> {
    let runs = OUTER * CHANNELS;
    let four = "let k = coef[wid.x % u.channels]; let start = wid.x * u.inner; for (var i = start + lid; i < start + u.inner; i += 256u) { y[i] = st4((ld4(x[i]) - vec4(k.x)) * k.y + vec4(k.z)); }";
    let eight = "let k = coef[wid.x % u.channels]; let n = u.inner / 2u; let start = wid.x * n; for (var i = start + lid; i < start + n; i += 256u) { let w = x[i]; let a = (ld4(w.xy) - vec4(k.x)) * k.y + vec4(k.z); let b = (ld4(w.zw) - vec4(k.x)) * k.y + vec4(k.z); y[i] = vec4<u32>(st4(a), st4(b)); }";
    let copy8 = format!("let stride = {}u; for (var i = wid.x * 256u + lid; i < UNITS / 2u; i += stride) {{ y[i] = x[i]; }}", UNITS / CHUNK * 256);
    let mut out = vec![(
        "copy of the half bytes, grid-stride (vec4<u32>)",
        "the half tensor's ceiling",
        crate_declarations(4, "bf16") + &format!("const UNITS: u32 = {UNITS}u;\n"),
        copy8,
        UNITS / CHUNK,
    )];
    for (ty, four_name, eight_name) in [
        (
            "bf16",
            "apply bfloat16, 4 values a load",
            "apply bfloat16, 8 values a load",
        ),
        (
            "f16",
            "apply float16, 4 values a load",
            "apply float16, 8 values a load",
        ),
    ] {
        out.push((
            four_name,
            "the crate's half units (vec2<u32>)",
            crate_declarations(2, ty),
            four.into(),
            runs,
        ));
        out.push((
            eight_name,
            "wider half units (vec4<u32>)",
            crate_declarations(4, ty),
            eight.into(),
            runs,
        ));
    }
    if native_f16 {
        // The device's conversions (SHADER_F16) on the words, and on f16 storage.
        let native = |unit: u32| {
            declarations(
                "",
                &format!("vec{unit}<u32>"),
                "fn ld4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
fn st4(v: vec4<f32>) -> vec2<u32> { return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw)); }
",
            )
        };
        out.push((
            "apply float16, pack2x16float / unpack2x16float, 4 values a load",
            "the device's conversions on the words",
            native(2),
            four.into(),
            runs,
        ));
        out.push((
            "apply float16, pack2x16float / unpack2x16float, 8 values a load",
            "the device's conversions on the words",
            native(4),
            eight.into(),
            runs,
        ));
        let storage = declarations("enable f16;", "vec4<f16>", "");
        out.push(("apply float16, f16 storage, 4 values a load", "the crate's native float16 (vec4<f16>)", storage, "let k = coef[wid.x % u.channels]; let start = wid.x * u.inner; for (var i = start + lid; i < start + u.inner; i += 256u) { y[i] = vec4<f16>((vec4<f32>(x[i]) - vec4(k.x)) * k.y + vec4(k.z)); }".into(), runs));
    }
    out
}

/// (name, what it shows, WGSL body of `main`, workgroups).
fn kernels() -> Vec<(&'static str, &'static str, String, u32)> {
    let chunks = UNITS / CHUNK;
    let runs = OUTER * CHANNELS;
    let stride = chunks * 256;
    vec![
        (
            "copy, grid-stride",
            "the ceiling",
            format!("for (var i = wid.x * 256u + lid; i < UNITS; i += {stride}u) {{ y[i] = x[i]; }}"),
            chunks,
        ),
        (
            "copy, chunk per workgroup",
            "same bytes, chunked mapping",
            "let base = wid.x * 2048u; for (var j = 0u; j < 8u; j++) { let i = base + j * 256u + lid; y[i] = x[i]; }".into(),
            chunks,
        ),
        (
            "sum, grid-stride (read only)",
            "what a statistics pass can cost at best",
            format!("var s = vec4(0.0); var s2 = vec4(0.0); for (var i = wid.x * 256u + lid; i < UNITS; i += {stride}u) {{ let d = x[i]; s += d; s2 += d * d; }} y[wid.x * 256u + lid] = s + s2;"),
            chunks,
        ),
        (
            "apply, run per workgroup, uniform shape",
            "the mapping the crate uses for long runs",
            "let k = coef[wid.x % u.channels]; let start = wid.x * u.inner; for (var i = start + lid; i < start + u.inner; i += 256u) { y[i] = (x[i] - vec4(k.x)) * k.y + vec4(k.z); }".into(),
            runs,
        ),
        (
            "apply, chunk + select, uniform shape",
            "chunked, channel picked among 4 preloaded by comparing with run boundaries",
            "let base = wid.x * u.chunk; let r0 = base / u.inner; let b1 = (r0 + 1u) * u.inner - base; let b2 = b1 + u.inner; let b3 = b2 + u.inner;
  let c0 = r0 % u.channels; let c1 = select(c0 + 1u, 0u, c0 + 1u == u.channels); let c2 = select(c1 + 1u, 0u, c1 + 1u == u.channels); let c3 = select(c2 + 1u, 0u, c2 + 1u == u.channels);
  let k0 = coef[c0]; let k1 = coef[c1]; let k2 = coef[c2]; let k3 = coef[c3];
  for (var j = 0u; j < 8u; j++) { let i = base + j * 256u + lid; if (i >= u.units) { break; } let li = i - base;
    let k = select(select(select(k0, k1, li >= b1), k2, li >= b2), k3, li >= b3); y[i] = (x[i] - vec4(k.x)) * k.y + vec4(k.z); }".into(),
            chunks,
        ),
        (
            "apply, chunk + select, constant shape",
            "the same with the shape compiled in (a per-shape pipeline)",
            "let base = wid.x * 2048u; let r0 = base / INNER;
  let k0 = coef[r0 % C]; let k1 = coef[(r0 + 1u) % C]; let k2 = coef[(r0 + 2u) % C]; let k3 = coef[(r0 + 3u) % C];
  for (var j = 0u; j < 8u; j++) { let i = base + j * 256u + lid; let d = i / INNER - r0;
    let k = select(select(select(k0, k1, d >= 1u), k2, d >= 2u), k3, d >= 3u); y[i] = (x[i] - vec4(k.x)) * k.y + vec4(k.z); }".into(),
            chunks,
        ),
        (
            "apply, channels-last columns, grid-stride",
            "resnet_early_nhwc (rows of 64 channels): the copy's loop, each invocation's 4 channels fixed",
            format!("let i0 = wid.x * 256u + lid; let q = i0 % (u.channels / 4u);
  let k0 = coef[q * 4u]; let k1 = coef[q * 4u + 1u]; let k2 = coef[q * 4u + 2u]; let k3 = coef[q * 4u + 3u];
  let m = vec4(k0.x, k1.x, k2.x, k3.x); let a = vec4(k0.y, k1.y, k2.y, k3.y); let b = vec4(k0.z, k1.z, k2.z, k3.z);
  for (var i = i0; i < UNITS; i += {stride}u) {{ y[i] = (x[i] - m) * a + b; }}"),
            chunks,
        ),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    if adapters.is_empty() {
        eprintln!(
            "kernel_probe: no adapter found (set WGPU_BACKEND, install a Vulkan or GL driver)"
        );
        std::process::exit(1);
    }
    for adapter in adapters {
        let info = adapter.get_info();
        // The device's float16 conversions: pack2x16float and unpack2x16float (downlevel
        // SHADER_F16_IN_F32), and f16 storage (SHADER_F16).
        let native_f16 = adapter.features().contains(wgpu::Features::SHADER_F16)
            && adapter
                .get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            required_features: adapter.features() & wgpu::Features::SHADER_F16,
            ..Default::default()
        }))
        .expect("device");
        let buffer = |bytes: usize, usage| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &vec![0x3c; bytes],
                usage,
            })
        };
        let x = buffer(UNITS as usize * 16, wgpu::BufferUsages::STORAGE);
        let y = buffer(UNITS as usize * 16, wgpu::BufferUsages::STORAGE);
        let coef = buffer(CHANNELS as usize * 16, wgpu::BufferUsages::STORAGE);
        let shape = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&[INNER, CHANNELS, CHUNK, UNITS]),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let all = kernels()
            .into_iter()
            .map(|(name, what, body, groups)| (name, what, header(), body, groups))
            .chain(half_kernels(native_f16));
        let prepared: Vec<_> = all
            .map(|(name, what, header, body, groups)| {
                // Every binding is touched, so that the one layout fits every kernel.
                let source = format!(
                    "{header}@compute @workgroup_size(256) fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
  _ = coef[0]; _ = u.units;
  {body}
}}"
                );
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: x.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: y.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 2, resource: coef.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 3, resource: shape.as_entire_binding() },
                    ],
                });
                (name, what, pipeline, bind, groups)
            })
            .collect();
        let run = |pipeline: &wgpu::ComputePipeline, bind: &wgpu::BindGroup, groups: u32| {
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind, &[]);
                pass.dispatch_workgroups(groups, 1, 1);
            }
            queue.submit(Some(encoder.finish()));
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .expect("poll");
        };
        for (_, _, pipeline, bind, groups) in &prepared {
            run(pipeline, bind, *groups); // compile and warm up
        }
        let mut best = vec![f64::INFINITY; prepared.len()];
        for _ in 0..rounds {
            for (k, (_, _, pipeline, bind, groups)) in prepared.iter().enumerate() {
                let t = Instant::now();
                run(pipeline, bind, *groups);
                best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!(
            "\n{:?}: {} ({} rounds, fastest)\n",
            info.backend, info.name, rounds
        );
        println!("| kernel | ms | copy ÷ kernel | shows |");
        println!("|---|---:|---:|---|");
        for ((name, what, ..), ms) in prepared.iter().zip(&best) {
            println!(
                "| {name} | {ms:.2} | {:.0} % | {what} |",
                best[0] / ms * 100.0
            );
        }
    }
}
