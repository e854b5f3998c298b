//! Create/use/destroy cycles of every handle, including failed creations and
//! handles dropped with internal workspaces allocated. Run under valgrind by
//! scripts/rust_leak_check.sh: Drop must release everything.

use moe::{
    Block, Device, DispatcherConfig, HostWorkspace, Layer, RouterConfig, RoutingMethod, RunnerConfig,
    SharedExpertsConfig, Stream, Tensor, TensorMut, Workspace,
};

const CYCLES: usize = 25;

#[test]
fn routers_of_every_method() {
    let logits: Vec<f32> = (0..3 * 16).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
    for _ in 0..CYCLES {
        for method in RoutingMethod::ALL {
            let k = if method == RoutingMethod::LLAMA4 { 1 } else { 4 };
            let mut cfg = RouterConfig::new(method, 16, k).unwrap();
            if method == RoutingMethod::DEEPSEEK_V3 || method == RoutingMethod::GROUPED_SOFTMAX {
                cfg = cfg.groups(4, 2);
            }
            let router = cfg.num_fused_shared_experts(1).build().unwrap();
            let (ids, w) = router.route_f32(&logits).unwrap();
            assert_eq!(ids.len(), 3 * (k as usize + 1));
            assert!(w.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn dispatchers_with_and_without_mapping() {
    let ids: Vec<i32> = vec![0, 5, 7, -1, 3, 2];
    for n in 0..CYCLES {
        let d = if n % 2 == 0 {
            DispatcherConfig::new(8)
                .unwrap()
                .expert_parallel(1, 2)
                .build()
                .unwrap()
        } else {
            DispatcherConfig::new(8)
                .unwrap()
                .mapping(vec![3, -1, 2, -1, 1, -1, 0, -1], 4)
                .build()
                .unwrap()
        };
        let (mut local, mut counts, mut offsets, mut slots) =
            (vec![0i32; 6], vec![0i32; 4], vec![0i32; 5], vec![0i32; 6]);
        let mut ws = HostWorkspace::new(d.workspace_size(3, 2).unwrap()).unwrap();
        for workspace in [Workspace::host(&mut ws), Workspace::internal()] {
            d.dispatch(
                &Tensor::i32(&ids, &[3, 2]).unwrap(),
                &mut TensorMut::i32(&mut local, &[3, 2]).unwrap(),
                &mut TensorMut::i32(&mut counts, &[4]).unwrap(),
                &mut TensorMut::i32(&mut offsets, &[5]).unwrap(),
                &mut TensorMut::i32(&mut slots, &[6]).unwrap(),
                workspace,
                Stream::DEFAULT,
            )
            .unwrap();
        }
        assert_eq!(offsets[4], counts.iter().sum::<i32>());
        let _ = d.mapping().unwrap();
    }
}

#[test]
fn layers_dropped_with_internal_workspaces() {
    let (e, h, i, t) = (4usize, 8usize, 6usize, 5usize);
    let w13: Vec<f32> = (0..e * 2 * i * h)
        .map(|n| ((n % 13) as f32 - 6.0) / 20.0)
        .collect();
    let w2: Vec<f32> = (0..e * h * i).map(|n| ((n % 11) as f32 - 5.0) / 20.0).collect();
    let x: Vec<f32> = (0..t * h).map(|n| ((n % 7) as f32 - 3.0) / 3.0).collect();
    let z: Vec<f32> = (0..t * e).map(|n| ((n * 5 % 9) as f32 - 4.0) / 2.0).collect();
    for _ in 0..CYCLES {
        let mut runner = RunnerConfig::new(e as i32, h as i32, i as i32)
            .unwrap()
            .build()
            .unwrap();
        runner
            .set_weights(
                &Tensor::f32(&w13, &[e as i64, 2 * i as i64, h as i64]).unwrap(),
                &Tensor::f32(&w2, &[e as i64, h as i64, i as i64]).unwrap(),
            )
            .unwrap();
        let layer = Layer::new(
            RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, e as i32, 2)
                .unwrap()
                .build()
                .unwrap(),
            DispatcherConfig::new(e as i32).unwrap().build().unwrap(),
            runner,
        );
        let y = layer.forward_f32(&x, &z).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        let mut ws = HostWorkspace::new(layer.workspace_size(t as i64, Device::Cpu).unwrap()).unwrap();
        let mut y2 = vec![f32::NAN; t * h];
        layer
            .forward(
                &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
                &Tensor::f32(&z, &[t as i64, e as i64]).unwrap(),
                None,
                None,
                &mut TensorMut::f32(&mut y2, &[t as i64, h as i64]).unwrap(),
                Workspace::host(&mut ws),
                Stream::DEFAULT,
            )
            .unwrap();
        assert_eq!(y, y2);
    }
}

#[test]
fn failed_creations_and_calls_leak_nothing() {
    for _ in 0..CYCLES {
        assert!(RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 9)
            .unwrap()
            .build()
            .is_err());
        assert!(RouterConfig::new(RoutingMethod(99), 8, 2).is_err());
        assert!(DispatcherConfig::new(8)
            .unwrap()
            .expert_parallel(3, 2)
            .build()
            .is_err());
        assert!(RunnerConfig::new(1, 0, 4).unwrap().build().is_err());
        let bad = vec![0f32; 3];
        let mut runner = RunnerConfig::new(1, 4, 4).unwrap().build().unwrap();
        assert!(runner
            .set_weights(
                &Tensor::f32(&bad, &[1, 3, 1]).unwrap(),
                &Tensor::f32(&bad, &[3]).unwrap()
            )
            .is_err());
        let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 2)
            .unwrap()
            .build()
            .unwrap();
        assert!(router.route_f32(&[0.0; 9]).is_err());
    }
}

#[test]
fn handles_moved_across_threads() {
    let router = RouterConfig::new(RoutingMethod::SIGMOID_TOPK, 8, 2)
        .unwrap()
        .build()
        .unwrap();
    let router = std::thread::spawn(move || {
        assert!(RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 8, 9)
            .unwrap()
            .build()
            .is_err());
        router.route_f32(&[0.25; 8]).unwrap();
        router
    })
    .join()
    .unwrap();
    drop(router);
}

