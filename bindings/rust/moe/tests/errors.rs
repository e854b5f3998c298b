//! Error paths: bad input gives Err (never a panic or UB) whose message comes
//! from the library and names the argument; checks done in Rust before a call
//! (slice length versus shape) say what is wrong in the same style.

mod common;

use common::*;
use moe::{
    DType, Device, DispatcherConfig, Error, HostWorkspace, Layer, RouterConfig, RoutingMethod, RunnerConfig,
    Status, Stream, Tensor, TensorMut, Workspace,
};

/// The error is INVALID_ARGUMENT and its message contains every word.
fn expect_invalid<T: std::fmt::Debug>(r: Result<T, Error>, words: &[&str]) -> Error {
    let err = r.expect_err("expected an error");
    assert_eq!(err.status, Status::INVALID_ARGUMENT, "{err}");
    for w in words {
        assert!(
            err.message.contains(w),
            "message {:?} should mention {w:?}",
            err.message
        );
    }
    err
}

#[test]
fn version_matches_the_header() {
    moe::check_version().unwrap();
    let v = moe::version();
    assert_eq!(v.major, moe::sys::MOE_VERSION_MAJOR);
    assert_eq!(moe::version_string(), v.to_string());
    assert_eq!(moe::BUILT_AGAINST.major, v.major);
}

#[test]
fn slice_and_shape_disagree() {
    let data = vec![0.0f32; 12];
    expect_invalid(Tensor::f32(&data, &[3, 5]), &["[3, 5]", "15", "12"]);
    expect_invalid(Tensor::f32(&data, &[-3, -4]), &[">= 0", "-3"]);
    expect_invalid(Tensor::f32(&data, &[1, 1, 1, 1, 12]), &["at most 4 dimensions"]);
    expect_invalid(Tensor::f32(&data, &[i64::MAX, 4]), &["overflows"]);
    let mut ids = vec![0i32; 6];
    expect_invalid(TensorMut::i32(&mut ids, &[2, 4]), &["8", "6"]);
    let half = vec![0u16; 4];
    expect_invalid(
        Tensor::half(&half, moe::HalfType::BF16, &[5]),
        &["BF16", "5", "4"],
    );
    // SAFETY: a NULL pointer is rejected before anything could read it.
    let null = unsafe { Tensor::from_raw(std::ptr::null(), DType::F32, &[4], Device::Cuda(0)) };
    expect_invalid(null, &["NULL"]);
    assert!(Tensor::f32(&data, &[3, 4]).is_ok());
    assert!(Tensor::f32(&[], &[0, 7]).is_ok());
}

#[test]
fn router_config_limits() {
    let e = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 9)
        .unwrap()
        .build();
    expect_invalid(e, &["moe_router_create", "top_k"]);
    let e = RouterConfig::new(RoutingMethod::DEEPSEEK_V3, 30, 4)
        .unwrap()
        .groups(4, 2)
        .build();
    expect_invalid(e, &["n_group"]);
    let e = RouterConfig::new(RoutingMethod::DEEPSEEK_V3, 32, 4)
        .unwrap()
        .groups(4, 5)
        .build();
    expect_invalid(e, &["topk_group"]);
    let e = RouterConfig::new(RoutingMethod::LLAMA4, 8, 2).unwrap().build();
    expect_invalid(e, &["top_k"]);
    // A method from a future library: an error, not UB.
    expect_invalid(RouterConfig::new(RoutingMethod(1000), 8, 2), &["method", "1000"]);
    let mut cfg = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 2).unwrap();
    cfg.as_raw_mut().method = 77;
    expect_invalid(cfg.build(), &["method"]);
}

