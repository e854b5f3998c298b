//! The full layer on the CPU backend against a float64 reference: the
//! one-call `Layer::forward`, and route -> dispatch -> run step by step with a
//! caller workspace (dispatch metadata checked too).

mod common;

use common::*;
use moe::{Device, DispatcherConfig, HostWorkspace, Layer, Stream, Tensor, TensorMut, Workspace};

/// Random weights for `s` rounded to `fp`, scaled so activations stay O(1).
fn weights(s: &ExpertSpec, fp: Fp, rng: &mut Rng) -> (FpData, FpData) {
    let w13 = FpData::new(
        fp,
        &rng.normals(s.e_loc * s.rows13() * s.h, 1.0 / (s.h as f64).sqrt()),
    );
    let w2 = FpData::new(fp, &rng.normals(s.e_loc * s.h * s.i, 1.0 / (s.i as f64).sqrt()));
    (w13, w2)
}

/// One-call layer: route (spec), dispatch (rank `ep_rank` of `ep_size`), run (experts).
fn check_layer(
    route: &RouteSpec,
    experts: ExpertSpec,
    ep: (usize, usize),
    fp: Fp,
    t: usize,
    with_bias: bool,
) {
    let mut rng = Rng::fresh();
    let (ep_rank, ep_size) = ep;
    let e_total = route.e + route.n_shared;
    assert_eq!(experts.e_loc * ep_size, e_total);
    let (w13, w2) = weights(&experts, fp, &mut rng);
    let x = FpData::new(fp, &rng.normals(t * experts.h, 1.0));
    let logits = FpData::new(fp, &rng.normals(t * route.e, 1.5));
    let bias: Vec<f32> = rng.normals(route.e, 0.3).iter().map(|&v| v as f32).collect();

    let mut runner = experts.config().build().unwrap();
    runner
        .set_weights(&w13.tensor(&experts.w13_shape()), &w2.tensor(&experts.w2_shape()))
        .unwrap();
    let dispatcher = DispatcherConfig::new(e_total as i32)
        .unwrap()
        .expert_parallel(ep_rank as i32, ep_size as i32)
        .build()
        .unwrap();
    assert_eq!(dispatcher.num_local_experts() as usize, experts.e_loc);
    let layer = Layer::new(route.config().build().unwrap(), dispatcher, runner);

    let mut y = FpOut::poisoned(fp, t * experts.h);
    let bias_t = Tensor::f32(&bias, &[route.e as i64]).unwrap();
    layer
        .forward(
            &x.tensor(&[t as i64, experts.h as i64]),
            &logits.tensor(&[t as i64, route.e as i64]),
            if with_bias { Some(&bias_t) } else { None },
            None,
            &mut y.tensor(&[t as i64, experts.h as i64]),
            Workspace::internal(),
            Stream::DEFAULT,
        )
        .unwrap_or_else(|e| panic!("{route:?} {experts:?} {fp:?}: {e}"));

    let bias64: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
    let (ids, w) = route_reference(
        route,
        &logits.exact,
        if with_bias { Some(&bias64) } else { None },
        None,
    );
    let mapping = contiguous_mapping(e_total, ep_rank, ep_size);
    let local = dispatch_reference(&ids, &mapping, experts.e_loc).local_ids;
    let mut ref_spec = experts;
    if route.scaling_on_output {
        ref_spec.output_scale *= route.scaling;
    }
    let reference = moe_reference(&ref_spec, &x.exact, &local, &w, &w13.exact, &w2.exact);
    assert_close(
        &format!("{route:?} {experts:?} {fp:?} T={t}"),
        &y.values(),
        &reference,
        tolerance(fp),
    );
}

#[test]
fn layer_forward_softmax_topk_silu() {
    let route = RouteSpec {
        renormalize: true,
        ..RouteSpec::new(SOFTMAX_TOPK, 8, 2)
    };
    for fp in ALL_FP {
        check_layer(&route, ExpertSpec::new(8, 64, 96), (0, 1), fp, 13, false);
    }
}

