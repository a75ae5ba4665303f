//! Every WGSL kernel the crate compiles, checked for the backends we cannot run here.
//!
//! The test machines have Vulkan (lavapipe) and GL (llvmpipe) adapters only. Metal and
//! DX12 users get the same WGSL translated by naga at pipeline creation, so a kernel that
//! naga cannot translate to MSL or HLSL would only fail on their machines. Each source from
//! [`shader_sources`] is parsed with naga's WGSL front end, validated, and written as SPIR-V,
//! MSL, HLSL and GLSL (ES 3.10 and desktop 4.30) with the options wgpu's backends use or
//! stricter ones. A failure names the kernel and the target language.
//!
//! The subgroup variants (`*_subgroup_*`) are validated with naga's subgroup capability and
//! translated where wgpu offers `Features::SUBGROUP`: SPIR-V 1.3 (Vulkan 1.1), MSL 2.x and
//! HLSL shader model 6.0, not GLSL (wgpu's GL backend has no subgroups) nor the older
//! versions.
//!
//! The native float16 variants (`*_f16native_*`) are validated with naga's float16
//! capability and translated where wgpu offers `Features::SHADER_F16`: SPIR-V (with 16-bit
//! storage), MSL and HLSL shader model 6.2, not GLSL.
//!
//! Limits: this proves naga can translate the kernels, not that the platform compilers
//! (Metal, FXC/DXC, the GL driver) accept the result, nor that the results are right.

use naga::back::{glsl, hlsl, msl, spv};
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ShaderStage};
use wgpu_batchnorm::{shader_sources, WORKGROUP_SIZE};

/// The kernel families of `src/gpu/kernels.rs`; each must appear in `shader_sources()`.
const KERNELS: &[&str] = &[
    "stats_partials",
    "stats_finalize",
    "stats_running",
    "apply",
    "bwd_partials",
    "bwd_finalize",
    "bwd_dx",
];

/// Every kernel's entry point (the pipelines are created with `entry_point: Some("main")`).
const ENTRY_POINT: &str = "main";

/// Bounds-check policies: naga's default (no checks), `Restrict` (what wgpu's Vulkan backend
/// injects without robust buffer access) and `ReadZeroSkipWrite`. Each makes the writers
/// take different code paths; all must translate.
const POLICIES: &[(&str, BoundsCheckPolicies)] = &[
    (
        "unchecked",
        BoundsCheckPolicies {
            index: BoundsCheckPolicy::Unchecked,
            buffer: BoundsCheckPolicy::Unchecked,
            image_load: BoundsCheckPolicy::Unchecked,
            binding_array: BoundsCheckPolicy::Unchecked,
        },
    ),
    (
        "restrict",
        BoundsCheckPolicies {
            index: BoundsCheckPolicy::Restrict,
            buffer: BoundsCheckPolicy::Restrict,
            image_load: BoundsCheckPolicy::Restrict,
            binding_array: BoundsCheckPolicy::Unchecked,
        },
    ),
    (
        "read-zero-skip-write",
        BoundsCheckPolicies {
            index: BoundsCheckPolicy::ReadZeroSkipWrite,
            buffer: BoundsCheckPolicy::ReadZeroSkipWrite,
            image_load: BoundsCheckPolicy::ReadZeroSkipWrite,
            binding_array: BoundsCheckPolicy::ReadZeroSkipWrite,
        },
    ),
];

/// A parsed and validated kernel.
struct Parsed {
    name: String,
    module: Module,
    info: ModuleInfo,
    /// A subgroup variant: only for devices with `Features::SUBGROUP`.
    subgroups: bool,
    /// A native float16 variant: only for devices with `Features::SHADER_F16`.
    f16: bool,
}

/// Whether `name` is a variant with subgroup operations (`shader_sources` names them so).
fn is_subgroup_variant(name: &str) -> bool {
    name.contains("_subgroup_")
}

/// Whether `name` is a variant that stores WGSL `f16` (`shader_sources` names them so).
fn is_f16_variant(name: &str) -> bool {
    name.contains("_f16native_")
}

