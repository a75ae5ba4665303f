//! Interop with the caller's wgpu objects: tensors over the caller's buffers (zero-copy,
//! validated), and every operation recorded into the caller's encoder giving what the
//! default, self-submitting form gives. GPU adapters only (the CPU context is checked for
//! its typed refusal); every adapter and partitioning of `common::backends`.

mod common;

use common::{normal, on_every_backend};
use wgpu_batchnorm::{ops, BatchNorm, BatchNormConfig, Context, Error, GradMask, Layout, Tensor};

fn gpu(ctx: &Context) -> Option<(&wgpu::Device, &wgpu::Queue)> {
    ctx.wgpu()
}

/// A buffer with `values` at byte `offset` (the bytes before hold garbage).
fn buffer_with(
    ctx: &Context,
    values: &[f32],
    offset: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let (device, queue) = gpu(ctx).unwrap();
    let b = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller's"),
        size: offset + (values.len() * 4) as u64,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let garbage = vec![f32::NAN; offset as usize / 4];
    queue.write_buffer(&b, 0, bytemuck::cast_slice(&garbage));
    queue.write_buffer(&b, offset, bytemuck::cast_slice(values));
    b
}

fn storage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC
}

#[test]
fn tensors_over_caller_buffers_compute_what_uploaded_tensors_do() {
    on_every_backend("tensors_over_caller_buffers", |ctx| {
        let Some((device, _)) = gpu(ctx) else { return };
        let align = device.limits().min_storage_buffer_offset_alignment as u64;
        let dims = [6, 5, 7, 3];
        let xs = normal(6 * 5 * 21, 1, 0.5, 2.0);
        let dys = normal(6 * 5 * 21, 2, 0.0, 1.0);
        for offset in [0, align, 4 * align] {
            let x = ctx
                .tensor_from_buffer(
                    &buffer_with(ctx, &xs, offset, storage()),
                    offset,
                    &dims,
                    Layout::ChannelsFirst,
                )
                .unwrap();
            let dy = ctx
                .tensor_from_buffer(
                    &buffer_with(ctx, &dys, offset, storage()),
                    offset,
                    &dims,
                    Layout::ChannelsFirst,
                )
                .unwrap();
            assert_eq!(x.to_vec().unwrap(), xs, "offset {offset}");
            assert_eq!(x.wgpu_offset(), Some(offset));
            let (xu, dyu) = (
                ctx.tensor_from_slice(&xs, &dims).unwrap(),
                ctx.tensor_from_slice(&dys, &dims).unwrap(),
            );
            let mut a = BatchNorm::new(ctx, BatchNormConfig::new(5)).unwrap();
            let mut b = BatchNorm::new(ctx, BatchNormConfig::new(5)).unwrap();
            let (oa, ob) = (a.forward_train(&x).unwrap(), b.forward_train(&xu).unwrap());
            assert_eq!(
                oa.y.to_vec().unwrap(),
                ob.y.to_vec().unwrap(),
                "offset {offset}"
            );
            let ga = a.backward(&dy, &x, &oa.saved).unwrap();
            let gb = b.backward(&dyu, &xu, &ob.saved).unwrap();
            assert_eq!(
                ga.dx.unwrap().to_vec().unwrap(),
                gb.dx.unwrap().to_vec().unwrap()
            );
        }
        // Running statistics in the caller's buffer are updated there, in place.
        let rm_buf = buffer_with(ctx, &[0.0; 5], align, storage());
        let mut rm = ctx
            .tensor_from_buffer(&rm_buf, align, &[5], Layout::ChannelsFirst)
            .unwrap();
        let mut rv = ctx.tensor_from_slice(&[1.0; 5], &[5]).unwrap();
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        ops::batch_norm(
            &x,
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap();
        let again = ctx
            .tensor_from_buffer(&rm_buf, align, &[5], Layout::ChannelsFirst)
            .unwrap();
        assert_eq!(again.to_vec().unwrap(), rm.to_vec().unwrap());
        assert!(rm.to_vec().unwrap().iter().all(|&v| v != 0.0));
    });
}

#[test]
fn each_unusable_buffer_is_a_typed_error() {
    on_every_backend("each_unusable_buffer_is_a_typed_error", |ctx| {
        let Some((device, _)) = gpu(ctx) else {
            // The CPU context has no device buffers to wrap: refused, typed. A GPU buffer
            // is needed to ask, so borrow one from any GPU context.
            if let Some(g) = common::backends().iter().find(|c| c.wgpu().is_some()) {
                let b = buffer_with(g, &[1.0; 8], 0, storage());
                let e = ctx
                    .tensor_from_buffer(&b, 0, &[2, 4], Layout::ChannelsFirst)
                    .unwrap_err();
                assert!(matches!(e, Error::InvalidBuffer { .. }), "{e:?}");
            }
            return;
        };
        let align = device.limits().min_storage_buffer_offset_alignment as u64;
        let dims = [2, 4];
        let check = |b: &wgpu::Buffer, offset: u64, what: &str| {
            let e = ctx
                .tensor_from_buffer(b, offset, &dims, Layout::ChannelsFirst)
                .unwrap_err();
            assert!(matches!(e, Error::InvalidBuffer { .. }), "{what}: {e:?}");
            eprintln!("{what}: {e}");
        };
        // No STORAGE usage.
        let plain = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 64,
            usage: wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        check(&plain, 0, "no STORAGE");
        // An offset off the alignment (where the alignment is more than 4 bytes), and past
        // the end.
        let b = buffer_with(ctx, &[1.0; 8], 0, storage());
        if align > 4 {
            check(&b, 4, "misaligned offset");
        }
        check(&b, align, "past the end");
        check(&buffer_with(ctx, &[1.0; 7], 0, storage()), 0, "too small");
        // Another device's buffer.
        let other = Context::all_gpus()
            .into_iter()
            .flatten()
            .find(|c| c.name() == ctx.name())
            .unwrap();
        check(
            &buffer_with(&other, &[1.0; 8], 0, storage()),
            0,
            "another device",
        );
        // The right buffer works.
        assert!(ctx
            .tensor_from_buffer(&b, 0, &dims, Layout::ChannelsFirst)
            .is_ok());
    });
}

/// Every op in its default form and recorded into a caller's encoder (then submitted): the
/// same values, bit for bit.
#[test]
fn recorded_forms_equal_the_default_forms() {
    on_every_backend("recorded_forms_equal_the_default_forms", |ctx| {
        let dims = [8, 6, 5, 5];
        let xs = normal(8 * 6 * 25, 3, 1.0, 2.0);
        let dys = normal(8 * 6 * 25, 4, 0.0, 1.0);
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let dy = ctx.tensor_from_slice(&dys, &dims).unwrap();
        let w = ctx
            .tensor_from_slice(&normal(6, 5, 1.0, 0.3), &[6])
            .unwrap();
        let b = ctx
            .tensor_from_slice(&normal(6, 6, 0.0, 0.3), &[6])
            .unwrap();
        // Everything one training step and the functional pieces produce.
        let step = |bn: &mut BatchNorm| -> wgpu_batchnorm::Result<Vec<Tensor>> {
            let out = bn.forward_train(&x)?;
            let g = bn.backward(&dy, &x, &out.saved)?;
            let eval = bn.forward_eval(&x)?;
            let m = ops::batch_norm_stats(&x)?;
            let saved = ops::batch_norm_gather_stats(&[m.clone(), m], 1e-5, None)?;
            let y2 = ops::batch_norm_elemt(&x, &saved, Some(&w), Some(&b))?;
            let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::ALL)?;
            let dx2 = ops::batch_norm_backward_elemt(&dy, &x, &saved, Some(&w), &sums, 400)?;
            Ok(vec![
                out.y,
                g.dx.unwrap(),
                g.dweight.unwrap(),
                eval.y,
                y2,
                sums.dweight().unwrap().clone(),
                dx2,
            ])
        };
        let mut plain = BatchNorm::new(ctx, BatchNormConfig::new(6)).unwrap();
        let want: Vec<Vec<f32>> = step(&mut plain)
            .unwrap()
            .iter()
            .map(|t| t.to_vec().unwrap())
            .collect();
        let mut recorded = BatchNorm::new(ctx, BatchNormConfig::new(6)).unwrap();
        let got = match ctx.wgpu() {
            Some((device, queue)) => {
                let mut encoder = device.create_command_encoder(&Default::default());
                let outs = ctx.record(&mut encoder, || step(&mut recorded)).unwrap();
                queue.submit(Some(encoder.finish()));
                outs
            }
            // The CPU runs the closure as it is.
            None => step(&mut recorded).unwrap(),
        };
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.to_vec().unwrap(), w, "output {k}");
        }
        assert_eq!(recorded.state().unwrap(), plain.state().unwrap());
    });
}

