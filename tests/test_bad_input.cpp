// Bad input at the API boundary (issue 2 item 7, issue 9 item 3): every
// exported function of include/moe/moe.h, every kind of bad argument. Each
// case checks the status, that moe_last_error() names the function, the
// argument, the expected and the received value, and that a rejected call
// wrote nothing (outputs and their guard bytes keep their fill pattern).
// docs/bad-input.md lists every case by test name and subcase.
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "support.h"

using namespace moe_test;

namespace {

constexpr size_t kGuard = 64;
constexpr unsigned char kFill = 0xA5;
// A device address that must never be dereferenced on the host (unmapped).
void* const kDevicePtr = reinterpret_cast<void*>(uintptr_t(0xdead00000000ull));

// A contiguous host tensor with guard bytes on both sides of its payload.
// Every byte starts as kFill, so any write (in or around the payload) shows.
struct Buf {
  DT dtype;
  std::vector<int64_t> shape, strides;
  std::vector<unsigned char> bytes;
  size_t payload = 0;
  DLTensor t{};

  Buf(DT dt, std::vector<int64_t> shp) : dtype(dt), shape(std::move(shp)) {
    strides.assign(shape.size(), 1);
    for (int i = int(shape.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
    payload = size_t(numel()) * dt_bytes(dt);
    bytes.assign(payload + 2 * kGuard, kFill);
    t.data = bytes.data() + kGuard;
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = int(shape.size());
    t.dtype = dl_dtype(dt);
    t.shape = shape.data();
    t.strides = strides.data();
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;

  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  DLTensor* dl() { return &t; }
  template <class T>
  T* as() {
    return reinterpret_cast<T*>(bytes.data() + kGuard);
  }
  bool untouched() const {
    for (unsigned char b : bytes)
      if (b != kFill) return false;
    return true;
  }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (bytes[i] != kFill || bytes[kGuard + payload + i] != kFill) return false;
    return true;
  }
};

// A modified view of a valid tensor: one field changed per bad case.
struct Alt {
  DLTensor t;
  std::vector<int64_t> shape, strides;
  explicit Alt(const DLTensor* base) : t(*base) {}
  Alt& set_shape(std::vector<int64_t> s) {
    shape = std::move(s);
    t.shape = shape.data();
    t.ndim = int(shape.size());
    t.strides = nullptr;
    return *this;
  }
  Alt& set_strides(std::vector<int64_t> s) {
    strides = std::move(s);
    t.strides = strides.data();
    return *this;
  }
  Alt& set_dtype(uint8_t code, uint8_t bits, uint16_t lanes = 1) {
    t.dtype = DLDataType{code, bits, lanes};
    return *this;
  }
  // Any non-CPU device gets an address the host must not touch.
  Alt& set_device(DLDeviceType type, int id = 0) {
    t.device = DLDevice{type, id};
    if (type != kDLCPU) t.data = kDevicePtr;
    return *this;
  }
  DLTensor* dl() { return &t; }
};

// A config struct with struct_size set, as *_default() wants it.
template <class C>
C sized() {
  C c;
  std::memset(&c, 0, sizeof(c));
  c.struct_size = uint32_t(sizeof(C));
  return c;
}

// A rejected call: the expected status, a message naming `words`, and no
// byte of `outs` written.
// MOE_TEST_PRINT_ERRORS=1 prints each message (docs/bad-input.md is made from it).
void rejected(moe_status_t got, moe_status_t want, std::initializer_list<const char*> words,
              const std::vector<const Buf*>& outs = {}) {
  if (std::getenv("MOE_TEST_PRINT_ERRORS"))
    std::printf("\nBADINPUT\t%s\t%s\n", moe_status_string(got), moe_last_error());
  check_error_mentions(got, want, words);
  for (const Buf* b : outs) CHECK(b->untouched());
}

// 256-byte-aligned host memory for caller workspaces.
struct Workspace {
  std::unique_ptr<unsigned char, decltype(&std::free)> mem{nullptr, &std::free};
  size_t bytes = 0;
  explicit Workspace(size_t n) : bytes(n) {
    mem.reset(static_cast<unsigned char*>(std::aligned_alloc(256, (n + 256 + 255) / 256 * 256)));
  }
  void* ptr() { return mem.get(); }
};

void fill_float(Buf& b, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, 1.0);
  for (int64_t i = 0; i < b.numel(); ++i) {
    float v = float(d(rng));
    switch (b.dtype) {
      case DT::f32: b.as<float>()[i] = v; break;
      case DT::f16: b.as<uint16_t>()[i] = f32_to_f16(v); break;
      case DT::bf16: b.as<uint16_t>()[i] = f32_to_bf16(v); break;
      default: FAIL("fill_float on a non-float tensor");
    }
  }
}

moe_router_config_t router_cfg(int method, int E, int k) {
  auto c = sized<moe_router_config_t>();
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_router_config_default(&c, method) == MOE_STATUS_SUCCESS);
  c.num_experts = E;
  c.top_k = k;
  return c;
}

moe_runner_config_t runner_cfg(int E_loc, int H, int I) {
  auto c = sized<moe_runner_config_t>();
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_runner_config_default(&c) == MOE_STATUS_SUCCESS);
  c.num_experts = E_loc;
  c.hidden_size = H;
  c.intermediate_size = I;
  return c;
}

// Router over logits [T=3, E=8] with k=2 (or the given config).
struct RouterFx {
  static constexpr int64_t T = 3;
  moe_router_config_t cfg;
  moe_router_t r = nullptr;
  Buf logits;
  Buf ids, w;
  explicit RouterFx(moe_router_config_t c)
      : cfg(c),
        logits(DT::f32, {T, c.num_experts}),
        ids(DT::i32, {T, c.top_k + c.num_fused_shared_experts}),
        w(DT::f32, {T, c.top_k + c.num_fused_shared_experts}) {
    MOE_CHECK_OK(moe_router_create(&cfg, &r));
    auto rng = fresh_rng();
    fill_float(logits, rng);
  }
  RouterFx() : RouterFx(router_cfg(MOE_ROUTING_SOFTMAX_TOPK, 8, 2)) {}
  ~RouterFx() { moe_router_destroy(r); }
  moe_status_t run(const DLTensor* lg, const DLTensor* bias = nullptr,
                   const DLTensor* valid = nullptr) {
    return moe_router_run(r, lg, bias, valid, ids.dl(), w.dl(), nullptr);
  }
};

// Dispatcher over E=8 experts (ep_size 2, rank 0: E_loc 4) with topk_ids [3, 2].
struct DispatchFx {
  static constexpr int64_t T = 3, K = 2;
  static constexpr int E = 8, E_loc = 4;
  moe_dispatcher_t d = nullptr;
  Buf topk_ids{DT::i32, {T, K}};
  Buf local_ids{DT::i32, {T, K}}, counts{DT::i32, {E_loc}}, offsets{DT::i32, {E_loc + 1}},
      sorted{DT::i32, {T * K}};
  DispatchFx() {
    auto c = sized<moe_dispatcher_config_t>();
    c.struct_size = uint32_t(sizeof(c));
    REQUIRE(moe_dispatcher_config_default(&c) == MOE_STATUS_SUCCESS);
    c.num_experts = E;
    c.ep_size = 2;
    MOE_CHECK_OK(moe_dispatcher_create(&c, &d));
    const int32_t ids[T * K] = {0, 5, -1, 3, 7, 2};
    std::memcpy(topk_ids.as<int32_t>(), ids, sizeof(ids));
  }
  ~DispatchFx() { moe_dispatcher_destroy(d); }
  moe_status_t run(const DLTensor* ids, void* ws = nullptr, size_t ws_bytes = 0) {
    return moe_dispatcher_dispatch(d, ids, local_ids.dl(), counts.dl(), offsets.dl(), sorted.dl(),
                                   ws, ws_bytes, nullptr);
  }
  std::vector<const Buf*> outs() const { return {&local_ids, &counts, &offsets, &sorted}; }
};

// A runner with E_loc=4, H=8, I=4 (gated SiLU, f32 weights set) and the
// routing metadata of T=3 tokens with K=2 slots from a real dispatch.
struct RunnerFx {
  static constexpr int64_t T = 3, K = 2;
  static constexpr int E_loc = 4, H = 8, I = 4;
  moe_runner_config_t cfg;
  moe_runner_t r = nullptr;
  Buf w13, w2;
  Buf hidden{DT::f32, {T, H}}, weights{DT::f32, {T, K}};
  Buf local_ids{DT::i32, {T, K}}, counts{DT::i32, {E_loc}}, offsets{DT::i32, {E_loc + 1}},
      sorted{DT::i32, {T * K}};
  Buf out{DT::f32, {T, H}};

  explicit RunnerFx(moe_runner_config_t c = runner_cfg(E_loc, H, I), bool set_weights = true)
      : cfg(c),
        w13(DT::f32, {E_loc, (c.gated ? 2 : 1) * I, H}),
        w2(DT::f32, {E_loc, H, I}) {
    MOE_CHECK_OK(moe_runner_create(&cfg, &r));
    auto rng = fresh_rng();
    fill_float(w13, rng);
    fill_float(w2, rng);
    fill_float(hidden, rng);
    fill_float(weights, rng);
    if (set_weights) MOE_CHECK_OK(moe_runner_set_weights(r, w13.dl(), w2.dl(), 0, 0, 0, 0));
    // Metadata from the dispatcher, so the valid call is the real one.
    auto dc = sized<moe_dispatcher_config_t>();
    dc.struct_size = uint32_t(sizeof(dc));
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    dc.num_experts = E_loc;
    moe_dispatcher_t d = nullptr;
    MOE_CHECK_OK(moe_dispatcher_create(&dc, &d));
    Buf ids(DT::i32, {T, K});
    const int32_t v[T * K] = {0, 3, 2, -1, 3, 1};
    std::memcpy(ids.as<int32_t>(), v, sizeof(v));
    MOE_CHECK_OK(moe_dispatcher_dispatch(d, ids.dl(), local_ids.dl(), counts.dl(), offsets.dl(),
                                         sorted.dl(), nullptr, 0, nullptr));
    moe_dispatcher_destroy(d);
  }
  ~RunnerFx() { moe_runner_destroy(r); }
  moe_status_t run(const DLTensor* x, const DLTensor* ids, const DLTensor* w, const DLTensor* off,
                   const DLTensor* slots, DLTensor* y, void* ws = nullptr, size_t bytes = 0) {
    return moe_runner_run(r, x, ids, w, off, slots, y, ws, bytes, nullptr);
  }
  moe_status_t run_default(void* ws = nullptr, size_t bytes = 0) {
    return run(hidden.dl(), local_ids.dl(), weights.dl(), offsets.dl(), sorted.dl(), out.dl(), ws,
               bytes);
  }
};

// Router E=8 k=2, dispatcher ep 2 of 2 (E_loc 4), runner E_loc 4, T=3, H=8.
struct LayerFx {
  static constexpr int64_t T = 3;
  static constexpr int E = 8, k = 2, E_loc = 4, H = 8, I = 4;
  moe_router_t router = nullptr;
  moe_dispatcher_t disp = nullptr;
  moe_runner_t runner = nullptr;
  Buf w13{DT::f32, {E_loc, 2 * I, H}}, w2{DT::f32, {E_loc, H, I}};
  Buf hidden{DT::f32, {T, H}}, logits{DT::f32, {T, E}}, out{DT::f32, {T, H}};
  explicit LayerFx(bool set_weights = true) {
    auto rc = router_cfg(MOE_ROUTING_SOFTMAX_TOPK, E, k);
    MOE_CHECK_OK(moe_router_create(&rc, &router));
    auto dc = sized<moe_dispatcher_config_t>();
    dc.struct_size = uint32_t(sizeof(dc));
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    dc.num_experts = E;
    dc.ep_size = 2;
    dc.ep_rank = 1;
    MOE_CHECK_OK(moe_dispatcher_create(&dc, &disp));
    auto uc = runner_cfg(E_loc, H, I);
    MOE_CHECK_OK(moe_runner_create(&uc, &runner));
    auto rng = fresh_rng();
    fill_float(w13, rng);
    fill_float(w2, rng);
    fill_float(hidden, rng);
    fill_float(logits, rng);
    if (set_weights) MOE_CHECK_OK(moe_runner_set_weights(runner, w13.dl(), w2.dl(), 0, 0, 0, 0));
  }
  ~LayerFx() {
    moe_router_destroy(router);
    moe_dispatcher_destroy(disp);
    moe_runner_destroy(runner);
  }
  moe_status_t forward(const DLTensor* x, const DLTensor* lg, DLTensor* y, void* ws = nullptr,
                       size_t bytes = 0, const DLTensor* bias = nullptr) {
    return moe_layer_forward(router, disp, runner, x, lg, bias, nullptr, y, ws, bytes, nullptr);
  }
};

