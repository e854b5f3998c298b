// CPU standard dispatcher: remap global ids to local ids, count slots per
// local expert, and list the slots grouped by expert in (token, slot) order.
#include "cpu_backend.h"

namespace moe::cpu {

void dispatch(const DispatchPlan& plan, const DispatchArgs& a) {
  const int64_t n = a.T * a.K;
  for (int e = 0; e < plan.E_loc; ++e) a.counts[e] = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t g = a.topk_ids[i];
    // Ids were range-checked at the boundary; -1 and non-local experts map to -1.
    int32_t l = (g >= 0 && g < plan.E) ? plan.mapping[size_t(g)] : -1;
    a.local_ids[i] = l;
    if (l >= 0) ++a.counts[l];
  }
  a.offsets[0] = 0;
  for (int e = 0; e < plan.E_loc; ++e) a.offsets[e + 1] = a.offsets[e] + a.counts[e];
  // Stable scatter: a running cursor per expert, slots visited in order.
  std::vector<int32_t> cursor(a.offsets, a.offsets + plan.E_loc);
  for (int64_t i = 0; i < n; ++i) {
    int32_t l = a.local_ids[i];
    if (l >= 0) a.sorted_slots[cursor[size_t(l)]++] = int32_t(i);
  }
  for (int64_t p = a.offsets[plan.E_loc]; p < n; ++p) a.sorted_slots[p] = -1;
}

}  // namespace moe::cpu