#[test]
fn reading_back_inside_a_recording_is_refused_and_recordings_do_not_nest() {
    on_every_backend("reading_back_inside_a_recording_is_refused", |ctx| {
        let Some((device, _)) = ctx.wgpu() else {
            return;
        };
        let x = ctx
            .tensor_from_slice(&normal(40, 7, 0.0, 1.0), &[10, 4])
            .unwrap();
        let mut encoder = device.create_command_encoder(&Default::default());
        let r = ctx.record(&mut encoder, || {
            let y = ops::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5)?.y;
            let e = y.to_vec().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
            let mut inner = device.create_command_encoder(&Default::default());
            let e = ctx.record(&mut inner, || Ok(())).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
            Ok(y)
        });
        let y = r.unwrap();
        ctx.wgpu().unwrap().1.submit(Some(encoder.finish()));
        assert_eq!(
            y.to_vec().unwrap().len(),
            40,
            "readable after the submission"
        );
    });
}

/// Work recorded into the caller's encoder runs when the caller submits it, so its buffers
/// (scratch and outputs, even dropped ones) must not be handed to anything else before
/// then: tensors uploaded inside the recording, after an op whose outputs were dropped,
/// keep their values once the encoder runs.
#[test]
fn recorded_work_does_not_reuse_its_buffers_before_the_callers_submission() {
    on_every_backend("recorded_work_does_not_reuse_its_buffers", |ctx| {
        let Some((device, queue)) = ctx.wgpu() else {
            return;
        };
        let x = ctx
            .tensor_from_slice(&normal(640, 11, 2.0, 1.5), &[64, 10])
            .unwrap();
        let dy = ctx
            .tensor_from_slice(&normal(640, 12, 0.0, 1.0), &[64, 10])
            .unwrap();
        let mut encoder = device.create_command_encoder(&Default::default());
        let uploads = ctx
            .record(&mut encoder, || {
                let out = ops::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5)?;
                let g = ops::batch_norm_backward(&dy, &x, &out.saved, None, GradMask::ALL)?;
                drop((out, g));
                [4, 16, 20, 40, 64, 160, 256, 640, 1024]
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        let v = normal(len, 100 + i as u64, 0.0, 1.0);
                        Ok((ctx.tensor_from_slice(&v, &[len])?, v))
                    })
                    .collect::<wgpu_batchnorm::Result<Vec<_>>>()
            })
            .unwrap();
        queue.submit(Some(encoder.finish()));
        for (t, v) in &uploads {
            assert_eq!(&t.to_vec().unwrap(), v, "an upload of {} values", v.len());
        }
    });
}