bool cuda_built() { return moe_has_cuda() != 0; }

}  // namespace

// ---------------------------------------------------------------------------
// Status, errors, version
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.status_string") {
  SUBCASE("every status has its own text") {
    for (int s = 0; s < MOE_STATUS_NUM_STATUSES; ++s) {
      std::string text = moe_status_string(moe_status_t(s));
      CHECK(!text.empty());
      CHECK(text != "unknown status");
    }
  }
  SUBCASE("count sentinel and unknown values") {
    // 15 is the largest value moe_status_t can hold in C++ (4 bits); C
    // callers may pass anything, the fuzz harness covers those.
    CHECK(std::string(moe_status_string(MOE_STATUS_NUM_STATUSES)) == "unknown status");
    CHECK(std::string(moe_status_string(moe_status_t(15))) == "unknown status");
  }
}

TEST_CASE("bad_input.last_error") {
  SUBCASE("cleared by the next successful call") {
    auto c = sized<moe_router_config_t>();
    CHECK(moe_router_config_default(nullptr, 0) == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(std::string(moe_last_error()).size() > 0);
    c.struct_size = uint32_t(sizeof(c));
    MOE_CHECK_OK(moe_router_config_default(&c, 0));
    CHECK(std::string(moe_last_error()).empty());
  }
  SUBCASE("never NULL") {
    CHECK(moe_last_error() != nullptr);
    CHECK(moe_version_string() != nullptr);
    CHECK(moe_version() == uint32_t(MOE_VERSION_NUMBER));
    CHECK((moe_has_cuda() == 0 || moe_has_cuda() == 1));
  }
}

// ---------------------------------------------------------------------------
// Router: config and create
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.router_config_default") {
  auto c = sized<moe_router_config_t>();
  SUBCASE("NULL config") {
    rejected(moe_router_config_default(nullptr, 0), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_router_config_default", "'config'", "non-NULL", "NULL"});
  }
  SUBCASE("method -1") {
    c.struct_size = uint32_t(sizeof(c));
    rejected(moe_router_config_default(&c, -1), MOE_STATUS_INVALID_ARGUMENT,
             {"'method'", "[0, 6)", "got -1"});
  }
  SUBCASE("method = NUM_METHODS") {
    c.struct_size = uint32_t(sizeof(c));
    rejected(moe_router_config_default(&c, MOE_ROUTING_NUM_METHODS), MOE_STATUS_INVALID_ARGUMENT,
             {"'method'", "[0, 6)", "got 6"});
  }
  SUBCASE("struct_size not set (0)") {
    c.struct_size = 0;
    rejected(moe_router_config_default(&c, 0), MOE_STATUS_INVALID_ARGUMENT,
             {"'config->struct_size'", "set before this call", "got 0"});
  }
  SUBCASE("struct_size from the future") {
    c.struct_size = uint32_t(sizeof(c) + 4);
    rejected(moe_router_config_default(&c, 0), MOE_STATUS_INVALID_ARGUMENT,
             {"'config->struct_size'", "set before this call"});
  }
  // An older caller's struct is smaller: nothing past its struct_size is written.
  SUBCASE("older caller: only struct_size bytes written") {
    unsigned char raw[sizeof(moe_router_config_t)];
    std::memset(raw, 0x5a, sizeof(raw));
    const uint32_t old_size = uint32_t(offsetof(moe_router_config_t, n_group));
    std::memcpy(raw, &old_size, sizeof(old_size));
    MOE_CHECK_OK(moe_router_config_default(reinterpret_cast<moe_router_config_t*>(raw),
                                           MOE_ROUTING_DEEPSEEK_V3));
    for (size_t i = old_size; i < sizeof(raw); ++i) CHECK(raw[i] == 0x5a);
  }
}

TEST_CASE("bad_input.config_default_struct_size") {
  SUBCASE("dispatcher struct_size 0") {
    auto c = sized<moe_dispatcher_config_t>();
    c.struct_size = 0;
    rejected(moe_dispatcher_config_default(&c), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_dispatcher_config_default", "'config->struct_size'", "got 0"});
  }
  SUBCASE("runner struct_size from the future") {
    auto c = sized<moe_runner_config_t>();
    c.struct_size = uint32_t(sizeof(c) + 8);
    rejected(moe_runner_config_default(&c), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_runner_config_default", "'config->struct_size'"});
  }
  SUBCASE("runner older caller: only struct_size bytes written") {
    unsigned char raw[sizeof(moe_runner_config_t)];
    std::memset(raw, 0x5a, sizeof(raw));
    const uint32_t old_size = uint32_t(offsetof(moe_runner_config_t, activation));
    std::memcpy(raw, &old_size, sizeof(old_size));
    MOE_CHECK_OK(moe_runner_config_default(reinterpret_cast<moe_runner_config_t*>(raw)));
    for (size_t i = old_size; i < sizeof(raw); ++i) CHECK(raw[i] == 0x5a);
  }
}

TEST_CASE("bad_input.router_create.pointers_and_struct_size") {
  moe_router_t r = reinterpret_cast<moe_router_t>(uintptr_t(1));
  auto c = router_cfg(MOE_ROUTING_SOFTMAX_TOPK, 8, 2);
  SUBCASE("NULL router") {
    rejected(moe_router_create(&c, nullptr), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_router_create", "'router'", "NULL"});
  }
  SUBCASE("NULL config") {
    rejected(moe_router_create(nullptr, &r), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_router_create", "'config'", "NULL"});
    CHECK(r == nullptr);
  }
  SUBCASE("struct_size 0") {
    c.struct_size = 0;
    rejected(moe_router_create(&c, &r), MOE_STATUS_INVALID_ARGUMENT,
             {"'config->struct_size'", "*_default()", "got 0"});
    CHECK(r == nullptr);
  }
  SUBCASE("struct_size below the first version's fields") {
    c.struct_size = 8;
    rejected(moe_router_create(&c, &r), MOE_STATUS_INVALID_ARGUMENT,
             {"'config->struct_size'", "[16, ", "got 8"});
  }
  SUBCASE("struct_size from the future") {
    c.struct_size = uint32_t(sizeof(moe_router_config_t) + 4);
    std::string got = "got " + std::to_string(sizeof(moe_router_config_t) + 4);
    rejected(moe_router_create(&c, &r), MOE_STATUS_INVALID_ARGUMENT,
             {"'config->struct_size'", "newer", got.c_str()});
  }
}

TEST_CASE("bad_input.router_create.limits") {
  moe_router_t r = nullptr;
  auto c = router_cfg(MOE_ROUTING_SOFTMAX_TOPK, 8, 2);
  auto ds = router_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 2);
  ds.n_group = 4;
  ds.topk_group = 2;
  auto bad = [&](const moe_router_config_t& cfg, std::initializer_list<const char*> words,
                 moe_status_t want = MOE_STATUS_INVALID_ARGUMENT) {
    rejected(moe_router_create(&cfg, &r), want, words);
    CHECK(r == nullptr);
  };
  SUBCASE("method out of range") {
    c.method = 9;
    bad(c, {"'config->method'", "[0, 6)", "got 9"});
  }
  SUBCASE("E = 0") {
    c.num_experts = 0;
    bad(c, {"'config->num_experts'", "[1, 32767]", "got 0"});
  }
  SUBCASE("E > 32767 (ids must fit in int16)") {
    c.num_experts = 40000;
    bad(c, {"'config->num_experts'", "[1, 32767]", "got 40000"});
  }
  SUBCASE("k = 0") {
    c.top_k = 0;
    bad(c, {"'config->top_k'", "[1, E=8]", "got 0"});
  }
  SUBCASE("k > E") {
    c.top_k = 9;
    bad(c, {"'config->top_k'", "[1, E=8]", "got 9"});
  }
  SUBCASE("LLAMA4 with k != 1") {
    auto l = router_cfg(MOE_ROUTING_LLAMA4, 8, 2);
    bad(l, {"'config->top_k'", "1 for the LLAMA4 method", "got 2"});
  }
  SUBCASE("E % n_group != 0") {
    ds.n_group = 3;
    bad(ds, {"'config->n_group'", "divisor of E=8", "got 3"});
  }
  SUBCASE("n_group = 0") {
    ds.n_group = 0;
    bad(ds, {"'config->n_group'", "divisor of E=8", "got 0"});
  }
  SUBCASE("topk_group = 0") {
    ds.topk_group = 0;
    bad(ds, {"'config->topk_group'", "[1, n_group=4]", "got 0"});
  }
  SUBCASE("topk_group > n_group") {
    ds.topk_group = 5;
    bad(ds, {"'config->topk_group'", "[1, n_group=4]", "got 5"});
  }
  SUBCASE("k > topk_group * E / n_group") {
    ds.topk_group = 1;  // 1 group of 2 experts reachable
    ds.top_k = 3;
    bad(ds, {"'config->top_k'", "topk_group * E / n_group = 2", "got 3"});
  }
  SUBCASE("grouped softmax: k > topk_group * E / n_group") {
    auto g = router_cfg(MOE_ROUTING_GROUPED_SOFTMAX, 16, 6);
    g.n_group = 8;
    g.topk_group = 2;
    bad(g, {"'config->top_k'", "= 4", "got 6"});
  }
  SUBCASE("n_group != 1 for an ungrouped method") {
    c.n_group = 2;
    bad(c, {"'config->n_group'", "1 for an ungrouped routing method", "got 2"});
  }
  SUBCASE("topk_group != 1 for an ungrouped method") {
    c.topk_group = 2;
    bad(c, {"'config->topk_group'", "1 for an ungrouped routing method", "got 2"});
  }
  SUBCASE("renormalize not a flag") {
    c.renormalize = 2;
    bad(c, {"'config->renormalize'", "0 or 1", "got 2"});
  }
  SUBCASE("scaling_on_output not a flag") {
    c.scaling_on_output = -1;
    bad(c, {"'config->scaling_on_output'", "0 or 1", "got -1"});
  }
  SUBCASE("routed_scaling_factor NaN") {
    c.routed_scaling_factor = std::nanf("");
    bad(c, {"'config->routed_scaling_factor'", "finite value > 0", "got nan"});
  }
  SUBCASE("routed_scaling_factor inf") {
    c.routed_scaling_factor = INFINITY;
    bad(c, {"'config->routed_scaling_factor'", "finite value > 0", "got inf"});
  }
  SUBCASE("routed_scaling_factor 0") {
    c.routed_scaling_factor = 0.0f;
    bad(c, {"'config->routed_scaling_factor'", "finite value > 0", "got 0"});
  }
  SUBCASE("routed_scaling_factor negative") {
    c.routed_scaling_factor = -2.5f;
    bad(c, {"'config->routed_scaling_factor'", "finite value > 0", "got -2.5"});
  }
  SUBCASE("num_fused_shared_experts negative") {
    c.num_fused_shared_experts = -1;
    bad(c, {"'config->num_fused_shared_experts'", "E + n_shared <= 32767", "got -1"});
  }
  SUBCASE("E + num_fused_shared_experts > 32767") {
    c.num_fused_shared_experts = 32760;
    bad(c, {"'config->num_fused_shared_experts'", "E + n_shared <= 32767", "got 32760"});
  }
}

// A caller built against the first header (struct_size covers struct_size,
// method, num_experts, top_k) gets the defaults for every later field, even
// when the bytes past its struct hold garbage.
TEST_CASE("bad_input.router_create.older_caller") {
  for (int method : {int(MOE_ROUTING_SOFTMAX_TOPK), int(MOE_ROUTING_DEEPSEEK_V3)}) {
    CAPTURE(method);
    auto full = router_cfg(method, 8, 2);
    moe_router_config_t old;
    std::memset(&old, 0x7f, sizeof(old));
    old.struct_size = uint32_t(offsetof(moe_router_config_t, n_group));
    old.method = method;
    old.num_experts = 8;
    old.top_k = 2;
    RouterFx a(full);
    moe_router_t rb = nullptr;
    MOE_CHECK_OK(moe_router_create(&old, &rb));
    int32_t cols = 0;
    MOE_CHECK_OK(moe_router_output_columns(rb, &cols));
    CHECK(cols == 2);
    Buf ids(DT::i32, {RouterFx::T, 2}), w(DT::f32, {RouterFx::T, 2});
    MOE_CHECK_OK(a.run(a.logits.dl()));
    MOE_CHECK_OK(moe_router_run(rb, a.logits.dl(), nullptr, nullptr, ids.dl(), w.dl(), nullptr));
    CHECK(std::memcmp(ids.as<int32_t>(), a.ids.as<int32_t>(), ids.payload) == 0);
    CHECK(std::memcmp(w.as<float>(), a.w.as<float>(), w.payload) == 0);
    CHECK(ids.guards_intact());
    CHECK(w.guards_intact());
    moe_router_destroy(rb);
  }
}

TEST_CASE("bad_input.router_handles") {
  SUBCASE("destroy NULL") { MOE_CHECK_OK(moe_router_destroy(nullptr)); }
  SUBCASE("output_columns NULL router") {
    int32_t cols = 0;
    rejected(moe_router_output_columns(nullptr, &cols), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_router_output_columns", "'router'", "NULL"});
  }
  SUBCASE("output_columns NULL out") {
    RouterFx fx;
    rejected(moe_router_output_columns(fx.r, nullptr), MOE_STATUS_INVALID_ARGUMENT,
             {"moe_router_output_columns", "'columns'", "NULL"});
  }
}

// ---------------------------------------------------------------------------
// Router: run
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.router_run.logits") {
  RouterFx fx;
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  Alt a(fx.logits.dl());
  std::vector<const Buf*> outs = {&fx.ids, &fx.w};
  SUBCASE("NULL router") {
    rejected(moe_router_run(nullptr, fx.logits.dl(), nullptr, nullptr, fx.ids.dl(), fx.w.dl(),
                            nullptr),
             IA, {"moe_router_run", "'router'", "NULL"}, outs);
  }
  SUBCASE("NULL logits") {
    rejected(fx.run(nullptr), IA, {"moe_router_run", "'logits'", "non-NULL", "NULL"}, outs);
  }
  SUBCASE("dtype int32") {
    a.set_dtype(kDLInt, 32);
    rejected(fx.run(a.dl()), IA,
             {"'logits.dtype'", "float32, bfloat16 or float16", "got int32"}, outs);
  }
  SUBCASE("dtype float64") {
    a.set_dtype(kDLFloat, 64);
    rejected(fx.run(a.dl()), IA, {"'logits.dtype'", "got float64"}, outs);
  }
  SUBCASE("dtype with lanes") {
    a.set_dtype(kDLFloat, 32, 4);
    rejected(fx.run(a.dl()), IA, {"'logits.dtype'", "got float32x4"}, outs);
  }
  SUBCASE("rank 0") {
    a.t.ndim = 0;
    rejected(fx.run(a.dl()), IA, {"'logits.ndim'", "1 to 4", "got 0"}, outs);
  }
  SUBCASE("rank 5") {
    a.set_shape({3, 8, 1, 1, 1});
    rejected(fx.run(a.dl()), IA, {"'logits.ndim'", "1 to 4", "got 5"}, outs);
  }
  SUBCASE("rank 1") {
    a.set_shape({24});
    rejected(fx.run(a.dl()), IA, {"'logits'", "shape [T, E=8]", "got shape [24]"}, outs);
  }
  SUBCASE("rank 3") {
    a.set_shape({3, 8, 1});
    rejected(fx.run(a.dl()), IA, {"'logits'", "shape [T, E=8]", "got shape [3, 8, 1]"}, outs);
  }
  SUBCASE("E mismatch with the router") {
    a.set_shape({3, 7});
    rejected(fx.run(a.dl()), IA, {"'logits'", "shape [T, E=8]", "got shape [3, 7]"}, outs);
  }
  SUBCASE("negative dim") {
    a.set_shape({-3, 8});
    rejected(fx.run(a.dl()), IA, {"'logits.shape[0]'", "[0, 2^40]", "got -3"}, outs);
  }
  SUBCASE("element count overflows") {
    a.set_shape({int64_t(1) << 40, int64_t(1) << 40});
    rejected(fx.run(a.dl()), IA, {"'logits.shape'", "2^40 elements", "[1099511627776, 1099511627776]"},
             outs);
  }
  SUBCASE("NULL shape") {
    a.t.shape = nullptr;
    rejected(fx.run(a.dl()), IA, {"'logits.shape'", "non-NULL", "NULL"}, outs);
  }
  SUBCASE("NULL data") {
    a.t.data = nullptr;
    rejected(fx.run(a.dl()), IA, {"'logits.data'", "non-NULL", "NULL"}, outs);
  }
  SUBCASE("transposed strides") {
    a.set_strides({1, 3});
    rejected(fx.run(a.dl()), IA,
             {"'logits.strides'", "row-major contiguous", "[3, 8]", "stride 3 in dim 1"}, outs);
  }
  SUBCASE("padded row stride") {
    a.set_strides({16, 1});
    rejected(fx.run(a.dl()), IA, {"'logits.strides'", "got stride 16 in dim 0"}, outs);
  }
  SUBCASE("misaligned data") {
    a.t.byte_offset = 2;
    rejected(fx.run(a.dl()), IA, {"'logits.data + byte_offset'", "aligned to 4 bytes", "remainder 2"},
             outs);
  }
  SUBCASE("kDLOpenCL device") {
    a.set_device(kDLOpenCL);
    rejected(fx.run(a.dl()), MOE_STATUS_UNSUPPORTED,
             {"'logits.device'", "kDLCPU (1) or kDLCUDA (2)", "got device_type 4"}, outs);
  }
  SUBCASE("kDLCUDA with a negative ordinal") {
    a.set_device(kDLCUDA, -1);
    rejected(fx.run(a.dl()), IA, {"'logits.device.device_id'", "CUDA ordinal >= 0", "got -1"}, outs);
  }
  SUBCASE("kDLCUDA logits, CPU outputs") {
    a.set_device(kDLCUDA);
    if (cuda_built())
      rejected(fx.run(a.dl()), IA, {"'topk_ids.device'", "(cuda:0)", "got cpu"}, outs);
    else
      rejected(fx.run(a.dl()), MOE_STATUS_NOT_AVAILABLE,
               {"moe_router_run", "'logits.device'", "without the CUDA backend", "cuda:0"}, outs);
  }
}

TEST_CASE("bad_input.router_run.outputs") {
  RouterFx fx;
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  auto run = [&](DLTensor* ids, DLTensor* w) {
    return moe_router_run(fx.r, fx.logits.dl(), nullptr, nullptr, ids, w, nullptr);
  };
  Alt ids(fx.ids.dl()), w(fx.w.dl());
  SUBCASE("NULL topk_ids") {
    rejected(run(nullptr, fx.w.dl()), IA, {"'topk_ids'", "NULL"}, {&fx.w});
  }
  SUBCASE("NULL topk_weights") {
    rejected(run(fx.ids.dl(), nullptr), IA, {"'topk_weights'", "NULL"}, {&fx.ids});
  }
  SUBCASE("topk_ids dtype int64") {
    ids.set_dtype(kDLInt, 64);
    rejected(run(ids.dl(), fx.w.dl()), IA, {"'topk_ids.dtype'", "int32", "got int64"},
             {&fx.ids, &fx.w});
  }
  SUBCASE("topk_weights dtype bfloat16") {
    w.set_dtype(kDLBfloat, 16);
    rejected(run(fx.ids.dl(), w.dl()), IA, {"'topk_weights.dtype'", "float32", "got bfloat16"},
             {&fx.ids, &fx.w});
  }
  SUBCASE("topk_ids with k+1 columns") {
    ids.set_shape({3, 3});
    rejected(run(ids.dl(), fx.w.dl()), IA, {"'topk_ids'", "[T=3, k + n_shared=2]", "got shape [3, 3]"},
             {&fx.ids, &fx.w});
  }
  SUBCASE("topk_weights with T+1 rows") {
    w.set_shape({4, 2});
    rejected(run(fx.ids.dl(), w.dl()), IA, {"'topk_weights'", "[T=3, k + n_shared=2]", "got shape [4, 2]"},
             {&fx.ids, &fx.w});
  }
  SUBCASE("topk_ids non-contiguous") {
    ids.set_strides({4, 1});
    rejected(run(ids.dl(), fx.w.dl()), IA, {"'topk_ids.strides'", "stride 4 in dim 0"},
             {&fx.ids, &fx.w});
  }
  SUBCASE("topk_weights on CUDA, logits on the CPU") {
    w.set_device(kDLCUDA);
    rejected(run(fx.ids.dl(), w.dl()), IA, {"'topk_weights.device'", "(cpu)", "got cuda:0"},
             {&fx.ids});
  }
  SUBCASE("topk_ids on kDLOpenCL") {
    ids.set_device(kDLOpenCL);
    rejected(run(ids.dl(), fx.w.dl()), MOE_STATUS_UNSUPPORTED, {"'topk_ids.device'", "device_type 4"},
             {&fx.w});
  }
  SUBCASE("shared-expert columns missing") {
    auto c = router_cfg(MOE_ROUTING_SOFTMAX_TOPK, 8, 2);
    c.num_fused_shared_experts = 1;
    moe_router_t r = nullptr;
    MOE_CHECK_OK(moe_router_create(&c, &r));
    rejected(moe_router_run(r, fx.logits.dl(), nullptr, nullptr, fx.ids.dl(), fx.w.dl(), nullptr),
             IA, {"'topk_ids'", "k + n_shared=3", "got shape [3, 2]"}, {&fx.ids, &fx.w});
    moe_router_destroy(r);
  }
}

TEST_CASE("bad_input.router_run.bias_and_valid_count") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  auto c = router_cfg(MOE_ROUTING_DEEPSEEK_V3, 8, 2);
  c.n_group = 4;
  c.topk_group = 2;
  RouterFx fx(c);
  Buf bias(DT::f32, {8}), valid(DT::i32, {1});
  std::memset(bias.as<float>(), 0, bias.payload);
  std::vector<const Buf*> outs = {&fx.ids, &fx.w};
  SUBCASE("bias for a method without one") {
    RouterFx sm;
    rejected(sm.run(sm.logits.dl(), bias.dl()), IA,
             {"'correction_bias'", "NULL for this routing method", "got a tensor"}, {&sm.ids, &sm.w});
  }
  SUBCASE("bias dtype bfloat16") {
    Alt b(bias.dl());
    b.set_dtype(kDLBfloat, 16);
    rejected(fx.run(fx.logits.dl(), b.dl()), IA, {"'correction_bias.dtype'", "float32", "got bfloat16"},
             outs);
  }
  SUBCASE("bias of E+1") {
    Alt b(bias.dl());
    b.set_shape({9});
    rejected(fx.run(fx.logits.dl(), b.dl()), IA, {"'correction_bias'", "[E=8]", "got shape [9]"},
             outs);
  }
  SUBCASE("bias on CUDA, logits on the CPU") {
    Alt b(bias.dl());
    b.set_device(kDLCUDA);
    rejected(fx.run(fx.logits.dl(), b.dl()), IA, {"'correction_bias.device'", "(cpu)", "cuda:0"},
             outs);
  }
  SUBCASE("num_valid_tokens dtype float32") {
    Alt v(valid.dl());
    v.set_dtype(kDLFloat, 32);
    rejected(fx.run(fx.logits.dl(), nullptr, v.dl()), IA,
             {"'num_valid_tokens.dtype'", "int32", "got float32"}, outs);
  }
  SUBCASE("num_valid_tokens of shape [2]") {
    Alt v(valid.dl());
    v.set_shape({2});
    rejected(fx.run(fx.logits.dl(), nullptr, v.dl()), IA,
             {"'num_valid_tokens'", "shape [1]", "got shape [2]"}, outs);
  }
  SUBCASE("num_valid_tokens on CUDA, logits on the CPU") {
    Alt v(valid.dl());
    v.set_device(kDLCUDA);
    rejected(fx.run(fx.logits.dl(), nullptr, v.dl()), IA,
             {"'num_valid_tokens.device'", "cuda:0"}, outs);
  }
  // A count outside [0, T] is clamped (it is read on the device, where a
  // CUDA-graph batch cannot report an error): negative = no valid row.
  SUBCASE("num_valid_tokens negative: every row padded") {
    valid.as<int32_t>()[0] = -5;
    MOE_CHECK_OK(fx.run(fx.logits.dl(), bias.dl(), valid.dl()));
    for (int64_t i = 0; i < fx.ids.numel(); ++i) {
      CHECK(fx.ids.as<int32_t>()[i] == -1);
      CHECK(fx.w.as<float>()[i] == 0.0f);
    }
    CHECK(fx.ids.guards_intact());
    CHECK(fx.w.guards_intact());
  }
  SUBCASE("num_valid_tokens > T: every row routed") {
    valid.as<int32_t>()[0] = 1000;
    MOE_CHECK_OK(fx.run(fx.logits.dl(), bias.dl(), valid.dl()));
    for (int64_t i = 0; i < fx.ids.numel(); ++i) {
      CHECK(fx.ids.as<int32_t>()[i] >= 0);
      CHECK(fx.ids.as<int32_t>()[i] < 8);
    }
    CHECK(fx.ids.guards_intact());
    CHECK(fx.w.guards_intact());
  }
}

TEST_CASE("bad_input.router_run.empty_batch") {
  RouterFx fx;
  Alt lg(fx.logits.dl()), ids(fx.ids.dl()), w(fx.w.dl());
  lg.set_shape({0, 8});
  lg.t.data = nullptr;  // no element: data may be NULL
  ids.set_shape({0, 2});
  w.set_shape({0, 2});
  MOE_CHECK_OK(moe_router_run(fx.r, lg.dl(), nullptr, nullptr, ids.dl(), w.dl(), nullptr));
  CHECK(fx.ids.untouched());
  CHECK(fx.w.untouched());
}

// ---------------------------------------------------------------------------
// Pack
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.pack_topk") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  Buf ids(DT::i32, {3, 2}), w(DT::f32, {3, 2}), packed(DT::i32, {3, 2});
  const int32_t v[6] = {0, 1, 2, -1, 5, 7};
  std::memcpy(ids.as<int32_t>(), v, sizeof(v));
  for (int i = 0; i < 6; ++i) w.as<float>()[i] = 0.5f;
  auto pack = [&](const DLTensor* i, const DLTensor* ww, DLTensor* p) {
    return moe_pack_topk(i, ww, p, nullptr);
  };
  SUBCASE("NULL topk_ids") {
    rejected(pack(nullptr, w.dl(), packed.dl()), IA, {"moe_pack_topk", "'topk_ids'", "NULL"},
             {&packed});
  }
  SUBCASE("NULL packed") {
    rejected(pack(ids.dl(), w.dl(), nullptr), IA, {"'packed'", "NULL"});
  }
  SUBCASE("topk_ids rank 1") {
    Alt a(ids.dl());
    a.set_shape({6});
    rejected(pack(a.dl(), w.dl(), packed.dl()), IA, {"'topk_ids'", "2-D tensor [T, k]", "shape [6]"},
             {&packed});
  }
  SUBCASE("weights shape mismatch") {
    Alt a(w.dl());
    a.set_shape({2, 3});
    rejected(pack(ids.dl(), a.dl(), packed.dl()), IA,
             {"'topk_weights'", "[T=3, k=2]", "got shape [2, 3]"}, {&packed});
  }
  SUBCASE("packed dtype uint32") {
    Alt a(packed.dl());
    a.set_dtype(kDLUInt, 32);
    rejected(pack(ids.dl(), w.dl(), a.dl()), IA, {"'packed.dtype'", "int32", "got uint32"}, {&packed});
  }
  SUBCASE("packed on CUDA") {
    Alt a(packed.dl());
    a.set_device(kDLCUDA);
    rejected(pack(ids.dl(), w.dl(), a.dl()), IA, {"'packed.device'", "cuda:0"});
  }
  SUBCASE("all on CUDA") {
    Alt a(ids.dl()), b(w.dl()), p(packed.dl());
    a.set_device(kDLCUDA);
    b.set_device(kDLCUDA);
    p.set_device(kDLCUDA);
    if (!cuda_built())
      rejected(pack(a.dl(), b.dl(), p.dl()), MOE_STATUS_NOT_AVAILABLE,
               {"'topk_ids.device'", "without the CUDA backend", "cuda:0"});
  }
  SUBCASE("id above 32767 names token and slot") {
    ids.as<int32_t>()[3] = 40000;
    rejected(pack(ids.dl(), w.dl(), packed.dl()), IA,
             {"'topk_ids'", "[-1, 32767]", "token 1, slot 1", "got 40000"}, {&packed});
  }
  SUBCASE("id below -1 names token and slot") {
    ids.as<int32_t>()[4] = -2;
    rejected(pack(ids.dl(), w.dl(), packed.dl()), IA, {"'topk_ids'", "token 2, slot 0", "got -2"},
             {&packed});
  }
}

// ---------------------------------------------------------------------------
// Dispatcher
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.dispatcher_create") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  auto c = sized<moe_dispatcher_config_t>();
  c.struct_size = uint32_t(sizeof(c));
  REQUIRE(moe_dispatcher_config_default(&c) == MOE_STATUS_SUCCESS);
  c.num_experts = 8;
  c.ep_size = 2;
  moe_dispatcher_t d = nullptr;
  auto bad = [&](std::initializer_list<const char*> words, moe_status_t want = MOE_STATUS_INVALID_ARGUMENT) {
    rejected(moe_dispatcher_create(&c, &d), want, words);
    CHECK(d == nullptr);
  };
  std::vector<int32_t> mapping = {-1, 0, -1, 1, -1, 2, -1, 3};
  SUBCASE("NULL config default") {
    rejected(moe_dispatcher_config_default(nullptr), IA, {"moe_dispatcher_config_default", "'config'"});
  }
  SUBCASE("NULL dispatcher") {
    rejected(moe_dispatcher_create(&c, nullptr), IA, {"moe_dispatcher_create", "'dispatcher'", "NULL"});
  }
  SUBCASE("NULL config") {
    rejected(moe_dispatcher_create(nullptr, &d), IA, {"moe_dispatcher_create", "'config'", "NULL"});
  }
  SUBCASE("struct_size 0") {
    c.struct_size = 0;
    bad({"'config->struct_size'", "got 0"});
  }
  SUBCASE("struct_size from the future") {
    c.struct_size = uint32_t(sizeof(c) + 8);
    bad({"'config->struct_size'", "newer"});
  }
  SUBCASE("E = 0") {
    c.num_experts = 0;
    bad({"'config->num_experts'", "[1, 32767]", "got 0"});
  }
  SUBCASE("ep_size = 0") {
    c.ep_size = 0;
    bad({"'config->ep_size'", "[1, E=8]", "got 0"});
  }
  SUBCASE("ep_size > E") {
    c.ep_size = 9;
    bad({"'config->ep_size'", "[1, E=8]", "got 9"});
  }
  SUBCASE("ep_rank negative") {
    c.ep_rank = -1;
    bad({"'config->ep_rank'", "[0, ep_size=2)", "got -1"});
  }
  SUBCASE("ep_rank = ep_size") {
    c.ep_rank = 2;
    bad({"'config->ep_rank'", "[0, ep_size=2)", "got 2"});
  }
  SUBCASE("E % ep_size != 0 without a mapping") {
    c.ep_size = 3;
    bad({"'config->ep_size'", "divisor of E=8", "got 3"});
  }
  SUBCASE("num_local_experts inconsistent with ep_size") {
    c.num_local_experts = 3;
    bad({"'config->num_local_experts'", "E / ep_size = 4", "got 3"});
  }
  SUBCASE("explicit mapping without num_local_experts") {
    c.local_expert_mapping = mapping.data();
    bad({"'config->num_local_experts'", "[1, E=8] with an explicit mapping", "got 0"});
  }
  SUBCASE("explicit mapping entry >= E_loc") {
    c.local_expert_mapping = mapping.data();
    c.num_local_experts = 4;
    mapping[5] = 4;
    bad({"'config->local_expert_mapping[5]'", "[-1, E_loc=4)", "got 4"});
  }
  SUBCASE("explicit mapping entry < -1") {
    c.local_expert_mapping = mapping.data();
    c.num_local_experts = 4;
    mapping[0] = -2;
    bad({"'config->local_expert_mapping[0]'", "got -2"});
  }
  SUBCASE("device_type kDLOpenCL") {
    c.device_type = kDLOpenCL;
    bad({"'config->device_type'", "kDLCPU (1) or kDLCUDA (2)", "got 4"}, MOE_STATUS_UNSUPPORTED);
  }
  SUBCASE("device_type kDLCUDA with a negative ordinal") {
    c.device_type = kDLCUDA;
    c.device_id = -1;
    bad({"'config->device_id'", "ordinal >= 0", "got -1"});
  }
  SUBCASE("device_type kDLCUDA without the CUDA backend") {
    c.device_type = kDLCUDA;
    if (!cuda_built()) bad({"without the CUDA backend", "cuda:0"}, MOE_STATUS_NOT_AVAILABLE);
  }
  // A caller built before device_type/device_id existed gets a CPU dispatcher.
  SUBCASE("older caller") {
    moe_dispatcher_config_t old;
    std::memset(&old, 0x7f, sizeof(old));
    old.struct_size = uint32_t(offsetof(moe_dispatcher_config_t, device_type));
    old.num_experts = 8;
    old.ep_rank = 1;
    old.ep_size = 2;
    old.local_expert_mapping = nullptr;
    old.num_local_experts = 0;
    MOE_CHECK_OK(moe_dispatcher_create(&old, &d));
    int32_t e_loc = 0;
    MOE_CHECK_OK(moe_dispatcher_num_local_experts(d, &e_loc));
    CHECK(e_loc == 4);
    std::vector<int32_t> map(8), mask(8);
    MOE_CHECK_OK(moe_dispatcher_get_mapping(d, map.data(), mask.data(), 8));
    CHECK(map == std::vector<int32_t>{-1, -1, -1, -1, 0, 1, 2, 3});
    CHECK(mask == std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1});
    moe_dispatcher_destroy(d);
  }
}

