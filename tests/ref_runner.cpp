#include "ref_runner.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace moe_test {

double ref_activation(int activation, double v) {
  switch (activation) {
    case MOE_ACTIVATION_SILU: return v / (1.0 + std::exp(-v));
    case MOE_ACTIVATION_GELU: return 0.5 * v * std::erfc(-v / std::sqrt(2.0));  // 1 + erf cancels in the tail
    case MOE_ACTIVATION_GELU_TANH: {
      const double k = std::sqrt(2.0 / 3.14159265358979323846);
      return v / (1.0 + std::exp(-2.0 * k * (v + 0.044715 * v * v * v)));  // 0.5 (1 + tanh z)
    }
    case MOE_ACTIVATION_RELU2: return v < 0 ? 0.0 : v * v;
    default: return v;
  }
}

namespace {

double e4m3_formula(int code) {
  const int sign = code >> 7, exp = (code >> 3) & 0xf, man = code & 7;
  if (exp == 0xf && man == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = exp == 0 ? std::ldexp(man, -9) : std::ldexp(8 + man, exp - 10);
  return sign ? -mag : mag;
}

const double* e4m3_values() {
  static const std::vector<double> table = [] {
    std::vector<double> v(256);
    for (int c = 0; c < 256; ++c) v[size_t(c)] = e4m3_formula(c);
    return v;
  }();
  return table.data();
}

}  // namespace

double ref_e4m3_value(uint8_t code) { return e4m3_values()[code]; }

uint8_t ref_e4m3_code(double v) {
  if (std::isnan(v)) return 0x7f;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const double a = std::fabs(v);
  // Codes 0..0x7e are the non-negative finite values in increasing order:
  // take the nearest (the even code on a tie); beyond 448 that is 448.
  const double* t = e4m3_values();
  const int hi = int(std::lower_bound(t, t + 0x7f, a) - t);  // first value >= a
  if (hi == 0) return sign;
  if (hi == 0x7f) return uint8_t(sign | 0x7e);
  const double below = a - t[hi - 1], above = t[hi] - a;
  const int best = below < above ? hi - 1 : above < below ? hi : ((hi & 1) ? hi - 1 : hi);
  return uint8_t(sign | best);
}

void ref_fake_quant(std::vector<double>& v, int64_t group, const double* static_scale) {
  const int64_t n = int64_t(v.size());
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    const int64_t g1 = std::min(n, g0 + group);
    double scale;
    if (static_scale) {
      scale = *static_scale;
      if (scale == 0) {
        std::fill(v.begin() + g0, v.begin() + g1, 0.0);
        continue;
      }
    } else {
      float amax = 0;  // the library's f32 values and f32 scale
      for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(float(v[size_t(i)])));
      const float s = amax / 448.0f;
      scale = s > 0 ? s : 1.0f;
    }
    // The division is f32 as in the library: low-precision inputs often land
    // exactly on an E4M3 midpoint in f32, and a double quotient would break
    // those ties differently.
    for (int64_t i = g0; i < g1; ++i)
      v[size_t(i)] = ref_e4m3_value(ref_e4m3_code(float(v[size_t(i)]) / float(scale))) * scale;
  }
}

namespace {

// Weight element (e, r, c) of a [E, rows, cols] tensor, dequantized.
struct RefWeights {
  const HostTensor& t;
  const HostTensor* scale;
  int quant;
  int64_t rows, cols;
  double at(int64_t e, int64_t r, int64_t c) const {
    const int64_t i = (e * rows + r) * cols + c;
    if (quant == MOE_QUANT_NONE) return t.get(i);
    const double q = ref_e4m3_value(t.as<uint8_t>()[i]);
    if (quant == MOE_QUANT_FP8_PER_TENSOR) return q * scale->get(e);
    const int64_t rb = (rows + 127) / 128, cb = (cols + 127) / 128;
    return q * scale->get((e * rb + r / 128) * cb + c / 128);
  }
};

}  // namespace

std::vector<double> ref_moe(const RefMoeCfg& cfg, const HostTensor& x,
                            const HostTensor& local_ids, const HostTensor& w,
                            const HostTensor& w13, const HostTensor& w2,
                            const HostTensor* w13_scale, const HostTensor* w2_scale,
                            const HostTensor* a13_scale, const HostTensor* a2_scale) {
  const int64_t T = x.shape[0], H = x.shape[1], K = local_ids.shape[1];
  const int64_t I = w2.shape[2], rows13 = cfg.gated ? 2 * I : I;
  const RefWeights W13{w13, w13_scale, cfg.quant_mode, rows13, H};
  const RefWeights W2{w2, w2_scale, cfg.quant_mode, H, I};
  const bool fp8 = cfg.quant_mode != MOE_QUANT_NONE;
  const bool block = cfg.quant_mode == MOE_QUANT_FP8_BLOCK_128;
  const bool fixed = cfg.quant_mode == MOE_QUANT_FP8_PER_TENSOR &&
                     cfg.act_scale_mode == MOE_ACT_SCALE_STATIC;
  double s13 = 0, s2 = 0;
  if (fixed) {
    s13 = a13_scale->get(0);
    s2 = a2_scale->get(0);
  }
  const int64_t gate0 = cfg.gated && cfg.swap_gate_up ? I : 0;
  const int64_t up0 = cfg.gated && !cfg.swap_gate_up ? I : 0;

  std::vector<double> y(static_cast<size_t>(T * H), 0.0);
  std::vector<double> xin(static_cast<size_t>(H)), h(static_cast<size_t>(I));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = local_ids.as<int32_t>()[t * K + j];
      if (e < 0) continue;
      const double wj = w.get(t * K + j);
      for (int64_t c = 0; c < H; ++c)
        xin[size_t(c)] = x.get(t * H + c) * (cfg.weight_on_input ? wj : 1.0);
      if (fp8) ref_fake_quant(xin, block ? 128 : H, fixed ? &s13 : nullptr);
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += W13.at(e, gate0 + i, c) * xin[size_t(c)];
          if (cfg.gated) u += W13.at(e, up0 + i, c) * xin[size_t(c)];
        }
        h[size_t(i)] = ref_activation(cfg.activation, g) * (cfg.gated ? u : 1.0);
      }
      if (fp8) ref_fake_quant(h, block ? 128 : I, fixed ? &s2 : nullptr);
      const double scale = cfg.weight_on_input ? 1.0 : wj;
      for (int64_t c = 0; c < H; ++c) {
        double o = 0;
        for (int64_t i = 0; i < I; ++i) o += W2.at(e, c, i) * h[size_t(i)];
        y[size_t(t * H + c)] += scale * o;
      }
    }
  }
  for (double& v : y) v *= cfg.output_scale;
  return y;
}

}  // namespace moe_test
