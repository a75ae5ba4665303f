//! The layer's state on the device: γ, β and the running statistics are tensors on the
//! layer's context; the `Vec` getters read them back; one bulk call gets or sets the whole
//! state; a tensor taken from the layer keeps its values when the layer trains on
//! (copy-on-write); `forward_eval` needs only `&self`. Every body on every backend.

mod common;

use common::{assert_close, normal, on_every_backend, widen};
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{ops, BatchNorm, BatchNormConfig, BatchNormState, Error, Shape, Tensor};

/// Whether an error is the expected one.
type ErrorCheck = fn(&Error) -> bool;

fn values(t: Option<&Tensor>) -> Vec<f32> {
    t.expect("the layer has this tensor").to_vec().unwrap()
}

fn state(c: usize, seed: u64) -> BatchNormState {
    BatchNormState {
        weight: Some(normal(c, seed, 1.0, 0.2)),
        bias: Some(normal(c, seed + 1, 0.0, 0.5)),
        running_mean: Some(normal(c, seed + 2, 0.5, 0.1)),
        running_var: Some(normal(c, seed + 3, 2.0, 0.1)),
        num_batches_tracked: Some(7),
    }
}

#[test]
fn tensors_live_on_the_layers_context_and_match_the_getters() {
    on_every_backend("tensors_live_on_the_layers_context", |ctx| {
        let bn = BatchNorm::new(ctx, BatchNormConfig::new(5)).unwrap();
        for (name, t, want) in [
            ("weight", bn.weight_tensor(), 1.0),
            ("bias", bn.bias_tensor(), 0.0),
            ("running_mean", bn.running_mean_tensor(), 0.0),
            ("running_var", bn.running_var_tensor(), 1.0),
        ] {
            let t = t.unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.context().id(), ctx.id(), "{name}");
            assert_eq!(t.dims(), &[5], "{name}");
            assert_eq!(t.to_vec().unwrap(), vec![want; 5], "{name}");
        }
        let bare = BatchNorm::new(
            ctx,
            BatchNormConfig::new(5)
                .affine(false)
                .track_running_stats(false),
        )
        .unwrap();
        assert!(bare.weight_tensor().is_none() && bare.bias_tensor().is_none());
        assert!(bare.running_mean_tensor().is_none() && bare.running_var_tensor().is_none());
    });
}

#[test]
fn load_state_then_state_round_trips_and_drives_the_forward() {
    on_every_backend("load_state_round_trips", |ctx| {
        let dims = [6, 4, 5, 3];
        let shape = Shape::new(&dims).unwrap();
        let config = BatchNormConfig::new(4).cumulative_average();
        let s = state(4, 30);
        let mut bn = BatchNorm::new(ctx, config).unwrap();
        bn.load_state(&s).unwrap();
        assert_eq!(bn.state().unwrap(), s);
        assert_eq!(values(bn.weight_tensor()), s.weight.clone().unwrap());
        let mut reference = ReferenceBatchNorm::new(config);
        reference.weight = widen(s.weight.as_ref().unwrap());
        reference.bias = widen(s.bias.as_ref().unwrap());
        reference.running_mean = widen(s.running_mean.as_ref().unwrap());
        reference.running_var = widen(s.running_var.as_ref().unwrap());
        reference.num_batches_tracked = 7;
        let xs = normal(shape.numel(), 31, 0.2, 1.3);
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        // momentum = None: the loaded num_batches_tracked sets the factor (1/8).
        let out = bn.forward_train(&x).unwrap();
        let want = reference.forward_train(&xs, &shape).unwrap();
        // O(1) data, f32 normalization (see tests/forward.rs).
        assert_close("y", &out.y.to_vec().unwrap(), &want.y, 1e-4, 1e-4);
        let rm = bn.running_mean().unwrap().unwrap();
        assert_close("running_mean", &rm, &reference.running_mean, 1e-6, 1e-5);
        let rv = bn.running_var().unwrap().unwrap();
        assert_close("running_var", &rv, &reference.running_var, 0.0, 1e-5);
        assert_eq!(bn.num_batches_tracked(), Some(8));
        bn.eval();
        let want = reference.forward_eval(&xs, &shape).unwrap();
        let y = bn.forward(&x).unwrap().y.to_vec().unwrap();
        assert_close("eval y", &y, &want.y, 1e-4, 1e-4);
    });
}

