//! Test support: fresh random data, 16-bit float conversions, error norms, and
//! float64 references of SEMANTICS.md section 1 (routing), section 3
//! (dispatch metadata) and section 4 (the expert computation), written from
//! the spec independently of the library.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

// --- random numbers --------------------------------------------------------

/// splitmix64: small, std-only, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator with a seed never used before in this process (printed, so a failure can be replayed
    /// with MOE_TEST_SEED).
    pub fn fresh() -> Rng {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = match std::env::var("MOE_TEST_SEED") {
            Ok(s) => {
                s.parse::<u64>().expect("MOE_TEST_SEED must be an integer")
                    ^ COUNTER.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => {
                let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
                nanos
                    ^ (COUNTER
                        .fetch_add(1, Ordering::Relaxed)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
        };
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi].
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize, stddev: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * stddev).collect()
    }
}

// --- 16-bit floats -----------------------------------------------------------

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Round to nearest even.
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if f.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (rounded >> 16) as u16
}

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    match exp {
        0 => sign * man * 2f32.powi(-24),
        31 => {
            if man == 0.0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            }
        }
        _ => sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
    }
}

/// Round to nearest even.
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let round = |value: u32, shift: u32| -> u32 {
        let half = 1u32 << (shift - 1);
        let rem = value & ((1u32 << shift) - 1);
        let mut r = value >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        r
    };
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        return sign | round(man | 0x80_0000, (14 - e) as u32) as u16;
    }
    // A carry out of the mantissa correctly bumps the exponent.
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// Floats in one of the three activation dtypes: the bits to hand over and
/// the exact values they hold (what a reference must use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp {
    F32,
    BF16,
    F16,
}

pub const ALL_FP: [Fp; 3] = [Fp::F32, Fp::BF16, Fp::F16];

/// Values rounded to `fp`: (f32 storage, u16 storage, exact values as f64).
pub struct FpData {
    pub fp: Fp,
    pub f32: Vec<f32>,
    pub u16: Vec<u16>,
    pub exact: Vec<f64>,
}

impl FpData {
    pub fn new(fp: Fp, values: &[f64]) -> FpData {
        let mut d = FpData {
            fp,
            f32: Vec::new(),
            u16: Vec::new(),
            exact: Vec::new(),
        };
        for &v in values {
            match fp {
                Fp::F32 => {
                    d.f32.push(v as f32);
                    d.exact.push(v as f32 as f64);
                }
                Fp::BF16 => {
                    let h = f32_to_bf16(v as f32);
                    d.u16.push(h);
                    d.exact.push(bf16_to_f32(h) as f64);
                }
                Fp::F16 => {
                    let h = f32_to_f16(v as f32);
                    d.u16.push(h);
                    d.exact.push(f16_to_f32(h) as f64);
                }
            }
        }
        d
    }

    pub fn tensor(&self, shape: &[i64]) -> moe::Tensor<'_> {
        match self.fp {
            Fp::F32 => moe::Tensor::f32(&self.f32, shape).unwrap(),
            Fp::BF16 => moe::Tensor::half(&self.u16, moe::HalfType::BF16, shape).unwrap(),
            Fp::F16 => moe::Tensor::half(&self.u16, moe::HalfType::F16, shape).unwrap(),
        }
    }
}

/// A NaN-poisoned output buffer of `n` values in `fp`.
pub struct FpOut {
    pub fp: Fp,
    pub f32: Vec<f32>,
    pub u16: Vec<u16>,
}

impl FpOut {
    pub fn poisoned(fp: Fp, n: usize) -> FpOut {
        match fp {
            Fp::F32 => FpOut {
                fp,
                f32: vec![f32::NAN; n],
                u16: Vec::new(),
            },
            Fp::BF16 => FpOut {
                fp,
                f32: Vec::new(),
                u16: vec![0x7fc0; n],
            },
            Fp::F16 => FpOut {
                fp,
                f32: Vec::new(),
                u16: vec![0x7e00; n],
            },
        }
    }
    pub fn tensor(&mut self, shape: &[i64]) -> moe::TensorMut<'_> {
        match self.fp {
            Fp::F32 => moe::TensorMut::f32(&mut self.f32, shape).unwrap(),
            Fp::BF16 => moe::TensorMut::half(&mut self.u16, moe::HalfType::BF16, shape).unwrap(),
            Fp::F16 => moe::TensorMut::half(&mut self.u16, moe::HalfType::F16, shape).unwrap(),
        }
    }
    pub fn values(&self) -> Vec<f64> {
        match self.fp {
            Fp::F32 => self.f32.iter().map(|&v| v as f64).collect(),
            Fp::BF16 => self.u16.iter().map(|&h| bf16_to_f32(h) as f64).collect(),
            Fp::F16 => self.u16.iter().map(|&h| f16_to_f32(h) as f64).collect(),
        }
    }
}

