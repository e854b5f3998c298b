//! The MoE block (moe/moe_block.h) on the CPU backend against a float64
//! reference: the gate projection (`Router::route_hidden`), the shared
//! experts, and the one-call `Block::forward` for a DeepSeek-V3-like config
//! (sigmoid grouped routing, bias, routed_scaling_factor 2.5, one shared
//! expert) and a Qwen2-MoE-like one (softmax top-k, shared expert with a
//! sigmoid gate), per dtype; plus the error paths.

mod common;

use common::*;
use moe::{
    Block, Device, DispatcherConfig, HostWorkspace, SharedExpertsConfig, Status, Stream, Tensor, TensorMut,
    Workspace,
};

/// Dyadic values k / den, |k| <= span: every dot product of H <= 64 of them
/// (with den 32 and 64) is exact in f32, so the library's f32 logits equal the
/// float64 ones and the 16-bit dtypes hold the inputs exactly.
fn dyadic(rng: &mut Rng, n: usize, span: i64, den: f64) -> Vec<f64> {
    (0..n).map(|_| rng.int(-span, span) as f64 / den).collect()
}

fn matvec_rows(a: &[f64], x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| (0..cols).map(|c| a[r * cols + c] * x[c]).sum())
        .collect()
}

/// logits [T, E] = x [T, H] . wg [E, H]^T in float64.
fn logits_reference(x: &[f64], wg: &[f64], h: usize, e: usize) -> Vec<f64> {
    x.chunks(h).flat_map(|row| matvec_rows(wg, row, e, h)).collect()
}

/// The gap that decides a row's routing (0 for a tie): the k-th vs the
/// (k+1)-th selection key, and for grouped routing the kept vs the first
/// dropped group score. Rows with a small gap may legitimately route
/// differently in f32, so they are left out of the comparison.
fn routing_margin(spec: &RouteSpec, z: &[f64], bias: Option<&[f64]>) -> f64 {
    let e = spec.e;
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    let keys: Vec<f64> = match spec.method {
        DEEPSEEK_V3 | SIGMOID_TOPK => (0..e)
            .map(|i| sigmoid(z[i]) + bias.map_or(0.0, |b| b[i]))
            .collect(),
        _ => z.to_vec(), // softmax is monotonic in the logits
    };
    let gap = |mut v: Vec<f64>, n: usize| -> f64 {
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        if n < v.len() {
            v[n - 1] - v[n]
        } else {
            f64::INFINITY
        }
    };
    let mut margin = f64::INFINITY;
    let mut candidates: Vec<usize> = (0..e).collect();
    if spec.method == DEEPSEEK_V3 && spec.n_group > 1 {
        let gsize = e / spec.n_group;
        let score = |g: usize| -> f64 {
            let mut v: Vec<f64> = keys[g * gsize..(g + 1) * gsize].to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            v[0] + v[1]
        };
        let scores: Vec<f64> = (0..spec.n_group).map(score).collect();
        margin = margin.min(gap(scores.clone(), spec.topk_group));
        let mut order: Vec<usize> = (0..spec.n_group).collect();
        order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap());
        let kept = &order[..spec.topk_group];
        candidates.retain(|&i| kept.contains(&(i / gsize)));
    }
    margin.min(gap(candidates.iter().map(|&i| keys[i]).collect(), spec.k))
}

/// shared(x) [T, H] = g(x) * sum_s W2_s . act(W13_s . x): the routed-expert
/// reference with every token on every shared expert at weight 1.
fn shared_reference(s: &ExpertSpec, x: &[f64], w13: &[f64], w2: &[f64], gate: Option<&[f64]>) -> Vec<f64> {
    let t = x.len() / s.h;
    let ids: Vec<i32> = (0..t).flat_map(|_| 0..s.e_loc as i32).collect();
    let mut y = moe_reference(s, x, &ids, &vec![1.0; ids.len()], w13, w2);
    if let Some(g) = gate {
        for (row, out) in x.chunks(s.h).zip(y.chunks_mut(s.h)) {
            let z: f64 = row.iter().zip(g).map(|(a, b)| a * b).sum();
            let gv = 1.0 / (1.0 + (-z).exp());
            out.iter_mut().for_each(|v| *v *= gv);
        }
    }
    y
}

