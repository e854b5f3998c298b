// Standard dispatcher: expert-parallel mapping and mask, id remapping, and
// the counts / offsets / permutation the runner consumes.
#include <algorithm>

#include "support.h"

using namespace moe_test;

namespace {

struct Dispatch {
  moe_dispatcher_t d = nullptr;
  ~Dispatch() { moe_dispatcher_destroy(d); }
};

moe_dispatcher_config_t config(int E, int rank, int size) {
  moe_dispatcher_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_dispatcher_config_default(&c) == MOE_STATUS_SUCCESS);
  c.num_experts = E;
  c.ep_rank = rank;
  c.ep_size = size;
  return c;
}

// Runs a dispatch and checks every output against a brute-force model.
void check_dispatch(moe_dispatcher_t d, int E, const std::vector<int32_t>& mapping, int E_loc,
                    int64_t T, int K, std::mt19937_64& rng) {
  HostTensor ids(DT::i32, {T, K}), local(DT::i32, {T, K}), counts(DT::i32, {E_loc}),
      offsets(DT::i32, {E_loc + 1}), sorted(DT::i32, {T * K});
  std::uniform_int_distribution<int> pick(-1, E - 1);
  for (int64_t i = 0; i < T * K; ++i) ids.as<int32_t>()[i] = pick(rng);
  local.poison();
  counts.poison();
  offsets.poison();
  sorted.poison();
  MOE_CHECK_OK(moe_dispatcher_dispatch(d, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                       sorted.dl(), nullptr, 0, nullptr));
  std::vector<std::vector<int32_t>> per_expert{size_t(E_loc)};
  for (int64_t i = 0; i < T * K; ++i) {
    int32_t g = ids.as<int32_t>()[i];
    int32_t want = g < 0 ? -1 : mapping[size_t(g)];
    REQUIRE(local.as<int32_t>()[i] == want);
    if (want >= 0) per_expert[size_t(want)].push_back(int32_t(i));
  }
  int32_t at = 0;
  CHECK(offsets.as<int32_t>()[0] == 0);
  for (int e = 0; e < E_loc; ++e) {
    CHECK(counts.as<int32_t>()[e] == int32_t(per_expert[size_t(e)].size()));
    for (int32_t s : per_expert[size_t(e)]) REQUIRE(sorted.as<int32_t>()[at++] == s);
    CHECK(offsets.as<int32_t>()[e + 1] == at);
  }
  for (int64_t p = at; p < T * K; ++p) REQUIRE(sorted.as<int32_t>()[p] == -1);
}

}  // namespace

TEST_CASE("dispatcher.mapping.contiguous_ranges") {
  for (int size : {1, 2, 8}) {
    const int E = 64, E_loc = E / size;
    for (int rank = 0; rank < size; ++rank) {
      CAPTURE(size);
      CAPTURE(rank);
      Dispatch d;
      moe_dispatcher_config_t c = config(E, rank, size);
      MOE_CHECK_OK(moe_dispatcher_create(&c, &d.d));
      int32_t n_loc = 0;
      MOE_CHECK_OK(moe_dispatcher_num_local_experts(d.d, &n_loc));
      CHECK(n_loc == E_loc);
      std::vector<int32_t> mapping(E), mask(E);
      MOE_CHECK_OK(moe_dispatcher_get_mapping(d.d, mapping.data(), mask.data(), E));
      for (int e = 0; e < E; ++e) {
        bool here = e / E_loc == rank;
        CHECK(mapping[size_t(e)] == (here ? e - rank * E_loc : -1));
        CHECK(mask[size_t(e)] == (here ? 1 : 0));
      }
      auto rng = fresh_rng();
      check_dispatch(d.d, E, mapping, E_loc, 37, 4, rng);
    }
  }
}

TEST_CASE("dispatcher.mapping.explicit_table") {
  // Redundant / load-balanced placement: experts 5 and 9 share nothing, 2 is absent.
  const int E = 12, E_loc = 3;
  std::vector<int32_t> table = {-1, -1, -1, -1, -1, 0, -1, -1, -1, 2, 1, -1};
  Dispatch d;
  moe_dispatcher_config_t c = config(E, 0, 1);
  c.local_expert_mapping = table.data();
  c.num_local_experts = E_loc;
  MOE_CHECK_OK(moe_dispatcher_create(&c, &d.d));
  table[5] = 2;  // the dispatcher copied the table at creation
  std::vector<int32_t> mapping(E), mask(E);
  MOE_CHECK_OK(moe_dispatcher_get_mapping(d.d, mapping.data(), mask.data(), E));
  CHECK(mapping[5] == 0);
  CHECK(mask[5] == 1);
  CHECK(mask[2] == 0);
  CHECK(mapping[2] == -1);
  auto rng = fresh_rng();
  check_dispatch(d.d, E, mapping, E_loc, 50, 3, rng);
}