#[test]
fn route_with_bad_shapes_and_dtypes() {
    let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 2)
        .unwrap()
        .build()
        .unwrap();
    let logits = vec![0.5f32; 4 * 7];
    let good_logits = vec![0.5f32; 4 * 8];
    let (mut ids, mut w) = (vec![0i32; 4 * 2], vec![0f32; 4 * 2]);
    let mut ids3 = vec![0i32; 4 * 3];
    let mut w_i32 = vec![0i32; 4 * 2];

    let err = router.route(
        &Tensor::f32(&logits, &[4, 7]).unwrap(),
        None,
        None,
        &mut TensorMut::i32(&mut ids, &[4, 2]).unwrap(),
        &mut TensorMut::f32(&mut w, &[4, 2]).unwrap(),
        Stream::DEFAULT,
    );
    let err = expect_invalid(err, &["moe_router_run", "logits"]);
    assert!(
        err.to_string().contains("invalid argument"),
        "Display has the status text: {err}"
    );

    let err = router.route(
        &Tensor::f32(&good_logits, &[4, 8]).unwrap(),
        None,
        None,
        &mut TensorMut::i32(&mut ids3, &[4, 3]).unwrap(),
        &mut TensorMut::f32(&mut w, &[4, 2]).unwrap(),
        Stream::DEFAULT,
    );
    expect_invalid(err, &["topk_ids"]);

    let err = router.route(
        &Tensor::f32(&good_logits, &[4, 8]).unwrap(),
        None,
        None,
        &mut TensorMut::i32(&mut ids, &[4, 2]).unwrap(),
        &mut TensorMut::i32(&mut w_i32, &[4, 2]).unwrap(),
        Stream::DEFAULT,
    );
    expect_invalid(err, &["topk_weights"]);

    // A bias for a method that takes none.
    let bias = vec![0f32; 8];
    let err = router.route(
        &Tensor::f32(&good_logits, &[4, 8]).unwrap(),
        Some(&Tensor::f32(&bias, &[8]).unwrap()),
        None,
        &mut TensorMut::i32(&mut ids, &[4, 2]).unwrap(),
        &mut TensorMut::f32(&mut w, &[4, 2]).unwrap(),
        Stream::DEFAULT,
    );
    expect_invalid(err, &["correction_bias"]);

    // Rust-side convenience checks.
    expect_invalid(router.route_f32(&logits[..7 * 3 + 1]), &["logits", "E = 8"]);
}

#[test]
fn devices_that_are_not_there() {
    let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 2)
        .unwrap()
        .build()
        .unwrap();
    let (mut ids, mut w) = (vec![0i32; 8], vec![0f32; 8]);
    // The library checks the device before touching the data, so this pointer is never read.
    let fake = 0x1000usize as *const std::ffi::c_void;
    // SAFETY: libmoe validates devices first (CPU-only build: NOT_AVAILABLE; CUDA build: the output
    // tensors are on the CPU, a device mismatch); the pointer is never dereferenced.
    let logits = unsafe { Tensor::from_raw(fake, DType::F32, &[4, 8], Device::Cuda(0)) }.unwrap();
    let err = router
        .route(
            &logits,
            None,
            None,
            &mut TensorMut::i32(&mut ids, &[4, 2]).unwrap(),
            &mut TensorMut::f32(&mut w, &[4, 2]).unwrap(),
            Stream::DEFAULT,
        )
        .unwrap_err();
    if moe::has_cuda() {
        assert_eq!(err.status, Status::INVALID_ARGUMENT, "{err}");
        assert!(err.message.contains("device"), "{err}");
    } else {
        assert_eq!(err.status, Status::NOT_AVAILABLE, "{err}");
        assert!(err.message.contains("CUDA backend"), "{err}");
    }
}