struct BlockCase {
    route: RouteSpec,
    experts: ExpertSpec,
    shared: ExpertSpec,
    shared_gate: bool,
    bias: bool,
}

/// DeepSeek-V3-like: sigmoid grouped routing with bias, factor 2.5, one shared expert.
fn deepseek() -> BlockCase {
    let mut route = RouteSpec::new(DEEPSEEK_V3, 16, 4);
    route.n_group = 4;
    route.topk_group = 2;
    route.renormalize = true;
    route.scaling = 2.5;
    BlockCase {
        route,
        experts: ExpertSpec::new(16, 64, 32),
        shared: ExpertSpec::new(1, 64, 48),
        shared_gate: false,
        bias: true,
    }
}

/// Qwen2-MoE-like: softmax top-k without renormalization, a gated shared expert.
fn qwen2() -> BlockCase {
    let mut route = RouteSpec::new(SOFTMAX_TOPK, 16, 4);
    route.renormalize = false;
    BlockCase {
        route,
        experts: ExpertSpec::new(16, 64, 32),
        shared: ExpertSpec::new(1, 64, 48),
        shared_gate: true,
        bias: false,
    }
}

fn normals_fp(rng: &mut Rng, fp: Fp, n: usize, fan_in: usize) -> FpData {
    FpData::new(fp, &rng.normals(n, 1.0 / (fan_in as f64).sqrt()))
}