TEST_CASE("bad_input.dispatcher_queries") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  DispatchFx fx;
  int32_t n = 0;
  size_t bytes = 0;
  std::vector<int32_t> map(8, 77);
  SUBCASE("destroy NULL") { MOE_CHECK_OK(moe_dispatcher_destroy(nullptr)); }
  SUBCASE("num_local_experts NULL dispatcher") {
    rejected(moe_dispatcher_num_local_experts(nullptr, &n), IA,
             {"moe_dispatcher_num_local_experts", "'dispatcher'"});
  }
  SUBCASE("num_local_experts NULL out") {
    rejected(moe_dispatcher_num_local_experts(fx.d, nullptr), IA, {"'num_local_experts'", "NULL"});
  }
  SUBCASE("get_mapping NULL dispatcher") {
    rejected(moe_dispatcher_get_mapping(nullptr, map.data(), nullptr, 8), IA,
             {"moe_dispatcher_get_mapping", "'dispatcher'"});
  }
  SUBCASE("get_mapping len != E") {
    rejected(moe_dispatcher_get_mapping(fx.d, map.data(), nullptr, 7), IA,
             {"'len'", "E = 8", "got 7"});
    CHECK(map == std::vector<int32_t>(8, 77));
  }
  SUBCASE("get_mapping both outputs NULL") {
    MOE_CHECK_OK(moe_dispatcher_get_mapping(fx.d, nullptr, nullptr, 8));
  }
  SUBCASE("workspace_size NULL dispatcher") {
    rejected(moe_dispatcher_workspace_size(nullptr, 4, 2, &bytes), IA,
             {"moe_dispatcher_workspace_size", "'dispatcher'"});
  }
  SUBCASE("workspace_size NULL bytes") {
    rejected(moe_dispatcher_workspace_size(fx.d, 4, 2, nullptr), IA, {"'bytes'", "NULL"});
  }
  SUBCASE("workspace_size negative max_tokens") {
    rejected(moe_dispatcher_workspace_size(fx.d, -1, 2, &bytes), IA,
             {"'max_tokens'", "[0, 549755813888]", "got -1"});
  }
  SUBCASE("workspace_size columns 0") {
    rejected(moe_dispatcher_workspace_size(fx.d, 4, 0, &bytes), IA, {"'columns'", "got 0"});
  }
}