TEST_CASE("dispatcher.dispatch.random_batches") {
  auto rng = fresh_rng();
  for (int64_t T : {int64_t(0), int64_t(1), int64_t(7), int64_t(300)}) {
    CAPTURE(T);
    Dispatch d;
    moe_dispatcher_config_t c = config(32, 1, 4);
    MOE_CHECK_OK(moe_dispatcher_create(&c, &d.d));
    std::vector<int32_t> mapping(32);
    MOE_CHECK_OK(moe_dispatcher_get_mapping(d.d, mapping.data(), nullptr, 32));
    check_dispatch(d.d, 32, mapping, 8, T, 8, rng);
  }
}

TEST_CASE("dispatcher.dispatch.minus_one_is_never_an_index") {
  // Seed 000: -1 must stay -1, never wrap to the last entry or become expert 0.
  Dispatch d;
  moe_dispatcher_config_t c = config(4, 0, 1);
  MOE_CHECK_OK(moe_dispatcher_create(&c, &d.d));
  HostTensor ids(DT::i32, {2, 2}), local(DT::i32, {2, 2}), counts(DT::i32, {4}),
      offsets(DT::i32, {5}), sorted(DT::i32, {4});
  int32_t in[4] = {-1, 3, -1, -1};
  std::memcpy(ids.data(), in, sizeof(in));
  MOE_CHECK_OK(moe_dispatcher_dispatch(d.d, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                       sorted.dl(), nullptr, 0, nullptr));
  CHECK(local.as<int32_t>()[0] == -1);
  CHECK(local.as<int32_t>()[1] == 3);
  CHECK(counts.as<int32_t>()[0] == 0);
  CHECK(counts.as<int32_t>()[3] == 1);
  CHECK(offsets.as<int32_t>()[4] == 1);
  CHECK(sorted.as<int32_t>()[0] == 1);
  CHECK(sorted.as<int32_t>()[1] == -1);
}

TEST_CASE("dispatcher.dispatch.rejects_out_of_range_ids") {
  Dispatch d;
  moe_dispatcher_config_t c = config(8, 0, 1);
  MOE_CHECK_OK(moe_dispatcher_create(&c, &d.d));
  HostTensor ids(DT::i32, {3, 2}), local(DT::i32, {3, 2}), counts(DT::i32, {8}),
      offsets(DT::i32, {9}), sorted(DT::i32, {6});
  int32_t in[6] = {0, 1, 2, 3, 8, 4};
  std::memcpy(ids.data(), in, sizeof(in));
  moe_status_t st = moe_dispatcher_dispatch(d.d, ids.dl(), local.dl(), counts.dl(), offsets.dl(),
                                            sorted.dl(), nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"topk_ids", "token 2", "slot 0", "8"});
  in[4] = -2;
  std::memcpy(ids.data(), in, sizeof(in));
  st = moe_dispatcher_dispatch(d.d, ids.dl(), local.dl(), counts.dl(), offsets.dl(), sorted.dl(),
                               nullptr, 0, nullptr);
  check_error_mentions(st, MOE_STATUS_INVALID_ARGUMENT, {"token 2", "slot 0", "-2"});
}

TEST_CASE("dispatcher.create.rejects_bad_configs") {
  moe_dispatcher_t d = nullptr;
  moe_dispatcher_config_t c = config(10, 0, 4);
  check_error_mentions(moe_dispatcher_create(&c, &d), MOE_STATUS_INVALID_ARGUMENT,
                       {"ep_size", "divisor", "10"});
  CHECK(d == nullptr);
  c = config(8, 2, 2);
  check_error_mentions(moe_dispatcher_create(&c, &d), MOE_STATUS_INVALID_ARGUMENT,
                       {"ep_rank", "2"});
  std::vector<int32_t> table = {0, 1, 5, -1};
  c = config(4, 0, 1);
  c.local_expert_mapping = table.data();
  c.num_local_experts = 2;
  check_error_mentions(moe_dispatcher_create(&c, &d), MOE_STATUS_INVALID_ARGUMENT,
                       {"local_expert_mapping[2]", "5"});
}