fn check_block(case: &BlockCase, fp: Fp, t: usize, valid: Option<usize>) {
    let mut rng = Rng::fresh();
    let (h, e) = (case.experts.h, case.route.e);
    let (ex, sh) = (case.experts, case.shared);
    let x = FpData::new(fp, &dyadic(&mut rng, t * h, 32, 32.0));
    let wg = FpData::new(fp, &dyadic(&mut rng, e * h, 32, 64.0));
    let bias_v = dyadic(&mut rng, e, 8, 64.0);
    let bias_f32: Vec<f32> = bias_v.iter().map(|&v| v as f32).collect();
    let w13 = normals_fp(&mut rng, fp, ex.e_loc * ex.rows13() * h, h);
    let w2 = normals_fp(&mut rng, fp, ex.e_loc * h * ex.i, ex.i);
    let s13 = normals_fp(&mut rng, fp, sh.e_loc * sh.rows13() * h, h);
    let s2 = normals_fp(&mut rng, fp, sh.e_loc * h * sh.i, sh.i);
    let sg = normals_fp(&mut rng, fp, h, h);

    let mut runner = ex.config().build().unwrap();
    runner
        .set_weights(&w13.tensor(&ex.w13_shape()), &w2.tensor(&ex.w2_shape()))
        .unwrap();
    let mut shared = SharedExpertsConfig::new(sh.e_loc as i32, h as i32, sh.i as i32)
        .unwrap()
        .build()
        .unwrap();
    let sg_t = sg.tensor(&[1, h as i64]);
    shared
        .set_weights(
            &s13.tensor(&sh.w13_shape()),
            &s2.tensor(&sh.w2_shape()),
            if case.shared_gate { Some(&sg_t) } else { None },
        )
        .unwrap();
    let block = Block::new(
        case.route.config().build().unwrap(),
        DispatcherConfig::new(e as i32).unwrap().build().unwrap(),
        runner,
        Some(shared),
    );

    // Reference.
    let bias = if case.bias { Some(&bias_v[..]) } else { None };
    let z = logits_reference(&x.exact, &wg.exact, h, e);
    let (ids, weights) = route_reference(&case.route, &z, bias, valid);
    let routed = moe_reference(&ex, &x.exact, &ids, &weights, &w13.exact, &w2.exact);
    let shared_ref = shared_reference(
        &sh,
        &x.exact,
        &s13.exact,
        &s2.exact,
        if case.shared_gate { Some(&sg.exact) } else { None },
    );
    let n_valid = valid.unwrap_or(t);
    let reference: Vec<f64> = (0..t * h)
        .map(|n| {
            if n / h < n_valid {
                routed[n] + shared_ref[n]
            } else {
                0.0
            }
        })
        .collect();

    // Library, with the internal workspace and with a caller one.
    let bias_t = Tensor::f32(&bias_f32, &[e as i64]).unwrap();
    let valid_v = [n_valid as i32];
    let valid_t = Tensor::i32(&valid_v, &[1]).unwrap();
    let shape = [t as i64, h as i64];
    let mut out = FpOut::poisoned(fp, t * h);
    block
        .forward(
            &x.tensor(&shape),
            &wg.tensor(&[e as i64, h as i64]),
            if case.bias { Some(&bias_t) } else { None },
            valid.map(|_| &valid_t),
            &mut out.tensor(&shape),
            Workspace::internal(),
            Stream::DEFAULT,
        )
        .unwrap();
    let mut ws = HostWorkspace::new(block.workspace_size(t as i64, Device::Cpu).unwrap()).unwrap();
    let mut out2 = FpOut::poisoned(fp, t * h);
    block
        .forward(
            &x.tensor(&shape),
            &wg.tensor(&[e as i64, h as i64]),
            if case.bias { Some(&bias_t) } else { None },
            valid.map(|_| &valid_t),
            &mut out2.tensor(&shape),
            Workspace::host(&mut ws),
            Stream::DEFAULT,
        )
        .unwrap();
    let (got, got2) = (out.values(), out2.values());
    assert!(
        got.iter().zip(&got2).all(|(a, b)| a.to_bits() == b.to_bits()),
        "caller workspace changed the result"
    );

    // Compare the rows whose routing f32 decides like float64.
    let rows: Vec<usize> = (0..t)
        .filter(|&r| r >= n_valid || routing_margin(&case.route, &z[r * e..(r + 1) * e], bias) > 1e-4)
        .collect();
    assert!(
        rows.len() * 4 >= t * 3,
        "only {} of {t} rows have a clear routing",
        rows.len()
    );
    let pick = |v: &[f64]| -> Vec<f64> {
        rows.iter()
            .flat_map(|&r| v[r * h..(r + 1) * h].to_vec())
            .collect()
    };
    assert_close(
        &format!("block {fp:?} T={t}"),
        &pick(&got),
        &pick(&reference),
        tolerance(fp),
    );
    for r in n_valid..t {
        assert!(
            got[r * h..(r + 1) * h].iter().all(|&v| v == 0.0),
            "padded row {r} is not zero"
        );
    }
}

#[test]
fn block_deepseek_v3_like() {
    for fp in ALL_FP {
        check_block(&deepseek(), fp, 37, None);
        check_block(&deepseek(), fp, 1, None);
    }
}

#[test]
fn block_qwen2_moe_like() {
    for fp in ALL_FP {
        check_block(&qwen2(), fp, 29, None);
    }
}

#[test]
fn block_padded_rows_are_zero() {
    check_block(&deepseek(), Fp::F32, 20, Some(13));
    check_block(&qwen2(), Fp::BF16, 9, Some(0));
}

