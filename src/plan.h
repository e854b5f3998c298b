// Internal plans: what the API boundary (src/api_*.cpp) hands to a backend
// after validation. Nothing below the boundary re-validates: every pointer
// here is non-null where documented, every shape consistent, every tensor
// contiguous and on the backend's device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe {

enum class DType : int { f32, f16, bf16, e4m3, i32 };

inline size_t dtype_bytes(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::e4m3: return 1;
    case DType::i32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t);

// Router ------------------------------------------------------------------

struct RouterPlan {
  int method = 0;  // moe_routing_method_t
  int E = 0;       // routed experts
  int k = 0;       // routed slots per token
  int n_group = 1;
  int topk_group = 1;
  bool renormalize = false;
  float weight_scale = 1.0f;   // routed_scaling_factor, or 1 when moved to the output
  int n_shared = 0;            // fused shared-expert columns after the k routed ones
  float shared_weight = 1.0f;  // weight of those columns
  int columns() const { return k + n_shared; }
};

struct RouteArgs {
  DType logits_dtype;
  const void* logits;          // [T, E]
  int64_t T;
  const float* bias;           // [E] or nullptr
  const int32_t* num_valid;    // [1] on the backend's device, or nullptr (= all T valid)
  int32_t* ids;                // [T, columns]
  float* weights;              // [T, columns]
};

struct PackArgs {
  const int32_t* ids;  // [n]
  const float* weights;
  int32_t* packed;
  int64_t n;
};

// Dispatcher --------------------------------------------------------------

struct DispatchPlan {
  int E = 0;                     // global ids accepted: [0, E)
  int E_loc = 0;
  std::vector<int32_t> mapping;  // [E], host copy: global -> local or -1
  const int32_t* mapping_dev = nullptr;  // device copy (CUDA dispatchers only)
};

struct DispatchArgs {
  const int32_t* topk_ids;   // [T, K] global ids
  int64_t T;
  int K;
  int32_t* local_ids;        // [T, K]
  int32_t* counts;           // [E_loc]
  int32_t* offsets;          // [E_loc + 1]
  int32_t* sorted_slots;     // [T * K]
  void* workspace;           // >= dispatch workspace bytes (CUDA), 256-aligned
  size_t workspace_bytes;
};

// Runner ------------------------------------------------------------------

struct RunnerPlan {
  int E_loc = 0, H = 0, I = 0;
  int activation = 0;  // moe_activation_t
  bool gated = true;
  bool swap_gate_up = false;
  bool weight_on_input = false;
  int quant_mode = 0;      // moe_quant_mode_t
  int act_scale_mode = 0;  // moe_act_scale_mode_t
  float output_scale = 1.0f;
  bool deterministic = true;
  bool validate_ids = false;
  // Borrowed weights (set by moe_runner_set_weights; null until then).
  DType w_dtype = DType::bf16;
  const void* w13 = nullptr;   // [E_loc, (gated ? 2 : 1) * I, H]
  const void* w2 = nullptr;    // [E_loc, H, I]
  const float* w13_scale = nullptr;
  const float* w2_scale = nullptr;
  const float* a13_scale = nullptr;
  const float* a2_scale = nullptr;
  int w_device_type = 0;       // DLDeviceType of the weights
  int w_device_id = 0;
  int rows13() const { return gated ? 2 * I : I; }
};

struct RunArgs {
  DType x_dtype;               // dtype of hidden and output
  const void* x;               // [T, H]
  int64_t T;
  int K;                       // slots per token
  const int32_t* local_ids;    // [T, K] in [-1, E_loc)
  const float* weights;        // [T, K]
  const int32_t* offsets;      // [E_loc + 1]
  const int32_t* sorted_slots; // [T * K]
  void* y;                     // [T, H]
  float output_scale;          // total output multiplier
  void* workspace;             // >= runner workspace bytes, 256-aligned
  size_t workspace_bytes;
};

}  // namespace moe
