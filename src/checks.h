// Validation shared by the single-object entry points and the one-call
// layer, so that each rule is written once.
#pragma once

#include "handles.h"

namespace moe {

// logits [T, E], correction_bias [E] f32 or NULL, num_valid_tokens int32 [1]
// or NULL. Fills every RouteArgs field but ids/weights; returns the device.
Device check_route_inputs(const ArgChecker& c, const moe_router_s& router, const DLTensor* logits,
                          const DLTensor* correction_bias, const DLTensor* num_valid_tokens,
                          RouteArgs& args);

// hidden [T, H] and output [T, H] of the same float dtype, on the weights'
// device. Fills x_dtype, x, T, y; returns the device.
Device check_run_io(const ArgChecker& c, const moe_runner_s& runner, const DLTensor* hidden,
                    DLTensor* output, RunArgs& args);

// CPU only: every id of ids [T, K] lies in [-1, limit); the message names the
// token and slot of the first that does not.
void check_ids_in_range(const ArgChecker& c, const char* arg, const int32_t* ids, int64_t T, int K,
                        int64_t limit);

}  // namespace moe