#[test]
fn half_tensors_over_caller_buffers_read_native_half_arrays() {
    use wgpu_batchnorm::half::f16;
    use wgpu_batchnorm::DType;
    on_every_backend("half_tensors_over_caller_buffers", |ctx| {
        let Some((device, queue)) = gpu(ctx) else {
            return;
        };
        let align = device.limits().min_storage_buffer_offset_alignment as u64;
        let dims = [4, 6, 5, 2];
        let n = 4 * 6 * 10;
        let xs: Vec<f16> = normal(n, 5, 0.5, 2.0)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let bits: Vec<u16> = xs.iter().map(|v| v.to_bits()).collect();
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("caller's half array"),
            size: align + (n * 2) as u64,
            usage: storage() | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&b, align, bytemuck::cast_slice(&bits));
        let x = ctx
            .tensor_from_buffer_typed(&b, align, &dims, Layout::ChannelsFirst, DType::F16)
            .unwrap();
        assert_eq!(x.dtype(), DType::F16);
        let back: Vec<u16> = x
            .to_half_vec::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(back, bits, "{}", ctx.name());
        let uploaded = ctx
            .tensor_from_half(&xs, &dims, Layout::ChannelsFirst)
            .unwrap();
        let ya = ops::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5)
            .unwrap()
            .y;
        let yb = ops::batch_norm(&uploaded, None, None, None, None, true, 0.1, 1e-5)
            .unwrap()
            .y;
        assert_eq!(ya.to_vec().unwrap(), yb.to_vec().unwrap(), "{}", ctx.name());
        // Too small a buffer for the half values: a typed error.
        let e = ctx
            .tensor_from_buffer_typed(&b, align, &[4, 6, 5, 3], Layout::ChannelsFirst, DType::F16)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidBuffer { .. }), "{e}");
    });
}