#[test]
fn route_hidden_returns_f32_logits_and_routes_them() {
    let mut rng = Rng::fresh();
    let case = deepseek();
    let (t, h, e) = (23usize, 64usize, case.route.e);
    let c = case.route.columns();
    for fp in ALL_FP {
        let x = FpData::new(fp, &dyadic(&mut rng, t * h, 32, 32.0));
        let wg = FpData::new(fp, &dyadic(&mut rng, e * h, 32, 64.0));
        let bias: Vec<f32> = dyadic(&mut rng, e, 8, 64.0).iter().map(|&v| v as f32).collect();
        let router = case.route.config().build().unwrap();
        let (mut ids, mut w, mut z) = (vec![-7i32; t * c], vec![f32::NAN; t * c], vec![f32::NAN; t * e]);
        let mut ws = HostWorkspace::new(
            router
                .hidden_workspace_size(h as i32, t as i64, Device::Cpu)
                .unwrap(),
        )
        .unwrap();
        router
            .route_hidden(
                &x.tensor(&[t as i64, h as i64]),
                &wg.tensor(&[e as i64, h as i64]),
                Some(&Tensor::f32(&bias, &[e as i64]).unwrap()),
                None,
                &mut TensorMut::i32(&mut ids, &[t as i64, c as i64]).unwrap(),
                &mut TensorMut::f32(&mut w, &[t as i64, c as i64]).unwrap(),
                Some(&mut TensorMut::f32(&mut z, &[t as i64, e as i64]).unwrap()),
                Workspace::host(&mut ws),
                Stream::DEFAULT,
            )
            .unwrap();
        // Exact: the inputs are dyadic, so f32 accumulation loses nothing.
        let zref = logits_reference(&x.exact, &wg.exact, h, e);
        assert!(
            z.iter().zip(&zref).all(|(&a, &b)| a as f64 == b),
            "{fp:?}: logits differ"
        );
        // The same as routing those logits (without a logits output, internal workspace).
        let (mut ids2, mut w2) = (vec![-7i32; t * c], vec![f32::NAN; t * c]);
        router
            .route(
                &Tensor::f32(&z, &[t as i64, e as i64]).unwrap(),
                Some(&Tensor::f32(&bias, &[e as i64]).unwrap()),
                None,
                &mut TensorMut::i32(&mut ids2, &[t as i64, c as i64]).unwrap(),
                &mut TensorMut::f32(&mut w2, &[t as i64, c as i64]).unwrap(),
                Stream::DEFAULT,
            )
            .unwrap();
        assert_eq!(ids, ids2, "{fp:?}");
        assert!(
            w.iter().zip(&w2).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{fp:?}"
        );
    }
}

#[test]
fn shared_experts_run_and_accumulate() {
    let mut rng = Rng::fresh();
    let (t, h, i, n) = (11usize, 32usize, 24usize, 2usize);
    for fp in ALL_FP {
        let s = ExpertSpec::new(n, h, i);
        let x = FpData::new(fp, &rng.normals(t * h, 1.0));
        let w13 = normals_fp(&mut rng, fp, n * s.rows13() * h, h);
        let w2 = normals_fp(&mut rng, fp, n * h * i, i);
        let g = normals_fp(&mut rng, fp, h, h);
        let mut shared = SharedExpertsConfig::new(n as i32, h as i32, i as i32)
            .unwrap()
            .build()
            .unwrap();
        let gt = g.tensor(&[1, h as i64]);
        shared
            .set_weights(&w13.tensor(&s.w13_shape()), &w2.tensor(&s.w2_shape()), Some(&gt))
            .unwrap();
        let reference = shared_reference(&s, &x.exact, &w13.exact, &w2.exact, Some(&g.exact));
        let shape = [t as i64, h as i64];
        let mut out = FpOut::poisoned(fp, t * h);
        shared
            .run(
                &x.tensor(&shape),
                None,
                &mut out.tensor(&shape),
                false,
                Workspace::internal(),
                Stream::DEFAULT,
            )
            .unwrap();
        assert_close(
            &format!("shared {fp:?}"),
            &out.values(),
            &reference,
            tolerance(fp),
        );

        // accumulate: output (= base) + shared(x), with a caller workspace.
        let base = FpData::new(fp, &rng.normals(t * h, 1.0));
        let mut acc = FpOut::poisoned(fp, t * h);
        acc.f32.clone_from(&base.f32);
        acc.u16.clone_from(&base.u16);
        let mut ws = HostWorkspace::new(shared.workspace_size(t as i64, Device::Cpu).unwrap()).unwrap();
        shared
            .run(
                &x.tensor(&shape),
                None,
                &mut acc.tensor(&shape),
                true,
                Workspace::host(&mut ws),
                Stream::DEFAULT,
            )
            .unwrap();
        let want: Vec<f64> = reference.iter().zip(&base.exact).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("shared accumulate {fp:?}"),
            &acc.values(),
            &want,
            tolerance(fp),
        );
    }
}