#[test]
fn load_state_checks_everything_first_and_changes_nothing_on_error() {
    on_every_backend("load_state_checks_everything_first", |ctx| {
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        bn.load_state(&state(3, 40)).unwrap();
        let before = bn.state().unwrap();
        let good = state(3, 50);
        let cases: Vec<(BatchNormState, ErrorCheck)> = vec![
            (
                BatchNormState {
                    running_var: Some(vec![1.0; 4]),
                    ..good.clone()
                },
                |e| {
                    matches!(
                        e,
                        Error::ParameterLength {
                            name: "running_var",
                            expected: 3,
                            got: 4
                        }
                    )
                },
            ),
            (
                BatchNormState {
                    bias: None,
                    ..good.clone()
                },
                |e| matches!(e, Error::InvalidArgument { .. }),
            ),
            (
                BatchNormState {
                    num_batches_tracked: None,
                    ..good.clone()
                },
                |e| matches!(e, Error::InvalidArgument { .. }),
            ),
        ];
        for (bad, is_expected) in cases {
            let e = bn.load_state(&bad).unwrap_err();
            assert!(is_expected(&e), "{bad:?}: {e:?}");
            assert_eq!(bn.state().unwrap(), before, "state changed after {e:?}");
        }
        // A state with entries the layer does not have.
        let mut bare = BatchNorm::new(ctx, BatchNormConfig::new(3).affine(false)).unwrap();
        let e = bare.load_state(&good).unwrap_err();
        assert!(
            matches!(e, Error::NoSuchParameter { name: "weight", .. }),
            "{e:?}"
        );
        assert_eq!(bare.running_mean().unwrap(), Some(vec![0.0; 3]));
    });
}

#[test]
fn a_tensor_taken_from_the_layer_keeps_its_values_when_the_layer_trains() {
    on_every_backend("a_tensor_taken_from_the_layer_keeps_its_values", |ctx| {
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(2)).unwrap();
        let x = ctx
            .tensor_from_slice(&normal(40, 60, 3.0, 1.0), &[10, 2, 2])
            .unwrap();
        bn.forward_train(&x).unwrap();
        let mean_then = bn.running_mean_tensor().unwrap().clone();
        let values_then = mean_then.to_vec().unwrap();
        bn.forward_train(&x).unwrap();
        assert_eq!(mean_then.to_vec().unwrap(), values_then);
        let now = bn.running_mean().unwrap().unwrap();
        assert_ne!(now, values_then, "the layer's running mean moved on");
        // The layer's own tensor is the one the forward updated.
        assert_eq!(values(bn.running_mean_tensor()), now);
    });
}

#[test]
fn forward_eval_needs_only_a_shared_reference() {
    on_every_backend("forward_eval_needs_only_a_shared_reference", |ctx| {
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        bn.load_state(&state(3, 70)).unwrap();
        bn.eval();
        let x = ctx
            .tensor_from_slice(&normal(24, 71, 0.0, 1.0), &[4, 3, 2])
            .unwrap();
        let shared: &BatchNorm = &bn;
        let (a, b) = (
            shared.forward_eval(&x).unwrap(),
            shared.forward_eval(&x).unwrap(),
        );
        assert_eq!(a.y.to_vec().unwrap(), b.y.to_vec().unwrap());
        assert_eq!(bn.state().unwrap(), {
            let mut s = state(3, 70);
            s.num_batches_tracked = Some(7);
            s
        });
    });
}

#[test]
fn weight_tensors_from_the_device_replace_the_parameters() {
    on_every_backend("weight_tensors_from_the_device", |ctx| {
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        let w = ctx.tensor_from_slice(&[2.0, -1.0, 0.5], &[3]).unwrap();
        let b = ctx.tensor_from_slice(&[0.1, 0.2, 0.3], &[3]).unwrap();
        bn.set_weight_tensor(w.clone()).unwrap();
        bn.set_bias_tensor(b.clone()).unwrap();
        assert_eq!(bn.weight().unwrap(), Some(vec![2.0, -1.0, 0.5]));
        // The layer's forward is the functional forward with its tensors.
        let xs = normal(30, 80, 1.0, 2.0);
        let x = ctx.tensor_from_slice(&xs, &[5, 3, 2]).unwrap();
        let y_layer = bn.forward_train(&x).unwrap().y.to_vec().unwrap();
        let y_ops = ops::batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, 1e-5)
            .unwrap()
            .y
            .to_vec()
            .unwrap();
        assert_eq!(y_layer, y_ops);
        // Wrong shape, wrong context, a layer without affine: typed errors, nothing changed.
        let e = bn
            .set_weight_tensor(ctx.tensor_from_slice(&[1.0; 4], &[4]).unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
        let other = wgpu_batchnorm::Context::cpu();
        let e = bn
            .set_weight_tensor(other.tensor_from_slice(&[1.0; 3], &[3]).unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::ContextMismatch { .. }), "{e:?}");
        assert_eq!(bn.weight().unwrap(), Some(vec![2.0, -1.0, 0.5]));
        let mut bare = BatchNorm::new(ctx, BatchNormConfig::new(3).affine(false)).unwrap();
        let e = bare.set_weight_tensor(w).unwrap_err();
        assert!(matches!(e, Error::NoSuchParameter { .. }), "{e:?}");
    });
}