TEST_CASE("bad_input.dispatcher_dispatch") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  DispatchFx fx;
  Alt ids(fx.topk_ids.dl());
  auto outs = fx.outs();
  auto run_out = [&](DLTensor* li, DLTensor* cnt, DLTensor* off, DLTensor* srt) {
    return moe_dispatcher_dispatch(fx.d, fx.topk_ids.dl(), li, cnt, off, srt, nullptr, 0, nullptr);
  };
  SUBCASE("NULL dispatcher") {
    rejected(moe_dispatcher_dispatch(nullptr, fx.topk_ids.dl(), fx.local_ids.dl(), fx.counts.dl(),
                                     fx.offsets.dl(), fx.sorted.dl(), nullptr, 0, nullptr),
             IA, {"moe_dispatcher_dispatch", "'dispatcher'"}, outs);
  }
  SUBCASE("NULL topk_ids") { rejected(fx.run(nullptr), IA, {"'topk_ids'", "NULL"}, outs); }
  SUBCASE("topk_ids dtype float32") {
    ids.set_dtype(kDLFloat, 32);
    rejected(fx.run(ids.dl()), IA, {"'topk_ids.dtype'", "int32", "got float32"}, outs);
  }
  SUBCASE("topk_ids rank 1") {
    ids.set_shape({6});
    rejected(fx.run(ids.dl()), IA, {"'topk_ids'", "shape [T, K]", "got shape [6]"}, outs);
  }
  SUBCASE("K = 0") {
    ids.set_shape({3, 0});
    rejected(fx.run(ids.dl()), IA, {"'topk_ids'", "K (dim 1) in [1, 1024]", "got 0"}, outs);
  }
  SUBCASE("K = 1025") {
    ids.set_shape({1, 1025});
    rejected(fx.run(ids.dl()), IA, {"'topk_ids'", "K (dim 1) in [1, 1024]", "got 1025"}, outs);
  }
  SUBCASE("topk_ids non-contiguous") {
    ids.set_strides({1, 3});
    rejected(fx.run(ids.dl()), IA, {"'topk_ids.strides'", "stride 3 in dim 1"}, outs);
  }
  SUBCASE("id = E names token and slot") {
    fx.topk_ids.as<int32_t>()[3] = 8;
    rejected(fx.run(fx.topk_ids.dl()), IA, {"'topk_ids'", "[-1, 8)", "token 1, slot 1", "got 8"},
             outs);
  }
  SUBCASE("id < -1 names token and slot") {
    fx.topk_ids.as<int32_t>()[4] = -7;
    rejected(fx.run(fx.topk_ids.dl()), IA, {"'topk_ids'", "token 2, slot 0", "got -7"}, outs);
  }
  SUBCASE("local_ids shape [T, K+1]") {
    Alt a(fx.local_ids.dl());
    a.set_shape({3, 3});
    rejected(run_out(a.dl(), fx.counts.dl(), fx.offsets.dl(), fx.sorted.dl()), IA,
             {"'local_ids'", "[T=3, K=2]", "got shape [3, 3]"}, outs);
  }
  SUBCASE("expert_counts of E_loc + 1") {
    Alt a(fx.counts.dl());
    a.set_shape({5});
    rejected(run_out(fx.local_ids.dl(), a.dl(), fx.offsets.dl(), fx.sorted.dl()), IA,
             {"'expert_counts'", "[E_loc=4]", "got shape [5]"}, outs);
  }
  SUBCASE("expert_offsets of E_loc") {
    Alt a(fx.offsets.dl());
    a.set_shape({4});
    rejected(run_out(fx.local_ids.dl(), fx.counts.dl(), a.dl(), fx.sorted.dl()), IA,
             {"'expert_offsets'", "[E_loc + 1=5]", "got shape [4]"}, outs);
  }
  SUBCASE("sorted_slots of T*K - 1") {
    Alt a(fx.sorted.dl());
    a.set_shape({5});
    rejected(run_out(fx.local_ids.dl(), fx.counts.dl(), fx.offsets.dl(), a.dl()), IA,
             {"'sorted_slots'", "[T * K=6]", "got shape [5]"}, outs);
  }
  SUBCASE("expert_counts dtype int64") {
    Alt a(fx.counts.dl());
    a.set_dtype(kDLInt, 64);
    rejected(run_out(fx.local_ids.dl(), a.dl(), fx.offsets.dl(), fx.sorted.dl()), IA,
             {"'expert_counts.dtype'", "got int64"}, outs);
  }
  SUBCASE("sorted_slots on CUDA, dispatcher on the CPU") {
    Alt a(fx.sorted.dl());
    a.set_device(kDLCUDA);
    rejected(run_out(fx.local_ids.dl(), fx.counts.dl(), fx.offsets.dl(), a.dl()), IA,
             {"'sorted_slots.device'", "(cpu)", "got cuda:0"},
             {&fx.local_ids, &fx.counts, &fx.offsets});
  }
  SUBCASE("topk_ids on CUDA, dispatcher on the CPU") {
    ids.set_device(kDLCUDA);
    rejected(fx.run(ids.dl()), IA, {"'topk_ids.device'", "(cpu)", "got cuda:0"}, outs);
  }
  SUBCASE("workspace NULL with nonzero bytes") {
    rejected(fx.run(fx.topk_ids.dl(), nullptr, 64), IA,
             {"'workspace'", "non-NULL pointer when workspace_bytes is 64", "got NULL"}, outs);
  }
  SUBCASE("workspace misaligned") {
    Workspace ws(1024);
    rejected(fx.run(fx.topk_ids.dl(), static_cast<char*>(ws.ptr()) + 4, 512), IA,
             {"'workspace'", "256-byte-aligned", "remainder 4"}, outs);
  }
  SUBCASE("caller workspace of the queried size") {
    size_t need = 0;
    MOE_CHECK_OK(moe_dispatcher_workspace_size(fx.d, 3, 2, &need));
    Workspace ws(need);
    MOE_CHECK_OK(fx.run(fx.topk_ids.dl(), ws.ptr(), need));
    for (const Buf* b : outs) CHECK(b->guards_intact());
  }
}