fn small_block() -> Block<'static> {
    static S13: [f32; 8 * 8] = [0.02; 8 * 8];
    static S2: [f32; 8 * 4] = [0.02; 8 * 4];
    let runner = RunnerConfig4::runner();
    let mut shared = SharedExpertsConfig::new(1, 8, 4).unwrap().build().unwrap();
    shared
        .set_weights(
            &Tensor::f32(&S13, &[1, 8, 8]).unwrap(),
            &Tensor::f32(&S2, &[1, 8, 4]).unwrap(),
            None,
        )
        .unwrap();
    Block::new(
        moe::RouterConfig::new(moe::RoutingMethod::SOFTMAX_TOPK, 4, 2)
            .unwrap()
            .build()
            .unwrap(),
        DispatcherConfig::new(4).unwrap().build().unwrap(),
        runner,
        Some(shared),
    )
}

/// A runner of 4 experts, H = 8, I = 4, with static weights.
struct RunnerConfig4;
impl RunnerConfig4 {
    fn runner() -> moe::Runner<'static> {
        static W13: [f32; 4 * 8 * 8] = [0.01; 4 * 8 * 8];
        static W2: [f32; 4 * 8 * 4] = [0.01; 4 * 8 * 4];
        let mut r = moe::RunnerConfig::new(4, 8, 4).unwrap().build().unwrap();
        r.set_weights(
            &Tensor::f32(&W13, &[4, 8, 8]).unwrap(),
            &Tensor::f32(&W2, &[4, 8, 4]).unwrap(),
        )
        .unwrap();
        r
    }
}

fn assert_invalid_naming(r: moe::Result<()>, arg: &str) {
    let err = r.expect_err("expected an error");
    assert_eq!(err.status, Status::INVALID_ARGUMENT, "{err}");
    assert!(
        err.message.contains(arg),
        "message does not name {arg}: {}",
        err.message
    );
}

