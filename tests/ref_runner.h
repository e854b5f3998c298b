// Float64 reference of the fused MoE runner (tests only): a straightforward
// implementation of SEMANTICS.md section 4, shared by the CPU and GPU suites.
// It reads the exact host tensors the library reads (rounded x and weights),
// so the only differences left are the library's f32 arithmetic and, for
// FP8, activation quantization done here the same way the library does it:
// per token (per 128 columns for BLOCK_128) scale = amax / 448 computed in
// f32 (a zero scale becomes 1), v / scale evaluated in f32 and rounded to
// the nearest E4M3FN (ties to even, saturating at 448), a static scale of 0
// giving zeros.
#pragma once

#include <cstdint>
#include <vector>

#include "support.h"

namespace moe_test {

struct RefMoeCfg {
  int activation = MOE_ACTIVATION_SILU;
  bool gated = true;
  bool swap_gate_up = false;     // W13 rows [up; gate]
  bool weight_on_input = false;  // x * w before W13, weight 1 at the end
  int quant_mode = MOE_QUANT_NONE;
  int act_scale_mode = MOE_ACT_SCALE_DYNAMIC;
  double output_scale = 1.0;
};

// act(v) in double (GELU in the erf form).
double ref_activation(int activation, double v);

// E4M3FN (no inf; 0x7f / 0xff are NaN) by table search, independent of the
// library's bit manipulation.
double ref_e4m3_value(uint8_t code);
uint8_t ref_e4m3_code(double v);

// v <- E4M3(v / scale) * scale with the library's activation scale rules
// (see above): group = v.size() for per-token scales, 128 for BLOCK_128.
// static_scale: nullptr for dynamic scales.
void ref_fake_quant(std::vector<double>& v, int64_t group, const double* static_scale);

// y [T, H] as double (T*H values). x [T, H] f32/f16/bf16; local_ids [T, K]
// in [-1, E_loc) (-1 skipped); w [T, K] f32; w13 [E_loc, rows13, H] and
// w2 [E_loc, H, I] f32/f16/bf16, or E4M3 codes (DT::e4m3 / DT::u8) with
// w13_scale / w2_scale ([E_loc] or the 128-block grids) and, for static
// activation scales, a13_scale / a2_scale [1].
std::vector<double> ref_moe(const RefMoeCfg& cfg, const HostTensor& x,
                            const HostTensor& local_ids, const HostTensor& w,
                            const HostTensor& w13, const HostTensor& w2,
                            const HostTensor* w13_scale = nullptr,
                            const HostTensor* w2_scale = nullptr,
                            const HostTensor* a13_scale = nullptr,
                            const HostTensor* a2_scale = nullptr);

}  // namespace moe_test