// ---------------------------------------------------------------------------
// Runner: config, create, weights
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.runner_create") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  auto c = runner_cfg(4, 8, 4);
  moe_runner_t r = nullptr;
  auto bad = [&](std::initializer_list<const char*> words, moe_status_t want = MOE_STATUS_INVALID_ARGUMENT) {
    rejected(moe_runner_create(&c, &r), want, words);
    CHECK(r == nullptr);
  };
  SUBCASE("NULL config default") {
    rejected(moe_runner_config_default(nullptr), IA, {"moe_runner_config_default", "'config'"});
  }
  SUBCASE("NULL runner") {
    rejected(moe_runner_create(&c, nullptr), IA, {"moe_runner_create", "'runner'", "NULL"});
  }
  SUBCASE("NULL config") {
    rejected(moe_runner_create(nullptr, &r), IA, {"moe_runner_create", "'config'", "NULL"});
  }
  SUBCASE("struct_size 0") {
    c.struct_size = 0;
    bad({"'config->struct_size'", "got 0"});
  }
  SUBCASE("struct_size from the future") {
    c.struct_size = uint32_t(sizeof(c) + 4);
    bad({"'config->struct_size'", "newer"});
  }
  SUBCASE("E_loc = 0") {
    c.num_experts = 0;
    bad({"'config->num_experts'", "[1, 32767]", "got 0"});
  }
  SUBCASE("H = 0") {
    c.hidden_size = 0;
    bad({"'config->hidden_size'", "[1, 2^20]", "got 0"});
  }
  SUBCASE("H > 2^20") {
    c.hidden_size = (1 << 20) + 1;
    bad({"'config->hidden_size'", "[1, 2^20]", "got 1048577"});
  }
  SUBCASE("I negative") {
    c.intermediate_size = -4;
    bad({"'config->intermediate_size'", "got -4"});
  }
  SUBCASE("activation out of range") {
    c.activation = MOE_ACTIVATION_NUM_ACTIVATIONS;
    bad({"'config->activation'", "[0, 5)", "got 5"});
  }
  SUBCASE("gated not a flag") {
    c.gated = 2;
    bad({"'config->gated'", "0 or 1", "got 2"});
  }
  SUBCASE("swap_gate_up without gated") {
    c.gated = 0;
    c.swap_gate_up = 1;
    bad({"'config->swap_gate_up'", "0 when gated is 0", "got 1"});
  }
  SUBCASE("apply_router_weight_on_input not a flag") {
    c.apply_router_weight_on_input = 7;
    bad({"'config->apply_router_weight_on_input'", "got 7"});
  }
  SUBCASE("quant_mode out of range") {
    c.quant_mode = 3;
    bad({"'config->quant_mode'", "[0, 3)", "got 3"});
  }
  SUBCASE("act_scale_mode out of range") {
    c.act_scale_mode = -1;
    bad({"'config->act_scale_mode'", "got -1"});
  }
  SUBCASE("STATIC activation scales without FP8_PER_TENSOR") {
    c.act_scale_mode = MOE_ACT_SCALE_STATIC;
    c.quant_mode = MOE_QUANT_FP8_BLOCK_128;
    bad({"'config->act_scale_mode'", "DYNAMIC unless quant_mode is FP8_PER_TENSOR", "STATIC"});
  }
  SUBCASE("output_scale NaN") {
    c.output_scale = std::nanf("");
    bad({"'config->output_scale'", "finite", "got nan"});
  }
  SUBCASE("deterministic = 0 is unsupported") {
    c.deterministic = 0;
    bad({"'config->deterministic'", "got 0"}, MOE_STATUS_UNSUPPORTED);
  }
  SUBCASE("validate_ids not a flag") {
    c.validate_ids = 3;
    bad({"'config->validate_ids'", "0 or 1", "got 3"});
  }
  SUBCASE("destroy NULL") { MOE_CHECK_OK(moe_runner_destroy(nullptr)); }
}