#[test]
fn block_errors_name_the_argument() {
    let block = small_block();
    let (t, h, e) = (3usize, 8usize, 4usize);
    let x = vec![0.5f32; t * h];
    let wg = vec![0.25f32; e * h];
    let wg_bad = vec![0.25f32; (e + 1) * h];
    let mut y = vec![f32::NAN; t * h];
    let mut y_bad = vec![f32::NAN; t * (h + 1)];
    let run = |x: &Tensor<'_>, wg: &Tensor<'_>, y: &mut TensorMut<'_>| {
        block.forward(x, wg, None, None, y, Workspace::internal(), Stream::DEFAULT)
    };
    assert_invalid_naming(
        run(
            &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
            &Tensor::f32(&wg_bad, &[e as i64 + 1, h as i64]).unwrap(),
            &mut TensorMut::f32(&mut y, &[t as i64, h as i64]).unwrap(),
        ),
        "gate_weight",
    );
    assert_invalid_naming(
        run(
            &Tensor::f32(&x, &[h as i64, t as i64]).unwrap(),
            &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
            &mut TensorMut::f32(&mut y, &[t as i64, h as i64]).unwrap(),
        ),
        "hidden",
    );
    assert_invalid_naming(
        run(
            &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
            &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
            &mut TensorMut::f32(&mut y_bad, &[t as i64, h as i64 + 1]).unwrap(),
        ),
        "output",
    );
    // A caller workspace that is too small.
    let mut ws = HostWorkspace::new(64).unwrap();
    assert_invalid_naming(
        block.forward(
            &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
            &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
            None,
            None,
            &mut TensorMut::f32(&mut y, &[t as i64, h as i64]).unwrap(),
            Workspace::host(&mut ws),
            Stream::DEFAULT,
        ),
        "workspace",
    );
    // Shared experts without weights are named as such.
    let unset = Block::new(
        moe::RouterConfig::new(moe::RoutingMethod::SOFTMAX_TOPK, 4, 2)
            .unwrap()
            .build()
            .unwrap(),
        DispatcherConfig::new(4).unwrap().build().unwrap(),
        RunnerConfig4::runner(),
        Some(SharedExpertsConfig::new(1, 8, 4).unwrap().build().unwrap()),
    );
    assert_invalid_naming(
        unset.forward(
            &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
            &Tensor::f32(&wg, &[e as i64, h as i64]).unwrap(),
            None,
            None,
            &mut TensorMut::f32(&mut y, &[t as i64, h as i64]).unwrap(),
            Workspace::internal(),
            Stream::DEFAULT,
        ),
        "shared",
    );
    // The convenience wrapper checks slice lengths itself.
    let err = block.forward_f32(&x, &wg_bad, None).unwrap_err();
    assert!(err.message.contains("gate_weight"), "{}", err.message);
    // route_hidden: the gate's E must be the router's.
    let (mut ids, mut w) = (vec![0i32; t * 2], vec![0f32; t * 2]);
    assert_invalid_naming(
        block.router.route_hidden(
            &Tensor::f32(&x, &[t as i64, h as i64]).unwrap(),
            &Tensor::f32(&wg_bad, &[e as i64 + 1, h as i64]).unwrap(),
            None,
            None,
            &mut TensorMut::i32(&mut ids, &[t as i64, 2]).unwrap(),
            &mut TensorMut::f32(&mut w, &[t as i64, 2]).unwrap(),
            None,
            Workspace::internal(),
            Stream::DEFAULT,
        ),
        "gate_weight",
    );
}

#[test]
fn shared_experts_errors_name_the_argument() {
    assert_invalid_naming(
        SharedExpertsConfig::new(0, 8, 4).unwrap().build().map(|_| ()),
        "num_shared_experts",
    );
    assert_invalid_naming(
        SharedExpertsConfig::new(1, 0, 4).unwrap().build().map(|_| ()),
        "hidden_size",
    );
    let w13 = vec![0f32; 2 * 4 * 8];
    let w2 = vec![0f32; 8 * 4];
    let mut shared = SharedExpertsConfig::new(1, 8, 4).unwrap().build().unwrap();
    assert_invalid_naming(
        shared.set_weights(
            &Tensor::f32(&w13, &[1, 8, 8]).unwrap(),
            &Tensor::f32(&w2, &[1, 4, 8]).unwrap(),
            None,
        ),
        "w2",
    );
    assert_invalid_naming(
        shared.set_weights(
            &Tensor::f32(&w13, &[2, 4, 8]).unwrap(),
            &Tensor::f32(&w2, &[1, 8, 4]).unwrap(),
            None,
        ),
        "w13",
    );
    // Running before the weights are set is an error too.
    let x = vec![0f32; 8];
    let mut y = vec![0f32; 8];
    let err = shared
        .run(
            &Tensor::f32(&x, &[1, 8]).unwrap(),
            None,
            &mut TensorMut::f32(&mut y, &[1, 8]).unwrap(),
            false,
            Workspace::internal(),
            Stream::DEFAULT,
        )
        .unwrap_err();
    assert_ne!(err.status, Status::SUCCESS);
    assert!(!err.message.is_empty());
}