#[test]
fn layer_forward_deepseek_v3_scaled_on_output_with_shared_expert() {
    let route = RouteSpec {
        n_group: 4,
        topk_group: 2,
        scaling: 2.5,
        scaling_on_output: true,
        n_shared: 1,
        ..RouteSpec::new(DEEPSEEK_V3, 16, 4)
    };
    let experts = ExpertSpec {
        output_scale: 0.5,
        ..ExpertSpec::new(17, 32, 48)
    };
    for fp in ALL_FP {
        check_layer(&route, experts, (0, 1), fp, 21, true);
    }
}

#[test]
fn layer_forward_expert_parallel_rank_sums_its_experts_only() {
    let route = RouteSpec::new(SIGMOID_TOPK, 16, 4);
    for rank in 0..2 {
        check_layer(&route, ExpertSpec::new(8, 32, 40), (rank, 2), Fp::F32, 17, true);
    }
}

#[test]
fn layer_forward_llama4_weight_on_input() {
    let route = RouteSpec::new(LLAMA4, 8, 1);
    let experts = ExpertSpec {
        weight_on_input: true,
        ..ExpertSpec::new(8, 32, 64)
    };
    for fp in [Fp::F32, Fp::BF16] {
        check_layer(&route, experts, (0, 1), fp, 11, false);
    }
}

#[test]
fn layer_forward_f32_convenience() {
    let mut rng = Rng::fresh();
    let route = RouteSpec {
        renormalize: true,
        ..RouteSpec::new(SOFTMAX_TOPK, 8, 2)
    };
    let experts = ExpertSpec::new(8, 16, 24);
    let (w13, w2) = weights(&experts, Fp::F32, &mut rng);
    let mut runner = experts.config().build().unwrap();
    runner
        .set_weights(&w13.tensor(&experts.w13_shape()), &w2.tensor(&experts.w2_shape()))
        .unwrap();
    let layer = Layer::new(
        route.config().build().unwrap(),
        DispatcherConfig::new(8).unwrap().build().unwrap(),
        runner,
    );
    let t = 5;
    let x = FpData::new(Fp::F32, &rng.normals(t * 16, 1.0));
    let z = FpData::new(Fp::F32, &rng.normals(t * 8, 1.0));
    let y = layer.forward_f32(&x.f32, &z.f32).unwrap();
    let (ids, w) = route_reference(&route, &z.exact, None, None);
    let reference = moe_reference(&experts, &x.exact, &ids, &w, &w13.exact, &w2.exact);
    let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    assert_close("forward_f32", &y, &reference, 1e-5);
}