// A caller built against a header that ended at intermediate_size gets a
// gated SiLU bf16-or-float runner with output_scale 1, as the defaults say.
TEST_CASE("bad_input.runner_create.older_caller") {
  RunnerFx fx;
  moe_runner_config_t old;
  std::memset(&old, 0x7f, sizeof(old));
  old.struct_size = uint32_t(offsetof(moe_runner_config_t, activation));
  old.num_experts = RunnerFx::E_loc;
  old.hidden_size = RunnerFx::H;
  old.intermediate_size = RunnerFx::I;
  moe_runner_t r = nullptr;
  MOE_CHECK_OK(moe_runner_create(&old, &r));
  MOE_CHECK_OK(moe_runner_set_weights(r, fx.w13.dl(), fx.w2.dl(), 0, 0, 0, 0));
  Buf y(DT::f32, {RunnerFx::T, RunnerFx::H});
  MOE_CHECK_OK(fx.run_default());
  MOE_CHECK_OK(moe_runner_run(r, fx.hidden.dl(), fx.local_ids.dl(), fx.weights.dl(),
                              fx.offsets.dl(), fx.sorted.dl(), y.dl(), nullptr, 0, nullptr));
  CHECK(std::memcmp(y.as<float>(), fx.out.as<float>(), y.payload) == 0);
  CHECK(y.guards_intact());
  CHECK(fx.out.guards_intact());
  moe_runner_destroy(r);
}

TEST_CASE("bad_input.runner_set_weights.unquantized") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  RunnerFx fx(runner_cfg(4, 8, 4), /*set_weights=*/false);
  Buf scale(DT::f32, {4});
  Alt w13(fx.w13.dl()), w2(fx.w2.dl());
  auto set = [&](const DLTensor* a, const DLTensor* b, const DLTensor* s13 = nullptr,
                 const DLTensor* a2 = nullptr) {
    return moe_runner_set_weights(fx.r, a, b, s13, nullptr, nullptr, a2);
  };
  SUBCASE("NULL runner") {
    rejected(moe_runner_set_weights(nullptr, fx.w13.dl(), fx.w2.dl(), 0, 0, 0, 0), IA,
             {"moe_runner_set_weights", "'runner'"});
  }
  SUBCASE("NULL w13") { rejected(set(nullptr, fx.w2.dl()), IA, {"'w13'", "NULL"}); }
  SUBCASE("NULL w2") { rejected(set(fx.w13.dl(), nullptr), IA, {"'w2'", "NULL"}); }
  SUBCASE("w13 dtype int32") {
    w13.set_dtype(kDLInt, 32);
    rejected(set(w13.dl(), fx.w2.dl()), IA,
             {"'w13.dtype'", "float32, float16 or bfloat16", "got int32"});
  }
  SUBCASE("FP8 weights for quant_mode NONE") {
    w13.set_dtype(MOE_DLPACK_CODE_FLOAT8_E4M3FN, 8);
    rejected(set(w13.dl(), fx.w2.dl()), IA, {"'w13.dtype'", "got float8_e4m3fn"});
  }
  SUBCASE("w2 dtype differs from w13") {
    w2.set_dtype(kDLFloat, 16);
    rejected(set(fx.w13.dl(), w2.dl()), IA,
             {"'w2.dtype'", "the dtype of w13 (float32)", "got float16"});
  }
  SUBCASE("w13 of [E, I, H] for a gated runner") {
    w13.set_shape({4, 4, 8});
    rejected(set(w13.dl(), fx.w2.dl()), IA,
             {"'w13'", "[E_loc=4, 2 * I=8, H=8]", "got shape [4, 4, 8]"});
  }
  SUBCASE("w13 rank 2") {
    w13.set_shape({32, 8});
    rejected(set(w13.dl(), fx.w2.dl()), IA, {"'w13'", "got shape [32, 8]"});
  }
  SUBCASE("w2 transposed [E, I, H]") {
    w2.set_shape({4, 4, 8});
    rejected(set(fx.w13.dl(), w2.dl()), IA, {"'w2'", "[E_loc=4, H=8, I=4]", "got shape [4, 4, 8]"});
  }
  SUBCASE("w2 non-contiguous") {
    w2.set_strides({32, 1, 8});
    rejected(set(fx.w13.dl(), w2.dl()), IA, {"'w2.strides'", "stride 8 in dim 2"});
  }
  SUBCASE("w2 on CUDA, w13 on the CPU") {
    w2.set_device(kDLCUDA);
    rejected(set(fx.w13.dl(), w2.dl()), IA, {"'w2.device'", "(cpu)", "got cuda:0"});
  }
  SUBCASE("both on CUDA without the CUDA backend") {
    w13.set_device(kDLCUDA);
    w2.set_device(kDLCUDA);
    if (!cuda_built())
      rejected(set(w13.dl(), w2.dl()), MOE_STATUS_NOT_AVAILABLE,
               {"'w13.device'", "without the CUDA backend", "cuda:0"});
  }
  SUBCASE("w13 on kDLOpenCL") {
    w13.set_device(kDLOpenCL);
    rejected(set(w13.dl(), fx.w2.dl()), MOE_STATUS_UNSUPPORTED, {"'w13.device'", "device_type 4"});
  }
  SUBCASE("a weight scale for quant_mode NONE") {
    rejected(set(fx.w13.dl(), fx.w2.dl(), scale.dl()), IA,
             {"'w13_scale'", "NULL (quant_mode is NONE)", "got a tensor"});
  }
  SUBCASE("an activation scale for quant_mode NONE") {
    rejected(set(fx.w13.dl(), fx.w2.dl(), nullptr, scale.dl()), IA,
             {"'a2_scale'", "NULL (quant_mode is NONE)"});
  }
  // Whatever was rejected, the runner still has no weights.
  rejected(fx.run_default(), IA, {"moe_runner_run", "'runner'", "moe_runner_set_weights",
                                  "a runner without weights"}, {&fx.out});
}

TEST_CASE("bad_input.runner_set_weights.keeps_previous_weights") {
  RunnerFx fx;
  MOE_CHECK_OK(fx.run_default());
  std::vector<float> before(fx.out.as<float>(), fx.out.as<float>() + fx.out.numel());
  Alt w2(fx.w2.dl());
  w2.set_shape({4, 8, 5});
  CHECK(moe_runner_set_weights(fx.r, fx.w13.dl(), w2.dl(), 0, 0, 0, 0) ==
        MOE_STATUS_INVALID_ARGUMENT);
  std::memset(fx.out.as<float>(), 0xff, fx.out.payload);  // NaN poison
  MOE_CHECK_OK(fx.run_default());
  CHECK(std::memcmp(before.data(), fx.out.as<float>(), fx.out.payload) == 0);
}

TEST_CASE("bad_input.runner_set_weights.fp8") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  const int E = 4, H = 8, I = 4;
  Buf w13(DT::e4m3, {E, 2 * I, H}), w2(DT::e4m3, {E, H, I});
  std::memset(w13.as<uint8_t>(), 0x38, w13.payload);  // 1.0
  std::memset(w2.as<uint8_t>(), 0x38, w2.payload);
  Buf s13(DT::f32, {E}), s2(DT::f32, {E}), a13(DT::f32, {1}), a2(DT::f32, {1});
  Buf b13(DT::f32, {E, 1, 1}), b2(DT::f32, {E, 1, 1});
  for (Buf* b : {&s13, &s2, &a13, &a2, &b13, &b2})
    for (int64_t i = 0; i < b->numel(); ++i) b->as<float>()[i] = 0.5f;
  auto make = [&](int quant, int act) {
    auto c = runner_cfg(E, H, I);
    c.quant_mode = quant;
    c.act_scale_mode = act;
    moe_runner_t r = nullptr;
    MOE_CHECK_OK(moe_runner_create(&c, &r));
    return std::unique_ptr<moe_runner_s, decltype(&moe_runner_destroy)>(r, &moe_runner_destroy);
  };
  SUBCASE("per-tensor") {
    auto r = make(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_DYNAMIC);
    auto set = [&](const DLTensor* w, const DLTensor* x13, const DLTensor* x2,
                   const DLTensor* y13 = nullptr, const DLTensor* y2 = nullptr) {
      return moe_runner_set_weights(r.get(), w, w2.dl(), x13, x2, y13, y2);
    };
    SUBCASE("float weights") {
      Buf f(DT::f32, {E, 2 * I, H});
      rejected(set(f.dl(), s13.dl(), s2.dl()), IA, {"'w13.dtype'", "float8_e4m3fn", "got float32"});
    }
    SUBCASE("w13_scale missing") {
      rejected(set(w13.dl(), nullptr, s2.dl()), IA,
               {"'w13_scale'", "an f32 scale tensor for this quant mode", "got NULL"});
    }
    SUBCASE("w2_scale missing") {
      rejected(set(w13.dl(), s13.dl(), nullptr), IA, {"'w2_scale'", "got NULL"});
    }
    SUBCASE("w2_scale of E_loc + 1") {
      Alt s(s2.dl());
      s.set_shape({5});
      rejected(set(w13.dl(), s13.dl(), s.dl()), IA, {"'w2_scale'", "[E_loc=4]", "got shape [5]"});
    }
    SUBCASE("w13_scale dtype bfloat16") {
      Alt s(s13.dl());
      s.set_dtype(kDLBfloat, 16);
      rejected(set(w13.dl(), s.dl(), s2.dl()), IA, {"'w13_scale.dtype'", "float32", "got bfloat16"});
    }
    SUBCASE("w13_scale on CUDA") {
      Alt s(s13.dl());
      s.set_device(kDLCUDA);
      rejected(set(w13.dl(), s.dl(), s2.dl()), IA, {"'w13_scale.device'", "cuda:0"});
    }
    SUBCASE("activation scale with DYNAMIC") {
      rejected(set(w13.dl(), s13.dl(), s2.dl(), a13.dl()), IA,
               {"'a13_scale'", "NULL (act_scale_mode is DYNAMIC)", "got a tensor"});
    }
    SUBCASE("uint8 weights holding E4M3 bits") {
      Alt u(w13.dl()), v(w2.dl());
      u.set_dtype(kDLUInt, 8);
      v.set_dtype(kDLUInt, 8);
      MOE_CHECK_OK(moe_runner_set_weights(r.get(), u.dl(), v.dl(), s13.dl(), s2.dl(), 0, 0));
    }
  }
  SUBCASE("per-tensor static") {
    auto r = make(MOE_QUANT_FP8_PER_TENSOR, MOE_ACT_SCALE_STATIC);
    SUBCASE("a13_scale missing") {
      rejected(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), s13.dl(), s2.dl(), nullptr, a2.dl()),
               IA, {"'a13_scale'", "got NULL"});
    }
    SUBCASE("a2_scale of shape [2]") {
      Alt s(a2.dl());
      s.set_shape({2});
      rejected(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), s13.dl(), s2.dl(), a13.dl(), s.dl()),
               IA, {"'a2_scale'", "shape [1]", "got shape [2]"});
    }
  }
  SUBCASE("block 128") {
    auto r = make(MOE_QUANT_FP8_BLOCK_128, MOE_ACT_SCALE_DYNAMIC);
    SUBCASE("per-expert scales instead of block scales") {
      rejected(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), s13.dl(), b2.dl(), 0, 0), IA,
               {"'w13_scale'", "[E_loc=4, ceil(rows13/128)=1, ceil(H/128)=1]", "got shape [4]"});
    }
    SUBCASE("w2_scale missing") {
      rejected(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), b13.dl(), nullptr, 0, 0), IA,
               {"'w2_scale'", "got NULL"});
    }
    SUBCASE("activation scale given") {
      rejected(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), b13.dl(), b2.dl(), a13.dl(), 0),
               IA, {"'a13_scale'", "scaled on the fly"});
    }
    SUBCASE("valid") {
      MOE_CHECK_OK(moe_runner_set_weights(r.get(), w13.dl(), w2.dl(), b13.dl(), b2.dl(), 0, 0));
    }
  }
}

