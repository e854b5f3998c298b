//! Every routing method, through the safe API, against the float64 reference
//! of SEMANTICS.md section 1 (tests/common), for f32, bf16 and f16 logits.

mod common;

use common::*;
use moe::{Stream, Tensor, TensorMut};

/// Routes `z` (rounded to `fp`) with the library and checks ids exactly and
/// weights to 1e-5 (f32 arithmetic on exactly representable inputs).
fn check_route(
    spec: &RouteSpec,
    fp: Fp,
    t: usize,
    bias: Option<&[f64]>,
    num_valid: Option<usize>,
    rng: &mut Rng,
) {
    let router = spec.config().build().unwrap();
    assert_eq!(router.output_columns() as usize, spec.columns());
    let logits = FpData::new(fp, &rng.normals(t * spec.e, 2.0));
    let bias32: Option<Vec<f32>> = bias.map(|b| b.iter().map(|&v| v as f32).collect());
    let bias_exact: Option<Vec<f64>> = bias32.as_ref().map(|b| b.iter().map(|&v| v as f64).collect());
    let valid = num_valid.map(|n| [n as i32]);

    let cols = spec.columns();
    let shape = [t as i64, cols as i64];
    let mut ids = vec![0x7f7f_7f7fi32; t * cols];
    let mut weights = vec![f32::NAN; t * cols];
    let bias_t = bias32.as_ref().map(|b| Tensor::f32(b, &[spec.e as i64]).unwrap());
    let valid_t = valid.as_ref().map(|v| Tensor::i32(v, &[1]).unwrap());
    router
        .route(
            &logits.tensor(&[t as i64, spec.e as i64]),
            bias_t.as_ref(),
            valid_t.as_ref(),
            &mut TensorMut::i32(&mut ids, &shape).unwrap(),
            &mut TensorMut::f32(&mut weights, &shape).unwrap(),
            Stream::DEFAULT,
        )
        .unwrap_or_else(|e| panic!("{spec:?} {fp:?}: {e}"));

    let (ref_ids, ref_w) = route_reference(spec, &logits.exact, bias_exact.as_deref(), num_valid);
    assert_eq!(
        ids, ref_ids,
        "{spec:?} {fp:?} T={t}: ids differ from the reference"
    );
    let w: Vec<f64> = weights.iter().map(|&v| v as f64).collect();
    assert_close(&format!("{spec:?} {fp:?} T={t} weights"), &w, &ref_w, 1e-5);
}

/// A few configurations of `method` per dtype, with a fresh T each time.
fn check_method(method: i32, variants: &[RouteSpec], with_bias: bool) {
    let mut rng = Rng::fresh();
    for spec in variants {
        assert_eq!(spec.method, method);
        for fp in ALL_FP {
            let t = rng.int(1, 70) as usize;
            let bias = if with_bias {
                Some(rng.normals(spec.e, 0.5))
            } else {
                None
            };
            check_route(spec, fp, t, bias.as_deref(), None, &mut rng);
        }
    }
}

fn spec(method: i32, e: usize, k: usize, f: impl Fn(&mut RouteSpec)) -> RouteSpec {
    let mut s = RouteSpec::new(method, e, k);
    f(&mut s);
    s
}

#[test]
fn router_softmax_topk() {
    check_method(
        SOFTMAX_TOPK,
        &[
            spec(SOFTMAX_TOPK, 8, 2, |_| {}),
            spec(SOFTMAX_TOPK, 64, 8, |s| s.renormalize = true),
            spec(SOFTMAX_TOPK, 33, 33, |s| s.scaling = 2.5),
        ],
        false,
    );
}

#[test]
fn router_topk_softmax() {
    check_method(
        TOPK_SOFTMAX,
        &[
            spec(TOPK_SOFTMAX, 8, 2, |_| {}),
            spec(TOPK_SOFTMAX, 128, 8, |s| s.scaling = 0.5),
        ],
        false,
    );
}

#[test]
fn router_sigmoid_topk() {
    let variants = [
        spec(SIGMOID_TOPK, 16, 4, |_| {}),
        spec(SIGMOID_TOPK, 40, 6, |s| {
            s.renormalize = true;
            s.scaling = 1.75
        }),
    ];
    check_method(SIGMOID_TOPK, &variants, false);
    check_method(SIGMOID_TOPK, &variants, true);
}

#[test]
fn router_deepseek_v3() {
    let variants = [
        // DeepSeek-V3's shape scaled down: 8 groups, keep 4, k = 8, scaled weights.
        spec(DEEPSEEK_V3, 64, 8, |s| {
            s.n_group = 8;
            s.topk_group = 4;
            s.scaling = 2.5
        }),
        spec(DEEPSEEK_V3, 32, 3, |s| {
            s.n_group = 4;
            s.topk_group = 1;
            s.renormalize = false
        }),
        spec(DEEPSEEK_V3, 16, 2, |_| {}),
    ];
    check_method(DEEPSEEK_V3, &variants, true);
    check_method(DEEPSEEK_V3, &variants, false);
}

#[test]
fn router_grouped_softmax() {
    check_method(
        GROUPED_SOFTMAX,
        &[
            spec(GROUPED_SOFTMAX, 64, 6, |s| {
                s.n_group = 8;
                s.topk_group = 3;
                s.scaling = 16.0
            }),
            spec(GROUPED_SOFTMAX, 24, 4, |s| {
                s.n_group = 3;
                s.topk_group = 2;
                s.renormalize = true
            }),
        ],
        false,
    );
}