#[test]
fn shared_experts_and_blocks_dropped_with_internal_workspaces() {
    let (e, h, i, t) = (4usize, 8usize, 6usize, 5usize);
    let w13: Vec<f32> = (0..e * 2 * i * h)
        .map(|n| ((n % 13) as f32 - 6.0) / 20.0)
        .collect();
    let w2: Vec<f32> = (0..e * h * i).map(|n| ((n % 11) as f32 - 5.0) / 20.0).collect();
    let wg: Vec<f32> = (0..e * h).map(|n| ((n % 5) as f32 - 2.0) / 8.0).collect();
    let sg: Vec<f32> = (0..h).map(|n| (n as f32 - 4.0) / 16.0).collect();
    let x: Vec<f32> = (0..t * h).map(|n| ((n % 7) as f32 - 3.0) / 3.0).collect();
    for n in 0..CYCLES {
        let mut runner = RunnerConfig::new(e as i32, h as i32, i as i32)
            .unwrap()
            .build()
            .unwrap();
        runner
            .set_weights(
                &Tensor::f32(&w13, &[e as i64, 2 * i as i64, h as i64]).unwrap(),
                &Tensor::f32(&w2, &[e as i64, h as i64, i as i64]).unwrap(),
            )
            .unwrap();
        // One shared expert with weights [1, 2I, H] / [1, H, I]: the first expert's.
        let mut shared = SharedExpertsConfig::new(1, h as i32, i as i32)
            .unwrap()
            .build()
            .unwrap();
        let gate = Tensor::f32(&sg, &[1, h as i64]).unwrap();
        shared
            .set_weights(
                &Tensor::f32(&w13[..2 * i * h], &[1, 2 * i as i64, h as i64]).unwrap(),
                &Tensor::f32(&w2[..h * i], &[1, h as i64, i as i64]).unwrap(),
                if n % 2 == 0 { Some(&gate) } else { None },
            )
            .unwrap();
        let mut y = vec![f32::NAN; t * h];
        shared
            .run(
                &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
                None,
                &mut TensorMut::f32(&mut y, &[t as i64, h as i64]).unwrap(),
                false,
                Workspace::internal(),
                Stream::DEFAULT,
            )
            .unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        let block = Block::new(
            RouterConfig::new(RoutingMethod::SIGMOID_TOPK, e as i32, 2)
                .unwrap()
                .build()
                .unwrap(),
            DispatcherConfig::new(e as i32).unwrap().build().unwrap(),
            runner,
            if n % 3 == 2 { None } else { Some(shared) },
        );
        let out = block.forward_f32(&x, &wg, None).unwrap();
        let mut ws = HostWorkspace::new(block.workspace_size(t as i64, Device::Cpu).unwrap()).unwrap();
        let mut out2 = vec![f32::NAN; t * h];
        block
            .forward(
                &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
                &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
                None,
                None,
                &mut TensorMut::f32(&mut out2, &[t as i64, h as i64]).unwrap(),
                Workspace::host(&mut ws),
                Stream::DEFAULT,
            )
            .unwrap();
        assert_eq!(out, out2);
        // The gate projection alone, with the router's internal workspace.
        let (mut ids, mut w) = (vec![0i32; t * 2], vec![0f32; t * 2]);
        block
            .router
            .route_hidden(
                &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
                &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
                None,
                None,
                &mut TensorMut::i32(&mut ids, &[t as i64, 2]).unwrap(),
                &mut TensorMut::f32(&mut w, &[t as i64, 2]).unwrap(),
                None,
                Workspace::internal(),
                Stream::DEFAULT,
            )
            .unwrap();
    }
}

#[test]
fn failed_shared_experts_and_block_calls_leak_nothing() {
    for _ in 0..CYCLES {
        assert!(SharedExpertsConfig::new(0, 8, 4).unwrap().build().is_err());
        let bad = vec![0f32; 3];
        let mut shared = SharedExpertsConfig::new(1, 8, 4).unwrap().build().unwrap();
        assert!(shared
            .set_weights(
                &Tensor::f32(&bad, &[1, 3, 1]).unwrap(),
                &Tensor::f32(&bad, &[3]).unwrap(),
                None
            )
            .is_err());
        let block = Block::new(
            RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, 4, 2)
                .unwrap()
                .build()
                .unwrap(),
            DispatcherConfig::new(4).unwrap().build().unwrap(),
            RunnerConfig::new(4, 8, 4).unwrap().build().unwrap(),
            Some(shared),
        );
        assert!(block.forward_f32(&[0.0; 16], &[0.0; 32], None).is_err());
    }
}

#[cfg(feature = "nccl")]
#[test]
fn failed_a2a_creations_leak_nothing() {
    for _ in 0..CYCLES {
        let config = moe::A2aConfig::new(8, 16, 4, 2).unwrap();
        // SAFETY: a NULL communicator is rejected before anything is used.
        assert!(unsafe { moe::A2aDispatcher::new(&config, std::ptr::null_mut()) }.is_err());
    }
}