#[test]
fn runner_errors() {
    expect_invalid(RunnerConfig::new(0, 16, 16).unwrap().build(), &["num_experts"]);
    expect_invalid(
        RunnerConfig::new(2, 16, 16)
            .unwrap()
            .gated(false)
            .swap_gate_up(true)
            .build(),
        &["swap_gate_up"],
    );

    // Weights first: the runner borrows them, so they must outlive it.
    let w13_bad = vec![0.1f32; 2 * 5 * 4];
    let w13 = vec![0.1f32; 2 * 6 * 4];
    let w2 = vec![0.1f32; 2 * 4 * 3];
    let w2_f16 = vec![0u16; 2 * 4 * 3];
    let mut runner = RunnerConfig::new(2, 4, 3).unwrap().build().unwrap();
    let x = vec![1.0f32; 2 * 4];
    let (local, w) = (vec![0i32, 1, 1, -1], vec![0.5f32; 4]);
    let (offsets, slots) = (vec![0i32, 1, 3], vec![0i32, 1, 2, -1]);
    let mut y = vec![f32::NAN; 2 * 4];
    let run = |runner: &moe::Runner<'_>, y: &mut Vec<f32>| {
        runner.run(
            &Tensor::f32(&x, &[2, 4]).unwrap(),
            &Tensor::i32(&local, &[2, 2]).unwrap(),
            &Tensor::f32(&w, &[2, 2]).unwrap(),
            &Tensor::i32(&offsets, &[3]).unwrap(),
            &Tensor::i32(&slots, &[4]).unwrap(),
            &mut TensorMut::f32(y, &[2, 4]).unwrap(),
            Workspace::internal(),
            Stream::DEFAULT,
        )
    };
    expect_invalid(run(&runner, &mut y), &["moe_runner_run", "set_weights"]);

    expect_invalid(
        runner.set_weights(
            &Tensor::f32(&w13_bad, &[2, 5, 4]).unwrap(),
            &Tensor::f32(&w2, &[2, 4, 3]).unwrap(),
        ),
        &["moe_runner_set_weights", "w13"],
    );
    expect_invalid(
        runner.set_weights(
            &Tensor::f32(&w13, &[2, 6, 4]).unwrap(),
            &Tensor::half(&w2_f16, moe::HalfType::F16, &[2, 4, 3]).unwrap(),
        ),
        &["w2"],
    );
    runner
        .set_weights(
            &Tensor::f32(&w13, &[2, 6, 4]).unwrap(),
            &Tensor::f32(&w2, &[2, 4, 3]).unwrap(),
        )
        .unwrap();
    run(&runner, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));

    // Caller workspaces that are too small or misaligned are rejected before use.
    let need = runner.workspace_size(2, 2, Device::Cpu).unwrap();
    let mut bytes = vec![0u8; need + 512];
    let aligned = bytes.as_mut_ptr().wrapping_add(bytes.as_ptr().align_offset(256));
    let mut run_with = |ptr: *mut u8, len: usize| {
        // SAFETY: [ptr, ptr + len) lies inside `bytes`, which outlives the call.
        let ws = unsafe { Workspace::from_raw(ptr.cast(), len) };
        runner.run(
            &Tensor::f32(&x, &[2, 4]).unwrap(),
            &Tensor::i32(&local, &[2, 2]).unwrap(),
            &Tensor::f32(&w, &[2, 2]).unwrap(),
            &Tensor::i32(&offsets, &[3]).unwrap(),
            &Tensor::i32(&slots, &[4]).unwrap(),
            &mut TensorMut::f32(&mut y, &[2, 4]).unwrap(),
            ws,
            Stream::DEFAULT,
        )
    };
    expect_invalid(
        run_with(aligned.wrapping_add(8), need),
        &["workspace", "256-byte"],
    );
    if need > 0 {
        expect_invalid(run_with(aligned, need - 1), &["workspace_bytes"]);
    }
    run_with(aligned, need).unwrap();
    let _ = HostWorkspace::new(need).unwrap();
}