/// Parses and validates every kernel; panics naming each kernel that fails either step.
fn parsed_sources() -> Vec<Parsed> {
    let mut failures = Vec::new();
    let mut out = Vec::new();
    for (name, source) in shader_sources() {
        let module = match naga::front::wgsl::parse_str(&source) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!(
                    "kernel {name}: WGSL parse failed:\n{}",
                    e.emit_to_string(&source)
                ));
                continue;
            }
        };
        let (subgroups, f16) = (is_subgroup_variant(&name), is_f16_variant(&name));
        let mut caps = Capabilities::default();
        if subgroups {
            caps |= Capabilities::SUBGROUP;
        }
        if f16 {
            caps |= Capabilities::SHADER_FLOAT16;
        }
        let mut validator = Validator::new(ValidationFlags::all(), caps);
        if subgroups {
            validator.subgroup_stages(naga::valid::ShaderStages::COMPUTE);
            validator.subgroup_operations(naga::valid::SubgroupOperationSet::all());
        }
        match validator.validate(&module) {
            Ok(info) => out.push(Parsed {
                name,
                module,
                info,
                subgroups,
                f16,
            }),
            Err(e) => failures.push(format!(
                "kernel {name}: WGSL validation failed:\n{}",
                e.emit_to_string(&source)
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    out
}

/// Runs `translate` on every kernel (but the subgroup and native float16 variants where
/// `optional_features` is false: the target's wgpu backend has neither) and panics listing
/// every (kernel, target) that failed.
fn translate_all(
    target: &str,
    optional_features: bool,
    translate: impl Fn(&Parsed) -> Result<(), String>,
) {
    let failures: Vec<String> = parsed_sources()
        .iter()
        .filter(|p| optional_features || !p.subgroups && !p.f16)
        .filter_map(|p| {
            translate(p)
                .err()
                .map(|e| format!("kernel {} → {target}: {e}", p.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} kernel(s) failed to translate to {target}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sources_cover_every_kernel() {
    let sources = shader_sources();
    assert!(!sources.is_empty(), "shader_sources() is empty");
    let names: Vec<&str> = sources.iter().map(|(n, _)| n.as_str()).collect();
    for kernel in KERNELS {
        assert!(
            names.iter().any(
                |n| n.strip_prefix(kernel).is_some_and(|rest| rest.is_empty()
                    || rest.starts_with('_')
                        && !KERNELS
                            .iter()
                            .any(|k| n.starts_with(k) && k.len() > kernel.len()))
            ),
            "shader_sources() has no variant of kernel {kernel}; it has {names:?}"
        );
    }
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        names.len(),
        "duplicate kernel names in {names:?}"
    );
    for (name, source) in &sources {
        assert!(!source.trim().is_empty(), "kernel {name}: empty source");
    }
}

#[test]
fn wgsl_parses_and_validates() {
    for p in parsed_sources() {
        // One compute entry point named "main", with the workgroup size the host side
        // dispatches for (WORKGROUP_SIZE lives in one place: the composed `const WG`).
        let eps: Vec<_> = p
            .module
            .entry_points
            .iter()
            .map(|e| (e.name.as_str(), e.stage))
            .collect();
        assert_eq!(
            eps,
            [(ENTRY_POINT, ShaderStage::Compute)],
            "kernel {}: entry points",
            p.name
        );
        assert_eq!(
            p.module.entry_points[0].workgroup_size,
            [WORKGROUP_SIZE, 1, 1],
            "kernel {}: workgroup size",
            p.name
        );
    }
}

#[test]
fn translates_to_spirv() {
    translate_all("SPIR-V", true, |p| {
        for &(policy_name, policies) in POLICIES {
            // wgpu's Vulkan backend writes SPIR-V 1.0 for Vulkan 1.0 devices and 1.3 for
            // Vulkan 1.1 ones (lavapipe runs the newest; these are the oldest). Subgroups
            // need Vulkan 1.1.
            let versions: &[(u8, u8)] = if p.subgroups {
                &[(1, 3)]
            } else {
                &[(1, 0), (1, 3)]
            };
            for &lang_version in versions {
                let options = spv::Options {
                    lang_version,
                    bounds_check_policies: policies,
                    ..Default::default()
                };
                let pipeline = spv::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: ENTRY_POINT.into(),
                };
                let context = format!("(SPIR-V {lang_version:?}, {policy_name} bounds checks)");
                let words = spv::write_vec(&p.module, &p.info, &options, Some(&pipeline))
                    .map_err(|e| format!("{context} {e}"))?;
                if words.first() != Some(&0x0723_0203) {
                    return Err(format!("{context} output lacks the SPIR-V magic number"));
                }
            }
        }
        Ok(())
    });
}

#[test]
fn translates_to_msl() {
    translate_all("MSL", true, |p| {
        for &(policy_name, policies) in POLICIES {
            // wgpu's Metal backend writes the device's MSL version; check an old one and 2.0
            // (2.1 and later for subgroups: SIMD-group functions).
            let versions: &[(u8, u8)] = if p.subgroups {
                &[(2, 1), (2, 4)]
            } else {
                &[(1, 2), (2, 0)]
            };
            for &lang_version in versions {
                let options = msl::Options {
                    lang_version,
                    bounds_check_policies: policies,
                    ..Default::default()
                };
                let pipeline = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, ENTRY_POINT.into())),
                    ..Default::default()
                };
                let context = format!("(MSL {lang_version:?}, {policy_name} bounds checks)");
                let (text, info) = msl::write_string(&p.module, &p.info, &options, &pipeline)
                    .map_err(|e| format!("{context} {e}"))?;
                for ep in &info.entry_point_names {
                    ep.as_ref()
                        .map_err(|e| format!("{context} entry point: {e}"))?;
                }
                if !text.contains("kernel void") {
                    return Err(format!("{context} output has no kernel function"));
                }
            }
        }
        Ok(())
    });
}

#[test]
fn translates_to_hlsl() {
    translate_all("HLSL", true, |p| {
        // 5.1 is FXC's (wgpu's fallback compiler); 6.0 is DXC's minimum (and wave
        // intrinsics', which the subgroup variants need).
        // 6.2 for 16-bit types (native float16).
        let models: &[hlsl::ShaderModel] = if p.f16 {
            &[hlsl::ShaderModel::V6_2]
        } else if p.subgroups {
            &[hlsl::ShaderModel::V6_0]
        } else {
            &[hlsl::ShaderModel::V5_1, hlsl::ShaderModel::V6_0]
        };
        for &shader_model in models {
            let options = hlsl::Options {
                shader_model,
                ..Default::default()
            };
            let pipeline = hlsl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, ENTRY_POINT.into())),
            };
            let mut text = String::new();
            let info = hlsl::Writer::new(&mut text, &options, &pipeline)
                .write(&p.module, &p.info, None)
                .map_err(|e| format!("(shader model {shader_model:?}) {e}"))?;
            for ep in &info.entry_point_names {
                ep.as_ref()
                    .map_err(|e| format!("(shader model {shader_model:?}) entry point: {e}"))?;
            }
            if !text.contains("[numthreads(") {
                return Err(format!(
                    "(shader model {shader_model:?}) output has no compute entry point"
                ));
            }
        }
        Ok(())
    });
}