/// The accuracy contract of SEMANTICS.md section 5.
pub fn tolerance(fp: Fp) -> f64 {
    match fp {
        Fp::F32 => 1e-5,
        Fp::BF16 | Fp::F16 => 1e-2,
    }
}

/// ||out - ref|| / ||ref||; any NaN gives +inf.
pub fn rel_error(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in out.iter().zip(reference) {
        if a.is_nan() || b.is_nan() {
            return f64::INFINITY;
        }
        num += (a - b) * (a - b);
        den += b * b;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

pub fn assert_close(what: &str, out: &[f64], reference: &[f64], tol: f64) {
    let err = rel_error(out, reference);
    assert!(err < tol, "{what}: relative error {err:e} >= {tol:e}");
}

// --- routing reference (SEMANTICS.md section 1) ----------------------------

pub const SOFTMAX_TOPK: i32 = 0;
pub const TOPK_SOFTMAX: i32 = 1;
pub const SIGMOID_TOPK: i32 = 2;
pub const DEEPSEEK_V3: i32 = 3;
pub const GROUPED_SOFTMAX: i32 = 4;
pub const LLAMA4: i32 = 5;

#[derive(Clone, Copy, Debug)]
pub struct RouteSpec {
    pub method: i32,
    pub e: usize,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub renormalize: bool,
    pub scaling: f64,
    pub scaling_on_output: bool,
    pub n_shared: usize,
}

impl RouteSpec {
    pub fn new(method: i32, e: usize, k: usize) -> RouteSpec {
        RouteSpec {
            method,
            e,
            k,
            n_group: 1,
            topk_group: 1,
            renormalize: method == DEEPSEEK_V3,
            scaling: 1.0,
            scaling_on_output: false,
            n_shared: 0,
        }
    }
    pub fn columns(&self) -> usize {
        self.k + self.n_shared
    }
    pub fn config(&self) -> moe::RouterConfig {
        moe::RouterConfig::new(moe::RoutingMethod(self.method), self.e as i32, self.k as i32)
            .unwrap()
            .groups(self.n_group as i32, self.topk_group as i32)
            .renormalize(self.renormalize)
            .routed_scaling_factor(self.scaling as f32)
            .scaling_on_output(self.scaling_on_output)
            .num_fused_shared_experts(self.n_shared as i32)
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Scores that may be selected: neither NaN nor -inf.
fn selectable(x: f64) -> bool {
    !x.is_nan() && x != f64::NEG_INFINITY
}

/// Softmax over the selectable entries (others get 0).
fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z
        .iter()
        .copied()
        .filter(|&v| selectable(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = z
        .iter()
        .map(|&v| if selectable(v) { (v - m).exp() } else { 0.0 })
        .collect();
    let s: f64 = ex.iter().sum();
    ex.iter().map(|&v| v / s).collect()
}

/// Indices of the `n` largest selectable keys among `candidates`, best first; ties to the lower index.
fn topk(keys: &[f64], candidates: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
    let mut c: Vec<usize> = candidates.filter(|&i| selectable(keys[i])).collect();
    c.sort_by(|&a, &b| keys[b].partial_cmp(&keys[a]).unwrap().then(a.cmp(&b)));
    c.truncate(n);
    c
}

/// Experts in the `topk_group` best groups by `group_score`.
fn kept_experts(spec: &RouteSpec, keys: &[f64], group_score: impl Fn(&[f64]) -> f64) -> Vec<usize> {
    let gsize = spec.e / spec.n_group;
    let scores: Vec<f64> = (0..spec.n_group)
        .map(|g| group_score(&keys[g * gsize..(g + 1) * gsize]))
        .collect();
    let groups = topk(&scores, 0..spec.n_group, spec.topk_group);
    let mut experts: Vec<usize> = groups.iter().flat_map(|&g| g * gsize..(g + 1) * gsize).collect();
    experts.sort();
    experts
}

/// Reference routing of `t` rows of logits `z` [t, E]: (ids, weights), each [t, columns].
pub fn route_reference(
    spec: &RouteSpec,
    z: &[f64],
    bias: Option<&[f64]>,
    num_valid: Option<usize>,
) -> (Vec<i32>, Vec<f64>) {
    let (e, k, cols) = (spec.e, spec.k, spec.columns());
    let t = z.len() / e;
    let valid = num_valid.unwrap_or(t).min(t);
    let mut ids = vec![-1i32; t * cols];
    let mut ws = vec![0.0f64; t * cols];
    for row in 0..valid {
        let z = &z[row * e..(row + 1) * e];
        let b = |i: usize| bias.map_or(0.0, |b| b[i]);
        let (sel, w): (Vec<usize>, Vec<f64>) = match spec.method {
            SOFTMAX_TOPK | GROUPED_SOFTMAX => {
                let p = softmax(z);
                let keys: Vec<f64> = (0..e)
                    .map(|i| if selectable(z[i]) { p[i] } else { f64::NAN })
                    .collect();
                let cand = if spec.method == GROUPED_SOFTMAX && spec.n_group > 1 {
                    kept_experts(spec, &keys, |g| {
                        g.iter()
                            .copied()
                            .filter(|&v| selectable(v))
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                } else {
                    (0..e).collect()
                };
                let s = topk(&keys, cand.into_iter(), k);
                let mut w: Vec<f64> = s.iter().map(|&i| p[i]).collect();
                if spec.renormalize {
                    let sum: f64 = w.iter().sum();
                    w.iter_mut().for_each(|v| *v /= sum);
                }
                (s, w)
            }
            TOPK_SOFTMAX => {
                let s = topk(z, 0..e, k);
                let zs: Vec<f64> = s.iter().map(|&i| z[i]).collect();
                (s, softmax(&zs))
            }
            SIGMOID_TOPK | DEEPSEEK_V3 => {
                let sg: Vec<f64> = z.iter().map(|&v| sigmoid(v)).collect();
                let c: Vec<f64> = (0..e)
                    .map(|i| if selectable(z[i]) { sg[i] + b(i) } else { f64::NAN })
                    .collect();
                let cand = if spec.method == DEEPSEEK_V3 && spec.n_group > 1 {
                    kept_experts(spec, &c, |g| {
                        let top = topk(g, 0..g.len(), 2);
                        if top.is_empty() {
                            return f64::NEG_INFINITY; // nothing selectable: never kept
                        }
                        top.iter().map(|&i| g[i]).sum()
                    })
                } else {
                    (0..e).collect()
                };
                let s = topk(&c, cand.into_iter(), k);
                let mut w: Vec<f64> = s.iter().map(|&i| sg[i]).collect();
                if spec.renormalize {
                    let sum: f64 = w.iter().sum::<f64>() + 1e-20;
                    w.iter_mut().for_each(|v| *v /= sum);
                }
                (s, w)
            }
            LLAMA4 => {
                let s = topk(z, 0..e, 1);
                let w = s.iter().map(|&i| sigmoid(z[i])).collect();
                (s, w)
            }
            m => panic!("no reference for routing method {m}"),
        };
        let scale = if spec.scaling_on_output { 1.0 } else { spec.scaling };
        for (j, (&i, &wv)) in sel.iter().zip(&w).enumerate() {
            ids[row * cols + j] = i as i32;
            ws[row * cols + j] = wv * scale;
        }
        for j in 0..spec.n_shared {
            ids[row * cols + k + j] = (e + j) as i32;
            ws[row * cols + k + j] = if spec.scaling_on_output {
                1.0 / spec.scaling
            } else {
                1.0
            };
        }
    }
    (ids, ws)
}

// --- dispatch reference (SEMANTICS.md section 3) ---------------------------

pub struct DispatchRef {
    pub local_ids: Vec<i32>,
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub sorted_slots: Vec<i32>,
}

/// Contiguous expert-parallel mapping: global id -> local id or -1.
pub fn contiguous_mapping(e: usize, ep_rank: usize, ep_size: usize) -> Vec<i32> {
    let per = e / ep_size;
    (0..e)
        .map(|g| if g / per == ep_rank { (g % per) as i32 } else { -1 })
        .collect()
}

pub fn dispatch_reference(ids: &[i32], mapping: &[i32], e_loc: usize) -> DispatchRef {
    let local_ids: Vec<i32> = ids
        .iter()
        .map(|&g| if g < 0 { -1 } else { mapping[g as usize] })
        .collect();
    let mut counts = vec![0i32; e_loc];
    for &l in &local_ids {
        if l >= 0 {
            counts[l as usize] += 1;
        }
    }
    let mut offsets = vec![0i32; e_loc + 1];
    for x in 0..e_loc {
        offsets[x + 1] = offsets[x] + counts[x];
    }
    let mut sorted_slots = vec![-1i32; ids.len()];
    let mut fill = offsets.clone();
    for (slot, &l) in local_ids.iter().enumerate() {
        if l >= 0 {
            sorted_slots[fill[l as usize] as usize] = slot as i32;
            fill[l as usize] += 1;
        }
    }
    DispatchRef {
        local_ids,
        counts,
        offsets,
        sorted_slots,
    }
}

// --- expert computation reference (SEMANTICS.md section 4) -----------------

pub const SILU: i32 = 0;
pub const GELU: i32 = 1;
pub const GELU_TANH: i32 = 2;
pub const RELU2: i32 = 3;
pub const IDENTITY: i32 = 4;

/// erf by its everywhere-convergent series erf(x) = 2/sqrt(pi) e^{-x^2} sum 2^n x^{2n+1} / (2n+1)!!
/// (positive terms: no cancellation, so full f64 accuracy).
pub fn erf(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0f64);
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x * x / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

pub fn activation(act: i32, x: f64) -> f64 {
    match act {
        SILU => x / (1.0 + (-x).exp()),
        GELU => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        GELU_TANH => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        RELU2 => {
            let r = x.max(0.0);
            r * r
        }
        IDENTITY => x,
        a => panic!("no reference for activation {a}"),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ExpertSpec {
    pub e_loc: usize,
    pub h: usize,
    pub i: usize,
    pub act: i32,
    pub gated: bool,
    pub swap_gate_up: bool,
    pub weight_on_input: bool,
    pub output_scale: f64,
    /// FP8 modes: activations are fake-quantized in groups of this many values
    /// before each matmul (a whole row for per-tensor, 128 for block scales); 0 = none.
    pub fp8_act_group: usize,
}

impl ExpertSpec {
    pub fn new(e_loc: usize, h: usize, i: usize) -> ExpertSpec {
        ExpertSpec {
            e_loc,
            h,
            i,
            act: SILU,
            gated: true,
            swap_gate_up: false,
            weight_on_input: false,
            output_scale: 1.0,
            fp8_act_group: 0,
        }
    }
    pub fn rows13(&self) -> usize {
        if self.gated {
            2 * self.i
        } else {
            self.i
        }
    }
    pub fn w13_shape(&self) -> [i64; 3] {
        [self.e_loc as i64, self.rows13() as i64, self.h as i64]
    }
    pub fn w2_shape(&self) -> [i64; 3] {
        [self.e_loc as i64, self.h as i64, self.i as i64]
    }
    pub fn config(&self) -> moe::RunnerConfig {
        moe::RunnerConfig::new(self.e_loc as i32, self.h as i32, self.i as i32)
            .unwrap()
            .activation(moe::Activation(self.act))
            .gated(self.gated)
            .swap_gate_up(self.swap_gate_up)
            .apply_router_weight_on_input(self.weight_on_input)
            .output_scale(self.output_scale as f32)
    }
}

/// y [T, H] = output_scale * sum over slots with local id != -1 of w * W2[id] . act(W13[id] . x).
pub fn moe_reference(
    s: &ExpertSpec,
    x: &[f64],
    local_ids: &[i32],
    weights: &[f64],
    w13: &[f64],
    w2: &[f64],
) -> Vec<f64> {
    let (h, i, r13) = (s.h, s.i, s.rows13());
    let t = x.len() / h;
    let kk = local_ids.len() / t;
    let mut y = vec![0.0f64; t * h];
    let mut act = vec![0.0f64; i];
    for tok in 0..t {
        for j in 0..kk {
            let id = local_ids[tok * kk + j];
            if id < 0 {
                continue;
            }
            let wgt = weights[tok * kk + j];
            let (in_scale, out_scale) = if s.weight_on_input { (wgt, 1.0) } else { (1.0, wgt) };
            let mut xr: Vec<f64> = x[tok * h..(tok + 1) * h].iter().map(|v| v * in_scale).collect();
            if s.fp8_act_group > 0 {
                fake_quant_e4m3(&mut xr, s.fp8_act_group);
            }
            let w13e = &w13[id as usize * r13 * h..(id as usize + 1) * r13 * h];
            let dot = |row: usize| -> f64 { (0..h).map(|c| w13e[row * h + c] * xr[c]).sum() };
            for (n, a) in act.iter_mut().enumerate() {
                *a = if s.gated {
                    let (gate_row, up_row) = if s.swap_gate_up { (i + n, n) } else { (n, i + n) };
                    activation(s.act, dot(gate_row)) * dot(up_row)
                } else {
                    activation(s.act, dot(n))
                };
            }
            if s.fp8_act_group > 0 {
                fake_quant_e4m3(&mut act, s.fp8_act_group);
            }
            let w2e = &w2[id as usize * h * i..(id as usize + 1) * h * i];
            for o in 0..h {
                let v: f64 = (0..i).map(|n| w2e[o * i + n] * act[n]).sum();
                y[tok * h + o] += s.output_scale * out_scale * v;
            }
        }
    }
    y
}

// --- FP8 E4M3 (fn) -----------------------------------------------------------

pub fn e4m3_to_f64(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0xf) as i32;
    let man = (b & 7) as f64;
    if exp == 15 && man == 7.0 {
        return f64::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f64.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7)
    }
}

/// The nearest finite E4M3 code (ties to the even code), saturating at +-448.
pub fn f64_to_e4m3(v: f64) -> u8 {
    // Codes 0..=126 are the non-negative finite values in increasing order.
    let a = v.abs();
    let mut lo = 0u8;
    let mut hi = 126u8;
    if a >= e4m3_to_f64(hi) {
        lo = hi;
    } else {
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if e4m3_to_f64(mid) <= a {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (dl, dh) = (a - e4m3_to_f64(lo), e4m3_to_f64(hi) - a);
        if dh < dl || (dh == dl && hi % 2 == 0) {
            lo = hi;
        }
    }
    if v < 0.0 && lo != 0 {
        lo | 0x80
    } else {
        lo
    }
}

/// Fake-quantizes `v` in groups of `group` values with dynamic scales amax / 448, as the
/// FP8 modes do to activations before each matmul (a zero scale becomes 1).
pub fn fake_quant_e4m3(v: &mut [f64], group: usize) {
    for chunk in v.chunks_mut(group) {
        let amax = chunk.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let scale = (amax as f32 / 448.0) as f64;
        let scale = if scale > 0.0 { scale } else { 1.0 };
        for x in chunk.iter_mut() {
            *x = e4m3_to_f64(f64_to_e4m3((*x as f32 / scale as f32) as f64)) * scale;
        }
    }
}

/// Quantizes `w` [E, rows, cols] with one scale per (expert, block of `block` x `block`)
/// (`block` = None: one scale per expert). Returns (codes, scales, dequantized values).
pub fn quantize_e4m3(
    w: &[f64],
    e: usize,
    rows: usize,
    cols: usize,
    block: Option<usize>,
) -> (Vec<u8>, Vec<f32>, Vec<f64>) {
    let (br, bc) = match block {
        Some(b) => (b, b),
        None => (rows, cols),
    };
    let (nr, nc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut scales = vec![0f32; e * nr * nc];
    let mut codes = vec![0u8; w.len()];
    let mut deq = vec![0f64; w.len()];
    for x in 0..e {
        for a in 0..nr {
            for b in 0..nc {
                let idx = |r: usize, c: usize| (x * rows + r) * cols + c;
                let cells = || {
                    (a * br..((a + 1) * br).min(rows))
                        .flat_map(move |r| (b * bc..((b + 1) * bc).min(cols)).map(move |c| (r, c)))
                };
                let amax = cells().map(|(r, c)| w[idx(r, c)].abs()).fold(0.0, f64::max);
                let scale = (amax / 448.0) as f32;
                scales[(x * nr + a) * nc + b] = scale;
                for (r, c) in cells() {
                    let q = if scale > 0.0 {
                        f64_to_e4m3(w[idx(r, c)] / scale as f64)
                    } else {
                        0
                    };
                    codes[idx(r, c)] = q;
                    deq[idx(r, c)] = e4m3_to_f64(q) * scale as f64;
                }
            }
        }
    }
    (codes, scales, deq)
}
