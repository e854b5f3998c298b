//! A Mixtral-shaped MoE layer (E=8, k=2, scaled down to H=1024, I=2048, bf16)
//! through the safe Rust API: build the router, dispatcher and runner, run
//! the one-call layer on the CPU backend, check sampled tokens against a
//! float64 reference and print the time per forward.
//!
//!   cargo run --offline --release --manifest-path bindings/rust/Cargo.toml -p moe --example layer [-- --tokens T]

use std::time::Instant;

use moe::{
    Device, DispatcherConfig, HalfType, HostWorkspace, Layer, RouterConfig, RoutingMethod, RunnerConfig,
};
use moe::{Stream, Tensor, TensorMut, Workspace};

const E: usize = 8;
const K: usize = 2;
const H: usize = 1024;
const I: usize = 2048;

/// splitmix64 -> uniform in [-scale, scale), rounded to bf16.
fn random_bf16(n: usize, scale: f32, seed: &mut u64) -> Vec<u16> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32;
            to_bf16((2.0 * u - 1.0) * scale)
        })
        .collect()
}

fn to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

/// Float64 reference of one token: softmax top-k (renormalized), SwiGLU experts.
fn reference_token(x: &[u16], z: &[u16], w13: &[u16], w2: &[u16]) -> Vec<f64> {
    let z: Vec<f64> = z.iter().map(|&v| from_bf16(v)).collect();
    let mut order: Vec<usize> = (0..E).collect();
    order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
    let m = z[order[0]];
    let p: Vec<f64> = order[..K].iter().map(|&e| (z[e] - m).exp()).collect();
    let sum: f64 = p.iter().sum();
    let x: Vec<f64> = x.iter().map(|&v| from_bf16(v)).collect();
    let mut y = vec![0.0f64; H];
    for (slot, &e) in order[..K].iter().enumerate() {
        let w = p[slot] / sum;
        let row = |r: usize| -> f64 {
            (0..H)
                .map(|c| from_bf16(w13[(e * 2 * I + r) * H + c]) * x[c])
                .sum()
        };
        let act: Vec<f64> = (0..I)
            .map(|n| {
                let (g, u) = (row(n), row(I + n));
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        for (o, yo) in y.iter_mut().enumerate() {
            let v: f64 = (0..I).map(|n| from_bf16(w2[(e * H + o) * I + n]) * act[n]).sum();
            *yo += w * v;
        }
    }
    y
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let tokens: usize = match args.iter().position(|a| a == "--tokens") {
        Some(i) => args.get(i + 1).ok_or("--tokens needs a value")?.parse()?,
        None => 64,
    };
    println!(
        "libmoe {} (crate built against {}), CUDA backend: {}",
        moe::version_string(),
        moe::BUILT_AGAINST,
        moe::has_cuda()
    );
    println!("layer: E={E} k={K} H={H} I={I} bf16, T={tokens}, CPU backend");

    let mut seed = 0x5eed_u64;
    let w13 = random_bf16(E * 2 * I * H, 1.0 / (H as f32).sqrt(), &mut seed);
    let w2 = random_bf16(E * H * I, 1.0 / (I as f32).sqrt(), &mut seed);
    let x = random_bf16(tokens * H, 1.0, &mut seed);
    let logits = random_bf16(tokens * E, 2.0, &mut seed);

    let router = RouterConfig::new(RoutingMethod::SOFTMAX_TOPK, E as i32, K as i32)?
        .renormalize(true)
        .build()?;
    let dispatcher = DispatcherConfig::new(E as i32)?.build()?;
    let mut runner = RunnerConfig::new(E as i32, H as i32, I as i32)?.build()?;
    runner.set_weights(
        &Tensor::half(&w13, HalfType::BF16, &[E as i64, 2 * I as i64, H as i64])?,
        &Tensor::half(&w2, HalfType::BF16, &[E as i64, H as i64, I as i64])?,
    )?;
    let layer = Layer::new(router, dispatcher, runner);

    let mut workspace = HostWorkspace::new(layer.workspace_size(tokens as i64, Device::Cpu)?)?;
    let mut y = vec![0x7fc0u16; tokens * H]; // NaN: every element must be written
    let (t, h, e) = (tokens as i64, H as i64, E as i64);
    let mut forward = |y: &mut [u16]| -> Result<(), moe::Error> {
        layer.forward(
            &Tensor::half(&x, HalfType::BF16, &[t, h])?,
            &Tensor::half(&logits, HalfType::BF16, &[t, e])?,
            None,
            None,
            &mut TensorMut::half(y, HalfType::BF16, &[t, h])?,
            Workspace::host(&mut workspace),
            Stream::DEFAULT,
        )
    };
    forward(&mut y)?; // warm-up
    let runs = 5;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            forward(&mut y).map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Check a few tokens (first, middle, last) against the float64 reference.
    let mut worst = 0.0f64;
    for tok in [0, tokens / 2, tokens.saturating_sub(1)] {
        let reference = reference_token(
            &x[tok * H..(tok + 1) * H],
            &logits[tok * E..(tok + 1) * E],
            &w13,
            &w2,
        );
        let out: Vec<f64> = y[tok * H..(tok + 1) * H].iter().map(|&v| from_bf16(v)).collect();
        let num: f64 = out.iter().zip(&reference).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = reference.iter().map(|b| b * b).sum();
        let err = (num / den).sqrt();
        worst = if err.is_nan() {
            f64::INFINITY
        } else {
            worst.max(err)
        };
    }
    let ok = worst < 1e-2;
    println!(
        "check vs float64 reference (3 tokens): max relative error {worst:.2e} (bf16 bound 1e-2): {}",
        if ok { "PASS" } else { "FAIL" }
    );
    println!(
        "median time per forward: {:.3} ms over {runs} runs",
        times[runs / 2]
    );
    if !ok {
        return Err("result does not match the reference".into());
    }
    Ok(())
}