#[test]
fn router_llama4() {
    check_method(
        LLAMA4,
        &[spec(LLAMA4, 16, 1, |_| {}), spec(LLAMA4, 128, 1, |_| {})],
        false,
    );
}

#[test]
fn router_num_valid_tokens_pads_rows() {
    let mut rng = Rng::fresh();
    for method in [SOFTMAX_TOPK, DEEPSEEK_V3] {
        let s = spec(method, 32, 4, |s| {
            if method == DEEPSEEK_V3 {
                s.n_group = 4;
                s.topk_group = 2;
            }
        });
        for valid in [0usize, 5, 12, 40] {
            check_route(&s, Fp::F32, 12, None, Some(valid), &mut rng);
        }
    }
}

#[test]
fn router_fused_shared_experts_and_output_scaling() {
    let mut rng = Rng::fresh();
    for on_output in [false, true] {
        let s = spec(DEEPSEEK_V3, 32, 4, |s| {
            s.n_group = 4;
            s.topk_group = 2;
            s.scaling = 2.5;
            s.scaling_on_output = on_output;
            s.n_shared = 2;
        });
        let bias = rng.normals(32, 0.3);
        check_route(&s, Fp::BF16, 9, Some(&bias), None, &mut rng);
    }
}

#[test]
fn router_non_finite_logits_are_never_selected() {
    let (t, e, k) = (3usize, 8usize, 4usize);
    let ninf = f32::NEG_INFINITY;
    // Row 0: two finite experts only; row 1: NaNs among finite values; row 2: all -inf.
    let logits: Vec<f32> = [
        [ninf, 1.0, ninf, f32::NAN, ninf, 0.5, ninf, ninf],
        [0.3, f32::NAN, -1.0, 2.0, f32::NAN, 0.1, -0.2, 0.7],
        [ninf; 8],
    ]
    .concat();
    for method in [SOFTMAX_TOPK, TOPK_SOFTMAX, SIGMOID_TOPK] {
        let s = spec(method, e, k, |s| s.renormalize = method != TOPK_SOFTMAX);
        let router = s.config().build().unwrap();
        let mut ids = vec![0x7f7f_7f7fi32; t * k];
        let mut w = vec![f32::NAN; t * k];
        router
            .route(
                &Tensor::f32(&logits, &[t as i64, e as i64]).unwrap(),
                None,
                None,
                &mut TensorMut::i32(&mut ids, &[t as i64, k as i64]).unwrap(),
                &mut TensorMut::f32(&mut w, &[t as i64, k as i64]).unwrap(),
                Stream::DEFAULT,
            )
            .unwrap();
        let z: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let (ref_ids, ref_w) = route_reference(&s, &z, None, None);
        assert_eq!(ids, ref_ids, "method {method}");
        assert_eq!(
            &ids[0..4],
            &[1, 5, -1, -1],
            "method {method}: only the finite experts of row 0"
        );
        assert_eq!(
            &ids[8..12],
            &[-1, -1, -1, -1],
            "method {method}: an all -inf row selects nothing"
        );
        assert!(w[8..12].iter().all(|&v| v == 0.0));
        let w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        assert_close(&format!("method {method} weights"), &w, &ref_w, 1e-5);
    }
}

#[test]
fn router_rows_do_not_depend_on_the_batch() {
    let mut rng = Rng::fresh();
    let s = spec(DEEPSEEK_V3, 64, 8, |s| {
        s.n_group = 8;
        s.topk_group = 4
    });
    let router = s.config().build().unwrap();
    let t = 150; // more than one 64-row chunk of the CPU backend's threads
    let logits: Vec<f32> = rng.normals(t * 64, 1.0).iter().map(|&v| v as f32).collect();
    let (all_ids, all_w) = router.route_f32(&logits).unwrap();
    for row in [0usize, 63, 64, 149] {
        let (ids, w) = router.route_f32(&logits[row * 64..(row + 1) * 64]).unwrap();
        assert_eq!(ids, &all_ids[row * 8..(row + 1) * 8]);
        assert_eq!(
            w,
            &all_w[row * 8..(row + 1) * 8],
            "row {row}: weights must be bit-identical"
        );
    }
}

#[test]
fn pack_topk_matches_the_packed_format() {
    let mut rng = Rng::fresh();
    let (t, k) = (10usize, 4usize);
    let mut ids: Vec<i32> = (0..t * k).map(|_| rng.int(-1, 300) as i32).collect();
    ids[3] = -1;
    ids[4] = 32767;
    let w: Vec<f32> = (0..t * k).map(|_| rng.uniform() as f32).collect();
    let mut packed = vec![0x7f7f_7f7fi32; t * k];
    let shape = [t as i64, k as i64];
    moe::pack_topk(
        &Tensor::i32(&ids, &shape).unwrap(),
        &Tensor::f32(&w, &shape).unwrap(),
        &mut TensorMut::i32(&mut packed, &shape).unwrap(),
        Stream::DEFAULT,
    )
    .unwrap();
    for n in 0..t * k {
        let expect = ((ids[n] as u32) << 16 | f32_to_bf16(w[n]) as u32) as i32;
        assert_eq!(packed[n], expect, "slot {n}: id {} weight {}", ids[n], w[n]);
        assert_eq!(
            packed[n] >> 16,
            ids[n],
            "slot {n}: the id must survive in the high half"
        );
    }
}