/// Route -> dispatch -> run with caller workspaces; checks the dispatcher's
/// metadata exactly and the runner's output against the reference.
fn check_steps(experts: ExpertSpec, fp: Fp, rng: &mut Rng) {
    let route = RouteSpec {
        renormalize: true,
        ..RouteSpec::new(SOFTMAX_TOPK, experts.e_loc, 3)
    };
    let (t, h, k, e) = (rng.int(1, 30) as usize, experts.h, route.k, experts.e_loc);
    let (w13, w2) = weights(&experts, fp, rng);
    let x = FpData::new(fp, &rng.normals(t * h, 1.0));
    let logits = FpData::new(Fp::F32, &rng.normals(t * e, 1.0));

    let router = route.config().build().unwrap();
    let dispatcher = DispatcherConfig::new(e as i32)
        .unwrap()
        .device(Device::Cpu)
        .build()
        .unwrap();
    let mut runner = experts.config().build().unwrap();
    runner
        .set_weights(&w13.tensor(&experts.w13_shape()), &w2.tensor(&experts.w2_shape()))
        .unwrap();

    let tk = [t as i64, k as i64];
    let (mut ids, mut w) = (vec![0x7f7f_7f7fi32; t * k], vec![f32::NAN; t * k]);
    router
        .route(
            &logits.tensor(&[t as i64, e as i64]),
            None,
            None,
            &mut TensorMut::i32(&mut ids, &tk).unwrap(),
            &mut TensorMut::f32(&mut w, &tk).unwrap(),
            Stream::DEFAULT,
        )
        .unwrap();

    let mut local = vec![0x7f7f_7f7fi32; t * k];
    let mut counts = vec![0x7f7f_7f7fi32; e];
    let mut offsets = vec![0x7f7f_7f7fi32; e + 1];
    let mut slots = vec![0x7f7f_7f7fi32; t * k];
    let mut dws = HostWorkspace::new(dispatcher.workspace_size(t as i64, k as i32).unwrap()).unwrap();
    dispatcher
        .dispatch(
            &Tensor::i32(&ids, &tk).unwrap(),
            &mut TensorMut::i32(&mut local, &tk).unwrap(),
            &mut TensorMut::i32(&mut counts, &[e as i64]).unwrap(),
            &mut TensorMut::i32(&mut offsets, &[e as i64 + 1]).unwrap(),
            &mut TensorMut::i32(&mut slots, &[(t * k) as i64]).unwrap(),
            Workspace::host(&mut dws),
            Stream::DEFAULT,
        )
        .unwrap();
    let d = dispatch_reference(&ids, &(0..e as i32).collect::<Vec<_>>(), e);
    assert_eq!(local, d.local_ids);
    assert_eq!(counts, d.counts);
    assert_eq!(offsets, d.offsets);
    assert_eq!(slots, d.sorted_slots);

    let mut y = FpOut::poisoned(fp, t * h);
    let mut rws =
        HostWorkspace::new(runner.workspace_size(t as i64, k as i32, Device::Cpu).unwrap()).unwrap();
    runner
        .run(
            &x.tensor(&[t as i64, h as i64]),
            &Tensor::i32(&local, &tk).unwrap(),
            &Tensor::f32(&w, &tk).unwrap(),
            &Tensor::i32(&offsets, &[e as i64 + 1]).unwrap(),
            &Tensor::i32(&slots, &[(t * k) as i64]).unwrap(),
            &mut y.tensor(&[t as i64, h as i64]),
            Workspace::host(&mut rws),
            Stream::DEFAULT,
        )
        .unwrap_or_else(|err| panic!("{experts:?} {fp:?}: {err}"));
    let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let reference = moe_reference(&experts, &x.exact, &local, &w64, &w13.exact, &w2.exact);
    assert_close(
        &format!("{experts:?} {fp:?} T={t}"),
        &y.values(),
        &reference,
        tolerance(fp),
    );
}

#[test]
fn runner_every_activation_gated_and_not() {
    let mut rng = Rng::fresh();
    for act in [SILU, GELU, GELU_TANH, RELU2, IDENTITY] {
        for gated in [true, false] {
            for fp in ALL_FP {
                let experts = ExpertSpec {
                    act,
                    gated,
                    ..ExpertSpec::new(6, 24, 40)
                };
                check_steps(experts, fp, &mut rng);
            }
        }
    }
}

#[test]
fn runner_swapped_gate_up_order() {
    let mut rng = Rng::fresh();
    for fp in ALL_FP {
        let experts = ExpertSpec {
            swap_gate_up: true,
            ..ExpertSpec::new(4, 32, 16)
        };
        check_steps(experts, fp, &mut rng);
    }
}