TEST_CASE("bad_input.runner_workspace_size") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  RunnerFx fx;
  size_t bytes = 0;
  SUBCASE("NULL runner") {
    rejected(moe_runner_workspace_size(nullptr, 4, 2, kDLCPU, &bytes), IA,
             {"moe_runner_workspace_size", "'runner'"});
  }
  SUBCASE("NULL bytes") {
    rejected(moe_runner_workspace_size(fx.r, 4, 2, kDLCPU, nullptr), IA, {"'bytes'", "NULL"});
  }
  SUBCASE("negative max_tokens") {
    rejected(moe_runner_workspace_size(fx.r, -2, 2, kDLCPU, &bytes), IA,
             {"'max_tokens'", "got -2"});
  }
  SUBCASE("max_tokens beyond any tensor") {
    rejected(moe_runner_workspace_size(fx.r, INT64_MAX, 2, kDLCPU, &bytes), IA,
             {"'max_tokens'", "2^40", "got 9223372036854775807"});
  }
  SUBCASE("columns 0") {
    rejected(moe_runner_workspace_size(fx.r, 4, 0, kDLCPU, &bytes), IA,
             {"'columns'", "[1, 1024]", "got 0"});
  }
  SUBCASE("device_type kDLOpenCL") {
    rejected(moe_runner_workspace_size(fx.r, 4, 2, kDLOpenCL, &bytes), MOE_STATUS_UNSUPPORTED,
             {"'device_type'", "kDLCPU (1) or kDLCUDA (2)", "got 4"});
  }
  SUBCASE("device_type kDLCUDA without the CUDA backend") {
    if (!cuda_built())
      rejected(moe_runner_workspace_size(fx.r, 4, 2, kDLCUDA, &bytes), MOE_STATUS_NOT_AVAILABLE,
               {"without the CUDA backend"});
  }
  SUBCASE("zero tokens is a valid query") {
    MOE_CHECK_OK(moe_runner_workspace_size(fx.r, 0, 1, kDLCPU, &bytes));
  }
}

// ---------------------------------------------------------------------------
// Runner: run
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.runner_run.tensors") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  RunnerFx fx;
  std::vector<const Buf*> outs = {&fx.out};
  Alt x(fx.hidden.dl()), ids(fx.local_ids.dl()), w(fx.weights.dl()), off(fx.offsets.dl()),
      slots(fx.sorted.dl()), y(fx.out.dl());
  auto run = [&]() { return fx.run(x.dl(), ids.dl(), w.dl(), off.dl(), slots.dl(), y.dl()); };
  SUBCASE("NULL runner") {
    rejected(moe_runner_run(nullptr, x.dl(), ids.dl(), w.dl(), off.dl(), slots.dl(), y.dl(), nullptr,
                            0, nullptr),
             IA, {"moe_runner_run", "'runner'"}, outs);
  }
  SUBCASE("NULL hidden") {
    rejected(fx.run(nullptr, ids.dl(), w.dl(), off.dl(), slots.dl(), y.dl()), IA,
             {"'hidden'", "NULL"}, outs);
  }
  SUBCASE("NULL output") {
    rejected(fx.run(x.dl(), ids.dl(), w.dl(), off.dl(), slots.dl(), nullptr), IA,
             {"'output'", "NULL"});
  }
  SUBCASE("NULL sorted_slots") {
    rejected(fx.run(x.dl(), ids.dl(), w.dl(), off.dl(), nullptr, y.dl()), IA,
             {"'sorted_slots'", "NULL"}, outs);
  }
  SUBCASE("hidden dtype int32") {
    x.set_dtype(kDLInt, 32);
    rejected(run(), IA, {"'hidden.dtype'", "got int32"}, outs);
  }
  SUBCASE("hidden with H+1 columns") {
    x.set_shape({3, 9});
    rejected(run(), IA, {"'hidden'", "[T, H=8]", "got shape [3, 9]"}, outs);
  }
  SUBCASE("hidden non-contiguous") {
    x.set_strides({16, 1});
    rejected(run(), IA, {"'hidden.strides'", "stride 16 in dim 0"}, outs);
  }
  SUBCASE("output dtype differs from hidden") {
    y.set_dtype(kDLBfloat, 16);
    rejected(run(), IA, {"'output.dtype'", "the dtype of hidden (float32)", "got bfloat16"}, outs);
  }
  SUBCASE("output with T+1 rows") {
    y.set_shape({4, 8});
    rejected(run(), IA, {"'output'", "[T=3, H=8]", "got shape [4, 8]"}, outs);
  }
  SUBCASE("hidden on CUDA, weights on the CPU") {
    x.set_device(kDLCUDA);
    rejected(run(), IA, {"'hidden.device'", "(cpu)", "got cuda:0"}, outs);
  }
  SUBCASE("output on CUDA") {
    y.set_device(kDLCUDA);
    rejected(run(), IA, {"'output.device'", "got cuda:0"}, outs);
  }
  SUBCASE("local_ids on CUDA") {
    ids.set_device(kDLCUDA);
    rejected(run(), IA, {"'local_ids.device'", "got cuda:0"}, outs);
  }
  SUBCASE("local_ids dtype float32") {
    ids.set_dtype(kDLFloat, 32);
    rejected(run(), IA, {"'local_ids.dtype'", "int32", "got float32"}, outs);
  }
  SUBCASE("local_ids with T+1 rows") {
    ids.set_shape({4, 2});
    rejected(run(), IA, {"'local_ids'", "[T=3, K]", "got shape [4, 2]"}, outs);
  }
  SUBCASE("K = 0") {
    ids.set_shape({3, 0});
    rejected(run(), IA, {"'local_ids'", "K (dim 1) in [1, 1024]", "got 0"}, outs);
  }
  SUBCASE("topk_weights with K+1 columns") {
    w.set_shape({3, 3});
    rejected(run(), IA, {"'topk_weights'", "[T=3, K=2]", "got shape [3, 3]"}, outs);
  }
  SUBCASE("topk_weights dtype float16") {
    w.set_dtype(kDLFloat, 16);
    rejected(run(), IA, {"'topk_weights.dtype'", "got float16"}, outs);
  }
  SUBCASE("expert_offsets of E_loc") {
    off.set_shape({4});
    rejected(run(), IA, {"'expert_offsets'", "[E_loc + 1=5]", "got shape [4]"}, outs);
  }
  SUBCASE("sorted_slots of T*K + 1") {
    slots.set_shape({7});
    rejected(run(), IA, {"'sorted_slots'", "[T * K=6]", "got shape [7]"}, outs);
  }
  SUBCASE("weight on input with K = 2") {
    auto c = runner_cfg(4, 8, 4);
    c.apply_router_weight_on_input = 1;
    RunnerFx won(c);
    rejected(won.run_default(), IA,
             {"'local_ids'", "K = 1 (apply_router_weight_on_input is top-1 only)", "got 2"},
             {&won.out});
  }
}

TEST_CASE("bad_input.runner_run.metadata") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  RunnerFx fx;  // ids {0, 3 | 2, -1 | 3, 1}: offsets {0, 1, 2, 3, 5}, sorted {0, 5, 2, 1, 4, -1}
  REQUIRE(std::vector<int32_t>(fx.offsets.as<int32_t>(), fx.offsets.as<int32_t>() + 5) ==
          std::vector<int32_t>{0, 1, 2, 3, 5});
  REQUIRE(std::vector<int32_t>(fx.sorted.as<int32_t>(), fx.sorted.as<int32_t>() + 6) ==
          std::vector<int32_t>{0, 5, 2, 1, 4, -1});
  int32_t* ids = fx.local_ids.as<int32_t>();
  int32_t* off = fx.offsets.as<int32_t>();
  int32_t* srt = fx.sorted.as<int32_t>();
  std::vector<const Buf*> outs = {&fx.out};
  SUBCASE("local id = E_loc names token and slot") {
    ids[5] = 4;
    rejected(fx.run_default(), IA, {"'local_ids'", "[-1, 4)", "token 2, slot 1", "got 4"}, outs);
  }
  SUBCASE("local id < -1 names token and slot") {
    ids[1] = -9;
    rejected(fx.run_default(), IA, {"'local_ids'", "token 0, slot 1", "got -9"}, outs);
  }
  SUBCASE("expert_offsets[0] != 0") {
    off[0] = 1;
    rejected(fx.run_default(), IA, {"'expert_offsets[0]'", "expected 0", "got 1"}, outs);
  }
  SUBCASE("decreasing expert_offsets") {
    off[2] = 0;
    rejected(fx.run_default(), IA, {"'expert_offsets[2]'", "[expert_offsets[1]=1, T*K=6]", "got 0"},
             outs);
  }
  SUBCASE("expert_offsets past T*K") {
    off[4] = 7;
    rejected(fx.run_default(), IA, {"'expert_offsets[4]'", "T*K=6", "got 7"}, outs);
  }
  SUBCASE("expert_offsets total != slots with a local id") {
    off[4] = 4;
    rejected(fx.run_default(), IA, {"'expert_offsets[E_loc]'", "(5)", "got 4"}, outs);
  }
  SUBCASE("sorted_slots lists a slot twice") {
    srt[1] = 0;
    rejected(fx.run_default(), IA, {"'sorted_slots[1]'", "not listed before", "got 0"}, outs);
  }
  SUBCASE("sorted_slots lists a slot of another expert") {
    std::swap(srt[0], srt[1]);
    rejected(fx.run_default(), IA, {"'sorted_slots[0]'", "expert 0", "got 5"}, outs);
  }
  SUBCASE("sorted_slots entry out of range") {
    srt[2] = 6;
    rejected(fx.run_default(), IA, {"'sorted_slots[2]'", "got 6"}, outs);
  }
  SUBCASE("sorted_slots entry -1 inside the listed range") {
    srt[3] = -1;
    rejected(fx.run_default(), IA, {"'sorted_slots[3]'", "got -1"}, outs);
  }
  SUBCASE("metadata of another batch (ids changed after dispatch)") {
    ids[3] = 0;  // slot (1, 1) now claims expert 0, which the offsets do not list
    rejected(fx.run_default(), IA, {"'expert_offsets[E_loc]'", "(6)", "got 5"}, outs);
  }
}

TEST_CASE("bad_input.runner_run.workspace") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  RunnerFx fx;
  size_t need = 0;
  MOE_CHECK_OK(moe_runner_workspace_size(fx.r, RunnerFx::T, RunnerFx::K, kDLCPU, &need));
  REQUIRE(need > 0);
  Workspace ws(need);
  std::vector<const Buf*> outs = {&fx.out};
  SUBCASE("too small") {
    std::string want = "at least " + std::to_string(need);
    std::string got = "got " + std::to_string(need - 1);
    rejected(fx.run_default(ws.ptr(), need - 1), IA,
             {"'workspace_bytes'", want.c_str(), "*_workspace_size()", got.c_str()}, outs);
  }
  SUBCASE("misaligned") {
    rejected(fx.run_default(static_cast<char*>(ws.ptr()) + 4, need), IA,
             {"'workspace'", "256-byte-aligned", "remainder 4"}, outs);
  }
  SUBCASE("NULL with nonzero bytes") {
    rejected(fx.run_default(nullptr, need), IA,
             {"'workspace'", "non-NULL pointer when workspace_bytes is", "got NULL"}, outs);
  }
  SUBCASE("exactly the queried size, results equal the internal workspace's") {
    MOE_CHECK_OK(fx.run_default(ws.ptr(), need));
    std::vector<float> a(fx.out.as<float>(), fx.out.as<float>() + fx.out.numel());
    CHECK(fx.out.guards_intact());
    MOE_CHECK_OK(fx.run_default());
    CHECK(std::memcmp(a.data(), fx.out.as<float>(), fx.out.payload) == 0);
  }
  SUBCASE("query for more tokens covers fewer") {
    size_t big = 0;
    MOE_CHECK_OK(moe_runner_workspace_size(fx.r, 64, RunnerFx::K, kDLCPU, &big));
    CHECK(big >= need);
  }
}