#[test]
fn dispatcher_errors() {
    expect_invalid(
        DispatcherConfig::new(8).unwrap().expert_parallel(2, 2).build(),
        &["ep_rank"],
    );
    expect_invalid(
        DispatcherConfig::new(10).unwrap().expert_parallel(0, 3).build(),
        &["ep_size"],
    );
    expect_invalid(
        DispatcherConfig::new(4)
            .unwrap()
            .mapping(vec![0, 1, -1], 2)
            .build(),
        &["local_expert_mapping"],
    );
    expect_invalid(
        DispatcherConfig::new(4)
            .unwrap()
            .mapping(vec![0, 1, 5, -1], 2)
            .build(),
        &["local_expert_mapping"],
    );

    let d = DispatcherConfig::new(4)
        .unwrap()
        .mapping(vec![-1, 0, -1, 1], 2)
        .build()
        .unwrap();
    let (mapping, mask) = d.mapping().unwrap();
    assert_eq!(mapping, vec![-1, 0, -1, 1]);
    assert_eq!(mask, vec![0, 1, 0, 1]);

    // An id outside [-1, E): an error naming the token and slot, no out-of-bounds access.
    let ids = vec![0i32, 3, 4, 1];
    let (mut local, mut counts, mut offsets, mut slots) =
        (vec![0i32; 4], vec![0i32; 2], vec![0i32; 3], vec![0i32; 4]);
    let err = d.dispatch(
        &Tensor::i32(&ids, &[2, 2]).unwrap(),
        &mut TensorMut::i32(&mut local, &[2, 2]).unwrap(),
        &mut TensorMut::i32(&mut counts, &[2]).unwrap(),
        &mut TensorMut::i32(&mut offsets, &[3]).unwrap(),
        &mut TensorMut::i32(&mut slots, &[4]).unwrap(),
        Workspace::internal(),
        Stream::DEFAULT,
    );
    expect_invalid(err, &["topk_ids", "token 1"]);
}

#[test]
fn layer_errors() {
    let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 2)
        .unwrap()
        .build()
        .unwrap();
    let dispatcher = DispatcherConfig::new(8).unwrap().build().unwrap();
    let w13 = vec![0.1f32; 4 * 2 * 3 * 4];
    let w2 = vec![0.1f32; 4 * 4 * 3];
    // 4 experts in the runner, 8 in the dispatcher.
    let mut runner = RunnerConfig::new(4, 4, 3).unwrap().build().unwrap();
    runner
        .set_weights(
            &Tensor::f32(&w13, &[4, 6, 4]).unwrap(),
            &Tensor::f32(&w2, &[4, 4, 3]).unwrap(),
        )
        .unwrap();
    let layer = Layer::new(router, dispatcher, runner);
    let err = layer.forward_f32(&[0.5; 8], &[0.0; 16]);
    expect_invalid(err, &["moe_layer_forward", "runner"]);
    // Rust-side length checks of the convenience call.
    expect_invalid(layer.forward_f32(&[0.5; 7], &[0.0; 16]), &["hidden", "H = 4"]);
    expect_invalid(layer.forward_f32(&[0.5; 8], &[0.0; 15]), &["logits", "16"]);
}

#[test]
fn error_display_and_debug() {
    let err = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 0, 1)
        .unwrap()
        .build()
        .unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.starts_with("libmoe: invalid argument (Status::INVALID_ARGUMENT): moe_router_create"),
        "{shown}"
    );
    assert_eq!(format!("{:?}", Status(99)), "Status(99)");
    assert_eq!(Status(99).description(), "unknown status");
    // The thread-local message is copied: a later successful call does not change it.
    RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 1)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(err.to_string(), shown);
    let _: &dyn std::error::Error = &err;
}

#[test]
fn rng_helpers_are_sane() {
    // The references above lean on these conversions: check them on known values.
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(f32_to_f16(1.0), 0x3c00);
    assert_eq!(f32_to_f16(-2.5), 0xc100);
    assert_eq!(f32_to_f16(65504.0), 0x7bff);
    assert_eq!(f32_to_f16(6.0e-8), 0x0001);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0); // a tie rounds to even
    assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
    assert!((erf(-2.0) + 0.995_322_265_018_952_7).abs() < 1e-15);
}