/// GLSL for one version, with every bounds-check policy.
fn glsl(p: &Parsed, version: glsl::Version) -> Result<(), String> {
    for &(policy_name, policies) in POLICIES {
        let options = glsl::Options {
            version,
            ..Default::default()
        };
        let pipeline = glsl::PipelineOptions {
            shader_stage: ShaderStage::Compute,
            entry_point: ENTRY_POINT.into(),
            multiview: None,
        };
        let context = format!("({version}, {policy_name} bounds checks)");
        let mut text = String::new();
        glsl::Writer::new(&mut text, &p.module, &p.info, &options, &pipeline, policies)
            .map_err(|e| format!("{context} {e}"))?
            .write()
            .map_err(|e| format!("{context} {e}"))?;
        if !text.contains("layout(local_size_x =") {
            return Err(format!("{context} output has no compute layout"));
        }
    }
    Ok(())
}

#[test]
fn translates_to_glsl_es_310() {
    // ES 3.10 is the first GLSL ES with compute shaders: wgpu's GL/GLES minimum for them.
    translate_all("GLSL ES 310", false, |p| {
        glsl(p, glsl::Version::new_gles(310))
    });
}

#[test]
fn translates_to_glsl_430() {
    // Desktop GL 4.3 is the first with compute shaders.
    translate_all("GLSL 430", false, |p| glsl(p, glsl::Version::Desktop(430)));
}

#[test]
fn reducing_kernels_have_subgroup_variants() {
    let names: Vec<String> = shader_sources().into_iter().map(|(n, _)| n).collect();
    for kernel in [
        "stats_partials",
        "bwd_partials",
        "stats_finalize",
        "bwd_finalize",
    ] {
        let want = format!("{kernel}_subgroup_scalar");
        assert!(names.contains(&want), "no {want} in {names:?}");
    }
    for (name, source) in shader_sources() {
        assert_eq!(
            is_subgroup_variant(&name),
            source.contains("subgroupShuffleDown"),
            "kernel {name}: the name and the source disagree on subgroups"
        );
        assert!(
            !source.contains("enable subgroups"),
            "kernel {name}: naga 30 rejects `enable subgroups;`"
        );
    }
}

#[test]
fn float16_kernels_have_native_variants() {
    let names: Vec<String> = shader_sources().into_iter().map(|(n, _)| n).collect();
    for kernel in [
        "apply",
        "stats_partials_cols",
        "bwd_dx_fused",
        "bwd_partials",
    ] {
        for units in ["pair", "quad"] {
            let want = format!("{kernel}_f16native_{units}");
            assert!(names.contains(&want), "no {want} in {names:?}");
        }
    }
    for (name, source) in shader_sources() {
        assert_eq!(
            is_f16_variant(&name),
            source.starts_with("enable f16;"),
            "kernel {name}: the name and the source disagree on native float16"
        );
    }
}