TEST_CASE("bad_input.runner_run.empty_batch") {
  RunnerFx fx;
  Alt x(fx.hidden.dl()), ids(fx.local_ids.dl()), w(fx.weights.dl()), slots(fx.sorted.dl()),
      y(fx.out.dl());
  x.set_shape({0, 8});
  ids.set_shape({0, 2});
  w.set_shape({0, 2});
  slots.set_shape({0});
  y.set_shape({0, 8});
  Buf off(DT::i32, {5});
  std::memset(off.as<int32_t>(), 0, off.payload);
  MOE_CHECK_OK(fx.run(x.dl(), ids.dl(), w.dl(), off.dl(), slots.dl(), y.dl()));
  CHECK(fx.out.untouched());
}

// ---------------------------------------------------------------------------
// One-call layer
// ---------------------------------------------------------------------------

TEST_CASE("bad_input.layer_workspace_size") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  LayerFx fx;
  size_t bytes = 0;
  SUBCASE("NULL router") {
    rejected(moe_layer_workspace_size(nullptr, fx.disp, fx.runner, 4, kDLCPU, &bytes), IA,
             {"moe_layer_workspace_size", "'router'"});
  }
  SUBCASE("NULL dispatcher") {
    rejected(moe_layer_workspace_size(fx.router, nullptr, fx.runner, 4, kDLCPU, &bytes), IA,
             {"'dispatcher'"});
  }
  SUBCASE("NULL runner") {
    rejected(moe_layer_workspace_size(fx.router, fx.disp, nullptr, 4, kDLCPU, &bytes), IA,
             {"'runner'"});
  }
  SUBCASE("NULL bytes") {
    rejected(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 4, kDLCPU, nullptr), IA,
             {"'bytes'"});
  }
  SUBCASE("negative max_tokens") {
    rejected(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, -1, kDLCPU, &bytes), IA,
             {"'max_tokens'", "got -1"});
  }
  SUBCASE("device_type kDLOpenCL") {
    rejected(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 4, kDLOpenCL, &bytes),
             MOE_STATUS_UNSUPPORTED, {"'device_type'", "got 4"});
  }
  SUBCASE("device_type kDLCUDA, dispatcher on the CPU") {
    rejected(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 4, kDLCUDA, &bytes), IA,
             {"'device_type'", "the dispatcher's device (cpu)", "got cuda:0"});
  }
  SUBCASE("dispatcher E != router E") {
    auto dc = sized<moe_dispatcher_config_t>();
    dc.struct_size = uint32_t(sizeof(dc));
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    dc.num_experts = 16;
    dc.ep_size = 4;
    moe_dispatcher_t d = nullptr;
    MOE_CHECK_OK(moe_dispatcher_create(&dc, &d));
    rejected(moe_layer_workspace_size(fx.router, d, fx.runner, 4, kDLCPU, &bytes), IA,
             {"'dispatcher'", "router E + fused shared experts = 8", "got 16"});
    moe_dispatcher_destroy(d);
  }
  SUBCASE("runner E_loc != dispatcher E_loc") {
    auto c = runner_cfg(8, LayerFx::H, LayerFx::I);
    moe_runner_t r = nullptr;
    MOE_CHECK_OK(moe_runner_create(&c, &r));
    rejected(moe_layer_workspace_size(fx.router, fx.disp, r, 4, kDLCPU, &bytes), IA,
             {"'runner'", "the dispatcher's E_loc = 4", "got 8"});
    moe_runner_destroy(r);
  }
  SUBCASE("LLAMA4 router, runner without weight on input") {
    auto c = router_cfg(MOE_ROUTING_LLAMA4, 8, 1);
    moe_router_t r = nullptr;
    MOE_CHECK_OK(moe_router_create(&c, &r));
    rejected(moe_layer_workspace_size(r, fx.disp, fx.runner, 4, kDLCPU, &bytes), IA,
             {"'runner'", "apply_router_weight_on_input = 1", "got 0"});
    moe_router_destroy(r);
  }
  SUBCASE("weight-on-input runner behind a top-2 router") {
    auto c = runner_cfg(LayerFx::E_loc, LayerFx::H, LayerFx::I);
    c.apply_router_weight_on_input = 1;
    moe_runner_t r = nullptr;
    MOE_CHECK_OK(moe_runner_create(&c, &r));
    rejected(moe_layer_workspace_size(fx.router, fx.disp, r, 4, kDLCPU, &bytes), IA,
             {"'runner'", "apply_router_weight_on_input = 0", "got 1"});
    moe_runner_destroy(r);
  }
}

TEST_CASE("bad_input.layer_forward") {
  const moe_status_t IA = MOE_STATUS_INVALID_ARGUMENT;
  LayerFx fx;
  std::vector<const Buf*> outs = {&fx.out};
  Alt x(fx.hidden.dl()), lg(fx.logits.dl()), y(fx.out.dl());
  SUBCASE("NULL router") {
    rejected(moe_layer_forward(nullptr, fx.disp, fx.runner, x.dl(), lg.dl(), 0, 0, y.dl(), 0, 0, 0),
             IA, {"moe_layer_forward", "'router'"}, outs);
  }
  SUBCASE("NULL runner") {
    rejected(moe_layer_forward(fx.router, fx.disp, nullptr, x.dl(), lg.dl(), 0, 0, y.dl(), 0, 0, 0),
             IA, {"moe_layer_forward", "'runner'"}, outs);
  }
  SUBCASE("weights not set") {
    LayerFx nw(/*set_weights=*/false);
    rejected(nw.forward(nw.hidden.dl(), nw.logits.dl(), nw.out.dl()), IA,
             {"moe_layer_forward", "'runner'", "moe_runner_set_weights"}, {&nw.out});
  }
  SUBCASE("NULL hidden") {
    rejected(fx.forward(nullptr, lg.dl(), y.dl()), IA, {"'hidden'", "NULL"}, outs);
  }
  SUBCASE("NULL logits") {
    rejected(fx.forward(x.dl(), nullptr, y.dl()), IA, {"'logits'", "NULL"}, outs);
  }
  SUBCASE("logits T != hidden T") {
    lg.set_shape({2, 8});
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA,
             {"'logits'", "T = hidden's token count 3", "got shape [2, 8]"}, outs);
  }
  SUBCASE("logits E != router E") {
    lg.set_shape({3, 4});
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'logits'", "[T, E=8]", "got shape [3, 4]"},
             outs);
  }
  SUBCASE("logits dtype int8") {
    lg.set_dtype(kDLInt, 8);
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'logits.dtype'", "got int8"}, outs);
  }
  SUBCASE("bias for a softmax router") {
    Buf bias(DT::f32, {8});
    rejected(fx.forward(x.dl(), lg.dl(), y.dl(), nullptr, 0, bias.dl()), IA,
             {"'correction_bias'", "NULL for this routing method"}, outs);
  }
  SUBCASE("hidden H mismatch") {
    x.set_shape({3, 4});
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'hidden'", "[T, H=8]", "got shape [3, 4]"},
             outs);
  }
  SUBCASE("output dtype differs from hidden") {
    y.set_dtype(kDLFloat, 16);
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'output.dtype'", "got float16"}, outs);
  }
  SUBCASE("hidden on CUDA, logits on the CPU") {
    x.set_device(kDLCUDA);
    rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'hidden.device'", "got cuda:0"}, outs);
  }
  SUBCASE("logits on CUDA, the rest on the CPU") {
    lg.set_device(kDLCUDA);
    if (!cuda_built())
      rejected(fx.forward(x.dl(), lg.dl(), y.dl()), MOE_STATUS_NOT_AVAILABLE,
               {"'logits.device'", "without the CUDA backend"}, outs);
    else
      rejected(fx.forward(x.dl(), lg.dl(), y.dl()), IA, {"'hidden.device'", "got cpu"}, outs);
  }
  SUBCASE("handles that do not fit together") {
    auto c = router_cfg(MOE_ROUTING_SOFTMAX_TOPK, 16, 2);
    moe_router_t r = nullptr;
    MOE_CHECK_OK(moe_router_create(&c, &r));
    rejected(moe_layer_forward(r, fx.disp, fx.runner, x.dl(), lg.dl(), 0, 0, y.dl(), 0, 0, 0), IA,
             {"'dispatcher'", "= 16", "got 8"}, outs);
    moe_router_destroy(r);
  }
  SUBCASE("workspace too small") {
    size_t need = 0;
    MOE_CHECK_OK(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 3, kDLCPU, &need));
    Workspace ws(need);
    rejected(fx.forward(x.dl(), lg.dl(), y.dl(), ws.ptr(), need - 8), IA,
             {"'workspace_bytes'", "at least"}, outs);
  }
  SUBCASE("workspace misaligned") {
    // Large enough whatever the thread count (the CPU runner's scratch is per thread).
    size_t need = 0;
    MOE_CHECK_OK(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 3, kDLCPU, &need));
    Workspace ws(need + 256);
    rejected(fx.forward(x.dl(), lg.dl(), y.dl(), static_cast<char*>(ws.ptr()) + 8, need), IA,
             {"'workspace'", "256-byte-aligned", "remainder 8"}, outs);
  }
  SUBCASE("workspace NULL with nonzero bytes") {
    rejected(fx.forward(x.dl(), lg.dl(), y.dl(), nullptr, 1), IA,
             {"'workspace'", "workspace_bytes is 1", "got NULL"}, outs);
  }
  SUBCASE("queried workspace: same output as the internal one, guards intact") {
    size_t need = 0;
    MOE_CHECK_OK(moe_layer_workspace_size(fx.router, fx.disp, fx.runner, 3, kDLCPU, &need));
    Workspace ws(need);
    MOE_CHECK_OK(fx.forward(x.dl(), lg.dl(), y.dl(), ws.ptr(), need));
    CHECK(fx.out.guards_intact());
    std::vector<float> a(fx.out.as<float>(), fx.out.as<float>() + fx.out.numel());
    MOE_CHECK_OK(fx.forward(x.dl(), lg.dl(), y.dl()));
    CHECK(std::memcmp(a.data(), fx.out.as<float>(), fx.out.payload) == 0);
  }
}

// ---------------------------------------------------------------------------
// Lifecycle: create/destroy cycles of every handle (LeakSanitizer checks the
// process at exit), including failed creates and the internal workspaces.
// ---------------------------------------------------------------------------

TEST_CASE("hardening.lifecycle.create_destroy_cycles") {
  for (int cycle = 0; cycle < 20; ++cycle) {
    LayerFx fx;
    MOE_CHECK_OK(fx.forward(fx.hidden.dl(), fx.logits.dl(), fx.out.dl()));  // internal workspace
    RunnerFx rf;
    MOE_CHECK_OK(rf.run_default());
    DispatchFx df;
    MOE_CHECK_OK(df.run(df.topk_ids.dl()));
    // Failed creates leave nothing behind.
    auto dc = sized<moe_dispatcher_config_t>();
    dc.struct_size = uint32_t(sizeof(dc));
    REQUIRE(moe_dispatcher_config_default(&dc) == MOE_STATUS_SUCCESS);
    std::vector<int32_t> mapping = {0, 1, 9, -1};
    dc.num_experts = 4;
    dc.local_expert_mapping = mapping.data();
    dc.num_local_experts = 2;
    moe_dispatcher_t d = nullptr;
    CHECK(moe_dispatcher_create(&dc, &d) == MOE_STATUS_INVALID_ARGUMENT);
    CHECK(d == nullptr);
    // A runner whose weights are replaced keeps working, and is freed once.
    MOE_CHECK_OK(moe_runner_set_weights(rf.r, rf.w13.dl(), rf.w2.dl(), 0, 0, 0, 0));
    MOE_CHECK_OK(rf.run_default());
  }
}
