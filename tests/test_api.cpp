// The ABI basics: statuses, errors, versions, config structs from older and
// newer callers, NULL-safe destroy.
#include <cstddef>
#include <thread>

#include "support.h"

using namespace moe_test;

TEST_CASE("api.status_strings") {
  for (int s = 0; s < MOE_STATUS_NUM_STATUSES; ++s) {
    const char* text = moe_status_string(moe_status_t(s));
    REQUIRE(text != nullptr);
    CHECK(std::string(text) != "unknown status");
  }
  CHECK(std::string(moe_status_string(moe_status_t(999))) == "unknown status");
  CHECK(std::string(moe_status_string(MOE_STATUS_SUCCESS)) == "success");
}

TEST_CASE("api.version") {
  CHECK(moe_version() == uint32_t(MOE_VERSION_NUMBER));
  CHECK(std::string(moe_version_string()) == MOE_VERSION_STRING);
  CHECK(moe_version() / 10000 == uint32_t(MOE_VERSION_MAJOR));
  int32_t cuda = moe_has_cuda();
  CHECK((cuda == 0 || cuda == 1));
}

TEST_CASE("api.last_error_is_per_thread_and_cleared") {
  moe_router_t r = nullptr;
  CHECK(moe_router_create(nullptr, &r) == MOE_STATUS_INVALID_ARGUMENT);
  std::string here = moe_last_error();
  CHECK(here.find("config") != std::string::npos);
  std::string other = "unset";
  std::thread([&] { other = moe_last_error(); }).join();
  CHECK(other.empty());
  moe_router_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  MOE_CHECK_OK(moe_router_config_default(&c, MOE_ROUTING_SOFTMAX_TOPK));
  CHECK(std::string(moe_last_error()).empty());
}

TEST_CASE("api.destroy_accepts_null") {
  CHECK(moe_router_destroy(nullptr) == MOE_STATUS_SUCCESS);
  CHECK(moe_dispatcher_destroy(nullptr) == MOE_STATUS_SUCCESS);
  CHECK(moe_runner_destroy(nullptr) == MOE_STATUS_SUCCESS);
}

TEST_CASE("api.config.defaults") {
  moe_router_config_t rc;
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_DEEPSEEK_V3));
  CHECK(rc.struct_size == sizeof(rc));
  CHECK(rc.renormalize == 1);
  CHECK(rc.routed_scaling_factor == 1.0f);
  CHECK(rc.n_group == 1);
  rc.struct_size = uint32_t(sizeof(rc));
  MOE_CHECK_OK(moe_router_config_default(&rc, MOE_ROUTING_SOFTMAX_TOPK));
  CHECK(rc.renormalize == 0);
  rc.struct_size = uint32_t(sizeof(rc));
  check_error_mentions(moe_router_config_default(&rc, MOE_ROUTING_NUM_METHODS),
                       MOE_STATUS_INVALID_ARGUMENT, {"method"});
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  CHECK(uc.struct_size == sizeof(uc));
  CHECK(uc.gated == 1);
  CHECK(uc.activation == MOE_ACTIVATION_SILU);
  CHECK(uc.deterministic == 1);
  CHECK(uc.output_scale == 1.0f);
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_CHECK_OK(moe_dispatcher_config_default(&dc));
  CHECK(dc.struct_size == sizeof(dc));
  CHECK(dc.ep_size == 1);
  CHECK(dc.device_type == kDLCPU);
}

TEST_CASE("api.config.struct_size_from_an_older_caller") {
  // An older caller knew the fields up to top_k: the rest take defaults.
  moe_router_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  MOE_CHECK_OK(moe_router_config_default(&c, MOE_ROUTING_SOFTMAX_TOPK));
  c.num_experts = 8;
  c.top_k = 2;
  c.routed_scaling_factor = -5.0f;  // beyond the old size: must be ignored
  c.struct_size = uint32_t(offsetof(moe_router_config_t, top_k) + sizeof(int32_t));
  moe_router_t r = nullptr;
  MOE_CHECK_OK(moe_router_create(&c, &r));
  int32_t cols = 0;
  MOE_CHECK_OK(moe_router_output_columns(r, &cols));
  CHECK(cols == 2);
  HostTensor logits(DT::f32, {1, 8}), ids(DT::i32, {1, 2}), w(DT::f32, {1, 2});
  for (int e = 0; e < 8; ++e) logits.set(e, e);
  MOE_CHECK_OK(moe_router_run(r, logits.dl(), nullptr, nullptr, ids.dl(), w.dl(), nullptr));
  CHECK(ids.as<int32_t>()[0] == 7);
  CHECK(w.as<float>()[0] > 0.0f);  // default scaling 1.0, not the -5 past struct_size
  moe_router_destroy(r);

  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  uc.num_experts = 2;
  uc.hidden_size = 8;
  uc.intermediate_size = 4;
  uc.activation = 99;  // beyond the old size
  uc.struct_size = uint32_t(offsetof(moe_runner_config_t, intermediate_size) + sizeof(int32_t));
  moe_runner_t u = nullptr;
  MOE_CHECK_OK(moe_runner_create(&uc, &u));
  moe_runner_destroy(u);
}

TEST_CASE("api.config.struct_size_zero_or_from_the_future") {
  moe_router_config_t c;
  c.struct_size = uint32_t(sizeof(c));
  MOE_CHECK_OK(moe_router_config_default(&c, MOE_ROUTING_SOFTMAX_TOPK));
  c.num_experts = 8;
  c.top_k = 2;
  moe_router_t r = nullptr;
  c.struct_size = 0;
  check_error_mentions(moe_router_create(&c, &r), MOE_STATUS_INVALID_ARGUMENT,
                       {"struct_size", "0"});
  c.struct_size = uint32_t(sizeof(c) + 4);
  check_error_mentions(moe_router_create(&c, &r), MOE_STATUS_INVALID_ARGUMENT,
                       {"struct_size", std::to_string(sizeof(c) + 4).c_str()});
  CHECK(r == nullptr);
  moe_dispatcher_config_t dc;
  dc.struct_size = uint32_t(sizeof(dc));
  MOE_CHECK_OK(moe_dispatcher_config_default(&dc));
  dc.num_experts = 4;
  dc.struct_size = 3;
  moe_dispatcher_t d = nullptr;
  check_error_mentions(moe_dispatcher_create(&dc, &d), MOE_STATUS_INVALID_ARGUMENT,
                       {"struct_size"});
  moe_runner_config_t uc;
  uc.struct_size = uint32_t(sizeof(uc));
  MOE_CHECK_OK(moe_runner_config_default(&uc));
  uc.struct_size = 1u << 20;
  moe_runner_t u = nullptr;
  check_error_mentions(moe_runner_create(&uc, &u), MOE_STATUS_INVALID_ARGUMENT,
                       {"struct_size"});
}