#[test]
fn layer_is_shared_across_threads() {
    let mut rng = Rng::fresh();
    let route = RouteSpec {
        renormalize: true,
        ..RouteSpec::new(SOFTMAX_TOPK, 8, 2)
    };
    let experts = ExpertSpec::new(8, 32, 32);
    let (w13, w2) = weights(&experts, Fp::F32, &mut rng);
    let mut runner = experts.config().build().unwrap();
    runner
        .set_weights(&w13.tensor(&experts.w13_shape()), &w2.tensor(&experts.w2_shape()))
        .unwrap();
    let layer = Layer::new(
        route.config().build().unwrap(),
        DispatcherConfig::new(8).unwrap().build().unwrap(),
        runner,
    );
    let t = 9;
    let inputs: Vec<(FpData, FpData)> = (0..4)
        .map(|_| {
            (
                FpData::new(Fp::F32, &rng.normals(t * 32, 1.0)),
                FpData::new(Fp::F32, &rng.normals(t * 8, 1.0)),
            )
        })
        .collect();
    let bytes = layer.workspace_size(t as i64, Device::Cpu).unwrap();
    // Two threads with their own workspaces, two with the internal one (serialized by the library).
    let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(n, (x, z))| {
                let layer = &layer;
                scope.spawn(move || {
                    let mut ws = HostWorkspace::new(bytes).unwrap();
                    let mut y = vec![f32::NAN; t * 32];
                    for _ in 0..5 {
                        layer
                            .forward(
                                &x.tensor(&[t as i64, 32]),
                                &z.tensor(&[t as i64, 8]),
                                None,
                                None,
                                &mut TensorMut::f32(&mut y, &[t as i64, 32]).unwrap(),
                                if n % 2 == 0 {
                                    Workspace::host(&mut ws)
                                } else {
                                    Workspace::internal()
                                },
                                Stream::DEFAULT,
                            )
                            .unwrap();
                    }
                    y
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((x, z), y) in inputs.iter().zip(&outputs) {
        let (ids, w) = route_reference(&route, &z.exact, None, None);
        let reference = moe_reference(&experts, &x.exact, &ids, &w, &w13.exact, &w2.exact);
        let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        assert_close("threaded forward", &y, &reference, 1e-5);
    }
}

/// FP8 weights (E4M3 codes + f32 scales) through `set_weights_scaled`, against
/// the dequantized float64 reference (3e-2, SEMANTICS.md section 5).
fn check_fp8(block: Option<usize>) {
    let mut rng = Rng::fresh();
    let experts = ExpertSpec {
        fp8_act_group: block.unwrap_or(usize::MAX),
        ..ExpertSpec::new(4, 256, 128)
    };
    let (e, h, i, r13) = (experts.e_loc, experts.h, experts.i, experts.rows13());
    let route = RouteSpec {
        renormalize: true,
        ..RouteSpec::new(SOFTMAX_TOPK, e, 2)
    };
    let (q13, s13, d13) = quantize_e4m3(
        &rng.normals(e * r13 * h, 1.0 / (h as f64).sqrt()),
        e,
        r13,
        h,
        block,
    );
    let (q2, s2, d2) = quantize_e4m3(&rng.normals(e * h * i, 1.0 / (i as f64).sqrt()), e, h, i, block);
    let mode = if block.is_some() {
        moe::QuantMode::FP8_BLOCK_128
    } else {
        moe::QuantMode::FP8_PER_TENSOR
    };
    let scale_shape = |rows: usize, cols: usize| match block {
        Some(b) => vec![e as i64, rows.div_ceil(b) as i64, cols.div_ceil(b) as i64],
        None => vec![e as i64],
    };
    let mut runner = experts.config().quant_mode(mode).build().unwrap();
    runner
        .set_weights_scaled(
            &Tensor::e4m3(&q13, &experts.w13_shape()).unwrap(),
            &Tensor::e4m3(&q2, &experts.w2_shape()).unwrap(),
            Some(&Tensor::f32(&s13, &scale_shape(r13, h)).unwrap()),
            Some(&Tensor::f32(&s2, &scale_shape(h, i)).unwrap()),
            None,
            None,
        )
        .unwrap();
    let layer = Layer::new(
        route.config().build().unwrap(),
        DispatcherConfig::new(e as i32).unwrap().build().unwrap(),
        runner,
    );
    let t = 7;
    for fp in ALL_FP {
        let x = FpData::new(fp, &rng.normals(t * h, 1.0));
        let z = FpData::new(Fp::F32, &rng.normals(t * e, 1.0));
        let mut y = FpOut::poisoned(fp, t * h);
        layer
            .forward(
                &x.tensor(&[t as i64, h as i64]),
                &z.tensor(&[t as i64, e as i64]),
                None,
                None,
                &mut y.tensor(&[t as i64, h as i64]),
                Workspace::internal(),
                Stream::DEFAULT,
            )
            .unwrap();
        let (ids, w) = route_reference(&route, &z.exact, None, None);
        let reference = moe_reference(&experts, &x.exact, &ids, &w, &d13, &d2);
        assert_close(&format!("FP8 {block:?} {fp:?}"), &y.values(), &reference, 3e-2);
    }
}

#[test]
fn runner_fp8_per_tensor_scales() {
    check_fp8(None);
}

#[test]
fn runner_fp8_block_128_scales() {
    check_fp8(Some(128));
}
